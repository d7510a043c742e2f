"""Function transforms, forward-mode AD and double backward, for every op normzoo ships (issue 14,
items 1-3), on the reference and the Triton path. Under these, normzoo runs its reference math as
differentiable torch ops (``normzoo.ops._route``: "composite"); double backward differentiates the
same math from the eager autograd path. Each result is checked against an independent float64
computation: torch's own norm where one exists, the paper's formula otherwise."""

import copy
import math

import pytest
import torch
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import normzoo
import normzoo.functional as NF

BACKENDS = ["torch", "triton"]


def _formula(name):
    """Independent float64 definitions, from the papers (and torch's own norms)."""
    F = torch.nn.functional
    return {
        "layernorm": lambda x, p: F.layer_norm(x, (x.shape[-1],), p["weight"], p["bias"], 1e-5),
        "rmsnorm": lambda x, p: F.rms_norm(x, (x.shape[-1],), p["weight"], 1e-6),
        "gemma": lambda x, p: F.rms_norm(x, (x.shape[-1],), None, 1e-6) * (1 + p["weight"]),
        "dyt": lambda x, p: p["weight"] * torch.tanh(p["alpha"] * x) + p["bias"],
        "derf": lambda x, p: p["weight"] * torch.erf(p["alpha"] * x + p["shift"]) + p["bias"],
        "scalenorm": lambda x, p: p["scale"] * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5),
        "crmsnorm": lambda x, p: (lambda f: (f * torch.rsqrt(f.square().mean(-1, keepdim=True) + 1e-5))[..., :-1])(
            torch.cat([x, -x.sum(-1, keepdim=True)], -1)),
    }[name]


def _layer(name, backend):
    n = 8
    layer = {
        "layernorm": lambda: normzoo.LayerNorm(n, backend=backend),
        "rmsnorm": lambda: normzoo.RMSNorm(n, eps=1e-6, backend=backend),
        "gemma": lambda: normzoo.RMSNorm(n, eps=1e-6, backend=backend, weight_offset=1.0),
        "dyt": lambda: normzoo.DyT(n, backend=backend),
        "derf": lambda: normzoo.Derf(n, backend=backend),
        "scalenorm": lambda: normzoo.ScaleNorm(n, backend=backend),
        "crmsnorm": lambda: normzoo.CRMSNorm(n, backend=backend),
    }[name]()
    with torch.no_grad():  # parameters away from their initial values, so every term shows
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


LAYERS = ["layernorm", "rmsnorm", "gemma", "dyt", "derf", "scalenorm", "crmsnorm"]


