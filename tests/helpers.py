"""The tolerance table every test uses (mirrored in the README's "Accuracy" section, which
tests/test_docs.py keeps in sync) and the comparison built on it.

The rule (flash-attention's): a result's error against a float64 reference must be at most
RTOL[dtype] plus twice the error of PyTorch's own implementation at the same precision (``peer``),
where a peer exists. The second term covers ill-conditioned cases (a one-element RMSNorm, a
row with mean 1e4) where no fp32 algorithm does better than the conditioning allows; on
well-conditioned inputs it is small and the table decides. A peer's error on such input depends
on how its own roundings happen to fall, though, so where the conditioning is known a test adds
it as a bound of its own (``cond``: LayerNorm's fp32 row mean, estimated by :func:`layernorm_cond`).
"""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

# Relative error ‖got − ref‖ / (‖ref‖ + RTOL·√numel) allowed against a float64 reference, by the
# dtype of the tensor being checked (outputs and gradients alike). The √numel floor judges
# near-zero references absolutely.
RTOL = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def rel_error(got: torch.Tensor, ref: torch.Tensor, rtol: float, scale: float = 0.0) -> float:
    got, ref = got.double(), ref.double()
    floor = rtol * math.sqrt(max(ref.numel(), 1))
    return ((got - ref).norm() / (max(ref.norm().item(), scale) + floor)).item()


def layernorm_cond(x: torch.Tensor, rstd: torch.Tensor) -> float:
    """The size of the error LayerNorm's fp32 row mean brings to x_hat = (x − mean)·rstd, relative
    to x_hat's unit size: an estimate, not a worst-case bound. The mean of a row of n values is a
    tree of about log2(n) fp32 additions, each rounding by up to u·Σ|x| (u = 2^-24), then a
    division: about (1 + log2 n)·u·mean|x| off, which x_hat scales by rstd. Negligible for rows
    whose mean is of their spread's size; ~6e-4 per level at mean 1e4, std 1, where a one-pass
    E[x²] − E[x]² loses every digit of the variance (errors of order 1). The rows' root mean
    square, so that one ill-conditioned row does not loosen the check of all the others; 0 for
    one-value rows (their mean is exact). PyTorch's LayerNorm holds its mean in fp32 alike."""
    n = x.shape[-1]
    if n <= 1 or x.numel() == 0:
        return 0.0
    kappa = x.double().abs().mean(-1) * rstd.double()
    return (1 + math.log2(n)) * 2.0**-24 * kappa.square().mean().sqrt().item()


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str = "", dtype: torch.dtype | None = None,
                 peer: torch.Tensor | None = None, scale: float = 0.0, cond: float = 0.0):
    """``scale``: for a sum whose terms cancel, judge it against Σ|terms| (the size its rounding
    errors scale with) rather than against the small result. ``cond``: an error the input's
    conditioning allows any fp32 algorithm (:func:`layernorm_cond`), added to the bound."""
    dtype = dtype or got.dtype
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert not got.isnan().any() or ref.isnan().any(), f"{what}: NaN where the reference has none"
    rtol = RTOL[dtype]
    allowed = (rtol if peer is None else rtol + 2 * rel_error(peer, ref, rtol, scale)) + cond
    err = rel_error(got, ref, rtol, scale)
    assert err <= allowed, f"{what}: relative error {err:.3g} > {allowed:.3g} ({dtype}, table {rtol:g})"


def assert_compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor, compiler: str) -> None:
    """torch.compile(fullgraph=True) gives the eager output and the same gradients for x and every
    parameter (a graph break would raise under fullgraph)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = x.detach().requires_grad_()
    y = compiled(x)
    y.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    y_eager = model(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, p in zip(grads, [x] + list(model.parameters())):
        torch.testing.assert_close(g, p.grad)


def on_reference(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A copy of ``module`` (a norm, or a model holding norms) whose norms run on the pure-PyTorch
    path (``backend="torch"``), in ``dtype`` if given: the float64 oracle, or the peer."""
    copied = copy.deepcopy(module) if dtype is None else copy.deepcopy(module).to(dtype)
    for m in copied.modules():
        if hasattr(m, "backend"):
            m.backend = "torch"
    return copied


def term_sizes(kind: str, m64: torch.nn.Module, v64: torch.Tensor, g: torch.Tensor):
    """For norm ``m64`` (float64) at rows ``v64`` and an incoming gradient of size ``g`` (|·|,
    elementwise): the size of the terms of its input gradient (elementwise) and of each parameter
    gradient (by name), the scale their rounding errors grow with."""
    weight = m64.weight.detach() if getattr(m64, "weight", None) is not None else torch.ones_like(v64[0])
    if kind in ("layernorm", "rmsnorm"):
        weight = weight + getattr(m64, "weight_offset", 0.0)
        centred = v64 if kind == "rmsnorm" else v64 - v64.mean(-1, keepdim=True)
        eps = m64.eps if m64.eps is not None else torch.finfo(v64.dtype).eps  # RMSNorm's default
        r = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
        x_hat = centred * r
        return g * weight.abs() * r, {"weight": (g * x_hat.abs()).sum(0).norm().item(), "bias": g.sum(0).norm().item()}
    shift = m64.shift.detach() if kind == "derf" else 0.0
    u = (m64.alpha.detach() * v64 + shift).detach()
    if kind == "dyt":
        act, slope = torch.tanh(u), 1 - torch.tanh(u) ** 2
    else:
        act, slope = torch.erf(u), 2 / math.sqrt(math.pi) * torch.exp(-u * u)
    through = g * weight.abs() * slope
    return through * m64.alpha.detach().abs(), {
        "weight": (g * act.abs()).sum(0).norm().item(), "bias": g.sum(0).norm().item(),
        "alpha": (through * v64.abs()).sum().item(), "shift": through.sum().item()}


def model_x_hat(v: torch.Tensor, eps: float, x_hat_dtype: str, w_dtype: torch.dtype) -> torch.Tensor:
    """x̂ of Hugging Face's Llama (``"input"``) or T5 (``"weight"``) RMSNorm class, as its own code
    rounds it before the weight multiplies it (in that dtype)."""
    v32 = v.float()
    x_hat = v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + eps)
    if x_hat_dtype == "input":
        return x_hat.to(v.dtype)
    return x_hat.to(w_dtype) if w_dtype in (torch.float16, torch.bfloat16) else x_hat


def model_rms_norm(v: torch.Tensor, w: torch.Tensor, eps: float, x_hat_dtype: str) -> torch.Tensor:
    """What those classes return: ``w * x̂`` in torch's promoted dtype."""
    return w * model_x_hat(v, eps, x_hat_dtype, w.dtype)


def capped(launch_config, max_block_n: int):
    """``launch_config`` with its column tile capped at ``max_block_n`` (small rows then take the
    looped path), whatever else the launcher passes after the cap (the backward's ``affine``).
    ``.configs`` records ``(pass, config)`` of every call, so a test can show the path it forced."""

    def capped_config(op, pass_, n_cols, dtype, device, _max_block_n=None, *rest):
        cfg = launch_config(op, pass_, n_cols, dtype, device, max_block_n, *rest)
        capped_config.configs.append((pass_, cfg))
        return cfg

    capped_config.configs = []
    return capped_config


def run_python(*args: str, timeout: float = 120) -> str:
    """stdout of ``python *args`` run from the repository root in a process of its own, without
    TRITON_INTERPRET (set there or not by the script itself: Triton reads it at import); fails the
    test when the process fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=Path(__file__).resolve().parent.parent).stdout
