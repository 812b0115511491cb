"""Saving a pruned model as plain types (``torch.load(weights_only=True)``) and replaying it."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, InputSizeError
from ..surgery import check_input_size, dummy_input, eval_mode, refuse_wrapped
from .adapter import Snapshot, build_graph, check_forward_padded, output_shapes, plain_history
from .attention import recording_input_shapes
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
        "history": plain_history(history),
        "state_dict": model.state_dict(),
    }, path)  # fmt: skip


def load_pruned(model: nn.Module, path: str) -> nn.Module:
    """Replay a saved pruning history (Torch-Pruning's ``load_pruning_history``) on a freshly built original
    ``model`` and load the weights.

    The file, its fields, the model class, the module paths and the weight names are checked before
    ``model`` is touched; then the replay, and the pruned shapes against the saved weights. On any error
    ``model`` is put back exactly as it was: the same module and parameter objects, the same weights.

    Args:
        model: the original architecture, unpruned (e.g. ``torchvision.models.resnet50()``); pruned in place.
        path: a file written by :func:`save_pruned`.

    Returns:
        ``model``, pruned as the saved one was and holding its weights.

    Raises:
        bconv.errors.CheckpointError: the file cannot be read or was not written by :func:`save_pruned`,
            a field is missing or damaged, or it holds another architecture (another class, other
            blocks, another head): says which.
        bconv.errors.WrappedModelError: a PTL-wrapped model (prune and load the plain network).

    Example::

        >>> model = load_pruned(torchvision.models.resnet18(), "pruned.pt")
    """
    refuse_wrapped(model, "load_pruned replays pruning on the plain network it was saved from")
    data = _read(path)
    name = type(model).__name__
    if data["model_class"] != name:
        raise CheckpointError(
            f"{path} holds a pruned {data['model_class']}, not a {name}: build the original "
            f"{data['model_class']} and pass it to load_pruned"
        )
    modules = dict(model.named_modules())
    unknown = [entry[0] for entry in data["history"] if entry[0] not in modules]
    weights = model.state_dict()
    missing = [k for k in weights if k not in data["state_dict"]]
    extra = [k for k in data["state_dict"] if k not in weights]
    if unknown or missing or extra:
        found = [f"it prunes `{unknown[0]}`, which this {name} does not have"] if unknown else []
        found += [f"{len(missing)} weights of this {name} are not in it ({', '.join(missing[:3])}, ...)"] if missing else []
        found += [f"{len(extra)} of its weights are not this {name}'s ({', '.join(extra[:3])}, ...)"] if extra else []
        raise CheckpointError(f"{path} was saved from another {name}: {'; '.join(found)}. {_SAME_NETWORK}")
    # A failed replay, or one that does not fit the saved weights, is undone: the model the user holds comes back.
    snapshot = Snapshot(model)
    try:
        try:
            _replay(model, data)
        except Exception as e:
            raise CheckpointError(
                f"{path}'s pruning history does not replay on this {name} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). {_SAME_NETWORK}"
            ) from e
        pruned = model.state_dict()
        wrong = [
            f"{k}: {list(v.shape)} saved, {list(pruned[k].shape)} after the replay"
            for k, v in data["state_dict"].items() if v.shape != pruned[k].shape
        ]  # fmt: skip
        if wrong:
            raise CheckpointError(
                f"{path} does not fit this {name} once pruned ({len(wrong)} weights differ in shape: "
                f"{'; '.join(wrong[:3])}). {_SAME_NETWORK}"
            )
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        model.load_state_dict({k: v.to(device) for k, v in data["state_dict"].items()})
    except BaseException:
        snapshot.restore()
        raise
    return model


_SAME_NETWORK = (
    "load_pruned needs the network the file was pruned from, freshly built with the same architecture and "
    "head (number of classes); the model was not changed."
)


def _replay(model: nn.Module, data: dict[str, Any]) -> None:
    x = dummy_input(model, data["input_size"])
    input_shapes: dict[nn.Module, torch.Size] = {}
    outputs: list[list[tuple[int, ...]]] = []

    def recording_forward(m: nn.Module, inputs: torch.Tensor) -> Any:
        with recording_input_shapes(m, input_shapes):
            out = m(inputs)
        outputs.append(output_shapes(out))
        return out

    with eval_mode(model):
        graph = build_graph(model, x, recording_forward)
        graph.load_pruning_history(data["history"])  # Torch-Pruning replays its own history
        # The attentions cop_prune padded fail the same check and get the same padding (.attention).
        with torch.enable_grad():
            check_forward_padded(model, x, outputs[-1], input_shapes, [])


def _read(path: str) -> dict[str, Any]:
    """The contents of a :func:`save_pruned` file, every field checked; :class:`CheckpointError` otherwise."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # a missing or unreadable file is the file system's error
    except Exception as e:  # torch's unpickler raises whatever the bytes lead it to (IndexError, KeyError, ...)
        raise CheckpointError(
            f"{path} cannot be read as a file written by bconv.prune.save_pruned: torch.load failed with "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if not isinstance(data, dict) or data.get("format") != "bconv.prune/1":
        what = f"a {type(data).__name__}" + (f" with keys {sorted(map(str, data))[:6]}" if isinstance(data, dict) else "")
        raise CheckpointError(f"{path} was not written by bconv.prune.save_pruned: it holds {what}")
    fields = {
        "model_class": (lambda v: isinstance(v, str), "the class name of the pruned model"),
        "input_size": (lambda v: _input_size(v) is not None, "three positive integers (C, H, W)"),
        "history": (_is_history, "a list of [layer path, is_output_channels, [channel indices]]"),
        "state_dict": (
            lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
            "the pruned model's weights, a dict of tensors",
        ),
    }
    for key, (check, expected) in fields.items():
        if key not in data:
            raise CheckpointError(f"{path} holds no '{key}' ({expected}): it is incomplete; save it again with save_pruned")
        if not check(data[key]):
            raise CheckpointError(f"{path} has a damaged '{key}', which should be {expected}; save it again with save_pruned")
    return data


def _input_size(value: Any) -> tuple[int, ...] | None:
    try:
        return check_input_size(value)
    except InputSizeError:
        return None


def _is_history(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], bool)
        and isinstance(e[2], (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in e[2])
        for e in value
    )  # fmt: skip
