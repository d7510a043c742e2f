import copy
import inspect

import pytest
import torch
import torch.nn.utils.prune

import normzoo


def tiny_model():
    return torch.nn.Sequential(
        torch.nn.Linear(16, 16),
        torch.nn.LayerNorm(16),
        torch.nn.Sequential(torch.nn.RMSNorm(16, eps=1e-6), torch.nn.GELU()),
        torch.nn.LayerNorm(16, bias=False),
        torch.nn.BatchNorm1d(16),
    )


def test_swap_replaces_norms_and_keeps_everything_else(device):
    model = tiny_model().to(device).eval()
    original = copy.deepcopy(model)
    weight = model[1].weight
    report = normzoo.swap(model, backend="triton")
    assert report == {"torch.LayerNorm -> normzoo.LayerNorm": 2, "torch.RMSNorm -> normzoo.RMSNorm": 1}
    assert isinstance(model[1], normzoo.LayerNorm) and isinstance(model[2][0], normzoo.RMSNorm)
    assert model[2][0].eps == 1e-6 and model[3].bias is None
    assert model[1].weight is weight  # the same Parameter: optimizer state stays valid
    assert type(model[4]) is torch.nn.BatchNorm1d  # not a norm we replace
    assert not model[1].training
    assert model.state_dict().keys() == original.state_dict().keys()

    x = torch.randn(5, 16, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = model(x), original(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # A random projection, not y.square(): a gradient parallel to a norm's output lies in the
    # norm's null space, and the cancellation would test conditioning rather than the swap.
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for (name, p), p_ref in zip(model.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fx_symbolic_trace_after_swap(backend):
    """torch.fx traces into a non-torch.nn module's forward: each normzoo layer must come out as
    one call of its op (a graph node), as torch's norms do, not a TypeError about a Proxy (FX
    quantization, torchvision's feature extraction trace models so)."""
    import torch.fx

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8), torch.nn.GELU())
    torch.fx.symbolic_trace(model)
    normzoo.swap(model, backend=backend)
    model.extend([normzoo.DyT(8, backend=backend), normzoo.ScaleNorm(8, backend=backend)])
    layers = [(model, (torch.randn(3, 8),)),
              (normzoo.LayerNorm2d(4, backend=backend), (torch.randn(2, 4, 3, 3),)),
              (normzoo.Derf(4, channels_last=False, backend=backend), (torch.randn(2, 4, 5),)),
              (normzoo.QKNorm(8, backend=backend), (torch.randn(2, 3, 2, 8), torch.randn(2, 3, 1, 8)))]
    for module, inputs in layers:
        traced = torch.fx.symbolic_trace(module)
        assert any(node.op == "call_function" and node.target.__module__ == "normzoo.ops"
                   for node in traced.graph.nodes), traced.code
        got, want = traced(*inputs), module(*inputs)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    traced = torch.fx.symbolic_trace(model)
    traced(torch.randn(3, 8)).sum().backward()
    assert model[1].weight.grad is not None


def test_swap_twice_changes_nothing_the_second_time_and_says_so():
    model = tiny_model()
    normzoo.swap(model)
    with pytest.warns(UserWarning, match=r"replaced nothing in Sequential; 3 normzoo layer\(s\) already$") as record:
        report = normzoo.swap(model)
    assert report == {} and report.left_alone == {} and "backend" not in str(record[0].message)
    # Asked for another backend, the second swap keeps the layers' own and says so.
    with pytest.warns(UserWarning, match=r"normzoo layer\(s\) already, with backend='auto' \(kept"):
        normzoo.swap(model, backend="torch")
    assert all(m.backend == "auto" for m in model.modules() if isinstance(m, (normzoo.LayerNorm, normzoo.RMSNorm)))
    # Converted models too; one converted to the other zoo member names its layers as left alone.
    normzoo.swap(model, to="dyt")
    with pytest.warns(UserWarning, match=r"replaced nothing in Sequential; 3 normzoo layer\(s\) already$"):
        normzoo.swap(model, to="dyt")
    with pytest.warns(UserWarning, match="replaced nothing") as record:
        report = normzoo.swap(model, to="derf")
    assert report == {} and set(report.left_alone) == {
        f"{i}: normzoo.DyT (to='derf' converts LayerNorm and RMSNorm only)" for i in ("1", "2.0", "3")}, report.left_alone
    assert "already" not in str(record[0].message)


def test_swap_keeps_hooks_and_shared_modules():
    shared = torch.nn.LayerNorm(8)
    model = torch.nn.Sequential(shared, torch.nn.Linear(8, 8), shared)
    calls = []
    shared.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    for to in (None, "dyt"):
        report = normzoo.swap(model, to=to)
        assert sum(report.values()) == 1  # one module, converted once
        assert model[0] is model[2]
    calls.clear()
    model(torch.randn(2, 8))
    assert calls == ["DyT", "DyT"]


def test_swap_and_unswap_keep_a_hook_based_reparametrization():
    """torch.nn.utils.prune and the old weight_norm keep the class (a torch.nn.LayerNorm still) but
    replace ``weight`` by other parameters and a buffer, and recompute it in a forward pre-hook:
    the new layer takes those, not a ``weight`` of its own (it stayed on the meta device, in the
    state_dict, and the moved hook failed on the missing mask)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    torch.nn.utils.prune.l1_unstructured(model[1], "weight", amount=0.5)
    with pytest.warns(FutureWarning):  # deprecated, still used (its hook is what this tests)
        torch.nn.utils.weight_norm(model[2], dim=0)
    x = torch.randn(3, 8)
    before, keys = model(x), list(model.state_dict())
    normzoo.swap(model)
    assert type(model[1]) is normzoo.LayerNorm and type(model[2]) is normzoo.RMSNorm
    assert list(model.state_dict()) == keys and not any(t.is_meta for t in model.state_dict().values())
    torch.testing.assert_close(model(x), before)
    model(x).sum().backward()
    assert model[1].weight_orig.grad is not None and model[2].weight_g.grad is not None
    torch.nn.utils.prune.remove(model[1], "weight")  # the reparametrization is still whole
    normzoo.unswap(model)
    assert type(model[1]) is torch.nn.LayerNorm and sorted(model[1].state_dict()) == ["bias", "weight"]
    torch.testing.assert_close(model(x), before)


def test_swap_to_dyt_leaves_a_norm_whose_weight_a_hook_computes():
    """A fresh DyT has no weight_orig or mask: prune's hook, moved to it, failed at its first call."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.LayerNorm(8))
    torch.nn.utils.prune.l1_unstructured(model[1], "weight", amount=0.5)
    report = normzoo.swap(model, to="dyt")
    assert report == {"torch.LayerNorm -> normzoo.DyT": 1} and type(model[1]) is torch.nn.LayerNorm
    assert list(report.left_alone) == ["1: torch.LayerNorm (its weight is recomputed by a hook, torch.nn.utils.prune's "
                                       "or weight_norm's: remove it before converting)"]
    assert model(torch.randn(3, 8)).shape == (3, 8)


def test_swap_refuses_a_bare_norm():
    bare = [torch.nn.LayerNorm(4), torch.nn.RMSNorm(4), normzoo.RMSNorm(4), normzoo.DyT(4), normzoo.Derf(4)]
    transformers = pytest.importorskip("transformers")
    bare.append(transformers.models.llama.modeling_llama.LlamaRMSNorm(4))  # a model's own, that swap replaces
    for norm in bare:
        with pytest.raises(ValueError, match="the model itself is a norm"):
            normzoo.swap(norm)


def test_swap_moves_every_kind_of_hook_and_handles_still_work():
    """The issue's example: a full backward hook was lost; a with_kwargs forward hook broke."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    seen = []
    model[1].register_full_backward_hook(lambda *a: seen.append("backward"))
    model[1].register_full_backward_pre_hook(lambda *a: seen.append("backward_pre"))
    model[1].register_forward_hook(lambda m, args, kwargs, out: seen.append("forward_kwargs"), with_kwargs=True)
    model[1].register_forward_pre_hook(lambda m, args, kwargs: seen.append("pre_kwargs"), with_kwargs=True)
    always = model[1].register_forward_hook(lambda *a: seen.append("always"), always_call=True)
    normzoo.swap(model)
    assert type(model[1]) is normzoo.LayerNorm
    model(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert sorted(seen) == sorted(["pre_kwargs", "forward_kwargs", "always", "backward_pre", "backward"])
    always.remove()  # a handle taken before the swap removes the hook from the new layer
    seen.clear()
    model(torch.randn(2, 8))
    assert "always" not in seen and "forward_kwargs" in seen


def test_swap_names_norm_like_modules_it_does_not_know():
    class LlamaRMSNorm(torch.nn.Module):  # a model's own norm class, as Hugging Face models have
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(n))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), LlamaRMSNorm(4), torch.nn.GroupNorm(2, 4),
                                torch.nn.LayerNorm(4))
    report = normzoo.swap(model)
    assert report == {"torch.LayerNorm -> normzoo.LayerNorm": 1}
    assert sorted(report.left_alone) == [
        "1: test_swap.test_swap_names_norm_like_modules_it_does_not_know.<locals>.LlamaRMSNorm "
        "(no exact normzoo equivalent known)",
        "2: torch.GroupNorm (no exact normzoo equivalent known)"]
    assert type(model[1]) is LlamaRMSNorm


def test_swap_names_only_layers_as_norms():
    # A block named like a norm that holds norms (wav2vec2's Wav2Vec2EncoderStableLayerNorm) is not one
    # (its norms inside are replaced), nor weight_norm's _WeightNorm parametrization, nor a NormHead;
    # a layer whose name goes on after "Norm" (Qwen3-Next's RMSNormGated) is, and a parametrized
    # GroupNorm, and a model's own LayerNorm2d (SAM's: "Norm" then a rank). BatchNorm (SyncBatchNorm
    # too) and InstanceNorm are never touched nor named.
    class EncoderStableLayerNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(x)

    class RMSNormGated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

        def forward(self, x, gate):
            return self.weight * x * torch.sigmoid(gate)

    class NormHead(torch.nn.Linear):  # Baichuan 2's lm head: a Linear with a normalized weight
        pass

    class LayerNorm2d(torch.nn.Module):  # SAM's: LayerNorm over dim 1 written out, not timm's class
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return self.weight[:, None, None] * (x - x.mean(1, keepdim=True))

    group = torch.nn.GroupNorm(2, 8)
    torch.nn.utils.parametrize.register_parametrization(group, "weight", torch.nn.Identity())
    model = torch.nn.Sequential(EncoderStableLayerNorm(),
                                torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 8)),
                                RMSNormGated(), torch.nn.BatchNorm2d(3), torch.nn.SyncBatchNorm(3), NormHead(8, 8),
                                group, LayerNorm2d(), torch.nn.InstanceNorm2d(3))
    report = normzoo.swap(model)
    assert report == {"torch.LayerNorm -> normzoo.LayerNorm": 1}
    assert sorted(k.split(" (")[0] for k in report.left_alone) == [
        "2: test_swap.test_swap_names_only_layers_as_norms.<locals>.RMSNormGated",
        "6: torch.ParametrizedGroupNorm", "7: test_swap.test_swap_names_only_layers_as_norms.<locals>.LayerNorm2d"]


@pytest.mark.parametrize("to", ["dyt", "derf"])
@pytest.mark.parametrize("name", ["llama", "gemma", "t5"])
def test_swap_to_dyt_converts_hugging_face_norms_in_one_step(name, to):
    # The classes swap replaces exactly (Llama's, Gemma's, T5's...) are norms to convert too: one
    # call, every one of them, no second swap first.
    model = _tiny_hf_model(name)
    target = normzoo.DyT if to == "dyt" else normzoo.Derf
    widths = [tuple(m.weight.shape) for m in model.modules() if type(m).__name__.endswith("Norm")]
    report = normzoo.swap(model, to=to)
    assert sum(report.values()) == _HF_MODELS[name][2] == len(widths) and not report.left_alone, report
    layers = [m for m in model.modules() if type(m) is target]
    assert [m.normalized_shape for m in layers] == widths and all(m.bias is None for m in layers)
    ids = torch.randint(0, 64, (2, 7))
    assert _logits(model, ids).isfinite().all()
    # A 16-bit norm fed fp32 activations (T5 in fp16 keeps its wo in fp32): the converted layer, in
    # the norm's weight dtype, runs as the norm did (in fp32, output fp32).
    norm = torch.nn.Sequential(copy.deepcopy(_final_norm(_tiny_hf_model(name)))).half()
    normzoo.swap(norm, to=to)
    x = torch.randn(2, 32, requires_grad=True)
    y = norm(x)
    y.sum().backward()
    assert y.dtype == torch.float32 and norm[0].weight.dtype == torch.float16 and norm[0].weight.grad is not None


@pytest.mark.parametrize("to", ["dyt", "derf"])
def test_swap_to_dyt_leaves_transformer_encoder_layer_norms(to):
    """nn.TransformerEncoderLayer's eval fast path reads its norms' eps and runs LayerNorm math on
    their parameters: a DyT there crashed in eval (no eps) or would be bypassed. They stay, named;
    the encoder's final norm, which it only calls, is converted; eval still runs."""
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(16), enable_nested_tensor=False)
    report = normzoo.swap(model, to=to)
    assert sum(report.values()) == 1 and isinstance(model.norm, normzoo.DyT if to == "dyt" else normzoo.Derf)
    assert len(report.left_alone) == 4 and all("TransformerEncoderLayer's fast path" in k for k in report.left_alone)
    assert type(model.layers[0].norm1) is torch.nn.LayerNorm
    x = torch.randn(2, 5, 16)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == x.shape


