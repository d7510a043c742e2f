"""normzoo: normalization layers backed by fused Triton kernels.

    >>> import normzoo
    >>> norm = normzoo.RMSNorm(4096)          # drop-in for torch.nn.RMSNorm
    >>> y = normzoo.functional.layer_norm(x, (4096,), w, b)
"""

import importlib.util as _importlib_util
from pathlib import Path as _Path

# An install (editable or not) provides kernels/ as normzoo.kernels. Imported straight from a
# source checkout (python -m pytest in the repo root, after a non-editable `pip install .`),
# normzoo is this folder and kernels/ is its sibling: let the subpackage be found there.
if _importlib_util.find_spec(f"{__name__}.kernels") is None:
    _checkout = _Path(__file__).resolve().parent.parent
    if (_checkout / "kernels" / "__init__.py").is_file():
        __path__.append(str(_checkout))

from . import functional, ops, reference  # noqa: E402
from .layers import Derf, DyT, LayerNorm, RMSNorm  # noqa: E402
from .swap import swap  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LayerNorm", "RMSNorm", "DyT", "Derf", "swap", "functional", "ops", "reference"]
