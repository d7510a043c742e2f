"""QK-norm, ScaleNorm and CRMSNorm: the head-wise kernels (under the interpreter without a GPU) and
the reference, against float64 autograd of each formula as its paper writes it."""

import math

import pytest
import torch

import normzoo
import normzoo.functional as NF
from helpers import assert_close
from normzoo import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def formula(x, w, eps, norm):
    """Each norm as written in its paper, in float64 autograd."""
    if norm == "rms":
        y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    elif norm == "l2":
        y = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    else:  # CRMSNorm: the RMSNorm of [z, −Σz], first C−1 values
        full = torch.cat([x, -x.sum(-1, keepdim=True)], dim=-1)
        y = (full * torch.rsqrt(full.square().mean(-1, keepdim=True) + eps))[..., :-1]
    return y * w if w is not None else y


def qkv_views(batch, seq, heads, kv_heads, head_dim, dtype, device, per_head=True):
    """q and k as views of one fused projection (B, S, (H + 2·Hkv)·D), as attention makes them."""
    qkv = (torch.randn(batch, seq, (heads + 2 * kv_heads) * head_dim, device=device) * 2 + 0.5).to(dtype)
    q = qkv[..., : heads * head_dim]
    k = qkv[..., heads * head_dim: (heads + kv_heads) * head_dim]
    if per_head:
        q, k = q.unflatten(-1, (heads, head_dim)), k.unflatten(-1, (kv_heads, head_dim))
    return qkv, q, k


