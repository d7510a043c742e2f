"""The second step of every backward: sum the per-program fp32 partials into the parameter grads.

A backward kernel's programs each write one row of column sums per parameter gradient (dweight,
dbias; with norm_add_norm's one-pass backward, both norms': up to four) and, for DyT/Derf, two
scalar sums (dalpha, dshift) per layer into one fp32 scratch buffer. One launch of
:func:`_sum_partials_kernel` reduces all of them, in a fixed order (deterministic, no atomics), and
writes each gradient in its parameter's dtype, so a backward is two launches and no torch ops.
A row-wise or point-wise backward grid of one program (under 32 rows; channels-first, one image)
skips this step: its kernel writes the gradients itself (the kernels' ``DIRECT`` switch). The
head-wise backward has no such switch: with a weight it always reduces.
"""

import functools

import triton
import triton.language as tl

from .heuristics import next_power_of_2, num_compute_units
from .launch import cdiv


@triton.jit
def _sum_partials_kernel(
    PARTIALS,  # fp32: dw sums (P, N) at 0, db sums (P, N) at db_offset, (dalpha, dshift) × P_SCALAR at scalar_offset
    DW, DB,  # (N,) results, in the weight's / bias's dtype; None: not asked for
    DALPHA, DSHIFT,  # (1,) results, or None
    DW2, DB2,  # a second layer's (N,) results (the first norm of a fused norm_add_norm), or None
    DALPHA2, DSHIFT2,  # its (1,) results, their P_SCALAR pairs after the first layer's
    P, N, db_offset, P_SCALAR, scalar_offset, dw2_offset, db2_offset,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Axis 1 picks the layer: 0 for (DW, DB), 1 for (DW2, DB2), launched only where there is one.
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    # Each result in turn, unrolled at compile time (a jit helper called four times was not
    # inlined: a call with a stack frame, compile_check sm_90).
    for k in tl.static_range(4):
        OUT = DW if k == 0 else DB if k == 1 else DW2 if k == 2 else DB2
        if OUT is not None:
            offset = 0 if k == 0 else db_offset if k == 1 else dw2_offset if k == 2 else db2_offset
            if layer == k // 2:
                acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
                for p_start in range(0, P, BLOCK_P):
                    parts = p_start + tl.arange(0, BLOCK_P)
                    mask = (parts < P)[:, None] & col_mask[None, :]
                    acc += tl.load(PARTIALS + offset + parts.to(tl.int64)[:, None] * N + cols[None, :], mask=mask,
                                   other=0.0)
                tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)
    # The scalar sums, by one program for each layer that has them.
    for k in tl.static_range(2):
        ALPHA_OUT = DALPHA if k == 0 else DALPHA2
        SHIFT_OUT = DSHIFT if k == 0 else DSHIFT2
        if ALPHA_OUT is not None:
            if pid == 0 and layer == 0:
                SCALARS = PARTIALS + scalar_offset + k * 2 * P_SCALAR
                dalpha = tl.zeros([BLOCK_P * BLOCK_N], dtype=tl.float32)
                dshift = tl.zeros([BLOCK_P * BLOCK_N], dtype=tl.float32)
                for p_start in range(0, P_SCALAR, BLOCK_P * BLOCK_N):
                    parts = p_start + tl.arange(0, BLOCK_P * BLOCK_N)
                    dalpha += tl.load(SCALARS + parts * 2, mask=parts < P_SCALAR, other=0.0)
                    if SHIFT_OUT is not None:
                        dshift += tl.load(SCALARS + parts * 2 + 1, mask=parts < P_SCALAR, other=0.0)
                tl.store(ALPHA_OUT, tl.sum(dalpha, axis=0).to(ALPHA_OUT.dtype.element_ty))
                if SHIFT_OUT is not None:
                    tl.store(SHIFT_OUT, tl.sum(dshift, axis=0).to(SHIFT_OUT.dtype.element_ty))


@functools.lru_cache(maxsize=1024)
def _blocks(n_cols: int, sm_count: int) -> tuple[int, int]:
    # Columns split so that about one program per SM reads a (P, BLOCK_N) strip; 1024 elements a
    # step (8 a thread per accumulator: at 2048, two accumulators spilled on sm_90).
    block_n = max(32, min(256, next_power_of_2(cdiv(n_cols, sm_count))))
    return max(1, 1024 // block_n), block_n


def sum_partials(partials, P, N, db_offset, dw, db, scalar_offset=0, P_scalar=0, dalpha=None, dshift=None,
                 dw2=None, db2=None, dw2_offset=0, db2_offset=0, dalpha2=None, dshift2=None) -> None:
    """In one launch: ``dw`` (and/or ``db``) = the sum over P rows of the (P, N) fp32 block of
    ``partials`` at offset 0 (``db_offset``), ``dw2``/``db2`` likewise at ``dw2_offset``/``db2_offset``
    (a second layer's), ``dalpha``/``dshift`` = the sums of the ``P_scalar`` (dalpha, dshift) pairs
    at ``scalar_offset``, and ``dalpha2``/``dshift2`` of the ``P_scalar`` pairs after them. Each
    result is written in its own dtype; ``None`` ones are skipped. Launchers call it under their
    own device guard."""
    block_p, block_n = _blocks(N, num_compute_units(partials.device))
    col_blocks = cdiv(N, block_n) if dw is not None or db is not None or dw2 is not None or db2 is not None else 1
    # The absent ones as None, constants to Triton (their code compiles away).
    _sum_partials_kernel.run(
        partials, dw, db, dalpha, dshift, dw2, db2, dalpha2, dshift2,
        P, N, db_offset, P_scalar, scalar_offset, dw2_offset, db2_offset,
        block_p, block_n,  # BLOCK_P, BLOCK_N (by position: cheaper on the host)
        grid=(col_blocks, 2 if dw2 is not None or db2 is not None else 1), warmup=False, num_warps=4,
    )
