"""One training step of a Llama-style model with and without ``normzoo.swap``: tokens/s and peak memory.

    python -m benchmarks --train-step                    # GPU: 134M-parameter Llama, bf16, AdamW, 16384 tokens/step
    python -m benchmarks --train-step --compile          # also torch.compile of each variant (minutes of compile)
    python -m benchmarks --train-step --tiny             # CPU smoke: 1M parameters, fp32, 2 steps; measures nothing
    python -m benchmarks.train_step --from-json F.json [--out DIR]   # the Markdown (and PNG) again from a saved run

A step is forward (loss from ``labels``), backward and ``AdamW.step`` with ``zero_grad(set_to_none=True)``
on a ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` (random initialization, no
download; default hidden 768, 12 layers, 12 heads, MLP 2048, vocabulary 32000, untied embeddings:
134M parameters). Each variant starts from the same seed (the same initial weights) and trains on the
same random token batches: ``torch`` is the model as transformers builds it, ``normzoo`` the same after
``normzoo.swap(model)`` (its LlamaRMSNorms become normzoo RMSNorms that compute the same thing);
``--compile`` adds ``torch-compile`` and ``normzoo-compile`` (``torch.compile`` of each).

Measured per variant, after ``--warmup`` steps (the first includes Triton's and inductor's compiles,
reported apart): the median of ``--steps`` timed steps, each synchronized (tokens/s = tokens per step /
that median), the peak of ``torch.cuda.max_memory_allocated`` over the timed steps (reset between
variants and after the warmup: weights, gradients, AdamW state and activations), the training loss of
every step and the loss on a held-out batch after the timed steps, which both variants should give
alike. The swap report is recorded: a normzoo variant in which swap replaced nothing is marked
invalid ("nothing swapped") and no speedup is computed for it.

Writes ``<out>/<name>.json``, ``.md`` and ``.png`` (``--formats`` picks). Without a CUDA GPU it says so
and exits with status 2, unless ``--tiny``, which runs the kernels in Triton's CPU interpreter.
"""

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

from . import json_argument, seconds

# hidden, layers, heads, MLP width, vocabulary. "llama-134m": the GPU default (GPT-2-small-sized
# blocks, Llama's MLP and vocabulary); "tiny": 1.05M parameters for the CPU smoke run (one layer:
# each norm is a few interpreted launches per step).
MODELS = {
    "llama-134m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                       intermediate_size=2048, vocab_size=32000),
    "tiny": dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=512, vocab_size=3072),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
VARIANTS = ("torch", "normzoo", "torch-compile", "normzoo-compile")
FORMATS = ("json", "md", "png")
GIB = 1 << 30


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks --train-step", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: the tiny model, fp32, batch 2 x seq 32, 1 warmup + 2 timed steps, "
                        "the kernels under TRITON_INTERPRET=1; checks the plumbing, measures nothing")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="default: llama-134m (--tiny: tiny)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameters and activations (default: bf16; --tiny: fp32)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; --tiny: 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; --tiny: 32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --tiny: 2)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="default: torch normzoo (+ torch-compile normzoo-compile with --compile)")
    p.add_argument("--compile", action="store_true", help="add torch.compile of each variant")
    p.add_argument("--batches", type=int, default=4, help="distinct training batches, cycled (default 4)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=seconds, default=None,
                   help="start no new variant after this many seconds; write what was measured")
    p.add_argument("--out", type=Path, default=None, help="directory for the files (default: benchmarks/results)")
    p.add_argument("--name", default=None, help="file stem; default: train-step-<gpu> (--tiny: train-step-smoke-cpu)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="files to write (default: all three; the JSON holds everything, --from-json redraws the rest)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="print the Markdown of a saved run; with --out, also write its md and png there")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(model="tiny" if tiny else "llama-134m", dtype="fp32" if tiny else "bf16",
                    batch=2 if tiny else 8, seq=32 if tiny else 2048, warmup=1 if tiny else 3, steps=2 if tiny else 10)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.variants is None:
        args.variants = ["torch", "normzoo"] + (["torch-compile", "normzoo-compile"] if args.compile else [])
    if args.steps < 1 or args.warmup < 0 or args.batches < 1:
        p.error("--steps must be >= 1, --warmup >= 0 and --batches >= 1")
    if args.from_json is not None:
        args.saved = json_argument(p, "--from-json", args.from_json, "a saved training-step run", _saved_run)
    return args


