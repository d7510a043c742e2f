"""What the benchmark measures: each op's inputs, its providers, and the bytes it must move."""

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
        # Params in the activation dtype, as in a model cast with .to(bfloat16) (ANCHORS.md).
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


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


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
        },
        fwd_tensors=2,
        bwd_tensors=3,
    ),
}
