#!/usr/bin/env bash
# One device-tool call, at most 9 minutes on one H100/H200, from the repository root (no install
# needed: normzoo finds kernels/ in a checkout):
#
#   bash benchmarks/gpu_session.sh            # GPU: tests, host cost, tuning, benchmark
#   bash benchmarks/gpu_session.sh --smoke    # CPU, TRITON_INTERPRET=1, toy sizes: checks this script (< 1 min)
#   bash benchmarks/gpu_session.sh --fused    # GPU: the fused residual ops only (peers, then bench-fused)
#   bash benchmarks/gpu_session.sh --fused --smoke   # ... on the CPU, toy sizes (~10 s)
#   bash benchmarks/gpu_session.sh --wide     # GPU: the whole-row tiles alone (tune-wide, then bench-wide)
#   bash benchmarks/gpu_session.sh --wide --smoke    # ... on the CPU, toy sizes
#
# Phases, each under its own `timeout` (a slow phase cannot eat the others; the whole run stops
# by TOTAL = 525 s), with the seconds each may take:
#   peers   ~30  install Liger-Kernel (and quack) from .peers/ when present (../shared/tools/peer-wheels)
#   tests   170  the kernel, API and fused-op tests on the GPU (compiled kernels, not the
#                interpreter); stops after 20 failures; with pytest-xdist, 14 workers on 16 or more
#                cores, else 8: most of the time is Triton compiling (the H100, 16 cores, two
#                calls on 2026-11-27, benchmarks/results/session-NVIDIA-H100-80GB-HBM3-run2-tests.log:
#                the other five files' 630 tests in 113 s, test_fused.py's 295 in 43 s; the tune
#                phase then gets what is left, ~25 s). Verbose, so a phase cut by its limit still
#                names every test that failed before the cut
#   host     45  python -m benchmarks.host: host time per call at rows 1/16/256 (the H100: ~38 s
#                at 100 calls x 5 rounds; 300 x 10 did not finish in 40 s)
#   train-step 90  python -m benchmarks --train-step: forward + backward + AdamW of a 134M-parameter
#                Llama (bf16, 8 x 2048 tokens), torch vs normzoo.swap, 3 warmup + 10 timed steps
#                each; ~30-40 s expected (imports, first-step compiles), taken from tune's share
#   (host and train-step are skipped on a GPU with no kernels/configs/<gpu>.json yet, e.g. a first
#    H200 run: the two tune phases then share ~100 s after the tests)
#   tune-wide 60 python -m benchmarks.tune: LayerNorm/RMSNorm at 16384 (bf16, 32768 rows), whose
#                candidates include the whole row in one tile (never the rules' choice); less if the
#                bench would get under 240 s. On a GPU with a table, after tests, host and the
#                training step, about 25 s are left for tuning: too little for either phase, so
#                run `bash benchmarks/gpu_session.sh --wide` as a device call of its own there
#   tune     60  python -m benchmarks.tune: bf16 at 4096 and 1024, 32768 rows, --budget-s; less if
#                the bench would get under 240 s. Both write kernels/configs/<gpu>.json here, so
#                the benchmark runs with the tuned table (keys not tuned keep their entries)
#   bench   260  python -m benchmarks --device-time: normzoo vs eager, compile, liger, quack; bf16,
#                32768 rows, N = 4096 16384 1024 (in that order; --budget-s stops before a width it
#                cannot finish); the four norms and two fused residual ops (add+RMSNorm, Peri's
#                norm_add_norm on LayerNorm) in one table, and each call split into its GPU time and
#                its host time (on the H200's gVisor host a backward took 200-700 us to issue, so
#                wall-clock below ~0.4 ms is mostly the host's: README, H200 section); the tool returns 8 files
# Output in $OUT (the device tool's, else benchmarks/results/session), 8 files at most (the tool
# returns 8): session.log, tune-<gpu>.json, <gpu>-bf16-32768rows.{json,md,png}, host-<gpu>.{json,md},
# train-step-<gpu>.json (its table is printed in the summary; `python -m benchmarks.train_step
# --from-json F --out DIR` writes its .md and .png)
# (--smoke: the same with smoke-cpu for <gpu>, and no PNG unless matplotlib is installed).
#
# --fused skips tests, host and tune, and runs one phase after the peers:
#   bench-fused  480  python -m benchmarks on the norms fused with the residual add: normzoo vs the
#                unfused sequence in eager and under torch.compile, and (add_norm-rmsnorm only, the
#                one op the peers have) Liger-Kernel and quack; bf16, 32768 rows, N = 4096 16384
#                2048 8192 (that order; --budget-s stops before a width it cannot finish), the ops
#                in $FUSED_OPS (default: add_norm, norm_add, norm_add_norm on rmsnorm and
#                layernorm; e.g. FUSED_OPS=fused for DyT and Derf too) and widths in $FUSED_HIDDEN.
#                Output: session.log and <gpu>-fused-bf16-32768rows.{json,md,png}.
# --wide skips tests, host and tune, and times what a measured table's whole-row tile does for
# LayerNorm/RMSNorm rows the rules loop over (heuristics.WIDE_TILE_BYTES), after the peers:
#   tune-wide   240  python -m benchmarks.tune at 16384 (bf16, 32768 rows), forward and backward:
#                    the rule, the usual candidates and the whole-row ones; writes the table here
#   bench-wide  rest python -m benchmarks --device-time at 16384: LayerNorm, RMSNorm, add+RMSNorm
#                    against eager, torch.compile and the peers, with the table just written
#   Output: session.log, tune-<gpu>.json, <gpu>-wide-bf16-32768rows.{json,md,png}. Its static
#   report: on the CPU afterwards, `compile_check --gpu <gpu>` with the GPU's Triton.
# quack also needs its big library unpacked on the same warm machine first, by a call just before
# this one: carry [".peers-big"], command `bash .peers-big/unpack.sh` (both folders together are
# over the tool's 64 MiB carry limit). Without it the benchmark runs Liger alone; without .peers/,
# no peers. Either way it says so and goes on.
set -uo pipefail
smoke=0
fused=0
wide=0
new_gpu=0
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    --fused) fused=1 ;;
    --wide) wide=1 ;;
    *) echo "usage: bash benchmarks/gpu_session.sh [--smoke] [--fused | --wide]" >&2; exit 2 ;;
  esac
