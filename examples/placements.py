"""Norm placements side by side: train a tiny character-level GPT with every placement of
normzoo.ResidualStack (Pre-LN, Post-LN, Peri-LN, Mix-LN, LayerNorm scaling) and every norm
(LayerNorm, RMSNorm, DyT, Derf), and compare the loss curves and how the residual stream's
variance grows with depth.

    python examples/placements.py                    # CPU defaults: 20 small runs, a few minutes
    python examples/placements.py --device cuda --layers 12 --dim 256 --steps 2000
    python examples/placements.py --placements pre peri --norms rmsnorm --steps 500

The corpus is generated here from a small fixed-seed grammar (no downloads), with a few long-range
dependencies (subject-verb agreement across a relative clause, names and counts carried between
sentences) so that attention has something to learn. Every run uses the same seed, so the layers,
embeddings and output head start from the same weights and see the same batches in the same order;
only the placement and the norm differ. Writes placements.json (loss curves, per-layer stream
variance, settings) and, when matplotlib is installed, placements.png to --out. On a CPU that other
jobs are busy on, --threads 1 keeps torch's threads from waiting on each other (several times faster).
"""

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets --backend triton run on the CPU; must precede normzoo

try:
    from einops import rearrange
except ImportError:  # einops is not one of normzoo's own dependencies: main() says so, after --help
    rearrange = None

import normzoo  # noqa: E402
from normzoo.placement import NORMS, PLACEMENTS  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "placements"


# --------------------------------------------------------------------------------------------
# The corpus: sentences from a small grammar, fixed seed.

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
NOUNS = {"cat": "cats", "dog": "dogs", "bird": "birds", "fox": "foxes", "child": "children",
         "mouse": "mice", "farmer": "farmers", "teacher": "teachers"}
VERBS = {"sees": "see", "chases": "chase", "likes": "like", "follows": "follow", "helps": "help",
         "watches": "watch"}  # singular form: plural form
ADJECTIVES = ["small", "red", "quiet", "old", "quick", "lazy", "happy", "tired", "brave"]
PLACES = ["garden", "river", "market", "forest", "kitchen", "village", "library"]
THINGS = ["apples", "books", "stones", "coins", "shells", "cards"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def noun_phrase(rng: random.Random) -> tuple[str, bool]:
    """'the [adjective] noun(s)' and whether it is plural."""
    singular = rng.choice(list(NOUNS))
    plural = rng.random() < 0.5
    noun = NOUNS[singular] if plural else singular
    if rng.random() < 0.5:
        noun = f"{rng.choice(ADJECTIVES)} {noun}"
    return f"the {noun}", plural


def verb(rng: random.Random, plural: bool) -> str:
    singular = rng.choice(list(VERBS))
    return VERBS[singular] if plural else singular


def sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:  # simple clause with agreement
        subject, plural = noun_phrase(rng)
        obj, _ = noun_phrase(rng)
        return f"{subject} {verb(rng, plural)} {obj} near the {rng.choice(PLACES)}."
    if kind == 1:  # the main verb agrees with a subject several words back, across a relative clause
        subject, plural = noun_phrase(rng)
        inner, inner_plural = noun_phrase(rng)
        be = "are" if plural else "is"
        return f"{subject} that {inner} {verb(rng, inner_plural)} {be} {rng.choice(ADJECTIVES)}."
    if kind == 2:  # names and a count carried across three sentences, with a subtraction
        giver, taker = rng.sample(NAMES, 2)
        thing = rng.choice(THINGS)
        have = rng.randrange(2, 10)
        give = rng.randrange(1, have)
        return (f"{giver} has {NUMBER_WORDS[have]} {thing}. {giver} gives {NUMBER_WORDS[give]} to "
                f"{taker}. now {giver} has {NUMBER_WORDS[have - give]} {thing}.")
    # a name repeated after a place: copy from context
    name = rng.choice(NAMES)
    place = rng.choice(PLACES)
    return f"{name} went to the {place}, and in the {place} {name} met {rng.choice(NAMES)}."


def make_corpus(num_chars: int, seed: int) -> str:
    """Paragraphs of generated sentences, at least num_chars characters."""
    rng = random.Random(seed)
    paragraphs, total = [], 0
    while total < num_chars:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randrange(3, 7))) + "\n"
        paragraphs.append(paragraph)
        total += len(paragraph)
    return "".join(paragraphs)


# --------------------------------------------------------------------------------------------
# The model: embeddings, [attention, mlp] layers inside a ResidualStack, output head.

class CausalSelfAttention(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


def mlp(dim: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))


