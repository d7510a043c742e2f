r"""CRMSNorm and the conversion of a Pre-LN Transformer into its equivalent Pre-RMSNorm and
Pre-CRMSNorm forms, from "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient
Pre-LN Transformers" (Jiang et al., NeurIPS 2023, arXiv 2305.14858).

The idea. In a Pre-LN Transformer every reader of the residual stream ``h`` is a LayerNorm, and
LayerNorm only sees the zero-mean part ``P h`` (``P = I - 11ᵀ/C``). Keeping ``P h`` as the stream
instead of ``h`` (make the embeddings and every projection that writes the stream zero-mean along
the hidden dim) changes no output, and on a zero-mean vector LayerNorm is RMSNorm:

    LN(h) = γ ⊙ RMSNorm(P h) + β,

whose γ and β fold into the Linear that reads the norm's output. That is Pre-RMSNorm. A zero-mean
vector of C values is known from its first C − 1 (``x_C = −Σ_{i<C} x_i``), so the stream can be
stored as ``z = (P h)[:-1]``, one coordinate narrower: CRMSNorm normalizes it,

    CRMSNorm(z) = z / sqrt((Σ z² + (Σ z)²) / C + eps),

the first C − 1 coordinates of ``RMSNorm(P h)``. A weight that writes the stream keeps its first
C − 1 outputs (``W[:-1]`` for ``nn.Linear``'s (out, in) layout); a weight that reads it absorbs the
dropped coordinate (``y = Σ_{i<C} x̂_i W_i − (Σ x̂_i) W_C``, i.e. ``W[:, :-1] − W[:, -1:]``). That is
Pre-CRMSNorm.
"""

import warnings

import torch
from torch import Tensor

from .layers import CRMSNorm, LayerNorm, RMSNorm
from .ops import check_backend
from .swap import _move_hooks

__all__ = ["RestoreAffine", "to_pre_rmsnorm", "to_pre_crmsnorm", "SUPPORTED_MODELS"]


