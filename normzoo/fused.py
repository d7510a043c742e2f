"""Norms fused with the residual add next to them: every placement of a norm in a residual block.

With ``x`` the residual stream, ``h`` a sublayer's output and ``N`` a norm (LayerNorm, RMSNorm,
DyT or Derf), each op reads its inputs once and writes its outputs once:

    add_norm       s = x + h,       y = N(s)·scale   -> (y, s)   pre-norm; Post-LN's N(x + F(x)) is its y
    norm_add       s = x + N(h)                      -> s        Peri-LN's output norm
    norm_add_norm  s = x + N(h),    y = N2(s)·scale  -> (y, s)   Peri-LN between sublayers

``scale`` is LayerNorm scaling's 1/√l folded into the norm's output. ``s`` is stored in the
promoted dtype of x and h, or ``residual_dtype`` (an fp32 residual stream beside 16-bit
activations); ``y`` in h's dtype. The norm sees ``s`` as stored, so the forward equals the unfused
sequence up to rounding of ``y``, and the backward differentiates what the forward computed. An
RMSNorm with ``x_hat_dtype`` (a model's own rounding of x̂ before its weight: Llama's, T5's) rounds
as that model does, and y is in the dtype it returns for s: add_norm is then the model's
``norm(x + h)``; both norms of norm_add_norm share the setting.

Backward, with dy and ds the incoming gradients (either may be absent), J the norm's Jacobian:

    add_norm       dx = dh = ds + Jᵀ(dy·scale)
    norm_add       dx = ds,  dh = J_Nᵀ ds
    norm_add_norm  dx = ds + J_N2ᵀ(dy·scale),  dh = J_Nᵀ dx

Without dy (y unused), the norm on s is not in the graph, as in the unfused sequence: its
parameters get no gradient (None, not zeros) and no backward runs for it. (A compiled region
that returns y hands it a zero gradient, AOTAutograd's rule, and so zeros, as torch's norms get.)

norm_add_norm's two backwards run in one pass on the Triton path (dh from dx as computed, in fp32),
but for LayerNorm/RMSNorm rows wider than one fused tile, which take two kernels (each with its
reduce: 4 launches).

As for the plain norms (:mod:`normzoo.ops`): eager calls go through an ``autograd.Function``,
traced ones through the registered custom ops ``normzoo::fused_residual_fwd``/``_bwd``, and both
run the same implementation (the Triton launchers or the reference).
"""

import math
import numbers
import warnings

import torch
from torch import Tensor
from torch.nn.modules import module as _module_hooks
from torch.nn.utils import parametrize

from . import layers, ops, reference
from .ops import _Parameter, _route, _unwrap_if_dead, check_affine, check_eps, normalized_shape_tuple

MODES = ("add_norm", "norm_add", "norm_add_norm")
_FLOAT = ops.FLOAT_DTYPES
_FP64 = torch.float64
KINDS = ("layernorm", "rmsnorm", "dyt", "derf")
_ROWWISE = ("layernorm", "rmsnorm")


# ----------------------------------------------------------------------------------------------
# One implementation, forward and backward (Triton launchers or the reference)
# ----------------------------------------------------------------------------------------------
# A layer's parameters travel as (weight, bias, alpha, shift): alpha and shift are None for the
# row-wise norms. Row-wise statistics are as the plain ops keep them (rstd, or mean then rstd).


