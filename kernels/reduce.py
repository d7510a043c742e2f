"""The second step of every backward: sum the per-program fp32 partials into the parameter grads.

A backward kernel's programs each write one row of column sums (dweight, dbias) and, for DyT/Derf,
two scalar sums (dalpha, dshift) into fp32 buffers. One launch of :func:`_sum_partials_kernel`
reduces all of them, in a fixed order (deterministic, no atomics), and writes each gradient in its
parameter's dtype, so a backward is two launches and no torch ops.
"""

import triton
import triton.language as tl

from .heuristics import num_compute_units
from .launch import device_guard


@triton.jit
def _sum_partials_kernel(
    DW_PARTIAL, DB_PARTIAL,  # (P, N) fp32 column sums, one row per backward program
    DW, DB,  # (N,) results, in the weight's / bias's dtype
    SCALAR_PARTIAL,  # (P_SCALAR, 2) fp32: per-program Σ for dalpha (column 0) and dshift (column 1)
    DALPHA, DSHIFT,  # (1,) results
    P, N, P_SCALAR,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    if HAS_DW or HAS_DB:
        for p_start in range(0, P, BLOCK_P):
            parts = p_start + tl.arange(0, BLOCK_P)
            mask = (parts < P)[:, None] & col_mask[None, :]
            offsets = parts.to(tl.int64)[:, None] * N + cols[None, :]
            if HAS_DW:
                dw += tl.load(DW_PARTIAL + offsets, mask=mask, other=0.0)
            if HAS_DB:
                db += tl.load(DB_PARTIAL + offsets, mask=mask, other=0.0)
        if HAS_DW:
            tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
        if HAS_DB:
            tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)
    if HAS_ALPHA:
        if pid == 0:
            dalpha = tl.zeros([BLOCK_P * 4], dtype=tl.float32)
            dshift = tl.zeros([BLOCK_P * 4], dtype=tl.float32)
            for p_start in range(0, P_SCALAR, BLOCK_P * 4):
                parts = p_start + tl.arange(0, BLOCK_P * 4)
                dalpha += tl.load(SCALAR_PARTIAL + parts * 2, mask=parts < P_SCALAR, other=0.0)
                if HAS_SHIFT:
                    dshift += tl.load(SCALAR_PARTIAL + parts * 2 + 1, mask=parts < P_SCALAR, other=0.0)
            tl.store(DALPHA, tl.sum(dalpha, axis=0).to(DALPHA.dtype.element_ty))
            if HAS_SHIFT:
                tl.store(DSHIFT, tl.sum(dshift, axis=0).to(DSHIFT.dtype.element_ty))


def sum_partials(dw_partial, db_partial, dw, db, scalar_partial=None, dalpha=None, dshift=None) -> None:
    """Write ``dw = dw_partial.sum(0)``, ``db = db_partial.sum(0)`` (each optional, (P, N) fp32
    into (N,)), and ``dalpha``/``dshift`` = the column sums of ``scalar_partial`` (P', 2), in one
    launch. Outputs are written in their own dtypes."""
    anchor = next(t for t in (dw_partial, db_partial, scalar_partial) if t is not None)
    cols = dw_partial if dw_partial is not None else db_partial
    P, N = cols.shape if cols is not None else (0, 1)
    # Columns split so that about one program per SM reads a (P, BLOCK_N) strip.
    block_n = max(32, min(256, triton.next_power_of_2(triton.cdiv(N, num_compute_units(anchor.device)))))
    block_p = max(1, 2048 // block_n)
    with device_guard(anchor.device):
        _sum_partials_kernel[(triton.cdiv(N, block_n),)](
            dw_partial if dw_partial is not None else anchor, db_partial if db_partial is not None else anchor,
            dw if dw is not None else anchor, db if db is not None else anchor,
            scalar_partial if scalar_partial is not None else anchor,
            dalpha if dalpha is not None else anchor, dshift if dshift is not None else anchor,
            P, N, scalar_partial.shape[0] if scalar_partial is not None else 0,
            HAS_DW=dw is not None, HAS_DB=db is not None, HAS_ALPHA=dalpha is not None,
            HAS_SHIFT=dshift is not None, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4,
        )
