"""Differentiable ops: the one place that validates input, flattens it to rows, and chooses
Triton or the reference.

Each op has one forward and one backward implementation (Triton kernels or the reference, as the
caller chose) and five ways in (:func:`_route`). A plain eager call goes through a ``torch.autograd.Function``
(a few µs of host time), or straight to the forward when no gradient is needed. Everything else
(``torch.compile``, ``torch.export``, ``torch.jit.trace``, fake or meta tensors) goes through a
pair of ``torch.library`` custom ops (forward and backward, tied together with
``register_autograd``, with fake implementations), which the compiler sees as one opaque,
differentiable op and ``opcheck`` can check. Forward-mode AD and torch.func transforms (compiled or
not) run the reference math as torch ops, which they know how to differentiate and batch; so does
``torch.onnx.export``'s trace (the forward only), since ONNX has no normzoo ops.

Backends:
    ``"auto"``   Triton for CUDA tensors, the reference elsewhere.
    ``"triton"`` always the kernels (CPU tensors too, under ``TRITON_INTERPRET=1``).
    ``"torch"``  always the reference.
float64 inputs always take the reference: the kernels are for 16- and 32-bit floats.
"""

import math
import numbers
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from . import reference

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FP32, _FP64 = torch.float32, torch.float64
_ONE = (1,)
_Parameter = torch.nn.Parameter


# ----------------------------------------------------------------------------------------------
# Input checks and backend choice
# ----------------------------------------------------------------------------------------------


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


_kernels = None


def _launchers():
    """normzoo.kernels, imported on first use (it imports Triton), then held."""
    global _kernels
    if _is_compiling():  # (torch.compiler.is_compiling, looked up once: below)
        # Traced code (torch.compile, a strict torch.export) neither stores the global (dynamo
        # would record the store as a side effect and warn about it) nor reads it: dynamo guards on
        # what it read, and a None read there fails its guard, and recompiles the graph, once the
        # next eager call (the compiled graph's own kernels) holds the module.
        import normzoo.kernels as kernels

        return kernels
    if _kernels is None:
        import normzoo.kernels as kernels

        _kernels = kernels
    return _kernels


def use_triton(backend: str, x: Tensor) -> bool:
    """Whether ``x`` goes to the Triton kernels under ``backend``."""
    if backend == "auto":
        return x.is_cuda and x.dtype is not torch.float64
    if backend == "triton":
        if x.dtype is torch.float64:
            return False
        # Meta tensors take the op's fake implementation: shapes only, no kernel, on any machine.
        if x.is_cuda or x.is_meta or _launchers().heuristics.INTERPRETED:  # no read of _kernels: see _launchers
            return True
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got a tensor on {x.device}); "
            "to run the kernels on CPU set TRITON_INTERPRET=1 in the environment before Python starts "
            "(Triton reads it at import), or use backend='auto'"
        )
    check_backend(backend)
    return False


def normalized_shape_tuple(normalized_shape) -> tuple[int, ...]:
    """``int`` or sequence of ints -> tuple, as ``torch.nn.LayerNorm`` accepts (a traced input's
    sizes stay SymInts)."""
    # The usual case, a layer's own tuple of ints, checked inline. No cache by value: a SymInt (a
    # traced input's size, under torch.export or dynamic shapes) does not hash, and under dynamo a
    # lookup would specialize it.
    if type(normalized_shape) is tuple:
        if len(normalized_shape) == 1:
            if type(normalized_shape[0]) is int and normalized_shape[0] >= 0:
                return normalized_shape
        elif normalized_shape and all(type(d) is int and d >= 0 for d in normalized_shape):
            return normalized_shape
    return _normalized_shape_tuple(normalized_shape)


# Sizes: ints, and SymInts (a traced input's size; kept symbolic: int() would specialize it).
_SIZE_TYPES = (numbers.Integral, torch.SymInt)


def _size(d):
    return d if isinstance(d, torch.SymInt) else int(d)


def _normalized_shape_tuple(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, _SIZE_TYPES) and not isinstance(normalized_shape, bool):
        if normalized_shape < 0:
            raise ValueError(f"normalized_shape must not be negative, got {normalized_shape}")
        return (_size(normalized_shape),)
    if isinstance(normalized_shape, (Sequence, torch.Size)) and not isinstance(normalized_shape, str):
        dims = tuple(normalized_shape)
        if all(isinstance(d, _SIZE_TYPES) and not isinstance(d, bool) for d in dims):
            if not dims:
                raise ValueError("normalized_shape must have at least one dimension, got ()")
            if any(d < 0 for d in dims):
                raise ValueError(f"normalized_shape must not have negative sizes, got {dims}")
            return tuple(map(_size, dims))
    raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")


def _check_weight_offset(offset) -> float:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real):
        raise TypeError(f"weight_offset must be a float, got {type(offset).__name__}")
    if not (-math.inf < offset < math.inf):
        raise ValueError(f"weight_offset must be finite, got {offset}")
    return float(offset)


_FP32_MAX = 3.4028234663852886e38


def check_eps(eps) -> float:
    """eps as a float: finite, >= 0, and finite in fp32, where the kernels add it (a larger one
    would be inf there, and every row NaN)."""
    if type(eps) is float and 0 <= eps <= _FP32_MAX:  # the usual case, without the ABC checks below
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (0 <= eps <= _FP32_MAX):  # comparisons, not math.isfinite: eps is a SymFloat under dynamic shapes
        raise ValueError(f"eps must be a finite number >= 0 that float32 holds (<= 3.4e38), got {eps}")
    return float(eps)


def check_input(x, what: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_param(p, name: str, shape: tuple[int, ...], x: Tensor, any_float: bool = False) -> None:
    """A per-channel parameter: the right shape, on x's device, in x's dtype or float32 (with
    ``any_float``, also a 16-bit float)."""
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    if p.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but input is on {x.device}; put them on the same device")
    if any_float and p.dtype not in (x.dtype, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must have the input's dtype ({x.dtype}), float32 or a 16-bit float, got {p.dtype}")
    if not any_float and p.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} must have the input's dtype ({x.dtype}) or float32, got {p.dtype}")


def check_affine(weight, bias, shape: tuple[int, ...], x: Tensor, any_float: bool = False) -> None:
    """:func:`check_param` for a layer's weight and bias, with one test for the usual case (every
    call of a module makes it). The test is spelled out per parameter, cheapest first (a loop, or
    ``isinstance`` for a layer's own ``nn.Parameter``, costs more than the checks themselves).
    ``any_float``: an RMSNorm also takes a 16-bit weight of another dtype, as
    ``torch.nn.RMSNorm`` does (it computes ``x̂ · w`` in fp32 and rounds once to the input's dtype,
    the kernels' arithmetic), and as models' own RMSNorms do (T5 in fp16 feeds fp32 activations to
    an fp16 weight; OLMo 2's computes torch's). DyT/Derf take any float weight and bias too (and
    alpha and shift): ``swap(to="dyt")`` builds them in such a norm's weight dtype."""
    device, dtype = x.device, x.dtype
    if not ((weight is None or (type(weight) is _Parameter or isinstance(weight, Tensor)) and weight.shape == shape
             and weight.device == device and (weight.dtype is dtype or weight.dtype is _FP32))
            and (bias is None or (type(bias) is _Parameter or isinstance(bias, Tensor)) and bias.shape == shape
                 and bias.device == device and (bias.dtype is dtype or bias.dtype is _FP32))):
        check_param(weight, "weight", shape, x, any_float)
        check_param(bias, "bias", shape, x, any_float)


def check_trailing_shape(x: Tensor, shape: tuple[int, ...], label: str = "normalized_shape=") -> None:
    k = len(shape)
    if x.shape[-1] != shape[0] if k == 1 and x.dim() else x.dim() < k or x.shape[x.dim() - k:] != shape:
        raise ValueError(f"expected input whose trailing dims are {label}{shape}, got input of shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------
# Row-wise norm (LayerNorm / RMSNorm)
# ----------------------------------------------------------------------------------------------


def _c_apply(function: type[torch.autograd.Function]):
    """``function.apply`` without its Python wrapper, or None where this torch lacks the pieces.

    ``Function.apply`` is a Python classmethod around the C++ ``_FunctionBase.apply``: it checks for
    a ``setup_context`` (ours have none), hands the call to functorch when a transform is active
    (we send those calls to the reference math instead, :func:`_route`), and otherwise unwraps dead
    functorch wrappers (``_unwrap_if_dead``) and calls the C++ apply. Doing the same inline saves about
    2.5 µs of the ~7.5 µs a call costs."""
    try:
        torch._C._functorch.unwrap_if_dead  # noqa: B018
        return super(torch.autograd.Function, function).apply
    except AttributeError:
        return None


_FAKE = torch._C._TorchDispatchModeKey.FAKE
_PROXY = torch._C._TorchDispatchModeKey.PROXY


def _second_order(composite, inputs, needs, grad_outputs):
    """Gradients of ``composite(*inputs)`` (the op's reference math: differentiable torch ops)
    for a backward run with ``create_graph=True``: autograd through the reference, so the gradients
    are themselves differentiable (double backward, gradient penalties). ``needs``: which inputs
    want one; ``None`` elsewhere. ``composite`` returns one output or a tuple matching
    ``grad_outputs`` (a ``None`` gradient skips its output).

    Each input is differentiated through a view of its own: the partial derivative the backward
    owes it, where the inputs themselves share history (``norm(x * w)`` with ``w`` the norm's weight,
    a weight passed twice) that ``autograd.grad`` would otherwise follow from one input into another
    (and a tensor passed twice would get both partials, twice). The views keep the inputs' history,
    so the gradients stay differentiable with respect to what the inputs came from."""
    with torch.enable_grad():
        inputs = [t.view_as(t) if t is not None and t.requires_grad else t for t in inputs]
        wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
        outputs = composite(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and g is not None]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                   allow_unused=True) if wanted and pairs else [None] * len(wanted))
    return tuple(next(got) if need and t is not None else None for t, need in zip(inputs, needs))


