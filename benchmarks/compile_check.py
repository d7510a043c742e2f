"""Compile every kernel variant the heuristics pick for a real GPU target, without a GPU.

    python -m benchmarks.compile_check                 # sm_90 (Hopper), the default sweep
    python -m benchmarks.compile_check --arch 80 --hidden 4096

The interpreter runs the kernels' arithmetic on CPU but never compiles them; this runs Triton's
real compiler (to PTX and, with the ptxas Triton ships, to a cubin) and reads each variant's
registers, spills and shared memory with cuobjdump. It catches code the compiler rejects and
register spills on wide rows before any GPU time is spent. Prints one line per variant; exits 1 if
any variant fails to compile or spills.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # must precede the kernels' @triton.jit definitions
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from normzoo.kernels import elementwise, rowwise_norm  # noqa: E402
from normzoo.kernels.heuristics import elementwise_config, rowwise_config  # noqa: E402

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# Parameter layouts a model can hand the kernels: (weight, bias, parameters in fp32 rather than
# the input's dtype). RMSNorm has no bias.
AFFINE = [(False, False, False), (True, False, False), (True, True, False), (False, True, False),
          (True, True, True)]


def _affine_modes(dtype, has_bias_option=True):
    for has_w, has_b, fp32_params in AFFINE:
        if (has_b and not has_bias_option) or (fp32_params and dtype == torch.float32):
            continue
        label = ("w" if has_w else "") + ("b" if has_b else "") or "none"
        yield has_w, has_b, ("fp32" if fp32_params else TRITON_DTYPE[dtype]), label + ("-fp32" if fp32_params else "")


def _rowwise_variants(hidden_sizes, dtypes):
    for dtype in dtypes:
        t = "*" + TRITON_DTYPE[dtype]
        for n in hidden_sizes:
            for is_rms in (False, True):
                for has_w, has_b, p_dtype, affine in _affine_modes(dtype, has_bias_option=not is_rms):
                    p = "*" + p_dtype
                    name = f"{'rms' if is_rms else 'ln'} {{}} {TRITON_DTYPE[dtype]} N={n} {affine}"
                    cfg = rowwise_config(n, dtype)
                    sig = {"X": t, "Y": t, "W": p, "B": p, "MEAN": "*fp32", "RSTD": "*fp32",
                           "stride_x_row": "i32", "stride_y_row": "i32", "M": "i32", "N": "i32", "eps": "fp32"}
                    consts = dict(IS_RMS=is_rms, HAS_WEIGHT=has_w, HAS_BIAS=has_b, BLOCK_M=cfg.block_m,
                                  BLOCK_N=cfg.block_n, SINGLE_TILE=cfg.single_tile)
                    yield name.format("fwd"), rowwise_norm._norm_fwd_kernel, sig, consts, cfg.num_warps

                    cfg = rowwise_config(n, dtype, backward=True)
                    sig = {"X": t, "W": p, "DY": t, "DX": t, "MEAN": "*fp32", "RSTD": "*fp32",
                           "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "ROW_SUMS": "*fp32",
                           "stride_x_row": "i32", "stride_dy_row": "i32", "stride_dx_row": "i32",
                           "M": "i32", "N": "i32", "rows_per_program": "i32"}
                    consts = dict(IS_RMS=is_rms, HAS_WEIGHT=has_w, COMPUTE_DW=has_w, COMPUTE_DB=has_b,
                                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_TILE=cfg.single_tile)
                    yield name.format("bwd"), rowwise_norm._norm_bwd_kernel, sig, consts, cfg.num_warps


def _pointwise_variants(hidden_sizes, dtypes):
    for dtype in dtypes:
        t = "*" + TRITON_DTYPE[dtype]
        for n in hidden_sizes:
            for activation in ("tanh", "erf"):
                for per_row in (False, True):
                    for has_w, has_b, p_dtype, affine in _affine_modes(dtype):
                        p = "*" + p_dtype
                        flags = dict(ACTIVATION=activation, HAS_SHIFT=activation == "erf", HAS_WEIGHT=has_w,
                                     PARAMS_PER_ROW=per_row)
                        name = (f"{'derf' if activation == 'erf' else 'dyt'}{'-cf' if per_row else ''} {{}} "
                                f"{TRITON_DTYPE[dtype]} N={n} {affine}")
                        cfg = elementwise_config(n)
                        sig = {"X": t, "Y": t, "ALPHA": p, "SHIFT": p, "W": p, "B": p, "stride_x_row": "i32",
                               "stride_y_row": "i32", "M": "i32", "N": "i32", "C": "i32"}
                        consts = dict(flags, HAS_BIAS=has_b, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
                        yield name.format("fwd"), elementwise._pointwise_fwd_kernel, sig, consts, cfg.num_warps

                        cfg = elementwise_config(n, backward=True)
                        sig = {"X": t, "DY": t, "DX": t, "ALPHA": p, "SHIFT": p, "W": p, "DW_PARTIAL": "*fp32",
                               "DB_PARTIAL": "*fp32", "SCALAR_PARTIAL": "*fp32", "stride_x_row": "i32",
                               "stride_dy_row": "i32", "stride_dx_row": "i32", "M": "i32", "N": "i32", "C": "i32",
                               "rows_per_program": "i32"}
                        consts = dict(flags, COMPUTE_DW=has_w, COMPUTE_DB=has_b, BLOCK_M=cfg.block_m,
                                      BLOCK_N=cfg.block_n)
                        yield name.format("bwd"), elementwise._pointwise_bwd_kernel, sig, consts, cfg.num_warps


def variants(hidden_sizes, dtypes):
    """(label, jit function, signature, constexprs, num_warps) for every kernel variant normzoo
    can launch at these widths: each op, pass, affine layout and parameter dtype."""
    yield from _rowwise_variants(hidden_sizes, dtypes)
    yield from _pointwise_variants(hidden_sizes, dtypes)


def resource_usage(cubin: bytes) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    return usage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    p.add_argument("--hidden", nargs="+", type=int, default=[97, 1024, 4096, 8192, 8193, 16384, 16385])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    args = p.parse_args(argv)
    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d] for d in args.dtypes]
    target = GPUTarget("cuda", args.arch, 32)
    compiled = failed = spilled = 0
    print(f"{'variant':40s} {'warps':>5s} {'regs':>5s} {'spill(B)':>8s} {'smem(B)':>8s}")
    for label, fn, sig, consts, num_warps in variants(args.hidden, dtypes):
        try:
            kernel = triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": num_warps})
            usage = resource_usage(kernel.asm["cubin"])
        except Exception as exc:  # report every variant, then fail
            failed += 1
            print(f"{label:40s} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        compiled += 1
        spill = usage.get("LOCAL", 0) + usage.get("STACK", 0)
        spilled += spill > 0
        print(f"{label:40s} {num_warps:5d} {usage.get('REG', -1):5d} {spill:8d} {kernel.metadata.shared:8d}"
              + ("  SPILLS" if spill else ""))
    print(f"sm_{args.arch}: {compiled + failed} variants, {failed} failed to compile, {spilled} spill")
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
