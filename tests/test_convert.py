"""CRMSNorm (forward, hand-written backward) and the Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm conversion
of Hugging Face GPT-2 models (issue 13)."""

import copy
import re
import warnings

import pytest
import torch

import normzoo
import normzoo.functional as NF
from normzoo import CRMSNorm, reference
from normzoo.convert import RestoreAffine, to_pre_crmsnorm, to_pre_rmsnorm


def crms_norm_reference(z, eps=1e-5):
    return NF.crms_norm(z, eps, backend="torch")


def crms_norm_backward_reference(dy, z, eps=1e-5):
    """normzoo.reference's hand-written CRMSNorm backward, on any leading dims."""
    dz, _ = reference.headwise_norm_backward(dy.reshape(-1, dy.shape[-1]), z.reshape(-1, z.shape[-1]), None, eps,
                                             "crms", False)
    return dz.view(z.shape)

CONVERSIONS = {"pre_rmsnorm": to_pre_rmsnorm, "pre_crmsnorm": to_pre_crmsnorm}
C, LAYERS, VOCAB, POSITIONS = 64, 2, 128, 32
EPS = 1e-3  # not GPT-2's or CRMSNorm's default (1e-5): a norm that lost the model's eps shows


# ------------------------------------------------------------------------------------------ CRMSNorm


def _crms_by_definition(z, eps):
    """CRMSNorm from its meaning: the RMSNorm of the zero-mean vector [z, -Σz], last value dropped."""
    full = torch.cat([z, -z.sum(-1, keepdim=True)], dim=-1)
    return torch.nn.functional.rms_norm(full, (full.shape[-1],), eps=eps)[..., :-1]


def _z(*shape, dtype=torch.float64):
    # A common offset, so that Σz (the dropped coordinate) is large and its terms matter.
    return (torch.randn(*shape, dtype=torch.float64) + 0.7).to(dtype)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 31), (1, 1)])
def test_crms_norm_is_the_rms_norm_of_the_decompressed_vector(shape):
    z = _z(*shape)
    torch.testing.assert_close(crms_norm_reference(z, 1e-5), _crms_by_definition(z, 1e-5), rtol=1e-13, atol=1e-14)
    # ... and the LayerNorm of any vector whose centred part it compresses.
    h = torch.randn(*shape[:-1], shape[-1] + 1, dtype=torch.float64) + 3.0
    ln = torch.nn.functional.layer_norm(h, (h.shape[-1],), eps=1e-5)
    z_from_h = (h - h.mean(-1, keepdim=True))[..., :-1]
    torch.testing.assert_close(crms_norm_reference(z_from_h, 1e-5), ln[..., :-1], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_crms_norm_computes_in_fp32_and_returns_the_input_dtype(dtype):
    z = _z(6, 40, dtype=dtype)
    y = crms_norm_reference(z, 1e-5)
    assert y.dtype == dtype
    # fp32 math, one rounding at the end: the fp64 result of the same (rounded) input, rounded.
    expected = _crms_by_definition(z.double(), 1e-5).to(dtype)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)


def test_crms_norm_gradcheck():
    z = _z(3, 9).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: crms_norm_reference(t, 1e-5), (z,))


@pytest.mark.parametrize("shape, eps", [((4, 15), 1e-5), ((2, 3, 64), 1e-6), ((7, 1), 0.1), ((3, 8), 0.0)])
def test_crms_norm_backward_formula_matches_autograd(shape, eps):
    """dz = r (dy − c (ŷ + s r)), c = Σ(ŷ dy)/C: the kernel's formula, against autograd in fp64."""
    z = _z(*shape).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    (expected,) = torch.autograd.grad(crms_norm_reference(z, eps), z, dy)
    dz = crms_norm_backward_reference(dy, z.detach(), eps)
    assert dz.dtype == torch.float64
    torch.testing.assert_close(dz, expected, rtol=1e-12, atol=1e-13)
    # The gradient is orthogonal to z (the output does not change along z: scale invariance, up
    # to eps), so a wrong sign or a missing term shows here too.
    if eps == 0.0:
        torch.testing.assert_close((dz * z.detach()).sum(-1), torch.zeros(shape[:-1], dtype=torch.float64),
                                   rtol=0, atol=1e-12)


