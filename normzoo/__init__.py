"""normzoo: normalization layers backed by fused Triton kernels.

    >>> import normzoo
    >>> norm = normzoo.RMSNorm(4096)          # drop-in for torch.nn.RMSNorm
    >>> y = normzoo.functional.layer_norm(x, (4096,), w, b)
"""

from . import functional, ops, reference
from .layers import LayerNorm, RMSNorm
from .swap import swap

__version__ = "0.1.0"
__all__ = ["LayerNorm", "RMSNorm", "swap", "functional", "ops", "reference"]
