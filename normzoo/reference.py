"""The pure-PyTorch specification of every normzoo op.

It is both the CPU fallback (what ``backend="torch"`` and ``backend="auto"`` on CPU run) and the
oracle every Triton kernel is tested against. Each op is a forward that returns what backward needs
and a backward written out by hand (the same formulas as the kernels), so one autograd path serves
both backends. Arithmetic is fp32 for 16/32-bit inputs and fp64 for fp64 inputs, as in the kernels.

Inputs are 2-D ``(rows, N)``: ``normzoo.ops`` flattens leading and normalized dims first.
"""

import math

import torch
from torch import Tensor


def rstd_of(mean_square: Tensor) -> Tensor:
    """1/√(mean square + eps), NaN where the mean square overflowed (a row too large to normalize:
    rsqrt(inf) = 0 would turn it into the bias, finite and wrong), as the kernels do."""
    rstd = torch.rsqrt(mean_square)
    return torch.where(rstd == 0, torch.nan, rstd)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math is done in: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rounded(x_hat: Tensor, x: Tensor, weight: Tensor | None, round_x_hat: int,
             input_dtype: torch.dtype | None = None) -> Tensor:
    """x_hat rounded to x's (1; ``input_dtype`` where given) or the weight's (2; none without a
    weight) dtype and back, as some models store it before the weight multiplies it (Llama's
    ``weight * x_hat.to(input_dtype)``); 0: as it is."""
    if round_x_hat == 0 or (round_x_hat == 2 and weight is None):
        return x_hat
    return x_hat.to((input_dtype or x.dtype) if round_x_hat == 1 else weight.dtype).to(x_hat.dtype)


def rowwise_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool,
                         weight_offset: float = 0.0, round_x_hat: int = 0, out_dtype: torch.dtype | None = None):
    """LayerNorm (``is_rms=False``) or RMSNorm of each row. Returns ``(y, mean, rstd)``.

    ``mean`` is None for RMSNorm; ``mean``/``rstd`` are in the compute dtype. The weight applied is
    ``weight + weight_offset`` (Gemma's ``1 + w``), in the compute dtype, to x_hat rounded as
    ``round_x_hat`` says (:func:`_rounded`); y is rounded once, to ``out_dtype`` (default x's).
    """
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    if is_rms:
        mean = None
        rstd = rstd_of(xf.square().mean(dim=-1) + eps)
        x_hat = xf * rstd[:, None]
    else:
        mean = xf.mean(dim=-1)
        x_centered = xf - mean[:, None]
        rstd = rstd_of(x_centered.square().mean(dim=-1) + eps)
        x_hat = x_centered * rstd[:, None]
    y = _rounded(x_hat, x, weight, round_x_hat)
    if weight is not None:
        y = y * (weight.to(acc) + weight_offset)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(out_dtype or x.dtype), mean, rstd


def rowwise_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, is_rms: bool,
    compute_dw: bool, db_dtype: torch.dtype | None, weight_offset: float = 0.0, round_x_hat: int = 0,
    input_dtype: torch.dtype | None = None,
):
    """Gradients of :func:`rowwise_norm_forward`: ``(dx, dw, db)``, absent ones ``None``.
    ``db_dtype`` is the bias's dtype, ``None`` for no bias gradient. The rounding of x_hat counts
    as the identity (as autograd's cast does); dw sums over x_hat as rounded (to ``input_dtype``
    for ``round_x_hat`` 1, where x was widened from it: a fused op's fp32 copy of its sum)."""
    acc = compute_dtype(x.dtype)
    xf, dyf = x.to(acc), dy.to(acc)
    n = x.shape[-1]
    x_hat = (xf if is_rms else xf - mean[:, None]) * rstd[:, None]
    wdy = dyf * (weight.to(acc) + weight_offset) if weight is not None else dyf
    c1 = (x_hat * wdy).sum(dim=-1, keepdim=True) / max(n, 1)
    if is_rms:
        dx = (wdy - x_hat * c1) * rstd[:, None]
    else:
        c2 = wdy.sum(dim=-1, keepdim=True) / max(n, 1)
        dx = (wdy - x_hat * c1 - c2) * rstd[:, None]
    dw = ((dyf * _rounded(x_hat, x, weight, round_x_hat, input_dtype)).sum(dim=0).to(weight.dtype) if compute_dw
          else None)
    db = dyf.sum(dim=0).to(db_dtype) if db_dtype is not None else None
    return dx.to(x.dtype), dw, db


