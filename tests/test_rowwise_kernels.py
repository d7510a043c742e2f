"""The LayerNorm / RMSNorm Triton kernels against the float64 reference.

On a machine without a GPU these run in Triton's interpreter (see conftest.py): the same kernel
code, executed on CPU tensors.
"""

import warnings

import pytest
import torch

from helpers import assert_close, layernorm_cond
from normzoo import reference
from normzoo.kernels import rowwise_norm_backward, rowwise_norm_forward
from normzoo.kernels.heuristics import single_tile_limit

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, max_block_n): None keeps the real heuristic; a small cap forces the looped (multi-tile) path.
WIDTHS = [(1, None), (7, None), (97, None), (256, None), (97, 32), (1000, 128), (130, 64)]
AFFINE = ["none", "weight", "weight+bias"]


def make_inputs(m, n, dtype, affine, param_dtype, device, is_rms, scale=3.0, shift=1.0):
    x = (torch.randn(m, n, device=device) * scale + shift).to(dtype)
    weight = torch.randn(n, device=device).to(param_dtype) if affine != "none" else None
    bias = torch.randn(n, device=device).to(param_dtype) if affine == "weight+bias" and not is_rms else None
    return x, weight, bias


def torch_peer(x, weight, bias, dy, is_rms, eps):
    """PyTorch's own results at the input's precision (the tolerance's peer term):
    y, dx, dw, db, mean, rstd."""
    # CUDA's layer_norm refuses parameters of another dtype than the input (torch 2.11); the CPU
    # kernel takes them, so a mixed-precision peer runs there.
    mixed = weight is not None and weight.dtype != x.dtype
    peer_device = "cpu" if mixed and not is_rms else x.device
    leaves = [t.detach().to(peer_device).requires_grad_() if t is not None else None for t in (x, weight, bias)]
    dy = dy.to(peer_device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_norm warns that mixed dtypes skip its fused path
        if is_rms:
            y = torch.nn.functional.rms_norm(leaves[0], (x.shape[1],), leaves[1], eps)
        else:
            y = torch.nn.functional.layer_norm(leaves[0], (x.shape[1],), leaves[1], leaves[2], eps)
    y.backward(dy)
    xf = x.float()
    if is_rms:
        mean, rstd = None, torch.rsqrt(xf.square().mean(-1) + eps)
    else:
        _, mean, rstd = torch.native_layer_norm(xf, (x.shape[1],), None, None, eps)
        mean, rstd = mean.view(-1), rstd.view(-1)
    back = lambda t: None if t is None else t.to(x.device)
    return (back(y.detach()), *(back(t.grad) if t is not None else None for t in leaves), mean, rstd)


def run_and_compare(x, weight, bias, is_rms, eps=1e-5, max_block_n=None):
    m, n = x.shape
    dy = torch.randn_like(x)
    y_peer, dx_peer, dw_peer, db_peer, mean_peer, rstd_peer = torch_peer(x, weight, bias, dy, is_rms, eps)
    y, stats = rowwise_norm_forward(x, weight, bias, eps, is_rms=is_rms, max_block_n=max_block_n)
    assert stats.shape == ((m,) if is_rms else (2 * m,)) and stats.dtype == torch.float32
    # Inference's forward (no statistics kept) computes the same y.
    y_alone, no_stats = rowwise_norm_forward(x, weight, bias, eps, is_rms=is_rms, max_block_n=max_block_n,
                                             with_stats=False)
    assert no_stats is None and torch.equal(y_alone, y)
    mean, rstd = (None, stats) if is_rms else stats.view(2, m)
    as64 = lambda t: None if t is None else t.double()
    y_ref, mean_ref, rstd_ref = reference.rowwise_norm_forward(x.double(), as64(weight), as64(bias), eps, is_rms)
    cond = 0.0 if is_rms else layernorm_cond(x, rstd_ref)
    assert_close(y, y_ref, "y", x.dtype, peer=y_peer, cond=cond)
    assert_close(rstd, rstd_ref, "rstd", torch.float32, peer=rstd_peer)
    if not is_rms:
        assert_close(mean, mean_ref, "mean", torch.float32, peer=mean_peer)
    else:
        assert mean is None

    dy_before = dy.clone()
    dx, dw, db = rowwise_norm_backward(
        dy, x, weight, stats, is_rms=is_rms,
        compute_dw=weight is not None, db_dtype=bias.dtype if bias is not None else None, max_block_n=max_block_n,
    )
    assert torch.equal(dy, dy_before), "backward wrote into the incoming gradient"
    dx_ref, dw_ref, db_ref = reference.rowwise_norm_backward(
        dy.double(), x.double(), as64(weight), mean_ref, rstd_ref, is_rms,
        compute_dw=weight is not None, db_dtype=torch.float64 if bias is not None else None,
    )
    # dx = (w·dy − x̂·c1 − c2)·rstd cancels when dy is nearly parallel to x̂ (a one-element RMSNorm
    # always is): judge it against the size of the terms, ‖w·dy‖·rstd, not the small result.
    wdy = dy.double() * (weight.double() if weight is not None else 1.0)
    dx_scale = (wdy * rstd_ref[:, None]).norm().item()
    assert_close(dx, dx_ref, "dx", x.dtype, peer=dx_peer, scale=dx_scale, cond=cond)
    if weight is not None:
        assert_close(dw, dw_ref, "dw", weight.dtype, peer=dw_peer, cond=cond)
    else:
        assert dw is None
    if bias is not None:
        assert_close(db, db_ref, "db", bias.dtype, peer=db_peer)
    else:
        assert db is None


@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,max_block_n", WIDTHS)
@pytest.mark.parametrize("affine", AFFINE)
def test_kernels_match_reference(is_rms, dtype, n, max_block_n, affine, device):
    x, w, b = make_inputs(37, n, dtype, affine, dtype, device, is_rms)
    run_and_compare(x, w, b, is_rms, max_block_n=max_block_n)


@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,max_block_n", [(96, None), (320, 64)])
@pytest.mark.parametrize("affine", AFFINE)
def test_few_rows_one_program_writes_the_gradients(is_rms, dtype, n, max_block_n, affine, device):
    # Under 32 rows one program owns them all and stores dw/db in the parameters' dtype itself
    # (no partials, no reduce launch); the other tests' 37 rows take the two-launch path.
    x, w, b = make_inputs(5, n, dtype, affine, dtype, device, is_rms)
    run_and_compare(x, w, b, is_rms, max_block_n=max_block_n)


@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,max_block_n", [(97, None), (300, 64)])
def test_fp32_params_with_16bit_input(is_rms, dtype, n, max_block_n, device):
    # Mixed precision training: bf16/fp16 activations, fp32 weights; dw comes back in fp32.
    x, w, b = make_inputs(19, n, dtype, "weight+bias", torch.float32, device, is_rms)
    run_and_compare(x, w, b, is_rms, max_block_n=max_block_n)


@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_single_tile_limit_and_one_past(is_rms, dtype, device):
    # The real heuristic, at the widest single-tile row and one column past it.
    limit = single_tile_limit(dtype)
    for n in (limit, limit + 1):
        x, w, b = make_inputs(3, n, dtype, "weight+bias", dtype, device, is_rms)
        run_and_compare(x, w, b, is_rms)


def test_large_mean_is_stable(device):
    # A one-pass E[x²] − E[x]² would lose every digit here; Chan's merge and two-pass do not.
    for max_block_n in (None, 64):
        x = torch.randn(8, 500, device=device) + 1e4
        run_and_compare(x, torch.randn(500, device=device), None, is_rms=False, max_block_n=max_block_n)


def test_zero_rows_and_constant_rows(device):
    x = torch.zeros(5, 33, device=device)
    x[1] = 2.5  # constant row: zero variance
    run_and_compare(x, torch.randn(33, device=device), torch.randn(33, device=device), is_rms=False)
    run_and_compare(x, torch.randn(33, device=device), None, is_rms=True)


def test_more_rows_than_programs(device):
    # Many rows per program: the per-program partial sums of dw/db must cover every row once.
    x, w, b = make_inputs(1000, 24, torch.float32, "weight+bias", torch.float32, device, False)
    run_and_compare(x, w, b, is_rms=False)
    run_and_compare(x, w, None, is_rms=True, max_block_n=8)
    # More programs than the reduce sums in one step (under the interpreter's 4 "SMs": 64 programs
    # of 16 rows, partials summed 32 rows at a time): it must loop over every block of partials.
    x, w, b = make_inputs(1024, 8, torch.float32, "weight+bias", torch.float32, device, False)
    run_and_compare(x, w, b, is_rms=False)


def test_empty_input(device):
    x = torch.empty(0, 16, device=device)
    w = torch.randn(16, device=device)
    y, stats = rowwise_norm_forward(x, w, w, 1e-5, is_rms=False)
    assert y.shape == (0, 16) and stats.shape == (0,)
    dx, dw, db = rowwise_norm_backward(torch.empty(0, 16, device=device), x, w, stats,
                                       is_rms=False, compute_dw=True, db_dtype=torch.float32)
    assert dx.shape == (0, 16)
    assert torch.equal(dw, torch.zeros(16, device=device)) and torch.equal(db, torch.zeros(16, device=device))


def test_strided_rows(device):
    # Rows that are not packed (a slice of a wider tensor): the kernels honour the row stride.
    wide = torch.randn(21, 80, device=device)
    x = wide[:, 5:70]
    assert x.stride(0) == 80
    run_and_compare(x, torch.randn(65, device=device), torch.randn(65, device=device), is_rms=False)
    run_and_compare(x, torch.randn(65, device=device), None, is_rms=True, max_block_n=16)


def test_launchers_refuse_rows_they_cannot_read(device):
    # The launchers test the usual case (2-D, contiguous, dy shaped as x) inline and ask
    # check_rows only when that fails: every refusal must still reach it.
    x, w = torch.randn(4, 16, device=device), torch.randn(16, device=device)
    _, stats = rowwise_norm_forward(x, w, w, 1e-5, is_rms=False)
    column_strided = torch.randn(4, 32, device=device)[:, ::2]
    for bad in (x.view(2, 2, 16), column_strided):
        with pytest.raises(AssertionError, match="unit column stride"):
            rowwise_norm_forward(bad, w, w, 1e-5, is_rms=False)
    for dy, x_ in ((column_strided, x), (torch.randn(4, 8, device=device), x), (x.view(2, 2, 16), x),
                   (x, column_strided)):
        with pytest.raises(AssertionError, match="unit column stride"):
            rowwise_norm_backward(dy, x_, w, stats, is_rms=False, compute_dw=True, db_dtype=torch.float32)


def test_backward_is_deterministic(device):
    x, w, b = make_inputs(301, 50, torch.bfloat16, "weight+bias", torch.float32, device, False)
    y, stats = rowwise_norm_forward(x, w, b, 1e-5, is_rms=False)
    dy = torch.randn_like(x)
    # Bit-identical repeats: trivially so under the interpreter; on a GPU this guards against
    # atomics or any run-to-run change in reduction order.
    first = rowwise_norm_backward(dy, x, w, stats, is_rms=False, compute_dw=True, db_dtype=torch.float32)
    for _ in range(2):
        again = rowwise_norm_backward(dy, x, w, stats, is_rms=False, compute_dw=True, db_dtype=torch.float32)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


@pytest.mark.skipif(torch.cuda.is_available(), reason="uses a 4 GiB lazily-mapped CPU buffer")
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_row_offsets_past_2_pow_31(is_rms):
    # Three rows 2^30 elements apart: the last starts at element 2^31, past int32. Only the
    # touched pages of the 4 GiB buffer are ever mapped.
    n, stride = 48, 1 << 30
    storage = torch.empty(2 * stride + n, dtype=torch.float16)
    x = storage.as_strided((3, n), (stride, 1))
    x.copy_(torch.randn(3, n).to(torch.float16))
    w = torch.randn(n, dtype=torch.float16)
    run_and_compare(x, w, None, is_rms)
    run_and_compare(x, w, None, is_rms, max_block_n=16)


@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_hidden_65536(is_rms, device):
    x, w, b = make_inputs(2, 65536, torch.bfloat16, "weight+bias", torch.float32, device, is_rms)
    run_and_compare(x, w, b, is_rms)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a race between warps needs a real GPU")
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_looped_backward_has_no_race_between_warps(is_rms, device):
    # The looped backward writes each row's c1/c2 from one thread and reads them from all: without
    # the barrier between its two passes other warps could read poison. Few rows per program
    # (one row block each) and many repeats make a missing barrier show.
    n = single_tile_limit(torch.bfloat16) + 1
    for _ in range(50):
        x, w, b = make_inputs(64, n, torch.bfloat16, "weight+bias", torch.float32, device, is_rms)
        run_and_compare(x, w, b, is_rms)


@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype,n", [(torch.float32, 6000), (torch.bfloat16, 12000)], ids=str)
@pytest.mark.parametrize("m,persistent", [(37, False), (5, False), (37, True)])
def test_a_tables_wide_single_tile(is_rms, dtype, n, m, persistent, device, monkeypatch):
    # A measured table may keep a row the rules loop over (up to twice their single-tile limit) in
    # one tile, forward and backward: one launch each of one BLOCK_N-wide tile (no row-sum scratch
    # in the backward), the same results. 37 rows: two backward programs and the reduce; 5: one
    # program writing the gradients itself; a persistent forward grid too. A launch of another
    # layout than the plain norm's (a fused forward, a dy in another dtype) keeps the rules' tiles.
    from normzoo.kernels import heuristics as h
    from normzoo.kernels import rowwise_norm as k

    op = "rmsnorm" if is_rms else "layernorm"
    wide = 16384 if dtype.itemsize == 2 else 8192
    assert not h.launch_config(op, "bwd", n, dtype, torch.device(device)).single_tile  # the rules loop here
    assert not h.launch_config(op, "fwd", n, dtype, torch.device(device)).single_tile
    monkeypatch.setattr(h, "device_name", lambda d: "wide-tile-test")  # a table of its own, on any device
    monkeypatch.setattr(k, "num_compute_units", lambda d: 2)
    fwd = {"num_warps": 16, "block_m": 1, "single_tile": True}
    if persistent:
        fwd.update(persistent=True, programs_per_sm=2, num_stages=2)
    keys = {h.config_key(op, "fwd", dtype, n): fwd,
            h.config_key(op, "bwd", dtype, n): {"num_warps": 16, "block_m": 1, "programs_per_sm": 1, "num_stages": 2,
                                                "single_tile": True}}
    launches = []

    class Spy:  # the launcher's global, not Triton's class: any Triton version's launch path
        def __init__(self, kernel, pick):
            self.kernel, self.pick = kernel, pick

        def run(self, *args, **kw):
            launches.append(self.pick(args))
            return self.kernel.run(*args, **kw)

    try:
        for key, entry in keys.items():
            h.set_tuned("wide-tile-test", key, entry)
        # (BLOCK_N, NUM_STAGES: 0 one tile a program, < 0 persistent) and (BLOCK_N, SINGLE_TILE, ROW_SUMS)
        monkeypatch.setattr(k, "_norm_fwd_kernel", Spy(k._norm_fwd_kernel, lambda a: ("fwd", a[-2], a[-1])))
        monkeypatch.setattr(k, "_norm_bwd_kernel", Spy(k._norm_bwd_kernel, lambda a: ("bwd", a[-4], a[-3], a[8])))
        x, w, b = make_inputs(m, n, dtype, "weight+bias", dtype, device, is_rms)
        run_and_compare(x, w, b, is_rms)
        fwd_launch = ("fwd", wide, -2 if persistent else 0)  # twice: with the statistics and without
        assert launches == [fwd_launch, fwd_launch, ("bwd", wide, True, None)]
        launches.clear()
        _, stats, *_ = k.rowwise_residual_forward(x, x, w, b, 1e-5, is_rms=is_rms, mode="add_norm")
        # A fused backward with the plain launch's operands (no sum's gradient, dx stored once:
        # norm_add's, or add_norm's with s unused) is the launch the entry was timed on: whole rows.
        # A dy in another dtype than x (an x_hat_dtype norm's fp32 output) is not: the rules' tiles.
        dy = torch.randn_like(x)
        k.rowwise_residual_backward(dy, x, w, stats, is_rms=is_rms, compute_dw=True, db_dtype=None)
        k.rowwise_norm_backward(dy.double() if dtype == torch.float32 else dy.float(), x, w, stats, is_rms=is_rms,
                                compute_dw=True, db_dtype=None)
        (_, block_n, stages), (_, plain_layout, *_), (_, other_dy, single, _) = launches
        assert block_n < wide and stages > 0  # the fused forward's looped tiles
        assert plain_layout == wide and other_dy < wide and not single
    finally:
        for key in keys:
            h.set_tuned("wide-tile-test", key, None)
        monkeypatch.undo()
        h.launch_config.cache_clear()


def test_a_wide_single_tile_entry_is_validated():
    from normzoo.kernels import heuristics as h

    entry = {"num_warps": 16, "block_m": 1, "programs_per_sm": 1, "num_stages": 2, "single_tile": True}
    h.validate_entry("rmsnorm|bwd|bfloat16|16384", entry)
    h.validate_entry("layernorm|bwd|float32|8192", entry)
    h.validate_entry("rmsnorm|fwd|bfloat16|16384", {"num_warps": 32, "block_m": 1, "single_tile": True})
    h.validate_entry("layernorm|bwd|bfloat16|32768", {**entry, "single_tile": False})  # the rules' own value
    for key, bad, match in [
        ("rmsnorm|bwd|bfloat16|32768", entry, "at most 32768 bytes"),  # past WIDE_TILE_BYTES
        ("rmsnorm|bwd|float32|16384", entry, "at most 32768 bytes"),
        ("rmsnorm|bwd|bfloat16|16384", {**entry, "block_m": 2}, "one a tile"),
        ("rmsnorm|bwd|bfloat16|8192", entry, "already keep"),  # the rules' single tile
        ("rmsnorm|bwd|bfloat16|4096", {**entry, "single_tile": False}, "already keep"),
        ("dyt|bwd|bfloat16|16384", entry, "only the row-wise norms"),
        ("derf|fwd|float32|8192", {"single_tile": True}, "only the row-wise norms"),
        ("rmsnorm|bwd|bfloat16|16384", {**entry, "single_tile": 1}, "single_tile=1"),
        ("rmsnorm|bwd|bfloat16|16384", {"single_tile": True, "num_warps": 16}, "sets num_warps, programs_per_sm"),
        ("rmsnorm|fwd|bfloat16|16384", {"single_tile": True}, "sets num_warps too"),
        ("rmsnorm|bwd|bf16|16384", entry, "in a float dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            h.validate_entry(key, bad)
