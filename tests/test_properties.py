"""Property-based checks: random shapes, dtypes, layouts, flags and value scales, the Triton kernels
(under the interpreter on CPU) against float64, the forward and every gradient, one test per family:

    test_rowwise_kernels      LayerNorm / RMSNorm launchers (called directly)
    test_rowwise_options      layer_norm / rms_norm through the public API: leading and normalized
                              dims, strided and transposed inputs, weight_offset, RMSNorm's x_hat_dtype
    test_pointwise_kernels    DyT / Derf launchers, channels-last and channels-first
    test_fused_residual       normzoo.fused.fused_residual: add_norm / norm_add / norm_add_norm, every norm
    test_qk_norm              QK-norm (rms, l2) on views of a fused qkv projection: per head, all heads, GQA
    test_scale_and_crms_norm  scale_norm and crms_norm
    test_layernorm2d          LayerNorm2d (channels-first feature maps), where the package has it

The tolerance rule is tests/helpers.py's. Where a result is a sum whose terms cancel (dx, dw, dalpha,
y = w·act + b, s = x + N(h)), it is judged against the size of its terms (``scale``), as the other
kernel tests do; for LayerNorm the peer is PyTorch's result or, where that was luckier, the float64
result with each row's mean one fp32 ulp off (:func:`worse`).

Profiles: ``ci`` (default; derandomized, about 30 s for the file on 2 cores) and ``long``
(HYPOTHESIS_PROFILE=long: 2000 examples per family, random seeds; run by hand, one family per
process, e.g. ``HYPOTHESIS_PROFILE=long pytest tests/test_properties.py -k test_fused_residual
--hypothesis-show-statistics``). Every random tensor of an example follows one drawn seed, so a
falsifying example (printed with its reproduce_failure blob) replays exactly.
"""
import contextlib
import math
import os
import warnings
from unittest import mock

import pytest
import torch

pytest.importorskip("hypothesis", reason="the property suite needs hypothesis (pip install -e '.[test]')")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import normzoo  # noqa: E402
import normzoo.functional as NF  # noqa: E402
from helpers import RTOL, assert_close, capped, on_reference, rel_error, term_sizes  # noqa: E402
from normzoo import fused  # noqa: E402
from test_headwise import formula as headwise_formula  # noqa: E402
from test_pointwise_kernels import run_and_compare as run_pointwise  # noqa: E402
from test_rowwise_kernels import run_and_compare as run_rowwise  # noqa: E402

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
HALF = (torch.float16, torch.bfloat16)
SCALES = [1e-3, 1.0, 30.0]
SHIFTS = [0.0, 1.0, -50.0]
LAYOUTS = ["contiguous", "padded", "transposed"]


# ---------------------------------------------------------------------------------------------- inputs


def seeded(data):
    """Seed torch from the example: every tensor drawn after this replays with it."""
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def make_values(shape, dtype, device, scale, shift, layout="contiguous", pad=2):
    """A tensor of ``shape`` (values randn·scale + shift, converted once to ``dtype``) laid out as
    ``layout`` says: ``contiguous``; ``padded``, rows of a wider tensor (the last dim sliced, so
    rows are strided); ``transposed``, every dim's stride reversed (column-major for 2-D)."""
    if layout == "padded":
        base = torch.randn(*shape[:-1], shape[-1] + pad, device=device) * scale + shift
        return base.to(dtype)[..., : shape[-1]]
    if layout == "transposed":
        base = torch.randn(*reversed(shape), device=device) * scale + shift
        return base.to(dtype).permute(*reversed(range(len(shape))))
    return (torch.randn(*shape, device=device) * scale + shift).to(dtype)


@st.composite
def tensors(draw, dtype, rows, cols, device):
    """(rows, cols), sometimes a strided view of wider rows, at a random value scale."""
    scale, shift = draw(st.sampled_from(SCALES)), draw(st.sampled_from(SHIFTS))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    pad = draw(st.integers(0, 3))
    return make_values((rows, cols), dtype, device, scale, shift, "padded" if pad else "contiguous", pad)


@contextlib.contextmanager
def tile_cap(max_block_n):
    """Caps the column tile of the row-wise and point-wise launchers (None: the real heuristic),
    so narrow rows take the looped multi-tile path too."""
    if max_block_n is None:
        yield
        return
    from normzoo.kernels import elementwise, rowwise_norm

    patches = []
    for module in (rowwise_norm, elementwise):
        patches.append(mock.patch.object(module, "launch_config", capped(module.launch_config, max_block_n)))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def looped_width(data, max_block_n, widest, label="n"):
    """A row width to go with a tile cap: at most 6 tiles when capped (the interpreter's cost grows
    with the tiles a row takes; 2-6 of them exercise the loop as well as 20 would)."""
    return data.draw(st.integers(1, widest if max_block_n is None else min(widest, 6 * max_block_n)), label=label)


