"""LORS stacks under DDP and FSDP2: two CPU processes (gloo) against one process on the whole batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import lors_kernels as lk

WORLD = 2
BATCH = 8  # rows per step; each rank takes BATCH // WORLD of them

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


class Block(nn.Module):
    def __init__(self, fc1, fc2):
        super().__init__()
        self.norm = nn.LayerNorm(12)
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    """Three blocks whose fc1 layers share one weight and whose fc2 layers share another."""

    def __init__(self, checkpointed=False):
        super().__init__()
        torch.manual_seed(0)
        fc1, fc2 = lk.make_lors_stack(3, 12, 20, rank=2), lk.make_lors_stack(3, 20, 12, rank=3)
        for layer in (*fc1, *fc2):
            nn.init.normal_(layer.up, std=0.2)  # a nonzero private path, so every gradient is nonzero
        self.blocks = nn.ModuleList(Block(a, b) for a, b in zip(fc1, fc2))
        self.head = nn.Linear(12, 3)
        self.checkpointed = checkpointed

    def forward(self, x, skip=None):
        for i, block in enumerate(self.blocks):
            if i == skip:
                continue
            if self.checkpointed:
                x = checkpoint(block, x, use_reentrant=self.checkpointed == "reentrant")
            else:
                x = block(x)
        return self.head(x)


class MixNet(nn.Module):
    """LORS^A: two stages of LorsAdaptiveMixing (a shared generator, per-stage cores and a LORS^T projection)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mixer = lk.LorsAdaptiveMixing(
            n_stages=2,
            query_dim=8,
            in_dim=8,
            in_points=4,
            out_points=4,
            n_groups=2,
            rank=2,
            kernel_groups=[1, 2],
            out_rank=2,
        )
        for weight in (self.mixer.generator.weight, *(core.weight for core in self.mixer.cores)):
            nn.init.normal_(weight, std=0.1)
        self.head = nn.Linear(8, 3)

    def forward(self, x, skip=None):
        features, query = x[:, :8].repeat(1, 4).view(-1, 1, 2, 4, 4), x[:, None, 4:]
        for stage in range(2):
            query = self.mixer(stage, features, query)
        return self.head(query[:, 0])


class OneLayer(lk.LorsLinear):
    """A model that is one LorsLinear: the whole model is a stack (shard_lors_model must not wrap it twice)."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(12, 3, rank=2)
        nn.init.normal_(self.up, std=0.2)

    def forward(self, x, skip=None):
        return super().forward(x)


class InPlaceNet(Net):
    """Net on [rows, 1, 12] inputs, scaling each fc1 output in place (h.mul_), as code written for
    nn.Linear may: a LorsLinear output is no view for FSDP2 to warn about, and the in-place op is plain."""

    def forward(self, x, skip=None):
        x = x[:, None]
        for block in self.blocks:
            h = block.fc1(block.norm(x))
            h.mul_(0.5)
            x = x + block.fc2(torch.relu(h))
        return self.head(x[:, 0])


MODELS = {"stacks": Net, "blocks": Net, "names": Net, "adaptive": MixNet, "layer": OneLayer, "inplace": InPlaceNet}
UNITS = {"blocks": Block, "names": ["blocks.0", "blocks.1", "blocks.2"]}


def batches(steps=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 12, generator=g) for _ in range(steps)]


def single_process(model, skips):
    """The reference: the same steps on the whole batch in one process (mean loss, SGD)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = None
    for x, skip in zip(batches(), skips):
        model(x, skip=skip).square().mean().backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def run_workers(worker, tmp_path, *args):
    """Spawn WORLD processes; each writes its results to tmp_path / f"{rank}.pt". Bounded in time."""
    ctx = mp.start_processes(worker, args=(str(tmp_path), *args), nprocs=WORLD, join=False, start_method="spawn")
    for _ in range(240):
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("distributed workers did not finish in 240 s")
    return [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]


def init(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank, world_size=WORLD)


def finish(tmp, rank, results):
    torch.save(results, os.path.join(tmp, f"{rank}.pt"))
    dist.barrier()  # no rank leaves while another is still talking
    # Leave without tearing gloo down: its threads, still joinable in a destructor at exit, now and
    # then abort the process ("terminate called without an active exception"; 1 CI run in ~10).
    os._exit(0)


