"""Launch configurations, in one place: measured tables per GPU, with rules as the fallback.

A launch asks :func:`launch_config` for ``(op, pass, N, dtype, device)``. If a table measured on
that GPU (``kernels/configs/<gpu>.json``, written by ``python -m benchmarks.tune``) has an entry for
the key ``op|pass|dtype|next_power_of_2(N)``, its fields (``num_warps``, ``block_m``,
``programs_per_sm``, ``num_stages``, and for a row-wise forward ``persistent``) replace the rule's;
the column tile always comes from the rules, so a table changes speed, not which arithmetic runs (a
persistent forward walks the same tiles in a loop), with one exception: a LayerNorm/RMSNorm
entry with ``single_tile`` keeps rows of up to twice the rules' single-tile limit in one tile
(WIDE_TILE_BYTES), where the rules loop over column tiles: its row sums are then one tile's
reduction instead of a loop's (other rounding, the same accuracy). A launch of another layout than
the plain norm's the entry was timed on (``launch_config(..., timed_layout=False)``: a fused residual
op's forward, a backward whose dy is in another dtype than x) takes neither a whole-row tile nor a
persistent grid from it. Tables apply to row lengths that are multiples of 16 (:func:`vector_aligned`;
where they are measured). Results are deterministic for a given table: the reduction order follows
the config.

The rules are first choices from the hardware's shape (registers per SM, threads per program), not
measurements; ``python -m benchmarks.compile_check`` reports what they compile to on sm_90.
"""

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .launch import INTERPRETED, cdiv  # noqa: F401 (INTERPRETED: asked through heuristics)

# Above this many bytes a row no longer fits one tile of registers, and the kernels loop over
# column tiles instead (forward and backward alike). At 32 KB a 16-warp forward program needed
# 66-118 registers: one per SM, each exposing its whole load latency (compile_check, sm_90); the
# looped forward re-reads x from L2, not DRAM, at these widths.
MAX_SINGLE_TILE_BYTES = 16 * 1024
# The widest row a measured table may keep in one tile (``single_tile``, LayerNorm and RMSNorm; the
# rules never do): 16384 16-bit or 8192 fp32 values. The looped backward reads x and dy twice (5/3
# of the ideal bytes: 48-56% of copy on the H200 at N = 16384), where torch.compile, which keeps
# such rows whole (its mix-order reduction), made 80% for RMSNorm; the looped forward reads x twice,
# the second time from L2 if it is still there. Ours spills in the backward at this width (16-bit,
# with a weight: one 16-warp program per SM at 128 registers and 88-272 B of spill, or 32 warps at
# 64 and 72-176 B) and not in the forward (50-85 registers at 16 warps; compile_check, sm_90): only
# a timing chooses either.
WIDE_TILE_BYTES = 2 * MAX_SINGLE_TILE_BYTES
# Elements one program touches per step; rows are stacked into a tile until it holds this many.
TARGET_TILE_ELEMENTS = 4096
# Where measured tables live, one JSON file per GPU model.
CONFIG_DIR = Path(__file__).parent / "configs"
# The fields a table may set, and the values each may take.
TUNABLE = {"num_warps": (1, 2, 4, 8, 16, 32), "block_m": (1, 2, 4, 8, 16, 32, 64),
           "programs_per_sm": tuple(range(1, 17)), "num_stages": (1, 2, 3, 4), "persistent": (False, True),
           "single_tile": (False, True)}
# A backward program owns at least this many rows, so its row of partial sums stays small next to
# the rows it moves: N fp32 per gradient written, then read by the reduce (8N bytes), against 96N
# bytes of x, dy and dx over 16 rows of 16-bit values (1/12 a gradient).
MIN_ROWS_PER_PROGRAM = 16
OPS = ("layernorm", "rmsnorm", "dyt", "derf")
ROWWISE_OPS = OPS[:2]  # the row-wise norms (kernels/rowwise_norm.py); the others are point-wise




def vector_aligned(n_cols: int) -> bool:
    """Whether rows of ``n_cols`` values are read and written 16 bytes at a time: a multiple of 16,
    the only divisibility Triton specializes an integer argument on (``tt.divisibility``). A row
    length and stride that are multiples of 8 but not of 16 get no hint, and ptxas emits one access
    per element, each with its own address (compile_check, sm_90: N = 1032 and 8200 compiled to
    2-byte accesses and 82-122 registers under rules that took them for aligned)."""
    return n_cols % 16 == 0


