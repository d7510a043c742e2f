"""The examples' command lines: bad values are argparse errors (exit 2), not tracebacks later."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# What each script does first once its arguments are checked: the test stops there instead.
FIRST_STEP = {"placements.py": "make_corpus", "quickstart.py": "TinyTransformer"}


def _main_exits(monkeypatch, capsys, script, *argv):
    """Run ``examples/<script>``'s main() on ``argv``; return (exit status, stderr)."""
    spec = importlib.util.spec_from_file_location(f"example_{script[:-3]}", EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def past_the_checks(*args, **kwargs):
        raise AssertionError(f"{script} {' '.join(argv)}: got past its argument checks")

    monkeypatch.setattr(module, FIRST_STEP[script], past_the_checks)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        module.main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--lr", "-1"], "--lr must be positive"),
    (["--warmup", "-1"], "--warmup must be in [0, 1]"),
    (["--smoothing", "1.5"], "--smoothing must be in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be at least 0"),
    (["--device", "nodevice"], "--device nodevice:"),
])
def test_placements_refuses_bad_values(monkeypatch, capsys, argv, says):
    code, err = _main_exits(monkeypatch, capsys, "placements.py", *argv)
    assert code == 2 and says in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("script", ["quickstart.py", "placements.py"])
def test_cuda_device_without_a_gpu_is_a_clear_error(monkeypatch, capsys, script):
    code, err = _main_exits(monkeypatch, capsys, script, "--device", "cuda")
    assert code == 2 and "--device cuda: no CUDA GPU found" in err, err
