"""Fine-tuning experiment: does PTL improve fine-tuning of a pre-trained backbone?

The PTL paper reports that PTL improves fine-tuning (CIFAR-10 error 5.92% -> 5.62% with DenseNet-100,
PTL-v2 5.38%). This script tests the claim in a transfer setting, with every condition on the same
backbone, data, schedule and seeds, and each condition's learning rate tuned on a validation split.

**Transfer setting.** The classes of the dataset are split in two halves: the backbone is pre-trained
on the first half (the source task), then fine-tuned on the second half (the target task), as PTL is
meant to be used. Digits: pre-train on 0-4, fine-tune on 5-9.

**Data** (``--dataset``), all loaded into memory, scaled to [0, 1] and normalised per channel with the
source training set's statistics:

* ``digits`` (default): scikit-learn's bundled handwritten digits (1797 8x8 grey images, nothing is
  downloaded), upsampled to 16x16 (bilinear) so the third stage still has 4x4 pixels. One pool, split
  per class with a fixed seed: source 80% train / 20% test; target 40% train / 20% val / 40% test.
* ``fashion-mnist [--data-dir DIR]``: Zalando's Fashion-MNIST (70,000 28x28 grey images, 10 classes), read
  from its four IDX files (gzipped or not), by default where ``apt-get install dataset-fashion-mnist`` puts
  them (``/usr/share/datasets/fashion-mnist``). Source: T-shirt/top, Trouser, Pullover, Dress, Coat, all
  30,000 training images; target: Sandal, Shirt, Sneaker, Bag, Ankle boot with a limited labelled budget,
  ``--budget`` (default 20) training and ``--val-per-class`` (default 100) validation images per class drawn
  from the target's training images (``BUDGET_REASON`` says why 20); test: the official 5,000 test images of
  the target classes. Random crop (4-pixel zero padding) and horizontal flip in training. Defaults for it:
  1 pre-training epoch (938 steps) done once for all seeds (``--pretrain once``), 12 fine-tuning epochs and
  the lr grid 0.01 0.03 0.1, so that the whole run fits an hour on 2 cores shared with other jobs.
* ``cifar10 --data-dir DIR``: torchvision's ``CIFAR10(DIR, download=False)`` (``DIR/cifar-10-batches-py``).
  The official test set is the test split; 20% of the target classes' training images per class are
  the validation split. Random crop (4-pixel zero padding) and horizontal flip in training.
* ``folder --data-dir DIR``: ``torchvision.datasets.ImageFolder(DIR)`` (``DIR/<class>/<image>``, at least 4
  classes), images resized to ``--image-size`` (default 32); classes in sorted order, the first half is the
  source. Split as digits; crop and flip as CIFAR-10.

**Backbone.** A small ResNet (``SmallResNet``): a 3x3 conv stem, then three stages of basic residual
blocks at strides 1, 2, 2 (``width``, ``2*width``, ``4*width`` channels), global average pooling and a
linear classifier. ``bconv.find_stages`` finds its three stages (``layer1``, ``layer2``, ``layer3``), where
PTL pairs its cells (library defaults: ``cell_width=fuse_width=1/8``, identity-initialised final fusion;
``--final-init paper`` for the paper's random init). The results report how much the fine-tuned final
fusion draws on the ladder (``ladder_weight_ratio``).

**Pre-training** (once per seed, the same for every condition of that seed; ``--pretrain once``, the
default for Fashion-MNIST: the first seed's backbone for every seed, so the seeds vary fine-tuning only): SGD (momentum 0.9, weight
decay 5e-4, lr 0.05, cosine schedule), batch 32, ``--source-epochs`` epochs, on the source training split.

**Conditions** (fine-tuning from the seed's pre-trained backbone with a new, seeded classifier):

* ``plain``: fine-tune the whole backbone;
* ``ptl_v1``, ``ptl_v2``: ``wrap_with_ptl(backbone, cell="v1"|"v2")``, everything trained;
  ``reset_state()`` at the start of every epoch, ``detach_state()`` after every step; evaluated in eval
  mode (zero state, as in the paper);
* ``rollback``: ``bconv.rollback.Rollback.run`` over ``--rollback-periods`` periods that split the same
  epoch budget; lr ``lr`` for rolled-back stages and the head, ``lr/10`` for kept stages, ``10*lr`` for the
  head in the first period (the released code's ratios around its 0.01), a fresh optimizer and cosine
  schedule per period;
* ``std``: a plain backbone trained with ``bconv.distill.STDTrainer`` (lam 0.8), the teacher being the
  ``ptl_v1`` model of the same seed trained at ``ptl_v1``'s selected learning rate.

Every condition uses SGD (momentum 0.9, weight decay 5e-4), batch 32, a cosine schedule over
``--epochs`` epochs, the same data order and augmentation per seed, and each learning rate of ``--lrs``.
**Learning-rate tuning, the same for every condition:** each condition's lr is the one with the best mean
final validation accuracy over the seeds (ties: lower mean validation loss); the test split is never used
to choose. The validation split is evaluated after the last epoch (of every rollback period), the test split
only afterwards, for the selected lr's runs, from the weights saved after every epoch. The reported numbers are the test accuracies of the selected lr, with the paired
per-seed differences against plain and their 95% t-interval over the seeds, and retrieval on the target
test set from ``bconv.distill.pooled_features`` (each test image queries all the others by cosine
similarity; mAP and rank-1, the paper's ReID metrics).

**Ablation** (``--ablation``): ptl_v1 at its selected lr, on the same seeds, with one change each: the
state reset never instead of every epoch, the other ``state_mode`` (``pooled``), the other ``final_init``.

Writes ``benchmarks/results/transfer.json``, ``.md`` and ``.png`` (``transfer_<dataset>`` for the other
datasets; test accuracy per epoch, mean and min-max band over the seeds, on at most 50 test images per
class, the final numbers on the whole test split). Every number written was measured in that run.

Reproduce::

    pip install -e ".[bench]"
    python -m benchmarks.transfer                        # digits, the committed results
    python -m benchmarks.transfer --quick --out /tmp/t   # a smoke run of every condition, about a minute
    python -m benchmarks.transfer --dataset fashion-mnist --ablation   # apt-get install dataset-fashion-mnist
    python -m benchmarks.transfer --dataset cifar10 --data-dir ~/data --per-class 500
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bconv import wrap_with_ptl
from bconv.distill import STDTrainer, pooled_features
from bconv.rollback import Rollback

from benchmarks.common import (FASHION_MNIST_DIR, RESULTS, Split, balanced_subset, command as run_command, crop_flip,
                               evaluate, load_cifar10, load_digits, load_fashion_mnist, load_folder, mean_std, paired,
                               per_class_counts, per_class_split, relabel, resize, retrieval_metrics, train_epochs)  # fmt: skip

CONDITIONS = ("plain", "ptl_v1", "ptl_v2", "rollback", "std")
SPLIT_SEED = 0  # the data split is fixed; run seeds vary initialisation, data order and augmentation
#: the per-epoch test curves use at most this many test images per class (the final numbers use all)
CURVE_TEST_PER_CLASS = 50
#: Fashion-MNIST's labelled target budget per class, and validation images per class (see BUDGET_REASON)
BUDGET, VAL_PER_CLASS = 20, 100
BUDGET_REASON = (
    "{budget} labelled training images per target class (and {val} more per class for validation, from the "
    "target's training images), fixed before any result was seen, from an a-priori estimate rather than a pilot run. The reason: on the five target classes "
    "(footwear, bags, shirts) a small CNN trained on all 6000 images per class errs on about 2% of the test "
    "images (published baselines); learning curves of image classifiers fall roughly as n^-1/2, which puts training from scratch on "
    "{budget} per class near {scratch:.0f}% error (2% x sqrt(6000/{budget})), and transfer from the related source classes is expected to recover "
    "most but not all of that: plain fine-tuning should land around 85-90%, with room above it for a method "
    "that helps and below it for one that hurts."
)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class TransferData:
    """The source task (pre-training) and the target task (fine-tuning) of one dataset."""

    name: str
    source_classes: list[str]
    target_classes: list[str]
    source_train: Split
    source_test: Split
    target_train: Split
    target_val: Split
    target_test: Split
    augment: bool
    split: str = ""
    budget_reason: str = ""

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.source_train.x.shape[1:])  # type: ignore[return-value]

    def sizes(self) -> dict[str, int]:
        names = ("source_train", "source_test", "target_train", "target_val", "target_test")
        return {k: len(getattr(self, k)) for k in names}


def make_data(
    dataset: str,
    data_dir: Path | None,
    image_size: int | None,
    per_class: int | None,
    budget: int | None = None,
    val_per_class: int | None = None,
) -> TransferData:
    """Load ``dataset`` and split it into the source and target tasks (see the module docstring).

    ``budget`` and ``val_per_class`` (both or neither, official test sets only): the target task's
    labelled images per class for training and for validation, drawn from its training images.
    """
    if dataset not in ("digits", "fashion-mnist") and data_dir is None:
        raise SystemExit(f"--dataset {dataset} needs --data-dir DIR")
    if dataset == "cifar10":
        size = image_size or 32
        x, y, names = load_cifar10(data_dir, True, size)
        x_test, y_test, _ = load_cifar10(data_dir, False, size)
    elif dataset == "fashion-mnist":
        x, y, names = load_fashion_mnist(data_dir or FASHION_MNIST_DIR, True)
        x_test, y_test, _ = load_fashion_mnist(data_dir or FASHION_MNIST_DIR, False)
        x, x_test = resize(x, image_size or 28), resize(x_test, image_size or 28)
    else:
        x, y, names = load_digits(image_size or 16) if dataset == "digits" else load_folder(data_dir, image_size or 32)
        x_test = y_test = None
    if len(names) < 4:
        raise SystemExit(f"{dataset} has {len(names)} classes; the transfer setting needs at least 4 (2 + 2)")
    half = len(names) // 2
    source, target = list(range(half)), list(range(half, len(names)))
    src, tgt = relabel(x, y, source), relabel(x, y, target)
    if x_test is None:  # one pool: split it per class
        s_train, s_test = per_class_split(src.y, (0.8, 0.2), SPLIT_SEED)
        t_train, t_val, t_test = per_class_split(tgt.y, (0.4, 0.2, 0.4), SPLIT_SEED)
        source_test, target_test = Split(src.x[s_test], src.y[s_test]), Split(tgt.x[t_test], tgt.y[t_test])
        split = "one pool split per class: source 80/20 train/test, target 40/20/40 train/val/test"
    else:  # the official test set is the test split
        s_train = torch.arange(len(src))
        if budget is not None:  # a limited labelled budget: the rest of the target's training images is unused
            t_train, t_val = per_class_counts(tgt.y, (budget, val_per_class), SPLIT_SEED)
            split = (f"source: all training images, official test; target: {budget} training + {val_per_class} "
                     f"validation images per class from the training images, official test")  # fmt: skip
        else:
            t_train, t_val = per_class_split(tgt.y, (0.8, 0.2), SPLIT_SEED)
            split = "source: all training images, official test; target: training images 80/20 train/val, official test"
        source_test, target_test = relabel(x_test, y_test, source), relabel(x_test, y_test, target)
    splits = [
        Split(src.x[s_train], src.y[s_train]),
        source_test,
        Split(tgt.x[t_train], tgt.y[t_train]),
        Split(tgt.x[t_val], tgt.y[t_val]),
        target_test,
    ]
    splits = [balanced_subset(s, per_class) for s in splits]
    mean = splits[0].x.mean(dim=(0, 2, 3), keepdim=True)
    std = splits[0].x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    splits = [Split((s.x - mean) / std, s.y) for s in splits]
    reason = ""
    if budget is not None:
        reason = (BUDGET_REASON if dataset == "fashion-mnist" else "{budget} labelled training images per target class "
                  "and {val} per class for validation (--budget, --val-per-class).").format(budget=budget, val=val_per_class, scratch=2 * math.sqrt(6000 / budget))  # fmt: skip
    return TransferData(dataset, [names[c] for c in source], [names[c] for c in target], *splits,
                        augment=dataset != "digits", split=split, budget_reason=reason)  # fmt: skip


# ----------------------------------------------------------------------------------------------- backbone


class BasicBlock(nn.Module):
    """The residual block of ResNet-18: two 3x3 conv-BN, a projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for small images: stem, three stages (strides 1, 2, 2), global pooling, ``fc``.

    Args:
        in_channels: image channels.
        num_classes: outputs of ``fc``.
        width: channels of the first stage (then ``2*width``, ``4*width``).
        blocks: basic blocks per stage.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        widths = (width, 2 * width, 4 * width)
        layers = []
        for i, (c_in, c_out) in enumerate(zip((width, *widths[:-1]), widths)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(*[BasicBlock(c_in if b == 0 else c_out, c_out, stride if b == 0 else 1)
                                          for b in range(blocks)]))  # fmt: skip
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# ----------------------------------------------------------------------------------------------- training