# Function.apply unwraps dead functorch wrappers (tensors that escaped a transform) before the C++
# apply; the eager paths below do the same, inline. A wrapper is a plain Tensor, never an
# nn.Parameter: a layer's own parameters skip the call (~1k instructions each).
_unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", None)


def _for_kernels(t: Tensor | None) -> Tensor | None:
    """The kernels honour any row stride but read along a row with unit stride: copy a tensor
    whose rows are strided (LightLLM#1467: strided q/k views were silently wrong in a kernel that
    assumed otherwise). A 1-D parameter is read as contiguous, so a strided or expanded one is
    copied too. Rows of one element need no unit stride."""
    if t is None or t.is_contiguous() or t.shape[-1] <= 1 or t.stride(-1) == 1:  # is_contiguous: the cheap test
        return t
    return t.contiguous()


_wrapper_types = None


def _wrapper_tensor_types() -> tuple:
    """``(DTensor, AsyncCollectiveTensor)``: tensor subclasses without storage of their own that
    tensor parallelism hands a layer (empty tuples where torch.distributed is absent)."""
    global _wrapper_types
    if _wrapper_types is None:
        try:
            from torch.distributed._functional_collectives import AsyncCollectiveTensor
            from torch.distributed.tensor import DTensor
            _wrapper_types = (DTensor, AsyncCollectiveTensor)
        except ImportError:
            _wrapper_types = ((), ())
    return _wrapper_types


def _on_jagged_values(fn, x: Tensor, k: int) -> Tensor:
    """``fn`` on a jagged nested tensor (B, j, ..., normalized dims), as torch's LayerNorm and
    RMSNorm take it: on its packed values (Σj, ..., normalized dims), a plain tensor (the kernels'
    rows), rewrapped with x's offsets and cached sequence lengths; autograd passes both. The k
    normalized dims must be regular, and the ragged dim the first after the batch. In a tensor with
    holes (a narrow of a padded buffer: ``lengths``) the holes' values are taken as zeros: they are
    anything at all, and a NaN there would reach the parameters' gradients (0·NaN)."""
    ragged = getattr(x, "_ragged_idx", 1)
    if ragged != 1 or x.dim() - k < 2:
        raise ValueError(f"a nested tensor's normalized dims must follow its batch and ragged dims (B, j, ...), "
                         f"got {x.dim()} dims, the ragged one at {ragged}, {k} normalized")
    values, offsets, lengths = x.values(), x.offsets(), x.lengths()
    if lengths is not None:
        # +1 where a sequence starts, -1 where it ends: the running sum is 1 on its rows, 0 in holes
        edges = torch.zeros(values.shape[0] + 1, dtype=torch.int32, device=values.device)
        starts = offsets[: lengths.shape[0]]
        edges.index_add_(0, starts, torch.ones_like(starts, dtype=torch.int32))
        edges.index_add_(0, starts + lengths, -torch.ones_like(starts, dtype=torch.int32))
        kept = edges.cumsum(0)[:-1].bool().view(-1, *(1,) * (values.dim() - 1))
        values = torch.where(kept, values, 0.0)
    return torch.nested.nested_tensor_from_jagged(
        fn(values), offsets, lengths, min_seqlen=getattr(x, "_maybe_min_seqlen", None),
        max_seqlen=getattr(x, "_maybe_max_seqlen", None))


def _waited(t: Tensor) -> Tensor:
    """A functional collective's pending result (say, a gradient that a reduce-scatter produced)
    as the tensor it will be: the kernels need its data."""
    if type(t) is not Tensor and isinstance(t, _wrapper_tensor_types()[1]):
        return t.wait()
    return t


def refuse_dtensor(x: Tensor, what: str) -> None:
    """Ops whose kernels do not take DTensors yet say so (rather than fail on a missing storage)."""
    if type(x) is not Tensor and isinstance(x, _wrapper_tensor_types()[0]):
        raise TypeError(f"{what} do not take DTensors on the Triton kernels yet; use backend='torch' for these "
                        "layers under tensor parallelism (the reference runs on DTensors op by op)")


def _on_local_shards(op, x, params, whole_dims):
    """``op(x_local, *params_local)`` for a DTensor ``x``, as a DTensor of x's placements: each rank
    normalizes its own rows, so a sequence- or batch-sharded input costs no communication (as
    torch's norms). A row must be whole: a shard of one of ``whole_dims`` (the normalized or channel
    dims), or a partial sum, is gathered first. Parameters are used replicated; their gradient is a
    partial sum over each mesh dim along which the rows are sharded."""
    from torch.distributed.tensor import Partial, Replicate

    DTensor = _wrapper_tensor_types()[0]
    mesh = x.device_mesh
    placements = [Replicate() if p.is_partial() or p.is_shard() and p.dim % x.ndim in whole_dims else p
                  for p in x.placements]
    if placements != list(x.placements):
        x = x.redistribute(mesh, placements)
    grad_placements = [Partial() if p.is_shard() else Replicate() for p in placements]
    local = []
    for t in params:
        if isinstance(t, DTensor):
            if not all(p.is_replicate() for p in t.placements):
                t = t.redistribute(mesh, [Replicate()] * mesh.ndim)
            t = t.to_local(grad_placements=grad_placements)
        local.append(t)
    y = op(x.to_local(), *local)
    if not y.is_contiguous():  # a channels_last local input keeps its layout (pointwise): the stride below is contiguous
        y = y.contiguous()
    return DTensor.from_local(y, mesh, placements, run_check=False, shape=x.shape,
                              stride=torch.empty(x.shape, device="meta").stride())


def _for_reference(t: Tensor | None) -> Tensor | None:
    # The reference's outputs follow its input's memory layout; the fake implementations promise
    # contiguous outputs, so give it contiguous input (torch.compile checks the strides).
    return t.contiguous() if t is not None else None


