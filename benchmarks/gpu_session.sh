#!/usr/bin/env bash
# Everything a lent GPU session should run, in one call of the device tool (about 8 minutes on an
# H100/H200; give it timeout_s=580). From the repository root, no install needed (normzoo finds
# kernels/ in a checkout):
#   bash benchmarks/gpu_session.sh            # writes to $OUT (device tool) or benchmarks/results
# 1. the test suite on the GPU: real compiled kernels instead of the interpreter;
# 2. the benchmark at the shapes (bf16, 32768 rows), JSON + Markdown + PNG.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # examples/ and subprocesses find normzoo
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -n 40 | tee "$out/gpu-tests.log"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr ' ' '-')
timeout 300 python3 -m benchmarks --ops layernorm rmsnorm dyt derf --dtypes bf16 --rows 32768 \
  --hidden 1024 2048 4096 8192 16384 --out "$out" --name "$gpu-bf16-32768rows" 2>&1 | tail -n 70