def next_power_of_2(n: int) -> int:
    """On the host (``triton.next_power_of_2`` is a jit function: a slow call from Python)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # rows per tile
    block_n: int  # columns per tile
    num_warps: int
    single_tile: bool = True  # row-wise kernels: the whole row fits one tile (read once, kept in registers)
    programs_per_sm: int = 1  # backward, and a persistent forward: programs launched per SM (a grid of SMs × this)
    num_stages: int = 1  # loads in flight in a kernel's loops (software pipelining through shared memory)
    # Row-wise forward of single-tile rows: a persistent grid whose programs walk row blocks with
    # num_stages blocks' loads in flight, instead of one tile a program. The same arithmetic per
    # row either way (bitwise the same output), so a measured table may choose it; no rule does.
    persistent: bool = False


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int):
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.name


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=64)  # asked on every backward; a device's .type alone costs ~0.4 µs
def num_compute_units(device: torch.device) -> int:
    """Streaming multiprocessors on a GPU; a small fixed number under the CPU interpreter."""
    if device.type == "cuda":
        return _cuda_properties(_cuda_index(device))[0]
    return 4


@functools.lru_cache(maxsize=None)
def _has_tanh_approx(index: int) -> bool:
    # tanh.approx.f32 is PTX for sm_75 and newer; a ROCm build also reports CUDA devices.
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (7, 5)


@functools.lru_cache(maxsize=64)
def has_tanh_approx(device: torch.device) -> bool:
    """Whether the 16-bit DyT forward may use the GPU's tanh.approx.f32 (off CUDA: the interpreter,
    which runs its emulation)."""
    return device.type != "cuda" or _has_tanh_approx(_cuda_index(device))


def device_name(device: torch.device) -> str | None:
    """The GPU's model name as a table key (``"NVIDIA-H100-80GB-HBM3"``), or None off CUDA."""
    if device.type != "cuda":
        return None
    return _cuda_properties(_cuda_index(device))[1].replace(" ", "-")


# ----------------------------------------------------------------------------------------------
# Measured tables
# ----------------------------------------------------------------------------------------------


def config_key(op: str, pass_: str, dtype: torch.dtype, n_cols: int) -> str:
    return f"{op}|{pass_}|{str(dtype).removeprefix('torch.')}|{next_power_of_2(max(n_cols, 1))}"


def validate_entry(key: str, entry: dict) -> dict:
    op, pass_, _, _ = key.split("|")
    if op not in OPS or pass_ not in ("fwd", "bwd"):
        raise ValueError(f"bad config key {key!r}")
    for field, value in entry.items():
        if field not in TUNABLE or value not in TUNABLE[field] or type(value) is not type(TUNABLE[field][0]):
            raise ValueError(f"config {key!r}: {field}={value!r} is not one of {TUNABLE.get(field)}")
    if "single_tile" in entry:
        _check_single_tile(key, entry)
    if entry.get("persistent"):
        if op not in ROWWISE_OPS or pass_ != "fwd":
            raise ValueError(f"config {key!r}: only the row-wise forward (LayerNorm, RMSNorm) has a persistent grid")
        if "programs_per_sm" not in entry or "num_stages" not in entry:
            raise ValueError(f"config {key!r}: a persistent entry sets programs_per_sm and num_stages too")
    return dict(entry)


def wide_tile_fits(op: str, pass_: str, n_cols: int, dtype: torch.dtype) -> bool:
    """Whether a table may keep these rows in one tile where the rules loop: a LayerNorm or RMSNorm
    pass ("fwd", "bwd") over rows of more than MAX_SINGLE_TILE_BYTES whose key width fits
    WIDE_TILE_BYTES."""
    return (op in ROWWISE_OPS and pass_ in ("fwd", "bwd") and n_cols * dtype.itemsize > MAX_SINGLE_TILE_BYTES
            and next_power_of_2(n_cols) * dtype.itemsize <= WIDE_TILE_BYTES)


