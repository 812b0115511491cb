"""Rebuild a PTL model from its checkpoint alone: :func:`load_ptl`."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..errors import CheckpointError, WrappedModelError
from .config import PTLConfig
from .wrapper import PTLModel, check_ladder_version, unwrap_ptl, wrap_with_ptl

__all__ = ["load_ptl"]

_KEY = "_extra_state"


def load_ptl(
    model: nn.Module, state_dict: Mapping[str, Any], *, leaf_modules: Iterable[type] | None = None
) -> PTLModel:
    """Wrap a freshly built network exactly as the checkpoint's was, and load the checkpoint into it.

    The options come from the :class:`PTLConfig` that ``PTLModel.state_dict()`` carries, so none
    has to be repeated. Everything is checked before anything is loaded: the config, the stages, and
    every key and shape of the weights. On any error ``model`` is left exactly as it was, with no hook
    of bconv on it.

    Args:
        model: the original network, freshly built, not wrapped (for example ``resnet50()``).
        state_dict: a ``PTLModel``'s ``state_dict()`` (read with ``torch.load(..., weights_only=True)``).
        leaf_modules: the ``leaf_modules`` classes of the original wrap, only needed when the recorded
            names cannot be imported (a class defined in ``__main__`` or in a function).

    Returns:
        The :class:`PTLModel`, with the checkpoint's weights and ``config``. Its cells start with no
        history: restore a saved latent state with ``load_latent_state_dict``.

    Raises:
        bconv.errors.CheckpointError: the state dict carries no PTL config (a checkpoint written before
            bconv recorded it, or not a PTL model's), a damaged one, one written by the earlier ladder
            (bconv 0.1), stages that are not stages of ``model``, or weights that do not fit it (another
            architecture, another number of classes): every missing, unexpected and mismatched key is named.
        bconv.errors.WrappedModelError: ``model`` is already wrapped.

    Example::

        >>> torch.save(wrapped.state_dict(), "ptl.pt")
        >>> model = bconv.load_ptl(torchvision.models.resnet50(), torch.load("ptl.pt", weights_only=True))
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"load_ptl needs a state dict (a mapping of names to tensors); got {type(state_dict).__name__}")
    check_ladder_version(state_dict)
    stored = state_dict.get(_KEY)
    if stored is None or (isinstance(stored, torch.Tensor) and stored.numel() == 0):  # none, or a hand-built wrapper's
        raise CheckpointError(_no_config_message(state_dict))
    config = PTLConfig.from_extra_state(stored)
    try:
        wrapped = wrap_with_ptl(model, config=config, leaf_modules=config.leaf_module_classes(leaf_modules))
    except WrappedModelError:
        raise
    except ValueError as e:
        raise CheckpointError(
            f"the checkpoint's wrapper does not fit this network: {e}. load_ptl needs the network the "
            f"checkpoint was trained from (same architecture, freshly built); its stages were "
            f"{list(config.stages)}"
        ) from e
    problems = _mismatches(wrapped.state_dict(), state_dict)
    if problems:
        unwrap_ptl(wrapped)  # hand the network back as it came: no weight was loaded
        raise CheckpointError(
            f"the checkpoint's weights do not fit this {type(model).__name__}:\n  " + "\n  ".join(problems) + "\n"
            "Nothing of the network was changed. load_ptl needs the network the checkpoint was trained from, "
            "freshly built with the same architecture and head (number of classes)."
        )
    try:
        wrapped.load_state_dict(state_dict)  # every key and shape is known to fit
    except BaseException:  # what a key and shape check cannot see (a module's own set_extra_state): not wrapped
        unwrap_ptl(wrapped)
        raise
    return wrapped


def _mismatches(expected: Mapping[str, Any], given: Mapping[str, Any], shown: int = 6) -> list[str]:
    """What torch's strict ``load_state_dict`` would refuse, found before it copies anything: one line per kind."""

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = []
    for k, v in expected.items():
        if k == _KEY or k not in given or not isinstance(v, torch.Tensor):
            continue  # a module's own extra state (any object) is its set_extra_state's to check
        if not isinstance(given[k], torch.Tensor):
            wrong.append(f"{k} is a {type(given[k]).__name__}, not a tensor")
        elif given[k].shape != v.shape:
            wrong.append(f"size mismatch for {k}: {list(given[k].shape)} in the checkpoint, {list(v.shape)} here")
    problems = [f"{len(missing)} missing from the checkpoint: {listed(missing)}"] if missing else []
    problems += [f"{len(unexpected)} not in this network: {listed(unexpected)}"] if unexpected else []
    return problems + wrong[:shown] + ([f"... ({len(wrong) - shown} more mismatched)"] if len(wrong) > shown else [])


def _no_config_message(state_dict: Mapping[str, Any]) -> str:
    nested = [k[: -len(_KEY)] for k in state_dict if isinstance(k, str) and k.endswith("." + _KEY)]
    if nested:
        return (
            f"this state dict holds a PTL model under the prefix {nested[0]!r} (DistributedDataParallel "
            f"adds 'module.'); pass that model's own state dict: "
            f"torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state_dict, {nested[0]!r}), "
            f"then load_ptl"
        )
    return (
        "this state dict carries no PTL config (no `_extra_state` key): it was written before bconv "
        "recorded the wrap options, or it is not a PTLModel's. Wrap the network by hand with the options "
        "it was trained with, then load it: `wrapped = bconv.wrap_with_ptl(network, stages=..., cell=...); "
        "wrapped.load_state_dict(state_dict)`"
    )
