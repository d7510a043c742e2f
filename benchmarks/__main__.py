"""Benchmark normzoo against PyTorch eager and torch.compile.

    python -m benchmarks                          # every op, bf16 and fp32, full sweep
    python -m benchmarks --ops layernorm dyt derf --dtypes bf16 --rows 32768
    python -m benchmarks --ops rmsnorm --dtypes bf16 --rows 32768 --hidden 1024 4096
    python -m benchmarks --smoke                  # CPU check of the harness (no timing claims)

Writes ``<out>/<name>.json``, ``<out>/<name>.png`` and ``<out>/<name>.md`` (a table of GB/s and %
of copy bandwidth). Without a CUDA GPU it says so and exits with status 2, unless ``--smoke``.
"""

import argparse
import os
import sys
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", default=["layernorm", "rmsnorm", "dyt", "derf"])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--rows", nargs="+", type=int, default=[4096, 32768])
    p.add_argument("--hidden", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--passes", nargs="+", default=["fwd", "bwd", "fwdbwd"], choices=["fwd", "bwd", "fwdbwd"])
    p.add_argument("--providers", nargs="+", default=None, help="default: every provider of each op")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default=None, help="file stem; default: <gpu>-<ops>")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on the CPU under TRITON_INTERPRET=1: checks the harness, measures nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before normzoo's kernels are defined
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("No CUDA GPU found: this benchmark times GPU kernels. Run it on a machine with a GPU, "
              "or pass --smoke to check the harness on the CPU.", file=sys.stderr)
        return 2

    from . import harness
    from .cases import CASES

    unknown = [op for op in args.ops if op not in CASES]
    if unknown:
        print(f"unknown op(s) {unknown}; choose from {sorted(CASES)}", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.rows, args.hidden = [64], [128, 300]
    torch._dynamo.config.cache_size_limit = 256  # one compiled graph per shape and dtype

    copy_gbps = harness.copy_bandwidth_gbps(device, smoke=args.smoke)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s")
    env = harness.environment(device, args.smoke)
    label = "smoke-cpu" if args.smoke else env["gpu"].replace(" ", "-")
    stem = args.name or f"{label}-{'-'.join(args.ops)}"
    points = []
    for op in args.ops:
        case = CASES[op]
        providers = [q for q in (args.providers or case.providers) if q in case.providers]
        if args.smoke:
            providers = [q for q in providers if q != "compile"]  # inductor compiles take minutes on CPU
        for dtype_name in args.dtypes:
            dtype = getattr(torch, DTYPES[dtype_name])
            for rows in args.rows:
                for hidden in args.hidden:
                    leaves = case.make_inputs(rows, hidden, dtype, device)
                    dy = torch.randn(rows, hidden, dtype=dtype, device=device)
                    for provider in providers:
                        fn = case.providers[provider]
                        for pass_ in args.passes:
                            ms = _time_pass(harness, fn, leaves, dy, pass_, args.smoke)
                            nbytes = case.bytes_moved(pass_, rows, hidden, dtype)
                            gbps = nbytes / ms / 1e6
                            point = harness.Point(op, provider, pass_, dtype_name, rows, hidden, ms, gbps,
                                                  100 * gbps / copy_gbps)
                            points.append(point)
                            print(f"{op:10s} {pass_:6s} {dtype_name} rows={rows:6d} N={hidden:6d} "
                                  f"{provider:8s} {ms:8.4f} ms {gbps:7.0f} GB/s {point.pct_copy:5.1f}%", flush=True)
                    del leaves, dy
                    if device == "cuda":
                        torch.cuda.empty_cache()
            # Save as we go: a sweep cut short by a time limit keeps what it measured.
            _save(harness, args.out, stem, env, copy_gbps, points)

    path, table = _save(harness, args.out, stem, env, copy_gbps, points)
    png = harness.plot(points, copy_gbps, args.out / f"{stem}.png", f"{stem} (copy {copy_gbps:.0f} GB/s)")
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    print(table)
    return 0


def _save(harness, out, stem, env, copy_gbps, points):
    path = harness.write_results(out, stem, env, copy_gbps, points)
    table = harness.markdown_table(points)
    (out / f"{stem}.md").write_text(
        f"# {stem}\n\n{env.get('gpu') or 'CPU smoke run (not a measurement)'}, torch {env['torch']}, "
        f"triton {env['triton']}, commit {env['git_commit']}; copy bandwidth {copy_gbps:.0f} GB/s.\n\n{table}\n")
    return path, table


def _time_pass(harness, fn, leaves, dy, pass_, smoke):
    if pass_ == "fwd":
        return harness.time_ms(lambda: fn(*leaves), smoke=smoke)
    if pass_ == "bwd":
        y = fn(*leaves)
        return harness.time_ms(lambda: y.backward(dy, retain_graph=True), smoke=smoke, grad_to_none=leaves)
    return harness.time_ms(lambda: fn(*leaves).backward(dy), smoke=smoke, grad_to_none=leaves)


if __name__ == "__main__":
    sys.exit(main())
