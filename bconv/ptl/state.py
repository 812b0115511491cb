"""The cells' latent state at model level: reset, detach, save and restore it in any network.

Each function walks ``model.modules()`` for :class:`~bconv.cells.StatefulCell` (no global
registry), so it works on a :class:`~bconv.PTLModel`, on a network that holds one anywhere inside
it, under ``DistributedDataParallel`` and on a ``torch.compile``'d module. ``PTLModel``'s own
``reset_state()``, ``detach_state()``, ``latent_state_dict()`` and ``load_latent_state_dict()``
are these functions.

The latent state is data history, not weights, so it stays out of ``state_dict()``; a checkpoint
that must resume mid-epoch exactly saves :func:`latent_state_dict` beside it (docs/guides/checkpoints.md: "Resuming
an interrupted run"). Under DistributedDataParallel each rank holds, and saves, its own state;
with ``state_mode="pooled", sync_state=True`` every rank holds the same state, so one rank's copy
restores all of them.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..cells import StatefulCell
from ..errors import BConvError

__all__ = ["reset_state", "detach_state", "latent_state_dict", "load_latent_state_dict", "LatentState"]


def _cells(model: nn.Module, what: str) -> list[tuple[str, StatefulCell]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} needs an nn.Module; got {type(model).__name__}")
    cells = [(name, m) for name, m in model.named_modules() if isinstance(m, StatefulCell)]
    if not cells:
        # Silently doing nothing would hide a model that was never wrapped.
        raise ValueError(
            f"{what}: {type(model).__name__} holds no BConv-Cell (no StatefulCell module); "
            f"wrap it with bconv.wrap_with_ptl first"
        )
    return cells


def reset_state(model: nn.Module) -> None:
    """Forget the history of every cell in ``model``: the next forward starts from zero state.

    Call it at the start of every epoch (the paper does) and when the input resolution changes.

    Args:
        model: a PTL model, or any network that holds one.

    Raises:
        ValueError: ``model`` holds no cell.

    Example::

        >>> for epoch in range(epochs):
        ...     reset_state(model)
        ...     train_one_epoch(model)
    """
    for _, cell in _cells(model, "reset_state"):
        cell.reset_state()


def detach_state(model: nn.Module) -> None:
    """Cut every cell's state in ``model`` from the autograd graph, keeping its values.

    With ``detach=False``, call it every k batches for k-step truncated back-propagation.

    Args:
        model: a PTL model, or any network that holds one.

    Raises:
        ValueError: ``model`` holds no cell.

    Example::

        >>> loss.backward(); opt.step(); detach_state(model)
    """
    for _, cell in _cells(model, "detach_state"):
        cell.detach_state()


def latent_state_dict(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The state of every cell in ``model``, keyed by the cell's module path.

    Each value is ``{"state_mode": "per_sample" | "pooled", "c_prev": tensor or None}`` (v2 cells
    add ``"y_prev"``): per-sample states are ``[slots, C, H, W]``, pooled ones ``[1, C, H, W]``;
    ``None`` where a cell has no history. The tensors keep their dtype and device and are detached
    (a graph cannot be saved: with ``detach=False``, checkpoint right after ``detach_state()``).
    Everything is a plain value or a tensor: ``torch.save`` it, read it with ``weights_only=True``.

    Args:
        model: a PTL model, or any network that holds one. Keys are module paths relative to it, so
            restore into the same kind of module (the ``PTLModel``, not its DDP wrapper, or both).

    Returns:
        ``{module path: cell state}``, e.g. ``{"ptl.cells.0.0": {"state_mode": "pooled", ...}}``.

    Raises:
        ValueError: ``model`` holds no cell.

    Example::

        >>> torch.save({"model": model.state_dict(), "latent": latent_state_dict(model)}, path)
    """
    return {name: cell.latent_state() for name, cell in _cells(model, "latent_state_dict")}


def load_latent_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Restore the cells' state saved by :func:`latent_state_dict`.

    Every key must name a cell of ``model`` and every cell must have a key; each state must fit
    its cell (state names, state mode, channels). All of it is checked before anything is
    restored, so on error every cell keeps the state it had.

    Args:
        model: the model to restore, built like the one that was saved.
        state_dict: the dict :func:`latent_state_dict` returned.

    Raises:
        bconv.BConvError: missing or unexpected keys, or states that do not fit their cells;
            the message lists every problem.
        ValueError: ``model`` holds no cell.

    Example::

        >>> load_latent_state_dict(model, torch.load(path, weights_only=True)["latent"])
    """
    cells = dict(_cells(model, "load_latent_state_dict"))
    if not isinstance(state_dict, Mapping):
        raise BConvError(
            f"load_latent_state_dict needs the dict latent_state_dict() returned; got {type(state_dict).__name__}"
        )
    problems = []
    missing = [k for k in cells if k not in state_dict]
    unexpected = [k for k in state_dict if k not in cells]
    if missing:
        problems.append(f"no state for the cells {missing}")
    if unexpected:
        problems.append(f"states for {unexpected}, which are not cells of this {type(model).__name__}")
    for name, cell in cells.items():
        if name in state_dict:
            problems += [f"{name}: {p}" for p in cell.latent_state_problems(state_dict[name])]
    if problems:
        hint = (
            f" The cells of this model are {list(cells)}. Keys are module paths relative to the model "
            f"passed to latent_state_dict(): restore into the same kind of module (a PTLModel, or its "
            f"DistributedDataParallel wrapper, whose paths start with `module.`), wrapped with the same "
            f"options (bconv.load_ptl does that)."
            if missing or unexpected
            else ""
        )
        hint = hint or (
            " A latent state fits a model wrapped with the same options as the one that saved it: build the "
            "model with bconv.load_ptl from the same checkpoint."
        )
        raise BConvError(
            "cannot restore the latent state; nothing was changed:\n  " + "\n  ".join(problems) + "\n" + hint.strip()
        )
    for name, cell in cells.items():
        cell.load_latent_state(state_dict[name])


class LatentState:
    """The cells' latent state of ``model`` as a checkpointable object (``state_dict``/``load_state_dict``).

    Frameworks that checkpoint any object with these two methods take it as it is: Hugging Face
    Accelerate's ``accelerator.register_for_checkpointing``, Lightning Fabric's ``fabric.save``, the
    ``Stateful`` objects of ``torch.distributed.checkpoint``. It holds no copy: ``state_dict()`` reads
    the cells when the checkpoint is written, ``load_state_dict()`` restores them.

    Args:
        model: a PTL model, or any network that holds one. Give the unwrapped model
            (``accelerator.unwrap_model(model)``), so that the keys do not depend on the wrapper.

    Raises:
        ValueError: ``model`` holds no cell.

    Example::

        >>> accelerator.register_for_checkpointing(bconv.LatentState(accelerator.unwrap_model(model)))
    """

    def __init__(self, model: nn.Module) -> None:
        _cells(model, "LatentState")  # refuse a network without cells now, not at the first checkpoint
        self.model = model

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """:func:`latent_state_dict` of the model."""
        return latent_state_dict(self.model)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """:func:`load_latent_state_dict` into the model (checked first: on error nothing changes)."""
        load_latent_state_dict(self.model, state_dict)
