"""Loading checkpoints: everything is checked first, and after any error the user's
network is bit-identical to before, with no hook of bconv left on it."""

import json
import re

import pytest
import torch
import torchvision
from torch import nn

from bconv import load_ptl, wrap_with_ptl
from bconv.errors import CheckpointError
from conftest import TinyCNN

SIZE = (3, 32, 32)


class _Snapshot:
    """Everything of a network a failed load must leave alone: its tensors, its modules and its hooks."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tensors = {k: v.clone() for k, v in model.state_dict().items()}
        self.modules = [(name, type(m)) for name, m in model.named_modules()]
        self.parameters = [id(p) for p in model.parameters()]

    def assert_unchanged(self):
        now = self.model.state_dict()
        assert now.keys() == self.tensors.keys()
        changed = [k for k, v in self.tensors.items() if now[k].shape != v.shape or not torch.equal(now[k], v)]
        assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"
        assert [(name, type(m)) for name, m in self.model.named_modules()] == self.modules
        assert [id(p) for p in self.model.parameters()] == self.parameters
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in self.model.modules()), "hooks left behind"


# --------------------------------------------------------------------------- load_ptl


def test_load_ptl_into_another_architecture_changes_nothing():
    saved = wrap_with_ptl(torchvision.models.resnet18(), input_size=SIZE).state_dict()
    network = torchvision.models.resnet34()
    snapshot = _Snapshot(network)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: model\.layer1\.2\.conv1\.weight"):
        load_ptl(network, saved)
    snapshot.assert_unchanged()
    wrap_with_ptl(network, input_size=SIZE)  # nothing is left in the way of wrapping it


def test_load_ptl_into_the_same_architecture_with_another_head_changes_nothing():
    saved = wrap_with_ptl(torchvision.models.resnet18(num_classes=10), input_size=SIZE).state_dict()
    network = torchvision.models.resnet18()
    snapshot = _Snapshot(network)
    with pytest.raises(CheckpointError, match=r"size mismatch for model\.fc\.weight: \[10, 512\] in the checkpoint"):
        load_ptl(network, saved)
    snapshot.assert_unchanged()


def _with_config(state_dict: dict, **changes) -> dict:
    stored = json.loads(bytes(state_dict["_extra_state"].tolist()))
    stored["config"].update(changes)
    return {**state_dict, "_extra_state": torch.tensor(list(json.dumps(stored).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize("option, value", [("stages", None), ("input_size", 5)])
def test_a_recorded_option_of_the_wrong_type_is_named(option, value):
    saved = _with_config(wrap_with_ptl(TinyCNN(), input_size=SIZE).state_dict(), **{option: value})
    network = TinyCNN()
    snapshot = _Snapshot(network)
    with pytest.raises(CheckpointError, match=re.escape(f"{option}={value!r}, which should be")):
        load_ptl(network, saved)
    snapshot.assert_unchanged()


@pytest.mark.parametrize("option, value", [("leaf_modules", 5), ("sync_state", "no"), ("input_size", [3, "32", 32])])
def test_more_recorded_options_of_the_wrong_type_are_named(option, value):
    saved = _with_config(wrap_with_ptl(TinyCNN(), input_size=SIZE).state_dict(), **{option: value})
    with pytest.raises(CheckpointError, match=re.escape(f"{option}={value!r}, which should be")):
        load_ptl(TinyCNN(), saved)
