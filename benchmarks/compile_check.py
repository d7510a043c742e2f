"""Compile, for a real GPU target and without a GPU, exactly the kernels normzoo's launchers launch.

    python -m benchmarks.compile_check                          # sm_90, M = 32768 rows, 132 SMs
    python -m benchmarks.compile_check --hidden 4096 --dtypes bf16 --ops rmsnorm
    python -m benchmarks.compile_check --out benchmarks/results/compile-sm90   # + .md and .json
    python -m benchmarks.compile_check --fused-modes                           # no fused residual variants
    python -m benchmarks.compile_check --switches --headwise                   # nor model switches, head-wise norms

How: every variant (op, pass, dtype, affine layout, width) calls the public launchers
(``rowwise_norm_forward/backward``, ``pointwise_forward/backward``) on ``meta`` tensors, which
cost no memory at any size and whose ``data_ptr()`` is their byte offset into a storage at address
0, so fresh tensors look 16-byte aligned, as CUDA allocations are. ``JITFunction.run`` is replaced
by a recorder: each ``kernel[grid](...)`` is bound and specialized by Triton's own launch code
(``create_function_from_signature`` + ``JITFunction._pack_args``, i.e. ``native_specialize_impl``
with the CUDA backend), which gives a pointer ``tt.divisibility = 16`` when it is 16-byte aligned,
an int ``tt.divisibility = 16`` when it is a multiple of 16, and turns an int equal to 1 (and any
None) into a constant. That signature, constexprs, attrs and options go to
``triton.compile(ASTSource(...))`` for the target: the same kernel a launch on the GPU compiles.
Identical compiles (same function, specialization and options) are compiled once. The passes:
``fwd``, ``bwd``, and ``infer``, the forward under ``torch.no_grad()``: the row-wise launchers then
pass no statistics buffer (``with_stats=False``), which specializes their forward kernel into
another variant that stores none (DyT, Derf and the head-wise norms keep none, and have no infer
variants).

Fused residual variants (op, residual mode, activation dtype, residual-stream dtype, width) are
captured the same way one level up: through ``normzoo.fused._fused_forward`` and
``_fused_backward``, the implementation the ops layer's autograd.Function and custom ops run, with
``triton=True``. So the forward is the one ``fused_residual`` launches (``RES_MODE`` "add_norm", "norm_add" or "norm_add_norm", the sum
stored in the stream's dtype, a second norm's parameters for norm_add_norm), and the backward is
every launch its gradient makes for incoming dy and ds (add_norm: dres = ds, dx in the stream's
dtype and a second dx in the activation's when they differ; norm_add: N's backward of ds;
norm_add_norm: N2's backward and N's on its fp32 result in one pass where the row fits one fused
tile, else N2's backward with dres and an fp32 dx copy for a 16-bit stream, then N's plain
backward of that fp32 gradient). RMSNorm's fused variants are compiled again with x̂ rounded as
a model's norm rounds it (``FUSED_X_HAT``: Llama's ``x_hat_dtype="input"``, y in that norm's dtype).

Model switches of the plain norms' kernels (``SWITCHES``) go through the ops layer's own forward
and backward too (``normzoo.ops._rowwise_forward`` / ``_rowwise_backward``): x̂ rounded before the
weight (``ROUND_X_HAT``; the code and y's dtype from ``normzoo.ops._x_hat_rounding``, the rule a
layer's ``x_hat_dtype`` follows: Llama's "input", T5's "weight") and Gemma's ``1 + w``
(``weight_offset``: ``w_offset`` passed, not None). Each switch variant is compiled beside its plain twin, the
same launch with the switch off (``round_x_hat=0`` with the same y dtype, ``weight_offset=0``),
and reported against it.

Head-wise norms (``kernels/headwise_norm.py``, through ``normzoo.ops._headwise_forward`` /
``_headwise_backward``): QK-norm with q and k as views of a fused qkv projection (per head, ``--rows``
tokens of ``QK_HEADS`` heads, or over all heads), RMS or L2 with a scale; ScaleNorm and CRMSNorm
over (``--rows``, N) rows, CRMSNorm also at the compressed widths C − 1 a converted model runs it at.
One tile per row at every width up to the kernels' 65536.

Reported per launch: tile, warps, registers, spill bytes and shared memory (from the cubin),
resident programs per SM and what limits them, grid and waves at ``--rows`` rows on ``--sms``
SMs, and the global load/store widths in the PTX, per pointer argument. Exit status 1 on any
failed compile or launch, any spill (but one of at most SPILL_TOLERATED_BYTES in a one-program
backward, which is reported), a row kernel (one that reads or writes the (M, N)
tensors) with fewer than 2 resident programs per SM that no entry of RESIDENCY_EXCEPTIONS
explains, or a persistent backward grid larger than one wave (more programs than are resident),
among the plain norms' launches, the fused residual ops', the model switches' or the head-wise norms' (each
family has its own summary line).
The column-sum reduce launched by every backward is reported separately: its grid is smaller
than the SM count by design, so its residency is not judged.

``--gpu NAME`` applies a committed measured table (kernels/configs/NAME.json), ``--table FILE`` a
tuner's output not yet committed. A table's wide tile (``single_tile``: a row-wise pass keeping a
row the rules loop over whole, heuristics.WIDE_TILE_BYTES) is there because benchmarks.tune timed
it faster than the rules' looped tiles on that GPU (the tuner writes no other): its spills and
residency are reported, not failed.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import itertools
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from . import json_argument, positive_int

os.environ.pop("TRITON_INTERPRET", None)  # must precede the kernels' @triton.jit definitions
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import normzoo.kernels as launchers  # noqa: E402
from normzoo.kernels import heuristics  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# 256: rows stacked in a tile; 1032: a multiple of 8 that is not one of 16 (rows read element-wise)
DEFAULT_HIDDEN = [97, 256, 1024, 1032, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
# Fused residual variants (normzoo.fused): fewer widths (representative ones, rows stacked in a
# tile, the 16-bit single-tile limit, two unaligned: one stacked, one a row a tile), 16-bit
# activations beside a 16-bit or an fp32 residual stream.
FUSED_OPS = ("layernorm", "rmsnorm", "dyt", "derf")
FUSED_MODES = ("add_norm", "norm_add", "norm_add_norm")
FUSED_HIDDEN = [97, 256, 1024, 1025, 2048, 4096, 8192]
# Weight and bias on every norm (RMSNorm has no bias), in the activation's dtype.
FUSED_AFFINE = {"rmsnorm": ("w", True, False, False)}
FUSED_AFFINE_DEFAULT = ("wb", True, True, False)
# RMSNorm's x̂ rounding in the fused ops (Llama's add + RMSNorm; T5's "weight" with a 16-bit weight
# compiles the same rounding), in the fused variants' layout and with fp32 weights (y then fp32).
FUSED_X_HAT = ("input",)
FUSED_X_HAT_AFFINE = (FUSED_AFFINE["rmsnorm"], ("w-fp32", True, False, True))
# Channels of the channels-first DyT/Derf views ((B, C, S) as (B·C, S) rows, one channel per row).
CHANNELS_FIRST_C = 256
# Model switches of the plain norms' kernels: name -> ({op: affine layouts}, x_hat_dtype, weight_offset).
# x_hat_dtype goes through normzoo.ops._x_hat_rounding (the ROUND_X_HAT code and y's dtype); a
# layout where it gives code 0 (an fp32 input) is skipped, as the switch never reaches the kernel.
SWITCHES = {
    "x_hat=input": ({"rmsnorm": ("w", "w-fp32")}, "input", 0.0),  # Llama, Mistral, Qwen2/3 (fp32 w: y fp32)
    "x_hat=weight": ({"rmsnorm": ("w",)}, "weight", 0.0),  # T5 with a 16-bit weight
    "offset": ({"rmsnorm": ("w", "w-fp32"), "layernorm": ("wb",)}, None, 1.0),  # Gemma's 1 + w; LayerNorm1P
}
SWITCH_HIDDEN = [2048, 4096, 8192, 16384]  # single-tile in 16-bit up to 8192, looped at 16384
# Head-wise norms (kernels/headwise_norm.py). "qknorm" is QK-norm's RMS (per head and over all heads)
# and L2 (with a scale) forms.
HEADWISE_OPS = ("qknorm", "scalenorm", "crmsnorm")
HEADWISE_HIDDEN = [1024, 4096, 8192, 16384, 32768, 65536]  # ScaleNorm and CRMSNorm (the kernels take up to 65536)
CRMS_COMPRESSED = [767, 4095]  # CRMSNorm's width C − 1 in a converted model: GPT-2 (C = 768), C = 4096
QK_HEAD_DIMS = [64, 128, 256]
QK_HEADS = (32, 8)  # query and key/value heads (GQA) in one fused qkv row: Llama 3 8B, Qwen3-8B
QK_ALL_HEADS = [(4096, 4096), (4096, 1024)]  # over all heads (OLMo 2): q's and k's widths, MHA and GQA

# ------------------------------------------------------------------------------------------------
# Occupancy model (Hopper, sm_90; the same numbers hold for sm_80/sm_89 except shared memory)
# ------------------------------------------------------------------------------------------------

REGS_PER_SM = 65536
REG_UNIT_PER_THREAD = 8  # ptxas's count is rounded up to a multiple of 8 ...
REG_UNIT_PER_WARP = 256  # ... and allocated per warp in units of 256
SMEM_PER_SM = 228 * 1024
SMEM_MAX_PER_PROGRAM = 227 * 1024
SMEM_RESERVED_PER_PROGRAM = 1024  # the driver's per-block reservation (cuobjdump shows it as SHARED)
THREADS_PER_SM = 2048
PROGRAMS_PER_SM = 32
MIN_RESIDENT = 2  # a row kernel needs a second program per SM to overlap one's loads with the other's math


def residency(regs: int, smem_dynamic: int, smem_static: int, num_warps: int) -> tuple[int, list[str]]:
    """Programs of this kernel one SM holds at once, and the limit(s) that bind."""
    regs_per_warp = math.ceil(math.ceil(regs / REG_UNIT_PER_THREAD) * REG_UNIT_PER_THREAD * 32
                              / REG_UNIT_PER_WARP) * REG_UNIT_PER_WARP
    smem = smem_dynamic + max(smem_static, SMEM_RESERVED_PER_PROGRAM)
    limits = {
        "regs": (REGS_PER_SM // regs_per_warp) // num_warps if regs_per_warp else PROGRAMS_PER_SM,
        "smem": SMEM_PER_SM // smem if smem <= SMEM_MAX_PER_PROGRAM else 0,
        "threads": THREADS_PER_SM // (num_warps * 32),
        "programs": PROGRAMS_PER_SM,
    }
    resident = min(limits.values())
    return resident, [name for name, value in limits.items() if value == resident]


# ------------------------------------------------------------------------------------------------
# Documented exceptions to the residency rule
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResidencyException:
    """Row-kernel launches allowed fewer than MIN_RESIDENT programs per SM, and why. A launch
    matches when every field that is not None does: the variant's op, pass, dtype and affine
    layout, and the launch's tile (``BLOCK_M`` × ``BLOCK_N``, and whether it spans the whole row).
    A fused residual variant matches as its norm's op (its mode is a switch of the same kernel);
    ``dtype`` is then the activation's, and the tile (which the kernel's own input dtype sets) tells
    a 16-bit single-tile launch from an fp32 stream's looped one. A model switch variant
    (``SWITCHES``) matches as its norm's op too: the switch is a constexpr of the same kernel."""

    reason: str
    ops: tuple[str, ...]
    passes: tuple[str, ...]
    dtypes: tuple[str, ...] | None = None
    affines: tuple[str, ...] | None = None
    tile: tuple[int, int] | None = None  # (BLOCK_M, BLOCK_N)
    whole_row: bool | None = None  # BLOCK_N >= N: the single-tile path
    unaligned: bool | None = None  # N not a multiple of 16: rows are not read 16 bytes at a time
    modes: tuple[str, ...] | None = None  # fused residual modes (FUSED_MODES) only; None: any variant
    streams: tuple[str, ...] | None = None  # a fused variant's residual stream dtypes; None: any

    def matches(self, variant: "Variant", constexprs: dict) -> bool:
        tile = (constexprs.get("BLOCK_M"), constexprs.get("BLOCK_N"))
        whole_row = tile[1] is not None and tile[1] >= variant.n
        return (variant.op in self.ops and variant.pass_ in self.passes
                and (self.dtypes is None or variant.dtype in self.dtypes)
                and (self.affines is None or variant.affine in self.affines)
                and (self.tile is None or tile == self.tile)
                and (self.whole_row is None or whole_row == self.whole_row)
                and (self.unaligned is None or (variant.n % 16 != 0) == self.unaligned)
                and (self.modes is None or variant.mode in self.modes)
                and (self.streams is None or variant.stream in self.streams))


