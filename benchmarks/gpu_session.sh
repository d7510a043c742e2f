#!/usr/bin/env bash
# What a lent GPU session should run, as two calls of the device tool (each well inside its
# 10-minute limit; the lease has 15 minutes in all). From the repository root, no install
# needed (normzoo finds kernels/ in a checkout):
#   bash benchmarks/gpu_session.sh tests   # the test suite on the GPU: compiled kernels, not the interpreter
#   bash benchmarks/gpu_session.sh bench   # bf16, 32768 rows, N = 1024 4096 16384: JSON + Markdown (+ PNG)
# Output goes to $OUT (set by the device tool) or benchmarks/results. Results are saved after
# each op, so a run cut short by its timeout keeps what it measured.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # examples/ and subprocesses find normzoo
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
case "${1:-}" in
  tests)
    timeout 500 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.log" | tail -n 60 ;;
  bench)
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr ' ' '-')
    timeout 520 python3 -m benchmarks --ops layernorm rmsnorm dyt derf --dtypes bf16 --rows 32768 \
      --hidden 1024 4096 16384 --out "$out" --name "$gpu-bf16-32768rows" 2>&1 | tail -n 70 ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh tests|bench" >&2; exit 2 ;;
esac