def test_crms_norm_backward_formula_in_fp32():
    z = _z(8, 100, dtype=torch.float32)
    dy = torch.randn(8, 100)
    z64 = z.double().requires_grad_()
    (expected,) = torch.autograd.grad(crms_norm_reference(z64, 1e-5), z64, dy.double())
    dz = crms_norm_backward_reference(dy, z, 1e-5)
    assert dz.dtype == torch.float32
    torch.testing.assert_close(dz.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_crms_norm_module():
    norm = CRMSNorm(63, eps=1e-6)
    assert norm.normalized_shape == (63,) and norm.eps == 1e-6
    assert list(norm.parameters()) == [] and norm.state_dict() == {}
    assert repr(norm) == "CRMSNorm(63, eps=1e-06, backend='auto')"
    z = _z(2, 5, 63, dtype=torch.float32).requires_grad_()
    y = norm(z)
    torch.testing.assert_close(y, crms_norm_reference(z, 1e-6), rtol=0, atol=0)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(z.grad, crms_norm_backward_reference(dy, z.detach(), 1e-6), rtol=1e-5, atol=1e-6)


def test_crms_norm_bad_input():
    with pytest.raises(ValueError, match=r"last dim is 8, got input of shape \(2, 9\)"):
        CRMSNorm(8)(torch.randn(2, 9))
    with pytest.raises(TypeError, match="normalized_shape must be an int"):
        CRMSNorm(8.0)
    with pytest.raises(ValueError, match="eps"):
        CRMSNorm(8, eps=-1e-5)
    with pytest.raises(TypeError, match="eps"):
        crms_norm_reference(torch.randn(2, 8), "1e-5")
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        crms_norm_reference(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one dimension"):
        crms_norm_reference(torch.tensor(1.0))


# ------------------------------------------------------------------------------------- conversions


def _tiny_gpt2(cls_name="GPT2LMHeadModel", dtype=torch.float64, dropout=0.1, **config):
    """A tiny GPT-2 with random weights, in eval mode. Dropout is configured on (0.1) but the model
    is in eval mode: the conversion is exact there. Every parameter is moved away from GPT-2's
    initial values (LayerNorm γ = 1, β = 0, zero biases, near-zero-mean embeddings), or the folds
    and the centring would be tested on values where a mistake changes nothing."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=C, n_layer=LAYERS, n_head=4,
                                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                  layer_norm_epsilon=EPS, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
                                  **config)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_"):
                p.normal_(1.0, 0.3) if name.endswith("weight") else p.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.2, 0.3)
            elif "wte" in name or "wpe" in name:
                p.normal_(0.0, 1.0).add_(torch.randn(p.shape[0], 1))  # each row off zero-mean
            else:
                p.normal_(0.0, 0.15)
    return model.to(dtype).eval()


def _ids():
    return torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))


def _output(model, **kwargs):
    out = model(_ids(), **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _stream_width(model):
    base = getattr(model, "transformer", model)
    return base.wte.weight.shape[-1]


# fp64: the conversion is exact algebra; the differences are rounding (measured ≤ 5.1e-14 on logits
# of magnitude ~38, ≤ 7.4e-15 on GPT2Model's outputs of magnitude ~5). fp32: measured ≤ 3.0e-5 on
# the logits and ≤ 4.2e-6 on GPT2Model's outputs (five inputs), the size of the fp32 model's own
# rounding error (the original fp32 model is 2.0e-5 / 2.1e-6 from its fp64 twin; ~2e-5 is ~8 ulp
# of a logit of 38). 1e-4 / 2e-5 leave 3-5x margin and still fail on any real mistake (a missed
# fold, centring or eps moves the outputs by 1e-3 to 10).
TOLERANCE = {(torch.float64, "GPT2LMHeadModel"): 1e-10, (torch.float64, "GPT2Model"): 1e-10,
             (torch.float32, "GPT2LMHeadModel"): 1e-4, (torch.float32, "GPT2Model"): 2e-5}


@pytest.mark.parametrize("conversion", CONVERSIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cls_name", ["GPT2LMHeadModel", "GPT2Model"])
def test_converted_model_gives_the_same_outputs(cls_name, dtype, conversion):
    model = _tiny_gpt2(cls_name, dtype)
    with torch.no_grad():
        before = _output(model)
    assert before.abs().max() > 1.0  # a scale on which the tolerance means something
    converted = CONVERSIONS[conversion](model)
    assert converted is model  # in place
    with torch.no_grad():
        after = _output(model)
    assert after.shape == before.shape and after.dtype == dtype
    torch.testing.assert_close(after, before, rtol=0, atol=TOLERANCE[dtype, cls_name])
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.config.normzoo_conversion == conversion


@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_the_stream_is_the_centred_original_and_attention_is_untouched(conversion):
    """Layer by layer: each block's output is the original one centred (and for CRMSNorm, without
    its last coordinate), and every attention map is the same: only the residual stream changed."""
    model = _tiny_gpt2()
    with torch.no_grad():
        before = model(_ids(), output_hidden_states=True, output_attentions=True)
        CONVERSIONS[conversion](model)
        after = model(_ids(), output_hidden_states=True, output_attentions=True)
    # hidden_states[-1] is ln_f's output (the normalized stream now): compare the others.
    assert len(after.hidden_states) == len(before.hidden_states) == LAYERS + 1
    for h, h_conv in zip(before.hidden_states[:-1], after.hidden_states[:-1]):
        centred = h - h.mean(-1, keepdim=True)
        expected = centred[..., :-1] if conversion == "pre_crmsnorm" else centred
        torch.testing.assert_close(h_conv, expected, rtol=0, atol=1e-12)
    for a, a_conv in zip(before.attentions, after.attentions, strict=True):
        torch.testing.assert_close(a_conv, a, rtol=0, atol=1e-13)


@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_converted_shapes_and_parameter_counts(conversion):
    model = _tiny_gpt2()
    n_before = sum(p.numel() for p in model.parameters())  # lm_head is tied to wte: counted once
    assert model.lm_head.weight is model.transformer.wte.weight
    CONVERSIONS[conversion](model)
    compress = conversion == "pre_crmsnorm"
    d = C - 1 if compress else C
    base = model.transformer
    assert base.wte.weight.shape == (VOCAB, d) and base.wpe.weight.shape == (POSITIONS, d)
    for block in base.h:
        attn, mlp = block.attn, block.mlp
        assert attn.c_attn.weight.shape == (d, 3 * C) and attn.c_attn.bias.shape == (3 * C,)  # q, k, v: C each
        assert attn.c_proj.weight.shape == (C, d) and attn.c_proj.bias.shape == (d,)
        assert mlp.c_fc.weight.shape == (d, 4 * C) and mlp.c_proj.weight.shape == (4 * C, d)
        assert attn.head_dim == C // 4 and attn.split_size == C
        for norm in (block.ln_1, block.ln_2):
            if compress:
                assert type(norm) is CRMSNorm and norm.normalized_shape == (C - 1,) and norm.eps == EPS
            else:
                assert type(norm) is normzoo.RMSNorm and norm.weight is None and norm.normalized_shape == (C,)
                assert norm.eps == EPS
    assert type(base.ln_f) is (CRMSNorm if compress else normzoo.RMSNorm) and base.ln_f.eps == EPS
    # lm_head: its own weight now (untied), with the bias W β that ln_f's β folded into.
    assert model.lm_head.weight is not base.wte.weight and model.lm_head.weight.shape == (VOCAB, d)
    assert model.lm_head.bias.shape == (VOCAB,) and not model.config.tie_word_embeddings

    layernorm_params = 2 * C * (2 * LAYERS + 1)
    untied_head = VOCAB * C + VOCAB
    n_pre_rms = n_before - layernorm_params + untied_head
    # Dropping a coordinate: a column of wte, wpe, lm_head; per block a row of c_attn and c_fc, a
    # column and a bias value of each c_proj.
    dropped = VOCAB + POSITIONS + VOCAB + LAYERS * (3 * C + (C + 1) + 4 * C + (4 * C + 1))
    assert sum(p.numel() for p in model.parameters()) == (n_pre_rms - dropped if compress else n_pre_rms)


@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_bare_gpt2_model_keeps_its_output_width(conversion):
    model = _tiny_gpt2("GPT2Model")
    with torch.no_grad():
        before = model(_ids(), output_hidden_states=True, return_dict=False)
        n_before = sum(p.numel() for p in model.parameters())
        CONVERSIONS[conversion](model)
        after = model(_ids(), output_hidden_states=True, return_dict=False)
    assert type(model.ln_f_affine) is RestoreAffine and model.ln_f_affine.weight.shape == (C,)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-10)  # last_hidden_state, as a tuple
    torch.testing.assert_close(after[2][-1], before[2][-1], rtol=0, atol=1e-10)  # hidden_states[-1] too
    dropped = (VOCAB + POSITIONS + LAYERS * (12 * C + 2)) if conversion == "pre_crmsnorm" else 0
    assert sum(p.numel() for p in model.parameters()) == n_before - 2 * C * 2 * LAYERS - dropped


@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_gradients_flow_and_match_the_original(conversion):
    """Backward through the converted model (CRMSNorm's or RMSNorm's backward in every block):
    every parameter gets a finite, nonzero gradient; and the gradient with respect to the input
    embeddings equals the original model's (the stream map e -> centre(e)[..., :-1] is linear, so
    autograd through it gives the original's input gradient back)."""
    model = _tiny_gpt2()
    converted = CONVERSIONS[conversion](copy.deepcopy(model))
    e = torch.randn(2, 9, C, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 9, VOCAB, dtype=torch.float64)
    (model(inputs_embeds=e).logits * weights).sum().backward()
    grad_original = e.grad.clone()
    e.grad = None
    stream = e - e.mean(-1, keepdim=True)
    if conversion == "pre_crmsnorm":
        stream = stream[..., :-1]
    (converted(inputs_embeds=stream).logits * weights).sum().backward()
    torch.testing.assert_close(e.grad, grad_original, rtol=1e-9, atol=1e-12)
    for name, p in converted.named_parameters():
        if name == "transformer.wte.weight":
            continue  # inputs_embeds bypasses wte
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_tie_weights_after_conversion_does_not_tie_again():
    model = _tiny_gpt2()
    with torch.no_grad():
        before = _output(model)
    to_pre_crmsnorm(model)
    model.tie_weights()
    assert model.lm_head.weight is not model.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(_output(model), before, rtol=0, atol=1e-10)


def test_converts_normzoo_layer_norms_and_untied_heads():
    model = _tiny_gpt2(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    normzoo.swap(model, backend="torch")
    assert type(model.transformer.ln_f) is normzoo.LayerNorm
    with torch.no_grad():
        before = _output(model)
        to_pre_rmsnorm(model)
        torch.testing.assert_close(_output(model), before, rtol=0, atol=1e-10)
    assert model.transformer.h[0].ln_1.backend == "torch"  # the LayerNorm's backend is kept


def test_refuses_what_it_does_not_support():
    transformers = pytest.importorskip("transformers")
    supported = r"Supported: Hugging Face transformers.GPT2Model and transformers.GPT2LMHeadModel"
    for conversion in CONVERSIONS.values():
        with pytest.raises(ValueError, match=f"cannot convert Sequential: not a supported architecture. {supported}"):
            conversion(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=C, n_layer=1, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    with pytest.raises(ValueError, match="cannot convert GPT2DoubleHeadsModel"):
        to_pre_rmsnorm(transformers.GPT2DoubleHeadsModel(cfg))
    with pytest.raises(ValueError, match="cross-attention"):
        to_pre_crmsnorm(_tiny_gpt2(add_cross_attention=True))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):
        to_pre_rmsnorm(None)
    # A one-wide stream has no C - 1 coordinates to keep: refused before anything changes (it
    # used to convert, then fail at the first forward).
    narrow = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=1,
                                                                  n_layer=1, n_head=1, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match="its stream is 1 wide"):
        to_pre_crmsnorm(narrow)
    assert type(narrow.transformer.ln_f) is torch.nn.LayerNorm
    # A LayerNorm over another shape than the hidden size: named, not a broadcasting error mid-fold.
    other = _tiny_gpt2()
    other.transformer.h[1].ln_2 = torch.nn.LayerNorm((1, C), dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape(f"a LayerNorm over (1, {C}), not the hidden size ({C},)")):
        to_pre_rmsnorm(other)
    # Hooks on the LayerNorms would see other values after conversion: a warning, not carried over.
    for where in ("transformer.h.0.ln_1", "transformer.h.1.mlp.c_fc", "transformer.wte"):
        hooked = _tiny_gpt2()
        hooked.get_submodule(where).register_forward_hook(lambda *args: None)
        with pytest.warns(UserWarning, match="hooks on the model's LayerNorms, embeddings or projections"):
            to_pre_rmsnorm(hooked)
    # lm_head's output, the logits, keeps its meaning: its hooks move to the new head.
    seen = []
    hooked = _tiny_gpt2()
    hooked.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_pre_rmsnorm(hooked)
    hooked(torch.randint(0, VOCAB, (1, 3)))
    assert seen == [(1, 3, VOCAB)]


def test_converts_normzoo_layer_norms_with_a_weight_offset():
    """A normzoo.LayerNorm applies ``weight + weight_offset``: that sum is the γ folded into the
    next layer, not the stored weight."""
    model = _tiny_gpt2()
    with torch.no_grad():
        before = _output(model)
        base = model.transformer
        for parent, name in [(base, "ln_f")] + [(block, n) for block in base.h for n in ("ln_1", "ln_2")]:
            ln = getattr(parent, name)
            offset = normzoo.LayerNorm(C, eps=ln.eps, weight_offset=1.0, backend="torch", dtype=ln.weight.dtype)
            offset.weight.copy_(ln.weight - 1.0)
            offset.bias.copy_(ln.bias)
            setattr(parent, name, offset.eval())
        torch.testing.assert_close(_output(model), before, rtol=0, atol=1e-10)
        to_pre_rmsnorm(model)
        torch.testing.assert_close(_output(model), before, rtol=0, atol=1e-10)


@pytest.mark.parametrize("conversion", CONVERSIONS)
@pytest.mark.parametrize("cls_name", ["GPT2LMHeadModel", "GPT2Model"])
def test_converted_modules_keep_requires_grad_mode_and_say_their_widths(cls_name, conversion):
    """Frozen parameters stay frozen (the new Parameters take their requires_grad), the new norms
    (and a bare model's ln_f_affine) take the eval mode of what they replace, and each Conv1D that
    reads or writes the stream says its new width (its repr: ``Conv1D(nf=..., nx=...)``)."""
    model = _tiny_gpt2(cls_name)
    assert not model.training
    base = getattr(model, "transformer", model)
    base.wte.weight.requires_grad_(False)  # lm_head is tied to it: frozen too
    base.h[0].attn.c_attn.requires_grad_(False)
    base.h[1].mlp.c_proj.weight.requires_grad_(False)
    base.ln_f.requires_grad_(False)  # folded into lm_head, or kept in a bare model's ln_f_affine
    CONVERSIONS[conversion](model)
    d = C - 1 if conversion == "pre_crmsnorm" else C
    # lm_head's new bias (W β) follows its weight.
    frozen = {"transformer.wte.weight", "lm_head.weight", "lm_head.bias", "transformer.h.0.attn.c_attn.weight",
              "transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.c_proj.weight"}
    if cls_name == "GPT2Model":
        frozen = {name.removeprefix("transformer.") for name in frozen if not name.startswith("lm_head")}
        frozen |= {"ln_f_affine.weight", "ln_f_affine.bias"}
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == frozen
    assert not any(m.training for m in model.modules())
    for block in base.h:
        assert block.attn.c_attn.nx == d and block.mlp.c_fc.nx == d
        assert block.attn.c_proj.nf == d and block.mlp.c_proj.nf == d
        assert f"nx={d})" in repr(block.attn.c_attn)


@pytest.mark.parametrize("second", CONVERSIONS)
def test_refuses_a_converted_model(second):
    model = to_pre_rmsnorm(_tiny_gpt2())
    with pytest.raises(ValueError, match="already converted"):
        CONVERSIONS[second](model)


def test_a_refused_model_is_left_unchanged():
    model = _tiny_gpt2()
    model.transformer.h[1].ln_2 = normzoo.DyT(C)  # not a LayerNorm: found after h[0] was seen
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match="found normzoo.layers.DyT where GPT-2 has a torch.nn.LayerNorm"):
        to_pre_crmsnorm(model)
    assert dict(model.named_modules()) == modules
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.transformer.wte.weight