def close_with_slack(got, ref, what, dtype, scale=0.0, slack=0.0):
    """helpers.assert_close (no peer), plus an absolute ``slack`` (2-norm) that the reference cannot
    pin down: which way a value within a hair of a rounding midpoint went."""
    assert got.shape == ref.shape and got.dtype == dtype, f"{what}: {got.shape}/{got.dtype}, expected {dtype}"
    rtol = RTOL[dtype]
    denominator = max(ref.double().norm().item(), scale) + rtol * math.sqrt(max(ref.numel(), 1))
    err = rel_error(got, ref, rtol, scale)
    allowed = rtol + slack / denominator
    assert err <= allowed, f"{what}: relative error {err:.3g} > {allowed:.3g} ({dtype}, table {rtol:g})"


def rounding_ambiguity(v64, dtype, rel=1e-5):
    """Where rounding the float64 ``v64`` to ``dtype`` may go either way for a value computed in
    fp32 (within ``rel`` of it), and the size of the step between the two results."""
    lo, hi = (v64 * (1 - rel)).to(dtype).double(), (v64 * (1 + rel)).to(dtype).double()
    return lo != hi, (hi - lo).abs()


def fp32_ulp(t64):
    """One fp32 ulp at each value of the float64 ``t64`` (as float64)."""
    a = t64.detach().abs().float()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def layer_norm_f64(x64, w64, b64, eps, mean_off=False):
    """LayerNorm of the float64 rows ``x64`` (differentiable). ``mean_off``: each row's mean one
    fp32 ulp off, as a kernel that keeps its statistics in fp32 may hold it."""
    mean = x64.mean(-1, keepdim=True)
    if mean_off:
        mean = mean + fp32_ulp(mean)
    centred = x64 - mean
    y = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    y = y * w64 if w64 is not None else y
    return y + b64 if b64 is not None else y


def worse(peer, alternative, ref):
    """The peer term of the tolerance rule, for LayerNorm: PyTorch's result, or, where it is nearer
    the float64 result than that, the float64 result with each row's mean one fp32 ulp off. With
    |mean|/std ≫ 1 (x = 1 ± 1e-3) the rounding of the mean alone costs fp32 eps·|mean|/std in x_hat,
    and whether PyTorch's mean happened to round well is luck, not a bound (the long profile
    found kernels 2-3.4× PyTorch's error there, within 1 ulp of the mean)."""
    if peer is None:
        return alternative
    return max((peer, alternative), key=lambda t: (t.double() - ref.double()).norm().item())


@contextlib.contextmanager
def mean_conditioned_peers():
    """test_rowwise_kernels.run_and_compare with :func:`worse` peers for LayerNorm."""
    import test_rowwise_kernels

    real = test_rowwise_kernels.torch_peer

    def peer(x, weight, bias, dy, is_rms, eps):
        got = real(x, weight, bias, dy, is_rms, eps)
        if is_rms:
            return got
        results = []
        for mean_off in (False, True):
            leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
            y = layer_norm_f64(*leaves, eps, mean_off)
            grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.double())
            grads = list(grads) + [None] * (3 - len(grads))
            xd = leaves[0].detach()
            mean = xd.mean(-1) + (fp32_ulp(xd.mean(-1)) if mean_off else 0)
            rstd = torch.rsqrt((xd - mean[:, None]).square().mean(-1) + eps)
            results.append((y.detach(), *grads, mean, rstd))
        return tuple(None if p is None else worse(p, alt, ref) for p, ref, alt in zip(got, *results))

    with mock.patch.object(test_rowwise_kernels, "torch_peer", peer):
        yield


# ---------------------------------------------------------------------------------------------- rowwise


@given(data=st.data(), is_rms=st.booleans(), dtype=DTYPES, rows=st.integers(1, 40),
       affine=st.sampled_from(["none", "weight", "weight+bias"]), fp32_params=st.booleans(),
       max_block_n=st.sampled_from([None, 16, 64]))
def test_rowwise_kernels(data, is_rms, dtype, rows, affine, fp32_params, max_block_n, device):
    n = looped_width(data, max_block_n, 300)
    x = data.draw(tensors(dtype, rows, n, device))
    param_dtype = torch.float32 if fp32_params else dtype
    w = torch.randn(n, device=device).to(param_dtype) if affine != "none" else None
    b = torch.randn(n, device=device).to(param_dtype) if affine == "weight+bias" and not is_rms else None
    with mean_conditioned_peers():
        run_rowwise(x, w, b, is_rms, eps=data.draw(st.sampled_from([1e-5, 1e-6, 0.1])), max_block_n=max_block_n)


def _x_hat_plan(x_hat_dtype, x_dtype, w_dtype):
    """(dtype x_hat is rounded to or None, output dtype) of RMSNorm's x_hat_dtype, as documented."""
    if x_hat_dtype is None:
        return None, x_dtype
    if x_hat_dtype == "input":
        return (x_dtype if x_dtype in HALF else None), (torch.promote_types(x_dtype, w_dtype) if w_dtype else x_dtype)
    if w_dtype in HALF:
        return w_dtype, w_dtype
    return None, torch.promote_types(x_dtype, torch.float32)


