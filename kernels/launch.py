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
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
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


def alloc_rows(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous 2-D output of ``like``'s shape in ``dtype``. Not a view of a flat buffer: an
    autograd.Function's outputs must own their memory (a view could not be modified in place)."""
    if POISON:
        return torch.full(like.shape, float("nan"), dtype=dtype, device=like.device)
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


def launch(kernel, programs, *args, num_warps: int):
    """A launch of ``programs`` programs (an int, or a (x, y) grid): ``kernel[grid](*args, num_warps=...)``
    without the grid lambda, through Triton's own path (its binder specializes every argument,
    then it looks the compiled kernel up), or through :class:`_CachedLaunch` when that is on.
    Returns what Triton's run returns (the compiled kernel, on a GPU)."""
    if _cached is not None:
        return _cached(kernel, programs, *args, num_warps=num_warps)
    return kernel.run(*args, grid=programs if type(programs) is tuple else (programs,), warmup=False,
                      num_warps=num_warps)


def specialization_key(constexpr_positions: frozenset, args: tuple) -> tuple:
    """What Triton's binder specializes a launch on, from the arguments themselves: constexprs by
    value, tensors by dtype and 16-byte alignment, ints by (== 1, divisible by 16, int32 range,
    int64 range), None as such, floats as fp32. Two launches with the same key compile to the same
    kernel (tests/test_launches.py checks this against Triton's own binder)."""
    key = []
    for i, a in enumerate(args):
        if i in constexpr_positions or a is None or type(a) is bool:
            key.append(a)
        elif type(a) is int:
            key.append((a == 1, a % 16 == 0, -(1 << 31) <= a < (1 << 31), a < (1 << 63)))
        elif type(a) is float:
            key.append(float)
        else:
            key.append((a.dtype, a.data_ptr() % 16 == 0))
    return tuple(key)


class _CachedLaunch:
    """An opt-in launch that skips Triton's binder (about 10 µs a launch on a 2-core x86 host,
    binding ~20 runtime arguments) once a specialization has been compiled: the first launch of
    each :func:`specialization_key` goes through Triton and keeps its compiled kernel; later ones
    call that kernel's launcher directly, as Triton's own run does after its lookup. Set
    ``NORMZOO_CACHED_LAUNCH=1`` (GPU only; under the interpreter there is nothing compiled).
    Experimental until timed on a GPU: Triton's launch hooks (profilers) take the plain path, but
    what Triton's run also checks per launch is skipped (its pre-run hooks, globals changed since
    the compile, debug or instrumentation knobs changed after it): set those before the first
    launch, or leave this off."""

    def __init__(self):
        from triton import knobs
        from triton.runtime.driver import driver

        self._knobs = knobs.runtime
        self._driver = driver
        self._constexprs = {}  # kernel -> positions of its constexpr parameters
        self._compiled = {}  # (kernel, num_warps, device, specialization key) -> compiled kernel

    def __call__(self, kernel, programs, *args, num_warps: int):
        positions = self._constexprs.get(kernel)
        if positions is None:
            positions = self._constexprs[kernel] = frozenset(i for i, p in enumerate(kernel.params) if p.is_constexpr)
        device = torch.cuda.current_device()
        key = (kernel, num_warps, device, specialization_key(positions, args))
        compiled = self._compiled.get(key)
        if compiled is None or self._knobs.launch_enter_hook is not None or self._knobs.launch_exit_hook is not None:
            compiled = kernel.run(*args, grid=programs if type(programs) is tuple else (programs,), warmup=False,
                                  num_warps=num_warps)
            if compiled is not None and hasattr(compiled, "packed_metadata"):
                self._compiled[key] = compiled
            return compiled
        stream = self._driver.active.get_current_stream(device)
        grid_x, grid_y = programs if type(programs) is tuple else (programs, 1)
        compiled.run(grid_x, grid_y, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args)
        return compiled


def set_cached_launch(enabled: bool) -> None:
    """Switch the launchers between Triton's own launch path and :class:`_CachedLaunch` (the
    default comes from ``NORMZOO_CACHED_LAUNCH=1``). No effect under the interpreter."""
    global _cached
    _cached = _CachedLaunch() if enabled and not INTERPRETED else None


_cached = None
set_cached_launch(os.environ.get("NORMZOO_CACHED_LAUNCH") == "1")
