"""The benchmark harness runs end to end (CPU smoke mode: it checks the code, not the speed), and every
kernel compiles for sm_90 without spills (benchmarks/compile_check.py, Triton's real compiler)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main
from helpers import run_python


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode needs the interpreter; on a GPU run the real benchmark")
def test_smoke_run_writes_results(tmp_path):
    ops = ["layernorm", "rmsnorm", "dyt", "derf"]
    rc = main(["--smoke", "--ops", *ops, "--dtypes", "fp32", "--rows", "16", "--hidden", "96", "--out", str(tmp_path),
               "--name", "t"])
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


def test_host_instruction_segments_and_table(tmp_path):
    """--instructions's watched run (here without valgrind): every case warm, then one segment per
    (layer, implementation, pass), named in order; and the table of kIr rows."""
    from benchmarks import host

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "benchmarks.host", "--segments", str(tmp_path), "--repeats", "2"],
                   check=True, cwd=root, capture_output=True, timeout=300)
    segments = json.loads((tmp_path / "segments.json").read_text())
    names = [name for name, *_ in host.layers(8, "cpu", torch.float32)]
    assert len(segments) == 6 * len(names)
    assert [tuple(s[2:]) for s in segments[:6]] == [("normzoo", "fwd"), ("normzoo", "fwdbwd"), ("normzoo", "infer"),
                                                    ("torch", "fwd"), ("torch", "fwdbwd"), ("torch", "infer")]
    assert list(dict.fromkeys(s[0] for s in segments)) == names
    counts = {("normzoo", "fwd"): 130.0, ("torch", "fwd"): 65.0, ("normzoo", "fwdbwd"): 300.0,
              ("torch", "fwdbwd"): 250.0, ("normzoo", "infer"): 90.0, ("torch", "infer"): 60.0}
    row = host.result_row("LayerNorm", 4, 64, "torch.nn.LayerNorm", "kir", lambda label, p: counts[label, p])
    assert row["unit"] == "kIr" and row["fwd_ratio"] == 2.0 and row["infer_ratio"] == 1.5
    table = host.markdown([row], "header")
    assert "normzoo no-grad fwd kIr" in table
    assert "| 130.0 | 65.0 | 2.00× | 300.0 | 250.0 | 1.20× | 90.0 | 60.0 | 1.50× |" in table
    # A JSON written before the no-grad pass was measured still renders, without that column.
    del row["infer_ratio"]
    old_table = host.markdown([row], "header")
    assert "no-grad" not in old_table and old_table.endswith("| 300.0 | 250.0 | 1.20× |")


def test_host_triton_launch_mode_launches_through_triton(tmp_path):
    """--triton-launch: LayerNorm's forward and backward compiled for sm_90 and launched through
    Triton's own launch path, only the driver faked (no GPU, no interpreter): the launches reach
    the driver, and the table has its row."""
    run_python("-W", "ignore", "-m", "benchmarks.host", "--triton-launch", "--layers", "LayerNorm",
               "--repeats", "3", "--rounds", "1", "--out", str(tmp_path), timeout=300)
    data = json.loads((tmp_path / "host-cpu-triton-launch.json").read_text())
    assert data["triton_launch"] and not data["stubbed"]
    # warm-up and timed calls, forward (1 launch) and forward + backward (2: one program, no reduce)
    assert data["driver_launches"] >= 3 * 3
    [row] = data["results"]
    assert row["layer"] == "LayerNorm" and row["normzoo_fwd_us"] > 0 and row["normzoo_fwdbwd_us"] > 0


def test_host_profile_through_tritons_launch_path():
    """host_profile --triton-launch: the same diagnostic on the CPU through Triton's own launch path
    (no interpreter): every timing printed, and the forward's profile shows JITFunction.run."""
    out = run_python("-W", "ignore", "-m", "benchmarks.host_profile", "--triton-launch",
                     "--calls", "2", "--rows", "2", "--hidden", "32", timeout=300)
    assert "through Triton's launch path" in out and out.count("us/call") == 7
    forward_profile = out[out.index("== normzoo.LayerNorm fwd:"):out.index("== normzoo.LayerNorm fwd+bwd")]
    assert "jit.py" in forward_profile and "(run)" in forward_profile