@given(data=st.data(), is_rms=st.booleans(), dtype=DTYPES, fp32_params=st.booleans(),
       lead=st.lists(st.integers(1, 5), min_size=0, max_size=3), two_dim_shape=st.booleans(),
       layout=st.sampled_from(LAYOUTS), affine=st.sampled_from(["none", "weight", "weight+bias"]),
       weight_offset=st.sampled_from([0.0, 1.0, -0.5]), x_hat_dtype=st.sampled_from([None, "input", "weight"]),
       eps=st.sampled_from([1e-5, 1e-6, 0.1]), max_block_n=st.sampled_from([None, None, 16, 32]),
       scale=st.sampled_from(SCALES), shift=st.sampled_from(SHIFTS))
def test_rowwise_options(data, is_rms, dtype, fp32_params, lead, two_dim_shape, layout, affine, weight_offset,
                         x_hat_dtype, eps, max_block_n, scale, shift, device):
    """layer_norm / rms_norm through the public API on the kernels: any leading dims, one- or
    two-dim normalized shapes, strided and transposed inputs, weight_offset, and RMSNorm's
    x_hat_dtype (compared with the model's own formula, then every gradient with float64)."""
    if not is_rms:
        x_hat_dtype = None
    if affine == "none":
        weight_offset = 0.0  # an offset without a weight is an error (test_norm_api)
    n = looped_width(data, max_block_n, 200)
    if two_dim_shape:
        a = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]), label="split")
        shape = (a, n // a)
    else:
        shape = (n,)
    seeded(data)
    x = make_values((*lead, *shape), dtype, device, scale, shift, layout).requires_grad_()
    param_dtype = torch.float32 if fp32_params else dtype
    w = (torch.randn(shape, device=device) * 0.5 + (0.0 if weight_offset else 1.0)).to(param_dtype) \
        if affine != "none" else None
    b = torch.randn(shape, device=device).to(param_dtype) if affine == "weight+bias" and not is_rms else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    with tile_cap(max_block_n):
        if is_rms:
            y = NF.rms_norm(x, shape, w, eps, backend="triton", weight_offset=weight_offset, x_hat_dtype=x_hat_dtype)
        else:
            y = NF.layer_norm(x, shape, w, b, eps, backend="triton", weight_offset=weight_offset)
        dy = torch.randn(y.shape, device=device).to(y.dtype)
        grads = torch.autograd.grad(y, leaves, dy)
    round_to, out_dtype = _x_hat_plan(x_hat_dtype, dtype, w.dtype if w is not None else None)
    assert y.shape == x.shape and y.dtype == out_dtype, (y.shape, y.dtype, out_dtype)

    # float64: rows of n, the formula with x_hat unrounded (the backward treats rounding as the identity).
    x64 = x.detach().double().reshape(-1, n).requires_grad_()
    w64 = w.detach().double().reshape(n).requires_grad_() if w is not None else None
    b64 = b.detach().double().reshape(n).requires_grad_() if b is not None else None
    centred = x64 if is_rms else x64 - x64.mean(-1, keepdim=True)
    rstd64 = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    x_hat64 = centred * rstd64
    y64 = x_hat64 * (w64 + weight_offset) if w64 is not None else x_hat64
    y64 = y64 + b64 if b64 is not None else y64
    dy64 = dy.double().reshape(-1, n)
    grads64 = torch.autograd.grad(y64, [t for t in (x64, w64, b64) if t is not None], dy64)

    if x_hat_dtype is None:
        # Peer: PyTorch's own layer_norm / rms_norm at working precision, on weight + offset in fp32.
        xp = x.detach().clone().requires_grad_()
        wp = (w.detach().float() + weight_offset).requires_grad_() if w is not None else None
        bp = b.detach().float().requires_grad_() if b is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rms_norm warns that mixed dtypes skip its fused path
            yp = (torch.nn.functional.rms_norm(xp, shape, wp, eps) if is_rms else
                  torch.nn.functional.layer_norm(xp, shape, wp, bp, eps))
        peers = torch.autograd.grad(yp, [t for t in (xp, wp, bp) if t is not None], dy.to(yp.dtype))
        peers = [g.reshape(-1, n) if i == 0 else g.reshape(n) for i, g in enumerate(peers)] + [None] * 2
        yp = yp.reshape(-1, n)
        if not is_rms:
            alt = [t.detach().requires_grad_() if t is not None else None for t in (x64, w64, b64)]
            w_alt = alt[1] + weight_offset if alt[1] is not None else None
            y_alt = layer_norm_f64(alt[0], w_alt, alt[2], eps, mean_off=True)
            alts = torch.autograd.grad(y_alt, [t for t in alt if t is not None], dy64)
            yp = worse(yp, y_alt.detach(), y64)
            peers = [worse(p, a, r) for p, a, r in zip(peers, alts, grads64)] + [None] * (3 - len(alts))
        assert_close(y.reshape(-1, n), y64.detach(), "y", dtype, peer=yp)
        x_hat_used, slack = x_hat64, None
    else:
        # The model's formula (fp32 statistics, x_hat rounded, times weight + offset, one rounding).
        x32 = x.detach().float().reshape(-1, n)
        x_hat32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
        if round_to is not None:
            x_hat32 = x_hat32.to(round_to).float()
        model = x_hat32 * (w.detach().float().reshape(n) + weight_offset) if w is not None else x_hat32
        model = model.to(out_dtype)
        got = y.detach().reshape(-1, n)
        if round_to is not None:
            # Bit-identical, but where x_hat lay within a hair of a rounding midpoint (the kernels'
            # fp32 sums run in another order): there, x_hat one step off, y within that of the model.
            ambiguous = rounding_ambiguity(x_hat64.detach(), round_to)[0]
            differ = got != model
            assert not (differ & ~ambiguous).any(), \
                f"y differs from the model's formula at {int((differ & ~ambiguous).sum())} unambiguous elements"
            info = torch.finfo(round_to)  # a flip of a subnormal x_hat is one step of info.tiny·eps
            w_max = (w.detach().float().abs().max().item() + abs(weight_offset)) if w is not None else 1.0
            torch.testing.assert_close(got, model, rtol=2 * info.eps, atol=2 * info.tiny * info.eps * w_max)
        else:  # fp32 output, x_hat not rounded: within fp32 reassociation of the model
            torch.testing.assert_close(got, model, rtol=1e-5, atol=1e-6)
        peers = [None] * 3
        x_hat_used = x_hat64.detach()
        if round_to is not None:  # dw sums dy over x_hat as rounded
            ambiguous, step = rounding_ambiguity(x_hat_used, round_to)
            x_hat_used = x_hat32.double()
            slack = (dy64.abs() * step * ambiguous).sum(0).norm().item()
        else:
            slack = None

    grads = [g.reshape(-1, n) if i == 0 else g.reshape(n) for i, g in enumerate(grads)]
    w_eff = (w64.detach() + weight_offset) if w64 is not None else 1.0
    dx_scale = (dy64.abs() * abs(w_eff) * rstd64.detach()).norm().item()
    assert_close(grads[0], grads64[0], "dx", dtype, peer=peers[0], scale=dx_scale)
    if w is not None:
        dw_ref = (dy64 * x_hat_used).sum(0)
        dw_scale = (dy64 * x_hat_used).abs().sum(0).norm().item()
        if slack is None:
            assert_close(grads[1], dw_ref, "dw", param_dtype, peer=peers[1], scale=dw_scale)
        else:
            close_with_slack(grads[1], dw_ref, "dw", param_dtype, scale=dw_scale, slack=slack)
    if b is not None:
        assert_close(grads[2], grads64[2], "db", param_dtype, peer=peers[2], scale=dy64.abs().sum(0).norm().item())


# ---------------------------------------------------------------------------------------------- pointwise


@given(data=st.data(), activation=st.sampled_from(["tanh", "erf"]), dtype=DTYPES, rows=st.integers(1, 40),
       channels_first=st.booleans(), affine=st.sampled_from(["none", "weight", "weight+bias"]),
       fp32_params=st.booleans(), max_block_n=st.sampled_from([None, 16]))
def test_pointwise_kernels(data, activation, dtype, rows, channels_first, affine, fp32_params, max_block_n, device):
    cols = looped_width(data, max_block_n, 200, label="cols")
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
                  max_block_n, y_by_terms=True)


