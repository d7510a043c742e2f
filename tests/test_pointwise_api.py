"""DyT / Derf public API: gradcheck, functional vs the papers' formulas, modules, errors, compile, swap."""

import pytest
import torch

import normzoo
import normzoo.functional as NF
from helpers import assert_close, assert_compiled_matches_eager
from normzoo import ops

BACKENDS = ["torch", "triton"]


def paper_formula(x, alpha, shift, w, b, channels_last):
    """The papers' reference modules, written out: act(alpha·x [+ s]) * w + b."""
    u = alpha * x + (shift if shift is not None else 0)
    y = torch.tanh(u) if shift is None else torch.erf(u)
    # channels-first: parameters of shape (C,) broadcast over dim 1 of (B, C, *spatial).
    as_channels = (lambda p: p) if channels_last else (lambda p: p.view(-1, *([1] * (x.dim() - 2))))
    y = y * as_channels(w) if w is not None else y
    return y + as_channels(b) if b is not None else y


def call(kind, x, alpha, shift, w, b, channels_last, backend):
    if kind == "dyt":
        return NF.dyt(x, alpha, w, b, channels_last=channels_last, backend=backend)
    return NF.derf(x, alpha, shift, w, b, channels_last=channels_last, backend=backend)


@pytest.mark.parametrize("kind", ["dyt", "derf"])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
def test_gradcheck_float64(kind, channels_last, affine):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    c = 5 if channels_last else 3
    alpha = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    shift = torch.tensor([0.1], dtype=torch.float64, requires_grad=True) if kind == "derf" else None
    w = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine != "none" else None
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine == "weight+bias" else None
    args = [t for t in (x, alpha, shift, w, b) if t is not None]

    def fn(*leaves):
        it = iter(leaves)
        x_, a_ = next(it), next(it)
        s_ = next(it) if shift is not None else None
        w_ = next(it) if w is not None else None
        b_ = next(it) if b is not None else None
        return call(kind, x_, a_, s_, w_, b_, channels_last, "torch")

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dyt", "derf"])
@pytest.mark.parametrize("channels_last,shape,memory", [
    (True, (2, 7, 48), None), (False, (2, 6, 5, 7), None), (False, (3, 6), None),
    (False, (2, 6, 5, 7), torch.channels_last)], ids=["cl", "cf", "cf-2d", "cf-nhwc"])
def test_functional_matches_the_papers_formula(backend, kind, channels_last, shape, memory, device):
    """cf-nhwc: channels-first input stored channels_last is read in place, as rows of C, and y
    keeps that memory format (torch's point-wise ops do)."""
    c = shape[-1] if channels_last else shape[1]
    x = torch.randn(shape, device=device) * 2
    leaves = {
        "x": x if memory is None else x.contiguous(memory_format=memory),
        "alpha": torch.tensor([0.8], device=device),
        "shift": torch.tensor([-0.3], device=device) if kind == "derf" else None,
        "w": torch.randn(c, device=device),
        "b": torch.randn(c, device=device),
    }
    leaves = {k: v.requires_grad_() for k, v in leaves.items() if v is not None}
    as64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    peer = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}  # eager PyTorch in fp32

    y = call(kind, *(leaves.get(k) for k in ("x", "alpha", "shift", "w", "b")), channels_last, backend)
    if memory is not None:
        assert y.is_contiguous(memory_format=memory) and not y.is_contiguous()
    y_ref = paper_formula(*(as64.get(k) for k in ("x", "alpha", "shift", "w", "b")), channels_last)
    y_peer = paper_formula(*(peer.get(k) for k in ("x", "alpha", "shift", "w", "b")), channels_last)
    assert_close(y, y_ref.detach(), "y", peer=y_peer.detach())
    dy = torch.randn_like(y)
    for out, grad in ((y, dy), (y_ref, dy.double()), (y_peer, dy)):
        out.backward(grad)
    for name in leaves:
        # Scalar grads sum over every element and can cancel: the peer term accounts for that.
        assert_close(leaves[name].grad, as64[name].grad, f"d{name}", peer=peer[name].grad)


