"""Replace the norm layers of an existing model, in place, and report what changed."""

import ast
import functools
import importlib
import inspect
import numbers
import re
import sys
import textwrap
import warnings
from collections import Counter
from collections.abc import Callable

import torch

from .layers import CRMSNorm, Derf, DyT, LayerNorm, LayerNorm2d, QKNorm, RMSNorm, ScaleNorm
from .ops import check_backend

# The classes whose behaviour we know exactly. A subclass of one of them (one that permutes its
# input or casts it, say) may compute something else, so it is reported, never replaced, unless it
# is listed below (timm's, Hugging Face's).
_KNOWN_NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm, LayerNorm, LayerNorm2d, RMSNorm)
_TARGETS = {None: None, "dyt": DyT, "derf": Derf}
_HEADWISE = (ScaleNorm, QKNorm, CRMSNorm)  # normzoo's own, with no torch class: swap and unswap leave them

# Hugging Face transformers' own norm classes whose math a normzoo RMSNorm reproduces, keyed by
# class name: the model folder that defines it, its eps attribute, the offset its weight is applied
# with, and where it rounds x̂ before the weight (RMSNorm's ``x_hat_dtype``). Add a class here only
# after reading its forward: the fp32 statistics, then
#   (x̂ · (1 + w)) in fp32, one cast:            Gemma 1/2/3             -> weight_offset=1.0
#   (w · x̂) in fp32, one cast:                  OLMo 2                  -> the defaults
#   w * x̂.to(input_dtype):                      Llama, Mistral, Qwen2/3 -> x_hat_dtype="input"
#   x̂ to a 16-bit weight's dtype, then w * x̂:  T5                       -> x_hat_dtype="weight"
# transformers copies these classes into each model under the model's name ("Copied from"): a class
# whose methods are the same code as a listed class's counts as that class
# (:func:`_model_norm_spec`), so Phi-3, Mixtral, DeepSeek-V3, Granite... are covered without a
# line each. (Their fp64 path is fp32 arithmetic; normzoo computes fp64 input in fp64.)
_MODEL_NORMS = {
    "GemmaRMSNorm": ("gemma", "eps", 1.0, None),
    "Gemma2RMSNorm": ("gemma2", "eps", 1.0, None),
    "Gemma3RMSNorm": ("gemma3", "eps", 1.0, None),
    "Olmo2RMSNorm": ("olmo2", "variance_epsilon", 0.0, None),
    "LlamaRMSNorm": ("llama", "variance_epsilon", 0.0, "input"),
    "MistralRMSNorm": ("mistral", "variance_epsilon", 0.0, "input"),
    "Qwen2RMSNorm": ("qwen2", "variance_epsilon", 0.0, "input"),
    "Qwen3RMSNorm": ("qwen3", "variance_epsilon", 0.0, "input"),  # its attention's per-head q_norm / k_norm too
    "T5LayerNorm": ("t5", "variance_epsilon", 0.0, "weight"),
}


def _code(cls: type) -> str | None:
    """The methods ``cls`` defines (``extra_repr`` aside) as syntax trees without docstrings: what
    its forward and the helpers it calls compute. None where there is no source to read."""
    trees = []
    for name, method in sorted(vars(cls).items()):
        if not inspect.isfunction(method) or name == "extra_repr":
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(method))).body[0]
        except (OSError, TypeError, SyntaxError, IndexError):
            return None
        if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant):
            tree.body = tree.body[1:]
        trees.append(ast.dump(tree))
    return "\n".join(trees)


@functools.cache
def _model_norm_spec(cls: type) -> tuple | None:
    """``(eps_attr, weight_offset, x_hat_dtype)`` for a transformers norm class that is, or repeats
    token for token, a class of ``_MODEL_NORMS``; None otherwise. Only plain ``nn.Module``
    subclasses: a subclass of something else inherits behaviour this does not read."""
    if not cls.__module__.startswith("transformers.") or cls.__bases__ != (torch.nn.Module,):
        return None
    if cls.__name__ in _MODEL_NORMS:
        return tuple(_MODEL_NORMS[cls.__name__][1:])
    if not cls.__name__.endswith("Norm") or (code := _code(cls)) is None:
        return None
    for name, (folder, *spec) in _MODEL_NORMS.items():
        try:
            listed = getattr(importlib.import_module(f"transformers.models.{folder}.modeling_{folder}"), name)
        except (ImportError, AttributeError):  # another transformers version
            continue
        if _code(listed) == code:
            return tuple(spec)
    return None


