"""Launch configurations, in one place.

The numbers below are first choices from the hardware's shape (registers per thread, SM count),
not yet tuned by measurement: no GPU has run them. Every choice is a pure function of the problem
size, dtype and device, so a tuning pass only edits this file.
"""

import functools
import os
from dataclasses import dataclass

import torch
import triton

# Above this many columns a row no longer fits in one tile of registers and the kernels loop over
# column tiles instead. 16-bit rows fit twice as many elements as fp32 ones in the same registers.
MAX_SINGLE_TILE_BYTES = 32 * 1024
# Elements one program touches per step; rows are packed into a tile until it holds this many.
TARGET_TILE_ELEMENTS = 4096


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_compute_units(device: torch.device) -> int:
    """Streaming multiprocessors on a GPU; a small fixed number under the CPU interpreter."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def split_rows(n_rows: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """``(rows_per_program, programs)`` for a backward whose programs each own a contiguous run of
    rows and write one row of partial sums: enough programs to fill the machine a few times over,
    each run a multiple of ``block_m``, and every program given at least one row."""
    row_blocks = triton.cdiv(n_rows, block_m)
    programs = min(row_blocks, 4 * num_compute_units(device))
    rows_per_program = triton.cdiv(row_blocks, programs) * block_m
    return rows_per_program, triton.cdiv(n_rows, rows_per_program)


@dataclass(frozen=True)
class RowwiseConfig:
    block_m: int  # rows per tile
    block_n: int  # columns per tile
    single_tile: bool  # the whole row fits in one tile (kept in registers, read once)
    num_warps: int


def single_tile_limit(dtype: torch.dtype, *, backward: bool = False) -> int:
    """The widest row the norm kernels keep in registers in one tile. Backward holds x, dy, w and
    two fp32 accumulators per column, so its limit is half the forward's."""
    limit = MAX_SINGLE_TILE_BYTES // dtype.itemsize
    return limit // 2 if backward else limit


def rowwise_config(n_cols: int, dtype: torch.dtype, *, backward: bool = False, max_block_n: int | None = None) -> RowwiseConfig:
    """Tile shape for the row-wise norm kernels.

    ``max_block_n`` caps the column tile (tests use it to reach the looped path on small rows).
    """
    limit = single_tile_limit(dtype, backward=backward)
    if max_block_n is not None:
        limit = min(limit, triton.next_power_of_2(max_block_n))
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), limit)
    single_tile = n_cols <= block_n
    if backward and not single_tile:
        # The looped backward keeps two tiles' worth of row sums and accumulators live; at the full
        # single-tile width a 16-bit LayerNorm with bias only hit 128 registers and spilled on
        # sm_90 (compile_check). Half-width tiles cost nothing in bytes moved.
        block_n //= 2
    block_m = max(1, min(TARGET_TILE_ELEMENTS // block_n, 16))
    num_warps = max(1, min(block_m * block_n // 256, 16))
    return RowwiseConfig(block_m=block_m, block_n=block_n, single_tile=single_tile, num_warps=num_warps)


@dataclass(frozen=True)
class ElementwiseConfig:
    block_m: int
    block_n: int
    num_warps: int


def elementwise_config(n_cols: int, *, backward: bool = False, max_block_n: int | None = None) -> ElementwiseConfig:
    """Tile shape for the point-wise (DyT / Derf) kernels: about TARGET_TILE_ELEMENTS per tile
    (half in backward, which holds x, dy, the activation and its derivative at once), columns up
    to 1024 wide, rows stacked to fill the rest."""
    target = TARGET_TILE_ELEMENTS // 2 if backward else TARGET_TILE_ELEMENTS
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), 1024)
    if max_block_n is not None:
        block_n = min(block_n, triton.next_power_of_2(max_block_n))
    block_m = max(1, min(target // block_n, 64))
    # 8 elements of each live tensor per thread in forward; backward keeps more tensors and the
    # column accumulators live, so it gets 4 (more threads for the same tile) on wide tiles. On
    # narrow ones (many short rows) 16 warps made ptxas spill even at 40 registers; 8 do not.
    # (Both from compile_check's sm_90 report, not yet from timings.)
    per_thread = 4 if backward and block_n >= 1024 else 8
    num_warps = max(1, min(block_m * block_n // (32 * per_thread), 16))
    return ElementwiseConfig(block_m=block_m, block_n=block_n, num_warps=num_warps)