# Keep this short and honest: an entry says why no configuration of the kernel, as written, can
# hold MIN_RESIDENT programs per SM, not that the current configuration doesn't.
# A spill in a one-program backward (the DIRECT switch) this small is reported, not failed (build_rows).
SPILL_TOLERATED_BYTES = 16
# A row-wise launch that keeps a row wider than the rules' single tile whole (a measured table's
# ``single_tile``; the rules never launch one) was timed faster than the rules' looped tiles on that
# GPU (benchmarks.tune): its spills and residency are reported, not failed.
WIDE_TILE_REASON = ("a measured table's wide tile (one row over 16 KB a tile, heuristics.WIDE_TILE_BYTES): "
                    "timed faster than the rules' looped tiles by benchmarks.tune on that GPU")

# The passes a variant is compiled for: forward, backward, and the forward under torch.no_grad().
PASSES = ("fwd", "bwd", "infer")
RESIDENCY_EXCEPTIONS: list[ResidencyException] = [
    ResidencyException(
        "single-tile backward holds x, dy (w) and the dw/db accumulators across its row loop: 3-5 x 8192 "
        "fp32 = 96-160 KB of the 256 KB register file plus its staging; the looped path would fit two but "
        "reads x and dy twice (5/3 the bytes). (Bias-only LayerNorm: at 2 stages ptxas held it to 64 "
        "registers and spilled; 3 stages take 121 without a spill.)",
        ops=("layernorm", "rmsnorm"), passes=("bwd",), dtypes=("bf16", "fp16"),
        affines=("w", "wb", "b", "w-fp32", "wb-fp32"), tile=(1, 8192), whole_row=True),
    ResidencyException(
        "norm_add_norm's one-pass backward in one 4096-wide 16-bit tile: both norms' gradients (dy, ds, s and h "
        "read, dx and dh written, four column-sum accumulators). At 16 values a thread in 8 warps it took "
        "244-247 registers (one program, 8 warps per SM); at 8 values in 16 warps, LayerNorm 128 and RMSNorm "
        "84 (one program, 16 warps); RMSNorm beside an fp32 stream 101. The alternative, two "
        "kernels with dx kept in fp32 between them, moves 10 units of row traffic for the ideal 6.",
        ops=("layernorm", "rmsnorm"), passes=("bwd",), dtypes=("bf16", "fp16"), tile=(1, 4096), whole_row=True,
        modes=("norm_add_norm",)),
    ResidencyException(
        "norm_add_norm's one-pass LayerNorm backward beside an fp32 stream, rows of 1025-2048 in one tile: "
        "both norms' gradients with s and dx in fp32 took 138 registers at 8 values a thread in 8 warps (one "
        "program, 8 warps per SM) and 98 at 4 values in 16 warps (one program, 16 warps). The alternative, "
        "two kernels with dx kept in fp32 between them, moves 10 units of row traffic for the ideal 6.",
        ops=("layernorm",), passes=("bwd",), dtypes=("bf16", "fp16"), tile=(1, 2048), whole_row=True,
        modes=("norm_add_norm",), streams=("fp32",)),
    ResidencyException(
        "rows whose length is not a multiple of 16 are not read 16 bytes at a time (Triton specializes an integer "
        "on divisibility by 16 only, heuristics.vector_aligned): every element is its "
        "own 2-4 byte access with its own 64-bit address, which is what fills the registers. A performance "
        "limit, not a correctness one (the README asks for hidden sizes that are multiples of 16).",
        ops=("layernorm", "rmsnorm", "dyt", "derf", "dyt-cf", "derf-cf"), passes=PASSES, unaligned=True),
    ResidencyException(
        "head-wise single-tile backward of an 8192-wide 16-bit row, as the row norms' above: x, dy and the "
        "weight gradient's accumulator held across the row loop (ScaleNorm: 100 registers, 16 warps); the "
        "looped path (rows of more than 16 KB) would fit 4 programs but reads x and dy twice.",
        ops=("scalenorm", "crmsnorm"), passes=("bwd",), dtypes=("bf16", "fp16"), tile=(1, 8192), whole_row=True),
]


# ------------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------------

# op -> (launcher family, activation, params per row)
OPS = {
    "layernorm": ("rowwise", None, False),
    "rmsnorm": ("rowwise", None, False),
    "dyt": ("pointwise", "tanh", False),
    "derf": ("pointwise", "erf", False),
    "dyt-cf": ("pointwise", "tanh", True),
    "derf-cf": ("pointwise", "erf", True),
}
# Affine layouts: (label, has weight, has bias, parameters in fp32 instead of the input's dtype).
AFFINE = [("none", False, False, False), ("w", True, False, False), ("wb", True, True, False),
          ("b", False, True, False), ("wb-fp32", True, True, True)]


@dataclasses.dataclass(frozen=True)
class Variant:
    op: str
    pass_: str
    dtype: str
    affine: str
    n: int
    rows: int
    mode: str | None = None  # a fused residual variant's mode (FUSED_MODES); None: the plain norm
    stream: str | None = None  # ... and its residual stream's (and sum's) dtype
    switch: str | None = None  # a model switch of the plain norm's kernel (SWITCHES), or a fused one's (x_hat=...)
    layout: str | None = None  # a head-wise variant's tensors, where there is more than one (QK-norm)

    @property
    def family(self) -> str:
        """ "plain", "fused", "switch" or "headwise": each family has its own summary line."""
        if self.mode:
            return "fused"
        if self.switch:
            return "switch"
        return "headwise" if self.op.split("-")[0] in HEADWISE_OPS else "plain"

    @property
    def label(self) -> str:
        if self.mode:
            switch = f"[{self.switch}]" if self.switch else ""
            return f"{self.op}{switch}:{self.mode} {self.pass_} {self.dtype}/{self.stream} {self.affine} N={self.n}"
        if self.switch:
            return f"{self.op}[{self.switch}] {self.pass_} {self.dtype} {self.affine} N={self.n}"
        layout = f" ({self.layout})" if self.layout else ""
        return f"{self.op} {self.pass_} {self.dtype} {self.affine} N={self.n}{layout}"

    def asdict(self) -> dict:
        # The optional fields only where set: a plain or fused variant's record is as it always was.
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None or k not in ("mode", "stream", "switch", "layout")}


def affine_layouts(op: str, dtype: str):
    for label, has_w, has_b, fp32_params in AFFINE:
        if fp32_params and dtype == "fp32":
            continue  # the same as the input-dtype layout
        if op == "rmsnorm" and has_b:
            if label == "wb-fp32":  # RMSNorm has no bias: its fp32-parameter layout is the weight alone
                yield "w-fp32", True, False, True
            continue
        yield label, has_w, has_b, fp32_params