# timm's norm layers (timm.layers.norm), recognised by class name and that module: a model's own
# class of the same name elsewhere, or a subclass (metaformer's LayerNorm2dNoBias), is not one of
# them. Read in timm 1.0.31 (CI pins 1.0.29, on the local index); these three forwards are the
# same code since 1.0.13 (before it RmsNorm computed in the input dtype), the oldest timm whose
# layers swap replaces. Each is replaced where
# a normzoo layer computes exactly what it computes with timm's fast_norm off (timm's default):
#   LayerNorm    F.layer_norm over the trailing dims, as torch.nn.LayerNorm       -> LayerNorm
#   LayerNorm2d  (B, C, H, W) permuted to (B, H, W, C), F.layer_norm over C,
#                permuted back                                                   -> LayerNorm2d
#   RmsNorm      F.rms_norm over the trailing dims, as torch.nn.RMSNorm          -> RMSNorm
# A layer built while timm's fast_norm was on (``module._fast_norm`` True) calls apex's kernel where
# apex is installed, and under autocast computes in the autocast dtype, not fp32: left alone.
_TIMM_NORMS = {"LayerNorm": LayerNorm, "LayerNorm2d": LayerNorm2d, "RmsNorm": RMSNorm}
_TIMM_MIN_VERSION = (1, 0, 13)
_TIMM_FP32 = "computes on fp32 copies of input and parameters and casts back; not verified against normzoo"
_TIMM_ACT = "a norm, an activation and dropout in one module: no normzoo equivalent"
# timm's other norm layers (timm.layers.norm, timm.layers.norm_act): named in report.left_alone with why.
_TIMM_NOT_EXACT = {
    "LayerNormFp32": _TIMM_FP32, "LayerNorm2dFp32": _TIMM_FP32, "RmsNormFp32": _TIMM_FP32,
    "RmsNorm2dFp32": _TIMM_FP32, "SimpleNormFp32": _TIMM_FP32, "SimpleNorm2dFp32": _TIMM_FP32,
    "RmsNorm2d": "RMS over dim 1 by elementwise torch ops in the input dtype: no normzoo layer rounds so",
    "SimpleNorm": "x / sqrt(unbiased variance + eps), not centred: no normzoo equivalent",
    "SimpleNorm2d": "x / sqrt(unbiased variance + eps) over dim 1, not centred: no normzoo equivalent",
    "LayerNormExp2d": "non-contiguous input takes elementwise torch ops, not layer_norm",
    "GroupNorm": "statistics over groups of channels and space: no normzoo equivalent",
    "GroupNorm1": "statistics over all channels and space: no normzoo equivalent",
    **dict.fromkeys(("LayerNormAct", "LayerNormActFp32", "LayerNormAct2d", "LayerNormAct2dFp32", "RmsNormAct",
                     "RmsNormActFp32", "RmsNormAct2d", "RmsNormAct2dFp32", "GroupNormAct", "GroupNorm1Act"), _TIMM_ACT),
}


def _timm_norm(module: torch.nn.Module) -> tuple[type | None, str | None] | None:
    """``(normzoo class, None)`` for a timm norm layer that swap replaces, ``(None, why)`` for one it
    leaves alone, None for a module that is not one of timm's norm layers."""
    cls = type(module)
    if cls.__module__ == "timm.layers.norm" and cls.__name__ in _TIMM_NORMS:
        version = getattr(sys.modules.get("timm"), "__version__", "0")
        if tuple(int(v) for v in re.findall(r"\d+", version)[:3]) < _TIMM_MIN_VERSION:
            return None, f"timm {version}: swap knows these layers from timm 1.0.13 on"
        if getattr(module, "_fast_norm", True):
            return None, "timm fast_norm on: apex's kernel, or the autocast dtype under autocast"
        return _TIMM_NORMS[cls.__name__], None
    if cls.__module__ in ("timm.layers.norm", "timm.layers.norm_act") and cls.__name__ in _TIMM_NOT_EXACT:
        return None, _TIMM_NOT_EXACT[cls.__name__]
    return None


