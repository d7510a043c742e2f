"""Timing, byte counting and reporting shared by every benchmark.

Conventions (../shared/ANCHORS.md's, so our numbers compare with the peers' there):
- bytes are counted from first principles: each (rows × N) tensor read or written once;
- time is the median of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs);
- bandwidth is reported against a device-to-device copy of 1 GiB measured in the same run.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PASSES = ("fwd", "bwd", "fwdbwd")


def missing_gpu(cpu_check: bool, what: str, flag: str) -> int | None:
    """Before normzoo is imported: for a CPU check run (``flag``), Triton's interpreter; otherwise a
    CUDA GPU, or exit status 2 with why. None when the run can go on."""
    if cpu_check:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before normzoo's kernels are defined
        return None
    if torch.cuda.is_available():
        return None
    print(f"No CUDA GPU found: this benchmark times {what}. Run it on a machine with a GPU, or pass {flag} to "
          "check it on the CPU.", file=sys.stderr)
    return 2


@dataclass
class Point:
    op: str
    provider: str
    pass_: str
    dtype: str
    rows: int
    hidden: int
    ms: float
    gbps: float
    pct_copy: float
    # --device-time: the GPU's own time per call (kernels, memsets, copies; the profiler's), the
    # percentage of copy bandwidth that makes, and the host's time to issue one call. None otherwise.
    device_ms: float | None = None
    device_pct_copy: float | None = None
    host_ms: float | None = None


def time_ms(fn, *, smoke: bool, grad_to_none=None, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()``. On CUDA: do_bench (``warmup`` and ``rep`` are its
    milliseconds). In smoke mode (CPU): a few wall-clock runs, only to exercise the code; those
    numbers are not measurements."""
    if not smoke:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_pass(fn, leaves, dy, pass_: str, *, smoke: bool, **timing) -> float:
    """Milliseconds of one pass of ``fn(*leaves)``: "fwd" calls the forward only; "bwd" times
    ``y.backward(dy, retain_graph=True)`` on one stored forward; "fwdbwd" both, each call fresh.
    A forward with several outputs (the fused residual ops' ``(y, s)``) returns a tuple, and ``dy``
    is then a tuple too: one backward through all of them. The benchmark and the tuner both time
    through here, so their numbers mean the same thing."""
    grads = None if pass_ == "fwd" else leaves
    return time_ms(pass_call(fn, leaves, dy, pass_), smoke=smoke, grad_to_none=grads, **timing)


def pass_call(fn, leaves, dy, pass_: str):
    """The call :func:`time_pass` times, as a function of no arguments."""
    if pass_ == "fwd":
        return lambda: fn(*leaves)
    if pass_ == "bwd":
        y = fn(*leaves)
        return lambda: _backward(y, dy, retain_graph=True)
    return lambda: _backward(fn(*leaves), dy)


# A flush between calls that no op under test launches: its kernels are told apart by this name.
_FLUSH_KERNEL = "bitwise_not"


def device_and_host_ms(call, leaves, *, reps: int = 20) -> tuple[float | None, float]:
    """``(device_ms, host_ms)`` of ``call()``, the two parts of what :func:`time_ms` sees (between
    the larger of the two and their sum: the GPU waits for a launch the host issues late).

    ``device_ms``: the GPU's busy time per call, the median over ``reps`` calls of the durations
    of the device activities (kernels, memsets, copies) the profiler records for each, every call
    after an L2 flush whose own kernels are left out: what a call costs where the host runs ahead
    of the GPU, as in a training step. None without a CUDA device, or where the profiler cannot
    start or the flushes cannot be told apart.
    ``host_ms``: the median wall time of issuing one call on an idle GPU (synchronized before each,
    not after): Python, dispatch and launches, the part a GPU waits for when the host falls behind.
    """
    from torch.autograd import DeviceType

    cuda = torch.cuda.is_available() and any(t.is_cuda for t in leaves)
    reps = reps if cuda else 2  # the CPU smoke run only checks the code (the interpreter is slow)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    call()  # compiled and cached before either measurement
    host = []
    for _ in range(reps):
        for t in leaves:
            t.grad = None
        sync()
        start = time.perf_counter()
        call()
        host.append((time.perf_counter() - start) * 1e3)
    host_ms = statistics.median(host)
    if not cuda:
        return None, host_ms
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    sync()
    prof = profile(activities=[ProfilerActivity.CUDA])
    try:
        prof.start()
    except RuntimeError as e:  # a profiler that cannot start (no CUPTI) measures nothing here
        print(f"device time: the profiler did not start ({str(e)[:120]})")
        return None, host_ms
    try:
        for _ in range(reps):
            for t in leaves:
                t.grad = None
            flush.bitwise_not_()
            call()
        sync()
    finally:
        prof.stop()
    # Device activities only (a user annotation's span, were CPU activity on, would cover others),
    # in the order they ran; each flush starts the next call's group.
    device = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation),
                    key=lambda e: e.time_range.start)
    per_call: list[float] = []
    for e in device:
        if _FLUSH_KERNEL in e.name:
            per_call.append(0.0)
        elif per_call:
            per_call[-1] += e.time_range.elapsed_us()
    if len(per_call) != reps:  # the flushes are not told apart: their time would count as the op's
        print(f"device time: {len(per_call)} flush kernels recorded for {reps} calls; not measured")
        return None, host_ms
    return statistics.median(per_call) / 1e3, host_ms


