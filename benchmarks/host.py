"""Host cost per eager call: the Python, dispatch and allocation time in front of every kernel.

    python -m benchmarks.host                  # CPU: every Triton launch stubbed out (no kernel time)
    python -m benchmarks.host --rows 1 16 256  # on a GPU: wall clock per call, launch-bound regime

Without a GPU (or with ``--stub``) it runs the layers' Triton path with ``TRITON_INTERPRET=1`` and
every launch replaced by a no-op, so what is timed is everything but the kernel: the method of
../shared/ANCHORS.md (one thread, a 4 × 64 fp32 input that requires grad, against torch's own module
on the same tensor). On a GPU it times whole calls (kernels included, synchronized) at a few small row
counts, where a norm is launch-bound, against torch eager.

Prints a table and, with ``--out``, writes it as JSON and Markdown. Reports the ratio normzoo /
torch for the forward and the forward + backward (the targets, issue 11: at most 2×), and for the
forward under ``torch.no_grad()``, inference's path, which saves nothing for a backward.

``--triton-launch`` (CPU) goes one level deeper than the stub: every launch takes Triton's own
path (its binder specializing each argument, the compiled-kernel lookup, the check of the globals
a kernel read, the launch metadata) into kernels really compiled for sm_90 (ptxas, as
``benchmarks.compile_check``), and only the driver is faked: no device, and the C launcher that
would hand the kernel to CUDA is a no-op. That path is most of the host time a GPU machine
measures (host-NVIDIA-H100-80GB-HBM3.md) and none of the stubbed one's. The first calls compile
each kernel variant (seconds; Triton caches them on disk).

``--instructions`` (CPU, needs ``valgrind``) counts instructions per call instead of timing: the
same calls (stubbed, or with ``--triton-launch`` through Triton's path), run once under callgrind, which dumps its counters at each ``os.getppid()``
the run makes between cases. A count does not drift with the machine's load (a shared 2-core VM's
timings move by ±10% from one run to the next), so it is the figure to compare before and after a
host-path change; it is not time (cache misses and waits cost time and no instructions).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import positive_int


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", type=positive_int, default=None,
                   help="row counts to time (default: 4 when stubbed; 1 16 256 on a GPU)")
    p.add_argument("--hidden", type=positive_int, default=None, help="default: 64 when stubbed, 4096 on a GPU")
    p.add_argument("--stub", action="store_true", help="stub out the launches even on a GPU machine")
    p.add_argument("--repeats", type=positive_int, default=300, help="calls per timing")
    p.add_argument("--rounds", type=positive_int, default=30,
                   help="interleaved rounds; the fastest is kept (many short rounds ride out a noisy machine)")
    p.add_argument("--out", type=Path, default=None, help="directory for host-<label>.json/.md")
    p.add_argument("--triton-launch", action="store_true",
                   help="CPU: launches through Triton's own launch path into sm_90 compiles, only the driver faked")
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="only these layers (by the table's names, e.g. LayerNorm Derf)")
    p.add_argument("--instructions", action="store_true",
                   help="count instructions per call under valgrind's callgrind instead of timing (CPU; stubbed "
                        "unless --triton-launch)")
    p.add_argument("--segments", type=Path, default=None, help=argparse.SUPPRESS)  # the run callgrind watches
    args = p.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        p.error("--repeats and --rounds must be at least 1")
    return args


def _stub_launches():
    """Make every interpreted Triton launch a no-op (the kernels' time leaves the measurement)."""
    from triton.runtime.interpreter import InterpretedFunction

    InterpretedFunction.run = lambda self, *args, **kwargs: None


LAUNCHES = None  # [launches the faked driver received], once --triton-launch installed it


def _fake_gpu_driver():
    """Make Triton launch as on an sm_90 GPU without one: its runtime asks this driver for the
    device, stream and target; compiled kernels "load" to placeholders and launch through a no-op.
    Also lets the layers' ``backend="triton"`` take CPU tensors (normzoo.ops refuses them outside
    the interpreter), so their Triton path is what runs (:func:`check_launches` makes sure). Not
    faked, and CPU-shaped: normzoo's own launch rules see a CPU device (4 compute units, no tuned
    table), which at a few rows picks the same one-program launches a GPU would. Exits (status 2)
    on a GPU machine or under TRITON_INTERPRET=1, where the kernels would not be Triton's compiled ones."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        print("--triton-launch runs on a CPU-only machine without TRITON_INTERPRET=1", file=sys.stderr)
        raise SystemExit(2)
    global LAUNCHES
    LAUNCHES = [0]
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    import normzoo.ops

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return object(), object(), 0, 0, 1024  # module, function, registers, spills, max threads

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132}  # an H100's

    class Driver:
        utils = Utils()

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def launcher_cls(self, src, metadata):
            def launch(*args):  # where CUDA would get the kernel: counted, so a run can show it launched
                LAUNCHES[0] += 1

            return launch

    driver.set_active(Driver())

    def use_triton(backend, x, original=normzoo.ops.use_triton):
        return backend == "triton" and x.dtype is not torch.float64 or original(backend, x)

    normzoo.ops.use_triton = use_triton


def layers(hidden: int, device, dtype, rows: int = 1):
    """(name, normzoo call, torch baseline call, baseline's name) for every layer normzoo ships;
    each call takes x (``rows`` × ``hidden``) and returns its outputs as a tuple. DyT, Derf and
    ScaleNorm have no torch counterpart; they are compared with the layer they replace (LayerNorm,
    RMSNorm). QK-norm (q and k in one launch) is compared with what a model writes without it: two
    torch RMSNorms. The fused residual ops (normzoo.functional's add_norm, norm_add, norm_add_norm,
    with LayerNorms) are compared with the unfused sequence in torch: x is the residual stream, h a
    sublayer's output (not a leaf, as in a model; x is the leaf every row takes, so add_norm's
    backward copies the one gradient it hands both inputs, as it does for a leaf)."""
    import torch

    import normzoo
    import normzoo.functional as NF

    kw = dict(device=device, dtype=dtype)

    def one(layer):
        return lambda x: (layer(x),)

    h = torch.randn(rows, hidden, requires_grad=True, **kw).view(rows, hidden)
    ours_ln = [normzoo.LayerNorm(hidden, backend="triton", **kw) for _ in range(2)]
    torch_ln = [torch.nn.LayerNorm(hidden, **kw) for _ in range(2)]

    def torch_add_norm(x):
        s = x + h
        return torch_ln[0](s), s

    def torch_norm_add_norm(x):
        s = x + torch_ln[0](h)
        return torch_ln[1](s), s

    torch_rms = torch.nn.RMSNorm(hidden, **kw)
    q_norm, k_norm = torch.nn.RMSNorm(hidden, **kw), torch.nn.RMSNorm(hidden, **kw)
    qk = normzoo.QKNorm(hidden, backend="triton", **kw)
    return [
        ("LayerNorm", one(normzoo.LayerNorm(hidden, backend="triton", **kw)), one(torch.nn.LayerNorm(hidden, **kw)),
         "torch.nn.LayerNorm"),
        ("RMSNorm", one(normzoo.RMSNorm(hidden, backend="triton", **kw)), one(torch_rms), "torch.nn.RMSNorm"),
        ("DyT", one(normzoo.DyT(hidden, backend="triton", **kw)), one(torch.nn.LayerNorm(hidden, **kw)),
         "torch.nn.LayerNorm"),
        ("Derf", one(normzoo.Derf(hidden, backend="triton", **kw)), one(torch.nn.LayerNorm(hidden, **kw)),
         "torch.nn.LayerNorm"),
        ("RMSNorm, Llama's rounding", one(normzoo.RMSNorm(hidden, backend="triton", x_hat_dtype="input", **kw)),
         one(torch_rms), "torch.nn.RMSNorm"),
        ("ScaleNorm", one(normzoo.ScaleNorm(hidden, backend="triton", **kw)), one(torch_rms), "torch.nn.RMSNorm"),
        ("QKNorm (q and k)", lambda x: qk(x, x), lambda x: (q_norm(x), k_norm(x)), "2 × torch.nn.RMSNorm"),
        ("add_norm (LayerNorm)", lambda x: NF.add_norm(x, h, ours_ln[0]), torch_add_norm,
         "x + h, torch.nn.LayerNorm"),
        ("norm_add (LayerNorm)", lambda x: (NF.norm_add(x, h, ours_ln[0]),), lambda x: (x + torch_ln[0](h),),
         "x + torch.nn.LayerNorm(h)"),
        ("norm_add_norm (LayerNorm)", lambda x: NF.norm_add_norm(x, h, *ours_ln), torch_norm_add_norm,
         "x + LayerNorm(h), LayerNorm"),
    ]


def check_launches(cases: list, x) -> None:
    """With the faked driver (--triton-launch): each layer's forward must reach it, or what is
    timed would be some other path (the reference, say)."""
    if LAUNCHES is None:
        return
    for name, ours, *_ in cases:
        before = LAUNCHES[0]
        ours(x)
        if LAUNCHES[0] == before:
            raise SystemExit(f"--triton-launch: {name}'s forward launched nothing through Triton")


def selected(cases: list, only) -> list:
    """``cases`` (from :func:`layers`) whose names ``only`` lists (all of them for None)."""
    if only is None:
        return cases
    unknown = set(only) - {name for name, *_ in cases}
    if unknown:
        print(f"unknown layers {sorted(unknown)}; the layers: {[name for name, *_ in cases]}", file=sys.stderr)
        raise SystemExit(2)  # a bad argument, as argparse exits
    return [case for case in cases if case[0] in only]


def time_us(fns: dict, repeats: int, sync, rounds: int = 30) -> dict:
    """For each of ``fns`` (label -> callable), the fastest of ``rounds`` timings of the mean
    wall-clock µs per call. The callables take turns within each round, so a slow spell on the
    machine hits them alike; the minimum, since other work only ever adds time."""
    for fn in fns.values():
        for _ in range(max(repeats // 10, 10)):
            fn()
    sync()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for label, fn in fns.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            sync()
            best[label] = min(best[label], (time.perf_counter() - start) / repeats * 1e6)
    return best


def measure(rows_list, hidden, repeats, rounds, device, stubbed, only=None):
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = []
    for rows in rows_list:
        x = torch.randn(rows, hidden, device=device, requires_grad=True)
        dy = torch.randn(rows, hidden, device=device)
        cases = selected(layers(hidden, device, torch.float32, rows), only)
        check_launches(cases, x)

        def backward(outputs):
            torch.autograd.backward(outputs, (dy,) * len(outputs))

        # A throwaway pass first: the first timings of a process run slow (caches, clock ramp-up).
        time_us({"warm-up": lambda: backward(cases[0][1](x))}, repeats, sync, rounds=3)
        # Every case in every round (each normzoo call beside torch's): a slow spell of the machine
        # longer than one case's rounds (seconds, on a shared VM) then slows one round of all of
        # them, which the minimum drops, instead of every round of the case it fell on.
        fns, inference = {}, {}
        for name, ours, theirs, _ in cases:
            for label, fn in (("normzoo", ours), ("torch", theirs)):
                fns[name, label, "fwd"] = lambda fn=fn: fn(x)
            for label, fn in (("normzoo", ours), ("torch", theirs)):
                fns[name, label, "fwdbwd"] = lambda fn=fn: backward(fn(x))
            for label, fn in (("normzoo", ours), ("torch", theirs)):
                inference[name, label, "infer"] = lambda fn=fn: fn(x)
        best = time_us(fns, repeats, sync, rounds)
        with torch.no_grad():  # as a model's inference runs: once around every call, not in each
            best.update(time_us(inference, repeats, sync, rounds))
        for name, _, _, baseline in cases:
            results.append(result_row(name, rows, hidden, baseline, "us", lambda label, pass_: best[name, label, pass_]))
    return results


def result_row(name: str, rows: int, hidden: int, baseline: str, unit: str, value) -> dict:
    """One layer's row: ``value(label, pass_)`` per call for normzoo and torch in each of PASSES,
    and normzoo / torch per pass."""
    row = {"layer": name, "rows": rows, "hidden": hidden, "baseline": baseline}
    if unit == "kir":
        row["unit"] = "kIr"
    for pass_ in PASSES:
        for label in ("normzoo", "torch"):
            row[f"{label}_{pass_}_{unit}"] = value(label, pass_)
        row[f"{pass_}_ratio"] = row[f"normzoo_{pass_}_{unit}"] / row[f"torch_{pass_}_{unit}"]
    return row


# What each layer is timed on: the forward and forward + backward of an input that requires grad
# (training), and the forward under torch.no_grad() (inference, where nothing is saved for a backward).
PASSES = ("fwd", "fwdbwd", "infer")


def run_segments(rows: int, hidden: int, repeats: int, out: Path, only=None) -> None:
    """The run ``--instructions`` watches: after every case is warm, each (layer, implementation,
    pass) runs ``repeats`` calls and then ``os.getppid()``, where callgrind dumps its counters
    (``--dump-before=getppid``); the segment names go to ``out``/segments.json."""
    import gc

    import torch

    x = torch.randn(rows, hidden, requires_grad=True)
    dy = torch.randn(rows, hidden)
    calls = []
    cases = selected(layers(hidden, "cpu", torch.float32, rows), only)
    check_launches(cases, x)
    for name, ours, theirs, baseline in cases:
        for label, fn in (("normzoo", ours), ("torch", theirs)):
            calls.append(((name, baseline, label, "fwd"), (lambda fn: lambda: fn(x))(fn)))
            calls.append(((name, baseline, label, "fwdbwd"), (lambda fn: lambda: torch.autograd.backward(
                outs := fn(x), (dy,) * len(outs)))(fn)))
            calls.append(((name, baseline, label, "infer"), (lambda fn: lambda: fn(x))(fn)))
    for (*_, pass_), call in calls:  # warm: the first calls fill caches and lazy state
        with torch.set_grad_enabled(pass_ != "infer"):
            for _ in range(20):
                call()
    # As timeit: no cyclic garbage collection inside a segment (a full collection after importing
    # torch walks every object, a billion instructions landing in whichever segment it hits);
    # the calls free what they allocate by reference counting.
    gc.collect()
    gc.freeze()
    gc.disable()
    os.getppid()  # the end of the set-up
    for (*_, pass_), call in calls:
        with torch.set_grad_enabled(pass_ != "infer"):  # around the segment's calls, as in measure
            for _ in range(repeats):
                call()
        os.getppid()
    (out / "segments.json").write_text(json.dumps([key for key, _ in calls]))


def count_instructions(rows: int, hidden: int, repeats: int, triton_launch: bool = False, only=None) -> list:
    """Rows of :func:`measure`'s form with instructions (thousands) per call in place of µs."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = [sys.executable, "-m", "benchmarks.host", "--segments", str(tmp), "--rows", str(rows),
               "--hidden", str(hidden)] + (["--triton-launch"] if triton_launch else []) + (
                   ["--layers", *only] if only else [])
        where = dict(cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if triton_launch:  # compile every kernel once outside valgrind (Triton keeps them on disk)
            subprocess.run(run + ["--repeats", "1"], check=True, **where)
        cmd = ["valgrind", "--tool=callgrind", "--dump-before=getppid", f"--callgrind-out-file={tmp}/cg.out"]
        subprocess.run(cmd + run + ["--repeats", str(repeats)], check=True, **where)
        segments = json.loads((tmp / "segments.json").read_text())
        dumps = sorted(tmp.glob("cg.out.*"), key=lambda f: int(f.suffix[1:]))

        def total(path):
            for line in path.read_text().splitlines():
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1])
            raise ValueError(f"no totals in {path}")

        # Dump 1 ends the set-up; dump i + 1 holds segment i.
        if len(dumps) != len(segments) + 1:  # another getppid() in the run would shift every count
            raise RuntimeError(f"callgrind wrote {len(dumps)} dumps for {len(segments)} segments")
        counts = [total(f) / repeats / 1000 for f in dumps[1:1 + len(segments)]]
    by_key = {tuple(seg): n for seg, n in zip(segments, counts)}
    return [result_row(name, rows, hidden, baseline, "kir",
                       lambda label, pass_: by_key[(name, baseline, label, pass_)])
            for name, baseline in dict.fromkeys((seg[0], seg[1]) for seg in segments)]


