"""The docs' Accelerate recipe (docs/guides/lightning-accelerate.md), run on CPU: prepare, detach_state, save_state/load_state with the
latent state registered, a mid-epoch resume that ends bitwise, unwrap_model then bconv.load_ptl."""

from __future__ import annotations

import shutil

import pytest
import torch
from accelerate.state import AcceleratorState

import bconv

from conftest import Preempted, TinyCNN, docs_block, preempt_after_checkpoint

SIZE = (3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(150, *SIZE, generator=g), torch.randint(0, 5, (150,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _run_recipe(time_to_checkpoint) -> dict:
    """The docs' script as written, in the current directory; returns its namespace."""
    AcceleratorState._reset_state(True)  # one Accelerator per script, as in a fresh process
    namespace = dict(dataset=_dataset(), epochs=3, build_network=TinyCNN, time_to_checkpoint=time_to_checkpoint)
    recipe = docs_block("guides/lightning-accelerate.md", "## PTL with Accelerate")
    exec(compile(recipe, "docs/guides/lightning-accelerate.md", "exec"), namespace)
    return namespace


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_readme_accelerate_recipe_resumes_bitwise_and_unwraps_to_a_ptl_model(tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    monkeypatch.chdir(tmp_path / "full")
    full = _run_recipe(lambda: False)
    model = full["accelerator"].unwrap_model(full["model"])
    assert isinstance(model, bconv.PTLModel)
    loaded = bconv.load_ptl(TinyCNN(), torch.load("ptl.pt", weights_only=True))
    x = torch.randn(4, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))

    (tmp_path / "preempted").mkdir()
    monkeypatch.chdir(tmp_path / "preempted")
    with pytest.raises(Preempted):
        _run_recipe(preempt_after_checkpoint(4))  # 3 batches an epoch (64, 64, 22): epoch 1, after its 1st
    saved = torch.load("checkpoint/custom_checkpoint_0.pkl", weights_only=True)  # the latent state, plain tensors
    assert saved.keys() == model.latent_state_dict().keys() and all(s["c_prev"] is not None for s in saved.values())
    resumed = _run_recipe(lambda: False)
    assert resumed["progress"].epoch == 3
    assert _equal(full["model"], resumed["model"])

    # The registered latent state is what makes it exact: restored without it, the run ends elsewhere.
    monkeypatch.setattr(bconv.LatentState, "load_state_dict", lambda self, state: None)
    shutil.rmtree("checkpoint")
    with pytest.raises(Preempted):  # preempted the same way again, from scratch
        _run_recipe(preempt_after_checkpoint(4))
    without = _run_recipe(lambda: False)
    assert not _equal(full["model"], without["model"])


def test_latent_state_reads_and_restores_the_cells_and_refuses_a_network_without_them():
    with pytest.raises(ValueError, match="holds no BConv-Cell"):
        bconv.LatentState(TinyCNN())  # at registration, not at the first checkpoint
    model = bconv.wrap_with_ptl(TinyCNN(), input_size=SIZE, cell="v2")
    model.train()
    model(torch.randn(4, *SIZE))
    latent = bconv.LatentState(model)
    saved = latent.state_dict()
    assert saved.keys() == model.latent_state_dict().keys()
    model.reset_state()
    latent.load_state_dict(saved)
    assert all(
        torch.equal(model.latent_state_dict()[k][n], saved[k][n]) for k in saved for n in ("c_prev", "y_prev")
    )
    with pytest.raises(bconv.BConvError, match="no state for the cells"):
        latent.load_state_dict({k: v for k, v in list(saved.items())[1:]})
    assert all(torch.equal(model.latent_state_dict()[k]["c_prev"], saved[k]["c_prev"]) for k in saved)  # unchanged
