"""Helpers every launcher shares: output allocation, device guard, layout checks.

They sit on the host path of every call, so each is written for its cost as well as its job
(a tensor's ``.device.type`` alone costs ~0.4 µs; ``x.is_cuda`` a quarter of that).
"""

import contextlib
import functools
import os
import threading

import torch

# NORMZOO_POISON=1 (set by the test suite before normzoo is imported) makes every output buffer
# start as NaN, so an element a kernel forgets to write fails a comparison instead of passing on
# leftover memory. Read once: launchers are on the hot path.
POISON = os.environ.get("NORMZOO_POISON") == "1"
# Whether this process's kernels were defined for Triton's CPU interpreter: Triton reads
# TRITON_INTERPRET when a kernel is decorated, so this holds whatever the variable says later.
# Read as Triton's own getenv_bool reads it (3.9: these, in any case).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


def check_interpreter_mode() -> None:
    """Refuses a TRITON_INTERPRET=1 set after triton was imported (by the user's script, or by a
    library such as transformers): triton's own jit functions (tl.sum's) were then compiled-mode
    ones, which the interpreter cannot call, and the first kernel would fail with Triton's "Cannot
    call @triton.jit'd outside of the scope of a kernel"."""
    if INTERPRETED:
        import triton.language as tl

        if type(tl.sum).__name__ == "JITFunction":
            raise RuntimeError(f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} is set, but triton's own "
                               "functions are compiled-mode ones: it was set after triton was imported (Triton "
                               "reads it at import), or this Triton does not read that value as true. Set "
                               "TRITON_INTERPRET=1 in the environment before Python starts "
                               "(TRITON_INTERPRET=1 python script.py)")


check_interpreter_mode()  # on import, before any kernel module defines its kernels
_NO_GUARD = contextlib.nullcontext()
# Triton's CPU interpreter is not thread-safe (it patches triton.language while a kernel runs):
# launches from several threads are serialized there. Compiled GPU launches need no lock.
_INTERPRETER_LOCK = threading.RLock()


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a jit function: a slow call from Python)."""
    return -(-a // b)


def alloc(like: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of ``numel`` elements on ``like``'s device (uninitialised, or NaN under
    NORMZOO_POISON=1). Flat because the kernels address it by offsets, and an int size is the
    cheapest allocation torch offers from Python."""
    if POISON:
        return torch.full((numel,), float("nan"), dtype=dtype, device=like.device)
    return like.new_empty(numel, dtype=dtype)


def _nan_like(p: torch.Tensor) -> torch.Tensor:
    return torch.full_like(p, float("nan"))


# A parameter's gradient buffer, in the parameter's shape, dtype and device (uninitialised, or NaN
# under NORMZOO_POISON=1). The launchers take 1-D contiguous parameters, so the layout is theirs
# too. torch.empty_like itself, not a wrapper around it: ~2k instructions less a gradient than
# alloc's new_empty with a dtype (callgrind, CPU), and a backward allocates up to four of them.
alloc_grad = _nan_like if POISON else torch.empty_like


def alloc_bias_grad(weight: torch.Tensor | None, like: torch.Tensor, numel: int,
                    dtype: torch.dtype | None) -> torch.Tensor | None:
    """A bias's gradient of ``numel`` elements in ``dtype`` (``None``: not asked for): shaped as
    the weight where their dtypes agree (:data:`alloc_grad`, the cheaper allocation)."""
    if dtype is None:
        return None
    return alloc_grad(weight) if weight is not None and weight.dtype is dtype else alloc(like, numel, dtype)