# ------------------------------------------------------------------------------------------------
# Capturing launches
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One ``kernel[grid](...)`` call as Triton's launcher would specialize and compile it."""

    kernel: str  # "module.qualname" of the @triton.jit function
    grid: tuple[int, ...]
    signature: dict  # name -> type ("*bf16", "i32", "constexpr", ...), in parameter order
    constexprs: dict  # (index,) -> value
    attrs: dict  # (index,) -> [["tt.divisibility", 16]] or []
    options: dict  # the backend's parsed options (num_warps, num_stages, ...)
    row_params: list[str]  # pointer arguments bound to the variant's (M, N) row tensors
    row_dtypes: dict = dataclasses.field(default_factory=dict)  # distinct row tensors: argument -> dtype

    @property
    def name(self) -> str:
        return self.kernel.rsplit(".", 1)[-1]

    @property
    def named_constexprs(self) -> dict:
        names = list(self.signature)
        return {names[path[0]]: value for path, value in self.constexprs.items() if len(path) == 1}

    @property
    def compile_key(self) -> str:
        return repr((self.kernel, self.signature, sorted(self.constexprs.items()), sorted(self.attrs.items()),
                     sorted(self.options.items())))


class LaunchRecorder:
    """Replaces every Triton launch with a record of what it would compile for ``target``.

    The binder and ``_pack_args`` are the ones ``JITFunction.run`` uses, with a backend made for
    ``target`` instead of the (absent) current GPU, and the same launch-time knobs.
    """

    def __init__(self, target: GPUTarget, sms: int, gpu_name: str | None):
        self.backend = make_backend(target)
        self.sms = sms
        self.gpu_name = gpu_name
        self.binders = {}
        self.launches = None
        self.row_shapes = set()

    def _run(self, fn, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        # The launch-time knobs this Triton has (3.6, on the GPU image, lacks the fpsan one).
        for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(knobs.compilation, knob):
                kwargs[knob] = getattr(knobs.compilation, knob)
        if fn not in self.binders:
            self.binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = self.binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization,
                                                              options)
        if callable(grid):
            grid = grid(bound_args)
        row_params = [name for name, value in bound_args.items()
                      if isinstance(value, torch.Tensor) and tuple(value.shape) in self.row_shapes]
        # The row tensors the launch really passes: an argument bound to a tensor an earlier one
        # already holds is a placeholder for an absent one (an unused Y, DRES, DX2, ...).
        row_dtypes, seen = {}, set()
        for name in row_params:
            if id(bound_args[name]) not in seen:
                seen.add(id(bound_args[name]))
                row_dtypes[name] = DTYPE_NAMES.get(bound_args[name].dtype, str(bound_args[name].dtype))
        self.launches.append(Launch(f"{fn.fn.__module__}.{fn.fn.__qualname__}", tuple(grid), signature, constexprs,
                                    attrs, dict(options.__dict__), row_params, row_dtypes))
        return None

    @contextlib.contextmanager
    def installed(self):
        """Patch Triton's launch, the SM count and (with a GPU name) the device's name, in every
        normzoo.kernels module that imported them."""
        recorder = self
        patches = [(JITFunction, "run", lambda fn, *a, grid, warmup, **k: recorder._run(fn, *a, grid=grid,
                                                                                          warmup=warmup, **k))]
        replacements = [(heuristics.num_compute_units, lambda device: self.sms),
                        (heuristics.device_name, lambda device: self.gpu_name)]
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("normzoo.kernels") and module is not None:
                for attr, value in list(vars(module).items()):
                    for original, replacement in replacements:
                        if value is original:
                            patches.append((module, attr, replacement))
        saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
        for owner, attr, value in patches:
            setattr(owner, attr, value)
        clear_config_cache = getattr(heuristics.launch_config, "cache_clear", lambda: None)
        clear_config_cache()  # configs are cached per device, and what the device reports changed
        try:
            yield self
        finally:
            for owner, attr, value in saved:
                setattr(owner, attr, value)
            clear_config_cache()

    @contextlib.contextmanager
    def capture(self, *row_shapes):
        """Record the launches made inside: tensors of one of ``row_shapes`` are row tensors (the
        head-wise norms have several: q's and k's views and their 2-D gradients)."""
        self.launches, self.row_shapes = [], {tuple(shape) for shape in row_shapes}
        try:
            yield self.launches
        finally:
            self.launches = None


def launches_of(recorder: LaunchRecorder, op: str, dtype: str, affine: tuple, n: int, rows: int) -> dict:
    """{pass: [Launch, ...]} for one op, dtype, affine layout and width, by calling the launchers."""
    family, activation, params_per_row = OPS[op]
    _, has_w, has_b, fp32_params = affine
    x_dtype = DTYPES[dtype]
    p_dtype = torch.float32 if fp32_params else x_dtype
    meta = torch.device("meta")  # shapes and dtypes without memory; fresh tensors look 16-byte aligned
    channels = CHANNELS_FIRST_C if params_per_row else n
    x = torch.empty(rows, n, dtype=x_dtype, device=meta)
    dy = torch.empty(rows, n, dtype=x_dtype, device=meta)
    w = torch.empty(channels, dtype=p_dtype, device=meta) if has_w else None
    b = torch.empty(channels, dtype=p_dtype, device=meta) if has_b else None
    db_dtype = p_dtype if has_b else None
    out = {}
    if family == "rowwise":
        is_rms = op == "rmsnorm"
        with recorder.capture(x.shape) as out["fwd"]:
            # Whatever the forward saves for the backward (its results after y) goes back in as is.
            _, *saved = launchers.rowwise_norm_forward(x, w, b, 1e-5, is_rms=is_rms)
        with recorder.capture(x.shape) as out["infer"]:  # under torch.no_grad(): no statistics stored
            launchers.rowwise_norm_forward(x, w, b, 1e-5, is_rms=is_rms, with_stats=False)
        with recorder.capture(x.shape) as out["bwd"]:
            launchers.rowwise_norm_backward(dy, x, w, *saved, is_rms=is_rms, compute_dw=has_w, db_dtype=db_dtype)
    else:
        alpha = torch.empty(1, dtype=p_dtype, device=meta)
        shift = torch.empty(1, dtype=p_dtype, device=meta) if activation == "erf" else None
        common = dict(activation=activation, channels=channels, params_per_row=params_per_row)
        with recorder.capture(x.shape) as out["fwd"]:
            launchers.pointwise_forward(x, alpha, shift, w, b, **common)
        with recorder.capture(x.shape) as out["bwd"]:
            launchers.pointwise_backward(dy, x, alpha, shift, w, **common, compute_dw=has_w, db_dtype=db_dtype)
    return out


def fused_launches_of(recorder: LaunchRecorder, op: str, mode: str, dtype: str, stream: str, affine: tuple, n: int,
                      rows: int, x_hat_dtype: str | None = None) -> dict:
    """{pass: [Launch, ...]} for one fused residual op (normzoo.fused): activation h in ``dtype``,
    residual stream x and the sum s in ``stream``, every norm with the ``affine`` layout, rounding
    x̂ as ``x_hat_dtype`` says (RMSNorm; y and dy in that norm's dtype). Runs the
    ops layer's own forward and backward implementation with the Triton launchers, so the
    launches (and their dtypes, dres and dx2 copies) are the ones a training step makes; the
    backward gets both incoming gradients, dy (h's dtype) and ds (the stream's)."""
    from normzoo import fused  # the ops layer; imported here so the plain sweep does not need it

    _, has_w, has_b, fp32_params = affine
    h_dtype, x_dtype = DTYPES[dtype], DTYPES[stream]
    p_dtype = torch.float32 if fp32_params else h_dtype
    meta = torch.device("meta")
    pointwise = OPS[op][0] == "pointwise"

    def layer():  # (weight, bias, alpha, shift), as normzoo.fused.describe returns them
        param = lambda present, size=n: torch.empty(size, dtype=p_dtype, device=meta) if present else None  # noqa: E731
        return (param(has_w), param(has_b), param(pointwise, 1), param(op == "derf", 1))

    none = (None, None, None, None)
    h = torch.empty(rows, n, dtype=h_dtype, device=meta)
    x = torch.empty(rows, n, dtype=x_dtype, device=meta)
    p1, p2 = layer(), (layer() if mode == "norm_add_norm" else none)
    scale, eps = 1.0, 1e-5
    out = {}
    with recorder.capture(h.shape) as out["fwd"]:
        y, s, stats1, stats2 = fused._fused_forward(h, x, p1, p2, op, mode, eps, eps, scale, None, True, 0.0,
                                                    fused._ROUNDING[x_hat_dtype])
    if not pointwise:  # under torch.no_grad(): the row-wise kernel stores no statistics (DyT/Derf keep none)
        with recorder.capture(h.shape) as out["infer"]:
            fused._fused_forward(h, x, p1, p2, op, mode, eps, eps, scale, None, True, 0.0,
                                 fused._ROUNDING[x_hat_dtype], False, False)
    dy = torch.empty(rows, n, dtype=y.dtype, device=meta) if mode != "norm_add" else None  # in y's dtype
    ds = torch.empty(rows, n, dtype=s.dtype, device=meta)
    needs = (p1[0] is not None, p2[0] is not None)
    db_dtypes = tuple(p[1].dtype if p[1] is not None else None for p in (p1, p2))
    with recorder.capture(h.shape) as out["bwd"]:
        fused._fused_backward(dy, ds, h, s, p1, p2, stats1, stats2, op, mode, scale, x_dtype, h_dtype, needs,
                              db_dtypes, True, 0.0, fused._ROUNDING[x_hat_dtype])
    return out


