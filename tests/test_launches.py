"""Launches and torch ops per call, on the Triton path: a forward is one kernel launch, a backward
at most two (the kernel and the deterministic partial-sum reduce), and no torch op around them
computes anything (no sum, cast, zeros or copy: only allocations and views). Issue 11's rule.
A backward whose rows one program owns (under 32 rows) is the kernel alone: it writes the
parameter gradients itself.

Launches are counted by wrapping Triton's launch entry point; torch ops by a dispatch mode that
sees every aten call. Under the interpreter the kernels are not run (only counted): the count is
what matters here, and the other tests check the values.
"""

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normzoo
from helpers import run_python
from normzoo.kernels import launch

# What a launcher may ask of torch: output buffers, and views of its input and outputs.
NON_COMPUTE_OPS = {"aten.empty.memory_format", "aten.new_empty.default", "aten.empty_like.default", "aten.empty_strided.default",
                   "aten.view.default", "aten._unsafe_view.default", "aten.alias.default",
                   "aten.detach.default"}  # detach: autograd saving an output for backward (an alias)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    """The names of the Triton kernels launched, in order."""
    names = []
    if torch.cuda.is_available():
        from triton.runtime.jit import JITFunction

        run = JITFunction.run

        def counting_run(self, *args, **kwargs):
            names.append(self.fn.__name__)
            return run(self, *args, **kwargs)

        monkeypatch.setattr(JITFunction, "run", counting_run)
    else:
        from triton.runtime.interpreter import InterpretedFunction

        monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: names.append(self.fn.__name__))
    # NaN-filled outputs are a fill op: off for the count. alloc_grad was chosen from POISON at
    # import, and the launchers import it by name: each module's name is set back to empty_like.
    monkeypatch.setattr(launch, "POISON", False)
    for name, module in list(sys.modules.items()):  # by key: no attribute read on other modules' entries
        if name.startswith("normzoo.kernels.") and hasattr(module, "alloc_grad"):
            monkeypatch.setattr(module, "alloc_grad", torch.empty_like)
    return names


LAYERS = {
    "layernorm": lambda d: normzoo.LayerNorm(64, backend="triton", device=d),
    "layernorm-fp32-params-bf16": lambda d: normzoo.LayerNorm(64, backend="triton", device=d),
    "rmsnorm": lambda d: normzoo.RMSNorm(64, backend="triton", device=d),
    "dyt": lambda d: normzoo.DyT(64, backend="triton", device=d),
    "derf": lambda d: normzoo.Derf(64, backend="triton", device=d),
    "dyt-channels-first": lambda d: normzoo.DyT(8, channels_last=False, backend="triton", device=d),
}


def backward_launches_ok(launches, kernels: int, reduce: bool) -> bool:
    """``kernels`` backward kernels, each followed by its reduce when ``reduce``."""
    expected = [name for name in launches if name != "_sum_partials_kernel"][:kernels]
    if reduce:
        expected = [name for kernel in expected for name in (kernel, "_sum_partials_kernel")]
    return len(expected) == kernels * (2 if reduce else 1) and launches == expected


