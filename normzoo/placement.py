"""Where the norms sit in a residual stream: Pre-LN, Post-LN, Peri-LN, Mix-LN and LayerNorm scaling,
run on the fused residual ops so that every residual add happens inside a norm's kernel."""

import math
import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from . import functional as F
from . import ops, reference
from .layers import Derf, DyT, LayerNorm, RMSNorm, _refuse_scripting

__all__ = ["ResidualStack"]


def _sublayers(layer) -> list:
    """A layer's sublayers: a list, tuple or ModuleList of modules, or one bare module (an
    ``nn.Sequential`` MLP counts as one sublayer)."""
    if isinstance(layer, (list, tuple, torch.nn.ModuleList)):
        subs = list(layer)
        if not subs:
            raise ValueError("each layer needs at least one sublayer (an empty layer has no residual add)")
    else:
        subs = [layer]
    for sub in subs:
        if not isinstance(sub, torch.nn.Module):
            raise TypeError(f"sublayers must be nn.Modules, got {type(sub).__name__}")
    return subs


def _output(h, index: int, sublayer, stream: Tensor):
    """A sublayer's output, which must be one tensor of the stream's shape (the stream's update:
    checked here, where the sublayer is known, and not broadcast by a last unfused add)."""
    if not isinstance(h, Tensor):
        raise TypeError(f"sublayer {index} ({type(sublayer).__name__}) returned {type(h).__name__}; "
                        "ResidualStack's sublayers map a tensor to one tensor (wrap one that returns a tuple)")
    if h.shape != stream.shape:
        raise ValueError(f"sublayer {index} ({type(sublayer).__name__}) returned shape {tuple(h.shape)}; a residual "
                         f"sublayer keeps the stream's shape {tuple(stream.shape)}")
    return h


PLACEMENTS = ("pre", "post", "peri", "mix", "scaled")
NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm, "dyt": DyT, "derf": Derf}