# ---------------------------------------------------------------------------------------------- fused


def build_norm(kind, n, dtype, affine, eps, alpha, shift, device):
    """A norm module on the kernels with random parameters (every one of them matters)."""
    kw = dict(device=device, dtype=dtype, backend="triton")
    on = affine != "none"
    if kind == "layernorm":
        norm = normzoo.LayerNorm(n, eps=eps, elementwise_affine=on, bias=affine == "weight+bias", **kw)
    elif kind == "rmsnorm":
        norm = normzoo.RMSNorm(n, eps=eps, elementwise_affine=on, **kw)
    elif kind == "dyt":
        norm = normzoo.DyT(n, alpha_init_value=alpha, elementwise_affine=on, bias=affine == "weight+bias", **kw)
    else:
        norm = normzoo.Derf(n, alpha_init_value=alpha, shift_init_value=shift, elementwise_affine=on,
                            bias=affine == "weight+bias", **kw)
    with torch.no_grad():
        for name, p in norm.named_parameters():
            if name in ("weight", "bias"):
                p.copy_(torch.randn(p.shape, device=device) * 0.5 + (1.0 if name == "weight" else 0.0))
    return norm


@given(data=st.data(), kind=st.sampled_from(list(fused.KINDS)), mode=st.sampled_from(list(fused.MODES)),
       h_dtype=DTYPES, x_is_fp32=st.booleans(), residual=st.sampled_from(["default", "float32", "h", "bfloat16"]),
       fp32_params=st.booleans(), lead=st.lists(st.integers(1, 7), min_size=1, max_size=2),
       layouts=st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)),
       affine=st.sampled_from(["none", "weight", "weight+bias"]), scale=st.sampled_from([1.0, 0.5, 3 ** -0.5]),
       eps=st.sampled_from([1e-5, 1e-6, 0.1]), alpha=st.sampled_from([0.05, 0.5, 2.0]),
       shift=st.sampled_from([0.0, -0.4]), outputs=st.sampled_from(["both", "y", "s"]),
       max_block_n=st.sampled_from([None, None, 16, 32]),
       values=st.tuples(st.sampled_from(SCALES), st.sampled_from(SHIFTS), st.sampled_from(SCALES),
                        st.sampled_from(SHIFTS)))
