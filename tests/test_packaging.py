"""What `pip install normzoo` installs: the wheel built from this checkout (offline, no build isolation)."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import normzoo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools", minversion="64")  # pyproject's build requirement
    src = tmp_path_factory.mktemp("src")
    # A copy, so the build's own output (build/, *.egg-info) stays out of the checkout.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("normzoo", "kernels"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=300)
    (path,) = dist.glob("normzoo-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_wheel_installs_kernels_inside_normzoo_only(wheel):
    # The PyPI name "kernels" belongs to another project: ours must never land as a top-level package.
    top = {name.split("/", 1)[0] for name in wheel.namelist()}
    assert top == {"normzoo", f"normzoo-{normzoo.__version__}.dist-info"}


def test_wheel_holds_every_module_and_launch_table(wheel):
    # pyproject lists its packages by name: a module or subpackage added without it would be left out.
    names = set(wheel.namelist())
    expected = {f"normzoo/{p.relative_to(ROOT / 'normzoo').as_posix()}" for p in (ROOT / "normzoo").rglob("*.py")}
    expected |= {f"normzoo/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}" for p in (ROOT / "kernels").rglob("*.py")}
    tables = {f"normzoo/kernels/configs/{p.name}" for p in (ROOT / "kernels" / "configs").glob("*.json")}
    assert tables, "no measured launch tables in kernels/configs: nothing to check"
    assert expected | tables | {"normzoo/py.typed"} <= names, sorted((expected | tables) - names)
    assert not any("__pycache__" in n or n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)


def test_wheel_version_is_the_packages(wheel):
    metadata = wheel.read(f"normzoo-{normzoo.__version__}.dist-info/METADATA").decode()
    assert re.search(r"^Version: (.+)$", metadata, re.M).group(1) == normzoo.__version__
