"""Normalization-free point-wise layers, DyT and Derf, forward and backward, as one kernel family.

    DyT:   u = alpha·x,          y = w ⊙ tanh(u) + b
    Derf:  u = alpha·x + shift,  y = w ⊙ erf(u)  + b

``alpha`` and ``shift`` are one scalar each, read from device memory (no host sync). Backward,
with act' the activation's derivative (tanh: 1 − tanh²(u); erf: 2/√π·exp(−u²)) and
g = dy ⊙ w ⊙ act'(u):

    dx = alpha·g,   dw = Σ dy ⊙ act(u),   db = Σ dy,   dalpha = Σ g ⊙ x,   dshift = Σ g

Inputs are 2-D views ``(rows, cols)``. Per-channel parameters run along the columns
(channels-last: rows are tokens, columns channels) or, with ``PARAMS_PER_ROW``, one per row
(channels-first (B, C, S) viewed as (B·C, S): row r holds channel r mod C). The column and scalar
sums are per-program fp32 partials, accumulated element-wise in registers over a program's rows
and reduced once at its end, then summed by a second launch (kernels/reduce.py): deterministic, no
atomics. A grid of one program (under 32 rows; channels-first, one image) writes the gradients
itself instead (``DIRECT``).

A 16-bit forward (``FAST``) takes a cheaper activation, so that it stays memory-bound:
- DyT: the GPU's ``tanh.approx.f32`` (one MUFU instruction, max relative error 2^-10.987 per the
  PTX ISA): about fp16's unit roundoff and far below bf16's, for a tenth of the instructions of the
  exact path. Triton's interpreter cannot run inline PTX, so under it ``_tanh_approx`` is an
  emulation that errs by the instruction's whole error bound (tests then check the 16-bit output
  against the tolerance table with that worst case); the GPU test run checks the real instruction.
- Derf: ``_erf_fast``, an odd polynomial of degree 17 on the argument clamped to ±2.9 (12
  instructions, no MUFU; libdevice's erf took the forward to 384 SASS instructions a 4×1024 tile
  against DyT's 160, an issue limit near 63% of an H200's copy bandwidth). Its relative error,
  2^-15.2 in fp32 (ERF_FAST_REL_ERROR, with each step a fused multiply-add), is 1/18 of fp16's
  unit roundoff: the 16-bit output is the exact erf's rounded, but where it lies within that much
  of a rounding boundary. It is plain arithmetic, so the interpreter runs it as the GPU does.
fp32 output and every backward keep the exact activation (dw may be fp32 even for 16-bit input), and
so does a fused residual op's layer whose output goes into the residual stream (``RES_MODE``
"norm_add", "norm_add_norm").
"""

import torch
import triton
import triton.language as tl

from .heuristics import INTERPRETED, has_tanh_approx, launch_config, split_rows
from .launch import (alloc, alloc_bias_grad, alloc_grad, alloc_like, alloc_rows, cdiv, check_rows, device_guard,
                     empty_residual_grads, partials_layout, residual_grad_buffers)
from .reduce import sum_partials
from .rowwise_norm import FUSED_MODES
from .tiles import load_tile, partial_offsets, store_column_sums, store_tile

ACTIVATIONS = ("tanh", "erf")


@triton.jit
def _tanh_and_derivative(z):
    """tanh(z) and 1 − tanh²(z), without overflow for any finite z, tanh within 2 ulp in fp32.

    Far from 0, with e = exp(−2|z|): tanh = (1 − e)/(1 + e) and 1 − tanh² = 4e/(1 + e)², which
    never overflows and, unlike 1 − t·t, does not cancel as t → ±1. Below |z| = 0.55 the odd
    Taylor series of tanh (7 terms, error < 1e-8) replaces (1 − e)/(1 + e), which loses relative
    accuracy near 0; there t is small and 1 − t·t is exact enough.
    """
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    inv = 1.0 / (1.0 + e)
    t_far = (1.0 - e) * inv
    z2 = tl.minimum(z * z, 1.0)  # only used below |z| = 0.55; capped so huge z cannot overflow it
    p = -929569.0 / 638512875.0
    p = 21844.0 / 6081075.0 + z2 * p
    p = -1382.0 / 155925.0 + z2 * p
    p = 62.0 / 2835.0 + z2 * p
    p = -17.0 / 315.0 + z2 * p
    p = 2.0 / 15.0 + z2 * p
    p = -1.0 / 3.0 + z2 * p
    t_near = a + a * z2 * p
    near = a < 0.55
    t = tl.where(near, t_near, t_far)
    dt = tl.where(near, 1.0 - t_near * t_near, 4.0 * e * inv * inv)
    return tl.where(z < 0, -t, t), dt


