"""Pruned files: load_pruned checks a file written by save_pruned before it replays anything, and after any
refusal the user's network is bit-identical to before, with no hook of bconv left on it.

COP pruning itself is tests/test_prune.py; the same mistake across loaders, tests/test_arguments.py.
"""

import pytest
import torch
import torchvision
from torch import nn

from bconv.errors import CheckpointError
from bconv.prune import cop_prune, load_pruned, save_pruned
from conftest import Snapshot

SIZE = (3, 32, 32)


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
    snapshot = Snapshot(network)
    with pytest.raises(CheckpointError, match="another ResNet"):
        load_pruned(network, pruned_files[1000])
    snapshot.assert_unchanged()


def test_load_pruned_into_the_same_architecture_with_another_head_changes_nothing(pruned_files):
    network = torchvision.models.resnet18()
    snapshot = Snapshot(network)
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
    snapshot = Snapshot(network)
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
