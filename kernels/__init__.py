"""Triton kernels and their launch code (installed as ``normzoo.kernels``).

Nothing here knows about autograd or ``nn.Module``: launchers take 2-D views whose last dimension
is contiguous (the head-wise ones, any view whose rows fold into two levels), allocate outputs, and
return tensors. ``normzoo.ops`` builds the differentiable ops
on top of them.
"""

from . import headwise_norm
from .elementwise import (pointwise_backward, pointwise_forward, pointwise_peri_backward, pointwise_residual_backward,
                          pointwise_residual_forward)
from .headwise_norm import headwise_norm_backward, headwise_norm_forward
from .rowwise_norm import (rowwise_norm_backward, rowwise_norm_forward, rowwise_peri_backward,
                           rowwise_residual_backward, rowwise_residual_forward)

__all__ = ["rowwise_norm_forward", "rowwise_norm_backward", "rowwise_residual_forward", "rowwise_residual_backward",
           "rowwise_peri_backward",
           "pointwise_forward", "pointwise_backward", "pointwise_residual_forward", "pointwise_residual_backward",
           "pointwise_peri_backward",
           "headwise_norm_forward", "headwise_norm_backward"]