class TinyGPT(torch.nn.Module):
    """A decoder-only language model whose residual stream (norms included) is a ResidualStack."""

    def __init__(self, vocab: int, context: int, dim: int, layers: int, heads: int, *, placement: str,
                 norm: str, backend: str, mix_ratio: float = 0.25):
        super().__init__()
        # PyTorch's default initialization throughout (embeddings N(0, 1)). GPT-2's std 0.02 is tuned
        # for width 768: at width 64 it leaves DyT and Derf, which do not rescale their input, with an
        # embedding so small that they never get past unigram statistics in a few hundred steps.
        # The norms draw no random numbers, so with one seed every placement and norm starts from
        # the same embeddings, sublayers and head.
        self.token_embedding = torch.nn.Embedding(vocab, dim)
        self.position_embedding = torch.nn.Embedding(context, dim)
        blocks = [[CausalSelfAttention(dim, heads), mlp(dim)] for _ in range(layers)]
        # The stack adds each sublayer's output to the stream and applies the final norm itself.
        self.stack = normzoo.ResidualStack(blocks, dim, placement=placement, norm=norm, backend=backend,
                                           mix_ratio=mix_ratio)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, *, return_streams: bool = False):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        out, streams = self.stack(x, return_streams=True)
        logits = self.head(out)
        # streams[0] is the embedding (the stream before layer 0), then one entry per layer
        return (logits, [x] + streams) if return_streams else logits


# --------------------------------------------------------------------------------------------
# Training.

def sample_batch(data: torch.Tensor, batch: int, context: int, generator: torch.Generator):
    """Random windows of context + 1 characters: inputs and next-character targets."""
    starts = torch.randint(0, len(data) - context - 1, (batch,), generator=generator)
    windows = torch.stack([data[s: s + context + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak (Post-LN needs the warmup)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_one(placement: str, norm: str, train_data, eval_tokens, eval_targets, vocab: int, args) -> dict:
    torch.manual_seed(args.seed)
    model = TinyGPT(vocab, args.context, args.dim, args.layers, args.heads, placement=placement, norm=norm,
                    backend=args.backend, mix_ratio=args.mix_ratio).to(args.device)
    # Weight decay on the linear layers' weight matrices only: not on embeddings, biases or norms.
    decayed = {n for n, p in model.named_parameters() if p.ndim == 2 and "embedding" not in n}
    decay = [p for n, p in model.named_parameters() if n in decayed]
    no_decay = [p for n, p in model.named_parameters() if n not in decayed]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)  # same data order for every run
    warmup = max(1, int(args.warmup * args.steps))
    losses, diverged = [], False
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, warmup)
        tokens, targets = sample_batch(train_data, args.batch, args.context, generator)
        tokens, targets = tokens.to(args.device), targets.to(args.device)
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        if not torch.isfinite(loss):
            diverged = True  # keep what was recorded; the table marks the run
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start

    # At the end of training, on held-out text: the loss and the variance of the residual stream
    # after each layer (over all its elements), the growth that Peri-LN and the Curse of Depth track.
    model.eval()
    with torch.no_grad():
        logits, streams = model(eval_tokens, return_streams=True)
        eval_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), eval_targets.flatten()).item()
        stream_variance = [s.float().var().item() for s in streams]
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    return {"placement": placement, "norm": norm, "train_loss": [round(v, 4) for v in losses],
            "diverged": diverged, "final_train_loss": sum(tail) / len(tail), "eval_loss": eval_loss,
            "stream_variance": stream_variance, "seconds": seconds}


# --------------------------------------------------------------------------------------------
# Output.

def smooth(values, weight: float):
    """Exponential moving average, bias-corrected so the curve starts at the first value."""
    out, average = [], 0.0
    for i, v in enumerate(values):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** (i + 1)))
    return out