def test_unswap_gives_back_torch_classes_with_the_same_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8, bias=False), torch.nn.RMSNorm(8, eps=1e-6))
    originals = [model[1].weight, model[2].weight]
    x = torch.randn(3, 8)
    before = model(x)
    normzoo.swap(model)
    calls = []
    model[1].register_forward_hook(lambda *a: calls.append(1))
    report = normzoo.unswap(model)
    assert report == {"normzoo.LayerNorm -> torch.LayerNorm": 1, "normzoo.RMSNorm -> torch.RMSNorm": 1}
    assert report.replaced == dict(report) and repr(report).startswith(f"SwapReport(replaced={dict(report)}")
    assert type(model[1]) is torch.nn.LayerNorm and type(model[2]) is torch.nn.RMSNorm
    assert model[1].weight is originals[0] and model[2].weight is originals[1] and model[1].bias is None
    assert model[2].eps == 1e-6
    torch.testing.assert_close(model(x), before)
    assert calls == [1]
    dyt = torch.nn.Sequential(torch.nn.Linear(4, 4), normzoo.DyT(4))
    assert list(normzoo.unswap(dyt).left_alone) == ["1: normzoo.DyT (no PyTorch class to go back to)"]
    # normzoo's head-wise norms are ours to swap (nothing to report) and stay on unswap (named).
    heads = torch.nn.Sequential(normzoo.ScaleNorm(4), normzoo.CRMSNorm(4), torch.nn.LayerNorm(4))
    report = normzoo.swap(heads)
    assert report == {"torch.LayerNorm -> normzoo.LayerNorm": 1} and not report.left_alone
    assert sorted(normzoo.unswap(heads).left_alone) == ["0: normzoo.ScaleNorm (no PyTorch class to go back to)",
                                                        "1: normzoo.CRMSNorm (no PyTorch class to go back to)"]
    # to="dyt" converts LayerNorm and RMSNorm only: the head-wise ones stay, named.
    heads = torch.nn.Sequential(normzoo.ScaleNorm(4), normzoo.CRMSNorm(4), torch.nn.LayerNorm(4))
    report = normzoo.swap(heads, to="dyt")
    assert report == {"torch.LayerNorm -> normzoo.DyT": 1}
    assert sorted(report.left_alone) == [
        "0: normzoo.ScaleNorm (a normzoo head-wise norm: to='dyt' converts LayerNorm and RMSNorm only)",
        "1: normzoo.CRMSNorm (a normzoo head-wise norm: to='dyt' converts LayerNorm and RMSNorm only)"]


