import copy

import pytest
import torch

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


def test_swap_twice_changes_nothing_the_second_time_and_says_so():
    model = tiny_model()
    normzoo.swap(model)
    with pytest.warns(UserWarning, match="replaced nothing in Sequential"):
        report = normzoo.swap(model)
    assert report == {} and report.left_alone == {}


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


def test_swap_refuses_a_bare_norm():
    with pytest.raises(ValueError, match="the model itself is a norm"):
        normzoo.swap(torch.nn.LayerNorm(4))


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
    assert type(model[1]) is torch.nn.LayerNorm and type(model[2]) is torch.nn.RMSNorm
    assert model[1].weight is originals[0] and model[2].weight is originals[1] and model[1].bias is None
    assert model[2].eps == 1e-6
    torch.testing.assert_close(model(x), before)
    assert calls == [1]
    dyt = torch.nn.Sequential(torch.nn.Linear(4, 4), normzoo.DyT(4))
    assert list(normzoo.unswap(dyt).left_alone) == ["1: normzoo.DyT (no PyTorch class to go back to)"]


# ---------------------------------------------------------------- Hugging Face models, built from configs


def _tiny_hf_model(name, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {"gemma": ("GemmaConfig", "GemmaForCausalLM"), "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
                             "llama": ("LlamaConfig", "LlamaForCausalLM")}[name]
    config = getattr(transformers, config_cls)(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                               eos_token_id=0, bos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(dtype).eval()
    with torch.no_grad():  # norm weights away from their initial values, so the offset matters
        for name_, p in model.named_parameters():
            if "norm" in name_:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, count", [("gemma", 5), ("olmo2", 9)])
def test_swap_hugging_face_norms_whose_math_normzoo_reproduces(name, count, dtype):
    """Gemma's (1 + w) RMSNorm and OLMo 2's (w · x̂ in fp32, one rounding, its q/k norms included):
    replaced, outputs unchanged in fp32 and bf16 (the same math, rounded at the same point), and
    unswap gives the model's own classes back with the same parameters."""
    model = _tiny_hf_model(name, dtype)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    original_class = type(model.model.norm)
    weight = model.model.norm.weight
    report = normzoo.swap(model)
    assert sum(report.values()) == count and not report.left_alone
    assert type(model.model.norm) is normzoo.RMSNorm and model.model.norm.weight is weight
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # the reference path: the very same ops
    assert sum(normzoo.unswap(model).values()) == count
    assert type(model.model.norm) is original_class and model.model.norm.weight is weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_swap_hugging_face_norms_on_the_kernels():
    model = _tiny_hf_model("gemma")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    normzoo.swap(model, backend="triton")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_swap_names_hugging_face_norms_it_cannot_reproduce():
    model = _tiny_hf_model("llama")
    with pytest.warns(UserWarning, match="replaced nothing in LlamaForCausalLM"):
        report = normzoo.swap(model)
    assert len(report.left_alone) == 5
    assert all("LlamaRMSNorm (rounds x̂ to the input dtype before the weight" in k for k in report.left_alone)
