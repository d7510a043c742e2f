"""Measure the kernels' launch configurations on this GPU and write them as its table.

    python -m benchmarks.tune                                   # every op, bf16, N 1024..32768, 32768 rows
    python -m benchmarks.tune --ops rmsnorm --dtypes bf16 fp32 --hidden 4096 --budget-s 120
    python -m benchmarks.tune --smoke --out /tmp/smoke.json     # CPU check of the tuner (measures nothing)

For each (op, pass, dtype, N) it times the rule's launch configuration and a few around it (at
most 12): 4, 8 and 16 warps, half and double the rows per tile and, for the backward, half and
double the programs per SM and 1 or 3 stages, one knob at a time; then the best value of each knob
together. A LayerNorm/RMSNorm forward of single-tile rows also tries one row a program and a
persistent grid, and a LayerNorm/RMSNorm pass over rows the rules loop over (up to 16384 16-bit
or 8192 fp32 values) the whole row in one tile (:func:`candidates`; those change several fields at
once and are not combined). Every candidate's output is checked against the rule's before it is
timed, and the rule is timed again last. The fastest wins unless the rule is within 2% of it (a
table entry has to earn its place). The result goes to ``kernels/configs/<gpu>.json``, which
``normzoo.kernels.heuristics`` reads at launch: ``"configs"`` holds the entries the kernels use,
``"measured"`` every candidate's time (the loader ignores it). Entries for keys not tuned in this
run are kept. Each key is written as soon as it is measured; at ``--budget-s`` the run stops and
drops the key in progress, so a run cut short leaves a valid table.

Timing is ``triton.testing.do_bench`` (median) through the benchmark's own ``time_pass``: the
forward alone for "fwd", ``y.backward(dy, retain_graph=True)`` for "bwd". Compiling a candidate
costs more than timing it, so ``--jobs`` worker processes first compile every planned candidate
into Triton's cache (same shapes, so the same specializations); the timing then runs alone on the
GPU. ``--smoke`` runs the same code on the CPU under ``TRITON_INTERPRET=1`` at toy sizes, with
the candidates really installed and checked, and wall-clock times that mean nothing; it never
writes under kernels/configs/.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import nonnegative_int, positive_int, seconds

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SMOKE_GPU = "smoke-cpu"  # the table name a --smoke run installs its candidates under
KEEP_RULE_WITHIN = 0.02  # the rule stays unless a candidate is more than 2% faster
EARLIER_RUNS_KEPT = 8  # earlier runs' headers a table keeps (its entries name their run)
WARPS = (4, 8, 16)  # tried at every key (with the rule's own count)
# do_bench milliseconds per candidate: shorter than the benchmark's (25, 100); enough repeats for a
# 2% decision at 32k rows (100+ runs at N <= 8192, 30+ at N = 32768).
WARMUP_MS, REP_MS = 10, 40
# Output tolerance of a candidate against the rule (norm-wise relative): 4 × the test suite's
# rtol. It catches a broken launch (unwritten rows, wrong tiles), not rounding.
CHECK_RTOL = {"bfloat16": 3.2e-2, "float16": 4e-3, "float32": 4e-5}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", default=["layernorm", "rmsnorm", "dyt", "derf"])
    p.add_argument("--passes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    p.add_argument("--hidden", nargs="+", type=positive_int, default=None,
                   help="default: 1024 2048 4096 8192 16384 32768 (--smoke: 64); tuned in this order. Multiples "
                        "of 16 only (tables apply to no other width), and one per power of two: a table entry is "
                        "keyed by op, pass, dtype and the next power of two of N")
    p.add_argument("--rows", type=positive_int, default=None, help="default: 32768 (--smoke: 16)")
    p.add_argument("--budget-s", type=seconds, default=None,
                   help="seconds; then stop, keeping every key measured in full")
    p.add_argument("--jobs", type=nonnegative_int, default=None,
                   help="processes that compile the candidates first (default: 8 on a GPU, 0 with --smoke)")
    p.add_argument("--out", type=Path, default=None,
                   help="table to write (default: kernels/configs/<gpu>.json; --smoke: a temporary file)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, TRITON_INTERPRET=1, toy sizes: exercises the tuner, measures nothing")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "i/J": a compile worker (internal)
    p.add_argument("--plan", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv):
    return parser().parse_args(argv)


def check_hidden(hidden: list[int], key, vector_aligned) -> str | None:
    """Why ``hidden`` cannot be tuned as given, or None. ``key(n)`` is the table key of width n
    (heuristics.config_key for one op, pass and dtype); ``vector_aligned(n)`` whether a table
    applies to rows of n at all (heuristics.vector_aligned)."""
    if unaligned := [n for n in hidden if not vector_aligned(n)]:
        return (f"--hidden {' '.join(map(str, unaligned))}: the tables apply only to widths that are multiples of "
                "16 (kernels/heuristics.py, vector_aligned); the rules launch every other width")
    widths: dict[str, list[int]] = {}
    for n in hidden:
        widths.setdefault(key(n), []).append(n)
    if shared := {k: ns for k, ns in widths.items() if len(ns) > 1}:
        return "; ".join(f"--hidden {' '.join(map(str, ns))} share the table key {k}" for k, ns in shared.items()) + (
            " (for every op, pass and dtype alike: an entry is keyed by the next power of two of N), so the width "
            "tuned last would overwrite the first: pass one width per power of two")
    return None


# ----------------------------------------------------------------------------------------------
# Candidates (pure functions of the rule: no GPU needed, tested directly)
# ----------------------------------------------------------------------------------------------


def fields(pass_: str) -> tuple[str, ...]:
    """The knobs a table entry sets. The backward's grid is persistent (programs per SM) and walks
    row blocks with loads in flight (stages); a row-wise forward may be made persistent too, with
    its own programs per SM and stages."""
    if pass_ == "bwd":
        return ("num_warps", "block_m", "programs_per_sm", "num_stages")
    return ("num_warps", "block_m", "persistent", "programs_per_sm", "num_stages")


def entry_of(cfg, pass_: str) -> dict:
    return {f: getattr(cfg, f) for f in fields(pass_)}


def valid(entry: dict, rule, tunable: dict, max_tile: int) -> bool:
    """An entry the table accepts (values in TUNABLE) and worth timing: at least one element per
    thread, and a tile no bigger than the rule's or ``max_tile`` elements (wider ones only spill)."""
    if any(v not in tunable[f] for f, v in entry.items()):
        return False
    tile = entry["block_m"] * rule.block_n
    return entry["num_warps"] * 32 <= tile and tile <= max(rule.block_m * rule.block_n, max_tile)


