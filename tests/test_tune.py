"""The launch-config tuner and the one-call GPU session script, on the CPU.

Smoke runs (``--smoke``: Triton's interpreter, toy sizes) check the code paths and the files they
write, not speed. The pure parts of the tuner (candidates, the choice) are tested directly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import tune
from normzoo.kernels import heuristics as h

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, timeout=120, **extra_env):
    env = {k: v for k, v in os.environ.items() if k != "NORMZOO_POISON"}
    env.update(PYTHONPATH=str(ROOT), TRITON_INTERPRET="1", **extra_env)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _tune(*args, timeout=120):
    return _run([sys.executable, "-m", "benchmarks.tune", "--smoke", *map(str, args)], timeout=timeout)


def _check_record(key, record):
    """A key's "measured" record: the rule first, every candidate a valid table entry, 12 at most."""
    configs = [c["config"] for c in record["candidates"]]
    assert configs[0] == record["rule"] and record["chosen"] in configs
    assert 1 <= len(configs) <= 12 and len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    for c in configs:
        h.validate_entry(key, c)
        assert set(c) - {"single_tile"} == set(tune.fields(key.split("|")[1]))  # + a wide tile's flag
    assert record["rule_kept"] == (record["chosen"] == record["rule"])


# ----------------------------------------------------------------------------------------------
# Candidates and the choice
# ----------------------------------------------------------------------------------------------