def build_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(**MODELS[args.model], max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False,
                       attn_implementation="sdpa", use_cache=False)


def make_batches(args, vocab: int, device):
    """``--batches`` training batches and one held-out batch of uniformly random token ids, from
    ``--seed`` on the CPU's generator: the same for every variant and every device."""
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batches + 1, args.batch, args.seq), generator=gen)
    ids = ids.to(device)
    return list(ids[:-1]), ids[-1]


def _norm_classes(model) -> dict:
    """Counts of the modules whose class is named like a norm, by class name."""
    counts: dict = {}
    for m in model.modules():
        if type(m).__name__.endswith("Norm"):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def _swap_backend(device: str) -> str:
    """"auto" (the kernels on CUDA); on the CPU the kernels where the interpreter is on, so a smoke
    run goes through them, else the reference (what "auto" picks there)."""
    if device == "cuda":
        return "auto"
    from normzoo.kernels import heuristics

    return "triton" if heuristics.INTERPRETED else "auto"


def run_variant(variant: str, args, config, batches, held_out, device: str, dtype) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import normzoo

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # What is left of an earlier variant (nothing, unless something leaked): part of this one's peak.
    mem_at_start = torch.cuda.memory_allocated() / GIB if cuda else None
    torch.manual_seed(args.seed)
    # Built in its dtype (not cast after): the rotary inv_freq buffer stays fp32, as in a real run.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    result = {"variant": variant, "params": n_params, "valid": True, "invalid_reason": None}
    if variant.startswith("normzoo"):
        norms_before = _norm_classes(model)
        backend = _swap_backend(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = normzoo.swap(model, backend=backend)
        replaced = sum(report.values())
        result["swap"] = {
            "backend": backend,
            "norms_in_model": sum(norms_before.values()),
            "norm_classes": norms_before,
            "replaced": replaced,
            "replaced_by_kind": dict(report),
            "left_alone": dict(report.left_alone),
            "warnings": [str(w.message) for w in caught],
            "report": repr(report),
        }
        if replaced == 0:
            result.update(valid=False, invalid_reason="nothing swapped")
    if variant.endswith("-compile"):
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, **({"fused": True} if cuda else {}))
    result["optimizer"] = f"AdamW(lr={args.lr:g}, weight_decay=0.1{', fused=True' if cuda else ''})"

    def step(i):
        ids = batches[i % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses, times = [], []
    first_step_s = None
    for i in range(args.warmup):
        sync()
        start = time.perf_counter()
        losses.append(step(i))
        sync()
        if i == 0:
            first_step_s = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup, args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        losses.append(step(i))
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB) if cuda else (None, None)
    mem_after = torch.cuda.memory_allocated() / GIB if cuda else None
    with torch.no_grad():  # eager even for a compiled variant: no_grad would be a second compile
        held_out_loss = getattr(model, "_orig_mod", model)(input_ids=held_out, labels=held_out).loss.item()
    tokens = args.batch * args.seq
    median = statistics.median(times)
    result.update(
        tokens_per_step=tokens,
        step_ms_median=median * 1e3,
        step_ms_min=min(times) * 1e3,
        step_ms_all=[t * 1e3 for t in times],
        tokens_per_s=tokens / median,
        first_step_s=first_step_s,
        peak_mem_gib=peak[0],
        peak_reserved_gib=peak[1],
        mem_at_start_gib=mem_at_start,
        mem_after_gib=mem_after,
        losses=[x.item() for x in losses],
        final_train_loss=losses[-1].item(),
        held_out_loss=held_out_loss,
    )
    return result  # the model, its gradients and the optimizer state go with this frame


def compare(results: list[dict]) -> list[dict]:
    """normzoo against torch (eager with eager, compiled with compiled) where both ran. No speedup
    for a normzoo variant that swapped nothing: it would be the same model timed twice."""
    by = {r["variant"]: r for r in results}
    out = []
    for base, ours in (("torch", "normzoo"), ("torch-compile", "normzoo-compile")):
        if base not in by or ours not in by:
            continue
        b, o = by[base], by[ours]
        row = {"baseline": base, "variant": ours, "valid": o["valid"], "invalid_reason": o["invalid_reason"],
               "replaced": o["swap"]["replaced"], "norms_in_model": o["swap"]["norms_in_model"],
               "held_out_loss": [b["held_out_loss"], o["held_out_loss"]],
               "held_out_loss_abs_diff": abs(o["held_out_loss"] - b["held_out_loss"]),
               "train_loss_max_abs_diff": max(abs(x - y) for x, y in zip(b["losses"], o["losses"]))}
        if o["valid"]:
            row["speedup"] = o["tokens_per_s"] / b["tokens_per_s"]
            if b["peak_mem_gib"] is not None:
                row["peak_mem_delta_gib"] = o["peak_mem_gib"] - b["peak_mem_gib"]
        else:
            row["speedup"] = None
        out.append(row)
    return out


