"""Loading checkpoints and pruned files: everything is checked first, and after any error the user's
network is bit-identical to before, with no hook of bconv left on it."""

import json
import re

import pytest
import torch
import torchvision
from torch import nn

import bconv
from bconv import load_ptl, wrap_with_ptl
from bconv.errors import CheckpointError
from bconv.prune import cop_prune, load_pruned, save_pruned
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


# --------------------------------------------------------------------------- load_pruned


@pytest.fixture(scope="module")
def pruned_files(tmp_path_factory):
    """A pruned resnet18 (1000 classes) and a pruned resnet18 with 10 classes, saved."""
    folder = tmp_path_factory.mktemp("pruned")
    files = {}
    for classes in (1000, 10):
        torch.manual_seed(0)
        result = cop_prune(torchvision.models.resnet18(num_classes=classes), SIZE, ratio=0.2, metric="channels")
        files[classes] = folder / f"resnet18-{classes}.pt"
        save_pruned(result, files[classes])
    return files


def test_load_pruned_into_another_architecture_of_the_same_class_changes_nothing(pruned_files):
    network = torchvision.models.resnet34()  # also a `ResNet`
    snapshot = _Snapshot(network)
    with pytest.raises(CheckpointError, match="another ResNet"):
        load_pruned(network, pruned_files[1000])
    snapshot.assert_unchanged()


def test_load_pruned_into_the_same_architecture_with_another_head_changes_nothing(pruned_files):
    network = torchvision.models.resnet18()
    snapshot = _Snapshot(network)
    with pytest.raises(CheckpointError, match=r"fc\.weight: \[10, \d+\] saved, \[1000, \d+\] after the replay"):
        load_pruned(network, pruned_files[10])
    snapshot.assert_unchanged()
    assert load_pruned(torchvision.models.resnet18(num_classes=10), pruned_files[10]) is not None


def test_load_pruned_on_a_file_that_is_not_one(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read as a file written by bconv.prune.save_pruned"):
        load_pruned(torchvision.models.resnet18(), text)


def _refused_unchanged(network: nn.Module, path, match: str) -> None:
    snapshot = _Snapshot(network)
    with pytest.raises(CheckpointError, match=match):
        load_pruned(network, path)
    snapshot.assert_unchanged()


def test_load_pruned_on_a_file_without_weights_changes_nothing(pruned_files, tmp_path):
    data = torch.load(pruned_files[1000], weights_only=True)
    del data["state_dict"]
    torch.save(data, tmp_path / "no-weights.pt")
    _refused_unchanged(torchvision.models.resnet18(), tmp_path / "no-weights.pt", "holds no 'state_dict'")


def test_load_pruned_on_a_truncated_file(pruned_files, tmp_path):
    data = pruned_files[1000].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])  # a copy interrupted half way
    _refused_unchanged(torchvision.models.resnet18(), tmp_path / "cut.pt", "cannot be read")


def test_load_pruned_whose_history_and_weights_disagree_changes_nothing(pruned_files, tmp_path):
    data = torch.load(pruned_files[1000], weights_only=True)
    data["history"].append(["layer1.0.conv1", True, [0]])  # one step more than the weights were saved after
    torch.save(data, tmp_path / "bad-history.pt")
    match = r"does not fit this ResNet once pruned.*layer1\.0\.conv1\.weight"
    _refused_unchanged(torchvision.models.resnet18(), tmp_path / "bad-history.pt", match)


def test_a_bad_file_is_the_same_error_from_both_loaders(tmp_path):
    # One mistake, one error class: a file that is no checkpoint of bconv's.
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    other = torch.load(tmp_path / "other.pt", weights_only=True)
    with pytest.raises(CheckpointError):
        load_pruned(torchvision.models.resnet18(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError):
        load_ptl(torchvision.models.resnet18(), other)
    assert issubclass(CheckpointError, bconv.BConvError) and issubclass(CheckpointError, ValueError)