@triton.jit
def _activation(u, ACTIVATION: tl.constexpr):
    """Returns (act(u), act'(u))."""
    if ACTIVATION == "tanh":
        act, dact = _tanh_and_derivative(u)
    else:
        act = tl.math.erf(u)
        dact = 1.1283791670955126 * tl.exp(-u * u)  # 2/√π
    return act, dact


# The largest relative error of tanh.approx.f32 (PTX ISA: 2^-10.987); the interpreter's emulation
# below errs by exactly this much (a plain float: only the interpreter's emulation reads it).
TANH_APPROX_REL_ERROR = 2.0 ** -10.987

if INTERPRETED:

    @triton.jit
    def _tanh_approx(z):
        t, _ = _tanh_and_derivative(z)
        return t * (1.0 - TANH_APPROX_REL_ERROR)  # the instruction's worst case, toward zero

else:

    @triton.jit
    def _tanh_approx(z):
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32,
                                         is_pure=True, pack=1)


# _erf_fast's largest relative error against erf, evaluated in fp32 (a plain float: tests read it).
ERF_FAST_REL_ERROR = 2.0 ** -15.2


@triton.jit
def _erf_fast(u):
    """erf(u) for a 16-bit output: u·P(u²), P of degree 8 fitted to erf's relative error on
    (0, 2.9] (a minimax linear program over 20000 points: 1.5e-5 inside, 2.0e-5 at the clamp), u
    clamped to ±2.9, where 1 − erf is 4e-5; NaN stays NaN (the clamp propagates it). Each Horner
    step is one fused multiply-add (tl.fma: one rounding on the GPU and in the interpreter alike,
    whatever the compiler's fp-fusion default); with two roundings a step, the bound fails by
    a little near the clamp (2^-15.15)."""
    u = tl.clamp(u, -2.9, 2.9, propagate_nan=tl.PropagateNan.ALL)
    t = u * u
    p = tl.fma(t, 5.5559262e-08, -2.4663441e-06)
    p = tl.fma(t, p, 4.8616352e-05)
    p = tl.fma(t, p, -0.00056913838)
    p = tl.fma(t, p, 0.0044902260)
    p = tl.fma(t, p, -0.025738828)
    p = tl.fma(t, p, 0.11192696)
    p = tl.fma(t, p, -0.37582928)
    p = tl.fma(t, p, 1.1283623)
    return u * p