done
[ $fused = 1 ] && [ $wide = 1 ] && { echo "--fused and --wide are two sessions: pick one" >&2; exit 2; }
only=$((fused + wide))  # 1: one of the narrow sessions, which skip the full session's phases
if [ $smoke = 0 ]; then
  # As the Python tools do: without a GPU every phase would fail on its own, one after the other.
  python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
  case $? in
    0) ;;
    3) echo "No CUDA GPU found: this session times GPU kernels. Run it on a machine with a GPU, or pass --smoke" \
         "to check the script on the CPU." >&2; exit 2 ;;
    *) echo "torch does not import (above): no session" >&2; exit 2 ;;
  esac
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # subprocesses find normzoo and benchmarks
out=${OUT:-benchmarks/results/session}
mkdir -p "$out"
log=$out/session.log
: >"$log"
TOTAL=${SESSION_TOTAL_S:-525}  # seconds for everything; the device tool's call limit is 600
t0=$SECONDS
say() { echo "[$((SECONDS - t0))s] $*" | tee -a "$log"; }
summary=()

# phase NAME CAP CMD...: run CMD under timeout (CAP seconds, less if the total would overrun), its
# output into the log; `$limit` holds the seconds granted, for a budget the command can plan with.
phase() {
  local name=$1 cap=$2 left rc
  shift 2
  left=$((TOTAL - (SECONDS - t0)))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    say "== $name: skipped (${left}s left of ${TOTAL}s)"; summary+=("$name: skipped"); return
  fi
  say "== $name (up to ${limit}s)"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local what="rc=$rc"; [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT after ${limit}s"
  say "== $name: $what in $((SECONDS - start))s"
  summary+=("$name: $what in $((SECONDS - start))s")
}

if [ $smoke = 1 ]; then
  export TRITON_INTERPRET=1
  gpu=smoke-cpu
  say "smoke run on the CPU (TRITON_INTERPRET=1): checks the script, measures nothing"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
  gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
  # A GPU without a measured table (kernels/configs/<gpu>.json) runs on the rules until it is
  # tuned: the host and training-step phases give their time to the tuner there.
  [ -f "kernels/configs/$gpu.json" ] || new_gpu=1
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$log"
say "git $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified file(s)"

# -- peers ----------------------------------------------------------------------------------
if [ $smoke = 0 ]; then
  if [ -f .peers-big/unpack.sh ]; then
    phase peers-big 60 bash .peers-big/unpack.sh
  fi
  if [ -f .peers/install.sh ]; then
    say "== peers: source .peers/install.sh"
    # Sourced (it exports PYTHONPATH); a local pip install of ~23 MB of wheels, bounded in practice.
    source .peers/install.sh >>"$log" 2>&1 || say "peers: install failed, going on without them"
    grep '^peers:' "$log" | tail -n 3
  else
    say "peers: no .peers/ folder (carry it to benchmark Liger-Kernel and quack); going on without them"
  fi
fi

# -- fused residual ops alone (--fused): the benchmark, then the summary below ------------------
if [ $fused = 1 ]; then
  if [ $smoke = 1 ]; then
    name=$gpu-fused-bf16
    phase bench-fused 60 python3 -m benchmarks --smoke --ops add_norm-rmsnorm norm_add-layernorm norm_add_norm-dyt \
      --dtypes bf16 --rows 16 --hidden 64 --out "$out" --name "$name"
  else
    name=$gpu-fused-bf16-32768rows
    left=$((TOTAL - (SECONDS - t0)))
    # The last width for 6 ops (3-5 providers, two torch.compile graphs per op) needs ~90 s: 120 kept.
    phase bench-fused 480 python3 -m benchmarks \
      --ops ${FUSED_OPS:-add_norm-rmsnorm add_norm-layernorm norm_add-rmsnorm norm_add-layernorm norm_add_norm-rmsnorm norm_add_norm-layernorm} \
      --dtypes bf16 --rows 32768 --hidden ${FUSED_HIDDEN:-4096 16384 2048 8192} --out "$out" --name "$name" \
      --budget-s $(((left < 480 ? left : 480) - 120))
  fi
fi

# -- whole-row tiles alone (--wide): tune, then the benchmark with the table, then the summary -----
if [ $wide = 1 ]; then
  table=$([ $smoke = 1 ] && echo "$out/tune-$gpu.json" || echo "kernels/configs/$gpu.json")
  if [ $smoke = 1 ]; then  # an fp32 row of 4112 is looped by the rules and fits a whole-row tile
    phase tune-wide 60 python3 -m benchmarks.tune --smoke --ops rmsnorm --dtypes fp32 --hidden 4112 --rows 4 \
      --out "$table"
    name=$gpu-wide-fp32
    phase bench-wide 60 python3 -m benchmarks --smoke --ops rmsnorm --dtypes fp32 --rows 4 --hidden 64 \
      --device-time --out "$out" --name "$name"
  else
    phase tune-wide 240 python3 -m benchmarks.tune --ops layernorm rmsnorm --dtypes bf16 --hidden 16384 \
      --rows 32768 --budget-s 200
    [ -f "$table" ] && cp "$table" "$out/tune-$gpu.json"
    name=$gpu-wide-bf16-32768rows
    left=$((TOTAL - (SECONDS - t0)))
    phase bench-wide "$left" python3 -m benchmarks --ops layernorm rmsnorm add_norm-rmsnorm --dtypes bf16 \
      --rows 32768 --hidden 16384 --device-time --out "$out" --name "$name"
  fi
fi

# -- tests (GPU only: under the interpreter this is the ordinary test suite) ---------------------
if [ $smoke = 0 ] && [ $only = 0 ]; then
  workers=$(( $(nproc) > 15 ? 14 : 8 ))
  par=$(python3 -c "import xdist" 2>/dev/null && echo "-n $workers")  # compiles in parallel: most of the time is Triton's compiler
  phase tests 170 python3 -m pytest --maxfail=20 -v -rf --tb=short -p no:cacheprovider $par \
    tests/test_rowwise_kernels.py tests/test_pointwise_kernels.py tests/test_norm_api.py tests/test_pointwise_api.py \
    tests/test_gpu_only.py tests/test_fused.py tests/test_headwise.py::test_looped_backward_has_no_race_at_real_widths \
    tests/test_benchmarks.py::test_device_time_matches_do_bench_on_a_copy tests/test_tune.py::test_persistent_forward_matches_the_rule_bitwise
  grep -E "^FAILED|\] FAILED| passed| failed" "$log" | sort -u | tail -n 25
fi

# -- host cost per call ---------------------------------------------------------------------
if [ $only = 1 ]; then
  :
elif [ $smoke = 1 ]; then
  phase host 60 python3 -m benchmarks.host --stub --out "$out" --repeats 20
elif [ $new_gpu = 1 ]; then
  say "== host: skipped on purpose (no tuned table for $gpu yet: its time goes to tune)"
  summary+=("host: skipped on purpose (new GPU)")
else
  phase host 45 python3 -m benchmarks.host --out "$out" --repeats 100 --rounds 5  # 7 layers x 3 row counts
fi

# -- a training step, with and without normzoo.swap (JSON only: the tool returns 8 files) ------
if [ $only = 1 ]; then
  :
elif [ $smoke = 1 ]; then
  phase train-step 60 python3 -m benchmarks --train-step --tiny --out "$out" --formats json
elif [ $new_gpu = 1 ]; then
  say "== train-step: skipped on purpose (no tuned table for $gpu yet: its time goes to tune)"
  summary+=("train-step: skipped on purpose (new GPU)")
else
  phase train-step 90 python3 -m benchmarks --train-step --out "$out" --formats json --budget-s 40
fi

# -- tune -----------------------------------------------------------------------------------
if [ $only = 1 ]; then
  :
elif [ $smoke = 1 ]; then
  table=$out/tune-$gpu.json
  phase tune-wide 60 python3 -m benchmarks.tune --smoke --ops rmsnorm --dtypes fp32 --hidden 4112 --rows 4 \
    --out "$table"
  phase tune 60 python3 -m benchmarks.tune --smoke --ops rmsnorm dyt --hidden 64 --out "$table"
else
  table=kernels/configs/$gpu.json  # where the kernels read it: the benchmark below uses it
  # First the whole-row candidates (LayerNorm/RMSNorm at 16384, where the looped rules made 48-56%
  # of copy backward and 81-91% forward on the H200), then every op at 4096 and 1024.
  left=$((TOTAL - (SECONDS - t0) - 240)); cap=$((left < 60 ? left : 60))  # leave the benchmark 240 s
  phase tune-wide $cap python3 -m benchmarks.tune --ops layernorm rmsnorm --dtypes bf16 --hidden 16384 \
    --rows 32768 --budget-s $((cap - 15))
  cap=$([ $new_gpu = 1 ] && echo 140 || echo 60)
  left=$((TOTAL - (SECONDS - t0) - 240)); [ $left -lt $cap ] && cap=$left  # leave the benchmark 240 s
  phase tune $cap python3 -m benchmarks.tune --dtypes bf16 --hidden 4096 1024 --rows 32768 --budget-s $((cap - 25))
  [ -f "$table" ] && cp "$table" "$out/tune-$gpu.json"
fi
grep -E "^tuned |budget of" "$log" | tail -n 2

# -- benchmark ------------------------------------------------------------------------------
if [ $only = 1 ]; then
  :
elif [ $smoke = 1 ]; then
  name=$gpu-bf16  # one norm, one pointwise op and one fused op are enough to check the plumbing
  phase bench 60 python3 -m benchmarks --smoke --ops layernorm dyt add_norm-rmsnorm --dtypes bf16 --rows 16 \
    --hidden 64 --device-time --out "$out" --name "$name"
else
  name=$gpu-bf16-32768rows
  left=$((TOTAL - (SECONDS - t0)))
  # Widths outermost, 4096 first: a cut keeps whole widths for every op. --budget-s: no new width
  # after it; the last one (6 ops, up to 5 providers each, compiles included; --device-time took
  # ~12 s per op and width on the H200) needs ~110 s.
  phase bench 260 python3 -m benchmarks --ops layernorm rmsnorm dyt derf add_norm-rmsnorm norm_add_norm-layernorm \
    --dtypes bf16 --rows 32768 --hidden 4096 16384 1024 --device-time --out "$out" --name "$name" \
    --budget-s $(((left < 260 ? left : 260) - 110))
fi

# -- summary (the device tool returns the end of stdout) ----------------------------------------
echo
echo "== summary ($((SECONDS - t0))s of ${TOTAL}s)"
printf '  %s\n' "${summary[@]}"
grep -E "^peers:|failed:|REJECTED" "$log" | sort | uniq -c | head -n 20
[ -f "$out/host-$gpu.md" ] && cat "$out/host-$gpu.md"
[ -f "$out/host-cpu-stubbed.md" ] && cat "$out/host-cpu-stubbed.md"
[ -f "$out/train-step-$gpu.json" ] && python3 -m benchmarks.train_step --from-json "$out/train-step-$gpu.json"
grep -E "^\[.*\]   .* -> " "$log" | sed 's/^\[[ 0-9.]*s\] *//' | tail -n 30  # the tuner's verdict per key
[ -f "$out/$name.md" ] && cat "$out/$name.md"
ls -la "$out"
# Failing phases make the run fail (the files written so far are kept).
for s in "${summary[@]}"; do case "$s" in *"rc=0 "*|*"skipped on purpose"*) ;; *) exit 1 ;; esac; done
exit 0