def _rowwise_forward(x, weight, bias, eps, is_rms, triton, weight_offset=0.0, round_x_hat=0, out_dtype=None,
                     with_stats=True):
    """``(y, stats)``: the one forward implementation, behind both the eager autograd.Function and
    the custom op. ``stats`` holds the per-row fp32 statistics the backward needs: rstd (M,) for
    RMSNorm, mean then rstd in one flat (2M,) buffer for LayerNorm (as the kernels store them);
    ``None`` with ``with_stats=False``, where no backward follows (neither allocated nor stored).
    ``round_x_hat`` and ``out_dtype``: see :func:`_x_hat_rounding`."""
    if triton:
        # _for_kernels's first test inline: contiguous input is the rule.
        return (_kernels or _launchers()).rowwise_norm_forward(
            x if x.is_contiguous() else _for_kernels(x),
            weight if weight is None or weight.is_contiguous() else _for_kernels(weight),
            bias if bias is None or bias.is_contiguous() else _for_kernels(bias),
            eps, is_rms=is_rms, weight_offset=weight_offset, round_x_hat=round_x_hat, out_dtype=out_dtype,
            with_stats=with_stats)
    x, weight, bias = (_for_reference(t) for t in (x, weight, bias))
    y, mean, rstd = reference.rowwise_norm_forward(x, weight, bias, eps, is_rms, weight_offset, round_x_hat, out_dtype)
    return y, (None if not with_stats else rstd if is_rms else torch.cat((mean, rstd)))


def _rowwise_backward(dy, x, weight, stats, is_rms, compute_dw, db_dtype, triton, weight_offset=0.0, round_x_hat=0,
                      input_dtype=None):
    """``(dx, dw, db)``, a gradient not asked for ``None``; the one backward implementation.
    ``input_dtype`` (the reference's): the dtype x had before the caller widened it, which
    ``round_x_hat`` 1 rounds to (default x's)."""
    if triton:  # the usual case's tests inline, as in _rowwise_forward (dy: autograd's, a plain tensor)
        return (_kernels or _launchers()).rowwise_norm_backward(
            dy if type(dy) is Tensor and dy.is_contiguous() else _for_kernels(_waited(dy)),
            x if x.is_contiguous() else _for_kernels(x),
            weight if weight is None or weight.is_contiguous() else _for_kernels(weight), stats,
            is_rms=is_rms, compute_dw=compute_dw, db_dtype=db_dtype, weight_offset=weight_offset,
            round_x_hat=round_x_hat)
    dy, x, weight = (_for_reference(t) for t in (dy, x, weight))
    mean, rstd = (None, stats) if is_rms else stats.view(2, x.shape[0])
    return reference.rowwise_norm_backward(dy, x, weight, mean, rstd, is_rms, compute_dw, db_dtype, weight_offset,
                                           round_x_hat, input_dtype)


def _rowwise_grads(ctx, dy, backward, reference=False):
    """``(dx, dw, db)`` for ``ctx``'s tensor inputs, ``None`` where not needed, computed by
    ``backward`` (the eager implementation or the custom op, which returns empty tensors where the
    other returns None). ``ctx.spec``: ``(spec, bias_dtype)``, ``spec`` the forward's
    ``(eps, is_rms, triton, weight_offset, round_x_hat, out_dtype)``.

    ``reference``: on the reference, whatever the forward ran: for a batched gradient, which the
    kernels cannot read (its storage is the batch's). Autograd's ``is_grads_batched``
    (``jacobian(vectorize=True)``, ``hessian``) runs the backward under its legacy vmap, and a
    backward called inside a torch.func transform sees that transform's wrappers. The reference
    math is torch ops, which vmap batches; the forward's statistics are reused as saved."""
    x, weight, stats = ctx.saved_tensors
    needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
    (_, is_rms, triton, weight_offset, round_x_hat, _), bias_dtype = ctx.spec
    compute_dw = weight is not None and needs_dw
    db_dtype = bias_dtype if needs_db else None
    dx, dw, db = backward(dy, x, weight, stats, is_rms, compute_dw, db_dtype, triton and not reference, weight_offset,
                          round_x_hat)
    return dx if needs_dx else None, dw if compute_dw else None, db if db_dtype is not None else None


class _RowwiseNorm(torch.autograd.Function):
    """The eager path: an autograd.Function costs a fraction of a custom op's dispatch (~7 µs
    against ~40 µs a call on a 2-core CPU, ../shared/DESIGN.md). The statistics stay on ctx, not
    among the outputs, so autograd never materializes zero gradients for them. The non-tensor
    arguments travel as one tuple, ``spec = (eps, is_rms, triton, weight_offset, round_x_hat, out_dtype)``:
    each argument of ``apply`` costs host time."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec):
        y, stats = _rowwise_forward(x, weight, bias, *spec)
        ctx.save_for_backward(x, weight, stats)
        ctx.spec = (spec, bias.dtype if bias is not None else None)  # one attribute: each set costs host time
        return y

    @staticmethod
    def backward(ctx, dy):
        if _grad_enabled():  # create_graph=True: differentiable gradients, through the reference math
            return *_rowwise_second_order(ctx, dy), None
        if _functorch_transforms_active() or _is_legacy_batched(dy):  # a batched backward: the reference
            return *_rowwise_grads(ctx, dy, _rowwise_backward, True), None
        return *_rowwise_grads(ctx, dy, _rowwise_backward), None


def _rowwise_composite(x, weight, bias, eps, is_rms, triton, weight_offset=0.0, round_x_hat=0, out_dtype=None):
    """The forward as differentiable torch ops (the reference): what forward-mode AD, torch.func
    transforms and double backward differentiate."""
    return reference.rowwise_norm_forward(x, weight, bias, eps, is_rms, weight_offset, round_x_hat, out_dtype)[0]


def _rowwise_second_order(ctx, dy):
    x, weight, _ = ctx.saved_tensors
    needs = ctx.needs_input_grad
    spec, bias_dtype = ctx.spec
    # y is linear in the bias: its gradient is Σ dy whatever the bias (not saved), and the others
    # do not depend on it.
    dx, dw = _second_order(lambda x, w: _rowwise_composite(x, w, None, *spec), (x, weight), needs[:2], (dy,))
    db = dy.to(reference.compute_dtype(dy.dtype)).sum(0).to(bias_dtype) if needs[2] and bias_dtype else None
    return dx, dw, db


_ROWWISE_C_APPLY = _c_apply(_RowwiseNorm)

# What torch.compile sees: custom ops with fake implementations and a registered autograd
# formula, opaque to the compiler (no graph break), running the same implementations.


@torch.library.custom_op("normzoo::rowwise_norm_fwd", mutates_args=())
def rowwise_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool, triton: bool,
    weight_offset: float = 0.0, round_x_hat: int = 0, out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, stats)`` for 2-D ``x``; see :func:`_rowwise_forward`."""
    return _rowwise_forward(x, weight, bias, eps, is_rms, triton, weight_offset, round_x_hat, out_dtype)


@rowwise_norm_fwd.register_fake
def _(x, weight, bias, eps, is_rms, triton, weight_offset=0.0, round_x_hat=0, out_dtype=None):
    rows = x.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format, dtype=out_dtype or x.dtype),
            x.new_empty((rows if is_rms else 2 * rows,), dtype=reference.compute_dtype(x.dtype)))