def test_fused_residual(data, kind, mode, h_dtype, x_is_fp32, residual, fp32_params, lead, layouts, affine, scale,
                        eps, alpha, shift, outputs, max_block_n, values, device):
    """fused_residual on the kernels against the unfused sequence in float64, every output and every
    gradient. The norm after the add sees s as stored (rounded to its dtype) and its backward treats
    that rounding as the identity: the float64 sequence takes s's stored values the same way."""
    if mode == "norm_add":
        outputs = "s"
    n = looped_width(data, max_block_n, 160)
    x_dtype = torch.float32 if x_is_fp32 else h_dtype
    # The stream in the promoted dtype, in fp32 beside 16-bit activations, in h's dtype, or narrower
    # than the activations (bf16 beside fp32: the norm after the add must read s as stored).
    residual_dtype = {"default": None, "float32": torch.float32, "h": h_dtype, "bfloat16": torch.bfloat16}[residual]
    s_dtype = residual_dtype or torch.promote_types(x_dtype, h_dtype)
    param_dtype = torch.float32 if fp32_params else h_dtype
    if not fp32_params and kind != "layernorm":  # any 16-bit dtype, as these norms take on their own
        param_dtype = data.draw(st.sampled_from([h_dtype, torch.float16, torch.bfloat16]), label="param_dtype")
    seeded(data)
    shape = (*lead, n)
    x = make_values(shape, x_dtype, device, values[0], values[1], layouts[0]).requires_grad_()
    h = make_values(shape, h_dtype, device, values[2], values[3], layouts[1]).requires_grad_()
    n1 = build_norm(kind, n, param_dtype, affine, eps, alpha, shift, device)
    n2 = build_norm(kind, n, param_dtype, affine, eps, alpha, shift, device) if mode == "norm_add_norm" else None
    norms = [m for m in (n1, n2) if m is not None]
    params = [p for m in norms for p in m.parameters()]
    names = [f"{i}.{name}" for i, m in enumerate(norms, 1) for name, _ in m.named_parameters()]

    with tile_cap(max_block_n):
        y, s = fused.fused_residual(x, h, n1, n2, mode=mode, scale=scale, residual_dtype=residual_dtype)
        assert s.shape == x.shape and s.dtype == s_dtype
        assert (y is None) == (mode == "norm_add") and (y is None or (y.shape == x.shape and y.dtype == h_dtype))
        gy = torch.randn(shape, device=device).to(h_dtype) if outputs in ("both", "y") else None
        gs = torch.randn(shape, device=device).to(s_dtype) if outputs in ("both", "s") else None
        used = [(t, g) for t, g in ((y, gy), (s, gs)) if g is not None]
        grads = torch.autograd.grad([t for t, _ in used], [x, h, *params], [g for _, g in used], allow_unused=True)

    # float64: the unfused sequence, with s's stored values (straight through: gradient as identity).
    rows = lambda t: t.reshape(-1, n)  # noqa: E731
    x64, h64 = rows(x.detach().double()).requires_grad_(), rows(h.detach().double()).requires_grad_()
    m64 = [on_reference(m, torch.float64) for m in norms]
    stored = rows(s.detach().double())

    def sequence(x_in, h_in, mean_off=False):
        apply = (lambda m, v: layer_norm_f64(v, m.weight, m.bias, m.eps, True)) if mean_off else (lambda m, v: m(v))
        s_out = x_in + (h_in if mode == "add_norm" else apply(m64[0], h_in))
        seen = s_out + (stored - s_out).detach()
        return (apply(m64[-1], seen) * scale if mode != "norm_add" else None), s_out

    y64, s64 = sequence(x64, h64)
    # Peer: the same sequence op by op at working precision (parameters in fp32), as test_fused's.
    xp, hp = rows(x.detach()).clone().requires_grad_(), rows(h.detach()).clone().requires_grad_()
    mp = [on_reference(m, torch.float32) for m in norms]
    added = hp if mode == "add_norm" else mp[0](hp).to(h_dtype)
    sp = (xp.float() + added.float()).to(s_dtype)
    yp = (mp[-1](sp) * scale).to(h_dtype) if mode != "norm_add" else None

    # s = x + N(h) and y = N(s) = core + bias are sums whose terms may cancel (16-bit DyT's fast tanh
    # errs relative to tanh, not to y; see test_pointwise_kernels.run_and_compare): judge them
    # against their terms' size.
    def parts(m, v):
        out = m(v).detach()
        bias = getattr(m, "bias", None)
        return (out - bias.detach()).abs() + bias.detach().abs() if bias is not None else out.abs()

    s_terms = x64.detach().abs() + (h64.detach().abs() if mode == "add_norm" else parts(m64[0], h64.detach()))
    if kind == "layernorm":  # and its mean one fp32 ulp off, where PyTorch's peer was luckier (see worse)
        x_alt, h_alt = x64.detach().requires_grad_(), h64.detach().requires_grad_()
        y_alt, s_alt = sequence(x_alt, h_alt, mean_off=True)
        s_peer = worse(sp.detach(), s_alt.detach(), s64)
        y_peer = worse(yp.detach(), y_alt.detach(), y64) if y is not None else None
    else:
        s_peer, y_peer = sp.detach(), (yp.detach() if y is not None else None)
    assert_close(rows(s), s64.detach(), f"{kind} {mode} s", s_dtype, peer=s_peer, scale=s_terms.norm().item())
    if y is not None:
        y_terms = parts(m64[-1], stored) * scale
        assert_close(rows(y), y64.detach(), f"{kind} {mode} y", h_dtype, peer=y_peer, scale=y_terms.norm().item())

    gy64 = rows(gy.double()) if gy is not None else None
    gs64 = rows(gs.double()) if gs is not None else None

    def loss(yv, sv, cast=lambda t: t):
        total = 0
        if gy is not None:
            total = total + (yv * cast(rows(gy))).sum()
        if gs is not None:
            total = total + (sv * cast(rows(gs))).sum()
        return total

    params64 = [p for m in m64 for p in m.parameters()]
    grads64 = torch.autograd.grad(loss(y64, s64, lambda t: t.double()), [x64, h64, *params64], allow_unused=True)
    params_p = [p for m in mp for p in m.parameters()]
    peers = torch.autograd.grad(loss(yp, sp, lambda t: t.float()).float(), [xp, hp, *params_p], allow_unused=True)
    if kind == "layernorm":
        alts = torch.autograd.grad(loss(y_alt, s_alt, lambda t: t.double()), [x_alt, h_alt, *params64],
                                   allow_unused=True)
        peers = [worse(p, a, r) if a is not None and r is not None else p for p, a, r in zip(peers, alts, grads64)]

    # The size of each gradient's terms: dx = ds + J_outᵀ(dy·scale), dh = J_N1ᵀ(…) (or = dx for add_norm).
    zeros = torch.zeros_like(x64)
    g_out = gy64.abs() * scale if gy64 is not None else zeros
    g_sum = gs64.abs() if gs64 is not None else zeros
    sizes = {}
    if mode == "add_norm":
        through, sizes["1"] = term_sizes(kind, m64[0], stored, g_out)
        dx_size = dh_size = g_sum + through
    elif mode == "norm_add":
        dx_size = g_sum
        dh_size, sizes["1"] = term_sizes(kind, m64[0], h64.detach(), g_sum)
    else:
        through, sizes["2"] = term_sizes(kind, m64[1], stored, g_out)
        dx_size = g_sum + through
        dh_size, sizes["1"] = term_sizes(kind, m64[0], h64.detach(), dx_size)

    wrt = [("dx", x, dx_size.norm().item()), ("dh", h, dh_size.norm().item())]
    wrt += [(f"d{name}", p, sizes[name.split(".")[0]][name.split(".")[1]]) for name, p in zip(names, params)]
    for (name, leaf, size), g, g64, peer in zip(wrt, grads, grads64, peers):
        if g64 is None:  # that output was not used: no gradient, or a zero one
            assert g is None or not g.any(), f"{kind} {mode} {name}: should be absent or zero"
            continue
        assert g is not None, f"{kind} {mode} {name} missing"
        g = rows(g) if g.dim() == len(shape) else g
        assert_close(g, g64, f"{kind} {mode} {name}", leaf.dtype, peer=peer, scale=size)