def switch_launches_of(recorder: LaunchRecorder, op: str, switch: str, dtype: str, affine: tuple, n: int,
                       rows: int) -> tuple[dict, dict] | None:
    """``({pass: [Launch, ...]}, twin's)`` for one model switch (SWITCHES) of LayerNorm/RMSNorm, and
    for its plain twin (the same calls with the switch off, y in the same dtype), through the ops
    layer's own forward and backward (normzoo.ops._rowwise_forward / _rowwise_backward) with the
    Triton launchers. None where the switch does not reach the kernel (x̂ rounding of an fp32 input)."""
    from normzoo import ops  # the ops layer; imported here so the plain sweep does not need it

    _, x_hat_dtype, weight_offset = SWITCHES[switch]
    _, has_w, has_b, fp32_params = affine
    x_dtype = DTYPES[dtype]
    p_dtype = torch.float32 if fp32_params else x_dtype
    meta = torch.device("meta")
    x = torch.empty(rows, n, dtype=x_dtype, device=meta)
    w = torch.empty(n, dtype=p_dtype, device=meta) if has_w else None
    b = torch.empty(n, dtype=p_dtype, device=meta) if has_b else None
    round_x_hat, out_dtype = ops._x_hat_rounding(x_hat_dtype, x, w) if x_hat_dtype else (0, x_dtype)
    if round_x_hat == 0 and weight_offset == 0.0:
        return None
    is_rms = op == "rmsnorm"
    db_dtype = p_dtype if has_b else None
    per_call = []
    for offset, code in ((weight_offset, round_x_hat), (0.0, 0)):  # the switch, then its plain twin
        out = {}
        with recorder.capture(x.shape) as out["fwd"]:
            y, stats = ops._rowwise_forward(x, w, b, 1e-5, is_rms, True, offset, code, out_dtype)
        with recorder.capture(x.shape) as out["infer"]:
            ops._rowwise_forward(x, w, b, 1e-5, is_rms, True, offset, code, out_dtype, False)
        dy = torch.empty(rows, n, dtype=y.dtype, device=meta)  # the gradient of y, in y's dtype
        with recorder.capture(x.shape) as out["bwd"]:
            ops._rowwise_backward(dy, x, w, stats, is_rms, has_w, db_dtype, True, offset, code)
        per_call.append(out)
    return per_call[0], per_call[1]


@dataclasses.dataclass(frozen=True)
class HeadwiseCase:
    """One head-wise launch pair: ``op`` "qknorm-rms", "qknorm-l2", "scalenorm" or "crmsnorm"."""

    op: str
    dtype: str
    affine: str  # "w" / "w-fp32": a weight per column; "scale": one element; "none"
    n: int  # the first tensor's (q's) row width
    heads: tuple[int, int] | None = None  # QK-norm per head: q's and k's heads in one fused qkv row
    k_n: int | None = None  # QK-norm over all heads: k's width

    @property
    def norm(self) -> str:
        return {"scalenorm": "l2", "crmsnorm": "crms"}.get(self.op, self.op.rsplit("-", 1)[-1])

    @property
    def layout(self) -> str | None:
        if self.heads:
            return f"q {self.heads[0]} + k {self.heads[1]} heads of a fused qkv"
        if self.k_n:
            return f"q {self.n} + k {self.k_n} wide, all heads of a fused qkv"
        return None


def headwise_cases(ops: list[str], dtypes: list[str], hidden: list[int], crms_hidden: list[int],
                   head_dims: list[int], qk_dtypes: list[str]) -> list[HeadwiseCase]:
    cases = []
    if "qknorm" in ops:
        for dtype in qk_dtypes:
            for d in head_dims:  # per head (Qwen3): weights (head_dim,), in the activation's dtype or fp32
                cases += [HeadwiseCase("qknorm-rms", dtype, affine, d, heads=QK_HEADS)
                          for affine in ("w", "w-fp32") if not (affine == "w-fp32" and dtype == "fp32")]
            for n, k_n in QK_ALL_HEADS:  # over all heads (OLMo 2): weights (H·head_dim,)
                cases.append(HeadwiseCase("qknorm-rms", dtype, "w", n, k_n=k_n))
            for d in head_dims:  # the QK-norm paper: q scaled by a learned g, k by nothing
                cases.append(HeadwiseCase("qknorm-l2", dtype, "scale", d, heads=QK_HEADS))
    for dtype in dtypes:
        if "scalenorm" in ops:
            cases += [HeadwiseCase("scalenorm", dtype, "scale", n) for n in hidden]
        if "crmsnorm" in ops:
            cases += [HeadwiseCase("crmsnorm", dtype, "none", n) for n in sorted(set(hidden) | set(crms_hidden))]
    return cases


def headwise_launches_of(recorder: LaunchRecorder, case: HeadwiseCase, rows: int) -> dict:
    """{pass: [Launch, ...]} for one head-wise case, through the ops layer's own forward and
    backward (normzoo.ops._headwise_forward / _headwise_backward) with the Triton launchers. QK-norm:
    ``rows`` tokens (as (2, rows/2) batch and sequence), q and k views of one fused qkv projection
    read where they lie, both in one launch; the others: (rows, N) rows."""
    from normzoo import ops

    x_dtype = DTYPES[case.dtype]
    p_dtype = torch.float32 if case.affine.endswith("-fp32") else x_dtype
    meta = torch.device("meta")
    batch = 2 if rows % 2 == 0 else 1
    if case.heads:
        hq, hk = case.heads
        qkv = torch.empty(batch, rows // batch, hq + 2 * hk, case.n, dtype=x_dtype, device=meta)
        a, b = qkv[:, :, :hq], qkv[:, :, hq:hq + hk]
    elif case.k_n:
        qkv = torch.empty(batch, rows // batch, case.n + 2 * case.k_n, dtype=x_dtype, device=meta)
        a, b = qkv[..., :case.n], qkv[..., case.n:case.n + case.k_n]
    else:
        a, b = torch.empty(rows, case.n, dtype=x_dtype, device=meta), None
    if case.affine == "scale":  # one g, for q (or ScaleNorm's input) alone
        wa, wb = torch.empty(1, dtype=p_dtype, device=meta), None
    elif case.affine == "none":
        wa = wb = None
    else:
        wa = torch.empty(a.shape[-1], dtype=p_dtype, device=meta)
        wb = torch.empty(b.shape[-1], dtype=p_dtype, device=meta)
    shapes = [t.shape for t in (a, b) if t is not None]
    shapes += [(math.prod(shape[:-1]), shape[-1]) for shape in shapes]  # the 2-D gradients the backward gets
    eps = 1e-6 if case.op.startswith("qknorm") else 1e-5
    out = {}
    with recorder.capture(*shapes) as out["fwd"]:
        ya, yb = ops._headwise_forward(a, wa, b, wb, eps, case.norm, True)
    dya = torch.empty(ya.shape, dtype=ya.dtype, device=meta)
    dyb = torch.empty(yb.shape, dtype=yb.dtype, device=meta) if yb is not None else None
    with recorder.capture(*shapes) as out["bwd"]:
        ops._headwise_backward(dya, a, wa, dyb, b, wb, eps, case.norm, True, wa is not None, wb is not None)
    return out


# ------------------------------------------------------------------------------------------------
# Compiling (in worker processes) and reading the results back
# ------------------------------------------------------------------------------------------------

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK (spilled registers), SHARED (static + the 1 KB reservation) and LOCAL of the
    cubin's kernel, as cuobjdump reads them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_BIN / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


_PARAM = re.compile(r"\[\s*\w+_param_(\d+)\s*\]")
_REG = re.compile(r"%[a-z]+\d+")
_PREDICATE = re.compile(r"^@!?%p\d+\s+")
_WIDTH = re.compile(r"^[bsuf](\d+)$")
_ADDRESS = re.compile(r"\[\s*(%[a-z]+\d+)")
# Instructions without a destination register an address could be computed from.
_NO_DEST = ("st.", "cp.", "red.", "bra", "bar.", "ret", "exit", "fence", "membar", "mbarrier", "prefetch", "trap")


def _global_access(opcode: str, operands: str):
    """(kind, bits, address register) for an instruction that touches global memory, else None.
    kind: "ld"/"st" (ld.global, st.global), "atom" (atom/red), "cp.async" (a global -> shared
    copy), "bulk" (cp.async.bulk / TMA, whose width is not in the instruction: bits 0)."""
    parts = opcode.split(".")
    addresses = _ADDRESS.findall(operands)
    if parts[0] in ("ld", "st", "atom", "red") and len(parts) > 1 and parts[1] == "global":
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        bits = next((int(w.group(1)) for p in reversed(parts) if (w := _WIDTH.match(p))), 0)
        kind = parts[0] if parts[0] in ("ld", "st") else "atom"
        return kind, vector * bits, addresses[0] if addresses else None
    if opcode.startswith("cp.async") and "global" in opcode:
        # State spaces read destination first: ".shared.global" copies global -> shared.
        spaces = [p.split("::")[0] for p in parts if p.split("::")[0] in ("shared", "global")]
        address = addresses[spaces.index("global")] if len(addresses) > spaces.index("global") else None
        if "bulk" in parts:
            return "bulk", 0, address
        size = operands.split(",")[2].strip() if operands.count(",") >= 2 else "0"
        return "cp.async", int(size, 0) * 8 if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", size) else 0, address
    return None


def global_accesses(ptx: str, param_names: list[str]) -> dict:
    """{pointer argument: {kind: {bits: count}}}: every global load, store, atomic and async copy in
    the PTX (a static count; see _global_access), its width in bits, and the kernel argument its
    address is computed from.

    ``param_names`` are the arguments that are PTX parameters, in order (constexprs are not).
    The address register is traced back through every instruction that defines a register to
    the ``ld.param`` it starts from; loaded values are not followed (they are data, not
    addresses). An address reaching several pointer arguments, or none, is reported under "?".
    """
    sources: dict[str, set] = {}  # register -> registers and ("param", i) it is computed from
    accesses = []  # (kind, bits, address register)
    for raw in ptx.splitlines():
        line = raw.split("//")[0].strip().rstrip(";")
        if not line or line.startswith((".", "}", "{")) or line.endswith(":"):
            continue  # directives, braces, labels
        opcode, _, operands = _PREDICATE.sub("", line).replace("\t", " ").partition(" ")
        access = _global_access(opcode, operands)
        if access:
            accesses.append(access)
        if opcode.startswith(_NO_DEST):
            continue
        vector_dest = re.match(r"\s*\{([^}]*)\}", operands)
        dests = _REG.findall(vector_dest.group(1)) if vector_dest else _REG.findall(operands)[:1]
        if not dests:
            continue
        if opcode.startswith("ld.param"):
            param = _PARAM.search(operands)
            srcs = {("param", int(param.group(1)))} if param else set()
        elif opcode.startswith(("ld.", "atom.")):
            srcs = set()  # a loaded value is data, not an address
        else:
            rest = operands[vector_dest.end():] if vector_dest else operands.split(",", 1)[-1]
            srcs = set(_REG.findall(rest))
        for dest in dests:
            sources.setdefault(dest, set()).update(srcs)

    pointer_params = {i for i, name in enumerate(param_names) if name.startswith("*")}
    reach_cache: dict[str, frozenset] = {}

    def params_reached(register: str) -> frozenset:
        if register in reach_cache:
            return reach_cache[register]
        seen, stack, found = set(), [register], set()
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            for src in sources.get(r, ()):
                if isinstance(src, tuple):
                    found.add(src[1])
                else:
                    stack.append(src)
        reach_cache[register] = frozenset(found)
        return reach_cache[register]

    result: dict = {}
    for kind, bits, address in accesses:
        pointers = params_reached(address) & pointer_params if address else set()
        owner = param_names[next(iter(pointers))].split(":", 1)[1] if len(pointers) == 1 else "?"
        counts = result.setdefault(owner, {}).setdefault(kind, {})
        counts[bits] = counts.get(bits, 0) + 1
    return result


def describe_error(exc: BaseException) -> str:
    """One line: the error's first line and, for a chain (Triton's CompilationError wraps one per
    inlined @jit function), the innermost one's function and its last line, which says what failed."""
    def lines(e):
        return [line.strip() for line in str(e).strip().splitlines() if line.strip()]

    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = f"{type(exc).__name__}: {(lines(exc) or [''])[0]}"
    if root is not exc:
        where = next((line for line in lines(root) if line.startswith("def ")), "")
        text += f" ... in {where.split('(')[0].removeprefix('def ')}: " if where else " ... "
        text += (lines(root) or [type(root).__name__])[-1]
    return text[:400]


def compile_one(job: dict) -> dict:
    """Compile one specialization (runs in a worker process) and read its resources back."""
    module_name, qualname = job["kernel"].rsplit(".", 1)
    fn = getattr(importlib.import_module(module_name), qualname)
    target = GPUTarget("cuda", job["arch"], 32)
    try:
        kernel = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]), target=target,
                                options=job["options"])
        usage = resource_usage(kernel.asm["cubin"])
    except Exception as exc:  # reported per variant; the run then fails
        return {"error": describe_error(exc)}
    # PTX parameters: the non-constexpr arguments, in order ("type:name" so pointers are known).
    param_names = [f"{ty}:{name}" for name, ty in job["signature"].items() if ty != "constexpr"]
    return {
        "regs": usage.get("REG", 0),
        # Triton kernels allocate no local arrays: any stack frame or local memory is spilled registers.
        "spill_bytes": usage.get("STACK", 0) + usage.get("LOCAL", 0),
        "smem_dynamic": kernel.metadata.shared,
        "smem_static": usage.get("SHARED", 0),
        "accesses": global_accesses(kernel.asm["ptx"], param_names),
    }


