"""Rolling-back refine-tuning (Ro et al., "Backbone Can Not be Trained at Once", AAAI 2019).

Fine-tune for a period; then keep the low blocks and the head, roll the other blocks
back to their pre-trained weights, and fine-tune again with a fresh optimizer. Period
by period the kept part grows by one block: the stem, then stem + stage 1, and so on.
The released code runs 4 periods of 40 epochs each (every period a full fine-tuning run
that converges; not one schedule cut into four) with SGD (momentum 0.9, Nesterov, weight
decay 5e-4) at learning rates 0.001 for kept blocks, 0.01 for rolled-back ones, and 0.1
for the head in the first period, 0.01 after.

Blocks are the stages that :func:`bconv.anatomy` discovers, with their ``modules``,
and the stem as a block of its own: where the stem does not reduce the resolution below
the first stage's, bconv's first stage holds the stem and the stage's own block, and
rolling back splits them (:func:`bconv.surgery.anatomy.stem_modules`), as the released
ResNet scripts keep ``conv1, bn1`` alone in their second period, then add ``layer1``.
Everything that is in no block's modules is the head and is never rolled back: the
pooling and classifier after the last stage, modules that the traced forward never
reached (torchvision Inception's auxiliary classifier), and, for a PTL-wrapped model,
the injected cells and fusions. Parameters are matched to blocks through the module
objects at the blocks' module paths, never by name prefix, so ``layer1`` does not claim
``layer10``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .errors import ModulePathError
from .surgery import Source, Stage, anatomy, stem_modules

__all__ = ["Block", "Rollback", "released_sgd"]

TrainFn = Callable[[nn.Module, torch.optim.Optimizer, int], Any]


@dataclass(frozen=True)
class Block:
    """What rolling back keeps or restores as a whole: the stem, or a stage.

    Attributes:
        index: position from the input.
        name: ``"stem"`` for a stem split off the first stage, else the stage's name.
        modules: module paths (relative to the model given to :class:`Rollback`).
    """

    index: int
    name: str
    modules: tuple[str, ...]


def released_sgd(groups: list[dict[str, Any]]) -> torch.optim.SGD:
    """The released code's optimizer: SGD, momentum 0.9, Nesterov, weight decay 5e-4, over ``groups``."""
    return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _blocks(stages: Sequence[Stage], stem: tuple[str, ...]) -> tuple[Block, ...]:
    """The stem (when it is only part of the first stage) and the stages, as blocks."""
    blocks = [Block(0, stages[0].name, stages[0].modules)] if stages else []
    if stages and stem != stages[0].modules:
        rest = tuple(m for m in stages[0].modules if m not in stem)
        blocks = [Block(0, "stem", stem), Block(1, stages[0].name, rest)]
    blocks += [Block(len(blocks) + i, s.name, s.modules) for i, s in enumerate(stages[1:])]
    return tuple(blocks)


