"""What every benchmark shares: data, seeding, the training loop, evaluation, retrieval and paired statistics.

Benchmarks are modules of the ``benchmarks`` package, run from the repository root as
``python -m benchmarks.NAME``; they import this module and never each other.

* **Data**: :class:`Split` (images and labels in memory), :func:`read_idx` and :func:`load_fashion_mnist`
  (the IDX files of ``apt-get install dataset-fashion-mnist``, gzipped or not, read from disk),
  :func:`load_digits` (scikit-learn's bundled digits), :func:`load_cifar10` (a local copy through
  torchvision, never downloaded), :func:`load_folder` (an ImageFolder tree), and label-balanced subsets:
  :func:`per_class_split` (fractions of every class), :func:`per_class_counts` (exact counts per class),
  :func:`balanced_subset` (at most n per class).
* **Seeding**: :func:`seeded` seeds torch, numpy and ``random`` and returns the generator that orders
  and augments the data, so a run is fixed by its seed.
* **Training**: :func:`batches` (one shuffled epoch, optionally augmented: :func:`crop_flip`,
  :func:`shift`), :func:`train_epochs` (any step under a cosine schedule; a PTL model's state is reset
  every epoch and detached every step).
* **Evaluation**: :func:`evaluate` (accuracy and cross-entropy in eval mode), :func:`reestimate_bn`
  (BatchNorm running statistics recomputed on training images, torch's ``update_bn``),
  :func:`retrieval_metrics` (mAP and rank-1, each item querying all the others; checked against
  torchmetrics' ``RetrievalMAP`` and ``RetrievalHitRate`` in ``tests/test_benchmarks.py``).
* **Statistics**: :func:`paired` (per-seed differences with a 95% t-interval) and
  :func:`detectable_difference` (the smallest paired difference a run of that size and spread detects).
* **Zoo**: :func:`models` (every torchvision classifier and one model per timm family, or a selection, each
  with its family) and :func:`input_size_of` (a zoo model's own input size).
* **Measuring**: :func:`params` and :func:`flops` (forward FLOPs at batch 1, :class:`bconv.surgery.TotalFlopCounter`,
  torch's FLOP counter), :func:`logits` (the tensor in a model's output), :func:`first_line` (an error as one
  line), :func:`side_by_side` (steps timed interleaved in one process, per repeat) and :func:`ratios`.
* **References**: :class:`HandWiredPTLResNet`, a PTL torchvision ResNet wired by hand, the ladder's equations
  as an explicit forward.
* **Records**: :func:`command` (the ``python -m`` line that reproduces a run), :func:`commit`, :func:`environment`,
  :func:`run_record` (the three under one key) and :func:`write_results` (``OUT.md`` and ``OUT.json``, the run's
  record under ``"run"``).
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import math
import os
import platform
import random
import shlex
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bconv import unwrap_ptl
from bconv._zoo import ZooModel, resolve, timm_families, torchvision_input_size, torchvision_names
from bconv.prune import reestimate_batchnorm
from bconv.surgery import TotalFlopCounter, default_input_size

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "RESULTS", "HandWiredPTLResNet", "Split", "balanced_subset", "batches",
    "command", "commit", "crop_flip", "detectable_difference", "environment", "evaluate", "family_of", "first_line", "flops",
    "input_size_of", "interval", "load_cifar10", "load_digits", "load_fashion_mnist", "load_folder", "logits", "mean_std",
    "models", "paired", "params", "per_class_counts", "per_class_split", "positive_int", "ratios", "read_idx",
    "reestimate_bn", "relabel", "resize", "retrieval_metrics", "run_record", "seeded", "shift", "side_by_side",
    "train_epochs", "write_results",
]  # fmt: skip

RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    """Images ``x`` ``[N, C, H, W]`` (float) and labels ``y`` ``[N]`` (0..classes-1)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: Tensor) -> Split:
        return Split(self.x[index], self.y[index])