def alloc_rows(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous 2-D output of ``like``'s shape in ``dtype``. Not a view of a flat buffer: an
    autograd.Function's outputs must own their memory (a view could not be modified in place)."""
    if POISON:
        return torch.full(like.shape, float("nan"), dtype=dtype, device=like.device)
    if like.is_contiguous():  # empty_like keeps that layout, at half new_empty(shape)'s cost (~10k instructions)
        return torch.empty_like(like) if like.dtype is dtype else torch.empty_like(like, dtype=dtype)  # (~1.5k less)
    return like.new_empty(like.shape, dtype=dtype)


def residual_grad_buffers(x, dy, dres, dx_dtype, dx2_dtype):
    """``(dx, dx2)`` for a fused residual op's backward, after checking the rows of x, dy and the
    sum's gradient ``dres``: dx in ``dx_dtype`` (default x's), dx2 only with ``dx2_dtype``."""
    check_rows(x, dy) if dres is None else check_rows(x, dy, dres)
    return alloc_rows(x, dx_dtype or x.dtype), alloc_rows(x, dx2_dtype) if dx2_dtype is not None else None


def empty_residual_grads(dx, dx2, dres) -> None:
    """Zero rows or columns: no launch, but dx is still the sum's gradient (and dx2 its copy)."""
    if dres is not None:
        dx.copy_(dres)
    if dx2 is not None:
        dx2.copy_(dx)


def partials_layout(block: int, programs: int, compute: tuple, layers: int = 0) -> tuple[int, int, int, int, int]:
    """``(db_offset, dw1_offset, db1_offset, scalar_offset, size)`` of a backward's fp32 scratch:
    [dw | db | dw1 | db1] (``block`` values each, present per ``compute``: which of the four the
    launch computes), then a (dalpha, dshift) pair per program for each of ``layers``. The kernels
    derive the same offsets from the gradients they are given (tiles.partial_offsets)."""
    offsets, at = [], 0
    for present in compute:
        at += block if present else 0
        offsets.append(at)
    return offsets[0], offsets[1], offsets[2], offsets[3], offsets[3] + 2 * programs * layers


def alloc_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous output of x's shape, dtype and device."""
    if POISON:
        return torch.full_like(x, float("nan"), memory_format=torch.contiguous_format)
    if x.is_contiguous():  # the layout it would keep anyway, and a cheaper call (~0.25 µs)
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@functools.lru_cache(maxsize=1)
def _several_gpus() -> bool:
    return torch.cuda.device_count() > 1


def device_guard(x: torch.Tensor):
    """Launch on ``x``'s own GPU, not the current one (apex#770 returned zeros on cuda:1). Triton
    launches on the current device, so switch only when ``x`` lives elsewhere (never with one GPU).
    Under the interpreter, the lock that serializes launches from several threads."""
    if x.is_cuda and _several_gpus() and x.get_device() != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _INTERPRETER_LOCK if INTERPRETED else _NO_GUARD


def check_rows(x: torch.Tensor, *others: torch.Tensor) -> None:
    """Launchers take 2-D views of one shape whose rows are read with unit stride (any row stride;
    a one-element row, or no row at all, needs none)."""
    if x.dim() == 2 and x.is_contiguous():  # the usual case, tested first
        for t in others:
            if not (t.is_contiguous() and t.shape == x.shape):
                break
        else:
            return
    for t in (x, *others):
        if t.dim() != 2 or t.stride()[1] != 1 and t.shape[1] > 1 and t.shape[0] > 0 or t is not x and t.shape != x.shape:
            raise AssertionError(f"expected 2-D tensors of shape {tuple(x.shape)} with unit column stride, "
                                 f"got shape {tuple(t.shape)}, strides {t.stride()}")


# ----------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------
# The launchers call ``kernel.run(*args, grid=(...), warmup=False, num_warps=...)`` themselves:
# ``kernel[grid](...)`` without the grid lambda, and without a wrapper of ours in between (one
# Python call and one repacking of ~30 arguments, ~1 µs a launch on a 2-core x86 host). Triton's
# own path is kept, its binder specializing every argument: a cached launch that skipped it with
# a specialization key computed in Python was slower (1.30× the forward's host time on an H100,
# 1.25× on CPU through Triton's path with the driver faked: ``benchmarks.host --triton-launch``).