@triton.jit
def _param_tile(P, rows, row_mask, cols, col_mask, C, PARAMS_PER_ROW: tl.constexpr):
    """A per-channel parameter broadcast to the (BLOCK_M, BLOCK_N) tile."""
    if PARAMS_PER_ROW:
        p = tl.load(P + rows % C, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    else:
        p = tl.load(P + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return p


@triton.jit
def _pointwise(x, ALPHA, SHIFT, W, B, rows, row_mask, cols, col_mask, C, ACTIVATION: tl.constexpr,
               PARAMS_PER_ROW: tl.constexpr, FAST: tl.constexpr):
    """w ⊙ act(alpha·x + shift) + b on one fp32 tile; SHIFT, W and B may be None (absent)."""
    u = x * tl.load(ALPHA).to(tl.float32)
    if SHIFT is not None:
        u += tl.load(SHIFT).to(tl.float32)
    if FAST and ACTIVATION == "tanh":
        y = _tanh_approx(u)
    elif FAST:
        y = _erf_fast(u)
    else:
        y, _ = _activation(u, ACTIVATION)
    if W is not None:
        y = y * _param_tile(W, rows, row_mask, cols, col_mask, C, PARAMS_PER_ROW)
    if B is not None:
        y = y + _param_tile(B, rows, row_mask, cols, col_mask, C, PARAMS_PER_ROW)
    return y


@triton.jit
def _pointwise_fwd_kernel(
    X, Y, ALPHA, SHIFT, W, B,  # pointers; ALPHA/SHIFT hold one scalar each; absent ones None
    R, S,  # residual stream in and the sum out (RES_MODE not "none"; see kernels/rowwise_norm.py)
    ALPHA2, SHIFT2, W2, B2,  # the second layer of "norm_add_norm" (y = layer2(s))
    stride_x_row, stride_y_row, stride_r_row, stride_s_row,
    M, N,  # rows, columns of the 2-D view
    C,  # channels (rows are channel r mod C when PARAMS_PER_ROW)
    scale,  # multiplies y (LayerNorm scaling's 1/√l; None for 1)
    # y's activation: "tanh" (DyT) or "erf" (Derf), or its fast form for a 16-bit y (see the module
    # docstring), "tanh_approx" or "erf_fast"; s, in the residual stream, takes the exact one. One
    # constexpr for both (see _launch_forward).
    ACTIVATION_Y: tl.constexpr,
    PARAMS_PER_ROW: tl.constexpr,
    RES_MODE: tl.constexpr,  # RES_MODES in kernels/rowwise_norm.py: none, add then layer, layer then add, both
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    FAST: tl.constexpr = ACTIVATION_Y == "tanh_approx" or ACTIVATION_Y == "erf_fast"
    ACTIVATION: tl.constexpr = "tanh" if ACTIVATION_Y == "tanh" or ACTIVATION_Y == "tanh_approx" else "erf"
    # A 1-D grid (CUDA caps grid axes 1 and 2 at 65535 programs): column tiles vary fastest.
    col_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    rows = (pid // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x = load_tile(X, rows, stride_x_row, cols, mask, "")
    if RES_MODE == "add_norm":
        x = (x + load_tile(R, rows, stride_r_row, cols, mask, "")).to(S.dtype.element_ty).to(tl.float32)
        store_tile(S, rows, stride_s_row, cols, mask, x)
    if RES_MODE == "norm_add" or RES_MODE == "norm_add_norm":
        # This layer's output goes into the residual stream, which every later layer reads and
        # adds to: the exact activation (tanh.approx's bias would accumulate there).
        y = _pointwise(x, ALPHA, SHIFT, W, B, rows, row_mask, cols, col_mask, C, ACTIVATION, PARAMS_PER_ROW, False)
        s = (y + load_tile(R, rows, stride_r_row, cols, mask, "")).to(S.dtype.element_ty).to(tl.float32)
        store_tile(S, rows, stride_s_row, cols, mask, s)
        if RES_MODE == "norm_add_norm":
            y = _pointwise(s, ALPHA2, SHIFT2, W2, B2, rows, row_mask, cols, col_mask, C, ACTIVATION, PARAMS_PER_ROW,
                           FAST)
    else:
        y = _pointwise(x, ALPHA, SHIFT, W, B, rows, row_mask, cols, col_mask, C, ACTIVATION, PARAMS_PER_ROW, FAST)
    if RES_MODE != "norm_add":
        if scale is not None:
            y = y * scale
        store_tile(Y, rows, stride_y_row, cols, mask, y)


@triton.jit
def _pointwise_bwd_kernel(
    X, DY, DX, ALPHA, SHIFT, W, PARTIALS, DW, DB, DALPHA, DSHIFT,
    stride_x_row, stride_dy_row, stride_dx_row, M, N, C, rows_per_program,
    ACTIVATION: tl.constexpr,
    PARAMS_PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DIRECT: tl.constexpr,
):
    """:func:`_pointwise_bwd` without fused operands (a plain layer's backward, or a fused op's
    launch with none: norm_add's, say): 24 launch arguments where the fused kernel takes 39, and
    Triton's launch spends host time on every argument it is given, a None included."""
    _pointwise_bwd(X, DY, DX, ALPHA, SHIFT, W, PARTIALS, DW, DB, DALPHA, DSHIFT, None, None,
                   None, None, None, None, None, None, None, None, None,
                   stride_x_row, stride_dy_row, stride_dx_row, 0, 0, M, N, C, rows_per_program, 1.0,
                   ACTIVATION, PARAMS_PER_ROW, False, BLOCK_M, BLOCK_N, NUM_STAGES, DIRECT)


@triton.jit
def _pointwise_fused_bwd_kernel(
    X, DY, DX, ALPHA, SHIFT, W, PARTIALS, DW, DB, DALPHA, DSHIFT, DRES, DX2,
    H, ALPHA1, SHIFT1, W1, DH, DW1, DB1, DALPHA1, DSHIFT1,
    stride_x_row, stride_dy_row, stride_dx_row, stride_dres_row, stride_h_row, M, N, C, rows_per_program, scale,
    ACTIVATION: tl.constexpr,
    PARAMS_PER_ROW: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DIRECT: tl.constexpr,
):
    """:func:`_pointwise_bwd` with every operand: a fused residual op's backward that has a fused
    operand (the sum's gradient, a second dx, a first layer) or a scale."""
    _pointwise_bwd(X, DY, DX, ALPHA, SHIFT, W, PARTIALS, DW, DB, DALPHA, DSHIFT, DRES, DX2,
                   H, ALPHA1, SHIFT1, W1, DH, DW1, DB1, DALPHA1, DSHIFT1,
                   stride_x_row, stride_dy_row, stride_dx_row, stride_dres_row, stride_h_row, M, N, C,
                   rows_per_program, scale, ACTIVATION, PARAMS_PER_ROW, HAS_SCALE, BLOCK_M, BLOCK_N, NUM_STAGES,
                   DIRECT)


@triton.jit
def _pointwise_bwd(
    X, DY, DX, ALPHA, SHIFT, W,  # SHIFT and W None when absent
    PARTIALS,  # fp32 scratch for the per-program sums, laid out as tiles.partial_offsets says
    DW, DB, DALPHA, DSHIFT,  # the gradients (DW, DB None: not asked for); DIRECT writes them here, in their dtypes
    DRES,  # or None: a gradient added to dx (the sum's, when x was the sum r + h of a fused add)
    DX2,  # or None: dx stored a second time, in DX2's dtype
    # Peri-LN's norm_add_norm (s = r + layer1(h), y = layer2(s)), channels-last: with X = s and the
    # launch's layer the second, dx is s's gradient, and the first layer's backward runs on it in
    # the same pass: H its input (None: no first layer), ALPHA1, SHIFT1, W1 its parameters, DH h's
    # gradient, DW1, DB1, DALPHA1, DSHIFT1 its parameters' (as DW, DB, DALPHA, DSHIFT).
    H, ALPHA1, SHIFT1, W1, DH, DW1, DB1, DALPHA1, DSHIFT1,
    stride_x_row, stride_dy_row, stride_dx_row, stride_dres_row, stride_h_row,  # dx, dx2, dh: stride_dx_row
    M, N, C,
    rows_per_program,  # a multiple of BLOCK_M; exactly BLOCK_M when PARAMS_PER_ROW
    scale,  # the forward's y scale: dy is scaled by it on load
    ACTIVATION: tl.constexpr,
    PARAMS_PER_ROW: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # row blocks in flight (software pipelining of the row loop's loads)
    DIRECT: tl.constexpr,  # one program, each row its own channel or all rows one sum: the gradients written here
):
    """Each program owns rows [row_start, row_end) and writes its sums into PARTIALS:
    dw / db, one row of N column sums per program (channels-last) or one sum per row
    (PARAMS_PER_ROW), and two scalars (Σ g·x for dalpha, Σ g for dshift) per program. With
    DIRECT those sums are the gradients, stored in DW, DB, DALPHA, DSHIFT: no reduce launch."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # PARTIALS: [dw | db | dw1 | db1 | (dalpha, dshift) per program | layer 1's pairs], the offsets
    # derived where they are used (not held in registers across the loops).
    if PARAMS_PER_ROW:  # int64: the host's offsets pass 2^31 with B·C rows past 2^30
        block = tl.cast(M, tl.int64)
    else:
        block = tl.num_programs(0).to(tl.int64) * N
    alpha = tl.load(ALPHA).to(tl.float32)
    shift = 0.0
    if SHIFT is not None:
        shift = tl.load(SHIFT).to(tl.float32)
    # Every sum is accumulated element-wise over the row loop and reduced across the tile once, at
    # the end: no cross-warp reduction (and barrier) inside the loop.
    dalpha_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dshift_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if H is not None:
        alpha1 = tl.load(ALPHA1).to(tl.float32)
        shift1 = 0.0
        if SHIFT1 is not None:
            shift1 = tl.load(SHIFT1).to(tl.float32)
        dalpha1_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        dshift1_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dw_rows = tl.zeros([BLOCK_M], dtype=tl.float32)  # PARAMS_PER_ROW: carried across column tiles
    db_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        if W is not None and not PARAMS_PER_ROW:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]  # once per column tile
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if H is not None:
            if W1 is not None:
                w1 = tl.load(W1 + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            dw1_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            db1_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for block_start in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):
            rows = block_start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            x = load_tile(X, rows, stride_x_row, cols, mask, "")
            dy = load_tile(DY, rows, stride_dy_row, cols, mask, "")
            if HAS_SCALE:
                dy = dy * scale
            act, dact = _activation(x * alpha + shift, ACTIVATION)
            # dy is 0 in masked positions, so g, dy·act and every sum below ignore them.
            g = dy * dact
            if W is not None:
                if PARAMS_PER_ROW:
                    g = g * tl.load(W + rows % C, mask=row_mask, other=0.0).to(tl.float32)[:, None]
                else:
                    g = g * w
            dx = g * alpha
            if DRES is not None:
                dx += load_tile(DRES, rows, stride_dres_row, cols, mask, "")
            store_tile(DX, rows, stride_dx_row, cols, mask, dx)
            if DX2 is not None:
                store_tile(DX2, rows, stride_dx_row, cols, mask, dx)
            dalpha_acc += g * x
            if SHIFT is not None:
                dshift_acc += g
            if DW is not None:
                dw_acc += dy * act
            if DB is not None:
                db_acc += dy
            if H is not None:
                # The first layer's backward on the sum's gradient as computed (fp32, 0 where
                # masked), the same formulas: one more read (h) and one more write (dh).
                h = load_tile(H, rows, stride_h_row, cols, mask, "")
                act1, dact1 = _activation(h * alpha1 + shift1, ACTIVATION)
                g1 = dx * dact1
                if W1 is not None:
                    g1 = g1 * w1
                store_tile(DH, rows, stride_dx_row, cols, mask, g1 * alpha1)
                dalpha1_acc += g1 * h
                if SHIFT1 is not None:
                    dshift1_acc += g1
                if DW1 is not None:
                    dw1_acc += dx * act1
                if DB1 is not None:
                    db1_acc += dx
        if PARAMS_PER_ROW:
            if DW is not None:
                dw_rows += tl.sum(dw_acc, axis=1)
            if DB is not None:
                db_rows += tl.sum(db_acc, axis=1)
        else:
            partial_offset = pid.to(tl.int64) * N + cols
            db_offset, dw1_offset, db1_offset, _ = partial_offsets(block, DW, DB, DW1, DB1)
            if DW is not None:
                store_column_sums(PARTIALS, DW, partial_offset, cols, col_mask, dw_acc, DIRECT)
            if DB is not None:
                store_column_sums(PARTIALS + db_offset, DB, partial_offset, cols, col_mask, db_acc, DIRECT)
            if H is not None:
                if DW1 is not None:
                    store_column_sums(PARTIALS + dw1_offset, DW1, partial_offset, cols, col_mask, dw1_acc, DIRECT)
                if DB1 is not None:
                    store_column_sums(PARTIALS + db1_offset, DB1, partial_offset, cols, col_mask, db1_acc, DIRECT)
    db_offset, _, _, scalar_offset = partial_offsets(block, DW, DB, DW1, DB1)
    if PARAMS_PER_ROW:
        rows = row_start + tl.arange(0, BLOCK_M)
        if DIRECT:  # one image: row r is channel r
            if DW is not None:
                tl.store(DW + rows, dw_rows.to(DW.dtype.element_ty), mask=rows < row_end)
            if DB is not None:
                tl.store(DB + rows, db_rows.to(DB.dtype.element_ty), mask=rows < row_end)
        else:
            if DW is not None:
                tl.store(PARTIALS + rows, dw_rows, mask=rows < row_end)
            if DB is not None:
                tl.store(PARTIALS + db_offset + rows, db_rows, mask=rows < row_end)
    _store_scalar_sums(dalpha_acc, dshift_acc, DALPHA, DSHIFT, PARTIALS + scalar_offset, pid, DIRECT)
    if H is not None:  # layer 1's pairs after every program's layer-2 pair
        _store_scalar_sums(dalpha1_acc, dshift1_acc, DALPHA1, DSHIFT1,
                           PARTIALS + scalar_offset + 2 * tl.num_programs(0), pid, DIRECT)


@triton.jit
def _store_scalar_sums(dalpha_acc, dshift_acc, DALPHA, DSHIFT, SCALAR_PARTIAL, pid, DIRECT: tl.constexpr):
    """A program's (dalpha, dshift) sums: the gradients themselves (DIRECT), or its pair of partials."""
    dalpha = tl.sum(tl.sum(dalpha_acc, axis=1), axis=0)
    dshift = tl.sum(tl.sum(dshift_acc, axis=1), axis=0)
    if DIRECT:
        tl.store(DALPHA, dalpha.to(DALPHA.dtype.element_ty))
        if DSHIFT is not None:
            tl.store(DSHIFT, dshift.to(DSHIFT.dtype.element_ty))
    else:
        tl.store(SCALAR_PARTIAL + pid * 2, dalpha)
        tl.store(SCALAR_PARTIAL + pid * 2 + 1, dshift)


def _check_activation(activation: str):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def pointwise_forward(x, alpha, shift, weight, bias, *, activation: str, channels: int, params_per_row: bool,
                      max_block_n: int | None = None):
    """``y = weight ⊙ act(alpha·x + shift) + bias`` on the 2-D ``x`` (last dim contiguous).

    ``channels`` is the parameters' length: ``x.shape[1]`` for channels-last, C for a (B·C, S)
    channels-first view (``params_per_row=True``). ``shift`` may be ``None`` (DyT).
    """
    if activation not in ACTIVATIONS or x.dim() != 2 or not x.is_contiguous():  # the usual case's tests inline
        _check_activation(activation)
        check_rows(x)
    M, N = x.shape
    y = alloc_like(x)
    if M and N:
        _launch_forward(x, M, N, y, alpha, shift, weight, bias, None, None, (None, None, None, None), activation,
                        channels, params_per_row, "none", 1.0, max_block_n)
    return y


def pointwise_residual_forward(x, residual, alpha, shift, weight, bias, *, activation: str, mode: str,
                               scale: float = 1.0, sum_dtype: torch.dtype | None = None, layer2=(None, None, None, None),
                               max_block_n: int | None = None):
    """DyT / Derf fused with the residual add next to it (channels-last, 2-D ``x`` and ``residual``).
    ``mode`` as in :func:`normzoo.kernels.rowwise_norm.rowwise_residual_forward`; ``layer2`` is the
    second layer's ``(alpha, shift, weight, bias)`` for ``"norm_add_norm"``. Returns ``(y, s)``
    (y ``None`` for ``"norm_add"``): y in x's dtype, s in ``sum_dtype`` (default: the promoted dtype)."""
    _check_activation(activation)
    if mode not in FUSED_MODES:
        raise ValueError(f"mode must be one of {FUSED_MODES}, got {mode!r}")
    check_rows(x, residual)
    M, N = x.shape
    s = alloc_rows(x, sum_dtype or torch.promote_types(x.dtype, residual.dtype))
    y = alloc_like(x) if mode != "norm_add" else None
    if M and N:
        _launch_forward(x, M, N, y, alpha, shift, weight, bias, residual, s, layer2, activation, N, False,
                        mode, scale, max_block_n)
    return y, s


def _launch_forward(x, M, N, y, alpha, shift, weight, bias, residual, s, layer2, activation, channels, params_per_row,
                    res_mode, scale, max_block_n):
    alpha2, shift2, weight2, bias2 = layer2
    cfg = launch_config("dyt" if activation == "tanh" else "derf", "fwd", N, x.dtype, x.device, max_block_n)
    if x.dtype.itemsize == 2 and (activation == "erf" or has_tanh_approx(x.device)):
        activation = "erf_fast" if activation == "erf" else "tanh_approx"
    with device_guard(x):
        # Absent operands as None (see kernels/rowwise_norm.py: constants to Triton). 25 positional
        # arguments, the most CPython passes on its stack beside run's three keywords (26 build a
        # tuple and a dict first, CALL_FUNCTION_EX: dis, Python 3.11), hence the activation and
        # its fast form in one constexpr.
        _pointwise_fwd_kernel.run(
               x, y, alpha, shift, weight, bias, residual, s, alpha2, shift2, weight2, bias2,
               x.stride()[0], N, residual.stride()[0] if residual is not None else 0, N, M, N, channels,
               scale if scale != 1.0 else None,
               # The constexprs by position (by keyword, a launch costs ~0.7 µs more on the host):
               # ACTIVATION_Y, PARAMS_PER_ROW, RES_MODE, BLOCK_M, BLOCK_N.
               activation, params_per_row, res_mode, cfg.block_m, cfg.block_n,
               grid=(cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n),), warmup=False, num_warps=cfg.num_warps)


def pointwise_backward(dy, x, alpha, shift, weight, *, activation: str, channels: int, params_per_row: bool,
                       compute_dw: bool, db_dtype: torch.dtype | None, max_block_n: int | None = None):
    """Gradients of :func:`pointwise_forward`: ``(dx, dalpha, dshift, dw, db)``.

    ``dalpha``/``dshift`` have shape (1,) in the scalars' dtype (``dshift`` is ``None`` without a
    shift); ``dw``/``db`` have shape (channels,) in the weight's dtype and ``db_dtype`` (the
    bias's), or are ``None`` when not asked for (``db_dtype=None``: no bias gradient).
    """
    if (activation not in ACTIVATIONS or x.dim() != 2 or not x.is_contiguous() or not dy.is_contiguous()
            or dy.shape != x.shape):  # the usual case's tests inline
        _check_activation(activation)
        check_rows(x, dy)
    dx, _, *grads = _backward(dy, x, alpha, shift, weight, activation, channels, params_per_row, compute_dw, db_dtype,
                              None, alloc_like(x), None, 1.0, max_block_n)
    return (dx, *grads)


def pointwise_residual_backward(dy, x, alpha, shift, weight, *, activation: str, compute_dw: bool,
                                db_dtype: torch.dtype | None, dres=None, dx_dtype: torch.dtype | None = None,
                                dx2_dtype: torch.dtype | None = None, scale: float = 1.0,
                                max_block_n: int | None = None):
    """:func:`pointwise_backward` (channels-last) of ``y = layer(x)·scale`` whose input is a fused
    add's sum: ``dx = dres + Jᵀ(dy·scale)``, in ``dx_dtype`` and, with ``dx2_dtype``, again in that
    dtype (see :func:`normzoo.kernels.rowwise_norm.rowwise_residual_backward`). Returns
    ``(dx, dx2, dalpha, dshift, dw, db)``."""
    _check_activation(activation)
    dx, dx2 = residual_grad_buffers(x, dy, dres, dx_dtype, dx2_dtype)
    N = x.shape[1]
    return _backward(dy, x, alpha, shift, weight, activation, N, False, compute_dw, db_dtype, dres, dx, dx2, scale,
                     max_block_n)


def pointwise_peri_backward(dy, ds, s, layer2, h, layer1, *, activation: str, compute_dw1: bool,
                            db1_dtype: torch.dtype | None, compute_dw2: bool, db2_dtype: torch.dtype | None,
                            dx_dtype: torch.dtype | None = None, dh_dtype: torch.dtype | None = None,
                            scale: float = 1.0, max_block_n: int | None = None):
    """Gradients of :func:`pointwise_residual_forward`'s ``"norm_add_norm"`` (s = r + layer1(h),
    y = layer2(s)·scale; each layer ``(alpha, shift, weight)``) in one pass: ``dx = ds +
    J2ᵀ(dy·scale)``, the gradient of r and of layer 1's output, in ``dx_dtype`` (default s's), and
    ``dh = J1ᵀ dx`` in ``dh_dtype`` (default h's), from dx in fp32. ``ds`` may be None. Returns
    ``(dx, dh, grads1, grads2)``, grads ``(dalpha, dshift, dw, db)`` with absent ones None."""
    _check_activation(activation)
    check_rows(s, dy, h) if ds is None else check_rows(s, dy, h, ds)
    dx = alloc_rows(s, dx_dtype or s.dtype)
    dh = alloc_rows(h, dh_dtype or h.dtype)
    N = s.shape[1]
    alpha2, shift2, weight2 = layer2
    out = _backward(dy, s, alpha2, shift2, weight2, activation, N, False, compute_dw2, db2_dtype, ds, dx, None, scale,
                    max_block_n, (h, *layer1, dh, compute_dw1, db1_dtype))
    _, _, *grads2, dalpha1, dshift1, dw1, db1 = out
    return dx, dh, (dalpha1, dshift1, dw1, db1), tuple(grads2)


def _backward(dy, x, alpha, shift, weight, activation, channels, params_per_row, compute_dw, db_dtype, dres, dx, dx2,
              scale, max_block_n, first=None):
    """The backward launch (and its reduce). ``first``: ``(h, alpha1, shift1, weight1, dh, compute_dw1,
    db1_dtype)``, a first layer whose output x's sum took (norm_add_norm): its dh and gradients
    come from the same pass, and ``(dalpha1, dshift1, dw1, db1)`` follow the result."""
    M, N = x.shape
    device = x.device
    compute_db = db_dtype is not None
    h = alpha1 = shift1 = weight1 = dh = dalpha1 = dshift1 = dw1 = db1 = None
    compute_dw1 = compute_db1 = False
    if first is not None:
        h, alpha1, shift1, weight1, dh, compute_dw1, db1_dtype = first
        compute_db1 = db1_dtype is not None
    if M == 0 or N == 0:
        empty_residual_grads(dx, dx2, dres)
        zeros = lambda n, dt: torch.zeros(n, dtype=dt, device=device)
        out = (dx, dx2, zeros(1, alpha.dtype), zeros(1, shift.dtype) if shift is not None else None,
               zeros(channels, weight.dtype) if compute_dw else None, zeros(channels, db_dtype) if compute_db else None)
        if first is None:
            return out
        return (*out, zeros(1, alpha1.dtype), zeros(1, shift1.dtype) if shift1 is not None else None,
                zeros(channels, weight1.dtype) if compute_dw1 else None,
                zeros(channels, db1_dtype) if compute_db1 else None)

    # A fused op's backward moves more: the sum's gradient in, dx maybe twice out.
    pass_ = "bwd_peri" if first is not None else "bwd_res" if dres is not None or dx2 is not None else "bwd"
    cfg = launch_config("dyt" if activation == "tanh" else "derf", pass_, N, x.dtype, device, max_block_n)
    if params_per_row:  # one row block per program: its row sums are carried across column tiles
        rows_per_program, programs = cfg.block_m, cdiv(M, cfg.block_m)
    else:
        rows_per_program, programs = split_rows(M, cfg, device)

    # Each gradient as its parameter ((1,) scalars, (channels,) weights; alloc_grad).
    dalpha = alloc_grad(alpha)
    dshift = alloc_grad(shift) if shift is not None else None
    dw = alloc_grad(weight) if compute_dw else None
    db = alloc_bias_grad(weight, x, channels, db_dtype)
    if first is not None:
        dalpha1 = alloc_grad(alpha1)
        dshift1 = alloc_grad(shift1) if shift1 is not None else None
        dw1 = alloc_grad(weight1) if compute_dw1 else None
        db1 = alloc_bias_grad(weight1, x, channels, db1_dtype)
    # One fp32 scratch buffer for every partial sum (one allocation), as partials_layout lays it out.
    # channels-first: row r is channel r mod C, so M = B·C row sums are a (B, C) block of column sums.
    # Few rows (one program; channels-first, one image or no dw/db) need no scratch: the kernel
    # writes the gradients.
    parts, cols = (M // channels, channels) if params_per_row else (programs, N)
    direct = programs == 1 and (parts == 1 or not (compute_dw or compute_db))
    partials = None
    if not direct:
        db_offset, dw1_offset, db1_offset, scalar_offset, size = partials_layout(
            parts * cols, programs, (compute_dw, compute_db, compute_dw1, compute_db1), 1 if first is None else 2)
        partials = alloc(x, size, torch.float32)
    with device_guard(x):
        # Absent operands as None (see kernels/rowwise_norm.py); PARTIALS is addressed even when unused.
        if pass_ == "bwd" and scale == 1.0:  # no fused operand: its own kernel
            _pointwise_bwd_kernel.run(
                x, dy, dx, alpha, shift, weight, partials if partials is not None else dx, dw, db, dalpha, dshift,
                x.stride()[0], dy.stride()[0], N, M, N, channels, rows_per_program,
                # ACTIVATION, PARAMS_PER_ROW, BLOCK_M, BLOCK_N, NUM_STAGES, DIRECT (by position)
                activation, params_per_row, cfg.block_m, cfg.block_n, cfg.num_stages, direct,
                grid=(programs,), warmup=False, num_warps=cfg.num_warps,
            )
        else:
            _pointwise_fused_bwd_kernel.run(
                x, dy, dx, alpha, shift, weight, partials if partials is not None else dx, dw, db, dalpha, dshift,
                dres, dx2, h, alpha1, shift1, weight1, dh, dw1, db1, dalpha1, dshift1,
                x.stride()[0], dy.stride()[0], N, dres.stride()[0] if dres is not None else 0,
                h.stride()[0] if h is not None else 0, M, N, channels, rows_per_program, scale,
                # ACTIVATION, PARAMS_PER_ROW, HAS_SCALE, BLOCK_M, BLOCK_N, NUM_STAGES, DIRECT (by position)
                activation, params_per_row, scale != 1.0, cfg.block_m, cfg.block_n, cfg.num_stages, direct,
                grid=(programs,), warmup=False, num_warps=cfg.num_warps,
            )
        if partials is not None:
            sum_partials(partials, parts, cols, db_offset, dw, db, scalar_offset, programs, dalpha, dshift, dw1, db1,
                         dw1_offset, db1_offset, dalpha1, dshift1)
    if first is not None:
        return dx, dx2, dalpha, dshift, dw, db, dalpha1, dshift1, dw1, db1
    return dx, dx2, dalpha, dshift, dw, db
