"""Row-wise normalization: LayerNorm and RMSNorm, forward and backward, as one kernel family.

Each row x (N values) is normalized on its own:

    LayerNorm:  mean = Σx / N,  var = Σ(x − mean)² / N,  rstd = 1/√(var + eps),  x_hat = (x − mean)·rstd
    RMSNorm:    rstd = 1/√(Σx² / N + eps),  x_hat = x·rstd
    both:       y = x_hat ⊙ w + b     (w, b optional)

Backward, with wdy = w ⊙ dy (or dy without a weight):

    c1 = Σ(x_hat ⊙ wdy) / N,  c2 = Σwdy / N  (LayerNorm only)
    dx = (wdy − x_hat·c1 − c2)·rstd          (RMSNorm: no c2)
    dw = Σ_rows dy ⊙ x_hat,   db = Σ_rows dy

``IS_RMS`` switches between the two. An optional operand the launch passes as ``None`` (a weight, a
bias, the residual stream, ``scale`` = 1, ``w_offset`` = 0 in the forward) is a constant to
Triton, so ``W is not None`` switches its terms off at compile time like a ``tl.constexpr`` flag,
without the flag's argument (each argument costs host time on every launch). All
arithmetic is fp32 whatever the storage dtype. Rows that fit one tile are loaded once and kept in
registers (``SINGLE_TILE``); longer rows loop over column tiles.

The residual add next to a norm is a switch of the same kernels (``RES_MODE``, normzoo.fused): the
forward reads the residual stream r and writes the sum s (s = r + x before the norm, s = r + N(x)
after it, or both sides with a second norm N2 on s), and scales y by ``scale``; the backward adds
the sum's own gradient to dx (``DRES``), scales dy, and may store dx twice in two dtypes
(``DX2``). The sum is normalized and differentiated as stored (rounded to s's dtype).

``ROUND_X_HAT`` reproduces models that round x_hat before the weight multiplies it (Hugging Face's
Llama family rounds it to the norm's input's dtype, T5 to a 16-bit weight's): y = w ⊙ round(x_hat),
the product rounded once more when stored (in y's dtype, which the caller chose). In a fused op each
norm rounds to its own input's dtype (the sum's, where it normalizes s) and its own weight's; a
rounding to fp32 is none. The backward treats the rounding as the identity (as autograd does a
cast) and sums dw over the rounded x_hat.
"""

import torch
import triton
import triton.language as tl

from .heuristics import launch_config, num_compute_units, split_rows, vector_aligned
from .launch import (alloc, alloc_bias_grad, alloc_grad, alloc_like, alloc_rows, check_rows, device_guard,
                     empty_residual_grads, partials_layout, residual_grad_buffers)
from .reduce import sum_partials
from .tiles import load_tile, partial_offsets, rstd_of, store_column_sums, store_tile


@triton.jit
def _row_stats_single_tile(x, mask, N, eps, IS_RMS: tl.constexpr):
    """x: (BLOCK_M, BLOCK_N) fp32, zero where masked. Returns (mean, rstd, x_hat)."""
    if IS_RMS:
        mean = tl.zeros_like(tl.sum(x, axis=1))
        rstd = rstd_of(tl.sum(x * x, axis=1) / N + eps)
        x_hat = x * rstd[:, None]
    else:
        mean = tl.sum(x, axis=1) / N
        # Two passes over registers (centre, then square): no E[x²] − E[x]² cancellation.
        x_centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = rstd_of(tl.sum(x_centered * x_centered, axis=1) / N + eps)
        x_hat = x_centered * rstd[:, None]
    return mean, rstd, x_hat


# What a forward writes besides the norm (RES_MODE), with the residual stream r and the sum s:
#   "none"           y = N(x)·scale
#   "add_norm"       s = r + x, y = N(s)·scale  (pre-norm: the add before the norm)
#   "norm_add"       s = r + N(x)              (Peri-LN's output norm; no y)
#   "norm_add_norm"  s = r + N(x), y = N2(s)·scale  (Peri-LN between sublayers)
# Switches like this one are string constexprs compared with literals, not module-level
# tl.constexpr names: Triton re-checks every global a kernel reads on each launch (~1 µs apiece
# on the host; tests/test_launches.py keeps them out).
RES_MODES = ("none", "add_norm", "norm_add", "norm_add_norm")
FUSED_MODES = RES_MODES[1:]


@triton.jit
def _param_row(P, cols, N, offset):
    """A parameter's columns as an fp32 (1, BLOCK_N) row (the tile's own layout), ``offset`` added
    in fp32 (Gemma's 1 + w: never to a 16-bit weight). None where P is None (absent)."""
    p = None  # one return: Triton's compiler rejects a second (its interpreter runs it)
    if P is not None:
        p = tl.load(P + cols[None, :], mask=(cols < N)[None, :], other=0.0).to(tl.float32)
        if offset is not None:
            p += offset
    return p


@triton.jit
def _affine(x_hat, w, b):
    """x_hat ⊙ w + b, for rows from :func:`_param_row` (None: absent)."""
    y = x_hat
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


# Where x_hat is rounded before the weight (ROUND_X_HAT), by the ops' code (round_x_hat) 0, 1, 2:
#   "none"    never (normzoo's own rule: fp32 until the one rounding of y)
#   "input"   to the dtype of the norm's input (Llama, Mistral, Qwen2/3: `w * x_hat.to(input_dtype)`)
#   "weight"  to the weight's dtype (T5 with a 16-bit weight; none without a weight)
X_HAT_ROUNDING = ("none", "input", "weight")


@triton.jit
def _rounded(x_hat, X, W, ROUND_X_HAT: tl.constexpr):
    """x_hat as the model stores it before the weight: rounded to X's (the norm's input) or W's
    dtype, and back."""
    if ROUND_X_HAT == "input":
        x_hat = x_hat.to(X.dtype.element_ty).to(tl.float32)
    elif ROUND_X_HAT == "weight":
        if W is not None:
            x_hat = x_hat.to(W.dtype.element_ty).to(tl.float32)
    return x_hat


