"""The README's promises that code can check: its tolerance table and its commands."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import torch

from helpers import RTOL

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_tolerance_table_matches_the_tests():
    section = README.split("## Accuracy", 1)[1].split("\n## ", 1)[0]
    table = dict(re.findall(r"^\| (float32|float16|bfloat16) \| ([0-9.e-]+) \|$", section, flags=re.M))
    assert {getattr(torch, k): float(v) for k, v in table.items()} == RTOL


def test_readme_names_only_tests_that_exist():
    # The README backs its guarantees with test names ([test_norm_api::test_x], tests/test_swap.py):
    # each must still be a test file or a test function, or the claim points at nothing.
    sources = {p.stem: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    named = set(re.findall(r"\btest_\w+", README))
    assert named, "the README names no tests: this check has nothing to check"
    everything = "\n".join(sources.values())
    missing = sorted(t for t in named if t not in sources and not re.search(rf"^\s*def {t}\(", everything, re.M))
    assert not missing, f"the README names tests that do not exist: {missing}"
    misplaced = [f"{file}::{test}" for file, test in re.findall(r"\b(test_\w+?)(?:\.py)?::(test_\w+)", README)
                 if not re.search(rf"^\s*def {test}\(", sources.get(file, ""), re.M)]
    assert not misplaced, f"the README names tests in files that do not hold them: {misplaced}"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command.strip() in ci


def test_quickstart_runs_and_matches():
    # The environment as conftest left it: interpreter on without a GPU, real kernels with one.
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rel = [float(v) for v in re.findall(r"relative difference ([0-9.e+-]+)", out.stdout)]
    assert len(rel) == 2 and max(rel) < 1e-5, out.stdout
    assert "gradients within the README's tolerance" in out.stdout, out.stdout


def test_quickstart_fails_beyond_the_readme_tolerance(tmp_path):
    # The quickstart checks, not only prints: here its normzoo model (the reference backend, which
    # is fast on the CPU) has a final norm weight off by 0.1%, far past float32's rtol.
    broken = tmp_path / "broken_quickstart.py"
    broken.write_text(
        "import runpy, sys, torch, normzoo\n"
        "real = normzoo.swap\n"
        "def swap(model, **kw):\n"
        "    report = real(model, **{**kw, 'backend': 'torch'})\n"
        "    with torch.no_grad():\n"
        "        model.final_norm.weight.mul_(1.001)\n"
        "    return report\n"
        "normzoo.swap = swap\n"
        f"sys.argv = [{str(ROOT / 'examples' / 'quickstart.py')!r}]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    out = subprocess.run([sys.executable, str(broken)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED: logits: error" in out.stderr and "beyond the README's tolerance" in out.stderr, out.stderr


def test_quickstart_tolerance_is_the_readmes():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    assert quickstart.RTOL == {dtype: RTOL[dtype] for dtype in quickstart.RTOL}