# Many rows: 512, several programs whatever a tuned table's row block (up to 256 rows); few: 8,
# one program whatever the table (a program takes at least 16 rows, heuristics.MIN_ROWS_PER_PROGRAM).
@pytest.mark.parametrize("rows", ["512-rows", "8-rows"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_one_launch_forward_at_most_two_backward_no_torch_compute(name, rows, launches, device):
    layer = LAYERS[name](device)
    few = rows == "8-rows"  # one program: the backward kernel writes dw/db itself (channels-first: one image)
    if name.endswith("channels-first"):
        shape = (1, 8, 4, 4) if few else (2, 8, 5, 5)
    else:
        shape = (2, 4, 64) if few else (2, 64, 4, 64)
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32  # fp32 params, bf16 input
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)

    with _OpLog() as forward_ops:
        y = layer(x)
    assert len(launches) == 1, launches
    launches.clear()
    with _OpLog() as backward_ops:
        grads = torch.autograd.grad(y, [x, *layer.parameters()], dy)
    assert backward_launches_ok(launches, 1, reduce=not few), launches
    for when, ops in (("forward", forward_ops.ops), ("backward", backward_ops.ops)):
        compute = [op for op in ops if op not in NON_COMPUTE_OPS]
        assert not compute, f"{when} ran torch ops besides the kernels: {compute}"
    # Each gradient comes back in its own tensor's dtype, straight from the kernels.
    assert [g.dtype for g in grads] == [t.dtype for t in (x, *layer.parameters())]


@pytest.mark.parametrize("rows", [512, 16])
@pytest.mark.parametrize("kind", ["layernorm", "dyt"])
@pytest.mark.parametrize("mode, norms", [("add_norm", 1), ("norm_add", 1), ("norm_add_norm", 2)])
@pytest.mark.parametrize("residual_fp32", [False, True], ids=["bf16-stream", "fp32-stream"])
def test_fused_residual_ops(kind, mode, norms, residual_fp32, rows, launches, device):
    """One launch forward; backward one kernel (both norms' gradients in one pass for norm_add_norm,
    whose rows of 64 are one tile) with its reduce unless one program owns the rows (16 rows); no
    torch compute around."""
    from normzoo import fused

    make = {"layernorm": normzoo.LayerNorm, "dyt": normzoo.DyT}[kind]
    layers = [make(64, backend="triton", device=device) for _ in range(norms)]
    # Outputs of earlier ops, as in a model (for leaf inputs the backward copies the one gradient
    # tensor it would otherwise hand to both, tests/test_fused.py::test_leaf_gradients_...).
    x = torch.randn(2, rows // 2, 64, device=device, dtype=torch.float32 if residual_fp32 else torch.bfloat16,
                    requires_grad=True) * 1
    h = torch.randn(2, rows // 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True) * 1
    with _OpLog() as forward_ops:
        y, s = fused.fused_residual(x, h, *layers, mode=mode)
    assert len(launches) == 1, launches
    launches.clear()
    outputs = [s] if y is None else [y, s]
    params = [p for norm in layers for p in norm.parameters()]
    grads_in = [torch.randn_like(t) for t in outputs]
    with _OpLog() as backward_ops:
        torch.autograd.grad(outputs, [x, h, *params], grads_in)
    assert backward_launches_ok(launches, 1, reduce=rows > 16), launches
    for when, ops in (("forward", forward_ops.ops), ("backward", backward_ops.ops)):
        compute = [op for op in ops if op not in NON_COMPUTE_OPS]
        assert not compute, f"{when} ran torch ops besides the kernels: {compute}"


@pytest.mark.parametrize("kind, width, stream, kernels", [
    ("layernorm", 4112, torch.bfloat16, 2), ("layernorm", 2064, torch.float32, 2),
    ("rmsnorm", 2064, torch.float32, 1), ("rmsnorm", 4112, torch.float32, 2)],
    ids=["bf16-4112", "fp32-2064", "rms-fp32-2064", "rms-fp32-4112"])
def test_norm_add_norm_past_the_fused_single_tile_limit(kind, width, stream, kernels, launches, device):
    """Row-wise rows wider than one fused tile (16-bit 4096; an fp32 stream: LayerNorm 2048,
    RMSNorm 4096): norm_add_norm's backward is two kernels, each with its reduce (the second
    norm's, then the first norm's on dx in fp32); RMSNorm's fp32-stream rows up to 4096, one."""
    from normzoo import fused

    make = {"layernorm": normzoo.LayerNorm, "rmsnorm": normzoo.RMSNorm}[kind]
    layers = [make(width, backend="triton", device=device) for _ in range(2)]
    x = torch.randn(512, width, device=device, dtype=stream, requires_grad=True) * 1
    h = torch.randn(512, width, device=device, dtype=torch.bfloat16, requires_grad=True) * 1
    y, s = fused.fused_residual(x, h, *layers, mode="norm_add_norm")
    launches.clear()
    grads_in = [torch.randn_like(y), torch.randn_like(s)]
    with _OpLog() as backward_ops:
        torch.autograd.grad([y, s], [x, h, *layers[0].parameters(), *layers[1].parameters()], grads_in)
    assert backward_launches_ok(launches, kernels, reduce=True), launches
    assert not [op for op in backward_ops.ops if op not in NON_COMPUTE_OPS]


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("mode", [None, "add_norm", "norm_add", "norm_add_norm"])
def test_no_grad_forward_keeps_no_statistics(kind, mode, grad, monkeypatch, device):
    """Under torch.no_grad() no backward follows: the row-wise forward neither allocates the
    per-row statistics nor passes them (the kernel stores none; STATS and STATS2 are None): it
    allocates its outputs alone. With grad, the same call keeps them."""
    from normzoo import fused
    from normzoo.kernels import rowwise_norm

    launched = []
    if torch.cuda.is_available():
        run = rowwise_norm._norm_fwd_kernel.run
        monkeypatch.setattr(rowwise_norm._norm_fwd_kernel, "run", lambda *a, **k: launched.append(a) or run(*a, **k))
    else:
        monkeypatch.setattr(type(rowwise_norm._norm_fwd_kernel), "run", lambda self, *a, **k: launched.append(a))
    monkeypatch.setattr(launch, "POISON", False)  # NaN fills are an op of their own
    make = {"layernorm": normzoo.LayerNorm, "rmsnorm": normzoo.RMSNorm}[kind]
    layers = [make(64, backend="triton", device=device) for _ in range(2 if mode == "norm_add_norm" else 1)]
    h, x = (torch.randn(2, 8, 64, device=device) for _ in range(2))
    with torch.set_grad_enabled(grad), _OpLog() as ops:
        if mode is None:
            layers[0](h)
        else:
            fused.fused_residual(x, h, *layers, mode=mode)
    (args,) = launched
    stats, stats2 = args[4], args[9]  # _norm_fwd_kernel's STATS and STATS2
    assert (stats is not None) is grad and (stats2 is not None) is (grad and mode == "norm_add_norm")
    if not grad:
        outputs = 1 if mode is None else (1 if mode == "norm_add" else 2)  # y and/or s
        assert len([op for op in ops.ops if "empty" in op]) == outputs, ops.ops


@pytest.mark.parametrize("norm", ["rms", "l2"])
def test_qk_norm_is_one_launch_for_q_and_k(norm, launches, device):
    """q and k, views of one fused projection: one forward launch for both, a backward of one kernel
    and one reduce, no copy of the views and no torch compute around."""
    qk = normzoo.QKNorm(16, norm=norm, scale_init=4.0 if norm == "l2" else None, backend="triton", device=device)
    qkv = torch.randn(2, 8, 3 * 4 * 16, device=device, requires_grad=True) * 1
    q, k, _ = qkv.unflatten(-1, (3, 4, 16)).unbind(-3)
    with _OpLog() as forward_ops:
        qo, ko = qk(q, k)
    assert len(launches) == 1, launches
    launches.clear()
    grads_in = [torch.randn_like(qo), torch.randn_like(ko)]
    with _OpLog() as backward_ops:
        torch.autograd.grad([qo, ko], [q, k, *qk.parameters()], grads_in)
    assert len(launches) == 2 and launches[1] == "_sum_partials_kernel", launches
    for when, ops in (("forward", forward_ops.ops), ("backward", backward_ops.ops)):
        compute = [op for op in ops if op not in NON_COMPUTE_OPS]
        assert not compute, f"{when} ran torch ops besides the kernels: {compute}"


def test_kernels_read_no_global_constexpr():
    """A kernel's switches are its own constexpr parameters (strings compared with literals), not
    module-level ``tl.constexpr`` names: Triton compares each global a kernel read with its value
    at compile time on every launch (``JITFunction.used_global_vals``, through
    ``constexpr.__ne__``: ~8k instructions apiece on the host; the row-wise forward read five).
    Asked of Triton itself, in a process without the interpreter (whose kernels Triton's
    dependency finder cannot walk)."""
    script = (
        "import importlib, pkgutil\n"
        "from triton.runtime.jit import JITFunction\n"
        "import normzoo.kernels as K\n"
        "kernels, found = 0, {}\n"
        "for info in pkgutil.iter_modules(K.__path__):\n"
        "    module = importlib.import_module('normzoo.kernels.' + info.name)\n"
        "    for name, value in vars(module).items():\n"
        "        if isinstance(value, JITFunction) and name.endswith('_kernel') and value.__module__ == module.__name__:\n"
        "            value.cache_key  # walks the kernel and every jit function it calls\n"
        "            kernels += 1\n"
        "            if value.used_global_vals:\n"
        "                found[name] = sorted(n for n, _ in value.used_global_vals)\n"
        "print(kernels, found)\n")
    out = run_python("-c", script).split(maxsplit=1)
    assert int(out[0]) >= 7, out  # the row-wise, point-wise and head-wise kernels and the reduce
    assert out[1].strip() == "{}", f"kernels reading module-level globals: {out[1]}"


def test_forward_launch_calls_stay_on_cpythons_stack():
    """Each forward launch is one call of ``kernel.run`` with at most 25 positional arguments
    beside its three keywords: CPython passes 26 or more through a tuple and a dict built first
    (``CALL_FUNCTION_EX``, ~2-4k instructions a call). Asked of the bytecode: a launcher that adds
    an argument fails here, not in a host benchmark nobody reran."""
    import dis

    from normzoo.kernels import elementwise, rowwise_norm

    for launcher in (rowwise_norm._launch_forward, elementwise._launch_forward):
        ops = {i.opname for i in dis.get_instructions(launcher)}
        assert "CALL_FUNCTION_EX" not in ops, f"{launcher.__module__}: a launch builds its arguments first"


def test_plain_backward_launch_calls_stay_on_cpythons_stack():
    """As the forward's, for the backward launches of the kernels without fused operands (the
    fused kernels' 37 and 39 arguments do go through a tuple). ``_backward`` makes both calls, so
    the plain kernel's call is found in its source and compiled alone."""
    import ast
    import dis
    import inspect
    import textwrap

    from normzoo.kernels import elementwise, rowwise_norm

    for module, kernel in ((rowwise_norm, "_norm_bwd_kernel"), (elementwise, "_pointwise_bwd_kernel")):
        tree = ast.parse(textwrap.dedent(inspect.getsource(module._backward)))
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and node.func.attr == "run" and isinstance(node.func.value, ast.Name) and node.func.value.id == kernel]
        assert len(calls) == 1, f"{module.__name__}: {len(calls)} calls of {kernel}.run"
        code = compile(ast.Expression(calls[0]), module.__file__, "eval")
        ops = {i.opname for i in dis.get_instructions(code)}
        assert "CALL_FUNCTION_EX" not in ops, f"{kernel}: its launch builds its arguments first"