class RestoreAffine(torch.nn.Module):
    r"""The affine part of a converted model's last LayerNorm when nothing in the model reads it
    (a bare ``GPT2Model``'s ``ln_f``, whose output is the model's output; the conversion registers
    it as ``model.ln_f_affine`` and applies it with a forward hook): from the normalized stream
    ``x̂`` (width C, or C − 1 with ``compressed``) it returns ``γ ⊙ x̂ + β`` in the original C
    coordinates, the dropped one restored as ``−Σ x̂``. ``weight`` (γ) and ``bias`` (β) are (C,).
    """

    def __init__(self, dim: int, *, compressed: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.dim = int(dim)
        self.compressed = bool(compressed)
        self.weight = torch.nn.Parameter(torch.ones(self.dim, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(self.dim, device=device, dtype=dtype))

    def forward(self, input: Tensor) -> Tensor:
        if self.compressed:
            input = torch.cat([input, -input.sum(dim=-1, keepdim=True)], dim=-1)
        return torch.addcmul(self.bias, input, self.weight)

    def extra_repr(self) -> str:
        return f"{self.dim}, compressed={self.compressed}"


# ------------------------------------------------------------------------------------- conversion

SUPPORTED_MODELS = ("transformers.GPT2Model", "transformers.GPT2LMHeadModel")


def _gpt2_classes():
    try:
        from transformers import GPT2LMHeadModel, GPT2Model
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # no transformers: then the model cannot be one of them
        return None, None, None
    return GPT2Model, GPT2LMHeadModel, Conv1D


def _unsupported(model, why: str) -> ValueError:
    return ValueError(f"cannot convert {type(model).__name__}: {why}. Supported: Hugging Face "
                      f"{' and '.join(SUPPORTED_MODELS)} (Pre-LN, built from a GPT2Config, without cross-attention)")


def _ln_affine(ln, c: int, model) -> tuple[Tensor, Tensor]:
    """(γ, β) of a LayerNorm in fp64, as the LayerNorm applies them."""
    if type(ln) in (RMSNorm, CRMSNorm, torch.nn.RMSNorm):
        raise _unsupported(model, f"it is already converted (found {type(ln).__name__} where GPT-2 has a LayerNorm)")
    if type(ln) not in (torch.nn.LayerNorm, LayerNorm):
        raise _unsupported(model, f"found {type(ln).__module__}.{type(ln).__qualname__} where GPT-2 has a "
                                  "torch.nn.LayerNorm (or normzoo.LayerNorm)")
    if tuple(ln.normalized_shape) != (c,):
        raise _unsupported(model, f"a LayerNorm over {tuple(ln.normalized_shape)}, not the hidden size ({c},)")
    like = dict(dtype=torch.float64, device=ln.weight.device if ln.weight is not None else None)
    gamma = ln.weight.detach().to(torch.float64) if ln.weight is not None else torch.ones(c, **like)
    gamma = gamma + getattr(ln, "weight_offset", 0.0)
    beta = ln.bias.detach().to(torch.float64) if ln.bias is not None else torch.zeros(c, **like)
    return gamma, beta


def _check_conv1d(conv, conv1d_cls, nx: int | None, nf: int | None, model, name: str) -> None:
    if type(conv) is not conv1d_cls:
        raise _unsupported(model, f"{name} is a {type(conv).__name__}, not GPT-2's Conv1D")
    if (nx is not None and conv.weight.shape[0] != nx) or (nf is not None and conv.weight.shape[1] != nf):
        raise _unsupported(model, f"{name} has weight shape {tuple(conv.weight.shape)}, expected ({nx}, {nf}) "
                                  "(is it already converted?)")


def _plan(model):
    """Check the whole model before anything changes. Returns (base, head): the GPT2Model and the
    lm_head (None for a bare GPT2Model)."""
    gpt2_model, gpt2_lm, conv1d = _gpt2_classes()
    if gpt2_model is None or type(model) not in (gpt2_model, gpt2_lm):
        raise _unsupported(model, "not a supported architecture")
    base, head = (model.transformer, model.lm_head) if type(model) is gpt2_lm else (model, None)
    if type(base) is not gpt2_model:
        raise _unsupported(model, f"its transformer is a {type(base).__name__}")
    if getattr(model.config, "add_cross_attention", False) or any(hasattr(b, "crossattention") for b in base.h):
        raise _unsupported(model, "cross-attention blocks (add_cross_attention=True) are not supported")
    c = base.wte.weight.shape[-1]
    for name in ("wte", "wpe"):
        emb = getattr(base, name)
        if type(emb) is not torch.nn.Embedding or emb.weight.shape[-1] != c:
            raise _unsupported(model, f"{name} is not an nn.Embedding of width {c}")
    _ln_affine(base.ln_f, c, model)
    for i, block in enumerate(base.h):
        _ln_affine(block.ln_1, c, model)
        _ln_affine(block.ln_2, c, model)
        _check_conv1d(block.attn.c_attn, conv1d, c, None, model, f"h.{i}.attn.c_attn")
        _check_conv1d(block.attn.c_proj, conv1d, None, c, model, f"h.{i}.attn.c_proj")
        _check_conv1d(block.mlp.c_fc, conv1d, c, None, model, f"h.{i}.mlp.c_fc")
        _check_conv1d(block.mlp.c_proj, conv1d, None, c, model, f"h.{i}.mlp.c_proj")
    if head is not None and (type(head) is not torch.nn.Linear or head.in_features != c):
        raise _unsupported(model, f"lm_head is a {type(head).__name__} reading {getattr(head, 'in_features', '?')} "
                                  f"features, expected an nn.Linear reading {c}")
    return base, head


# The weight transforms, on fp64 tensors. "Writer": a weight whose output dim is the stream (its
# columns in Conv1D's (in, out) layout or an embedding's (num, C)); "reader": one whose input dim
# is (Conv1D's rows, nn.Linear's columns).

def _writer(w: Tensor, compress: bool) -> Tensor:
    """Make the written vectors zero-mean along the stream (the last dim), then drop its last
    coordinate if ``compress``. Works for a bias too (a vector is its own last dim)."""
    w = w - w.mean(dim=-1, keepdim=True)
    return w[..., :-1] if compress else w


def _reader(w: Tensor, in_dim: int, compress: bool) -> Tensor:
    """Fold away the dropped coordinate of the stream that ``w`` reads along ``in_dim``:
    ``W[:-1] − W[-1:]`` along that dim (it reads ``x_C = −Σ_{i<C} x_i``)."""
    if not compress:
        return w
    return w.narrow(in_dim, 0, w.shape[in_dim] - 1) - w.narrow(in_dim, w.shape[in_dim] - 1, 1)


def _new_param(value: Tensor, like: torch.nn.Parameter) -> torch.nn.Parameter:
    return torch.nn.Parameter(value.to(like.dtype).contiguous(), requires_grad=like.requires_grad)


def _convert(model, compress: bool):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    base, head = _plan(model)  # raises before anything changes
    c = base.wte.weight.shape[-1]
    if compress and c < 2:
        raise _unsupported(model, f"its stream is {c} wide, and Pre-CRMSNorm keeps C - 1 of its coordinates")
    # Hooks on what the conversion rewrites see other values afterwards (the stream centred, γ and
    # β moved into the next layer): say so. The LayerNorms' are not carried over (their
    # replacements' outputs mean something else); lm_head's are (its output, the logits, is the same).
    changed = [base.wte, base.wpe, base.ln_f] + [m for block in base.h for m in (
        block.ln_1, block.ln_2, block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
    if any(m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks for m in changed):
        warnings.warn("hooks on the model's LayerNorms, embeddings or projections see other values after the "
                      "conversion (the stream is centred, γ and β move into the next layer), and the LayerNorms' "
                      "are not carried over to the new norms: register them again where they belong", stacklevel=3)
    f64 = torch.float64
    # Every new tensor is computed from the original ones first (lm_head may be wte itself), in
    # fp64, then rounded once to the parameter's dtype and assigned.
    updates = []  # (module, attribute, new value)

    def norm_for(ln):
        backend = ln.backend if isinstance(ln, LayerNorm) else "auto"
        new = (CRMSNorm(c - 1, eps=ln.eps, backend=getattr(ln, "backend", "auto")) if compress else
               RMSNorm(c, eps=ln.eps, elementwise_affine=False, backend=check_backend(backend)))
        return new.train(ln.training)

    def fold_conv1d_reader(conv, ln):
        gamma, beta = _ln_affine(ln, c, model)
        w, b = conv.weight.detach().to(f64), conv.bias.detach().to(f64)
        updates.append((conv, "bias", _new_param(b + beta @ w, conv.bias)))
        updates.append((conv, "weight", _new_param(_reader(gamma[:, None] * w, 0, compress), conv.weight)))
        updates.append((conv, "nx", c - 1 if compress else c))

    def centre_conv1d_writer(conv):
        updates.append((conv, "weight", _new_param(_writer(conv.weight.detach().to(f64), compress), conv.weight)))
        updates.append((conv, "bias", _new_param(_writer(conv.bias.detach().to(f64), compress), conv.bias)))
        updates.append((conv, "nf", c - 1 if compress else c))

    for emb in (base.wte, base.wpe):
        updates.append((emb, "weight", _new_param(_writer(emb.weight.detach().to(f64), compress), emb.weight)))
        updates.append((emb, "embedding_dim", c - 1 if compress else c))
    for block in base.h:
        fold_conv1d_reader(block.attn.c_attn, block.ln_1)
        centre_conv1d_writer(block.attn.c_proj)
        fold_conv1d_reader(block.mlp.c_fc, block.ln_2)
        centre_conv1d_writer(block.mlp.c_proj)
        updates.append((block, "ln_1", norm_for(block.ln_1)))
        updates.append((block, "ln_2", norm_for(block.ln_2)))

    gamma, beta = _ln_affine(base.ln_f, c, model)
    if head is not None:
        # lm_head reads ln_f: y = W (γ ⊙ x̂ + β) + b = (W diag γ) x̂ + (W β + b). GPT-2 ties
        # lm_head.weight to wte.weight; the two now differ (wte is centred, lm_head scaled by γ), so
        # lm_head gets its own weight, and a bias (W β) it did not have.
        w = head.weight.detach().to(f64)
        b = w @ beta + (head.bias.detach().to(f64) if head.bias is not None else 0)
        w = _reader(w * gamma[None, :], 1, compress)
        new_head = torch.nn.Linear(w.shape[1], w.shape[0], bias=True, device=head.weight.device,
                                   dtype=head.weight.dtype)
        new_head.weight = _new_param(w, head.weight)
        new_head.bias = _new_param(b, head.weight)
        _move_hooks(head, new_head)  # its output, the logits, means what it meant
        updates.append((model, "lm_head", new_head.train(head.training)))
        updates.append((base, "ln_f", norm_for(base.ln_f)))
    else:
        # A bare GPT2Model's ln_f output is the model's output and nothing in the model reads it:
        # γ, β stay in a RestoreAffine, applied to the output by a forward hook (GPT2Model.forward
        # reshapes ln_f's output to the stream's width, C - 1 for CRMSNorm, so it cannot sit in ln_f).
        restore = RestoreAffine(c, compressed=compress, device=base.wte.weight.device, dtype=base.wte.weight.dtype)
        requires_grad = base.ln_f.weight.requires_grad if base.ln_f.weight is not None else True
        restore.weight = torch.nn.Parameter(gamma.to(restore.weight.dtype), requires_grad=requires_grad)
        restore.bias = torch.nn.Parameter(beta.to(restore.bias.dtype), requires_grad=requires_grad)
        updates.append((base, "ln_f", norm_for(base.ln_f)))
        updates.append((base, "ln_f_affine", restore.train(base.ln_f.training)))

    for module, name, value in updates:
        setattr(module, name, value)
    if head is not None:
        # Keep transformers from tying them again (tie_weights(), save/load): they are different now.
        model.config.tie_word_embeddings = False
        if isinstance(getattr(model, "all_tied_weights_keys", None), dict):
            model.all_tied_weights_keys = {}
    else:
        base.register_forward_hook(_restore_output)
    model.config.normzoo_conversion = "pre_crmsnorm" if compress else "pre_rmsnorm"
    return model


def _restore_output(module, args, output):
    """Forward hook of a converted bare GPT2Model: ``last_hidden_state`` (and ``hidden_states[-1]``,
    which transformers makes the same tensor) through ``module.ln_f_affine``, as a ``ModelOutput``
    or as the tuple ``return_dict=False`` gives."""
    normalized = output[0]
    restored = module.ln_f_affine(normalized)

    def swap(t):
        if t is normalized:
            return restored
        if isinstance(t, tuple) and t and t[-1] is normalized:  # hidden_states
            return t[:-1] + (restored,)
        return t

    if isinstance(output, tuple):
        return type(output)(swap(t) for t in output)
    for key in list(output.keys()):
        output[key] = swap(output[key])
    return output


_CONVERSION_NOTES = """
    The model is converted **in place** and returned (as :func:`normzoo.swap` does): a copy would
    double the memory of a large model; ``copy.deepcopy`` it first to keep the original. The whole
    model is checked before anything changes, so a refused model is left as it was. The converted
    weights are computed in fp64 from the originals and rounded once to each parameter's dtype; they
    are new ``Parameter`` objects (``requires_grad`` kept), so build an optimizer after converting.

    What changes: ``wte``, ``wpe`` and each block's ``attn.c_proj`` and ``mlp.c_proj`` (weight and
    bias) are made zero-mean along the hidden dim; each LayerNorm's γ and β fold into the Conv1D
    that reads it (``attn.c_attn``, ``mlp.c_fc``: ``W ← diag(γ) W``, ``b ← b + β W``) and ``ln_f``'s
    into ``lm_head``. GPT-2 ties ``lm_head.weight`` to ``wte.weight``; after the fold they differ,
    so ``lm_head`` becomes its own ``nn.Linear`` with a bias (``W β``) and
    ``config.tie_word_embeddings`` is set to False (the untied head adds vocab × hidden parameters).
    A bare ``GPT2Model`` has no reader of ``ln_f``: its γ, β move to ``model.ln_f_affine``, a
    :class:`RestoreAffine` that a forward hook applies to ``last_hidden_state`` (GPT2Model's forward
    reshapes ``ln_f``'s output to the stream's width, so it cannot sit inside ``ln_f``), so the
    model's output keeps its C values and is unchanged. What does not change: everything inside
    attention and the MLP (q, k, v heads, head_dim, the MLP width, attention dropout, the mask),
    ``config`` (``n_embd`` still gives the attention width; ``config.normzoo_conversion`` records
    the conversion, and ``save_pretrained`` output is no stock GPT-2 checkpoint: ``to_pre_crmsnorm``'s
    does not load into one (its widths differ), ``to_pre_rmsnorm``'s loads with missing and
    unexpected keys reported, and a stock ``GPT2LMHeadModel`` drops the head's bias ``W β``).

    Exact in eval mode (dropout off). With ``embd_pdrop`` / ``resid_pdrop`` > 0 in training mode
    the converted model is a different model: dropout on the stream does not commute with centring
    (``drop(P h) ≠ P drop(h)``), so the stream is no longer exactly the centred original.
    ``attn_pdrop`` (on attention probabilities) is unaffected. Inputs given as ``inputs_embeds``
    must be converted like ``wte``'s rows (centred{compressed}); intermediate ``hidden_states``
    (``output_hidden_states=True``) are the converted stream, not the original one.
"""


def to_pre_rmsnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Convert a Pre-LN Hugging Face GPT-2 (``GPT2LMHeadModel`` or ``GPT2Model``) into the
    equivalent Pre-RMSNorm Transformer: the same outputs, with every LayerNorm replaced by a
    ``normzoo.RMSNorm(C, eps=ln.eps, elementwise_affine=False)`` (a ``normzoo.LayerNorm``'s
    ``backend`` is kept) reading a zero-mean residual stream of width C.

    Raises ``ValueError`` for any other architecture, a model with cross-attention, or one already
    converted, and ``TypeError`` for what is not a module. Warns where hooks sit on what it rewrites.
    """
    return _convert(model, compress=False)


def to_pre_crmsnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Convert a Pre-LN Hugging Face GPT-2 (``GPT2LMHeadModel`` or ``GPT2Model``) into the
    equivalent Pre-CRMSNorm Transformer: :func:`to_pre_rmsnorm`, then the residual stream stored
    without its last coordinate (width C − 1; it is ``−Σ`` of the others): weights writing the
    stream keep its first C − 1 outputs, weights reading it absorb the dropped one
    (``W[:, :-1] − W[:, -1:]`` in ``nn.Linear``'s layout), and every LayerNorm becomes a
    :class:`CRMSNorm` (C − 1, same eps). Attention and MLP widths stay C and 4C.

    Raises ``ValueError`` for any other architecture, a model with cross-attention, one already
    converted, or a one-wide stream, and ``TypeError`` for what is not a module. Warns where hooks
    sit on what it rewrites.
    """
    return _convert(model, compress=True)


to_pre_rmsnorm.__doc__ += _CONVERSION_NOTES.format(compressed="")
to_pre_crmsnorm.__doc__ += _CONVERSION_NOTES.format(compressed=", then the last coordinate dropped")
