"""Issue 13: a swapped model trains under DistributedDataParallel, FSDP2 (``fully_shard``) and
sequence-parallel tensor parallelism with the losses of the unswapped model.

Two CPU processes (backend gloo) each run this file as a script (``python test_distributed.py``
with ``RANK`` / ``WORLD_SIZE`` set, as torchrun would) and rendezvous through a file, so there is
no port to pick. They train every combination of

- model: a small pre-norm transformer with ``nn.LayerNorm`` (with and without bias) and
  ``nn.RMSNorm`` (torch's default eps and an explicit one, per-head q/k norms), and GPT-2 built
  from a tiny config;
- wrapper: ``DistributedDataParallel``, or FSDP2 ``fully_shard`` on each block, on the final norm
  by itself and on the root;
- norms: PyTorch's (the baseline), ``normzoo.swap(model, backend="torch")`` (the reference, which
  ``"auto"`` runs on CPU) and ``backend="triton"`` (the kernels, in Triton's interpreter:
  ``TRITON_INTERPRET=1`` is set for the children before they import anything);

for a few SGD steps, each rank on its own shard of the data, and then a block whose norms get
DTensor inputs and parameters (``parallelize_module`` with ``SequenceParallel``). Each rank
writes what it saw to a JSON file; the tests below read them. The processes run once for the
whole module (~20-30 s on 2 cores, most of it Triton's interpreter).
"""

import json
import os
import subprocess
import sys
import time
import traceback

import pytest

torch = pytest.importorskip("torch")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("this torch has no gloo backend", allow_module_level=True)

# Every test reads the one module fixture `runs` (two processes, ~20-30 s): under pytest-xdist
# (`--dist loadgroup`) they are one group, so one worker starts them once.
pytestmark = pytest.mark.xdist_group("distributed")

WORLD_SIZE = 2
STEPS = 6
LR = 0.5
MODELS = ("tiny", "gpt2")
WRAPPERS = ("ddp", "fsdp2")
VARIANTS = ("unswapped", "torch", "triton")
# fp32 throughout. The swapped layers compute the same math as PyTorch's, but not bitwise the same
# (other reduction orders for the mean, the variance and the bias gradient), so each norm's outputs
# differ from torch's by an ulp or so (fp32 eps = 1.2e-7). Six SGD steps carry that into the
# weights without amplifying it much: measured, the losses agree to 1.2e-7 relative (one ulp of a
# loss near 4) and the weights to 2.6e-6 of each tensor's largest |w| (norm biases, whose
# gradients are sums over all rows). Something wrong moves them far more: with the swapped
# LayerNorms' eps 10% too large (1.1e-5), the losses move by 3e-5 and the weights by 4e-3; with the
# RMSNorms' eps doubled, the weights by 1e-4 (the norms see activations of variance ~1e-3 here, as in
# a real model, so eps counts).
LOSS_RTOL = 1e-6
PARAM_RTOL = 1e-5
TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------------
# What each rank runs (only in the child processes)
# ------------------------------------------------------------------------------------------------


def _tiny_transformer(vocab: int, dim: int, heads: int, layers: int, seq: int):
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = heads
            self.attn_norm = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)  # per-head q/k norms (Qwen3, OLMo 2)
            self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
            self.proj = nn.Linear(dim, dim)
            self.mlp_norm = nn.RMSNorm(dim)  # eps=None: torch's default, fp32 machine epsilon
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, -1).transpose(1, 3).unbind(2)
            a = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, -1))
            return x + self.mlp(self.mlp_norm(x))

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = nn.LayerNorm(dim, bias=False)
            self.head = nn.Linear(dim, vocab)
            # GPT-2's initialisation: the norms see small activations, as in a real model, so that
            # their eps matters to the numbers and a wrong one shows.
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)

        def forward(self, tokens):
            x = self.tok(tokens) + self.pos[: tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    return TinyLM()


def _build(name: str, vocab: int, seq: int):
    """``(model, blocks_path, final_norm_path)``, the same weights on every rank (seeded). Paths,
    not modules: ``swap`` replaces the final norm."""
    torch.manual_seed(0)
    if name == "tiny":
        return _tiny_transformer(vocab, dim=32, heads=2, layers=2, seq=seq), "blocks", "norm"
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config), "transformer.h", "transformer.ln_f"


def _batches(vocab: int, seq: int, batch: int):
    """(STEPS, WORLD_SIZE, batch, seq + 1) tokens; rank r trains on [:, r]. Each sequence follows a
    fixed random successor table from a random start, so there is something to learn."""
    g = torch.Generator().manual_seed(1234)
    successor = torch.randperm(vocab, generator=g)
    tokens = torch.empty(STEPS, WORLD_SIZE, batch, seq + 1, dtype=torch.long)
    tokens[..., 0] = torch.randint(vocab, (STEPS, WORLD_SIZE, batch), generator=g)
    for i in range(seq):
        tokens[..., i + 1] = successor[tokens[..., i]]
    return tokens


