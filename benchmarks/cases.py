"""What the benchmark measures: each op's inputs, its providers, and the bytes it must move.

Providers: ``normzoo``, ``eager`` (torch.nn.functional or the papers' modules), ``compile``
(``torch.compile(dynamic=False)`` of eager), and, opt-in (``--providers compile-tuned``), compile
with inductor's coordinate-descent tuning (20-60 s of compile per shape, ../shared/ANCHORS.md). The peers
Liger-Kernel (``liger``) and quack (``quack``) come from :func:`peer_providers` where importable.

Besides the four norms, the norms fused with a residual add (:mod:`normzoo.fused`), one case per
op and norm kind, named ``<op>-<kind>`` (``add_norm-rmsnorm``, ``norm_add_norm-layernorm``, ...;
:data:`GROUPS` names sets of them, e.g. ``--ops add_norm`` or ``--ops fused``). x is the residual
stream, h the sublayer output, both (rows × N) in the benchmark's dtype, and the fused op runs
with ``scale=1`` and no ``residual_dtype`` (so ``s`` has that dtype too):

    add_norm       s = x + h,       y = N(s)      -> (y, s)
    norm_add       s = x + N(h)                   -> s
    norm_add_norm  s = x + N1(h),   y = N2(s)     -> (y, s)

``eager`` and ``compile`` are that sequence op by op (``s = x + h; y = F.rms_norm(s, ...)``); the
backward gets an incoming gradient for every output (dy and ds). The peers have only the pre-norm
residual add (add_norm) with RMSNorm: Liger's ``LigerFusedAddRMSNormFunction`` and quack's
``rmsnorm(h, w, residual=x, prenorm=True)``; neither has a fused add with LayerNorm, DyT or Derf,
nor anything for norm_add or norm_add_norm.
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

    def make_grads(self, rows: int, hidden: int, dtype: torch.dtype, device):
        """The incoming gradient of the output (a tuple, one per output, where there are several)."""
        return torch.randn(rows, hidden, dtype=dtype, device=device)


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

# ----------------------------------------------------------------------------------------------
# Norms fused with the residual add (normzoo.fused): add_norm, norm_add, norm_add_norm
# ----------------------------------------------------------------------------------------------

FUSED_OPS = ("add_norm", "norm_add", "norm_add_norm")
NORM_KINDS = ("layernorm", "rmsnorm", "dyt", "derf")
# Each kind's eager function and its parameters, in the order the eager function takes them (and
# the order they follow x and h in a fused case's leaves); eps as in the plain cases above.
_EAGER_NORMS = {"layernorm": _layer_norm_eager, "rmsnorm": _rms_norm_eager, "dyt": _dyt_eager, "derf": _derf_eager}
_PARAM_NAMES = {"layernorm": ("weight", "bias"), "rmsnorm": ("weight",), "dyt": ("alpha", "weight", "bias"),
                "derf": ("alpha", "shift", "weight", "bias")}


@dataclass(frozen=True)
class FusedCase(OpCase):
    """One fused residual op on one norm kind. Bytes from first principles, each (rows × N) tensor
    once, in its own dtype: ``act`` for h, y, dy, dh (the benchmark's dtype), ``res`` for x, s, ds,
    dx (the residual stream's). The benchmark's cases have one dtype for both; ``residual_dtype``
    counts an fp32 stream beside 16-bit activations (not swept). Parameters and their gradients (N
    elements each: under 0.05% of the total at 32k rows) are not counted, as for the plain norms;
    row statistics (rows elements) neither.

        add_norm       fwd: read x, h; write y, s           bwd: read dy, ds, s; write dx (= dh, a
                                                                 second write only in a second dtype)
        norm_add       fwd: read x, h; write s              bwd: read ds, h; write dh (dx is ds)
        norm_add_norm  fwd: read x, h; write y, s           bwd: read dy, ds, s, h; write dx, dh
    """

    mode: str = "add_norm"
    kind: str = "rmsnorm"

    def bytes_moved(self, pass_: str, rows: int, hidden: int, dtype: torch.dtype,
                    residual_dtype: torch.dtype | None = None) -> int:
        act, res = dtype.itemsize, (residual_dtype or dtype).itemsize
        two_dtypes = residual_dtype is not None and residual_dtype != dtype  # then dx and dh are two tensors
        fwd = {"add_norm": 2 * res + 2 * act, "norm_add": 2 * res + act, "norm_add_norm": 2 * res + 2 * act}[self.mode]
        bwd = {"add_norm": 3 * res + act + (act if two_dtypes else 0),  # dy, ds, s, dx (+ dh)
               "norm_add": res + 2 * act,  # ds, h, dh
               "norm_add_norm": 3 * res + 3 * act}[self.mode]  # dy, ds, s, h, dx, dh
        per = {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[pass_]
        return rows * hidden * per

    def make_grads(self, rows: int, hidden: int, dtype: torch.dtype, device):
        grads = tuple(torch.randn(rows, hidden, dtype=dtype, device=device) for _ in range(self.outputs))
        return grads if len(grads) > 1 else grads[0]

    @property
    def outputs(self) -> int:
        return 1 if self.mode == "norm_add" else 2  # (y, s) or s


# The normzoo module whose parameters a fused case's leaves are, by the first parameter's id (the
# parameter is kept with it, so the id cannot be reused while the entry lives). normzoo's fused ops
# take the norm as a module; built once per make_inputs, looked up (not built) in the timed calls.
_MODULES: dict = {}


def _module_of(param: torch.Tensor):
    held, module = _MODULES[id(param)]
    assert held is param
    return module


def _norm_module(kind: str, hidden: int, dtype, device):
    import normzoo

    if kind == "layernorm":
        module = normzoo.LayerNorm(hidden, eps=1e-5, device=device, dtype=dtype, backend="triton")
    elif kind == "rmsnorm":
        module = normzoo.RMSNorm(hidden, eps=1e-6, device=device, dtype=dtype, backend="triton")
    elif kind == "dyt":
        module = normzoo.DyT(hidden, alpha_init_value=0.5, device=device, dtype=dtype, backend="triton")
    else:
        module = normzoo.Derf(hidden, alpha_init_value=0.5, shift_init_value=0.1, device=device, dtype=dtype,
                              backend="triton")
    with torch.no_grad():  # the values the plain cases use (their _affine_inputs / _pointwise_inputs)
        module.weight.copy_(1 + 0.1 * torch.randn(hidden, dtype=dtype, device=device))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(0.1 * torch.randn(hidden, dtype=dtype, device=device))
    params = tuple(module._parameters[name] for name in _PARAM_NAMES[kind])
    _MODULES[id(params[0])] = (params[0], module)
    return params


def _fused_inputs(mode: str, kind: str):
    def make(rows, hidden, dtype, device):
        # Params in the activation dtype, as in the plain cases; x (the residual stream) and h alike.
        x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        h = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        params = _norm_module(kind, hidden, dtype, device)
        if mode == "norm_add_norm":
            params += _norm_module(kind, hidden, dtype, device)
        return (x, h, *params)

    return make


def _fused_normzoo(mode: str, kind: str):
    k = len(_PARAM_NAMES[kind])
    if mode == "add_norm":
        return lambda x, h, *p: NF.add_norm(x, h, _module_of(p[0]))
    if mode == "norm_add":
        return lambda x, h, *p: NF.norm_add(x, h, _module_of(p[0]))
    return lambda x, h, *p: NF.norm_add_norm(x, h, _module_of(p[0]), _module_of(p[k]))


def _fused_eager(mode: str, kind: str):
    """The unfused sequence, op by op. One function per case (its own code object for dynamo)."""
    norm, k = _EAGER_NORMS[kind], len(_PARAM_NAMES[kind])
    if mode == "add_norm":
        def add_norm(x, h, *p):
            s = x + h
            return norm(s, *p), s

        return add_norm
    if mode == "norm_add":
        def norm_add(x, h, *p):
            return x + norm(h, *p)

        return norm_add

    def norm_add_norm(x, h, *p):
        s = x + norm(h, *p[:k])
        return norm(s, *p[k:]), s

    return norm_add_norm


def _fused_case(mode: str, kind: str) -> FusedCase:
    eager = _fused_eager(mode, kind)
    probe = FusedCase("", None, {}, 0, 0, mode=mode, kind=kind)
    return FusedCase(
        name=f"{mode}-{kind}",
        make_inputs=_fused_inputs(mode, kind),
        providers={
            "normzoo": _fused_normzoo(mode, kind),
            "eager": eager,
            "compile": _compiled(eager),
            "compile-tuned": _compiled_tuned(eager),
        },
        # Same-dtype counts (the benchmark's cases), for a glance; bytes_moved is what is used.
        fwd_tensors=probe.bytes_moved("fwd", 1, 1, torch.uint8),
        bwd_tensors=probe.bytes_moved("bwd", 1, 1, torch.uint8),
        mode=mode,
        kind=kind,
    )


CASES.update({f"{mode}-{kind}": _fused_case(mode, kind) for mode in FUSED_OPS for kind in NORM_KINDS})

# Names for sets of cases, for --ops: each fused op over every norm kind, all of them, the norms.
GROUPS = {
    "norms": list(NORM_KINDS),
    **{mode: [f"{mode}-{kind}" for kind in NORM_KINDS] for mode in FUSED_OPS},
    "fused": [f"{mode}-{kind}" for mode in FUSED_OPS for kind in NORM_KINDS],
}


def expand_ops(names) -> list[str]:
    """``--ops`` as case names: group names expanded, order kept, each case once."""
    out: list[str] = []
    for name in names:
        for op in GROUPS.get(name, [name]):
            if op not in out:
                out.append(op)
    return out


# Providers that a sweep runs only when named with --providers.
OPT_IN = frozenset({"compile-tuned"})


def default_providers(case: OpCase) -> list[str]:
    return [q for q in case.providers if q not in OPT_IN]


# ----------------------------------------------------------------------------------------------
# Peers (../shared/ANCHORS.md benchmarked liger-kernel 0.8.5 and quack-kernels 0.6.5). Imported only when
# asked for, as each needs a CUDA GPU and quack's import alone takes seconds.
# ----------------------------------------------------------------------------------------------


def _liger_providers() -> dict:
    from liger_kernel.ops import (LigerDyTFunction, LigerFusedAddRMSNormFunction, LigerLayerNormFunction,
                                  LigerRMSNormFunction)

    return {
        "layernorm": lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5),
        # in_place=False: Liger's default writes dx into the incoming dy, and the harness passes
        # the same dy to every provider (and to every timed backward).
        "rmsnorm": lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False),
        "dyt": lambda x, alpha, w, b: LigerDyTFunction.apply(x, alpha, w, b),
        # forward(X, R, W, eps, offset, casting_mode, in_place) -> (Y, S): S = R + X, Y = rmsnorm(S);
        # X the sublayer output (h), R the residual (x). Its backward writes one dX, returned as dR too.
        "add_norm-rmsnorm": lambda x, h, w: LigerFusedAddRMSNormFunction.apply(h, x, w, 1e-6, 0.0, "llama", False),
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
        # prenorm=True returns (out, residual_out): residual_out = x + residual, out = rmsnorm of it;
        # its backward takes both gradients (dresidual is dx when the dtypes agree).
        "add_norm-rmsnorm": lambda x, h, w: qr.rmsnorm(h, w, residual=x, eps=1e-6, prenorm=True),
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