# ---------------------------------------------------------------------------------------------- head-wise


def headwise_sizes(x64, w64, dy64, eps, norm):
    """The size of the terms of dx (its norm) and of dw (per column, or one scale) for the
    head-wise norms, from the formulas of normzoo.reference.headwise_norm_backward."""
    n = x64.shape[-1]
    wabs = w64.abs() if w64 is not None else 1.0
    sumsq = x64.square().sum(-1, keepdim=True)
    if norm == "rms":
        r = torch.rsqrt(sumsq / n + eps)
    elif norm == "l2":
        r = 1 / sumsq.sqrt().clamp_min(eps)
    else:
        total = x64.sum(-1, keepdim=True)
        r = torch.rsqrt((sumsq + total ** 2) / (n + 1) + eps)
    x_hat = x64 * r
    wdy = dy64.abs() * wabs
    c = (x_hat.abs() * wdy).sum(-1, keepdim=True)
    if norm == "rms":
        second = x_hat.abs() * c / n
    elif norm == "l2":
        second = x_hat.abs() * c
    else:
        second = (x_hat + r * total).abs() * c / (n + 1)
    dx = ((wdy + second) * r).norm().item()
    per_column = (dy64 * x_hat).abs().reshape(-1, n).sum(0)
    dw = per_column.norm().item() if w64 is None or w64.numel() != 1 else per_column.sum().item()
    return dx, dw


