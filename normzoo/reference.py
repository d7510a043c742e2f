"""The pure-PyTorch specification of every normzoo op.

It is both the CPU fallback (what ``backend="torch"`` and ``backend="auto"`` on CPU run) and the
oracle every Triton kernel is tested against. Each op is a forward that returns what backward needs
and a backward written out by hand (the same formulas as the kernels), so one autograd path serves
both backends. Arithmetic is fp32 for 16/32-bit inputs and fp64 for fp64 inputs, as in the kernels.

Inputs are 2-D ``(rows, N)``: ``normzoo.ops`` flattens leading and normalized dims first.
"""

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math is done in: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rowwise_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool):
    """LayerNorm (``is_rms=False``) or RMSNorm of each row. Returns ``(y, mean, rstd)``.

    ``mean`` is empty for RMSNorm; ``mean``/``rstd`` are in the compute dtype.
    """
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    if is_rms:
        mean = xf.new_empty(0)
        rstd = torch.rsqrt(xf.square().mean(dim=-1) + eps)
        x_hat = xf * rstd[:, None]
    else:
        mean = xf.mean(dim=-1)
        x_centered = xf - mean[:, None]
        rstd = torch.rsqrt(x_centered.square().mean(dim=-1) + eps)
        x_hat = x_centered * rstd[:, None]
    y = x_hat
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), mean, rstd


def rowwise_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, is_rms: bool,
    compute_dw: bool, compute_db: bool,
):
    """Gradients of :func:`rowwise_norm_forward`: ``(dx, dw, db)``, absent ones ``None``."""
    acc = compute_dtype(x.dtype)
    xf, dyf = x.to(acc), dy.to(acc)
    n = x.shape[-1]
    x_hat = (xf if is_rms else xf - mean[:, None]) * rstd[:, None]
    wdy = dyf * weight.to(acc) if weight is not None else dyf
    c1 = (x_hat * wdy).sum(dim=-1, keepdim=True) / max(n, 1)
    if is_rms:
        dx = (wdy - x_hat * c1) * rstd[:, None]
    else:
        c2 = wdy.sum(dim=-1, keepdim=True) / max(n, 1)
        dx = (wdy - x_hat * c1 - c2) * rstd[:, None]
    param_dtype = weight.dtype if weight is not None else x.dtype
    dw = (dyf * x_hat).sum(dim=0).to(param_dtype) if compute_dw else None
    db = dyf.sum(dim=0).to(param_dtype) if compute_db else None
    return dx.to(x.dtype), dw, db
