"""The cells' state under unusual batches and grad modes: nothing poisons it for the batches that follow."""

import copy

import pytest
import torch
import torch.distributed as dist

from bconv import wrap_with_ptl
from conftest import TinyCNN

SIZE = (3, 32, 32)


def _states(model):
    return {k: v for cell in model.latent_state_dict().values() for k, v in cell.items() if k != "state_mode"}


# --------------------------------------------------------------------------- empty batches


@pytest.mark.parametrize("cell", ["v1", "v2"])
def test_an_empty_batch_leaves_the_pooled_state_as_it_was(cell):
    model = wrap_with_ptl(TinyCNN(), input_size=SIZE, cell=cell, state_mode="pooled").train()
    model(torch.randn(4, *SIZE))
    before = {k: v.clone() for k, v in _states(model).items()}
    assert model(torch.randn(0, *SIZE)).shape == (0, 5)
    after = _states(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.isfinite(model(torch.randn(4, *SIZE))).all()


def test_an_empty_first_batch_leaves_no_state():
    model = wrap_with_ptl(TinyCNN(), input_size=SIZE, state_mode="pooled").train()
    model(torch.randn(0, *SIZE))
    assert all(v is None for v in _states(model).values())


def test_an_empty_batch_on_every_rank_leaves_the_synced_state_as_it_was(tmp_path):
    # sync_state averages over the samples of all ranks: when no rank has one, nothing is averaged.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = wrap_with_ptl(TinyCNN(), input_size=SIZE, state_mode="pooled", sync_state=True).train()
        model(torch.randn(4, *SIZE))
        before = {k: v.clone() for k, v in _states(model).items()}
        model(torch.randn(0, *SIZE))
        assert all(torch.equal(before[k], v) for k, v in _states(model).items())
        assert torch.isfinite(model(torch.randn(4, *SIZE))).all()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- inference mode


def test_a_training_forward_under_inference_mode_is_handled_as_under_no_grad():
    model = wrap_with_ptl(TinyCNN(), input_size=SIZE).train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, *SIZE)
    with torch.inference_mode():
        model(x)
    with torch.no_grad():
        twin(x)
    ours, theirs = _states(model), _states(twin)
    assert all(not v.is_inference() and torch.equal(v, theirs[k]) for k, v in ours.items())
    loss = model(torch.randn(4, *SIZE)).sum()
    loss.backward()  # the stored state is usable by autograd
    assert model.model.head.weight.grad is not None


def test_a_latent_state_restored_under_inference_mode_trains():
    model = wrap_with_ptl(TinyCNN(), input_size=SIZE, cell="v2").train()
    model(torch.randn(4, *SIZE))
    saved = model.latent_state_dict()
    fresh = copy.deepcopy(model)
    fresh.reset_state()
    with torch.inference_mode():
        fresh.load_latent_state_dict(saved)
    assert not any(v.is_inference() for v in _states(fresh).values())
    fresh(torch.randn(4, *SIZE)).sum().backward()
