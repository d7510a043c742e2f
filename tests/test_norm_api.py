"""LayerNorm / RMSNorm public API: reference vs PyTorch, gradcheck, modules, errors, compile."""

import copy
import os
import warnings

import pytest
import torch

import normzoo
import normzoo.functional as NF
from helpers import assert_close, assert_compiled_matches_eager, capped, model_rms_norm, run_python
from normzoo import ops, reference

BACKENDS = ["torch", "triton"]


# ---------------------------------------------------------------- reference vs PyTorch, gradcheck


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 300])
def test_reference_matches_torch(dtype, n):
    x = torch.randn(11, n, dtype=dtype) * 2 + 0.5
    w, b = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    y, _, _ = reference.rowwise_norm_forward(x, w, b, 1e-5, is_rms=False)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (n,), w, b, 1e-5))
    y, _, _ = reference.rowwise_norm_forward(x, w, None, 1e-6, is_rms=True)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (n,), w, 1e-6))


@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
def test_gradcheck_float64(is_rms, affine):
    # float64 always runs the reference: this checks its hand-written backward numerically,
    # through the registered autograd formula.
    shape = (2, 3, 5)
    x = torch.randn(4, *shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True) if affine != "none" else None
    b = torch.randn(shape, dtype=torch.float64, requires_grad=True) if affine == "weight+bias" else None
    if is_rms:
        fn = lambda x, w: NF.rms_norm(x, shape, w, 1e-6)
        args = (x, w)
    else:
        fn = lambda x, w, b: NF.layer_norm(x, shape, w, b)
        args = (x, w, b)
    assert torch.autograd.gradcheck(fn, args)


# ---------------------------------------------------------------- functional, both backends