@given(data=st.data(), norm=st.sampled_from(["rms", "l2"]), dtype=DTYPES, batch=st.integers(1, 3),
       seq=st.integers(1, 5), kv_heads=st.integers(1, 3), group=st.integers(1, 3), head_dim=st.integers(1, 48),
       layout=st.sampled_from(["per_head", "all_heads", "heads_first"]),
       weights=st.sampled_from(["none", "channel", "scale", "q_only"]), fp32_weights=st.booleans(),
       eps=st.sampled_from([1e-6, 1e-3, 0.1]), grads_of=st.sampled_from(["both", "q", "k"]),
       scale=st.sampled_from(SCALES), shift=st.sampled_from(SHIFTS))
def test_qk_norm(data, norm, dtype, batch, seq, kv_heads, group, head_dim, layout, weights, fp32_weights, eps,
                 grads_of, scale, shift, device):
    """qk_norm on q and k read in place from one fused (B, S, (H + 2·Hkv)·D) projection: per head
    (Qwen3), over all heads (OLMo 2), or as (B, H, S, D) (three levels: copied); grouped-query k."""
    heads = kv_heads * group
    seeded(data)
    qkv = make_values((batch, seq, (heads + 2 * kv_heads) * head_dim), dtype, device, scale, shift)
    q = qkv[..., : heads * head_dim]
    k = qkv[..., heads * head_dim: (heads + kv_heads) * head_dim]
    if layout != "all_heads":
        q, k = q.unflatten(-1, (heads, head_dim)), k.unflatten(-1, (kv_heads, head_dim))
    if layout == "heads_first":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    # A per-channel weight of a one-wide k (or q) is a (1,) tensor, which qk_norm takes for a
    # scale: beside a per-channel q weight it refuses the pair (ValueError).
    assume(weights != "channel" or (q.shape[-1] == 1) == (k.shape[-1] == 1))
    w_dtype = torch.float32 if fp32_weights else dtype

    def weight(t):
        if weights in ("channel", "q_only") and t is q or weights == "channel":
            return (torch.randn(t.shape[-1], device=device) * 0.5 + 1).to(w_dtype)
        if weights == "scale":
            return torch.tensor([data.draw(st.sampled_from([0.5, 3.0, 20.0]), label="g")], device=device).to(w_dtype)
        return None

    wq, wk = weight(q), weight(k)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (q, k, wq, wk)]
    qo, ko = NF.qk_norm(*leaves, eps=eps, norm=norm, backend="triton")
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype and ko.dtype == dtype
    assert qo.is_contiguous() and ko.is_contiguous()
    dq = torch.randn(qo.shape, device=device).to(dtype) if grads_of != "k" else None
    dk = torch.randn(ko.shape, device=device).to(dtype) if grads_of != "q" else None
    used = [(t, g) for t, g in ((qo, dq), (ko, dk)) if g is not None]
    params = [t for t in leaves if t is not None]
    grads = torch.autograd.grad([t for t, _ in used], params, [g for _, g in used], allow_unused=True)

    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (q, k, wq, wk)]
    qo64, ko64 = (headwise_formula(leaves64[0], leaves64[2], eps, norm),
                  headwise_formula(leaves64[1], leaves64[3], eps, norm))
    assert_close(qo, qo64, "q", dtype)
    assert_close(ko, ko64, "k", dtype)
    dq64 = dq.double() if dq is not None else torch.zeros_like(qo64)
    dk64 = dk.double() if dk is not None else torch.zeros_like(ko64)
    grads64 = torch.autograd.grad((qo64, ko64), [t for t in leaves64 if t is not None], (dq64, dk64))
    sizes_q = headwise_sizes(leaves64[0].detach(), wq.double() if wq is not None else None, dq64, eps, norm)
    sizes_k = headwise_sizes(leaves64[1].detach(), wk.double() if wk is not None else None, dk64, eps, norm)
    named = [("dq", sizes_q[0]), ("dk", sizes_k[0]), ("dwq", sizes_q[1]), ("dwk", sizes_k[1])]
    named = [nm for nm, t in zip(named, (q, k, wq, wk)) if t is not None]
    for (name, size), g, g64, leaf in zip(named, grads, grads64, params):
        if g is None:  # an input whose output was not used
            assert not g64.any(), name
            continue
        assert_close(g, g64, name, leaf.dtype, scale=size)


@given(data=st.data(), norm=st.sampled_from(["l2", "crms"]), dtype=DTYPES,
       lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), n=st.integers(1, 300),
       layout=st.sampled_from(LAYOUTS), fp32_scale=st.booleans(), g=st.sampled_from([0.5, 1.0, 17.0]),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]), scale=st.sampled_from(SCALES), shift=st.sampled_from(SHIFTS))
