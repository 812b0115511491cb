"""The transfer protocol: can a small, fair experiment tell whether PTL, STD and rolling back help?

The PTL paper reports that PTL improves fine-tuning (CIFAR-10 error 5.92% -> 5.62% with DenseNet-100).
This benchmark fine-tunes one pre-trained backbone on a new task under every condition, with rules fixed
before any result, so that a difference it reports is one the run could detect, and one it does not report
is bounded by a power statement.

**Data and split rules** (fixed before any result, kept from the first Fashion-MNIST experiment). Fashion-MNIST
(``apt-get install dataset-fashion-mnist``; its four IDX files are read from disk, nothing is downloaded):
the backbone is pre-trained once (3 epochs) on the first five classes (T-shirt/top, Trouser, Pullover, Dress,
Coat; all 30,000 training images), then fine-tuned on the other five (Sandal, Shirt, Sneaker, Bag, Ankle boot) with a
labelled budget of ``--budget`` 20 training and ``--val-per-class`` 100 validation images per class, drawn once
(split seed 0) from the target's training images; the official 5,000 test images of the target classes are the
test split. ``BUDGET_REASON`` says why 20. Images are normalised with the source training set's statistics;
random crop (4-pixel padding) and horizontal flip in training. ``--dataset digits|cifar10|folder`` runs the
same protocol on other data.

**Schedule.** Every condition trains ``--epochs`` 48 epochs (4 steps of batch 32 each at 20 labels per class:
the order at which plain fine-tuning was measured to plateau) under a cosine schedule, with SGD (momentum 0.9,
Nesterov, weight decay 5e-4: the released rolling-back optimizer, for every condition). Evaluation is in
eval mode (a PTL model: zero state), after the BatchNorm running statistics are re-estimated on the labelled
training images (``benchmarks.common.reestimate_bn``; without it most of the seed spread is the running
statistics' last batches), on a copy, so training is never touched.

**Learning rates.** Each condition has its own grid (``Protocol.grids``). Tuning runs every lr of the grid on
the 3 tuning seeds and reads only the validation split; the lr with the best mean final validation accuracy
is chosen (ties: lower mean validation loss). When the chosen lr is an edge of the grid, the grid is extended
one step beyond it (the 1-3-10 sequence) and tuned again, up to ``max_extensions`` times per side; a choice
still at an edge after that is reported as such. Then every condition runs at its chosen lr on 20 fresh
evaluation seeds (at least 10: ``--eval-seeds``), which alone see the test split.

**Conditions** (a run seed fixes the classifier's initialisation, the ladder's, the data order and the
augmentation; the pre-trained backbone is the same for all):

* ``plain``: fine-tune the whole backbone;
* ``ptl_v1``: ``wrap_with_ptl(backbone, cell="v1")`` with bconv's default, function-preserving start;
* ``ptl_v1_paper``: the same with the released code's start (``final_init="paper"``: the final fusion is a
  randomly initialised, normalised layer over ``cat(x_n, y_n)``);
* ``ptl_v2``: the v2 cell, bconv's default start;
* ``control``: ``ptl_v1_paper`` with the ladder frozen at zero (``model.ptl.zero_cells = True``: the final
  fusion sees zeros in place of the last cell's output), everything else as in PTL: the extra trainable
  layer without the ladder. ``ptl_v1_paper - control`` is what the ladder adds. (With the default start,
  the ladder zeroed is the plain backbone itself, so ``ptl_v1 - plain`` is already the ladder's effect);
* ``std``: a plain backbone trained with ``bconv.distill.STDTrainer`` (lambda 0.8), the teacher being the
  ``ptl_v1`` model of the same seed at ``ptl_v1``'s chosen lr; its own grid, higher (its mean-reduced L1 term
  slows the student: issue 19 measured its backbone moving 0.45x and its classifier 0.2x as fast as plain's at
  equal lr);
* ``std_plain``: the born-again control of ``std``: the same distillation, the teacher being the ``plain``
  model of the same seed at ``plain``'s chosen lr, tuned on the same grid. Distilling a network into a copy of
  itself helps on its own (born-again networks, Furlanello et al. 2018), so ``std - std_plain``, paired by
  seed, is what the PTL teacher adds to STD: the paper's claim;
* ``rollback``: ``bconv.rollback.Rollback.run`` with ``--rollback-periods`` periods of ``--epochs`` epochs
  each (each period a whole fine-tuning run, as the method assumes), the released lr ratios around the tuned
  lr (kept blocks lr/10, head 10*lr in the first period), the stem a block of its own.

**Ablation** (``--ablation``, on the evaluation seeds at ``ptl_v1``'s chosen lr): bconv's departures from the
paper undone one at a time: the state reset never instead of every epoch; the batch-pooled state.

**Backbones** (``--backbone``): ``small`` (the default, below) or ``resnet18``, timm's standard ResNet-18 (7x7
stride-2 stem, max pooling, four stages of two basic blocks, 11M parameters; ``in_chans`` set to the images'
channels), pre-trained on the source classes as the small one is. At Fashion-MNIST's own 28 px its stages see
7, 4, 2 and 1 px (the stem and max pooling reduce by 4); ``--image-size`` trades resolution for time (a run
step costs about twice as much at 56 px).

**Reports** (``benchmarks/results/transfer_<dataset>[_<backbone>].{md,json,png}``): per condition the test accuracy over
the evaluation seeds; paired per-seed differences against ``plain`` and against ``control`` with 95%
t-intervals; the smallest difference the run could detect (80% power, two-sided paired t at 0.05, from the
observed spread of the differences); retrieval mAP and rank-1 on the test split
(``bconv.distill.pooled_features``, each test image querying all others by cosine similarity); for PTL
models the ladder's share of the replaced stage output and of the logits and the effect of the carried state
(``bconv.ladder_usage``, on the first 32 training images after training); the plateau check (plain at its
lr for twice the epochs on the tuning seeds); the test accuracy every 4 epochs (on the first 50 test images of
each class; the final numbers on all) with the band over seeds; CPU time per condition. Every number written
is measured in that run.

**Cost.** 29 to 35 runs of 48 epochs a condition (9 tuning runs, 3 more per grid extension, 20 evaluation
runs; rolling back: 4 periods each), about 250 runs in all with the ablation and the plateau check. The model (a
three-stage ResNet of width 16 on 28x28 images, 4 steps an epoch) is small enough for the whole run to fit well
within an hour on two cores with two worker processes (``--estimate`` times one run of each condition and
extrapolates), which is why the run affords 20 evaluation seeds rather than the floor of 10, and v2. Evaluation
is what costs beside training, so the curves read a subset and tuning runs read the validation split every 12
epochs only.

Reproduce::

    pip install -e ".[bench]"; apt-get install dataset-fashion-mnist
    python -m benchmarks.transfer --ablation                      # the committed results, two worker processes
    python -m benchmarks.transfer --estimate                      # time one run per condition, extrapolate
    python -m benchmarks.transfer --quick --data-dir DIR --out /tmp/t   # a smoke run in seconds
    python -m benchmarks.transfer --render --out benchmarks/results/transfer_fashion_mnist   # the report again
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bconv
from bconv import wrap_with_ptl
from bconv.distill import STDTrainer, pooled_features
from bconv.rollback import Rollback

from benchmarks.common import (FASHION_MNIST_DIR, RESULTS, Split, balanced_subset, command as run_command, crop_flip,
                               detectable_difference, environment, evaluate, interval, load_cifar10, load_digits,
                               load_fashion_mnist, load_folder, mean_std, paired, params, per_class_counts,
                               per_class_split, reestimate_bn, relabel, resize, retrieval_metrics, run_record, seeded,
                               train_epochs, write_results)  # fmt: skip

CONDITIONS = ("plain", "ptl_v1", "ptl_v1_paper", "control", "ptl_v2", "std", "std_plain", "rollback")
#: the distilled conditions and the condition whose model (same seed, at its chosen lr) is their teacher
TEACHER = {"std": "ptl_v1", "std_plain": "plain"}
#: comparisons beyond plain and control: STD with the PTL teacher against STD with the plain one (same seeds)
BASELINES = {"std": ("std_plain",)}
#: the backbones of the protocol (``--backbone``)
BACKBONES = ("small", "resnet18")
PTL = {"ptl_v1": ("v1", "identity"), "ptl_v1_paper": ("v1", "paper"), "control": ("v1", "paper"),
       "ptl_v2": ("v2", "identity")}  # fmt: skip
#: the ablation of bconv's departures from the paper: name -> (what changes, wrap/train options)
VARIANTS = {"reset never": ("the state is reset never instead of every epoch", {"reset": False}),
            "state pooled": ("state_mode per_sample -> pooled", {"state_mode": "pooled"})}  # fmt: skip
SPLIT_SEED = 0  # the data split is fixed; run seeds vary initialisation, data order and augmentation
USAGE_BATCH = 32  # ladder_usage is measured on the first this-many labelled training images
CURVE_TEST_PER_CLASS = 50  # the per-epoch test curve reads this many test images per class (the final numbers: all)
BUDGET, VAL_PER_CLASS = 20, 100
BUDGET_REASON = (
    "{budget} labelled training images per target class (and {val} more per class for validation, from the "
    "target's training images), fixed before any result was seen, from an a-priori estimate rather than a pilot "
    "run. The reason: on the five target classes (footwear, bags, shirts) a small CNN trained on all 6000 images "
    "per class errs on about 2% of the test images (published baselines); learning curves of image classifiers "
    "fall roughly as n^-1/2, which puts training from scratch on {budget} per class near {scratch:.0f}% error "
    "(2% x sqrt(6000/{budget})), and transfer from the related source classes is expected to recover most but "
    "not all of that: plain fine-tuning should land around 85-90%, with room above it for a method that helps "
    "and below it for one that hurts."
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

    Args:
        dataset: ``fashion-mnist``, ``digits``, ``cifar10`` or ``folder``.
        data_dir: where its files are (default for Fashion-MNIST: the Debian package's folder).
        image_size: resize to this (default: the dataset's own; digits 16).
        per_class: at most this many images per class in every split.
        budget, val_per_class: (official test sets only) the target task's labelled images per class for
            training and for validation, drawn from its training images.
    """
    if dataset not in ("digits", "fashion-mnist") and data_dir is None:
        raise SystemExit(f"--dataset {dataset} needs --data-dir DIR")
    if dataset == "cifar10":
        size = image_size or 32
        x, y, names = load_cifar10(data_dir, True, size)
        x_test, y_test, _ = load_cifar10(data_dir, False, size)
    elif dataset == "fashion-mnist":
        x, y, names = load_fashion_mnist(data_dir, True)  # None: where the Debian package puts them
        x_test, y_test, _ = load_fashion_mnist(data_dir, False)
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
        source_test, target_test = src.take(s_test), tgt.take(t_test)
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
    splits = [src.take(s_train), source_test, tgt.take(t_train), tgt.take(t_val), target_test]
    splits = [balanced_subset(s, per_class) for s in splits]
    mean = splits[0].x.mean(dim=(0, 2, 3), keepdim=True)
    std = splits[0].x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    splits = [Split((s.x - mean) / std, s.y) for s in splits]
    reason = ""
    if budget is not None:
        template = BUDGET_REASON if dataset == "fashion-mnist" else (
            "{budget} labelled training images per target class and {val} per class for validation "
            "(--budget, --val-per-class).")  # fmt: skip
        reason = template.format(budget=budget, val=val_per_class, scratch=2 * math.sqrt(6000 / budget))
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

    The stem does not reduce the resolution, so stage discovery folds it into ``layer1``'s stage and rolling
    back splits it off again (the stem is a block of its own).

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