@dataclass
class Config:
    """The schedule shared by every condition (see the module docstring)."""

    epochs: int = 15
    source_epochs: int = 15
    batch_size: int = 32
    source_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 16
    blocks: int = 1
    lam: float = 0.8
    rollback_periods: int = 3
    final_init: str = "identity"
    state_mode: str = "per_sample"
    reset: str = "epoch"  # PTL's state: "epoch" (reset at the start of every epoch, the paper's) or "never"
    pretrain: str = "each"  # "each" seed pre-trains its own backbone, or "once" (the first seed's, for all)
    lrs: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03, 0.1])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])


def _sgd(params, lr: float, cfg: Config) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

def _fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[Tensor, Tensor], None],
    train: Split,
    epochs: int,
    gen: torch.Generator,
    cfg: Config,
    augment: bool,
    evaluate_on: dict[str, Split],
    bar=None,
    snapshots: list[dict[str, Tensor]] | None = None,
    evaluate_last_only: bool = False,
) -> list[dict[str, float]]:
    """``common.train_epochs`` under ``cfg``; returns the evaluations after each epoch.

    With ``snapshots``, the weights after every epoch are appended to it, to be evaluated on the test split
    once the lr is selected. With ``evaluate_last_only``, ``evaluate_on`` is evaluated after the last epoch
    only (the lr selection reads nothing else), and the other epochs' points start empty.
    """

    def after_epoch(epoch: int) -> dict[str, float]:
        if snapshots is not None:
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        point: dict[str, float] = {}
        if not evaluate_last_only or epoch == epochs - 1:
            for name, split in evaluate_on.items():
                point[f"{name}_acc"], point[f"{name}_loss"] = evaluate(model, split)
        return point

    return train_epochs(model, optimizer, train, epochs, gen, batch_size=cfg.batch_size,
                        augment=crop_flip if augment else None, step=step, reset_state=cfg.reset == "epoch",
                        after_epoch=after_epoch, bar=bar)  # fmt: skip