def compile_all(launches: list[Launch], arch: int, jobs: int) -> dict:
    """{compile key: result} for every distinct specialization, each compiled once."""
    unique = {}
    for launch in launches:
        unique.setdefault(launch.compile_key, dict(kernel=launch.kernel, signature=launch.signature,
                                                    constexprs=launch.constexprs, attrs=launch.attrs,
                                                    options=launch.options, arch=arch))
    if jobs <= 1:
        return {key: compile_one(job) for key, job in unique.items()}
    # fork: the workers inherit the imported kernels (and TRITON_INTERPRET unset) at no cost.
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return dict(zip(unique, pool.map(compile_one, unique.values(), chunksize=4)))


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def block_shape(constexprs: dict) -> str:
    blocks = [str(v) for k, v in constexprs.items() if k.startswith("BLOCK_")]
    return "×".join(blocks) if blocks else "-"


ACCESS_KINDS = ("ld", "cp.async", "bulk", "st", "atom")


def describe_accesses(accesses: dict) -> str:
    """ "ld 128b×4, 32b×1; st 128b×2" over every argument (width "?": a bulk copy's, not static)."""
    total = {kind: Counter() for kind in ACCESS_KINDS}
    for per_kind in accesses.values():
        for kind, counts in per_kind.items():
            total[kind].update({int(bits): n for bits, n in counts.items()})
    return "; ".join(f"{kind} " + ", ".join(f"{bits or '?'}b×{n}" for bits, n in sorted(c.items(), reverse=True))
                     for kind, c in total.items() if c) or "-"


def row_tensor_widths(accesses: dict, row_params: list[str]) -> dict:
    """{argument: narrowest access width in bits} for the (M, N) row tensors the kernel touches
    (bulk copies, whose width is not in the instruction, are left out)."""
    widths = {}
    for name in row_params:
        known = [int(bits) for counts in accesses.get(name, {}).values() for bits in counts if int(bits) > 0]
        if known:
            widths[name] = min(known)
    return widths


def build_rows(records, results, sms: int, twins: dict | None = None):
    """One report row per record; ``twins``: {record index: the plain twin's Launch} of the model
    switch variants, whose resources go into the row's "twin"."""
    rows = []
    for index, (variant, launch) in enumerate(records):
        result = results[launch.compile_key]
        consts = launch.named_constexprs
        row = dict(variant=variant.asdict(), label=variant.label, kernel=launch.name,
                   role="row" if launch.row_params else "reduce", block=block_shape(consts),
                   num_warps=launch.options["num_warps"], grid=list(launch.grid),
                   constexprs=dict(consts),
                   divisible_args=[list(launch.signature)[path[0]] for path, attr in sorted(launch.attrs.items())
                                   if attr],
                   **result)
        if variant.family != "plain":  # which tensors, in which dtypes: a fused backward makes two row
            row["row_dtypes"] = launch.row_dtypes  # launches, a switch may store y in fp32, QK-norm has four
        if "error" not in result:
            resident, limits = residency(result["regs"], result["smem_dynamic"], result["smem_static"],
                                         launch.options["num_warps"])
            programs = math.prod(launch.grid)
            widths = row_tensor_widths(result["accesses"], launch.row_params)
            row.update(resident=resident, limits=limits, programs=programs,
                       waves=round(programs / (sms * resident), 2) if resident else math.inf,
                       row_widths=widths, narrow_rows=variant.n % 16 == 0 and any(w < 128 for w in widths.values()))
            # A one-program backward (DIRECT: under 32 rows, it writes the gradients itself): ptxas
            # spilled 8 bytes in a few of these (Derf fp32 with bias, N = 64 and 16385; LayerNorm
            # add_norm N = 97). One program over a few rows stores and reloads them from L1 a few
            # times, nothing beside its launch: reported, not failed, up to SPILL_TOLERATED_BYTES.
            row["spill_tolerated"] = bool(consts.get("DIRECT")) and 0 < result["spill_bytes"] <= SPILL_TOLERATED_BYTES
            row["wide_tile"] = (variant.family in ("plain", "switch") and variant.op in heuristics.ROWWISE_OPS
                                and row["role"] == "row" and consts.get("BLOCK_N", 0) >= variant.n
                                and consts.get("BLOCK_N", 0) * DTYPES[variant.dtype].itemsize
                                > heuristics.MAX_SINGLE_TILE_BYTES)
            exception = next((e for e in RESIDENCY_EXCEPTIONS if e.matches(variant, consts)), None)
            row["low_residency"] = row["role"] == "row" and resident < MIN_RESIDENT
            row["excepted"] = (WIDE_TILE_REASON if row["wide_tile"] else exception.reason if exception else None
                               ) if row["low_residency"] else None
            # Room for MIN_RESIDENT programs per SM, but a grid (a persistent backward's) of at most
            # one per SM: not a failure of the rule, but the overlap it is for does not happen.
            row["grid_underfills"] = row["role"] == "row" and resident >= MIN_RESIDENT and programs <= sms
            # A persistent grid (the backward's: every program owns an equal run of rows) larger
            # than what is resident at once: the programs past it run as a second, partial wave and
            # nearly double the kernel's time. The launch rule's programs_per_sm must not exceed
            # the real residency.
            # (Channels-first DyT/Derf backward is not persistent: one row block per program.)
            row["tail_wave"] = (row["role"] == "row" and variant.pass_ == "bwd" and not variant.op.endswith("-cf")
                                and programs > sms * resident)
            twin = (twins or {}).get(index)
            twin_result = results.get(twin.compile_key, {}) if twin else {}
            if twin and "error" not in twin_result:
                twin_resident, twin_limits = residency(twin_result["regs"], twin_result["smem_dynamic"],
                                                       twin_result["smem_static"], twin.options["num_warps"])
                row["twin"] = dict(kernel=twin.name, block=block_shape(twin.named_constexprs),
                                   num_warps=twin.options["num_warps"], regs=twin_result["regs"],
                                   spill_bytes=twin_result["spill_bytes"], smem_dynamic=twin_result["smem_dynamic"],
                                   resident=twin_resident, limits=twin_limits,
                                   row_widths=row_tensor_widths(twin_result["accesses"], twin.row_params),
                                   same_kernel=twin.compile_key == launch.compile_key)
        rows.append(row)
    return rows


COLUMNS = [("variant", 40), ("kernel", 22), ("block", 9), ("warps", 5), ("regs", 4), ("spill", 5), ("smem", 6),
           ("res/SM", 13), ("grid", 8), ("waves", 6), ("row tensors", 15), ("global accesses (PTX)", 0)]