def _check_single_tile(key: str, entry: dict) -> None:
    """A table's ``single_tile``: True (one row a tile, with its own warps and, in the backward,
    programs per SM and stages: the looped rule's would not fit) only where :func:`wide_tile_fits`;
    False only where the rules loop too (their value there)."""
    op, pass_, dtype, n = key.split("|")
    dtype = getattr(torch, dtype, None)
    if op not in ROWWISE_OPS or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"config {key!r}: only the row-wise norms (LayerNorm, RMSNorm) set single_tile, "
                         "in a float dtype")
    if int(n) * dtype.itemsize <= MAX_SINGLE_TILE_BYTES:
        raise ValueError(f"config {key!r}: the rules already keep these rows in one tile")
    if entry["single_tile"]:
        if not wide_tile_fits(op, pass_, int(n), dtype) or entry.get("block_m", 1) != 1:
            raise ValueError(f"config {key!r}: single_tile takes rows of at most {WIDE_TILE_BYTES} bytes, one a tile")
        needed = ("num_warps",) if pass_ == "fwd" else ("num_warps", "programs_per_sm", "num_stages")
        if any(field not in entry for field in needed):
            raise ValueError(f"config {key!r}: a single_tile entry sets {', '.join(needed)} too")


@functools.lru_cache(maxsize=1)
def _tables() -> dict:
    """{gpu name: {key: fields}} from every table in CONFIG_DIR."""
    tables = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        tables[data["gpu"]] = {k: validate_entry(k, v) for k, v in data["configs"].items()}
    return tables


def set_tuned(gpu: str, key: str, entry: dict | None) -> None:
    """Set (or, with None, remove) one table entry in memory; the tuner uses this to try candidates."""
    table = _tables().setdefault(gpu, {})
    if entry is None:
        table.pop(key, None)
    else:
        table[key] = validate_entry(key, entry)
    launch_config.cache_clear()


def tuned_entry(op: str, pass_: str, n_cols: int, dtype: torch.dtype, device: torch.device) -> dict | None:
    gpu = device_name(device)
    if gpu is None:
        return None
    return _tables().get(gpu, {}).get(config_key(op, pass_, dtype, n_cols))


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------


def single_tile_limit(dtype: torch.dtype) -> int:
    """The widest row the norm kernels keep in registers in one tile: 8192 16-bit or 4096 fp32
    values, forward and backward alike (half that for rows that are not :func:`vector_aligned`:
    the rules halve it)."""
    return MAX_SINGLE_TILE_BYTES // dtype.itemsize