# ----------------------------------------------------------------------------------------------- the protocol


def lr_step(lr: float, up: bool) -> float:
    """The next learning rate of the 1-3-10 sequence above (or below) ``lr``: 0.1 -> 0.3 -> 1.0, 0.1 -> 0.03."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent
    ladder = [1.0, 3.0, 10.0]
    i = min(range(3), key=lambda k: abs(ladder[k] - mantissa))
    if up:
        nxt = ladder[i + 1] * 10**exponent if i < 2 else 30.0 * 10**exponent
    else:
        nxt = ladder[i - 1] * 10**exponent if i > 0 else 0.3 * 10**exponent
    return float(f"{nxt:.6g}")


@dataclass(frozen=True)
class Protocol:
    """Every rule of a run, fixed before it starts (see the module docstring)."""

    epochs: int = 48
    source_epochs: int = 3
    source_lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    backbone: str = "small"  # "small": SmallResNet(width, blocks); "resnet18": timm's resnet18
    width: int = 16
    blocks: int = 1
    lam: float = 0.8
    rollback_periods: int = 4
    tune_seeds: tuple[int, ...] = (0, 1, 2)
    eval_seeds: tuple[int, ...] = tuple(range(100, 120))
    grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "plain": (0.03, 0.1, 0.3), "ptl_v1": (0.03, 0.1, 0.3), "ptl_v1_paper": (0.03, 0.1, 0.3),
        "control": (0.03, 0.1, 0.3), "ptl_v2": (0.03, 0.1, 0.3), "std": (0.1, 0.3, 1.0),
        "std_plain": (0.1, 0.3, 1.0), "rollback": (0.01, 0.03, 0.1)})  # fmt: skip
    max_extensions: int = 2
    curve_every: int = 4  # epochs between the points of an evaluation run's test curve
    val_curve_every: int = 12  # epochs between the points of a tuning run's validation curve
    bn_reestimate: bool = True
    plateau_check: bool = True

    def grid(self, condition: str) -> tuple[float, ...]:
        return self.grids[condition]

    def run_epochs(self, condition: str) -> int:
        """Epochs a run of ``condition`` trains in all (rolling back: every period is a whole run)."""
        return self.epochs * (self.rollback_periods if condition == "rollback" else 1)


@dataclass(frozen=True)
class Task:
    """One fine-tuning run: a condition at an lr and a seed, in a phase of the protocol."""

    condition: str
    lr: float
    seed: int
    phase: str  # "tune" (validation only), "eval" (test), "ablation" (test), "plateau" (validation)
    variant: str | None = None
    epochs: int | None = None  # None: the protocol's
    teaches: bool = False  # the run's model is the teacher of a distilled condition: its state dict is returned
    teacher: str | None = None  # a distilled run: which run's model is its teacher (recorded)

    @property
    def label(self) -> str:
        what = f"{self.condition}" + (f" [{self.variant}]" if self.variant else "")
        return f"{self.phase} {what} lr {self.lr:g} seed {self.seed}"


def _sgd(params, lr: float, protocol: Protocol) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=protocol.momentum, nesterov=protocol.nesterov,
                           weight_decay=protocol.weight_decay)  # fmt: skip


def make_backbone(protocol: Protocol, in_channels: int, num_classes: int) -> nn.Module:
    """The protocol's backbone, randomly initialised (from the global generator); its classifier is ``fc``.

    ``resnet18`` is timm's standard ResNet-18 (7x7 stride-2 stem and max pooling, four stages of two basic
    blocks, 11M parameters), built for ``in_channels`` so that grey images need no copying into RGB.
    """
    if protocol.backbone == "small":
        return SmallResNet(in_channels, num_classes, protocol.width, protocol.blocks)
    if protocol.backbone == "resnet18":
        import timm

        return timm.create_model("resnet18", pretrained=False, in_chans=in_channels, num_classes=num_classes)
    raise ValueError(f"unknown backbone {protocol.backbone!r}; valid: {', '.join(BACKBONES)}")


def describe_backbone(protocol: Protocol) -> str:
    if protocol.backbone == "small":
        return f"SmallResNet(width={protocol.width}, blocks={protocol.blocks})"
    return f"timm {protocol.backbone} (standard, random init before pre-training)"


def pretrain(data: TransferData, protocol: Protocol, seed: int = 0, bar=None) -> tuple[dict[str, Tensor], float]:
    """The backbone trained on the source task: ``(state_dict, source test accuracy %)``."""
    gen = seeded(seed)
    model = make_backbone(protocol, data.input_size[0], len(data.source_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=protocol.source_lr, momentum=protocol.momentum,
                                weight_decay=protocol.weight_decay)  # fmt: skip
    train_epochs(model, optimizer, data.source_train, protocol.source_epochs, gen, batch_size=protocol.batch_size,
                 augment=crop_flip if data.augment else None, bar=bar)  # fmt: skip
    return copy.deepcopy(model.state_dict()), evaluate(model, data.source_test)[0]


def target_backbone(data: TransferData, pretrained: dict[str, Tensor], protocol: Protocol) -> nn.Module:
    """The pre-trained backbone with a new classifier for the target task (drawn from the global generator)."""
    model = make_backbone(protocol, data.input_size[0], len(data.source_classes))
    model.load_state_dict(pretrained)
    model.fc = nn.Linear(model.fc.in_features, len(data.target_classes))
    return model


def _ptl_model(condition: str, backbone: nn.Module, data: TransferData, state_mode: str = "per_sample") -> nn.Module:
    cell, final_init = PTL[condition]
    model = wrap_with_ptl(backbone, cell=cell, input_size=data.input_size, final_init=final_init, state_mode=state_mode)
    if condition == "control":
        model.ptl.zero_cells = True
    return model


class _Evaluator:
    """Evaluates copies of a model (BatchNorm statistics re-estimated on the labelled training images)."""

    def __init__(self, data: TransferData, protocol: Protocol):
        self.data, self.protocol = data, protocol

    def prepared(self, model: nn.Module) -> nn.Module:
        evaluated = copy.deepcopy(model)
        if self.protocol.bn_reestimate:
            reestimate_bn(evaluated, self.data.target_train.x)
        return evaluated.eval()

    def accuracy(self, model: nn.Module, split: Split) -> tuple[float, float]:
        return evaluate(self.prepared(model), split)


def _features(model: nn.Module, split: Split, batch_size: int = 256) -> Tensor:
    """``bconv.distill.pooled_features`` of ``split`` in eval mode (PTL: zero state), ``[N, D]``."""
    model.eval()
    with torch.no_grad():
        return torch.cat([pooled_features(model, split.x[i : i + batch_size]) for i in range(0, len(split), batch_size)])


def run_task(task: Task, data: TransferData, pretrained: dict[str, Tensor], protocol: Protocol,
             teacher_state: dict[str, Tensor] | None = None) -> tuple[dict, dict[str, Tensor] | None]:  # fmt: skip
    """Fine-tune the pre-trained backbone as ``task`` says and measure what its phase reads.

    Returns:
        The run's record and, for a run that ``teaches`` (a ``ptl_v1`` or ``plain`` run of the tuning or
        evaluation phase whose model a distilled condition needs), its state dict.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    gen = seeded(task.seed)
    options = VARIANTS[task.variant][1] if task.variant else {}
    epochs = task.epochs or protocol.epochs
    backbone = target_backbone(data, pretrained, protocol)
    model: nn.Module = backbone
    if task.condition in PTL:
        model = _ptl_model(task.condition, backbone, data, options.get("state_mode", "per_sample"))
    evaluator = _Evaluator(data, protocol)
    testing = task.phase in ("eval", "ablation")
    curve_split = balanced_subset(data.target_test, CURVE_TEST_PER_CLASS) if testing else data.target_val
    every = protocol.curve_every if testing else protocol.val_curve_every
    offset = [0]  # epochs of earlier rolling-back periods

    def after_epoch(epoch: int) -> dict | None:
        done = offset[0] + epoch + 1
        if done % every and epoch != epochs - 1:
            return None
        return {"epoch": done, "acc": evaluator.accuracy(model, curve_split)[0]}

    augment = crop_flip if data.augment else None
    common = dict(batch_size=protocol.batch_size, augment=augment, reset_state=options.get("reset", True),
                  after_epoch=after_epoch)  # fmt: skip
    if task.condition in TEACHER:
        teacher_condition = TEACHER[task.condition]
        if teacher_state is None:
            raise ValueError(f"{task.label}: the {task.condition} condition needs its teacher (the "
                             f"{teacher_condition} model of seed {task.seed})")  # fmt: skip
        teacher = target_backbone(data, pretrained, protocol)
        if teacher_condition in PTL:
            teacher = _ptl_model(teacher_condition, teacher, data)
        teacher.load_state_dict(teacher_state)
        trainer = STDTrainer(model, teacher, lam=protocol.lam, input_size=data.input_size)
        optimizer = _sgd(trainer.parameters(), task.lr, protocol)
        step = lambda x, y: trainer.step(x, y, optimizer)  # noqa: E731
        curve = train_epochs(model, optimizer, data.target_train, epochs, gen, step=step, **common)
    elif task.condition == "rollback":
        rollback = Rollback(model, input_size=data.input_size)
        curve = []

        def period(m: nn.Module, optimizer: torch.optim.Optimizer, index: int) -> None:
            offset[0] = index * epochs
            curve.extend(train_epochs(m, optimizer, data.target_train, epochs, gen, **common))

        rollback.run(period, protocol.rollback_periods, make_optimizer=lambda groups: _sgd(groups, task.lr, protocol),
                     lr_rolled=task.lr, lr_kept=task.lr / 10, lr_head=task.lr, lr_head_first=10 * task.lr)  # fmt: skip
    else:
        optimizer = _sgd(model.parameters(), task.lr, protocol)
        curve = train_epochs(model, optimizer, data.target_train, epochs, gen, **common)
    record: dict[str, Any] = {"condition": task.condition, "lr": task.lr, "seed": task.seed, "phase": task.phase,
                              "variant": task.variant, "epochs": epochs, "teacher": task.teacher,
                              "curve": [p for p in curve if p]}  # fmt: skip
    if testing:
        evaluated = evaluator.prepared(model)
        features = _features(evaluated, data.target_test)
        with torch.no_grad():
            logits = torch.cat([evaluated(data.target_test.x[i : i + 256]) for i in range(0, len(data.target_test), 256)])
        record["test_acc"] = 100.0 * float((logits.argmax(1) == data.target_test.y).float().mean())
        record["test_loss"] = float(F.cross_entropy(logits, data.target_test.y))
        record.update(retrieval_metrics(features, data.target_test.y))
        if task.condition in PTL:
            usage = bconv.ladder_usage(model, data.target_train.x[:USAGE_BATCH], data.target_train.y[:USAGE_BATCH])
            record["usage"] = usage.as_dict()
    else:
        record["val_acc"], record["val_loss"] = evaluator.accuracy(model, data.target_val)
    record["seconds"] = round(time.perf_counter() - start, 2)
    record["cpu_seconds"] = round(time.process_time() - cpu_start, 2)
    return record, (copy.deepcopy(model.state_dict()) if task.teaches else None)


