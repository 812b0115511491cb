"""Saving a pruned model as plain types (``torch.load(weights_only=True)``) and replaying it."""

from __future__ import annotations

import torch
from torch import nn

from ..surgery._trace import dummy_input, eval_mode
from .adapter import _build_graph
from .report import PruneResult

__all__ = ["save_pruned", "load_pruned"]


def save_pruned(result: PruneResult, path: str) -> None:
    """Store a pruned model's weights and its pruning history (plain types, no pickled model).

    Args:
        result: what :func:`cop_prune` returned (``result.model`` may have been fine-tuned since).
        path: file to write; it loads with ``torch.load(path, weights_only=True)``.

    Example::

        >>> save_pruned(result, "pruned.pt")
        >>> model = load_pruned(torchvision.models.resnet18(), "pruned.pt")
    """
    torch.save({
        "format": "bconv.prune/1",
        "model_class": type(result.model).__name__,
        "input_size": list(result.report.input_size),
        "history": [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in result.history],
        "state_dict": result.model.state_dict(),
    }, path)  # fmt: skip


def load_pruned(model: nn.Module, path: str) -> nn.Module:
    """Replay a saved pruning history on a freshly built original ``model`` and load the weights.

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
    with eval_mode(model):
        graph = _build_graph(model, dummy_input(model, data["input_size"]))
        for name, is_out, idxs in data["history"]:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{path} prunes `{name}`, which {type(model).__name__} does not have") from None
            pruner = graph.get_pruner_of_module(module)
            fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
            graph.get_pruning_group(module, fn, idxs).prune(record_history=False)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.load_state_dict({k: v.to(device) for k, v in data["state_dict"].items()})
    return model