def _promoted(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """torch.promote_types for float dtypes, without a dispatcher call on every op."""
    if a is b:
        return a
    if torch.float64 in (a, b):
        return torch.float64
    return torch.float32  # fp32 with anything, or fp16 with bf16


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _no_stats(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=reference.compute_dtype(like.dtype))


def _reference_norm(v, params, kind, eps, out_dtype, scale, weight_offset=0.0, round_x_hat=0, differentiable=False,
                    with_stats=True):
    """(y, stats) of one layer on 2-D v, computed in fp32 (fp64 for fp64) and y·scale rounded once
    to out_dtype, as the kernels store it. ``differentiable``: the composite path's DyT
    (reference.pointwise_forward). ``with_stats=False``: stats None (no backward follows)."""
    weight, bias, alpha, shift = params
    acc = reference.compute_dtype(v.dtype)
    if kind in _ROWWISE:  # the plain ops' reference path: the same statistics layout, y kept in acc
        y, stats = ops._rowwise_forward(v, weight, bias, eps, kind == "rmsnorm", False, weight_offset, round_x_hat,
                                        acc, with_stats)
    else:  # DyT/Derf keep none
        y = reference.pointwise_forward(v.to(acc), alpha, shift, weight, bias, _ACTIVATION[kind], v.shape[1], False,
                                        differentiable)
        stats = None
    return (y * scale if scale != 1.0 else y).to(out_dtype), stats


_ACTIVATION = {"dyt": "tanh", "derf": "erf"}
# RMSNorm's x_hat_dtype as the kernels' round_x_hat code (X_HAT_ROUNDING): in a fused op each norm
# rounds x_hat to its own input's (the sum's or h's) or weight's dtype, and a rounding to fp32 is none.
_ROUNDING = {x_hat_dtype: code for code, x_hat_dtype in enumerate(ops._X_HAT_DTYPES)}


def _y_dtype(round_x_hat, h_dtype, s_dtype, weight):
    """y's dtype: h's (the sublayer's activations), or where the norm on s rounds x_hat as a model
    does (``x_hat_dtype``), what that norm returns for s: the fused op is then the model's own
    ``norm(x + h)``."""
    if not round_x_hat:
        return h_dtype
    return ops.x_hat_out_dtype(ops._X_HAT_DTYPES[round_x_hat], s_dtype, weight)


def _params_for_kernels(params: tuple) -> tuple:
    """A layer's (weight, bias, alpha, shift) through :func:`ops._for_kernels`, in one test where
    each is absent or contiguous (the rule)."""
    for p in params:
        if p is not None and not p.is_contiguous():
            return tuple(map(ops._for_kernels, params))
    return params


def _as_op_outputs(mode: str, h: Tensor, output: tuple) -> tuple:
    """:func:`_fused_forward`'s output as the custom op returns it (its schema's four tensors):
    an absent y or statistics as empty tensors, in the dtypes its fake gives them."""
    y, s, stats1, stats2 = output
    return (y if y is not None else _empty(h), s,
            stats1 if stats1 is not None else _no_stats(s if mode == "add_norm" else h),
            stats2 if stats2 is not None else _no_stats(s))


def _fused_forward(h, x, p1, p2, kind, mode, eps1, eps2, scale, sum_dtype, triton, weight_offset=0.0, round_x_hat=0,
                   differentiable=False, with_stats=True):
    """``(y, s, stats1, stats2)`` on 2-D ``h`` and ``x``; ``y`` None for norm_add, stats None where a
    layer keeps none (DyT/Derf) or there is no second norm (the custom op returns empty tensors
    there: :func:`_as_op_outputs`; allocating them costs the eager path's host time). ``stats1``
    belongs to N (on s for add_norm, on h otherwise), ``stats2`` to N2 (on s). ``weight_offset``,
    ``round_x_hat``: both norms' (rowwise; see :data:`_ROUNDING`). ``differentiable``: the
    composite path (see :func:`_reference_norm`). ``with_stats=False``: no backward follows, the
    kernels store no statistics and both are ``None``."""
    s_dtype = sum_dtype or _promoted(x.dtype, h.dtype)
    y_dtype = h.dtype if not round_x_hat else _y_dtype(round_x_hat, h.dtype, s_dtype,
                                                        (p1 if mode == "add_norm" else p2)[0])
    if triton:
        k = ops._launchers()
        # ops._for_kernels's first test inline: contiguous tensors are the rule.
        h = h if h.is_contiguous() else ops._for_kernels(h)
        x = x if x.is_contiguous() else ops._for_kernels(x)
        p1, p2 = _params_for_kernels(p1), _params_for_kernels(p2)
        if kind in _ROWWISE:
            y, s, stats1, stats2 = k.rowwise_residual_forward(
                h, x, p1[0], p1[1], eps1, is_rms=kind == "rmsnorm", mode=mode, scale=scale, sum_dtype=s_dtype,
                weight2=p2[0], bias2=p2[1], eps2=eps2, weight_offset=weight_offset, round_x_hat=round_x_hat,
                out_dtype=y_dtype if round_x_hat else None, with_stats=with_stats)
        else:
            y, s = k.pointwise_residual_forward(h, x, p1[2], p1[3], p1[0], p1[1], activation=_ACTIVATION[kind],
                                                mode=mode, scale=scale, sum_dtype=s_dtype,
                                                layer2=(p2[2], p2[3], p2[0], p2[1]))
            stats1 = stats2 = None
        return y, s, stats1, stats2
    h, x = h.contiguous(), x.contiguous()
    acc = reference.compute_dtype(s_dtype)
    if mode == "add_norm":
        s = (x.to(acc) + h.to(acc)).to(s_dtype)
        y, stats1 = _reference_norm(s, p1, kind, eps1, y_dtype, scale, weight_offset, round_x_hat, differentiable,
                                    with_stats)
        return y, s, stats1, None
    o, stats1 = _reference_norm(h, p1, kind, eps1, acc, 1.0, weight_offset, round_x_hat, differentiable, with_stats)
    s = (x.to(acc) + o).to(s_dtype)
    if mode == "norm_add":
        return None, s, stats1, None
    y, stats2 = _reference_norm(s, p2, kind, eps2, y_dtype, scale, weight_offset, round_x_hat, differentiable,
                                with_stats)
    return y, s, stats1, stats2


def _norm_backward(dy, v, params, stats, kind, compute_dw, db_dtype, triton, dres=None, dx_dtype=None,
                   dx2_dtype=None, scale=1.0, weight_offset=0.0, round_x_hat=0):
    """``(dv, dv2, grads)`` of one layer on its input v: dv = dres + Jᵀ(dy·scale) in dx_dtype (and
    again in dx2_dtype), grads = (dweight, dbias, dalpha, dshift), absent ones None."""
    weight, _, alpha, shift = params
    dx_dtype = dx_dtype or v.dtype
    if triton:
        k = ops._launchers()
        v, dy, dres = ops._for_kernels(v), ops._for_kernels(dy), ops._for_kernels(dres)
        # The saved parameters are the caller's, not the forward's _for_kernels copies: a strided
        # 1-D weight would be read as contiguous (alpha and shift are one element: as they lie).
        weight = ops._for_kernels(weight)
        if kind in _ROWWISE:
            dv, dv2, dw, db = k.rowwise_residual_backward(
                dy, v, weight, stats, is_rms=kind == "rmsnorm", compute_dw=compute_dw, db_dtype=db_dtype, dres=dres,
                dx_dtype=dx_dtype, dx2_dtype=dx2_dtype, scale=scale, weight_offset=weight_offset,
                round_x_hat=round_x_hat)
            return dv, dv2, (dw, db, None, None)
        dv, dv2, dalpha, dshift, dw, db = k.pointwise_residual_backward(
            dy, v, alpha, shift, weight, activation=_ACTIVATION[kind], compute_dw=compute_dw, db_dtype=db_dtype,
            dres=dres, dx_dtype=dx_dtype, dx2_dtype=dx2_dtype, scale=scale)
        return dv, dv2, (dw, db, dalpha, dshift)
    acc = reference.compute_dtype(v.dtype)
    dy = dy.to(acc) * scale if scale != 1.0 else dy
    if kind in _ROWWISE:  # the plain ops' reference path
        dv, dw, db = ops._rowwise_backward(dy, v.to(acc), weight, stats, kind == "rmsnorm", compute_dw, db_dtype,
                                           False, weight_offset, round_x_hat, v.dtype)
        grads = (dw, db, None, None)
    else:
        dv, dalpha, dshift, dw, db = ops._pointwise_backward(dy, v.to(acc), alpha, shift, weight, _ACTIVATION[kind],
                                                             v.shape[1], False, compute_dw, db_dtype, False)
        grads = (dw, db, dalpha, dshift)
    if dres is not None:
        dv = dv + dres.to(acc)
    return dv.to(dx_dtype), dv.to(dx2_dtype) if dx2_dtype is not None else None, grads


def _ds_as(ds, dtype):
    """The sum's gradient passed on as dx or dh: ds itself in its dtype, else a contiguous cast. A
    plain cast keeps a transposed ds's strides, and the backward op's fake says contiguous
    (Inductor asserts the strides its fake gave)."""
    return ds if ds.dtype == dtype else ds.to(dtype, memory_format=torch.contiguous_format)


def _fused_backward(dy, ds, h, s, p1, p2, stats1, stats2, kind, mode, scale, x_dtype, h_dtype, needs, db_dtypes,
                    triton, weight_offset=0.0, round_x_hat=0):
    """``(dx, dh, grads1, grads2)``: gradients of :func:`_fused_forward` for the incoming ``dy``
    (None for norm_add) and ``ds`` (either may be None: an output nothing used). ``needs`` =
    (dweight1, dweight2) to compute; ``db_dtypes`` the biases' dtypes, None for no bias gradient."""
    (dw1, dw2), (db1, db2) = needs, db_dtypes
    none = (None, None, None, None)
    if dy is None:  # y unused: its norm is not in the graph, and its parameters get no gradient (None)
        if mode == "add_norm":
            if ds is None:
                return None, None, none, none
            dx = _ds_as(ds, x_dtype)
            return dx, (dx if h_dtype == x_dtype else _ds_as(ds, h_dtype)), none, none
        mode = "norm_add"  # norm_add_norm without its second norm
    if mode == "norm_add":
        if ds is None:
            return None, None, none, none
        dh, _, grads1 = _norm_backward(ds, h, p1, stats1, kind, dw1, db1, triton, dx_dtype=h_dtype,
                                       weight_offset=weight_offset, round_x_hat=round_x_hat)
        return _ds_as(ds, x_dtype), dh, grads1, none
    # add_norm: the norm N on s; norm_add_norm: N2 on s, then N on h with ds + J_N2ᵀ dy.
    params, stats, needs_w, db_dtype = (p1, stats1, dw1, db1) if mode == "add_norm" else (p2, stats2, dw2, db2)
    if mode == "add_norm":
        two_dtypes = h_dtype != x_dtype
        dx, dh, grads = _norm_backward(dy, s, params, stats, kind, needs_w, db_dtype, triton, dres=ds,
                                       dx_dtype=x_dtype, dx2_dtype=h_dtype if two_dtypes else None, scale=scale,
                                       weight_offset=weight_offset, round_x_hat=round_x_hat)
        return dx, (dh if two_dtypes else dx), grads, none
    if triton:  # both layers' backward in one launcher: one pass (row-wise norms: where a row is one tile)
        k = ops._launchers()
        dy, ds, s, h = ops._for_kernels(dy), ops._for_kernels(ds), ops._for_kernels(s), ops._for_kernels(h)
        p1 = (ops._for_kernels(p1[0]), *p1[1:])  # the weights as in _norm_backward
        p2 = (ops._for_kernels(p2[0]), *p2[1:])
        if kind in _ROWWISE:
            dx, dh, dw1_, db1_, dw2_, db2_ = k.rowwise_peri_backward(
                dy, ds, s, p2[0], stats2, h, p1[0], stats1, is_rms=kind == "rmsnorm", compute_dw1=dw1,
                db1_dtype=db1, compute_dw2=dw2, db2_dtype=db2, dx_dtype=x_dtype, dh_dtype=h_dtype, scale=scale,
                weight_offset=weight_offset, round_x_hat=round_x_hat)
            return dx, dh, (dw1_, db1_, None, None), (dw2_, db2_, None, None)
        dx, dh, (da1, dsh1, dw1_, db1_), (da2, dsh2, dw2_, db2_) = k.pointwise_peri_backward(
            dy, ds, s, (p2[2], p2[3], p2[0]), h, (p1[2], p1[3], p1[0]), activation=_ACTIVATION[kind],
            compute_dw1=dw1, db1_dtype=db1, compute_dw2=dw2, db2_dtype=db2, dx_dtype=x_dtype, dh_dtype=h_dtype,
            scale=scale)
        return dx, dh, (dw1_, db1_, da1, dsh1), (dw2_, db2_, da2, dsh2)
    # The reference: N2's backward, then N's on the sum's gradient at fp32 (as the kernels hold it
    # in registers), not as rounded into a 16-bit dx.
    wide = torch.float32 if x_dtype in (torch.float16, torch.bfloat16) else None
    dx, dx_wide, grads = _norm_backward(dy, s, params, stats, kind, needs_w, db_dtype, False, dres=ds,
                                        dx_dtype=x_dtype, dx2_dtype=wide, scale=scale, weight_offset=weight_offset,
                                        round_x_hat=round_x_hat)
    dh, _, grads1 = _norm_backward(dx_wide if wide else dx, h, p1, stats1, kind, dw1, db1, False, dx_dtype=h_dtype,
                                   weight_offset=weight_offset, round_x_hat=round_x_hat)
    return dx, dh, grads1, grads


# ----------------------------------------------------------------------------------------------
# The eager autograd.Function and the custom ops
# ----------------------------------------------------------------------------------------------


def _save(ctx, h, x, p1, p2, spec, output, save_s=True, leaves=(False, False)):
    """Saves what the backward reads; the rest as one attribute, ``ctx.info = (spec, x's dtype,
    h's dtype, the biases' dtypes, leaves)`` (each attribute set on ctx costs host time)."""
    mode = spec[1]
    y, s, stats1, stats2 = output
    ctx.save_for_backward(h if mode != "add_norm" else None, s if save_s else None, *p1, *p2, stats1, stats2)
    ctx.info = (spec, x.dtype, h.dtype,
                (p1[1].dtype if p1[1] is not None else None, p2[1].dtype if p2[1] is not None else None), leaves)


def _grads(ctx, dy, ds, backward, reference=False):
    """Gradients for (h, x, *p1, *p2), from ``backward`` (the implementation or the custom op);
    ``reference``: on the reference, whatever the forward ran (a batched backward)."""
    h, s, *rest = ctx.saved_tensors
    p1, p2, (stats1, stats2) = tuple(rest[0:4]), tuple(rest[4:8]), rest[8:10]
    spec, x_dtype, h_dtype, (db1_dtype, db2_dtype), _ = ctx.info
    kind, mode, _, _, scale, _, triton, weight_offset, round_x_hat = spec
    needs = ctx.needs_input_grad
    needs_h, needs_x, needs1, needs2 = needs[0], needs[1], needs[2:6], needs[6:10]
    compute = (p1[0] is not None and needs1[0], p2[0] is not None and needs2[0])
    db_dtypes = (db1_dtype if needs1[1] else None, db2_dtype if needs2[1] else None)
    dx, dh, grads1, grads2 = backward(dy, ds, h, s, p1, p2, stats1, stats2, kind, mode, scale, x_dtype,
                                      h_dtype, compute, db_dtypes, triton and not reference, weight_offset,
                                      round_x_hat)
    keep = lambda g, need: g if need else None
    return (keep(dh, needs_h), keep(dx, needs_x), *map(keep, grads1, needs1), *map(keep, grads2, needs2))


class _FusedResidual(torch.autograd.Function):
    """The eager path (see :class:`normzoo.ops._RowwiseNorm`). ``spec`` = (kind, mode, eps1, eps2,
    scale, sum_dtype, triton, weight_offset, round_x_hat). Statistics stay on ctx; ``s`` is returned
    and saved."""

    @staticmethod
    def forward(ctx, h, x, w1, b1, a1, sh1, w2, b2, a2, sh2, spec, leaves):
        output = _fused_forward(h, x, (w1, b1, a1, sh1), (w2, b2, a2, sh2), *spec)
        # norm_add's backward never reads s: not saving it keeps an in-place edit of s legal.
        _save(ctx, h, x, (w1, b1, a1, sh1), (w2, b2, a2, sh2), spec, output, spec[1] != "norm_add", leaves)
        ctx.set_materialize_grads(False)
        return output[0], output[1]  # y None for norm_add

    @staticmethod
    def backward(ctx, dy, ds):
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, through the reference math
            dh, dx, *rest = _second_order_grads(ctx, dy, ds)
        else:
            # A batched backward (see ops._rowwise_grads) runs the reference. Neither gradient
            # (gradcheck's undefined-gradient check) is no batch: _grads returns none.
            g = dy if dy is not None else ds
            batched = ops._functorch_transforms_active() or (g is not None and ops._is_legacy_batched(g))
            dh, dx, *rest = _grads(ctx, dy, ds, _fused_backward, batched)
        # add_norm hands one tensor to both inputs, norm_add hands ds itself to x (no copy: the
        # engine passes gradients on read-only). A leaf would keep such a tensor as its .grad and
        # share it (with the other input's .grad, or the caller's ds) from then on: copy for leaves.
        leaf_h, leaf_x = ctx.info[4]
        if dh is not None and leaf_h and (dh is dx or dh is ds):
            dh = dh.clone()
        if dx is not None and leaf_x and (dx is dh or dx is ds):
            dx = dx.clone()
        return dh, dx, *rest, None, None


_FUSED_C_APPLY = ops._c_apply(_FusedResidual)


def _second_order_grads(ctx, dy, ds):
    """Gradients for (h, x, *p1, *p2) as :func:`_grads` gives them, for a backward run with
    ``create_graph=True``: autograd through the reference math (:func:`ops._second_order`), so they
    are differentiable in turn. The forward keeps neither x nor h (add_norm) nor x (the others),
    and needs none: x and h reach the outputs only through s = x + h, or x only through
    s = x + N1(h), so ∂/∂x is ∂/∂s and the norm on s is differentiated at the saved s. s is an output
    of this op: the second-order terms that flow back through it come back here as ds."""
    h, s, *rest = ctx.saved_tensors
    p1, p2 = tuple(rest[0:4]), tuple(rest[4:8])
    spec, x_dtype, h_dtype, _, _ = ctx.info
    kind, mode, eps1, eps2, scale, _, _, weight_offset, round_x_hat = spec
    needs = ctx.needs_input_grad
    needs_h, needs_x, needs1, needs2 = needs[0], needs[1], needs[2:6], needs[6:10]

    def norm(eps, out_dtype, scale):
        return lambda v, *p: _reference_norm(v, p, kind, eps, out_dtype, scale, weight_offset, round_x_hat, True)[0]

    grads1, grads2 = (None,) * 4, (None,) * 4
    ds_total = ds  # the gradient reaching s: ds, plus what y = N(s) sends back
    if mode != "norm_add" and dy is not None:
        params, wanted = (p1, needs1) if mode == "add_norm" else (p2, needs2)
        y_dtype = dy.dtype  # the output's own dtype (autograd hands dy in it)
        gs, *grads = ops._second_order(norm(eps1 if mode == "add_norm" else eps2, y_dtype, scale), (s, *params),
                                       (True, *wanted), (dy,))
        ds_total = gs if ds is None else ds + gs
        if mode == "add_norm":
            grads1 = tuple(grads)
        else:
            grads2 = tuple(grads)
    if ds_total is None:
        return (None,) * 10
    dx = ds_total.to(x_dtype) if needs_x else None
    if mode == "add_norm":
        dh = ds_total.to(h_dtype) if needs_h else None
    else:  # s = x + N1(h), N1's output in the compute dtype, then rounded to s's dtype
        acc = reference.compute_dtype(s.dtype if s is not None else ds_total.dtype)
        dh, *grads = ops._second_order(norm(eps1, acc, 1.0), (h, *p1), (needs_h, *needs1), (ds_total.to(acc),))
        grads1 = tuple(grads)
        dh = dh.to(h_dtype) if dh is not None else None
    return (dh, dx, *grads1, *grads2)


@torch.library.custom_op("normzoo::fused_residual_fwd", mutates_args=())
def fused_residual_fwd(
    h: Tensor, x: Tensor, w1: Tensor | None, b1: Tensor | None, a1: Tensor | None, sh1: Tensor | None,
    w2: Tensor | None, b2: Tensor | None, a2: Tensor | None, sh2: Tensor | None,
    kind: str, mode: str, eps1: float, eps2: float, scale: float, sum_dtype: torch.dtype | None, triton: bool,
    weight_offset: float = 0.0, round_x_hat: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, s, stats1, stats2)`` for 2-D ``h``, ``x``; see :func:`_fused_forward`."""
    return _as_op_outputs(mode, h, _fused_forward(h, x, (w1, b1, a1, sh1), (w2, b2, a2, sh2), kind, mode, eps1, eps2,
                                                  scale, sum_dtype, triton, weight_offset, round_x_hat))


@fused_residual_fwd.register_fake
def _(h, x, w1, b1, a1, sh1, w2, b2, a2, sh2, kind, mode, eps1, eps2, scale, sum_dtype, triton, weight_offset=0.0,
      round_x_hat=0):
    rows = h.shape[0]
    stats_len = (rows if kind == "rmsnorm" else 2 * rows) if kind in _ROWWISE else 0
    s_dtype = sum_dtype or _promoted(x.dtype, h.dtype)
    # Statistics in the compute dtype of the tensor they describe (fp32, or fp64 on the reference).
    stats1_dtype = reference.compute_dtype(s_dtype if mode == "add_norm" else h.dtype)
    stats2_dtype = reference.compute_dtype(s_dtype)
    y_dtype = _y_dtype(round_x_hat, h.dtype, s_dtype, w1 if mode == "add_norm" else w2)
    return (h.new_empty(h.shape, dtype=y_dtype) if mode != "norm_add" else h.new_empty(0),
            h.new_empty(h.shape, dtype=s_dtype), h.new_empty((stats_len,), dtype=stats1_dtype),
            h.new_empty((stats_len if mode == "norm_add_norm" else 0,), dtype=stats2_dtype))


@torch.library.custom_op("normzoo::fused_residual_bwd", mutates_args=())
def fused_residual_bwd(
    dy: Tensor | None, ds: Tensor | None, h: Tensor | None, s: Tensor,
    w1: Tensor | None, b1: Tensor | None, a1: Tensor | None, sh1: Tensor | None,
    w2: Tensor | None, b2: Tensor | None, a2: Tensor | None, sh2: Tensor | None, stats1: Tensor, stats2: Tensor,
    kind: str, mode: str, scale: float, x_dtype: torch.dtype, h_dtype: torch.dtype, compute_dw1: bool, compute_dw2: bool,
    db1_dtype: torch.dtype | None, db2_dtype: torch.dtype | None, triton: bool, weight_offset: float = 0.0,
    round_x_hat: int = 0,
) -> list[Tensor]:
    """Returns ``[dx, dh, *grads1, *grads2]`` (grads: dweight, dbias, dalpha, dshift); a gradient
    not computed is an empty tensor. An output may not alias an input or another output, so where
    the gradient is one the autograd formula already has (:func:`_aliased`), it is empty too."""
    dx, dh, grads1, grads2 = _fused_backward(dy, ds, h, s, (w1, b1, a1, sh1), (w2, b2, a2, sh2), stats1, stats2, kind,
                                             mode, scale, x_dtype, h_dtype, (compute_dw1, compute_dw2),
                                             (db1_dtype, db2_dtype), triton, weight_offset, round_x_hat)
    alias_dx, alias_dh = _aliased(mode, x_dtype, h_dtype, dy, ds)
    dx, dh = (None if alias_dx else dx), (None if alias_dh else dh)
    return [g if g is not None else s.new_empty(0) for g in (dx, dh, *grads1, *grads2)]


def _aliased(mode, x_dtype, h_dtype, dy, ds) -> tuple[bool, bool]:
    """Which of (dx, dh) is not a new tensor: dx is ds itself where no norm lies between them
    (norm_add, and the others without dy); add_norm's dh is dx, or without dy ds itself (see
    :func:`_aliased_dh`)."""
    passes_ds = dy is None and ds is not None
    return ((mode == "norm_add" or passes_ds) and ds is not None and ds.dtype == x_dtype,
            mode == "add_norm" and (h_dtype == x_dtype or (passes_ds and ds.dtype == h_dtype)))


def _aliased_dh(dx, ds, x_dtype, h_dtype):
    """add_norm's dh where :func:`_aliased` says it is no new tensor: dx, or ds (no dy, dx cast)."""
    return dx if h_dtype == x_dtype else ds