def pretrain(data: TransferData, seed: int, cfg: Config, bar=None) -> tuple[dict[str, Tensor], float]:
    """The seed's backbone trained on the source task: ``(state_dict, source test accuracy %)``."""
    torch.manual_seed(seed)
    model = SmallResNet(data.input_size[0], len(data.source_classes), cfg.width, cfg.blocks)
    optimizer = _sgd(model.parameters(), cfg.source_lr, cfg)
    gen = torch.Generator().manual_seed(seed)
    curve = _fit(
        model, optimizer, None, data.source_train, cfg.source_epochs, gen, cfg,
        data.augment, {"source_test": data.source_test}, bar,
    )  # fmt: skip
    return copy.deepcopy(model.state_dict()), curve[-1]["source_test_acc"]


def target_backbone(data: TransferData, pretrained: dict[str, Tensor], seed: int, cfg: Config) -> SmallResNet:
    """The pre-trained backbone with a new classifier for the target task, initialised from ``seed``."""
    model = SmallResNet(data.input_size[0], len(data.source_classes), cfg.width, cfg.blocks)
    model.load_state_dict(pretrained)
    torch.manual_seed(seed)
    model.fc = nn.Linear(model.fc.in_features, len(data.target_classes))
    return model


def finetune(
    condition: str,
    data: TransferData,
    pretrained: dict[str, Tensor],
    lr: float,
    seed: int,
    cfg: Config,
    teacher: nn.Module | None = None,
    bar=None,
    snapshots: list[dict[str, Tensor]] | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Fine-tune the seed's pre-trained backbone on the target task under ``condition``.

    Returns:
        The trained model and one point per epoch, the last (of every rollback period) with the validation
        accuracy and loss (the test split is evaluated later, from ``snapshots``, and only for the selected lr).
    """
    model: nn.Module = target_backbone(data, pretrained, seed, cfg)
    gen = torch.Generator().manual_seed(seed)
    common = dict(train=data.target_train, gen=gen, cfg=cfg, augment=data.augment, bar=bar,
                  evaluate_on={"val": data.target_val}, snapshots=snapshots, evaluate_last_only=True)  # fmt: skip
    if condition in ("ptl_v1", "ptl_v2"):
        model = wrap_with_ptl(model, cell=condition[-2:], input_size=data.input_size, final_init=cfg.final_init,
                              state_mode=cfg.state_mode)  # fmt: skip
    if condition in ("plain", "ptl_v1", "ptl_v2"):
        optimizer = _sgd(model.parameters(), lr, cfg)
        return model, _fit(model, optimizer, None, epochs=cfg.epochs, **common)
    if condition == "std":
        if teacher is None:
            raise ValueError("the std condition needs a teacher (the ptl_v1 model of the same seed)")
        trainer = STDTrainer(model, teacher, lam=cfg.lam, input_size=data.input_size)
        optimizer = _sgd(trainer.parameters(), lr, cfg)
        step = lambda x, y: trainer.step(x, y, optimizer)  # noqa: E731
        return model, _fit(model, optimizer, step, epochs=cfg.epochs, **common)
    if condition == "rollback":
        per_period = cfg.epochs // cfg.rollback_periods
        rollback = Rollback(model, input_size=data.input_size)

        def period(model: nn.Module, optimizer: torch.optim.Optimizer, index: int) -> list[dict[str, float]]:
            return _fit(model, optimizer, None, epochs=per_period, **common)

        curves = rollback.run(
            period, cfg.rollback_periods, make_optimizer=lambda groups: _sgd(groups, lr, cfg),
            lr_rolled=lr, lr_kept=lr / 10, lr_head=lr, lr_head_first=10 * lr,
        )  # fmt: skip
        return model, [point for curve in curves for point in curve]
    raise ValueError(f"unknown condition {condition!r}; choose from {', '.join(CONDITIONS)}")


def ladder_weight_ratio(model: nn.Module) -> float:
    """``||W_ladder|| / ||W_backbone||`` of a PTL model's final fusion ``out = W_backbone x_n + W_ladder y_n``.

    How much the last stage's output draws on the ladder (0 at bconv's identity init).
    """
    weight = model.ptl.final_fuse.weight.detach().flatten(1)
    n = model.stages[-1].channels
    return float(weight[:, n:].norm() / weight[:, :n].norm())


@torch.no_grad()
def _features(model: nn.Module, split: Split, batch_size: int = 256) -> Tensor:
    """``bconv.distill.pooled_features`` of ``split`` in eval mode (PTL: zero state), ``[N, D]``."""
    model.eval()
    return torch.cat([pooled_features(model, split.x[i : i + batch_size]) for i in range(0, len(split), batch_size)])


def evaluate_test(record: dict, model: nn.Module, snapshots: list[dict[str, Tensor]], data: TransferData,
                  curve_test: Split) -> None:  # fmt: skip
    """Fill in ``record`` (a run of a selected lr) with its test numbers, in place.

    Every epoch's ``test_acc`` on ``curve_test`` (from the epoch's snapshot), the final model's accuracy
    and loss on the whole test split, and its retrieval mAP and rank-1 there, from one pass
    (``bconv.distill.pooled_features``, then the classifier ``fc`` on them, checked against ``model(x)``).
    ``model`` ends with its final weights.
    """
    for point, state in zip(record["curve"], snapshots, strict=True):
        model.load_state_dict(state)
        point["test_acc"], point["test_loss"] = evaluate(model, curve_test)
    # One pass gives both: the logits are the classifier applied to the pooled features.
    features = _features(model, data.target_test)
    classifier = getattr(model, "model", model).fc
    check = data.target_test.x[:64]
    with torch.no_grad():
        logits = classifier(features)
        torch.testing.assert_close(classifier(pooled_features(model, check)), model(check))
    record["test_acc"] = 100.0 * float((logits.argmax(1) == data.target_test.y).float().mean())
    record["test_loss"] = float(F.cross_entropy(logits, data.target_test.y))
    record["retrieval"] = retrieval_metrics(features, data.target_test.y)


# ----------------------------------------------------------------------------------------------- the experiment


def select_lr(runs: list[dict], condition: str) -> float:
    """The lr with the best mean final validation accuracy over seeds (ties: the lower mean validation loss)."""
    scores = {}
    for lr in sorted({r["lr"] for r in runs if r["condition"] == condition}):
        finals = [r["curve"][-1] for r in runs if r["condition"] == condition and r["lr"] == lr]
        scores[lr] = (statistics.fmean(p["val_acc"] for p in finals), -statistics.fmean(p["val_loss"] for p in finals))
    return max(scores, key=scores.get)


def _summary(chosen: list[dict]) -> dict:
    """Final test accuracy, retrieval and the test curve over the seeds of one condition's chosen runs."""
    finals = [r["test_acc"] for r in chosen]
    mean, std = mean_std(finals)
    epochs = len(chosen[0]["curve"])
    per_epoch = [[r["curve"][e]["test_acc"] for r in chosen] for e in range(epochs)]
    out = {
        "lr": chosen[0]["lr"],
        "seeds": [r["seed"] for r in chosen],
        "test_acc": finals,
        "test_acc_mean": mean,
        "test_acc_std": std,
        "test_acc_min": min(finals),
        "test_acc_max": max(finals),
        "val_acc_mean": statistics.fmean(r["curve"][-1]["val_acc"] for r in chosen),
        "curve_mean": [statistics.fmean(v) for v in per_epoch],
        "curve_min": [min(v) for v in per_epoch],
        "curve_max": [max(v) for v in per_epoch],
    }
    for metric in ("map", "rank1"):
        values = [r["retrieval"][metric] for r in chosen]
        out[metric], (out[f"{metric}_mean"], out[f"{metric}_std"]) = values, mean_std(values)
    if "ladder_weight_ratio" in chosen[0]:
        out["ladder_weight_ratio_mean"] = statistics.fmean(r["ladder_weight_ratio"] for r in chosen)
    return out


