"""Functional interface, with the signatures of ``torch.nn.functional`` plus a keyword ``backend``.

``backend="auto"`` runs the fused Triton kernels on CUDA tensors and the pure-PyTorch reference
elsewhere; ``"triton"`` and ``"torch"`` force one of them (see :mod:`normzoo.ops`).
"""

import torch
from torch import Tensor

from . import fused, ops

__all__ = ["layer_norm", "rms_norm", "dyt", "derf", "add_norm", "norm_add", "norm_add_norm"]


def layer_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
    weight_offset: float = 0.0,
) -> Tensor:
    r"""Layer normalization over the trailing ``normalized_shape`` dimensions.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Same arguments and result as :func:`torch.nn.functional.layer_norm`. ``weight``/``bias`` may be
    float32 while ``input`` is float16/bfloat16; the output has the input's dtype. The weight
    applied is ``weight + weight_offset``, added in fp32 (Gemma-style ``1 + w`` with 1.0).
    """
    return ops.rowwise_norm(input, normalized_shape, weight, bias, eps, is_rms=False, backend=backend,
                            weight_offset=weight_offset)


def rms_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str = "auto",
    weight_offset: float = 0.0,
    x_hat_dtype: str | None = None,
) -> Tensor:
    r"""Root-mean-square normalization over the trailing ``normalized_shape`` dimensions.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} * \gamma

    Same arguments and result as :func:`torch.nn.functional.rms_norm`; ``eps=None`` means
    ``torch.finfo(torch.float32).eps`` (``float64`` eps for float64 input), as in PyTorch.
    ``weight_offset`` as for :func:`layer_norm` (Gemma's RMSNorm: 1.0). ``x_hat_dtype`` (``None``,
    ``"input"`` or ``"weight"``): where x_hat is rounded before the weight, to reproduce a model's
    own class (Llama's, T5's); see :class:`normzoo.RMSNorm`.
    """
    return ops.rowwise_norm(input, normalized_shape, weight, None, eps, is_rms=True, backend=backend,
                            weight_offset=weight_offset, x_hat_dtype=x_hat_dtype)


def dyt(
    input: Tensor,
    alpha: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    channels_last: bool = True,
    backend: str = "auto",
) -> Tensor:
    r"""Dynamic Tanh (https://arxiv.org/abs/2503.10622), a point-wise stand-in for a norm layer.

    .. math::
        y = \gamma \odot \tanh(\alpha x) + \beta

    ``alpha`` is a one-element tensor. With ``channels_last=True`` (default) ``weight``/``bias``
    cover the input's trailing dims; with ``channels_last=False`` the input is (B, C, *spatial) and
    they have shape (C,). Finite for every finite input, in every dtype.
    """
    return ops.pointwise(input, alpha, None, weight, bias, activation="tanh", channels_last=channels_last,
                         backend=backend)


def derf(
    input: Tensor,
    alpha: Tensor,
    shift: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    channels_last: bool = True,
    backend: str = "auto",
) -> Tensor:
    r"""Dynamic erf (https://arxiv.org/abs/2512.10938): like :func:`dyt` with erf and a shift.

    .. math::
        y = \gamma \odot \operatorname{erf}(\alpha x + s) + \beta

    ``alpha`` and ``shift`` are one-element tensors; the rest is as in :func:`dyt`.
    """
    return ops.pointwise(input, alpha, shift, weight, bias, activation="erf", channels_last=channels_last,
                         backend=backend)


# ---------------------------------------------------------------- norms fused with a residual add
# ``norm``: a normzoo LayerNorm, RMSNorm, DyT or Derf (channels-last), or torch.nn.LayerNorm /
# RMSNorm; its parameters, eps and backend are used. ``x`` is the residual stream, ``h`` a
# sublayer's output, of one shape (..., *normalized_shape). ``s`` is stored in ``residual_dtype``
# (default: x's and h's promoted dtype, e.g. torch.float32 for an fp32 stream beside bf16
# activations) and ``y`` in h's dtype. See normzoo.fused for the gradients.


def add_norm(x: Tensor, h: Tensor, norm: torch.nn.Module, *, scale: float = 1.0,
             residual_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    r"""The residual add and the next norm in one pass (pre-norm blocks; Post-LN's output is ``y``).

    .. math::
        s = x + h, \qquad y = \mathrm{norm}(s) \cdot \text{scale}

    Returns ``(y, s)``. ``scale`` folds LayerNorm scaling's :math:`1/\sqrt{l}` into the norm's output.
    """
    y, s = fused.fused_residual(x, h, norm, mode="add_norm", scale=scale, residual_dtype=residual_dtype)
    return y, s


def norm_add(x: Tensor, h: Tensor, norm: torch.nn.Module, *, residual_dtype: torch.dtype | None = None) -> Tensor:
    r"""A norm on a sublayer's output and the residual add in one pass (Peri-LN's output norm).

    .. math::
        s = x + \mathrm{norm}(h)

    Returns ``s``.
    """
    return fused.fused_residual(x, h, norm, mode="norm_add", residual_dtype=residual_dtype)[1]


def norm_add_norm(x: Tensor, h: Tensor, norm_out: torch.nn.Module, norm_in: torch.nn.Module, *, scale: float = 1.0,
                  residual_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    r"""Peri-LN between two sublayers in one pass: the first one's output norm, the residual add,
    and the next one's input norm (one read of ``h`` and ``x``, one write of ``y`` and ``s``).

    .. math::
        s = x + \mathrm{norm\_out}(h), \qquad y = \mathrm{norm\_in}(s) \cdot \text{scale}

    Both norms must be of one kind and shape. Returns ``(y, s)``.
    """
    y, s = fused.fused_residual(x, h, norm_out, norm_in, mode="norm_add_norm", scale=scale,
                                residual_dtype=residual_dtype)
    return y, s
