"""The benchmarks run end to end, on data the tests make themselves, writing to tmp_path only.

``python -m benchmarks.transfer --quick`` runs on scikit-learn's bundled digits (nothing to make), on a tiny
ImageFolder tree of PNGs, and on a fake local CIFAR-10 copy in torchvision's pickle format. A fake copy
cannot match the md5 sums that torchvision's ``CIFAR10`` checks before it reads anything, so that test
replaces only ``torchvision.datasets.cifar.check_integrity`` (with "the file exists"); everything else,
opening and unpickling the batches, reshaping and the class names, is torchvision's own loading path.
``benchmarks.zoo`` runs on a few small models; ``benchmarks.feature_info_agreement``'s comparison
and its diagnosis on a network whose feature_info taps are each wrong in a known way; ``cells``,
``find_stages_speed`` and ``overhead`` on small inputs. What the benchmarks share is tested where it lives,
``benchmarks.common``: the zoo list, FLOP and parameter counts, logits, one-line errors, the side-by-side timing
loop, the results writer and the hand-wired PTL ResNet. Tests that run a whole benchmark protocol are ``slow``.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import pickle
import re
import signal
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bconv
from bconv._zoo import ZooModel, resolve
from bconv.surgery import find_stages

for _extra in ("sklearn", "matplotlib", "tqdm", "torchmetrics"):  # the bench extra: pip install -e ".[bench]"
    pytest.importorskip(_extra, reason='the benchmarks need the bench extra: pip install -e ".[test,bench]"')

from benchmarks import _agreement, common, transfer, zoo  # noqa: E402  (after the extras are checked)
from benchmarks import feature_info_agreement as agreement  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The scripts' main() sets torch's thread count (--threads): give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- transfer


def _check_report(report: dict, out: Path, conditions: list[str]) -> None:
    """What every protocol report holds, whatever the data: every number from the run, on the right split."""
    proto = report["protocol"]
    assert report["conditions"] == conditions and list(report["results"]) == conditions
    for c, r in report["results"].items():
        assert r["seeds"] == list(proto["eval_seeds"])
        assert r["lr"] in r["grid"] and set(proto["grids"][c]) <= set(r["grid"])
        assert r["curve_epochs"][-1] == proto["epochs"] * (proto["rollback_periods"] if c == "rollback" else 1)
        assert all(0.0 <= a <= 100.0 for a in r["test_acc"] + r["map"] + r["rank1"])
        if c != "plain":
            diffs = [a - b for a, b in zip(r["test_acc"], report["results"]["plain"]["test_acc"])]
            assert r["test_acc_vs_plain"]["mean"] == pytest.approx(statistics.fmean(diffs))
            assert r["test_acc_vs_plain"]["detectable"] >= 0
    # the test split is read only by the evaluation (and ablation) runs; tuning reads validation only
    for run in report["runs"]:
        tested = run["phase"] in ("eval", "ablation")
        assert ("test_acc" in run) == tested and ("val_acc" in run) == (not tested)
        if run["phase"] == "eval":
            assert run["lr"] == report["selected_lr"][run["condition"]]
        if run["phase"] == "tune":
            assert run["seed"] in proto["tune_seeds"]
    assert not set(proto["tune_seeds"]) & set(proto["eval_seeds"])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert saved["run"]["command"].startswith("python -m benchmarks.transfer") and "--quick" in saved["run"]["command"]
    md = out.with_suffix(".md").read_text()
    assert f"Made by `{saved['run']['command']}`" in md
    assert ("**Power.**" in md) == (len(conditions) > 1)  # a statement for every comparison, none without one
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_transfer_quick_on_fashion_mnist_idx_files_runs_the_whole_protocol(tmp_path):
    """The committed command's path (two worker processes), on IDX files written here."""
    _write_fake_fashion_mnist(tmp_path / "fm")
    out = tmp_path / "transfer"
    conditions = list(transfer.CONDITIONS)
    report = transfer.main(["--data-dir", str(tmp_path / "fm"), "--quick", "--ablation", "--conditions", *conditions,
                            "--out", str(out)])  # fmt: skip
    _check_report(report, out, conditions)
    assert report["workers"] == 2  # the default: the committed command's two worker processes
    data = report["data"]
    assert data["source_classes"] == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    assert data["target_classes"] == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    # --quick: a budget of 10 + 10 per class from the training images; the official test images
    assert data["sizes"] == {"source_train": 100, "source_test": 40, "target_train": 50, "target_val": 50,
                             "target_test": 40}  # fmt: skip
    results, runs = report["results"], report["runs"]
    for c in conditions:  # each grid is tuned on the tuning seeds before anything is evaluated
        tuned = {(r["lr"], r["seed"]) for r in runs if r["condition"] == c and r["phase"] == "tune"}
        assert tuned == {(lr, s) for lr in results[c]["grid"] for s in report["protocol"]["tune_seeds"]}
    for student in ("std", "std_plain"):
        assert {r["seed"] for r in runs if r["condition"] == student and r["phase"] == "eval"} == {100, 101}
    assert set(report["ablation"]) == {"reset never", "state pooled"}
    for r in report["ablation"].values():
        assert r["seeds"] == [100, 101] and "test_acc_vs_ptl_v1" in r and "detectable" in r["test_acc_vs_ptl_v1"]
    assert report["plateau"]["longer_epochs"] == 2 * report["plateau"]["epochs"]
    rollback = [r for r in runs if r["condition"] == "rollback"]
    assert all(r["curve"][-1]["epoch"] == 2 * r["epochs"] for r in rollback)  # 2 periods, each a whole run
    for c in ("ptl_v1", "ptl_v1_paper"):
        assert set(results[c]["usage"]) >= {"stage_share", "output_share", "state_effect"}
    assert results["control"]["usage"]["output_share"][0] == 0.0  # the control's ladder is zeroed
    assert "test_acc_vs_control" in results["ptl_v1_paper"]
    md = out.with_suffix(".md").read_text()
    assert "## Ablation" in md and "## Retrieval" in md and "## Plateau check" in md and "**Labelled budget.** 10" in md


@pytest.mark.slow
def test_transfer_quick_on_digits_in_one_process(tmp_path):
    out = tmp_path / "transfer"
    report = transfer.main(["--dataset", "digits", "--quick", "--workers", "1", "--conditions", "plain", "ptl_v1",
                            "--out", str(out)])  # fmt: skip
    _check_report(report, out, ["plain", "ptl_v1"])
    assert report["workers"] == 1
    assert report["data"]["target_classes"] == ["5", "6", "7", "8", "9"]


