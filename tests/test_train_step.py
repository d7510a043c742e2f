"""The training-step benchmark (benchmarks/train_step.py) runs end to end in its CPU smoke mode: a
~1M-parameter Llama, fp32, the kernels under the interpreter. It checks the plumbing (both variants
run, the swap report is recorded, the files are written), never the speed."""

import json
import math

import pytest
import torch

import normzoo
from benchmarks.__main__ import main as bench_main
from benchmarks.train_step import main
from normzoo.swap import SwapReport

needs_cpu = pytest.mark.skipif(torch.cuda.is_available(),
                               reason="--tiny is the CPU smoke run; on a GPU run the real benchmark")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_step")
    # Through the suite's own entry point, as a user runs it.
    assert bench_main(["--train-step", "--tiny", "--out", str(out), "--name", "t"]) == 0
    return out, json.loads((out / "t.json").read_text())


@pytest.mark.xdist_group("train_step_tiny_run")  # one worker runs the fixture once
@needs_cpu
def test_tiny_run_records_both_variants(tiny_run):
    out, data = tiny_run
    env, setup = data["environment"], data["setup"]
    assert env["device"] == "cpu" and env["smoke"] is True
    assert env["torch"] == torch.__version__ and env["triton"] and env["transformers"]
    assert setup["tiny"] and setup["dtype"] == "fp32" and 0.5e6 < setup["params"] < 2e6
    results = {r["variant"]: r for r in data["results"]}
    assert list(results) == ["torch", "normzoo"]
    for r in results.values():
        assert len(r["losses"]) == setup["warmup"] + setup["steps"] and len(r["step_ms_all"]) == setup["steps"]
        assert r["tokens_per_step"] == setup["batch"] * setup["seq"]
        assert r["tokens_per_s"] > 0 and r["step_ms_median"] > 0  # present; their values are not judged here
        assert r["peak_mem_gib"] is None  # no CUDA memory to read on the CPU
        assert all(math.isfinite(x) for x in r["losses"]) and math.isfinite(r["held_out_loss"])
        assert r["valid"] is True and r["invalid_reason"] is None
    assert "swap" not in results["torch"]
    # The swap report: every LlamaRMSNorm (2 per layer, 1 layer, + the final one) replaced, on the kernels.
    swap = results["normzoo"]["swap"]
    n_norms = 2 * 1 + 1
    assert swap["norms_in_model"] == n_norms and swap["norm_classes"] == {"LlamaRMSNorm": n_norms}
    assert swap["replaced"] == n_norms and swap["left_alone"] == {} and swap["warnings"] == []
    assert swap["replaced_by_kind"] == {"transformers.LlamaRMSNorm -> normzoo.RMSNorm": n_norms}
    assert swap["backend"] == "triton"  # the interpreter is on (tests/conftest.py): the kernels ran
    assert "SwapReport(replaced=" in swap["report"]
    # Same initial weights and data: fp32 losses agree closely.
    (c,) = data["comparison"]
    assert c["baseline"] == "torch" and c["variant"] == "normzoo" and c["valid"]
    assert c["speedup"] is not None and c["replaced"] == n_norms
    assert c["held_out_loss_abs_diff"] < 1e-3 and c["train_loss_max_abs_diff"] < 1e-3
    md = (out / "t.md").read_text()
    assert "CPU smoke run (not a measurement)" in md and "| normzoo | 3 of 3 |" in md and "| torch | — |" in md
    pytest.importorskip("matplotlib")
    assert (out / "t.png").stat().st_size > 0


@needs_cpu
@pytest.mark.xdist_group("train_step_tiny_run")  # one worker runs the fixture once
def test_markdown_and_plot_again_from_the_json(tiny_run, tmp_path, capsys):
    out, data = tiny_run
    assert main(["--from-json", str(out / "t.json"), "--out", str(tmp_path), "--formats", "md"]) == 0
    assert "| normzoo | 3 of 3 |" in capsys.readouterr().out
    assert (tmp_path / "t.md").read_text() == (out / "t.md").read_text()


@needs_cpu
def test_nothing_swapped_claims_no_speedup(tmp_path, monkeypatch):
    # A swap that replaces nothing (as before LlamaRMSNorm was known) times the same model twice:
    # the run must say so, not report a ratio.
    def swap_nothing(model, **kwargs):
        report = SwapReport()
        report.left_alone["model.norm: transformers.LlamaRMSNorm (no exact normzoo equivalent known)"] += 1
        return report

    monkeypatch.setattr(normzoo, "swap", swap_nothing)
    assert main(["--tiny", "--steps", "1", "--warmup", "0", "--out", str(tmp_path), "--name", "n",
                 "--formats", "json", "md"]) == 0
    data = json.loads((tmp_path / "n.json").read_text())
    ours = next(r for r in data["results"] if r["variant"] == "normzoo")
    assert ours["valid"] is False and ours["invalid_reason"] == "nothing swapped"
    assert ours["swap"]["replaced"] == 0 and ours["swap"]["left_alone"]
    (c,) = data["comparison"]
    assert c["speedup"] is None and c["valid"] is False
    md = (tmp_path / "n.md").read_text()
    assert "no speedup reported (nothing swapped)" in md and "× tokens/s" not in md
    assert not (tmp_path / "n.png").exists()  # --formats left it out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu_exits_cleanly(capsys):
    assert main([]) == 2
    assert "No CUDA GPU found" in capsys.readouterr().err
