"""The README's promises that code can check: its tolerance table and its commands."""

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