def test_the_born_again_control_distils_the_plain_model_of_the_same_seed_and_is_paired_with_std(tmp_path):
    """std_plain's teacher is plain's model of the same seed at plain's chosen lr (std's: ptl_v1's), and the
    report compares the two teachers seed by seed."""
    out = tmp_path / "transfer"
    report = transfer.main(["--dataset", "digits", "--quick", "--per-class", "12", "--workers", "1", "--conditions",
                            "plain", "ptl_v1", "std", "std_plain", "--out", str(out)])  # fmt: skip
    selected, runs = report["selected_lr"], report["runs"]
    for student, teacher in (("std", "ptl_v1"), ("std_plain", "plain")):
        distilled = [r for r in runs if r["condition"] == student]
        assert {r["phase"] for r in distilled} == {"tune", "eval"}
        assert all(r["teacher"] == f"{teacher} lr {selected[teacher]:g} seed {r['seed']}" for r in distilled)
    assert all(r["teacher"] is None for r in runs if r["condition"] not in ("std", "std_plain"))
    std, born = report["results"]["std"], report["results"]["std_plain"]
    paired = std["test_acc_vs_std_plain"]
    assert paired["mean"] == pytest.approx(std["test_acc_mean"] - born["test_acc_mean"])
    assert "detectable" in paired and "test_acc_vs_std_plain" not in born
    md = out.with_suffix(".md").read_text()
    assert "## Is STD's gain the PTL teacher's? (the born-again control)" in md and "std vs std_plain" in md
    assert f"at commit {report['run']['commit']}" in md
    out.with_suffix(".md").unlink()
    transfer.main(["--render", "--out", str(out)])  # the report again from the JSON alone, the same text
    assert out.with_suffix(".md").read_text() == md
    with pytest.raises(SystemExit, match="does not exist"):
        transfer.main(["--render", "--out", str(tmp_path / "missing")])