def _record_what_norms_get(model, seen: set) -> None:
    """Each norm layer, as it runs, adds ``"<class>[ (FSDP unit)]: input <type>, weight <type>"``
    to ``seen``. Call it after wrapping: the wrappers' own hooks run first (FSDP2 prepends its
    pre-forward hook anyway), so this is what the layer gets."""
    from torch.distributed.tensor import DTensor

    def hook(module, args):
        cls = next(c for c in type(module).__mro__ if c.__module__.startswith(("torch.nn.", "normzoo.")))
        unit = " (FSDP unit)" if type(module).__name__.startswith("FSDP") else ""
        weight = module._parameters["weight"]
        kind = ("DTensor" if isinstance(weight, DTensor) else "Tensor") + (
            " Parameter" if isinstance(weight, torch.nn.Parameter) else "")
        seen.add(f"{cls.__module__.split('.')[0]}.{cls.__name__}{unit}: input {type(args[0]).__name__}, weight {kind}")

    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            module.register_forward_pre_hook(hook)


def _train(model_name: str, wrapper: str, variant: str, rank: int) -> tuple[dict, dict]:
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    import normzoo

    vocab, seq, batch = 64, 8, 4
    model, blocks_path, final_norm_path = _build(model_name, vocab, seq)
    result = {}
    if variant != "unswapped":  # before wrapping: see the README
        result["swapped"] = dict(normzoo.swap(model, backend=variant))
    core = model
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for block in core.get_submodule(blocks_path):
            fully_shard(block, mesh=mesh)
        fully_shard(core.get_submodule(final_norm_path), mesh=mesh)  # a norm as an FSDP unit of its own
        fully_shard(model, mesh=mesh)
    seen = set()
    _record_what_norms_get(core, seen)

    # Plain SGD, not Adam: Adam's first steps are sign-like (m / sqrt(v) = ±1), so a gradient that is
    # tiny or zero in exact arithmetic gets a full-size update from its rounding noise. Measured with
    # AdamW(lr=1e-2): swapped and unswapped weights part by ~1e-3 of their size in four steps.
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = _batches(vocab, seq, batch)[:, rank]
    losses = []
    for step in range(STEPS):
        tokens = data[step]
        logits = model(tokens[:, :-1])
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    result["losses"] = losses
    result["seen"] = sorted(seen)
    params = {name.removeprefix("module."): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for name, p in model.named_parameters()}
    return result, params


def _train_sequence_parallel(variant: str, rank: int) -> tuple[dict, dict]:
    """Megatron-style tensor parallelism of an MLP block with sequence parallelism around it
    (torch's ``SequenceParallel`` style on the norms): each rank holds a slice of the tokens, the
    norms get DTensor inputs sharded on the sequence dim, Shard(1), and replicated DTensor weights."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    import normzoo

    class Block(nn.Module):
        def __init__(self, dim=16):
            super().__init__()
            self.ln, self.rms = nn.LayerNorm(dim), nn.RMSNorm(dim)
            self.up1, self.down1 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
            self.up2, self.down2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

        def forward(self, x):
            x = x + self.down1(torch.relu(self.up1(self.ln(x))))
            return x + self.down2(torch.relu(self.up2(self.rms(x))))

    torch.manual_seed(0)
    model = Block()
    result = {}
    if variant != "unswapped":
        result["swapped"] = dict(normzoo.swap(model, backend=variant))
    plan = {"ln": SequenceParallel(), "rms": SequenceParallel()}
    for i in (1, 2):
        plan[f"up{i}"] = ColwiseParallel(input_layouts=Shard(1))
        plan[f"down{i}"] = RowwiseParallel(output_layouts=Shard(1))
    parallelize_module(model, init_device_mesh("cpu", (WORLD_SIZE,)), plan)
    seen = set()
    _record_what_norms_get(model, seen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # One batch, the same on every rank (tensor parallel ranks share it); each rank holds its tokens.
    x = torch.randn(2, 4 * WORLD_SIZE, 16, generator=torch.Generator().manual_seed(5)).chunk(WORLD_SIZE, dim=1)[rank]
    losses = []
    for _ in range(STEPS):
        with CommDebugMode() as comm:
            loss = model(x).square().mean()  # this rank's tokens in, its tokens out
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(loss.item())
    collectives = {str(op).rsplit(".", 1)[-1]: n for op, n in comm.get_comm_counts().items()}
    result.update(losses=losses, seen=sorted(seen), collectives_per_forward_backward=collectives)
    params = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for name, p in model.named_parameters()}
    return result, params


def _train_stack(variant: str, rank: int) -> tuple[dict, dict]:
    """A Peri-LN ``normzoo.ResidualStack`` (every residual add in a fused op, which reads its norms'
    parameters and never calls them) under FSDP2 as its docs say: each sublayer an FSDP unit, the
    norms in the root's. ``variant``: the norms' backend; ``"unswapped"`` is the baseline, the same
    stack on the reference under DDP. A stack whose final norm is a unit of its own is refused,
    and ``result["own_unit"]`` holds the message."""
    from torch import nn
    from torch.distributed.tensor import DTensor

    import normzoo

    dim = 16

    def make():
        torch.manual_seed(0)
        layers = [[nn.Linear(dim, dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))]
                  for _ in range(2)]
        return normzoo.ResidualStack(layers, dim, placement="peri", backend="torch" if variant == "unswapped" else variant)

    stack, result = make(), {}
    if variant == "unswapped":
        model = torch.nn.parallel.DistributedDataParallel(stack)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        alone = make()
        fully_shard(alone.final_norm, mesh=mesh)
        fully_shard(alone, mesh=mesh)
        try:
            alone(torch.randn(2, dim))
            result["own_unit"] = "ran"
        except ValueError as error:
            result["own_unit"] = str(error)
        for layer in stack.layers:
            for sublayer in layer:
                fully_shard(sublayer, mesh=mesh)
        model = fully_shard(stack, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(7)
    x, target = torch.randn(2, STEPS, WORLD_SIZE, 4, dim, generator=g)[:, :, rank]
    losses = []
    for step in range(STEPS):
        loss = (model(x[step]) - target[step]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    result["losses"] = losses
    params = {name.removeprefix("module."): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for name, p in model.named_parameters()}
    return result, params


def _all_gather_max_diff(params: dict) -> float:
    """Largest difference of any parameter between this rank and the others (DDP keeps replicas
    identical; a DTensor's full_tensor() must be the same on every rank)."""
    import torch.distributed as dist

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, flat)
    return max((g - flat).abs().max().item() for g in gathered)


