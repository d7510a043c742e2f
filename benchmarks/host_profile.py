"""Where the host time of one eager call goes, on a GPU: cProfile over many LayerNorm calls, and the
floor a bare Triton launch sets on this machine.

    python -m benchmarks.host_profile [--rows 16] [--hidden 4096] [--calls 300]

Without a GPU it runs the kernels in Triton's interpreter at 4 x 64 and 20 calls unless told
otherwise (checks the script in seconds; its times are the interpreter's, not a measurement),
or, with ``--triton-launch``, launches them through Triton's own launch path into sm_90 compiles
with only the driver faked (``benchmarks.host --triton-launch``): a CPU profile of what a GPU
host spends, kernels aside.

Prints the functions that take the most time of their own (``tottime``) for the forward and for the
forward + backward, then µs per call of: torch.nn.LayerNorm, normzoo.LayerNorm, a one-program
Triton kernel launched with ``kernel[grid](...)`` and with ``kernel.run(...)``. A diagnostic for
the host-path work of issue 11, not a benchmark table.
"""

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

from . import positive_int


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_profile")
    p.add_argument("--rows", type=positive_int, default=None, help="default 16 (interpreter: 4)")
    p.add_argument("--hidden", type=positive_int, default=None, help="default 4096 (interpreter: 64)")
    p.add_argument("--calls", type=positive_int, default=None, help="default 300 (interpreter: 20)")
    p.add_argument("--triton-launch", action="store_true",
                   help="CPU: Triton's own launch path into sm_90 compiles, only the driver faked")
    args = p.parse_args(argv)

    import torch

    if args.triton_launch:
        from .host import _fake_gpu_driver

        _fake_gpu_driver()
    interpreted = not args.triton_launch and not torch.cuda.is_available()
    if interpreted:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    args.rows = args.rows or (4 if interpreted else 16)
    args.hidden = args.hidden or (64 if interpreted else 4096)
    args.calls = args.calls or (20 if interpreted else 300)
    import triton
    import triton.language as tl

    import normzoo

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as benchmarks.host; restored at the end (the tests call main())
    x = torch.randn(args.rows, args.hidden, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    ours = normzoo.LayerNorm(args.hidden, backend="triton", device=device)
    theirs = torch.nn.LayerNorm(args.hidden, device=device)

    @triton.jit
    def one_program(ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.load(ptr + offs, mask=offs < n) + 1, mask=offs < n)

    buf = torch.zeros(128, device=device)

    calls = {
        "torch.nn.LayerNorm fwd": lambda: theirs(x),
        "normzoo.LayerNorm fwd": lambda: ours(x),
        "torch.nn.LayerNorm fwd+bwd": lambda: theirs(x).backward(dy),
        "normzoo.LayerNorm fwd+bwd": lambda: ours(x).backward(dy),
        "triton kernel[grid](...)": lambda: one_program[(1,)](buf, 128, BLOCK=128),
        "triton kernel.run(...)": lambda: one_program.run(buf, 128, BLOCK=128, grid=(1,), warmup=False),
        "torch.empty_like": lambda: torch.empty_like(x),
    }
    for fn in calls.values():
        for _ in range(min(30, args.calls)):
            fn()
    sync()
    where = ("cpu, through Triton's launch path (sm_90 compiles, driver faked)" if args.triton_launch else
             "cpu, Triton's interpreter (checks the script; not a measurement)" if interpreted else device)
    print(f"{where}, {args.rows} x {args.hidden} fp32, input requires grad; torch {torch.__version__}, "
          f"triton {triton.__version__}")
    for label, fn in calls.items():
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            sync()
            best = min(best, (time.perf_counter() - start) / args.calls * 1e6)
        print(f"  {label:30s} {best:8.1f} us/call")

    for label in ("normzoo.LayerNorm fwd", "normzoo.LayerNorm fwd+bwd", "triton kernel[grid](...)"):
        fn = calls[label]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        sync()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(22)
        body = text.getvalue()
        print(f"\n== {label}: {args.calls} calls, by own time\n" + body[body.find("ncalls"):])
    torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