@fused_residual_bwd.register_fake
def _(dy, ds, h, s, w1, b1, a1, sh1, w2, b2, a2, sh2, stats1, stats2, kind, mode, scale, x_dtype, h_dtype,
      compute_dw1, compute_dw2, db1_dtype, db2_dtype, triton, weight_offset=0.0, round_x_hat=0):
    def empty():  # a new one each time, as the op makes them (one shared would alias across outputs)
        return s.new_empty(0)

    absent = ds is None and (mode == "norm_add" or dy is None)  # no gradient reaches x or h
    alias_dx, alias_dh = _aliased(mode, x_dtype, h_dtype, dy, ds)
    dx = empty() if absent or alias_dx else s.new_empty(s.shape, dtype=x_dtype)
    dh = empty() if absent or alias_dh else s.new_empty(s.shape, dtype=h_dtype)
    n = s.shape[1]

    def grads(w, b, a, sh, compute_dw, db_dtype, active):
        if not active:
            return [empty() for _ in range(4)]
        return [s.new_empty((n,), dtype=w.dtype) if compute_dw else empty(),
                s.new_empty((n,), dtype=db_dtype) if db_dtype is not None else empty(),
                a.new_empty((1,)) if a is not None else empty(), sh.new_empty((1,)) if sh is not None else empty()]

    # A norm whose output nothing used (add_norm's, norm_add_norm's second: no dy) takes no gradient.
    first_active = dy is not None if mode == "add_norm" else not absent
    second_active = mode == "norm_add_norm" and dy is not None
    return [dx, dh, *grads(w1, b1, a1, sh1, compute_dw1, db1_dtype, first_active),
            *grads(w2, b2, a2, sh2, compute_dw2, db2_dtype, second_active)]


