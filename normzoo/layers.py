"""``nn.Module`` layers. Each subclasses its PyTorch counterpart, so parameters, ``state_dict``
keys, ``reset_parameters`` and ``isinstance`` checks are PyTorch's own; only ``forward`` changes.
"""

import math

import torch
from torch import Tensor

from . import ops
from .ops import check_backend, normalized_shape_tuple

__all__ = ["LayerNorm", "LayerNorm2d", "RMSNorm", "DyT", "Derf", "ScaleNorm", "QKNorm", "CRMSNorm"]


def _real(value, name: str) -> float:
    """A constructor's numeric argument as a finite float (a number, or a one-element real tensor
    or array); a TypeError or ValueError naming it for anything else."""
    bad_kind = isinstance(value, (bool, str, bytes)) or (
        isinstance(value, Tensor) and (value.dtype is torch.bool or value.is_complex()))
    try:
        number = None if bad_kind else float(value)
    except (TypeError, ValueError, RuntimeError):
        number = None
    if number is None:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def _one_dim(dim, what: str) -> int:
    """The last-dim size a head-wise layer takes: one int (or a one-int sequence)."""
    shape = normalized_shape_tuple(dim)
    if len(shape) != 1:
        raise ValueError(f"{what} normalizes the last dim: dim must be one int, got {dim!r}")
    return shape[0]