def _per_channel(p: Tensor, rows: int, channels: int, params_per_row: bool, acc: torch.dtype) -> Tensor:
    """A (channels,) parameter broadcast against a 2-D (rows, cols) view."""
    p = p.to(acc)
    return p.repeat(rows // max(channels, 1))[:, None] if params_per_row else p[None, :]


def _fold_per_channel(t: Tensor, channels: int, params_per_row: bool) -> Tensor:
    """Sum a 2-D (rows, cols) tensor down to one value per channel."""
    if not params_per_row:
        return t.sum(dim=0)
    return t.sum(dim=1).view(-1, channels).sum(dim=0) if channels else t.new_zeros(0)


def _activation(u: Tensor, activation: str, differentiable: bool = False) -> Tensor:
    """act(u). ``differentiable`` (the composite path, which torch.func, forward-mode AD and double
    backward differentiate): tanh as torch ops whose own derivative keeps its relative accuracy deep
    in saturation, as :func:`_derivative` does. Past |u| = 0.55 (the kernels' split), with
    e = exp(−2|u|), tanh = ±(1 − e)/(1 + e): autograd differentiates that into 4e/(1 + e)², where
    torch.tanh's own derivative, 1 − t·t, is 0 from |u| ≈ 9 in fp32. Otherwise torch.tanh (one op)."""
    if activation == "erf":
        return torch.erf(u)
    if not differentiable:
        return torch.tanh(u)
    a = u.abs()
    e = torch.exp(-2 * a)
    return torch.where(a < 0.55, torch.tanh(u), torch.copysign((1 - e) / (1 + e), u))


def _derivative(u: Tensor, activation: str) -> Tensor:
    """act'(u): tanh's as (1/cosh u)², a few eps of the exact value at every u (1 − tanh² cancels
    as tanh → ±1, and is 0 from |u| ≈ 9 in fp32); 1/cosh, not 1/cosh², so that it fades through
    the subnormals instead of overflowing to 0 past |u| ≈ 44."""
    if activation == "erf":
        return (2 / math.sqrt(math.pi)) * torch.exp(-u * u)
    return torch.cosh(u).reciprocal().square()


def pointwise_forward(x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                      activation: str, channels: int, params_per_row: bool, differentiable: bool = False) -> Tensor:
    """DyT (``activation="tanh"``) or Derf (``"erf"``): ``weight ⊙ act(alpha·x + shift) + bias``.

    ``x`` is 2-D; per-channel parameters run along its columns, or one per row (row r is channel
    r mod ``channels``) when ``params_per_row``. ``differentiable``: see :func:`_activation`.
    """
    acc = compute_dtype(x.dtype)
    u = x.to(acc) * alpha.to(acc)
    if shift is not None:
        u = u + shift.to(acc)
    y = _activation(u, activation, differentiable)
    if weight is not None:
        y = y * _per_channel(weight, x.shape[0], channels, params_per_row, acc)
    if bias is not None:
        y = y + _per_channel(bias, x.shape[0], channels, params_per_row, acc)
    return y.to(x.dtype)


def pointwise_backward(dy: Tensor, x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None,
                       activation: str, channels: int, params_per_row: bool, compute_dw: bool,
                       db_dtype: torch.dtype | None):
    """Gradients of :func:`pointwise_forward`: ``(dx, dalpha, dshift, dw, db)``, absent ones ``None``."""
    acc = compute_dtype(x.dtype)
    xf, dyf = x.to(acc), dy.to(acc)
    u = xf * alpha.to(acc)
    if shift is not None:
        u = u + shift.to(acc)
    act = _activation(u, activation) if compute_dw else None
    g = dyf * _derivative(u, activation)
    if weight is not None:
        g = g * _per_channel(weight, x.shape[0], channels, params_per_row, acc)
    dx = (g * alpha.to(acc)).to(x.dtype)
    dalpha = (g * xf).sum().reshape(1).to(alpha.dtype)
    dshift = g.sum().reshape(1).to(shift.dtype) if shift is not None else None
    dw = _fold_per_channel(dyf * act, channels, params_per_row).to(weight.dtype) if compute_dw else None
    db = _fold_per_channel(dyf, channels, params_per_row).to(db_dtype) if db_dtype is not None else None
    return dx, dalpha, dshift, dw, db


def _headwise_stats(xf: Tensor, eps: float, norm: str):
    """(rstd, row sum or None, where L2's eps floor did not hold or None) of ``xf``'s rows (last dim)."""
    n = xf.shape[-1]
    sumsq = xf.square().sum(dim=-1)
    if norm == "rms":
        return rstd_of(sumsq / max(n, 1) + eps), None, None
    if norm == "l2":
        # eps² in the compute dtype, as the kernel; new_full, not torch.tensor: traced, that is a
        # lifted constant, which ExportedProgram.run_decompositions refuses (ops.decompositions).
        floor = xf.new_full((), eps).square()
        return rstd_of(torch.maximum(sumsq, floor)), None, sumsq > floor
    total = xf.sum(dim=-1)
    return rstd_of((sumsq + total * total) / (n + 1) + eps), total, None


def headwise_norm_forward(x: Tensor, weight: Tensor | None, eps: float, norm: str) -> Tensor:
    """Each row (last dim) of ``x`` normalized as ``norm`` says (``normzoo.kernels.headwise_norm``):
    ``"rms"``: x / √(mean x² + eps); ``"l2"``: x / max(‖x‖₂, eps) (ScaleNorm, QK-norm's L2 form);
    ``"crms"``: x / √((Σx² + (Σx)²)/(N+1) + eps) (CRMSNorm). ``weight``: None, per column, or one
    element that scales every column."""
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    rstd, _, _ = _headwise_stats(xf, eps, norm)
    y = xf * rstd[..., None]
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(x.dtype)


def headwise_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, eps: float, norm: str, compute_dw: bool):
    """Gradients of :func:`headwise_norm_forward`: ``(dx, dw)``; dw summed over every column too
    for a one-element weight, ``None`` unless asked."""
    acc = compute_dtype(x.dtype)
    xf, dyf = x.to(acc), dy.to(acc)
    n = x.shape[-1]
    rstd, total, live = _headwise_stats(xf, eps, norm)
    x_hat = xf * rstd[:, None]
    wdy = dyf * weight.to(acc) if weight is not None else dyf
    c = (x_hat * wdy).sum(dim=-1, keepdim=True)
    if norm == "rms":
        dx = (wdy - x_hat * c / max(n, 1)) * rstd[:, None]
    elif norm == "l2":
        dx = (wdy - x_hat * torch.where(live[:, None], c, 0.0)) * rstd[:, None]
    else:
        dx = (wdy - (x_hat + (rstd * total)[:, None]) * c / (n + 1)) * rstd[:, None]
    dw = None
    if compute_dw:
        dw = (dyf * x_hat).sum(dim=0)
        dw = (dw.sum().reshape(1) if weight.numel() == 1 else dw).to(weight.dtype)
    return dx.to(x.dtype), dw