def _custom_op_backward(dy, ds, h, s, p1, p2, stats1, stats2, kind, mode, scale, x_dtype, h_dtype, needs, db_dtypes,
                        triton, weight_offset, round_x_hat):
    out = fused_residual_bwd(dy, ds, h, s, *p1, *p2, stats1, stats2, kind, mode, scale, x_dtype, h_dtype, *needs,
                             *db_dtypes, triton, weight_offset, round_x_hat)
    out = [g if g.numel() or g.dim() != 1 or g.shape[0] != 0 else None for g in out]
    alias_dx, alias_dh = _aliased(mode, x_dtype, h_dtype, dy, ds)
    dx = ds if alias_dx else out[0]
    return dx, (_aliased_dh(dx, ds, x_dtype, h_dtype) if alias_dh else out[1]), tuple(out[2:6]), tuple(out[6:10])


def _setup_context(ctx, inputs, output):
    (h, x, w1, b1, a1, sh1, w2, b2, a2, sh2, kind, mode, eps1, eps2, scale, sum_dtype, triton, weight_offset,
     round_x_hat) = inputs
    _save(ctx, h, x, (w1, b1, a1, sh1), (w2, b2, a2, sh2),
          (kind, mode, eps1, eps2, scale, sum_dtype, triton, weight_offset, round_x_hat), output)
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)


