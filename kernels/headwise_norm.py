"""Norms of short rows read where they lie: QK-norm (q and k in one launch), ScaleNorm, CRMSNorm.

Each row x (N values) is normalized on its own, as ``NORM`` says:

    RMS:   rstd = 1/√(Σx²/N + eps)                  (QK-norm of Qwen3 per head, OLMo 2 over heads)
    L2:    rstd = 1/max(√Σx², eps)                  (ScaleNorm; the QK-norm paper's q̂, k̂)
    CRMS:  rstd = 1/√((Σx² + (Σx)²)/(N+1) + eps)    (CRMSNorm: x is a zero-mean vector of N+1
                                                      values with its last one, −Σx, left out)
    y = w ⊙ (x·rstd), w per column, one scalar for every column (loaded once), or absent.

Backward, with wdy = w ⊙ dy, x_hat = x·rstd and c = Σ(x_hat ⊙ wdy):

    RMS:   dx = rstd·(wdy − x_hat·c/N)
    L2:    dx = rstd·(wdy − x_hat·c)               (rstd·wdy where the eps floor held)
    CRMS:  dx = rstd·(wdy − (x_hat + rstd·Σx)·c/(N+1))
    dw = Σ_rows dy ⊙ x_hat                         (summed over the columns too for a scalar w)

The rows of a tensor are addressed in two levels, ``row = outer·H + inner`` at
``outer·stride_outer + inner·stride_inner``: q, k as (B, S, H, D) views of a fused qkv projection
are read in place (B and S fold into one level), never copied. Two tensors (A and B: q and k) share
one launch: the first programs take A's rows, the rest B's. Outputs and dx are contiguous. No
statistics are stored: the backward recomputes them from x (the row is loaded anyway).

A row of up to 16 KB (8192 16-bit or 4096 fp32 values, ``SINGLE_TILE``) is one tile of registers,
read once. Longer rows (ScaleNorm or CRMSNorm over a wide model; up to MAX_N) loop over column
tiles, as kernels/rowwise_norm.py's do: the forward sums a row block's squares in a first pass and
normalizes in a second; the backward first sums each row's statistics and Σ x·w·dy into a fp32
scratch (ROW_STATS), then walks column tiles outermost so that a tile's dw column sums stay in
registers. Their second read of a row comes from L2 where the rows in flight fit.
"""

import functools

import torch
import triton
import triton.language as tl

from .heuristics import MAX_SINGLE_TILE_BYTES, LaunchConfig, next_power_of_2, split_rows
from .launch import alloc, alloc_grad, cdiv, device_guard
from .reduce import sum_partials
from .tiles import rstd_of

# NORM, a string constexpr, compared with literals: a module-level tl.constexpr would be
# re-checked by Triton on every launch.
NORMS = ("rms", "l2", "crms")  # as normzoo.ops.HEADWISE_NORMS
# Rows wider than this are refused (the widest a model's ScaleNorm or CRMSNorm needs, with room).
MAX_N = 65536
# Rows of more than MAX_SINGLE_TILE_BYTES (kernels/heuristics.py's limit for the row norms) loop
# over column tiles of this many bytes.
LOOPED_TILE_BYTES = 8 * 1024


