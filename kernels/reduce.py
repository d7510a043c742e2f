"""The second step of every backward: sum the per-program fp32 partials into the parameter grads.

A backward kernel's programs each write one row of column sums (dweight, dbias) and, for DyT/Derf,
two scalar sums (dalpha, dshift) into one fp32 scratch buffer. One launch of
:func:`_sum_partials_kernel` reduces all of them, in a fixed order (deterministic, no atomics), and
writes each gradient in its parameter's dtype, so a backward is two launches and no torch ops.
A backward grid of one program (under 32 rows) skips this step: its kernel writes the gradients
itself (the kernels' ``DIRECT`` switch).
"""

import functools

import triton
import triton.language as tl

from .heuristics import next_power_of_2, num_compute_units
from .launch import cdiv, launch


@triton.jit
def _sum_partials_kernel(
    PARTIALS,  # fp32: dw sums (P, N) at 0, db sums (P, N) at db_offset, (dalpha, dshift) × P_SCALAR at scalar_offset
    DW, DB,  # (N,) results, in the weight's / bias's dtype
    DALPHA, DSHIFT,  # (1,) results
    P, N, db_offset, P_SCALAR, scalar_offset,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    if HAS_DW or HAS_DB:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        dw = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        for p_start in range(0, P, BLOCK_P):
            parts = p_start + tl.arange(0, BLOCK_P)
            mask = (parts < P)[:, None] & col_mask[None, :]
            offsets = parts.to(tl.int64)[:, None] * N + cols[None, :]
            if HAS_DW:
                dw += tl.load(PARTIALS + offsets, mask=mask, other=0.0)
            if HAS_DB:
                db += tl.load(PARTIALS + db_offset + offsets, mask=mask, other=0.0)
        if HAS_DW:
            tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
        if HAS_DB:
            tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)
    if HAS_ALPHA:
        if pid == 0:
            SCALARS = PARTIALS + scalar_offset
            dalpha = tl.zeros([BLOCK_P * BLOCK_N], dtype=tl.float32)
            dshift = tl.zeros([BLOCK_P * BLOCK_N], dtype=tl.float32)
            for p_start in range(0, P_SCALAR, BLOCK_P * BLOCK_N):
                parts = p_start + tl.arange(0, BLOCK_P * BLOCK_N)
                dalpha += tl.load(SCALARS + parts * 2, mask=parts < P_SCALAR, other=0.0)
                if HAS_SHIFT:
                    dshift += tl.load(SCALARS + parts * 2 + 1, mask=parts < P_SCALAR, other=0.0)
            tl.store(DALPHA, tl.sum(dalpha, axis=0).to(DALPHA.dtype.element_ty))
            if HAS_SHIFT:
                tl.store(DSHIFT, tl.sum(dshift, axis=0).to(DSHIFT.dtype.element_ty))


@functools.lru_cache(maxsize=1024)
def _blocks(n_cols: int, sm_count: int) -> tuple[int, int]:
    # Columns split so that about one program per SM reads a (P, BLOCK_N) strip; 1024 elements a
    # step (8 a thread per accumulator: at 2048, two accumulators spilled on sm_90).
    block_n = max(32, min(256, next_power_of_2(cdiv(n_cols, sm_count))))
    return max(1, 1024 // block_n), block_n


def sum_partials(partials, P, N, db_offset, dw, db, scalar_offset=0, P_scalar=0, dalpha=None, dshift=None) -> None:
    """In one launch: ``dw`` (and/or ``db``) = the sum over P rows of the (P, N) fp32 block of
    ``partials`` at offset 0 (``db_offset``), and ``dalpha``/``dshift`` = the sums of the
    ``P_scalar`` (dalpha, dshift) pairs at ``scalar_offset``. Each result is written in its own dtype;
    ``None`` ones are skipped. Launchers call it under their own device guard."""
    block_p, block_n = _blocks(N, num_compute_units(partials.device))
    launch(_sum_partials_kernel, cdiv(N, block_n) if dw is not None or db is not None else 1,
        partials, dw if dw is not None else partials, db if db is not None else partials,
        dalpha if dalpha is not None else partials, dshift if dshift is not None else partials,
        P, N, db_offset, P_scalar, scalar_offset,
        # HAS_DW, HAS_DB, HAS_ALPHA, HAS_SHIFT, BLOCK_P, BLOCK_N (by position: cheaper on the host)
        dw is not None, db is not None, dalpha is not None, dshift is not None, block_p, block_n, num_warps=4,
    )