def test_dyt_gradient_keeps_its_accuracy_deep_in_saturation_on_every_path():
    # The README's promise, on the reference too: d tanh(z)/dz within (8 + |z|) eps relative, where
    # 1 − tanh² is 0 from |z| ≈ 9 in fp32. The eager autograd.Function (backend "torch"), the
    # composite forward that torch.func, forward-mode AD and double backward differentiate, fp64;
    # the kernels' own derivative: test_pointwise_kernels.py.
    import torch.autograd.forward_ad as fwAD

    z = torch.tensor([0.0, 1e-7, 0.3, 0.5499, 0.5501, 2.0, 5.0, 10.0, 20.0, 40.0, -20.0])
    zd = z.double()
    e = torch.exp(-2 * zd.abs())
    d1 = 4 * e / (1 + e) ** 2  # exact, in fp64
    d2 = -2 * torch.tanh(zd) * d1

    def check(got, exact, dtype=torch.float32, at=slice(None)):
        rel = (got[at].double() - exact[at]).abs() / exact[at].abs() / torch.finfo(dtype).eps
        assert (rel <= 8 + zd[at].abs()).all(), rel

    m = normzoo.DyT(z.numel(), alpha_init_value=1.0, backend="torch")
    x = z[None].clone().requires_grad_()
    (g0,) = torch.autograd.grad(m(x).sum(), x)  # the eager backward (reference.pointwise_backward)
    check(g0[0], d1)
    (g1,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)  # through the composite forward
    check(g1[0], d1)
    (g2,) = torch.autograd.grad(g1.sum(), x)
    check(g2[0], d2, at=slice(1, None))  # (0 at z = 0)
    # Past |z| ≈ 44 the derivative is under fp32's normal range: it fades through the subnormals
    # (cosh² would overflow and give 0 from there on).
    far = torch.tensor([[46.0]], requires_grad=True)
    (g,) = torch.autograd.grad(normzoo.DyT(1, alpha_init_value=1.0, backend="torch")(far).sum(), far)
    assert 0 < g.item() < 1e-38
    check(torch.func.grad(lambda x: m(x).sum())(z[None])[0], d1)
    with fwAD.dual_level():
        check(fwAD.unpack_dual(m(fwAD.make_dual(z[None], torch.ones(1, z.numel())))).tangent[0], d1)
    x64 = zd[None].clone().requires_grad_()
    m.double()(x64).sum().backward()
    check(x64.grad[0], d1, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dyt", "derf"])
def test_a_16bit_weight_with_fp32_input_computes_in_fp32(kind, backend, device):
    # As an RMSNorm takes it (swap(to="dyt") builds the layer in the replaced norm's weight dtype,
    # which may be fed fp32): y in the input's dtype, each gradient in its parameter's.
    x = torch.randn(5, 16, device=device, requires_grad=True)
    layer = (normzoo.DyT(16, backend=backend) if kind == "dyt" else normzoo.Derf(16, backend=backend)).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    layer = layer.half()
    y = layer(x)
    params64 = {k: v.detach().double() for k, v in layer.named_parameters()}
    u = params64["alpha"] * x.detach().double() + params64.get("shift", 0.0)
    ref = params64["weight"] * (torch.tanh(u) if kind == "dyt" else torch.erf(u)) + params64["bias"]
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(p.grad.dtype == torch.float16 for p in layer.parameters()) and x.grad.dtype == torch.float32


def test_channels_first_accepts_channels_last_memory_format(device):
    x = torch.randn(2, 4, 3, 5, device=device).to(memory_format=torch.channels_last)
    alpha, w = torch.tensor([0.5], device=device), torch.randn(4, device=device)
    y = NF.dyt(x, alpha, w, channels_last=False, backend="triton")
    assert_close(y, paper_formula(x.double(), alpha.double(), None, w.double(), None, False), "y")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_module_mixed_precision_and_huge_values(dtype, device):
    m = normzoo.Derf(16, backend="triton").to(device)
    x = torch.full((4, 16), 6e4 if dtype == torch.float16 else 1e4, dtype=dtype, device=device)
    x[::2] *= -1
    x.requires_grad_()
    y = m(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    for p in m.parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- modules


def test_dyt_module_defaults_and_state_dict():
    m = normzoo.DyT(12)
    assert [n for n, _ in m.named_parameters()] == ["alpha", "weight", "bias"]
    assert m.alpha.shape == (1,) and m.alpha.item() == 0.5
    assert torch.equal(m.weight, torch.ones(12)) and torch.equal(m.bias, torch.zeros(12))
    assert repr(m) == ("DyT((12,), alpha_init_value=0.5, elementwise_affine=True, bias=True, channels_last=True, "
                       "backend='auto')")
    other = normzoo.DyT(12, alpha_init_value=0.2)
    other.load_state_dict(m.state_dict())
    assert other.alpha.item() == 0.5
    with torch.no_grad():
        m.alpha.fill_(3.0)
        m.weight.normal_()
    m.reset_parameters()
    assert m.alpha.item() == 0.5 and torch.equal(m.weight, torch.ones(12))


def test_derf_module_defaults():
    m = normzoo.Derf(8, channels_last=False, bias=False, dtype=torch.float64)
    assert sorted(m.state_dict()) == ["alpha", "shift", "weight"]
    assert m.alpha.item() == 0.5 and m.shift.item() == 0.0 and m.bias is None
    assert m.weight.dtype == torch.float64
    assert "shift_init_value=0.0" in repr(m) and "channels_last=False" in repr(m)
    assert normzoo.Derf(8, elementwise_affine=False).weight is None
    assert normzoo.Derf(8, elementwise_affine=False).bias is None  # bias=True applies with elementwise_affine only
    assert normzoo.DyT(8, elementwise_affine=False).bias is None
    # The init values given are the ones the parameters start at, and reset_parameters returns to.
    m = normzoo.Derf(8, alpha_init_value=0.25, shift_init_value=-0.5)
    with torch.no_grad():
        m.shift.fill_(3.0)
        m.alpha.fill_(3.0)
    m.reset_parameters()
    assert m.alpha.item() == 0.25 and m.shift.item() == -0.5


def test_modules_match_functional(device):
    x = torch.randn(2, 8, 6, 6, device=device)
    m = normzoo.DyT(8, channels_last=False, backend="triton").to(device)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    torch.testing.assert_close(m(x), NF.dyt(x, m.alpha, m.weight, m.bias, channels_last=False, backend="torch"))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call_,exc,match",
    [
        (lambda: NF.dyt(torch.randn(3, 4), torch.ones(2)), ValueError, "exactly one element"),
        (lambda: NF.dyt(torch.randn(3, 4), 0.5), TypeError, "alpha must be a torch.Tensor"),
        (lambda: NF.dyt(torch.randn(3, 4), torch.ones(1, dtype=torch.int32)), TypeError, "floating-point"),
        (lambda: NF.derf(torch.randn(3, 4), torch.ones(1), torch.ones(3)), ValueError, "shift must have exactly"),
        (lambda: NF.dyt(torch.randn(3, 4), torch.ones(1), torch.ones(5)), ValueError, "trailing dims"),
        (lambda: NF.dyt(torch.randn(3, 4), torch.ones(1), [1.0] * 4), TypeError, "weight must be a torch.Tensor"),
        (lambda: NF.dyt(torch.randn(3, 4), torch.ones(1), None, (0.0,) * 4), TypeError, "bias must be a torch.Tensor"),
        (lambda: NF.dyt(torch.randn(3, 4, 2), torch.ones(1), torch.ones(5), channels_last=False), ValueError,
         r"weight must have shape \(4,\)"),
        (lambda: NF.dyt(torch.randn(4), torch.ones(1), channels_last=False), ValueError, r"\(B, C, \*spatial\)"),
        (lambda: NF.dyt(torch.ones(3, 4, dtype=torch.int64), torch.ones(1)), TypeError, "float16, bfloat16"),
        (lambda: NF.dyt(torch.randn(3, 4), torch.ones(1, device="meta")), ValueError, "same device"),
        (lambda: normzoo.DyT((2, 3), channels_last=False), ValueError, "one int C"),
        (lambda: normzoo.Derf(4, backend="cuda"), ValueError, "backend must be one of"),
        (lambda: normzoo.DyT(4, alpha_init_value="a"), TypeError, "alpha_init_value must be a real number"),
        (lambda: normzoo.Derf(4, shift_init_value=None), TypeError, "shift_init_value must be a real number"),
        (lambda: normzoo.DyT(4, alpha_init_value=float("nan")), ValueError, "alpha_init_value must be finite"),
    ],
)
def test_bad_input_raises_clear_errors(call_, exc, match):
    with pytest.raises(exc, match=match):
        call_()


# ---------------------------------------------------------------- torch.library and torch.compile


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("activation", ["tanh", "erf"])
@pytest.mark.parametrize("params_per_row", [False, True])
def test_opcheck(triton, activation, params_per_row, device):
    x = torch.randn(6, 20, device=device, requires_grad=True)
    channels = 3 if params_per_row else 20
    alpha = torch.tensor([0.5], device=device, requires_grad=True)
    shift = torch.tensor([0.1], device=device, requires_grad=True) if activation == "erf" else None
    w = torch.randn(channels, device=device, requires_grad=True)
    b = torch.randn(channels, device=device, requires_grad=True)
    torch.library.opcheck(ops.pointwise_fwd, (x, alpha, shift, w, b, activation, channels, params_per_row, triton))
    args = (torch.randn(6, 20, device=device), x.detach(), alpha.detach(), None if shift is None else shift.detach(),
            w.detach(), activation, channels, params_per_row, True, torch.float32, triton)
    torch.library.opcheck(ops.pointwise_bwd, args)


def test_compile_fullgraph_matches_eager(device):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), normzoo.DyT(8, channels_last=False, backend="triton"),
        torch.nn.Flatten(2), normzoo.Derf(16, backend="triton"),
    ).to(device)
    assert_compiled_matches_eager(model, torch.randn(2, 3, 4, 4, device=device), "aot_eager")


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("to,cls", [("dyt", normzoo.DyT), ("derf", normzoo.Derf)])
def test_swap_converts_norms_to_pointwise_layers(to, cls):
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.RMSNorm(16),
        normzoo.LayerNorm(16, bias=False), torch.nn.BatchNorm1d(16),
    ).to(torch.float64)
    report = normzoo.swap(model, to=to, alpha_init_value=0.2)
    name = f"normzoo.{cls.__name__}"
    assert report == {f"torch.LayerNorm -> {name}": 1, f"torch.RMSNorm -> {name}": 1,
                      f"normzoo.LayerNorm -> {name}": 1}
    assert all(isinstance(model[i], cls) for i in (1, 2, 3))
    assert type(model[4]) is torch.nn.BatchNorm1d  # never touched (DyT#9)
    assert model[1].bias is not None and model[2].bias is None and model[3].bias is None
    assert model[1].alpha.item() == 0.2 and model[1].weight.dtype == torch.float64
    assert model(torch.randn(4, 16, dtype=torch.float64)).shape == (4, 16)
    plain = torch.nn.Sequential(torch.nn.LayerNorm(16))
    normzoo.swap(plain, to=to)  # without alpha_init_value: the layer's own default
    assert plain[0].alpha.item() == cls(16).alpha_init_value == 0.5
    with pytest.raises(ValueError, match="alpha_init_value sets the initial alpha of the DyT/Derf layers"):
        normzoo.swap(torch.nn.Sequential(torch.nn.LayerNorm(16)), alpha_init_value=0.2)  # to=None: nothing to set


