"""The benchmark harness runs end to end (CPU smoke mode: it checks the code, not the speed)."""

import json

import pytest
import torch

from benchmarks.__main__ import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode needs the interpreter; on a GPU run the real benchmark")
def test_smoke_run_writes_results(tmp_path):
    ops = ["layernorm", "rmsnorm", "dyt", "derf"]
    rc = main(["--smoke", "--ops", *ops, "--dtypes", "fp32", "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["environment"]["smoke"] is True and data["copy_gbps"] > 0
    results = data["results"]
    seen = {(r["op"], r["provider"], r["pass"]) for r in results}
    for op in ops:
        for provider in ("normzoo", "eager"):
            for pass_ in ("fwd", "bwd", "fwdbwd"):
                assert (op, provider, pass_) in seen
    for r in results:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0
    assert "| layernorm | fwd | fp32 |" in (tmp_path / "t.md").read_text()


def test_bytes_are_counted_from_first_principles():
    from benchmarks.cases import CASES

    # LayerNorm fwd+bwd on (8, 16) bf16: x, y, x, dy, dx = 5 tensors of 8*16*2 bytes.
    assert CASES["layernorm"].bytes_moved("fwdbwd", 8, 16, torch.bfloat16) == 5 * 8 * 16 * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu_exits_cleanly(capsys):
    assert main(["--ops", "layernorm"]) == 2
    assert "No CUDA GPU found" in capsys.readouterr().err


def test_every_kernel_compiles_for_hopper_without_spills():
    # Triton's real compiler (not the interpreter), targeting sm_90, in a clean process: catches
    # code the interpreter accepts but the compiler rejects, and register spills on wide rows.
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton install has no CUDA backend toolchain (ptxas)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", "--hidden", "97", "4096", "16384", "16385",
         "--dtypes", "bf16", "fp32"],
        env=env, capture_output=True, text=True, timeout=480, cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    import re

    summary = re.search(r"sm_90: (\d+) variants, 0 failed to compile, 0 spill", out.stdout)
    assert summary, out.stdout[-2000:]
    rows = [line for line in out.stdout.splitlines() if re.search(r" (fwd|bwd) ", line)]
    # Every (op, pass, affine layout, parameter dtype) at 4 widths and 2 dtypes, each listed once.
    assert len(rows) == int(summary.group(1)) > 300, out.stdout[-2000:]