def test_unswap_gives_a_models_own_class_the_eps_in_use():
    """An eps set while swapped (a float, or an int: normzoo layers keep it as given) goes back to
    the model's own class's attribute; None (torch's default), which it cannot hold, warns."""
    transformers = pytest.importorskip("transformers")
    model = torch.nn.Sequential(transformers.models.llama.modeling_llama.LlamaRMSNorm(4, eps=1e-6))
    normzoo.swap(model)
    model[0].eps = 1
    normzoo.unswap(model)
    assert model[0].variance_epsilon == 1.0 and type(model[0].variance_epsilon) is float
    normzoo.swap(model)
    model[0].eps = None
    with pytest.warns(UserWarning, match="eps=None, which .*LlamaRMSNorm cannot take; it keeps its eps 1.0"):
        normzoo.unswap(model)
    assert model[0].variance_epsilon == 1.0
    # A model's own rounding built by hand: torch.nn.RMSNorm would compute another function.
    llama = torch.nn.Sequential(normzoo.RMSNorm(4, eps=1e-6, x_hat_dtype="input"))
    report = normzoo.unswap(llama)
    assert type(llama[0]) is normzoo.RMSNorm and not report
    assert list(report.left_alone) == ["0: normzoo.RMSNorm (x_hat_dtype: no PyTorch equivalent)"]


