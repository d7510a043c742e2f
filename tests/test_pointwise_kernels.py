"""The DyT / Derf Triton kernels against the float64 reference (interpreter on CPU)."""

import pytest
import torch
import triton
import triton.language as tl

from helpers import assert_close
from normzoo import reference
from normzoo.kernels import pointwise_backward, pointwise_forward
from normzoo.kernels.elementwise import ERF_FAST_REL_ERROR, _erf_fast

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = ["tanh", "erf"]
# (rows, cols, channels, params_per_row, max_block_n): channels-last rows × C, or a channels-first
# (B·C, S) view; a small max_block_n makes the kernels loop over column tiles. Under 32 rows (and,
# channels-first, one image) one program owns every row and its backward writes the gradients
# itself: C1, C96, C300, C320 and B1C5S48 take that path, the others the partial sums and their
# reduce.
LAYOUTS = {
    "last-C1": (9, 1, 1, False, None),
    "last-C97": (37, 97, 97, False, None),
    "last-C300-looped": (21, 300, 300, False, 64),
    "first-B3C5S49": (15, 49, 5, True, None),
    "first-B1C5S48": (5, 48, 5, True, None),  # one image, one program: the kernel writes the gradients
    "last-C96": (9, 96, 96, False, None),  # one program, as the next: the kernel writes the gradients
    "last-C320-looped": (21, 320, 320, False, 64),
    "first-B2C7S1": (14, 1, 7, True, None),
    "first-B2C3S200-looped": (6, 200, 3, True, 32),
}


def make(layout, dtype, param_dtype, activation, affine, device, scale=3.0):
    rows, cols, channels, per_row, max_block_n = LAYOUTS[layout]
    x = (torch.randn(rows, cols, device=device) * scale).to(dtype)
    alpha = torch.tensor([0.7], device=device, dtype=param_dtype)
    shift = torch.tensor([0.2], device=device, dtype=param_dtype) if activation == "erf" else None
    weight = torch.randn(channels, device=device).to(param_dtype) if affine != "none" else None
    bias = torch.randn(channels, device=device).to(param_dtype) if affine == "weight+bias" else None
    return x, alpha, shift, weight, bias, dict(channels=channels, params_per_row=per_row), max_block_n


def run_and_compare(x, alpha, shift, weight, bias, layout_kw, activation, max_block_n=None, y_by_terms=False):
    """Forward and backward kernels against the float64 reference. ``y_by_terms``: judge y = w·act(u)
    + b against the size of its two terms, ‖|w·act(u)| + |b|‖, where they cancel (the property
    suite's random biases: 16-bit DyT's fast tanh is bounded relative to tanh, not to y)."""
    as64 = lambda t: None if t is None else t.double()
    kw = dict(activation=activation, **layout_kw)
    y = pointwise_forward(x, alpha, shift, weight, bias, max_block_n=max_block_n, **kw)
    y_ref = reference.pointwise_forward(x.double(), as64(alpha), as64(shift), as64(weight), as64(bias),
                                        activation, layout_kw["channels"], layout_kw["params_per_row"])
    # Peer: the reference at the inputs' own precision (fp32 arithmetic, like PyTorch's kernels).
    y_peer = reference.pointwise_forward(x, alpha, shift, weight, bias, activation, layout_kw["channels"],
                                         layout_kw["params_per_row"])
    y_size = 0.0
    if y_by_terms and bias is not None:
        term = reference.pointwise_forward(x.double(), as64(alpha), as64(shift), as64(weight), None, activation,
                                           layout_kw["channels"], layout_kw["params_per_row"])
        y_size = (term.abs() + (y_ref - term).abs()).norm().item()
    assert torch.isfinite(y).all()
    assert_close(y, y_ref, "y", x.dtype, peer=y_peer, scale=y_size)

    dy = torch.randn_like(x)
    dy_before = dy.clone()
    flags = dict(compute_dw=weight is not None)
    db_dtype = bias.dtype if bias is not None else None
    grads = pointwise_backward(dy, x, alpha, shift, weight, max_block_n=max_block_n, db_dtype=db_dtype, **kw, **flags)
    assert torch.equal(dy, dy_before), "backward wrote into the incoming gradient"
    refs = reference.pointwise_backward(dy.double(), x.double(), as64(alpha), as64(shift), as64(weight), activation,
                                        layout_kw["channels"], layout_kw["params_per_row"],
                                        db_dtype=torch.float64 if bias is not None else None, **flags)
    peers = reference.pointwise_backward(dy, x, alpha, shift, weight, activation, layout_kw["channels"],
                                         layout_kw["params_per_row"], db_dtype=db_dtype, **flags)
    dtypes = [x.dtype, alpha.dtype, alpha.dtype, weight.dtype if weight is not None else None, db_dtype]
    # dalpha = Σ g·x and dshift = Σ g over every element can cancel: judge them against Σ|terms|.
    g = refs[0].double() / alpha.double()
    scales = [0.0, (g * x.double()).abs().sum().item(), g.abs().sum().item(), 0.0, 0.0]
    for name, got, ref, peer, dtype, scale in zip(["dx", "dalpha", "dshift", "dw", "db"], grads, refs, peers,
                                                  dtypes, scales):
        if ref is None:
            assert got is None, name
            continue
        assert torch.isfinite(got).all(), name
        assert_close(got, ref, name, dtype, peer=peer, scale=scale)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
