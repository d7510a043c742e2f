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