class SwapReport(Counter):
    """Counts of ``"torch.LayerNorm -> normzoo.LayerNorm"``-style replacements (the report itself,
    or ``replaced`` as a plain dict, as its repr shows them); ``left_alone`` counts the norm-like
    modules that were seen but not replaced, with the reason."""

    def __init__(self):
        super().__init__()
        self.left_alone = Counter()

    @property
    def replaced(self) -> dict:
        return dict(self)

    def __repr__(self):
        return f"SwapReport(replaced={dict(self)}, left_alone={dict(self.left_alone)})"


# Everything nn.Module keeps of a module's hooks. The dicts themselves move to the new module (not
# copies), so a handle the user holds still removes its hook.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _move_hooks(old: torch.nn.Module, new: torch.nn.Module) -> None:
    for attr in _HOOK_DICTS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    new._is_full_backward_hook = old._is_full_backward_hook


def _looks_like_a_norm(module: torch.nn.Module) -> bool:
    """A layer named like a per-token norm (``LlamaRMSNorm``, ``T5LayerNorm``, ``GroupNorm``,
    ``Qwen3NextRMSNormGated``, SAM's ``LayerNorm2d``; not a ``NormHead``, nor BatchNorm or
    InstanceNorm, running-statistics norms over other axes that swap never touches): no
    submodules but a parametrization's (a block named "...LayerNorm", as wav2vec2's
    ``Wav2Vec2EncoderStableLayerNorm``, holds norms rather than being one), and not a private class
    (``weight_norm``'s ``_WeightNorm`` normalizes a weight)."""
    name = type(module).__name__
    return (not module._modules.keys() - {"parametrizations"} and not name.startswith("_")
            and "BatchNorm" not in name and "InstanceNorm" not in name
            and re.search(r"Norm([123]d)?$|.Norm[A-Z]", name) is not None)


def _short_name(cls: type) -> str:
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"  # torch.LayerNorm, normzoo.LayerNorm


