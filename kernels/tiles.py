"""Tile loads and stores shared by the kernel families."""

import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, rows, stride_row, cols, mask, EVICTION: tl.constexpr):
    """A (rows × cols) tile of a 2-D tensor with unit column stride, as fp32, 0 where masked.
    Row offsets are int64: rows × stride overflows int32 past 2^31 elements. ``EVICTION`` is an L2
    hint: "evict_last" for data read again soon, "evict_first" for a last read, "" for none.
    It has no default: Triton 3.6 passes a nested call's default as a plain str, not a constexpr."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32)


@triton.jit
def store_tile(ptr, rows, stride_row, cols, mask, value):
    """Store an fp32 tile in the tensor's own dtype."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def rstd_of(mean_square):
    """1/√(mean square + eps), NaN where the mean square overflowed fp32 (a row of magnitude
    ~1e19 or more): rsqrt(inf) is 0, which would turn the row into the bias, finite and wrong;
    NaN says the row could not be normalized (torch's LayerNorm gives NaN there too)."""
    rstd = tl.rsqrt(mean_square)
    return tl.where(rstd == 0.0, float("nan"), rstd)


@triton.jit
def store_column_sums(PARTIAL, FINAL, partial_index, cols, col_mask, acc, DIRECT: tl.constexpr):
    """The column sums of a backward's (rows × cols) accumulator: as fp32 partials at
    ``partial_index`` for the reduce launch, or, when one program owns every row (``DIRECT``),
    as the gradient itself, in FINAL's dtype: a one-launch backward, no scratch buffer."""
    sums = tl.sum(acc, axis=0)
    if DIRECT:
        tl.store(FINAL + cols, sums.to(FINAL.dtype.element_ty), mask=col_mask)
    else:
        tl.store(PARTIAL + partial_index, sums, mask=col_mask)


@triton.jit
def partial_offsets(block, DW, DB, DW1, DB1):
    """``(db, dw1, db1, scalars)`` offsets in a backward's fp32 scratch, laid out as [dw | db | dw1
    | db1 | ...] with ``block`` values for each of the four gradients it is given (None: absent,
    no room). The host lays out the same buffer (launch.partials_layout) for the reduce launch."""
    db_offset = 0
    if DW is not None:
        db_offset += block
    dw1_offset = db_offset
    if DB is not None:
        dw1_offset += block
    db1_offset = dw1_offset
    if DW1 is not None:
        db1_offset += block
    scalar_offset = db1_offset
    if DB1 is not None:
        scalar_offset += block
    return db_offset, dw1_offset, db1_offset, scalar_offset