def cells(row) -> list[str]:
    if "error" in row:
        return [row["label"], row["kernel"], row["block"], str(row["num_warps"]), "FAILED: " + row["error"]]
    flag = ""
    if row["low_residency"]:
        flag = " (exc)" if row["excepted"] else " LOW"
    widths = row["row_widths"]
    narrow = min(widths.values()) if widths else None
    return [row["label"], row["kernel"], row["block"], str(row["num_warps"]), str(row["regs"]),
            str(row["spill_bytes"]), str(row["smem_dynamic"]), f"{row['resident']} ({','.join(row['limits'])}){flag}",
            "×".join(map(str, row["grid"])), f"{row['waves']:.1f}", "-" if narrow is None else f"min {narrow}b",
            describe_accesses(row["accesses"])]


def describe_twin(twin: dict) -> str:
    """ "72 regs, 0 B spill, 3/SM (regs)": a model switch's plain twin (the same kernel when the switch
    compiled to nothing new)."""
    same = ", the same kernel" if twin["same_kernel"] else ""
    return (f"{twin['regs']} regs, {twin['spill_bytes']} B spill, {twin['resident']}/SM "
            f"({','.join(twin['limits'])}){same}")


def describe_row_dtypes(row) -> str:
    """ "X bf16, R fp32, S fp32": the distinct (M, N) tensors a fused variant's launch passes."""
    return ", ".join(f"{name} {dtype}" for name, dtype in row.get("row_dtypes", {}).items())


def print_table(rows):
    print("  ".join(f"{name:{width}s}" for name, width in COLUMNS).rstrip())
    for row in rows:
        line = "  ".join(f"{c:{w}s}" for c, (_, w) in zip(cells(row), COLUMNS)).rstrip()
        twin = f"  [plain twin: {describe_twin(row['twin'])}]" if row.get("twin") else ""
        print(line + (f"  [{describe_row_dtypes(row)}]" if row.get("row_dtypes") else "") + twin)


def count_rows(rows, compiled: int, launch_errors: list[str]) -> dict:
    main = [r for r in rows if r["role"] == "row"]
    return dict(
        variants=len(main), reduce_launches=len(rows) - len(main), kernels_compiled=compiled,
        failed=sum("error" in r for r in rows) + len(launch_errors),
        spills=sum(r.get("spill_bytes", 0) > 0 and not r.get("spill_tolerated") and not r.get("wide_tile")
                   for r in rows),
        spills_tolerated=sum(bool(r.get("spill_tolerated")) for r in rows),
        below_min_resident=sum(bool(r.get("low_residency")) and not r.get("excepted") for r in rows),
        excepted=sum(bool(r.get("excepted")) for r in rows),
        narrow_row_access=sum(bool(r.get("narrow_rows")) for r in rows),
        grid_underfills=sum(bool(r.get("grid_underfills")) for r in rows),
        tail_waves=sum(bool(r.get("tail_wave")) for r in rows),
        wide_tiles=sum(bool(r.get("wide_tile")) for r in rows),
    )


def verdicts(counts: dict) -> str:
    return (f"{counts['failed']} failed to compile, {counts['spills']} spill, "
            f"{counts['below_min_resident']} below {MIN_RESIDENT} resident programs/SM "
            f"({counts['excepted']} excepted), {counts['narrow_row_access']} with row accesses under 128 bits, "
            f"{counts['tail_waves']} persistent grids larger than one wave, "
            f"{counts['grid_underfills']} with room for {MIN_RESIDENT}+ but a grid of one program per SM"
            + (f", {counts['spills_tolerated']} one-program backwards with a tolerated spill of at most "
               f"{SPILL_TOLERATED_BYTES} B" if counts.get("spills_tolerated") else "")
            + (f", {counts['wide_tiles']} wide tiles a measured table chose (spills and residency reported, not "
               "failed)" if counts.get("wide_tiles") else ""))


def summarize(rows, arch: int, compiled: int, launch_errors: list[str]) -> tuple[str, dict]:
    """The plain norms' line and counts (row and reduce launches of the single-op launchers)."""
    counts = count_rows(rows, compiled, launch_errors)
    line = (f"sm_{arch}: {counts['variants']} variants + {counts['reduce_launches']} reduce launches "
            f"({compiled} distinct kernels compiled), " + verdicts(counts))
    return line, counts


def summarize_fused(rows, arch: int, compiled: int, new: int, launch_errors: list[str]) -> tuple[str, dict]:
    """The fused residual ops' line and counts (their own rows: a second line, not folded into the first)."""
    counts = count_rows(rows, compiled, launch_errors)
    line = (f"sm_{arch} fused residual ops: {counts['variants']} row launches + {counts['reduce_launches']} reduce "
            f"launches ({compiled} distinct kernels compiled, {new} of them not among the plain norms'), "
            + verdicts(counts))
    return line, counts


def summarize_switches(rows, arch: int, compiled: int, new: int, launch_errors: list[str]) -> tuple[str, dict]:
    """The model switches' line and counts, with their registers against their plain twins'."""
    counts = count_rows(rows, compiled, launch_errors)
    deltas = [r["regs"] - r["twin"]["regs"] for r in rows if r["role"] == "row" and r.get("twin")]
    counts["regs_vs_twin"] = [min(deltas), max(deltas)] if deltas else None
    versus = (f"registers against their plain twins {min(deltas):+d} to {max(deltas):+d}, " if deltas else "")
    line = (f"sm_{arch} model switches (x_hat rounding, weight offset): {counts['variants']} row launches + "
            f"{counts['reduce_launches']} reduce launches ({compiled} distinct kernels compiled, {new} of them not "
            f"among the plain norms'), " + versus + verdicts(counts))
    return line, counts


def summarize_headwise(rows, arch: int, compiled: int, launch_errors: list[str]) -> tuple[str, dict]:
    """The head-wise norms' line and counts (kernels of their own)."""
    counts = count_rows(rows, compiled, launch_errors)
    line = (f"sm_{arch} head-wise norms (QK-norm, ScaleNorm, CRMSNorm): {counts['variants']} row launches + "
            f"{counts['reduce_launches']} reduce launches ({compiled} distinct kernels compiled), " + verdicts(counts))
    return line, counts


def source_version() -> str:
    """The commit the kernels were compiled from ("-dirty": with uncommitted changes), if known."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def row_family(row) -> str:
    """A report row's variant family (Variant.family): "plain", "fused", "switch" or "headwise"."""
    variant = row["variant"]
    if variant.get("mode"):
        return "fused"
    if variant.get("switch"):
        return "switch"
    return "headwise" if variant["op"].split("-")[0] in HEADWISE_OPS else "plain"