def _backward(y, dy, retain_graph: bool = False) -> None:
    if isinstance(y, tuple):
        torch.autograd.backward(y, dy, retain_graph=retain_graph)
    else:
        y.backward(dy, retain_graph=retain_graph)


def copy_bandwidth_gbps(device: str, *, smoke: bool) -> float:
    """Device-to-device copy: bytes read plus bytes written over the median time."""
    nbytes = (1 << 20) if smoke else (1 << 30)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), smoke=smoke)
    return 2 * nbytes / ms / 1e6


def environment(device: str, smoke: bool) -> dict:
    import triton

    env = {
        "smoke": smoke,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda, driver=_driver(),
                   tuned_configs=_tuned_table(props.name))
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env


def _tuned_table(gpu: str) -> dict | None:
    """Which measured launch table the kernels use on this GPU (kernels/configs/<gpu>.json), if any."""
    try:
        from normzoo.kernels import heuristics

        path = heuristics.CONFIG_DIR / f"{gpu.replace(' ', '-')}.json"
        if not path.is_file():
            return None
        return {"path": str(path), "entries": len(json.loads(path.read_text()).get("configs", {}))}
    except (ImportError, OSError, ValueError, AttributeError):
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def write_results(out_dir: Path, stem: str, env: dict, copy_gbps: float, points: list[Point]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    rows = [{("pass" if k == "pass_" else k): v for k, v in asdict(p).items()} for p in points]
    path.write_text(json.dumps({"environment": env, "copy_gbps": copy_gbps, "results": rows}, indent=1) + "\n")
    return path


def markdown_table(points: list[Point]) -> str:
    """One line per (op, pass, dtype, rows, hidden): each provider's % of copy bandwidth."""
    return _provider_table(points, "GB/s (% copy)", lambda p: f"{p.gbps:.0f} ({p.pct_copy:.0f}%)")


def device_time_table(points: list[Point]) -> str | None:
    """With --device-time: per provider, the GPU's own time as % of copy bandwidth and the host's
    µs to issue a call; None when no point has them."""
    if not any(p.host_ms is not None for p in points):
        return None

    def cell(p: Point) -> str:
        if p.host_ms is None:
            return "—"
        device = f"{p.device_pct_copy:.0f}%" if p.device_pct_copy is not None else "n/a"
        return f"{device} / {1e3 * p.host_ms:.0f}"

    return _provider_table(points, "device % copy / host µs", cell)


def _provider_table(points: list[Point], column: str, cell) -> str:
    """A Markdown table, a line per (op, pass, dtype, rows, hidden) and a column per provider
    (headed "<provider> <column>"), each cell ``cell(point)``."""
    providers = sorted({p.provider for p in points})
    cells: dict = {}
    for p in points:
        cells.setdefault((p.op, p.pass_, p.dtype, p.rows, p.hidden), {})[p.provider] = p
    header = ["op", "pass", "dtype", "rows", "N"] + [f"{q} {column}" for q in providers]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for k in sorted(cells):
        row = cells[k]
        vals = [cell(row[q]) if q in row else "—" for q in providers]
        lines.append("| " + " | ".join(str(v) for v in k) + " | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def parse_results(data: dict) -> tuple[dict, float, list[Point]]:
    """``(environment, copy_gbps, points)`` of what :func:`write_results` wrote, as read from its JSON."""
    points = [Point(**{("pass_" if k == "pass" else k): v for k, v in r.items()}) for r in data["results"]]
    return data["environment"], data["copy_gbps"], points


def plotted(points: list[Point]):
    """``(y-axis label, gbps(point))`` for :func:`plot`: the GPU's own time where the run measured it
    (--device-time; a point without it, None, is left out), else wall-clock. A run's device-time
    plot must not show its wall-clock numbers, and the axis says which one it shows."""
    if any(p.device_ms is not None for p in points):
        return "GB/s (device time)", lambda p: None if p.device_ms is None else p.gbps * p.ms / p.device_ms
    return "GB/s (wall-clock)", lambda p: p.gbps


def plot(points: list[Point], copy_gbps: float, path: Path, title: str) -> Path | None:
    """GB/s against hidden size, one panel per (op, dtype, rows) and pass (:func:`plotted`: by device
    time when measured, else wall-clock). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot")
        return None
    if not points:
        print("no results: no plot")
        return None
    ylabel, gbps = plotted(points)
    groups = sorted({(p.op, p.dtype, p.rows) for p in points})
    fig, axes = plt.subplots(len(groups), len(PASSES), figsize=(5 * len(PASSES), 3.2 * len(groups)), squeeze=False)
    for gi, (op, dtype, rows) in enumerate(groups):
        for pi, pass_ in enumerate(PASSES):
            ax = axes[gi][pi]
            sel = [p for p in points if (p.op, p.dtype, p.rows, p.pass_) == (op, dtype, rows, pass_)]
            for provider in sorted({p.provider for p in sel}):
                pts = sorted((p.hidden, gbps(p)) for p in sel if p.provider == provider and gbps(p) is not None)
                ax.plot([h for h, _ in pts], [g for _, g in pts], marker="o", label=provider)
            ax.axhline(copy_gbps, color="gray", linestyle="--", linewidth=1, label="copy")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {pass_} {dtype} rows={rows}", fontsize=9)
            ax.set_xlabel("hidden size N")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