def plot(runs: list, norms: list, placements: list, path: Path, title: str, smoothing: float) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(PLACEMENTS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(norms), 2, figsize=(11, 3.2 * len(norms)), squeeze=False)
    for row, norm in zip(axes, norms):
        loss_ax, var_ax = row
        for placement in placements:
            run = next(r for r in runs if r["norm"] == norm and r["placement"] == placement)
            label = placement + (" (diverged)" if run["diverged"] else "")
            loss_ax.plot(smooth(run["train_loss"], smoothing), color=colors[placement], label=label, lw=1.3)
            depth = range(len(run["stream_variance"]))
            var_ax.plot(depth, run["stream_variance"], "o-", color=colors[placement], label=label, lw=1.3, ms=3)
        loss_ax.set_title(f"{norm}: training loss (EMA {smoothing})", fontsize=10)
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel("cross-entropy (nats/char)")
        loss_ax.grid(alpha=0.3)
        var_ax.set_title(f"{norm}: residual stream variance after training", fontsize=10)
        var_ax.set_xlabel("layer (0 = embeddings)")
        var_ax.set_ylabel("variance")
        var_ax.set_yscale("log")
        var_ax.grid(alpha=0.3, which="both")
        loss_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                        help="the norms' backend (auto: Triton on CUDA, the reference elsewhere)")
    parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS)
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(NORMS))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--mix-ratio", type=float, default=0.25,
                        help="Mix-LN: the first floor(ratio * layers) layers are Post-LN "
                             "(fewer than 4 layers at 0.25: none)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=float, default=0.1, help="warmup, as a share of the steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    parser.add_argument("--corpus-chars", type=int, default=120_000)
    parser.add_argument("--eval-batch", type=int, default=64, help="held-out windows for the final loss and variance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoothing", type=float, default=0.9, help="EMA weight of the plotted loss curves")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch's default); 1 is faster on a CPU that other jobs are using")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for name in ("dim", "heads", "context", "batch", "eval_batch", "corpus_chars"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.layers < 0:
        parser.error("--layers must be at least 0")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if not 0.0 <= args.mix_ratio <= 1.0:
        parser.error("--mix-ratio must be in [0, 1]")
    if args.dim % args.heads:
        parser.error("--dim must be a multiple of --heads")
    # (`not x > 0` and the like also refuse NaN)
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if not 0.0 <= args.warmup <= 1.0:
        parser.error("--warmup must be in [0, 1] (a share of the steps)")
    if not args.weight_decay >= 0:
        parser.error("--weight-decay must be at least 0")
    if not args.clip > 0:
        parser.error("--clip must be positive")
    if not 0.0 <= args.smoothing < 1.0:  # 1 would divide by zero in smooth()'s bias correction
        parser.error("--smoothing must be in [0, 1)")
    if args.threads < 0:
        parser.error("--threads must be at least 0")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU found (torch.cuda.is_available() is False); "
                     "leave --device out to run on the CPU")
    if rearrange is None:
        raise SystemExit("examples/placements.py needs einops: pip install einops (or pip install -e \".[examples]\")")
    if args.threads:
        torch.set_num_threads(args.threads)

    text = make_corpus(args.corpus_chars, args.seed)
    alphabet = sorted(set(text))
    data = torch.tensor([alphabet.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, held_out = data[:split], data[split:]
    if args.context + 2 > len(held_out):  # sample_batch draws a start in [0, len - context - 1)
        parser.error(f"--context {args.context} leaves no window in the held-out tenth of a {len(data):,}-character "
                     f"corpus: raise --corpus-chars or lower --context")
    eval_tokens, eval_targets = sample_batch(held_out, args.eval_batch, args.context,
                                             torch.Generator().manual_seed(args.seed + 1))
    eval_tokens, eval_targets = eval_tokens.to(args.device), eval_targets.to(args.device)
    print(f"corpus: {len(text):,} characters, {len(alphabet)} symbols; e.g. {text[:90]!r}")
    print(f"model: {args.layers} layers x [attention, mlp], dim {args.dim}, {args.heads} heads, context "
          f"{args.context}; {args.steps} steps of batch {args.batch} on {args.device}")

    runs, total_start = [], time.perf_counter()
    for norm in args.norms:
        for placement in args.placements:
            run = train_one(placement, norm, train_data, eval_tokens, eval_targets, len(alphabet), args)
            runs.append(run)
            print(f"  {norm:9s} {placement:6s} train {run['final_train_loss']:.3f}  held-out {run['eval_loss']:.3f}  "
                  f"last-layer variance {run['stream_variance'][-1]:9.3g}  ({run['seconds']:.1f} s)"
                  + ("  DIVERGED" if run["diverged"] else ""))
    total_seconds = time.perf_counter() - total_start

    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    with open(args.out / "placements.json", "w") as f:
        json.dump({"settings": settings, "torch": torch.__version__, "corpus_chars": len(text),
                   "vocab": len(alphabet), "total_seconds": total_seconds, "runs": runs}, f, indent=1)
    title = (f"tiny char-level GPT: {args.layers} layers, dim {args.dim}, {args.steps} steps of batch {args.batch}, "
             f"seed {args.seed} ({args.device})")
    if plot(runs, args.norms, args.placements, args.out / "placements.png", title, args.smoothing):
        print(f"wrote {args.out / 'placements.json'} and {args.out / 'placements.png'}")
    else:
        print(f"wrote {args.out / 'placements.json'} (no plot: matplotlib is not installed; pip install matplotlib)")

    print(f"\nfinal train loss (mean of the last 10% of steps) and last-layer stream variance, "
          f"{total_seconds:.0f} s in all")
    print(f"{'norm':10s} {'placement':10s} {'train loss':>10s} {'held-out':>9s} {'variance':>10s}")
    for run in runs:
        print(f"{run['norm']:10s} {run['placement']:10s} {run['final_train_loss']:10.3f} {run['eval_loss']:9.3f} "
              f"{run['stream_variance'][-1]:10.3g}" + ("  diverged" if run["diverged"] else ""))


if __name__ == "__main__":
    main()