def test_kernels_match_reference(activation, dtype, layout, affine, device):
    x, alpha, shift, w, b, layout_kw, max_block_n = make(layout, dtype, dtype, activation, affine, device)
    run_and_compare(x, alpha, shift, w, b, layout_kw, activation, max_block_n)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["last-C97", "first-B3C5S49"])
def test_fp32_params_with_16bit_input(activation, dtype, layout, device):
    x, alpha, shift, w, b, layout_kw, max_block_n = make(layout, dtype, torch.float32, activation, "weight+bias", device)
    run_and_compare(x, alpha, shift, w, b, layout_kw, activation, max_block_n)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_inputs_stay_finite_and_exact(activation, dtype, device):
    # ±1e4 (and fp16's ±65504): the activation saturates to ±1 and its derivative to 0, no NaN/Inf.
    big = 6.5e4 if dtype == torch.float16 else 1e4
    x, alpha, shift, w, b, layout_kw, _ = make("last-C97", dtype, dtype, activation, "weight+bias", device)
    x = torch.where(torch.rand_like(x, dtype=torch.float32) < 0.5, -big, big).to(dtype)
    x[0, :10] = torch.tensor([0.0, 1e-4, -1e-4, 0.3, -0.6, 2.0, -5.0, 9.0, -20.0, 50.0], dtype=dtype)
    run_and_compare(x, alpha, shift, w, b, layout_kw, activation)


def test_tanh_and_its_derivative_are_accurate(device):
    # The kernel's tanh switches from a series to (1−e)/(1+e) at |z| = 0.55: both sides, tiny z,
    # and z deep in saturation.
    z = torch.tensor([0.0, 1e-30, 1e-7, 1e-3, 0.1, 0.5499, 0.5501, 0.9, 3.0, 9.0, 30.0], device=device)
    x = torch.cat([z, -z])[None, :]
    one = torch.ones(1, device=device)
    y = pointwise_forward(x, one, None, None, None, activation="tanh", channels=x.shape[1], params_per_row=False)
    exact = torch.tanh(x.double())
    eps32 = torch.finfo(torch.float32).eps
    rel_in_eps = (y.double() - exact).abs() / exact.abs().clamp_min(1e-300) / eps32
    assert rel_in_eps.max() <= 4, rel_in_eps
    # The derivative, 1 − tanh²: computed as 1 − t·t it would lose every digit as t → ±1.
    dx, *_ = pointwise_backward(torch.ones_like(x), x, one, None, None, activation="tanh", channels=x.shape[1],
                                params_per_row=False, compute_dw=False, db_dtype=None)
    exact_dt = 1 / torch.cosh(x.double()) ** 2
    rel_in_eps = (dx.double() - exact_dt).abs() / exact_dt / eps32
    # A GPU's exp rounds exp(−2|z|)'s argument, an error that grows like |z|·eps (the interpreter's
    # exp is exact); 1 − t·t would instead be wrong by 100% past |z| ≈ 9.
    assert (rel_in_eps <= 8 + x.double().abs()).all(), rel_in_eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_dyt_forward_uses_the_fast_tanh_within_its_bound(dtype, device):
    # 16-bit DyT forward takes tanh.approx.f32 (on a GPU; under the interpreter an emulation that
    # errs by the instruction's whole bound, 2^-10.987 relative). Either way, each output is within
    # that bound plus the output's own rounding (one ulp: the interpreter's bf16 conversion does
    # not round to nearest) of the exact tanh; fp32 keeps the exact path
    # (test_tanh_and_its_derivative_are_accurate).
    from normzoo.kernels.elementwise import TANH_APPROX_REL_ERROR

    x = torch.linspace(-6, 6, 4001, device=device).to(dtype)[None, :]
    one = torch.ones(1, device=device)
    y = pointwise_forward(x, one, None, None, None, activation="tanh", channels=x.shape[1], params_per_row=False)
    exact = torch.tanh(x.double())
    ulp = torch.finfo(dtype).eps  # relative
    rel = (y.double() - exact).abs() / exact.abs().clamp_min(1e-30)
    assert rel.max() <= TANH_APPROX_REL_ERROR + ulp * (1 + TANH_APPROX_REL_ERROR), rel.max()
    if not torch.cuda.is_available():
        # The emulation must really be what ran: fp16's rounding does not hide all of its error.
        assert dtype != torch.float16 or not torch.equal(y, exact.to(dtype))