def check_pair(q, k, wq, wk, eps, norm, backend):
    """Forward and every gradient of the pair against float64 autograd of the formula."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (q, k, wq, wk)]
    qo, ko = NF.qk_norm(*leaves, eps=eps, norm=norm, backend=backend)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == q.dtype and qo.is_contiguous()
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    params = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((qo, ko), params, (dq, dk))
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (q, k, wq, wk)]
    qo64, ko64 = formula(leaves64[0], leaves64[2], eps, norm), formula(leaves64[1], leaves64[3], eps, norm)
    grads64 = torch.autograd.grad((qo64, ko64), [t for t in leaves64 if t is not None], (dq.double(), dk.double()))
    assert_close(qo, qo64, "q", q.dtype)
    assert_close(ko, ko64, "k", k.dtype)
    for name, g, g64 in zip(["dq", "dk", "dwq", "dwk"], grads, grads64):
        assert_close(g, g64, name, g.dtype, scale=g64.abs().sum().item() if g.dim() == 1 else 0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["per_head", "all_heads"])
def test_qk_norm_rms_reads_a_fused_projection_in_place(layout, dtype, backend, device):
    """Qwen3 (per head, weights (head_dim,)) and OLMo 2 (over all heads, weights (H·head_dim,)),
    grouped-query k narrower than q, on views of one qkv tensor."""
    _, q, k = qkv_views(2, 5, 4, 2, 16, dtype, device, per_head=layout == "per_head")
    wq = torch.randn(q.shape[-1], device=device) * 0.5 + 1
    wk = torch.randn(k.shape[-1], device=device) * 0.5 + 1
    check_pair(q, k, wq.to(dtype), wk.to(dtype), 1e-6, "rms", backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_norm_l2_with_the_papers_scale(dtype, backend, device):
    _, q, k = qkv_views(3, 4, 2, 2, 32, dtype, device)
    scale = torch.tensor([math.log2(97.5 ** 2 - 97.5)], device=device)
    check_pair(q, k, scale, None, 1e-6, "l2", backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("norm", ["l2", "crms"])
@pytest.mark.parametrize("n", [1, 7, 64, 300])
def test_scale_norm_and_crms_norm(norm, n, backend, device):
    x = torch.randn(2, 3, n, device=device) * 3
    leaves = [x.clone().requires_grad_()]
    if norm == "l2":
        leaves.append(torch.tensor([n ** 0.5], device=device, requires_grad=True))
        y = NF.scale_norm(*leaves, backend=backend)
    else:
        y = NF.crms_norm(*leaves, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = formula(leaves64[0], leaves64[1] if norm == "l2" else None, 1e-5, norm)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    assert_close(y, y64, "y")
    # dx = rstd·(w·dy − …) cancels when dy is nearly parallel to x̂ (a one-element row always is):
    # judge it against the size of its terms, ‖w·dy·rstd‖, as the rowwise kernels' tests do.
    x64 = x.double()
    rstd = (1 / x64.norm(dim=-1, keepdim=True).clamp_min(1e-5) if norm == "l2" else
            torch.rsqrt((x64.square().sum(-1, keepdim=True) + x64.sum(-1, keepdim=True) ** 2) / (n + 1) + 1e-5))
    dx_scale = (dy.double() * rstd * (leaves64[1].detach() if norm == "l2" else 1.0)).norm().item()
    assert_close(grads[0], grads64[0], "dx", scale=dx_scale)
    if norm == "l2":
        assert_close(grads[1], grads64[1], "dscale", scale=(dy.double() * y64.detach()).abs().sum().item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("norm", ["rms", "l2"])
def test_qk_norm_output_nothing_uses_gives_no_gradient(norm, backend, device):
    """Only q's (or only k's) output used: k (q) and its weight get no gradient, None as from two
    separate norms (AdamW would decay a zero one), and the used side the values of the full backward
    with a zero cotangent for the other."""
    qk = normzoo.QKNorm(8, norm=norm, scale_init=4.0 if norm == "l2" else None, backend=backend, device=device)
    with torch.no_grad():
        for p in qk.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    q, k = torch.randn(2, 3, 4, 8, device=device), torch.randn(2, 3, 2, 8, device=device)
    params = dict(qk.named_parameters())
    for used in (0, 1):
        leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
        outputs = qk(*leaves)
        dy = torch.randn_like(outputs[used])
        wanted = [*leaves, *params.values()]
        got = torch.autograd.grad(outputs[used], wanted, dy, allow_unused=True)
        both = [torch.zeros_like(o) for o in outputs]
        both[used] = dy
        full = torch.autograd.grad(qk(*leaves), wanted, both, allow_unused=True)
        side = {0: ("q_weight", "scale"), 1: ("k_weight",)}[used]
        for name, g, f in zip(["q", "k", *params], got, full):
            if name in ("q", "k")[used:used + 1] or name in side:
                torch.testing.assert_close(g, f)
            else:
                assert g is None, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_l2_floor_holds_for_a_zero_row(backend, device):
    """A zero row (or one under eps): y = g·x/eps, and no gradient through the (constant) norm."""
    x = torch.zeros(3, 8, device=device)
    x[1] = torch.randn(8, device=device)
    x[2] = 1e-9
    x.requires_grad_()
    g = torch.tensor([2.0], device=device, requires_grad=True)
    y = NF.scale_norm(x, g, eps=1e-5, backend=backend)
    assert torch.equal(y[0], torch.zeros(8, device=device))
    dy = torch.randn_like(y)
    dx, = torch.autograd.grad(y, [x], dy)
    torch.testing.assert_close(dx[0], 2.0 * dy[0] / 1e-5, rtol=1e-5, atol=0)
    torch.testing.assert_close(dx[2], 2.0 * dy[2] / 1e-5, rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["all_heads", "per_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm, weight", [("rms", "column"), ("rms", None), ("l2", "scalar"), ("crms", None)])
def test_long_rows_loop_over_column_tiles(norm, weight, dtype, layout, device):
    """Rows wider than one tile (ScaleNorm or CRMSNorm over a wide model) take the looped kernels,
    forced here with small tiles, q and k read in place from one fused projection, against float64
    autograd of the formula. Over all heads: rows of 40 and 24 values in tiles of 16 (the last ones
    partial), one program a tensor. Per head: 40 q rows and 24 k rows of 24 values in tiles of 8,
    several programs a tensor (k's row statistics after q's in one scratch). With L2, one of k's
    rows is zero: the eps floor holds, and no gradient flows through it."""
    from normzoo.kernels import headwise_norm_backward, headwise_norm_forward
    from normzoo.kernels.headwise_norm import _config

    per_head = layout == "per_head"
    heads, kv_heads, head_dim, tile = (5, 3, 24, 8) if per_head else (5, 3, 8, 16)
    qkv, q, k = qkv_views(2, 4 if per_head else 3, heads, kv_heads, head_dim, dtype, device, per_head=per_head)
    nq, nk = q.shape[-1], k.shape[-1]
    assert not _config(nq, True, dtype.itemsize, tile).single_tile and _config(nq, True, dtype.itemsize).single_tile
    if norm == "l2":
        qkv[0, 1, heads * head_dim: heads * head_dim + nk] = 0  # one of k's rows
    make = {"column": lambda n: (torch.randn(n, device=device) * 0.5 + 1).to(dtype), None: lambda n: None,
            "scalar": lambda n: torch.tensor([1.7], device=device)}[weight]
    wq, wk = make(nq), make(nk) if weight != "scalar" else None  # the QK-norm paper's one scale, on q
    eps = 1e-5
    yq, yk = headwise_norm_forward(q, wq, k, wk, eps, norm=norm, max_block_n=tile)
    dyq, dyk = torch.randn_like(yq), torch.randn_like(yk)
    dxq, dxk, dwq, dwk = headwise_norm_backward(dyq.reshape(-1, nq), q, wq, dyk.reshape(-1, nk), k, wk, eps,
                                                norm=norm, dw_a=wq is not None, dw_b=wk is not None, max_block_n=tile)
    for x, w, y, dy, dx, dw, name in ((q, wq, yq, dyq, dxq, dwq, "q"), (k, wk, yk, dyk, dxk, dwk, "k")):
        x64 = x.detach().double().requires_grad_()
        w64 = w.detach().double().requires_grad_() if w is not None else None
        y64 = formula(x64, w64, eps, norm)
        assert_close(y, y64, f"y{name}", dtype)
        grads64 = torch.autograd.grad(y64, [t for t in (x64, w64) if t is not None], dy.double())
        live = x64.detach().norm(dim=-1) > eps  # rows on the floor: dx = w·dy/eps, checked on its own
        rstd = torch.rsqrt(x64.detach().square().mean(-1, keepdim=True) + eps)
        assert_close(dx[live], grads64[0][live], f"dx{name}", dtype,
                     scale=(dy.double() * rstd).norm().item() if norm != "l2" else 0.0)
        if not live.all():
            torch.testing.assert_close(dx[~live].double(), grads64[0][~live], rtol=RTOL_FLOOR[dtype], atol=0)
        if w is not None:
            assert_close(dw, grads64[1], f"dw{name}", w.dtype, scale=(dy.double() * y64.detach()).abs().sum().item())


@pytest.mark.parametrize("weights", ["column", None])
def test_qk_norm_k_longer_than_q(weights, device):
    """Cross-attention: k over a longer sequence than q (288 rows against 8). The backward splits
    each tensor's rows over one grid of programs (4 here, 64-row blocks), so k's programs must each
    take their own share of k's rows, not q's: with q's, k's last rows got no gradient."""
    q = torch.randn(1, 2, 4, 8, device=device) * 2 + 0.5
    k = torch.randn(1, 72, 4, 8, device=device) * 2 + 0.5
    w = (lambda: torch.randn(8, device=device) * 0.5 + 1) if weights else (lambda: None)
    check_pair(q, k, w(), w(), 1e-6, "rms", "triton")


@pytest.mark.parametrize("max_block_n", [None, 8], ids=["one-tile", "looped"])
def test_l2_rows_just_under_the_floor_take_no_gradient_through_the_norm(max_block_n, device):
    """Rows whose norm is under eps but not far under it (0.5 and 0.9 eps): y = g·x/eps, and dx =
    g·dy/eps, the norm's own term dropped. On a zero row that term is 0 anyway (x̂ = 0); here x̂ is
    half or nine tenths of a unit vector, and keeping the term would be off by as much."""
    from normzoo.kernels import headwise_norm_backward

    eps = 1e-2
    x = torch.randn(4, 24, device=device)
    x = x / x.norm(dim=-1, keepdim=True) * torch.tensor([[0.5 * eps], [0.9 * eps], [3.0], [1.1 * eps]], device=device)
    g = torch.tensor([1.7], device=device)
    dy = torch.randn_like(x)
    dx, _, dg, _ = headwise_norm_backward(dy, x, g, None, None, None, eps, norm="l2", dw_a=True, dw_b=False,
                                          max_block_n=max_block_n)
    x64, g64 = x.double().requires_grad_(), g.double().requires_grad_()
    dx64, dg64 = torch.autograd.grad(formula(x64, g64, eps, "l2"), [x64, g64], dy.double())
    assert_close(dx, dx64, "dx")
    assert_close(dg, dg64, "dg", scale=(dy.double() * formula(x64, g64, eps, "l2")).abs().sum().item())


@pytest.mark.parametrize("max_block_n", [None, 8], ids=["one-tile", "looped"])
@pytest.mark.parametrize("norm", ["rms", "crms"])
def test_backward_reads_a_row_strided_incoming_gradient(norm, max_block_n, device):
    """dy whose rows lie further apart than N (a view into a wider buffer, unit column stride: read
    in place) gives what its contiguous copy gives, bit for bit, for q and for k."""
    from normzoo.kernels import headwise_norm_backward

    q, k = torch.randn(6, 24, device=device), torch.randn(5, 24, device=device)
    wq, wk = torch.randn(24, device=device), torch.randn(24, device=device)
    dyq, dyk = torch.randn(6, 72, device=device)[:, 8:32], torch.randn(5, 72, device=device)[:, 40:64]
    assert dyq.stride(0) == 72 and not dyq.is_contiguous()
    run = lambda a, b: headwise_norm_backward(a, q, wq, b, k, wk, 1e-5, norm=norm, dw_a=True, dw_b=True,  # noqa: E731
                                              max_block_n=max_block_n)
    for got, want in zip(run(dyq, dyk), run(dyq.contiguous(), dyk.contiguous())):
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programs that run at once need a real GPU")
@pytest.mark.parametrize("norm", ["rms", "crms"])
def test_looped_backward_has_no_race_at_real_widths(norm, device):
    """The looped head-wise backward at the widths that take it, with its own tiles: pass A's row
    statistics go to a scratch that q's and k's programs share (k's rows after q's) and that every
    thread of a program reads back after a barrier. The interpreter runs programs one at a time and
    cannot show a wrong offset or a missing barrier; many programs and repeats on a GPU can. A q/k
    pair over all heads (q 16384 wide, k 4096) for RMSNorm, one tensor of 16384 for CRMSNorm."""
    from normzoo.kernels.headwise_norm import _config

    heads, kv_heads, head_dim = 64, 16, 256
    assert not _config(heads * head_dim, True).single_tile
    for _ in range(20):
        _, q, k = qkv_views(4, 64, heads, kv_heads, head_dim, torch.bfloat16, device, per_head=False)
        if norm == "rms":
            wq = torch.randn(q.shape[-1], device=device) * 0.5 + 1
            wk = torch.randn(k.shape[-1], device=device) * 0.5 + 1
            check_pair(q, k, wq, wk, 1e-6, "rms", "triton")
        else:
            x = q.contiguous().requires_grad_()
            y = NF.crms_norm(x, 1e-5, backend="triton")
            dy = torch.randn_like(y)
            dx, = torch.autograd.grad(y, [x], dy)
            x64 = x.detach().double().requires_grad_()
            y64 = formula(x64, None, 1e-5, "crms")
            assert_close(y, y64, "y", torch.bfloat16)
            assert_close(dx, torch.autograd.grad(y64, [x64], dy.double())[0], "dx", torch.bfloat16)


RTOL_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("norm", ["rms", "l2", "crms"])
def test_reference_backward_gradcheck(norm):
    x = (torch.randn(4, 9, dtype=torch.float64) * 2).requires_grad_()
    w = torch.randn(1 if norm == "l2" else 9, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: ops.headwise_norm(x, w, None, None, 1e-5, norm=norm, backend="torch"),
                             (x, w))
    # The hand-written backward is the formula's derivative, not just consistent with itself.
    y = formula(x, w, 1e-5, norm)
    dy = torch.randn_like(y)
    expected = torch.autograd.grad(y, [x, w], dy)
    got = reference.headwise_norm_backward(dy, x.detach(), w.detach(), 1e-5, norm, True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_views_that_fold_into_two_levels_are_not_copied(device):
    from normzoo.kernels.headwise_norm import rows_2d

    qkv, q, k = qkv_views(2, 5, 4, 2, 16, torch.float32, device)
    assert rows_2d(q) == (40, 4, 128, 16)  # (B·S, H) rows: B and S fold into one level of stride 128
    assert ops._headwise_for_kernels(q) is q and ops._headwise_for_kernels(k) is k
    transposed = q.transpose(1, 2)  # (B, H, S, D) of a (B, S, H, D) view: three levels, copied
    assert rows_2d(transposed) is None
    assert ops._headwise_for_kernels(transposed).is_contiguous()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_three_level_views_and_a_one_sided_gradient(backend, device):
    _, q, k = qkv_views(2, 5, 4, 4, 8, torch.float32, device)
    check_pair(q.transpose(1, 2), k.transpose(1, 2), None, None, 1e-6, "rms", backend)
    # Only q's output used: k gets no gradient (as from a norm of its own), q its own.
    qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, _ = NF.qk_norm(qq, kk, backend=backend)
    qo.sum().backward()
    assert kk.grad is None and qq.grad.abs().sum() > 0


def test_modules(device):
    sn = normzoo.ScaleNorm(64, device=device)
    assert sn.scale.item() == pytest.approx(8.0) and "64, eps=1e-05" in repr(sn)
    qk = normzoo.QKNorm(16, k_dim=8, device=device)
    assert qk.q_weight.shape == (16,) and qk.k_weight.shape == (8,) and "k_dim=8" in repr(qk)
    q, k = torch.randn(2, 3, 16, device=device), torch.randn(2, 3, 8, device=device)
    qo, ko = qk(q, k)
    torch.testing.assert_close(qo, formula(q, None, 1e-6, "rms"))
    l2 = normzoo.QKNorm(16, norm="l2", scale_init=10.0, device=device)
    assert l2.q_weight is None and l2.scale.item() == 10.0
    qo, ko = l2(q, q)
    torch.testing.assert_close(qo, 10 * ko)
    cr = normzoo.CRMSNorm(63)
    z = torch.randn(4, 63)
    torch.testing.assert_close(cr(z), formula(z, None, 1e-5, "crms").float())
    assert set(normzoo.QKNorm(16).state_dict()) == {"q_weight", "k_weight"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layer", ["ScaleNorm", "CRMSNorm", "QKNorm"])
def test_outputs_can_be_modified_in_place(layer, backend, device):
    # As any torch layer's: y.mul_(2) then backward gives twice the gradient (the reference path
    # once returned views made inside its autograd.Function, which autograd refuses to modify).
    module = getattr(normzoo, layer)(8, backend=backend, **({} if layer == "CRMSNorm" else {"device": device}))
    x = torch.randn(2, 3, 8, device=device, requires_grad=True)

    def outputs():
        out = module(x, x) if layer == "QKNorm" else (module(x),)
        return out

    plain = torch.autograd.grad(sum(o.sum() for o in outputs()), x)[0]
    out = outputs()
    for o in out:
        o.mul_(2)
    doubled = torch.autograd.grad(sum(o.sum() for o in out), x)[0]
    torch.testing.assert_close(doubled, 2 * plain)


def test_auto_backend_runs_rows_longer_than_the_kernels_take_on_the_reference(monkeypatch):
    # On a GPU "auto" picks the kernels, which take rows of at most MAX_N values: wider rows go
    # to the reference instead of raising (use_triton is made to say "GPU" here).
    from normzoo import ops
    from normzoo.kernels import headwise_norm

    n = headwise_norm.MAX_N + 1
    x, q = torch.randn(2, n), torch.randn(2, 3, n)
    want_x, want_q = normzoo.ScaleNorm(n, backend="torch")(x), normzoo.QKNorm(n, backend="torch")(q, q)[1]
    monkeypatch.setattr(ops, "use_triton", lambda backend, t: True)
    torch.testing.assert_close(normzoo.ScaleNorm(n, backend="auto")(x), want_x)
    torch.testing.assert_close(normzoo.QKNorm(n, backend="auto")(q, q)[1], want_q)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: NF.qk_norm(torch.randn(2, 4), torch.randn(2, 4), norm="ln"), ValueError, "norm must be one of"),
    (lambda: NF.qk_norm(torch.randn(2, 4), torch.randn(2, 4), torch.ones(3)), ValueError, r"q_weight must have shape \(4,\)"),
    (lambda: NF.qk_norm(torch.randn(2, 4), torch.randn(2, 4), torch.ones(1), torch.ones(4)), ValueError, "both"),
    (lambda: NF.scale_norm(torch.randn(2, 4), torch.ones(1), eps=-1.0), ValueError, "eps"),
    (lambda: NF.scale_norm(torch.randn(2, 4), 2.0), TypeError, "scale must be a torch.Tensor"),
    (lambda: NF.scale_norm(torch.randn(2, 4), torch.ones(1), eps=1e-25), ValueError, "underflows"),
    (lambda: NF.scale_norm(torch.randn(2, 4), torch.ones(1), eps=2e19), ValueError, "overflows"),
    (lambda: NF.scale_norm(torch.randn(2, 4), torch.ones(2)), ValueError, "scale must have shape"),
    (lambda: NF.crms_norm(torch.tensor(1.0)), ValueError, "at least one dimension"),
    (lambda: NF.qk_norm(torch.randn(2, 4), [1.0]), TypeError, "k must be a torch.Tensor"),
    (lambda: normzoo.QKNorm(8, norm="l2"), ValueError, "scale_init"),
    (lambda: normzoo.ScaleNorm(8)(torch.randn(2, 4)), ValueError, "last dim is 8"),
])
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_l2_eps_up_to_its_fp32_bound(backend, device):
    """The L2 floor is eps² in fp32: 2^64 - 2^40 is the largest eps whose square is finite there,
    and rows under the floor come out as x / eps (over it, every row would be NaN)."""
    x = torch.randn(3, 8, device=device)
    for eps in (1.5e19, 2.0**64 - 2.0**40):
        y = NF.scale_norm(x, torch.ones(1, device=device), eps=eps, backend=backend)
        torch.testing.assert_close(y, x / torch.tensor(eps, dtype=torch.float32))


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
def test_opcheck(triton, device):
    _, q, k = qkv_views(2, 3, 2, 1, 8, torch.float32, device)
    wq = torch.randn(8, device=device, requires_grad=True)
    wk = torch.randn(8, device=device, requires_grad=True)
    torch.library.opcheck(ops.headwise_norm_fwd, (q.detach().requires_grad_(), wq, k.detach().requires_grad_(), wk,
                                                  1e-6, "rms", triton))
    x = torch.randn(4, 8, device=device, requires_grad=True)
    torch.library.opcheck(ops.headwise_norm_fwd, (x, torch.ones(1, device=device, requires_grad=True), None, None,
                                                  1e-5, "l2", triton))


def test_compile_fullgraph_matches_eager(device):
    from helpers import assert_compiled_matches_eager

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 3 * 32)
            self.qk_norm = normzoo.QKNorm(8, backend="triton")

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 4, 8)).unbind(-3)
            q, k = self.qk_norm(q, k)
            return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2))

    assert_compiled_matches_eager(Attention().to(device), torch.randn(2, 5, 32, device=device), "aot_eager")


def test_compile_with_dynamic_shapes_takes_q_and_k_as_inputs(device):
    """q and k as inputs of a region compiled with dynamic=True: their width is a SymInt, and the
    weight's shape check (once ``w.shape not in ((n,), (1,))``, which Dynamo answers as never
    found) refused the module's own (8,) weights with "must have shape (8,) ..., got (8,)"."""
    torch._dynamo.reset()
    qk, scale = normzoo.QKNorm(8, backend="triton").to(device), torch.rand(8, device=device) + 0.5
    q, k = torch.randn(2, 3, 4, 8, device=device), torch.randn(2, 3, 2, 8, device=device)
    for fn, args in ((qk, (q, k)), (lambda x: NF.scale_norm(x, scale, backend="triton"), (q,))):
        got = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")(*args)
        torch.testing.assert_close(got, fn(*args))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_inputs_of_any_layout(backend, device):
    """No rows (an MoE expert that got no tokens, an expanded empty view): empty outputs, zero
    weight gradients, no launch error."""
    x = torch.randn(0, 1, device=device).expand(0, 8).requires_grad_()
    g = torch.ones(1, device=device, requires_grad=True)
    NF.scale_norm(x, g, backend=backend).sum().backward()
    assert x.grad.shape == (0, 8) and torch.equal(g.grad, torch.zeros(1, device=device))
    q = torch.randn(0, 4, 8, device=device, requires_grad=True)
    w = torch.ones(8, device=device, requires_grad=True)
    qo, ko = NF.qk_norm(q, torch.randn(2, 3, 8, device=device), w, w, backend=backend)
    assert qo.shape == (0, 4, 8) and ko.shape == (2, 3, 8)
    qo.sum().backward()
    assert torch.equal(w.grad, torch.zeros(8, device=device))


def test_dtensor_input_on_the_kernels_is_refused_clearly(tmp_path):
    """The head-wise and fused ops do not run DTensors on the kernels yet: a TypeError that says
    what to do, not a failure on the wrapper's missing storage."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x = distribute_tensor(torch.randn(2, 4, 8), mesh, [Shard(1)])
        with pytest.raises(TypeError, match="use backend='torch'"):
            NF.scale_norm(x, torch.ones(1), backend="triton")
        with pytest.raises(TypeError, match="use backend='torch'"):
            NF.add_norm(x, x, normzoo.RMSNorm(8, backend="triton"))
        # The plain norms take it: local rows, a DTensor back with the input's placements.
        y = normzoo.RMSNorm(8, backend="triton")(x)
        assert y.placements == x.placements
        torch.testing.assert_close(y.full_tensor(), NF.rms_norm(x.full_tensor(), (8,), torch.ones(8)))
    finally:
        dist.destroy_process_group()