def torch_norm(is_rms, x, shape, w, b, eps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if is_rms:
            return torch.nn.functional.rms_norm(x, shape, w, eps)
        return torch.nn.functional.layer_norm(x, shape, w, b, eps)


def nz_norm(is_rms, x, shape, w, b, eps, backend):
    if is_rms:
        return NF.rms_norm(x, shape, w, eps, backend=backend)
    return NF.layer_norm(x, shape, w, b, eps, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize(
    "x_shape,shape",
    [((2, 3, 40), (40,)), ((5, 6, 7), (6, 7)), ((40,), (40,)), ((2, 3, 4, 9), (9,))],
)
def test_functional_any_leading_dims(backend, is_rms, x_shape, shape, device):
    x = torch.randn(x_shape, device=device, requires_grad=True)
    w = torch.randn(shape, device=device, requires_grad=True)
    b = torch.randn(shape, device=device, requires_grad=True)
    eps = 1e-5
    y = nz_norm(is_rms, x, shape, w, b, eps, backend)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    y_ref = torch_norm(is_rms, xr, shape, wr, br, eps)
    assert_close(y, y_ref.detach(), "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert_close(x.grad, xr.grad, "dx")
    assert_close(w.grad, wr.grad, "dw")
    if not is_rms:
        assert_close(b.grad, br.grad, "db")
    else:
        assert b.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_input_and_expanded_grad(backend, device):
    # x transposed (last-dim stride != 1); y.sum().backward() hands backward a stride-0 dy.
    base = torch.randn(24, 10, device=device)
    x = base.t().requires_grad_()  # (10, 24), strides (1, 10)
    w = torch.randn(24, device=device, requires_grad=True)
    NF.layer_norm(x, (24,), w, None, backend=backend).sum().backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    torch.nn.functional.layer_norm(xr, (24,), wr).sum().backward()
    assert_close(x.grad, xr.grad, "dx")
    assert_close(w.grad, wr.grad, "dw")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_subsets(backend, device):
    # Only x, only the weight, or nothing: each gets exactly the gradients it asked for.
    x = torch.randn(6, 16, device=device)
    w = torch.randn(16, device=device, requires_grad=True)
    b = torch.randn(16, device=device)
    NF.layer_norm(x, (16,), w, b, backend=backend).sum().backward()
    assert w.grad is not None and x.grad is None and b.grad is None
    x.requires_grad_()
    w2 = torch.randn(16, device=device)
    NF.rms_norm(x, (16,), w2, backend=backend).square().sum().backward()
    assert x.grad is not None and w2.grad is None
    with torch.no_grad():
        y = NF.layer_norm(x, (16,), w, b, backend=backend)
    assert not y.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend, device):
    x = torch.randn(0, 3, 8, device=device, requires_grad=True)
    m = normzoo.LayerNorm(8, backend=backend).to(device)
    y = m(x)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(m.weight.grad, torch.zeros(8, device=device))
    assert torch.equal(m.bias.grad, torch.zeros(8, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_takes_the_reference(backend, device):
    x = torch.randn(3, 9, dtype=torch.float64, device=device)
    torch.testing.assert_close(NF.layer_norm(x, (9,), backend=backend), torch.nn.functional.layer_norm(x, (9,)))


def test_rms_norm_default_eps_matches_torch(device):
    # eps=None is finfo(float32).eps for 16/32-bit input (pytorch#173039), not the input dtype's.
    x = torch.randn(4, 16, dtype=torch.bfloat16, device=device) * 1e-3
    torch.testing.assert_close(NF.rms_norm(x, (16,)), torch.nn.functional.rms_norm(x, (16,)))
    torch.testing.assert_close(NF.rms_norm(x, (16,), backend="triton"), torch.nn.functional.rms_norm(x, (16,)))


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize(
    "make",
    [
        lambda cls, **kw: cls(12, **kw),
        lambda cls, **kw: cls([3, 4], eps=1e-3, **kw),
        lambda cls, **kw: cls(12, elementwise_affine=False, **kw),
    ],
)
@pytest.mark.parametrize("pair", [(torch.nn.LayerNorm, normzoo.LayerNorm), (torch.nn.RMSNorm, normzoo.RMSNorm)])
def test_modules_are_drop_in(make, pair):
    torch_cls, nz_cls = pair
    ref, ours = make(torch_cls), make(nz_cls)
    assert isinstance(ours, torch_cls)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, *ours.normalized_shape)
    torch.testing.assert_close(ours(x), ref(x))
    expected = repr(ref)[:-1] + ", backend='auto')"
    if torch_cls is torch.nn.LayerNorm and "bias=" not in expected:  # torch 2.11 leaves bias out; ours writes it
        expected = expected.replace(", backend=", f", bias={ref.bias is not None}, backend=")
    assert repr(ours) == expected
    ours.reset_parameters()
    for name, p in ours.named_parameters():
        assert torch.equal(p, torch.ones_like(p) if name == "weight" else torch.zeros_like(p))


def test_layernorm_without_bias_has_no_bias_parameter():
    m = normzoo.LayerNorm(8, bias=False)
    assert m.bias is None and "bias" not in m.state_dict()
    assert "bias=False" in repr(m)


def test_module_device_dtype_and_mixed_precision(device):
    m = normzoo.RMSNorm(32, eps=1e-6, device=device, dtype=torch.float32, backend="triton")
    x = torch.randn(3, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: NF.layer_norm(torch.randn(3, 5), (4,)), ValueError, "trailing dims"),
        (lambda: NF.layer_norm(torch.randn(5), (2, 5)), ValueError, "trailing dims"),
        (lambda: NF.layer_norm(torch.ones(3, 4, dtype=torch.int64), (4,)), TypeError, "float16, bfloat16"),
        (lambda: NF.rms_norm([1.0, 2.0], (2,)), TypeError, "torch.Tensor"),
        (lambda: NF.layer_norm(torch.randn(3, 4), (4,), torch.randn(5)), ValueError, r"weight must have shape \(4,\)"),
        (lambda: NF.layer_norm(torch.randn(3, 4), (4,), None, torch.randn(4, 1)), ValueError, "bias must have shape"),
        (lambda: NF.layer_norm(torch.randn(3, 4), (4,), torch.randn(4, dtype=torch.float16)), TypeError, "float32"),
        (lambda: NF.layer_norm(torch.randn(3, 4), (4,), torch.randn(4, device="meta")), ValueError, "same device"),
        (lambda: NF.layer_norm(torch.randn(3, 4), "4"), TypeError, "normalized_shape"),
        (lambda: NF.layer_norm(torch.randn(3, 4), (4,), eps=-1.0), ValueError, "eps"),
        (lambda: NF.layer_norm(torch.randn(3, 4), (4,), eps="1e-5"), TypeError, "eps"),
        # torch.nn.LayerNorm has no eps=None default (RMSNorm's machine epsilon): a TypeError, as torch's
        (lambda: normzoo.LayerNorm(4, eps=None)(torch.randn(3, 4)), TypeError, "eps must be a float"),
        (lambda: normzoo.LayerNorm2d(4)([[1.0]]), TypeError, "input must be a torch.Tensor"),
        # names the (B, C, H, W) shape the caller passed, not the (B, H, W, C) view it normalizes
        (lambda: normzoo.LayerNorm2d(4)(torch.randn(2, 3, 5, 5)), ValueError,
         r"4 channels in dim 1 \(B, C, H, W\), got input of shape \(2, 3, 5, 5\)"),
        (lambda: NF.layer_norm(torch.randn(3, 4), -1), ValueError, "must not be negative"),
        (lambda: normzoo.LayerNorm(-1), ValueError, "must not be negative"),
        (lambda: normzoo.RMSNorm((2, -4)), ValueError, "must not have negative sizes"),
        (lambda: normzoo.LayerNorm("8"), TypeError, "normalized_shape must be an int"),
        (lambda: normzoo.LayerNorm([8.0]), TypeError, "normalized_shape must be an int"),
        (lambda: NF.layer_norm(torch.randn(3, 4), (4,), backend="cuda"), ValueError, "backend must be one of"),
        (lambda: normzoo.RMSNorm(4, backend="fast"), ValueError, "backend must be one of"),
        # eps at construction, not at the first forward
        (lambda: normzoo.LayerNorm(8, eps=-1.0), ValueError, "eps must be a finite number"),
        (lambda: normzoo.RMSNorm(8, eps=float("nan")), ValueError, "eps must be a finite number"),
        # an offset to a weight that is not there would be ignored
        (lambda: normzoo.RMSNorm(8, weight_offset=1.0, elementwise_affine=False), ValueError, "has none"),
        (lambda: NF.rms_norm(torch.randn(2, 8), (8,), weight_offset=1.0), ValueError, "there is none"),
        # inf in fp32, where the kernels add it: every row would be NaN
        (lambda: NF.layer_norm(torch.randn(2, 4), (4,), eps=1e39), ValueError, "that float32 holds"),
        (lambda: normzoo.LayerNorm(8, eps="1e-5"), TypeError, "eps must be a float"),
        (lambda: normzoo.ScaleNorm((2, 4)), ValueError, "dim must be one int"),
        (lambda: normzoo.CRMSNorm((2, 4)), ValueError, "dim must be one int"),
        (lambda: normzoo.QKNorm(8, k_dim=(2, 4)), ValueError, "dim must be one int"),
        (lambda: normzoo.QKNorm(8, norm="l2", scale_init="a"), TypeError, "scale_init must be a real number"),
        # arguments the chosen form would ignore
        (lambda: normzoo.QKNorm(8, scale_init=3.0), ValueError, "scale_init sets the initial g of norm='l2'"),
        (lambda: normzoo.QKNorm(8, norm="l2", scale_init=1.0, elementwise_affine=False), ValueError,
         "always learns its scale"),
        # k=None would have normalized q alone and returned it unpaired (q, k = ... split its rows)
        (lambda: normzoo.QKNorm(8)(torch.randn(2, 8), None), TypeError, "k must be a torch.Tensor, got NoneType"),
        # OLMo 2's all-heads QK-norm under GQA: k is narrower than q, which k_dim says
        (lambda: normzoo.QKNorm(8)(torch.randn(2, 8), torch.randn(2, 4)), ValueError,
         r"got k of shape \(2, 4\) \(a k of another width than q's, as GQA's over all heads: QKNorm\(8, k_dim=\.\.\.\)\)"),
        (lambda: normzoo.QKNorm(8, k_dim=4)(torch.randn(2, 8), torch.randn(2, 2)), ValueError,
         r"expected k whose last dim is 4, got k of shape \(2, 2\)$"),
        # a 0-d k is no k of another width: no k_dim hint
        (lambda: normzoo.QKNorm(8)(torch.randn(2, 8), torch.tensor(1.0)), ValueError,
         r"expected k whose last dim is 8, got k of shape \(\)$"),
        (lambda: normzoo.swap("model"), TypeError, "model must be a torch.nn.Module"),
        # A model's own RMSNorm takes a 16-bit weight beside fp32 input (T5 in fp16), not an fp64 one
        (lambda: normzoo.RMSNorm(4, x_hat_dtype="weight").double()(torch.randn(2, 4)), TypeError, "16-bit"),
        (lambda: normzoo.LayerNorm(4, weight_offset=1.0).bfloat16()(torch.randn(2, 4)), TypeError, "float32"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    # CPU tensors on purpose: this is the refusal a user gets without a GPU or the interpreter.
    from normzoo.kernels import heuristics

    monkeypatch.setattr(heuristics, "INTERPRETED", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        NF.layer_norm(torch.randn(2, 4), (4,), backend="triton")
    # Meta tensors are not refused: a model built on the meta device (deferred init) infers shapes
    # through the ops' fake implementations on a GPU machine too (found on an H100).
    for layer in (normzoo.LayerNorm(4, backend="triton", device="meta"),
                  normzoo.DyT(4, backend="triton", device="meta")):
        assert layer(torch.randn(2, 4, device="meta", requires_grad=True)).shape == (2, 4)


def test_triton_interpret_set_after_triton_was_imported_is_refused():
    """Triton reads TRITON_INTERPRET at import: set later (a script after `import transformers`),
    its own jit functions are compiled-mode ones and the first kernel would fail inside Triton.
    normzoo says what to do instead, at the first kernel use; set before, the kernels run."""
    script = ("import os, sys, torch, triton\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "import normzoo\n"
              "try:\n"
              "    normzoo.DyT(8, backend='triton')(torch.randn(2, 8))\n"
              "except RuntimeError as e:\n"
              "    print(e)\n")
    out = run_python("-c", script)
    assert "it was set after triton was imported" in out and "before Python starts" in out, out
    before = script.replace("import os, sys, torch, triton\n", "import os, sys, torch\n").replace(
        "import normzoo\n", "import triton, normzoo\nprint('ran', normzoo.DyT(8, backend='triton')(torch.ones(2, 8)).shape)\n")
    out = run_python("-c", before)
    assert "ran torch.Size([2, 8])" in out and "set after" not in out, out
    # Triton's other spellings of true run the kernels too (normzoo read only "1" once).
    out = run_python("-c", before.replace("'1'", "'true'"))
    assert "ran torch.Size([2, 8])" in out, out


# ---------------------------------------------------------------- torch.library and torch.compile


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_opcheck(triton, is_rms, device):
    x = torch.randn(6, 20, device=device, requires_grad=True)
    w = torch.randn(20, device=device, requires_grad=True)
    b = None if is_rms else torch.randn(20, device=device, requires_grad=True)
    torch.library.opcheck(ops.rowwise_norm_fwd, (x, w, b, 1e-5, is_rms, triton))
    _, stats = ops.rowwise_norm_fwd(x, w, b, 1e-5, is_rms, triton)
    db_dtype = None if is_rms else torch.float32
    args = (torch.randn(6, 20, device=device), x.detach(), w.detach(), stats, is_rms, True, db_dtype, triton)
    torch.library.opcheck(ops.rowwise_norm_bwd, args)


class _Block(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.proj = torch.nn.Linear(24, 24)
        self.ln = normzoo.LayerNorm(24, backend=backend)
        self.rms = normzoo.RMSNorm(24, eps=1e-6, backend=backend)

    def forward(self, x):
        return self.rms(self.ln(self.proj(x)) + x)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compiler, device):
    assert_compiled_matches_eager(_Block("triton").to(device), torch.randn(3, 5, 24, device=device), compiler)


# ---------------------------------------------------------------- layouts and dtypes that broke before


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_strided_and_expanded_parameters(backend, is_rms, device):
    # A weight that is a column of a bigger tensor, and a bias expanded from one value: the kernels
    # read parameters with unit stride, so these must be copied, not read in place.
    n = 24
    x = torch.randn(5, n, device=device)
    w = torch.randn(n, 2, device=device)[:, 0]
    b = torch.full((1,), 0.3, device=device).expand(n)
    y = nz_norm(is_rms, x, (n,), w, b, 1e-5, backend)
    y_ref = torch_norm(is_rms, x.double(), (n,), w.double(), b.double(), 1e-5)
    assert_close(y, y_ref, "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_column_view_and_its_gradient(backend, device):
    # (5, 1) with strides (1, 5): "contiguous" for PyTorch, yet its last stride is not 1.
    x = torch.randn(1, 5, device=device).t().requires_grad_()
    w = torch.randn(1, device=device, requires_grad=True)
    y = NF.rms_norm(x, (1,), w, 1e-5, backend=backend)
    dy = torch.randn(1, 5, device=device).t()
    y.backward(dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = torch.nn.functional.rms_norm(xr, (1,), wr, 1e-5)
    y_ref.backward(dy.double())
    # One-element RMSNorm is ill-conditioned in dx (1 − x̂² cancels): PyTorch's fp32 result is the peer.
    xp, wp = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.nn.functional.rms_norm(xp, (1,), wp, 1e-5).backward(dy)
    assert_close(y, y_ref.detach(), "y")
    assert_close(x.grad, xr.grad, "dx", peer=xp.grad)
    assert_close(w.grad, wr.grad, "dw", peer=wp.grad)
    assert NF.layer_norm(x, (1,), backend=backend).shape == (5, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gradient_has_the_bias_dtype(backend, device):
    # bf16 activations, no weight, fp32 bias: db is summed in fp32 and returned in fp32.
    x = torch.randn(4096, 8, device=device, dtype=torch.bfloat16)
    b = torch.zeros(8, device=device, requires_grad=True)
    y = NF.layer_norm(x, (8,), None, b, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert b.grad.dtype == torch.float32
    assert_close(b.grad, dy.double().sum(0), "db")


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
def test_opcheck_noncontiguous(triton, device):
    # Fake implementations promise contiguous outputs: the real ones must keep that promise for a
    # transposed input too (torch.compile checks the strides).
    x = torch.randn(20, 6, device=device).t().requires_grad_()
    w = torch.randn(20, device=device, requires_grad=True)
    torch.library.opcheck(ops.rowwise_norm_fwd, (x, w, w, 1e-5, False, triton))
    _, stats = ops.rowwise_norm_fwd(x, w, w, 1e-5, False, triton)
    dy = torch.randn(20, 6, device=device).t()
    torch.library.opcheck(ops.rowwise_norm_bwd, (dy, x.detach(), w.detach(), stats, False, True, torch.float32, triton))


def test_compile_inductor_with_transposed_input_on_the_default_backend():
    # The bug this guards: the reference's outputs followed a transposed input's layout while the
    # fake promised contiguous ones, and inductor's stride assertion failed.
    torch._dynamo.reset()
    fn = lambda x, w: NF.layer_norm(x, (24,), w) + NF.dyt(x, w[:1], w)
    x = torch.randn(24, 10).t()
    w = torch.rand(24) + 0.5
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="inductor")(x, w), fn(x, w))


def test_empty_normalized_shape_is_refused():
    with pytest.raises(ValueError, match="at least one dimension"):
        NF.layer_norm(torch.randn(3, 4), ())


def test_compile_with_dynamic_shapes(device):
    # Under dynamic=True, eps arrives as a SymFloat: validation must not call math functions on it.
    torch._dynamo.reset()
    model = _Block("triton").to(device)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (3, 7):
        x = torch.randn(rows, 24, device=device)
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_export_sees_the_custom_ops(strict, device):
    # Eager calls take an autograd.Function; traced ones (torch.compile, torch.export in both modes)
    # must see the registered custom ops instead, or the trace would run the launcher on fake tensors.
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), normzoo.LayerNorm(8, backend="triton"),
                                normzoo.RMSNorm(8, backend="triton"), normzoo.DyT(8, backend="triton")).to(device)
    x = torch.randn(4, 8, device=device)
    program = torch.export.export(model, (x,), strict=strict)
    targets = {str(node.target) for node in program.graph.nodes}
    assert {"normzoo.rowwise_norm_fwd.default", "normzoo.pointwise_fwd.default"} <= targets, targets
    torch.testing.assert_close(program.module()(x), model(x))


class _CondBlock(torch.nn.Module):
    """Each normzoo layer and functional op in one branch of a torch.cond or the other."""

    def __init__(self, device):
        super().__init__()
        make = dict(backend="triton", device=device)
        self.ln, self.rms, self.dyt = normzoo.LayerNorm(8, **make), normzoo.RMSNorm(8, **make), normzoo.DyT(8, **make)
        self.derf, self.scale = normzoo.Derf(8, **make), normzoo.ScaleNorm(8, **make)
        self.crms = normzoo.CRMSNorm(8, backend="triton")  # no parameters: no device
        self.qk = normzoo.QKNorm(4, **make)

    def modules_branch(self, x):
        q, k = self.qk(x.unflatten(-1, (2, 4)), x.unflatten(-1, (2, 4)) * 2)
        return self.crms(self.scale(self.derf(self.dyt(self.rms(self.ln(x)))))) + (q + k).flatten(-2)

    def functional_branch(self, x):
        alpha = torch.full((1,), 0.5, device=x.device)
        y = NF.derf(NF.dyt(NF.rms_norm(NF.layer_norm(x, (8,)), (8,)), alpha), alpha, alpha * 0)
        y = NF.norm_add(NF.add_norm(x, y, self.ln)[0], y, self.rms)
        return NF.norm_add_norm(x, y, self.ln, self.ln)[0]

    def forward(self, x):
        return torch.cond(x.sum() > 0, self.modules_branch, self.functional_branch, (x,))


def test_export_through_torch_cond(device):
    """torch.export of a torch.cond whose branches call every layer and functional op. Dynamo's
    guards on a default argument that a call left out failed there inside normzoo
    ("'NoneType' object is not subscriptable"): normzoo's own calls pass every argument."""
    block = _CondBlock(device)
    for sign in (1, -1):  # both branches, traced once
        x = torch.randn(3, 8, device=device).abs() * sign
        program = torch.export.export(block, (x,))
        targets = {str(n.target) for gm in program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
                   for n in gm.graph.nodes}
        assert {"normzoo.rowwise_norm_fwd.default", "normzoo.pointwise_fwd.default",
                "normzoo.headwise_norm_fwd.default", "normzoo.fused_residual_fwd.default"} <= targets, targets
        torch.testing.assert_close(program.module()(x), block(x))


class _EveryOp(_CondBlock):
    """Both of _CondBlock's branches in one graph, no torch.cond (the TorchScript exporter has none)."""

    def forward(self, x):
        return self.modules_branch(x) + self.functional_branch(x)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_takes_the_reference_math(dynamo, device, tmp_path):
    """torch.onnx.export, either exporter, of every layer and functional op. ONNX has no normzoo
    ops ("No ONNX function found for normzoo.rowwise_norm_fwd", "unrecognized namespace normzoo"):
    its trace records the reference math instead, torch ops it translates, and onnxruntime runs
    the graph as eager runs the model."""
    onnx, ort = pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    block, x = _EveryOp(device).eval(), torch.randn(3, 8, device=device)
    path = tmp_path / "every_op.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation
        torch.onnx.export(block, (x,), str(path), dynamo=dynamo)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}, "an op outside ONNX's own opset"
    # The plain LayerNorms (the module's and layer_norm's) as ONNX's own LayerNormalization, one
    # node each, as torch.nn.LayerNorm exports, not reductions (the dynamo exporter may keep them
    # inside a local function).
    nodes = [n for graph in (model.graph, *(f for f in model.functions)) for n in graph.node]
    assert sum(n.op_type == "LayerNormalization" for n in nodes) >= 2, sorted({n.op_type for n in nodes})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), block(x).cpu())


def test_onnx_exports_trace_takes_the_reference_math_without_onnx(device, monkeypatch):
    """The route the test above checks end to end, where onnx is not installed (CI): while
    torch.onnx says an export is tracing, torch.export (the dynamo exporter's first step) and
    make_fx record no normzoo op, and the graph computes what eager does."""
    import torch.onnx

    block, x = _EveryOp(device).eval(), torch.randn(3, 8, device=device)
    with torch.no_grad():
        want = block(x)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    graphs = {"export": torch.export.export(block, (x,)).module(),
              "make_fx": torch.fx.experimental.proxy_tensor.make_fx(block)(x)}
    for name, graph in graphs.items():
        targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
        assert not {t for t in targets if "normzoo" in t}, (name, targets)
        # LayerNorm as torch's own op, which ONNX exports as one LayerNormalization node.
        assert {"aten.layer_norm.default", "aten.native_layer_norm.default"} & targets, (name, targets)
        with torch.no_grad():
            torch.testing.assert_close(graph(x), want, msg=name)


def test_onnx_exports_strict_capture_takes_the_reference_math(device, monkeypatch):
    """The dynamo exporter's second capture, when the first (non-strict) fails, is a strict
    torch.export, under Dynamo, which folds torch.onnx.is_in_onnx_export() to False: the route
    must still see the export (torch.onnx's own flag set here, not a stand-in function Dynamo
    would call), or the graph holds normzoo ops ONNX cannot translate."""
    import torch.onnx

    flags = pytest.importorskip("torch.onnx._internal.exporter._flags")
    if not hasattr(flags, "_is_onnx_exporting"):
        pytest.skip("this torch's ONNX exporter keeps its flag elsewhere")
    block, x = _EveryOp(device).eval(), torch.randn(3, 8, device=device)
    with torch.no_grad():
        want = block(x)
    monkeypatch.setattr(flags, "_is_onnx_exporting", True)
    assert torch.onnx.is_in_onnx_export()
    graph = torch.export.export(block, (x,), strict=True).module()
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert not {t for t in targets if "normzoo" in t}, targets
    with torch.no_grad():
        torch.testing.assert_close(graph(x), want)


def test_decompositions_leave_a_program_of_aten_ops(device, tmp_path):
    """ExportedProgram.run_decompositions(normzoo.ops.decompositions()) of every layer and
    functional op: no normzoo op left, so the saved program loads and runs in a process that never
    imports normzoo, as eager runs the model. (ScaleNorm's reference once made a lifted
    torch.tensor constant, which aot_autograd refused as not functional.)"""
    block, x = _EveryOp(device).eval(), torch.randn(3, 8, device=device)
    program = torch.export.export(block, (x,)).run_decompositions(normzoo.ops.decompositions())
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not {t for t in targets if t.startswith("normzoo.")}, targets
    path = tmp_path / "every_op.pt2"
    torch.export.save(program, str(path))
    torch.save((x, block(x).detach()), str(tmp_path / "io.pt"))
    out = run_python("-c", "import sys, torch\n"
                     f"x, y = torch.load({str(tmp_path / 'io.pt')!r})\n"
                     f"torch.testing.assert_close(torch.export.load({str(path)!r}).module()(x), y)\n"
                     "print('normzoo' in sys.modules)")
    assert out.strip() == "False"


class _QKBlock(torch.nn.Module):
    def __init__(self, device):
        super().__init__()
        self.qk = normzoo.QKNorm(8, backend="triton", device=device)
        self.norm = normzoo.LayerNorm(8, backend="triton", device=device)

    def forward(self, q, k):
        q, k = self.qk(q, k)
        return self.norm(q + k)


def test_first_kernel_use_inside_a_trace_has_no_side_effect(monkeypatch, device):
    # normzoo.kernels is imported on first use and held in a module global: a strict export (or a
    # torch.compile) that made that first use stored the global inside the trace, and dynamo warned
    # of a side effect in the model's forward.
    monkeypatch.setattr(normzoo.ops, "_kernels", None)
    q, k = torch.randn(2, 3, 2, 8, device=device), torch.randn(2, 3, 2, 8, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(_QKBlock(device), (q, k), strict=True)
    assert not [w for w in caught if "side effect" in str(w.message)], [str(w.message) for w in caught]
    assert normzoo.ops._kernels is None  # nothing stored while tracing; the next eager call holds it
    program.module()(q, k)
    assert normzoo.ops._launchers() is normzoo.ops._kernels is not None


def test_first_kernel_use_inside_a_compile_does_not_recompile(monkeypatch, device):
    # A trace that read the global while it was None guarded on that None; the compiled graph's own
    # kernels then stored the module, so the second call failed the guard and compiled again (under
    # fail_on_recompile: an error). The QK-norm width check reads it on a GPU, backend="triton" on
    # the CPU interpreter.
    monkeypatch.setattr(normzoo.ops, "_kernels", None)
    torch._dynamo.reset()
    compiled = torch.compile(_QKBlock(device), fullgraph=True, dynamic=False)
    q = torch.randn(2, 3, 2, 8, device=device, requires_grad=True)
    k = torch.randn(2, 3, 2, 8, device=device, requires_grad=True)
    compiled(q, k).sum().backward()
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled(q, k).sum().backward()
    assert normzoo.ops._kernels is not None


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_export_with_normalized_shape_from_a_dynamic_width(strict, device):
    # The functional API with normalized_shape read off the input, whose last dim is dynamic: the
    # shape holds a SymInt, which must pass the checks as a size (it is no numbers.Integral and
    # does not hash) without specializing the dim, as torch.nn.functional's own norms do.
    cases = {"size": lambda x: NF.layer_norm(x, x.shape[-1:], backend="triton"),
             "tuple": lambda x: NF.rms_norm(x, (x.shape[-1],), backend="triton"),
             "int": lambda x: NF.rms_norm(x, x.shape[-1], backend="triton")}
    for name, fn in cases.items():
        module = type("M", (torch.nn.Module,), {"forward": lambda self, x, fn=fn: fn(x)})()
        dims = {"x": {0: torch.export.Dim("rows"), 1: torch.export.Dim("width")}}
        program = torch.export.export(module, (torch.randn(3, 8, device=device),), dynamic_shapes=dims, strict=strict)
        x = torch.randn(5, 24, device=device)
        expected = (torch.nn.functional.layer_norm(x, (24,)) if name == "size"
                    else torch.nn.functional.rms_norm(x, (24,)))
        torch.testing.assert_close(program.module()(x), expected, msg=name)


def test_exported_channels_first_dyt_runs_on_either_memory_format(device):
    # Traced on a channels_last input, the graph reads its rows of C in place; replayed on a
    # contiguous (B, C, H, W) input of the same shape, that branch must copy, not fail.
    for layer in (normzoo.DyT(8, channels_last=False, backend="triton", device=device),
                  normzoo.Derf(8, channels_last=False, backend="triton", device=device)):
        x = torch.randn(2, 8, 3, 3, device=device)
        program = torch.export.export(layer, (x.to(memory_format=torch.channels_last),))
        torch.testing.assert_close(program.module()(x), layer(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_jagged_nested_tensors(backend, device):
    # torch's LayerNorm and RMSNorm take a jagged nested tensor (B, j, C): so do ours (on its packed
    # values: the kernels' rows), with the same outputs and gradients; the other row norms too.
    parts = [torch.randn(2, 8, device=device), torch.randn(3, 8, device=device)]
    nested = lambda: torch.nested.nested_tensor([p.clone() for p in parts], layout=torch.jagged).requires_grad_()  # noqa: E731
    for ours, theirs in ((normzoo.LayerNorm(8, backend=backend, device=device), torch.nn.LayerNorm(8, device=device)),
                         (normzoo.RMSNorm(8, backend=backend, device=device), torch.nn.RMSNorm(8, device=device))):
        with torch.no_grad():
            ours.weight.normal_()
            theirs.weight.copy_(ours.weight)
        x, x_torch = nested(), nested()
        y, y_torch = ours(x), theirs(x_torch)
        assert y.is_nested and y.layout is torch.jagged
        torch.testing.assert_close(y.values(), y_torch.values())
        dy = torch.randn_like(y.values())
        (y.values() * dy).sum().backward()
        (y_torch.values() * dy).sum().backward()
        torch.testing.assert_close(x.grad.values(), x_torch.grad.values())
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    for layer in (normzoo.DyT(8, backend=backend, device=device), normzoo.Derf(8, backend=backend, device=device),
                  normzoo.ScaleNorm(8, backend=backend, device=device), normzoo.CRMSNorm(8, backend=backend)):
        y = layer(nested())
        for got, part in zip(y.unbind(), parts):
            torch.testing.assert_close(got, layer(part), msg=type(layer).__name__)
    # With holes (a narrow of a NaN-padded buffer): the holes' values must reach no gradient.
    padded = torch.full((3, 6, 8), float("nan"), device=device)
    starts, lengths = torch.tensor([0, 1, 2], device=device), torch.tensor([2, 4, 3], device=device)
    rows = [slice(int(a), int(a + n)) for a, n in zip(starts, lengths)]
    for i, r in enumerate(rows):
        padded[i, r] = torch.randn(r.stop - r.start, 8, device=device)
    padded.requires_grad_()
    ours, theirs = normzoo.LayerNorm(8, backend=backend, device=device), torch.nn.LayerNorm(8, device=device)
    y = ours(torch.nested.narrow(padded, 1, starts, lengths, layout=torch.jagged))
    sum((part ** 2).sum() for part in y.unbind()).backward()
    valid = [padded.detach()[i, r] for i, r in enumerate(rows)]
    sum((theirs(part) ** 2).sum() for part in valid).backward()
    for got, part in zip(y.unbind(), valid):
        torch.testing.assert_close(got, theirs(part))
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    with pytest.raises(TypeError, match="not nested"):
        normzoo.QKNorm(8, device=device)(nested(), nested())
    with pytest.raises(TypeError, match="not nested"):
        normzoo.functional.add_norm(nested(), nested(), normzoo.LayerNorm(8, device=device))
    with pytest.raises(ValueError, match="not nested"):
        normzoo.DyT(8, channels_last=False, device=device)(nested())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_subclass_that_dispatches_itself_takes_the_custom_ops(backend, device):
    # A wrapper subclass without storage of its own (torch's TwoTensor: two tensors, every op run on
    # both) reached the launchers, which read its absent storage. It takes the custom ops now,
    # which its __torch_dispatch__ runs on each tensor it wraps: forward and backward.
    from torch.testing._internal.two_tensor import TwoTensor

    for layer in (*_norm_layers(device), normzoo.ScaleNorm(8, device=device)):
        layer.backend = backend
        a, b = torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)
        x = TwoTensor(a, b).requires_grad_()
        y = layer(x)
        assert type(y) is TwoTensor
        torch.testing.assert_close(y.a, layer(a))
        torch.testing.assert_close(y.b, layer(b))
        y.sum().backward()
        a.requires_grad_()
        layer(a).sum().backward()
        torch.testing.assert_close(x.grad.a, a.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_subclass_beside_a_plain_input_takes_the_custom_ops(backend, device):
    # The same subclass as a weight beside a plain input, as a fused op's x beside a plain h, or as
    # k beside a plain q: the call was routed on its first tensor alone and reached the launchers.
    from torch.testing._internal.two_tensor import TwoTensor

    for layer in _norm_layers(device):
        layer.backend = backend
        w = torch.randn(8, device=device)
        layer.weight = torch.nn.Parameter(TwoTensor(w, w + 1))
        x = torch.randn(4, 8, device=device, requires_grad=True)
        y = layer(x)
        assert type(y) is TwoTensor
        y.sum().backward()
        for part, weight, dweight in ((y.a, w, layer.weight.grad.a), (y.b, w + 1, layer.weight.grad.b)):
            plain = copy.deepcopy(layer)
            plain.weight = torch.nn.Parameter(weight.clone())
            torch.testing.assert_close(part, plain(x))
            plain(x).sum().backward()
            torch.testing.assert_close(dweight, plain.weight.grad)

    norm = normzoo.RMSNorm(8, backend=backend, device=device)
    x = TwoTensor(torch.randn(4, 8, device=device), torch.randn(4, 8, device=device))
    h = torch.randn(4, 8, device=device)
    y, s = NF.add_norm(x, h, norm)
    assert type(y) is TwoTensor and type(s) is TwoTensor
    torch.testing.assert_close(y.a, NF.add_norm(x.a, h, norm)[0])
    torch.testing.assert_close(y.b, NF.add_norm(x.b, h, norm)[0])

    q = torch.randn(2, 3, 4, 8, device=device)
    k = TwoTensor(torch.randn(2, 3, 4, 8, device=device), torch.randn(2, 3, 4, 8, device=device))
    qk_norm = normzoo.QKNorm(8, backend=backend, device=device)
    q_out, k_out = qk_norm(q, k)
    assert type(k_out) is TwoTensor
    torch.testing.assert_close(k_out.a, qk_norm(q, k.a)[1])
    torch.testing.assert_close(k_out.b, qk_norm(q, k.b)[1])
    # the route itself (on the reference the old route also gave these values, through the Function)
    assert normzoo.ops._route(q, None, k, None) == "custom_op"
    assert normzoo.ops._route(h, x) == "custom_op"


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_on_the_custom_op_route(backend, device):
    # The registered custom ops' backwards are differentiable in eager too, as the Functions' are:
    # a call that takes them (a subclass that dispatches itself) keeps create_graph=True.
    from torch.testing._internal.two_tensor import TwoTensor

    def hessian_vector(f, t):
        (g,) = torch.autograd.grad(f(t), t, create_graph=True)
        return torch.autograd.grad(g.square().sum(), t)[0]

    w = torch.randn(8, device=device)
    for make in (lambda: normzoo.LayerNorm(8, backend=backend, device=device),
                 lambda: normzoo.Derf(8, backend=backend, device=device)):
        wrapped, plain = make(), make()
        wrapped.weight, plain.weight = torch.nn.Parameter(TwoTensor(w, w + 1)), torch.nn.Parameter(w + 1)
        x = torch.randn(4, 8, device=device, requires_grad=True)
        torch.testing.assert_close(hessian_vector(lambda t: wrapped(t).sin().sum(), x).b,
                                   hessian_vector(lambda t: plain(t).sin().sum(), x))
    x = TwoTensor(torch.randn(4, 8, device=device), torch.randn(4, 8, device=device))
    h = torch.randn(4, 8, device=device, requires_grad=True)
    norm = normzoo.RMSNorm(8, backend=backend, device=device)
    torch.testing.assert_close(hessian_vector(lambda t: NF.add_norm(x, t, norm)[0].sin().sum(), h).b,
                               hessian_vector(lambda t: NF.add_norm(x.b, t, norm)[0].sin().sum(), h))
    q = torch.randn(2, 3, 4, 8, device=device, requires_grad=True)
    k = TwoTensor(torch.randn(2, 3, 4, 8, device=device), torch.randn(2, 3, 4, 8, device=device))
    qk_norm = normzoo.QKNorm(8, backend=backend, device=device)
    torch.testing.assert_close(hessian_vector(lambda t: sum(y.sin().sum() for y in qk_norm(t, k)), q).b,
                               hessian_vector(lambda t: sum(y.sin().sum() for y in qk_norm(t, k.b)), q))


# ----------------------------------------------------------------------------------------------
# The eager path (an autograd.Function) and what it hands to the custom ops instead
# ----------------------------------------------------------------------------------------------


def _norm_layers(device):
    return [normzoo.LayerNorm(8, backend="triton", device=device), normzoo.RMSNorm(8, backend="triton", device=device),
            normzoo.DyT(8, backend="triton", device=device), normzoo.Derf(8, backend="triton", device=device)]


def test_vmap_over_layers_with_trainable_parameters(device):
    x = torch.randn(3, 4, 8, device=device)
    for layer in _norm_layers(device):
        torch.testing.assert_close(torch.vmap(layer)(x), layer(x))


def test_fake_tensors_and_meta_take_the_fake_implementations(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for layer in _norm_layers(device):
        with FakeTensorMode(allow_non_fake_inputs=True):
            y = layer(torch.randn(4, 8, device=device))
        assert y.shape == (4, 8)
        meta = layer.to("meta")
        assert meta(torch.randn(4, 8, device="meta")).shape == (4, 8)


def test_jit_trace(device):
    model = torch.nn.Sequential(*_norm_layers(device))
    x = torch.randn(4, 8, device=device)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    torch.testing.assert_close(traced(x), model(x))


def test_jit_script_is_refused_with_what_to_use_instead():
    # TorchScript failed deep inside the layers' Python ("try blocks aren't supported", or
    # keyword-only arguments in ops.py), naming no normzoo layer and no way out.
    swapped = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.RMSNorm(8))
    normzoo.swap(swapped)
    layers = [normzoo.LayerNorm(8), normzoo.LayerNorm2d(8), normzoo.DyT(8), normzoo.Derf(8), normzoo.ScaleNorm(8),
              normzoo.QKNorm(8), normzoo.CRMSNorm(8),
              normzoo.ResidualStack([torch.nn.Linear(8, 8)], 8, placement="pre")]
    for module, name in [(swapped, "RMSNorm")] + [(layer, type(layer).__name__) for layer in layers]:
        with pytest.raises(TypeError, match=rf"torch.jit.script cannot compile normzoo's {name} .*torch.jit.trace"):
            torch.jit.script(module)
    with pytest.raises(TypeError, match="normzoo.unswap"):
        torch.jit.script(swapped)
    normzoo.unswap(swapped)
    torch.jit.script(swapped)  # torch's classes again


def test_normalized_shape_type_is_checked_even_after_a_cached_call(device):
    x = torch.randn(2, 8, device=device)
    NF.layer_norm(x, (8,))  # caches (8,)
    with pytest.raises(TypeError, match="normalized_shape"):
        NF.layer_norm(x, (8.0,))


def test_empty_input_with_odd_strides(device):
    # An empty view with a column stride of 2 (an MoE expert with no tokens, say) is not a layout
    # error: nothing is read. Forward and backward return empty results and zero parameter grads.
    x = torch.empty(0, 40, device=device)[:, ::2].requires_grad_()
    for layer in (normzoo.LayerNorm(20, backend="triton", device=device), normzoo.DyT(20, backend="triton", device=device)):
        y = layer(x)
        assert y.shape == (0, 20)
        y.sum().backward()
        assert x.grad.shape == (0, 20) and all(torch.equal(p.grad, torch.zeros_like(p)) for p in layer.parameters())
        x.grad = None


@pytest.mark.parametrize("make", [lambda: normzoo.LayerNorm(8, backend="triton"), lambda: normzoo.RMSNorm(8, backend="triton"),
                                  lambda: normzoo.DyT(8, backend="triton"), lambda: normzoo.Derf(8, backend="triton")],
                         ids=["layernorm", "rmsnorm", "dyt", "derf"])
def test_layers_use_what_the_module_attribute_returns(make, device):
    """The layers read parameters from ``_parameters`` for speed; a parametrization, a plain
    attribute or torch.func.functional_call must still decide what they use."""
    from torch.nn.utils import parametrize

    layer = make().to(device)
    x = torch.randn(3, 8, device=device)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    plain = layer(x)

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    doubled = make().to(device)
    doubled.load_state_dict({**layer.state_dict(), "weight": 2 * layer.weight.detach()})
    parametrize.register_parametrization(layer, "weight", Double())
    assert "weight" not in layer._parameters
    assert_close(layer(x), doubled(x), "parametrized weight")
    assert not torch.allclose(layer(x), plain)
    parametrize.remove_parametrizations(layer, "weight")

    swapped = torch.func.functional_call(layer, {"weight": torch.zeros(8, device=device)}, (x,))
    bias = getattr(layer, "bias", None)
    bias = bias if bias is not None else torch.zeros(8, device=device)
    assert_close(swapped, bias.detach().expand(3, 8), "functional_call weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_weight_offset(is_rms, backend, device):
    """weight + offset, added in fp32 (Gemma's 1 + w): the kernels and the reference against the
    float64 reference, every gradient; a fresh layer starts as the identity affine (zeros)."""
    cls = normzoo.RMSNorm if is_rms else normzoo.LayerNorm
    layer = cls(40, backend=backend, device=device, weight_offset=1.0)
    assert torch.equal(layer.weight, torch.zeros(40, device=device)) and "weight_offset=1.0" in repr(layer)
    assert set(layer.state_dict()) == set(cls(40).state_dict())
    plain = cls(40, device=device)
    x = torch.randn(6, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    torch.testing.assert_close(layer(x), plain.to(torch.bfloat16)(x))
    with torch.no_grad():
        layer.weight.normal_(0, 0.3)
    y = layer(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], dy)
    x64 = x.detach().double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in layer.parameters()]
    eps = torch.finfo(torch.float32).eps if is_rms else layer.eps  # RMSNorm's eps=None, resolved as for fp32 input
    y64 = (NF.rms_norm(x64, (40,), params64[0], eps, backend="torch", weight_offset=1.0) if is_rms else
           NF.layer_norm(x64, (40,), *params64, backend="torch", weight_offset=1.0))
    grads64 = torch.autograd.grad(y64, [x64, *params64], dy.double())
    assert_close(y, y64, "y")
    for name, g, g64 in zip(["dx", "dweight", "dbias"], grads, grads64):
        assert_close(g, g64, name, scale=g64.abs().sum().item() if g.dim() == 1 else 0.0)
    # Gemma's own numerics: x̂ in fp32 times (1 + w) in fp32, one rounding.
    x32 = x.detach().float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) if is_rms else None
    if is_rms:
        gemma = (x32 * rstd * (1.0 + layer.weight.detach().float())).to(torch.bfloat16)
        assert_close(y, gemma.double(), "vs Gemma's formula", dtype=torch.bfloat16)


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
def test_opcheck_weight_offset(triton, device):
    x = torch.randn(6, 20, device=device, requires_grad=True)
    w = torch.randn(20, device=device, requires_grad=True)
    torch.library.opcheck(ops.rowwise_norm_fwd, (x, w, None, 1e-6, True, triton, 1.0))


def test_weight_offset_is_checked():
    with pytest.raises(TypeError, match="weight_offset"):
        normzoo.RMSNorm(4, weight_offset="1")
    with pytest.raises(ValueError, match="weight_offset"):
        NF.layer_norm(torch.randn(2, 4), (4,), torch.ones(4), weight_offset=float("inf"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_hat_dtype", ["input", "weight"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.float32)], ids=str)
@pytest.mark.parametrize("n, max_block_n", [(40, None), (100, 32)], ids=["single_tile", "looped"])
def test_x_hat_dtype_reproduces_the_models_formula(x_hat_dtype, dtypes, n, max_block_n, backend, device,
                                                   monkeypatch):
    """y bit-identical to the model's own formula on the reference; within one rounding of it on
    the kernels (their fp32 sums run in another order); the output dtype is the formula's; every
    gradient against float64 autograd of the same formula (the rounding counting as identity)."""
    if max_block_n is not None:
        if backend != "triton":
            pytest.skip("a cap on the tile width is a kernel setting")
        from normzoo.kernels import rowwise_norm as launchers
        monkeypatch.setattr(launchers, "launch_config", capped(launchers.launch_config, max_block_n))
    x_dtype, w_dtype = dtypes
    layer = normzoo.RMSNorm(n, eps=1e-6, backend=backend, device=device, dtype=w_dtype, x_hat_dtype=x_hat_dtype)
    with torch.no_grad():
        layer.weight.normal_(1, 0.5)
    x = (torch.randn(6, n, device=device) * 3).to(x_dtype).requires_grad_()
    y = layer(x)
    expected = model_rms_norm(x.detach(), layer.weight.detach(), 1e-6, x_hat_dtype)
    assert y.dtype == expected.dtype and f"x_hat_dtype={x_hat_dtype!r}" in repr(layer)
    if backend == "torch":
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    elif y.dtype is torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(y, expected, rtol=2 ** -7, atol=0)  # at most one flipped rounding
        assert (y != expected).float().mean() < 0.05
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, [x, layer.weight], dy)
    assert dx.dtype == x.dtype and dw.dtype == w_dtype
    if max_block_n is not None:  # the cap reached both launches: forward and backward looped
        ran = launchers.launch_config.configs
        assert {p for p, _ in ran} >= {"fwd", "bwd"} and not any(cfg.single_tile for _, cfg in ran)
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    y64 = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6))
    dx64, dw64 = torch.autograd.grad(y64, [x64, w64], dy.double())
    assert_close(dx, dx64, "dx")
    # dw sums dy over x̂ as rounded: compare with the same sum, in float64.
    dw_rounded = (dy.double() * model_rms_norm(x.detach(), torch.ones_like(layer.weight), 1e-6, x_hat_dtype).double()
                  ).sum(0)
    assert_close(dw, dw_rounded, "dw", scale=dw_rounded.abs().sum().item())


def test_x_hat_dtype_is_checked():
    with pytest.raises(ValueError, match="x_hat_dtype must be one of"):
        normzoo.RMSNorm(4, x_hat_dtype="fp32")
    with pytest.raises(ValueError, match="x_hat_dtype must be one of"):
        NF.rms_norm(torch.randn(2, 4), (4,), torch.ones(4), x_hat_dtype=torch.float32)


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
def test_opcheck_x_hat_dtype(triton, device):
    x = torch.randn(6, 20, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(20, device=device, requires_grad=True)
    torch.library.opcheck(ops.rowwise_norm_fwd, (x, w, None, 1e-6, True, triton, 0.0, 1, torch.float32))


def test_compile_fullgraph_with_x_hat_dtype(device):
    layer = normzoo.RMSNorm(24, eps=1e-6, backend="triton", device=device, dtype=torch.bfloat16, x_hat_dtype="input")
    assert_compiled_matches_eager(layer, torch.randn(3, 5, 24, device=device, dtype=torch.bfloat16), "aot_eager")


def test_layers_can_be_called_from_several_threads(device):
    """Triton's CPU interpreter is not thread-safe: launches are serialized there (14 of 16
    threads failed before). On a GPU the threads launch concurrently and must agree too."""
    import threading

    layers = [normzoo.LayerNorm(64, backend="triton", device=device), normzoo.DyT(64, backend="triton", device=device)]
    xs = [torch.randn(8, 64, device=device) for _ in range(16)]
    expected = [[layer(x) for x in xs] for layer in layers]
    failures = []

    def work(i):
        try:
            for _ in range(3):
                for layer, want in zip(layers, expected):
                    if not torch.equal(layer(xs[i]), want[i]):
                        failures.append((i, "mismatch"))
        except Exception as exc:  # noqa: BLE001 - any failure in a thread is the test's failure
            failures.append((i, repr(exc)[:200]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def _capped_tiles(monkeypatch, max_block_n):
    """Cap the row-wise and head-wise launchers' tiles (their looped paths); returns both logs."""
    from normzoo.kernels import headwise_norm
    from normzoo.kernels import rowwise_norm as launchers
    monkeypatch.setattr(launchers, "launch_config", capped(launchers.launch_config, max_block_n))
    headwise_config, headwise_configs = headwise_norm._config, []

    def capped_headwise(n, pair, itemsize=2, _max_block_n=None):
        headwise_configs.append(cfg := headwise_config(n, pair, itemsize, max_block_n))
        return cfg

    monkeypatch.setattr(headwise_norm, "_config", capped_headwise)
    return launchers.launch_config.configs, headwise_configs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, max_block_n", [(40, None), (100, 32)], ids=["single_tile", "looped"])
def test_a_nan_row_is_nan_and_eps_0_keeps_other_gradients_finite(n, max_block_n, backend, device, monkeypatch):
    """A NaN in a row makes that row NaN (output and dx) in every norm, and leaves the others alone:
    ScaleNorm's and QK-norm's l2 floor max(Σx², eps²) used to drop the NaN on the kernels and scale
    the row by g/eps. And eps = 0 (allowed) keeps the parameter gradients of finite rows finite: the
    head-wise kernels' masked rows past the end got rsqrt(0) = inf and put 0·inf into dw."""
    configs = None
    if max_block_n is not None:
        if backend != "triton":
            pytest.skip("a cap on the tile width is a kernel setting")
        configs = _capped_tiles(monkeypatch, max_block_n)
    ones = torch.ones(n, device=device)
    calls = {
        "layer_norm": lambda t, eps, w: NF.layer_norm(t, (n,), w, None, eps, backend=backend),
        "rms_norm": lambda t, eps, w: NF.rms_norm(t, (n,), w, eps, backend=backend),
        "scale_norm": lambda t, eps, w: NF.scale_norm(t, w[:1], eps, backend=backend),
        "qk_norm_l2": lambda t, eps, w: NF.qk_norm(t, t, w[:1], None, eps, norm="l2", backend=backend)[0],
        "qk_norm_rms": lambda t, eps, w: NF.qk_norm(t, t, w, w, eps, backend=backend)[0],
    }
    for name, call in calls.items():
        x = torch.randn(3, n, device=device)
        x[1, 5] = float("nan")
        x.requires_grad_()
        y = call(x, 1e-5, ones)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert y[1].isnan().all() and dx[1].isnan().all(), name
        assert y[[0, 2]].isfinite().all() and dx[[0, 2]].isfinite().all(), name
        for m in (3, 5):  # rows that leave a program's last row block part empty
            w = ones.clone().requires_grad_()
            y = call(torch.randn(m, n, device=device), 0.0, w)
            (dw,) = torch.autograd.grad(y, w, torch.randn_like(y))
            assert dw.isfinite().all(), (name, m)
    if configs is not None:  # the looped path really ran, row-wise and head-wise
        rowwise_configs, headwise_configs = configs
        assert rowwise_configs and not any(cfg.single_tile for _, cfg in rowwise_configs)
        assert headwise_configs and not any(cfg.single_tile for cfg in headwise_configs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, max_block_n", [(40, None), (100, 32)], ids=["single_tile", "looped"])
def test_rows_too_large_to_normalize_give_nan_not_the_bias(n, max_block_n, dtype, backend, device, monkeypatch):
    """Issue 14, item 5: a row of magnitude 1e30 overflows fp32's x² (rsqrt(inf) = 0), which used to
    return the bias, finite and wrong. Such a row is NaN now (torch's LayerNorm gives NaN too), in
    every norm, forward and dx; the other rows are untouched. "looped" caps the row-wise and the
    head-wise (ScaleNorm, QK-norm) launchers' tiles."""
    if max_block_n is not None:
        if backend != "triton":
            pytest.skip("a cap on the tile width is a kernel setting")
        rowwise_configs, headwise_configs = _capped_tiles(monkeypatch, max_block_n)
    x = torch.randn(3, n, device=device)
    x[0] *= 1e30
    x[2] *= 1e20  # x² = 1e40: over fp32's 3.4e38 as well
    x = x.to(dtype).requires_grad_()
    bias = torch.randn(n, device=device)
    calls = {
        "layer_norm": lambda t: NF.layer_norm(t, (n,), torch.ones(n, device=device), bias, backend=backend),
        "rms_norm": lambda t: NF.rms_norm(t, (n,), torch.ones(n, device=device), backend=backend),
        "add_norm": lambda t: NF.add_norm(t, torch.zeros_like(t), normzoo.LayerNorm(n, backend=backend, device=device))[0],
        "scale_norm": lambda t: NF.scale_norm(t, torch.ones(1, device=device), backend=backend),
        "qk_norm": lambda t: NF.qk_norm(t, t, backend=backend)[1],
    }
    for name, call in calls.items():
        y = call(x)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert y[[0, 2]].isnan().all() and dx[[0, 2]].isnan().all(), name
        assert y[1].isfinite().all() and dx[1].isfinite().all(), name
        expected = call(x.detach()[1:2].double())
        torch.testing.assert_close(y[1:2].double(), expected, rtol=1e-2, atol=1e-2, msg=name)
    if max_block_n is not None:
        assert not any(cfg.single_tile for _, cfg in rowwise_configs)
        assert headwise_configs and not any(cfg.single_tile for cfg in headwise_configs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_autocast_keeps_the_input_dtype(device_type, backend):
    """Issue 14, item 7, the decision: under autocast a normzoo norm computes in fp32 and returns
    its input's dtype, the same values as without autocast (eager and compiled). torch's own
    layer_norm returns fp32 under CUDA autocast; normzoo keeps bf16 there: half the bytes written,
    and what the next matmul autocasts to anyway."""
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA autocast needs a GPU")
    if device_type == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("backend='triton' on CPU tensors needs the interpreter")
    layers = [normzoo.LayerNorm(8, backend=backend, device=device_type),
              normzoo.RMSNorm(8, backend=backend, device=device_type),
              normzoo.DyT(8, backend=backend, device=device_type)]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 8, device=device_type, dtype=dtype)
        for layer in layers:
            plain = layer(x)
            with torch.autocast(device_type, dtype=torch.bfloat16):
                y = layer(x)
                torch._dynamo.reset()
                compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
            assert y.dtype == compiled.dtype == dtype, type(layer).__name__
            torch.testing.assert_close(y, plain, rtol=0, atol=0)
            torch.testing.assert_close(compiled, plain, rtol=0, atol=0)


def test_layers_of_one_width_share_their_shape_check(monkeypatch):
    """Each torch LayerNorm keeps its own (equal) normalized_shape tuple: the check is cached by
    value, so a model's layers of one width do not each run the full check on every call."""
    calls = []
    original = ops._normalized_shape_tuple
    monkeypatch.setattr(ops, "_normalized_shape_tuple", lambda shape: calls.append(shape) or original(shape))
    a, b = normzoo.LayerNorm(24), normzoo.LayerNorm(24)
    assert a.normalized_shape == b.normalized_shape and a.normalized_shape is not b.normalized_shape
    x = torch.randn(2, 24)
    calls.clear()  # the constructors check their int argument
    for _ in range(3):
        a(x)
        b(x)
    assert len(calls) <= 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                             (torch.float16, torch.bfloat16), (torch.float32, torch.float16)],
                         ids=str)
def test_rms_norm_takes_any_float_weight_as_torch_does(x_dtype, w_dtype, backend):
    # torch.nn.RMSNorm takes a weight of any float dtype and returns x̂ · w computed in fp32, rounded
    # once to the input's dtype (the kernels' arithmetic); a swapped model (OLMo 2's norms, torch's
    # own after .bfloat16() of the weights alone) must not start raising. LayerNorm keeps torch's
    # rule there (the input's dtype or fp32; torch's CPU layer_norm refuses the rest).
    torch.manual_seed(0)
    x = torch.randn(33, 96).to(x_dtype).requires_grad_()
    w = (torch.randn(96) * 2).to(w_dtype).requires_grad_()
    dy = torch.randn(33, 96).to(x_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that mixed dtypes skip its fused kernel
        ref = torch.nn.functional.rms_norm(x, (96,), w, 1e-6)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w), dy)
    y = NF.rms_norm(x, (96,), w, 1e-6, backend=backend)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert (y.dtype, dx.dtype, dw.dtype) == (x_dtype, x_dtype, w_dtype)
    if backend == "torch":
        assert torch.equal(y, ref)
    for got, want, dtype in ((y, ref, x_dtype), (dx, ref_dx, x_dtype), (dw, ref_dw, w_dtype)):
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * torch.finfo(dtype).eps,
                                   atol=2 * torch.finfo(dtype).eps * want.float().abs().max().item())
    with pytest.raises(TypeError, match="float32"):
        NF.layer_norm(x.detach(), (96,), w.detach())
