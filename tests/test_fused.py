"""Norms fused with a residual add (normzoo.fused) and the ResidualStack built on them.

Every fused op, on the reference and on the Triton kernels (under the interpreter on CPU), against
the unfused PyTorch sequence computed in float64: both outputs and every gradient, for each norm
kind, 32- and 16-bit activations, an fp32 residual stream, odd widths and the looped long-row path.
"""

import math
import warnings

import pytest
import torch
import torch.utils.flop_counter

import normzoo
import normzoo.functional as NF
from helpers import assert_close, capped, model_rms_norm, model_x_hat, on_reference, rel_error, term_sizes
from normzoo import fused

KINDS = ["layernorm", "rmsnorm", "dyt", "derf"]
BACKENDS = ["torch", "triton"]
# (activation dtype, residual dtype): fp32 throughout, bf16 throughout, bf16 activations beside an
# fp32 residual stream (the x given to the op, and the sum s, are fp32).
PRECISIONS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def make_norm(kind, n, backend, dtype=torch.float32, device="cpu", weight_offset=0.0, **affine):
    """``affine``: the class's own flags (elementwise_affine, bias)."""
    cls = {"layernorm": normzoo.LayerNorm, "rmsnorm": normzoo.RMSNorm, "dyt": normzoo.DyT, "derf": normzoo.Derf}[kind]
    offset = {"weight_offset": weight_offset} if weight_offset else {}
    norm = cls(n, backend=backend, device=device, dtype=dtype, **offset, **affine)
    with torch.no_grad():  # away from the initial values, so every parameter matters
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return norm


def watch_terms(norm):
    """Records the input of ``norm``'s next call and the gradient that reaches its output:
    ``[input, output_grad]``, filled in by the forward and the backward."""
    seen = [None, None]

    def hook(module, args, out):
        seen[0] = args[0].detach()
        out.register_hook(lambda g: seen.__setitem__(1, g))

    norm.register_forward_hook(hook)
    return seen


def grad_terms(kind, norm, v, g):
    """:func:`helpers.term_sizes` of a watched float64 norm (input, gradient reaching its output):
    ``(‖input-gradient terms‖, {parameter: Σ|terms|})``. The input-gradient size counts for
    LayerNorm and RMSNorm only, whose input gradient cancels (a one-element LayerNorm's is exactly
    0, from terms of size rstd = 1/√eps); DyT's and Derf's does not. Their scalar gradients do
    (dalpha, dshift: sums over every element), so those are judged against Σ|terms|."""
    if g is None:  # an unused norm
        return 0.0, {}
    through, params = term_sizes(kind, norm, v, g.abs())
    return (through.norm().item() if kind in ("layernorm", "rmsnorm") else 0.0), params


def unfused(mode, x, h, n1, n2, scale, stored_as=None):
    """The textbook sequence, op by op. ``stored_as``: the dtype the fused ops store the sum in;
    the float64 oracle rounds its sum to it (the gradient passes the rounding as autograd passes a
    cast), because the fused ops normalize and differentiate the sum as stored. Without that the
    oracle would be another function: in bf16 a scalar gradient such as Derf's dalpha, a sum over
    every element that cancels, moved by up to 200x the fp32 tolerance from the rounding alone."""
    if mode == "add_norm":
        s = _as_stored(x + h, stored_as)
        return n1(s) * scale, s
    s = _as_stored(x + n1(h), stored_as)
    return (n2(s) * scale if mode == "norm_add_norm" else None), s


def _as_stored(s, dtype):
    return s if dtype is None else s + (s.to(dtype).to(s.dtype) - s).detach()


def run_fused(mode, x, h, n1, n2, scale, residual_dtype=None):
    if mode == "add_norm":
        return NF.add_norm(x, h, n1, scale=scale, residual_dtype=residual_dtype)
    if mode == "norm_add":
        return None, NF.norm_add(x, h, n1, residual_dtype=residual_dtype)
    return NF.norm_add_norm(x, h, n1, n2, scale=scale, residual_dtype=residual_dtype)


