"""Functional interface, with the signatures of ``torch.nn.functional`` plus a keyword ``backend``.

``backend="auto"`` runs the fused Triton kernels on CUDA tensors and the pure-PyTorch reference
elsewhere; ``"triton"`` and ``"torch"`` force one of them (see :mod:`normzoo.ops`).
"""

from torch import Tensor

from . import ops

__all__ = ["layer_norm", "rms_norm"]


def layer_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Layer normalization over the trailing ``normalized_shape`` dimensions.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Same arguments and result as :func:`torch.nn.functional.layer_norm`. ``weight``/``bias`` may be
    float32 while ``input`` is float16/bfloat16; the output has the input's dtype.
    """
    return ops.rowwise_norm(input, normalized_shape, weight, bias, eps, is_rms=False, backend=backend)


def rms_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Root-mean-square normalization over the trailing ``normalized_shape`` dimensions.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} * \gamma

    Same arguments and result as :func:`torch.nn.functional.rms_norm`; ``eps=None`` means
    ``torch.finfo(torch.float32).eps`` (``float64`` eps for float64 input), as in PyTorch.
    """
    return ops.rowwise_norm(input, normalized_shape, weight, None, eps, is_rms=True, backend=backend)