@triton.jit
def _scaled(y, scale):
    # None (not a multiply by 1.0) where there is no scale: every switch a plain norm does not use
    # compiles away.
    if scale is not None:
        y = y * scale
    return y


@triton.jit
def _stored(S, value):
    """``value`` as it reads back from S: the sum is normalized, and differentiated, as stored."""
    return value.to(S.dtype.element_ty).to(tl.float32)


@triton.jit
def _merge_stats(mean, m2, x, mask, col_start, N, BLOCK_N: tl.constexpr, IS_RMS: tl.constexpr):
    """Fold one column tile into running (mean, M2) per row: Σx² for RMSNorm; for LayerNorm,
    Chan's parallel update of (count, mean, M2), as stable as two passes but one read."""
    if IS_RMS:
        m2 += tl.sum(x * x, axis=1)
    else:
        n_seen = col_start * 1.0
        n_tile = tl.minimum(N - col_start, BLOCK_N) * 1.0
        tile_mean = tl.sum(x, axis=1) / n_tile
        dev = tl.where(mask, x - tile_mean[:, None], 0.0)
        delta = tile_mean - mean
        n_total = n_seen + n_tile
        mean += delta * (n_tile / n_total)
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * (n_seen * n_tile / n_total)
    return mean, m2


@triton.jit
def _store_stats(STATS, rows, row_mask, M, mean, rstd, IS_RMS: tl.constexpr):
    if STATS is None:  # a forward that no backward follows (inference): nothing to keep
        pass
    elif IS_RMS:
        tl.store(STATS + rows, rstd, mask=row_mask)
    else:
        tl.store(STATS + rows, mean, mask=row_mask)
        tl.store(STATS + M + rows, rstd, mask=row_mask)