class _LayerNorm2d(torch.nn.LayerNorm):  # like timm's: normalizes dim 1 of NCHW input
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _Scaled(normzoo.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("subclass", [_LayerNorm2d, _Scaled], ids=["of-torch", "of-normzoo"])
def test_swap_to_dyt_reports_unknown_norm_subclasses(subclass):
    """A subclass of a norm is left alone and named in left_alone: it may compute something else.
    That holds for a subclass of normzoo.LayerNorm too, which is not "already ours" for to="dyt"."""
    model = torch.nn.Sequential(subclass(4), torch.nn.LayerNorm(4))
    report = normzoo.swap(model, to="dyt")
    assert report == {"torch.LayerNorm -> normzoo.DyT": 1}
    [(seen, count)] = report.left_alone.items()
    assert count == 1 and seen.endswith(f"{subclass.__name__} (unknown subclass of a norm)")
    assert type(model[0]) is subclass


def test_swap_rejects_unknown_target():
    with pytest.raises(ValueError, match="to must be one of"):
        normzoo.swap(torch.nn.Sequential(), to="batchnorm")


# ---------------------------------------------------------------- layouts and shapes that broke before


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_parameters_and_one_column_rows(backend, device):
    x = torch.randn(1, 6, device=device).t()  # (6, 1), strides (1, 6)
    alpha = torch.full((1, 1, 1), 0.7, device=device)  # any one-element shape
    w = torch.randn(1, 3, device=device)[:, 1]  # a strided view
    b = torch.full((1,), 0.2, device=device).expand(1)
    y = NF.dyt(x, alpha, w, b, backend=backend)
    assert_close(y, paper_formula(x.double(), alpha.double().view(1), None, w.double(), b.double(), True), "y")
    cols = torch.randn(3, 5, 2, device=device)[..., 0]  # (3, 5) parameters read from a strided view
    z = torch.randn(4, 3, 5, device=device)
    y = NF.derf(z, alpha.view(1), alpha.view(1) * 0, cols, None, backend=backend)
    assert_close(y, paper_formula(z.double(), 0.7, 0.0, cols.double(), None, True), "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_gradient_keeps_alpha_shape(backend, device):
    alpha = torch.full((1, 1), 0.5, device=device, requires_grad=True)
    NF.dyt(torch.randn(3, 4, device=device), alpha, backend=backend).sum().backward()
    assert alpha.grad.shape == (1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_channels_channels_first(backend, device):
    x = torch.randn(2, 0, 3, device=device, requires_grad=True)
    w = torch.randn(0, device=device, requires_grad=True)
    alpha = torch.ones(1, device=device, requires_grad=True)
    y = NF.dyt(x, alpha, w, channels_last=False, backend=backend)
    assert y.shape == (2, 0, 3)
    y.sum().backward()
    assert w.grad.shape == (0,) and torch.equal(alpha.grad, torch.zeros(1, device=device))


def test_swap_to_dyt_puts_parameterless_norms_on_the_models_device():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4, elementwise_affine=False))
    model = model.to(torch.float64).to("meta")
    normzoo.swap(model, to="dyt")
    assert model[1].alpha.device.type == "meta" and model[1].alpha.dtype == torch.float64
    assert model(torch.randn(2, 4, dtype=torch.float64, device="meta")).shape == (2, 4)


def test_swap_to_dyt_takes_the_dtype_of_a_model_with_only_buffers():
    """A model with no parameter at all (a non-affine norm beside running statistics): the new
    layer's alpha follows the model's buffers."""
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4, affine=False), torch.nn.LayerNorm(4, elementwise_affine=False))
    model = model.to(torch.float64)
    assert not list(model.parameters())
    normzoo.swap(model, to="dyt")
    assert type(model[1]) is normzoo.DyT and model[1].alpha.dtype == torch.float64
    assert model(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("cls", [normzoo.DyT, normzoo.Derf])
def test_modules_without_parameters_still_check_the_shape(cls):
    with pytest.raises(ValueError, match=r"trailing dims are \(16,\)"):
        cls(16, elementwise_affine=False)(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"trailing dims are \(4, 8\)"):
        cls((4, 8), elementwise_affine=False)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="expected input with 6 channels"):
        cls(6, elementwise_affine=False, channels_last=False)(torch.randn(2, 5, 3, 3))
    assert cls((4, 8), elementwise_affine=False)(torch.randn(2, 4, 8)).shape == (2, 4, 8)
