"""Benchmark normzoo against PyTorch eager, torch.compile and the peers (Liger-Kernel, quack).

    python -m benchmarks                          # the four norms, bf16 and fp32, full sweep
    python -m benchmarks --ops layernorm dyt derf --dtypes bf16 --rows 32768
    python -m benchmarks --ops fused --dtypes bf16 --rows 32768 --hidden 2048 4096 8192 16384
    python -m benchmarks --ops add_norm-rmsnorm norm_add_norm-layernorm --dtypes bf16
    python -m benchmarks --ops rmsnorm --dtypes bf16 --rows 32768 --hidden 1024 4096
    python -m benchmarks --providers normzoo compile compile-tuned   # opt-in: inductor's coordinate-descent tuning
    python -m benchmarks --smoke                  # CPU check of the harness (no timing claims)
    python -m benchmarks --from-json F.json [--out DIR]  # a saved run's PNG again (and its tables printed)
    python -m benchmarks --host [--out DIR]       # host cost per eager call (benchmarks/host.py): CPU or GPU
    python -m benchmarks --train-step [--tiny]    # a Llama training step with and without normzoo.swap (train_step.py)

``--ops`` takes case names (benchmarks/cases.py: layernorm, rmsnorm, dyt, derf, and the norms fused
with the residual add, ``<add_norm|norm_add|norm_add_norm>-<norm>``) and group names: ``norms``,
``add_norm``, ``norm_add``, ``norm_add_norm`` (that op over the four norms) and ``fused`` (all 12).

Writes ``<out>/<name>.json``, ``<out>/<name>.png`` and ``<out>/<name>.md`` (a table of GB/s and %
of copy bandwidth; the PNG plots GB/s by device time when ``--device-time`` measured it, else by
wall-clock). Without a CUDA GPU it says so and exits with status 2, unless ``--smoke``.
The peers run where they import (one line says which did not); ``--budget-s`` stops the sweep
before a shape that would start past the budget and still writes every file.
"""

import argparse
import sys
import time
from pathlib import Path

