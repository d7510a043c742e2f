"""Replace the norm layers of an existing model with normzoo's, in place, and report what changed."""

from collections import Counter
from collections.abc import Callable

import torch

from .layers import LayerNorm, RMSNorm
from .ops import check_backend


def replace_modules(model: torch.nn.Module, convert: Callable[[str, torch.nn.Module], torch.nn.Module | None]) -> Counter:
    """Walk ``model`` and replace each submodule for which ``convert(name, module)`` returns a new
    module. Returns a Counter of ``"torch.LayerNorm -> normzoo.LayerNorm"``-style keys. A replaced module's children are not
    visited. ``model`` itself is never replaced (it has no parent to hold the new one)."""
    replaced = Counter()

    def visit(parent: torch.nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            new = convert(name, child)
            if new is None:
                visit(child, name)
                continue
            new.train(child.training)
            setattr(parent, child_name, new)
            replaced[f"{_short_name(type(child))} -> {_short_name(type(new))}"] += 1

    visit(model, "")
    return replaced


def _short_name(cls: type) -> str:
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"  # torch.LayerNorm, normzoo.LayerNorm


def _like(old: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """Give ``new`` the parameters of ``old`` (the same tensors: dtype, device, requires_grad and
    any optimizer state that refers to them are kept)."""
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    return new


def swap(model: torch.nn.Module, *, backend: str = "auto") -> Counter:
    """Replace every ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` in ``model`` with normzoo's,
    sharing their parameters. Returns a Counter of what was replaced.

    normzoo's layers subclass PyTorch's, so ``isinstance`` checks and ``state_dict`` keys are kept;
    layers that are already normzoo's are left alone.
    """
    check_backend(backend)

    def convert(name, module):
        if type(module) is torch.nn.LayerNorm:
            new = LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                            bias=module.bias is not None, device="meta", backend=backend)
            return _like(module, new)
        if type(module) is torch.nn.RMSNorm:
            new = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, device="meta", backend=backend)
            return _like(module, new)
        return None

    return replace_modules(model, convert)