def candidates(rule, pass_: str, tunable: dict, max_tile: int, *, rowwise: bool = True,
               wide: bool = False) -> list[dict]:
    """The rule first, then the rule with one knob changed: warps in WARPS, rows per tile halved
    and doubled, programs per SM (backward) halved and doubled, pipeline stages (backward) 1 or 3.
    A row-wise forward of single-tile rows (``rowwise``: LayerNorm, RMSNorm) also tries one row a
    program at 8 values a thread, and a persistent grid (the rule's layout at 2 and 3 stages, the
    one-row layout at 2). ``wide`` (heuristics.wide_tile_fits: a row-wise pass over rows the rules
    loop over) adds the whole row in one tile: 16 and 32 warps, one program per SM in the backward,
    and in the forward also a persistent 16-warp grid. At most 12."""
    base = entry_of(rule, pass_)
    out = [base]

    def add(**change):
        entry = {**base, **change}
        if entry not in out and valid(entry, rule, tunable, max_tile):
            out.append(entry)

    for w in WARPS:
        add(num_warps=w)
    for m in (base["block_m"] // 2, base["block_m"] * 2):
        add(block_m=m)
    if pass_ == "fwd" and rowwise and rule.single_tile:
        # One row a program at 8 values a thread, Liger-Kernel's forward layout: 80% of copy at
        # N = 1024 on the H200, where every candidate above measured 61-64% (device time 64%).
        one_row = {"block_m": 1, "num_warps": max(1, min(rule.block_n // 256, 16))}
        add(**one_row)
        # A persistent grid whose programs load the next row block while they reduce this one,
        # as the backward does (88-89% of copy at N = 4096 on the H200): about 32 warps per SM.
        for layout, stages in ((base, 2), (base, 3), (one_row, 2)):
            add(**{**layout, "persistent": True, "programs_per_sm": max(1, 32 // layout["num_warps"]),
                   "num_stages": stages})
    if pass_ == "bwd":
        for p in (base["programs_per_sm"] // 2, base["programs_per_sm"] * 2):
            add(programs_per_sm=p)
        for st in (1, 3):  # prefetch off, or one row block deeper
            add(num_stages=st)
    if wide and pass_ == "bwd":
        # The whole row in one tile: x and dy read once, not twice. torch.compile's mix-order
        # reduction keeps rows of up to 16384 whole too (torch/_inductor/scheduler.py), and its
        # RMSNorm backward made 80% of copy at N = 16384 on the H200 where the looped rule made
        # 56%. Ours fills an SM's registers and spills (heuristics.WIDE_TILE_BYTES): only a timing
        # can choose it. Several knobs at once, so never combined (see combined()).
        for warps in (16, 32):
            out.append({**base, "num_warps": warps, "block_m": 1, "programs_per_sm": 1, "num_stages": 2,
                        "single_tile": True})
    elif wide:
        # The forward's whole row: x read once, not twice (the looped rule re-reads it, from L2 if it
        # is still there; LayerNorm made 81% of copy at N = 16384 on the H200). 50-85 registers at
        # 16 warps, 30-46 at 32, no spill (bf16, sm_90); LayerNorm with weight and bias holds one
        # program per SM, so also a persistent grid that loads the next row while it reduces this one.
        for warps in (16, 32):
            out.append({**base, "num_warps": warps, "block_m": 1, "single_tile": True})
        out.append({**base, "num_warps": 16, "block_m": 1, "persistent": True, "programs_per_sm": 1,
                    "num_stages": 2, "single_tile": True})
    return out


def combined(measured: list[tuple[dict, float | None]], rule, tunable: dict, max_tile: int) -> dict | None:
    """The best value of each knob together, when the one-knob runs improved two or more knobs and
    that entry is new and valid; else None. ``measured`` is [(entry, ms or None)], the rule first."""
    base, base_ms = measured[0]
    if base_ms is None:
        return None
    best = dict(base)
    improved = 0
    for field in base:
        alone = [(ms, e) for e, ms in measured  # (a wide tile's entry has a field more: never "alone")
                 if ms is not None and set(e) == set(base) and all(e[f] == base[f] for f in base if f != field)]
        ms, e = min(alone, key=lambda t: t[0])  # includes the rule itself
        if e[field] != base[field]:
            best[field] = e[field]
            improved += 1
    seen = [e for e, _ in measured]
    if improved < 2 or best in seen or not valid(best, rule, tunable, max_tile):
        return None
    return best


def choose(measured: list[tuple[dict, float | None]]) -> dict:
    """The fastest entry, unless the rule (first) is within KEEP_RULE_WITHIN of it. Deterministic:
    ties go to the earlier candidate; failed candidates (ms None) never win."""
    rule, rule_ms = measured[0]
    ok = [(ms, i) for i, (_, ms) in enumerate(measured) if ms is not None]
    best_ms, best_i = min(ok)
    if rule_ms is not None and rule_ms <= best_ms * (1 + KEEP_RULE_WITHIN):
        return rule
    return measured[best_i][0]


# ----------------------------------------------------------------------------------------------
# Running one key
# ----------------------------------------------------------------------------------------------


class Setup:
    """What every key needs: torch, the heuristics module, the device and the table's GPU name."""

    def __init__(self, smoke: bool):
        import torch

        from normzoo.kernels import heuristics

        self.torch, self.h, self.smoke = torch, heuristics, smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        if smoke:
            # Off CUDA the kernels never consult a table; install the candidates under SMOKE_GPU so
            # that the interpreter really runs each one (and the check below really checks it).
            real = heuristics.device_name
            heuristics.device_name = lambda device: SMOKE_GPU if device.type == "cpu" else real(device)
        self.gpu = heuristics.device_name(self.device)
        self.max_tile = 2 * getattr(heuristics, "TARGET_TILE_ELEMENTS", 4096)

    def key(self, op, pass_, dtype, n):
        return self.h.config_key(op, pass_, dtype, n)

    def install(self, op, pass_, dtype, n, entry: dict | None):
        """Make ``entry`` (None: the rule) what the kernels launch with for this key, and check
        that they do: a key the launcher does not ask for would tune nothing."""
        self.h.set_tuned(self.gpu, self.key(op, pass_, dtype, n), entry)
        cfg = self.h.launch_config(op, pass_, n, dtype, self.device)
        if entry is not None and {f: getattr(cfg, f) for f in entry} != entry:
            raise RuntimeError(f"table entry {entry} for {self.key(op, pass_, dtype, n)} did not reach the launch: {cfg}")
        return cfg


def _run_once(fn, leaves, dy, pass_):
    """One call of the pass; returns what it produced (output, or the leaves' gradients)."""
    for t in leaves:
        t.grad = None
    y = fn(*leaves)
    if pass_ == "fwd":
        return [y.detach()]
    y.backward(dy)
    return [t.grad for t in leaves]


def _poisoned(on: bool):
    """Fill the kernels' outputs with NaN while checking a candidate (an unwritten element then
    fails the check instead of passing on the rule's leftover memory), never while timing."""
    try:
        from normzoo.kernels import launch
    except ImportError:
        return
    if hasattr(launch, "POISON"):
        launch.POISON = on


def _agree(got, ref, rtol) -> bool:
    for g, r in zip(got, ref):
        if g is None or r is None:
            if g is not r:
                return False
            continue
        g, r = g.double(), r.double()
        if not bool(g.isfinite().all()):
            return False
        # Scalar gradients (DyT/Derf's dalpha, dshift) sum terms that cancel: finite is all a
        # different reduction order lets us ask of them.
        if g.numel() > 1 and float((g - r).norm()) > rtol * float(r.norm()) + 1e-30:
            return False
    return True


def tune_key(s: Setup, op, pass_, dtype, n, rows, deadline, time_pass, log) -> dict | None:
    """Measure one key's candidates; install and return its record, or None when the deadline
    came first (nothing of the key is kept then)."""
    from .cases import CASES

    torch = s.torch
    torch.manual_seed(0)
    case = CASES[op]
    fn = case.providers["normzoo"]
    leaves = case.make_inputs(rows, n, dtype, s.device)
    dy = torch.randn(rows, n, dtype=dtype, device=s.device)
    rule = s.install(op, pass_, dtype, n, None)
    rtol = CHECK_RTOL[str(dtype).removeprefix("torch.")]
    try:
        _poisoned(True)
        ref = _run_once(fn, leaves, dy, pass_)
    finally:
        _poisoned(False)

    measured: list[tuple[dict, float | None]] = []

    def measure(entry):
        if time.monotonic() > deadline:
            return False
        s.install(op, pass_, dtype, n, None if not measured else entry)  # the rule as the rule, not an entry
        verdict = None
        try:
            _poisoned(True)
            if not _agree(_run_once(fn, leaves, dy, pass_), ref, rtol):
                verdict = "REJECTED: output differs from the rule's"
        except Exception as e:  # a candidate that fails to compile or launch is dropped, not fatal
            verdict = f"failed: {type(e).__name__}: {str(e)[:160]}"
        finally:
            _poisoned(False)
        ms = time_pass(fn, leaves, dy, pass_) if verdict is None else None
        measured.append((entry, ms))
        log(f"    {entry}: " + (f"{ms:.4f} ms" if ms is not None else verdict))
        return True

    for entry in candidates(rule, pass_, s.h.TUNABLE, s.max_tile, rowwise=op in s.h.ROWWISE_OPS,
                            wide=s.h.wide_tile_fits(op, pass_, n, dtype)):
        if not measure(entry):
            return None
    extra = combined(measured, rule, s.h.TUNABLE, s.max_tile)
    if extra is not None and not measure(extra):
        return None
    rule_entry, first_ms = measured[0]
    if first_ms is None:
        raise RuntimeError(f"the rule's own launch failed its check for {s.key(op, pass_, dtype, n)}")
    # The rule again, last: timed first, it would pay for a GPU still clocking up after idle.
    s.install(op, pass_, dtype, n, None)
    again_ms = time_pass(fn, leaves, dy, pass_)
    measured[0] = (rule_entry, min(first_ms, again_ms))
    chosen = choose(measured)
    s.install(op, pass_, dtype, n, None if chosen == rule_entry else chosen)
    chosen_ms = next(ms for e, ms in measured if e == chosen)
    return {
        "rows": rows, "n": n, "rule": rule_entry, "chosen": chosen, "rule_kept": chosen == rule_entry,
        "rule_ms": measured[0][1], "rule_ms_runs": [first_ms, again_ms], "chosen_ms": chosen_ms,
        "candidates": [{"config": e, "ms": ms} for e, ms in measured],
    }


# ----------------------------------------------------------------------------------------------
# Compile workers: fill Triton's cache with every planned candidate, in parallel
# ----------------------------------------------------------------------------------------------


def _plan(s: Setup, keys, rows) -> list[dict]:
    plan = []
    for op, pass_, dtype_name, n in keys:
        dtype = getattr(s.torch, DTYPES[dtype_name])
        s.h.set_tuned(s.gpu, s.key(op, pass_, dtype, n), None)
        rule = s.h.launch_config(op, pass_, n, dtype, s.device)
        for entry in candidates(rule, pass_, s.h.TUNABLE, s.max_tile, rowwise=op in s.h.ROWWISE_OPS,
                                wide=s.h.wide_tile_fits(op, pass_, n, dtype)):
            plan.append({"op": op, "pass": pass_, "dtype": dtype_name, "n": n, "rows": rows, "entry": entry})
    return plan


def _worker(args) -> int:
    """Run each assigned plan item once (compiling it); no timing, no output beyond failures."""
    index, jobs = (int(v) for v in args.worker.split("/"))
    s = Setup(args.smoke)
    from .cases import CASES

    items = json.loads(args.plan.read_text())[index::jobs]
    inputs = {}
    for item in items:
        dtype = getattr(s.torch, DTYPES[item["dtype"]])
        shape = (item["op"], item["dtype"], item["n"], item["rows"])
        try:
            if shape not in inputs:
                inputs.clear()  # one shape's tensors at a time: workers share the GPU's memory
                case = CASES[item["op"]]
                inputs[shape] = (case.make_inputs(item["rows"], item["n"], dtype, s.device),
                                 s.torch.randn(item["rows"], item["n"], dtype=dtype, device=s.device))
            leaves, dy = inputs[shape]
            s.install(item["op"], item["pass"], dtype, item["n"], item["entry"])
            _run_once(CASES[item["op"]].providers["normzoo"], leaves, dy, item["pass"])
        except Exception as e:  # the main process compiles (and reports) whatever failed here
            print(f"worker {index}: {item['op']} {item['pass']} N={item['n']} {item['entry']}: "
                  f"{type(e).__name__}: {str(e)[:160]}", flush=True)
            inputs.clear()
    if s.device.type == "cuda":
        s.torch.cuda.synchronize()
    return 0


def _precompile(plan, jobs, smoke, deadline, log) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan))
        cmd = [sys.executable, "-m", "benchmarks.tune", "--plan", str(plan_path)] + (["--smoke"] if smoke else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                       os.environ.get("PYTHONPATH")])))
        procs = [subprocess.Popen(cmd + ["--worker", f"{i}/{jobs}"], env=env) for i in range(jobs)]
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        late = [p for p in procs if p.poll() is None]
        for p in late:  # out of time: the main process compiles the rest itself
            p.kill()
            p.wait()
        log(f"precompiled {len(plan)} candidates in {jobs} processes" + (f" ({len(late)} stopped early)" if late else ""))


def _default_jobs(s: Setup, rows, hidden, dtypes) -> int:
    """8 (or half the CPUs), fewer when the GPU cannot hold that many copies of the largest inputs."""
    jobs = min(8, max(1, (os.cpu_count() or 2) // 2))
    if s.device.type == "cuda":
        itemsize = max(getattr(s.torch, DTYPES[d]).itemsize for d in dtypes)
        per_process = 6 * rows * max(hidden) * itemsize + (1 << 30)  # x, y, dy, dx, partials; context
        free = s.torch.cuda.mem_get_info()[0]
        jobs = min(jobs, int(0.8 * free / per_process) - 1)  # - 1: the main process's own inputs
    return max(0, jobs)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def _load_existing(path: Path, gpu: str) -> dict:
    if not path.is_file():
        return {"gpu": gpu, "configs": {}, "measured": {}}
    data = json.loads(path.read_text())
    if data.get("gpu") != gpu:
        raise SystemExit(f"{path} is the table of {data.get('gpu')!r}, not of this GPU ({gpu!r}): pass another --out")
    data.setdefault("configs", {})
    data.setdefault("measured", {})
    return data


def _write(path: Path, table: dict) -> None:
    """Atomically: a run killed mid-write must not leave a table the kernels fail to load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {**table, "configs": dict(sorted(table["configs"].items())), "measured": dict(sorted(table["measured"].items()))}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before normzoo's kernels are defined
    if args.worker:
        return _worker(args)
    started = time.monotonic()
    deadline = started + args.budget_s if args.budget_s is not None else float("inf")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("No CUDA GPU found: the tuner times GPU kernels. Pass --smoke to check it on the CPU.", file=sys.stderr)
        return 2
    from . import harness

    s = Setup(args.smoke)
    unknown = [op for op in args.ops if op not in s.h.OPS]
    if unknown:
        print(f"unknown op(s) {unknown}; choose from {list(s.h.OPS)}", file=sys.stderr)
        return 2
    rows = args.rows or (16 if args.smoke else 32768)
    hidden = args.hidden or ([64] if args.smoke else [1024, 2048, 4096, 8192, 16384, 32768])
    if args.smoke and (rows > 256 or max(hidden) > 8192):
        print("--smoke runs the kernels in Triton's CPU interpreter: keep --rows <= 256 and --hidden <= 8192",
              file=sys.stderr)
        return 2
    first_key = lambda n: s.key(args.ops[0], args.passes[0], getattr(torch, DTYPES[args.dtypes[0]]), n)
    if (why := check_hidden(hidden, first_key, s.h.vector_aligned)) is not None:
        parser().error(why)
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="normzoo-tune-")) / f"{SMOKE_GPU}.json" if args.smoke
                    else s.h.CONFIG_DIR / f"{s.gpu}.json")
    if args.smoke and args.out.resolve().is_relative_to(s.h.CONFIG_DIR.resolve()):
        print(f"--smoke measures nothing: it does not write under {s.h.CONFIG_DIR}", file=sys.stderr)
        return 2

    def log(msg):
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    # N first (in the order given), so that a budget cut keeps whole widths for every op.
    keys = [(op, pass_, d, n) for d in args.dtypes for n in hidden for op in args.ops for pass_ in args.passes]
    table = _load_existing(args.out, s.gpu)
    if "environment" in table:
        # The header says what this run did; an earlier run's is kept, and each entry names the
        # run that measured it, so that a short run does not relabel the entries it left alone.
        earlier = table.get("earlier_runs", []) + [{"environment": table["environment"], "tuner": table.get("tuner")}]
        table["earlier_runs"] = earlier[-EARLIER_RUNS_KEPT:]
    table["environment"] = env = harness.environment(s.device.type, args.smoke)
    table["tuner"] = {"rows": rows, "budget_s": args.budget_s, "planned": len(keys), "tuned": 0, "complete": False,
                      "keep_rule_within": KEEP_RULE_WITHIN, "do_bench_ms": None if args.smoke else [WARMUP_MS, REP_MS]}
    jobs = args.jobs if args.jobs is not None else (0 if args.smoke else _default_jobs(s, rows, hidden, args.dtypes))
    table["tuner"]["jobs"] = jobs
    _write(args.out, table)
    log(f"tuning {len(keys)} keys on {s.gpu} at {rows} rows -> {args.out}")

    if jobs > 0 and time.monotonic() < deadline:
        # At most 60% of what is left: timing needs the rest, and compiles the workers missed
        # happen in the main process anyway.
        remaining = deadline - time.monotonic()
        _precompile(_plan(s, keys, rows), jobs, args.smoke, time.monotonic() + 0.6 * min(remaining, 1e9), log)

    timing = {} if args.smoke else {"warmup": WARMUP_MS, "rep": REP_MS}
    time_pass = lambda fn, leaves, dy, pass_: harness.time_pass(fn, leaves, dy, pass_, smoke=args.smoke, **timing)
    tuned = failed = 0
    for op, pass_, dtype_name, n in keys:
        dtype = getattr(torch, DTYPES[dtype_name])
        key = s.key(op, pass_, dtype, n)
        log(f"{key}")
        try:
            record = tune_key(s, op, pass_, dtype, n, rows, deadline, time_pass, log)
        except Exception as e:  # e.g. out of memory at the widest rows: the other keys still count
            log(f"  {key} -> FAILED, left to the rule: {type(e).__name__}: {str(e)[:200]}")
            failed += 1
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if record is None:
            log(f"budget of {args.budget_s:g} s spent: stopping before {key} is complete")
            break
        tuned += 1
        if record["rule_kept"]:
            table["configs"].pop(key, None)
        else:
            table["configs"][key] = record["chosen"]
        table["measured"][key] = {**record, "run": {"git_commit": env["git_commit"], "date": env["date"]}}
        table["tuner"]["tuned"] = tuned
        table["tuner"]["complete"] = tuned == len(keys)
        _write(args.out, table)
        best_ms = min(c["ms"] for c in record["candidates"] if c["ms"] is not None)
        gain = 100 * (record["rule_ms"] / best_ms - 1)
        log(f"  {key} -> rule kept (best candidate {gain:+.1f}%)" if record["rule_kept"]
            else f"  {key} -> {record['chosen']} ({gain:+.1f}% over the rule)")
        if s.device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"tuned {tuned} of {len(keys)} keys" + (f" ({failed} failed)" if failed else "") +
          f"; {len(table['configs'])} table entries differ from the rules; wrote {args.out}" +
          (" (smoke: not a measurement)" if args.smoke else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