def test_host_profile_runs(capsys):
    """The GPU session's host diagnostic: its timings and three profiles, here on toy sizes."""
    from benchmarks import host_profile

    assert host_profile.main(["--calls", "2", "--rows", "2", "--hidden", "32"]) == 0
    out = capsys.readouterr().out
    assert "normzoo.LayerNorm fwd+bwd" in out and "triton kernel.run(...)" in out
    assert out.count("calls, by own time") == 3


def test_bytes_are_counted_from_first_principles():
    from benchmarks.cases import CASES

    # LayerNorm fwd+bwd on (8, 16) bf16: x, y, x, dy, dx = 5 tensors of 8*16*2 bytes.
    assert CASES["layernorm"].bytes_moved("fwdbwd", 8, 16, torch.bfloat16) == 5 * 8 * 16 * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode needs the interpreter; on a GPU run the real benchmark")
def test_smoke_run_fused_residual_ops(tmp_path):
    # One of each fused op, over a row-wise norm and a point-wise one: (y, s) outputs, two incoming
    # gradients, two norms' parameters. Toy sizes: a few seconds under the interpreter.
    ops = ["add_norm-rmsnorm", "norm_add-layernorm", "norm_add_norm-dyt"]
    rc = main(["--smoke", "--ops", *ops, "--dtypes", "bf16", "--rows", "16", "--hidden", "64", "--out", str(tmp_path),
               "--name", "f"])
    assert rc == 0
    results = json.loads((tmp_path / "f.json").read_text())["results"]
    seen = {(r["op"], r["provider"], r["pass"]) for r in results}
    assert seen == {(op, q, pass_) for op in ops for q in ("normzoo", "eager") for pass_ in ("fwd", "bwd", "fwdbwd")}
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in results)
    assert "| norm_add_norm-dyt | fwdbwd | bf16 | 16 | 64 |" in (tmp_path / "f.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode needs the interpreter; on a GPU run the real benchmark")
def test_smoke_run_device_time_split(tmp_path):
    # --device-time adds each call's host time and (on a GPU; none here) its device time, in the
    # JSON rows and as a second table.
    rc = main(["--smoke", "--ops", "rmsnorm", "--dtypes", "fp32", "--rows", "8", "--hidden", "32", "--passes", "fwd",
               "bwd", "--device-time", "--out", str(tmp_path), "--name", "d"])
    assert rc == 0
    results = json.loads((tmp_path / "d.json").read_text())["results"]
    assert {(r["provider"], r["pass"]) for r in results} == {(q, p) for q in ("normzoo", "eager") for p in ("fwd", "bwd")}
    assert all(r["host_ms"] > 0 and r["device_ms"] is None and r["device_pct_copy"] is None for r in results)
    md = (tmp_path / "d.md").read_text()
    assert "normzoo device % copy / host µs" in md and "| rmsnorm | bwd | fp32 | 8 | 32 | n/a / " in md


def test_plot_shows_device_time_when_measured():
    # A --device-time run's PNG plots the GPU's own time (wall-clock and device time differ by the
    # host's share), and the axis says which of the two a plot shows.
    from benchmarks.harness import Point, plotted

    wall = Point("layernorm", "normzoo", "fwd", "bf16", 8, 32, ms=2.0, gbps=50.0, pct_copy=5.0)
    split = Point("layernorm", "normzoo", "fwd", "bf16", 8, 32, ms=2.0, gbps=50.0, pct_copy=5.0, device_ms=0.5,
                  device_pct_copy=20.0, host_ms=1.5)
    unsplit = Point("layernorm", "eager", "fwd", "bf16", 8, 32, ms=2.0, gbps=50.0, pct_copy=5.0, host_ms=1.5)
    label, gbps = plotted([wall])
    assert label == "GB/s (wall-clock)" and gbps(wall) == 50.0
    label, gbps = plotted([split, unsplit])
    assert label == "GB/s (device time)" and gbps(split) == 200.0 and gbps(unsplit) is None