def check_against_float64(kind, mode, act_dtype, res_dtype, n, backend, device, rows=5, scale=0.7, dy_on=True,
                          ds_on=True, weight_offset=0.0, affine=({}, {}), frozen=(), param_dtype=torch.float32):
    """``affine``: each norm's flags (make_norm); ``frozen``: parameters that take no gradient, as
    "1.weight" (the first norm's) or "2.bias"; ``param_dtype``: the norms' parameters'."""
    n1 = make_norm(kind, n, backend, param_dtype, device, weight_offset, **affine[0])
    n2 = (make_norm(kind, n, backend, param_dtype, device, weight_offset, **affine[1])
          if mode == "norm_add_norm" else None)
    for i, m in enumerate((n1, n2)):
        for name, p in (m.named_parameters() if m is not None else ()):
            p.requires_grad_(f"{i + 1}.{name}" not in frozen)
    x = torch.randn(rows, n, device=device).to(res_dtype).requires_grad_()
    h = torch.randn(rows, n, device=device).to(act_dtype).requires_grad_()
    y, s = run_fused(mode, x, h, n1, n2, scale)
    assert s.dtype == res_dtype and (y is None or y.dtype == act_dtype)
    with torch.no_grad():  # inference's forward, which keeps no statistics: the same outputs
        y_inference, s_inference = run_fused(mode, x, h, n1, n2, scale)
    assert torch.equal(s_inference, s) and (y is None) is (y_inference is None)
    assert y is None or torch.equal(y_inference, y)

    x64, h64 = x.detach().double().requires_grad_(), h.detach().double().requires_grad_()
    m1, m2 = on_reference(n1, torch.float64), (on_reference(n2, torch.float64) if n2 is not None else None)
    seen = [watch_terms(m) for m in (m1, m2) if m is not None]
    y64, s64 = unfused(mode, x64, h64, m1, m2, scale, stored_as=res_dtype)
    xp, hp = x.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
    q1, q2 = on_reference(n1), (on_reference(n2) if n2 is not None else None)
    yp, sp = unfused(mode, xp, hp, q1, q2, scale)
    assert_close(s, s64.to(s.device), f"{mode} s", peer=sp)
    if y is not None:
        assert_close(y, y64.to(y.device), f"{mode} y", peer=yp)

    # Incoming gradients in the outputs' dtypes, so every path sees the same values.
    gy = torch.randn(rows, n, device=device).to(y.dtype) if (y is not None and dy_on) else None
    gs = torch.randn(rows, n, device=device).to(s.dtype) if ds_on else None

    def loss_of(outputs):
        return sum(((t * g.to(t.dtype)).sum() for t, g in zip(outputs, (gy, gs)) if g is not None and t is not None),
                   torch.zeros((), device=device))

    trained = [p.requires_grad for m in (n1, n2) if m is not None for p in m.parameters()]
    keep = lambda ps: [p for p, t in zip(ps, trained) if t]  # noqa: E731
    params = keep([p for m in (n1, n2) if m is not None for p in m.parameters()])
    params64 = keep([p.requires_grad_() for m in (m1, m2) if m is not None for p in m.parameters()])
    params_peer = keep([p.requires_grad_() for m in (q1, q2) if m is not None for p in m.parameters()])
    grads = torch.autograd.grad(loss_of((y, s)), [x, h, *params], allow_unused=True)
    grads64 = torch.autograd.grad(loss_of((y64, s64)).double(), [x64, h64, *params64], allow_unused=True)
    peers = torch.autograd.grad(loss_of((yp, sp)), [xp, hp, *params_peer], allow_unused=True)
    # dx and dh pass through the norms' input gradients, which cancel (a one-element LayerNorm's is
    # exactly 0, from terms of size rstd = 1/√eps): judge them against the terms, as
    # test_rowwise_kernels does, plus the sum's gradient that joins them.
    terms = [grad_terms(kind, m, *s_) for m, s_ in zip((m1, m2), seen)]
    input_terms = sum(t[0] for t in terms) + (gs.double().norm().item() if gs is not None else 0.0)
    # norm_add_norm's first norm takes dx, whose rounding error scales with the second norm's
    # input-gradient terms, not with dx (a one-element LayerNorm: rstd·u·|dy|, where dx = ds
    # exactly): its parameter gradients, column sums over dx, are judged against those terms too.
    first = {}
    if (mode == "norm_add_norm" and kind in ("layernorm", "rmsnorm")  # DyT's, Derf's dx does not cancel
            and seen[0][1] is not None and seen[1][1] is not None):
        through2, _ = term_sizes(kind, m2, seen[1][0], seen[1][1].abs())
        first = term_sizes(kind, m1, seen[0][0], seen[0][1].abs() + through2)[1]
    names = ["dx", "dh"] + keep([f"d{name}" for m in (n1, n2) if m is not None for name, _ in m.named_parameters()])
    scales = [input_terms, input_terms] + keep([
        max(t[1].get(name, 0.0) if name in ("alpha", "shift") else 0.0, first.get(name, 0.0) if i == 0 else 0.0)
        for i, (m, t) in enumerate(zip((m1, m2), terms)) for name, _ in m.named_parameters()])
    for name, g, g64, peer, wrt, scale in zip(names, grads, grads64, peers, [x, h, *params], scales, strict=True):
        if g64 is None:  # not in the graph (a norm whose output nothing used): None, as unfused
            assert g is None, f"{mode}: {name} should be absent"
            continue
        assert g is not None, f"{mode}: {name} missing"
        # Sums that cancel are judged against the size of their terms (helpers.assert_close): dx,
        # dh and the sums as computed above; a parameter gradient against Σ|its column sums| at least.
        assert_close(g, g64.to(g.device), f"{kind} {mode} {name}", dtype=wrt.dtype, peer=peer,
                     scale=max(scale, g64.abs().sum().item() if g64.numel() <= n else 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS, ids=["fp32", "bf16", "bf16-fp32res"])
@pytest.mark.parametrize("mode", fused.MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_fused_ops_match_the_unfused_sequence(kind, mode, precision, backend, device):
    act_dtype, res_dtype = precision
    check_against_float64(kind, mode, act_dtype, res_dtype, 97, backend, device)


@pytest.mark.parametrize("precision", PRECISIONS[::2], ids=["fp32", "bf16-fp32res"])
@pytest.mark.parametrize("mode", fused.MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_fused_ops_with_partial_sums(kind, mode, precision, device):
    # 37 rows: two programs, whose fp32 partials (with the sum's gradient, the second dx and the
    # scale) a reduce launch sums; the other tests' few rows take the one-program path.
    act_dtype, res_dtype = precision
    check_against_float64(kind, mode, act_dtype, res_dtype, 97, "triton", device, rows=37)


@pytest.mark.parametrize("n", [1, 8, 33])
@pytest.mark.parametrize("mode", fused.MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_fused_ops_at_other_widths(kind, mode, n, device):
    check_against_float64(kind, mode, torch.float32, torch.float32, n, "triton", device, rows=9)


AFFINES = {  # (first norm's flags, second norm's flags, frozen parameters)
    "no-affine": ({"elementwise_affine": False}, {"elementwise_affine": False}, ()),
    "no-bias": ({"bias": False}, {"bias": False}, ()),
    "first-only": ({}, {"elementwise_affine": False}, ()),
    "second-only": ({"elementwise_affine": False}, {}, ()),
    "frozen": ({}, {}, ("1.weight", "2.bias", "1.alpha", "2.shift")),
}


@pytest.mark.parametrize("affine", sorted(AFFINES))
@pytest.mark.parametrize("mode", fused.MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_affine_flags_and_frozen_parameters(kind, mode, affine, device, monkeypatch):
    """Each norm with or without its weight and bias, the two norms of norm_add_norm differing, and
    parameters that take no gradient: every gradient still right, none computed for a frozen one.
    37 rows: two programs and the reduce (norm_add_norm's one-pass backward sums four columns)."""
    from normzoo import kernels

    first, second, frozen = AFFINES[affine]
    if affine == "no-bias" and kind == "rmsnorm":
        first, second = {"elementwise_affine": True}, {"elementwise_affine": True}  # RMSNorm has no bias flag
    asked = []  # what the one-pass launcher was asked to compute: nothing for a frozen parameter
    for name in ("rowwise_peri_backward", "pointwise_peri_backward"):
        launcher = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=launcher, **k: asked.append(k) or _f(*a, **k))
    check_against_float64(kind, mode, torch.float32, torch.float32, 24, "triton", device, rows=37,
                          affine=(first, second), frozen=frozen)
    assert len(asked) == (mode == "norm_add_norm")
    if asked and affine == "frozen":
        assert not asked[0]["compute_dw1"] and asked[0]["db2_dtype"] is None
        assert asked[0]["compute_dw2"] and (asked[0]["db1_dtype"] is not None) == (kind != "rmsnorm")


@pytest.mark.parametrize("n", [4096, 4112])
@pytest.mark.parametrize("precision", PRECISIONS[1:], ids=["bf16", "bf16-fp32res"])
def test_fused_backward_at_the_16bit_single_tile_limit(n, precision, device):
    """The fused residual backward keeps 16-bit rows up to 4096 in one tile (an fp32 stream takes
    the looped path past 2048, but for RMSNorm's norm_add_norm): both sides of that limit, through
    the kernels, and the rule."""
    from normzoo.kernels.heuristics import launch_config

    act_dtype, res_dtype = precision
    # dx stored once, or twice, or norm_add_norm's one pass (its two kernels past the limit)
    for pass_ in ("bwd_res", "bwd_res2", "bwd_peri"):
        cfg = launch_config("layernorm", pass_, n, res_dtype, torch.device(device))  # the sum's dtype
        assert cfg.single_tile == (n == 4096 and res_dtype.itemsize == 2)
    for mode in ("add_norm", "norm_add_norm"):
        check_against_float64("layernorm", mode, act_dtype, res_dtype, n, "triton", device, rows=3)
    # RMSNorm's norm_add_norm keeps an fp32 stream's 4096-wide rows in its one pass too
    check_against_float64("rmsnorm", "norm_add_norm", act_dtype, res_dtype, n, "triton", device, rows=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS[1:], ids=["bf16", "bf16-fp32res"])
@pytest.mark.parametrize("mode", fused.MODES)
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_weight_offset_norms(kind, mode, precision, backend, device):
    """Gemma 2/3's sandwich norms are (1 + w) RMSNorms: the fused ops take a weight_offset norm
    (both norms of norm_add_norm share it), added in fp32 as in the plain layers."""
    check_against_float64(kind, mode, *precision, 24, backend, device, weight_offset=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", fused.MODES)
@pytest.mark.parametrize("kind", ["rmsnorm", "dyt", "derf"])
def test_16bit_parameters_beside_fp32_activations(kind, mode, param_dtype, backend, device):
    """RMSNorm, DyT and Derf take any 16- or 32-bit float parameters on their own (T5 in fp16 feeds
    fp32 activations to an fp16 norm; swap(to="dyt") builds a norm's replacement in its weight's
    dtype), and so do the fused ops: the parameters' values in fp32, each gradient in its dtype."""
    check_against_float64(kind, mode, torch.float32, torch.float32, 24, backend, device, param_dtype=param_dtype)


def test_weight_offset_must_match_across_the_two_norms():
    with pytest.raises(ValueError, match="share a weight_offset"):
        NF.norm_add_norm(torch.randn(2, 4), torch.randn(2, 4), normzoo.RMSNorm(4, weight_offset=1.0),
                         normzoo.RMSNorm(4))
    # torch's RMSNorm has no weight_offset attribute (read as 0.0): the message names it, no AttributeError
    for pair in ((torch.nn.RMSNorm(4), normzoo.RMSNorm(4, weight_offset=1.0)),
                 (normzoo.RMSNorm(4, weight_offset=1.0), torch.nn.RMSNorm(4))):
        with pytest.raises(ValueError, match=r"share a weight_offset .*got (0\.0 and 1\.0|1\.0 and 0\.0)"):
            NF.norm_add_norm(torch.randn(2, 4), torch.randn(2, 4), *pair)


# (activations h, residual stream x and s, weights) of models whose RMSNorm rounds x̂ (x_hat_dtype).
X_HAT_PRECISIONS = [(torch.bfloat16, torch.bfloat16, torch.bfloat16),  # Llama in bf16
                    (torch.bfloat16, torch.bfloat16, torch.float32),  # fp32 weights: y in fp32, as the model's
                    (torch.bfloat16, torch.float32, torch.float32),  # an fp32 stream: its norm rounds to fp32 (none)
                    (torch.float16, torch.float16, torch.float16)]


def _straight_through(t, dtype):
    """t rounded to dtype in value, the identity to autograd (as the kernels differentiate a cast)."""
    return t + (t.to(dtype).to(t.dtype) - t).detach()


@pytest.mark.parametrize("path", ["torch", "triton", "triton-looped"])
@pytest.mark.parametrize("x_hat_dtype", ["input", "weight"])
@pytest.mark.parametrize("precision", X_HAT_PRECISIONS, ids=["bf16", "bf16-fp32w", "bf16-fp32res", "fp16"])
@pytest.mark.parametrize("mode", fused.MODES)
def test_x_hat_dtype_norms_compute_the_models_own_formula(mode, precision, x_hat_dtype, path, device, monkeypatch):
    """An RMSNorm that rounds x̂ as a model does (Llama's "input", T5's "weight") gives in a fused op
    what the model's own code gives on the same values: y = the model's norm of s, in its dtype,
    bit for bit on the reference and within one rounding on the kernels (their fp32 sums run in
    another order); N(h) kept in fp32 before the add, as every fused op keeps it. Every gradient
    against float64 autograd of that formula, the roundings passed straight through."""
    act, res, w_dtype = precision
    backend = path.split("-")[0]
    if path == "triton-looped":
        from normzoo.kernels import rowwise_norm as launchers
        monkeypatch.setattr(launchers, "launch_config", capped(launchers.launch_config, 16))
    n, eps = 40, 1e-6
    norms = [normzoo.RMSNorm(n, eps=eps, backend=backend, device=device, dtype=w_dtype, x_hat_dtype=x_hat_dtype)
             for _ in range(2 if mode == "norm_add_norm" else 1)]
    with torch.no_grad():
        for m in norms:
            m.weight.normal_(1, 0.5)
    n1, n2 = norms[0], norms[-1]
    x = (torch.randn(6, n, device=device) * 3).to(res).requires_grad_()
    h = (torch.randn(6, n, device=device) * 3).to(act).requires_grad_()
    y, s = run_fused(mode, x, h, n1, n2 if mode == "norm_add_norm" else None, 1.0)

    xd, hd, w1, w2 = x.detach(), h.detach(), n1.weight.detach(), n2.weight.detach()
    if mode == "add_norm":
        s_model = (xd.float() + hd.float()).to(res)
    else:
        s_model = (xd.float() + w1.float() * model_x_hat(hd, eps, x_hat_dtype, w_dtype).float()).to(res)
    y_model = model_rms_norm(s_model, w1 if mode == "add_norm" else w2, eps, x_hat_dtype) if y is not None else None
    for got, want, what in ((s, s_model, "s"), (y, y_model, "y")):
        if got is None:
            continue
        assert got.dtype == want.dtype, f"{what}: {got.dtype}, the model's {want.dtype}"
        if backend == "torch":
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{what} not the model's bit for bit")
        elif got.dtype is torch.float32:  # x̂ rounded to 16 bits where the model does: 2^-9 off if not
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{what}: not the model's rounding")
        else:  # at most one flipped rounding, of x̂ or of the output, and rarely
            rtol = torch.finfo(got.dtype).eps
            torch.testing.assert_close(got, want, rtol=rtol, atol=0, msg=f"{what}: more than one rounding off")
            assert (got != want).float().mean() < 0.05, f"{what}: roundings flipped in many places"

    gy = torch.randn_like(y) if y is not None else None
    gs = torch.randn_like(s)
    params = [m.weight for m in norms]
    grads = torch.autograd.grad([t for t in (y, s) if t is not None], [x, h, *params],
                                [g for g in (gy, gs) if g is not None])

    def norm64(v, w, v_dtype):
        rounds_to = v_dtype if x_hat_dtype == "input" else w_dtype if w_dtype.itemsize == 2 else torch.float32
        return w * _straight_through(v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps), rounds_to)

    x64, h64 = xd.double().requires_grad_(), hd.double().requires_grad_()
    w64 = [p.detach().double().requires_grad_() for p in params]
    if mode == "add_norm":
        s64 = _straight_through(x64 + h64, res)
        y64 = norm64(s64, w64[0], res)
    else:
        s64 = _straight_through(x64 + norm64(h64, w64[0], act), res)
        y64 = norm64(s64, w64[1], res) if mode == "norm_add_norm" else None
    grads64 = torch.autograd.grad([t for t in (y64, s64) if t is not None], [x64, h64, *w64],
                                  [g.double() for g in (gy, gs) if g is not None])
    for name, g, g64, wrt in zip(["dx", "dh", "dw1", "dw2"], grads, grads64, [x, h, *params]):
        assert_close(g, g64, f"{mode} {name}", dtype=wrt.dtype,
                     scale=g64.abs().sum().item() if name.startswith("dw") else 0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("x_hat_dtype", ["input", "weight"])
@pytest.mark.parametrize("case", ["bf16-weight-fp32-stream", "no-weight"])
def test_x_hat_dtype_y_dtype_is_the_models_beyond_the_table(case, x_hat_dtype, backend, device):
    """The README's rule for y's dtype where X_HAT_PRECISIONS does not reach: T5's "weight" with a
    16-bit weight over an fp32 stream returns the weight's dtype (not fp32), and "weight" without a
    weight returns fp32 even over a 16-bit stream; "input" the promoted dtype of s and the weight."""
    n, eps = 40, 1e-6
    affine = case != "no-weight"
    norm = normzoo.RMSNorm(n, eps=eps, backend=backend, device=device, dtype=torch.bfloat16,
                           x_hat_dtype=x_hat_dtype, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(1, 0.5)
    residual_dtype = torch.float32 if case == "bf16-weight-fp32-stream" else None
    x = (torch.randn(6, n, device=device) * 3).to(residual_dtype or torch.bfloat16)
    h = (torch.randn(6, n, device=device) * 3).bfloat16()
    y, s = NF.add_norm(x, h, norm, residual_dtype=residual_dtype)
    x_hat = model_x_hat(s, eps, x_hat_dtype, torch.bfloat16 if affine else torch.float32)
    want = norm.weight.detach() * x_hat if affine else x_hat
    assert y.dtype == want.dtype
    torch.testing.assert_close(y, want, rtol=0 if backend == "torch" else torch.finfo(y.dtype).eps,
                               atol=0 if backend == "torch" else 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("x_hat_dtype", ["input", "weight"])
def test_x_hat_dtype_y_dtype_follows_the_second_norm(x_hat_dtype, backend, device):
    """norm_add_norm's y is its second norm's output: its dtype follows that norm's weight (bf16),
    not the first norm's (none here), as the model's own norm2(x + norm1(h)) returns it."""
    n, eps = 40, 1e-6
    n1 = normzoo.RMSNorm(n, eps=eps, backend=backend, device=device, x_hat_dtype=x_hat_dtype,
                         elementwise_affine=False)
    n2 = normzoo.RMSNorm(n, eps=eps, backend=backend, device=device, dtype=torch.bfloat16, x_hat_dtype=x_hat_dtype)
    x, h = torch.randn(6, n, device=device).bfloat16(), torch.randn(6, n, device=device).bfloat16()
    y, s = NF.norm_add_norm(x, h, n1, n2)
    assert s.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    want = model_rms_norm(s, n2.weight.detach(), eps, x_hat_dtype)
    assert want.dtype == y.dtype
    torch.testing.assert_close(y, want, rtol=torch.finfo(y.dtype).eps, atol=1e-6)


def test_x_hat_dtype_must_match_across_the_two_norms():
    with pytest.raises(ValueError, match="share an x_hat_dtype"):
        NF.norm_add_norm(torch.randn(2, 4), torch.randn(2, 4), normzoo.RMSNorm(4, x_hat_dtype="input"),
                         normzoo.RMSNorm(4))


@pytest.mark.parametrize("mode", fused.MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_looped_long_row_path(kind, mode, device, monkeypatch):
    """Rows wider than one tile loop over column tiles (2-3 passes for the norms, several column
    tiles for DyT/Derf): forced here at 16 columns."""
    from normzoo.kernels import elementwise, rowwise_norm

    module = rowwise_norm if kind in ("layernorm", "rmsnorm") else elementwise
    monkeypatch.setattr(module, "launch_config", patched := capped(module.launch_config, 16))
    assert module.launch_config(kind, "fwd", 97, torch.float32, torch.device(device)).block_n == 16
    for act_dtype, res_dtype in PRECISIONS:
        check_against_float64(kind, mode, act_dtype, res_dtype, 97, "triton", device)
    # Several programs and the reduce (the default 5 rows are one program): norm_add_norm's
    # two-kernel path for the row-wise norms, its one pass over several column tiles for DyT/Derf.
    check_against_float64(kind, mode, torch.float32, torch.float32, 97, "triton", device, rows=37)
    if kind in ("layernorm", "rmsnorm"):
        check_against_float64(kind, mode, torch.bfloat16, torch.float32, 97, "triton", device, weight_offset=1.0)
    # What ran: every backward launch took tiles narrower than the row (the row-wise norms' looped path).
    backward = [cfg for pass_, cfg in patched.configs if pass_ != "fwd"]
    assert backward and all(cfg.block_n < 97 for cfg in backward)
    assert kind not in ("layernorm", "rmsnorm") or not any(cfg.single_tile for cfg in backward)


@pytest.mark.parametrize("path", ["one-tile", "looped"])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_add_norm_gives_each_norm_its_own_eps(kind, path, device, monkeypatch):
    """norm_add_norm's two norms may differ in eps: the second normalizes s with its own, on the
    one-tile forward and on the looped one (its third pass). An eps of 0.5 against 1e-6, on rows of
    unit size, moves y far past the tolerance if either norm took the other's."""
    from normzoo.kernels import rowwise_norm

    if path == "looped":
        monkeypatch.setattr(rowwise_norm, "launch_config", capped(rowwise_norm.launch_config, 16))
    cls = normzoo.LayerNorm if kind == "layernorm" else normzoo.RMSNorm
    n1, n2 = cls(40, eps=1e-6, backend="triton", device=device), cls(40, eps=0.5, backend="triton", device=device)
    x, h = torch.randn(3, 40, device=device), torch.randn(3, 40, device=device)
    y, s = NF.norm_add_norm(x, h, n1, n2)
    y64, s64 = unfused("norm_add_norm", x.double(), h.double(), on_reference(n1, torch.float64),
                       on_reference(n2, torch.float64), 1.0)
    assert_close(s, s64, "s")
    assert_close(y, y64, "y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_sum_gradient_alone(kind, backend, device):
    """add_norm's dx = dh = ds + Jᵀ dy: the ds term on its own (quack#53 sent it through the
    norm's Jacobian), the norm term on its own, and both."""
    n1 = make_norm(kind, 16, backend, device=device)
    x = torch.randn(4, 16, device=device, requires_grad=True)
    h = torch.randn(4, 16, device=device, requires_grad=True)
    gs = torch.randn(4, 16, device=device)
    y, s = NF.add_norm(x, h, n1)
    dx, dh = torch.autograd.grad((s * gs).sum(), [x, h])
    torch.testing.assert_close(dx, gs, rtol=0, atol=0)  # exactly ds: nothing else may touch it
    torch.testing.assert_close(dh, gs, rtol=0, atol=0)
    for dy_on, ds_on in ((True, False), (True, True)):
        check_against_float64(kind, "add_norm", torch.float32, torch.float32, 16, backend, device, dy_on=dy_on,
                              ds_on=ds_on)
    check_against_float64(kind, "norm_add_norm", torch.float32, torch.float32, 16, backend, device, dy_on=True,
                          ds_on=False)
    check_against_float64(kind, "norm_add_norm", torch.float32, torch.float32, 16, backend, device, dy_on=False,
                          ds_on=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_16bit_params(backend, device):
    n1 = make_norm("layernorm", 12, backend, device=device, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 12, device=device, dtype=torch.bfloat16)
    h = torch.randn(2, 3, 12, device=device, dtype=torch.bfloat16)
    y, s = NF.add_norm(x, h, n1, residual_dtype=torch.float32)
    assert y.shape == s.shape == (2, 3, 12) and y.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(s, x.float() + h.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_and_reference_agree_bitwise_in_the_sum(dtype, device):
    """s = x + h is one fp32 add rounded once (to nearest even) on both paths."""
    x = torch.randn(6, 40, device=device, dtype=dtype)
    h = torch.randn(6, 40, device=device, dtype=dtype)
    for backend in BACKENDS:
        s = NF.add_norm(x, h, normzoo.RMSNorm(40, backend=backend, device=device))[1]
        assert torch.equal(s, x + h), backend



@pytest.mark.parametrize("kind", KINDS)
def test_add_norm_normalizes_a_narrower_stream_as_stored(kind, device):
    """A bf16 residual stream beside fp32 activations: s = x + h is rounded to bf16 when stored, and
    y is the norm of s as stored, not of the fp32 sum (which differs by ~2^-9 relative, far past
    fp32's tolerance)."""
    n1 = make_norm(kind, 40, "triton", device=device)
    x, h = torch.randn(6, 40, device=device), torch.randn(6, 40, device=device)
    y, s = NF.add_norm(x, h, n1, residual_dtype=torch.bfloat16)
    assert s.dtype == torch.bfloat16 and y.dtype == torch.float32
    assert torch.equal(s, (x + h).to(torch.bfloat16))
    with torch.no_grad():
        assert_close(y, on_reference(n1, torch.float64)(s.double()), "y")


def _with_alpha(norm, n):
    """norm with an alpha of n elements (a malformed checkpoint): a fused op must refuse it."""
    norm.alpha = torch.nn.Parameter(torch.ones(n))
    return norm


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: NF.add_norm(torch.randn(2, 4), torch.randn(2, 5), normzoo.LayerNorm(4)), ValueError, "same shape"),
        (lambda: NF.add_norm(torch.randn(2, 5), torch.randn(2, 5), normzoo.LayerNorm(4)), ValueError, "trailing dims"),
        (lambda: NF.add_norm(torch.randn(2, 4), torch.randn(2, 4), torch.nn.Linear(4, 4)), TypeError, "norm must be"),
        (lambda: NF.add_norm(torch.randn(2, 4), torch.randn(2, 4), None), TypeError, "norm must be"),
        (lambda: NF.add_norm(torch.randn(2, 4), torch.randn(2, 4), normzoo.LayerNorm(4), scale=0.0), ValueError, "scale"),
        (lambda: NF.add_norm(torch.randn(2, 4), torch.randn(2, 4), normzoo.LayerNorm(4), residual_dtype=torch.int32),
         TypeError, "residual_dtype"),
        (lambda: NF.norm_add_norm(torch.randn(2, 4), torch.randn(2, 4), normzoo.LayerNorm(4), normzoo.RMSNorm(4)),
         ValueError, "same kind"),
        (lambda: NF.add_norm(torch.randn(2, 4, 3), torch.randn(2, 4, 3), normzoo.DyT(4, channels_last=False)),
         ValueError, "channels-last"),
        (lambda: fused.fused_residual(torch.randn(2, 4), torch.randn(2, 4), normzoo.LayerNorm(4), mode="add"),
         ValueError, "mode must be one of"),
        # a parameter dtype the norm would refuse too: the message names h, whose dtype it is checked against
        (lambda: NF.add_norm(torch.randn(2, 4), torch.randn(2, 4), normzoo.LayerNorm(4, dtype=torch.bfloat16)),
         TypeError, r"takes the norm's weight in h's dtype \(torch.float32\), got torch.bfloat16"),
        (lambda: NF.add_norm(torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(2, 4, dtype=torch.bfloat16),
                             normzoo.LayerNorm(4, dtype=torch.float64)),
         TypeError, r"weight in h's dtype \(torch.bfloat16\) or float32, got torch.float64"),
        (lambda: NF.norm_add(torch.randn(2, 4), torch.randn(2, 4), normzoo.DyT(4, dtype=torch.float64)),
         TypeError, r"norm's weight in h's dtype \(torch.float32\) or a 16-bit float, got torch.float64"),
        # norm_add_norm names which of its two norms is wrong
        (lambda: NF.norm_add_norm(torch.randn(2, 4), torch.randn(2, 4), normzoo.LayerNorm(4),
                                  normzoo.LayerNorm(4, dtype=torch.bfloat16)),
         TypeError, r"takes norm_in's weight in h's dtype \(torch.float32\), got torch.bfloat16: cast the "
                    r"norm, e.g. norm_in.to\(torch.float32\)"),
        (lambda: NF.norm_add_norm(torch.randn(2, 4), torch.randn(2, 4), normzoo.DyT(4, dtype=torch.float64),
                                  normzoo.DyT(4)),
         TypeError, r"takes norm_out's weight in h's dtype"),
        (lambda: NF.norm_add_norm(torch.randn(2, 4), torch.randn(2, 4), normzoo.DyT(4), _with_alpha(normzoo.DyT(4), 2)),
         ValueError, r"^norm_in: alpha must"),
        (lambda: NF.add_norm(torch.randn(2, 4), torch.randn(2, 4), _with_alpha(normzoo.DyT(4), 2)),
         ValueError, r"^alpha must"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_torch_norm_modules_are_accepted(device):
    ln = torch.nn.LayerNorm(8, device=device)
    x, h = torch.randn(3, 8, device=device), torch.randn(3, 8, device=device)
    y, s = NF.add_norm(x, h, ln)
    torch.testing.assert_close(y, ln(x + h))


# ---------------------------------------------------------------- torch.library, torch.compile


@pytest.mark.parametrize("mode", ["add_norm", "norm_add_norm"])
@pytest.mark.parametrize("kind", KINDS)
def test_unused_norm_output_takes_no_gradient(kind, mode, device):
    """y unused: as in the unfused sequence, the norm after the add is not in the graph. Its
    parameters get None (an optimizer skips them; a zero gradient would still decay and move them
    by momentum), dx is ds itself, and no norm backward runs for it; an fp32 sum beside 16-bit x
    and h takes the casts. Compiled, likewise where the region does not return y; one that returns
    it hands it a zero gradient (AOTAutograd's rule: torch's own LayerNorm gets zero parameter
    gradients there too), so the parameters get zeros. The backward op's fake and schema hold
    without dy, for every relation of x's, h's and the sum's dtypes."""
    for backend in BACKENDS:
        for x_dtype, residual_dtype in ((torch.float32, None), (torch.bfloat16, torch.float32)):
            n1, n2 = make_norm(kind, 24, backend, device=device), make_norm(kind, 24, backend, device=device)
            x = torch.randn(5, 24, device=device).to(x_dtype).requires_grad_()
            h = torch.randn(5, 24, device=device, dtype=torch.bfloat16, requires_grad=True)
            gs = torch.randn(5, 24, device=device)

            def step(fn):
                for t in (x, h, *n1.parameters(), *n2.parameters()):
                    t.grad = None
                _, s = fn(x, h)
                (s.float() * gs).sum().backward()
                return [t.grad for t in (x, h, *n1.parameters(), *n2.parameters())]

            def run(x, h):
                return run_fused(mode, x, h, n1, n2, 1.0, residual_dtype)

            eager = step(run)
            torch._dynamo.reset()
            compiled = step(torch.compile(run, fullgraph=True, backend="aot_eager"))
            # A compiled region that does not return y: the backward op runs without dy there.
            torch._dynamo.reset()
            s_only = step(torch.compile(lambda x, h: (None, run(x, h)[1]), fullgraph=True, backend="aot_eager"))
            for got in (eager, compiled, s_only):
                dx, dh, *grads = got
                torch.testing.assert_close(dx, gs.to(x.dtype), rtol=0, atol=0)
                n_first = len(list(n1.parameters()))
                unused = grads if mode == "add_norm" else grads[n_first:]
                if got is not compiled:
                    assert all(g is None for g in unused), f"{backend}: the unused norm's parameters got a gradient"
                else:
                    assert all(g is None or not g.any() for g in unused), f"{backend}: compiled, not zero"
                if mode == "add_norm":
                    torch.testing.assert_close(dh, gs.to(h.dtype), rtol=0, atol=0)
                else:
                    assert all(g is not None for g in grads[:n_first]) and dh is not None
            torch.testing.assert_close(compiled[1], eager[1])
    # The backward op without dy: its fake and schema (no output aliases ds) agree with it.
    _, p1, eps, _, _ = fused.describe(n1)
    _, p2, _, _, _ = fused.describe(n2) if mode == "norm_add_norm" else (None, (None,) * 4, None, None, None)
    h, x = torch.randn(6, 24, device=device), torch.randn(6, 24, device=device)
    p1, p2 = tuple(p.detach() if p is not None else None for p in p1), tuple(p.detach() if p is not None else None for p in p2)
    eps = 1e-6 if eps is None else eps  # RMSNorm's None: the op takes the resolved value
    # x, h and the sum in every relation: ds is then x's, h's, both or neither dtype, and without dy
    # the op would hand it back as dx or dh, which a custom op's output may not be. ds also transposed
    # (as s.t()'s gradient): a cast of it into x's or h's dtype must still be as contiguous as the fake says.
    for x_dtype, h_dtype, sum_dtype in ((torch.float32, torch.float32, None), (torch.bfloat16, torch.float32, None),
                                        (torch.float32, torch.bfloat16, torch.bfloat16),
                                        (torch.bfloat16, torch.bfloat16, torch.float32)):
        for triton in (False, True):
            _, s, stats1, stats2 = fused.fused_residual_fwd(h.to(h_dtype), x.to(x_dtype), *p1, *p2, kind, mode, eps,
                                                            eps, 1.0, sum_dtype, triton)
            needs = (p1[0] is not None, p2[0] is not None)
            db = (p1[1].dtype if p1[1] is not None else None, p2[1].dtype if p2[1] is not None else None)
            for ds in (torch.randn_like(s), torch.randn(s.shape[::-1], dtype=s.dtype, device=device).t()):
                args = (None, ds, h.to(h_dtype), s, *p1, *p2, stats1, stats2, kind, mode, 1.0, x_dtype, h_dtype,
                        *needs, *db, triton)
                torch.library.opcheck(fused.fused_residual_bwd, args)



@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("mode", fused.MODES)
@pytest.mark.parametrize("kind", ["layernorm", "derf"])
def test_opcheck(kind, mode, triton, device):
    n1, n2 = make_norm(kind, 20, "torch", device=device), make_norm(kind, 20, "torch", device=device)
    _, p1, eps, _, _ = fused.describe(n1)
    _, p2, _, _, _ = fused.describe(n2) if mode == "norm_add_norm" else (None, (None,) * 4, None, None, None)
    h = torch.randn(6, 20, device=device, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(6, 20, device=device, requires_grad=True)
    p1 = tuple(p.detach().requires_grad_() if p is not None else None for p in p1)
    p2 = tuple(p.detach().requires_grad_() if p is not None else None for p in p2)
    args = (h, x, *p1, *p2, kind, mode, eps, eps, 0.5, None, triton)
    torch.library.opcheck(fused.fused_residual_fwd, args)
    if kind == "layernorm":
        torch.library.opcheck(fused.fused_residual_fwd, (*args, 1.0))


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("mode", fused.MODES)
def test_opcheck_x_hat_dtype(mode, triton, device):
    """Rounding x̂ as a model does ("input"): y in the dtype that model's norm returns for the sum,
    fp32 here (an fp32 stream and weight beside bf16 h), which the fake implementation says too."""
    w1, w2 = (torch.randn(20, device=device, requires_grad=True) for _ in range(2))
    h = torch.randn(6, 20, device=device, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(6, 20, device=device, requires_grad=True)
    args = (h, x, w1, None, None, None, *((w2, None, None, None) if mode == "norm_add_norm" else (None,) * 4),
            "rmsnorm", mode, 1e-6, 1e-6, 0.5, None, triton, 0.0, 1)
    torch.library.opcheck(fused.fused_residual_fwd, args)
    y = fused.fused_residual_fwd(*args)[0]
    assert y.dtype == (torch.float32 if mode != "norm_add" else torch.bfloat16)


@pytest.mark.parametrize("placement", ["pre", "peri", "post"])
def test_compile_fullgraph_matches_eager(placement, device):
    torch.manual_seed(0)
    layers = [[torch.nn.Linear(16, 16, device=device), torch.nn.Linear(16, 16, device=device)] for _ in range(2)]
    stack = normzoo.ResidualStack(layers, 16, placement=placement, norm="rmsnorm", device=device,
                                  backend="triton")
    x = torch.randn(3, 5, 16, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(stack, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_()
    out = compiled(xc)
    out.square().sum().backward()
    grads = [xc.grad.clone()] + [p.grad.clone() for p in stack.parameters()]
    stack.zero_grad()
    xe = x.clone().requires_grad_()
    eager = stack(xe)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for g, p in zip(grads, [xe] + list(stack.parameters())):
        torch.testing.assert_close(g, p.grad)


class _FusedBlock(torch.nn.Module):
    """A user's block that calls the fused functional ops itself (as the README's Llama block does)."""

    def __init__(self, kind, backend):
        super().__init__()
        self.norm_out, self.norm_in = make_norm(kind, 8, backend), make_norm(kind, 8, backend)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, h):
        y, s = NF.add_norm(x, h, self.norm_in)
        s = NF.norm_add(s, self.proj(y), self.norm_out)
        return NF.norm_add_norm(s, h, self.norm_out, self.norm_in, scale=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fx_symbolic_trace_records_the_fused_ops(backend):
    # torch.fx passes Proxies: the fused ops' checks refused them ("x must be a torch.Tensor, got
    # Proxy"), so no model calling them traced, where the plain norms do (test_swap.py).
    block = _FusedBlock("rmsnorm", backend)
    traced = torch.fx.symbolic_trace(block)
    assert sum(node.op == "call_function" and node.target is fused.fused_residual for node in traced.graph.nodes) == 3
    x, h = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    outputs = []
    for module in (traced, block):
        xg, hg = x.clone().requires_grad_(), h.clone().requires_grad_()
        y, s = module(xg, hg)
        (y.square().sum() + s.sum()).backward()
        outputs.append([y, s, xg.grad, hg.grad] + [p.grad.clone() for p in block.parameters()])
        block.zero_grad()
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------- ResidualStack


def textbook(stack, x, streams=None):
    """Each placement's formula, written out with the stack's own modules and plain adds; the
    stream after each layer appended to ``streams`` if given."""
    k = 0
    num_layers = len(stack.layers)
    for layer_index, layer in enumerate(stack.layers):
        for sublayer in layer:
            placement = stack.placement
            if placement == "mix":
                placement = "post" if layer_index < math.floor(stack.mix_ratio * num_layers) else "pre"
            if placement == "pre":
                x = x + sublayer(stack.norm_in[k](x))
            elif placement == "post":
                x = stack.norm_sum[k](x + sublayer(x))
            elif placement == "peri":
                x = x + stack.norm_out[k](sublayer(stack.norm_in[k](x)))
            else:  # scaled
                x = x + sublayer(stack.norm_in[k](x) / math.sqrt(layer_index + 1))
            k += 1
        if streams is not None:
            streams.append(x)
    return stack.final_norm(x) if stack.final_norm is not None else x


def make_stack(placement, norm, backend, device, num_layers=4, dim=16, **kwargs):
    torch.manual_seed(1)
    layers = [[torch.nn.Sequential(torch.nn.Linear(dim, dim, bias=False, device=device), torch.nn.Tanh()),
               torch.nn.Linear(dim, dim, bias=False, device=device)] for _ in range(num_layers)]
    stack = normzoo.ResidualStack(layers, dim, placement=placement, norm=norm, device=device, backend=backend,
                                  **kwargs)
    with torch.no_grad():
        for name, p in stack.named_parameters():
            if name.startswith("norm") or name.startswith("final"):
                p.add_(0.2 * torch.randn_like(p))
    return stack


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", KINDS)
@pytest.mark.parametrize("placement", ["pre", "post", "peri", "mix", "scaled"])
def test_stack_equals_its_textbook_formula(placement, norm, backend, device):
    stack = make_stack(placement, norm, backend, device, mix_ratio=0.5)
    # The oracle: the formula in float64 on the reference path. The peer: the formula at fp32, on
    # the reference path too: on the stack's own (kernel) modules it would share a kernel bug with
    # the fused ops, and its error would widen the tolerance by that bug.
    stack64, stack_peer = on_reference(stack, torch.float64), on_reference(stack)
    seen = {name: watch_terms(m) for name, m in stack64.named_modules() if isinstance(m, (normzoo.DyT, normzoo.Derf))}
    x = torch.randn(2, 3, 16, device=device, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out, ref64, peer = stack(x), textbook(stack64, x64), textbook(stack_peer, x)
    assert_close(out, ref64.detach(), f"{placement} output", peer=peer.detach())
    g = torch.randn_like(out)
    params = list(stack.parameters())
    grads = torch.autograd.grad((out * g).sum(), [x, *params], allow_unused=True)
    grads64 = torch.autograd.grad((ref64 * g.double()).sum(), [x64, *stack64.parameters()], allow_unused=True)
    grads_peer = torch.autograd.grad((peer * g).sum(), [x, *stack_peer.parameters()], allow_unused=True)
    for (name, p), got, want, peer_grad in zip([("x", x), *stack.named_parameters()], grads, grads64, grads_peer):
        assert (got is None) == (want is None), name
        if got is not None:
            owner, _, param = name.rpartition(".")
            terms = (grad_terms(norm, stack64.get_submodule(owner), *seen[owner])[1].get(param)
                     if owner in seen and param in ("alpha", "shift") else None)
            assert_close(got, want, f"{placement} d{name}", dtype=p.dtype, peer=peer_grad,
                         scale=terms or (want.abs().sum().item() if p.dim() <= 1 else 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", ["pre", "post", "peri", "mix", "scaled"])
def test_stack_residual_dtype_keeps_the_stream_in_it(placement, backend, device):
    """residual_dtype=fp32 beside bf16 sublayers and norms: fp32 streams (Post-LN's, a norm's output,
    stay bf16), a bf16 output, and streams closer to the float64 formula than a bf16 stream's. The
    stream (std 4) is wide against each update here, so a bf16 stream's roundings dominate its error."""
    stack = make_stack(placement, "rmsnorm", backend, device, num_layers=8, mix_ratio=0.25,
                       residual_dtype=torch.float32).to(torch.bfloat16)
    assert stack.residual_dtype is torch.float32  # .to() converts parameters, not this setting
    stack64 = on_reference(stack, torch.float64)
    stack64.residual_dtype = None
    x = (4 * torch.randn(2, 3, 16, device=device)).to(torch.bfloat16).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    streams64 = []
    ref64 = textbook(stack64, x64, streams64)
    errors = {}
    for residual_dtype in (None, torch.float32):
        stack.residual_dtype = residual_dtype
        out, streams = stack(x, return_streams=True)
        post = [stack.sublayer_placement(layer) == "post" for layer in range(len(stack.layers))]
        want = [torch.bfloat16 if p or residual_dtype is None else torch.float32 for p in post]
        assert [s.dtype for s in streams] == want and out.dtype == torch.bfloat16
        errors[residual_dtype] = rel_error(streams[-1], streams64[-1], 0.0)
        g = torch.randn_like(out)
        got = torch.autograd.grad((out.float() * g.float()).sum(), [x, *stack.parameters()])
        if residual_dtype is None:
            peer, peer_grads = out.detach(), got
            continue
        assert_close(out, ref64.detach(), f"{placement} output", peer=peer)
        want = torch.autograd.grad((ref64 * g.double()).sum(), [x64, *stack64.parameters()])
        for (name, p), got_p, want_p, peer_p in zip([("x", x), *stack.named_parameters()], got, want, peer_grads):
            assert_close(got_p, want_p, f"{placement} d{name}", dtype=p.dtype, peer=peer_p,
                         scale=want_p.abs().sum().item() if p.dim() <= 1 else 0.0)
    if placement == "post":  # one bf16 stream either way, but its sums are formed in fp32
        assert errors[torch.float32] <= errors[None] * 1.5, errors
    else:  # Mix-LN's Post-LN layers leave a normalized stream (std 1) with their bf16 error in it
        assert errors[torch.float32] < errors[None] * (0.75 if placement == "mix" else 0.5), errors
    # The one unfused add (no final norm after a last add with no norm of its own) keeps it too,
    # here where it is the only add, of the bf16 input and a bf16 update.
    bare = normzoo.ResidualStack([torch.nn.Linear(16, 16, device=device)], 16, placement="pre", final_norm=False,
                                 residual_dtype=torch.float32, backend=backend, device=device).to(torch.bfloat16)
    assert bare(x).dtype == torch.float32
    with torch.no_grad():  # the sum formed in fp32, not in bf16 and then widened
        h16 = bare.layers[0][0](bare.norm_in[0](x))
        torch.testing.assert_close(bare(x), x.float() + h16.float(), rtol=0, atol=0)
    # ... and rounds once, as the fused ops round s: a bf16 stream beside fp32 x and h.
    bare16 = normzoo.ResidualStack([torch.nn.Linear(16, 16, device=device)], 16, placement="pre", final_norm=False,
                                   residual_dtype=torch.bfloat16, backend=backend, device=device)
    x32 = torch.randn(64, 16, device=device)
    with torch.no_grad():
        h32 = bare16.layers[0][0](bare16.norm_in[0](x32))
        torch.testing.assert_close(bare16(x32), (x32 + h32).to(torch.bfloat16), rtol=0, atol=0)


def test_stack_norm_lists_mix_split_and_scales():
    stack = make_stack("mix", "layernorm", "torch", "cpu", num_layers=8, mix_ratio=0.25)
    post = [k // 2 < 2 for k in range(16)]  # 2 sublayers a layer; layers 0 and 1 are Post-LN
    assert [m is not None for m in stack.norm_sum] == post
    assert [m is not None for m in stack.norm_in] == [not p for p in post]
    assert all(m is None for m in stack.norm_out) and stack.final_norm is not None
    peri = make_stack("peri", "rmsnorm", "torch", "cpu", num_layers=3)
    assert all(m is not None for m in peri.norm_in) and all(m is not None for m in peri.norm_out)
    assert all(m is None for m in peri.norm_sum) and len(peri.norm_in) == 6
    assert make_stack("post", "layernorm", "torch", "cpu").final_norm is None
    assert make_stack("post", "layernorm", "torch", "cpu", final_norm=True).final_norm is not None
    scaled = make_stack("scaled", "dyt", "torch", "cpu", num_layers=5)
    assert [scaled.scale(layer) for layer in range(5)] == [1 / math.sqrt(layer + 1) for layer in range(5)]
    assert make_stack("pre", "dyt", "torch", "cpu").scale(3) == 1.0
    # Checkpoints are plain: the state_dict names say where each norm is.
    assert "norm_out.1.weight" in peri.state_dict() and "norm_sum.0.weight" in stack.state_dict()
    # eps, dtype and backend reach every norm the stack builds (final_norm too).
    for norm in ("layernorm", "rmsnorm"):
        built = make_stack("mix", norm, "torch", "cpu", mix_ratio=0.5, eps=1e-3, dtype=torch.float64)
        norms = [m for m in (*built.norm_in, *built.norm_sum, built.final_norm) if m is not None]
        assert len(norms) == 9 and all(m.eps == 1e-3 and m.backend == "torch" for m in norms)
        assert all(p.dtype == torch.float64 for m in norms for p in m.parameters())
    assert make_stack("pre", "rmsnorm", "torch", "cpu").final_norm.eps is None  # torch's default


class _RecordAdds(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.adds = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor):
            self.adds.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("norm", KINDS)
@pytest.mark.parametrize("placement", ["pre", "post", "peri", "mix", "scaled"])
def test_no_residual_add_outside_the_fused_ops(placement, norm, device):
    stack = make_stack(placement, norm, "triton", device, mix_ratio=0.5)
    x = torch.randn(2, 3, 16, device=device)
    with torch.no_grad(), _RecordAdds() as recorder:
        stack(x)
    assert recorder.adds == [], f"{placement}: {len(recorder.adds)} adds ran outside a kernel"
    # The one documented exception: no final norm after a last add that has no norm of its own.
    bare = make_stack("pre", norm, "triton", device, final_norm=False)
    with torch.no_grad(), _RecordAdds() as recorder:
        bare(x)
    assert len(recorder.adds) == 1


def test_stack_streams_and_arguments():
    stack = make_stack("peri", "layernorm", "torch", "cpu", num_layers=3)
    out, streams = stack(torch.randn(2, 16), return_streams=True)
    assert len(streams) == 3 and all(s.shape == (2, 16) for s in streams)
    with pytest.raises(ValueError, match="placement"):
        normzoo.ResidualStack([], 4, placement="middle")
    with pytest.raises(ValueError, match="norm must be"):
        normzoo.ResidualStack([], 4, placement="pre", norm="batchnorm")
    with pytest.raises(ValueError, match="no eps"):
        normzoo.ResidualStack([], 4, placement="pre", norm="dyt", eps=1e-5)
    with pytest.raises(TypeError, match="sublayers"):
        normzoo.ResidualStack([[lambda t: t]], 4, placement="pre")
    one = normzoo.ResidualStack([torch.nn.Linear(4, 4)], 4, placement="pre")  # a bare module: one sublayer
    assert len(one.norm_in) == 1 and "placement='pre'" in repr(one)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        normzoo.ResidualStack([torch.nn.Linear(4, 4)], 0, placement="pre")
    with pytest.raises(TypeError, match="mix_ratio must be a real number"):
        normzoo.ResidualStack([torch.nn.Linear(4, 4)], 4, placement="mix", mix_ratio="0.5")
    with pytest.raises(TypeError, match="final_norm must be True, False or None"):
        normzoo.ResidualStack([torch.nn.Linear(4, 4)], 4, placement="pre", final_norm="no")
    with pytest.raises(ValueError, match=r"input of shape \(2, 3, 15\): its last dim must be the stack's dim, 16"):
        stack(torch.randn(2, 3, 15))  # Post-LN's first sublayer would meet it first, with torch's message
    with pytest.raises(TypeError, match="torch.fx.symbolic_trace cannot trace a ResidualStack"):
        torch.fx.symbolic_trace(stack)
    # Mix-LN's ⌊mix_ratio·L⌋ of the ratio as written (0.29 · 100 is 28.999999999999996 in floats);
    # a ratio that leaves no Post-LN layer says the stack is Pre-LN (0 asks for that: no warning).
    for ratio, layers, post in ((0.29, 100, 29), (1 / 3, 3, 1), (1 / 3, 12, 4), (2 / 3, 3, 2), (1 / 7, 7, 1), (0.5, 5, 2)):
        stack_ = normzoo.ResidualStack([torch.nn.Identity()] * layers, 4, placement="mix", mix_ratio=ratio)
        assert stack_.num_post_layers == post, (ratio, layers)
    with pytest.warns(UserWarning, match=r"no Post-LN layer \(floor\(0.25 \* 3\) = 0\): this stack is Pre-LN"):
        normzoo.ResidualStack([torch.nn.Identity()] * 3, 4, placement="mix")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normzoo.ResidualStack([torch.nn.Identity()] * 3, 4, placement="mix", mix_ratio=0.0)
    for bad in (torch.int32, "float32", torch.float8_e4m3fn):  # float8: no fused op takes it
        with pytest.raises(TypeError, match="residual_dtype must be float16, bfloat16, float32, float64 or None"):
            normzoo.ResidualStack([torch.nn.Linear(4, 4)], 4, placement="pre", residual_dtype=bad)
    assert "residual_dtype=torch.float32" in repr(make_stack("pre", "rmsnorm", "torch", "cpu",
                                                             residual_dtype=torch.float32))
    assert "mix_ratio=0.5 (1 post)" in repr(make_stack("mix", "rmsnorm", "torch", "cpu", num_layers=3, mix_ratio=0.5))
    # A sublayer that returns a tuple (an LSTM's (output, state)) is named, not reported as an op's "h".
    lstm = normzoo.ResidualStack([[torch.nn.Linear(4, 4), torch.nn.LSTM(4, 4, batch_first=True)]], 4, placement="pre")
    with pytest.raises(TypeError, match=r"sublayer 1 \(LSTM\) returned tuple"):
        lstm(torch.randn(2, 3, 4))
    # One that returns another shape is named too, wherever it sits: the last add, unfused without a
    # final norm, would otherwise broadcast a (1, 4) output silently.
    for final_norm, placement in ((False, "pre"), (None, "pre"), (None, "post"), (None, "peri")):
        wrong = normzoo.ResidualStack([[torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)]], 4, placement=placement,
                                      final_norm=final_norm)
        with pytest.raises(ValueError, match=r"sublayer 1 \(Linear\) returned shape \(2, 1\)"):
            wrong(torch.randn(2, 4))


def test_stack_checkpoint_of_another_placement_is_not_loaded_silently():
    """A norm_out / norm_sum entry this placement has as None: torch's loader would skip its keys
    without counting them unexpected (a Peri-LN checkpoint loaded into Pre-LN, outputs changed)."""
    pre, peri = make_stack("pre", "rmsnorm", "torch", "cpu"), make_stack("peri", "rmsnorm", "torch", "cpu")
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"norm_out\.0\.weight\""):
        pre.load_state_dict(peri.state_dict())
    mix, post = make_stack("mix", "rmsnorm", "torch", "cpu", mix_ratio=0.5), make_stack("post", "rmsnorm", "torch", "cpu")
    result = mix.load_state_dict(post.state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == [f"norm_sum.{k}.weight" for k in range(4, 8)]
    own = pre.load_state_dict(make_stack("pre", "rmsnorm", "torch", "cpu").state_dict())
    assert own.missing_keys == [] and own.unexpected_keys == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrized_norms_apply_and_hooked_ones_are_refused(backend, device):
    """torch.nn.utils.parametrize makes a subclass that only moves the weight behind a property:
    the fused ops read it as the layer does (gradients reach the original). A forward hook, which
    a fused op would not run (the old weight_norm recomputes its weight in one), is an error."""

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    stack = make_stack("pre", "rmsnorm", backend, device, num_layers=2)
    torch.nn.utils.parametrize.register_parametrization(stack.norm_in[1], "weight", Doubled())  # fused: add_norm
    x = torch.randn(3, 16, device=device)
    out, want = stack(x), textbook(stack, x)
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)
    original = stack.norm_in[1].parametrizations.weight.original
    got = torch.autograd.grad(out.sum(), original)[0]
    assert torch.allclose(got, torch.autograd.grad(textbook(stack, x).sum(), original)[0], atol=1e-4, rtol=1e-4)
    for register in ("register_forward_pre_hook", "register_full_backward_hook"):
        hooked = make_norm("rmsnorm", 16, backend, device=device)
        getattr(hooked, register)(lambda module, *args: None)
        with pytest.raises(ValueError, match="module hooks, which a fused residual op does not run"):
            NF.add_norm(x, torch.randn_like(x), hooked)
    # Global hooks are every module's, not this norm's: a warning that they miss it, not an error;
    # none compiled (fullgraph: dynamo cannot trace the warning).
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        with pytest.warns(UserWarning, match="global module hooks .* do not run for this RMSNorm"):
            NF.add_norm(x, torch.randn_like(x), stack.norm_in[0])
        torch._dynamo.reset()
        compiled = torch.compile(lambda a, b: NF.add_norm(a, b, stack.norm_in[0]), fullgraph=True, backend="eager")
        compiled(x, torch.randn_like(x))
    finally:
        handle.remove()
    # torch's own tools register global hooks too (FlopCounterMode's module tracker): no warning there.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.utils.flop_counter.FlopCounterMode(display=False):
            NF.add_norm(x, torch.randn_like(x), stack.norm_in[0])


# ---------------------------------------------------------------- found in review


@pytest.mark.parametrize("backend", BACKENDS)
def test_leaf_gradients_are_their_own_tensors(backend, device):
    """add_norm gives both inputs one gradient tensor and norm_add gives x the incoming ds: leaves
    must not end up sharing it (accumulation and in-place edits would leak between them)."""
    n = normzoo.LayerNorm(8, backend=backend, device=device)
    w = torch.randn(4, 8, device=device)
    x = torch.randn(4, 8, device=device, requires_grad=True)
    h = torch.randn(4, 8, device=device, requires_grad=True)
    for _ in range(2):
        (NF.add_norm(x, h, n)[0] * w).sum().backward()
    assert x.grad.data_ptr() != h.grad.data_ptr()
    x_ref, h_ref = x.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
    for _ in range(2):
        (n(x_ref + h_ref) * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(h.grad, h_ref.grad)
    g = torch.ones(4, 8, device=device)
    x2 = torch.randn(4, 8, device=device, requires_grad=True)
    NF.norm_add(x2, h, n).backward(g)
    NF.norm_add(x2, h, n).backward(g)
    assert torch.equal(g, torch.ones_like(g)) and torch.equal(x2.grad, 2 * g)


def test_strided_rows_of_h_in_the_triton_backward(device):
    n = normzoo.RMSNorm(8, backend="triton", device=device)
    for mode in fused.MODES:
        x = torch.randn(6, 8, device=device, requires_grad=True)
        h = torch.randn(8, 6, device=device, requires_grad=True)
        n2 = normzoo.RMSNorm(8, backend="triton", device=device) if mode == "norm_add_norm" else None
        y, s = fused.fused_residual(x, h.t(), n, n2, mode=mode)
        ((s.sum() + (y.sum() if y is not None else 0))).backward()
        x_ref, h_ref = x.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
        n_ref = normzoo.RMSNorm(8, backend="torch", device=device)
        y_ref, s_ref = unfused(mode, x_ref, h_ref.t(), n_ref, n_ref if n2 is not None else None, 1.0)
        ((s_ref.sum() + (y_ref.sum() if y_ref is not None else 0))).backward()
        torch.testing.assert_close(h.grad, h_ref.grad, msg=mode)


@pytest.mark.parametrize("mode", fused.MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_strided_parameters_in_the_triton_backward(kind, mode, device):
    """Parameters that are strided 1-D views (every other element of a wider buffer): the forward
    reads contiguous copies of them, and so must the backward, which gets the saved originals."""
    n = 16
    strided = lambda p: torch.nn.Parameter(torch.stack([p.detach(), torch.randn_like(p)], -1).flatten()[::2])  # noqa: E731
    made = [make_norm(kind, n, "triton", device=device) for _ in range(2 if mode == "norm_add_norm" else 1)]
    triton_norms = []
    for norm in made:
        for name, p in list(norm.named_parameters()):
            setattr(norm, name, strided(p))
            assert p.numel() == 1 or not getattr(norm, name).is_contiguous()  # alpha, shift: (1,)
        triton_norms.append(norm)
    ref_norms = [make_norm(kind, n, "torch", device=device) for _ in made]
    for ref, norm in zip(ref_norms, triton_norms):
        ref.load_state_dict({k: v.contiguous() for k, v in norm.state_dict().items()})
    results = []
    for norms in (triton_norms, ref_norms):
        x = torch.randn(40, n, device=device, generator=torch.Generator(device).manual_seed(1)).requires_grad_()
        h = torch.randn(40, n, device=device, generator=torch.Generator(device).manual_seed(2)).requires_grad_()
        y, s = fused.fused_residual(x, h, *norms, mode=mode)
        c = torch.linspace(-1, 1, n, device=device)
        ((s * c).sum() + ((y * c.flip(0)).sum() if y is not None else 0)).backward()
        results.append([x.grad, h.grad, *(p.grad for norm in norms for p in norm.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_one_pass_backward_reads_row_strided_inputs(kind, device):
    """norm_add_norm's one-pass launchers on dy, ds, s and h whose rows are further apart than N
    (views into wider buffers, unit column stride: read in place, not copied) give what they give
    on contiguous copies, bit for bit."""
    from normzoo import kernels

    rows, n = 37, 24
    wide = lambda dtype=torch.float32: torch.randn(rows, 3 * n, device=device).to(dtype)[:, 5:5 + n]  # noqa: E731
    dy, ds, s, h = wide(), wide(), wide(), wide(torch.bfloat16)
    assert h.stride(0) == 3 * n and not h.is_contiguous()
    n1, n2 = make_norm(kind, n, "triton", device=device), make_norm(kind, n, "triton", device=device)
    (_, p1, _, _, _), (_, p2, _, _, _) = fused.describe(n1), fused.describe(n2)
    flags = dict(compute_dw1=True, db1_dtype=torch.float32 if kind != "rmsnorm" else None, compute_dw2=True,
                 db2_dtype=torch.float32 if kind != "rmsnorm" else None, dh_dtype=torch.bfloat16, scale=0.7)
    with torch.no_grad():
        if kind in ("layernorm", "rmsnorm"):
            is_rms = kind == "rmsnorm"
            _, stats1 = kernels.rowwise_norm_forward(h, p1[0], p1[1], 1e-5, is_rms=is_rms)
            _, stats2 = kernels.rowwise_norm_forward(s, p2[0], p2[1], 1e-5, is_rms=is_rms)
            run = lambda *t: kernels.rowwise_peri_backward(t[0], t[1], t[2], p2[0], stats2, t[3], p1[0], stats1,  # noqa: E731
                                                           is_rms=is_rms, **flags)
        else:
            act = fused._ACTIVATION[kind]
            run = lambda *t: kernels.pointwise_peri_backward(t[0], t[1], t[2], (p2[2], p2[3], p2[0]), t[3],  # noqa: E731
                                                             (p1[2], p1[3], p1[0]), activation=act, **flags)
        got, want = run(dy, ds, s, h), run(dy.contiguous(), ds.contiguous(), s.contiguous(), h.contiguous())
    flat = lambda out: [t for item in out for t in (item if isinstance(item, tuple) else (item,)) if t is not None]  # noqa: E731
    assert len(flat(got)) == len(flat(want)) >= 4  # dx, dh, dw1, dw2 (and db1, db2, scalars)
    for a, b in zip(flat(got), flat(want)):
        assert torch.equal(a, b)


def test_norm_add_output_may_be_edited_in_place(device):
    n = normzoo.LayerNorm(8, device=device)
    x = torch.randn(3, 8, device=device, requires_grad=True)
    h = torch.randn(3, 8, device=device, requires_grad=True)
    s = NF.norm_add(x, h, n)
    s.mul_(2)
    s.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_rmsnorm_default_eps_follows_the_tensor_it_normalizes(device):
    """eps=None is the machine epsilon of what the norm reads: an fp64 stream's, not h's fp32."""
    n = torch.nn.RMSNorm(8, device=device)
    x = torch.randn(3, 8, device=device, dtype=torch.float64) * 1e-4
    h = torch.randn(3, 8, device=device) * 1e-4
    y, s = NF.add_norm(x, h, n)
    expected = torch.nn.functional.rms_norm(s, (8,), n.weight.double()).float()  # eps: float64's, as torch's
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    wrong_eps = torch.nn.functional.rms_norm(s, (8,), n.weight.double(), eps=torch.finfo(torch.float32).eps)
    assert not torch.allclose(y, wrong_eps.float(), rtol=1e-3)  # the case tells the two apart


def test_subclasses_with_their_own_forward_are_refused(device):
    class Scaled(torch.nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="not a subclass"):
        NF.add_norm(torch.randn(2, 4), torch.randn(2, 4), Scaled(4))
    with pytest.raises(TypeError, match="scale must be a float"):
        NF.add_norm(torch.randn(2, 4), torch.randn(2, 4), normzoo.LayerNorm(4), scale=torch.tensor(0.5))
    with pytest.raises(ValueError, match="at least one sublayer"):
        normzoo.ResidualStack([[], [torch.nn.Linear(4, 4)]], 4, placement="pre")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", fused.MODES)
@pytest.mark.parametrize("kind", ["layernorm", "derf"])
def test_zero_rows_and_incoming_gradients_left_alone(kind, mode, backend, device):
    """No rows (an MoE expert with no tokens): empty outputs, zero parameter gradients, dx = ds.
    And the incoming dy / ds are never written into (FIELD-NOTES: in-place dY broke peers)."""
    n1 = make_norm(kind, 16, backend, device=device)
    n2 = make_norm(kind, 16, backend, device=device) if mode == "norm_add_norm" else None
    for rows in (0, 5):
        x = torch.randn(rows, 16, device=device, requires_grad=True) * 1
        h = torch.randn(rows, 16, device=device, dtype=torch.bfloat16, requires_grad=True) * 1
        y, s = fused.fused_residual(x, h, n1, n2, mode=mode)
        outputs = [t for t in (y, s) if t is not None]
        grads_in = [torch.randn_like(t) for t in outputs]
        before = [g.clone() for g in grads_in]
        params = [p for m in (n1, n2) if m is not None for p in m.parameters()]
        grads = torch.autograd.grad(outputs, [x, h, *params], grads_in)
        assert all(torch.equal(g, b) for g, b in zip(grads_in, before)), "an incoming gradient was written"
        if rows == 0:
            assert all(t.shape == (0, 16) for t in outputs)
            assert all(g.shape == p.shape and not g.any() for g, p in zip(grads[2:], params))


@pytest.mark.parametrize("mode", ["add_norm", "norm_add_norm"])
def test_fused_backward_with_no_gradient_for_either_output(mode):
    """gradcheck's undefined-gradient check calls the backward with neither output's gradient:
    no gradient comes back (in float64 on the reference, gradcheck passes whole)."""
    norms = [normzoo.LayerNorm(4, backend="torch", dtype=torch.float64) for _ in range(2)]
    x, h = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    op = (lambda x, h: NF.add_norm(x, h, norms[0])) if mode == "add_norm" else (
        lambda x, h: NF.norm_add_norm(x, h, *norms))
    assert torch.autograd.gradcheck(op, (x, h))