def test_scale_and_crms_norm(data, norm, dtype, lead, n, layout, fp32_scale, g, eps, scale, shift, device):
    """scale_norm (g·x/max(‖x‖, eps)) and crms_norm on any leading dims and layout (copied where
    the rows do not fold into two levels)."""
    seeded(data)
    x = make_values((*lead, n), dtype, device, scale, shift, layout).requires_grad_()
    leaves = [x]
    if norm == "l2":
        gain = torch.tensor([g], device=device).to(torch.float32 if fp32_scale else dtype).requires_grad_()
        leaves.append(gain)
        y = NF.scale_norm(x, gain, eps, backend="triton")
    else:
        y = NF.crms_norm(x, eps, backend="triton")
    assert y.shape == x.shape and y.dtype == dtype
    dy = torch.randn(y.shape, device=device).to(dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = headwise_formula(leaves64[0], leaves64[1] if norm == "l2" else None, eps, norm)
    assert_close(y, y64, "y", dtype)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    sizes = headwise_sizes(leaves64[0].detach(), leaves64[1].detach() if norm == "l2" else None, dy.double(), eps,
                           norm)
    assert_close(grads[0], grads64[0], "dx", dtype, scale=sizes[0])
    if norm == "l2":
        assert_close(grads[1], grads64[1], "dscale", leaves[1].dtype, scale=sizes[1])


# ---------------------------------------------------------------------------------------------- LayerNorm2d


@pytest.mark.skipif(not hasattr(normzoo, "LayerNorm2d"), reason="normzoo has no LayerNorm2d (yet)")
@given(data=st.data(), dtype=DTYPES, batch=st.integers(1, 3), channels=st.integers(1, 48),
       height=st.integers(1, 5), width=st.integers(1, 5), channels_last=st.booleans(),
       affine=st.sampled_from(["none", "weight", "weight+bias"]), fp32_params=st.booleans(),
       weight_offset=st.sampled_from([0.0, 1.0]), eps=st.sampled_from([1e-6, 1e-5, 0.1]),
       scale=st.sampled_from(SCALES), shift=st.sampled_from(SHIFTS))
def test_layernorm2d(data, dtype, batch, channels, height, width, channels_last, affine, fp32_params, weight_offset,
                     eps, scale, shift, device):
    """LayerNorm2d over the channels of (B, C, H, W), NCHW- or channels_last-contiguous, against
    the float64 LayerNorm of the (B, H, W, C) permutation."""
    if affine == "none":
        weight_offset = 0.0  # an offset without a weight is an error (test_norm_api)
    seeded(data)
    x = make_values((batch, channels, height, width), dtype, device, scale, shift)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    param_dtype = torch.float32 if fp32_params else dtype
    layer = normzoo.LayerNorm2d(channels, eps=eps, elementwise_affine=affine != "none", bias=affine == "weight+bias",
                                device=device, dtype=param_dtype, backend="triton", weight_offset=weight_offset)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, device=device) * 0.5 + (1.0 if name == "weight" and not weight_offset else 0))
    x.requires_grad_()
    params = list(layer.parameters())
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    dy = torch.randn(y.shape, device=device).to(dtype)
    grads = torch.autograd.grad(y, [x, *params], dy)

    as_rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, channels)  # noqa: E731
    x64 = as_rows(x.detach().double()).requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    w_eff = p64[0] + weight_offset if p64 else None
    y64 = torch.nn.functional.layer_norm(x64, (channels,), w_eff, p64[1] if len(p64) > 1 else None, eps)
    dy64 = as_rows(dy.double())
    grads64 = torch.autograd.grad(y64, [x64, *p64], dy64)
    xp = as_rows(x.detach()).clone().requires_grad_()
    pp = [p.detach().float().requires_grad_() for p in params]
    yp = torch.nn.functional.layer_norm(xp, (channels,), pp[0] + weight_offset if pp else None,
                                        pp[1] if len(pp) > 1 else None, eps)
    peers = torch.autograd.grad(yp, [xp, *pp], dy64.to(yp.dtype))
    alt = [x64.detach().requires_grad_(), *(p.detach().requires_grad_() for p in p64)]
    y_alt = layer_norm_f64(alt[0], alt[1] + weight_offset if len(alt) > 1 else None, alt[2] if len(alt) > 2 else None,
                           eps, mean_off=True)
    alts = torch.autograd.grad(y_alt, alt, dy64)
    peers = [worse(p, a, r) for p, a, r in zip(peers, alts, grads64)]
    assert_close(as_rows(y), y64.detach(), "y", dtype, peer=worse(yp, y_alt.detach(), y64))

    centred = x64.detach() - x64.detach().mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    wabs = w_eff.detach().abs() if w_eff is not None else 1.0
    sizes = [(dy64.abs() * wabs * rstd).norm().item(), (dy64 * centred * rstd).abs().sum(0).norm().item(),
             dy64.abs().sum(0).norm().item()]
    for name, g, g64, peer, size, leaf in zip(["dx", "dweight", "dbias"], grads, grads64, peers, sizes, [x, *params]):
        assert_close(as_rows(g) if g.dim() == 4 else g, g64, name, leaf.dtype, peer=peer, scale=size)