def write_markdown(path: Path, rows, summary: str, header: dict, fused_summary: str | None = None,
                   switch_summary: str | None = None, headwise_summary: str | None = None):
    def table(selected):
        names = [name for name, _ in COLUMNS]
        fused = any("row_dtypes" in row for row in selected)  # then: which tensors each launch passes
        twins = any("twin" in row for row in selected)  # then: the plain twin's resources
        names += (["row tensor dtypes"] if fused else []) + (["plain twin"] if twins else [])
        out = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
        for row in selected:
            c = cells(row)
            c = c + [""] * (len(COLUMNS) - len(c)) + ([describe_row_dtypes(row)] if fused else [])
            c += [describe_twin(row["twin"]) if "twin" in row else ""] if twins else []
            out.append("| " + " | ".join(x.replace("|", "/") for x in c) + " |")
        return out

    def name(row) -> str:
        return f"{row['label']} `{row['kernel']}`" + (f" [{describe_row_dtypes(row)}]" if "row_dtypes" in row else "")

    main = [r for r in rows if r["role"] == "row"]
    low = [r for r in main if r.get("low_residency") and not r.get("excepted")]
    lines = [
        f"# compile_check: normzoo kernels compiled for sm_{header['arch']}",
        "",
        f"Generated by `python -m benchmarks.compile_check {header['argv']}` from {header['source']} "
        f"(Triton {header['triton']}). "
        "Nothing here ran on a GPU: each launch was specialized by Triton's own launch code (16-byte-aligned "
        "pointers and ints divisible by 16 get `tt.divisibility=16`, ints equal to 1 become constants) and "
        "compiled with its ptxas.",
        "",
        f"- Shape: M = {header['M']} rows, N as listed; channels-first DyT/Derf (`-cf`) view (B·C, S) rows with "
        f"C = {CHANNELS_FIRST_C}, N = S. Parameters (weight, bias, alpha, shift) in the input's dtype, or fp32 "
        "where the affine layout says `-fp32`.",
        f"- Launch configs: the rules in kernels/heuristics.py for a {header['sms']}-SM GPU"
        + (f", with the measured table for `{header['gpu']}`." if header["gpu"] else " (no measured table applied)."),
        f"- Resident programs per SM: min of registers ({REGS_PER_SM} per SM, per-thread count rounded up to "
        f"{REG_UNIT_PER_THREAD}, per-warp allocation unit {REG_UNIT_PER_WARP}), shared memory "
        f"({SMEM_PER_SM // 1024} KB per SM, {SMEM_MAX_PER_PROGRAM // 1024} KB max per program, "
        f"{SMEM_RESERVED_PER_PROGRAM} B reserved per program), threads ({THREADS_PER_SM} per SM) and "
        f"{PROGRAMS_PER_SM} programs; the binding limit in parentheses. "
        f"waves = grid / ({header['sms']} × resident).",
        "- smem: Triton's dynamic shared memory per program, in bytes. spill: stack frame + local memory bytes.",
        "- Global accesses: static count in the PTX, by width: `ld`/`st` (ld.global/st.global), `cp.async` "
        "(global → shared copies), `bulk` (cp.async.bulk/TMA), `atom`. Row tensors: the narrowest access to an "
        "(M, N) tensor (x, y, dy, dx); 128 bits is 8 × 16-bit or 4 × fp32 elements.",
        "- Passes: `fwd`, `bwd`, and `infer`, the row-wise forward under `torch.no_grad()` (no statistics "
        "buffer passed, none stored: another variant of the forward kernel).",
    ] + ([
        "- Fused residual variants (`op:mode`, through normzoo.fused's own forward and backward): activation h "
        "and y in the first dtype, residual stream x and sum s in the second (`bf16/fp32`), every norm with "
        "weight and bias (RMSNorm: weight) in the activation's dtype; their backward gets both dy and ds. "
        "`rmsnorm[x_hat=input]`: RMSNorm rounding x̂ as Llama's does (to each norm's input's dtype), also with "
        "fp32 weights (`w-fp32`: y and dy then in fp32, as that norm returns).",
    ] if fused_summary else []) + ([
        "- Model switches (`op[switch]`, through normzoo.ops' own forward and backward): `x_hat=input` (Llama: "
        "x̂ rounded to x's dtype, `ROUND_X_HAT` \"input\"; with an fp32 weight y is fp32), `x_hat=weight` (T5: "
        "to the 16-bit weight's, \"weight\"), `offset` (Gemma's 1 + w: `w_offset` passed, not None). Each beside its plain twin: the same "
        "launch with the switch off and y in the same dtype.",
    ] if switch_summary else []) + ([
        f"- Head-wise norms (kernels/headwise_norm.py, through normzoo.ops' own forward and backward): QK-norm "
        f"over {header['M']} tokens, q and k views of one fused qkv projection in one launch (per head: "
        f"{QK_HEADS[0]} q and {QK_HEADS[1]} k heads, M = tokens × heads; or over all heads), `qknorm-rms` with "
        "weights, `qknorm-l2` with q's one-element scale g; ScaleNorm (`scale`: g) and CRMSNorm (no parameters) "
        f"over M = {header['M']} rows. One tile per row at every width.",
    ] if headwise_summary else []) + [
        "",
        f"**{summary}**",
        "",
    ] + [text for line in (fused_summary, switch_summary, headwise_summary) if line for text in (f"**{line}**", "")]
    if header["launch_errors"] or any("error" in r for r in rows):
        lines += ["## Failed", ""] + [f"- launch: {error}" for error in header["launch_errors"]]
        lines += [f"- {name(r)}: {r['error']}" for r in rows if "error" in r] + [""]
    spilled = [r for r in rows if r.get("spill_bytes")]
    lines += ["## Spills", ""] + ([f"- {name(r)}: {r['spill_bytes']} B, {r['regs']} regs"
                                   + (" (a one-program backward: tolerated)" if r.get("spill_tolerated") else "")
                                   + (" (a measured table's wide tile: reported)" if r.get("wide_tile") else "")
                                   for r in spilled] or ["None."]) + [""]
    lines += [f"## Row kernels below {MIN_RESIDENT} resident programs per SM (not excepted)", ""]
    lines += table(low) if low else ["None."]
    lines += ["", "## Excepted (RESIDENCY_EXCEPTIONS in benchmarks/compile_check.py)", ""]
    for exception in RESIDENCY_EXCEPTIONS:
        matched = [f"{r['label']}" + (f" [{describe_row_dtypes(r)}]" if "row_dtypes" in r else "")
                   + f" ({r['regs']} regs)" for r in main if r.get("excepted") == exception.reason]
        lines.append(f"- {exception.reason}: " + ("; ".join(matched) if matched else "no variant needs it"))
    lines += [] if RESIDENCY_EXCEPTIONS else ["None."]
    wide = [f"{r['label']} ({r['regs']} regs)" for r in main if r.get("excepted") == WIDE_TILE_REASON]
    lines += [f"- {WIDE_TILE_REASON}: " + "; ".join(wide)] if wide else []
    narrow = [r for r in main if r.get("narrow_rows")]
    lines += ["", "## Row tensors accessed narrower than 128 bits although N is a multiple of 16", ""]
    if any(re.match(r"(dyt|derf):norm_add_norm bwd", r["label"]) for r in narrow):
        lines += ["DyT/Derf norm_add_norm's one-pass backward runs 4 values a thread (64-bit accesses in 16-bit) by "
                  "rule: at 8 it took 162-255 registers, 2-3 four-warp programs per SM (heuristics._elementwise_rule).",
                  ""]
    lines += [f"- {name(r)}: " + ", ".join(f"{k} {v}b" for k, v in r["row_widths"].items())
              for r in narrow] or ["None."]
    tails = [r for r in main if r.get("tail_wave")]
    lines += ["", "## Persistent backward grids larger than one wave (programs > SMs × resident)", ""]
    lines += table(tails) if tails else ["None."]
    underfilled = [r for r in main if r.get("grid_underfills")]
    lines += ["", f"## Row kernels with room for {MIN_RESIDENT}+ programs per SM but a grid of at most one per SM "
              f"(≤ {header['sms']} programs; a warning, not a failure)", ""]
    lines += table(underfilled) if underfilled else ["None."]
    lines += ["", "## Row and elementwise kernels", ""] + table([r for r in main if row_family(r) == "plain"])
    fused = [r for r in main if row_family(r) == "fused"]
    if fused:
        lines += ["", "## Fused residual variants (normzoo.fused: the norm and the residual add next to it)", "",
                  "Label `op:mode pass activation/stream affine N`. Forward: one launch (`RES_MODE` add_norm, "
                  "norm_add or norm_add_norm). Backward: every row launch `_fused_backward` makes for incoming dy "
                  "and ds, in order (norm_add_norm: one pass for both norms where the row fits one fused tile, else "
                  "N2's, with DRES and an fp32 DX2 for a 16-bit stream, then N's); "
                  "the last column names the distinct (M, N) tensors each passes.", ""] + table(fused)
    switched = [r for r in main if row_family(r) == "switch"]
    if switched:
        lines += ["", "## Model switches against their plain twins (x̂ rounding, weight offset)", "",
                  "Label `op[switch] pass dtype affine N`. The last column: the same launch with the switch off "
                  "(`round_x_hat=0` with y in the same dtype, `weight_offset=0`).", ""] + table(switched)
    headwise = [r for r in main if row_family(r) == "headwise"]
    if headwise:
        lines += ["", "## Head-wise norms (QK-norm, ScaleNorm, CRMSNorm: kernels/headwise_norm.py)", "",
                  "Label `op pass dtype affine N (layout)`: QK-norm's N is q's width (head_dim per head); its "
                  "launches take q's rows (XA, YA, DYA, DXA) and k's (XB, ...) in one grid.", ""] + table(headwise)
    lines += ["", "## Reduce launches (column sums of the backward's partials; residency not judged)", ""]
    lines += table([r for r in rows if r["role"] != "row"])
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_check", description=__doc__.split("\n\n")[0])
    # Residency, waves and the verdicts use Hopper's per-SM limits (REGS_PER_SM, SMEM_PER_SM,
    # THREADS_PER_SM): another architecture would be judged against the wrong ones.
    p.add_argument("--arch", type=int, default=90, choices=[90], help="compute capability: 90 (H100/H200) only")
    p.add_argument("--hidden", nargs="+", type=positive_int, default=DEFAULT_HIDDEN, help="row widths N")
    p.add_argument("--rows", type=positive_int, default=32768, help="rows M (grid sizes and the backward's row split); "
                                                          "QK-norm: tokens, each a row per head")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES,
                   help="infer: the forward under torch.no_grad(), which keeps no statistics for a backward "
                        "(row-wise norms: another variant of their forward kernel; DyT, Derf and the head-wise "
                        "norms store none either way, and have no infer variants)")
    p.add_argument("--fused-modes", nargs="*", default=list(FUSED_MODES), choices=FUSED_MODES,
                   help="fused residual modes to compile (normzoo.fused; none: --fused-modes alone), for the "
                        "--ops among " + ", ".join(FUSED_OPS))
    p.add_argument("--fused-hidden", nargs="+", type=positive_int, default=FUSED_HIDDEN,
                   help="row widths N of the fused "
                   "variants")
    p.add_argument("--fused-dtypes", nargs="+", default=["bf16"], choices=list(DTYPES),
                   help="activation (h, y) dtypes of the fused variants")
    p.add_argument("--fused-streams", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES),
                   help="residual stream (x) and sum (s) dtypes of the fused variants")
    p.add_argument("--fused-x-hat", nargs="*", default=list(FUSED_X_HAT), choices=["input", "weight"],
                   help="RMSNorm's x_hat_dtype to compile the fused variants with too (none: --fused-x-hat alone)")
    p.add_argument("--switches", nargs="*", default=list(SWITCHES), choices=list(SWITCHES),
                   help="model switches of LayerNorm/RMSNorm to compile beside their plain twins (none: --switches "
                        "alone), for the --ops among layernorm, rmsnorm")
    p.add_argument("--switch-hidden", nargs="+", type=positive_int, default=SWITCH_HIDDEN,
                   help="row widths N of the model "
                   "switch variants")
    p.add_argument("--switch-dtypes", nargs="+", default=["bf16"], choices=list(DTYPES),
                   help="input dtypes of the model switch variants (x̂ rounding applies to 16-bit inputs only)")
    p.add_argument("--headwise", nargs="*", default=list(HEADWISE_OPS), choices=HEADWISE_OPS,
                   help="head-wise norms to compile (kernels/headwise_norm.py; none: --headwise alone)")
    p.add_argument("--headwise-hidden", nargs="+", type=positive_int, default=HEADWISE_HIDDEN,
                   help="row widths N of ScaleNorm and CRMSNorm")
    p.add_argument("--headwise-dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES),
                   help="dtypes of ScaleNorm and CRMSNorm")
    p.add_argument("--crms-hidden", nargs="*", type=positive_int, default=CRMS_COMPRESSED,
                   help="more CRMSNorm widths: the C − 1 of a converted model of width C")
    p.add_argument("--qk-head-dims", nargs="+", type=positive_int, default=QK_HEAD_DIMS,
                   help="QK-norm's head_dim per head")
    p.add_argument("--qk-dtypes", nargs="+", default=["bf16"], choices=list(DTYPES), help="QK-norm's q and k dtype")
    p.add_argument("--sms", type=positive_int, default=132, help="SM count the launch rules see (H100 SXM / H200: 132)")
    table = p.add_mutually_exclusive_group()
    table.add_argument("--gpu", default=None, help="apply this GPU's measured table (kernels/configs), e.g. "
                                                   "NVIDIA-H100-80GB-HBM3; default: the rules alone")
    table.add_argument("--table", type=Path, default=None,
                   help="apply this table file instead (a benchmarks.tune output not yet under kernels/configs)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="compile processes (default: one per core, at most 8)")
    p.add_argument("--out", type=Path, default=None, help="also write OUT.md and OUT.json")
    p.add_argument("--quiet", action="store_true", help="print only flagged variants and the summary")
    args = p.parse_args(argv)

    start = time.perf_counter()
    tables = getattr(heuristics, "_tables", dict)()
    if args.table:  # the file's entries alone, under its GPU's name (a committed table of that name is set aside)
        gpu, configs = json_argument(p, "--table", args.table, "a launch table",
                                     lambda data: (data["gpu"], dict(data["configs"])))
        args.gpu, tables[gpu] = gpu, {}
        for key, entry in configs.items():
            try:
                heuristics.set_tuned(args.gpu, key, entry)
            except (ValueError, TypeError, AttributeError) as e:  # an entry the kernels would refuse too
                p.error(f"--table {args.table}: entry {key}: {e}")
    if args.gpu and args.gpu not in tables:  # (a report would name a table it never applied)
        print(f"no measured table for {args.gpu!r} in kernels/configs (have: {sorted(tables) or 'none'})",
              file=sys.stderr)
        return 2
    recorder = LaunchRecorder(GPUTarget("cuda", args.arch, 32), args.sms, args.gpu)
    records, launch_errors, fused_launch_errors, switch_launch_errors, headwise_launch_errors = [], [], [], [], []
    twins = {}  # record index -> the plain twin's Launch (model switches)
    with recorder.installed():
        for dtype in args.dtypes:
            for n in args.hidden:
                for op in args.ops:
                    for affine in affine_layouts(op, dtype):
                        try:
                            per_pass = launches_of(recorder, op, dtype, affine, n, args.rows)
                        except Exception as exc:  # a launcher that no longer accepts these arguments
                            launch_errors.append(f"{op} {dtype} {affine[0]} N={n}: {type(exc).__name__}: {exc}")
                            continue
                        for pass_ in args.passes:
                            variant = Variant(op, pass_, dtype, affine[0], n, args.rows)
                            records += [(variant, launch) for launch in per_pass.get(pass_, ())]
        for dtype, stream, n, op, mode in itertools.product(args.fused_dtypes, args.fused_streams, args.fused_hidden,
                                                            [op for op in args.ops if op in FUSED_OPS],
                                                            args.fused_modes):
            affine = FUSED_AFFINE.get(op, FUSED_AFFINE_DEFAULT)
            try:
                per_pass = fused_launches_of(recorder, op, mode, dtype, stream, affine, n, args.rows)
            except Exception as exc:
                fused_launch_errors.append(f"{op}:{mode} {dtype}/{stream} {affine[0]} N={n}: "
                                           f"{type(exc).__name__}: {exc}")
                continue
            for pass_ in args.passes:
                variant = Variant(op, pass_, dtype, affine[0], n, args.rows, mode, stream)
                records += [(variant, launch) for launch in per_pass.get(pass_, ())]
        for x_hat, dtype, stream, n, mode, affine in itertools.product(
                args.fused_x_hat if "rmsnorm" in args.ops else (), args.fused_dtypes, args.fused_streams,
                args.fused_hidden, args.fused_modes, FUSED_X_HAT_AFFINE):
            try:
                per_pass = fused_launches_of(recorder, "rmsnorm", mode, dtype, stream, affine, n, args.rows, x_hat)
            except Exception as exc:
                fused_launch_errors.append(f"rmsnorm[x_hat={x_hat}]:{mode} {dtype}/{stream} {affine[0]} N={n}: "
                                           f"{type(exc).__name__}: {exc}")
                continue
            for pass_ in args.passes:
                variant = Variant("rmsnorm", pass_, dtype, affine[0], n, args.rows, mode, stream, f"x_hat={x_hat}")
                records += [(variant, launch) for launch in per_pass.get(pass_, ())]
        for switch, dtype, n in itertools.product(args.switches, args.switch_dtypes, args.switch_hidden):
            layouts, _, _ = SWITCHES[switch]
            for op in [op for op in args.ops if op in layouts]:
                for affine in [a for a in affine_layouts(op, dtype) if a[0] in layouts[op]]:
                    try:
                        launched = switch_launches_of(recorder, op, switch, dtype, affine, n, args.rows)
                    except Exception as exc:
                        switch_launch_errors.append(f"{op}[{switch}] {dtype} {affine[0]} N={n}: "
                                                    f"{type(exc).__name__}: {exc}")
                        continue
                    if launched is None:  # the switch does not reach the kernel (x̂ rounding of fp32)
                        continue
                    for pass_ in args.passes:
                        variant = Variant(op, pass_, dtype, affine[0], n, args.rows, switch=switch)
                        own, twin = launched[0][pass_], launched[1][pass_]
                        for i, launch in enumerate(own):
                            if len(twin) == len(own):
                                twins[len(records)] = twin[i]
                            records.append((variant, launch))
        for case in headwise_cases(args.headwise, args.headwise_dtypes, args.headwise_hidden, args.crms_hidden,
                                   args.qk_head_dims, args.qk_dtypes):
            try:
                per_pass = headwise_launches_of(recorder, case, args.rows)
            except Exception as exc:
                headwise_launch_errors.append(f"{case.op} {case.dtype} {case.affine} N={case.n}"
                                              + (f" ({case.layout})" if case.layout else "")
                                              + f": {type(exc).__name__}: {exc}")
                continue
            for pass_ in args.passes:
                variant = Variant(case.op, pass_, case.dtype, case.affine, case.n, args.rows, layout=case.layout)
                records += [(variant, launch) for launch in per_pass.get(pass_, ())]
    results = compile_all([launch for _, launch in records] + list(twins.values()), args.arch, args.jobs)
    rows = build_rows(records, results, args.sms, twins)
    members = {family: [i for i, (variant, _) in enumerate(records) if variant.family == family]
               for family in ("plain", "fused", "switch", "headwise")}
    keys = {family: {records[i][1].compile_key for i in indices} for family, indices in members.items()}
    summary, counts = summarize([rows[i] for i in members["plain"]], args.arch, len(keys["plain"]), launch_errors)
    fused_summary = fused_counts = switch_summary = switch_counts = headwise_summary = headwise_counts = None
    if members["fused"] or fused_launch_errors:
        fused_summary, fused_counts = summarize_fused([rows[i] for i in members["fused"]], args.arch,
                                                      len(keys["fused"]), len(keys["fused"] - keys["plain"]),
                                                      fused_launch_errors)
    if members["switch"] or switch_launch_errors:
        switch_summary, switch_counts = summarize_switches([rows[i] for i in members["switch"]], args.arch,
                                                           len(keys["switch"]), len(keys["switch"] - keys["plain"]),
                                                           switch_launch_errors)
    if members["headwise"] or headwise_launch_errors:
        headwise_summary, headwise_counts = summarize_headwise([rows[i] for i in members["headwise"]], args.arch,
                                                               len(keys["headwise"]), headwise_launch_errors)
    summaries = (summary, fused_summary, switch_summary, headwise_summary)
    all_launch_errors = launch_errors + fused_launch_errors + switch_launch_errors + headwise_launch_errors
    elapsed = time.perf_counter() - start

    shown = rows if not args.quiet else [
        r for r in rows if "error" in r or r.get("spill_bytes") and not r.get("spill_tolerated")
        or (r.get("low_residency") and not r.get("excepted")) or r.get("wide_tile")]
    print_table(shown)
    for error in all_launch_errors:
        print(f"LAUNCH FAILED: {error}")
    print("\n".join(line for line in summaries if line) + f" [{elapsed:.0f} s]")
    if args.out:
        header = dict(arch=args.arch, M=args.rows, sms=args.sms, gpu=args.gpu, argv=" ".join(argv),
                      triton=triton.__version__, source=source_version(),
                      launch_errors=all_launch_errors)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_markdown(Path(f"{args.out}.md"), rows, summary, header, fused_summary, switch_summary, headwise_summary)
        document = dict(header, summary=summary, counts=counts,
                        **(dict(fused_summary=fused_summary, fused_counts=fused_counts) if fused_summary else {}),
                        **(dict(switch_summary=switch_summary, switch_counts=switch_counts) if switch_summary else {}),
                        **(dict(headwise_summary=headwise_summary, headwise_counts=headwise_counts)
                           if headwise_summary else {}),
                        exceptions=[dataclasses.asdict(e) for e in RESIDENCY_EXCEPTIONS])
        # One row per line: compact, and a rerun diffs line by line.
        head = json.dumps(document, indent=1, default=str)[:-2]
        body = ",\n".join(json.dumps(row, default=str) for row in rows)
        Path(f"{args.out}.json").write_text(f'{head},\n "rows": [\n{body}\n]}}\n')
    failing = [c for c in (counts, fused_counts, switch_counts, headwise_counts) if c]
    return 1 if any(c["failed"] or c["spills"] or c["below_min_resident"] or c["tail_waves"] for c in failing) else 0


if __name__ == "__main__":
    sys.exit(main())