# ----------------------------------------------------------------------------------------------- the scheduler

_WORKER: dict[str, Any] = {}


def _init_worker(data: TransferData, pretrained: dict[str, Tensor], protocol: Protocol, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(data=data, pretrained=pretrained, protocol=protocol)


def _work(task: Task, teacher_state: dict[str, Tensor] | None) -> tuple[dict, dict[str, Tensor] | None]:
    return run_task(task, _WORKER["data"], _WORKER["pretrained"], _WORKER["protocol"], teacher_state)


class _Inline:
    """An executor that runs each task when it is submitted (``--workers 1``)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001  (re-raised by future.result())
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def select_lr(runs: list[dict], condition: str) -> float:
    """The lr with the best mean final validation accuracy over seeds (ties: the lower mean validation loss)."""
    scores = {}
    for lr in sorted({r["lr"] for r in runs if r["condition"] == condition}):
        finals = [r for r in runs if r["condition"] == condition and r["lr"] == lr]
        scores[lr] = (statistics.fmean(r["val_acc"] for r in finals), -statistics.fmean(r["val_loss"] for r in finals))
    return max(scores, key=scores.get)


def next_grid_step(grid: Sequence[float], best: float, extensions: dict[str, int], limit: int) -> float | None:
    """The lr to add when ``best`` is an edge of ``grid`` and that side has been extended fewer than ``limit``
    times (``extensions`` counts per side, updated); ``None`` when ``best`` is inside or the limit is reached."""
    side = "low" if best == min(grid) else "high" if best == max(grid) else None
    if side is None or extensions[side] >= limit:
        return None
    extensions[side] += 1
    return lr_step(best, up=side == "high")


@dataclass
class _Tuning:
    grid: list[float]
    extensions: dict[str, int] = field(default_factory=lambda: {"low": 0, "high": 0})
    selected: float | None = None
    edge: bool = False


def run_protocol(data: TransferData, pretrained: dict[str, Tensor], protocol: Protocol, conditions: Sequence[str],
                 ablation: bool, workers: int, threads: int = 1, bar=None) -> tuple[list[dict], dict[str, _Tuning]]:  # fmt: skip
    """Every task of the protocol, scheduled as their inputs become known, on ``workers`` processes.

    Tuning runs of every condition start at once (a distilled condition, ``std`` or ``std_plain``, once its
    teacher condition's lr is chosen, with the teacher's tuning models at that lr as teachers); a condition
    whose grid is complete either extends it at an edge or starts its evaluation seeds; a distilled
    condition's evaluation seed waits for that seed's teacher model.
    """
    if workers > 1:
        context = multiprocessing.get_context("fork")  # the workers inherit the data: nothing is pickled
        executor: Any = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                            initargs=(data, pretrained, protocol, threads))  # fmt: skip
    else:
        executor = _Inline()
        _init_worker(data, pretrained, protocol, threads)
    tuning = {c: _Tuning(list(protocol.grid(c))) for c in conditions}
    pending: dict[Future, Task] = {}
    queue: list[tuple[Task, dict | None]] = []
    records: list[dict] = []
    teachers: dict[tuple, dict[str, Tensor]] = {}  # (condition, phase, lr or None, seed) -> state dict
    students = {c: TEACHER[c] for c in conditions if c in TEACHER}
    student_eval_started: set[tuple[str, int]] = set()

    def teaches(condition: str) -> bool:
        return condition in students.values()

    def teacher_of(student: str, phase: str, seed: int) -> tuple[dict[str, Tensor] | None, str]:
        """The teacher's state dict for ``student``'s run (None until that run has finished) and its label."""
        source = students[student]
        lr = tuning[source].selected
        key = (source, phase, lr if phase == "tune" else None, seed)
        return teachers.get(key), f"{source} lr {lr:g} seed {seed}"

    def submit(task: Task, teacher: dict | None = None) -> None:
        if bar is not None:
            bar.total += task.epochs or protocol.run_epochs(task.condition)
            bar.refresh()
        queue.append((task, teacher))

    def flush() -> None:
        # Longest first, so that a rolling-back run does not start last.
        queue.sort(key=lambda item: -(item[0].epochs or protocol.run_epochs(item[0].condition)))
        while queue:
            task, teacher = queue.pop(0)
            pending[executor.submit(_work, task, teacher)] = task

    def tune(condition: str, lrs: Sequence[float]) -> None:
        for lr in lrs:
            for seed in protocol.tune_seeds:
                teacher, name = teacher_of(condition, "tune", seed) if condition in students else (None, None)
                submit(Task(condition, lr, seed, "tune", teaches=teaches(condition), teacher=name), teacher)

    def release_students() -> None:
        for student in students:
            chosen = tuning[student]
            if chosen.selected is None:
                continue
            for seed in protocol.eval_seeds:
                teacher, name = teacher_of(student, "eval", seed)
                if (student, seed) not in student_eval_started and teacher is not None:
                    student_eval_started.add((student, seed))
                    submit(Task(student, chosen.selected, seed, "eval", teacher=name), teacher)

    def grid_done(condition: str) -> None:
        t = tuning[condition]
        ran = [r for r in records if r["condition"] == condition and r["phase"] == "tune"]
        if len(ran) < len(t.grid) * len(protocol.tune_seeds):
            return
        best = select_lr(ran, condition)
        extra = next_grid_step(t.grid, best, t.extensions, protocol.max_extensions)
        if extra is not None:
            t.grid.append(extra)
            tune(condition, [extra])
            return
        t.selected, t.edge = best, best in (min(t.grid), max(t.grid))
        for seed in protocol.eval_seeds:
            if condition not in students:
                submit(Task(condition, best, seed, "eval", teaches=teaches(condition)))
        for student, source in students.items():
            if source == condition:
                tune(student, tuning[student].grid)
        if condition == "ptl_v1":
            if ablation:
                for variant in VARIANTS:
                    for seed in protocol.eval_seeds:
                        submit(Task("ptl_v1", best, seed, "ablation", variant))
        if condition == "plain" and protocol.plateau_check:
            for seed in protocol.tune_seeds:
                submit(Task("plain", best, seed, "plateau", epochs=2 * protocol.epochs))
        release_students()

    try:
        for condition in conditions:
            if condition not in students:
                tune(condition, tuning[condition].grid)
        flush()
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                record, state = future.result()
                records.append(record)
                if state is not None:
                    teachers[(task.condition, task.phase, task.lr if task.phase == "tune" else None, task.seed)] = state
                if bar is not None:
                    bar.update(record["epochs"] * (protocol.rollback_periods if task.condition == "rollback" else 1))
                    bar.set_postfix_str(task.label, refresh=False)
                if task.phase == "tune":
                    grid_done(task.condition)
                elif task.phase == "eval" and teaches(task.condition):
                    release_students()
            flush()
    finally:
        executor.shutdown(wait=True)
    return records, tuning


# ----------------------------------------------------------------------------------------------- statistics


def _runs(records: list[dict], condition: str, phase: str, variant: str | None = None) -> list[dict]:
    return sorted((r for r in records if r["condition"] == condition and r["phase"] == phase
                   and r["variant"] == variant), key=lambda r: r["seed"])  # fmt: skip


def _compare(values: list[float], baseline: list[float]) -> dict:
    """Paired differences with their 95% t-interval and the smallest difference the run could detect."""
    out = paired(values, baseline)
    out["detectable"] = detectable_difference(out["std"], out["n"]) if out["std"] > 0 else 0.0
    return out


def summarise(records: list[dict], tuning: dict[str, _Tuning], conditions: Sequence[str]) -> dict[str, dict]:
    """Per condition on the evaluation seeds: accuracy, retrieval, curves, ladder usage, and the paired
    comparisons against ``plain`` and ``control``."""
    results: dict[str, dict] = {}
    for c in conditions:
        chosen = _runs(records, c, "eval")
        results[c] = {"lr": tuning[c].selected, "lr_at_edge": tuning[c].edge, "grid": sorted(tuning[c].grid),
                      **_summary(chosen)}  # fmt: skip
    for c in conditions:
        for baseline in BASELINES.get(c, ()) + ("plain", "control"):
            if baseline in results and c != baseline:
                for metric in ("test_acc", "map", "rank1"):
                    results[c][f"{metric}_vs_{baseline}"] = _compare(results[c][metric], results[baseline][metric])
    return results



def _summary(chosen: list[dict]) -> dict:
    out: dict[str, Any] = {"seeds": [r["seed"] for r in chosen]}
    for metric in ("test_acc", "map", "rank1"):
        values = [r[metric] for r in chosen]
        out[metric], (out[f"{metric}_mean"], out[f"{metric}_std"]) = values, mean_std(values)
    epochs = [p["epoch"] for p in chosen[0]["curve"]]
    per_epoch = [[r["curve"][k]["acc"] for r in chosen] for k in range(len(epochs))]
    out["curve_epochs"] = epochs
    out["curve_mean"] = [statistics.fmean(v) for v in per_epoch]
    out["curve_min"] = [min(v) for v in per_epoch]
    out["curve_max"] = [max(v) for v in per_epoch]
    if "usage" in chosen[0]:
        out["usage"] = {k: mean_std([r["usage"][k] for r in chosen]) for k in chosen[0]["usage"]}
    return out


def grid_table(records: list[dict], condition: str) -> dict[float, tuple[float, float]]:
    """``lr -> (mean, std)`` of the final validation accuracy over the tuning seeds."""
    runs = [r for r in records if r["condition"] == condition and r["phase"] == "tune"]
    return {lr: mean_std([r["val_acc"] for r in runs if r["lr"] == lr]) for lr in sorted({r["lr"] for r in runs})}


def plateau(records: list[dict], tuning: dict[str, _Tuning]) -> dict | None:
    """Plain at its lr for twice the epochs against the protocol's epochs, on the tuning seeds (validation)."""
    longer = _runs(records, "plain", "plateau")
    if not longer:
        return None
    shorter = [r for r in _runs(records, "plain", "tune") if r["lr"] == tuning["plain"].selected]
    return {"epochs": shorter[0]["epochs"], "longer_epochs": longer[0]["epochs"],
            "val_acc": [r["val_acc"] for r in shorter], "longer_val_acc": [r["val_acc"] for r in longer],
            "gain": paired([r["val_acc"] for r in longer], [r["val_acc"] for r in shorter])}  # fmt: skip


# ----------------------------------------------------------------------------------------------- output


def plot(results: dict[str, dict], title: str, path: Path) -> None:
    """Mean test accuracy per epoch with the min-max band over the evaluation seeds; rolling back (several
    periods) on a panel of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = [c for c in results if c == "rollback"]
    panels = [[c for c in results if c not in long]] + ([long] if long else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), dpi=110, squeeze=False)
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 2))]
    for ax, names in zip(axes[0], panels):
        for c, style in zip(names, styles):
            r = results[c]
            label = f"{c} (lr {r['lr']:g}): {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}%"
            (line,) = ax.plot(r["curve_epochs"], r["curve_mean"], linestyle=style, marker=".", label=label)
            ax.fill_between(r["curve_epochs"], r["curve_min"], r["curve_max"], color=line.get_color(), alpha=0.12)
        if "plain" in results and names == long:
            ax.axhline(results["plain"]["test_acc_mean"], color="grey", lw=1, ls="--", label="plain, final")
        ax.set_xlabel("fine-tuning epoch" + (" (all periods)" if names == long else ""))
        ax.set_ylabel("target test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", title="final: mean ± std over seeds; bands: min-max", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(report: dict, path: Path) -> list[str]:
    """The report's lines (``path``: where it is written, for the plot's name)."""
    proto, results, data, run = report["protocol"], report["results"], report["data"], report["run"]
    n = len(proto["eval_seeds"])
    lines = [
        "# The transfer protocol: plain fine-tuning vs PTL, its control, STD and rolling back",
        "",
        f"Made by `{run['command']}` at commit {run.get('commit') or 'unknown'} in {report['wall_s'] / 60:.1f} "
        f"minutes ({report['workers']} worker "
        f"process(es), torch {run['environment']['torch']}, {run['environment']['cpus']} CPUs; 1-minute load average "
        f"{run['environment']['load']:.1f} at the start, {report['load_end']:.1f} at the end). The design is in the "
        "docstring of `benchmarks/transfer.py`.",
    ]
    if report.get("note"):
        lines += ["", f"Note: {report['note']}"]
    pre = report["pretrain"]
    lines += [
        "",
        f"- data: `{data['dataset']}`, input {'x'.join(map(str, data['input_size']))}; source classes "
        f"{', '.join(data['source_classes'])}; target classes {', '.join(data['target_classes'])}",
        "- split sizes: " + ", ".join(f"{k} {v}" for k, v in data["sizes"].items()) + f" ({data['split']})",
        f"- backbone: {report['backbone']}, {report['backbone_params']} "
        "parameters; PTL adds " + ", ".join(f"{k} {v}" for k, v in report["ptl_params"].items()),
        f"- pre-training: {proto['source_epochs']} epoch(s) at lr {proto['source_lr']:g}, once (seed 0) for every "
        f"run; source test accuracy {pre['source_test_acc']:.2f}%",
        f"- fine-tuning: {proto['epochs']} epochs, batch {proto['batch_size']}, SGD momentum {proto['momentum']:g}"
        f"{', Nesterov' if proto['nesterov'] else ''}, weight decay {proto['weight_decay']:g}, cosine schedule; "
        f"rolling back: {proto['rollback_periods']} periods of {proto['epochs']} epochs",
        f"- lr tuned per condition on seeds {list(proto['tune_seeds'])} (validation only); evaluated on {n} fresh "
        f"seeds {list(proto['eval_seeds'])}; BatchNorm statistics re-estimated on the labelled training images "
        f"before every evaluation: {'yes' if proto['bn_reestimate'] else 'no'}",
    ]
    if data.get("budget_reason"):
        lines += ["", f"**Labelled budget.** {data['budget_reason']}"]
    lines += [
        "",
        f"## Test accuracy ({n} evaluation seeds, all {data['sizes']['target_test']} test images)",
        "",
        "Differences are paired by seed, with a two-sided 95% t-interval; *detectable* is the smallest true mean "
        "difference this run detects with 80% power (paired t-test at 0.05), from the observed spread of the "
        "per-seed differences.",
        "",
        "| condition | lr | test acc mean ± std | vs plain [95% CI] | detectable | better / worse | vs control [95% CI] "
        "| detectable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, r in results.items():
        cells = []
        for base in ("plain", "control"):
            p = r.get(f"test_acc_vs_{base}")
            cells += [interval(p), f"{p['detectable']:.2f}"] if p else ["", ""]
            if base == "plain":
                cells.append(f"{p['better']} / {p['worse']}" if p else "")
        edge = " (grid edge)" if r["lr_at_edge"] else ""
        lines.append(f"| {c} | {r['lr']:g}{edge} | **{r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}** | "
                     + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", f"One test image is {100 / data['sizes']['target_test']:.3g} points of accuracy.", "",
              power_statement(results, n)]  # fmt: skip
    if "test_acc_vs_std_plain" in results.get("std", {}):
        lines += ["", *teacher_section(results, n)]
    lines += [
        "",
        "## Retrieval on the target test set (the paper's ReID metrics)",
        "",
        "`bconv.distill.pooled_features` of the final model (eval mode); each test image queries all the others by "
        "cosine similarity; relevant = same class.",
        "",
        "| condition | mAP mean ± std | mAP vs plain [95% CI] | mAP vs control | rank-1 mean ± std | rank-1 vs plain "
        "[95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for c, r in results.items():
        vs = [interval(r[k]) if k in r else "" for k in ("map_vs_plain", "map_vs_control", "rank1_vs_plain")]
        lines.append(f"| {c} | {r['map_mean']:.2f} ± {r['map_std']:.2f} | {vs[0]} | {vs[1]} | "
                     f"{r['rank1_mean']:.2f} ± {r['rank1_std']:.2f} | {vs[2]} |")  # fmt: skip
    usage = {c: r["usage"] for c, r in results.items() if "usage" in r}
    lines += ["", "## How much the PTL models use their ladder (`bconv.ladder_usage`)", ""]
    if usage:
        lines += [
            f"On the first {USAGE_BATCH} labelled training images, after training, mean ± std over the seeds. "
            "*stage share*: |out - out_0| / |out| at the replaced stage output, out_0 with the cells' output zeroed "
            "(eval mode); *output share*: the same for the logits; *state effect*: the logits with the carried "
            "state against zero state (train mode).",
            "",
            "| condition | stage share | output share | state effect |",
            "|---|---|---|---|",
        ]
        for c, u in usage.items():
            lines.append(f"| {c} | " + " | ".join(f"{u[k][0]:.3g} ± {u[k][1]:.2g}" if k in u else ""
                                                   for k in ("stage_share", "output_share", "state_effect")) + " |")  # fmt: skip
    else:
        lines.append("Not measured: this bconv has no `ladder_usage` (issue 18).")
    if report.get("ablation"):
        ab = report["ablation"]
        lines += [
            "",
            f"## Ablation: bconv's departures from the paper (ptl_v1 at lr {results['ptl_v1']['lr']:g}, same seeds)",
            "",
            "| variant | change | test acc mean ± std | vs ptl_v1 [95% CI] | detectable | vs plain [95% CI] | mAP mean |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in ab.items():
            vs_plain = interval(r["test_acc_vs_plain"]) if "test_acc_vs_plain" in r else ""
            lines.append(f"| {name} | {r['change']} | {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} | "
                         f"{interval(r['test_acc_vs_ptl_v1'])} | {r['test_acc_vs_ptl_v1']['detectable']:.2f} | {vs_plain} | "
                         f"{r['map_mean']:.2f} |")  # fmt: skip
    lines += ["", "## Learning-rate tuning (mean ± std final validation accuracy over the tuning seeds; chosen in bold)", ""]
    for c in results:
        cells = [f"lr {lr:g}: " + (f"**{m:.2f} ± {s:.2f}**" if lr == results[c]["lr"] else f"{m:.2f} ± {s:.2f}")
                 for lr, (m, s) in report["grids"][c].items()]  # fmt: skip
        lines.append(f"- {c}: " + "; ".join(cells) + (" (the chosen lr is still an edge after the allowed "
                                                       "extensions)" if results[c]["lr_at_edge"] else ""))  # fmt: skip
    if report.get("plateau"):
        p = report["plateau"]
        lines += ["", "## Plateau check", "",
                  f"Plain at its lr for {p['longer_epochs']} epochs against {p['epochs']} (tuning seeds, validation "
                  f"accuracy): {statistics.fmean(p['longer_val_acc']):.2f}% against "
                  f"{statistics.fmean(p['val_acc']):.2f}%, difference {interval(p['gain'])}."]  # fmt: skip
    lines += ["", "Per evaluation seed (test accuracy %):", "",
              "| condition | " + " | ".join(f"seed {s}" for s in proto["eval_seeds"]) + " |",
              "|---|" + "---|" * n]  # fmt: skip
    for c, r in results.items():
        lines.append(f"| {c} | " + " | ".join(f"{a:.2f}" for a in r["test_acc"]) + " |")
    lines += ["", f"![test accuracy per epoch]({path.with_suffix('.png').name})", "",
              f"Mean test accuracy every {proto['curve_every']} epochs (the evaluation seeds; on the first "
              f"{CURVE_TEST_PER_CLASS} test images of each class, the final numbers on all), band: min-max."]  # fmt: skip
    lines += ["", "## Cost", "", "| condition | runs | CPU seconds per run (mean) |", "|---|---|---|"]
    for c, (runs, cpu) in report["cost"].items():
        lines.append(f"| {c} | {runs} | {cpu:.1f} |")
    return lines


def teacher_section(results: dict[str, dict], n: int) -> list[str]:
    """STD with the PTL teacher against STD with the plain teacher (the born-again control), paired by seed."""
    std, born = results["std"], results["std_plain"]
    lines = [
        "## Is STD's gain the PTL teacher's? (the born-again control)",
        "",
        f"`std` distils the `ptl_v1` model of each seed (lr {results['ptl_v1']['lr']:g}) and `std_plain` the `plain` "
        f"model of the same seed (lr {results['plain']['lr']:g}), each student at its own tuned lr (`std` "
        f"{std['lr']:g}, `std_plain` {born['lr']:g}), on the same {n} evaluation seeds.",
        "",
        "| metric | std (PTL teacher) | std_plain (plain teacher) | difference [95% CI] | detectable | better / worse |",
        "|---|---|---|---|---|---|",
    ]
    for metric, name in (("test_acc", "test accuracy"), ("map", "mAP"), ("rank1", "rank-1")):
        d = std[f"{metric}_vs_std_plain"]
        lines.append(f"| {name} | {std[f'{metric}_mean']:.2f} ± {std[f'{metric}_std']:.2f} | "
                     f"{born[f'{metric}_mean']:.2f} ± {born[f'{metric}_std']:.2f} | {interval(d)} | "
                     f"{d['detectable']:.2f} | {d['better']} / {d['worse']} |")  # fmt: skip
    return lines


def power_statement(results: dict[str, dict], n: int) -> str:
    """One sentence from the measured spreads: the smallest differences this run could detect."""
    parts = [f"{c} vs {base} {r[f'test_acc_vs_{base}']['detectable']:.2f}" for c, r in results.items()
             for base in ("plain", "control", *BASELINES.get(c, ())) if f"test_acc_vs_{base}" in r]  # fmt: skip
    if not parts:
        return ""
    return (f"**Power.** With {n} seeds and the spreads observed here, the run detects (80% power, paired t at "
            f"0.05) true differences of at least, in points: {'; '.join(parts)}. A smaller true difference may "
            f"exist without showing in the intervals above.")  # fmt: skip


# ----------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, command: str) -> dict:
    """Pre-train once, run the protocol, summarise and write the report."""
    from tqdm import tqdm

    start, env = time.perf_counter(), environment()
    protocol = args.protocol
    data = make_data(args.dataset, args.data_dir, args.image_size, args.per_class, args.budget, args.val_per_class)
    conditions = [c for c in CONDITIONS if c in args.conditions]
    backbone = make_backbone(protocol, data.input_size[0], len(data.target_classes))
    # Built before anything runs, so that a condition this bconv cannot build stops the run at once.
    ptl_params = {c: params(_ptl_model(c, copy.deepcopy(backbone), data).ptl) for c in conditions if c in PTL}
    with tqdm(total=protocol.source_epochs, desc="pre-train", unit="epoch", leave=False) as bar:
        torch.set_num_threads(args.workers)
        pretrained, source_acc = pretrain(data, protocol, bar=bar)
        torch.set_num_threads(args.threads)
    with tqdm(total=0, desc="protocol", unit="epoch") as bar:
        records, tuning = run_protocol(data, pretrained, protocol, conditions, args.ablation, args.workers, args.threads,
                                       bar)  # fmt: skip
    results = summarise(records, tuning, conditions)
    ablation = {}
    if args.ablation:
        for name, (change, _) in VARIANTS.items():
            r = {"change": change, **_summary(_runs(records, "ptl_v1", "ablation", name))}
            for metric in ("test_acc", "map", "rank1"):
                r[f"{metric}_vs_ptl_v1"] = _compare(r[metric], results["ptl_v1"][metric])
                if "plain" in results:
                    r[f"{metric}_vs_plain"] = _compare(r[metric], results["plain"][metric])
            ablation[name] = r
    cost = {}
    for c in conditions:
        runs = [r for r in records if r["condition"] == c]
        cost[c] = (len(runs), statistics.fmean(r["cpu_seconds"] for r in runs))
    report = {
        "run": run_record(command, env),
        "note": args.note,
        "protocol": asdict(protocol),
        "conditions": conditions,
        "data": {"dataset": data.name, "input_size": list(data.input_size), "source_classes": data.source_classes,
                 "target_classes": data.target_classes, "sizes": data.sizes(), "augment": data.augment,
                 "split": data.split, "budget_reason": data.budget_reason if args.budget else None},  # fmt: skip
        "backbone": describe_backbone(protocol),
        "backbone_params": params(backbone),
        "ptl_params": ptl_params,
        "pretrain": {"seed": 0, "source_test_acc": source_acc},
        "selected_lr": {c: t.selected for c, t in tuning.items()},
        "grids": {c: grid_table(records, c) for c in conditions},
        "results": results,
        "ablation": ablation,
        "plateau": plateau(records, tuning) if "plain" in conditions else None,
        "cost": cost,
        "runs": records,
        "workers": args.workers,
        "wall_s": round(time.perf_counter() - start, 1),
        "load_end": os.getloadavg()[0],
    }
    out: Path = args.out
    write_results(out, report, markdown(report, out))
    title = (f"{data.name}: fine-tuning on {', '.join(data.target_classes)} after pre-training on "
             f"{', '.join(data.source_classes)} ({len(protocol.eval_seeds)} seeds)")  # fmt: skip
    plot(results, title, out.with_suffix(".png"))
    return report


def render(out: Path) -> dict:
    """Write ``OUT.md`` again from ``OUT.json`` (a run's report, unchanged) with this version's report layout."""
    path = out.with_suffix(".json")
    if not path.is_file():
        raise SystemExit(f"--render reads a finished run's report: {path} does not exist (pass its --out)")
    report = json.loads(path.read_text())
    if "run" not in report:
        raise SystemExit(f"{path} predates the run record (command, commit, environment) that a report names; "
                         "--render re-writes reports of this version's runs only")
    report["grids"] = {c: {float(lr): v for lr, v in grid.items()} for c, grid in report["grids"].items()}
    out.with_suffix(".md").write_text("\n".join(markdown(report, out)) + "\n")
    return report


def estimate(args: argparse.Namespace) -> dict:
    """Time one run of each condition at its budget (the middle of its grid, one seed) and extrapolate the
    whole protocol's cost on ``--workers`` processes, assuming no grid extension."""
    from tqdm import tqdm

    protocol = args.protocol
    data = make_data(args.dataset, args.data_dir, args.image_size, args.per_class, args.budget, args.val_per_class)
    conditions = [c for c in CONDITIONS if c in args.conditions]
    t = time.perf_counter()
    cpu = time.process_time()
    pretrained, _ = pretrain(data, protocol)
    pretrain_cpu, pretrain_wall = time.process_time() - cpu, time.perf_counter() - t
    print(f"pre-training: {pretrain_cpu:.1f} CPU s, {pretrain_wall:.1f} s", flush=True)
    _init_worker(data, pretrained, protocol, args.threads)
    measured: dict[str, dict] = {}
    states: dict[str, dict[str, Tensor]] = {}
    for c in tqdm(sorted(conditions, key=lambda c: c in TEACHER), desc="one run per condition"):
        grid = protocol.grid(c)
        task = Task(c, grid[len(grid) // 2], protocol.eval_seeds[0], "eval", teaches=c in TEACHER.values())
        record, state = run_task(task, data, pretrained, protocol, states.get(TEACHER.get(c, "")))
        if state is not None:
            states[c] = state
        measured[c] = {"cpu_seconds": record["cpu_seconds"], "seconds": record["seconds"]}
        tqdm.write(f"{c}: {record['cpu_seconds']:.1f} CPU s, {record['seconds']:.1f} s")
    runs = {c: len(protocol.grid(c)) * len(protocol.tune_seeds) + len(protocol.eval_seeds) for c in conditions}
    if args.ablation and "ptl_v1" in conditions:
        runs["ptl_v1"] += len(VARIANTS) * len(protocol.eval_seeds)
    cpu_total = sum(runs[c] * measured[c]["cpu_seconds"] for c in conditions)
    if protocol.plateau_check and "plain" in conditions:
        cpu_total += 2 * len(protocol.tune_seeds) * measured["plain"]["cpu_seconds"]
    out = {"pretrain_cpu_s": pretrain_cpu, "pretrain_wall_s": pretrain_wall, "per_run": measured, "runs": runs,
           "cpu_total_s": cpu_total, "workers": args.workers,
           "estimated_wall_min": (pretrain_cpu / min(args.workers, 2) + cpu_total / args.workers) / 60,
           "load": os.getloadavg()[0]}  # fmt: skip
    print(json.dumps(out, indent=1))
    return out


#: per dataset: labelled budget and validation images per class (official test sets), pre-training epochs
DATASET_DEFAULTS = {"fashion-mnist": (BUDGET, VAL_PER_CLASS, 3), "cifar10": (None, None, 15),
                    "digits": (None, None, 15), "folder": (None, None, 15)}  # fmt: skip
QUICK = dict(epochs=2, source_epochs=1, width=4, rollback_periods=2, tune_seeds=(0, 1), eval_seeds=(100, 101),
             max_extensions=1, curve_every=1, val_curve_every=1)  # fmt: skip
QUICK_GRIDS = {c: (0.01, 0.1) for c in CONDITIONS}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--dataset", choices=("fashion-mnist", "digits", "cifar10", "folder"), default="fashion-mnist")
    parser.add_argument("--data-dir", type=Path,
                        help=f"fashion-mnist: the folder of the four IDX files (default {FASHION_MNIST_DIR}); "
                        "cifar10: the folder holding cifar-10-batches-py; folder: the ImageFolder tree")
    parser.add_argument("--image-size", type=int, help="resize images to this (default: the dataset's; digits 16)")
    parser.add_argument("--per-class", type=int, help="use at most this many images per class in every split")
    parser.add_argument("--budget", type=int, help=f"labelled target training images per class (default {BUDGET})")
    parser.add_argument("--val-per-class", type=int, help=f"target validation images per class (default {VAL_PER_CLASS})")
    parser.add_argument("--backbone", choices=BACKBONES, default="small",
                        help="small: the 3-stage ResNet of width --width (default); resnet18: timm's ResNet-18")
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--ablation", action="store_true", help="also run ptl_v1's ablation (reset never, pooled state)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default 48)")
    parser.add_argument("--source-epochs", type=int, help="pre-training epochs (default 3 over 30,000 images)")
    parser.add_argument("--width", type=int, help="channels of the backbone's first stage (default 16)")
    parser.add_argument("--rollback-periods", type=int, help="rolling-back periods, each --epochs long (default 4)")
    parser.add_argument("--eval-seeds", type=int, nargs="+", help="evaluation seeds (default 100..119; at least 10)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2; 1 runs in this process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds: 2 epochs, width 4, lrs 0.01 0.1, 2 + 2 seeds, 10 + 10 images per "
                        "class (it is not the protocol: too few seeds and steps to tell anything)")
    parser.add_argument("--estimate", action="store_true",
                        help="time one run per condition at its budget and extrapolate the whole run; writes nothing")
    parser.add_argument("--note", help="a sentence about the run's circumstances, written into the results")
    parser.add_argument("--render", action="store_true",
                        help="only write OUT.md again from OUT.json (a finished run's measurements, unchanged)")
    parser.add_argument("--out", type=Path, help="output path without suffix (default benchmarks/results/transfer_<dataset>)")
    args = parser.parse_args(argv)
    budget, val, source_epochs = DATASET_DEFAULTS[args.dataset]
    protocol = Protocol(source_epochs=source_epochs, backbone=args.backbone)
    if args.quick:
        protocol = replace(protocol, grids=dict(QUICK_GRIDS), **QUICK)
        budget, val = (10, 10) if budget else (None, None)
    if args.budget is not None and budget is None:
        parser.error(f"--budget needs a dataset with an official test set (fashion-mnist, cifar10), not {args.dataset}")
    args.budget = args.budget if args.budget is not None else budget
    args.val_per_class = args.val_per_class if args.val_per_class is not None else val
    if args.budget is not None and (args.budget < 1 or args.val_per_class < 1):
        parser.error(f"--budget and --val-per-class must be at least 1, got {args.budget} and {args.val_per_class}")
    changes = {k: getattr(args, k) for k in ("epochs", "source_epochs", "width", "rollback_periods")
               if getattr(args, k) is not None}  # fmt: skip
    if args.eval_seeds is not None:
        if len(args.eval_seeds) < 10 and not args.quick:
            parser.error(f"--eval-seeds: the protocol evaluates on at least 10 seeds, got {len(args.eval_seeds)}")
        if set(args.eval_seeds) & set(protocol.tune_seeds):
            parser.error(f"--eval-seeds must be fresh: not the tuning seeds {list(protocol.tune_seeds)}")
        changes["eval_seeds"] = tuple(args.eval_seeds)
    args.protocol = replace(protocol, **changes)
    for student, teacher in TEACHER.items():
        if student in args.conditions and teacher not in args.conditions:
            parser.error(f"the {student} condition distils the {teacher} model: add {teacher} to --conditions")
    if args.ablation and "ptl_v1" not in args.conditions:
        parser.error("the ablation varies the ptl_v1 condition: add ptl_v1 to --conditions")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.out is None:
        suffix = "" if args.backbone == "small" else f"_{args.backbone}"
        args.out = RESULTS / f"transfer_{args.dataset.replace('-', '_')}{suffix}"
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render:
        return render(args.out)
    if args.estimate:
        return estimate(args)
    report = run(args, run_command("transfer", argv))
    for c, r in report["results"].items():
        gains = "".join(f"; vs {b} {interval(r[f'test_acc_vs_{b}'])}" for b in ("plain", "control") if f"test_acc_vs_{b}" in r)
        print(f"{c:13s} lr {r['lr']:<6g} test acc {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}% "
              f"(n={len(r['seeds'])}){gains}")  # fmt: skip
    for name, r in report["ablation"].items():
        print(f"ablation {name}: test acc {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}%; "
              f"vs ptl_v1 {interval(r['test_acc_vs_ptl_v1'])}")  # fmt: skip
    print(f"wall time {report['wall_s'] / 60:.1f} min; wrote {args.out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
