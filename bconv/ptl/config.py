"""The record of how a network was wrapped: :class:`PTLConfig`, carried by every PTL checkpoint.

``wrap_with_ptl`` stores its options in ``wrapped.config``; ``wrapped.state_dict()`` carries them
under the key ``_extra_state`` (PyTorch's extra-state mechanism), and loading a checkpoint into a
wrapper built with other options names every option that differs. :func:`bconv.load_ptl` rebuilds
the wrapper from it.

The stored value is the config as UTF-8 JSON in a 1-D ``uint8`` tensor, not a dict: much code
assumes that every value of a state dict is a tensor (timm's ``ModelEmaV2``/``ModelEmaV3`` call
``copy_``/``is_floating_point`` on each, ``safetensors`` refuses anything else, and so did this
project's own tests), and a tensor keeps all of it working. It survives ``torch.save`` and
``torch.load(..., weights_only=True)``, and ``PTLConfig.from_extra_state`` reads it back.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .._version import __version__
from ..errors import CheckpointError

__all__ = ["PTLConfig", "CONFIG_FORMAT"]

# Version of the layout of the extra state (not of bconv): bumped when its keys change meaning.
CONFIG_FORMAT = 1


@dataclass(frozen=True)
class PTLConfig:
    """Every option :func:`bconv.wrap_with_ptl` took, as ``wrapped.config``; ``state_dict()`` carries it.

    The values are the resolved ones: ``stages`` holds the names of the paired stages whatever the
    call used (indices, names or ``None``), and ``input_size`` the size actually used to find them.
    Comparing two configs (``==``) ignores ``version``: a checkpoint written by another bconv
    version loads if its options are the same.

    Attributes:
        stages: names of the paired stages, in network order (``("layer2", "layer3", "layer4")``).
        cell: ``"v1"`` or ``"v2"``.
        input_size: ``(C, H, W)`` used to find the stages.
        cell_width: cell channels as a fraction of the paired stage's.
        fuse_width: fusion channels as a fraction of the paired stage's.
        state_mode: ``"per_sample"`` or ``"pooled"``.
        sync_state: average the pooled state across DistributedDataParallel ranks.
        detach: store the cells' state detached after each forward.
        on_size_change: ``"reset"`` or ``"raise"``.
        final_init: ``"identity"`` or ``"paper"``.
        source: how the stages were found: ``"auto"``, ``"fx"`` or ``"feature_info"``.
        leaf_modules: the classes fx did not trace through, as ``"module:QualName"`` strings (a class
            is not a plain value a checkpoint may hold; :func:`bconv.load_ptl` imports them back).
        version: the bconv version that wrapped the model (informational, not compared).

    Example::

        >>> wrapped = wrap_with_ptl(torchvision.models.resnet18(), stages=[-2, -1], cell="v2")
        >>> wrapped.config.stages, wrapped.config.cell
        (('layer3', 'layer4'), 'v2')
    """

    stages: tuple[str, ...]
    cell: str = "v1"
    input_size: tuple[int, ...] = (3, 224, 224)
    cell_width: float = 0.125
    fuse_width: float = 0.125
    state_mode: str = "per_sample"
    sync_state: bool = False
    detach: bool = True
    on_size_change: str = "reset"
    final_init: str = "identity"
    source: str = "auto"
    leaf_modules: tuple[str, ...] = ()
    version: str = dataclasses.field(default=__version__, compare=False)

    @staticmethod
    def class_name(klass: type) -> str:
        """``"module:QualName"`` of a class, the form ``leaf_modules`` records."""
        return f"{klass.__module__}:{klass.__qualname__}"

    def to_extra_state(self) -> torch.Tensor:
        """The value ``state_dict()`` stores: ``{"format": 1, "config": {...}}`` as JSON in a uint8 tensor."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        text = json.dumps({"format": CONFIG_FORMAT, "config": fields}, sort_keys=True)
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)

    @classmethod
    def from_extra_state(cls, value: Any) -> PTLConfig:
        """The config stored by :meth:`to_extra_state`; a clear error for anything else.

        Example::

            >>> PTLConfig.from_extra_state(torch.load("ptl.pt", weights_only=True)["_extra_state"]).cell
            'v2'
        """
        state = None
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1:
            try:
                state = json.loads(bytes(value.cpu().tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
        if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and "format" in state):
            what = (
                f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise CheckpointError(
                f"the state dict's `_extra_state` is not a bconv PTL config (got {what}); "
                f"it was not written by PTLModel.state_dict()"
            )
        if state["format"] != CONFIG_FORMAT:
            raise CheckpointError(
                f"this checkpoint's PTL config has format {state['format']!r}, this bconv ({__version__}) "
                f"reads format {CONFIG_FORMAT}: use the bconv version that wrote it "
                f"({state['config'].get('version', 'unknown')})"
            )
        values = dict(state["config"])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise CheckpointError(
                f"this checkpoint's PTL config has options this bconv ({__version__}) does not know: "
                f"{', '.join(unknown)}; it was written by bconv {values.get('version', 'unknown')}: upgrade bconv"
            )
        if "stages" not in values:
            raise CheckpointError("this checkpoint's PTL config has no `stages`")
        for key, value in values.items():
            check, expected = _OPTION_TYPES[key]
            if not check(value):
                raise CheckpointError(
                    f"this checkpoint's PTL config records {key}={value!r}, which should be {expected}: the config "
                    f"was edited or damaged after PTLModel.state_dict() wrote it. Fix `{key}` in the "
                    f"checkpoint, or wrap the network by hand and load the weights without the `_extra_state` key."
                )
        for key in ("stages", "input_size", "leaf_modules"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def differences(self, other: PTLConfig) -> list[tuple[str, Any, Any]]:
        """``(option, self's value, other's value)`` for every compared option that differs."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.compare and getattr(self, f.name) != getattr(other, f.name)
        ]

    def wrap_kwargs(self, leaf_modules: Iterable[type] | None = None) -> dict[str, Any]:
        """Keyword arguments that make :func:`bconv.wrap_with_ptl` build this wrapper again.

        Args:
            leaf_modules: the classes themselves, when the recorded names cannot be imported (a class
                defined in a script's ``__main__`` or inside a function).

        Raises:
            bconv.errors.CheckpointError: a recorded leaf module class cannot be imported and none was given.
        """
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "version"}
        kwargs["stages"] = list(self.stages)
        kwargs["leaf_modules"] = (
            tuple(leaf_modules) if leaf_modules is not None else tuple(_import_class(n) for n in self.leaf_modules)
        )
        return kwargs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_strings(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


# What each recorded option must be, checked before any of it is used (``stages: null`` would otherwise
# mean "every stage", ``input_size: 5`` fail inside a tuple()).
_OPTION_TYPES: dict[str, tuple[Any, str]] = {
    "stages": (lambda v: _is_strings(v) and len(v) > 0, "a non-empty list of stage names"),
    "cell": (lambda v: isinstance(v, str), "a string ('v1' or 'v2')"),
    "input_size": (
        lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_int(n) and n > 0 for n in v),
        "three positive integers (C, H, W)",
    ),
    "cell_width": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "fuse_width": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "state_mode": (lambda v: isinstance(v, str), "a string"),
    "sync_state": (lambda v: isinstance(v, bool), "true or false"),
    "detach": (lambda v: isinstance(v, bool), "true or false"),
    "on_size_change": (lambda v: isinstance(v, str), "a string"),
    "final_init": (lambda v: isinstance(v, str), "a string"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "leaf_modules": (_is_strings, "a list of 'module:QualName' strings"),
    "version": (lambda v: isinstance(v, str), "a string"),
}


def _import_class(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(
            f"the checkpoint was wrapped with leaf_modules=[{name}], which cannot be imported here ({e}); "
            f"pass the class itself: bconv.load_ptl(model, state_dict, leaf_modules=[YourClass])"
        ) from e
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        # A checkpoint is data: what it names is only used if it is a module class.
        raise CheckpointError(f"leaf module {name} recorded in the checkpoint is not an nn.Module class here")
    return obj


def mismatch_message(checkpoint: PTLConfig, model: PTLConfig) -> str:
    """The error for a checkpoint loaded into a wrapper built with other options: one line per option."""
    diffs = checkpoint.differences(model)
    width = max(len(name) for name, _, _ in diffs)
    saved = max(len(_show(a)) for _, a, _ in diffs)
    lines = [f"  {name:<{width}}  checkpoint: {_show(a):<{saved}}  this model: {_show(b)}" for name, a, b in diffs]
    by_hand = ", ".join(f"{name}={_show(a)}" for name, a, _ in diffs)
    return (
        f"this checkpoint was written by a PTL model wrapped with other options "
        f"({len(diffs)} differ{'s' if len(diffs) == 1 else ''}):\n" + "\n".join(lines) + "\n"
        "No weight of the PTL model was loaded. Let the checkpoint build the wrapper: "
        "`model = bconv.load_ptl(fresh_network, state_dict)` wraps a freshly built network exactly as the "
        f"checkpoint's was and loads it; or wrap by hand with {by_hand}. To load these weights into this "
        f"model on purpose, delete the checkpoint's `_extra_state` key first."
    )


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)
