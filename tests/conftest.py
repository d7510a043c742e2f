import os

import pytest
import torch

# Without a GPU, run the Triton kernels in Triton's CPU interpreter. This must be set before any
# @triton.jit function is defined, i.e. before normzoo.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Launchers fill their outputs with NaN before the kernel runs, so unwritten elements fail tests.
os.environ.setdefault("NORMZOO_POISON", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