@triton.jit
def _row_offsets(rows, H, stride_outer, stride_inner):
    rows = rows.to(tl.int64)
    return (rows // H) * stride_outer + (rows % H) * stride_inner


@triton.jit
def _rstd(sumsq, total, N, eps, NORM: tl.constexpr):
    """(rstd, whether the normalizing term's gradient applies) from a row's Σx² and (CRMS) Σx."""
    live = sumsq == sumsq  # all true
    if NORM == "rms":
        rstd = rstd_of(sumsq / N + eps)
    elif NORM == "l2":
        floor = eps * eps
        live = sumsq > floor  # under the floor the norm is the constant eps: no gradient through it
        # max(Σx², eps²), but NaN where Σx² is (tl.maximum returns the other operand there): a row
        # with a NaN stays NaN, as the reference and the row-wise norms keep it.
        rstd = rstd_of(tl.where(sumsq < floor, floor, sumsq))
    else:
        tl.static_assert(NORM == "crms", "NORM must be one of rms, l2, crms")
        rstd = rstd_of((sumsq + total * total) / (N + 1) + eps)
    return rstd, live


@triton.jit
def _stats(x, N, eps, NORM: tl.constexpr):
    """(rstd, row sum, whether the normalizing term's gradient applies) of a (BLOCK_M, BLOCK_N)
    fp32 tile, zero where masked (the row sum only for CRMS: zeros otherwise)."""
    sumsq = tl.sum(x * x, axis=1)
    total = tl.zeros_like(sumsq)
    if NORM == "crms":
        total = tl.sum(x, axis=1)
    rstd, live = _rstd(sumsq, total, N, eps, NORM)
    return rstd, total, live


@triton.jit
def _store_dx(DX, rows64, cols, mask, N, x_hat, wdy, rstd, total, live, c, NORM: tl.constexpr):
    """dx of a tile, from its x_hat, w·dy and its rows' rstd, Σx, live and c = Σ(x_hat ⊙ w·dy)."""
    if NORM == "rms":
        dx = (wdy - x_hat * (c / N)[:, None]) * rstd[:, None]
    elif NORM == "l2":
        dx = (wdy - x_hat * tl.where(live, c, 0.0)[:, None]) * rstd[:, None]
    else:
        dx = (wdy - (x_hat + (rstd * total)[:, None]) * (c / (N + 1))[:, None]) * rstd[:, None]
    tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _load_rows(X, rows, row_mask, cols, N, H, stride_outer, stride_inner, EVICTION: tl.constexpr):
    mask = row_mask[:, None] & (cols < N)[None, :]
    offsets = _row_offsets(rows, H, stride_outer, stride_inner)[:, None] + cols[None, :]
    return tl.load(X + offsets, mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32), mask


@triton.jit
def _weight(W, cols, N, SCALAR_W: tl.constexpr):
    """The weight as a (1, BLOCK_N) row, or its one value, loaded once for every column. (One
    return: Triton's compiler rejects a function that returns from inside a branch and after it,
    though its interpreter runs it; benchmarks/compile_check.py found it.)"""
    if SCALAR_W:
        w = tl.load(W).to(tl.float32)
    else:
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return w


@triton.jit
def _store_y(Y, W, x, rstd, rows, cols, mask, N, HAS_W: tl.constexpr, SCALAR_W: tl.constexpr):
    y = x * rstd[:, None]
    if HAS_W:
        y = y * _weight(W, cols, N, SCALAR_W)
    tl.store(Y + rows.to(tl.int64)[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _forward_rows(X, Y, W, block, M, N, H, stride_outer, stride_inner, eps,
                  NORM: tl.constexpr, HAS_W: tl.constexpr, SCALAR_W: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr):
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_N)
        x, mask = _load_rows(X, rows, row_mask, cols, N, H, stride_outer, stride_inner, "")
        rstd, _, _ = _stats(x, N, eps, NORM)
        _store_y(Y, W, x, rstd, rows, cols, mask, N, HAS_W, SCALAR_W)
    else:  # pass 1: the rows' sums; pass 2 normalizes, its read of the rows hitting L2
        # The sums accumulate element-wise and are reduced once, after the loop (no cross-thread
        # reduction an iteration; and Triton 3.6 failed to compile CRMS's two per-iteration fp32
        # reductions, in its TritonGPUOptimizeThreadLocality pass).
        sumsq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for col_start in range(0, N, BLOCK_N):
            x, _ = _load_rows(X, rows, row_mask, col_start + tl.arange(0, BLOCK_N), N, H, stride_outer, stride_inner,
                              "evict_last")  # read again by pass 2
            sumsq += x * x
            if NORM == "crms":
                total += x
        rstd, _ = _rstd(tl.sum(sumsq, axis=1), tl.sum(total, axis=1), N, eps, NORM)
        for col_start in range(0, N, BLOCK_N):
            cols = col_start + tl.arange(0, BLOCK_N)
            x, mask = _load_rows(X, rows, row_mask, cols, N, H, stride_outer, stride_inner, "evict_first")
            _store_y(Y, W, x, rstd, rows, cols, mask, N, HAS_W, SCALAR_W)


@triton.jit
def _headwise_fwd_kernel(
    XA, YA, WA, XB, YB, WB,  # B (and a W) unused when its flag is off
    M_a, N_a, H_a, so_a, si_a,  # rows, columns, inner rows per outer, the two row strides
    M_b, N_b, H_b, so_b, si_b,
    programs_a,  # programs [0, programs_a) take A's row blocks, the rest B's
    eps,
    NORM: tl.constexpr, HAS_WA: tl.constexpr, HAS_B: tl.constexpr, HAS_WB: tl.constexpr,
    SCALAR_W: tl.constexpr,  # the weights are one value each (ScaleNorm's g, QK-norm's l2 scale)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,  # every row fits one (BLOCK_M, BLOCK_N) tile; otherwise rows loop over column tiles
):
    pid = tl.program_id(0)
    if pid < programs_a:
        _forward_rows(XA, YA, WA, pid, M_a, N_a, H_a, so_a, si_a, eps, NORM, HAS_WA, SCALAR_W, BLOCK_M, BLOCK_N,
                      SINGLE_TILE)
    elif HAS_B:
        _forward_rows(XB, YB, WB, pid - programs_a, M_b, N_b, H_b, so_b, si_b, eps, NORM, HAS_WB, SCALAR_W, BLOCK_M,
                      BLOCK_N, SINGLE_TILE)


@triton.jit
def _backward_rows(X, DY, DX, W, PARTIALS, ROW_STATS, program, rows_per_program, M, N, H, stride_outer,
                   stride_inner, stride_dy, eps, NORM: tl.constexpr, HAS_W: tl.constexpr, COMPUTE_DW: tl.constexpr,
                   SCALAR_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr):
    row_start = program * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_N)
        if HAS_W:
            w = _weight(W, cols, N, SCALAR_W)
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for block_start in range(row_start, row_end, BLOCK_M):
            rows = block_start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            x, mask = _load_rows(X, rows, row_mask, cols, N, H, stride_outer, stride_inner, "")
            rows64 = rows.to(tl.int64)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd, total, live = _stats(x, N, eps, NORM)
            # A row past the end (masked: x = 0) would get rsqrt(0 + eps) = inf at eps = 0, and
            # x_hat = 0·inf = NaN in dw's sums: its rstd is 0.
            rstd = tl.where(row_mask, rstd, 0.0)
            x_hat = x * rstd[:, None]
            if COMPUTE_DW:
                dw_acc += dy * x_hat
            wdy = dy
            if HAS_W:
                wdy = dy * w
            _store_dx(DX, rows64, cols, mask, N, x_hat, wdy, rstd, total, live, tl.sum(x_hat * wdy, axis=1), NORM)
        if COMPUTE_DW and not SCALAR_W:
            tl.store(PARTIALS + program.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=cols < N)
    else:
        # Pass A (long rows): each row's rstd, Σx (CRMS), c = rstd·Σ(x ⊙ w·dy) and whether the
        # norm's gradient applies, into ROW_STATS (4 fp32 a row).
        for block_start in range(row_start, row_end, BLOCK_M):
            rows = block_start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)
            sumsq_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # reduced after the loop (see _forward_rows)
            total_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            x_wdy_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for col_start in range(0, N, BLOCK_N):
                cols = col_start + tl.arange(0, BLOCK_N)
                x, mask = _load_rows(X, rows, row_mask, cols, N, H, stride_outer, stride_inner, "")
                wdy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_W:
                    wdy = wdy * _weight(W, cols, N, SCALAR_W)
                sumsq_acc += x * x
                if NORM == "crms":
                    total_acc += x
                x_wdy_acc += x * wdy
            total = tl.sum(total_acc, axis=1)
            x_wdy = tl.sum(x_wdy_acc, axis=1)
            rstd, live = _rstd(tl.sum(sumsq_acc, axis=1), total, N, eps, NORM)
            tl.store(ROW_STATS + rows64 * 4, rstd, mask=row_mask)
            tl.store(ROW_STATS + rows64 * 4 + 1, total, mask=row_mask)
            tl.store(ROW_STATS + rows64 * 4 + 2, rstd * x_wdy, mask=row_mask)
            tl.store(ROW_STATS + rows64 * 4 + 3, live.to(tl.float32), mask=row_mask)
        tl.debug_barrier()  # other threads of this program read these back below
        # Pass B: dx, and dw's sums. Column tiles outermost, so a tile's column sums stay in registers.
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for col_start in range(0, N, BLOCK_N):
            cols = col_start + tl.arange(0, BLOCK_N)
            if HAS_W:
                w = _weight(W, cols, N, SCALAR_W)
            if not SCALAR_W:
                dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for block_start in range(row_start, row_end, BLOCK_M):
                rows = block_start + tl.arange(0, BLOCK_M)
                row_mask = rows < row_end
                rows64 = rows.to(tl.int64)
                x, mask = _load_rows(X, rows, row_mask, cols, N, H, stride_outer, stride_inner, "")
                dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(ROW_STATS + rows64 * 4, mask=row_mask, other=0.0)
                x_hat = x * rstd[:, None]
                if COMPUTE_DW:
                    dw_acc += dy * x_hat
                wdy = dy * w if HAS_W else dy
                _store_dx(DX, rows64, cols, mask, N, x_hat, wdy, rstd,
                          tl.load(ROW_STATS + rows64 * 4 + 1, mask=row_mask, other=0.0),  # Σx
                          tl.load(ROW_STATS + rows64 * 4 + 3, mask=row_mask, other=0.0) != 0.0,  # live
                          tl.load(ROW_STATS + rows64 * 4 + 2, mask=row_mask, other=0.0), NORM)  # c
            if COMPUTE_DW and not SCALAR_W:
                tl.store(PARTIALS + program.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=cols < N)
    if COMPUTE_DW and SCALAR_W:  # one partial a program: the weight is one value for every column
        tl.store(PARTIALS + program, tl.sum(tl.sum(dw_acc, axis=1), axis=0))


