"""Helpers every launcher shares: output allocation, device guard, layout checks."""

import contextlib
import os

import torch

# NORMZOO_POISON=1 (set by the test suite before normzoo is imported) makes every output buffer
# start as NaN, so an element a kernel forgets to write fails a comparison instead of passing on
# leftover memory. Read once: launchers are on the hot path.
POISON = os.environ.get("NORMZOO_POISON") == "1"
_NO_GUARD = contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a jit function: a slow call from Python)."""
    return -(-a // b)


def alloc(shape, dtype, device):
    """An output buffer (uninitialised, or NaN under NORMZOO_POISON=1)."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def alloc_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous output of x's shape, dtype and device (cheaper on the host than ``alloc``)."""
    if POISON:
        return torch.full_like(x, float("nan"), memory_format=torch.contiguous_format)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def device_guard(device: torch.device):
    """Launch on the tensor's own GPU, not the current one (apex#770 returned zeros on cuda:1).
    Triton launches on the current device, so switch only when the tensor lives elsewhere."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_GUARD


def check_rows(x: torch.Tensor, *others: torch.Tensor) -> None:
    """Launchers take 2-D views of one shape whose rows are read with unit stride (any row stride;
    a one-element row, or no row at all, needs none)."""
    for t in (x, *others):
        if t.dim() != 2 or t.stride()[1] != 1 and t.shape[1] > 1 and t.shape[0] > 0 or t is not x and t.shape != x.shape:
            raise AssertionError(f"expected 2-D tensors of shape {tuple(x.shape)} with unit column stride, "
                                 f"got shape {tuple(t.shape)}, strides {t.stride()}")