def test_unswap_leaves_a_hand_built_weight_offset_norm():
    """torch.nn.LayerNorm / RMSNorm apply ``weight``, not ``weight + weight_offset``: a norm built
    with an offset (Gemma's ``1 + w``) by hand stays, named, and computes what it computed."""
    model = torch.nn.Sequential(normzoo.RMSNorm(4, eps=1e-6, weight_offset=1.0),
                                normzoo.LayerNorm(4, weight_offset=1.0))
    x = torch.randn(3, 4)
    before = model(x)
    report = normzoo.unswap(model)
    assert type(model[0]) is normzoo.RMSNorm and type(model[1]) is normzoo.LayerNorm and not report
    assert sorted(report.left_alone) == ["0: normzoo.RMSNorm (weight_offset: no PyTorch equivalent)",
                                         "1: normzoo.LayerNorm (weight_offset: no PyTorch equivalent)"]
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


# ---------------------------------------------------------------- Hugging Face models, built from configs


# name: (config class, model class, norms swap replaces)
_HF_MODELS = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", 5),  # (1 + w) in fp32, one cast
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", 9),  # w · x̂ in fp32, one cast; q/k norms over all heads
    "llama": ("LlamaConfig", "LlamaForCausalLM", 5),  # w * x̂.to(input dtype)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", 9),  # as Llama, and per-head q_norm / k_norm
    "phi3": ("Phi3Config", "Phi3ForCausalLM", 5),  # a copy of Llama's class under another name
    "t5": ("T5Config", "T5ForConditionalGeneration", 12),  # x̂ to a 16-bit weight's dtype, then w * x̂
}