@triton.jit
def _erf_fast_kernel(X, Y, N, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < N
    tl.store(Y + offsets, _erf_fast(tl.load(X + offsets, mask=mask)), mask=mask)


def _erf_fast_fp32(x):
    """The 16-bit Derf forward's erf, evaluated alone in fp32 (1-D x)."""
    y = torch.empty_like(x)
    _erf_fast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


def test_fast_erf_is_within_its_bound(device):
    # The polynomial on its own, in fp32: within ERF_FAST_REL_ERROR (relative) of erf everywhere,
    # from subnormal arguments to deep saturation (clamped at ±2.9), and NaN stays NaN. Every fp32
    # in [2.7, 2.9], where its error peaks (2.8998344 broke the bound with two roundings a step).
    bits = torch.tensor([2.7, 2.9]).view(torch.int32)
    peak = torch.arange(int(bits[0]), int(bits[1]) + 1, dtype=torch.int32).view(torch.float32)
    z = torch.cat([torch.linspace(0, 8, 100001), torch.logspace(-38, 0, 2000), peak,
                   torch.tensor([1e30, float("inf")])])
    x = torch.cat([z, -z]).to(device)
    y = _erf_fast_fp32(x)
    exact = torch.special.erf(x.double())
    rel = (y.double() - exact).abs() / exact.abs().clamp_min(1e-300)
    assert rel[x != 0].max() <= ERF_FAST_REL_ERROR, rel[x != 0].max()
    assert (y[x == 0] == 0).all()
    assert _erf_fast_fp32(torch.tensor([float("nan")], device=device)).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_derf_forward_uses_the_fast_erf_within_its_bound(dtype, device):
    # 16-bit Derf forward takes _erf_fast: each output within its bound plus the output's own
    # rounding (half an ulp; tests/conftest.py makes the interpreter's bf16 conversion round) of
    # the exact erf.
    # fp32 keeps the exact erf: within 4 eps (relative) of it.
    x32 = torch.linspace(-6, 6, 4001, device=device)[None, :]
    one, zero = torch.ones(1, device=device), torch.zeros(1, device=device)
    for x in (x32, x32.to(dtype)):
        y = pointwise_forward(x, one, zero, None, None, activation="erf", channels=x.shape[1], params_per_row=False)
        exact = torch.special.erf(x.double())
        # (Outputs of normal size: a subnormal one's rounding alone is a large relative error.)
        rel = ((y.double() - exact).abs() / exact.abs().clamp_min(1e-30))[exact.abs() >= torch.finfo(x.dtype).tiny]
        if x.dtype == torch.float32:
            assert rel.max() <= 4 * torch.finfo(torch.float32).eps, rel.max()
        else:
            unit_roundoff = torch.finfo(dtype).eps / 2  # relative
            assert rel.max() <= ERF_FAST_REL_ERROR + unit_roundoff * (1 + ERF_FAST_REL_ERROR), rel.max()
    if not torch.cuda.is_available():
        # The polynomial is what ran: each 16-bit output is its fp32 value, rounded (on a GPU the
        # two compiles may contract their multiply-adds differently).
        assert torch.equal(y, _erf_fast_fp32(x.float().flatten()).to(dtype)[None, :])


def test_many_rows_per_program(device):
    # 1500 rows over a handful of programs: each program's partial sums cover many row blocks.
    x = torch.randn(1500, 24, device=device)
    alpha, shift = torch.tensor([0.7], device=device), torch.tensor([0.2], device=device)
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    run_and_compare(x, alpha, shift, w, b, dict(channels=24, params_per_row=False), "erf")


def test_backward_is_deterministic(device):
    x = torch.randn(900, 40, device=device, dtype=torch.bfloat16)
    alpha = torch.tensor([0.5], device=device)
    w = torch.randn(40, device=device)
    dy = torch.randn_like(x)
    kw = dict(activation="tanh", channels=40, params_per_row=False, compute_dw=True, db_dtype=torch.float32)
    # Bit-identical repeats: trivially so under the interpreter; on a GPU this guards against
    # atomics or any run-to-run change in reduction order.
    first = pointwise_backward(dy, x, alpha, None, w, **kw)
    again = pointwise_backward(dy, x, alpha, None, w, **kw)
    for a, b in zip(first, again):
        assert (a is None and b is None) or torch.equal(a, b)


def test_empty_input(device):
    x = torch.empty(0, 8, device=device)
    alpha, shift, w = torch.ones(1, device=device), torch.zeros(1, device=device), torch.ones(8, device=device)
    y = pointwise_forward(x, alpha, shift, w, w, activation="erf", channels=8, params_per_row=False)
    assert y.shape == (0, 8)
    dx, da, ds, dw, db = pointwise_backward(x, x, alpha, shift, w, activation="erf", channels=8,
                                            params_per_row=False, compute_dw=True, db_dtype=torch.float32)
    assert dx.shape == (0, 8)
    for g, n in ((da, 1), (ds, 1), (dw, 8), (db, 8)):
        assert torch.equal(g, torch.zeros(n, device=device))


def test_launchers_refuse_what_they_cannot_read(device):
    # The launchers test the usual case (a known activation, 2-D contiguous rows, dy shaped as x)
    # inline and ask the checks only when that fails: every refusal must still reach them.
    x, alpha, w = torch.randn(4, 8, device=device), torch.ones(1, device=device), torch.ones(8, device=device)
    kw = dict(channels=8, params_per_row=False)
    bwd_kw = dict(kw, compute_dw=True, db_dtype=torch.float32)
    column_strided = torch.randn(4, 16, device=device)[:, ::2]
    for bad in (x.view(2, 2, 8), column_strided):
        with pytest.raises(AssertionError, match="unit column stride"):
            pointwise_forward(bad, alpha, None, w, w, activation="tanh", **kw)
    for dy, x_ in ((column_strided, x), (torch.randn(4, 4, device=device), x), (x.view(2, 2, 8), x),
                   (x, column_strided)):
        with pytest.raises(AssertionError, match="unit column stride"):
            pointwise_backward(dy, x_, alpha, None, w, activation="tanh", **bwd_kw)
    with pytest.raises(ValueError, match="activation must be one of"):
        pointwise_forward(x, alpha, None, w, w, activation="gelu", **kw)
    with pytest.raises(ValueError, match="activation must be one of"):
        pointwise_backward(x, x, alpha, None, w, activation="gelu", **bwd_kw)


def test_strided_rows(device):
    # Rows that are not packed (a slice of a wider tensor): the launchers read them as they lie.
    x = torch.randn(7, 40, device=device)[:, 3:35]
    alpha, shift = torch.tensor([0.7], device=device), torch.tensor([0.2], device=device)
    w, b = torch.randn(32, device=device), torch.randn(32, device=device)
    run_and_compare(x, alpha, shift, w, b, dict(channels=32, params_per_row=False), "erf")
    run_and_compare(x, alpha, None, w, None, dict(channels=32, params_per_row=False), "tanh", max_block_n=16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="uses a 4 GiB lazily-mapped CPU buffer")
def test_row_offsets_past_2_pow_31():
    n, stride = 40, 1 << 30
    storage = torch.empty(2 * stride + n, dtype=torch.float16)
    x = storage.as_strided((3, n), (stride, 1))
    x.copy_(torch.randn(3, n).to(torch.float16))
    run_and_compare(x, torch.tensor([0.5]), torch.tensor([0.1]), torch.randn(n), torch.randn(n),
                    dict(channels=n, params_per_row=False), "erf")