@torch.library.custom_op("normzoo::rowwise_norm_bwd", mutates_args=())
def rowwise_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, stats: Tensor,
    is_rms: bool, compute_dw: bool, db_dtype: torch.dtype | None, triton: bool, weight_offset: float = 0.0,
    round_x_hat: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dw, db)``; ``db`` in ``db_dtype`` (the bias's; ``None``: no bias gradient).
    A gradient not asked for is an empty tensor."""
    dx, dw, db = _rowwise_backward(dy, x, weight, stats, is_rms, compute_dw, db_dtype, triton, weight_offset,
                                   round_x_hat)
    return dx, (dw if dw is not None else x.new_empty(0)), (db if db is not None else x.new_empty(0))


@rowwise_norm_bwd.register_fake
def _(dy, x, weight, stats, is_rms, compute_dw, db_dtype, triton, weight_offset=0.0, round_x_hat=0):
    n = x.shape[1]
    dw = x.new_empty((n,), dtype=weight.dtype) if compute_dw else x.new_empty(0)
    db = x.new_empty((n,), dtype=db_dtype) if db_dtype is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw, db


def _rowwise_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps, is_rms, triton, weight_offset, round_x_hat, out_dtype = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.spec = ((eps, is_rms, triton, weight_offset, round_x_hat, out_dtype), bias.dtype if bias is not None else None)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _rowwise_custom_op_grads(ctx, dy, _dstats):
    if _grad_enabled() and not _is_compiling():  # create_graph=True in eager (a subclass's route): as _RowwiseNorm
        return (*_rowwise_second_order(ctx, dy), None, None, None, None, None, None)
    return (*_rowwise_grads(ctx, dy, rowwise_norm_bwd), None, None, None, None, None, None)


rowwise_norm_fwd.register_autograd(_rowwise_custom_op_grads, setup_context=_rowwise_norm_setup_context)


# Every call asks these, so they are looked up once (each dotted lookup costs host time).
_forward_ad = torch.autograd.forward_ad
_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_dispatch_mode = torch._C._get_dispatch_mode
_functorch_transforms_active = torch._C._are_functorch_transforms_active
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor  # autograd's is_grads_batched vmap
_grad_enabled = torch.is_grad_enabled


def _dispatches_itself(x: Tensor) -> bool:
    """A tensor subclass with a ``__torch_dispatch__`` of its own (a wrapper such as torch's
    TwoTensor, often without storage of its own), but DTensor (ops run it shard by shard, or
    refuse it): it takes the custom ops, which its dispatch runs on the tensors it wraps; the
    launchers would read a storage it does not have."""
    return (type(x).__torch_dispatch__ is not _TENSOR_DISPATCH
            and not isinstance(x, _wrapper_tensor_types()[0]))


_TENSOR_DISPATCH = Tensor.__torch_dispatch__


def _route(x: Tensor, *params: Tensor | None) -> str:
    """Which way a call goes:

    - "custom_op": anything else but a plain eager call: torch.compile / torch.export,
      torch.jit.trace, FakeTensorMode or make_fx, meta tensors, a tensor subclass that dispatches
      itself (:func:`_dispatches_itself`), as x or any of ``params``. These take the registered
      custom ops (fake implementations, the subclass's own dispatch); the launchers would
      otherwise run on tensors that have no data.
    - "function": eager, and some tensor needs a gradient: the autograd.Function.
    - "forward": eager, no gradient.

    - "composite": forward-mode AD (``torch.autograd.forward_ad``) or a torch.func transform (jvp,
      jacfwd, grad, jacrev, vmap, functional_call under them), also under torch.compile or
      make_fx: the op's reference math as differentiable torch ops, which every transform knows
      how to differentiate and batch. Not the kernels: the transforms' own rules then apply to
      each torch op.
    - "reference": ``torch.onnx.export``'s trace (:func:`_in_onnx_export`): the forward's
      reference math, as "forward" with the kernels off (a graph to run elsewhere, not to
      differentiate: DyT's plain tanh, which ONNX has, not the composite's)."""
    if _forward_ad._current_level >= 0:
        return "composite"
    if (_is_compiling() or x.is_meta or _tracing_state() is not None
            # An empty mode stack (the eager case) answers both mode questions in one call.
            or _dispatch_stack_len() and (_dispatch_mode(_FAKE) is not None or _dispatch_mode(_PROXY) is not None)):
        # A transform under a trace (torch.compile or make_fx of torch.func.grad) takes the
        # reference too: functorch cannot differentiate or batch a custom op's registered autograd.
        # functionalize alone (make_fx(functionalize(f)), torch's recipe) passes the ops through.
        if _functorch_transforms_active() and (_is_compiling() or not _functionalize_only()):
            return "composite"
        if _in_onnx_export():
            return "reference"
        return "custom_op"
    if _functorch_transforms_active():
        return "composite"
    if type(x) is not Tensor and _dispatches_itself(x):
        return "custom_op"
    grad = x.requires_grad
    for p in params:  # one pass: a parameter (or a fused op's second tensor) of such a subclass, and grads
        if p is not None:
            t = type(p)
            if t is not _Parameter and t is not Tensor and _dispatches_itself(p):
                return "custom_op"
            grad = grad or p.requires_grad
    return "function" if grad and _grad_enabled() else "forward"


def _in_onnx_export() -> bool:
    """Whether ``torch.onnx.export`` (either exporter) is tracing: ONNX has no normzoo ops, so the
    reference math goes into the graph, torch ops it translates (LayerNormalization and the like).
    Not imported for the question: a torch.onnx never imported exports nothing. Asked in Python
    even under Dynamo (see below), which folds ``torch.onnx.is_in_onnx_export()`` to False: the
    dynamo exporter's second capture, a strict torch.export, would otherwise record the custom
    ops."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


# torch.compiler.assume_constant_result's mark, set without importing Dynamo (as that function
# does): Dynamo calls _in_onnx_export in Python and traces its answer as a constant.
_in_onnx_export._dynamo_marked_constant = True


def _functionalize_only() -> bool:
    """Whether every active functorch transform is functionalize, which a custom op that mutates
    nothing passes through unchanged."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return all(i.key() == _FUNCTIONALIZE for i in retrieve_all_functorch_interpreters())


_FUNCTIONALIZE = torch._C._functorch.TransformType.Functionalize
_X_HAT_DTYPES = (None, "input", "weight")
_HALF = (torch.float16, torch.bfloat16)


def check_x_hat_dtype(x_hat_dtype) -> str | None:
    if x_hat_dtype not in _X_HAT_DTYPES:
        raise ValueError(f"x_hat_dtype must be one of {_X_HAT_DTYPES}, got {x_hat_dtype!r}")
    return x_hat_dtype


def _x_hat_rounding(x_hat_dtype: str, x: Tensor, weight: Tensor | None) -> tuple[int, torch.dtype]:
    """``(round_x_hat, out_dtype)`` for a model that rounds x_hat before its weight multiplies it,
    computing what its own code computes:

    - ``"input"`` (Llama, Mistral, Qwen2/3): ``weight * x_hat.to(x.dtype)``: rounded to x's dtype,
      output in the promotion of x's and the weight's dtypes.
    - ``"weight"`` (T5): a 16-bit weight's dtype, output in it; with an fp32 weight, no rounding
      and an fp32 output (x times an fp32 rstd is fp32).

    ``round_x_hat``: 0 (none), 1 (to x's dtype), 2 (to the weight's), as the kernels number them.
    """
    if x_hat_dtype == "input":
        code = 0 if x.dtype is torch.float32 or x.dtype is torch.float64 else 1
    else:
        code = 2 if weight is not None and weight.dtype in _HALF else 0
    return code, x_hat_out_dtype(x_hat_dtype, x.dtype, weight)


def x_hat_out_dtype(x_hat_dtype: str, x_dtype: torch.dtype, weight: Tensor | None) -> torch.dtype:
    """The dtype a model's norm with this ``x_hat_dtype`` returns for input in ``x_dtype`` (see
    :func:`_x_hat_rounding`)."""
    if x_hat_dtype == "input":
        return torch.promote_types(x_dtype, weight.dtype) if weight is not None else x_dtype
    if weight is not None and weight.dtype in _HALF:
        return weight.dtype
    return torch.promote_types(x_dtype, torch.float32)


def rowwise_norm(
    x: Tensor, normalized_shape, weight: Tensor | None, bias: Tensor | None, eps, *, is_rms: bool, backend: str,
    weight_offset: float = 0.0, x_hat_dtype: str | None = None,
) -> Tensor:
    """LayerNorm or RMSNorm over the trailing ``normalized_shape`` dims of ``x``, any leading dims;
    the weight applied is ``weight + weight_offset`` (in fp32). ``x_hat_dtype`` (None, "input" or
    "weight"): where x_hat is rounded before the weight, see :func:`_x_hat_rounding`."""
    # The usual case's tests inline (each Python call on this path costs ~0.1 µs); the check_*
    # helpers run only where a quick test fails, to raise their errors or handle the rare case.
    if type(x) is not Tensor:  # not a tensor, or a subclass: tensor parallelism's DTensor, a collective's result
        check_input(x)
        if x.is_nested:
            return _on_jagged_values(lambda v: rowwise_norm(
                v, normalized_shape, weight, bias, eps, is_rms=is_rms, backend=backend, weight_offset=weight_offset,
                x_hat_dtype=x_hat_dtype), x, len(normalized_shape_tuple(normalized_shape)))
        if isinstance(x, _wrapper_tensor_types()[0]):
            k = len(normalized_shape_tuple(normalized_shape))
            return _on_local_shards(lambda x, w, b: rowwise_norm(
                x, normalized_shape, w, b, eps, is_rms=is_rms, backend=backend, weight_offset=weight_offset,
                x_hat_dtype=x_hat_dtype), x, (weight, bias), range(x.dim() - k, x.dim()))
        x = _waited(x)
    elif x.dtype not in FLOAT_DTYPES:
        check_input(x)
    shape = normalized_shape_tuple(normalized_shape)
    k, ndim = len(shape), x.dim()
    if k != 1 or not ndim or x.shape[-1] != shape[0]:  # check_trailing_shape's usual case inline
        check_trailing_shape(x, shape)
    if weight is not None or bias is not None:
        check_affine(weight, bias, shape, x, is_rms)
    if type(eps) is not float or not 0.0 <= eps <= _FP32_MAX:
        if eps is None and is_rms:  # torch.nn.RMSNorm's default, the compute dtype's machine epsilon
            eps = torch.finfo(reference.compute_dtype(x.dtype)).eps
        eps = check_eps(eps)  # LayerNorm's eps=None included: a TypeError, as torch's
    if weight_offset != 0.0:  # the usual 0.0 needs no check
        weight_offset = _check_weight_offset(weight_offset)
        if weight is None:
            raise ValueError(f"weight_offset={weight_offset} offsets the weight, and there is none (it would be ignored)")
    round_x_hat, out_dtype = (0, None) if x_hat_dtype is None else _x_hat_rounding(check_x_hat_dtype(x_hat_dtype), x,
                                                                                   weight)
    triton = x.is_cuda and x.dtype is not _FP64 if backend == "auto" else use_triton(backend, x)

    # Rows of n: views where possible, and no call at all when x already is (rows, n).
    n = shape[0] if k == 1 else math.prod(shape)
    x2d = x if ndim == 2 and k == 1 else x.reshape(math.prod(x.shape[: ndim - k]), n)
    w = weight if weight is None or k == 1 else weight.reshape(n)
    b = bias if bias is None or k == 1 else bias.reshape(n)
    route = _route(x2d, w, b)
    if route == "custom_op":
        y = rowwise_norm_fwd(x2d, w, b, eps, is_rms, triton, weight_offset, round_x_hat, out_dtype)[0]
    elif route == "composite":
        y = _rowwise_composite(x2d, w, b, eps, is_rms, triton, weight_offset, round_x_hat, out_dtype)
    elif route == "function":
        spec = (eps, is_rms, triton, weight_offset, round_x_hat, out_dtype)
        if _ROWWISE_C_APPLY is None:
            y = _RowwiseNorm.apply(x2d, w, b, spec)
        else:
            y = _ROWWISE_C_APPLY(_unwrap_if_dead(x2d),
                                 w if w is None or type(w) is _Parameter else _unwrap_if_dead(w),
                                 b if b is None or type(b) is _Parameter else _unwrap_if_dead(b), spec)
    elif (route == "reference" and not is_rms and weight_offset == 0.0 and (w is None or w.dtype is x2d.dtype)
          and (b is None or b.dtype is x2d.dtype)):
        # ONNX has LayerNormalization (opset 17; torch.onnx's default is newer), which torch's own
        # layer_norm exports as: one node, which runtimes fuse, where the reference math exports as
        # reductions and elementwise ops. The same math: statistics in fp32 (ONNX's stash_type 1)
        # and y rounded once to x's dtype. (Its parameters must have x's dtype there.)
        y = torch.nn.functional.layer_norm(x2d, (n,), w, b, eps)
    else:  # "forward", or "reference" (ONNX export's trace): the same forward, with the kernels off; no backward
        y = _rowwise_forward(x2d, w, b, eps, is_rms, triton and route == "forward", weight_offset, round_x_hat,
                             out_dtype, False)[0]
    return y if x2d is x else y.view(x.shape)


# ----------------------------------------------------------------------------------------------
# Point-wise normalization-free layers (DyT / Derf)
# ----------------------------------------------------------------------------------------------


def _pointwise_forward(x, alpha, shift, weight, bias, activation, channels, params_per_row, triton):
    if triton:  # _for_kernels's first test inline, as in _rowwise_forward
        return (_kernels or _launchers()).pointwise_forward(
            x if x.is_contiguous() else _for_kernels(x), alpha, shift,
            weight if weight is None or weight.is_contiguous() else _for_kernels(weight),
            bias if bias is None or bias.is_contiguous() else _for_kernels(bias),
            activation=activation, channels=channels, params_per_row=params_per_row)
    x, weight, bias = (_for_reference(t) for t in (x, weight, bias))
    return reference.pointwise_forward(x, alpha, shift, weight, bias, activation, channels, params_per_row)


def _pointwise_backward(dy, x, alpha, shift, weight, activation, channels, params_per_row, compute_dw, db_dtype,
                        triton):
    """``(dx, dalpha, dshift, dw, db)``, a gradient not asked for ``None``."""
    if triton:  # the usual case's tests inline, as in _pointwise_forward (dy: autograd's, a plain tensor)
        return (_kernels or _launchers()).pointwise_backward(
            dy if type(dy) is Tensor and dy.is_contiguous() else _for_kernels(_waited(dy)),
            x if x.is_contiguous() else _for_kernels(x), alpha, shift,
            weight if weight is None or weight.is_contiguous() else _for_kernels(weight),
            activation=activation, channels=channels, params_per_row=params_per_row, compute_dw=compute_dw,
            db_dtype=db_dtype)
    dy, x, weight = (_for_reference(t) for t in (dy, x, weight))
    return reference.pointwise_backward(dy, x, alpha, shift, weight, activation, channels, params_per_row,
                                        compute_dw, db_dtype)


def _pointwise_grads(ctx, dy, backward, reference=False):
    """``(dx, dalpha, dshift, dw, db)`` for ``ctx``'s tensor inputs (see :func:`_rowwise_grads`).
    ``ctx.meta``: ``((activation, channels, params_per_row, triton), bias_dtype)``."""
    x, alpha, shift, weight = ctx.saved_tensors
    needs_dx, needs_dalpha, needs_dshift, needs_dw, needs_db = ctx.needs_input_grad[:5]
    (activation, channels, params_per_row, triton), bias_dtype = ctx.meta
    compute_dw = weight is not None and needs_dw
    db_dtype = bias_dtype if needs_db else None
    dx, dalpha, dshift, dw, db = backward(dy, x, alpha, shift, weight, activation, channels, params_per_row,
                                          compute_dw, db_dtype, triton and not reference)
    return (
        dx if needs_dx else None,
        dalpha if needs_dalpha else None,  # (1,), as the alpha and shift the ops take
        dshift if shift is not None and needs_dshift else None,
        dw if compute_dw else None,
        db if db_dtype is not None else None,
    )


class _Pointwise(torch.autograd.Function):
    """The eager path of DyT / Derf (see :class:`_RowwiseNorm`);
    ``spec = (activation, channels, params_per_row, triton)``."""

    @staticmethod
    def forward(ctx, x, alpha, shift, weight, bias, spec):
        ctx.save_for_backward(x, alpha, shift, weight)
        ctx.meta = (spec, bias.dtype if bias is not None else None)
        activation, channels, params_per_row, triton = spec  # unpacked here: a call with *spec costs more
        return _pointwise_forward(x, alpha, shift, weight, bias, activation, channels, params_per_row, triton)

    @staticmethod
    def backward(ctx, dy):
        if _grad_enabled():  # create_graph=True: differentiable gradients, through the reference math
            return *_pointwise_second_order(ctx, dy), None
        if _functorch_transforms_active() or _is_legacy_batched(dy):  # a batched backward: the reference
            return *_pointwise_grads(ctx, dy, _pointwise_backward, True), None
        return *_pointwise_grads(ctx, dy, _pointwise_backward), None


def _pointwise_composite(x, alpha, shift, weight, bias, activation, channels, params_per_row, triton):
    """The forward as differentiable torch ops (see :func:`_rowwise_composite`)."""
    return reference.pointwise_forward(x, alpha, shift, weight, bias, activation, channels, params_per_row, True)


def _pointwise_second_order(ctx, dy):
    x, alpha, shift, weight = ctx.saved_tensors
    (activation, channels, params_per_row, triton), bias_dtype = ctx.meta
    needs = ctx.needs_input_grad
    grads = _second_order(lambda *t: _pointwise_composite(*t, None, activation, channels, params_per_row, triton),
                          (x, alpha, shift, weight), needs[:4], (dy,))
    db = None
    if needs[4] and bias_dtype is not None:  # y is linear in the bias (not saved): Σ dy per channel
        db = reference._fold_per_channel(dy.to(reference.compute_dtype(dy.dtype)), channels, params_per_row)
        db = db.to(bias_dtype)
    return (*grads, db)


_POINTWISE_C_APPLY = _c_apply(_Pointwise)


@torch.library.custom_op("normzoo::pointwise_fwd", mutates_args=())
def pointwise_fwd(
    x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None, bias: Tensor | None,
    activation: str, channels: int, params_per_row: bool, triton: bool,
) -> Tensor:
    """``weight ⊙ act(alpha·x + shift) + bias`` on 2-D ``x``; see :mod:`normzoo.kernels.elementwise`."""
    return _pointwise_forward(x, alpha, shift, weight, bias, activation, channels, params_per_row, triton)


@pointwise_fwd.register_fake
def _(x, alpha, shift, weight, bias, activation, channels, params_per_row, triton):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("normzoo::pointwise_bwd", mutates_args=())
def pointwise_bwd(
    dy: Tensor, x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None,
    activation: str, channels: int, params_per_row: bool, compute_dw: bool, db_dtype: torch.dtype | None,
    triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dalpha, dshift, dw, db)``; a gradient not computed is an empty tensor."""
    grads = _pointwise_backward(dy, x, alpha, shift, weight, activation, channels, params_per_row, compute_dw,
                                db_dtype, triton)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@pointwise_bwd.register_fake
def _(dy, x, alpha, shift, weight, activation, channels, params_per_row, compute_dw, db_dtype, triton):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        alpha.new_empty((1,)),
        shift.new_empty((1,)) if shift is not None else x.new_empty(0),
        x.new_empty((channels,), dtype=weight.dtype) if compute_dw else x.new_empty(0),
        x.new_empty((channels,), dtype=db_dtype) if db_dtype is not None else x.new_empty(0),
    )