def _param(module: torch.nn.Module, name: str):
    """``module.<name>``, read from ``module._parameters`` where it is registered there: a
    parameter read through ``nn.Module.__getattr__`` costs ~1.3 µs (a dict lookup ~0.1), and a
    layer reads two to four a call. A name registered elsewhere (moved by
    ``torch.nn.utils.parametrize`` or ``weight_norm``, or set as a plain attribute) is read as an
    attribute, so what the module would return is what the layer uses."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def _params(module: torch.nn.Module, *names: str) -> list:
    """:func:`_param` of each name. The layers' forwards read their parameters from
    ``module._parameters`` themselves, one subscript each (a loop, or a call, costs more than the
    reads), and call this where a name is not registered there."""
    return [_param(module, name) for name in names]


def _refuse_scripting(module):
    """``__prepare_scriptable__``, which ``torch.jit.script`` calls on each module before compiling
    it: TorchScript cannot compile a layer's forward (it picks the kernels or the reference, and
    reads its parameters, in Python) and failed deep inside it ("try blocks aren't supported")."""
    hint = (": or normzoo.unswap(model) first, which gives back torch's LayerNorm/RMSNorm"
            if type(module) in (LayerNorm, RMSNorm) else "")
    raise TypeError(f"torch.jit.script cannot compile normzoo's {type(module).__name__} (its forward dispatches in "
                    f"Python); torch.jit.trace, torch.export and torch.compile can{hint}")


class LayerNorm(torch.nn.LayerNorm):
    r"""Layer Normalization (https://arxiv.org/abs/1607.06450) with fused Triton kernels on CUDA.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    A drop-in replacement for :class:`torch.nn.LayerNorm`: the same arguments, defaults,
    parameters and ``state_dict`` keys, so a checkpoint loads into either class.

    Args:
        normalized_shape (int or list or torch.Size): trailing shape to normalize over.
        eps (float): added to the variance for numerical stability. Default: 1e-5
        elementwise_affine (bool): learnable per-element ``weight`` (ones) and ``bias`` (zeros).
            Default: ``True``
        bias (bool): with ``elementwise_affine``, whether to learn a bias. Default: ``True``
        backend (str): ``"auto"`` (Triton on CUDA, reference elsewhere), ``"triton"`` or
            ``"torch"``. Keyword only. Default: ``"auto"``
        weight_offset (float): the layer applies ``weight + weight_offset`` (added in fp32);
            with 1.0 the weight is zero-centred and starts at zeros (Gemma's ``1 + w``). Needs
            ``elementwise_affine=True``. Keyword only. Default: 0.0

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`
        - Output: same shape and dtype as the input

    Examples::

        >>> ln = normzoo.LayerNorm(768)
        >>> y = ln(torch.randn(4, 16, 768))
    """

    __prepare_scriptable__ = _refuse_scripting

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto", weight_offset: float = 0.0) -> None:
        self.weight_offset = ops._check_weight_offset(weight_offset)  # before reset_parameters reads it
        _check_offset_has_weight(self.weight_offset, elementwise_affine)
        normalized_shape_tuple(normalized_shape)  # its ValueError/TypeError, not torch's RuntimeError from empty()
        ops.check_eps(eps)  # at construction, not at the first forward (kept as given, as torch keeps it)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.backend = check_backend(backend)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        _zero_centre(self)

    def forward(self, input: Tensor) -> Tensor:
        # ops directly rather than through F.layer_norm: one Python frame less per call.
        params = self._parameters
        try:
            weight, bias = params["weight"], params["bias"]
        except KeyError:  # moved by torch.nn.utils.parametrize, say: see _param
            weight, bias = _params(self, "weight", "bias")
        # Every argument passed, defaults too: dynamo's guard on a default left out fails inside a
        # torch.cond branch under torch.export (test_export_through_torch_cond). So in functional.py.
        return ops.rowwise_norm(input, self.normalized_shape, weight, bias, self.eps, is_rms=False,
                                backend=self.backend, weight_offset=self.weight_offset, x_hat_dtype=None)

    def extra_repr(self) -> str:
        # torch's own format, spelled out: torch 2.11's LayerNorm leaves out bias=.
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}, backend={self.backend!r}" + _offset_repr(self))


def _channels_last_view(input: Tensor, channels: int) -> Tensor:
    """LayerNorm2d's (B, C, H, W) input as (B, H, W, C), checked. A function of its own that
    torch.fx records as one node (see the end of ops.py), as it records the norm's."""
    if not isinstance(input, Tensor):
        ops.check_input(input)  # the TypeError LayerNorm gives
    if input.dim() != 4:
        raise ValueError(f"LayerNorm2d expects (B, C, H, W) input, got shape {tuple(input.shape)}")
    if input.shape[1] != channels:  # checked here: the norm's own check would name the permuted shape
        raise ValueError(f"LayerNorm2d expects input with {channels} channels in dim 1 (B, C, H, W), "
                         f"got input of shape {tuple(input.shape)}")
    return input.permute(0, 2, 3, 1)


torch.fx.wrap("_channels_last_view")


class LayerNorm2d(LayerNorm):
    r"""LayerNorm over the channels of (B, C, H, W) feature maps, as timm's ``LayerNorm2d`` (the
    channels-first LayerNorm of ConvNeXt): the input is permuted to (B, H, W, C), normalized over C
    by :class:`LayerNorm`'s op, and the result permuted back, so the output has the strides timm's
    has (channels-last in memory). :func:`normzoo.swap` replaces timm's ``LayerNorm2d`` with it.

    The arguments, parameters and ``state_dict`` keys are :class:`LayerNorm`'s, with
    ``normalized_shape`` the channel count C (one int). The default eps is LayerNorm's 1e-5; timm's
    and ConvNeXt's is 1e-6: pass ``eps=1e-6`` to match them.

    This layer is here to reproduce timm's exactly, not for speed (none is claimed): normzoo reads
    each row of C values with unit stride, and in an NCHW-contiguous tensor C is the strided dim,
    so both the Triton and the reference path copy the permuted input to a contiguous
    (B, H, W, C) tensor first (and in backward an incoming gradient whose C is strided). A
    ``torch.channels_last`` input permutes to a contiguous tensor and is read in place.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: the same shape and dtype as the input

    Examples::

        >>> norm = normzoo.LayerNorm2d(64, eps=1e-6)
        >>> y = norm(torch.randn(2, 64, 14, 14))
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto", weight_offset: float = 0.0) -> None:
        if len(normalized_shape_tuple(normalized_shape)) != 1:
            raise ValueError(f"LayerNorm2d normalizes over dim 1: normalized_shape must be one int C, "
                             f"got {normalized_shape!r}")
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, backend=backend,
                         weight_offset=weight_offset)

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(_channels_last_view(input, self.normalized_shape[0])).permute(0, 3, 1, 2)


class RMSNorm(torch.nn.RMSNorm):
    r"""Root Mean Square Layer Normalization (https://arxiv.org/abs/1910.07467) with fused Triton
    kernels on CUDA.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} * \gamma

    A drop-in replacement for :class:`torch.nn.RMSNorm`: the same arguments, defaults,
    parameters and ``state_dict`` keys.

    Args:
        normalized_shape (int or list or torch.Size): trailing shape to normalize over.
        eps (float, optional): added to the mean square. Default: ``None``, which means
            ``torch.finfo(torch.float32).eps`` (float64's for float64 input), as in PyTorch.
        elementwise_affine (bool): learnable per-element ``weight`` (ones). Default: ``True``
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"``, as for :class:`LayerNorm`.
        weight_offset (float): as for :class:`LayerNorm` (Gemma's RMSNorm: ``weight_offset=1.0``).
        x_hat_dtype (str, optional): where the normalized ``x_hat`` is rounded before the weight
            multiplies it, to reproduce a model's own RMSNorm class exactly. ``None``: never
            (fp32 throughout, one rounding to the input's dtype at the end). ``"input"``: to the
            input's dtype, output in the promoted dtype of input and weight (Hugging Face's
            Llama, Mistral, Qwen2/3: ``weight * x_hat.to(input_dtype)``). ``"weight"``: to a
            16-bit weight's dtype, output in it; with an fp32 weight, an fp32 output (T5's
            ``T5LayerNorm``). The backward treats the rounding as the identity, as autograd does
            a cast. Keyword only. Default: ``None``

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`
        - Output: same shape as the input; same dtype unless ``x_hat_dtype`` says otherwise

    Examples::

        >>> norm = normzoo.RMSNorm(4096, eps=1e-6)
        >>> y = norm(torch.randn(2, 8, 4096))
    """

    __prepare_scriptable__ = _refuse_scripting

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, backend: str = "auto", weight_offset: float = 0.0,
                 x_hat_dtype: str | None = None) -> None:
        self.weight_offset = ops._check_weight_offset(weight_offset)  # before reset_parameters reads it
        _check_offset_has_weight(self.weight_offset, elementwise_affine)
        normalized_shape_tuple(normalized_shape)  # as LayerNorm
        if eps is not None:  # None: torch's default, the compute dtype's machine epsilon
            ops.check_eps(eps)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.backend = check_backend(backend)
        self.x_hat_dtype = ops.check_x_hat_dtype(x_hat_dtype)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        _zero_centre(self)

    def forward(self, input: Tensor) -> Tensor:
        return ops.rowwise_norm(input, self.normalized_shape, _param(self, "weight"), None, self.eps, is_rms=True,
                                backend=self.backend, weight_offset=self.weight_offset, x_hat_dtype=self.x_hat_dtype)

    def extra_repr(self) -> str:
        rounding = f", x_hat_dtype={self.x_hat_dtype!r}" if self.x_hat_dtype is not None else ""
        return f"{super().extra_repr()}, backend={self.backend!r}" + _offset_repr(self) + rounding


def _check_offset_has_weight(weight_offset: float, elementwise_affine: bool) -> None:
    if weight_offset != 0.0 and not elementwise_affine:
        raise ValueError(f"weight_offset={weight_offset} offsets the weight, and elementwise_affine=False has none "
                         "(the layer would ignore it)")


def _zero_centre(layer) -> None:
    """A weight applied as ``weight + offset`` starts at ``1 - offset``: the layer starts as the
    identity affine, like torch's (zeros for Gemma's ``1 + w``)."""
    if layer.weight is not None and layer.weight_offset != 0.0:
        with torch.no_grad():
            layer.weight.fill_(1.0 - layer.weight_offset)


def _offset_repr(layer) -> str:
    return f", weight_offset={layer.weight_offset}" if layer.weight_offset != 0.0 else ""


class _PointwiseNorm(torch.nn.Module):
    """Shared parameters and bookkeeping of DyT and Derf."""

    __prepare_scriptable__ = _refuse_scripting

    def __init__(self, normalized_shape, alpha_init_value: float, elementwise_affine: bool, bias: bool,
                 channels_last: bool, device, dtype, backend: str) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        shape = normalized_shape_tuple(normalized_shape)
        if not channels_last and len(shape) != 1:
            raise ValueError(f"channels_last=False normalizes over dim 1: normalized_shape must be one int C, got {shape}")
        self.normalized_shape = shape
        self.alpha_init_value = _real(alpha_init_value, "alpha_init_value")
        self.elementwise_affine = elementwise_affine
        self.channels_last = channels_last
        self.backend = check_backend(backend)
        self.alpha = torch.nn.Parameter(torch.empty(1, **factory_kwargs))
        for name, wanted in (("weight", elementwise_affine), ("bias", elementwise_affine and bias)):
            param = torch.nn.Parameter(torch.empty(shape, **factory_kwargs)) if wanted else None
            self.register_parameter(name, param)

    def reset_parameters(self) -> None:
        torch.nn.init.constant_(self.alpha, self.alpha_init_value)
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, alpha_init_value={self.alpha_init_value}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}, "
                f"channels_last={self.channels_last}, backend={self.backend!r}")


class DyT(_PointwiseNorm):
    r"""Dynamic Tanh, from "Transformers without Normalization" (https://arxiv.org/abs/2503.10622).

    .. math::
        y = \gamma \odot \tanh(\alpha x) + \beta

    A point-wise replacement for LayerNorm/RMSNorm: no statistics, one learnable scalar
    :math:`\alpha` and per-channel :math:`\gamma`, :math:`\beta`. Parameter names follow the
    paper's code (``alpha``, ``weight``, ``bias``). DyT changes the architecture: models are trained
    with it, not converted from pretrained norm weights (the paper also tunes ``alpha_init_value``
    by width and depth, e.g. 0.8/0.2 for LLaMA-7B attention/FFN norms).

    Args:
        normalized_shape (int or list): channels C (or the trailing shape with ``channels_last``).
        alpha_init_value (float): initial :math:`\alpha`. Default: 0.5 (the paper's default)
        elementwise_affine (bool): learn ``weight`` (ones) and ``bias`` (zeros). Default: ``True``
        bias (bool): with ``elementwise_affine``, whether to learn ``bias``. Default: ``True``
        channels_last (bool): ``True``: input (\*, C), parameters over the trailing dims.
            ``False``: input (B, C, \*spatial), parameters broadcast over dim 1 (ConvNeXt-style).
            Default: ``True``
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"`` (see :class:`LayerNorm`).

    Shape:
        - Input: :math:`(*, C)` or, with ``channels_last=False``, :math:`(B, C, *)`
        - Output: same shape and dtype as the input

    Examples::

        >>> dyt = normzoo.DyT(768)
        >>> y = dyt(torch.randn(4, 16, 768))
        >>> dyt2d = normzoo.DyT(64, channels_last=False)
        >>> y = dyt2d(torch.randn(2, 64, 14, 14))
    """

    def __init__(self, normalized_shape, alpha_init_value: float = 0.5, elementwise_affine: bool = True,
                 bias: bool = True, channels_last: bool = True, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(normalized_shape, alpha_init_value, elementwise_affine, bias, channels_last, device, dtype,
                         backend)
        self.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        params = self._parameters
        try:
            alpha, weight, bias = params["alpha"], params["weight"], params["bias"]
        except KeyError:  # see LayerNorm.forward
            alpha, weight, bias = _params(self, "alpha", "weight", "bias")
        return ops.pointwise(input, alpha, None, weight, bias, activation="tanh", channels_last=self.channels_last,
                             backend=self.backend, normalized_shape=self.normalized_shape)


class Derf(_PointwiseNorm):
    r"""Dynamic erf, from "Stronger Normalization-Free Transformers" (https://arxiv.org/abs/2512.10938).

    .. math::
        y = \gamma \odot \operatorname{erf}(\alpha x + s) + \beta

    Like :class:`DyT` with erf in place of tanh and one more learnable scalar, the shift ``s``
    (one value for the layer, not per channel). Initial values follow the paper's code
    (zlab-princeton/Derf): :math:`\alpha = 0.5`, :math:`s = 0`, so a fresh layer is odd-symmetric
    like DyT and the shift is learned from there.

    Args:
        normalized_shape, alpha_init_value, elementwise_affine, bias, channels_last, backend:
            as for :class:`DyT`.
        shift_init_value (float): initial shift :math:`s`. Default: 0.0

    Shape:
        - Input: :math:`(*, C)` or, with ``channels_last=False``, :math:`(B, C, *)`
        - Output: same shape and dtype as the input

    Examples::

        >>> derf = normzoo.Derf(768)
        >>> y = derf(torch.randn(4, 16, 768))
    """

    def __init__(self, normalized_shape, alpha_init_value: float = 0.5, shift_init_value: float = 0.0,
                 elementwise_affine: bool = True, bias: bool = True, channels_last: bool = True, device=None,
                 dtype=None, *, backend: str = "auto"):
        super().__init__(normalized_shape, alpha_init_value, elementwise_affine, bias, channels_last, device, dtype,
                         backend)
        self.shift_init_value = _real(shift_init_value, "shift_init_value")
        self.shift = torch.nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        torch.nn.init.constant_(self.shift, self.shift_init_value)

    def forward(self, input: Tensor) -> Tensor:
        params = self._parameters
        try:
            alpha, shift, weight, bias = params["alpha"], params["shift"], params["weight"], params["bias"]
        except KeyError:  # see LayerNorm.forward
            alpha, shift, weight, bias = _params(self, "alpha", "shift", "weight", "bias")
        return ops.pointwise(input, alpha, shift, weight, bias, activation="erf",
                             channels_last=self.channels_last, backend=self.backend,
                             normalized_shape=self.normalized_shape)

    def extra_repr(self) -> str:
        return super().extra_repr().replace(", elementwise_affine",
                                            f", shift_init_value={self.shift_init_value}, elementwise_affine", 1)


class ScaleNorm(torch.nn.Module):
    r"""ScaleNorm, from "Transformers without Tears" (https://arxiv.org/abs/1910.05895).

    .. math::
        y = g \cdot \frac{x}{\max(\lVert x \rVert_2, \epsilon)}

    over the last dim, with one learnable scalar :math:`g` (``scale``, initially :math:`\sqrt{C}`,
    so a row starts with the RMS of 1 an RMSNorm would give it).

    Args:
        dim (int): the size C of the last dim.
        eps (float): a floor on the norm. Default: 1e-5
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"`` (see :class:`LayerNorm`).

    Shape:
        - Input: :math:`(*, C)`; output: the same shape and dtype, contiguous.
    """

    __prepare_scriptable__ = _refuse_scripting

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__()
        self.dim = _one_dim(dim, "ScaleNorm")
        self.eps = ops.check_eps(eps)
        self.backend = check_backend(backend)
        self.scale = torch.nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.constant_(self.scale, self.dim ** 0.5)

    def forward(self, input: Tensor) -> Tensor:
        _check_last_dim(input, self.dim)
        return ops.headwise_norm(input, _param(self, "scale"), None, None, self.eps, norm="l2", backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, backend={self.backend!r}"


class QKNorm(torch.nn.Module):
    r"""QK-norm: normalizes attention's queries and keys, both in one launch; ``forward(q, k)``
    returns ``(q_normed, k_normed)``. q and k are read where they lie: views of a fused ``qkv``
    projection, (B, S, H, head_dim) or (B, S, H·head_dim), with any head and row strides.

    - ``norm="rms"``, per head (Qwen3: ``dim=head_dim``) or over all heads (OLMo 2:
      ``dim=H·head_dim``, with ``k_dim`` for grouped-query attention's narrower k): RMSNorm of q
      and of k, each with its own weight (ones), eps 1e-6 by default. Attention keeps its
      :math:`1/\sqrt{d}`.
    - ``norm="l2"`` (Query-Key Normalization for Transformers): :math:`g \cdot \hat q` and
      :math:`\hat k`, L2-normalized, with one learnable ``scale`` g (initially ``scale_init``;
      the paper: :math:`\log_2(L^2 - L)`, L the 97.5th-percentile training length) standing in for
      :math:`1/\sqrt{d}`: call attention with ``scale=1.0``.

    Args:
        dim (int): the last dim of q (head_dim per head, or H·head_dim over all heads).
        eps (float): RMSNorm's eps, or the L2 form's floor on the norm. Default: 1e-6
        norm (str): ``"rms"`` or ``"l2"``. Keyword only. Default: ``"rms"``
        k_dim (int, optional): the last dim of k when it differs from q's. Keyword only.
        elementwise_affine (bool): ``"rms"``: learn ``q_weight`` and ``k_weight``. Default: ``True``
        scale_init (float): ``"l2"``: the initial g. Required there.
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"`` (see :class:`LayerNorm`).
    """

    __prepare_scriptable__ = _refuse_scripting

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None, *, norm: str = "rms",
                 k_dim: int | None = None, elementwise_affine: bool = True, scale_init: float | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        if norm not in ("rms", "l2"):
            raise ValueError(f"norm must be 'rms' or 'l2', got {norm!r}")
        if norm == "l2" and scale_init is None:
            raise ValueError("norm='l2' needs scale_init (the paper's g = log2(L² − L) for training length L)")
        if norm == "rms" and scale_init is not None:
            raise ValueError("scale_init sets the initial g of norm='l2'; norm='rms' learns q_weight and k_weight "
                             "instead")
        if norm == "l2" and not elementwise_affine:
            raise ValueError("norm='l2' always learns its scale g; elementwise_affine=False applies to norm='rms'")
        self.dim = _one_dim(dim, "QKNorm")
        self.k_dim = _one_dim(k_dim if k_dim is not None else dim, "QKNorm")
        self.eps = ops.check_eps(eps)
        self.norm = norm
        self.elementwise_affine = elementwise_affine
        self.scale_init = scale_init if scale_init is None else _real(scale_init, "scale_init")
        self.backend = check_backend(backend)
        factory_kwargs = {"device": device, "dtype": dtype}
        affine = norm == "rms" and elementwise_affine
        self.q_weight = torch.nn.Parameter(torch.empty(self.dim, **factory_kwargs)) if affine else None
        self.k_weight = torch.nn.Parameter(torch.empty(self.k_dim, **factory_kwargs)) if affine else None
        self.scale = torch.nn.Parameter(torch.empty(1, **factory_kwargs)) if norm == "l2" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.q_weight, self.k_weight):
            if w is not None:
                torch.nn.init.ones_(w)
        if self.scale is not None:
            torch.nn.init.constant_(self.scale, self.scale_init)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if q is None or k is None:  # k=None: the op would return q alone (other non-tensors: its checks)
            raise TypeError(f"{'q' if q is None else 'k'} must be a torch.Tensor, got NoneType (QKNorm normalizes q "
                            "and k together)")
        _check_last_dim(q, self.dim, "q")
        _check_last_dim(k, self.k_dim, "k", self.k_dim == self.dim)
        if self.norm == "l2":
            return ops.headwise_norm(q, _param(self, "scale"), k, None, self.eps, norm="l2", backend=self.backend)
        return ops.headwise_norm(q, _param(self, "q_weight"), k, _param(self, "k_weight"), self.eps, norm="rms",
                                 backend=self.backend)

    def extra_repr(self) -> str:
        dims = f"{self.dim}" + (f", k_dim={self.k_dim}" if self.k_dim != self.dim else "")
        extra = f", scale_init={self.scale_init}" if self.norm == "l2" else f", elementwise_affine={self.elementwise_affine}"
        return f"{dims}, eps={self.eps}, norm={self.norm!r}{extra}, backend={self.backend!r}"


class CRMSNorm(torch.nn.Module):
    r"""CRMSNorm, from "Pre-RMSNorm and Pre-CRMSNorm Transformers" (https://arxiv.org/abs/2305.14858).

    .. math::
        y = \frac{z}{\sqrt{(\sum z^2 + (\sum z)^2)/C + \epsilon}}

    over the last dim, of size C−1: ``z`` is a zero-mean vector of C values with its last one,
    :math:`-\sum z`, left out, and ``y`` the first C−1 values of its RMSNorm. No parameters: a
    Pre-LN model converted to Pre-CRMSNorm folds LayerNorm's γ, β into the next Linear
    (:func:`normzoo.convert.to_pre_crmsnorm`).

    Args:
        dim (int): C − 1, the compressed width.
        eps (float): added to the mean square. Default: 1e-5
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"`` (see :class:`LayerNorm`).
    """

    __prepare_scriptable__ = _refuse_scripting

    def __init__(self, dim: int, eps: float = 1e-5, *, backend: str = "auto") -> None:
        super().__init__()
        self.dim = _one_dim(dim, "CRMSNorm")
        self.normalized_shape = (self.dim,)
        self.eps = ops.check_eps(eps)
        self.backend = check_backend(backend)

    def forward(self, input: Tensor) -> Tensor:
        _check_last_dim(input, self.dim)
        return ops.headwise_norm(input, None, None, None, self.eps, norm="crms", backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, backend={self.backend!r}"


def _check_last_dim(x, dim: int, what: str = "input", k_dim_hint: bool = False) -> None:
    """``k_dim_hint``: x is QKNorm's k, whose width was left to q's (no ``k_dim``): say how to set it."""
    if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[-1] != dim):
        hint = (f" (a k of another width than q's, as GQA's over all heads: QKNorm({dim}, k_dim=...))"
                if k_dim_hint and x.dim() else "")  # a 0-d k has no width to set
        raise ValueError(f"expected {what} whose last dim is {dim}, got {what} of shape {tuple(x.shape)}{hint}")