def test_the_resnet18_backbone_is_timms_standard_one_for_the_images_channels():
    protocol = transfer.Protocol(backbone="resnet18")
    model = transfer.make_backbone(protocol, 1, 5)
    assert type(model).__name__ == "ResNet" and model.conv1.in_channels == 1 and model.fc.out_features == 5
    assert isinstance(model.maxpool, nn.MaxPool2d) and [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == [2] * 4
    assert transfer.describe_backbone(protocol).startswith("timm resnet18")
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'; valid: small, resnet18"):
        transfer.make_backbone(transfer.Protocol(backbone="resnet50"), 1, 5)


def test_control_is_the_paper_start_with_its_ladder_zeroed(tmp_path):
    _write_fake_fashion_mnist(tmp_path)
    data = transfer.make_data("fashion-mnist", tmp_path, None, None, budget=3, val_per_class=2)
    protocol = transfer.Protocol(width=4)
    backbone = transfer.SmallResNet(1, 5, 4)
    paper = transfer._ptl_model("ptl_v1_paper", copy.deepcopy(backbone), data)
    control = transfer._ptl_model("control", copy.deepcopy(backbone), data)
    control.load_state_dict(paper.state_dict())
    assert control.ptl.zero_cells and not paper.ptl.zero_cells
    x = data.target_train.x
    with torch.no_grad():
        assert not torch.allclose(paper.eval()(x), control.eval()(x))  # the same weights: the ladder is what differs
    assert bconv.ladder_usage(control, x).output_share == 0.0
    assert protocol.grid("control") == protocol.grid("ptl_v1_paper")


def test_lr_is_selected_on_validation_never_on_test():
    def run(lr, seed, val, loss, test):
        return {"condition": "plain", "lr": lr, "seed": seed, "val_acc": val, "val_loss": loss, "test_acc": test,
                "test_loss": 3.0 - test / 50}  # fmt: skip

    # the test split favours the lr that validation does not: read, it would flip the choice
    runs = [run(0.01, s, 90.0, 1.0, 99.0) for s in range(3)] + [run(0.1, s, 95.0, 1.0, 10.0) for s in range(3)]
    assert transfer.select_lr(runs, "plain") == 0.1
    tie = [run(0.03, s, 95.0, 0.5, 5.0) for s in range(3)]  # as accurate, lower loss
    assert transfer.select_lr(runs + tie, "plain") == 0.03
    without_test = [{k: v for k, v in r.items() if not k.startswith("test_")} for r in runs + tie]
    assert transfer.select_lr(without_test, "plain") == 0.03  # nothing of the test split is needed


def test_a_grid_is_extended_beyond_a_chosen_edge_up_to_the_limit():
    assert [transfer.lr_step(lr, True) for lr in (0.03, 0.1, 0.3)] == [0.1, 0.3, 1.0]
    assert [transfer.lr_step(lr, False) for lr in (0.03, 0.1, 0.01)] == [0.01, 0.03, 0.003]
    counts = {"low": 0, "high": 0}
    grid = [0.03, 0.1, 0.3]
    assert transfer.next_grid_step(grid, 0.1, counts, 2) is None  # inside: bracketed
    assert transfer.next_grid_step(grid, 0.3, counts, 2) == 1.0
    assert transfer.next_grid_step([*grid, 1.0], 1.0, counts, 2) == 3.0
    assert transfer.next_grid_step([*grid, 1.0, 3.0], 3.0, counts, 2) is None  # two extensions on that side
    assert transfer.next_grid_step(grid, 0.03, counts, 2) == 0.01 and counts == {"low": 1, "high": 2}


def test_transfer_refuses_what_the_protocol_cannot_run(capsys):
    for argv, match in ((["--conditions", "plain", "std"], "the std condition distils the ptl_v1 model"),
                        (["--conditions", "ptl_v1", "std_plain"], "the std_plain condition distils the plain model"),
                        (["--backbone", "resnet50"], "invalid choice: 'resnet50'"),
                        (["--ablation", "--conditions", "plain"], "the ablation varies the ptl_v1 condition"),
                        (["--eval-seeds", "100", "101"], "at least 10 seeds, got 2"),
                        (["--eval-seeds", *map(str, range(10))], "must be fresh: not the tuning seeds [0, 1, 2]"),
                        (["--dataset", "digits", "--budget", "10"], "--budget needs a dataset with an official test set"),
                        (["--budget", "0"], "must be at least 1"),
                        (["--workers", "0"], "--workers must be at least 1")):  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            transfer.parse_args(argv)
        assert stopped.value.code == 2, argv  # argparse's usage error, not a crash
        assert match in capsys.readouterr().err, argv


def test_the_protocols_defaults_are_the_issues():
    args = transfer.parse_args([])
    p = args.protocol
    assert args.dataset == "fashion-mnist" and (args.budget, args.val_per_class) == (20, 100)
    assert p.epochs == 48 and len(p.tune_seeds) == 3 and len(p.eval_seeds) >= 10 and p.rollback_periods == 4
    assert (p.momentum, p.nesterov, p.weight_decay) == (0.9, True, 5e-4)
    assert set(args.conditions) == {"plain", "ptl_v1", "ptl_v1_paper", "control", "ptl_v2", "std", "std_plain",
                                    "rollback"}
    assert p.backbone == "small" and transfer.parse_args(["--backbone", "resnet18"]).out.name == (
        "transfer_fashion_mnist_resnet18")
    assert args.workers == 2 and args.out == common.RESULTS / "transfer_fashion_mnist"


def _write_image_folder(root: Path, classes: int = 4, per_class: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            pixels[..., c % 3] = 40 * c  # something per class to learn
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")


def test_transfer_quick_on_an_image_folder(tmp_path):
    _write_image_folder(tmp_path / "images")
    out = tmp_path / "transfer"
    report = transfer.main(["--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--image-size", "16",
                            "--quick", "--workers", "1", "--conditions", "plain", "--out", str(out)])  # fmt: skip
    _check_report(report, out, ["plain"])
    assert report["data"]["source_classes"] == ["class0", "class1"]
    assert report["data"]["target_classes"] == ["class2", "class3"]
    assert report["data"]["input_size"] == [3, 16, 16]
    # 10 images per class: 8 + 2 per source class, 4 + 2 + 4 per target class
    assert report["data"]["sizes"] == {"source_train": 16, "source_test": 4, "target_train": 8, "target_val": 4,
                                       "target_test": 8}  # fmt: skip


def _write_fake_cifar10(root: Path, per_batch: int = 20, test: int = 50) -> np.ndarray:
    """torchvision's CIFAR-10 python layout with random images; returns the first training image (HWC)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", test)]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        first = data[0] if first is None else first
        entry = {"batch_label": name, "labels": [i % 10 for i in range(n)], "data": data,
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(entry))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_cases_per_batch": per_batch}))
    return first.reshape(3, 32, 32).transpose(1, 2, 0)


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


def test_cifar10_is_read_from_a_local_copy_and_never_downloaded(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", _no_download)
    first = _write_fake_cifar10(tmp_path)
    # The md5 sums of a fake copy do not match: torchvision refuses it rather than downloading.
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        common.load_cifar10(tmp_path, True, 32)
    with pytest.raises(RuntimeError, match="not found or corrupted"):  # nothing there: refused, not fetched
        common.load_cifar10(tmp_path / "empty", True, 32)
    # With the sums accepted, torchvision's own loading path reads the local batches.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    x, y, names = common.load_cifar10(tmp_path, True, 32)
    assert x.shape == (100, 3, 32, 32) and names[5] == "dog" and y.tolist() == list(range(10)) * 10
    torch.testing.assert_close(x[0], torch.from_numpy(first).permute(2, 0, 1).float() / 255)
    assert common.load_cifar10(tmp_path, False, 16)[0].shape == (50, 3, 16, 16)  # the test batch, resized


@pytest.mark.slow
def test_transfer_quick_on_a_local_cifar10_copy(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    _write_fake_cifar10(tmp_path)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", _no_download)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    out = tmp_path / "transfer"
    report = transfer.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--quick", "--workers", "1",
                            "--conditions", "plain", "ptl_v2", "--out", str(out)])  # fmt: skip
    _check_report(report, out, ["plain", "ptl_v2"])
    assert report["data"]["target_classes"] == ["dog", "frog", "horse", "ship", "truck"]
    # the official test batch is the test split: 5 images of each target class
    assert report["data"]["sizes"]["target_test"] == 25


def test_per_class_split_is_disjoint_stratified_and_fixed():
    y = torch.arange(5).repeat_interleave(20)
    parts = common.per_class_split(y, (0.4, 0.2, 0.4), seed=0)
    assert sorted(torch.cat(parts).tolist()) == list(range(100))
    for part, n in zip(parts, (8, 4, 8)):
        assert torch.bincount(y[part], minlength=5).tolist() == [n] * 5
    again = common.per_class_split(y, (0.4, 0.2, 0.4), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


# ------------------------------------------------------------------------------ transfer: Fashion-MNIST


def _idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    """``array`` in the IDX format: two zero bytes, the type, the number of dimensions, big-endian sizes."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_byte]
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def _write_fake_fashion_mnist(root: Path, train_per_class: int = 20, test_per_class: int = 8) -> np.ndarray:
    """The four Fashion-MNIST IDX files with random images: training files gzipped, test files plain (both
    forms are read). Returns the training images."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train_images = None
    for prefix, per_class, gz in (("train", train_per_class, True), ("t10k", test_per_class, False)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        for c in range(10):
            images[labels == c, 2 * c : 2 * c + 6, 8:20] = 255  # something per class to learn
        train_images = images if prefix == "train" else train_images
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            raw = _idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return train_images


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_parses_the_header_and_big_endian_data(tmp_path, gz):
    for type_byte, array in ((0x08, np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
                             (0x0B, np.array([-2, 300, 7], dtype=np.int16)),
                             (0x0D, np.array([[1.5, -2.25]], dtype=np.float32))):  # fmt: skip
        raw = _idx_bytes(array, type_byte)
        path = tmp_path / f"a{type_byte}"  # no .gz suffix either way: gzip is recognised by its magic bytes
        path.write_bytes(gzip.compress(raw) if gz else raw)
        read = common.read_idx(path)
        assert read.shape == array.shape and read.dtype.isnative
        np.testing.assert_array_equal(read, array)


def test_read_idx_refuses_what_is_not_idx(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="not an IDX file"):
        common.read_idx(bad)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(_idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))[:-1])
    with pytest.raises(ValueError, match=r"do not hold the 3-d array of shape \(4, 28, 28\)"):
        common.read_idx(truncated)


def test_fashion_mnist_is_read_from_its_idx_files(tmp_path):
    images = _write_fake_fashion_mnist(tmp_path)
    x, y, names = common.load_fashion_mnist(tmp_path, train=True)
    assert x.shape == (200, 1, 28, 28) and y.tolist() == list(range(10)) * 20
    torch.testing.assert_close(x[3, 0], torch.from_numpy(images[3]).float() / 255)
    assert names[5] == "Sandal" and names[9] == "Ankle boot"
    x_test, y_test, _ = common.load_fashion_mnist(tmp_path, train=False)  # the plain (not gzipped) files
    assert x_test.shape == (80, 1, 28, 28) and torch.bincount(y_test).tolist() == [8] * 10


def test_fashion_mnist_missing_names_the_package(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        common.load_fashion_mnist(tmp_path, train=True)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((1, 28, 28), dtype=np.uint8)))
    with pytest.raises(SystemExit, match="train-labels-idx1-ubyte"):  # names the file that is missing
        common.load_fashion_mnist(tmp_path, train=True)


def test_fashion_mnist_defaults_to_the_debian_package(tmp_path, monkeypatch):
    assert common.FASHION_MNIST_DIR == Path("/usr/share/datasets/fashion-mnist")
    assert transfer.parse_args(["--dataset", "fashion-mnist"]).data_dir is None
    # Without --data-dir the protocol reads the package's folder (here a folder of fake files in its place).
    _write_fake_fashion_mnist(tmp_path / "package")
    monkeypatch.setattr(common, "FASHION_MNIST_DIR", tmp_path / "package")
    data = transfer.make_data("fashion-mnist", None, None, None, budget=3, val_per_class=2)
    assert data.sizes()["source_train"] == 100 and data.target_classes[0] == "Sandal"
    monkeypatch.setattr(common, "FASHION_MNIST_DIR", tmp_path / "missing")
    with pytest.raises(SystemExit, match=re.escape(f"no train-images-idx3-ubyte[.gz] in {tmp_path / 'missing'}")):
        transfer.make_data("fashion-mnist", None, None, None, budget=3, val_per_class=2)


def test_labelled_budget_split_is_exact_disjoint_and_from_training_images_only(tmp_path):
    _write_fake_fashion_mnist(tmp_path, train_per_class=20, test_per_class=8)
    data = transfer.make_data("fashion-mnist", tmp_path, None, None, budget=3, val_per_class=5)
    assert data.sizes() == {"source_train": 100, "source_test": 40, "target_train": 15, "target_val": 25,
                            "target_test": 40}  # fmt: skip
    assert torch.bincount(data.target_train.y).tolist() == [3] * 5
    assert torch.bincount(data.target_val.y).tolist() == [5] * 5
    # train and val are different training images (the random images are all distinct)
    flat = lambda s: {tuple(v.tolist()) for v in s.x.flatten(1)}  # noqa: E731
    assert not flat(data.target_train) & flat(data.target_val)
    assert not (flat(data.target_train) | flat(data.target_val)) & flat(data.target_test)
    with pytest.raises(SystemExit, match="needs 25"):
        transfer.make_data("fashion-mnist", tmp_path, None, None, budget=20, val_per_class=5)


def test_retrieval_metrics_match_a_hand_computed_ranking():
    # directions on the unit circle at 0, 10, 100, 25 degrees (cosine similarity ranks by angle, no ties)
    angles = torch.tensor([0.0, 10.0, 100.0, 25.0]) * torch.pi / 180
    features = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 1, 0, 1])
    # query 0 ranks 1, 3, 2: its relevant item at rank 3, AP 1/3; query 1 ranks 0, 3, 2: rank 2, AP 1/2;
    # query 2 ranks 3, 1, 0: rank 3, AP 1/3; query 3 ranks 1, 0, 2: rank 1, AP 1 (the only rank-1 hit)
    got = common.retrieval_metrics(features, labels, chunk=3)  # a chunk that does not divide 4
    assert got["map"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 3 + 1) / 4, abs=1e-4)
    assert got["rank1"] == pytest.approx(25.0)
    with pytest.raises(ValueError, match="every label occurs once"):
        common.retrieval_metrics(features, torch.arange(4))


def test_retrieval_metrics_equal_torchmetrics_over_the_same_pairs():
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(41, 6, generator=gen)
    labels = torch.cat([torch.arange(5).repeat(8), torch.tensor([9])])  # label 9 once: a query with no relevant item
    got = common.retrieval_metrics(features, labels, chunk=7)
    # torchmetrics: one query per item, every other item a candidate, scored by cosine similarity
    f = torch.nn.functional.normalize(features, dim=1)
    query, item = torch.meshgrid(torch.arange(41), torch.arange(41), indexing="ij")
    others = query != item
    # + 2: the same ranking, all scores positive (torchmetrics counts a relevant item scored <= 0 as never retrieved)
    preds, target, indexes = (f @ f.T + 2)[others], (labels[query] == labels[item])[others], query[others]
    expected_map = RetrievalMAP(empty_target_action="skip")(preds, target, indexes=indexes)
    expected_rank1 = RetrievalHitRate(top_k=1, empty_target_action="skip")(preds, target, indexes=indexes)
    assert got["map"] == pytest.approx(100 * float(expected_map), abs=1e-4)
    assert got["rank1"] == pytest.approx(100 * float(expected_rank1), abs=1e-4)
    assert 0 < got["rank1"] < 100  # random features: some hits, some misses, so the comparison means something


def test_detectable_difference_is_detected_with_the_stated_power():
    n, std = 10, 1.5
    d = common.detectable_difference(std, n)
    # Simulate paired runs whose differences have that true mean and spread: 80% of t-tests reject.
    from scipy import stats

    rng = np.random.default_rng(0)
    diffs = rng.normal(d, std, size=(20000, n))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / np.sqrt(n))
    power = float(np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)))
    assert power == pytest.approx(0.8, abs=0.015)
    assert common.detectable_difference(2 * std, n) == pytest.approx(2 * d)  # linear in the spread
    # Many seeds: the normal approximation (z_0.975 + z_0.8) * std / sqrt(n)
    assert common.detectable_difference(std, 400) == pytest.approx(2.8016 * std / 20, rel=0.01)


def test_seeded_fixes_every_global_generator_and_returns_a_fresh_one():
    import random

    draws = []
    for extra in (0, 5):  # how much is drawn from the global generators does not move the data's stream
        gen = common.seeded(7)
        draws.append((torch.randn(3), np.random.rand(), random.random()))
        torch.randn(extra)
        draws[-1] += (torch.randn(3, generator=gen),)
    for a, b in zip(*draws):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


class _Stateful(nn.Module):
    """A linear classifier that counts the state calls a PTL model receives."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.resets = self.detaches = 0

    def forward(self, x):
        return self.fc(x.flatten(1))

    def reset_state(self):
        self.resets += 1

    def detach_state(self):
        self.detaches += 1


@pytest.mark.parametrize("schedule", ["epoch", "step"])
def test_train_epochs_runs_the_cosine_and_the_state_duties(schedule):
    model = _Stateful()
    split = common.Split(torch.randn(10, 1, 2, 2), torch.arange(10) % 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lrs = []
    curve = common.train_epochs(model, optimizer, split, 3, torch.Generator().manual_seed(0), batch_size=4,
                                schedule=schedule, after_epoch=lambda e: {"lr": optimizer.param_groups[0]["lr"]})
    lrs = [p["lr"] for p in curve]
    # 3 steps an epoch (4 + 4 + 2): cosine over 3 epochs, or over 9 steps
    T = 3 if schedule == "epoch" else 9
    done = [1, 2, 3] if schedule == "epoch" else [3, 6, 9]
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * k / T)) for k in done], abs=1e-12)
    assert (model.resets, model.detaches) == (3, 9)
    common.train_epochs(model, optimizer, split, 2, torch.Generator(), batch_size=4, reset_state=False)
    assert (model.resets, model.detaches) == (3, 15)  # reset never: only detached
    with pytest.raises(ValueError, match="'epoch' or 'step'"):
        common.train_epochs(model, optimizer, split, 1, torch.Generator(), batch_size=4, schedule="cosine")


