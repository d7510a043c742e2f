"""normzoo quickstart: swap the norms of a small transformer for normzoo's fused kernels and check
that nothing changes but the speed.

    python examples/quickstart.py            # CPU: the Triton kernels run in Triton's interpreter
    python examples/quickstart.py --device cuda

On a machine without a GPU the same Triton kernels run in Triton's CPU interpreter (slow, but
the real code); on a GPU the script also times a forward+backward of both models.
"""

import argparse
import copy
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede normzoo's kernel definitions

import normzoo  # noqa: E402


class Block(torch.nn.Module):
    """A pre-norm transformer block: attention and MLP, each behind a norm."""

    def __init__(self, dim: int, heads: int, norm: type):
        super().__init__()
        self.attn_norm = norm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp_norm = norm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.attn_norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab=256, dim=128, depth=2, heads=4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        # Half the blocks use LayerNorm, half RMSNorm, to show both.
        self.blocks = torch.nn.ModuleList(
            Block(dim, heads, torch.nn.LayerNorm if i % 2 == 0 else torch.nn.RMSNorm) for i in range(depth)
        )
        self.final_norm = torch.nn.RMSNorm(dim, eps=1e-6)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def run(model, tokens, targets):
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def max_rel_diff(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


# The README's Accuracy table: rtol by result dtype.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


def error(got, exact, rtol):
    """The README's relative error against a float64 result: ‖got − exact‖ / (‖exact‖ + rtol·√numel)."""
    got, exact = got.double(), exact.double()
    return ((got - exact).norm() / (exact.norm() + rtol * exact.numel() ** 0.5)).item()


def beyond_tolerance(ours, torchs, exact, rtol):
    """The README's rule for every tensor (``name -> tensor`` in each dict): normzoo's error against
    the float64 run within rtol + 2 × PyTorch's own. Returns ``(name, error, allowed)`` for the
    tensors past it, and the largest share of its bound any tensor used."""
    failed, worst = [], 0.0
    for name in exact:
        err, allowed = error(ours[name], exact[name], rtol), rtol + 2 * error(torchs[name], exact[name], rtol)
        worst = max(worst, err / allowed)
        if not err <= allowed:  # (a NaN fails too)
            failed.append((name, err, allowed))
    return failed, worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU found (torch.cuda.is_available() is False); "
                     "leave --device out to run on the CPU")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)

    model = TinyTransformer().to(args.device, dtype)
    fused = copy.deepcopy(model)
    report = normzoo.swap(fused, backend="triton")
    print("swapped:", dict(report))

    tokens = torch.randint(0, 256, (4, 64), device=args.device)
    targets = torch.randint(0, 256, (4, 64), device=args.device)
    logits_ref, grads_ref = run(model, tokens, targets)
    logits, grads = run(fused, tokens, targets)
    print(f"logits: relative difference {max_rel_diff(logits, logits_ref):.2e}")
    worst = max(grads, key=lambda n: max_rel_diff(grads[n], grads_ref[n]))
    print(f"grads:  {len(grads)} parameters, worst relative difference {max_rel_diff(grads[worst], grads_ref[worst]):.2e} ({worst})")
    if dtype is torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        print("note: Triton's CPU interpreter converts fp32 to bf16 by truncation, where a GPU rounds to nearest: "
              "bf16 differences here are larger than on a GPU (the test suite corrects that conversion; README, "
              "Accuracy)")

    # The check: both models against the same one in float64 (the README's Accuracy rule, whose
    # second term allows for the rounding PyTorch's own model does at this precision).
    logits_exact, grads_exact = run(copy.deepcopy(model).double(), tokens, targets)
    rtol = RTOL[dtype]
    failed, share = beyond_tolerance({"logits": logits, **grads}, {"logits": logits_ref, **grads_ref},
                                     {"logits": logits_exact, **grads_exact}, rtol)
    if failed:
        failed.sort(key=lambda f: -f[1] / f[2])  # the worst first; a few say enough
        for name, err, allowed in failed[:5]:
            print(f"FAILED: {name}: error {err:.2e} against float64, allowed {allowed:.2e}", file=sys.stderr)
        print(f"FAILED: {len(failed)} of {1 + len(grads)} outputs and gradients beyond the README's tolerance "
              f"(rtol {rtol:g} for {args.dtype} + 2 × PyTorch's own error)"
              + (f"; the worst {len(failed[:5])} above" if len(failed) > 5 else ""), file=sys.stderr)
        sys.exit(1)
    print(f"check:  logits and {len(grads)} gradients within the README's tolerance against a float64 run "
          f"(rtol {rtol:g} + 2 × PyTorch's own error; the worst used {share:.0%} of it)")

    if args.device.startswith("cuda"):
        import triton.testing

        big = TinyTransformer(dim=4096, depth=2, heads=32).to(args.device, torch.bfloat16)
        big_fused = copy.deepcopy(big)
        normzoo.swap(big_fused)
        tokens = torch.randint(0, 256, (8, 1024), device=args.device)
        for name, m in (("torch", big), ("normzoo", big_fused)):
            ms = triton.testing.do_bench(lambda: m(tokens).float().mean().backward(), return_mode="median")
            print(f"{name:8s} forward+backward of a 2-block dim-4096 model: {ms:.2f} ms")


if __name__ == "__main__":
    main()
