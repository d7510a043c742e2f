"""swap on timm models, built from configs (pretrained=False: nothing is downloaded), and
normzoo.LayerNorm2d on its own.

timm needs torchvision, which does not install beside the CPU torch of the main test environment:
.ci/run runs this file a second time in a venv of its own that has timm (see the README), with
NORMZOO_TIMM_TESTS=1, under which a missing timm fails instead of skipping. The LayerNorm2d tests
need no timm and run in both environments."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import normzoo


@pytest.fixture(scope="module")
def timm():
    try:
        import timm
    except ImportError as e:
        if os.environ.get("NORMZOO_TIMM_TESTS") == "1":
            pytest.fail(f"NORMZOO_TIMM_TESTS=1 but timm does not import here: {e}")
        pytest.skip(f"timm does not import here ({e}); it needs torchvision, which the main env's CPU torch "
                    "does not install beside: .ci/run runs this file in a venv with timm")
    return timm


# name: (timm model, its create_model arguments, input shape, timm class of its norms, how many, normzoo class)
_MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=10), (2, 3, 32, 32),
            "LayerNorm", 5, normzoo.LayerNorm),
    "convnext": ("convnext_atto", dict(num_classes=10), (2, 3, 32, 32), "LayerNorm2d", 17, normzoo.LayerNorm2d),
    "vit_rmsnorm": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=10,
                                                 norm_layer="rmsnorm"), (2, 3, 32, 32), "RmsNorm", 5, normzoo.RMSNorm),
}


def _model(timm, name, device):
    model_name, kwargs, shape, *_ = _MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, **kwargs).to(device)
    with torch.no_grad():  # norm parameters away from ones and zeros, so that they matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0.5, 0.3)
    return model, torch.randn(shape, device=device)


def _norms(model, cls):
    return [m for m in model.modules() if type(m) is cls]


def _run(model, x, dy):
    model.zero_grad()
    logits = model(x)
    logits.backward(dy)  # a random projection: a gradient parallel to a norm's output would cancel
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(_MODELS))
def test_swapped_timm_models_give_the_same_logits_and_gradients(timm, name, backend, device):
    """fp32 logits and every parameter gradient within 1e-5 of timm's own, on the reference and on
    the Triton path (the interpreter without a GPU); training mode and hooks are kept."""
    model, x = _model(timm, name, device)
    timm_cls = getattr(timm.layers, _MODELS[name][3])
    count, ours = _MODELS[name][4:]
    model.train()  # dropout rates are 0 here: train mode only checks that the mode is kept
    calls = []
    _norms(model, timm_cls)[-1].register_forward_hook(lambda *a: calls.append(1))
    dy = torch.randn(x.shape[0], 10, device=device)
    before, own = _run(model, x, dy)
    report = normzoo.swap(model, backend=backend)
    assert report == {f"timm.{timm_cls.__name__} -> normzoo.{ours.__name__}": count} and not report.left_alone
    assert not _norms(model, timm_cls) and len(_norms(model, ours)) == count
    assert all(m.training and m.backend == backend for m in _norms(model, ours))
    after, swapped = _run(model, x, dy)
    assert calls == [1, 1]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert swapped.keys() == own.keys()
    for n in own:
        torch.testing.assert_close(swapped[n], own[n], rtol=0, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", list(_MODELS))
def test_timm_state_dicts_round_trip_and_unswap_gives_timm_classes_back(timm, name, device):
    model, x = _model(timm, name, device)
    model.eval()
    timm_cls = getattr(timm.layers, _MODELS[name][3])
    originals = _norms(model, timm_cls)
    params = [list(m.parameters()) for m in originals]
    with torch.no_grad():
        before = model(x)
    state = copy.deepcopy(model.state_dict())
    normzoo.swap(model)
    assert model.state_dict().keys() == state.keys()
    for m in _norms(model, _MODELS[name][5]):
        assert not m.training
    # timm's checkpoint into the swapped model, and the swapped model's into a fresh timm model.
    model.load_state_dict(state)
    fresh, _ = _model(timm, name, device)
    fresh.eval().load_state_dict(copy.deepcopy(model.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
        torch.testing.assert_close(fresh(x), before, rtol=0, atol=0)

    report = normzoo.unswap(model)
    assert sum(report.values()) == len(originals) and not report.left_alone
    back = _norms(model, timm_cls)
    assert len(back) == len(originals) and all(a is b for a, b in zip(back, originals))  # the same modules
    for m, ps in zip(back, params):  # with the same parameters
        got = list(m.parameters())
        assert len(got) == len(ps) and all(a is b for a, b in zip(got, ps))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("to", ["dyt", "derf"])
@pytest.mark.parametrize("name", list(_MODELS))
def test_timm_norms_convert_to_dyt_in_one_step(timm, name, to):
    # to="dyt"/"derf" converts timm's own norm classes directly (ConvNeXt's channels-first
    # LayerNorm2d into a channels-first layer), as it converts torch's: every norm, and the model runs.
    model, x = _model(timm, name, "cpu")
    _, _, _, timm_class, count, _ = _MODELS[name]
    target = normzoo.DyT if to == "dyt" else normzoo.Derf
    report = normzoo.swap(model, to=to)
    assert report == {f"timm.{timm_class} -> normzoo.{target.__name__}": count} and not report.left_alone
    layers = _norms(model, target)
    assert len(layers) == count and all(m.channels_last == (name != "convnext") for m in layers)
    assert model(x).shape == (2, 10)


def test_timm_norms_swap_does_not_reproduce_are_named_with_why(timm):
    L = timm.layers
    try:
        L.set_fast_norm(True)
        fast = L.LayerNorm(8)
    finally:
        L.set_fast_norm(False)
    model = torch.nn.Sequential(L.LayerNorm(8), fast, L.LayerNormFp32(8), L.RmsNormFp32(8), L.SimpleNorm(8),
                                L.LayerNormAct(8), L.RmsNormAct(8))
    conv = torch.nn.Sequential(L.LayerNorm2d(8), L.RmsNorm2d(8), L.GroupNorm1(8), L.GroupNorm(8, num_groups=2),
                               L.LayerNormAct2d(8))
    report = normzoo.swap(model)
    assert report == {"timm.LayerNorm -> normzoo.LayerNorm": 1}
    assert sorted(report.left_alone) == sorted([
        "1: timm.LayerNorm (timm fast_norm on: apex's kernel, or the autocast dtype under autocast)",
        "2: timm.LayerNormFp32 (computes on fp32 copies of input and parameters and casts back; not verified "
        "against normzoo)",
        "3: timm.RmsNormFp32 (computes on fp32 copies of input and parameters and casts back; not verified "
        "against normzoo)",
        "4: timm.SimpleNorm (x / sqrt(unbiased variance + eps), not centred: no normzoo equivalent)",
        "5: timm.LayerNormAct (a norm, an activation and dropout in one module: no normzoo equivalent)",
        "6: timm.RmsNormAct (a norm, an activation and dropout in one module: no normzoo equivalent)"])
    assert type(model[1]) is L.LayerNorm and type(model[2]) is L.LayerNormFp32
    report = normzoo.swap(conv)
    assert report == {"timm.LayerNorm2d -> normzoo.LayerNorm2d": 1}
    assert [k.split(" (")[0] for k in sorted(report.left_alone)] == [
        "1: timm.RmsNorm2d", "2: timm.GroupNorm1", "3: timm.GroupNorm", "4: timm.LayerNormAct2d"]
    # A timm model whose norms are all left alone: swap says so.
    rms_convnext = timm.create_model("convnext_atto", pretrained=False, norm_layer="rmsnorm", conv_mlp=True)
    with pytest.warns(UserWarning, match="replaced nothing in ConvNeXt"):
        report = normzoo.swap(rms_convnext)
    assert sum(report.left_alone.values()) == 17 and all("RmsNorm2d" in k for k in report.left_alone)


# ---------------------------------------------------------------- normzoo.LayerNorm2d, no timm needed


def _timm_like_layer_norm_2d(x, weight, bias, eps):
    """What timm's LayerNorm2d computes (read in timm/layers/norm.py; written here from that reading)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), weight.shape, weight, bias, eps).permute(0, 3, 1, 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_layer_norm_2d_normalizes_over_channels(backend, channels_last, device):
    norm = normzoo.LayerNorm2d(6, eps=1e-6, backend=backend).to(device)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    x = torch.randn(2, 6, 5, 3, device=device) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    w_ref, b_ref = (p.detach().clone().requires_grad_() for p in (norm.weight, norm.bias))
    y, y_ref = norm(x), _timm_like_layer_norm_2d(x_ref, w_ref, b_ref, 1e-6)
    assert y.shape == x.shape and y.stride() == y_ref.stride()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in ((x.grad, x_ref.grad), (norm.weight.grad, w_ref.grad), (norm.bias.grad, b_ref.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layer_norm_2d_refuses_what_it_cannot_normalize_and_converts_to_channels_first_dyt():
    with pytest.raises(ValueError, match="one int C"):
        normzoo.LayerNorm2d((4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        normzoo.LayerNorm2d(4)(torch.randn(2, 4, 4))
    assert isinstance(normzoo.LayerNorm2d(4), (normzoo.LayerNorm, torch.nn.LayerNorm))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), normzoo.LayerNorm2d(4, bias=False))
    assert list(normzoo.unswap(model).left_alone) == ["1: normzoo.LayerNorm2d (no PyTorch class to go back to)"]
    with pytest.warns(UserWarning, match="replaced nothing"):
        assert normzoo.swap(model) == {}  # already ours
    assert normzoo.swap(model, to="dyt") == {"normzoo.LayerNorm2d -> normzoo.DyT": 1}
    assert not model[1].channels_last and model[1].bias is None
    assert model(torch.randn(2, 3, 5, 5)).shape == (2, 4, 5, 5)