def _seconds(s: float | None) -> str:
    return "—" if s is None else f"{s:.1f}"


def markdown(data: dict) -> str:
    env, setup, results = data["environment"], data["setup"], data["results"]
    cfg = setup["config"]
    where = (f"{env['device']}, CPU smoke run (not a measurement)" if setup["tiny"] else env["device"])
    lines = [f"# {data['name']}", "",
             f"{where}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"commit {env['git_commit']}. One training step (forward, backward, AdamW) of a Llama-style "
             f"model ({setup['model']}: {(setup['params'] or 0) / 1e6:.1f}M parameters, hidden {cfg['hidden_size']}, "
             f"{cfg['num_hidden_layers']} layer(s), {cfg['num_attention_heads']} heads, "
             f"MLP {cfg['intermediate_size']}, vocabulary {cfg['vocab_size']}, "
             f"{setup['attn_implementation']} attention), {setup['dtype']} parameters, batch {setup['batch']} × "
             f"seq {setup['seq']} = {setup['batch'] * setup['seq']} tokens/step; {setup['warmup']} warmup steps, "
             f"then the median of {setup['steps']} timed steps. Peak memory: max_memory_allocated over the "
             f"timed steps.", "",
             "| variant | norms replaced by swap | tokens/s | step ms (median) | peak memory GiB | first step s "
             "| held-out loss after | valid |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("skipped"):
            lines.append(f"| {r['variant']} | — | skipped: {r['skipped']} | | | | | |")
            continue
        swapped = (f"{r['swap']['replaced']} of {r['swap']['norms_in_model']}" if "swap" in r else "—")
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "n/a (CPU)"
        valid = "yes" if r["valid"] else f"**no: {r['invalid_reason']}**"
        lines.append(f"| {r['variant']} | {swapped} | {r['tokens_per_s']:,.0f} | {r['step_ms_median']:.1f} | {mem} | "
                     f"{_seconds(r['first_step_s'])} | {r['held_out_loss']:.4f} | {valid} |")
    lines.append("")
    for c in data["comparison"]:
        if c["speedup"] is None:
            head = f"{c['variant']} vs {c['baseline']}: no speedup reported ({c['invalid_reason']})"
        else:
            mem = (f", peak memory {c['peak_mem_delta_gib']:+.2f} GiB" if "peak_mem_delta_gib" in c else "")
            head = f"{c['variant']} vs {c['baseline']}: {c['speedup']:.3f}× tokens/s{mem}"
            if setup["tiny"]:
                head += " (CPU smoke run: not a measurement)"
            if c["replaced"] < c["norms_in_model"]:
                head += f" (partial swap: {c['replaced']} of {c['norms_in_model']} norms)"
        lines.append(f"- {head}; held-out loss {c['held_out_loss'][0]:.4f} vs {c['held_out_loss'][1]:.4f} "
                     f"(|Δ| {c['held_out_loss_abs_diff']:.2g}), training losses differ by at most "
                     f"{c['train_loss_max_abs_diff']:.2g}.")
    for r in results:
        if "swap" in r:
            s = r["swap"]
            lines.append(f"- swap report ({r['variant']}, backend={s['backend']}): "
                         f"replaced {s['replaced_by_kind'] or 'nothing'}"
                         + (f"; left alone {s['left_alone']}" if s["left_alone"] else ""))
    return "\n".join(lines)


def plot(data: dict, path: Path) -> Path | None:
    """Tokens/s and peak memory per variant, and the training loss per step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot")
        return None
    results = [r for r in data["results"] if not r.get("skipped")]
    names = [r["variant"] + ("" if r["valid"] else "\n(nothing swapped)") for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    axes[0].bar(names, [r["tokens_per_s"] for r in results], color="tab:blue")
    axes[0].set_ylabel("tokens/s (median step)")
    mems = [r["peak_mem_gib"] for r in results]
    if all(m is not None for m in mems):
        axes[1].bar(names, mems, color="tab:orange")
        axes[1].set_ylabel("peak memory (GiB)")
    else:
        axes[1].text(0.5, 0.5, "no CUDA memory on the CPU", ha="center", va="center", transform=axes[1].transAxes)
    for r in results:
        axes[2].plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", label=r["variant"])
    axes[2].axvline(data["setup"]["warmup"] + 0.5, color="gray", linestyle="--", linewidth=1)
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    axes[2].set_xlabel("step (dashed: end of warmup)")
    axes[2].set_ylabel("training loss")
    axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{data['name']}: {data['environment']['device']}, {data['setup']['dtype']}, "
                 f"{data['setup']['batch'] * data['setup']['seq']} tokens/step"
                 + (" (CPU smoke run: not a measurement)" if data["setup"]["tiny"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(data: dict, out: Path, formats) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "json" in formats:
        path = out / f"{data['name']}.json"
        path.write_text(json.dumps(data, indent=1) + "\n")
        written.append(path)
    if "md" in formats:
        path = out / f"{data['name']}.md"
        path.write_text(markdown(data) + "\n")
        written.append(path)
    return written


def _saved_run(data) -> dict:
    if not isinstance(data, dict) or {"name", "environment", "setup", "results"} - set(data):
        raise ValueError("no name, environment, setup, results")
    return data


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.from_json is not None:
        data = args.saved
        print(markdown(data))
        if args.out is not None:
            write(data, args.out, [f for f in args.formats if f != "json"])
            if "png" in args.formats:
                plot(data, args.out / f"{data['name']}.png")
        return 0
    args.out = args.out or Path("benchmarks/results")
    from .harness import environment, missing_gpu

    if (status := missing_gpu(args.tiny, "a training step on a GPU", "--tiny")) is not None:
        return status
    import torch
    import transformers

    device = "cpu" if args.tiny else "cuda"
    dtype = getattr(torch, DTYPES[args.dtype])
    env = environment(device, smoke=args.tiny)
    env.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
               transformers=transformers.__version__)
    name = args.name or ("train-step-smoke-cpu" if args.tiny else f"train-step-{env['gpu'].replace(' ', '-')}")
    config = build_config(args)
    batches, held_out = make_batches(args, config.vocab_size, device)
    setup = dict(tiny=args.tiny, model=args.model, config=MODELS[args.model], params=None, dtype=args.dtype,
                 batch=args.batch, seq=args.seq, warmup=args.warmup, steps=args.steps, batches=args.batches,
                 lr=args.lr, seed=args.seed, attn_implementation=config._attn_implementation, variants=args.variants)
    data = {"name": name, "environment": env, "setup": setup, "results": [], "comparison": []}
    print(f"{name}: {env['device']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}",
          flush=True)
    start = time.monotonic()
    for variant in args.variants:
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            print(f"{variant}: skipped, budget of {args.budget_s:g} s spent", flush=True)
            data["results"].append({"variant": variant, "skipped": f"budget of {args.budget_s:g} s spent"})
            continue
        t0 = time.monotonic()
        r = run_variant(variant, args, config, batches, held_out, device, dtype)
        if variant.endswith("-compile"):
            torch._dynamo.reset()  # its compiled graphs hold the model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # the next variant's peak is its own (reset after its warmup)
        setup["params"] = r["params"]
        data["results"].append(r)
        data["comparison"] = compare([x for x in data["results"] if not x.get("skipped")])
        mem = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        swapped = ""
        if "swap" in r:
            swapped = f" swap: {r['swap']['replaced']} of {r['swap']['norms_in_model']} norms replaced"
            swapped += "" if r["valid"] else f" -> INVALID ({r['invalid_reason']})"
        print(f"{variant:16s} {r['tokens_per_s']:12,.0f} tokens/s  step {r['step_ms_median']:8.1f} ms  peak {mem}  "
              f"first step {_seconds(r['first_step_s'])} s  held-out loss {r['held_out_loss']:.4f}  "
              f"({time.monotonic() - t0:.0f} s){swapped}", flush=True)
        if "swap" in r:
            print(f"  {r['swap']['report']}", flush=True)
        write(data, args.out, [f for f in args.formats if f == "json"])  # save as we go
    written = write(data, args.out, args.formats)
    if "png" in args.formats:
        png = plot(data, args.out / f"{name}.png")
        written += [png] if png else []
    print()
    print(markdown(data))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