def ddp_worker(rank, tmp, mode):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    init(rank, tmp)
    net = Net(checkpointed=mode if mode in ("reentrant", "non-reentrant") else False)
    model = DDP(net, find_unused_parameters=mode == "skip")
    reduced = []  # elements all-reduced per bucket

    def counting_hook(state, bucket):
        reduced.append(bucket.buffer().numel())
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    skips = [1, None] if mode == "skip" else [None, None]
    grads, error, per_step = None, None, []
    try:
        for x, skip in zip(batches(), skips):
            before = len(reduced)
            # (a reentrant checkpoint passes gradients only to inputs that require them)
            rows = x[rank * BATCH // WORLD : (rank + 1) * BATCH // WORLD].requires_grad_()
            model(rows, skip=skip).square().mean().backward()
            per_step.append(sum(reduced[before:]))
            if grads is None:
                grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad()
    except RuntimeError as e:
        error = str(e)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    finish(tmp, rank, {"grads": grads, "params": params, "reduced": per_step, "error": error})


def fsdp_worker(rank, tmp, units):
    from torch.distributed.device_mesh import init_device_mesh

    from lors_kernels.distributed import shard_lors_model

    init(rank, tmp)
    model = MODELS[units]()
    shard_lors_model(model, units=UNITS.get(units), mesh=init_device_mesh("cpu", (WORLD,)))
    shared = {"adaptive": lambda: model.mixer.generator.weight, "layer": lambda: model.shared.weight}.get(
        units, lambda: model.blocks[0].fc1.shared.weight
    )()
    sharded = {"shared": tuple(shared.to_local().shape), "full": tuple(shared.full_tensor().shape)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = None
    for x in batches():
        model(x[rank * BATCH // WORLD : (rank + 1) * BATCH // WORLD]).square().mean().backward()
        if grads is None:
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    finish(tmp, rank, {"grads": grads, "params": params, "sharded": sharded})


def assert_matches(results, grads, params):
    for result in results:
        assert result["grads"].keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(result["grads"][name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(result["params"][name], params[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["plain", "skip", "non-reentrant"])
def test_ddp_reduces_the_shared_weight_once(mode, tmp_path):
    """Two ranks on half a batch each equal one process on the whole batch, step after step; every step
    all-reduces exactly the model's unique parameters (the shared weights once, not once per layer).
    'skip' leaves a block out of the first step (find_unused_parameters=True); 'non-reentrant'
    checkpoints each block."""
    results = run_workers(ddp_worker, tmp_path, mode)
    reference = Net()
    grads, params = single_process(reference, [1, None] if mode == "skip" else [None, None])
    assert all(r["error"] is None for r in results), results[0]["error"]
    assert_matches(results, grads, params)
    unique = sum(p.numel() for p in reference.parameters())
    assert unique < sum(p.numel() for _, p in reference.named_parameters(remove_duplicate=False))
    assert all(r["reduced"] == [unique, unique] for r in results)
    if mode == "skip":  # the skipped block's private pair got no gradient; the shared weight did
        assert "blocks.1.fc1.down" not in grads and grads["blocks.0.fc1.shared.weight"].abs().sum() > 0


def test_ddp_reentrant_checkpoint_fails_as_documented(tmp_path):
    """lors_kernels.distributed's caveat: a weight shared across reentrant checkpoints breaks DDP."""
    results = run_workers(ddp_worker, tmp_path, "reentrant")
    assert all("mark a variable ready only once" in (r["error"] or "") for r in results)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("units", list(MODELS))
def test_fsdp2_shard_lors_model(units, tmp_path):
    """shard_lors_model: each stack one FSDP2 unit (and every block one more, chosen by class or by
    name; 'adaptive' is a LorsAdaptiveMixing, 'layer' a model that is one LorsLinear); gradients and
    two SGD steps equal the single process's."""
    results = run_workers(fsdp_worker, tmp_path, units)
    grads, params = single_process(MODELS[units](), [None, None])
    assert_matches(results, grads, params)
    rows = {"adaptive": 2 * (4 * 4 + 4 * 4), "layer": 3}.get(units, 20)  # the shared weight's first dimension
    assert all(r["sharded"]["full"][0] == rows for r in results)  # sharded: each rank holds its rows only
    assert sum(r["sharded"]["shared"][0] for r in results) == rows


def test_unit_selection():
    from lors_kernels.distributed import _is_unit

    block, linear = Block(nn.Linear(12, 20), nn.Linear(20, 12)), nn.Linear(2, 2)
    assert _is_unit(Block, "blocks.1", block) and not _is_unit(Block, "head", linear)
    assert _is_unit("blocks.1", "blocks.1", block) and not _is_unit("blocks.10", "blocks.1", block)
    assert _is_unit(["blocks.0", nn.Linear], "head", linear) and _is_unit((Block,), "x", block)
    assert _is_unit(lambda name, m: name.startswith("blocks."), "blocks.2", block)
    assert not _is_unit(None, "blocks.1", block) and not _is_unit([], "blocks.1", block)