def summarise(runs: list[dict], conditions: Sequence[str], selected: dict[str, float]) -> dict[str, dict]:
    """Per condition at its selected lr: final test accuracy and retrieval over seeds, the mean curve, and
    the paired differences against plain (95% t-intervals)."""
    results: dict[str, dict] = {}
    for c in conditions:
        chosen = sorted((r for r in runs if r["condition"] == c and r["lr"] == selected[c] and not r.get("variant")),
                        key=lambda r: r["seed"])  # fmt: skip
        results[c] = _summary(chosen)
    if "plain" in results:
        for c in conditions:
            if c != "plain":
                for metric in ("test_acc", "map", "rank1"):
                    results[c][f"{metric}_vs_plain"] = paired(results[c][metric], results["plain"][metric])
    return results


def ablation_variants(cfg: Config) -> dict[str, tuple[str, Config]]:
    """The ablation of bconv's departures from the paper: ``name -> (what changes, config)``."""
    other_init = "paper" if cfg.final_init == "identity" else "identity"
    other_reset = "never" if cfg.reset == "epoch" else "epoch"
    other_mode = "pooled" if cfg.state_mode == "per_sample" else "per_sample"
    return {
        f"reset {other_reset}": (f"reset the state every {cfg.reset} -> {other_reset}", replace(cfg, reset=other_reset)),
        f"state {other_mode}": (f"state_mode {cfg.state_mode} -> {other_mode}", replace(cfg, state_mode=other_mode)),
        f"init {other_init}": (f"final_init {cfg.final_init} -> {other_init}", replace(cfg, final_init=other_init)),
    }