def test_from_json_redraws_a_saved_run(tmp_path, capsys):
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"environment": {}, "copy_gbps": 100.0, "results": [
        {"op": "rmsnorm", "provider": "normzoo", "pass": "fwd", "dtype": "bf16", "rows": 8, "hidden": 32, "ms": 1.0,
         "gbps": 40.0, "pct_copy": 40.0, "device_ms": 0.5, "device_pct_copy": 80.0, "host_ms": 0.7}]}))
    assert main(["--from-json", str(saved), "--out", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert "| rmsnorm | fwd | bf16 | 8 | 32 | 40 (40%) |" in out and "| 80% / 700 |" in out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "png" / "run.png").is_file()
    for bad in (tmp_path / "missing.json", Path(__file__)):  # not there; not JSON
        with pytest.raises(SystemExit) as e:
            main(["--from-json", str(bad)])
        assert e.value.code == 2 and "not a saved benchmark run" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the profiler's device time needs a GPU")
def test_device_time_matches_do_bench_on_a_copy():
    # One kernel, a 512 MB copy (~0.1 ms at H100/H200 speeds, far above a launch): the profiler's
    # time for it and do_bench's events (L2 flushed alike) agree, and issuing it costs far less.
    from benchmarks import harness

    src = torch.randn(64 << 20, device="cuda")
    dst = torch.empty_like(src)
    call = lambda: dst.copy_(src)  # noqa: E731
    device_ms, host_ms = harness.device_and_host_ms(call, [src])
    wall_ms = harness.time_ms(call, smoke=False)
    assert device_ms is not None and abs(device_ms - wall_ms) <= 0.1 * wall_ms, (device_ms, wall_ms)
    assert 0 < host_ms < wall_ms


def test_fused_cases_agree_with_their_unfused_sequence():
    # The benchmark's normzoo provider and its eager one compute the same thing, and the gradients
    # reach every leaf (the parameters of the norm modules the fused op is given are the leaves).
    from benchmarks.cases import CASES, GROUPS
    from benchmarks.harness import _backward

    torch.manual_seed(0)
    for op in GROUPS["fused"]:
        case = CASES[op]
        leaves = case.make_inputs(8, 32, torch.float32, "cpu")
        dy = case.make_grads(8, 32, torch.float32, "cpu")
        outs, grads = {}, {}
        for provider in ("normzoo", "eager"):
            for t in leaves:
                t.grad = None
            out = case.providers[provider](*leaves)
            _backward(out, dy)
            outs[provider] = out
            grads[provider] = [t.grad for t in leaves]
        assert isinstance(outs["eager"], tuple) == (case.outputs == 2), op
        torch.testing.assert_close(outs["normzoo"], outs["eager"], rtol=1e-4, atol=1e-4, msg=op)
        assert all(g is not None for g in grads["normzoo"]), op
        torch.testing.assert_close(grads["normzoo"], grads["eager"], rtol=1e-4, atol=1e-4, msg=op)


def test_fused_bytes_are_counted_from_first_principles():
    from benchmarks.cases import CASES, expand_ops

    per = 8 * 16 * 2  # one (8, 16) bf16 tensor
    expected = {  # (fwd, bwd) tensors: see benchmarks.cases.FusedCase
        "add_norm": (4, 4),  # x, h, y, s | dy, ds, s, dx (= dh)
        "norm_add": (3, 3),  # x, h, s | ds, h, dh (dx is ds)
        "norm_add_norm": (4, 6),  # x, h, y, s | dy, ds, s, h, dx, dh
    }
    for mode, (fwd, bwd) in expected.items():
        for op in expand_ops([mode]):
            case = CASES[op]
            assert case.bytes_moved("fwd", 8, 16, torch.bfloat16) == fwd * per
            assert case.bytes_moved("bwd", 8, 16, torch.bfloat16) == bwd * per
            assert case.bytes_moved("fwdbwd", 8, 16, torch.bfloat16) == (fwd + bwd) * per
    # An fp32 residual stream beside bf16 activations: x, s, ds, dx in fp32, and dh a second write.
    add_norm = CASES["add_norm-rmsnorm"]
    assert add_norm.bytes_moved("fwd", 8, 16, torch.bfloat16, torch.float32) == 8 * 16 * (4 + 2 + 2 + 4)
    assert add_norm.bytes_moved("bwd", 8, 16, torch.bfloat16, torch.float32) == 8 * 16 * (2 + 4 + 4 + 4 + 2)
    assert expand_ops(["add_norm", "add_norm-rmsnorm", "layernorm"]) == [
        "add_norm-layernorm", "add_norm-rmsnorm", "add_norm-dyt", "add_norm-derf", "layernorm"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu_exits_cleanly(capsys):
    assert main(["--ops", "layernorm"]) == 2
    assert "No CUDA GPU found" in capsys.readouterr().err


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    # Each used to be accepted (a negative budget) or to end in a traceback (an --out that is a file,
    # after the first shape's timing; a missing or non-JSON saved run).
    a_file = tmp_path / "a-file"
    a_file.write_text("not JSON")
    for argv, says in ((["--smoke", "--out", str(a_file)], f"--out {a_file} is a file"),
                       (["--smoke", "--budget-s", "-5"], "--budget-s: expected seconds (a number >= 0)"),
                       (["--train-step", "--tiny", "--budget-s", "-5"], "--budget-s: expected seconds"),
                       (["--train-step", "--from-json", str(tmp_path / "missing.json")], "FileNotFoundError"),
                       (["--train-step", "--from-json", str(a_file)], "JSONDecodeError")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err, argv


def test_compile_check_refuses_a_table_it_cannot_read(tmp_path):
    # (its own process: importing compile_check unsets TRITON_INTERPRET for the real compiler)
    r = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--table", str(tmp_path / "missing.json")],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2 and "not a launch table (FileNotFoundError" in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode needs the interpreter; on a GPU run the real benchmark")
def test_smoke_says_what_it_skips_and_an_empty_table_is_well_formed(tmp_path, capsys):
    # Inductor does not run in --smoke: a run of it alone has nothing to do, and says so.
    assert main(["--smoke", "--providers", "compile", "--out", str(tmp_path)]) == 2
    assert "compile: skipped in --smoke" in capsys.readouterr().out
    # A budget spent before the first shape writes a table with no rows, its header and separator
    # of one width.
    assert main(["--smoke", "--ops", "rmsnorm", "--budget-s", "0", "--out", str(tmp_path), "--name", "e"]) == 0
    assert "budget of 0 s spent" in capsys.readouterr().out
    header, separator = (tmp_path / "e.md").read_text().strip().splitlines()[-2:]
    assert header.count("|") == separator.count("|") == 6 and header.startswith("| op |")


# The widths the sm_90 compile test sweeps: unaligned and tiny, a single-tile row, a looped row
# that is not a multiple of 16. Every op, affine layout and parameter dtype at each.
# 256: rows stacked in a tile, whose backward's register estimate once launched 1.15-1.73 waves
FUSED_HIDDEN = [97, 256, 4096]
COMPILE_CHECK_ARGS = ["--hidden", "97", "256", "4096", "16385", "--dtypes", "bf16", "fp32", "--quiet",
                      "--passes", "fwd", "bwd",  # the no-grad forward's variants: test_inference_forwards_...
                      # and the fused residual ops' launches (bf16 activations, bf16 or fp32 stream)
                      "--fused-hidden", *map(str, FUSED_HIDDEN),
                      # and the model switches (x_hat rounding, weight offset), single-tile and looped;
                      # the head-wise norms run apart (headwise_run): their verdict is their own
                      "--switch-hidden", "4096", "16384", "--headwise"]
# (op, affine layout) pairs per dtype: LayerNorm 5 (4 in fp32, where "-fp32" params are the input's
# dtype), RMSNorm 3 (2), DyT, Derf and their channels-first forms 5 each (4).
LAYOUTS = {"bf16": 5 + 3 + 4 * 5, "fp32": 4 + 2 + 4 * 4}
FUSED_SUMMARY = re.compile(
    r"sm_90 fused residual ops: (?P<variants>\d+) row launches \+ (?P<reduces>\d+) reduce launches .*?"
    r"(?P<failed>\d+) failed to compile, (?P<spills>\d+) spill, (?P<low>\d+) below 2 resident programs/SM "
    r"\(\d+ excepted\), (?P<narrow>\d+) with row accesses under 128 bits"
)
SWITCH_SUMMARY = re.compile(
    r"sm_90 model switches \(x_hat rounding, weight offset\): (?P<variants>\d+) row launches \+ "
    r"(?P<reduces>\d+) reduce launches .*?(?P<failed>\d+) failed to compile, (?P<spills>\d+) spill, "
    r"(?P<low>\d+) below 2 resident programs/SM"
)
HEADWISE_SUMMARY = re.compile(
    r"sm_90 head-wise norms \(QK-norm, ScaleNorm, CRMSNorm\): (?P<variants>\d+) row launches \+ (?P<reduces>\d+) "
    r"reduce launches .*?(?P<failed>\d+) failed to compile, (?P<spills>\d+) spill, (?P<low>\d+) below 2 resident "
    r"programs/SM \(\d+ excepted\), (?P<narrow>\d+) with row accesses under 128 bits"
)
# The head-wise sweep: QK-norm per head (rms with bf16 and fp32 weights, l2 with a scale) and over
# all heads (MHA and GQA widths), ScaleNorm and CRMSNorm at two widths and CRMSNorm's C - 1 of 4096.
HEADWISE_ARGS = ["--hidden", "4096", "--dtypes", "bf16", "--ops", "rmsnorm", "--fused-modes", "--switches", "--quiet",
                 "--headwise-hidden", "1024", "4096", "--headwise-dtypes", "bf16", "--crms-hidden", "4095",
                 "--qk-head-dims", "128"]
HEADWISE_CASES = 2 + 2 + 1 + 2 + 3  # qknorm-rms per head (w, w-fp32), all heads (2), l2; ScaleNorm; CRMSNorm
SUMMARY = re.compile(
    r"sm_90: (?P<variants>\d+) variants \+ (?P<reduces>\d+) reduce launches \((?P<kernels>\d+) distinct kernels "
    r"compiled\), (?P<failed>\d+) failed to compile, (?P<spills>\d+) spill, (?P<low>\d+) below 2 resident programs/SM "
    r"\(\d+ excepted\), (?P<narrow>\d+) with row accesses under 128 bits"
)


def _run_compile_check(args):
    """``python -m benchmarks.compile_check`` over ``args``, in a clean process (Triton's real
    compiler needs TRITON_INTERPRET unset before the kernels are defined)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as exc:  # noqa: BLE001 - any failure means no toolchain to compile with
        pytest.skip(f"this triton install has no CUDA backend toolchain (ptxas): {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", *map(str, args)],
        env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent,
    )


# Each of these two module fixtures runs a compile (~70 s and ~6 s) that two tests read: under
# pytest-xdist (`--dist loadgroup`, the README's command) their tests are one xdist_group, so one
# worker runs the compile once.
@pytest.fixture(scope="module")
def compile_check_run(tmp_path_factory):
    """The plain norms, the fused residual ops and the model switches (COMPILE_CHECK_ARGS); the
    report's rows (its JSON) in ``counts["rows"]``."""
    report = tmp_path_factory.mktemp("compile_check") / "report"
    out = _run_compile_check([*COMPILE_CHECK_ARGS, "--out", report])
    summary, fused, switch = (r.search(out.stdout) for r in (SUMMARY, FUSED_SUMMARY, SWITCH_SUMMARY))
    assert summary and fused and switch, out.stdout[-3000:] + out.stderr[-3000:]
    counts = {k: int(v) for k, v in summary.groupdict().items()}
    counts.update({f"fused_{k}": int(v) for k, v in fused.groupdict().items()})
    counts.update({f"switch_{k}": int(v) for k, v in switch.groupdict().items()})
    counts["rows"] = json.loads(Path(f"{report}.json").read_text())["rows"]
    return out, counts


@pytest.fixture(scope="module")
def headwise_run():
    """The head-wise norms (HEADWISE_ARGS; the plain sweep cut to one variant pair)."""
    out = _run_compile_check(HEADWISE_ARGS)
    headwise = HEADWISE_SUMMARY.search(out.stdout)
    assert headwise, out.stdout[-3000:] + out.stderr[-3000:]
    return out, {k: int(v) for k, v in headwise.groupdict().items()}


@pytest.mark.xdist_group("compile_check_run")
def test_every_kernel_compiles_for_hopper_without_spills(compile_check_run):
    # Triton's real compiler (not the interpreter), targeting sm_90, on the specialization a real
    # launch gets: catches code the interpreter accepts but the compiler rejects, and spills.
    out, counts = compile_check_run
    report = out.stdout[-4000:] + out.stderr[-2000:]
    # Every (op, pass, affine layout, parameter dtype) at 4 widths, forward and backward.
    assert counts["variants"] == 4 * 2 * sum(LAYOUTS.values()), report
    # Every backward with a parameter gradient reduces its partials in a second launch.
    assert counts["reduces"] > 0 and counts["kernels"] > 100, report
    assert counts["failed"] == 0, report
    assert counts["spills"] == 0, report
    # Nothing else flagged either (a persistent backward grid larger than one wave: a rule's
    # register estimate above what ptxas allocated), in any family: the exit status says so.
    assert out.returncode == 0, report
    # The fused residual ops (add_norm, norm_add, norm_add_norm; every norm kind) likewise, and
    # RMSNorm's again rounding x̂ as Llama's does, with 16-bit and fp32 weights.
    assert counts["fused_variants"] > 0 and counts["fused_failed"] == 0 and counts["fused_spills"] == 0, report
    x_hat = {r["label"].split(" ")[0] for r in counts["rows"] if r["label"].startswith("rmsnorm[x_hat=input]:")}
    assert x_hat == {f"rmsnorm[x_hat=input]:{mode}" for mode in ("add_norm", "norm_add", "norm_add_norm")}, x_hat
    # Rows that are a multiple of 16 are read 16 bytes at a time, but by DyT/Derf's one-pass
    # norm_add_norm backward (4 values a thread by rule: 8 took 162-255 registers): 2 ops x 2
    # streams (bf16, fp32) at each aligned fused width.
    aligned = [n for n in FUSED_HIDDEN if n % 16 == 0]
    assert counts["narrow"] == 0 and counts["fused_narrow"] == 2 * 2 * len(aligned), report
    narrow = {r["label"] for r in counts["rows"] if r.get("narrow_rows")}
    assert all(re.match(r"(dyt|derf):norm_add_norm bwd ", label) for label in narrow), narrow
    # And the model switches (x_hat rounding to the input's and the weight's dtype, weight offset) at
    # 4096 and 16384: RMSNorm 2 + 1 + 2 layouts and LayerNorm's wb, forward and backward, bf16 only.
    assert counts["switch_variants"] == 2 * 2 * (2 + 1 + 2 + 1), report
    assert counts["switch_failed"] == 0 and counts["switch_spills"] == 0, report


def test_one_program_backwards_compile_for_hopper_without_spills():
    """At 16 rows every backward grid is one program, which writes the gradients itself (the
    kernels' DIRECT switch, no reduce launch): the sweep above, at 32768 rows, never compiles it.
    A spill of at most 16 bytes is tolerated there (compile_check's SPILL_TOLERATED_BYTES)."""
    out = _run_compile_check(["--rows", "16", "--passes", "bwd", "--hidden", "64", "97", "4096", "16385", "--dtypes",
                              "bf16", "fp32", "--quiet", "--fused-hidden", "97", "4096", "--switch-hidden", "4096",
                              "16384", "--headwise"])
    summary, fused, switch = (r.search(out.stdout) for r in (SUMMARY, FUSED_SUMMARY, SWITCH_SUMMARY))
    report = out.stdout[-4000:] + out.stderr[-2000:]
    assert summary and fused and switch, report
    counts = {k: int(v) for k, v in summary.groupdict().items()}
    assert counts["variants"] == 4 * sum(LAYOUTS.values()), report
    # Reduces are left only where one program sees several channels-first images: at most the
    # channels-first DyT and Derf variants (5 affine layouts in bf16, 4 in fp32) at each width.
    assert 0 < counts["reduces"] <= 2 * (5 + 4) * 4, report
    for found in (summary, fused, switch):
        assert int(found["failed"]) == 0 and int(found["spills"]) == 0, report
    assert int(fused["reduces"]) == 0 and int(switch["reduces"]) == 0, report


def test_inference_forwards_compile_for_hopper_without_spills(tmp_path):
    """The forward under torch.no_grad() (pass ``infer``): the row-wise launchers pass no statistics,
    a variant of their forward kernel of its own, plain, fused and switched, that compiles, spills
    nothing and stores no statistics; but a plain norm's looped row (N = 16385 here), which keeps
    them (without the stores ptxas spilled in the fp32 LayerNorm). DyT launches its one forward
    either way: no infer variant."""
    out = _run_compile_check(["--passes", "infer", "--hidden", "97", "16385", "--dtypes", "bf16", "--ops",
                              "layernorm", "rmsnorm", "dyt", "--fused-hidden", "4096", "--fused-streams", "fp32",
                              "--switch-hidden", "4096", "--headwise", "--quiet", "--out", tmp_path / "report"])
    report = out.stdout[-4000:] + out.stderr[-2000:]
    found = [r.search(out.stdout) for r in (SUMMARY, FUSED_SUMMARY, SWITCH_SUMMARY)]
    assert all(found) and out.returncode == 0, report
    # 2 widths x (LayerNorm 5 + RMSNorm 3 layouts); 2 norms x 3 modes + RMSNorm's x̂ rounding (2
    # weight dtypes x 3 modes); the switches: x_hat=input 2, x_hat=weight 1, offset 1 + 2.
    assert [int(f["variants"]) for f in found] == [2 * (5 + 3), 2 * 3 + 2 * 3, 2 + 1 + 1 + 2], report
    assert all(int(f["failed"]) == 0 and int(f["spills"]) == 0 and int(f["reduces"]) == 0 for f in found), report
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert all(" infer " in r["label"] and r["constexprs"]["STATS2"] is None for r in rows), report
    for r in rows:
        looped_plain = r["constexprs"]["BLOCK_N"] < r["variant"]["n"] and not r["variant"].get("mode")
        stores_stats = "STATS" in r["accesses"]
        assert (r["constexprs"].get("STATS", "a tensor") is None) is (not stores_stats) is (not looped_plain), r


def test_a_tables_wide_tile_is_compiled_and_reported_not_failed(tmp_path):
    # --table applies a tuner's output file. Its wide single tile (a row-wise backward keeping a row
    # the rules loop over whole; heuristics.WIDE_TILE_BYTES) holds one program per SM, which fails
    # the report for any rule's launch: a measured table's choice is reported instead.
    table = tmp_path / "table.json"
    entry = {"num_warps": 16, "block_m": 1, "programs_per_sm": 1, "num_stages": 2, "single_tile": True}
    table.write_text(json.dumps({"gpu": "wide-tile-test", "configs": {"rmsnorm|bwd|bfloat16|16384": entry}}))
    out = _run_compile_check(["--table", table, "--ops", "rmsnorm", "--passes", "bwd", "--dtypes", "bf16",
                              "--hidden", "16384", "--fused-modes", "--switches", "--headwise", "--quiet",
                              "--out", tmp_path / "report"])
    report = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0 and "3 wide tiles a measured table chose" in out.stdout, report
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    wide = [r for r in rows if r["role"] == "row"]
    assert len(wide) == 3 and all(r["wide_tile"] and r["constexprs"]["BLOCK_N"] == 16384 for r in wide), report
    assert all(r["resident"] < 2 and r["excepted"] for r in wide), report
    assert json.loads((tmp_path / "report.json").read_text())["gpu"] == "wide-tile-test"


@pytest.mark.xdist_group("compile_check_run")
def test_row_kernels_keep_two_programs_per_sm_on_hopper(compile_check_run):
    # The tool's verdict: also fails when a row kernel holds fewer than 2 programs per SM and no
    # documented exception (benchmarks/compile_check.py, RESIDENCY_EXCEPTIONS) explains it.
    out, counts = compile_check_run
    assert counts["low"] == 0 and counts["fused_low"] == 0 and counts["switch_low"] == 0 and out.returncode == 0, \
        out.stdout[-6000:] + out.stderr[-2000:]


@pytest.mark.xdist_group("headwise_run")
def test_headwise_norms_are_compiled_with_full_width_row_accesses(headwise_run):
    # Every head-wise case reaches the kernels (q and k as views of a fused qkv, read in place), and
    # the (M, N) tensors of every row width that is a multiple of 16 are read and written 128 bits at
    # a time (CRMSNorm's C - 1 widths are not: element-wise, as any unaligned row).
    out, counts = headwise_run
    assert counts["variants"] == 2 * HEADWISE_CASES and counts["reduces"] > 0, out.stdout[-4000:]
    assert counts["narrow"] == 0, out.stdout[-4000:]


@pytest.mark.xdist_group("headwise_run")
def test_headwise_norms_compile_for_hopper_without_spills(headwise_run):
    # Under the interpreter any kernel runs; only a real compile shows what ptxas takes (this test
    # found _weight's two returns, which Triton's compiler rejects and its interpreter runs).
    out, counts = headwise_run
    assert counts["failed"] == 0 and counts["spills"] == 0, out.stdout[-6000:] + out.stderr[-2000:]