from . import json_argument, positive_int, seconds

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SMOKE_SKIPS = ("compile", "compile-tuned")  # --smoke runs no inductor: its compiles take minutes on the CPU


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
        epilog="Other measurements, each with options of its own (see its --help): --host (host cost per call: "
               "python -m benchmarks --host --help), --train-step (python -m benchmarks --train-step --help).")
    p.add_argument("--ops", nargs="+", default=["norms"],
                   help="cases or groups: norms (default: layernorm rmsnorm dyt derf), add_norm, norm_add, "
                        "norm_add_norm, fused (all three over the four norms), or <op>-<norm>, e.g. "
                        "add_norm-rmsnorm")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--rows", nargs="+", type=positive_int, default=None, help="default: 4096 32768 (--smoke: 64)")
    p.add_argument("--hidden", nargs="+", type=positive_int, default=None,
                   help="default: 512 1024 2048 4096 8192 16384 32768 (--smoke: 128 300)")
    p.add_argument("--passes", nargs="+", default=["fwd", "bwd", "fwdbwd"], choices=["fwd", "bwd", "fwdbwd"])
    p.add_argument("--providers", nargs="+", default=None,
                   help="default: normzoo eager compile and the peers that import (liger, quack); "
                        "compile-tuned only when named")
    p.add_argument("--device-time", action="store_true",
                   help="also measure each call's GPU time alone (torch.profiler) and host time to issue it")
    p.add_argument("--budget-s", type=seconds, default=None,
                   help="start no new shape after this many seconds; write what was measured")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the files (default: benchmarks/results; --from-json: the JSON's own)")
    p.add_argument("--name", default=None, help="file stem; default: <gpu>-<ops>")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on the CPU under TRITON_INTERPRET=1: checks the harness, measures nothing")
    p.add_argument("--from-json", type=Path, default=None,
                   help="measure nothing: draw a saved run's PNG again from its JSON (as <out>/<its stem>.png) "
                        "and print its tables")
    args = p.parse_args(argv)
    if args.from_json is not None:
        from .harness import parse_results

        args.saved = json_argument(p, "--from-json", args.from_json, "a saved benchmark run", parse_results)
        args.out = args.out or args.from_json.parent
    args.out = args.out or Path("benchmarks/results")
    if args.out.exists() and not args.out.is_dir():  # (else the first save, after a shape's timing, fails)
        p.error(f"--out {args.out} is a file: give a directory")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--host" in argv:  # a different measurement with its own options: see benchmarks/host.py
        from .host import main as host_main

        return host_main([a for a in argv if a != "--host"])
    if "--train-step" in argv:  # likewise: benchmarks/train_step.py
        from .train_step import main as train_step_main

        return train_step_main([a for a in argv if a != "--train-step"])
    args = parse_args(argv)
    from . import harness

    if args.from_json is not None:
        return _replot(harness, args)
    if (status := harness.missing_gpu(args.smoke, "GPU kernels", "--smoke")) is not None:
        return status
    import torch

    from .cases import CASES, GROUPS, PEERS, default_providers, expand_ops, peer_providers

    op_names = list(args.ops)  # as given (groups unexpanded), for the file stem
    args.ops = expand_ops(args.ops)
    unknown = [op for op in args.ops if op not in CASES]
    if unknown:
        print(f"unknown op(s) {unknown}; choose from {sorted(CASES)} or a group {sorted(GROUPS)}", file=sys.stderr)
        return 2
    if args.providers is not None:
        known = {q for op in args.ops for q in CASES[op].providers} | set(PEERS)
        if unknown := [q for q in args.providers if q not in known]:
            print(f"unknown provider(s) {unknown}; these ops have {sorted(known)}", file=sys.stderr)
            return 2
    device = "cpu" if args.smoke else "cuda"
    args.rows = args.rows or ([64] if args.smoke else [4096, 32768])
    args.hidden = args.hidden or ([128, 300] if args.smoke else [512, 1024, 2048, 4096, 8192, 16384, 32768])
    if args.smoke and (max(args.rows) > 256 or max(args.hidden) > 4096):
        print("--smoke runs the kernels in Triton's CPU interpreter: keep --rows <= 256 and --hidden <= 4096",
              file=sys.stderr)
        return 2
    if not args.smoke:  # (touching torch._dynamo imports it: seconds that a smoke run, which compiles nothing, skips)
        # One compiled graph per shape and dtype, and per case where cases share a code object
        # (compile-tuned's wrapper): 16 cases x 28 shapes in a full sweep.
        torch._dynamo.config.cache_size_limit = 1024
        torch._dynamo.config.accumulated_cache_size_limit = 1024

    peers = {}
    wanted_peers = [q for q in PEERS if args.providers is None or q in args.providers]
    if args.smoke:
        if wanted_peers:
            print("peers: skipped in --smoke (they need a CUDA GPU)")
        asked = {q for op in args.ops for q in (args.providers or default_providers(CASES[op]))}
        if skipped := [q for q in SMOKE_SKIPS if q in asked]:
            print(f"{' and '.join(skipped)}: skipped in --smoke (inductor compiles take minutes on the CPU)")
        if not asked - set(SMOKE_SKIPS) - set(PEERS):
            print(f"--smoke runs none of the providers {sorted(asked)} (the peers need a CUDA GPU; inductor "
                  "compiles take minutes on the CPU): name normzoo or eager too", file=sys.stderr)
            return 2
    elif wanted_peers:
        peers, notes = peer_providers(wanted_peers)
        for note in notes:
            print(note)

    start = time.monotonic()
    copy_gbps = harness.copy_bandwidth_gbps(device, smoke=args.smoke)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s")
    env = harness.environment(device, args.smoke)
    label = "smoke-cpu" if args.smoke else env["gpu"].replace(" ", "-")
    stem = args.name or f"{label}-{'-'.join(op_names)}"
    points = []
    out_of_time = False
    # Shapes outermost, in the order given (ops inside): a sweep cut short by --budget-s or a time
    # limit has every op at the shapes it reached, and the files are rewritten after each shape.
    shapes = [(d, rows, hidden) for d in args.dtypes for rows in args.rows for hidden in args.hidden]
    for dtype_name, rows, hidden in shapes:
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            out_of_time = True
            break
        dtype = getattr(torch, DTYPES[dtype_name])
        for op in args.ops:
            case = CASES[op]
            fns = {**case.providers, **peers.get(op, {})}
            providers = [q for q in (args.providers or default_providers(case) + list(peers.get(op, {}))) if q in fns]
            if args.smoke:
                providers = [q for q in providers if q not in SMOKE_SKIPS]
            leaves = case.make_inputs(rows, hidden, dtype, device)
            dy = case.make_grads(rows, hidden, dtype, device)  # a tuple for several outputs: (dy, ds)
            for provider in providers:
                fn = fns[provider]
                for pass_ in args.passes:
                    what = f"{op:10s} {pass_:6s} {dtype_name} rows={rows:6d} N={hidden:6d} {provider:8s}"
                    try:
                        ms = harness.time_pass(fn, leaves, dy, pass_, smoke=args.smoke)
                    except Exception as e:  # a peer that refuses a shape must not end the sweep
                        if provider == "normzoo":  # ours must not fail quietly (what ran is saved)
                            raise
                        print(f"{what} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        for t in leaves:
                            t.grad = None
                        continue
                    device_ms = host_ms = None
                    if args.device_time:
                        try:
                            device_ms, host_ms = harness.device_and_host_ms(
                                harness.pass_call(fn, leaves, dy, pass_), leaves)
                        except Exception as e:  # the split of a peer's call is a bonus; its time stands
                            if provider == "normzoo":
                                raise
                            print(f"{what} device time failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                            for t in leaves:
                                t.grad = None
                    nbytes = case.bytes_moved(pass_, rows, hidden, dtype)
                    gbps = nbytes / ms / 1e6
                    point = harness.Point(op, provider, pass_, dtype_name, rows, hidden, ms, gbps, 100 * gbps / copy_gbps)
                    extra = ""
                    if host_ms is not None:
                        point.host_ms = host_ms
                        if device_ms is not None:
                            point.device_ms = device_ms
                            point.device_pct_copy = 100 * nbytes / device_ms / 1e6 / copy_gbps
                        extra = (f"  device {device_ms:.4f} ms {point.device_pct_copy:5.1f}%" if device_ms is not None
                                 else "  device n/a") + f"  host {1e3 * host_ms:6.1f} us"
                    points.append(point)
                    print(f"{what} {ms:8.4f} ms {gbps:7.0f} GB/s {point.pct_copy:5.1f}%{extra}", flush=True)
            del leaves, dy
            if device == "cuda":
                torch.cuda.empty_cache()
        # Save as we go: a sweep cut short by a time limit keeps what it measured.
        _save(harness, args.out, stem, env, copy_gbps, points)
    if out_of_time:
        print(f"budget of {args.budget_s:g} s spent: stopped before the end of the sweep", flush=True)

    path, table = _save(harness, args.out, stem, env, copy_gbps, points)
    png = harness.plot(points, copy_gbps, args.out / f"{stem}.png", f"{stem} (copy {copy_gbps:.0f} GB/s)")
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    print(table)
    return 0


def _replot(harness, args) -> int:
    """--from-json: the PNG and tables of a saved run, as the run itself wrote them."""
    _, copy_gbps, points = args.saved
    stem = args.from_json.stem
    args.out.mkdir(parents=True, exist_ok=True)
    png = harness.plot(points, copy_gbps, args.out / f"{stem}.png", f"{stem} (copy {copy_gbps:.0f} GB/s)")
    print(harness.markdown_table(points))
    if (split := harness.device_time_table(points)) is not None:
        print(f"\n{split}")
    if png:
        print(f"\nwrote {png}")
    return 0


def _save(harness, out, stem, env, copy_gbps, points):
    path = harness.write_results(out, stem, env, copy_gbps, points)
    table = harness.markdown_table(points)
    tuned = env.get("tuned_configs")
    launch = (f"normzoo launch configs: the rules + {Path(tuned['path']).name} ({tuned['entries']} entries)" if tuned
              else "normzoo launch configs: the rules (no measured table for this GPU)")
    split = harness.device_time_table(points)
    split = ("" if split is None else
             "\n\nThe same calls split (--device-time): the GPU's own time per call (kernels, memsets and copies "
             "the profiler recorded, L2 flushed before each call) as % of copy bandwidth, and the host's µs to "
             "issue one call on an idle GPU. The table above sees between the larger of the two and their sum "
             f"(the GPU waits for a launch the host issues late).\n\n{split}")
    (out / f"{stem}.md").write_text(
        f"# {stem}\n\n{env.get('gpu') or 'CPU smoke run (not a measurement)'}, torch {env['torch']}, "
        f"triton {env['triton']}, commit {env['git_commit']}; copy bandwidth {copy_gbps:.0f} GB/s; "
        f"{launch}.\n\n{table}{split}\n")
    return path, table


if __name__ == "__main__":
    sys.exit(main())