def plot(results: dict[str, dict], title: str, path: Path) -> None:
    """Mean test accuracy per epoch for each condition with the min-max band over the seeds: all epochs
    on the left, the second half zoomed on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=110)
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1))]
    epochs = len(next(iter(results.values()))["curve_mean"])
    zoom_from = epochs // 2  # index of the first epoch shown on the right
    for ax, first in zip(axes, (0, zoom_from)):
        for (condition, r), style in zip(results.items(), styles):
            x = range(first + 1, epochs + 1)
            label = f"{condition} (lr {r['lr']:g}): {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}%"
            (line,) = ax.plot(x, r["curve_mean"][first:], linestyle=style, marker=".", label=label)
            ax.fill_between(x, r["curve_min"][first:], r["curve_max"][first:], color=line.get_color(), alpha=0.12)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("fine-tuning epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("target test accuracy (%)")
    axes[0].set_title("all epochs", fontsize=9)
    axes[1].set_title(f"epochs {zoom_from + 1}-{epochs}, zoomed", fontsize=9)
    axes[1].legend(fontsize=8, loc="best", title_fontsize=7,
                   title="final epoch: mean ± std over seeds; bands: min-max")  # fmt: skip
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)




def _ci(p: dict) -> str:
    return f"{p['mean']:+.2f} [{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]"


def write_markdown(report: dict, path: Path) -> None:
    cfg, results, data = report["config"], report["results"], report["data"]
    n = len(cfg["seeds"])
    split = data["split"]
    lines = [
        "# Fine-tuning experiment: plain fine-tuning vs PTL (and STD, rolling back)",
        "",
        f"Made by `{report['command']}` in {report['wall_s'] / 60:.1f} minutes (torch {report['torch']}, "
        f"CPU threads: {report['threads']}, {report['cpus']} CPUs; 1-minute load average {report['load_start']:.1f} at "
        f"the start, {report['load_end']:.1f} at the end, {report['load_mean']:.1f} on average over the runs). See the docstring of `benchmarks/transfer.py` for the "
        "design.",
    ]
    if report.get("note"):
        lines += ["", f"Note: {report['note']}"]
    lines += [
        "",
        f"- data: `{data['dataset']}`, input {'x'.join(map(str, data['input_size']))}; source classes "
        f"{', '.join(data['source_classes'])}; target classes {', '.join(data['target_classes'])}",
        "- split sizes: " + ", ".join(f"{k} {v}" for k, v in data["sizes"].items()) + f" ({split})",
        f"- backbone: SmallResNet(width={cfg['width']}, blocks={cfg['blocks']}), "
        f"{report['backbone_params']} parameters; PTL v1 adds {report['ptl_params']['ptl_v1']}, "
        f"v2 adds {report['ptl_params']['ptl_v2']} (final fusion initialised `{cfg['final_init']}`, state "
        f"`{cfg['state_mode']}`, reset every `{cfg['reset']}`)",
        f"- pre-training: {cfg['source_epochs']} epochs, lr {cfg['source_lr']:g}, "
        + ("one backbone per seed" if cfg["pretrain"] == "each" else
           f"once (seed {cfg['seeds'][0]}), the same backbone for every seed")  # fmt: skip
        + "; source test accuracy: "
        + ", ".join(f"{p['source_test_acc']:.1f}% (seed {p['seed']})" for p in report["pretrain"]),
        f"- fine-tuning: {cfg['epochs']} epochs, batch {cfg['batch_size']}, SGD momentum {cfg['momentum']:g}, "
        f"weight decay {cfg['weight_decay']:g}, cosine schedule; seeds {cfg['seeds']}; lr grid {cfg['lrs']} "
        f"tuned per condition on the validation split",
    ]
    if data.get("budget_reason"):
        lines += ["", f"**Labelled budget.** {data['budget_reason']}"]
    lines += [
        "",
        f"## Final target test accuracy ({n} seeds, selected lr, all {data['sizes']['target_test']} test images)",
        "",
        "Differences are paired by seed (same pre-trained backbone, data order and augmentation), with a "
        f"two-sided 95% t-interval over the {n} seeds.",
        "",
        "| condition | lr (selected on val) | val acc mean | test acc mean ± std | min | max "
        "| difference vs plain, mean [95% CI] | seeds better / worse than plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, r in results.items():
        gain = _ci(r["test_acc_vs_plain"]) if "test_acc_vs_plain" in r else ""
        better = f"{r['test_acc_vs_plain']['better']} / {r['test_acc_vs_plain']['worse']}" if gain else ""
        lines.append(
            f"| {c} | {r['lr']:g} | {r['val_acc_mean']:.2f} | **{r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}** "
            f"| {r['test_acc_min']:.2f} | {r['test_acc_max']:.2f} | {gain} | {better} |"
        )
    lines += ["", f"One target test image is {100 / data['sizes']['target_test']:.3g} points of accuracy.", "",
              "Per seed (test accuracy %):", "",
              "| condition | " + " | ".join(f"seed {s}" for s in cfg["seeds"]) + " |",
              "|---|" + "---|" * n]  # fmt: skip
    for c, r in results.items():
        lines.append(f"| {c} | " + " | ".join(f"{a:.2f}" for a in r["test_acc"]) + " |")
    lines += [
        "",
        "## Retrieval on the target test set (the paper's ReID metrics)",
        "",
        "`bconv.distill.pooled_features` of the final model (eval mode); each test image queries all the "
        "others (never itself) by cosine similarity; relevant = same class.",
        "",
        "| condition | mAP mean ± std | mAP vs plain [95% CI] | rank-1 mean ± std | rank-1 vs plain [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for c, r in results.items():
        vs = [_ci(r[f"{m}_vs_plain"]) if f"{m}_vs_plain" in r else "" for m in ("map", "rank1")]
        lines.append(f"| {c} | {r['map_mean']:.2f} ± {r['map_std']:.2f} | {vs[0]} | "
                     f"{r['rank1_mean']:.2f} ± {r['rank1_std']:.2f} | {vs[1]} |")  # fmt: skip
    ladder = [f"{c} {r['ladder_weight_ratio_mean']:.2g}" for c, r in results.items() if "ladder_weight_ratio_mean" in r]
    if ladder:
        lines.append(
            "\nHow much the fine-tuned PTL models use their ladder: ||W_ladder|| / ||W_backbone|| of the final fusion "
            f"`out = W_backbone x_n + W_ladder y_n`, mean over seeds: {', '.join(ladder)} "
            f"({'0 at the identity init' if cfg['final_init'] == 'identity' else 'random at init'})."
        )
    curve_note = ("" if data["curve_test_size"] == data["sizes"]["target_test"] else
                  f" The per-epoch curves are measured on a fixed subset of the test split (the first "
                  f"{data['curve_test_size'] // len(data['target_classes'])} images of each target class in the "
                  f"official order, {data['curve_test_size']} images); the final numbers above on all of it.")  # fmt: skip
    lines += ["", f"![test accuracy per epoch]({path.with_suffix('.png').name})", "",
              "Mean test accuracy per epoch, band: min-max over the seeds." + curve_note]  # fmt: skip
    if report.get("ablation"):
        ab = report["ablation"]
        lines += [
            "",
            f"## Ablation: bconv's departures from the paper (ptl_v1 at lr {results['ptl_v1']['lr']:g}, same seeds)",
            "",
            "Each row changes one thing from the ptl_v1 row above; differences are paired by seed, 95% t-intervals.",
            "",
            "| variant | change | test acc mean ± std | vs ptl_v1 [95% CI] | vs plain [95% CI] | mAP mean | "
            "mAP vs ptl_v1 [95% CI] |",
            "|---|---|---|---|---|---|---|",
            f"| ptl_v1 | (as above) | {results['ptl_v1']['test_acc_mean']:.2f} ± {results['ptl_v1']['test_acc_std']:.2f} "
            f"| | {_ci(results['ptl_v1']['test_acc_vs_plain']) if 'test_acc_vs_plain' in results['ptl_v1'] else ''} "
            f"| {results['ptl_v1']['map_mean']:.2f} | |",
        ]
        for name, r in ab.items():
            vs_plain = _ci(r["test_acc_vs_plain"]) if "test_acc_vs_plain" in r else ""
            lines.append(f"| {name} | {r['change']} | {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} | "
                         f"{_ci(r['test_acc_vs_ptl_v1'])} | {vs_plain} | {r['map_mean']:.2f} | {_ci(r['map_vs_ptl_v1'])} |")  # fmt: skip
    lines += [
        "",
        "## Learning-rate grid (mean final validation accuracy over seeds; the selected lr in bold)",
        "",
        "| condition | " + " | ".join(f"lr {lr:g}" for lr in cfg["lrs"]) + " |",
        "|---|" + "---|" * len(cfg["lrs"]),
    ]
    for c in results:
        cells = []
        for lr in cfg["lrs"]:
            finals = [r["curve"][-1]["val_acc"] for r in report["runs"]
                      if r["condition"] == c and r["lr"] == lr and not r.get("variant")]  # fmt: skip
            cell = f"{statistics.fmean(finals):.2f}" if finals else ""
            cells.append(f"**{cell}**" if lr == results[c]["lr"] else cell)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run(args: argparse.Namespace, command: str) -> dict:
    """The whole experiment: pre-train per seed, fine-tune every condition x lr x seed, select, test, report."""
    from tqdm import tqdm

    start, load_start = time.perf_counter(), os.getloadavg()[0]
    cfg = Config(epochs=args.epochs, source_epochs=args.source_epochs, width=args.width, blocks=args.blocks,
                 rollback_periods=args.rollback_periods, final_init=args.final_init, lrs=args.lrs,
                 seeds=args.seeds, pretrain=args.pretrain)  # fmt: skip
    data = make_data(args.dataset, args.data_dir, args.image_size, args.per_class, args.budget, args.val_per_class)
    curve_test = balanced_subset(data.target_test, CURVE_TEST_PER_CLASS)
    conditions = [c for c in CONDITIONS if c in args.conditions]  # a fixed order: std needs ptl_v1 first
    backbone = SmallResNet(data.input_size[0], len(data.target_classes), cfg.width, cfg.blocks)
    ptl_params = {v: _count(wrap_with_ptl(copy.deepcopy(backbone), cell=v[-2:], input_size=data.input_size).ptl)
                  for v in ("ptl_v1", "ptl_v2")}  # fmt: skip
    variants = ablation_variants(cfg) if args.ablation else {}

    pretrain_seeds = cfg.seeds if cfg.pretrain == "each" else cfg.seeds[:1]
    total = len(pretrain_seeds) * cfg.source_epochs + len(cfg.seeds) * cfg.epochs * (len(cfg.lrs) * len(conditions) + len(variants))
    overall = tqdm(total=total, unit="epoch", desc="all runs", position=0)
    pretrained, pretrain_report = {}, []
    for seed in pretrain_seeds:
        with tqdm(total=cfg.source_epochs, desc=f"pre-train seed {seed}", leave=False, position=1) as bar:
            t = time.perf_counter()
            pretrained[seed], acc = pretrain(data, seed, cfg, bar)
        overall.update(cfg.source_epochs)
        pretrain_report.append({"seed": seed, "source_test_acc": acc, "seconds": round(time.perf_counter() - t, 1)})
    for seed in cfg.seeds:  # --pretrain once: every seed fine-tunes the first seed's backbone
        pretrained.setdefault(seed, pretrained[pretrain_seeds[0]])

    def one_run(condition: str, lr: float, seed: int, run_cfg: Config, teacher: nn.Module | None, label: str):
        snapshots: list[dict[str, Tensor]] = []
        with tqdm(total=run_cfg.epochs, desc=label, leave=False, position=1) as bar:
            t = time.perf_counter()
            model, curve = finetune(condition, data, pretrained[seed], lr, seed, run_cfg, teacher, bar, snapshots)
        overall.update(run_cfg.epochs)
        loads.append(os.getloadavg()[0])
        record = {"condition": condition, "lr": lr, "seed": seed, "curve": curve,
                  "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
        if condition.startswith("ptl"):
            record["ladder_weight_ratio"] = ladder_weight_ratio(model)
        return record, model, snapshots

    runs: list[dict] = []
    loads: list[float] = []  # the 1-minute load average after every run: how shared the machine was
    selected: dict[str, float] = {}
    ptl_v1_models: dict[int, nn.Module] = {}
    for condition in conditions:
        trained = {}
        for lr in cfg.lrs:
            for seed in cfg.seeds:
                teacher = ptl_v1_models[seed] if condition == "std" else None
                record, model, snapshots = one_run(condition, lr, seed, cfg, teacher, f"{condition} lr {lr:g} seed {seed}")
                runs.append(record)
                trained[(lr, seed)] = (record, model, snapshots)
        selected[condition] = select_lr(runs, condition)
        # Only now is the test split used: for the selected lr's runs, never to choose.
        for seed in tqdm(cfg.seeds, desc=f"test {condition}", leave=False, position=1):
            record, model, snapshots = trained[(selected[condition], seed)]
            evaluate_test(record, model, snapshots, data, curve_test)
            if condition == "ptl_v1":
                ptl_v1_models[seed] = model
        del trained

    ablation: dict[str, dict] = {}
    for name, (change, variant_cfg) in variants.items():
        chosen = []
        for seed in cfg.seeds:
            record, model, snapshots = one_run("ptl_v1", selected["ptl_v1"], seed, variant_cfg, None,
                                               f"ablation {name} seed {seed}")  # fmt: skip
            evaluate_test(record, model, snapshots, data, curve_test)
            record["variant"] = name
            runs.append(record)
            chosen.append(record)
        ablation[name] = {"change": change, **_summary(chosen)}
    overall.close()

    results = summarise(runs, conditions, selected)
    for r in ablation.values():
        for metric in ("test_acc", "map", "rank1"):
            r[f"{metric}_vs_ptl_v1"] = paired(r[metric], results["ptl_v1"][metric])
            if "plain" in results:
                r[f"{metric}_vs_plain"] = paired(r[metric], results["plain"][metric])

    report = {
        "command": command,
        "note": args.note,
        "config": asdict(cfg),
        "conditions": conditions,
        "data": {"dataset": data.name, "input_size": list(data.input_size), "source_classes": data.source_classes,
                 "target_classes": data.target_classes, "sizes": data.sizes(), "augment": data.augment,
                 "split": data.split, "budget_reason": data.budget_reason if args.budget else None,
                 "curve_test_size": len(curve_test)},  # fmt: skip
        "backbone_params": _count(backbone),
        "ptl_params": ptl_params,
        "pretrain": pretrain_report,
        "selected_lr": selected,
        "results": results,
        "ablation": ablation,
        "runs": runs,
        "wall_s": round(time.perf_counter() - start, 1),
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "load_mean": statistics.fmean(loads),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    write_markdown(report, out)
    title = (f"{data.name}: fine-tuning on {', '.join(data.target_classes)} after pre-training on "
             f"{', '.join(data.source_classes)} ({len(cfg.seeds)} seeds)")  # fmt: skip
    plot(report["results"], title, out.with_suffix(".png"))
    return report


#: per dataset: (budget, val per class, source epochs, fine-tuning epochs, lr grid) when not given; --quick:
#: (10, 10, 3, 3, quick grid). Fashion-MNIST: 1 pre-training epoch over 30,000 images, 12 fine-tuning epochs
#: (48 steps), and the grid without 0.003 (never selected on digits; 48 steps barely move at it), so the
#: whole run fits an hour on 2 cores shared with other jobs.
DATASET_DEFAULTS = {"fashion-mnist": (BUDGET, VAL_PER_CLASS, 1, 12, [0.01, 0.03, 0.1])}
PRETRAIN_ONCE = {"fashion-mnist"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "fashion-mnist", "cifar10", "folder"), default="digits")
    parser.add_argument("--data-dir", type=Path,
                        help=f"fashion-mnist: the folder of the four IDX files (default {FASHION_MNIST_DIR}); "
                        "cifar10: the folder holding cifar-10-batches-py; folder: the ImageFolder tree")
    parser.add_argument("--image-size", type=int,
                        help="resize images to this (digits 16, fashion-mnist 28, cifar10 32, folder 32)")
    parser.add_argument("--per-class", type=int, help="use at most this many images per class in every split")
    parser.add_argument("--budget", type=int,
                        help=f"labelled target training images per class (fashion-mnist default {BUDGET}; datasets "
                        "with an official test set only)")
    parser.add_argument("--val-per-class", type=int,
                        help=f"with --budget: target validation images per class (default {VAL_PER_CLASS})")
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--seeds", type=int, nargs="+", help="run seeds (default 0 1 2 3 4; --quick 0 1 2)")
    parser.add_argument("--lrs", type=float, nargs="+", help="the lr grid (default 0.003 0.01 0.03 0.1; fashion-mnist 0.01 0.03 0.1)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default 15, fashion-mnist 12; --quick 3)")
    parser.add_argument("--source-epochs", type=int,
                        help="pre-training epochs (default 15, fashion-mnist 1; --quick 3)")
    parser.add_argument("--width", type=int, default=16, help="channels of the backbone's first stage")
    parser.add_argument("--blocks", type=int, default=1, help="residual blocks per stage")
    parser.add_argument("--rollback-periods", type=int, help="periods of the rollback condition (default 3)")
    parser.add_argument("--final-init", choices=("identity", "paper"), default="identity",
                        help="PTL's final fusion at init: bconv's identity (default) or the paper's random init")
    parser.add_argument("--pretrain", choices=("each", "once"),
                        help="pre-train a backbone for each seed, or once (the first seed's) for all seeds "
                        "(default each; fashion-mnist once: pre-training over 30,000 images per seed does not fit the hour)")
    parser.add_argument("--ablation", action="store_true",
                        help="also run ptl_v1 at its selected lr with one change each: reset never, the other "
                        "state_mode, the other final_init")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 3 seeds, 3 + 3 epochs, lrs 0.01 0.05, at most 40 images per class")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is small, and on a shared machine more threads "
                        "contend for the cores)")
    parser.add_argument("--note", help="a sentence about the run's circumstances, written into the results")
    parser.add_argument("--out", type=Path,
                        help="output path without suffix (default benchmarks/results/transfer, or transfer_<dataset>)")
    args = parser.parse_args(argv)
    quick = args.quick
    budget, val, source_epochs, epochs, lrs = DATASET_DEFAULTS.get(args.dataset, (None, None, 15, 15, Config().lrs))
    if quick:
        budget, val, source_epochs, epochs, lrs = (10 if budget else None, 10 if budget else None, 3, 3, [0.01, 0.05])
    if args.budget is not None:
        val = val or VAL_PER_CLASS
    defaults = {"seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4], "lrs": lrs,
                "epochs": epochs, "source_epochs": source_epochs, "rollback_periods": 3,
                "per_class": 40 if quick else None, "budget": budget, "val_per_class": val,
                "out": RESULTS / ("transfer" if args.dataset == "digits" else f"transfer_{args.dataset.replace('-', '_')}")}  # fmt: skip
    defaults["pretrain"] = "once" if args.dataset in PRETRAIN_ONCE else "each"
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.budget is not None and args.dataset in ("digits", "folder"):
        parser.error(f"--budget needs a dataset with an official test set (fashion-mnist, cifar10), not {args.dataset}")
    if args.budget is not None and (args.budget < 1 or args.val_per_class < 1):
        parser.error(f"--budget and --val-per-class must be at least 1, got {args.budget} and {args.val_per_class}")
    if "std" in args.conditions and "ptl_v1" not in args.conditions:
        parser.error("the std condition distils the ptl_v1 model: add ptl_v1 to --conditions")
    if args.ablation and "ptl_v1" not in args.conditions:
        parser.error("the ablation varies the ptl_v1 condition: add ptl_v1 to --conditions")
    if "rollback" in args.conditions and (args.epochs % args.rollback_periods or args.rollback_periods > 4):
        parser.error(f"--epochs {args.epochs} must split into --rollback-periods {args.rollback_periods} (at most 4) "
                     f"equal periods")  # fmt: skip
    if len(args.seeds) < 2:
        parser.error("give at least 2 seeds: the results report the spread over seeds")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = run_command("transfer", argv)
    report = run(args, command)
    for c, r in report["results"].items():
        gain = f"; vs plain {_ci(r['test_acc_vs_plain'])}" if "test_acc_vs_plain" in r else ""
        print(f"{c:9s} lr {r['lr']:<6g} test acc {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}% "
              f"(n={len(r['seeds'])}){gain}")  # fmt: skip
    for name, r in report["ablation"].items():
        print(f"ablation {name}: test acc {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}%; "
              f"vs ptl_v1 {_ci(r['test_acc_vs_ptl_v1'])}")  # fmt: skip
    print(f"wall time {report['wall_s'] / 60:.1f} min; wrote {args.out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
