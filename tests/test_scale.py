"""Scale and speed: DistributedDataParallel (two gloo processes on loopback) and torch.compile."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from bconv import wrap_with_ptl
from bconv.cells import StatefulCell

from conftest import TinyCNN


def _cells(model: nn.Module) -> list[StatefulCell]:
    return [m for m in model.modules() if isinstance(m, StatefulCell)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODES = {"per_sample": dict(), "pooled": dict(state_mode="pooled"), "pooled_sync": dict(state_mode="pooled", sync_state=True)}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for mode, options in MODES.items():
            torch.manual_seed(0)  # the same initial weights on every rank
            wrapped = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), **options)  # the default ladder
            ddp = DDP(wrapped)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            torch.manual_seed(100 + rank)  # each rank its own shard, of its own batch size
            losses = []
            for _ in range(3):
                loss = ddp(torch.randn(4 + rank, 3, 32, 32)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                wrapped.detach_state()
                losses.append(loss.item())
            flat = torch.cat([p.detach().flatten() for p in wrapped.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            results[mode] = {
                "params_in_sync": all(torch.equal(g, gathered[0]) for g in gathered),
                "states": [c.c_prev.clone() for c in _cells(wrapped)],
                "losses": losses,
            }
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


def test_ddp_with_two_gloo_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for mode in MODES:
        assert r0[mode]["params_in_sync"] and r1[mode]["params_in_sync"], mode
        assert all(torch.isfinite(torch.tensor(r[mode]["losses"])).all() for r in (r0, r1))
    # Per-sample: each rank keeps its own slots (4 on rank 0, 5 on rank 1).
    assert [s.shape[0] for s in r0["per_sample"]["states"]] == [4] * 3
    assert [s.shape[0] for s in r1["per_sample"]["states"]] == [5] * 3
    # Pooled: one state per cell; without sync each rank summarises its own shard...
    assert all(s.shape[0] == 1 for s in r0["pooled"]["states"])
    assert not all(torch.allclose(a, b) for a, b in zip(r0["pooled"]["states"], r1["pooled"]["states"]))
    # ...with sync_state both ranks hold the same summary of all the data.
    for a, b in zip(r0["pooled_sync"]["states"], r1["pooled_sync"]["states"]):
        torch.testing.assert_close(a, b)


def test_sync_state_averages_over_all_samples_of_all_ranks(tmp_path):
    """One process group of size 1 still runs the all_reduce path: the result is the plain batch mean."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        from bconv.cells import BConvCell

        synced = BConvCell(3, 4, state_mode="pooled", sync_state=True).train()
        local = copy.deepcopy(synced)
        local.sync_state = False
        x = torch.randn(5, 3, 6, 6)
        synced(x)
        local(x)
        torch.testing.assert_close(synced.c_prev, local.c_prev)
    finally:
        dist.destroy_process_group()


def _compiled_and_eager(final_init: str = "paper"):
    torch.manual_seed(0)
    eager = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), final_init=final_init)
    if final_init == "identity":  # as after some training: the silenced cell contributes
        torch.nn.init.normal_(eager.ptl.cells[-1][-1].conv.weight, std=0.3)
    compiled_module = copy.deepcopy(eager)
    return eager, compiled_module, torch.compile(compiled_module, fullgraph=True)  # no graph breaks


@pytest.mark.parametrize("final_init", ["identity", "paper"])
def test_torch_compile_matches_eager_over_training_batches_and_eval(final_init):
    eager, module, compiled = _compiled_and_eager(final_init)
    eager.train()
    module.train()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    for x in batches:
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
        module.detach_state()
        eager.detach_state()
    for a, b in zip(_cells(module), _cells(eager)):
        torch.testing.assert_close(a.c_prev, b.c_prev, rtol=1e-4, atol=1e-5)
    eager.eval()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(batches[0]), eager(batches[0]), rtol=1e-4, atol=1e-5)


def test_torch_compile_backward_matches_eager():
    eager, module, compiled = _compiled_and_eager()
    x = torch.randn(4, 3, 32, 32)
    for m, f in ((eager, eager), (module, compiled)):
        m.train()
        f(x)  # a first batch leaves a state
        f(x).pow(2).mean().backward()
    for (name, a), b in zip(eager.named_parameters(), module.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