def test_reestimate_bn_averages_over_the_images_with_zero_ptl_state():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    x = torch.randn(64, 1, 6, 6) * 3 + 1
    model.train()(x[:8])  # momentum 0.1 from one batch: far from the images' statistics
    common.reestimate_bn(model, x, batch_size=16)
    with torch.no_grad():
        features = model[0](x)
    torch.testing.assert_close(model[1].running_mean, features.mean((0, 2, 3)))
    torch.testing.assert_close(model[1].running_var, features.var((0, 2, 3)), rtol=0.05, atol=0)
    assert not model.training

    class WithBN(_Stateful):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(1)

        def forward(self, x):
            return super().forward(self.bn(x))

    stateful = WithBN()
    common.reestimate_bn(stateful, x[:, :, :2, :2], batch_size=16)
    assert stateful.resets == 64 // 16 + 1  # before every batch, and once at the end


def test_no_benchmark_imports_another_and_nothing_edits_sys_path():
    import ast

    root = Path(__file__).resolve().parents[1]
    scripts = {p.stem for p in (root / "benchmarks").glob("*.py")}
    shared = {"common", "_isolated", "_agreement", "__init__"}
    for path in (root / "benchmarks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
                if node.module == "benchmarks":
                    names = [f"benchmarks.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                head, _, rest = name.partition(".")
                assert head not in scripts, f"{path.name} imports {name} as a script"
                if head == "benchmarks":
                    assert rest in shared, f"{path.name} imports the benchmark {name}"
    needle = ".".join(("sys", "path"))  # spelled so that this file does not hold it
    for path in (root / "benchmarks").glob("*.py"):
        assert needle not in path.read_text(), f"{path.name} edits the import path"
    for path in (root / "tests").glob("*.py"):
        for line in path.read_text().splitlines():
            assert not (needle in line and "benchmark" in line.lower()), f"{path.name} reaches a benchmark: {line}"


def test_a_benchmark_runs_as_a_module_from_the_repository_root():
    import subprocess

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks.transfer", "--help"], cwd=root, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "python -m benchmarks.transfer" in done.stdout


def test_paired_interval_matches_scipys_paired_t_test():
    from scipy import stats

    a, b = [88.1, 87.4, 89.0, 86.2, 88.8], [87.0, 87.9, 88.1, 86.0, 87.5]
    got = common.paired(a, b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert (got["better"], got["worse"]) == (4, 1)
    with pytest.raises(ValueError, match="same >= 2 seeds"):
        common.paired(a, b[:4])


# ----------------------------------------------------------------------------------------------- zoo


def test_zoo_on_a_few_models(tmp_path):
    out = tmp_path / "zoo"
    specs = ["torchvision:resnet18", "timm:test_convnext", "timm:test_vit", "timm:crossvit_tiny_240", "torchvision:vit_h_14"]
    summary = zoo.main(["--models", *specs, "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    rows = {r["model"]: r for r in saved["rows"]}
    assert saved["run"]["command"] == "python -m benchmarks.zoo --models " + " ".join(specs) + f" --out {out}"
    assert {r["model"]: r["family"] for r in saved["rows"]} == {
        "resnet18": "torchvision", "test_convnext": "convnext", "test_vit": "vision_transformer", "crossvit_tiny_240": "crossvit",
        "vit_h_14": "torchvision"}
    assert rows["resnet18"]["status"] == "ok" and rows["resnet18"]["source"] == "fx"
    assert rows["resnet18"]["stages"] == 5 and rows["resnet18"]["max_abs_diff"] <= 1e-4
    assert rows["test_convnext"]["source"] == "feature_info" and rows["test_convnext"]["agree"]
    # A token backbone is wrapped on its blocks; CrossViT's two branches are refused with the reason.
    assert rows["test_vit"]["status"] == "ok" and rows["test_vit"]["max_abs_diff"] == 0.0
    assert all(name.startswith("blocks.") for name in rows["test_vit"]["stage_names"])
    assert rows["crossvit_tiny_240"]["status"] == "no-spatial" and "token backbone" in rows["crossvit_tiny_240"]["reason"]
    assert rows["vit_h_14"]["status"] == "excluded" and "params_m" not in rows["vit_h_14"]  # never built
    assert summary["wrapped"] == 3 and summary["all_checks_ok"] == 3 and summary["no_spatial_stages"] == 1
    md = out.with_suffix(".md").read_text()
    assert "python -m benchmarks.zoo --models" in md and "## Failures" in md


def test_zoo_reports_a_failure_with_its_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the ladder does not fit\nsecond line")

    monkeypatch.setattr(zoo, "wrap_with_ptl", broken)
    row = zoo.measure(resolve("timm:test_convnext"), "convnext")
    assert row["status"] == "fail" and row["step"] == "wrap"
    assert row["reason"] == "RuntimeError: the ladder does not fit"


def test_zoo_survives_a_killed_model_and_resumes(tmp_path, monkeypatch):
    """Each model runs in a child: one killed (as by the OOM killer) is a failed row, not the end of the run,
    also while another model is measured beside it (--jobs 2)."""
    measure = zoo.measure

    def killed_on_resnet18(spec, family):
        if spec.name == "resnet18":
            os.kill(os.getpid(), signal.SIGKILL)
        return measure(spec, family)

    monkeypatch.setattr(zoo, "measure", killed_on_resnet18)
    out = tmp_path / "zoo"
    specs = ["--models", "torchvision:resnet18", "timm:test_convnext", "--out", str(out)]
    zoo.main([*specs, "--jobs", "2"])
    table = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["model"] for r in table] == ["resnet18", "test_convnext"]  # the models' order, not finishing order
    rows = {r["model"]: r for r in table}
    assert rows["resnet18"]["status"] == "fail" and "SIGKILL" in rows["resnet18"]["reason"]
    assert rows["test_convnext"]["status"] == "ok"
    logged = out.with_suffix(".jsonl").read_text()

    monkeypatch.setattr(zoo, "measure", lambda spec, family: {"zoo": spec.zoo, "model": spec.name, "status": "ok"})
    summary = zoo.main([*specs, "--resume"])
    assert summary["resumed_rows"] == 2 and out.with_suffix(".jsonl").read_text() == logged  # nothing re-measured
    assert "resumed" in out.with_suffix(".md").read_text()


def test_zoo_jobs_run_models_side_by_side_and_a_large_input_alone(tmp_path, monkeypatch):
    """--jobs 2 measures two models at once, but never a large-input model beside another (two of them at
    once outgrew the 24 GB machine: one was killed by the OOM killer)."""

    def timed(spec, family):
        start = time.time()
        time.sleep(0.5)
        return {"zoo": spec.zoo, "model": spec.name, "status": "ok", "start": start, "end": time.time()}

    monkeypatch.setattr(zoo, "measure", timed)
    monkeypatch.setattr(zoo, "large_input", lambda spec: spec.name == "resnet34")
    out = tmp_path / "zoo"
    names = ["resnet18", "alexnet", "resnet34", "vgg11", "squeezenet1_0"]
    zoo.main(["--models", *[f"torchvision:{n}" for n in names], "--jobs", "2", "--out", str(out)])
    rows = {r["model"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    overlap = lambda a, b: rows[a]["start"] < rows[b]["end"] and rows[b]["start"] < rows[a]["end"]  # noqa: E731
    assert overlap("resnet18", "alexnet")  # two at once
    assert not any(overlap("resnet34", other) for other in names if other != "resnet34")


def test_zoo_jobs_below_one_is_a_usage_error_not_a_hang(capsys):
    from benchmarks._isolated import measure_each

    with pytest.raises(SystemExit):
        zoo.main(["--models", "torchvision:resnet18", "--jobs", "0"])
    assert "--jobs: '0' is not an integer >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="jobs=0 must be an integer >= 1"):
        list(measure_each([1, 2], lambda item: {}, jobs=0))


# ------------------------------------------------------------------------------ feature_info agreement


class _Tapped(nn.Module):
    """A network whose feature_info taps disagree with its stages in the three ways the benchmark names."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pre = nn.Conv2d(16, 16, 1)  # on the branch only: the skip bypasses it
        self.branch = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(16, 32, 1, stride=2)
        self.post = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.norm = nn.BatchNorm2d(32)  # a final top-level norm, which fx leaves to the head
        self.norm.running_mean.fill_(0.5)  # not the identity in eval
        self.fc = nn.Linear(32, 10)
        self.feature_info = [
            dict(num_chs=8, reduction=2, module="stem.0"),  # before the stem's ReLU: not the last at r2
            dict(num_chs=16, reduction=4, module="pre"),  # one branch: not a dominator
            dict(num_chs=32, reduction=8, module="norm"),  # the last dominator: fx could have chosen it
        ]

    def forward(self, x):
        x = self.block(self.stem(x))
        x = self.post(self.branch(self.pre(x)) + self.skip(x))
        return self.fc(self.norm(x).mean((2, 3)))


def test_agreement_diagnoses_each_unmatched_tap():
    model = _Tapped().eval()
    size = (3, 32, 32)
    fx_stages = find_stages(model, size, source="fx")
    assert [s.name for s in fx_stages] == ["stem", "block", "post"]
    row = _agreement.agreement(model, size, fx_stages, find_stages(model, size, source="feature_info"))
    assert row["matched"] == "0/3" and not row["agree"]
    assert [w[:3] for w in row["why"]] == [
        [2, "stem.0", "not-last"], [4, "pre", "not-a-dominator"], [8, "norm", "rule-compatible"],
    ]  # fmt: skip
    assert "stem.1" in row["why"][0][3]
    # A tap fx does output is matched, and needs no diagnosis.
    model.feature_info = [dict(num_chs=16, reduction=4, module="block")]
    row = _agreement.agreement(model, size, fx_stages, find_stages(model, size, source="feature_info"))
    assert row["matched"] == "1/1" and row["agree"] and "why" not in row


def test_agreement_summary_bounds_what_the_rule_can_reach(tmp_path):
    rows = [
        {"family": "a", "model": "a", "fx": "ok", "feature_info": "spatial", "agree": True, "matched": "4/4"},
        {"family": "b", "model": "b", "fx": "ok", "feature_info": "spatial", "agree": False, "matched": "3/4",
         "why": [[4, "x", "rule-compatible", ""]]},
        {"family": "c", "model": "c", "fx": "ok", "feature_info": "spatial", "agree": False, "matched": "1/3",
         "why": [[4, "x", "rule-compatible", ""], [8, "y", "not-last", ""]]},
        {"family": "d", "model": "d", "fx": "no-spatial", "feature_info": "not-spatial"},
    ]  # fmt: skip
    run = common.run_record("python -m benchmarks.feature_info_agreement --families a b c d")
    summary = agreement.write(rows, tmp_path / "fia", run)
    assert json.loads((tmp_path / "fia.json").read_text())["run"] == run
    assert summary["feature_info_spatial_compared"] == 3 and summary["feature_info_agree"] == 1
    assert summary["feature_info_contradicts_rule"] == 1 and summary["rule_ceiling_pct"] == 66.7
    assert (summary["feature_info_stages_matched"], summary["feature_info_stages_compared"]) == (8, 11)
    md = (tmp_path / "fia.md").read_text()
    assert "## Why the unmatched feature_info taps differ" in md and "| c | 8 | y | not-last |" in md
    assert "Made by `python -m benchmarks.feature_info_agreement --families a b c d`" in md


# ----------------------------------------------------------------------------------------------- prune


@pytest.mark.slow
def test_prune_quick_on_fashion_mnist_idx_files(tmp_path):
    from benchmarks import prune

    _write_fake_fashion_mnist(tmp_path / "fm")
    out = tmp_path / "prune"
    result = prune.main(["--quick", "--data-dir", str(tmp_path / "fm"), "--seeds", "0", "1", "--out", str(out)])
    a = result["accuracy"]
    rows = [r for r in a["rows"] if r["method"] != "unpruned"]
    assert {(r["target"], r["method"]) for r in rows} == {(t, m) for t in (0.5, 0.9) for m in prune.METHODS}
    for r in rows:  # every criterion reaches its parameter target (COP within 2%, the bisection within 1%)
        assert abs(r["params"] - r["target"]) <= 0.02, r
        assert 0 <= r["acc_bn"] <= 100 and 0 <= r["acc_ft"] <= 100
    pair = next(p for p in a["summary"]["pairs"] if p["target"] == 0.9 and p["cop"] == "cop-smaller"
                and p["other"] == "random" and p["key"] == "acc_ft")  # fmt: skip
    diffs = [x["acc_ft"] - y["acc_ft"] for x, y in zip(
        sorted((r for r in rows if r["method"] == "cop-smaller" and r["target"] == 0.9), key=lambda r: r["seed"]),
        sorted((r for r in rows if r["method"] == "random" and r["target"] == 0.9), key=lambda r: r["seed"]))]
    assert pair["mean"] == pytest.approx(sum(diffs) / 2) and pair["ci_low"] <= pair["mean"] <= pair["ci_high"]
    assert {p["preset"] for p in a["summary"]["presets"]} == {"balanced", "smaller", "faster"}
    assert result["speed"]["ratio"] > 0 and result["speed"]["model"] == "resnet18"
    md = out.with_suffix(".md").read_text()
    assert "python -m benchmarks.prune --quick" in md and "Paired differences" in md and "Preset ablation" in md
    assert json.loads(out.with_suffix(".json").read_text())["accuracy"]["rows"] == a["rows"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not out.with_suffix(".rows.json").exists()  # a finished run leaves no partial rows
    # An interrupted run's finished seeds are reported as such, never as the full run.
    rows = tmp_path / "interrupted.rows.json"
    rows.write_text(json.dumps({"command": "python -m benchmarks.prune", "seeds": [0, 1, 2, 3, 4],
                                "rows": [r for r in a["rows"] if r["seed"] == 0],
                                "ablation": [r for r in a["ablation"] if r["seed"] == 0]}))  # fmt: skip
    partial = prune.main(["--report-from", str(rows), "--quick", "--out", str(tmp_path / "partial")])
    assert partial["accuracy"]["seeds"] == [0] and not partial["accuracy"]["summary"]["pairs"]
    assert "PARTIAL: `python -m benchmarks.prune` was stopped after 1 of its 5 seeds" in (tmp_path / "partial.md").read_text()
    # Runs of other seeds merge into one report that names each run's seeds, command and commit.
    other = tmp_path / "other.rows.json"
    other.write_text(json.dumps({"command": "python -m benchmarks.prune --seeds 1", "commit": "abc1234",
                                 "rows": [r for r in a["rows"] if r["seed"] == 1],
                                 "ablation": [r for r in a["ablation"] if r["seed"] == 1]}))  # fmt: skip
    merged = prune.main(["--report-from", str(rows), str(other), "--quick", "--out", str(tmp_path / "merged")])
    assert merged["accuracy"]["seeds"] == [0, 1] and merged["accuracy"]["summary"] == a["summary"]
    assert "seeds [1] from `python -m benchmarks.prune --seeds 1` at commit abc1234" in merged["accuracy"]["partial"]
    # A finished run's results file is read too; with every seed it asked for, the report is not partial.
    whole = prune.main(["--report-from", str(out.with_suffix(".json")), "--quick", "--out", str(tmp_path / "whole")])
    assert "partial" not in whole["accuracy"] and "Reported from the rows of seeds [0, 1]" in (tmp_path / "whole.md").read_text()
    with pytest.raises(SystemExit, match=r"overlap: seeds \[0\]"):
        prune.main(["--report-from", str(rows), str(out.with_suffix(".json")), "--quick", "--out", str(tmp_path / "x")])


# ----------------------------------------------------------------------------------------------- what they share


def test_models_lists_torchvision_then_timm_families_and_names_each_selected_models_family(monkeypatch):
    selected = common.models(["torchvision:resnet18", "timm:test_convnext", "resnet50", "timm:test_vit"])
    assert selected == [(ZooModel("torchvision", "resnet18"), "torchvision"), (ZooModel("timm", "test_convnext"), "convnext"),
                        (ZooModel("torchvision", "resnet50"), "torchvision"),
                        (ZooModel("timm", "test_vit"), "vision_transformer")]  # fmt: skip
    assert common.models(["torchvision:resnet18", "timm:test_convnext"], zoos=("timm",)) == selected[1:2]
    monkeypatch.setattr(common, "torchvision_names", lambda: ("resnet18", "alexnet"))
    monkeypatch.setattr(common, "timm_families", lambda: {"vit": "vit_tiny", "convnext": "convnext_atto"})
    assert common.models() == [(ZooModel("torchvision", "resnet18"), "torchvision"),
                               (ZooModel("torchvision", "alexnet"), "torchvision"),
                               (ZooModel("timm", "convnext_atto"), "convnext"), (ZooModel("timm", "vit_tiny"), "vit")]  # fmt: skip
    assert [f for _, f in common.models(zoos=("timm",))] == ["convnext", "vit"]


def test_input_size_of_is_each_zoos_own():
    import torchvision

    assert common.input_size_of(ZooModel("torchvision", "inception_v3"), torchvision.models.inception_v3(init_weights=False)) == (3, 299, 299)
    timm_like = nn.Linear(1, 1)
    timm_like.pretrained_cfg = {"input_size": (3, 256, 192)}
    assert common.input_size_of(ZooModel("timm", "any"), timm_like) == (3, 256, 192)


def test_params_and_flops_count_a_convolution():
    conv = nn.Conv2d(3, 8, 3, bias=False).train()
    assert common.params(conv) == 8 * 3 * 3 * 3
    # batch 1 whatever the batch given: 8 outputs x 6 x 6 positions x 27 multiply-adds, 2 FLOPs each
    assert common.flops(conv, torch.randn(5, 3, 8, 8)) == 2 * 8 * 6 * 6 * 27
    assert not conv.training
    attention = nn.MultiheadAttention(16, 2, batch_first=True)  # torch's fused op: counted by bconv's counter
    assert common.flops(_SelfAttention(attention), torch.randn(1, 4, 16)) >= 2 * 4 * 16 * 3 * 16


class _SelfAttention(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def test_logits_finds_the_tensor_in_any_output():
    from torchvision.models.inception import InceptionOutputs

    t = torch.randn(2, 3)
    assert common.logits(t) is t
    assert common.logits(InceptionOutputs(t, torch.zeros(2, 3))) is t
    assert common.logits({"out": t, "aux": None}) is t
    assert common.logits(((t, 1), 2)) is t
    with pytest.raises(TypeError, match="returned str, not a tensor"):
        common.logits("t")
    with pytest.raises(TypeError, match="returned tuple"):
        common.logits(())


def test_first_line_is_the_type_and_the_messages_first_line():
    assert common.first_line(RuntimeError("\nthe ladder does not fit\nsecond line")) == "RuntimeError: the ladder does not fit"
    assert common.first_line(ValueError()) == "ValueError: "
    assert common.first_line(KeyError("x" * 500)) == ("KeyError: '" + "x" * 500)[:300]
    assert common.first_line(ValueError("a" * 50), 20) == "ValueError: aaaaaaaa"
    assert common.first_line(ValueError("no spatial stages\nbecause"), kind=False) == "no spatial stages"


def test_side_by_side_interleaves_the_steps_and_times_only_the_steps():
    now, calls = [0.0], []

    def step(name, seconds):
        def run():
            calls.append(name)
            now[0] += seconds
            return name.upper()

        return run

    def before(name):
        calls.append(f"before {name}")
        now[0] += 100.0  # untimed

    seen = []
    steps = {"a": step("a", 1.0), "b": step("b", 2.0), "c": step("c", 4.0)}
    clocks = {"fake": lambda: now[0], "wall": time.perf_counter}
    times = common.side_by_side(steps, 3, warmup=1, order="rotate", clocks=clocks, before=before,
                                after=lambda name, result, seconds: seen.append((name, result, seconds)))  # fmt: skip
    assert times["fake"] == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [4.0] * 3}  # the warm-up is not recorded
    assert [len(v) for v in times["wall"].values()] == [3, 3, 3]
    ran = [c for c in calls if not c.startswith("before")]
    assert ran == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warm-up, then rotated
    assert calls[:2] == ["before a", "a"] and len(calls) == 2 * len(ran)
    assert seen[:3] == [("a", "A", 1.0), ("b", "B", 2.0), ("c", "C", 4.0)]  # the first clock's seconds
    order = []
    common.side_by_side({"x": lambda: order.append("x"), "y": lambda: order.append("y")}, 4, order="alternate")
    assert order == ["x", "y", "y", "x", "x", "y", "y", "x"]  # ABBA
    assert common.ratios(times["fake"]["c"], times["fake"]["b"]) == [2.0] * 3
    with pytest.raises(ValueError, match="order must be one of"):
        common.side_by_side(steps, 1, order="random")


def test_write_results_writes_both_files_and_the_run_under_one_key(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "commit", lambda: "abc1234-dirty")
    run = common.run_record("python -m benchmarks.zoo --jobs 2")
    assert set(run) == {"command", "commit", "environment"} and run["commit"] == "abc1234-dirty"
    assert "commit" not in run["environment"] and {"torch", "threads", "cpus", "platform"} <= set(run["environment"])
    earlier = {**common.environment(), "load": 9.5}  # taken at the start of a run
    assert common.run_record("x", earlier)["environment"]["load"] == 9.5
    out = tmp_path / "deeper" / "result"
    common.write_results(out, {"run": run, "rows": [{"a": 1}]}, ["# Title", "", "text"])
    assert json.loads(out.with_suffix(".json").read_text()) == {"run": run, "rows": [{"a": 1}]}
    assert out.with_suffix(".md").read_text() == "# Title\n\ntext\n"
    with pytest.raises(ValueError, match="run_record"):
        common.write_results(tmp_path / "bare", {"command": "python -m benchmarks.zoo", "rows": []}, [])
    assert not (tmp_path / "bare.json").exists()


def _wrapped_resnet18(size: int = 32):
    import torchvision

    common.seeded(0)
    return bconv.wrap_with_ptl(torchvision.models.resnet18(), input_size=(3, size, size))


def test_hand_wired_ptl_resnet_computes_what_the_wrapped_model_computes():
    """The reference of benchmarks.overhead, for any torchvision ResNet: its explicit forward is the wrapped
    model's function, in eval and in training (the cells' state included), and it changes nothing it copies."""
    wrapped = _wrapped_resnet18()
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    hand = common.HandWiredPTLResNet(wrapped)
    assert hand.ptl is not wrapped.ptl and all(torch.equal(v, wrapped.state_dict()[k]) for k, v in before.items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hand.eval()(x), wrapped.eval()(x))
        for _ in range(2):  # the second forward reads the state the first one left
            torch.testing.assert_close(hand.train()(x), wrapped.train()(x))
            hand.detach_state()
            wrapped.detach_state()
    with pytest.raises(ValueError, match="wrapped at every stage"):
        common.HandWiredPTLResNet(bconv.wrap_with_ptl(transfer.SmallResNet(3, 5, 4), input_size=(3, 16, 16)))


def test_overhead_measures_the_hand_wired_reference_side_by_side():
    from benchmarks import overhead

    row = overhead.measure_hand_wired(2, 2, torch.device("cpu"), size=32, spec_name="torchvision:resnet18")
    assert row["model"] == "torchvision:resnet18" and row["clock"] == "cpu" and row["repeats"] == 2
    for clock in ("cpu", "wall"):
        assert len(row[f"ratios_{clock}"]) == 2 and row[f"step_s_hand_{clock}"] > 0
        assert row[f"time_ratio_{clock}_min"] <= row[f"time_ratio_{clock}"] <= row[f"time_ratio_{clock}_max"]
    assert row["time_ratio"] == row["time_ratio_cpu"]


def test_overhead_runs_and_writes_its_results(tmp_path):
    from benchmarks import overhead

    out = tmp_path / "overhead"
    argv = ["--models", "torchvision:squeezenet1_1", "--batch", "2", "--repeats", "2", "--hand-wired-repeats", "0",
            "--out", str(out)]  # fmt: skip
    overhead.main(argv)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["run"]["command"] == "python -m benchmarks.overhead " + " ".join(argv)
    assert saved["device"] == "cpu" and saved["hand_wired"] is None
    (row,) = saved["rows"]
    assert row["params_ptl"] > row["params_plain"] and row["flops_ptl"] > row["flops_plain"] > 0
    assert row["flop_ratio"] == row["flops_ptl"] / row["flops_plain"] and row["memory_ptl"] > 0
    assert row["time_ratio_min"] <= row["time_ratio"] <= row["time_ratio_max"]
    # the recomputed ladder keeps less than the stored one; a frozen backbone (head trains) less than both
    assert row["memory_frozen"] < row["memory_ptl"] < row["memory_stored"] and row["head"] == ["classifier"]
    assert 0 < row["memory_frozen_stage_outputs"] < row["memory_frozen"] and row["frozen_time_ratio"] > 0
    assert f"Made by `{saved['run']['command']}`" in out.with_suffix(".md").read_text()


def test_find_stages_speed_runs_and_writes_its_results(tmp_path):
    from benchmarks import find_stages_speed

    out = tmp_path / "speed"
    find_stages_speed.main(["--models", "torchvision:resnet18@64", "--repeats", "2", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    (row,) = saved["rows"]
    assert row["input_size"] == [3, 64, 64] and row["ratio_to_forward"]["forward"] == 1.0
    assert list(row["all_s"]) == ["forward", "find_stages", 'find_stages(source="fx")', "wrap_with_ptl"]
    assert all(len(v) == 2 for v in row["all_s"].values())
    assert saved["run"]["command"].startswith("python -m benchmarks.find_stages_speed --models")
    assert "| torchvision:resnet18 | 64x64 |" in out.with_suffix(".md").read_text()


def test_cells_prints_each_configuration_and_the_command(capsys):
    from benchmarks import cells

    cells.main(["--channels", "8", "--size", "8", "--batch", "2", "--repeats", "3", "--warmup", "0"])
    printed = capsys.readouterr().out.splitlines()
    row = next(line for line in printed if line.startswith("   8     8x8"))
    assert len(row.split("|")) == 3  # the configuration, the times, the ratios
    assert printed[-1] == "reproduce: python -m benchmarks.cells --channels 8 --size 8 --batch 2 --repeats 3 --warmup 0"