def markdown(results, header: str) -> str:
    unit = "kIr" if results and results[0].get("unit") == "kIr" else "µs"
    key = "kir" if unit == "kIr" else "us"
    titles = {"fwd": "fwd", "fwdbwd": "fwd+bwd", "infer": "no-grad fwd"}
    passes = [p for p in PASSES if all(f"{p}_ratio" in r for r in results)]  # a JSON from before a pass was added
    head = "".join(f" normzoo {titles[p]} {unit} | baseline {titles[p]} {unit} | ratio |" for p in passes)
    lines = [header, "", "| layer | rows × N |" + head, "|---|---|" + "---|---|---|" * len(passes)]
    for r in results:
        lines.append(f"| {r['layer']} (vs {r['baseline']}) | {r['rows']} × {r['hidden']} |" + "".join(
            f" {r[f'normzoo_{p}_{key}']:.1f} | {r[f'torch_{p}_{key}']:.1f} | {r[f'{p}_ratio']:.2f}× |" for p in passes))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    triton_launch = args.triton_launch
    if triton_launch and args.stub:
        print("--stub and --triton-launch are two ways to time the host path: pick one", file=sys.stderr)
        return 2
    if triton_launch:
        _fake_gpu_driver()
    stubbed = not triton_launch and (args.stub or args.instructions or args.segments is not None
                                     or not torch.cuda.is_available())
    if stubbed:
        if "normzoo" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--stub needs TRITON_INTERPRET=1 before normzoo is imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before normzoo's kernels are defined
        _stub_launches()
    torch.set_num_threads(1)
    on_cpu = stubbed or triton_launch
    device = "cpu" if on_cpu else "cuda"
    rows = args.rows or ([4] if on_cpu else [1, 16, 256])
    hidden = args.hidden or (64 if on_cpu else 4096)
    if args.segments is not None:
        run_segments(rows[0], hidden, args.repeats, args.segments, args.layers)
        return 0
    if args.layers:  # here, not in the subprocesses below (whose errors go nowhere)
        selected(layers(8, device, torch.float32), args.layers)
    if args.instructions:
        results = [r for n in rows for r in count_instructions(n, hidden, min(args.repeats, 200), triton_launch,
                                                                 args.layers)]
    else:
        results = measure(rows, hidden, args.repeats, args.rounds, device, on_cpu, args.layers)

    from .harness import environment

    env = environment(device, smoke=False)
    if triton_launch:
        where = ("CPU, every launch through Triton's own launch path into sm_90 compiles, only the driver faked "
                 "(no kernel runs)")
    elif stubbed:
        where = "CPU, Triton launches stubbed out (host time only)"
    else:
        where = f"{env['gpu']}, wall clock per call, kernels included"
    if args.instructions:
        where += ", thousands of instructions per call (callgrind)"
    header = (f"Host cost per eager call, fp32, input requires grad (no-grad fwd: under torch.no_grad()): {where}. "
              f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}.")
    table = markdown(results, header)
    print(table)
    if args.out:
        label = ("cpu-triton-launch" if triton_launch else "cpu-stubbed" if stubbed else env["gpu"].replace(" ", "-"))
        if args.instructions:
            label = "cpu-triton-launch-instructions" if triton_launch else "cpu-instructions"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"host-{label}.json").write_text(json.dumps({"environment": env, "stubbed": stubbed,
                                                                 "triton_launch": triton_launch,
                                                                 "driver_launches": None if args.instructions or not triton_launch
                                                                 else LAUNCHES[0],
                                                                 "results": results}, indent=1) + "\n")
        (args.out / f"host-{label}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
