"""Saving a pruned model as plain types (``torch.load(weights_only=True)``) and replaying it."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..surgery._trace import dummy_input, eval_mode
from .adapter import _build_graph
from .report import PruneResult

__all__ = ["save_pruned", "load_pruned"]


def save_pruned(
    result: PruneResult | nn.Module,
    path: str,
    *,
    history: Sequence[Sequence[Any]] | None = None,
    input_size: Sequence[int] | None = None,
) -> None:
    """Store a pruned model's weights and its Torch-Pruning history (plain types, no pickled model).

    The history is Torch-Pruning's own (``DependencyGraph.pruning_history()``: ``[layer, is_output_channels,
    indices]`` per operation), so a model pruned by ``tp.pruner.MetaPruner`` is saved the same way.

    Args:
        result: what :func:`cop_prune` returned (``result.model`` may have been fine-tuned since), or a
            model pruned by Torch-Pruning, with ``history`` and ``input_size``.
        path: file to write; it loads with ``torch.load(path, weights_only=True)``.
        history: for a model: ``pruner.pruning_history()`` of the MetaPruner that pruned it.
        input_size: for a model: ``(C, H, W)`` of the input that traces it.

    Raises:
        ValueError: a model without its ``history`` or ``input_size``.

    Example::

        >>> save_pruned(result, "pruned.pt")
        >>> save_pruned(model, "pruned.pt", history=pruner.pruning_history(), input_size=(3, 224, 224))
        >>> model = load_pruned(torchvision.models.resnet18(), "pruned.pt")
    """
    if isinstance(result, PruneResult):
        model, history, input_size = result.model, result.history, result.report.input_size
    else:
        model = result
        if history is None or input_size is None:
            raise ValueError(
                "save_pruned(model, path) needs history= (pruner.pruning_history() of the Torch-Pruning pruner "
                "that pruned it) and input_size= (C, H, W); or pass the PruneResult of cop_prune"
            )
    torch.save({
        "format": "bconv.prune/1",
        "model_class": type(model).__name__,
        "input_size": [int(s) for s in input_size],
        "history": [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in history],
        "state_dict": model.state_dict(),
    }, path)  # fmt: skip


def load_pruned(model: nn.Module, path: str) -> nn.Module:
    """Replay a saved pruning history (Torch-Pruning's ``load_pruning_history``) on a freshly built original
    ``model`` and load the weights.

    Args:
        model: the original architecture, unpruned (e.g. ``torchvision.models.resnet50()``); pruned in place.
        path: a file written by :func:`save_pruned`.

    Returns:
        ``model``, pruned as the saved one was and holding its weights.

    Raises:
        ValueError: the file is not a bconv pruning file, or was saved from another model class.

    Example::

        >>> model = load_pruned(torchvision.models.resnet18(), "pruned.pt")
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != "bconv.prune/1":
        raise ValueError(f"{path} was not written by bconv.prune.save_pruned")
    if data["model_class"] != type(model).__name__:
        raise ValueError(
            f"{path} holds a pruned {data['model_class']}, not a {type(model).__name__}: build the original "
            f"{data['model_class']} and pass it to load_pruned"
        )
    for name, _, _ in data["history"]:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} prunes `{name}`, which {type(model).__name__} does not have") from None
    with eval_mode(model):
        graph = _build_graph(model, dummy_input(model, data["input_size"]))
        graph.load_pruning_history(data["history"])  # Torch-Pruning replays its own history
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.load_state_dict({k: v.to(device) for k, v in data["state_dict"].items()})
    return model