def replace_modules(model: torch.nn.Module, convert: Callable[[str, torch.nn.Module], torch.nn.Module | None],
                    report: SwapReport | None = None) -> SwapReport:
    """Walk ``model`` and replace each submodule for which ``convert(name, module)`` returns a new
    module (a replaced module's children are not visited; ``model`` itself has no parent and is
    never replaced). The new module takes the old one's training mode and all its hooks (forward,
    pre-forward, with kwargs, always called, backward, state_dict); a module that appears in
    several places is converted once and stays shared."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = report if report is not None else SwapReport()
    converted: dict[int, torch.nn.Module | None] = {}

    def visit(parent: torch.nn.Module, prefix: str):
        # _modules, not named_children(): the latter skips a module's second appearance.
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            if id(child) not in converted:
                new = convert(name, child)
                if new is not None:
                    new.train(child.training)
                    _move_hooks(child, new)
                    report[f"{_short_name(type(child))} -> {_short_name(type(new))}"] += 1
                converted[id(child)] = new
            new = converted[id(child)]
            if new is None:
                visit(child, name)
            else:
                setattr(parent, child_name, new)

    visit(model, "")
    return report


def _share_parameters(old: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """Give ``new`` the parameters of ``old``: the same tensors, so dtype, device, requires_grad and
    any optimizer state that refers to them are kept. Its buffers too, and nothing of ``new``'s
    own: a hook-based reparametrization (``torch.nn.utils.prune``, the old ``weight_norm``) keeps
    the class but has replaced ``weight`` by ``weight_orig`` and a mask buffer (or ``weight_g``,
    ``weight_v``), and its hook, moved to ``new``, recomputes ``weight`` as a plain attribute
    before each call: a ``weight`` parameter of ``new``'s own would stay on the meta device, in the
    state_dict, and make that hook fail."""
    new._parameters = dict(old._parameters)
    new._buffers = dict(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    for name in ("weight", "bias"):  # the hook's last result, until it runs again
        if name not in new._parameters and isinstance(old.__dict__.get(name), torch.Tensor):
            new.__dict__[name] = old.__dict__[name]
    return new


def swap(model: torch.nn.Module, *, to: str | None = None, backend: str = "auto",
         alpha_init_value: float | None = None) -> SwapReport:
    """Replace the LayerNorm / RMSNorm layers of ``model`` in place. Returns a :class:`SwapReport`.

    ``to=None`` (default): every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` becomes normzoo's
    fused equivalent, sharing its parameters. normzoo's layers subclass PyTorch's, so
    ``isinstance`` checks and ``state_dict`` keys are kept, and outputs match. So do the Hugging
    Face norm classes whose math normzoo reproduces (``_MODEL_NORMS``: Gemma's ``1 + w`` RMSNorms,
    OLMo 2's, and those that round x̂ before the weight: Llama, Mistral, Qwen2/3 with its per-head
    q/k norms, T5), each replaced by an :class:`~normzoo.RMSNorm` set to compute the same thing,
    and timm's ``LayerNorm``, ``LayerNorm2d`` and ``RmsNorm`` (``_TIMM_NORMS``, with timm's
    fast_norm off), by :class:`~normzoo.LayerNorm`, :class:`~normzoo.LayerNorm2d` and
    :class:`~normzoo.RMSNorm`. :func:`unswap` gives these models their own classes back.

    ``to="dyt"`` / ``to="derf"``: every LayerNorm / RMSNorm (PyTorch's, normzoo's, and the Hugging
    Face and timm classes above) becomes a
    freshly initialised :class:`~normzoo.DyT` / :class:`~normzoo.Derf` over the same shape,
    dtype and device, with a bias where the norm had one (RMSNorm: none; a channels-first
    ``LayerNorm2d`` becomes a ``channels_last=False`` one). This changes the
    architecture: train the converted model, don't expect a pretrained one to keep its quality
    (the DyT paper also adjusts ``alpha_init_value`` and the learning rate). ``alpha_init_value``:
    their initial alpha (default: the layer's own, 0.5); with ``to=None``, which initialises
    nothing, it is refused.

    Other subclasses of these norms may compute something else, and other layers named like a
    norm (``GroupNorm``, timm's ``RmsNorm2d``, ``Qwen3NextRMSNormGated``...) are not known to
    normzoo: each is named in
    ``report.left_alone`` (``"path: class (why)"``) rather than replaced. So are, with ``to``
    "dyt" or "derf", the norms of ``torch.nn.TransformerEncoderLayer``: in eval its fused fast path
    reads them as LayerNorms (their ``eps``, weight and bias), which a DyT is not. With ``to=None``
    they are replaced, but that fast path (eval, no gradient) still runs torch's own kernel on
    their parameters, not normzoo's.
    Every hook moves to the new layers (forward, pre-forward, with kwargs, always called, backward,
    state_dict; handles keep working); a norm shared by several parents stays shared. A swap that
    replaces nothing warns; a model that is itself a norm (torch's, normzoo's, a Hugging Face or timm
    norm class) is refused. :func:`unswap` gives back PyTorch's classes.

    The new layers are normzoo classes, not the model's own: a model's ``_init_weights`` that tests
    ``isinstance(module, ItsRMSNorm)`` (Qwen3-Next's ``1 + w`` norms, zeros) takes another branch for
    them (``"RMSNorm" in`` the class name: ones). Initialise before swapping, or load a checkpoint.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend(backend)
    if to not in _TARGETS:
        raise ValueError(f"to must be one of {list(_TARGETS)}, got {to!r}")
    target = _TARGETS[to]
    if alpha_init_value is not None and target is None:
        raise ValueError("alpha_init_value sets the initial alpha of the DyT/Derf layers that to='dyt' or "
                         "'derf' creates; swap(to=None) keeps the norms' own parameters")
    new_layer_kwargs = {} if alpha_init_value is None else {"alpha_init_value": alpha_init_value}
    report = SwapReport()
    # A norm without parameters has no device or dtype of its own: the new layer's alpha follows
    # the rest of the model.
    model_tensor = next(iter(model.parameters()), None)
    if model_tensor is None:
        model_tensor = next(iter(model.buffers()), None)

    # torch's TransformerEncoderLayer reads its norms' eps and, in eval, runs LayerNorm math on
    # their parameters itself (its fused fast path): a DyT/Derf there would crash or be ignored.
    encoder_norms = set()
    if target is not None:
        encoder_norms = {id(norm) for layer in model.modules() if isinstance(layer, torch.nn.TransformerEncoderLayer)
                         for norm in (layer.norm1, layer.norm2)}

    def convertible(module):
        """``(normalized_shape, elementwise_affine, bias, channels_last)`` of a norm that ``to``
        converts: torch's and normzoo's LayerNorm/RMSNorm, and the model classes ``to=None`` replaces
        (Hugging Face's RMSNorms; timm's LayerNorm, LayerNorm2d, RmsNorm, fast_norm or not: the new
        layer computes something else anyway); None for anything else."""
        cls = type(module)
        if cls in _KNOWN_NORMS:
            is_rms = isinstance(module, torch.nn.RMSNorm)
            return (module.normalized_shape, module.elementwise_affine, not is_rms and module.bias is not None,
                    cls is not LayerNorm2d)  # LayerNorm2d: over dim 1 of (B, C, H, W)
        if _model_norm_spec(cls) is not None:
            return tuple(module.weight.shape), True, False, True
        if cls.__module__ == "timm.layers.norm" and cls.__name__ in _TIMM_NORMS:
            return (module.normalized_shape, module.elementwise_affine, getattr(module, "bias", None) is not None,
                    cls.__name__ != "LayerNorm2d")
        return None

    def convert(name, module):
        if id(module) in encoder_norms:
            report.left_alone[f"{name}: {_short_name(type(module))} (nn.TransformerEncoderLayer's fast path "
                              f"reads its norms as LayerNorms)"] += 1
            return None
        if target is None and (spec := _model_norm_spec(type(module))) is not None:
            eps_attr, offset, x_hat_dtype = spec
            new = RMSNorm(module.weight.shape, getattr(module, eps_attr), device="meta", backend=backend,
                          weight_offset=offset, x_hat_dtype=x_hat_dtype)
            new.__dict__["_normzoo_original"] = module  # for unswap (a plain attribute, not a submodule)
            return _share_parameters(module, new)
        if target is None and (timm := _timm_norm(module)) is not None:
            new_cls, why = timm
            if new_cls is None:
                report.left_alone[f"{name}: {_short_name(type(module))} ({why})"] += 1
                return None
            if new_cls is RMSNorm:
                new = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, device="meta",
                              backend=backend)
            else:
                new = new_cls(module.normalized_shape, module.eps, module.elementwise_affine,
                              bias=module.bias is not None, device="meta", backend=backend)
            new.__dict__["_normzoo_original"] = module  # for unswap, as for Hugging Face's classes
            return _share_parameters(module, new)
        norm = convertible(module) if target is not None else None
        if norm is not None and (hooked := [n for n in ("weight", "bias") if n not in module._parameters
                                            and isinstance(module.__dict__.get(n), torch.Tensor)]):
            # A hook-based reparametrization (torch.nn.utils.prune, the old weight_norm) computes this
            # tensor from others before each call; its hook would move to the new layer and fail there.
            report.left_alone[f"{name}: {_short_name(type(module))} (its {hooked[0]} is recomputed by a hook, "
                              f"torch.nn.utils.prune's or weight_norm's: remove it before converting)"] += 1
            return None
        if norm is not None:
            shape, affine, bias, channels_last = norm
            like = getattr(module, "weight", None)
            like = like if like is not None else model_tensor
            return target(shape, **new_layer_kwargs, elementwise_affine=affine, bias=bias,
                          channels_last=channels_last, device=like.device if like is not None else None,
                          dtype=like.dtype if like is not None else None, backend=backend)
        if target is not None and (timm := _timm_norm(module)) is not None:
            report.left_alone[f"{name}: {_short_name(type(module))} ({timm[1]})"] += 1
            return None
        if type(module) not in _KNOWN_NORMS:
            if isinstance(module, _HEADWISE):  # normzoo's own: nothing to do, but to="dyt" does not convert them
                if target is not None:
                    report.left_alone[f"{name}: {_short_name(type(module))} (a normzoo head-wise norm: "
                                      f"to={to!r} converts LayerNorm and RMSNorm only)"] += 1
                return None
            if isinstance(module, (DyT, Derf)) and target is not None and not isinstance(module, target):
                report.left_alone[f"{name}: {_short_name(type(module))} (to={to!r} converts LayerNorm and "
                                  f"RMSNorm only)"] += 1
                return None
            already_ours = isinstance(module, (LayerNorm, RMSNorm, DyT, Derf)) and (
                target is None or isinstance(module, target))
            if already_ours:
                already_ours_backends[module.backend] += 1  # for the warning below
            if isinstance(module, _KNOWN_NORMS) and not already_ours:
                report.left_alone[f"{name}: {_short_name(type(module))} (unknown subclass of a norm)"] += 1
            elif _looks_like_a_norm(module) and not already_ours:
                report.left_alone[f"{name}: {_short_name(type(module))} (no exact normzoo equivalent known)"] += 1
            return None
        if type(module) in (LayerNorm, LayerNorm2d, RMSNorm):
            already_ours_backends[module.backend] += 1  # for the warning below: its backend is never changed
            return None  # already ours
        if isinstance(module, torch.nn.RMSNorm):
            new = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, device="meta",
                          backend=backend)
        else:
            new = LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                            bias=module.bias is not None, device="meta", backend=backend)
        return _share_parameters(module, new)

    if type(model) in _KNOWN_NORMS or isinstance(model, (DyT, Derf)) or _model_norm_spec(type(model)) is not None \
            or _timm_norm(model) is not None:
        raise ValueError("swap replaces the norms inside a model; the model itself is a norm, which has no "
                         "parent to hold its replacement: construct the normzoo layer directly instead")
    already_ours_backends = Counter()
    replace_modules(model, convert, report)
    if not report:
        # A silent no-op hides a model whose norms we don't know (unsloth#4533): say so. Say why a
        # second swap did nothing too, and that one asking for another backend keeps the layers' own.
        ours = "".join(f"; {n} normzoo layer(s) already" if b == backend else
                       f"; {n} normzoo layer(s) already, with backend={b!r} (kept: set a layer's .backend to "
                       f"change it)" for b, n in already_ours_backends.items())
        warnings.warn(f"normzoo.swap replaced nothing in {type(model).__name__}" + ours
                      + (f"; left alone: {dict(report.left_alone)}" if report.left_alone else ""), stacklevel=2)
    return report


def unswap(model: torch.nn.Module) -> SwapReport:
    """Give ``model`` back its original classes, in place: a model's own norm class that
    :func:`swap` replaced (Gemma's or timm's, say) comes back as it was, and every other normzoo
    ``LayerNorm`` / ``RMSNorm`` becomes ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm``, each with the
    same parameters (shared tensors) and hooks, so the model can be saved, exported or shared
    without normzoo. DyT, Derf, a ``LayerNorm2d`` and a norm with a weight offset or an
    ``x_hat_dtype`` built by hand have no PyTorch class: they are named in ``report.left_alone``
    and stay."""
    report = SwapReport()

    def convert(name, module):
        original = module.__dict__.get("_normzoo_original")
        if original is not None:  # a model's own class that swap replaced: give it back
            _share_parameters(module, original)
            original.train(module.training)
            # ... with the eps the swapped layer had last (set while swapped, it is the one in use).
            spec = _model_norm_spec(type(original))
            eps_attr = spec[0] if spec is not None else "eps"
            if hasattr(original, eps_attr):  # (every class swap replaces has one)
                eps, before = module.eps, getattr(original, eps_attr)
                if isinstance(eps, numbers.Real) and not isinstance(eps, bool):
                    setattr(original, eps_attr, float(eps))
                elif eps is None and before is not None:  # torch's default (the dtype's epsilon): no number
                    warnings.warn(f"unswap: {name} has eps=None, which {_short_name(type(original))} cannot take; "
                                  f"it keeps its eps {before!r}", stacklevel=2)
            return original
        if type(module) in (LayerNorm, RMSNorm) and module.weight_offset != 0.0:
            report.left_alone[f"{name}: {_short_name(type(module))} (weight_offset: no PyTorch equivalent)"] += 1
            return None
        if type(module) is RMSNorm and module.x_hat_dtype is not None:  # torch's would compute another function
            report.left_alone[f"{name}: {_short_name(type(module))} (x_hat_dtype: no PyTorch equivalent)"] += 1
            return None
        if type(module) is LayerNorm:
            new = torch.nn.LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                                     bias=module.bias is not None, device="meta")
        elif type(module) is RMSNorm:
            new = torch.nn.RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, device="meta")
        else:
            if isinstance(module, (DyT, Derf, LayerNorm2d, *_HEADWISE)):
                report.left_alone[f"{name}: {_short_name(type(module))} (no PyTorch class to go back to)"] += 1
            return None
        return _share_parameters(module, new)

    replace_modules(model, convert, report)
    return report