class Rollback:
    """Snapshots every block of a model (parameters and buffers) and rolls blocks back to it.

    The snapshot is taken at construction: build the ``Rollback`` right after loading the
    pre-trained weights (and after replacing the classifier, which is head anyway). It is a
    detached copy on the tensors' own device, so it costs the backbone's size once more.
    ``roll_back`` copies it back in place, so the ``nn.Parameter`` objects stay the same
    and references held by an optimizer or an EMA remain valid. Tensors are found by name
    each time, so ``model.to(...)`` after construction is fine.

    Every buffer of a rolled-back block is restored, floating-point (BN running mean and
    variance) and integer (``num_batches_tracked``) alike: the module is exactly as it was
    pre-trained, and a BN with ``momentum=None`` (cumulative average) keeps a count that
    matches its restored statistics.

    Args:
        model: any CNN found by :func:`bconv.anatomy`, or a PTL-wrapped one (its original
            at ``.model`` is searched for stages; the injected modules are head).
        input_size: ``(C, H, W)`` for stage discovery; defaults to the model's own or ``(3, 224, 224)``.
        stages: use these stages instead of discovering them (module paths relative to ``model``).
        source: passed to :func:`bconv.anatomy`.
        leaf_modules: passed to :func:`bconv.anatomy`.

    Attributes:
        model: the model.
        stages: the stages, in order from the input; paths are relative to ``model``
            (``model.layer1`` for a PTL wrapper).
        blocks: what ``keep`` counts: the stem as a block of its own (split off the first stage
            where it is folded into it), then the stages.

    Raises:
        bconv.errors.ModulePathError: a given stage names a module path that ``model`` does not have.

    Example::

        >>> model = torchvision.models.resnet50(weights="IMAGENET1K_V2")
        >>> model.fc = nn.Linear(2048, 751)
        >>> rb = Rollback(model, input_size=(3, 256, 128))
        >>> # ... fine-tune for a period ...
        >>> [b.name for b in rb.blocks]
        ['relu', 'layer1', 'layer2', 'layer3', 'layer4']
        >>> rb.roll_back(keep=1)  # keep the stem, roll layer1..layer4 back to ImageNet weights
        >>> optimizer = released_sgd(rb.param_groups(keep=1))
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: Sequence[int] | None = None,
        *,
        stages: Sequence[Stage] | None = None,
        source: Source = "auto",
        leaf_modules: Iterable[type] = (),
    ) -> None:
        self.model = model
        known = dict(model.named_modules())
        stem: tuple[str, ...] | None = None
        if stages is None:
            found = anatomy(model, input_size, source, leaf_modules=leaf_modules)
            stages, stem = found.stages, found.stem
        self.stages: tuple[Stage, ...] = tuple(stages)
        for stage in self.stages:
            for path in stage.modules:
                if path not in known:
                    raise ModulePathError(
                        f"stage {stage.name!r} names module {path!r}, which {type(model).__name__} does not have; "
                        f"module paths are relative to the model passed (see `python -m bconv.inspect`)"
                    )
        if stem is None and self.stages:
            stem = stem_modules(model, self.stages[0])
        self.blocks: tuple[Block, ...] = _blocks(self.stages, stem or ())
        # A tensor shared by two blocks belongs to the first; the snapshot is keyed by full name.
        seen: set[int] = set()
        self._snapshot: list[dict[str, tuple[bool, Tensor]]] = []
        for block in self.blocks:
            saved: dict[str, tuple[bool, Tensor]] = {}
            for path in block.modules:
                module = known[path]
                named = [(n, True, t) for n, t in module.named_parameters(prefix=path)]
                named += [(n, False, t) for n, t in module.named_buffers(prefix=path)]
                for name, is_param, tensor in named:
                    if id(tensor) not in seen:
                        seen.add(id(tensor))
                        saved[name] = (is_param, tensor.detach().clone())
            self._snapshot.append(saved)

    def __repr__(self) -> str:
        return f"Rollback({type(self.model).__name__}, blocks=[{', '.join(b.name for b in self.blocks)}])"

    def _check_keep(self, keep: int) -> int:
        n = len(self.blocks)
        if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or not 0 <= keep <= n:
            names = ", ".join(f"{b.index}: {b.name}" for b in self.blocks)
            raise ValueError(
                f"keep must be an int from 0 (keep no block) to {n} (keep all {n}); got {keep!r}. "
                f"keep=k keeps blocks[:k] of [{names}] and rolls the others back"
            )
        return int(keep)

    def roll_back(self, keep: int) -> None:
        """Return ``blocks[keep:]`` to the snapshot; ``blocks[:keep]`` and the head keep their weights.

        Parameters and buffers are copied in place under ``torch.no_grad()``, whatever their
        ``requires_grad``. Gradients and optimizer state are left alone: build a fresh
        optimizer after a roll-back (as :meth:`run` does) so that momentum is reset.

        Args:
            keep: how many blocks, from the input, keep their current weights (0..len(blocks)).

        Raises:
            ValueError: ``keep`` is not an int in ``0..len(blocks)``, or a snapshotted tensor no
                longer exists in the model (a module was replaced or removed since).
        """
        keep = self._check_keep(keep)
        with torch.no_grad():
            for block, saved in zip(self.blocks[keep:], self._snapshot[keep:]):
                for name, (is_param, value) in saved.items():
                    try:
                        target = self.model.get_parameter(name) if is_param else self.model.get_buffer(name)
                    except AttributeError as e:
                        raise ValueError(
                            f"cannot roll block {block.name!r} back: {name!r} is no longer in the model ({e}); "
                            f"build a new Rollback after replacing modules of a block"
                        ) from e
                    target.copy_(value)

    def param_groups(
        self, keep: int, lr_rolled: float = 0.01, lr_kept: float = 0.001, lr_head: float = 0.01
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups for a period that keeps ``blocks[:keep]``.

        The groups are disjoint and together hold every trainable parameter
        (``requires_grad=True``) of the model exactly once, in the model's order. Each is a
        dict with ``"params"``, ``"lr"`` and a ``"name"`` (``"kept"``, ``"rolled_back"``,
        ``"head"``) that optimizers keep; empty groups are left out. The defaults are the
        released code's rates after the first period; its first period uses ``lr_head=0.1``.

        Args:
            keep: how many blocks, from the input, are kept (0..len(blocks)).
            lr_rolled: learning rate of ``blocks[keep:]``.
            lr_kept: learning rate of ``blocks[:keep]``.
            lr_head: learning rate of every parameter in no block (classifier, PTL modules, ...).

        Returns:
            A list for an optimizer: :func:`released_sgd` (the released code's SGD) or any other.

        Example::

            >>> [(g["name"], g["lr"], len(g["params"])) for g in rb.param_groups(keep=2)]  # the ResNet-50 above
            [('kept', 0.001, 33), ('rolled_back', 0.01, 126), ('head', 0.01, 2)]
        """
        keep = self._check_keep(keep)
        block_of: dict[int, int] = {}
        for block in self.blocks:
            for path in block.modules:
                for p in self.model.get_submodule(path).parameters():
                    block_of.setdefault(id(p), block.index)
        groups: dict[str, dict[str, Any]] = {
            "kept": {"params": [], "lr": lr_kept, "name": "kept"},
            "rolled_back": {"params": [], "lr": lr_rolled, "name": "rolled_back"},
            "head": {"params": [], "lr": lr_head, "name": "head"},
        }
        for p in self.model.parameters():  # de-duplicated by torch: a shared parameter comes once
            if not p.requires_grad:
                continue
            index = block_of.get(id(p))
            name = "head" if index is None else "kept" if index < keep else "rolled_back"
            groups[name]["params"].append(p)
        return [g for g in groups.values() if g["params"]]

    def run(
        self,
        train_fn: TrainFn,
        periods: int = 4,
        *,
        make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
        lr_rolled: float = 0.01,
        lr_kept: float = 0.001,
        lr_head: float = 0.01,
        lr_head_first: float = 0.1,
    ) -> list[Any]:
        """Run the periods of rolling-back refine-tuning, calling ``train_fn`` once per period.

        Period ``p`` (0-based) keeps ``blocks[:p]``:

        * period 0 fine-tunes the whole model from the weights it has now (nothing is rolled
          back; every block gets ``lr_rolled``, the head ``lr_head_first``);
        * at the start of period ``p >= 1``, ``blocks[p:]`` are rolled back to the snapshot and
          ``blocks[:p]`` (the stem, then stem + stage 1, ...) and the head keep what the previous
          periods learnt; kept blocks get ``lr_kept``, rolled-back ones ``lr_rolled``, the head
          ``lr_head``.

        Each period gets a new optimizer from ``make_optimizer(groups)``, so momentum and any
        other optimizer state start afresh. ``train_fn(model, optimizer, period)`` trains for a
        whole period, and each period is a fine-tuning run that converges on its own: the method
        rolls back from a converged model. The released code trains 40 epochs in every period
        (160 in all); cutting one schedule that converges into ``periods`` shorter pieces is not
        the method. A learning-rate schedule within the period is ``train_fn``'s to build on the
        optimizer it receives.

        Args:
            train_fn: called as ``train_fn(model, optimizer, period)``; trains one period to convergence.
            periods: number of periods, 1..len(blocks) + 1; the released code uses 4.
            make_optimizer: builds an optimizer from :meth:`param_groups`; defaults to
                :func:`released_sgd` (SGD, momentum 0.9, Nesterov, weight decay 5e-4).
            lr_rolled: the rolled-back blocks' learning rate, as in :meth:`param_groups`.
            lr_kept: the kept blocks' learning rate, as in :meth:`param_groups`.
            lr_head: the head's learning rate after period 0, as in :meth:`param_groups`.
            lr_head_first: the head's learning rate in period 0 (0.1 in the released code).

        Returns:
            What ``train_fn`` returned, one item per period.

        Raises:
            ValueError: ``periods`` is not an int in ``1..len(blocks) + 1``.

        Example::

            >>> def train(model, optimizer, period):  # one period: the whole fine-tuning schedule
            ...     scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [20, 30])
            ...     for epoch in range(40):
            ...         train_one_epoch(model, optimizer)
            ...         scheduler.step()
            >>> Rollback(model, input_size=(3, 256, 128)).run(train, periods=4)
        """
        n = len(self.blocks)
        if isinstance(periods, bool) or not isinstance(periods, numbers.Integral) or not 1 <= periods <= n + 1:
            raise ValueError(
                f"periods must be an int from 1 to {n + 1} (period p keeps the first p of the {n} blocks: "
                f"{', '.join(b.name for b in self.blocks)}); got {periods!r}"
            )
        make_optimizer = make_optimizer or released_sgd
        results = []
        for period in range(periods):
            if period:
                self.roll_back(keep=period)
            head = lr_head_first if period == 0 else lr_head
            optimizer = make_optimizer(self.param_groups(period, lr_rolled=lr_rolled, lr_kept=lr_kept, lr_head=head))
            results.append(train_fn(self.model, optimizer, period))
        return results