@triton.jit
def _headwise_bwd_kernel(
    XA, DYA, DXA, WA, XB, DYB, DXB, WB,
    PARTIALS,  # fp32 (programs, N) column sums of dw: A's at 0, B's at b_offset (one each for a scalar w)
    ROW_STATS,  # fp32 (M_a + M_b, 4) scratch of the looped path (A's rows, then B's); None for single tiles
    M_a, N_a, H_a, so_a, si_a, sdy_a, rows_per_program_a,
    M_b, N_b, H_b, so_b, si_b, sdy_b, rows_per_program_b,
    programs,  # per tensor: programs [0, programs) take A, [programs, 2·programs) take B
    b_offset, eps,
    NORM: tl.constexpr, HAS_WA: tl.constexpr, DW_A: tl.constexpr, HAS_B: tl.constexpr, HAS_WB: tl.constexpr,
    DW_B: tl.constexpr, SCALAR_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < programs:
        _backward_rows(XA, DYA, DXA, WA, PARTIALS, ROW_STATS, pid, rows_per_program_a, M_a, N_a, H_a, so_a, si_a,
                       sdy_a, eps, NORM, HAS_WA, DW_A, SCALAR_W, BLOCK_M, BLOCK_N, SINGLE_TILE)
    elif HAS_B:
        ROW_STATS_B = ROW_STATS  # None for single tiles
        if not SINGLE_TILE:
            ROW_STATS_B = ROW_STATS + M_a.to(tl.int64) * 4
        _backward_rows(XB, DYB, DXB, WB, PARTIALS + b_offset, ROW_STATS_B, pid - programs,
                       rows_per_program_b, M_b, N_b, H_b, so_b, si_b, sdy_b, eps, NORM, HAS_WB, DW_B, SCALAR_W,
                       BLOCK_M, BLOCK_N, SINGLE_TILE)


@functools.lru_cache(maxsize=256)
def _config(n: int, pair: bool, itemsize: int = 2, max_block_n: int | None = None) -> LaunchConfig:
    """A row of up to MAX_SINGLE_TILE_BYTES in one tile, rows stacked to ~4096 elements, ~8
    elements a thread, 16 warps at most (compile_check, sm_90: 8192 16-bit values take 100
    registers a thread in the backward, one program an SM). Longer rows (or ``max_block_n``, which
    tests use to reach the loop on small rows) loop over column tiles of LOOPED_TILE_BYTES, a row
    block of 1 and 8 warps: 2 programs an SM. The backward's persistent grid: 2 programs an SM for one
    tensor, 1 each for a pair (q and k: 2 an SM in all, one wave where 2 fit), 1 for a single tile of
    8192 values or more. A rule, not a measurement: no tuning table yet."""
    block_n = next_power_of_2(max(n, 1))
    limit = min(MAX_SINGLE_TILE_BYTES // itemsize, max_block_n or MAX_N)
    if block_n > limit:
        tile = min(LOOPED_TILE_BYTES // itemsize, next_power_of_2(limit + 1) // 2)
        return LaunchConfig(block_m=1, block_n=tile, num_warps=max(1, min(8, tile // 256)), single_tile=False,
                            programs_per_sm=1 if pair else 2)
    block_m = max(1, min(64, 4096 // block_n))
    num_warps = max(1, min(16, block_m * block_n // 256))
    # From 8192 values one backward program fills an SM (registers): a grid of one an SM, one wave.
    return LaunchConfig(block_m=block_m, block_n=block_n, num_warps=num_warps,
                        programs_per_sm=1 if pair or block_n >= 8192 else 2)


def rows_2d(t: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(M, H, stride_outer, stride_inner)`` addressing the rows of ``t`` (..., N) in two levels,
    or None when its leading dims do not fold into two (the caller copies it). The last dim must
    have unit stride (or one element)."""
    shape, strides = t.shape[:-1], t.stride()[:-1]
    levels = []  # [size, stride], outermost first; a dim folds into the one inside it when contiguous with it
    for size, stride in zip(shape, strides):
        if size == 1:
            continue
        if levels and levels[-1][1] == size * stride:
            levels[-1] = [levels[-1][0] * size, stride]
        else:
            levels.append([size, stride])
    if len(levels) > 2:
        return None
    while len(levels) < 2:
        levels.insert(0, [1, 0])
    (outer, so), (inner, si) = levels
    return outer * inner, inner, so, si


def _check(t: torch.Tensor) -> tuple[int, int, int, int]:
    layout = rows_2d(t)
    if t.numel() == 0:  # nothing to address (an empty view may have any strides, even 0)
        return t.numel(), 1, 0, 0
    if layout is None or t.shape[-1] > 1 and t.stride(-1) != 1:
        raise AssertionError(f"rows of shape {tuple(t.shape)}, strides {t.stride()} need a copy first")
    if t.shape[-1] > MAX_N:
        raise ValueError(f"rows of {t.shape[-1]} values: these kernels take rows of at most {MAX_N}")
    return layout


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def headwise_norm_forward(a, wa, b, wb, eps: float, *, norm: str, max_block_n: int | None = None):
    """Normalize the rows (last dim) of ``a`` and, in the same launch, of ``b`` (or None), each
    with its weight (None, per column, or a one-element scale). Returns ``(ya, yb)``, contiguous,
    in each input's dtype. ``max_block_n`` caps the column tile (tests reach the looped path with it)."""
    _check_norm(norm)
    M_a, H_a, so_a, si_a = _check(a)
    N_a = a.shape[-1]
    ya = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    yb = None
    if b is not None:
        M_b, H_b, so_b, si_b = _check(b)
        N_b = b.shape[-1]
        yb = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    else:
        M_b = N_b = H_b = so_b = si_b = 0
    cfg = _config(max(N_a, N_b), b is not None, _itemsize(a, b), max_block_n)
    programs_a = cdiv(M_a, cfg.block_m) if N_a else 0
    programs_b = cdiv(M_b, cfg.block_m) if N_b else 0
    if programs_a + programs_b:
        with device_guard(a):
            _headwise_fwd_kernel.run(
                a, ya, wa if wa is not None else a, b if b is not None else a, yb if yb is not None else ya,
                wb if wb is not None else a,
                M_a, N_a, H_a, so_a, si_a, M_b, N_b, H_b, so_b, si_b, programs_a, eps,
                norm, wa is not None, b is not None, wb is not None, _scalar_weights(wa, wb), cfg.block_m,
                cfg.block_n, cfg.single_tile,
                grid=(programs_a + programs_b,), warmup=False, num_warps=cfg.num_warps,
            )
    return ya, yb


def _itemsize(a, b) -> int:
    return max(a.dtype.itemsize, b.dtype.itemsize) if b is not None else a.dtype.itemsize


def _scalar_weights(wa, wb) -> bool:
    """Whether the weights are one value each (ops checks that a pair's weights agree)."""
    w = wa if wa is not None else wb
    return w is not None and w.numel() == 1


def headwise_norm_backward(dya, a, wa, dyb, b, wb, eps: float, *, norm: str, dw_a: bool, dw_b: bool,
                           max_block_n: int | None = None):
    """Gradients of :func:`headwise_norm_forward`: ``(dxa, dxb, dwa, dwb)`` (dx contiguous, in
    each input's dtype; dw in each weight's dtype, ``None`` where not asked). ``dya``/``dyb`` are
    2-D (rows, N) with unit column stride. Both weights, where present, have one kind: per
    column, or one-element scales."""
    _check_norm(norm)
    M_a, H_a, so_a, si_a = _check(a)
    N_a = a.shape[-1]
    dxa = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    dxb = None
    M_b = N_b = H_b = so_b = si_b = 0
    if b is not None:
        M_b, H_b, so_b, si_b = _check(b)
        N_b = b.shape[-1]
        dxb = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    dw_a, dw_b = dw_a and wa is not None, dw_b and wb is not None
    scalar_w = _scalar_weights(wa, wb)
    cfg = _config(max(N_a, N_b), b is not None, _itemsize(a, b), max_block_n)
    rows_per_program_a, programs = split_rows(max(M_a, M_b, 1), cfg, a.device)
    rows_per_program_a = cdiv(cdiv(M_a, programs), cfg.block_m) * cfg.block_m or cfg.block_m
    rows_per_program_b = cdiv(cdiv(M_b, programs), cfg.block_m) * cfg.block_m or cfg.block_m
    width_a, width_b = (1, 1) if scalar_w else (N_a, N_b)  # a row of partials per program and tensor
    b_offset = programs * width_a
    partials = alloc(a, b_offset + programs * width_b if dw_a or dw_b else 1, torch.float32)
    dwa = alloc_grad(wa) if dw_a else None  # each as its (N,) or (1,) weight
    dwb = alloc_grad(wb) if dw_b else None
    row_stats = None if cfg.single_tile else alloc(a, 4 * (M_a + M_b), torch.float32)
    if M_a * N_a + M_b * N_b == 0:
        for dw in (dwa, dwb):
            if dw is not None:
                dw.zero_()
        return dxa, dxb, dwa, dwb
    with device_guard(a):
        _headwise_bwd_kernel.run(
            a, dya, dxa, wa if wa is not None else a, b if b is not None else a, dyb if dyb is not None else dya,
            dxb if dxb is not None else dxa, wb if wb is not None else a, partials,
            row_stats,  # None for single tiles: a constant, no argument
            M_a, N_a, H_a, so_a, si_a, dya.stride(0), rows_per_program_a,
            M_b, N_b, H_b, so_b, si_b, dyb.stride(0) if dyb is not None else 0, rows_per_program_b,
            programs, b_offset, eps,
            norm, wa is not None, dw_a, b is not None, wb is not None, dw_b, scalar_w, cfg.block_m, cfg.block_n,
            cfg.single_tile, grid=((2 if b is not None else 1) * programs,), warmup=False, num_warps=cfg.num_warps,
        )
        # dwa from the first block of partials, dwb from the second: one reduce launch where the
        # two have one width (every program writes its row, zeros where it had no rows).
        if dw_a and dw_b and width_a == width_b:
            sum_partials(partials, programs, width_a, b_offset, dwa, dwb)
        else:
            if dw_a:
                sum_partials(partials, programs, width_a, 0, dwa, None)
            if dw_b:
                sum_partials(partials[b_offset:], programs, width_b, 0, dwb, None)
    return dxa, dxb, dwa, dwb
