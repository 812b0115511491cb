"""How much a PTL model uses its ladder: :func:`ladder_usage`.

A ladder whose shapes and equations are right can still contribute nothing (a dormant ladder: the
wrapped model is plain fine-tuning plus one extra layer) or swamp the backbone. The weights cannot
tell: a final fusion can carry large weights on the cells' channels while the cells' output is near
zero. The diagnostic therefore measures what the ladder does to the outputs, on a batch:

* **shares**: the model run as it is, and again with the cells removed (``PTLLadder.zero_cells``:
  the final fusion sees zeros in place of the last cell's output, so every cell's contribution is
  gone and only the fusion's own extra layer stays). ``stage_share`` is the relative change of the
  replaced stage output, ``output_share`` that of the model's output. Both in eval mode, as the model
  is used for inference.
* **state effect**: in training mode, the model's output with the carried state against the same
  batch with zero state (what the history from earlier batches changes).
* **gradient norms** of the cells, the fusions and the backbone, from one backward of a loss.

Nothing of the model changes: the cells' state, every buffer (BatchNorm running statistics), the
parameters' ``.grad``, the train/eval flags and the random number generators are as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ..cells import StatefulCell
from ..errors import BConvError
from .ladder import PTLLadder
from .wrapper import PTLModel

__all__ = ["LadderUsage", "ladder_usage"]


@dataclasses.dataclass(frozen=True)
class LadderUsage:
    """What :func:`ladder_usage` measured on one batch.

    Attributes:
        stage_share: ``|out - out_0| / |out|`` at the replaced stage output (the last paired stage), where
            ``out_0`` is the same forward with the cells' output zeroed; eval mode.
        output_share: the same ratio for the model's output (every floating-point tensor it returns).
        state_effect: ``|f(x; carried state) - f(x; zero state)| / |f(x; carried state)|`` for the model's
            output in training mode. 0 when the cells hold no history yet (after ``reset_state()``).
        grad_norms: L2 norms of the gradients of one backward of the loss, for ``"cells"``, ``"fusions"``
            (the fusions and the final fusion's scale) and ``"backbone"``; ``None`` when no target was given.
    """

    stage_share: float
    output_share: float
    state_effect: float
    grad_norms: dict[str, float] | None = None

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: value}`` for a logger: ``stage_share``, ..., ``grad_norm/cells``, ..."""
        values = {
            "stage_share": self.stage_share,
            "output_share": self.output_share,
            "state_effect": self.state_effect,
        }
        for group, norm in (self.grad_norms or {}).items():
            values[f"grad_norm/{group}"] = norm
        return {prefix + k: v for k, v in values.items()}


def ladder_usage(
    model: nn.Module,
    x: Any,
    target: Any = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
) -> LadderUsage:
    """Measure on the batch ``x`` how much ``model`` uses its PTL ladder (see the module docstring).

    Args:
        model: a :class:`~bconv.PTLModel`, or any module that holds exactly one (a LightningModule, a
            DistributedDataParallel wrapper).
        x: the batch, as the model takes it (a tensor, or a tuple of positional arguments).
        target: the labels; with it, one backward of ``loss_fn(model(x), target)`` gives ``grad_norms``.
        loss_fn: the loss (default: cross-entropy on the output).

    Returns:
        A :class:`LadderUsage`. The model is left exactly as it was: cells' state, buffers, ``.grad``,
        train/eval flags and RNG states.

    Raises:
        bconv.BConvError: ``model`` holds no PTL model, or more than one.

    Example::

        >>> usage = bconv.ladder_usage(model, images, labels)
        >>> usage.output_share, usage.state_effect
        (0.21, 0.04)
    """
    wrapped = _only_ptl_model(model)
    args = x if isinstance(x, tuple) else (x,)
    ladder = wrapped.ptl
    tap = dict(wrapped.model.named_modules())[wrapped.adapter.tap_names[-1]]
    with _untouched(model):
        with torch.no_grad(), _mode(model, train=False):
            stage, out = _run(model, args, tap)
            with _cells_zeroed(ladder):
                stage0, out0 = _run(model, args, tap)
        stage_share, output_share = _share(stage, stage0), _share(out, out0)
        with torch.no_grad(), _mode(model, train=True):
            carried = _flat(_seeded(model, args))
            with _latent_state_zero(wrapped):
                zero = _flat(_seeded(model, args))
        grad_norms = None
        if target is not None:
            with torch.enable_grad(), _mode(model, train=True):
                output = _seeded(model, args)
                loss = (loss_fn or F.cross_entropy)(output, target)
                loss.backward()
            grad_norms = _grad_norms(wrapped)
    return LadderUsage(stage_share, output_share, _share(carried, zero), grad_norms)


def _only_ptl_model(model: nn.Module) -> PTLModel:
    if not isinstance(model, nn.Module):
        raise TypeError(f"ladder_usage needs an nn.Module; got {type(model).__name__}")
    found = [m for m in model.modules() if isinstance(m, PTLModel)]
    if len(found) != 1:
        raise BConvError(
            f"ladder_usage needs a model that holds exactly one PTL model (from bconv.wrap_with_ptl); "
            f"{type(model).__name__} holds {len(found)}"
            + (": pass each PTL model itself" if found else "")
        )
    return found[0]


def _run(model: nn.Module, args: tuple, tap: nn.Module) -> tuple[Tensor, Tensor]:
    """The model's output and the replaced stage output (read after the ladder's own hook)."""
    seen: list[Tensor] = []
    handle = tap.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        out = model(*args)
    finally:
        handle.remove()
    return seen[-1].float(), _flat(out)


def _seeded(model: nn.Module, args: tuple) -> Any:
    # Both training forwards draw the same dropout masks (and any other randomness).
    with _forked_rng():
        torch.default_generator.manual_seed(0)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(0)  # forked above: restored on exit (never queued for a later init)
        return model(*args)


def _flat(out: Any) -> Tensor:
    leaves = [t.detach().float().flatten() for t in tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]
    if not leaves:
        raise BConvError("ladder_usage: the model's output holds no floating-point tensor to compare")
    return torch.cat(leaves)


def _share(with_ladder: Tensor, without: Tensor) -> float:
    if with_ladder.shape != without.shape:
        return float("nan")  # a detection model may return another number of boxes
    return float((with_ladder - without).norm() / with_ladder.norm().clamp_min(1e-12))


def _grad_norms(wrapped: PTLModel) -> dict[str, float]:
    ladder = wrapped.ptl
    groups = {
        "cells": list(ladder.cells.parameters()),
        "fusions": [*ladder.fuses.parameters(), *ladder.final_fuse.parameters()],
        "backbone": list(wrapped.model.parameters()),
    }
    norms = {}
    for name, params in groups.items():
        grads = [p.grad.detach().float().flatten() for p in params if p.grad is not None]
        norms[name] = float(torch.cat(grads).norm()) if grads else 0.0
    return norms


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Restore the cells' state, the buffers, the gradients and the RNG states on exit."""
    latent = _cell_states(model)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: p.grad for p in model.parameters()}
    for p in grads:
        p.grad = None
    try:
        with _forked_rng():
            yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for p, g in grads.items():
            p.grad = g
        _restore_cell_states(latent)


def _forked_rng() -> contextlib.AbstractContextManager:
    """Fork the CPU generator and every CUDA device's, so that seeding inside leaves a run's streams as they were."""
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=cuda)


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def _cells_zeroed(ladder: PTLLadder) -> Iterator[None]:
    before = ladder.zero_cells
    ladder.zero_cells = True
    try:
        yield
    finally:
        ladder.zero_cells = before


@contextlib.contextmanager
def _latent_state_zero(wrapped: PTLModel) -> Iterator[None]:
    saved = _cell_states(wrapped)
    wrapped.reset_state()
    try:
        yield
    finally:
        _restore_cell_states(saved)


def _cell_states(model: nn.Module) -> dict[StatefulCell, dict[str, Tensor | None]]:
    # The tensors themselves, not copies: a state kept with its graph (detach=False) keeps it.
    cells = [m for m in model.modules() if isinstance(m, StatefulCell)]
    return {c: {name: getattr(c, name) for name in c._state_names} for c in cells}


def _restore_cell_states(saved: dict[StatefulCell, dict[str, Tensor | None]]) -> None:
    for cell, values in saved.items():
        for name, value in values.items():
            setattr(cell, name, value)