class ResidualStack(torch.nn.Module):
    r"""A Transformer's residual stream through ``layers``, with the norms where ``placement`` puts them.

    For each sublayer :math:`F` of layer :math:`l` (0-based, :math:`L` layers):

    - ``"pre"``: :math:`x \leftarrow x + F(N_{in}(x))` (Transformers without Tears)
    - ``"post"``: :math:`x \leftarrow N_{sum}(x + F(x))` (the original Transformer)
    - ``"peri"``: :math:`x \leftarrow x + N_{out}(F(N_{in}(x)))` (Peri-LN, Gemma 2's layout)
    - ``"mix"``: ``"post"`` in layers :math:`l < \lfloor \text{mix\_ratio} \cdot L \rfloor`, ``"pre"``
      in the rest (Mix-LN)
    - ``"scaled"``: :math:`x \leftarrow x + F(N_{in}(x) / \sqrt{l + 1})`, one factor for every
      sublayer of layer :math:`l` (LayerNorm scaling, "The Curse of Depth")

    then ``final_norm`` on the output. Each residual add runs inside a fused op with the norm next to
    it (:func:`normzoo.functional.add_norm`, :func:`~normzoo.functional.norm_add_norm`, ...): the
    stream is read and written once per sublayer, and the scaling factor is part of the norm's
    output. The one exception is ``final_norm=False`` with a placement whose last add has no norm
    after it (pre, mix, scaled): that add runs on its own.

    The norms are ordinary normzoo modules in flat ``nn.ModuleList``\ s ``norm_in``, ``norm_out`` and
    ``norm_sum`` with one entry per sublayer, in order (``None`` where the placement puts no such
    norm), and ``final_norm`` (a module or ``None``).

    Args:
        layers: a sequence of L layers, each a sequence of sublayers mapping (..., dim) to
            (..., dim), e.g. ``[[attn_0, mlp_0], [attn_1, mlp_1]]``; a bare module is a layer of one
            sublayer.
        dim (int): the width of the stream.
        placement (str): ``"pre"``, ``"post"``, ``"peri"``, ``"mix"`` or ``"scaled"``. Keyword only.
        norm (str): ``"layernorm"``, ``"rmsnorm"``, ``"dyt"`` or ``"derf"``. Default: ``"layernorm"``
        eps (float, optional): the norms' eps (LayerNorm 1e-5 and RMSNorm ``None`` by default; DyT
            and Derf have none).
        final_norm (bool, optional): a norm after the last layer. Default: ``None``, which means
            present for pre, peri, mix and scaled, absent for post.
        mix_ratio (float): Mix-LN's share of Post-LN layers. Default: 0.25
        residual_dtype (torch.dtype, optional): the dtype every residual sum is stored in, e.g.
            ``torch.float32`` beside bf16 sublayers: the stream then keeps fp32 between sublayers
            while each norm's output, the sublayers' input, stays in the sublayer's dtype (the
            fused ops' ``residual_dtype``). Default: ``None``, the promoted dtype of the stream and
            the sublayer's output. Post-LN's stream is a norm's output, which takes the
            sublayer's dtype whatever this says (its sums are formed and normalized in it).
        device, dtype: of the norms' parameters.
        backend (str): the norms' backend (``"auto"``, ``"triton"`` or ``"torch"``).

    Shape:
        - Input: :math:`(*, \text{dim})`
        - Output: same shape. dtype: a norm's output takes the dtype of what the sublayer returned
          (``h``), the stream the promoted dtype of the stream and ``h``. So the output of a stack
          with a final norm, and Post-LN's stream (which is a norm's output), take the last
          sublayer's dtype: under bf16 autocast they are bf16 where the unfused ``N(x + F(x))``
          would be fp32, and Mix-LN's stream stays bf16 through its Pre-LN layers too. Sublayers
          that return fp32 keep the stream fp32, and so does ``residual_dtype=torch.float32``
          (streams in fp32; the output of a stack with a final norm in the last sublayer's dtype,
          of one without, the stream).

    The fused ops read the norms' parameters and never call the norm modules, so a norm that
    runs in one (every norm but one that no add precedes: the first ``norm_in`` of pre, peri and
    scaled and of mix after its post layers, and ``final_norm`` of a stack that ends with a post
    layer, which are called as modules) may not have module hooks (forward or backward): the op
    raises a ValueError rather than skip them (the old hook-based ``torch.nn.utils.weight_norm``
    has one).
    ``torch.nn.utils.parametrize`` parametrizations (``parametrizations.weight_norm`` too) apply
    everywhere. Loading a ``state_dict`` with entries for a norm this placement does not have (a
    Peri-LN checkpoint's ``norm_out`` into a Pre-LN stack) is an error under ``strict=True``.

    Examples::

        >>> blocks = [[Attention(512), MLP(512)] for _ in range(6)]
        >>> stack = normzoo.ResidualStack(blocks, 512, placement="peri", norm="rmsnorm")
        >>> y = stack(torch.randn(2, 128, 512))
    """

    __prepare_scriptable__ = _refuse_scripting

    def __init__(self, layers, dim: int, *, placement: str, norm: str = "layernorm", eps: float | None = None,
                 final_norm: bool | None = None, mix_ratio: float = 0.25,
                 residual_dtype: torch.dtype | None = None, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {tuple(NORMS)}, got {norm!r}")
        if eps is not None and norm in ("dyt", "derf"):
            raise ValueError(f"{norm} has no eps; leave eps=None")
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"dim must be a positive int, got {type(dim).__name__}")
        if dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        dim = int(dim)
        if isinstance(mix_ratio, bool) or not isinstance(mix_ratio, numbers.Real):
            raise TypeError(f"mix_ratio must be a real number in [0, 1], got {type(mix_ratio).__name__}")
        if not (0.0 <= mix_ratio <= 1.0):
            raise ValueError(f"mix_ratio must be in [0, 1], got {mix_ratio}")
        if final_norm is not None and not isinstance(final_norm, bool):
            raise TypeError(f"final_norm must be True, False or None, got {final_norm!r}")
        if residual_dtype is not None and residual_dtype not in ops.FLOAT_DTYPES:  # as the fused ops take it
            raise TypeError("residual_dtype must be float16, bfloat16, float32, float64 or None, got "
                            f"{residual_dtype!r}")
        if not isinstance(layers, (Sequence, torch.nn.ModuleList, torch.nn.Sequential)):
            raise TypeError(f"layers must be a sequence of layers, got {type(layers).__name__}")
        self.layers = torch.nn.ModuleList(torch.nn.ModuleList(_sublayers(layer)) for layer in layers)
        self.dim, self.placement, self.norm, self.mix_ratio = dim, placement, norm, mix_ratio
        self.residual_dtype = residual_dtype
        num_layers = len(self.layers)
        # ⌊mix_ratio·L⌋ forgiving the product's rounding: 0.29 · 100 is 28.999999999999996 and
        # (1/3) · 3 is 0.9999999999999999 in floats, 29 and 1 here.
        self.num_post_layers = math.floor(mix_ratio * num_layers + 1e-9) if placement == "mix" else (
            num_layers if placement == "post" else 0)
        if placement == "mix" and mix_ratio > 0 and self.num_post_layers == 0 and num_layers:
            warnings.warn(f"placement='mix' with mix_ratio={mix_ratio} and {num_layers} layers has no Post-LN layer "
                          f"(floor({mix_ratio} * {num_layers}) = 0): this stack is Pre-LN", stacklevel=2)

        def make():
            kwargs = dict(device=device, dtype=dtype, backend=backend)
            if norm in ("layernorm", "rmsnorm") and eps is not None:
                kwargs["eps"] = eps
            return NORMS[norm](dim, **kwargs)

        norm_in, norm_out, norm_sum = [], [], []
        for layer_index, layer in enumerate(self.layers):
            kind = self.sublayer_placement(layer_index)
            for _ in layer:
                norm_in.append(make() if kind in ("pre", "peri") else None)
                norm_out.append(make() if kind == "peri" else None)
                norm_sum.append(make() if kind == "post" else None)
        self.norm_in = torch.nn.ModuleList(norm_in)
        self.norm_out = torch.nn.ModuleList(norm_out)
        self.norm_sum = torch.nn.ModuleList(norm_sum)
        if final_norm is None:
            final_norm = placement != "post"
        self.final_norm = make() if final_norm else None

    def sublayer_placement(self, layer_index: int) -> str:
        """``"pre"``, ``"post"`` or ``"peri"``: how the sublayers of this layer sit in the stream
        (mix resolves to post or pre; scaled is pre with a factor)."""
        if self.placement in ("post", "mix"):
            return "post" if layer_index < self.num_post_layers else "pre"
        return "peri" if self.placement == "peri" else "pre"

    def scale(self, layer_index: int) -> float:
        """The factor on the input norms of layer ``layer_index``: 1/√(l+1) for ``"scaled"``, else 1."""
        return 1.0 / math.sqrt(layer_index + 1) if self.placement == "scaled" else 1.0

    def forward(self, x: Tensor, *, return_streams: bool = False):
        """The output; with ``return_streams=True``, ``(output, streams)`` where ``streams[l]`` is the
        residual stream after layer ``l`` (before ``final_norm``): what Peri-LN and the Curse of Depth
        papers track the variance of."""
        if isinstance(x, torch.fx.Proxy):
            raise TypeError("torch.fx.symbolic_trace cannot trace a ResidualStack (its forward checks each sublayer's "
                            "output); torch.export, torch.jit.trace and torch.compile can")
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.dim() or x.shape[-1] != self.dim:
            raise ValueError(f"input of shape {tuple(x.shape)}: its last dim must be the stack's dim, {self.dim}")
        # The stream is x plus a pending sublayer output h (and, for peri, the output norm still to
        # apply to it): the add waits for the next norm, so that both run as one fused op. A fused
        # op's s is the stream after the sublayer before it.
        h, pending_out_norm = None, None
        rd = self.residual_dtype
        streams, sublayer_counts = [], [len(layer) for layer in self.layers]
        k = 0
        for layer_index, layer in enumerate(self.layers):
            kind, scale = self.sublayer_placement(layer_index), self.scale(layer_index)
            for sublayer in layer:
                if kind == "post":
                    if h is not None:  # a pre/peri layer before a post one: no placement builds this
                        raise RuntimeError("post-norm layers must come before pre-norm ones")
                    x, _ = F.add_norm(x, _output(sublayer(x), k, sublayer, x), self.norm_sum[k], residual_dtype=rd)
                    streams.append(x)
                else:
                    norm_in = self.norm_in[k]
                    if h is None:  # the first input norm, or the first after post layers: no add before it
                        y = norm_in(x)  # (layer 0 or after post layers: scale is 1 there)
                    elif pending_out_norm is None:
                        y, x = F.add_norm(x, h, norm_in, scale=scale, residual_dtype=rd)
                        streams.append(x)
                    else:
                        y, x = F.norm_add_norm(x, h, pending_out_norm, norm_in, scale=scale, residual_dtype=rd)
                        streams.append(x)
                    h, pending_out_norm = _output(sublayer(y), k, sublayer, x), self.norm_out[k]
                k += 1
        final = self.final_norm
        if h is None:
            out = final(x) if final is not None else x
        elif final is None:
            if pending_out_norm is not None:
                x = F.norm_add(x, h, pending_out_norm, residual_dtype=rd)
            elif rd is None:  # the documented unfused add
                x = x + h
            else:  # ... rounded once to rd, as the fused ops round s
                acc = reference.compute_dtype(rd)
                x = (x.to(acc) + h.to(acc)).to(rd)
            out = x
        elif pending_out_norm is None:
            out, x = F.add_norm(x, h, final, residual_dtype=rd)
        else:
            out, x = F.norm_add_norm(x, h, pending_out_norm, final, residual_dtype=rd)
        if h is not None:
            streams.append(x)
        if not return_streams:
            return out
        # streams holds the stream after every sublayer; keep each layer's last.
        ends = [sum(sublayer_counts[: i + 1]) - 1 for i in range(len(sublayer_counts))]
        return out, [streams[e] for e in ends]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, placement={self.placement!r}, norm={self.norm!r}, layers={len(self.layers)}"
                + (f", mix_ratio={self.mix_ratio} ({self.num_post_layers} post)" if self.placement == "mix" else "")
                + (f", residual_dtype={self.residual_dtype}" if self.residual_dtype is not None else ""))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A None entry of a ModuleList is a child name torch's loader accepts and then skips: keys
        # under it (a norm another placement has) would vanish without a word, even under strict.
        for key in state_dict:
            if not key.startswith(prefix):
                continue
            parts = key[len(prefix):].split(".")
            if (len(parts) > 2 and parts[0] in ("norm_in", "norm_out", "norm_sum") and parts[1].isdigit()
                    and int(parts[1]) < len(self._modules[parts[0]])
                    and self._modules[parts[0]][int(parts[1])] is None):
                unexpected_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
