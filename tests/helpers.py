"""The tolerance table every test uses (mirrored in the README's "Accuracy" section, which
tests/test_docs.py keeps in sync) and the comparison built on it.

The rule (flash-attention's): a result's error against a float64 reference must be at most
RTOL[dtype] plus twice the error of PyTorch's own implementation at the same precision (``peer``),
where a peer exists. The second term covers ill-conditioned cases (a row with mean 1e4, a
one-element RMSNorm) where no fp32 algorithm does better than the conditioning allows; on
well-conditioned inputs it is small and the table decides.
"""

import math

import torch

# Relative error ‖got − ref‖ / (‖ref‖ + RTOL·√numel) allowed against a float64 reference, by the
# dtype of the tensor being checked (outputs and gradients alike). The √numel floor judges
# near-zero references absolutely.
RTOL = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def rel_error(got: torch.Tensor, ref: torch.Tensor, rtol: float, scale: float = 0.0) -> float:
    got, ref = got.double(), ref.double()
    floor = rtol * math.sqrt(max(ref.numel(), 1))
    return ((got - ref).norm() / (max(ref.norm().item(), scale) + floor)).item()


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str = "", dtype: torch.dtype | None = None,
                 peer: torch.Tensor | None = None, scale: float = 0.0):
    """``scale``: for a sum whose terms cancel, judge it against Σ|terms| (the size its rounding
    errors scale with) rather than against the small result."""
    dtype = dtype or got.dtype
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert not got.isnan().any() or ref.isnan().any(), f"{what}: NaN where the reference has none"
    rtol = RTOL[dtype]
    allowed = rtol if peer is None else rtol + 2 * rel_error(peer, ref, rtol, scale)
    err = rel_error(got, ref, rtol, scale)
    assert err <= allowed, f"{what}: relative error {err:.3g} > {allowed:.3g} ({dtype}, table {rtol:g})"


def assert_compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor, compiler: str) -> None:
    """torch.compile(fullgraph=True) gives the eager output and the same gradients for x and every
    parameter (a graph break would raise under fullgraph)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = x.detach().requires_grad_()
    y = compiled(x)
    y.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    y_eager = model(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, p in zip(grads, [x] + list(model.parameters())):
        torch.testing.assert_close(g, p.grad)
