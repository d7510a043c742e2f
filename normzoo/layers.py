"""``nn.Module`` layers. Each subclasses its PyTorch counterpart, so parameters, ``state_dict``
keys, ``reset_parameters`` and ``isinstance`` checks are PyTorch's own; only ``forward`` changes.
"""

import torch
from torch import Tensor

from . import functional as F
from .ops import check_backend

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(torch.nn.LayerNorm):
    r"""Layer Normalization (https://arxiv.org/abs/1607.06450) with fused Triton kernels on CUDA.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    A drop-in replacement for :class:`torch.nn.LayerNorm`: the same arguments, defaults,
    parameters and ``state_dict`` keys, so a checkpoint loads into either class.

    Args:
        normalized_shape (int or list or torch.Size): trailing shape to normalize over.
        eps (float): added to the variance for numerical stability. Default: 1e-5
        elementwise_affine (bool): learnable per-element ``weight`` (ones) and ``bias`` (zeros).
            Default: ``True``
        bias (bool): with ``elementwise_affine``, whether to learn a bias. Default: ``True``
        backend (str): ``"auto"`` (Triton on CUDA, reference elsewhere), ``"triton"`` or
            ``"torch"``. Keyword only. Default: ``"auto"``

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`
        - Output: same shape and dtype as the input

    Examples::

        >>> ln = normzoo.LayerNorm(768)
        >>> y = ln(torch.randn(4, 16, 768))
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.backend = check_backend(backend)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class RMSNorm(torch.nn.RMSNorm):
    r"""Root Mean Square Layer Normalization (https://arxiv.org/abs/1910.07467) with fused Triton
    kernels on CUDA.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} * \gamma

    A drop-in replacement for :class:`torch.nn.RMSNorm`: the same arguments, defaults,
    parameters and ``state_dict`` keys.

    Args:
        normalized_shape (int or list or torch.Size): trailing shape to normalize over.
        eps (float, optional): added to the mean square. Default: ``None``, which means
            ``torch.finfo(torch.float32).eps`` (float64's for float64 input), as in PyTorch.
        elementwise_affine (bool): learnable per-element ``weight`` (ones). Default: ``True``
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"``, as for :class:`LayerNorm`.

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`
        - Output: same shape and dtype as the input

    Examples::

        >>> norm = normzoo.RMSNorm(4096, eps=1e-6)
        >>> y = norm(torch.randn(2, 8, 4096))
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.backend = check_backend(backend)

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