def resize(x: Tensor, size: int) -> Tensor:
    """``x`` resized (bilinear) to ``size`` x ``size``; unchanged when it already is."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def load_digits(image_size: int = 8) -> tuple[Tensor, Tensor, list[str]]:
    """scikit-learn's bundled digits: ``[1797, 1, S, S]`` in [0, 1], labels, class names."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    return resize(x, image_size), torch.tensor(digits.target, dtype=torch.long), [str(c) for c in range(10)]


def load_cifar10(data_dir: Path, train: bool, image_size: int = 32) -> tuple[Tensor, Tensor, list[str]]:
    """torchvision's CIFAR-10 from a local copy (``data_dir/cifar-10-batches-py``); nothing is downloaded."""
    from torchvision.datasets import CIFAR10

    dataset = CIFAR10(str(data_dir), train=train, download=False)
    x = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float() / 255.0
    return resize(x, image_size), torch.tensor(dataset.targets, dtype=torch.long), list(dataset.classes)


def load_folder(data_dir: Path, image_size: int) -> tuple[Tensor, Tensor, list[str]]:
    """``torchvision.datasets.ImageFolder(data_dir)``, RGB, resized to ``image_size`` x ``image_size``."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(data_dir), transform=transforms.Compose([
        transforms.Resize((image_size, image_size)), transforms.ToTensor(),
    ]))  # fmt: skip
    if not len(dataset):
        raise ValueError(f"no images found under {data_dir}")
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return x, torch.tensor(dataset.targets, dtype=torch.long), list(dataset.classes)


#: where ``apt-get install dataset-fashion-mnist`` puts the files (``dpkg -L dataset-fashion-mnist``)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
#: the element type of an IDX file: its third magic byte -> a big-endian numpy dtype
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not, as a numpy array.

    The header is two zero bytes, a type byte, the number of dimensions, then each dimension as a
    big-endian uint32; the data follow, big-endian.

    Args:
        path: the file; gzip is recognised by its magic bytes, not by the name.

    Returns:
        The array, shaped as the header says, in native byte order.

    Raises:
        ValueError: not an IDX file, or its size disagrees with its header.

    Example::

        >>> read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").shape
        (10000,)
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file: it starts with {raw[:4].hex()}, expected 0000 + a type byte "
                         f"({', '.join(f'{t:02x}' for t in _IDX_TYPES)}) + the number of dimensions")  # fmt: skip
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else None
    if shape is None or len(raw) - header != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: {len(raw)} bytes do not hold the {ndim}-d array of shape {shape} its header declares")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    raise SystemExit(
        f"Fashion-MNIST not found: no {stem}[.gz] in {data_dir}. Install it with "
        f"`apt-get install dataset-fashion-mnist` (it goes to {FASHION_MNIST_DIR}), or pass --data-dir DIR with "
        f"the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte, gzipped or not)"
    )


def load_fashion_mnist(data_dir: Path | None, train: bool) -> tuple[Tensor, Tensor, list[str]]:
    """Fashion-MNIST from its four IDX files: ``[N, 1, 28, 28]`` in [0, 1], labels, class names.

    Args:
        data_dir: the folder of the IDX files; ``None``: where the Debian package puts them.
        train: the 60,000 training images, or the 10,000 test images.
    """
    data_dir = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    prefix = "train" if train else "t10k"
    images = read_idx(_idx_file(data_dir, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(data_dir, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{data_dir}: {prefix} images {images.shape} and labels {labels.shape} do not match "
                         f"(expected [N, H, W] and [N])")  # fmt: skip
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64)), list(FASHION_MNIST_CLASSES)


def relabel(x: Tensor, y: Tensor, classes: Sequence[int]) -> Split:
    """The images of ``classes``, labelled by their position in ``classes``."""
    mapping = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    mapping[torch.tensor(list(classes))] = torch.arange(len(classes))
    keep = mapping[y] >= 0
    return Split(x[keep], mapping[y[keep]])


def per_class_split(y: Tensor, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Indices of ``len(fractions)`` disjoint parts, each holding that fraction of every class."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in fractions]
    bounds_of = np.cumsum(fractions)
    bounds_of[-1] = 1.0
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        bounds = [round(float(b) * len(idx)) for b in bounds_of]
        for k, (lo, hi) in enumerate(zip([0, *bounds[:-1]], bounds)):
            parts[k].append(idx[lo:hi])
    return [torch.cat(p) for p in parts]


def per_class_counts(y: Tensor, counts: Sequence[int], seed: int) -> list[Tensor]:
    """Indices of ``len(counts)`` disjoint parts holding exactly ``counts[k]`` images of every class.

    Raises:
        SystemExit: a class has fewer than ``sum(counts)`` images.
    """
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in counts]
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < sum(counts):
            raise SystemExit(f"class {int(c)} has {len(idx)} training images; the split needs {sum(counts)} "
                             f"({' + '.join(map(str, counts))} per class)")  # fmt: skip
        idx = idx[torch.randperm(len(idx), generator=gen)]
        bounds = np.cumsum([0, *counts]).tolist()
        for k in range(len(counts)):
            parts[k].append(idx[bounds[k] : bounds[k + 1]])
    return [torch.cat(p) for p in parts]


def balanced_subset(split: Split, per_class: int | None) -> Split:
    """At most ``per_class`` images of each class, the first ones in order (``None``: all of them)."""
    if per_class is None:
        return split
    keep = torch.cat([torch.nonzero(split.y == c).flatten()[:per_class] for c in torch.unique(split.y)])
    return split.take(keep.sort().values)


# ----------------------------------------------------------------------------------------------- seeding


def seeded(seed: int) -> torch.Generator:
    """Seed torch's, numpy's and Python's global generators with ``seed`` and return a fresh generator.

    The global generators initialise what is built next (a classifier, a ladder); the returned generator
    orders and augments the data, so the data stream of a seed does not depend on how many parameters
    were drawn before it.
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- training