def _resident_estimate(num_warps: int, regs_per_thread: int) -> int:
    """Programs of ``num_warps`` that fit an SM (65536 registers, 64 warps), for registers
    estimated from the fp32 values each thread keeps live: the persistent backward grid launches
    this many per SM. ``compile_check`` reports the real registers and residency."""
    return max(1, min(65536 // (regs_per_thread * 32 * num_warps), 64 // num_warps, 16))


def _rowwise_rule(n_cols: int, dtype: torch.dtype, backward: bool, max_block_n: int | None,
                  fused: bool = False, two_stores: bool = False, peri: bool = False,
                  affine: bool = True, wide_dy: bool = False) -> LaunchConfig:
    limit = single_tile_limit(dtype)
    aligned = vector_aligned(n_cols)
    if not aligned:
        # Element-wise addresses take about twice the registers a value (see per_value below): a
        # one-tile row of 16 KB spilled (LayerNorm backward, 8 values a thread in 16 warps at N =
        # 4104 16-bit and 2056 fp32: 128 registers and 8-16 bytes; compile_check, sm_90), so these
        # rows loop past 8 KB.
        limit //= 2
    if fused:
        # A fused residual backward also reads the sum's gradient (and with ``two_stores`` stores
        # dx twice). 16-bit rows up to 4096 stay one tile: the looped path fits 7 small programs
        # per SM but reads x and dy twice, and measured 44% of copy bandwidth at 4096 on an H100
        # where the plain single-tile backward made 85% (the one-tile fused backward, in 16-warp
        # programs: 49-55%). fp32 streams (twice the bytes per value) take the looped path past
        # 2048, and so do wider 16-bit rows, with the looped tiles they had before (halved below).
        limit = min(limit, 4096 if dtype.itemsize == 2 and n_cols <= 4096 else 2048)
    if max_block_n is not None:
        limit = min(limit, next_power_of_2(max_block_n))
    block_n = min(next_power_of_2(max(n_cols, 1)), limit)
    single_tile = n_cols <= block_n
    if not backward:
        # Forward tiles are read once and written once: rows stacked to TARGET_TILE_ELEMENTS,
        # 8 elements (16 bytes in 16-bit) per thread; the looped path pipelines its column loops.
        block_m = max(1, min(TARGET_TILE_ELEMENTS // block_n, 16))
        num_warps = max(1, min(block_m * block_n // 256, 16))
        staged = not single_tile and aligned  # unaligned rows: see num_stages below
        if not single_tile and not aligned and max_block_n is None:
            # Looped rows read element by element: one row a tile at 4 values a thread. Two rows
            # of 2048 at 8 (fp32) took LayerNorm to 57-64 registers and 8 bytes of spill
            # (compile_check, sm_90, N = 8200); one row at 4 values takes 26-32. (A capped tile,
            # the tests' way to the looped path on small rows, keeps its stacked rows.)
            block_m, num_warps = 1, max(1, min(block_n // 128, 16))
        return LaunchConfig(block_m, block_n, num_warps, single_tile, 1, 2 if staged else 1)
    if not single_tile:
        # The looped backward keeps two tiles' worth of row sums and accumulators live; half-width
        # tiles keep it off the register limit and cost nothing in bytes moved.
        block_n //= 2
    # Rows whose length is not a multiple of 16 are not read 16 bytes at a time (vector_aligned):
    # every element is its own 2-4 byte load with its own address, and pipelining those through
    # shared memory took a narrow DyT backward to 140-250 registers (compile_check, sm_90); they
    # are not staged.
    num_stages = 2 if aligned else 1
    if single_tile and dtype.itemsize == 2 and block_n * 2 == MAX_SINGLE_TILE_BYTES and num_stages == 2:
        # The widest 16-bit single tiles run one 16-warp program per SM (the row and its
        # accumulators fill the registers); a third stage deepens its prefetch, and at two ptxas
        # squeezed bias-only LayerNorm to 64 registers and spilled (compile_check, sm_90).
        num_stages = 3
    # One row per step down to 1024 columns (narrower rows are stacked to 1024 elements): each
    # program walks its rows with the next block's loads in flight (NUM_STAGES = 2) while it
    # reduces the current one, and 8 elements per thread and live tensor (x, dy, w, dw, db: about
    # 64 registers) leave room for several programs per SM instead of one wide one.
    block_m = max(1, min(1024 // block_n, 16))
    # Except 16-bit rows of 4096, where 8 elements a thread at 16 warps took LayerNorm with weight
    # and bias to 115 registers (one program per SM) and 16 at 8 warps takes 128 (two per SM):
    # compile_check, sm_90. A fused backward that reads the sum's gradient too fits the same (122),
    # but one that also stores dx twice took 144 at 16 a thread (one 8-warp program per SM) and
    # takes 85 at 8 (one 16-warp program): twice the warps to hide its loads behind.
    per_thread = 16 if dtype.itemsize == 2 and block_n == 4096 and single_tile and not two_stores else 8
    if not aligned:
        per_thread = 4  # element-wise addresses: see num_stages below
    num_warps = max(1, min(block_m * block_n // (32 * per_thread), 16))
    per_thread = block_m * block_n // (32 * num_warps)
    # Registers ≈ 7 per value a thread holds + 16 on the single-tile path (LayerNorm with weight
    # and bias on sm_90: 72 at 8 values, 128 at 16; 12 with element-wise addresses at 4 values a
    # thread: 24-64 plain, up to 90 fused, N 97-8200), 5 on the looped path, which holds one
    # column tile and no whole row (32-64 at 8 values across the plain norms' layouts and dtypes).
    # The estimate must not exceed the real residency (compile_check fails a persistent grid
    # larger than one wave), and should not fall short of it either: at 7 the looped 16-warp backward launched one program per SM where two
    # fit, and the H100 timed that rule at N = 16384 (bf16) at 2.90 ms (LayerNorm) and 2.80
    # (RMSNorm) against 2.14 and 2.07 with two programs per SM (benchmarks.tune's candidates).
    # The fused backward's extra operands cost ~3 more per value at 8 values a thread; at 16, ptxas
    # held every 16-bit 4096-wide single tile, fused or not, to 128 or fewer (compile_check). Its
    # looped tiles keep the single tile's 7 (55-80 registers at 8 values in 4 warps: the lower
    # estimate would leave no margin there for another Triton version's register count).
    per_value = (7 if single_tile or fused else 5) if aligned else 12
    if wide_dy and two_stores and not single_tile and aligned:
        # An fp32 dy beside the 16-bit second dx (an x_hat_dtype RMSNorm's fp32 y over an fp32 stream,
        # add_norm): 122 registers at 8 values in 4 warps, where the same launch with a 16-bit dy
        # took 70 (compile_check, sm_90, N 4096 and 8192): 11 a value estimates 128, 4 programs.
        per_value = 11
    if single_tile and block_m == 1 and not affine and not fused and aligned:
        # A plain backward with no weight to load and no dw/db to sum (a norm without
        # elementwise_affine, as DiT's adaLN LayerNorm) holds only x and dy: 35-59 registers at
        # 8-16 values a thread, 2.2-3.0 a value (compile_check, sm_90, N 768-8192).
        per_value = 4
    regs = per_value * per_thread + 16 + (3 * per_thread if fused and per_thread < 16 else 0)
    if single_tile and block_m > 1 and aligned and (affine or fused):
        # Rows stacked in a tile (N <= 512) cost more than one 1024-wide row at the same 8 values a
        # thread: 80-128 registers across the plain and add_norm layouts (LayerNorm fp32 with weight
        # and bias at N = 128-256: 128), against 56-72 at 1×1024 (compile_check, sm_90, N 64-512).
        # At 7 the grid was 1.15-1.73 waves there: a second wave that nearly doubles the kernel.
        # A plain backward with no parameter to load or sum (a norm without elementwise_affine, as
        # DiT's adaLN LayerNorm) takes 48-64 (8-10 fit): the estimate above (72, 7 programs) holds.
        regs = max(regs, 14 * per_thread + 16)
    if peri and single_tile:
        # norm_add_norm's one-pass backward holds a second norm's row and four column sums: 15
        # registers a value (23 with element-wise addresses) + 16 (LayerNorm 128-137 and RMSNorm
        # 96-117 at 8 values, 91-108 at 4 element-wise; compile_check, sm_90).
        regs = (15 if aligned else 23) * per_thread + 16
    return LaunchConfig(block_m, block_n, num_warps, single_tile, _resident_estimate(num_warps, regs), num_stages)


def _elementwise_rule(n_cols: int, backward: bool, max_block_n: int | None, fused: bool = False,
                      peri: bool = False) -> LaunchConfig:
    # Tiles of TARGET_TILE_ELEMENTS (columns up to 1024 wide, rows stacked to fill the rest),
    # 8 elements per thread: 128-bit accesses in 16-bit, 2 x 128-bit in fp32.
    block_n = min(next_power_of_2(max(n_cols, 1)), 1024)
    if max_block_n is not None:
        block_n = min(block_n, next_power_of_2(max_block_n))
    block_m = max(1, min(TARGET_TILE_ELEMENTS // block_n, 64))
    if not backward:
        return LaunchConfig(block_m, block_n, max(1, min(block_m * block_n // 256, 16)))
    # Backward keeps four (BLOCK_M, BLOCK_N) fp32 accumulators live across its row loop, so half
    # the tile at the same 8 elements per thread, the next row block's loads in flight.
    block_m = max(1, block_m // 2)
    aligned = vector_aligned(n_cols)
    num_stages = 2 if aligned else 1  # see _rowwise_rule
    if not aligned:
        # Element-wise addresses (a row length not a multiple of 16): half the tile at 4 values a
        # thread; 8 took Derf's channels-first backward to 140+ registers (compile_check, sm_90).
        block_m = max(1, block_m // 2)
    # A fused residual backward (the sum's gradient read, dx maybe stored twice) runs half the rows
    # a tile, in programs of half the warps, at the same 8 values a thread (128-bit accesses):
    # 95-122 registers in 4 warps at 1024 wide (DyT, Derf; a bf16 or fp32 stream), 4-5 programs
    # per SM, where 4 values a thread took 58-72 in 8 warps (64-bit accesses, twice the memory
    # instructions; compile_check, sm_90). norm_add_norm's one-pass backward holds a second
    # layer's row and four more sums: at 8 values it took DyT 162 and Derf 211-255 registers
    # (2-3 four-warp programs per SM), at 4 values 80-126 in 8 warps (2-3 programs): 4 values.
    # Rows that are not a multiple of 16 (element-wise addresses): 4 values a thread, but 2 in a
    # fused one-row tile, where DyT beside an fp32 stream spilled 8 bytes at 64 registers in 8
    # warps (N = 1025-8193); at 2, in 16 warps, 40-58 and no spill (compile_check, sm_90).
    values = 8 if aligned and not peri else 2 if fused and not peri else 4
    if fused:
        block_m = max(1, block_m // 2)
    num_warps = max(1, min(block_m * block_n // (32 * values), 16))
    per_thread = block_m * block_n // (32 * num_warps)
    # Registers ≈ 12 per value a thread holds + 32 (Derf with weight and bias on sm_90: 128 at 8;
    # fused, one row a tile: 95-122), 16 for a fused tile of stacked rows (N < 1024: 120-159 at 8);
    # norm_add_norm's one-pass backward (a second layer, four more sums) 24 (Derf 107-126 at 4).
    per_value = 24 if peri else 16 if fused and block_m > 1 else 12
    return LaunchConfig(block_m, block_n, num_warps, True,
                        _resident_estimate(num_warps, per_value * per_thread + 32), num_stages)


@functools.lru_cache(maxsize=4096)
def launch_config(op: str, pass_: str, n_cols: int, dtype: torch.dtype, device: torch.device,
                  max_block_n: int | None = None, affine: bool = True, timed_layout: bool = True,
                  wide_dy: bool = False) -> LaunchConfig:
    """The launch configuration for one kernel call. ``max_block_n`` caps the column tile (tests
    use it to reach the looped path on small rows); a capped call ignores the measured tables.
    ``affine=False``: a row-wise backward with no weight to load and no dw/db to sum (a lighter
    kernel: more programs fit; tables, timed with parameters, do not distinguish it).
    ``timed_layout=False``: the launch is not the plain norm's layout that tables are timed on (a
    fused op's forward holds more per row, a dy in another dtype than x takes more shared memory):
    a whole-row entry (``single_tile``) is ignored, the rules' tiles run, and a persistent one runs
    one tile a program. ``wide_dy``: a fused backward's dy is 32-bit where its second dx is 16-bit.
    ``pass_``: ``"fwd"``, ``"bwd"``, ``"bwd_res"`` (a fused residual op's backward, which also
    reads the sum's gradient: rules only, no table), ``"bwd_res2"`` (the same, storing dx twice) or
    ``"bwd_peri"`` (norm_add_norm's one-pass backward: two norms' gradients, read as bwd_res2)."""
    fused = pass_ in ("bwd_res", "bwd_res2", "bwd_peri")
    backward = fused or pass_ == "bwd"
    if op in ROWWISE_OPS:
        cfg = _rowwise_rule(n_cols, dtype, backward, max_block_n, fused, pass_ in ("bwd_res2", "bwd_peri"),
                            pass_ == "bwd_peri", affine, wide_dy)
    else:
        cfg = _elementwise_rule(n_cols, backward, max_block_n, fused, pass_ == "bwd_peri")
    # Tables are measured at row lengths that are multiples of 16 and keyed by the next power of 2:
    # other lengths (element-wise addresses, no staging) keep the rule.
    entry = tuned_entry(op, pass_, n_cols, dtype, device) if max_block_n is None and vector_aligned(n_cols) else None
    if not entry:
        return cfg
    if entry.get("single_tile") and not cfg.single_tile:  # a wide tile (validate_entry checked the width)
        return replace(cfg, **entry, block_n=next_power_of_2(n_cols)) if timed_layout else cfg
    cfg = replace(cfg, **entry)
    return cfg if timed_layout or not cfg.persistent else replace(cfg, persistent=False)


def split_rows(n_rows: int, cfg: LaunchConfig, device: torch.device) -> tuple[int, int]:
    """``(rows_per_program, programs)`` for a backward whose programs each own a contiguous run of
    rows and write one row of partial sums: ``programs_per_sm`` programs per SM (a persistent
    grid), fewer when that would leave a program under MIN_ROWS_PER_PROGRAM rows; each run a
    multiple of ``block_m``, every program given at least one row."""
    row_blocks = cdiv(n_rows, cfg.block_m)
    if n_rows < 2 * MIN_ROWS_PER_PROGRAM:  # one program, as below, without asking for the device's SMs
        return row_blocks * cfg.block_m, 1
    programs = min(row_blocks, cfg.programs_per_sm * num_compute_units(device),
                   max(1, n_rows // MIN_ROWS_PER_PROGRAM))
    rows_per_program = cdiv(row_blocks, programs) * cfg.block_m
    return rows_per_program, cdiv(n_rows, rows_per_program)
