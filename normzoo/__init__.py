"""normzoo: normalization layers backed by fused Triton kernels.

    >>> import normzoo
    >>> norm = normzoo.RMSNorm(4096)          # drop-in for torch.nn.RMSNorm
    >>> y = normzoo.functional.layer_norm(x, (4096,), w, b)
"""

from pathlib import Path as _Path

# An install puts kernels/ inside this package as normzoo.kernels. Imported from a source
# checkout instead (python -m pytest in the repo root, with no install, a non-editable one, or an
# editable one of another checkout), normzoo is this folder and kernels/ is its sibling: search
# the checkout first, so the kernels always come from the same tree as the rest of normzoo.
_here = _Path(__file__).resolve().parent
if not (_here / "kernels").is_dir() and (_here.parent / "kernels" / "__init__.py").is_file():
    __path__.append(str(_here.parent))

from . import convert, functional, fused, ops, reference  # noqa: E402
from .layers import CRMSNorm, Derf, DyT, LayerNorm, LayerNorm2d, QKNorm, RMSNorm, ScaleNorm  # noqa: E402
from .placement import ResidualStack  # noqa: E402
from .swap import swap, unswap  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LayerNorm", "LayerNorm2d", "RMSNorm", "DyT", "Derf", "ScaleNorm", "QKNorm", "CRMSNorm", "ResidualStack", "swap", "unswap", "convert", "functional", "fused", "ops", "reference"]