@triton.jit
def _forward_tile(rows, X, Y, W, B, w, b, STATS, R, S, W2, B2, STATS2, stride_x_row, stride_y_row, stride_r_row,
                  stride_s_row, M, N, eps, eps2, scale, w_offset, IS_RMS: tl.constexpr, RES_MODE: tl.constexpr,
                  ROUND_X_HAT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward of rows that fit one column tile (see _norm_fwd_kernel): read once, kept in
    registers. ``w``, ``b``: N's parameters as loaded rows (:func:`_param_row`), or both None: then
    they are loaded here, after the statistics (where ptxas allocated one tile a program best)."""
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N)
    mask = row_mask[:, None] & (cols < N)[None, :]
    v = load_tile(X, rows, stride_x_row, cols, mask, "")
    if RES_MODE == "add_norm":
        v = _stored(S, v + load_tile(R, rows, stride_r_row, cols, mask, ""))
        store_tile(S, rows, stride_s_row, cols, mask, v)
    mean, rstd, v_hat = _row_stats_single_tile(v, mask, N, eps, IS_RMS)
    _store_stats(STATS, rows, row_mask, M, mean, rstd, IS_RMS)
    if w is None and b is None:  # not loaded by the caller, or absent: W and B are None too
        w = _param_row(W, cols, N, w_offset)
        b = _param_row(B, cols, N, None)
    if RES_MODE == "add_norm":  # the norm's input is the sum: x_hat rounds to its dtype
        v_hat = _rounded(v_hat, S, W, ROUND_X_HAT)
    else:
        v_hat = _rounded(v_hat, X, W, ROUND_X_HAT)
    y = _affine(v_hat, w, b)
    if RES_MODE == "norm_add" or RES_MODE == "norm_add_norm":
        s = _stored(S, y + load_tile(R, rows, stride_r_row, cols, mask, ""))
        store_tile(S, rows, stride_s_row, cols, mask, s)
        if RES_MODE == "norm_add_norm":
            mean2, rstd2, s_hat = _row_stats_single_tile(s, mask, N, eps2, IS_RMS)
            _store_stats(STATS2, rows, row_mask, M, mean2, rstd2, IS_RMS)
            y = _affine(_rounded(s_hat, S, W2, ROUND_X_HAT), _param_row(W2, cols, N, w_offset),
                        _param_row(B2, cols, N, None))
            store_tile(Y, rows, stride_y_row, cols, mask, _scaled(y, scale))
    else:
        store_tile(Y, rows, stride_y_row, cols, mask, _scaled(y, scale))


@triton.jit
def _norm_fwd_kernel(
    X, Y, W, B,  # pointers; Y is None for "norm_add", W and B None without them
    STATS,  # per-row fp32 statistics of N's input: rstd (M,) for RMSNorm; mean then rstd (2M,) for LayerNorm
    R, S,  # residual stream in and the sum out (RES_MODE not "none"; None otherwise)
    W2, B2, STATS2,  # the second norm N2 ("norm_add_norm"): its parameters and the statistics of s
    stride_x_row, stride_y_row, stride_r_row, stride_s_row,  # elements between consecutive rows
    M, N,  # rows, columns
    eps, eps2,
    scale,  # multiplies y (LayerNorm scaling's 1/√l; None for 1)
    w_offset,  # added to the weight, and N2's (1.0 for Gemma-style 1 + w; None for 0)
    # The norm and where it rounds x_hat, one constexpr (see _launch_forward): 2·k + IS_RMS, k
    # the round_x_hat code (X_HAT_ROUNDING's index).
    NORM: tl.constexpr,
    RES_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    # One constexpr for three layouts (see _launch_forward): 0, a row that fits one tile, one tile
    # a program; -k, such rows in a persistent grid, each program walking row blocks with k blocks'
    # loads in flight (a measured table's choice); k > 0, longer rows, looped over column tiles
    # with k loads in flight (software pipelining).
    NUM_STAGES: tl.constexpr,
):
    IS_RMS: tl.constexpr = NORM % 2 == 1
    ROUND_X_HAT: tl.constexpr = "input" if NORM // 2 == 1 else ("weight" if NORM // 2 == 2 else "none")
    SINGLE_TILE: tl.constexpr = NUM_STAGES <= 0
    if SINGLE_TILE:
        if NUM_STAGES == 0:
            _forward_tile(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), X, Y, W, B, None, None, STATS, R, S,
                          W2, B2, STATS2, stride_x_row, stride_y_row, stride_r_row, stride_s_row, M, N, eps, eps2,
                          scale, w_offset, IS_RMS, RES_MODE, ROUND_X_HAT, BLOCK_N)
        else:
            # The parameters are the same for every row: loaded once, before the loop, and held in
            # registers (one fp32 row each), not reloaded each row block through the pipeline's
            # shared memory (at BLOCK_M 1 as many bytes from L2 as the row itself).
            cols = tl.arange(0, BLOCK_N)
            w = _param_row(W, cols, N, w_offset)
            b = _param_row(B, cols, N, None)
            for block_start in tl.range(tl.program_id(0) * BLOCK_M, M, tl.num_programs(0) * BLOCK_M,
                                        num_stages=-NUM_STAGES):
                _forward_tile(block_start + tl.arange(0, BLOCK_M), X, Y, W, B, w, b, STATS, R, S, W2, B2, STATS2,
                              stride_x_row, stride_y_row, stride_r_row, stride_s_row, M, N, eps, eps2, scale,
                              w_offset, IS_RMS, RES_MODE, ROUND_X_HAT, BLOCK_N)
    else:
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        # Pass 1: statistics of N's input, read once (with "add_norm" it is the sum, written here).
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for col_start in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
            cols = col_start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            v = load_tile(X, rows, stride_x_row, cols, mask, "evict_last")
            if RES_MODE == "add_norm":
                v = _stored(S, v + load_tile(R, rows, stride_r_row, cols, mask, ""))
                store_tile(S, rows, stride_s_row, cols, mask, v)
            mean, m2 = _merge_stats(mean, m2, v, mask, col_start, N, BLOCK_N, IS_RMS)
        rstd = rstd_of(m2 / N + eps)
        if RES_MODE == "add_norm":
            tl.debug_barrier()  # pass 2 reads back the sums this program's threads wrote
        # Pass 2: normalize (and add). Pass 1's reads were marked evict_last, so this re-read of
        # the row hits L2 rather than DRAM while the rows in flight fit in it.
        mean2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2_2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for col_start in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
            cols = col_start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            if RES_MODE == "add_norm":
                v = load_tile(S, rows, stride_s_row, cols, mask, "evict_first")
                v_hat = _rounded((v - mean[:, None]) * rstd[:, None], S, W, ROUND_X_HAT)
            else:
                v = load_tile(X, rows, stride_x_row, cols, mask, "evict_first")
                v_hat = _rounded((v - mean[:, None]) * rstd[:, None], X, W, ROUND_X_HAT)
            y = _affine(v_hat, _param_row(W, cols, N, w_offset), _param_row(B, cols, N, None))
            if RES_MODE == "norm_add" or RES_MODE == "norm_add_norm":
                s = _stored(S, tl.where(mask, y, 0.0) + load_tile(R, rows, stride_r_row, cols, mask, ""))
                store_tile(S, rows, stride_s_row, cols, mask, s)
                if RES_MODE == "norm_add_norm":
                    mean2, m2_2 = _merge_stats(mean2, m2_2, s, mask, col_start, N, BLOCK_N, IS_RMS)
            else:
                store_tile(Y, rows, stride_y_row, cols, mask, _scaled(y, scale))
        # Stored after pass 2, not before it: with the store between the passes, ptxas spilled 8
        # bytes in the fp32 LayerNorm forward (compile_check, sm_90).
        _store_stats(STATS, rows, row_mask, M, mean, rstd, IS_RMS)
        if RES_MODE == "norm_add_norm":
            # Pass 3: the second norm, over the sums just written (read back from L2).
            rstd2 = rstd_of(m2_2 / N + eps2)
            _store_stats(STATS2, rows, row_mask, M, mean2, rstd2, IS_RMS)
            tl.debug_barrier()
            for col_start in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
                cols = col_start + tl.arange(0, BLOCK_N)
                mask = row_mask[:, None] & (cols < N)[None, :]
                s = load_tile(S, rows, stride_s_row, cols, mask, "evict_first")
                y = _affine(_rounded((s - mean2[:, None]) * rstd2[:, None], S, W2, ROUND_X_HAT),
                            _param_row(W2, cols, N, w_offset), _param_row(B2, cols, N, None))
                store_tile(Y, rows, stride_y_row, cols, mask, _scaled(y, scale))


@triton.jit
def _load_stats(STATS, rows, row_mask, M, IS_RMS: tl.constexpr):
    """(mean, rstd) of these rows; mean is a placeholder (rstd) for RMSNorm, which has none."""
    if IS_RMS:
        rstd = tl.load(STATS + rows, mask=row_mask, other=0.0)
        mean = rstd
    else:
        mean = tl.load(STATS + rows, mask=row_mask, other=0.0)
        rstd = tl.load(STATS + M + rows, mask=row_mask, other=0.0)
    return mean, rstd


@triton.jit
def _x_hat(x, mean, rstd, IS_RMS: tl.constexpr):
    # No masking needed: dy is loaded as 0 in masked columns, and every sum that x_hat enters
    # (c1, dw) multiplies it by dy first.
    if IS_RMS:
        x_hat = x * rstd[:, None]
    else:
        x_hat = (x - mean[:, None]) * rstd[:, None]
    return x_hat


@triton.jit
def _norm_bwd_kernel(
    X, W, DY, DX, STATS, PARTIALS, DW, DB, ROW_SUMS,
    stride_x_row, stride_dy_row, stride_dx_row,
    M, N, rows_per_program, db_offset, scale, w_offset,
    IS_RMS: tl.constexpr,
    ROUND_X_HAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DIRECT: tl.constexpr,
):
    """:func:`_norm_bwd` without fused operands (a plain norm's backward, or a fused op's launch
    with none: norm_add's, say): 25 launch arguments where the fused kernel takes 37, and Triton's
    launch spends host time on every argument it is given, a None included. ``scale`` stays an
    argument (the launcher passes the float 1.0): the looped path multiplies by it, and that
    multiply is what ptxas's register allocation was measured with (see _norm_bwd)."""
    _norm_bwd(X, W, DY, DX, STATS, PARTIALS, DW, DB, ROW_SUMS, None, None,
              stride_x_row, stride_dy_row, stride_dx_row, 0, stride_dx_row, M, N, rows_per_program, db_offset,
              scale, w_offset, None, None, None, None, None, None, 0,
              IS_RMS, False, ROUND_X_HAT, BLOCK_M, BLOCK_N, SINGLE_TILE, NUM_STAGES, DIRECT)


@triton.jit
def _norm_fused_bwd_kernel(
    X, W, DY, DX, STATS, PARTIALS, DW, DB, ROW_SUMS, DRES, DX2,
    stride_x_row, stride_dy_row, stride_dx_row, stride_dres_row, stride_dx2_row,
    M, N, rows_per_program, db_offset, scale, w_offset,
    H, W1, STATS1, DH, DW1, DB1, stride_h_row,
    IS_RMS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ROUND_X_HAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DIRECT: tl.constexpr,
):
    """:func:`_norm_bwd` with every operand: a fused residual op's backward that has a fused
    operand (the sum's gradient, a second dx, a first norm) or a scale."""
    _norm_bwd(X, W, DY, DX, STATS, PARTIALS, DW, DB, ROW_SUMS, DRES, DX2,
              stride_x_row, stride_dy_row, stride_dx_row, stride_dres_row, stride_dx2_row, M, N, rows_per_program,
              db_offset, scale, w_offset, H, W1, STATS1, DH, DW1, DB1, stride_h_row,
              IS_RMS, HAS_SCALE, ROUND_X_HAT, BLOCK_M, BLOCK_N, SINGLE_TILE, NUM_STAGES, DIRECT)


@triton.jit
def _norm_bwd(
    X, W, DY, DX,  # pointers; W None without a weight
    STATS,  # the forward's per-row statistics (see _norm_fwd_kernel)
    PARTIALS,  # fp32 (num_programs, N) column sums: [dw | db | dw1 | db1], as tiles.partial_offsets lays them out
    DW, DB,  # dw and db (None: not asked for); DIRECT (a one-program grid) writes them here, in their dtypes
    ROW_SUMS,  # (M, 2) fp32 scratch for c1, c2 on the looped path (None for a single tile)
    DRES,  # or None: a gradient added to dx (the sum's, when x was the sum r + h of a fused add)
    DX2,  # or None: dx stored a second time, in DX2's dtype (the add's other input's gradient)
    stride_x_row, stride_dy_row, stride_dx_row, stride_dres_row, stride_dx2_row,
    M, N,
    rows_per_program,  # a multiple of BLOCK_M
    db_offset,  # where db's column sums start in PARTIALS (after dw's)
    # The forward's y scale: dy is scaled by it on load, behind HAS_SCALE on the single-tile path
    # and always on the looped one. Measured on sm_90 (compile_check), not reasoned: with the
    # multiply ptxas kept the looped fp32 LayerNorm backward at 64 registers (121 without), and
    # without it the 16-bit 8192-wide single tile at 59 (100 with).
    scale,
    w_offset,  # the forward's weight offset (None for 0)
    # Peri-LN's norm_add_norm (s = r + N1(h), y = N2(s)): with X = s and the launch's norm N2, dx is
    # s's gradient, and N1's backward runs on it in the same pass (single tile only): H, its input
    # (None: no first norm); W1, STATS1 as W, STATS; DH, h's gradient (rows stride_dx_row apart);
    # DW1, DB1 as DW, DB. Last, so that every other launch compiles as it did without them.
    H, W1, STATS1, DH, DW1, DB1, stride_h_row,
    IS_RMS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ROUND_X_HAT: tl.constexpr,  # the forward's: dw sums dy ⊙ x_hat as rounded there
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # row blocks in flight: the next block's loads overlap this one's reductions
    DIRECT: tl.constexpr,  # one program owns every row: it writes dw and db, no reduce launch follows
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    partial_row = pid.to(tl.int64) * N

    if not SINGLE_TILE:
        # Pass A (long rows only): the row sums c1, c2 of this program's rows, into a scratch.
        for block_start in range(row_start, row_end, BLOCK_M):
            rows = block_start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)
            mean, rstd = _load_stats(STATS, rows, row_mask, M, IS_RMS)
            c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for col_start in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
                cols = col_start + tl.arange(0, BLOCK_N)
                col_mask = cols < N
                mask = row_mask[:, None] & col_mask[None, :]
                x = load_tile(X, rows, stride_x_row, cols, mask, "evict_last")  # read again in pass B
                wdy = load_tile(DY, rows, stride_dy_row, cols, mask, "evict_last") * scale
                if W is not None:
                    w_row = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                    if w_offset is not None:
                        w_row += w_offset
                    wdy = wdy * w_row
                c1 += tl.sum(_x_hat(x, mean, rstd, IS_RMS) * wdy, axis=1)
                c2 += tl.sum(wdy, axis=1)
            tl.store(ROW_SUMS + rows64 * 2, c1 / N, mask=row_mask)
            tl.store(ROW_SUMS + rows64 * 2 + 1, c2 / N, mask=row_mask)
        # Other threads of this program read these sums back below: make the stores visible.
        tl.debug_barrier()

    # dx, and dw/db partial sums. Column tiles are outermost so each tile's column sums stay in
    # registers; a row that fits one tile (SINGLE_TILE) makes this loop run once and computes
    # c1, c2 in registers instead of reading them back.
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        if W is not None:  # loaded as a (1, BLOCK_N) row: the tile's own layout, no conversion
            w = tl.load(W + cols[None, :], mask=col_mask[None, :], other=0.0).to(tl.float32)
            if w_offset is not None:
                w += w_offset
        # Column sums accumulate element-wise over the row loop and are reduced across the tile's
        # rows once, after it (no reduction per row block).
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if H is not None:
            if W1 is not None:
                w1 = tl.load(W1 + cols[None, :], mask=col_mask[None, :], other=0.0).to(tl.float32)
                if w_offset is not None:
                    w1 += w_offset
            dw1_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            db1_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for block_start in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):
            rows = block_start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)
            if SINGLE_TILE:
                x = load_tile(X, rows, stride_x_row, cols, mask, "")
                dy = load_tile(DY, rows, stride_dy_row, cols, mask, "")
                if HAS_SCALE:
                    dy = dy * scale
            else:  # the last read of this part of the row
                x = load_tile(X, rows, stride_x_row, cols, mask, "evict_first")
                dy = load_tile(DY, rows, stride_dy_row, cols, mask, "evict_first") * scale
            mean, rstd = _load_stats(STATS, rows, row_mask, M, IS_RMS)
            x_hat = _x_hat(x, mean, rstd, IS_RMS)
            # The column sums first: dy is then dead before the row reductions below, whose
            # barriers every live value waits across (8 registers a thread fewer in LayerNorm).
            if DW is not None:
                dw_acc += dy * _rounded(x_hat, X, W, ROUND_X_HAT)
            if DB is not None:
                db_acc += dy
            wdy = dy
            if W is not None:
                wdy = dy * w
            if SINGLE_TILE:
                c1 = tl.sum(x_hat * wdy, axis=1) / N
                c2 = tl.sum(wdy, axis=1) / N
            else:
                c1 = tl.load(ROW_SUMS + rows64 * 2, mask=row_mask, other=0.0)
                c2 = tl.load(ROW_SUMS + rows64 * 2 + 1, mask=row_mask, other=0.0)
            if IS_RMS:
                dx = (wdy - x_hat * c1[:, None]) * rstd[:, None]
            else:
                dx = (wdy - x_hat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if DRES is not None:
                dx += load_tile(DRES, rows, stride_dres_row, cols, mask, "")
            store_tile(DX, rows, stride_dx_row, cols, mask, dx)
            if DX2 is not None:
                store_tile(DX2, rows, stride_dx2_row, cols, mask, dx)
            if H is not None:
                tl.static_assert(SINGLE_TILE, "the first norm's row sums need the whole row in one tile")
                # N1's backward on h with the sum's gradient, as computed (fp32, not as stored):
                # the same formulas, one more read (h) and one more write (dh) in this pass.
                g = tl.where(mask, dx, 0.0)  # LayerNorm's dx is not 0 in masked columns
                h = load_tile(H, rows, stride_h_row, cols, mask, "")
                mean1, rstd1 = _load_stats(STATS1, rows, row_mask, M, IS_RMS)
                h_hat = _x_hat(h, mean1, rstd1, IS_RMS)
                if DW1 is not None:
                    dw1_acc += g * _rounded(h_hat, H, W1, ROUND_X_HAT)
                if DB1 is not None:
                    db1_acc += g
                wg = g
                if W1 is not None:
                    wg = g * w1
                c1 = tl.sum(h_hat * wg, axis=1) / N
                if IS_RMS:
                    dh = (wg - h_hat * c1[:, None]) * rstd1[:, None]
                else:
                    dh = (wg - h_hat * c1[:, None] - (tl.sum(wg, axis=1) / N)[:, None]) * rstd1[:, None]
                store_tile(DH, rows, stride_dx_row, cols, mask, dh)
        if DW is not None:
            store_column_sums(PARTIALS, DW, partial_row + cols, cols, col_mask, dw_acc, DIRECT)
        if DB is not None:
            store_column_sums(PARTIALS + db_offset, DB, partial_row + cols, cols, col_mask, db_acc, DIRECT)
        if H is not None:
            _, dw1_offset, db1_offset, _ = partial_offsets(tl.num_programs(0).to(tl.int64) * N, DW, DB, DW1, DB1)
            if DW1 is not None:
                store_column_sums(PARTIALS + dw1_offset, DW1, partial_row + cols, cols, col_mask, dw1_acc, DIRECT)
            if DB1 is not None:
                store_column_sums(PARTIALS + db1_offset, DB1, partial_row + cols, cols, col_mask, db1_acc, DIRECT)


def _bad_rounding(round_x_hat) -> ValueError:
    return ValueError(f"round_x_hat must be 0, 1 or 2 (X_HAT_ROUNDING's codes), got {round_x_hat!r}")


def rowwise_norm_forward(x, weight, bias, eps: float, *, is_rms: bool, weight_offset: float = 0.0,
                         round_x_hat: int = 0, out_dtype: torch.dtype | None = None, max_block_n: int | None = None,
                         with_stats: bool = True):
    """Normalize each row of the 2-D ``x`` (last dim contiguous).

    Returns ``(y, stats)``: ``y`` in ``out_dtype`` (default x's); ``stats`` the per-row fp32
    statistics the backward takes, ``rstd`` (M,) for RMSNorm and ``mean`` then ``rstd`` in one flat
    (2M,) buffer for LayerNorm (one allocation on the host path), or ``None`` with
    ``with_stats=False`` (no backward follows: neither allocated nor stored). ``weight_offset`` is added to the
    weight in fp32 (Gemma's ``1 + w``). ``round_x_hat``: 0, or x_hat rounded to x's (1) or the
    weight's (2) dtype before the weight multiplies it (``X_HAT_ROUNDING``'s codes).
    """
    if x.dim() != 2 or not x.is_contiguous():  # check_rows's usual case inline
        check_rows(x)
    if not 0 <= round_x_hat <= 2:  # inline, not a call: on every launch (a negative code would index from the end)
        raise _bad_rounding(round_x_hat)
    M, N = x.shape
    y = alloc_like(x) if out_dtype is None else alloc_rows(x, out_dtype)
    stats = alloc(x, M if is_rms else 2 * M, torch.float32) if with_stats else None
    if M and N:
        _launch_forward(x, M, N, y, weight, bias, stats, None, None, None, None, None, eps, 0.0, 1.0, is_rms, "none",
                        max_block_n, weight_offset, round_x_hat)
    return y, stats


def rowwise_residual_forward(x, residual, weight, bias, eps: float, *, is_rms: bool, mode: str, scale: float = 1.0,
                             sum_dtype: torch.dtype | None = None, weight2=None, bias2=None, eps2: float = 0.0,
                             weight_offset: float = 0.0, round_x_hat: int = 0, out_dtype: torch.dtype | None = None,
                             max_block_n: int | None = None, with_stats: bool = True):
    """A norm fused with the residual add next to it, on 2-D ``x`` and ``residual`` of one shape.

    ``mode``: ``"add_norm"`` (s = residual + x, y = N(s)·scale), ``"norm_add"`` (s = residual +
    N(x); no y) or ``"norm_add_norm"`` (s = residual + N(x), y = N2(s)·scale, N2 with ``weight2``,
    ``bias2``, ``eps2``). s is stored in ``sum_dtype`` (default: x's and residual's promoted dtype)
    and y in x's dtype. Returns ``(y, s, stats, stats2)``: ``stats`` of N's input (s for add_norm,
    x otherwise), ``stats2`` of s for norm_add_norm; absent ones ``None``, and both with
    ``with_stats=False`` (no backward follows: neither allocated nor stored). ``weight_offset`` is
    added to both norms' weights (Gemma's 1 + w). ``round_x_hat`` (``X_HAT_ROUNDING``'s codes) rounds
    each norm's x_hat to its own input's (1) or weight's (2) dtype; ``out_dtype``: y's, if not x's.
    """
    if x.dim() != 2 or not x.is_contiguous() or not residual.is_contiguous() or residual.shape != x.shape:
        check_rows(x, residual)  # (its usual case, inline)
    M, N = x.shape
    if mode not in FUSED_MODES:
        raise ValueError(f"mode must be one of {FUSED_MODES}, got {mode!r}")
    if not 0 <= round_x_hat <= 2:
        raise _bad_rounding(round_x_hat)
    s = alloc_rows(residual, sum_dtype or torch.promote_types(x.dtype, residual.dtype))
    y = (alloc_like(x) if out_dtype is None else alloc_rows(x, out_dtype)) if mode != "norm_add" else None
    stats = alloc(x, M if is_rms else 2 * M, torch.float32) if with_stats else None
    stats2 = alloc(x, M if is_rms else 2 * M, torch.float32) if with_stats and mode == "norm_add_norm" else None
    if M and N:
        _launch_forward(x, M, N, y, weight, bias, stats, residual, s, weight2, bias2, stats2, eps, eps2, scale, is_rms,
                        mode, max_block_n, weight_offset, round_x_hat)
    return y, s, stats, stats2


def _launch_forward(x, M, N, y, weight, bias, stats, residual, s, weight2, bias2, stats2, eps, eps2, scale, is_rms,
                    res_mode, max_block_n, weight_offset=0.0, round_x_hat=0):
    # A table's whole-row tile and persistent grid were timed on the plain norm: a fused op's forward
    # holds and stages more per row (shared memory a table never checked), so it takes neither.
    cfg = launch_config("rmsnorm" if is_rms else "layernorm", "fwd", N, x.dtype, x.device, max_block_n, True,
                        res_mode == "none")
    blocks = -(-M // cfg.block_m)  # cdiv, inline
    # The persistent loop's int32 row counter runs up to M plus one grid of rows: kept off 2^31.
    persistent = cfg.persistent and cfg.single_tile and M < 2**30
    if stats is None and not cfg.single_tile and res_mode == "none":
        # A looped row stores its statistics even where no backward reads them: without the
        # stores, ptxas spilled 8 bytes in the fp32 LayerNorm forward with weight and bias
        # (40 registers, N >= 8192; compile_check, sm_90). Beside rows this long the buffer is nothing.
        stats = alloc(x, M if is_rms else 2 * M, torch.float32)
    with device_guard(x):
        # Absent operands as None: constants to Triton, which compile their terms away (the
        # kernel tests ``is not None``). 25 positional arguments, the most CPython passes on its
        # stack beside run's three keywords (26 build a tuple and a dict first, CALL_FUNCTION_EX:
        # dis, Python 3.11); for that, constexprs that share one argument: the norm with its x_hat
        # rounding, and whether the row is one tile with the loop's stages.
        _norm_fwd_kernel.run(
               x, y, weight, bias, stats, residual, s, weight2, bias2, stats2,
               x.stride()[0], N, residual.stride()[0] if residual is not None else 0, N, M, N, eps, eps2,
               scale if scale != 1.0 else None, weight_offset if weight_offset != 0.0 else None,
               # The constexprs by position (by keyword, a launch costs ~0.7 µs more on the host):
               # NORM, RES_MODE, BLOCK_M, BLOCK_N, NUM_STAGES (0: a single tile a program; -k:
               # single tiles in a persistent grid, k row blocks in flight; k: a looped row's 1-4,
               # the rules' and what heuristics.validate_entry lets a table set).
               2 * round_x_hat + is_rms, res_mode, cfg.block_m, cfg.block_n,
               (-cfg.num_stages if persistent else 0) if cfg.single_tile else cfg.num_stages,
               grid=(min(blocks, cfg.programs_per_sm * num_compute_units(x.device)) if persistent else blocks,),
               warmup=False, num_warps=cfg.num_warps)


def rowwise_norm_backward(
    dy, x, weight, stats, *, is_rms: bool, compute_dw: bool, db_dtype: torch.dtype | None,
    weight_offset: float = 0.0, round_x_hat: int = 0, max_block_n: int | None = None,
):
    """Gradients of :func:`rowwise_norm_forward` (``stats`` is its second result).

    Returns ``(dx, dw, db)``: dx in x's dtype; dw and db summed over rows in fp32 partials, one
    row per program, then reduced by a second launch into the weight's dtype and ``db_dtype`` (the
    bias's); a grid of one program (under 32 rows) writes them itself. ``db_dtype=None`` means no
    bias gradient. Absent ones are ``None``. Deterministic: no atomics, a fixed reduction order.
    ``dy`` may have another dtype than x (the forward's ``out_dtype``).
    """
    if x.dim() != 2 or not x.is_contiguous() or not dy.is_contiguous() or dy.shape != x.shape:  # check_rows's, inline
        check_rows(x, dy)
    if not 0 <= round_x_hat <= 2:  # inline, not a call: on every launch (a negative code would index from the end)
        raise _bad_rounding(round_x_hat)
    dx, _, dw, db = _backward(dy, x, weight, stats, is_rms, compute_dw, db_dtype, None, alloc_like(x), None, 1.0,
                              max_block_n, weight_offset, round_x_hat)
    return dx, dw, db


def rowwise_residual_backward(dy, x, weight, stats, *, is_rms: bool, compute_dw: bool, db_dtype: torch.dtype | None,
                              dres=None, dx_dtype: torch.dtype | None = None, dx2_dtype: torch.dtype | None = None,
                              scale: float = 1.0, weight_offset: float = 0.0, round_x_hat: int = 0,
                              max_block_n: int | None = None):
    """:func:`rowwise_norm_backward` of ``y = N(x)·scale`` for a norm whose input ``x`` is a fused
    add's sum: ``dx = dres + J_Nᵀ(dy·scale)`` (``dres``, the sum's own gradient, may be None),
    stored in ``dx_dtype`` (default x's) and, with ``dx2_dtype``, a second time in that dtype (the
    add's two inputs differ in dtype). Returns ``(dx, dx2, dw, db)``, absent ones ``None``."""
    if not 0 <= round_x_hat <= 2:
        raise _bad_rounding(round_x_hat)
    dx, dx2 = residual_grad_buffers(x, dy, dres, dx_dtype, dx2_dtype)
    return _backward(dy, x, weight, stats, is_rms, compute_dw, db_dtype, dres, dx, dx2, scale, max_block_n,
                     weight_offset, round_x_hat)


def rowwise_peri_backward(dy, ds, s, weight2, stats2, h, weight1, stats1, *, is_rms: bool, compute_dw1: bool,
                          db1_dtype: torch.dtype | None, compute_dw2: bool, db2_dtype: torch.dtype | None,
                          dx_dtype: torch.dtype | None = None, dh_dtype: torch.dtype | None = None,
                          scale: float = 1.0, weight_offset: float = 0.0, round_x_hat: int = 0,
                          max_block_n: int | None = None):
    """Gradients of :func:`rowwise_residual_forward`'s ``"norm_add_norm"`` (s = r + N1(h), y =
    N2(s)·scale, N2 with ``weight2``/``stats2``): ``dx = ds + J_N2ᵀ(dy·scale)``, the gradient of r
    and of N1's output, in ``dx_dtype`` (default s's), and ``dh = J_N1ᵀ dx`` in ``dh_dtype`` (default
    h's), computed from dx in fp32. ``ds`` may be None. Returns ``(dx, dh, dw1, db1, dw2, db2)``.

    Rows that fit one tile take one pass (one read of dy, ds, s and h, one write of dx and dh);
    longer rows take N2's backward, then N1's on an fp32 copy of dx (two kernels, each with its reduce).
    ``round_x_hat`` as the forward's: each norm's dw sums over its x_hat as rounded there.
    """
    check_rows(s, dy, h) if ds is None else check_rows(s, dy, h, ds)
    if not 0 <= round_x_hat <= 2:
        raise _bad_rounding(round_x_hat)
    M, N = s.shape
    wide = s.dtype if s.dtype.itemsize >= h.dtype.itemsize else h.dtype  # the tile rule's dtype
    if is_rms and wide.itemsize == 4 and h.dtype.itemsize == 2 and N <= 4096 and vector_aligned(N):
        # 16-bit activations beside an fp32 stream: RMSNorm's one pass fits a 4096-wide row in the
        # 16-bit rule's layout (16 warps, 8 values a thread: 101-128 registers, no spill; compile_check
        # sm_90), not the two kernels (10 units of row traffic for 6). LayerNorm's took 128 registers
        # and spilled 8 bytes, and so did unaligned rows (element-wise addresses: 16 bytes at 3001
        # and 4095): they keep the fp32 rule. (LayerNorm's without the cp.async prefetch,
        # num_stages=1, took 119 and no spill, but with no load in flight across its reductions
        # at one program per SM; 3 stages spilled 80 bytes, and the weights read per row block
        # instead of held, 40: compile_check, untimed.)
        wide = h.dtype
    cfg = launch_config("rmsnorm" if is_rms else "layernorm", "bwd_peri", N, wide, s.device, max_block_n)
    dx = alloc_rows(s, dx_dtype or s.dtype)
    if not cfg.single_tile or M == 0 or N == 0:
        dx_wide = alloc_rows(s, torch.float32) if dx.dtype.itemsize < 4 else None
        dx, dx_wide, dw2, db2 = _backward(dy, s, weight2, stats2, is_rms, compute_dw2, db2_dtype, ds, dx, dx_wide,
                                          scale, max_block_n, weight_offset, round_x_hat)
        dh, _, dw1, db1 = _backward(dx_wide if dx_wide is not None else dx, h, weight1, stats1, is_rms, compute_dw1,
                                    db1_dtype, None, alloc_rows(h, dh_dtype or h.dtype), None, 1.0, max_block_n,
                                    weight_offset, round_x_hat)
        return dx, dh, dw1, db1, dw2, db2
    dh = alloc_rows(h, dh_dtype or h.dtype)
    _, _, dw2, db2, dw1, db1 = _backward(dy, s, weight2, stats2, is_rms, compute_dw2, db2_dtype, ds, dx, None, scale,
                                         max_block_n, weight_offset, round_x_hat,
                                         (h, weight1, stats1, dh, compute_dw1, db1_dtype), cfg)
    return dx, dh, dw1, db1, dw2, db2


def _backward(dy, x, weight, stats, is_rms, compute_dw, db_dtype, dres, dx, dx2, scale, max_block_n,
              weight_offset=0.0, round_x_hat=0, first=None, cfg=None):
    """The backward launch (and its reduce). ``first``: ``(h, weight1, stats1, dh, compute_dw1,
    db1_dtype)``, a first norm whose output x's sum took (norm_add_norm, single tile): its dh and
    (dw1, db1) come from the same pass, and the result is ``(dx, dx2, dw, db, dw1, db1)``."""
    M, N = x.shape
    device = x.device
    compute_db = db_dtype is not None
    if M == 0 or N == 0:
        empty_residual_grads(dx, dx2, dres)
        return (dx, dx2, torch.zeros(N, dtype=weight.dtype, device=device) if compute_dw else None,
                torch.zeros(N, dtype=db_dtype, device=device) if compute_db else None)

    if cfg is None:
        # A fused op's backward moves more: the sum's gradient in, dx maybe twice out. A dy in another
        # dtype than x's (an x_hat_dtype norm's fp32 output, norm_add_norm's fp32 dx) is not the
        # launch a table's whole-row tile was timed on (more shared memory, more spill): the rules'.
        pass_ = "bwd" if dres is None and dx2 is None else "bwd_res2" if dx2 is not None else "bwd_res"
        cfg = launch_config("rmsnorm" if is_rms else "layernorm", pass_, N, x.dtype, device, max_block_n,
                            weight is not None or compute_db, dy.dtype is x.dtype,
                            dx2 is not None and dy.dtype.itemsize > dx2.dtype.itemsize)
    rows_per_program, programs = split_rows(M, cfg, device)

    # Each gradient as its (N,) parameter (alloc_grad).
    dw = alloc_grad(weight) if compute_dw else None
    db = alloc_bias_grad(weight, x, N, db_dtype)
    h = weight1 = stats1 = dh = dw1 = db1 = None
    compute_dw1 = compute_db1 = False
    if first is not None:
        h, weight1, stats1, dh, compute_dw1, db1_dtype = first
        compute_db1 = db1_dtype is not None
        dw1 = alloc_grad(weight1) if compute_dw1 else None
        db1 = alloc_bias_grad(weight1, x, N, db1_dtype)
    # Few rows (one program): the kernel writes the gradients itself. Otherwise one fp32 scratch
    # buffer for every column sum (one allocation), [dw | db | dw1 | db1] (programs × N each, the
    # absent ones left out), and a second launch reduces it.
    direct = programs == 1
    db_offset, dw1_offset, db1_offset, _, size = partials_layout(programs * N, programs,
                                                                 (compute_dw, compute_db, compute_dw1, compute_db1))
    partials = alloc(x, size, torch.float32) if not direct and size else None
    row_sums = None if cfg.single_tile else alloc(x, 2 * M, torch.float32)
    with device_guard(x):
        # Absent operands as None (see _launch_forward); PARTIALS is addressed even when unused.
        if dres is None and dx2 is None and first is None and scale == 1.0:  # no fused operand: its own kernel
            _norm_bwd_kernel.run(  # scale as the float 1.0 (an int 1 would be a constant to Triton)
                x, weight, dy, dx, stats, partials if partials is not None else dx, dw, db, row_sums,
                x.stride()[0], dy.stride()[0], N, M, N, rows_per_program, db_offset, 1.0,
                weight_offset if weight_offset != 0.0 else None,
                # IS_RMS, ROUND_X_HAT, BLOCK_M, BLOCK_N, SINGLE_TILE, NUM_STAGES, DIRECT (by position)
                is_rms, X_HAT_ROUNDING[round_x_hat], cfg.block_m, cfg.block_n, cfg.single_tile, cfg.num_stages, direct,
                grid=(programs,), warmup=False, num_warps=cfg.num_warps,
            )
        else:
            _norm_fused_bwd_kernel.run(
                x, weight, dy, dx, stats, partials if partials is not None else dx, dw, db, row_sums, dres, dx2,
                x.stride()[0], dy.stride()[0], N, dres.stride()[0] if dres is not None else 0, N,
                M, N, rows_per_program, db_offset, scale, weight_offset if weight_offset != 0.0 else None,
                h, weight1, stats1, dh, dw1, db1, h.stride()[0] if h is not None else 0,
                # IS_RMS, HAS_SCALE, ROUND_X_HAT, BLOCK_M, BLOCK_N, SINGLE_TILE, NUM_STAGES, DIRECT (by position)
                is_rms, scale != 1.0, X_HAT_ROUNDING[round_x_hat], cfg.block_m, cfg.block_n, cfg.single_tile,
                cfg.num_stages, direct,
                grid=(programs,), warmup=False, num_warps=cfg.num_warps,
            )
        if partials is not None:
            # (..., scalar_offset, P_scalar, dalpha, dshift, dw2, db2, dw2_offset, db2_offset), by position
            sum_partials(partials, programs, N, db_offset, dw, db, 0, 0, None, None, dw1, db1, dw1_offset, db1_offset)
    if first is not None:
        return dx, dx2, dw, db, dw1, db1
    return dx, dx2, dw, db