def _params64(layer):
    return {k: v.detach().double() for k, v in layer.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_jvp_jacfwd_and_forward_ad_match_the_formula(name, backend):
    layer = _layer(name, backend)
    x, v = torch.randn(4, 8) * 2, torch.randn(4, 8)
    _, tangent = jvp(layer, (x,), (v,))
    _, expected = jvp(lambda t: _formula(name)(t, _params64(layer)), (x.double(),), (v.double(),))
    torch.testing.assert_close(tangent.double(), expected, rtol=1e-4, atol=1e-5)
    assert tangent.abs().max() > 0
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = layer(fwAD.make_dual(x, v))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent.double(), expected, rtol=1e-4, atol=1e-5)
    jac = jacfwd(layer)(x[0])
    jac64 = jacrev(lambda t: _formula(name)(t, _params64(layer)))(x[0].double())
    torch.testing.assert_close(jac.double(), jac64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_grad_jacrev_and_per_sample_gradients(name, backend):
    """torch.func.grad and jacrev, and vmap(grad) per-sample gradients (as DP-SGD takes them),
    against a loop of float64 autograd, one sample at a time."""
    layer = _layer(name, backend)
    x = torch.randn(5, 8) * 2
    params = {k: v.detach() for k, v in layer.named_parameters()}
    loss = lambda p, xi: functional_call(layer, p, (xi,)).square().sum()  # noqa: E731
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x) if params else {}
    for i in range(x.shape[0] if params else 0):
        p64 = {k: v.double().requires_grad_() for k, v in params.items()}
        out = _formula(name)(x[i].double(), p64).square().sum()
        expected = torch.autograd.grad(out, list(p64.values()), allow_unused=True)
        for (k, got), e in zip(per_sample.items(), expected):
            torch.testing.assert_close(got[i].double(), e, rtol=1e-4, atol=1e-5, msg=k)
    dx = grad(lambda t: layer(t).sin().sum())(x)
    x64 = x.double().requires_grad_()
    (dx64,) = torch.autograd.grad(_formula(name)(x64, _params64(layer)).sin().sum(), x64)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-4, atol=1e-5)
    assert jacrev(layer)(x[0]).shape == (8, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_double_backward(name, backend):
    """A gradient penalty: d/dθ of ‖∂L/∂x‖², through the eager autograd path (create_graph=True),
    against float64 autograd of the formula; and gradgradcheck in float64."""
    layer = _layer(name, backend)
    x = (torch.randn(3, 8) * 2).requires_grad_()
    (gx,) = torch.autograd.grad(layer(x).sin().sum(), x, create_graph=True)
    params = list(layer.parameters())
    penalty = gx.square().sum()
    got = torch.autograd.grad(penalty, [x, *params])
    x64 = x.detach().double().requires_grad_()
    p64 = {k: v.requires_grad_() for k, v in _params64(layer).items()}
    (gx64,) = torch.autograd.grad(_formula(name)(x64, p64).sin().sum(), x64, create_graph=True)
    expected = torch.autograd.grad(gx64.square().sum(), [x64, *p64.values()])
    for g, e in zip(got, expected):
        scale = e.abs().max().item()
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    layer64 = _layer(name, backend).double()
    xs = (torch.randn(2, 8, dtype=torch.float64) * 2).requires_grad_()
    torch.autograd.gradgradcheck(lambda t, *ps: functional_call(
        layer64, dict(zip([k for k, _ in layer64.named_parameters()], ps)), (t,)), (xs, *[
            p.detach().requires_grad_() for p in layer64.parameters()]))


def _batched_vjps(f, inputs, cotangents):
    """VJPs of ``f`` at ``inputs`` for a batch of cotangents, three ways: autograd's
    is_grads_batched (its own vmap, as jacobian(vectorize=True) uses), a torch.func vmap around
    a backward whose forward ran outside it, and a loop of plain backwards (the expected values)."""
    outputs = f(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    batched = torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, is_grads_batched=True)
    under_vmap = vmap(lambda *g: torch.autograd.grad(outputs, inputs, g, retain_graph=True))(*cotangents)
    loop = [torch.autograd.grad(outputs, inputs, [g[i] for g in cotangents], retain_graph=True)
            for i in range(cotangents[0].shape[0])]
    return batched, under_vmap, [torch.stack(g) for g in zip(*loop)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS + ["qknorm", "add_norm", "norm_add_norm"])
def test_batched_backward(name, backend):
    """A backward whose incoming gradient is batched (jacobian(vectorize=True), hessian, vmap over
    a backward) runs where the kernels cannot read the gradient's storage: the same values as a
    loop of backwards. The forward runs the kernels as usual."""
    if name == "qknorm":
        qk = normzoo.QKNorm(8, backend=backend)
        f, inputs = qk, (torch.randn(2, 3, 4, 8, requires_grad=True), torch.randn(2, 3, 2, 8, requires_grad=True))
    elif name in ("add_norm", "norm_add_norm"):
        norms = [normzoo.LayerNorm(8, backend=backend), normzoo.LayerNorm(8, backend=backend)]
        f = (lambda x, h: NF.add_norm(x, h, norms[0])) if name == "add_norm" else (  # noqa: E731
            lambda x, h: NF.norm_add_norm(x, h, *norms))
        inputs = (torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True))
    else:
        f, inputs = _layer(name, backend), (torch.randn(3, 8, requires_grad=True),)
    outputs = f(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    cotangents = [torch.randn(4, *o.shape) for o in outputs]
    batched, under_vmap, expected = _batched_vjps(f, inputs, cotangents)
    for got in (batched, under_vmap):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    if name == "layernorm":
        jac = torch.autograd.functional.jacobian(f, inputs[0].detach(), vectorize=True)
        torch.testing.assert_close(jac, torch.autograd.functional.jacobian(f, inputs[0].detach()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_when_inputs_share_history(backend):
    """An op's inputs that depend on each other (norm(x·w) with w the norm's own weight) or are one
    tensor (q and k's tied weight, Derf's alpha as its shift): create_graph=True must give the first
    order's gradient, and a second order that matches float64 autograd of the formula. It counted
    the path from one input into another as that input's own (and a tensor passed twice twice)."""
    F = torch.nn.functional
    x = torch.randn(3, 8)
    for layer, formula in (
            (normzoo.RMSNorm(8, eps=1e-6, backend=backend), lambda x, w: F.rms_norm(x * w, (8,), w, 1e-6)),
            (normzoo.LayerNorm(8, backend=backend), lambda x, w: F.layer_norm(x * w, (8,), w, None, 1e-5))):
        w = layer.weight
        with torch.no_grad():
            w.add_(torch.randn(8) * 0.3)
        first = [torch.autograd.grad(layer(x * w).pow(3).sum(), w, create_graph=cg)[0] for cg in (False, True)]
        torch.testing.assert_close(first[1], first[0], rtol=1e-5, atol=1e-6)
        (second,) = torch.autograd.grad(first[1].square().sum(), w)
        w64 = w.detach().double().requires_grad_()
        (g64,) = torch.autograd.grad(formula(x.double(), w64).pow(3).sum(), w64, create_graph=True)
        (second64,) = torch.autograd.grad(g64.square().sum(), w64)
        torch.testing.assert_close(second.double(), second64, rtol=1e-4, atol=1e-4 * second64.abs().max().item())
    q, k = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    w = (torch.randn(8) + 1).requires_grad_()
    a = torch.tensor([0.5], requires_grad=True)
    for f, leaf in ((lambda: sum(NF.qk_norm(q, k, w, w, backend=backend)).sin().sum(), w),
                    (lambda: NF.derf(x, a, a, backend=backend).sin().sum(), a)):
        once, twice = (torch.autograd.grad(f(), leaf, create_graph=cg)[0] for cg in (False, True))
        torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qk_norm_under_transforms_and_double_backward(backend):
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8)
    wq, wk = torch.randn(8) + 1, torch.randn(8) + 1
    f = lambda q, k: NF.qk_norm(q, k, wq, wk, backend=backend)  # noqa: E731
    ref = lambda q, k: (NF.rms_norm(q.double(), (8,), wq.double(), 1e-6, backend="torch"),  # noqa: E731
                        NF.rms_norm(k.double(), (8,), wk.double(), 1e-6, backend="torch"))
    vq, vk = torch.randn_like(q), torch.randn_like(k)
    _, (tq, tk) = jvp(f, (q, k), (vq, vk))
    _, (eq, ek) = jvp(ref, (q.double(), k.double()), (vq.double(), vk.double()))
    torch.testing.assert_close(tq.double(), eq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tk.double(), ek, rtol=1e-4, atol=1e-5)
    qq = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(qq, k)[0].sin().sum(), qq, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), qq)
    q64 = q.double().requires_grad_()
    (g64,) = torch.autograd.grad(ref(q64, k)[0].sin().sum(), q64, create_graph=True)
    (gg64,) = torch.autograd.grad(g64.square().sum(), q64)
    torch.testing.assert_close(gg.double(), gg64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_residual_ops_under_transforms(backend):
    norm = normzoo.RMSNorm(8, eps=1e-6, backend=backend)
    x, h, v = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    f = lambda x, h: NF.add_norm(x, h, norm)[0]  # noqa: E731
    _, tangent = jvp(f, (x, h), (v, v))
    _, expected = jvp(lambda x, h: torch.nn.functional.rms_norm(x + h, (8,), norm.weight.detach().double(), 1e-6),
                      (x.double(), h.double()), (v.double(), v.double()))
    torch.testing.assert_close(tangent.double(), expected, rtol=1e-4, atol=1e-5)
    dh = grad(lambda h: f(x, h).square().sum())(h)
    h64 = h.double().requires_grad_()
    (dh64,) = torch.autograd.grad(torch.nn.functional.rms_norm(x.double() + h64, (8,), norm.weight.detach().double(),
                                                               1e-6).square().sum(), h64)
    torch.testing.assert_close(dh.double(), dh64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trace", ["make_fx", "compile"])
@pytest.mark.parametrize("name", ["layernorm", "gemma", "dyt", "derf", "crmsnorm", "qk_norm", "norm_add_norm"])
def test_transforms_inside_a_trace(name, trace):
    """torch.func.grad and vmap inside make_fx or torch.compile(fullgraph=True): a trace would
    otherwise send the call to the custom ops, which functorch cannot differentiate or batch."""
    from torch.fx.experimental.proxy_tensor import make_fx

    if name == "qk_norm":
        wq, wk = torch.randn(8) + 1, torch.randn(8) + 1
        f = lambda t: NF.qk_norm(t, t[..., :2, :], wq, wk, backend="triton")[1]  # noqa: E731
        f64 = lambda t: NF.rms_norm(t[..., :2, :], (8,), wk.double(), 1e-6, backend="torch")  # noqa: E731
    elif name == "norm_add_norm":
        norms = [_layer("rmsnorm", "triton"), _layer("rmsnorm", "triton")]
        f = lambda t: NF.norm_add_norm(t.flip(-1), t, *norms, scale=0.5)[0]  # noqa: E731
        p64 = [_params64(n) for n in norms]
        f64 = lambda t: _fused_formula("rmsnorm", "norm_add_norm", *p64, 0.5)(t.flip(-1), t)[0]  # noqa: E731
    else:
        layer = _layer(name, "triton")
        f, f64 = (lambda t: layer(t)), (lambda t: _formula(name)(t, _params64(layer)))  # noqa: E731
    x = torch.randn(2, 3, 8) * 2
    g = grad(lambda t: f(t).sin().sum())
    batched = vmap(f)
    traced = (lambda fn: make_fx(fn)(x)) if trace == "make_fx" else (
        lambda fn: torch.compile(fn, backend="eager", fullgraph=True))
    x64 = x.double().requires_grad_()
    (dx64,) = torch.autograd.grad(f64(x64).sin().sum(), x64)
    torch.testing.assert_close(traced(g)(x).double(), dx64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traced(batched)(x).double(), f64(x.double()), rtol=1e-4, atol=1e-5)


def test_functionalize_under_make_fx_keeps_the_custom_ops():
    """make_fx(functionalize(f)), torch's recipe for a functional graph, records each normzoo op as
    its custom op (nothing in them to functionalize), as make_fx(f) does; other transforms there
    take the reference (test_transforms_inside_a_trace)."""
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    layers = [_layer("layernorm", "triton"), _layer("dyt", "triton")]
    f = lambda t: layers[1](layers[0](t)).sin()  # noqa: E731
    x = torch.randn(4, 8)
    for traced in (make_fx(f)(x), make_fx(functionalize(f))(x)):
        ops = {str(n.target) for n in traced.graph.nodes if n.op == "call_function" and "normzoo" in str(n.target)}
        assert ops == {"normzoo.rowwise_norm_fwd.default", "normzoo.pointwise_fwd.default"}, traced.code
        torch.testing.assert_close(traced(x), f(x), rtol=0, atol=0)


FUSED_KINDS = ["layernorm", "rmsnorm", "gemma", "dyt", "derf"]


def _fused_formula(name, mode, p1, p2, scale):
    """(y, s) of a fused op in float64 from the formulas: the unfused sequence."""
    n1, n2 = (lambda v: _formula(name)(v, p1)), (lambda v: _formula(name)(v, p2))
    if mode == "add_norm":
        return lambda x, h: (n1(x + h) * scale, x + h)
    if mode == "norm_add":
        return lambda x, h: (None, x + n1(h))
    return lambda x, h: (n2(x + n1(h)) * scale, x + n1(h))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["add_norm", "norm_add", "norm_add_norm"])
@pytest.mark.parametrize("name", FUSED_KINDS)
def test_fused_double_backward(name, mode, backend):
    """A gradient penalty through a fused residual op (create_graph=True) with a loss on both y and
    s: d/dθ of ‖∂L/∂x‖² + ‖∂L/∂h‖², against float64 autograd of the unfused formulas; then
    gradgradcheck in float64, and a loss on s alone (its gradient passes ds on unchanged to x)."""
    norms = [_layer(name, backend), _layer(name, backend)][: 2 if mode == "norm_add_norm" else 1]
    scale = 0.5 if mode != "norm_add" else 1.0
    op = getattr(NF, mode)
    kw = {"scale": scale} if mode != "norm_add" else {}
    x, h = (torch.randn(3, 8) * 2).requires_grad_(), (torch.randn(3, 8) * 2).requires_grad_()
    params = [p for norm in norms for p in norm.parameters()]

    def loss(out):  # norm_add returns s alone
        y, s = out if isinstance(out, tuple) else (None, out)
        return (s.sin().sum() if y is None else y.sin().sum() + s.cos().sum())

    gx, gh = torch.autograd.grad(loss(op(x, h, *norms, **kw)), (x, h), create_graph=True)
    got = torch.autograd.grad(gx.square().sum() + gh.square().sum(), [x, h, *params])
    p64 = [{k: v.requires_grad_() for k, v in _params64(norm).items()} for norm in norms]
    f64 = _fused_formula(name, mode, p64[0], p64[-1], scale)
    x64, h64 = x.detach().double().requires_grad_(), h.detach().double().requires_grad_()
    gx64, gh64 = torch.autograd.grad(loss(f64(x64, h64)), (x64, h64), create_graph=True)
    expected = torch.autograd.grad(gx64.square().sum() + gh64.square().sum(),
                                   [x64, h64, *[p for ps in p64 for p in ps.values()]])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5 * max(e.abs().max().item(), 1.0))

    norms64 = [copy.deepcopy(norm).double() for norm in norms]
    names = [[k for k, _ in norm.named_parameters()] for norm in norms64]

    def f(x, h, *ps):
        it = iter(ps)
        calls = [dict(zip(ks, (next(it) for _ in ks))) for ks in names]
        with torch.nn.utils.stateless._reparametrize_module(norms64[0], calls[0]), \
                torch.nn.utils.stateless._reparametrize_module(norms64[-1], calls[-1]):
            return op(x, h, *norms64, **kw)

    inputs = [t.detach().double().requires_grad_() for t in (x[:2], h[:2])]
    torch.autograd.gradgradcheck(f, (*inputs, *[p.detach().requires_grad_() for p in
                                                [p for norm in norms64 for p in norm.parameters()]]))
    # s alone: ∂L/∂x = ds = cos(s) whatever the norms (s is x plus something without x), so
    # ∂/∂x of Σ cos(s) is -sin(s)
    xx = x.detach().clone().requires_grad_()
    s = op(xx, h.detach(), *norms, **kw)
    s = s[1] if isinstance(s, tuple) else s
    (gs,) = torch.autograd.grad(s.sin().sum(), xx, create_graph=True)
    (second,) = torch.autograd.grad(gs.sum(), xx)
    torch.testing.assert_close(second, -s.detach().sin())


def test_compile_still_takes_the_custom_ops(monkeypatch):
    """The composite route is for transforms only: torch.compile keeps the opaque custom op."""
    seen = []
    real = normzoo.ops._rowwise_composite
    monkeypatch.setattr(normzoo.ops, "_rowwise_composite", lambda *a: seen.append(1) or real(*a))
    torch._dynamo.reset()
    layer = normzoo.LayerNorm(8, backend="triton")
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(torch.randn(2, 8))
    assert out.shape == (2, 8) and not seen and math.isfinite(out.sum().item())


@pytest.mark.parametrize("placement", ["pre", "post", "peri", "mix", "scaled"])
def test_residual_stack_double_backward(placement):
    """Second-order gradients through a whole ResidualStack (Hessian-vector products, curvature
    studies of placements), whose every add is a fused op: gradgradcheck in float64."""
    torch.manual_seed(0)
    layers = [[torch.nn.Linear(4, 4, dtype=torch.float64), torch.nn.Tanh()] for _ in range(2)]
    stack = normzoo.ResidualStack(layers, 4, placement=placement, norm="layernorm", mix_ratio=0.5,
                                  dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(stack, (x,))
