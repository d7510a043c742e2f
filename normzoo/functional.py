"""Functional interface, with the signatures of ``torch.nn.functional`` plus a keyword ``backend``.

``backend="auto"`` runs the fused Triton kernels on CUDA tensors and the pure-PyTorch reference
elsewhere; ``"triton"`` and ``"torch"`` force one of them (see :mod:`normzoo.ops`).
"""

import torch
from torch import Tensor

from . import fused, ops

__all__ = ["layer_norm", "rms_norm", "dyt", "derf", "add_norm", "norm_add", "norm_add_norm", "qk_norm", "scale_norm",
           "crms_norm"]


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
    applied is ``weight + weight_offset``, added in fp32 (Gemma-style ``1 + w`` with 1.0); an offset
    needs a weight.
    """
    # Every argument passed, defaults too (see normzoo.LayerNorm.forward: torch.cond under export).
    return ops.rowwise_norm(input, normalized_shape, weight, bias, eps, is_rms=False, backend=backend,
                            weight_offset=weight_offset, x_hat_dtype=None)


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
                         backend=backend, normalized_shape=None)


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
                         backend=backend, normalized_shape=None)


# ---------------------------------------------------------------- norms fused with a residual add
# ``norm``: a normzoo LayerNorm, RMSNorm, DyT or Derf (channels-last), or torch.nn.LayerNorm /
# RMSNorm; its parameters, eps and backend are used. ``x`` is the residual stream, ``h`` a
# sublayer's output, of one shape (..., *normalized_shape). ``s`` is stored in ``residual_dtype``
# (default: x's and h's promoted dtype, e.g. torch.float32 for an fp32 stream beside bf16
# activations) and ``y`` in h's dtype (an ``x_hat_dtype`` RMSNorm's: the dtype that norm returns
# for s, as the model computes it). See normzoo.fused for the gradients.


def add_norm(x: Tensor, h: Tensor, norm: torch.nn.Module, *, scale: float = 1.0,
             residual_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    r"""The residual add and the next norm in one pass (pre-norm blocks; Post-LN's output is ``y``).

    .. math::
        s = x + h, \qquad y = \mathrm{norm}(s) \cdot \text{scale}

    Returns ``(y, s)``. ``scale`` folds LayerNorm scaling's :math:`1/\sqrt{l}` into the norm's output.
    """
    y, s = fused.fused_residual(x, h, norm, None, mode="add_norm", scale=scale, residual_dtype=residual_dtype)
    return y, s


def norm_add(x: Tensor, h: Tensor, norm: torch.nn.Module, *, residual_dtype: torch.dtype | None = None) -> Tensor:
    r"""A norm on a sublayer's output and the residual add in one pass (Peri-LN's output norm).

    .. math::
        s = x + \mathrm{norm}(h)

    Returns ``s``.
    """
    return fused.fused_residual(x, h, norm, None, mode="norm_add", scale=1.0, residual_dtype=residual_dtype)[1]


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


def qk_norm(q: Tensor, k: Tensor, q_weight: Tensor | None = None, k_weight: Tensor | None = None, eps: float = 1e-6,
            *, norm: str = "rms", backend: str = "auto") -> tuple[Tensor, Tensor]:
    r"""QK-norm: the queries and keys of attention normalized over their last dim, both in one
    launch, read where they lie (views of a fused ``qkv`` projection with any head and row
    strides are not copied, as long as their leading dims fold into two levels).

    - ``norm="rms"`` (Qwen3 per head: ``q`` (..., H, head_dim) with weights (head_dim,); OLMo 2
      over all heads: ``q`` (..., H·head_dim) with weights (H·head_dim,)):
      :math:`q \cdot \gamma_q / \sqrt{\mathrm{mean}(q^2) + \epsilon}`, and likewise for k.
    - ``norm="l2"`` (the QK-norm paper): :math:`g \cdot q / \max(\lVert q\rVert_2, \epsilon)` and
      :math:`k / \max(\lVert k\rVert_2, \epsilon)`, with ``q_weight`` the paper's learnable (1,)
      scale g (or None) and ``k_weight`` None: the attention then takes ``scale=1.0``, as g replaces
      :math:`1/\sqrt{d}`.

    Returns ``(q_normed, k_normed)``, contiguous, in q's and k's dtypes. q and k may differ in
    heads (grouped-query attention) and, over all heads, in width.
    """
    return ops.headwise_norm(q, q_weight, k, k_weight, eps, norm=norm, backend=backend)


def scale_norm(input: Tensor, scale: Tensor, eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    r"""ScaleNorm (Transformers without Tears): :math:`g \cdot x / \max(\lVert x\rVert_2, \epsilon)`
    over the last dim, ``scale`` the (1,) learnable g (initially :math:`\sqrt{C}`)."""
    return ops.headwise_norm(input, scale, None, None, eps, norm="l2", backend=backend)


def crms_norm(input: Tensor, eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    r"""CRMSNorm (Pre-RMSNorm and Pre-CRMSNorm Transformers) over the last dim, of size C−1: the
    input is a zero-mean vector of C values with its last one, :math:`-\sum z`, left out.

    .. math::
        y = \frac{z}{\sqrt{(\sum z^2 + (\sum z)^2)/C + \epsilon}}

    No affine (a Pre-LN model's γ, β fold into the next Linear when it is converted)."""
    return ops.headwise_norm(input, None, None, None, eps, norm="crms", backend=backend)