def _pointwise_setup_context(ctx, inputs, output):
    x, alpha, shift, weight, bias, *spec = inputs
    ctx.save_for_backward(x, alpha, shift, weight)
    ctx.meta = (tuple(spec), bias.dtype if bias is not None else None)


def _pointwise_custom_op_grads(ctx, dy):
    if _grad_enabled() and not _is_compiling():  # create_graph=True in eager: as _Pointwise
        return (*_pointwise_second_order(ctx, dy), None, None, None, None)
    return (*_pointwise_grads(ctx, dy, pointwise_bwd), None, None, None, None)


pointwise_fwd.register_autograd(_pointwise_custom_op_grads, setup_context=_pointwise_setup_context)


def _check_scalars(alpha, shift, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """alpha (and shift, unless None): one-element float tensors on x's device. Returns them as
    (1,) tensors. The usual case, a layer's own (1,) parameters, is one test (as :func:`check_affine`);
    anything else is checked in full and flattened."""
    device = x.device
    if ((type(alpha) is _Parameter or isinstance(alpha, Tensor)) and alpha.shape == _ONE
            and alpha.dtype in FLOAT_DTYPES and alpha.device == device
            and (shift is None or (type(shift) is _Parameter or isinstance(shift, Tensor)) and shift.shape == _ONE
                 and shift.dtype in FLOAT_DTYPES and shift.device == device)):
        return alpha, shift
    _check_scalar(alpha, "alpha", x)
    if shift is not None:
        _check_scalar(shift, "shift", x)
    return (alpha if alpha.dim() == 1 else alpha.reshape(1),
            shift if shift is None or shift.dim() == 1 else shift.reshape(1))


def _check_scalar(t, name: str, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor with one element, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly one element (a learnable scalar), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}; put them on the same device")


def pointwise(
    x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None, bias: Tensor | None,
    *, activation: str, channels_last: bool, backend: str, normalized_shape=None,
) -> Tensor:
    """DyT / Derf on any shape. channels-last: the parameters cover the trailing dims;
    channels-first: ``x`` is (B, C, *spatial) and the parameters have shape (C,).

    ``normalized_shape`` (the modules pass theirs) fixes the expected shape even when there are no
    parameters to read it from; without it, the weight's (or bias's) shape, else the input's last
    dim.
    """
    if type(x) is not Tensor:  # tensor parallelism's DTensor, or a collective's pending result (rowwise_norm)
        check_input(x)
        param = weight if weight is not None else bias
        # the channels-last dims the parameters cover
        trailing = lambda: (len(normalized_shape_tuple(normalized_shape)) if normalized_shape is not None else  # noqa: E731
                            param.dim() if param is not None else 1)
        if x.is_nested:
            if not channels_last:
                raise ValueError("channels_last=False takes (B, C, *spatial) tensors, not nested ones")
            return _on_jagged_values(lambda v: pointwise(
                v, alpha, shift, weight, bias, activation=activation, channels_last=True, backend=backend,
                normalized_shape=normalized_shape), x, trailing())
        if isinstance(x, _wrapper_tensor_types()[0]):
            whole = range(x.dim() - trailing(), x.dim()) if channels_last else (1,)
            return _on_local_shards(lambda x, a, s, w, b: pointwise(
                x, a, s, w, b, activation=activation, channels_last=channels_last, backend=backend,
                normalized_shape=normalized_shape), x, (alpha, shift, weight, bias), whole)
        x = _waited(x)
    elif x.dtype not in FLOAT_DTYPES:
        check_input(x)
    alpha, shift = _check_scalars(alpha, shift, x)
    expected = normalized_shape_tuple(normalized_shape) if normalized_shape is not None else None
    ndim = x.dim()
    if channels_last:
        param = weight if weight is not None else bias
        if param is not None and type(param) is not _Parameter and not isinstance(param, Tensor):
            check_param(param, "weight" if param is weight else "bias", (), x)  # its TypeError, before its shape is read
        shape = expected or (tuple(param.shape) if param is not None else (x.shape[-1] if ndim else 1,))
        k = len(shape)
        if k != 1 or not ndim or x.shape[-1] != shape[0]:  # check_trailing_shape's usual case inline
            check_trailing_shape(x, shape, label="")
        channels = shape[0] if k == 1 else math.prod(shape)
        x2d = x if ndim == 2 and k == 1 else x.reshape(x.numel() // channels if channels else 0, channels)
        moved = None
    else:
        if ndim < 2:
            raise ValueError(f"channels_last=False expects input of shape (B, C, *spatial), got {tuple(x.shape)}")
        shape = (x.shape[1],)
        if expected is not None and expected != shape:
            raise ValueError(f"expected input with {expected[0]} channels in dim 1 (B, C, *spatial), "
                             f"got input of shape {tuple(x.shape)}")
        channels = x.shape[1]
        moved = x.movedim(1, -1) if ndim > 2 and x.stride(1) == 1 and channels > 1 else None
        if moved is not None and moved.is_contiguous():
            # channels_last in memory, (B, *spatial, C): rows of C read in place by the channels-last
            # kernel, and y in the input's memory format, as torch's point-wise ops keep it; no copy.
            # (reshape, not view: an exported graph replays this branch on any layout, copying there)
            channels_last, x2d = True, moved.reshape(-1, channels)
        else:
            moved, x2d = None, x.reshape(x.shape[0] * channels, math.prod(x.shape[2:]))
    if weight is not None or bias is not None:
        check_affine(weight, bias, shape, x, True)
    triton = x.is_cuda and x.dtype is not _FP64 if backend == "auto" else use_triton(backend, x)
    if len(shape) != 1:  # (C,) parameters as they are; others flattened to them
        weight = weight if weight is None else weight.reshape(channels)
        bias = bias if bias is None else bias.reshape(channels)
    spec = (activation, channels, not channels_last, triton)
    route = _route(x2d, alpha, shift, weight, bias)
    if route == "custom_op":
        y = pointwise_fwd(x2d, alpha, shift, weight, bias, *spec)
    elif route == "composite":
        y = _pointwise_composite(x2d, alpha, shift, weight, bias, *spec)
    elif route == "function":
        if _POINTWISE_C_APPLY is None:
            y = _Pointwise.apply(x2d, alpha, shift, weight, bias, spec)
        else:
            y = _POINTWISE_C_APPLY(_unwrap_if_dead(x2d),
                                   alpha if type(alpha) is _Parameter else _unwrap_if_dead(alpha),
                                   shift if shift is None or type(shift) is _Parameter else _unwrap_if_dead(shift),
                                   weight if weight is None or type(weight) is _Parameter else _unwrap_if_dead(weight),
                                   bias if bias is None or type(bias) is _Parameter else _unwrap_if_dead(bias), spec)
    else:  # "forward", or "reference" (ONNX export's trace): the same forward, with the kernels off
        y = _pointwise_forward(x2d, alpha, shift, weight, bias, *spec[:3], triton and route == "forward")
    if moved is not None:
        return y.view(moved.shape).movedim(-1, 1)
    return y if x2d is x else y.view(x.shape)


# ----------------------------------------------------------------------------------------------
# Head-wise norms: QK-norm (q and k in one launch), ScaleNorm, CRMSNorm
# ----------------------------------------------------------------------------------------------

HEADWISE_NORMS = ("rms", "l2", "crms")


def _headwise_for_kernels(t: Tensor | None) -> Tensor | None:
    """As it lies where the kernels can address its rows in two levels (q, k as views of a fused
    qkv projection); copied otherwise."""
    if t is None or t.is_contiguous():
        return t
    if (t.shape[-1] <= 1 or t.stride(-1) == 1) and _launchers().headwise_norm.rows_2d(t) is not None:
        return t
    return t.contiguous()


def _rows_of(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t


def _headwise_forward(a, wa, b, wb, eps, norm, triton):
    """``(ya, yb)`` (yb None without b), each of its input's shape, contiguous."""
    if triton:
        return _launchers().headwise_norm_forward(_headwise_for_kernels(a), _for_kernels(wa), _headwise_for_kernels(b),
                                                  _for_kernels(wb), eps, norm=norm)
    # Computed in the input's shape, not viewed into it: an autograd.Function's output that is a
    # view of a tensor made inside it cannot be modified in place (y.mul_(2) would raise).
    ya = reference.headwise_norm_forward(a.contiguous(), wa, eps, norm)
    yb = reference.headwise_norm_forward(b.contiguous(), wb, eps, norm) if b is not None else None
    return ya, yb


def _headwise_backward(dya, a, wa, dyb, b, wb, eps, norm, triton, dw_a, dw_b):
    """``(dxa, dxb, dwa, dwb)``, absent ones ``None``."""
    if triton:
        rows = lambda dy: None if dy is None else _for_kernels(_rows_of(dy))  # noqa: E731
        return _launchers().headwise_norm_backward(rows(dya), _headwise_for_kernels(a), _for_kernels(wa), rows(dyb),
                                                   _headwise_for_kernels(b), _for_kernels(wb), eps, norm=norm,
                                                   dw_a=dw_a, dw_b=dw_b)
    dxa, dwa = reference.headwise_norm_backward(_rows_of(dya).contiguous(), _rows_of(a).contiguous(), wa, eps, norm,
                                                dw_a and wa is not None)
    dxb = dwb = None
    if b is not None:
        dxb, dwb = reference.headwise_norm_backward(_rows_of(dyb).contiguous(), _rows_of(b).contiguous(), wb, eps,
                                                    norm, dw_b and wb is not None)
        dxb = dxb.view(b.shape)
    return dxa.view(a.shape), dxb, dwa, dwb


def _headwise_grads(ctx, dya, dyb, backward, reference=False):
    a, wa, b, wb = ctx.saved_tensors
    eps, norm, triton = ctx.meta
    triton = triton and not reference  # a batched backward (see _rowwise_grads)
    needs = ctx.needs_input_grad
    # An output nothing used gives its input and weight no gradient (None, as two separate norms
    # would: a zero one would still be decayed by AdamW) and its rows no work. The sides are
    # independent (each its own weight), so b's runs alone in a's place when only yb was used.
    if dya is None:
        if dyb is None:
            return None, None, None, None
        dxb, _, dwb, _ = backward(dyb, b, wb, None, None, None, eps, norm, triton, needs[3] and wb is not None, False)
        return None, None, dxb if needs[2] else None, dwb if needs[3] and wb is not None else None
    if dyb is None:
        b = wb = None
    dxa, dxb, dwa, dwb = backward(dya, a, wa, dyb, b, wb, eps, norm, triton, needs[1] and wa is not None,
                                  needs[3] and wb is not None)
    return (dxa if needs[0] else None, dwa if needs[1] and wa is not None else None,
            dxb if b is not None and needs[2] else None, dwb if needs[3] and wb is not None else None)


class _HeadwiseNorm(torch.autograd.Function):
    """The eager path (see :class:`_RowwiseNorm`); ``spec = (eps, norm, triton)``. Returns
    ``(ya, yb)``, yb None without b."""

    @staticmethod
    def forward(ctx, a, wa, b, wb, spec):
        ctx.save_for_backward(a, wa, b, wb)
        ctx.meta = spec
        ctx.set_materialize_grads(False)
        return _headwise_forward(a, wa, b, wb, *spec)

    @staticmethod
    def backward(ctx, dya, dyb):
        if _grad_enabled():  # create_graph=True: differentiable gradients, through the reference math
            return *_headwise_second_order(ctx, dya, dyb), None
        dy = dya if dya is not None else dyb  # neither (gradcheck asks so): _headwise_grads returns none
        if _functorch_transforms_active() or dy is not None and _is_legacy_batched(dy):  # batched: the reference
            return *_headwise_grads(ctx, dya, dyb, _headwise_backward, True), None
        return *_headwise_grads(ctx, dya, dyb, _headwise_backward), None


@torch.library.custom_op("normzoo::headwise_norm_fwd", mutates_args=())
def headwise_norm_fwd(a: Tensor, wa: Tensor | None, b: Tensor | None, wb: Tensor | None, eps: float, norm: str,
                      triton: bool) -> tuple[Tensor, Tensor]:
    """``(ya, yb)``; yb empty without b. See :func:`_headwise_forward`."""
    ya, yb = _headwise_forward(a, wa, b, wb, eps, norm, triton)
    return ya, yb if yb is not None else a.new_empty(0)


@headwise_norm_fwd.register_fake
def _(a, wa, b, wb, eps, norm, triton):
    return torch.empty(a.shape, dtype=a.dtype, device=a.device), (
        torch.empty(b.shape, dtype=b.dtype, device=b.device) if b is not None else a.new_empty(0))


@torch.library.custom_op("normzoo::headwise_norm_bwd", mutates_args=())
def headwise_norm_bwd(dya: Tensor, a: Tensor, wa: Tensor | None, dyb: Tensor | None, b: Tensor | None,
                      wb: Tensor | None, eps: float, norm: str, triton: bool, dw_a: bool,
                      dw_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dxa, dxb, dwa, dwb)``; a gradient not computed is an empty tensor."""
    grads = _headwise_backward(dya, a, wa, dyb, b, wb, eps, norm, triton, dw_a, dw_b)
    return tuple(g if g is not None else a.new_empty(0) for g in grads)


@headwise_norm_bwd.register_fake
def _(dya, a, wa, dyb, b, wb, eps, norm, triton, dw_a, dw_b):
    return (torch.empty(a.shape, dtype=a.dtype, device=a.device),
            torch.empty(b.shape, dtype=b.dtype, device=b.device) if b is not None else a.new_empty(0),
            wa.new_empty(wa.shape) if dw_a else a.new_empty(0), wb.new_empty(wb.shape) if dw_b else a.new_empty(0))


def _headwise_setup_context(ctx, inputs, output):
    a, wa, b, wb, eps, norm, triton = inputs
    ctx.save_for_backward(a, wa, b, wb)
    ctx.meta = (eps, norm, triton)
    ctx.set_materialize_grads(False)


def _headwise_second_order(ctx, dya, dyb):
    eps, norm, _ = ctx.meta
    composite = lambda *t: _headwise_forward(*t, eps, norm, False)  # noqa: E731
    return _second_order(composite, ctx.saved_tensors, ctx.needs_input_grad[:4], (dya, dyb))


def _headwise_custom_op_grads(ctx, dya, dyb):
    b = ctx.saved_tensors[2]  # without b, yb is the op's empty placeholder: its gradient means nothing
    if _grad_enabled() and not _is_compiling():  # create_graph=True in eager: as _HeadwiseNorm
        return (*_headwise_second_order(ctx, dya, dyb if b is not None else None), None, None, None)
    return (*_headwise_grads(ctx, dya, dyb if b is not None else None, headwise_norm_bwd), None, None, None)


headwise_norm_fwd.register_autograd(_headwise_custom_op_grads, setup_context=_headwise_setup_context)
_HEADWISE_C_APPLY = _c_apply(_HeadwiseNorm)


# The smallest eps whose square is a normal float32 (the L2 floor max(Σx², eps²) is computed there;
# a GPU flushes subnormals to 0): sqrt(2^-126).
_L2_EPS_MIN = 2.0 ** -63
# The largest float32 whose square is finite in float32, 2^64 - 2^40 (2^64's is inf, and so would be
# every row's norm floor).
_L2_EPS_MAX = 2.0 ** 64 - 2.0 ** 40


def _check_headwise_weight(w, name: str, x: Tensor, n: int) -> None:
    if w is None:
        return
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    # Spelled with ==, not `w.shape not in ((n,), (1,))`: under torch.compile(dynamic=True) n is a
    # SymInt, and Dynamo answers `in` over tuples holding one as never found (a ValueError at trace).
    if w.dim() != 1 or (w.shape[0] != n and w.shape[0] != 1):
        raise ValueError(f"{name} must have shape ({n},) (one value per channel) or (1,) (one scale), "
                         f"got {tuple(w.shape)}")
    if w.device != x.device:
        raise ValueError(f"{name} is on {w.device} but its input is on {x.device}; put them on the same device")
    if w.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} must have its input's dtype ({x.dtype}) or float32, got {w.dtype}")


def headwise_norm(a: Tensor, wa: Tensor | None, b: Tensor | None, wb: Tensor | None, eps, *, norm: str,
                  backend: str):
    """The rows (last dim) of ``a`` and, in the same launch, of ``b`` (or None), normalized as
    ``norm`` says (``"rms"``, ``"l2"``, ``"crms"``; see :func:`normzoo.reference.headwise_norm_forward`),
    each times its weight (None, per channel, or a (1,) scale). Any leading dims and strides: a view
    of a fused projection is read in place where its rows fold into two levels. Returns ``ya`` without
    b, else ``(ya, yb)``."""
    if norm not in HEADWISE_NORMS:
        raise ValueError(f"norm must be one of {HEADWISE_NORMS}, got {norm!r}")
    for t, name in ((a, "q" if b is not None else "input"), (b, "k")):
        if t is not None:
            check_input(t, name)
            if type(t) is not Tensor and t.is_nested:
                if b is not None:
                    raise TypeError("QK-norm takes q and k as plain tensors, not nested ones")
                return _on_jagged_values(lambda v: headwise_norm(v, wa, None, None, eps, norm=norm, backend=backend),
                                         a, 1)
            if t.dim() == 0:
                raise ValueError(f"{name} must have at least one dimension")
    _check_headwise_weight(wa, "q_weight" if b is not None else "scale" if norm == "l2" else "weight", a, a.shape[-1])
    if b is not None:
        if b.device != a.device:
            raise ValueError(f"q is on {a.device} but k is on {b.device}")
        _check_headwise_weight(wb, "k_weight", b, b.shape[-1])
        if wa is not None and wb is not None and (wa.numel() == 1) != (wb.numel() == 1):
            raise ValueError("q_weight and k_weight must both be per-channel or both be (1,) scales")
    eps = check_eps(eps)
    if norm == "l2" and 0.0 < eps < _L2_EPS_MIN and a.dtype is not torch.float64:
        raise ValueError(f"eps must be 0 or at least {_L2_EPS_MIN:.3g} for the L2 norm (its floor eps² underflows "
                         f"float32 below that), got {eps!r}")
    if norm == "l2" and eps > _L2_EPS_MAX and a.dtype is not torch.float64:
        raise ValueError(f"eps must be at most {_L2_EPS_MAX:.3g} for the L2 norm (its floor eps² overflows float32 "
                         f"above that), got {eps!r}")
    triton = use_triton(backend, a) and (b is None or b.dtype is not torch.float64)
    if triton and backend == "auto" and max(a.shape[-1], b.shape[-1] if b is not None else 0) > (
            _launchers().headwise_norm.MAX_N):  # no read of _kernels, which a trace may run: see _launchers
        triton = False  # rows longer than the kernels take: "auto" runs the reference (backend="triton" raises)
    if triton:
        refuse_dtensor(a, "QK-norm, ScaleNorm and CRMSNorm")
    spec = (eps, norm, triton)
    route = _route(a, wa, b, wb)
    if route == "custom_op":
        ya, yb = headwise_norm_fwd(a, wa, b, wb, *spec)
        yb = yb if b is not None else None
    elif route == "composite" or route == "reference":  # the reference, as torch ops (see _route)
        ya, yb = _headwise_forward(a, wa, b, wb, eps, norm, False)
    elif route == "function":
        ya, yb = (_HeadwiseNorm.apply if _HEADWISE_C_APPLY is None else _HEADWISE_C_APPLY)(a, wa, b, wb, spec)
    else:
        ya, yb = _headwise_forward(a, wa, b, wb, *spec)
    return ya if b is None else (ya, yb)


# torch.fx.symbolic_trace treats torch.nn's own modules as leaves and traces into any other's
# forward with Proxies, which these entry points would refuse as non-tensors: it records a call to
# each as one graph node instead (the traced module then calls it with real tensors), so a model
# traces after swap as it did before (FX quantization, torchvision's feature extraction).
torch.fx.wrap("rowwise_norm")
torch.fx.wrap("pointwise")
torch.fx.wrap("headwise_norm")


def decompositions() -> dict:
    """normzoo's forward ops as their reference math, for ``ExportedProgram.run_decompositions``:
    a graph of ATen ops only, for a runtime that cannot call back into Python and normzoo
    (ExecuTorch, an AOTInductor package run from C++, an ONNX export of a program already
    exported). Kernels off, whatever the trace chose: the graph runs anywhere, at the reference's
    speed. ``program.run_decompositions(normzoo.ops.decompositions())`` lowers normzoo's ops alone;
    add them to ``torch.export.default_decompositions()`` for core ATen. The backward ops are left
    out: an exported program has none."""
    from .fused import _as_op_outputs, _fused_forward

    def rowwise(x, weight, bias, eps, is_rms, triton, weight_offset=0.0, round_x_hat=0, out_dtype=None):
        return _rowwise_forward(x, weight, bias, eps, is_rms, False, weight_offset, round_x_hat, out_dtype)

    def pointwise(x, alpha, shift, weight, bias, activation, channels, params_per_row, triton):
        return _pointwise_forward(x, alpha, shift, weight, bias, activation, channels, params_per_row, False)

    def headwise(a, wa, b, wb, eps, norm, triton):
        ya, yb = _headwise_forward(a, wa, b, wb, eps, norm, False)
        return ya, yb if yb is not None else a.new_empty(0)  # as the op

    def fused_residual(h, x, w1, b1, a1, sh1, w2, b2, a2, sh2, kind, mode, eps1, eps2, scale, sum_dtype, triton,
                       weight_offset=0.0, round_x_hat=0):
        return _as_op_outputs(mode, h, _fused_forward(h, x, (w1, b1, a1, sh1), (w2, b2, a2, sh2), kind, mode, eps1,
                                                      eps2, scale, sum_dtype, False, weight_offset, round_x_hat))

    normzoo = torch.ops.normzoo
    return {normzoo.rowwise_norm_fwd.default: rowwise, normzoo.pointwise_fwd.default: pointwise,
            normzoo.headwise_norm_fwd.default: headwise, normzoo.fused_residual_fwd.default: fused_residual}