Augment = Callable[[Tensor, torch.Generator], Tensor]


def crop_flip(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with ``pad`` pixels of zero padding and random horizontal flip, per image."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (len(x), 2), generator=gen).tolist()
    h, w = x.shape[-2:]
    return torch.stack([p[:, i : i + h, j : j + w] for p, (i, j) in zip(padded, offsets)])


def shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """The whole batch rolled by one random shift of -1, 0 or 1 pixel along each spatial axis."""
    dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
    return torch.roll(x, shifts=(dx, dy), dims=(2, 3))


def batches(split: Split, batch_size: int, gen: torch.Generator, augment: Augment | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled mini-batches ``(x, y)``; the last one may be smaller."""
    order = torch.randperm(len(split), generator=gen)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x = split.x[idx]
        yield (augment(x, gen) if augment is not None else x), split.y[idx]


def _cross_entropy_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[Tensor, Tensor], None]:
    def step(x: Tensor, y: Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Split,
    epochs: int,
    gen: torch.Generator,
    *,
    batch_size: int,
    augment: Augment | None = None,
    step: Callable[[Tensor, Tensor], None] | None = None,
    schedule: str = "epoch",
    reset_state: bool = True,
    after_epoch: Callable[[int], dict | None] | None = None,
    bar=None,
) -> list[dict]:
    """``epochs`` epochs of mini-batch steps under a cosine schedule from the optimizer's learning rates to 0.

    Args:
        model: the model; put in train mode at the start of every epoch. A model with ``reset_state`` (a
            PTL model) has its state reset at the start of every epoch (unless ``reset_state=False``: only
            a fresh wrap starts from zeros) and detached after every step.
        optimizer: its learning rates are the schedule's start.
        train: the training images.
        epochs: passes over ``train``.
        gen: orders (and augments) the data.
        batch_size: images per step (the last step of an epoch may have fewer).
        augment: applied to each batch with ``gen``.
        step: ``step(x, y)`` trains on one batch; default: cross-entropy of ``model(x)``, one optimizer step.
        schedule: ``"epoch"``: the cosine steps once per epoch; ``"step"``: once per step.
        reset_state: reset a PTL model's state every epoch.
        after_epoch: called with the epoch's index after it; what it returns is collected.
        bar: a tqdm bar advanced by one per epoch (its postfix shows the last ``*_acc`` returned).

    Returns:
        What ``after_epoch`` returned for each epoch (``{}`` without it).
    """
    step = step or _cross_entropy_step(model, optimizer)
    per_epoch = math.ceil(len(train) / batch_size)
    if schedule not in ("epoch", "step"):
        raise ValueError(f"schedule must be 'epoch' or 'step', got {schedule!r}")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * (per_epoch if schedule == "step" else 1))
    stateful = hasattr(model, "reset_state")
    curve = []
    for epoch in range(epochs):
        model.train()
        if stateful and reset_state:
            model.reset_state()
        for x, y in batches(train, batch_size, gen, augment):
            step(x, y)
            if stateful:
                model.detach_state()
            if schedule == "step":
                scheduler.step()
        if schedule == "epoch":
            scheduler.step()
        point = (after_epoch(epoch) if after_epoch is not None else None) or {}
        curve.append(point)
        if bar is not None:
            bar.update(1)
            accs = [k for k in point if k.endswith("_acc")]
            if accs:
                bar.set_postfix(acc=f"{point[accs[-1]]:.1f}")
    return curve


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 256) -> tuple[float, float]:
    """``(accuracy %, mean cross-entropy)`` of ``model`` in eval mode (a PTL model: zero state)."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(split), batch_size):
        x, y = split.x[start : start + batch_size], split.y[start : start + batch_size]
        logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    return 100.0 * correct / len(split), loss / len(split)


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: Tensor, batch_size: int = 256) -> None:
    """Recompute every BatchNorm's running statistics as the plain average over ``x`` (:func:`bconv.prune.reestimate_batchnorm`).

    A few hundred steps of momentum 0.1 leave running statistics that depend on the last batches a seed
    happened to draw; eval then measures them as much as the weights. A PTL model's state is reset before
    every batch, so its ladder sees what it sees in eval (zero state), and once more at the end. ``model``
    ends in eval mode.
    """
    stateful = hasattr(model, "reset_state")

    def inputs() -> Iterator[Tensor]:
        for start in range(0, len(x), batch_size):
            if stateful:
                model.reset_state()
            yield x[start : start + batch_size]

    reestimate_batchnorm(model, inputs())
    if stateful:
        model.reset_state()
    model.eval()


@torch.no_grad()
def retrieval_metrics(features: Tensor, labels: Tensor, chunk: int = 512) -> dict[str, float]:
    """Retrieval on one set: each item queries all the others (never itself), ranked by cosine similarity.

    Equal to torchmetrics' ``RetrievalMAP`` and ``RetrievalHitRate(top_k=1)`` over the same pairs
    (``empty_target_action="skip"``), computed a block of queries at a time.

    Args:
        features: ``[N, D]``.
        labels: ``[N]``; an item is relevant to a query when their labels are equal.
        chunk: queries per block (memory ``chunk * N``).

    Returns:
        ``{"map": mean average precision %, "rank1": % of queries whose nearest other item is relevant}``,
        over the queries that have at least one relevant item.

    Example::

        >>> retrieval_metrics(torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]]), torch.tensor([0, 0, 1, 1]))
        {'map': 100.0, 'rank1': 100.0}
    """
    f = F.normalize(features.float(), dim=1)
    n = len(f)
    ranks = torch.arange(1, n, dtype=torch.float32)
    ap_sum, top1_sum, queries = 0.0, 0.0, 0
    for start in range(0, n, chunk):
        q = torch.arange(start, min(start + chunk, n))
        sim = f[q] @ f.T
        sim[torch.arange(len(q)), q] = -float("inf")  # the query itself ranks last, then is dropped
        order = sim.argsort(dim=1, descending=True)[:, :-1]
        match = (labels[order] == labels[q, None]).float()
        relevant = match.sum(1)
        has = relevant > 0
        precision = match.cumsum(1) / ranks
        ap_sum += float(((precision * match).sum(1)[has] / relevant[has]).sum())
        top1_sum += float(match[has, 0].sum())
        queries += int(has.sum())
    if not queries:
        raise ValueError("no query has a relevant item: every label occurs once")
    return {"map": 100.0 * ap_sum / queries, "rank1": 100.0 * top1_sum / queries}


# ----------------------------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(values: Sequence[float], baseline: Sequence[float]) -> dict[str, float | int]:
    """Per-seed differences ``values - baseline`` (same seeds, same order): mean, std, 95% t-interval.

    Args:
        values: one number per seed.
        baseline: the baseline's numbers for the same seeds.

    Returns:
        ``mean``, ``std``, ``ci_low``, ``ci_high`` (a two-sided 95% t-interval over the seeds for the mean
        difference), ``better`` and ``worse`` (seeds above / below the baseline), ``n``.

    Example::

        >>> paired([91.0, 92.0, 93.0], [90.0, 90.0, 90.0])["mean"]
        2.0
    """
    from scipy.stats import t

    if len(values) != len(baseline) or len(values) < 2:
        raise ValueError(f"paired differences need the same >= 2 seeds on both sides, got {len(values)} and "
                         f"{len(baseline)}")  # fmt: skip
    diffs = [a - b for a, b in zip(values, baseline)]
    mean, std = mean_std(diffs)
    half = float(t.ppf(0.975, len(diffs) - 1)) * std / math.sqrt(len(diffs))
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": len(diffs),
            "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs)}  # fmt: skip


def detectable_difference(std: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true mean difference a two-sided paired t-test over ``n`` seeds detects with ``power``.

    Solves the noncentral-t power equation for the effect size d (in units of the per-seed difference's
    standard deviation ``std``): P(|T| > t_{1-alpha/2, n-1}) = power, T ~ nct(n-1, d * sqrt(n)).

    Args:
        std: standard deviation of the per-seed differences (as observed).
        n: seeds.
        power: the probability of detecting it.
        alpha: the test's level.

    Returns:
        The difference, in the units of ``std``.

    Example::

        >>> round(detectable_difference(1.0, 10), 1)  # 10 seeds detect about 1 std of the differences
        1.0
    """
    from scipy.optimize import brentq
    from scipy.stats import nct, t

    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 seeds, got {n}")
    crit = float(t.ppf(1 - alpha / 2, n - 1))

    def shortfall(d: float) -> float:
        nc = d * math.sqrt(n)
        wrong_side = float(nct.cdf(-crit, n - 1, nc))  # scipy gives NaN where it is far below 1e-9
        return float(nct.sf(crit, n - 1, nc)) + (0.0 if math.isnan(wrong_side) else wrong_side) - power

    high = 1.0
    while shortfall(high) < 0:  # widen until the power is reached (nct is unstable far beyond it)
        high *= 2
    return std * brentq(shortfall, 0.0, high)


# ----------------------------------------------------------------------------------------------- zoo


def family_of(spec: ZooModel) -> str:
    """A zoo model's family: ``torchvision``, or the timm module that registers it (``convnext``)."""
    if spec.zoo != "timm":
        return spec.zoo
    import timm

    return timm.models.model_entrypoint(spec.name).__module__.rpartition(".")[2]


def models(selection: Sequence[str] | None = None, zoos: Sequence[str] = ("torchvision", "timm")) -> list[tuple[ZooModel, str]]:
    """``(model, family)`` for every torchvision classifier and one model per timm family, or for ``selection``.

    Args:
        selection: zoo specs (``resnet50``, ``timm:NAME``, ``torchvision:NAME``); ``None`` or empty: the whole list,
            torchvision's classifiers first, then timm's families in alphabetical order, each represented by its
            smallest-sounding model (``bconv._zoo.timm_families``).
        zoos: only the models of these zoos.
    """
    if selection:
        chosen = [resolve(spec) for spec in selection]
        return [(m, family_of(m)) for m in chosen if m.zoo in zoos]
    rows = [(ZooModel("torchvision", name), "torchvision") for name in torchvision_names()] if "torchvision" in zoos else []
    if "timm" in zoos:
        rows += [(ZooModel("timm", name), family) for family, name in sorted(timm_families().items())]
    return rows


def input_size_of(spec: ZooModel, model: nn.Module) -> tuple[int, int, int]:
    """A zoo model's own input size: torchvision's, the crop size of its weights; timm's, its ``pretrained_cfg``."""
    if spec.zoo == "torchvision":
        return torchvision_input_size(spec.name, model)
    return default_input_size(model)


# ----------------------------------------------------------------------------------------------- measuring


def params(module: nn.Module) -> int:
    """Parameters of ``module`` (every element of every parameter)."""
    return sum(p.numel() for p in module.parameters())


def flops(model: nn.Module, x: Tensor) -> int:
    """Forward FLOPs of ``model`` on ``x[:1]`` (batch 1), in eval mode without autograd, counted by
    :class:`bconv.surgery.TotalFlopCounter` (torch's FLOP counter, ``nn.MultiheadAttention`` included).
    ``model`` is left in eval mode."""
    model.eval()
    with torch.no_grad(), TotalFlopCounter() as counter:
        model(x[:1])
    return int(counter.get_total_flops())


def logits(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, the ``logits`` of a namedtuple (Inception), else the first
    item of a tuple, list or dict, looked into the same way.

    Raises:
        TypeError: none of these.
    """
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output:
        return logits(output[0])
    raise TypeError(f"the model returned {type(output).__name__}, not a tensor")


def first_line(e: BaseException, limit: int = 300, *, kind: bool = True) -> str:
    """An error in one line: ``Type: the message's first line``, cut at ``limit`` characters (``kind=False``:
    the message's first line alone)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    return (f"{type(e).__name__}: {text}" if kind else text)[:limit]


_ORDERS = ("fixed", "rotate", "alternate")


def side_by_side(
    steps: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 0,
    order: str = "fixed",
    device: torch.device | str | None = None,
    clocks: Mapping[str, Callable[[], float]] | None = None,
    before: Callable[[str], None] | None = None,
    after: Callable[[str, Any, float], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Time ``steps`` side by side in one process: every repeat runs each step once, so that load drifting
    during the run reaches them alike; the medians (and the per-repeat :func:`ratios`) are the figures to read.

    Args:
        steps: name -> the work to time, called with no argument.
        repeats: timed runs of each step.
        warmup: untimed runs of each step first (in the given order), ``before`` and ``after`` included.
        order: of the steps within a repeat: ``"fixed"`` (as given), ``"rotate"`` (shifted by one every repeat)
            or ``"alternate"`` (reversed every other repeat: ABBA).
        device: on CUDA, the device is synchronised before and after each step.
        clocks: name -> clock (default ``{"wall": time.perf_counter}``); each step is timed on all of them.
        before: ``before(name)``, untimed, before each run of a step (a fresh model, a garbage collection).
        after: ``after(name, what the step returned, its seconds on the first clock)``, untimed, after each run
            (undo it, record it, report it).

    Returns:
        ``{clock: {step: [seconds of each repeat]}}``.

    Example::

        >>> times = side_by_side({"a": lambda: sum(range(1000)), "b": lambda: sum(range(10))}, 3)["wall"]
        >>> [len(v) for v in times.values()]
        [3, 3]
    """
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    clocks = {"wall": time.perf_counter} if clocks is None else dict(clocks)
    cuda = device is not None and torch.device(device).type == "cuda"
    times: dict[str, dict[str, list[float]]] = {c: {name: [] for name in steps} for c in clocks}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def run(name: str, timed: bool) -> None:
        if before is not None:
            before(name)
        sync()
        start = {c: clock() for c, clock in clocks.items()}
        result = steps[name]()
        sync()
        seconds = {c: clock() - start[c] for c, clock in clocks.items()}
        if timed:
            for c in clocks:
                times[c][name].append(seconds[c])
        if after is not None:
            after(name, result, next(iter(seconds.values())))

    names = list(steps)
    for _ in range(warmup):
        for name in names:
            run(name, timed=False)
    for r in range(repeats):
        if order == "rotate":
            within = names[r % len(names) :] + names[: r % len(names)]
        elif order == "alternate":
            within = names if r % 2 == 0 else names[::-1]
        else:
            within = names
        for name in within:
            run(name, timed=True)
    return times


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-repeat ratios ``num[r] / den[r]`` of two steps timed side by side (:func:`side_by_side`): paired
    within a repeat, so that load drifting during the run cancels out."""
    return [n / d for n, d in zip(num, den)]


# ----------------------------------------------------------------------------------------------- references


class HandWiredPTLResNet(nn.Module):
    """A PTL torchvision ResNet (every stage paired) wired by hand: docs/design.md §3's equations as an explicit forward.

    Holds copies of a wrapped model's network (hooks removed) and ladder modules, so it computes exactly what
    the wrapped model computes, with no hooks and no checks: the reference against which ``benchmarks.overhead``
    measures the cost of the ladder's hooks and checks. Each fusion takes the stage output and the cell's output,
    ``fuses[i](x, y)``; the final fusion's output replaces the last stage's.

    Args:
        wrapped: ``wrap_with_ptl`` of any torchvision ResNet (``resnet18`` .. ``resnet152``, ``resnext*``,
            ``wide_resnet*``) at its five stages ``relu``, ``layer1`` .. ``layer4``; it is not changed.

    Raises:
        ValueError: another network, or other stages.
    """

    STAGES = ("relu", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        from torchvision.models import ResNet

        stages = [s.name for s in getattr(wrapped, "stages", ())]
        if stages != list(self.STAGES):
            raise ValueError(f"a torchvision ResNet wrapped at every stage {list(self.STAGES)} is needed; got stages {stages}")
        twin = copy.deepcopy(wrapped)
        self.ptl = twin.ptl
        self.net = unwrap_ptl(twin)
        if not isinstance(self.net, ResNet):
            raise ValueError(f"a torchvision ResNet is needed; got {type(self.net).__name__}")

    def forward(self, image: Tensor) -> Tensor:
        net, cells, fuses = self.net, self.ptl.cells, self.ptl.fuses
        x = net.relu(net.bn1(net.conv1(image)))
        z = fuses[0](x, cells[0](image))
        x = net.layer1(net.maxpool(x))
        z = fuses[1](x, cells[1](z))
        x = net.layer2(x)
        z = fuses[2](x, cells[2](z))
        x = net.layer3(x)
        z = fuses[3](x, cells[3](z))
        x = self.ptl.final_fuse(net.layer4(x), cells[4](z))  # x + proj(y), or the released Fuse(cat(x, y))
        return net.fc(torch.flatten(net.avgpool(x), 1))

    def detach_state(self) -> None:
        for m in self.ptl.modules():
            if hasattr(m, "detach_state"):
                m.detach_state()


# ----------------------------------------------------------------------------------------------- records


def command(module: str, argv: Sequence[str] | None) -> str:
    """The shell line that reproduces a run: ``python -m benchmarks.<module> ARGS`` (``argv`` None: sys.argv)."""
    return shlex.join(["python", "-m", f"benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])


def interval(p: dict) -> str:
    """A paired difference as ``+m.mm [+lo, +hi]`` (the mean and its 95% interval, from :func:`paired`)."""
    return f"{p['mean']:+.2f} [{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]"


def positive_int(text: str) -> int:
    """argparse type of a count (``--jobs``, ``--repeats``, ``--threads``): an integer >= 1, else a usage error."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def commit() -> str | None:
    """The checkout's commit (short hash, ``-dirty`` with uncommitted changes to tracked files); None outside git."""
    root = Path(__file__).parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def environment() -> dict:
    """Where a run ran: torch, threads, CPUs, platform, the 1-minute load average now and the commit."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "load": os.getloadavg()[0], "commit": commit()}  # fmt: skip


def run_record(command_line: str, env: dict | None = None) -> dict:
    """What a results file says of its run, under one key: ``{"command", "commit", "environment"}``.

    Args:
        command_line: the line that reproduces the run (:func:`command`).
        env: :func:`environment` as taken at the run's start (default: now); its commit moves up a level.
    """
    env = dict(environment() if env is None else env)
    return {"command": command_line, "commit": env.pop("commit") if "commit" in env else commit(), "environment": env}


def write_results(out: Path, record: dict, markdown: Sequence[str]) -> None:
    """Write a run's results: ``OUT.json`` (``record``, whose ``"run"`` is a :func:`run_record`) and ``OUT.md``
    (the lines of ``markdown``), making ``OUT``'s folder.

    Raises:
        ValueError: ``record`` has no run record: a results file always says how it was made.
    """
    run = record.get("run")
    if not isinstance(run, dict) or set(run) != {"command", "commit", "environment"}:
        raise ValueError('record["run"] must be run_record(...): {"command", "commit", "environment"}')
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(markdown) + "\n")


# ----------------------------------------------------------------------------------------------- the ladder benchmarks' task
# Shared by benchmarks.ladder (a small CNN) and benchmarks.ladder_vit (a small ViT): digits 0-4 to pre-train, 5-9 to
# fine-tune, the way a new user fine-tunes.


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = load_digits(16)
    x = x.repeat(1, 3, 1, 1)
    return (x - x.mean()) / x.std(), y


def train(model, x, y, lr, epochs, seed, ptl=False, batch=32, adamw=False):
    """SGD (momentum 0.9, weight decay 5e-4) as a new user fine-tunes a CNN, or AdamW (weight decay 0.05) as
    one fine-tunes a ViT; the per-step training losses."""
    g = torch.Generator().manual_seed(seed)
    if adamw:
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    losses = []
    for _ in range(epochs):
        if ptl:
            model.reset_state()
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if ptl:
                model.detach_state()
            losses.append(loss.item())
    return losses


def target_split(seed: int, n_train: int = 300):
    x, y = digits()
    x, y = x[y >= 5], y[y >= 5] - 5
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return (x[perm[:n_train]], y[perm[:n_train]]), (x[perm[n_train:]], y[perm[n_train:]])



def ladder_table(rows: list[dict], lrs: list[float], conditions) -> list[str]:
    """The ladder benchmarks' table: per lr and condition, mean ± std over seeds of each row's measures."""
    lines = [
        "| lr | condition | last-epoch loss | max loss | accuracy | stage share | output share | state effect |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lr in lrs:
        for condition in conditions:
            sel = [r for r in rows if r["lr"] == lr and r["condition"] == condition]

            def cell(key: str, fmt: str = "{:.3f}") -> str:
                if key not in sel[0]:
                    return "-"
                values = [r[key] for r in sel]
                return (fmt + " ± " + fmt).format(statistics.mean(values), statistics.stdev(values))

            lines.append(
                f"| {lr} | {condition} | {cell('final_loss')} | {cell('max_loss', '{:.2f}')} | {cell('accuracy')} | "
                f"{cell('stage_share')} | {cell('output_share')} | {cell('state_effect')} |"
            )
    return lines
