"""Helpers every launcher shares: output allocation, device guard, layout checks."""

import contextlib
import os

import torch


def alloc(shape, dtype, device):
    """An output buffer. NORMZOO_POISON=1 (set by the test suite) fills it with NaN first, so an
    element a kernel forgets to write fails a comparison instead of passing on leftover memory."""
    if os.environ.get("NORMZOO_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def device_guard(device: torch.device):
    """Launch on the tensor's own GPU, not the current one (apex#770 returned zeros on cuda:1)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_rows(*tensors: torch.Tensor) -> None:
    """Launchers take 2-D views of one shape whose rows are read with unit stride (any row stride;
    a one-element row needs none)."""
    shape = tensors[0].shape
    for t in tensors:
        assert t.dim() == 2 and t.shape == shape, f"expected 2-D tensors of shape {tuple(shape)}, got {tuple(t.shape)}"
        assert t.shape[1] <= 1 or t.stride(1) == 1, "rows must have unit stride"
