"""GPU-only checks (issue 14), run by the GPU test run (benchmarks/gpu_session.sh) whenever a GPU is
at hand; without CUDA every test here skips. On the CPU, Triton's interpreter runs the same kernels
through the rest of the suite, but it cannot show what only a GPU does: warps and programs that run
at once, addresses past 2^31 elements of real memory, a second device, concurrent host threads.

For every kernel family, each through its public entry: LayerNorm and RMSNorm (row-wise), DyT and
Derf (point-wise, channels-last and channels-first), the norms fused with the residual add
(``normzoo.fused.fused_residual``, every mode and kind at least once) and the head-wise kernels
(``normzoo.functional.qk_norm`` on views of a fused qkv projection, ``scale_norm``); bf16
activations, fp32 parameters, rows of 4096:

- the outputs and every gradient are bit-identical across repeated runs (no atomics, a fixed
  reduction order), and right (the float64 reference);
- a tensor of more than 2^31 elements: the rows past element 2^31 (int64 offsets) against the
  reference computed on those rows alone, and every other element written;
- tensors on cuda:1 while the current device is cuda:0 (two GPUs);
- several Python threads (half of them on their own CUDA streams) get what sequential calls get.

The looped row-wise backward's race between warps (a missing barrier) has its own test,
tests/test_rowwise_kernels.py::test_looped_backward_has_no_race_between_warps, in the same run.
"""

import contextlib
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import normzoo
import normzoo.functional as NF
from helpers import RTOL, assert_close, on_reference, rel_error
from normzoo import fused

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU-only (issue 14): needs CUDA; without it the interpreter runs these kernels in the other test files")

GPU = "cuda"
DTYPE = torch.bfloat16  # activations; parameters stay fp32 (mixed-precision training)
WIDTH = 4096  # row width: single-tile norms, the looped path of the fused row-wise ops (over 2048)
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # qk_norm: per head, on views of qkv (rows, (32 + 2·8)·128)
CHANNELS = 8  # channels-first DyT: (rows, 8, 512)
RUN_ROWS = 2048  # determinism: a persistent backward grid of many programs, each summing many rows
REPEATS = 5
THREADS, THREAD_ROUNDS, THREAD_ROWS = 8, 2, 256
TWO_GPU_ROWS = 64
TAIL = 128  # rows checked at the end of the > 2^31-element tensor: the last 64 or so start past 2^31
# Parameter gradients are sums over every row, in an order the float64 reference does not follow,
# from a sum s rounded to bf16 in the fused ops: a tolerance that a wrong address (an O(1) error)
# fails. Outputs and input gradients are judged element-wise by the table (helpers.assert_close).
PARAM_GRAD_TOL = 1e-2


# ----------------------------------------------------------------------------------------------
# The cases: one per kernel family and layout, each a module holding the parameters, its inputs
# (leaves whose dim 0 counts rows), and the call under test.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable  # device -> module (the parameters, moved off their initial values)
    inputs: Callable  # (device, rows) -> [leaf tensors]
    call: Callable  # (module, inputs) -> tuple of outputs
    outputs: tuple = ("y",)
    input_names: tuple = ("x",)
    row_width: int = WIDTH  # elements in one row of the widest input
    big_copies: int = 4  # tensors that size held at once by the 2^31 check (inputs, outputs, gradients)


