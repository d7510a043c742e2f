"""What the benchmark measures: each op's inputs, its providers, and the bytes it must move.

Providers: ``normzoo``, ``eager`` (torch.nn.functional or the papers' modules), ``compile``
(``torch.compile(dynamic=False)`` of eager), and, opt-in (``--providers compile-tuned``), compile
with inductor's coordinate-descent tuning (20-60 s of compile per shape, ../shared/ANCHORS.md). The peers
Liger-Kernel (``liger``) and quack (``quack``) come from :func:`peer_providers` where importable.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import normzoo.functional as NF


@dataclass(frozen=True)
class OpCase:
    name: str
    make_inputs: Callable  # (rows, hidden, dtype, device) -> tuple of leaf tensors (x first)
    providers: dict  # provider name -> fn(*leaves) -> output
    fwd_tensors: int  # (rows × N) tensors the forward must read or write
    bwd_tensors: int  # ... and the backward

    def bytes_moved(self, pass_: str, rows: int, hidden: int, dtype: torch.dtype) -> int:
        per_tensor = rows * hidden * dtype.itemsize
        count = {"fwd": self.fwd_tensors, "bwd": self.bwd_tensors, "fwdbwd": self.fwd_tensors + self.bwd_tensors}[pass_]
        return count * per_tensor


def _affine_inputs(with_bias: bool):
    def make(rows, hidden, dtype, device):
        # Params in the activation dtype, as in a model cast with .to(bfloat16) (../shared/ANCHORS.md).
        x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        w = (1 + 0.1 * torch.randn(hidden, dtype=dtype, device=device)).requires_grad_()
        if not with_bias:
            return x, w
        return x, w, (0.1 * torch.randn(hidden, dtype=dtype, device=device)).requires_grad_()

    return make


def _pointwise_inputs(with_shift: bool):
    def make(rows, hidden, dtype, device):
        x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        scalar = lambda v: torch.full((1,), v, dtype=dtype, device=device, requires_grad=True)
        w = (1 + 0.1 * torch.randn(hidden, dtype=dtype, device=device)).requires_grad_()
        b = (0.1 * torch.randn(hidden, dtype=dtype, device=device)).requires_grad_()
        return (x, scalar(0.5), scalar(0.1), w, b) if with_shift else (x, scalar(0.5), w, b)

    return make


def _compiled(fn, options=None):
    """``torch.compile(fn, dynamic=False)``, built at the first call: importing dynamo takes seconds
    that runs without a compiled provider (``--smoke``, the tuner) need not pay."""
    built = []

    def call(*args):
        if not built:
            built.append(torch.compile(fn, dynamic=False, options=options))
        return built[0](*args)

    return call


def _compiled_tuned(fn):
    # A function of its own, so that dynamo's per-code-object cache never hands this provider the
    # graph that plain "compile" built from the same function without the tuning.
    def tuned(*args):
        return fn(*args)

    return _compiled(tuned, {"coordinate_descent_tuning": True})


def _layer_norm_eager(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b)


def _rms_norm_eager(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, 1e-6)


def _dyt_eager(x, alpha, w, b):
    return w * torch.tanh(alpha * x) + b  # the DyT paper's module


def _derf_eager(x, alpha, shift, w, b):
    return w * torch.erf(alpha * x + shift) + b  # the Derf paper's module


CASES = {
    "layernorm": OpCase(
        name="layernorm",
        make_inputs=_affine_inputs(with_bias=True),
        providers={
            "normzoo": lambda x, w, b: NF.layer_norm(x, (x.shape[-1],), w, b, backend="triton"),
            "eager": _layer_norm_eager,
            "compile": _compiled(_layer_norm_eager),
            "compile-tuned": _compiled_tuned(_layer_norm_eager),
        },
        fwd_tensors=2,  # read x, write y
        bwd_tensors=3,  # read x and dy, write dx
    ),
    "rmsnorm": OpCase(
        name="rmsnorm",
        make_inputs=_affine_inputs(with_bias=False),
        providers={
            "normzoo": lambda x, w: NF.rms_norm(x, (x.shape[-1],), w, 1e-6, backend="triton"),
            "eager": _rms_norm_eager,
            "compile": _compiled(_rms_norm_eager),
            "compile-tuned": _compiled_tuned(_rms_norm_eager),
        },
        fwd_tensors=2,
        bwd_tensors=3,
    ),
    "dyt": OpCase(
        name="dyt",
        make_inputs=_pointwise_inputs(with_shift=False),
        providers={
            "normzoo": lambda x, alpha, w, b: NF.dyt(x, alpha, w, b, backend="triton"),
            "eager": _dyt_eager,
            "compile": _compiled(_dyt_eager),
            "compile-tuned": _compiled_tuned(_dyt_eager),
        },
        fwd_tensors=2,
        bwd_tensors=3,
    ),
    "derf": OpCase(
        name="derf",
        make_inputs=_pointwise_inputs(with_shift=True),
        providers={
            "normzoo": lambda x, alpha, shift, w, b: NF.derf(x, alpha, shift, w, b, backend="triton"),
            "eager": _derf_eager,
            "compile": _compiled(_derf_eager),
            "compile-tuned": _compiled_tuned(_derf_eager),
        },
        fwd_tensors=2,
        bwd_tensors=3,
    ),
}

# Providers that a sweep runs only when named with --providers.
OPT_IN = frozenset({"compile-tuned"})


def default_providers(case: OpCase) -> list[str]:
    return [q for q in case.providers if q not in OPT_IN]


# ----------------------------------------------------------------------------------------------
# Peers (../shared/ANCHORS.md benchmarked liger-kernel 0.8.5 and quack-kernels 0.6.5). Imported only when
# asked for, as each needs a CUDA GPU and quack's import alone takes seconds.
# ----------------------------------------------------------------------------------------------


def _liger_providers() -> dict:
    from liger_kernel.ops import LigerDyTFunction, LigerLayerNormFunction, LigerRMSNormFunction

    return {
        "layernorm": lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5),
        # in_place=False: Liger's default writes dx into the incoming dy, and the harness passes
        # the same dy to every provider (and to every timed backward).
        "rmsnorm": lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False),
        "dyt": lambda x, alpha, w, b: LigerDyTFunction.apply(x, alpha, w, b),
    }


def _quack_providers() -> dict:
    import quack.rmsnorm as qr

    class QuackLayerNorm(torch.autograd.Function):
        # quack ships LayerNorm as forward/backward functions (no autograd wrapper) that take fp32
        # weight and bias: the fp32 copies are made once per parameter (outside the timed calls),
        # and the gradients are cast back to the parameters' dtype.
        @staticmethod
        def forward(ctx, x, w, b):
            w32, b32 = _fp32_copy(w), _fp32_copy(b)
            y, rstd, mean = qr.layernorm_fwd(x, w32, b32, eps=1e-5, return_rstd=True, return_mean=True)
            ctx.save_for_backward(x, w32, rstd, mean)
            ctx.param_dtypes = (w.dtype, b.dtype)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, w32, rstd, mean = ctx.saved_tensors
            dx, dw, db = qr.layernorm_bwd(x, w32, dy.contiguous(), rstd, mean, has_bias=True)
            return dx, dw.to(ctx.param_dtypes[0]), db.to(ctx.param_dtypes[1])

    return {
        "layernorm": QuackLayerNorm.apply,
        "rmsnorm": lambda x, w: qr.rmsnorm(x, w, eps=1e-6),
    }


_FP32_COPIES: dict = {}


def _fp32_copy(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float32:
        return t.detach()
    hit = _FP32_COPIES.get(id(t))
    if hit is None or hit[0] is not t or hit[1] != t._version:
        hit = (t, t._version, t.detach().float())  # holding t keeps its id from being reused
        _FP32_COPIES[id(t)] = hit
    return hit[2]


PEERS = {"liger": ("liger-kernel", _liger_providers), "quack": ("quack-kernels", _quack_providers)}


def peer_providers(names=tuple(PEERS)) -> tuple[dict, list[str]]:
    """``({op: {provider: fn}}, notes)`` for the peers in ``names`` that import here; one note per
    peer that does not (the benchmark prints it and goes on without that peer)."""
    by_op: dict = {}
    notes = []
    for name in names:
        package, load = PEERS[name]
        try:
            fns = load()
        except Exception as e:  # ImportError, or a broken install that fails while importing
            notes.append(f"peers: {package} not importable, skipped ({type(e).__name__}: {str(e)[:120]})")
            continue
        for op, fn in fns.items():
            by_op.setdefault(op, {})[name] = fn
    return by_op, notes