def _worker() -> None:
    import datetime

    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)  # two processes on two cores
    # A collective waits up to 240 s for the other rank (the whole run has TIMEOUT_S). With 60 s, a
    # run on a machine loaded by other test processes aborted once inside DDP's backward (SIGABRT,
    # not reproduced since): a timed-out collective on gloo's own thread can end that way.
    dist.init_process_group("gloo", init_method=os.environ["NORMZOO_TEST_INIT"], rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=240))
    cases = [(f"{m}/{w}", lambda v, m=m, w=w: _train(m, w, v, rank)) for m in MODELS for w in WRAPPERS]
    cases.append(("sequence_parallel", lambda v: _train_sequence_parallel(v, rank)))
    cases.append(("stack/fsdp2", lambda v: _train_stack(v, rank)))
    results = {}
    try:
        for prefix, train in cases:
            baseline = None
            for variant in VARIANTS:
                start = time.perf_counter()
                try:
                    result, params = train(variant)
                    result["rank_max_diff"] = _all_gather_max_diff(params)
                    if baseline is None:
                        baseline = params
                    else:  # each tensor against the unswapped run's, relative to its largest |w|
                        result["param_rel_diff"] = {
                            name: ((p - baseline[name]).abs().max() / baseline[name].abs().max()).item()
                            for name, p in params.items()}
                except Exception:
                    result = {"error": traceback.format_exc()}
                result["seconds"] = round(time.perf_counter() - start, 2)
                results[f"{prefix}/{variant}"] = result
    finally:
        with open(os.path.join(os.environ["NORMZOO_TEST_OUT"], f"rank{rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# The tests (in the pytest process)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs[rank]["<model>/<wrapper>/<variant>"]``: what each rank recorded."""
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "WORLD_SIZE": str(WORLD_SIZE), "NORMZOO_TEST_OUT": str(out),
           "NORMZOO_TEST_INIT": (out / "rendezvous").as_uri(),
           # Set before the children import Triton: the kernels run in its CPU interpreter.
           "TRITON_INTERPRET": "1", "NORMZOO_POISON": "1", "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    procs = [subprocess.Popen([sys.executable, __file__], env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(WORLD_SIZE)]
    logs = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        pytest.fail(f"the {WORLD_SIZE} training processes took more than {TIMEOUT_S} s")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        if proc.returncode != 0 or not (out / f"rank{rank}.json").exists():
            pytest.fail(f"rank {rank} exited with {proc.returncode}:\n{log[-5000:]}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def _result(runs, key: str, rank: int) -> dict:
    result = runs[rank][key]
    if "error" in result:
        pytest.fail(f"{key} failed on rank {rank}:\n{result['error']}")
    return result


def _check_same_training(runs, prefix: str, backend: str, expected_swaps: dict) -> None:
    for rank in range(WORLD_SIZE):
        base = _result(runs, f"{prefix}/unswapped", rank)
        swapped = _result(runs, f"{prefix}/{backend}", rank)
        assert swapped["swapped"] == expected_swaps
        assert all(s.startswith("normzoo.") for s in swapped["seen"]), swapped["seen"]
        # Every step's loss on this rank's data, and every weight after the last step.
        for step, (got, want) in enumerate(zip(swapped["losses"], base["losses"])):
            assert abs(got - want) <= LOSS_RTOL * abs(want), (
                f"rank {rank}, step {step}: loss {got!r} swapped, {want!r} unswapped")
        name, diff = max(swapped["param_rel_diff"].items(), key=lambda kv: kv[1])
        assert diff <= PARAM_RTOL, f"rank {rank}: {name} differs by {diff:.2e} of its largest |w|"
        # The replicas (or the shards' gathered weights) agree, and training lowered the loss.
        assert swapped["rank_max_diff"] == 0.0
        assert swapped["losses"][-1] < swapped["losses"][0]
    # Each rank trained on its own data.
    assert runs[0][f"{prefix}/{backend}"]["losses"] != runs[1][f"{prefix}/{backend}"]["losses"]


EXPECTED_SWAPS = {
    "tiny": {"torch.LayerNorm -> normzoo.LayerNorm": 3, "torch.RMSNorm -> normzoo.RMSNorm": 6},
    "gpt2": {"torch.LayerNorm -> normzoo.LayerNorm": 5},
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("model", MODELS)
def test_swapped_model_trains_with_the_losses_of_the_unswapped_one(runs, model, wrapper, backend):
    if model == "gpt2":
        pytest.importorskip("transformers")
    _check_same_training(runs, f"{model}/{wrapper}", backend, EXPECTED_SWAPS[model])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_what_the_norm_layers_are_handed(runs, wrapper, backend):
    """DDP hands the layers the model's own parameters. FSDP2 puts a plain unsharded parameter in
    place of the sharded DTensor before each forward (and backward), also when the norm is an FSDP
    unit of its own, so normzoo's layers, kernels included, never see a DTensor under FSDP2."""
    seen = _result(runs, f"tiny/{wrapper}/{backend}", 0)["seen"]
    handed = "input Tensor, weight Tensor Parameter"
    expected = {f"normzoo.LayerNorm: {handed}", f"normzoo.RMSNorm: {handed}"}
    if wrapper == "fsdp2":
        expected.add(f"normzoo.LayerNorm (FSDP unit): {handed}")
    assert set(seen) == expected


SEQUENCE_PARALLEL_SWAPS = {"torch.LayerNorm -> normzoo.LayerNorm": 1, "torch.RMSNorm -> normzoo.RMSNorm": 1}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sequence_parallel_dtensor_norms(runs, backend):
    """Under tensor parallelism the norms get DTensors (input Shard(1), weight Replicate). normzoo
    runs the op on each rank's local rows (no gather: a row is whole on its rank) and returns a
    DTensor of the input's placements; the weight's gradient is a partial sum. On the reference
    and on the kernels it trains like torch's layers."""
    seen = _result(runs, f"sequence_parallel/{backend}", 0)["seen"]
    assert seen == ["normzoo.LayerNorm: input DTensor, weight DTensor Parameter",
                    "normzoo.RMSNorm: input DTensor, weight DTensor Parameter"]
    _check_same_training(runs, "sequence_parallel", backend, SEQUENCE_PARALLEL_SWAPS)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_residual_stack_under_fsdp2(runs, backend):
    """A ResidualStack with its sublayers sharded and its norms in the root's unit trains as the
    same stack under DDP on the reference; a norm sharded on its own is refused, naming the fix."""
    for rank in range(WORLD_SIZE):
        base = _result(runs, "stack/fsdp2/unswapped", rank)
        got = _result(runs, f"stack/fsdp2/{backend}", rank)
        for step, (loss, want) in enumerate(zip(got["losses"], base["losses"])):
            assert abs(loss - want) <= LOSS_RTOL * abs(want), f"rank {rank}, step {step}: {loss!r} vs {want!r}"
        name, diff = max(got["param_rel_diff"].items(), key=lambda kv: kv[1])
        assert diff <= PARAM_RTOL, f"rank {rank}: {name} differs by {diff:.2e} of its largest |w|"
        assert got["rank_max_diff"] == 0.0 and got["losses"][-1] < got["losses"][0]
        assert "is an FSDP unit of its own" in got["own_unit"], got["own_unit"]
    assert runs[0][f"stack/fsdp2/{backend}"]["losses"] != runs[1][f"stack/fsdp2/{backend}"]["losses"]


if __name__ == "__main__":
    _worker()