def _custom_op_grads(ctx, dy, ds, _d1, _d2):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True in eager: as _FusedResidual
        return (*_second_order_grads(ctx, dy, ds), *(None,) * 9)
    return (*_grads(ctx, dy, ds, _custom_op_backward), *(None,) * 9)


fused_residual_fwd.register_autograd(_custom_op_grads, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Entry point: a layer description, checks, rows
# ----------------------------------------------------------------------------------------------


def describe(norm) -> tuple[str, tuple, float, tuple[int, ...], str]:
    """``(kind, (weight, bias, alpha, shift), eps, normalized_shape, backend)`` of a norm module:
    normzoo's LayerNorm, RMSNorm, DyT, Derf, or torch's LayerNorm / RMSNorm (backend "auto")."""
    # Exact classes only: the ops read a norm's parameters and never call it, so a subclass with
    # its own forward would be silently ignored. torch.nn.utils.parametrize makes a subclass of the
    # module's class that only moves parameters behind properties, which the ops read as the layer does.
    cls = type(norm)
    # (A lookup in _modules: a getattr miss on the module costs more; not a module: the TypeError below.)
    if "parametrizations" in getattr(norm, "_modules", ()) and parametrize.is_parametrized(norm):
        cls = cls.__bases__[0]
    if cls in (torch.nn.LayerNorm, layers.LayerNorm):
        kind, eps = "layernorm", norm.eps
    elif cls in (torch.nn.RMSNorm, layers.RMSNorm):
        kind, eps = "rmsnorm", norm.eps
    elif cls in (layers.DyT, layers.Derf):
        if not norm.channels_last:
            raise ValueError("fused residual ops take channels-last DyT/Derf (a residual stream is (..., C))")
        kind, eps = ("dyt" if isinstance(norm, layers.DyT) else "derf"), 0.0
    else:
        if any(base.__name__ == "FSDPModule" for base in type(norm).__mro__):
            # FSDP2's fully_shard makes the norm's class a subclass and unshards its parameters in a
            # forward pre-hook, which a fused op (it never calls the norm) would not run.
            raise ValueError(f"this {type(norm).__name__.removeprefix('FSDP')} is an FSDP unit of its own "
                             "(fully_shard on the norm); "
                             "a fused residual op reads a norm's parameters and never calls it, so FSDP would not "
                             "unshard them: leave the norms in an enclosing unit (fully_shard each sublayer, then "
                             "the ResidualStack or the model around them)")
        raise TypeError("norm must be a normzoo LayerNorm, RMSNorm, DyT or Derf, or torch.nn.LayerNorm / RMSNorm "
                        f"(the class itself, not a subclass), got {type(norm).__name__}")
    if norm._forward_pre_hooks or norm._forward_hooks or norm._backward_pre_hooks or norm._backward_hooks:
        # Module hooks run only when the module is called, which a fused op never does: the old
        # torch.nn.utils.weight_norm's pre-hook recomputes `weight`, which would be read stale.
        raise ValueError(f"this {type(norm).__name__} has module hooks, which a fused residual op does not run (it "
                         "reads the norm's parameters, never calls it); remove them or use the norm and the add "
                         "apart (for the old weight_norm: torch.nn.utils.parametrizations.weight_norm applies)")
    if ((_module_hooks._global_forward_pre_hooks or _module_hooks._global_forward_hooks
         or _module_hooks._global_backward_pre_hooks or _module_hooks._global_backward_hooks)
            and not torch.compiler.is_compiling() and _user_global_hooks()):
        # Not this norm's own hooks (those are refused above) but every module's: say they miss it
        # (in eager: dynamo cannot trace warnings.warn).
        warnings.warn(f"global module hooks (torch.nn.modules.module.register_module_forward_hook and the like) do "
                      f"not run for this {type(norm).__name__}: a fused residual op reads a norm's parameters and "
                      "never calls it", stacklevel=4)
    # As the layers read them (parametrizations apply): from _parameters where registered there.
    params, get = norm._parameters, layers._param
    weight = params["weight"] if "weight" in params else get(norm, "weight")
    bias = (params["bias"] if "bias" in params else get(norm, "bias")) if kind != "rmsnorm" else None
    alpha = get(norm, "alpha") if kind == "dyt" or kind == "derf" else None
    shift = get(norm, "shift") if kind == "derf" else None
    backend = norm.__dict__.get("backend", "auto")  # (torch's norms have none: a getattr miss, ~2 µs)
    shape = norm.normalized_shape
    return kind, (weight, bias, alpha, shift), eps, shape if type(shape) is tuple else tuple(shape), backend


def _user_global_hooks() -> bool:
    """Whether a global module hook comes from outside torch. torch's own tools register them
    (FlopCounterMode's and CommDebugMode's module trackers), which a fused norm's missing call only
    moves to the enclosing module: no reason to warn on every call site under them."""
    for hooks in (_module_hooks._global_forward_pre_hooks, _module_hooks._global_forward_hooks,
                  _module_hooks._global_backward_pre_hooks, _module_hooks._global_backward_hooks):
        for hook in hooks.values():
            module = getattr(getattr(hook, "func", hook), "__module__", None) or ""
            if not module.startswith("torch."):
                return True
    return False


def _unwrapped(params: tuple) -> tuple:
    """A layer's (weight, bias, alpha, shift) with dead functorch wrappers unwrapped, as
    ``Function.apply`` would (see ops.rowwise_norm): a parameter is never one, so a layer's own
    ``nn.Parameter``s (or None) pass in one test."""
    w, b, a, sh = params
    if ((w is None or type(w) is _Parameter) and (b is None or type(b) is _Parameter)
            and (a is None or type(a) is _Parameter) and (sh is None or type(sh) is _Parameter)):
        return params
    return tuple(t if t is None or type(t) is _Parameter else _unwrap_if_dead(t) for t in params)


def _check_layer(x: Tensor, kind, params, eps, shape, reads: torch.dtype, which: str = "norm"):
    """Checks one layer's parameters against x; ``reads``: the dtype of what the norm normalizes
    (h, or the sum s), whose machine epsilon is RMSNorm's ``eps=None``; ``which``: the norm's name
    in messages (norm_add_norm's two are norm_out and norm_in)."""
    weight, bias, alpha, shift = params
    # As the norm called on its own: RMSNorm, DyT and Derf take any 16- or 32-bit float parameters
    # (T5 in fp16 feeds fp32 activations to an fp16 weight), LayerNorm h's dtype or float32.
    any_float = kind != "layernorm"
    try:
        if weight is not None or bias is not None:
            check_affine(weight, bias, shape, x, any_float)
        if kind == "dyt" or kind == "derf":
            ops._check_scalars(alpha, shift, x)
    except TypeError as e:
        # check_affine's message says "the input's dtype": here it is h's
        allowed = (x.dtype, torch.float32) + ((torch.float16, torch.bfloat16) if any_float else ())
        for name, p in (("weight", weight), ("bias", bias)):
            if isinstance(p, Tensor) and p.dtype not in allowed:
                takes = (f"h's dtype ({x.dtype})" if x.dtype is torch.float32 else f"h's dtype ({x.dtype}) or float32")
                raise TypeError(
                    f"a fused residual op takes {'the norm' if which == 'norm' else which}'s {name} in {takes}"
                    + (" or a 16-bit float" if any_float else "")
                    + f", got {p.dtype}: cast the norm, e.g. {which}.to({x.dtype})") from None
        if which == "norm":
            raise
        raise TypeError(f"{which}: {e}") from None
    except ValueError as e:
        if which == "norm":
            raise
        raise ValueError(f"{which}: {e}") from None
    if type(eps) is float and 0.0 <= eps <= ops._FP32_MAX:  # check_eps's usual case inline
        return eps
    if eps is None and kind == "rmsnorm":  # torch.nn.RMSNorm's default (LayerNorm's None: check_eps's TypeError)
        eps = torch.finfo(reference.compute_dtype(reads)).eps
    return check_eps(eps)


def fused_residual(x: Tensor, h: Tensor, norm, norm2=None, *, mode: str, scale: float = 1.0,
                   residual_dtype: torch.dtype | None = None) -> tuple[Tensor | None, Tensor]:
    """``(y, s)`` of one of :data:`MODES` (y is None for norm_add), for ``x``, ``h`` of one shape
    (..., *normalized_shape) and norm modules (see :func:`describe`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    # The usual case's tests inline (as ops.rowwise_norm's): plain float tensors, a float scale.
    if type(x) is not Tensor or type(h) is not Tensor or x.dtype not in _FLOAT or h.dtype not in _FLOAT:
        ops.check_input(x, "x")
        ops.check_input(h, "h")
        if (type(x) is not Tensor or type(h) is not Tensor) and (x.is_nested or h.is_nested):
            raise TypeError("fused residual ops take plain tensors, not nested ones; use the norm and the add apart "
                            "(normzoo's norms take jagged nested tensors)")
    if x.shape != h.shape:
        raise ValueError(f"x and h must have the same shape, got {tuple(x.shape)} and {tuple(h.shape)}")
    if x.device != h.device:
        raise ValueError(f"x is on {x.device} but h is on {h.device}; put them on the same device")
    if residual_dtype is not None and residual_dtype not in _FLOAT:
        raise TypeError(f"residual_dtype must be a floating dtype or None, got {residual_dtype}")
    if type(scale) is not float or not 0 < scale < math.inf:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float, got {type(scale).__name__}")
        if not 0 < scale < math.inf:
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    kind, p1, eps1, shape, backend = describe(norm)
    if (norm2 is None) != (mode != "norm_add_norm"):
        raise ValueError("norm_add_norm takes two norms (norm_out, norm_in); the other modes take one")
    if len(shape) != 1 or type(shape[0]) is not int or not h.dim() or h.shape[-1] != shape[0]:  # the usual case inline
        shape = normalized_shape_tuple(shape)
        ops.check_trailing_shape(h, shape)
    s_dtype = residual_dtype or _promoted(x.dtype, h.dtype)
    eps1 = _check_layer(h, kind, p1, eps1, shape, s_dtype if mode == "add_norm" else h.dtype,
                        "norm" if norm2 is None else "norm_out")
    p2, eps2 = (None, None, None, None), 0.0
    if norm2 is not None:
        kind2, p2, eps2, shape2, backend2 = describe(norm2)
        if kind2 != kind or tuple(shape2) != shape:
            raise ValueError(f"norm_out and norm_in must be the same kind and shape, got {kind}{shape} and "
                             f"{kind2}{tuple(shape2)}")
        if backend2 != backend:
            raise ValueError(f"norm_out and norm_in must share a backend, got {backend!r} and {backend2!r}")
        offset, offset2 = norm.__dict__.get("weight_offset", 0.0), norm2.__dict__.get("weight_offset", 0.0)
        if offset2 != offset:
            # (torch's own norms have no weight_offset: 0.0, as read above, not an AttributeError here)
            raise ValueError("norm_out and norm_in must share a weight_offset (the kernel applies one to both), got "
                             f"{offset} and {offset2}")
        if norm2.__dict__.get("x_hat_dtype") != norm.__dict__.get("x_hat_dtype"):
            raise ValueError("norm_out and norm_in must share an x_hat_dtype (the kernel rounds both alike), got "
                             f"{norm.__dict__.get('x_hat_dtype')!r} and {norm2.__dict__.get('x_hat_dtype')!r}")
        eps2 = _check_layer(h, kind2, p2, eps2, shape, s_dtype, "norm_in")
    # float64 anywhere takes the reference, as for the plain ops.
    triton = ((h.is_cuda and h.dtype is not _FP64) if backend == "auto" else ops.use_triton(backend, h)) \
        and x.dtype is not _FP64 and residual_dtype is not _FP64
    if triton and type(h) is not Tensor:
        ops.refuse_dtensor(h, "the fused residual ops")

    # Rows of n, and 1-D parameters: no call at all where they already are (the usual case; the
    # weight and bias have the normalized shape, checked above, and DyT's alpha may be 0-dim).
    as_rows = h.dim() == 2 and len(shape) == 1
    h2d, x2d = (h, x) if as_rows else (h.reshape(-1, n := math.prod(shape)), x.reshape(-1, n))
    if (len(shape) != 1 or p1[2] is not None) and not all(p is None or p.dim() == 1 for p in (*p1, *p2)):
        flat = lambda p: p if p is None or p.dim() == 1 else p.reshape(-1)  # noqa: E731
        p1, p2 = tuple(map(flat, p1)), tuple(map(flat, p2))
    # Gemma 2/3's sandwich norms are (1 + w) RMSNorms: the offset rides along, added in fp32.
    # Llama's, Mistral's, Qwen's and T5's RMSNorms round x_hat first (x_hat_dtype): so does the kernel,
    # each norm to its own input's (or weight's) dtype. (From __dict__, where normzoo's layers set
    # them: a getattr that misses, on every other norm, costs ~2 µs.)
    dict_ = norm.__dict__
    spec = (kind, mode, eps1, eps2, float(scale), residual_dtype, triton, dict_.get("weight_offset", 0.0),
            _ROUNDING[dict_.get("x_hat_dtype")])
    route = _route(h2d, x2d, *p1) if norm2 is None else _route(h2d, x2d, *p1, *p2)
    if route == "custom_op":
        y, s = fused_residual_fwd(h2d, x2d, *p1, *p2, *spec)[:2]
    elif route == "composite":  # forward-mode AD and torch.func transforms: the reference, as torch ops
        y, s = _fused_forward(h2d, x2d, p1, p2, *spec[:6], False, *spec[7:], True)[:2]
    elif route == "function":
        leaves = (h.requires_grad and h.is_leaf, x.requires_grad and x.is_leaf)
        if _FUSED_C_APPLY is None:
            y, s = _FusedResidual.apply(h2d, x2d, *p1, *p2, spec, leaves)
        else:
            y, s = _FUSED_C_APPLY(_unwrap_if_dead(h2d), _unwrap_if_dead(x2d), *_unwrapped(p1), *_unwrapped(p2), spec,
                                  leaves)
    else:  # "forward", or "reference" (ONNX export's trace): the same forward, with the kernels off; no backward
        y, s = _fused_forward(h2d, x2d, p1, p2, *spec[:6], triton and route == "forward", *spec[7:], False,
                              False)[:2]
    if as_rows:
        return (None if mode == "norm_add" else y), s
    return (None if mode == "norm_add" else y.view(h.shape)), s.view(h.shape)


# torch.fx.symbolic_trace would call this with Proxies, which its checks refuse as non-tensors (a
# TypeError naming a Proxy): it records the call as one graph node instead, the norm modules read
# from the traced module (get_attr), as it records the plain norms' ops (see the end of ops.py), so
# a model that calls normzoo.functional's add_norm, norm_add or norm_add_norm traces too.
torch.fx.wrap("fused_residual")