def test_candidates_respect_tunable_and_stay_small():
    cpu = torch.device("cpu")  # no table off CUDA: launch_config is the rule
    for op in h.OPS:
        for pass_ in ("fwd", "bwd"):
            for dtype in (torch.bfloat16, torch.float32):
                for n in (1, 64, 1000, 1024, 4096, 16384, 32768, 131072):
                    rule = h.launch_config(op, pass_, n, dtype, cpu)
                    rowwise = op in h.ROWWISE_OPS
                    cands = tune.candidates(rule, pass_, h.TUNABLE, 8192, rowwise=rowwise)
                    assert cands[0] == tune.entry_of(rule, pass_)
                    assert len(cands) <= 10 and len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)
                    key = h.config_key(op, pass_, dtype, n)
                    for c in cands:
                        h.validate_entry(key, c)
                        assert set(c) == set(tune.fields(pass_))
                        assert c["num_warps"] * 32 <= c["block_m"] * rule.block_n or c == cands[0]
                    if pass_ == "fwd":
                        # Programs per SM and stages change a forward only in a persistent grid,
                        # which only a row-wise forward of single-tile rows may take.
                        plain = [c for c in cands if not c["persistent"]]
                        assert all(c["programs_per_sm"] == rule.programs_per_sm and
                                   c["num_stages"] == rule.num_stages for c in plain)
                        persistent = [c for c in cands if c["persistent"]]
                        assert bool(persistent) == (rowwise and rule.single_tile and rule.block_n >= 64)
                        assert all(c["num_stages"] in (2, 3) and c["programs_per_sm"] * c["num_warps"] <= 32
                                   for c in persistent)
                        # One row a program, 8 values a thread (16 where warps cap at 16), is tried
                        # wherever it fills a warp.
                        if rowwise and rule.single_tile and rule.block_n >= 256:
                            one_row = [c for c in plain if c["block_m"] == 1 and
                                       rule.block_n // (32 * c["num_warps"]) == (8 if rule.block_n <= 4096 else 16)]
                            assert one_row


def test_wide_tile_candidates_where_the_rules_loop_and_a_row_fits():
    cpu = torch.device("cpu")
    for op in h.OPS:
        for pass_ in ("fwd", "bwd"):
            for dtype in (torch.bfloat16, torch.float32):
                for n in (4096, 6000, 8192, 8200, 12000, 16384, 16392, 32768):
                    rule = h.launch_config(op, pass_, n, dtype, cpu)
                    wide = h.wide_tile_fits(op, pass_, n, dtype)
                    # Exactly the row-wise norms' looped rows up to 32 KB: 8193-16384 16-bit values,
                    # 4097-8192 fp32 ones.
                    assert wide == (op in h.ROWWISE_OPS and not rule.single_tile
                                    and n <= (16384 if dtype.itemsize == 2 else 8192))
                    cands = tune.candidates(rule, pass_, h.TUNABLE, 8192, rowwise=op in h.ROWWISE_OPS, wide=wide)
                    wides = [c for c in cands if c.get("single_tile")]
                    assert len(cands) <= 12 and len(wides) == (0 if not wide else 2 if pass_ == "bwd" else 3)
                    key = h.config_key(op, pass_, dtype, n)
                    for c in wides:
                        h.validate_entry(key, c)
                        assert c["block_m"] == 1 and c["num_warps"] in (16, 32)
                        assert pass_ == "fwd" or c["programs_per_sm"] == 1
    # Never one knob's evidence in combined(): a wide entry differs from the rule in several.
    rule = h.launch_config("rmsnorm", "bwd", 16384, torch.bfloat16, cpu)
    base = tune.entry_of(rule, "bwd")
    wide = {**base, "num_warps": 16, "block_m": 1, "programs_per_sm": 1, "num_stages": 2, "single_tile": True}
    measured = [(base, 1.0), ({**base, "num_stages": 3}, 0.9), (wide, 0.5)]
    assert tune.combined(measured, rule, h.TUNABLE, 8192) is None


def test_choose_keeps_the_rule_unless_a_candidate_is_2_percent_faster():
    rule, a, b = {"num_warps": 4, "block_m": 8}, {"num_warps": 8, "block_m": 8}, {"num_warps": 4, "block_m": 4}
    assert tune.choose([(rule, 1.0), (a, 0.985)]) == rule
    assert tune.choose([(rule, 1.0), (a, 0.97)]) == a
    assert tune.choose([(rule, 1.0), (a, 0.9), (b, 0.9)]) == a  # ties: the earlier candidate
    assert tune.choose([(rule, 1.0), (a, None)]) == rule  # a rejected candidate never wins
    assert tune.choose([(rule, 1.0), (a, 0.9), (b, 0.8)]) == b


def test_combined_candidate_takes_each_knobs_best():
    rule = h.LaunchConfig(block_m=8, block_n=512, num_warps=8, programs_per_sm=2)
    base = tune.entry_of(rule, "bwd")
    measured = [(base, 1.0), ({**base, "num_warps": 4}, 0.9), ({**base, "block_m": 16}, 0.8),
                ({**base, "programs_per_sm": 1}, 1.1)]
    assert tune.combined(measured, rule, h.TUNABLE, 8192) == {"num_warps": 4, "block_m": 16, "programs_per_sm": 2,
                                                             "num_stages": 1}
    # One knob improved: nothing new to try.
    assert tune.combined(measured[:2] + measured[3:], rule, h.TUNABLE, 8192) is None


def test_a_table_entry_reaches_the_launch_and_results_repeat(device, monkeypatch):
    # Same table -> same config -> bitwise the same results: nothing at launch is random.
    dev = torch.device(device)
    if dev.type == "cpu":
        monkeypatch.setattr(h, "device_name", lambda d: tune.SMOKE_GPU)  # tables are per GPU; off CUDA, pretend
    gpu = h.device_name(dev)
    op, pass_, dtype, n = "rmsnorm", "bwd", torch.float32, 256
    key = h.config_key(op, pass_, dtype, n)
    prev = h.tuned_entry(op, pass_, n, dtype, dev)
    try:
        h.set_tuned(gpu, key, None)
        rule = h.launch_config(op, pass_, n, dtype, dev)
        entry = tune.candidates(rule, pass_, h.TUNABLE, 8192)[-1]
        h.set_tuned(gpu, key, entry)
        assert tune.entry_of(h.launch_config(op, pass_, n, dtype, dev), pass_) == entry
        import normzoo.functional as NF

        x = torch.randn(100, n, device=dev, requires_grad=True)
        w = torch.randn(n, device=dev, requires_grad=True)
        dy = torch.randn(100, n, device=dev)
        runs = []
        for _ in range(2):
            x.grad = w.grad = None
            NF.rms_norm(x, (n,), w, 1e-6, backend="triton").backward(dy)
            runs.append((x.grad.clone(), w.grad.clone()))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        h.set_tuned(gpu, key, prev)
        monkeypatch.undo()
        h.launch_config.cache_clear()


@pytest.mark.parametrize("mode", ["none", "add_norm", "norm_add", "norm_add_norm"])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_persistent_forward_matches_the_rule_bitwise(kind, mode, device, monkeypatch):
    # A table may make the row-wise forward persistent (programs walk row blocks): the same
    # arithmetic per row, so every output equals the one-tile-a-program launch's, bit for bit
    # (the fused modes check that the entry leaves them alone).
    # 203 rows in tiles of 4: 51 row blocks over 4 programs per SM of 4 "SMs" (on a GPU too), the
    # last block ragged.
    from normzoo.kernels import rowwise_norm as k

    dev = torch.device(device)
    if dev.type == "cpu":
        monkeypatch.setattr(h, "device_name", lambda d: tune.SMOKE_GPU)
    monkeypatch.setattr(k, "num_compute_units", lambda d: 4)  # 16 programs on any device, each walking blocks
    gpu = h.device_name(dev)
    n, dtype = 96, torch.float32
    key = h.config_key(kind, "fwd", dtype, n)
    prev = h.tuned_entry(kind, "fwd", n, dtype, dev)
    torch.manual_seed(0)
    x, r = torch.randn(203, n, device=dev), torch.randn(203, n, device=dev)
    w, b, w2, b2 = (torch.randn(n, device=dev) for _ in range(4))
    b, b2 = (b, b2) if kind == "layernorm" else (None, None)

    def forward():
        if mode == "none":
            # Also Gemma's 1 + w: the persistent program adds the offset to the weight it loads once.
            return (*k.rowwise_norm_forward(x, w, b, 1e-5, is_rms=kind == "rmsnorm"),
                    *k.rowwise_norm_forward(x, w, b, 1e-5, is_rms=kind == "rmsnorm", weight_offset=1.0))
        return k.rowwise_residual_forward(x, r, w, b, 1e-5, is_rms=kind == "rmsnorm", mode=mode, scale=0.5,
                                          weight2=w2, bias2=b2, eps2=1e-6)

    for bad in ({"num_warps": 2, "block_m": 4, "persistent": True},  # no programs_per_sm, num_stages
                {"num_warps": 2, "block_m": 4, "persistent": 1, "programs_per_sm": 4, "num_stages": 2}):
        with pytest.raises(ValueError, match="persistent"):
            h.validate_entry(key, bad)
    with pytest.raises(ValueError, match="only the row-wise forward"):
        h.validate_entry(h.config_key(kind, "bwd", dtype, n), {"persistent": True, "programs_per_sm": 4, "num_stages": 2})
    try:
        h.set_tuned(gpu, key, {"num_warps": 2, "block_m": 4})
        one_tile = forward()
        entry = {"num_warps": 2, "block_m": 4, "persistent": True, "programs_per_sm": 4, "num_stages": 2}
        h.set_tuned(gpu, key, entry)
        cfg = h.launch_config(kind, "fwd", n, dtype, dev)
        assert cfg.persistent and cfg.single_tile and -(-203 // cfg.block_m) > 4 * k.num_compute_units(dev)
        # Patched on the class, not the instance: undoing an instance patch leaves the bound method
        # behind as an instance attribute, which later tests' class-level counters never see.
        launches = []
        kernel_class = type(k._norm_fwd_kernel)
        run = kernel_class.run

        def spy(self, *args, **kw):
            if self is k._norm_fwd_kernel:
                launches.append((kw["grid"], args[-1]))
            return run(self, *args, **kw)

        monkeypatch.setattr(kernel_class, "run", spy)
        persistent = forward()
        # The grid and NUM_STAGES: a persistent launch for a plain norm; a fused op (whose shared
        # memory the plain forward's table entry never measured) keeps one tile a program.
        want = [((4 * k.num_compute_units(dev),), -2)] * 2 if mode == "none" else [((-(-203 // cfg.block_m),), 0)]
        assert launches == want
        for got, want in zip(persistent, one_tile, strict=True):
            assert (got is None) == (want is None)
            assert got is None or torch.equal(got, want)
    finally:
        h.set_tuned(gpu, key, prev)
        monkeypatch.undo()
        h.launch_config.cache_clear()


# ----------------------------------------------------------------------------------------------
# The tuner, end to end (smoke)
# ----------------------------------------------------------------------------------------------


def test_smoke_run_writes_a_table_that_heuristics_loads(tmp_path, monkeypatch):
    out = tmp_path / "configs" / f"{tune.SMOKE_GPU}.json"
    # --jobs 1: the compile-worker path runs too.
    r = _tune("--ops", "layernorm", "dyt", "--hidden", "64", "--jobs", "1", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "precompiled" in r.stdout and "tuned 4 of 4 keys" in r.stdout
    data = json.loads(out.read_text())
    assert data["gpu"] == tune.SMOKE_GPU and data["environment"]["smoke"] is True
    assert data["tuner"]["complete"] and data["tuner"]["tuned"] == 4
    keys = {f"{op}|{p}|bfloat16|64" for op in ("layernorm", "dyt") for p in ("fwd", "bwd")}
    assert set(data["measured"]) == keys
    for key, record in data["measured"].items():
        _check_record(key, record)
        assert all(c["ms"] > 0 for c in record["candidates"])  # none rejected: each matched the rule
        assert record["run"] == {"git_commit": data["environment"]["git_commit"], "date": data["environment"]["date"]}
    for key, entry in data["configs"].items():  # only entries that beat the rule
        h.validate_entry(key, entry)
        assert entry == data["measured"][key]["chosen"] and not data["measured"][key]["rule_kept"]
    # The kernels' loader reads it as it is (it ignores "measured", "environment", "tuner").
    monkeypatch.setattr(h, "CONFIG_DIR", out.parent)
    h._tables.cache_clear()
    try:
        assert h._tables()[tune.SMOKE_GPU] == data["configs"]
    finally:
        monkeypatch.undo()
        h._tables.cache_clear()
        h.launch_config.cache_clear()


def test_budget_stops_cleanly_and_keeps_other_keys(tmp_path):
    out = tmp_path / "t.json"
    kept = {"rmsnorm|fwd|float32|4096": {"num_warps": 8}}
    out.write_text(json.dumps({"gpu": tune.SMOKE_GPU, "configs": kept}))
    r = _tune("--ops", "dyt", "--hidden", "64", "--budget-s", "0", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "budget of 0 s spent" in r.stdout and "tuned 0 of 2 keys" in r.stdout
    data = json.loads(out.read_text())
    assert data["configs"] == kept and data["measured"] == {}
    assert data["tuner"]["tuned"] == 0 and not data["tuner"]["complete"]
    # A second run into the same table keeps the first run's header beside its own.
    r = _tune("--ops", "dyt", "--hidden", "64", "--budget-s", "0", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["earlier_runs"] == [{"environment": data["environment"], "tuner": data["tuner"]}]


def test_smoke_never_writes_the_kernels_tables():
    target = h.CONFIG_DIR / f"{tune.SMOKE_GPU}.json"
    r = _tune("--ops", "dyt", "--hidden", "64", "--out", target)
    assert r.returncode == 2 and "does not write under" in r.stderr
    assert not target.exists()


def test_widths_a_table_cannot_hold_apart_are_refused(tmp_path):
    # A table entry is keyed by the next power of two of N: 96 and 128 are one key, and the second
    # tuned would silently overwrite the first. Tables apply to multiples of 16 only (heuristics).
    key = lambda n: h.config_key("layernorm", "bwd", torch.bfloat16, n)  # noqa: E731
    assert tune.check_hidden([64, 128, 4112], key, h.vector_aligned) is None
    assert "share the table key layernorm|bwd|bfloat16|128" in tune.check_hidden([96, 64, 128], key, h.vector_aligned)
    assert "multiples of 16" in tune.check_hidden([64, 100], key, h.vector_aligned)
    out = tmp_path / "t.json"
    r = _tune("--ops", "layernorm", "--passes", "bwd", "--hidden", "96", "128", "--out", out)
    assert r.returncode == 2 and "--hidden 96 128 share the table key layernorm|bwd|bfloat16|128" in r.stderr, r.stderr
    r = _tune("--hidden", "100", "--out", out)
    assert r.returncode == 2 and "--hidden 100: the tables apply only to widths that are multiples of 16" in r.stderr
    assert not out.exists()
    assert "next power of two of N" in " ".join(tune.parser().format_help().split())


def test_negative_budget_and_jobs_are_refused(capsys):
    for argv, says in ((["--budget-s", "-5"], "--budget-s: expected seconds"),
                       (["--jobs", "-2"], "--jobs: expected an integer >= 0")):
        with pytest.raises(SystemExit) as e:
            tune.parse_args(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_another_gpus_table_is_not_overwritten(tmp_path):
    out = tmp_path / "t.json"
    out.write_text(json.dumps({"gpu": "NVIDIA-H100-80GB-HBM3", "configs": {}}))
    r = _tune("--ops", "dyt", "--hidden", "64", "--budget-s", "0", "--out", out)
    assert r.returncode != 0 and "not of this GPU" in r.stderr
    assert json.loads(out.read_text())["gpu"] == "NVIDIA-H100-80GB-HBM3"


# ----------------------------------------------------------------------------------------------
# The GPU session script, end to end (smoke)
# ----------------------------------------------------------------------------------------------


def test_session_script_smoke_runs_every_phase(tmp_path):
    out = tmp_path / "out"
    r = _run(["bash", "benchmarks/gpu_session.sh", "--smoke"], timeout=170, OUT=str(out))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    for phase in ("host", "tune-wide", "tune", "bench"):
        assert f"{phase}: rc=0" in r.stdout
    files = sorted(p.name for p in out.iterdir())
    # The device tool returns at most 8 files from $OUT.
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    assert {"session.log", "tune-smoke-cpu.json", "smoke-cpu-bf16.json", "smoke-cpu-bf16.md",
            "host-cpu-stubbed.json", "host-cpu-stubbed.md"} <= set(files), files
    table = json.loads((out / "tune-smoke-cpu.json").read_text())
    assert table["tuner"]["complete"]
    for key, record in table["measured"].items():
        _check_record(key, record)
    # tune-wide's keys (an fp32 RMSNorm of 4112 columns, looped by the rules), kept by the tune
    # phase after it: their wide-tile candidates were installed, run and checked like the others.
    for pass_, count in (("fwd", 3), ("bwd", 2)):
        wides = [c for c in table["measured"][f"rmsnorm|{pass_}|float32|8192"]["candidates"]
                 if c["config"].get("single_tile")]
        assert len(wides) == count and all(c["ms"] is not None for c in wides)
    bench = json.loads((out / "smoke-cpu-bf16.json").read_text())
    assert {(p["op"], p["provider"]) for p in bench["results"]} >= {("layernorm", "normzoo"), ("dyt", "eager")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_session_script_without_a_gpu_stops_at_once(tmp_path):
    out = tmp_path / "out"
    r = _run(["bash", "benchmarks/gpu_session.sh"], timeout=60, OUT=str(out))
    assert r.returncode == 2 and "No CUDA GPU found" in r.stderr and "--smoke" in r.stderr, r.stdout + r.stderr
    assert r.stdout == "" and not out.exists()


def test_session_script_wide_smoke_runs_its_phases(tmp_path):
    # --wide: the whole-row tiles alone (tune-wide, then bench-wide with the table), no other phase.
    out = tmp_path / "out"
    r = _run(["bash", "benchmarks/gpu_session.sh", "--wide", "--smoke"], timeout=170, OUT=str(out))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "tune-wide: rc=0" in r.stdout and "bench-wide: rc=0" in r.stdout
    assert not any(f"{phase}: " in r.stdout for phase in ("host", "train-step", "tests", "tune:", "bench:"))
    files = sorted(p.name for p in out.iterdir())
    assert {"session.log", "tune-smoke-cpu.json", "smoke-cpu-wide-fp32.json", "smoke-cpu-wide-fp32.md"} <= set(files)
    table = json.loads((out / "tune-smoke-cpu.json").read_text())
    assert set(table["measured"]) == {"rmsnorm|fwd|float32|8192", "rmsnorm|bwd|float32|8192"}
    r = _run(["bash", "benchmarks/gpu_session.sh", "--wide", "--fused", "--smoke"], timeout=30, OUT=str(tmp_path / "x"))
    assert r.returncode == 2 and "pick one" in r.stderr
