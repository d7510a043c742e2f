"""Triton kernels and their launch code (installed as ``normzoo.kernels``).

Nothing here knows about autograd or ``nn.Module``: launchers take 2-D views whose last dimension
is contiguous, allocate outputs, and return tensors. ``normzoo.ops`` builds the differentiable ops
on top of them.
"""

from .elementwise import pointwise_backward, pointwise_forward
from .rowwise_norm import rowwise_norm_backward, rowwise_norm_forward

__all__ = ["rowwise_norm_forward", "rowwise_norm_backward", "pointwise_forward", "pointwise_backward"]