def _moved(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


_LAYERS = {"layernorm": normzoo.LayerNorm, "rmsnorm": normzoo.RMSNorm, "dyt": normzoo.DyT, "derf": normzoo.Derf}


def _layer(kind, device):
    return _moved(_LAYERS[kind](WIDTH, backend="triton", device=device))


def _leaf(device, *shape):
    return torch.randn(*shape, device=device, dtype=DTYPE).requires_grad_()


def _plain(kind):
    return Case(kind, lambda d: _layer(kind, d), lambda d, rows: [_leaf(d, rows, WIDTH)], lambda m, xs: (m(xs[0]),))


def _fused(mode, kind):
    def build(device):
        return torch.nn.ModuleList([_layer(kind, device) for _ in range(2 if mode == "norm_add_norm" else 1)])

    def call(m, xs):
        y, s = fused.fused_residual(xs[0], xs[1], m[0], m[1] if len(m) > 1 else None, mode=mode)
        return (s,) if y is None else (y, s)

    # Held by the 2^31 check: x, h, s, y (none for norm_add), dx, dh and the incoming dy, ds.
    return Case(f"{mode}-{kind}", build, lambda d, rows: [_leaf(d, rows, WIDTH), _leaf(d, rows, WIDTH)], call,
                outputs=("s",) if mode == "norm_add" else ("y", "s"), input_names=("x", "h"),
                big_copies=6 if mode == "norm_add" else 8)


def _qk_call(m, xs):
    qkv = xs[0]
    q = qkv[:, : HEADS * HEAD_DIM].unflatten(-1, (HEADS, HEAD_DIM))
    k = qkv[:, HEADS * HEAD_DIM: (HEADS + KV_HEADS) * HEAD_DIM].unflatten(-1, (KV_HEADS, HEAD_DIM))
    return NF.qk_norm(q, k, m.q_weight, m.k_weight, m.eps, norm="rms", backend=m.backend)


CASES = [
    _plain("layernorm"),
    _plain("rmsnorm"),
    _plain("dyt"),
    _plain("derf"),
    Case("dyt-channels-first",
         lambda d: _moved(normzoo.DyT(CHANNELS, channels_last=False, backend="triton", device=d)),
         lambda d, rows: [_leaf(d, rows, CHANNELS, WIDTH // CHANNELS)], lambda m, xs: (m(xs[0]),)),
    # Every mode on the row-wise kernels, the plain add and the two-layer mode on the point-wise ones.
    _fused("add_norm", "rmsnorm"),
    _fused("norm_add", "layernorm"),
    _fused("norm_add_norm", "rmsnorm"),
    _fused("add_norm", "derf"),
    _fused("norm_add_norm", "dyt"),
    # q (rows, 32, 128) and k (rows, 8, 128) read in place from qkv; qkv, q, k, their gradients and
    # autograd's qkv-sized gradient of each view.
    Case("qk_norm", lambda d: _moved(normzoo.QKNorm(HEAD_DIM, backend="triton", device=d)),
         lambda d, rows: [_leaf(d, rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM)], _qk_call, outputs=("q", "k"),
         input_names=("qkv",), row_width=(HEADS + 2 * KV_HEADS) * HEAD_DIM, big_copies=6),
    Case("scale_norm", lambda d: _moved(normzoo.ScaleNorm(WIDTH, backend="triton", device=d)),
         lambda d, rows: [_leaf(d, rows, WIDTH)],
         lambda m, xs: (NF.scale_norm(xs[0], m.scale, m.eps, backend=m.backend),)),
]
IDS = [case.name for case in CASES]


# ----------------------------------------------------------------------------------------------
# Running a case, and the reference
# ----------------------------------------------------------------------------------------------


def _run(case, module, inputs, douts):
    """One forward and backward: ``(outputs, gradients)``, the gradients of the inputs then of the
    parameters (``None`` where one is unused). ``torch.autograd.grad``: nothing accumulates into
    ``.grad``, so threads may share the module."""
    outputs = case.call(module, inputs)
    grads = torch.autograd.grad(outputs, [*inputs, *module.parameters()], douts, allow_unused=True)
    return [o.detach() for o in outputs], list(grads)


def _douts(case, module, inputs):
    with torch.no_grad():
        return [torch.randn_like(o) for o in case.call(module, inputs)]


def _names(case, module):
    return [*case.outputs, *(f"d{n}" for n in case.input_names), *(f"d{n}" for n, _ in module.named_parameters())]


def _check_against_reference(case, module, inputs, douts, outputs, grads, where=""):
    """``outputs`` and ``grads`` (the kernels', for ``inputs`` and ``douts``) against float64, with
    the reference at working precision as the peer (helpers.assert_close's rule); parameter
    gradients within PARAM_GRAD_TOL plus twice the peer's own error: a scalar gradient (DyT's and
    Derf's alpha) is a sum whose terms cancel, and the bf16 rounding of its inputs (the fused sum s)
    moves it by up to ~1% at working precision whoever computes it."""
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    want = _run(case, on_reference(module, torch.float64), leaves64, [d.double() for d in douts])
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    peer = _run(case, on_reference(module), leaves, douts)
    elementwise = len(outputs) + len(inputs)
    for i, (name, got, ref, p) in enumerate(zip(_names(case, module), [*outputs, *grads], [*want[0], *want[1]],
                                                [*peer[0], *peer[1]])):
        what = f"{case.name} {name}{where}"
        if ref is None:
            assert got is None or not got.any(), f"{what}: should be absent or zero"
            continue
        assert got is not None, f"{what}: missing"
        if i < elementwise:
            assert_close(got, ref, what, peer=p)
        else:
            err = rel_error(got, ref, RTOL[got.dtype])
            allowed = PARAM_GRAD_TOL + 2 * rel_error(p, ref, RTOL[p.dtype])
            assert err <= allowed, f"{what}: relative error {err:.3g} > {allowed:.3g} against float64"


# ----------------------------------------------------------------------------------------------
# (a) Determinism
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_and_gradients_are_bit_identical_across_runs(case):
    module = case.build(GPU)
    inputs = case.inputs(GPU, RUN_ROWS)
    douts = _douts(case, module, inputs)
    outputs, grads = _run(case, module, inputs, douts)
    _check_against_reference(case, module, inputs, douts, outputs, grads)
    first = [*outputs, *grads]
    for run in range(2, REPEATS + 1):
        again = _run(case, module, inputs, douts)
        for name, a, b in zip(_names(case, module), first, [*again[0], *again[1]]):
            same = a is None and b is None or a is not None and b is not None and torch.equal(a, b)
            assert same, f"{case.name} {name}: run {run} differs from run 1"


# ----------------------------------------------------------------------------------------------
# (b) More than 2^31 elements
# ----------------------------------------------------------------------------------------------


def _rows_past_2_pow_31(row_width: int) -> int:
    """Rows of ``row_width`` holding more than 2^31 elements, the last 64 or so starting past
    element 2^31; a multiple of 16, as the other tests' row counts are (the same Triton
    specializations: compiled once)."""
    rows = 2**31 // row_width + 64
    return -(-rows // 16) * 16


def _check_past_2_pow_31(case):
    rows = _rows_past_2_pow_31(case.row_width)
    module = case.build(GPU)
    inputs = case.inputs(GPU, rows)
    assert max(t.numel() for t in inputs) > 2**31
    outputs = case.call(module, inputs)
    douts = []  # zero but in the last TAIL rows: dx is zero there too, and dw sums those rows only
    for o in outputs:
        g = torch.zeros_like(o)
        g[-TAIL:] = torch.randn_like(g[-TAIL:])
        douts.append(g)
    params = list(module.parameters())
    grads = list(torch.autograd.grad(outputs, [*inputs, *params], douts, allow_unused=True))
    outputs = [o.detach() for o in outputs]
    # Every element written: outputs start as NaN under NORMZOO_POISON=1, and min/max propagate NaN.
    for name, o in zip(case.outputs, outputs):
        lo, hi = torch.aminmax(o)
        assert lo.isfinite() and hi.isfinite(), f"{case.name} {name}: not every element written or finite"
    for name, g in zip(case.input_names, grads):
        lo, hi = torch.aminmax(g[:-TAIL])
        assert lo.item() == 0 and hi.item() == 0, f"{case.name} d{name}: nonzero (or unwritten) where dy is 0"
    tail_inputs = [t.detach()[-TAIL:].clone() for t in inputs]
    tail_grads = [g[-TAIL:] for g in grads[: len(inputs)]] + grads[len(inputs):]
    _check_against_reference(case, module, tail_inputs, [g[-TAIL:].clone() for g in douts],
                             [o[-TAIL:] for o in outputs], tail_grads, where=f" (the last {TAIL} of {rows} rows)")


def test_offsets_past_2_pow_31_elements():
    """Each case on a real tensor of more than 2^31 elements (bf16 (2^31/4096 + 64) × 4096, 4.3 GB;
    qkv 4.3 GB), one case at a time in this one test (pytest-xdist cannot run two at once):
    17-35 GB at a time, skipped where the GPU has less free memory."""
    failures, skipped, ran = [], [], 0
    for case in CASES:
        big = _rows_past_2_pow_31(case.row_width) * case.row_width * DTYPE.itemsize
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        need = (case.big_copies + 1) * big
        if free < need:
            skipped.append(f"{case.name} (needs {need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free)")
            continue
        try:
            _check_past_2_pow_31(case)
            ran += 1
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
        torch.cuda.empty_cache()
    assert not failures, "\n".join(failures)
    if skipped and not ran:
        pytest.skip(f"not enough GPU memory for any case: {', '.join(skipped)}")
    if skipped:
        warnings.warn(f"2^31-element check skipped for lack of GPU memory: {', '.join(skipped)}")


# ----------------------------------------------------------------------------------------------
# (c) Another GPU than the current one
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: tensors on cuda:1, current device cuda:0")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tensors_on_another_gpu_than_the_current_one(case):
    """Triton launches on the current device: the launchers must switch to the tensors' (apex#770
    returned zeros on cuda:1), and switch back."""
    other = torch.device("cuda", 1)
    with torch.cuda.device(0):
        module = case.build(other)
        inputs = case.inputs(other, TWO_GPU_ROWS)
        douts = _douts(case, module, inputs)
        outputs, grads = _run(case, module, inputs, douts)
        assert torch.cuda.current_device() == 0, "the current device changed"
        torch.cuda.synchronize(other)
        for name, t in zip(_names(case, module), [*outputs, *grads]):
            assert t is None or t.device == other, f"{case.name} {name}: on {t.device}"
        _check_against_reference(case, module, inputs, douts, outputs, grads, where=" on cuda:1")


# ----------------------------------------------------------------------------------------------
# (d) Threads
# ----------------------------------------------------------------------------------------------


def test_threads_get_what_sequential_calls_get():
    """THREADS Python threads call every case at once on one GPU (each starting at another case,
    odd ones on a stream of their own), and get the sequential calls' outputs and gradients, bit
    for bit."""
    prepared = []
    for case in CASES:
        module = case.build(GPU)
        inputs = case.inputs(GPU, THREAD_ROWS)
        douts = _douts(case, module, inputs)
        outputs, grads = _run(case, module, inputs, douts)  # sequential; also compiles every kernel
        prepared.append((case, module, inputs, douts, [*outputs, *grads]))
    torch.cuda.synchronize()
    failures = []

    def work(i):
        stream = torch.cuda.Stream() if i % 2 else None
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for _ in range(THREAD_ROUNDS):
                    for case, module, inputs, douts, expected in prepared[i:] + prepared[:i]:
                        got = _run(case, module, inputs, douts)
                        for name, a, b in zip(_names(case, module), expected, [*got[0], *got[1]]):
                            if (a is None) != (b is None) or a is not None and not torch.equal(a, b):
                                failures.append(f"thread {i}: {case.name} {name} differs from the sequential call")
        except Exception as exc:  # noqa: BLE001 - any failure in a thread is the test's failure
            failures.append(f"thread {i}: {exc!r}"[:300])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [], "\n".join(failures[:20])