def _tiny_hf_model(name, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, _ = _HF_MODELS[name]
    if name == "t5":
        config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=0, dropout_rate=0.0)
    else:
        config = getattr(transformers, config_cls)(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                   head_dim=16, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(dtype).eval()
    with torch.no_grad():  # norm weights away from their initial values, so offsets and casts matter
        for name_, p in model.named_parameters():
            if "norm" in name_:
                p.normal_(0.5, 0.3)
    return model


def _logits(model, ids):
    if model.config.is_encoder_decoder:
        return model(input_ids=ids, decoder_input_ids=ids).logits
    return model(ids).logits


def _final_norm(model):
    return model.encoder.final_layer_norm if model.config.is_encoder_decoder else model.model.norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(_HF_MODELS))
def test_swap_hugging_face_norms_whose_math_normzoo_reproduces(name, dtype):
    """Each family's own RMSNorm class is replaced, and the logits are bit-identical in every dtype
    on the reference path: the same fp32 statistics, rounded where the class rounds. unswap gives
    the model's own classes back with the same parameters."""
    model = _tiny_hf_model(name, dtype)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = _logits(model, ids)
    original_class = type(_final_norm(model))
    weight = _final_norm(model).weight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = normzoo.swap(model)
    assert sum(report.values()) == _HF_MODELS[name][2] and not report.left_alone, report
    assert type(_final_norm(model)) is normzoo.RMSNorm and _final_norm(model).weight is weight
    assert model.state_dict().keys() == state.keys()
    with torch.no_grad():
        after = _logits(model, ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    model.load_state_dict(state)  # a checkpoint of the original loads into the swapped model
    assert sum(normzoo.unswap(model).values()) == _HF_MODELS[name][2]
    assert type(_final_norm(model)) is original_class and _final_norm(model).weight is weight
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)
    # An eps set while swapped is the one in use: unswap gives it to the model's own class.
    normzoo.swap(model)
    _final_norm(model).eps = 0.25
    with torch.no_grad():
        edited = _logits(model, ids)
    normzoo.unswap(model)
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, ids), edited, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["t5", "llama", "gemma", "olmo2"])
def test_swapped_norms_take_a_16bit_weight_with_fp32_input(name, weight_dtype, backend):
    """A model's norm with a 16-bit weight fed fp32 activations (T5 loaded in fp16 keeps its ``wo``
    in fp32, so fp32 hidden states reach an fp16 ``T5LayerNorm``): the swapped norm computes what
    the model's code does, in the output dtype it gives (T5: the weight's; Llama: the promotion;
    Gemma and OLMo 2: the input's), bit for bit on the reference path; the gradients within the
    rounding of the model's own 16-bit steps. (OLMo 2's is a plain RMSNorm, as torch's: it took
    only the input's dtype or fp32 before.)"""
    norm = _final_norm(_tiny_hf_model(name)).to(weight_dtype)
    original, swapped = torch.nn.Sequential(copy.deepcopy(norm)), torch.nn.Sequential(copy.deepcopy(norm))
    assert sum(normzoo.swap(swapped, backend=backend).values()) == 1
    x = torch.randn(3, 5, 32)
    x0, x1 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y0, y1 = original(x0), swapped(x1)
    assert y1.dtype == y0.dtype
    if backend == "torch":
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    else:  # the kernel sums x² in another order: an fp32 ulp of rstd may flip a 16-bit rounding
        torch.testing.assert_close(y1, y0, rtol=2 ** -7, atol=0)
    dy = torch.randn_like(y0)
    y0.backward(dy)
    y1.backward(dy)
    w0, w1 = original[0].weight.grad, swapped[0].weight.grad
    assert w1.dtype == weight_dtype
    torch.testing.assert_close(x1.grad, x0.grad, rtol=2e-2, atol=2e-2 * x0.grad.abs().max().item())
    torch.testing.assert_close(w1.float(), w0.float(), rtol=2e-2, atol=2e-2 * w0.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma", "t5"])
def test_swapped_norms_fuse_with_the_residual_add_as_the_model_computes(name, dtype, backend):
    """A pre-norm block's ``hidden = residual + h; hidden = norm(hidden)`` (Llama's
    post_attention_layernorm, T5's next layer_norm), with the swapped norm in normzoo's fused
    add_norm: the model's own class's output, in its dtype, bit for bit on the reference; within
    one rounding on the kernels (their fp32 sums run in another order). The sum is the model's."""
    norm = _final_norm(_tiny_hf_model(name, dtype))
    swapped = torch.nn.Sequential(copy.deepcopy(norm))
    assert sum(normzoo.swap(swapped, backend=backend).values()) == 1
    residual, h = (torch.randn(3, 5, 32) * 2).to(dtype), (torch.randn(3, 5, 32) * 2).to(dtype)
    with torch.no_grad():
        expected = norm(residual + h)
        y, s = normzoo.functional.add_norm(residual, h, swapped[0])
    torch.testing.assert_close(s, residual + h, rtol=0, atol=0)
    assert y.dtype == expected.dtype
    if backend == "torch" or dtype is torch.float32:
        torch.testing.assert_close(y, expected, rtol=0 if backend == "torch" else 1e-5,
                                   atol=0 if backend == "torch" else 1e-6)
    else:
        torch.testing.assert_close(y, expected, rtol=torch.finfo(dtype).eps, atol=0)
        assert (y != expected).float().mean() < 0.05


def _grads(model, ids):
    model.zero_grad()
    _logits(model, ids).double().square().mean().backward()
    return {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["llama", "qwen3", "t5"])
def test_swapped_hugging_face_models_train_like_the_originals(name, backend):
    """Logits and every parameter gradient, before and after swap, on the reference and the Triton
    path. fp32: within 1e-5. bf16: the logits are the same; the gradients cannot be, as autograd
    rounds each intermediate of the model's norm to bf16 and normzoo's backward rounds once, so
    both are measured against an fp64 run of the same model: normzoo's error is of the model's own
    size (measured: at most 1.4× it, on some tensors smaller)."""
    ids = torch.randint(0, 64, (2, 7))
    exact = _grads(_tiny_hf_model(name, torch.float64), ids)
    for dtype in (torch.float32, torch.bfloat16):
        model = _tiny_hf_model(name, dtype)
        with torch.no_grad():
            before = _logits(model, ids)
        own = _grads(model, ids)
        normzoo.swap(model, backend=backend)
        with torch.no_grad():
            after = _logits(model, ids)
        ours = _grads(model, ids)
        if dtype is torch.float32:
            torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
            for n in own:
                torch.testing.assert_close(ours[n], own[n], rtol=1e-5, atol=1e-5, msg=n)
        else:
            # The kernels sum x² in another order than torch: an fp32 ulp of rstd may flip a rounding.
            torch.testing.assert_close(after, before, rtol=0 if backend == "torch" else 2 ** -8, atol=0)
            for n in own:
                scale = exact[n].abs().max()
                own_error = ((own[n] - exact[n]).abs().max() / scale).item()
                our_error = ((ours[n] - exact[n]).abs().max() / scale).item()
                assert our_error <= 2 * own_error + 1e-3, (n, our_error, own_error)


def test_swap_hugging_face_norms_on_the_kernels():
    model = _tiny_hf_model("gemma")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    normzoo.swap(model, backend="triton")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_swap_recognises_copies_of_a_known_class_by_their_code_alone(tmp_path):
    """transformers copies its norm classes into each model; a copy counts only when its code is
    the same (docstrings aside). A class that differs in one token is named in left_alone."""
    pytest.importorskip("transformers")
    import importlib.util

    from transformers.models.llama import modeling_llama

    source = inspect.getsource(modeling_llama.LlamaRMSNorm).replace("LlamaRMSNorm", "MineRMSNorm")
    changed = source.replace("MineRMSNorm", "OtherRMSNorm").replace("hidden_states.to(input_dtype)", "hidden_states")
    assert changed.count("OtherRMSNorm") and changed != source.replace("MineRMSNorm", "OtherRMSNorm")
    header = "import torch\nfrom torch import nn\nuse_kernel_forward_from_hub = lambda name: (lambda cls: cls)\n\n"
    path = tmp_path / "modeling_mine.py"
    path.write_text(header + source + "\n\n" + changed)
    spec = importlib.util.spec_from_file_location("transformers.models.mine.modeling_mine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    model = torch.nn.Sequential(module.MineRMSNorm(8), module.OtherRMSNorm(8))
    report = normzoo.swap(model)
    assert report == {"transformers.MineRMSNorm -> normzoo.RMSNorm": 1}
    assert list(report.left_alone) == ["1: transformers.OtherRMSNorm (no exact normzoo equivalent known)"]
    assert model[0].x_hat_dtype == "input" and model[0].eps == 1e-6
