"""Property-based checks: random shapes, dtypes, layouts, flags and value scales, kernels against
the float64 reference. Bounded for CI (HYPOTHESIS_PROFILE=long for a deeper run by hand)."""

import os

import pytest
import torch

pytest.importorskip("hypothesis", reason="the property suite needs hypothesis (pip install -e '.[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_pointwise_kernels import run_and_compare as run_pointwise
from test_rowwise_kernels import run_and_compare as run_rowwise

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def tensors(draw, dtype, rows, cols, device):
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    shift = draw(st.sampled_from([0.0, 1.0, -50.0]))
    # Every random tensor of the example (x here, parameters and dy later) follows this seed, so
    # a failing example replays exactly.
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = torch.randn(rows, cols + draw(st.integers(0, 3))) * scale + shift
    return base[:, :cols].to(device=device, dtype=dtype)  # sometimes a strided view of wider rows


@given(data=st.data(), is_rms=st.booleans(), dtype=DTYPES, rows=st.integers(1, 40), n=st.integers(1, 300),
       affine=st.sampled_from(["none", "weight", "weight+bias"]), fp32_params=st.booleans(),
       max_block_n=st.sampled_from([None, 16, 64]))
def test_rowwise_kernels(data, is_rms, dtype, rows, n, affine, fp32_params, max_block_n, device):
    x = data.draw(tensors(dtype, rows, n, device))
    param_dtype = torch.float32 if fp32_params else dtype
    w = torch.randn(n, device=device).to(param_dtype) if affine != "none" else None
    b = torch.randn(n, device=device).to(param_dtype) if affine == "weight+bias" and not is_rms else None
    run_rowwise(x, w, b, is_rms, eps=data.draw(st.sampled_from([1e-5, 1e-6, 0.1])), max_block_n=max_block_n)


@given(data=st.data(), activation=st.sampled_from(["tanh", "erf"]), dtype=DTYPES, rows=st.integers(1, 30),
       cols=st.integers(1, 200), channels_first=st.booleans(), affine=st.sampled_from(["none", "weight", "weight+bias"]),
       fp32_params=st.booleans(), max_block_n=st.sampled_from([None, 16]))
def test_pointwise_kernels(data, activation, dtype, rows, cols, channels_first, affine, fp32_params, max_block_n,
                           device):
    channels = data.draw(st.integers(1, 6)) if channels_first else cols
    if channels_first:
        rows = rows * channels  # (B·C, S): whole images
    x = data.draw(tensors(dtype, rows, cols, device))
    param_dtype = torch.float32 if fp32_params else dtype
    alpha = torch.tensor([data.draw(st.sampled_from([0.05, 0.5, 2.0]))], device=device, dtype=param_dtype)
    shift = torch.tensor([data.draw(st.sampled_from([0.0, -0.4]))], device=device, dtype=param_dtype) \
        if activation == "erf" else None
    w = torch.randn(channels, device=device).to(param_dtype) if affine != "none" else None
    b = torch.randn(channels, device=device).to(param_dtype) if affine == "weight+bias" else None
    run_pointwise(x, alpha, shift, w, b, dict(channels=channels, params_per_row=channels_first), activation,
                  max_block_n)
