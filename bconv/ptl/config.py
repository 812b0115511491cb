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
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
from torch import nn

from .._options import build
from .._version import __version__
from ..cells import StateOptions
from ..errors import BConvError, CheckpointError, ConfigError
from ..surgery import Source, check_input_size, check_leaf_modules

__all__ = ["PTLConfig", "CONFIG_FORMAT", "CellVersion", "FinalInit", "mismatch_message"]

# Version of the layout of the extra state (not of bconv): bumped when its keys change meaning.
CONFIG_FORMAT = 1

CellVersion = Literal["v1", "v2"]
FinalInit = Literal["identity", "paper"]


@dataclass(frozen=True, kw_only=True)
class PTLConfig(StateOptions):
    """Every option of PTL, declared once: what :func:`bconv.wrap_with_ptl` takes, and ``wrapped.config``.

    Build one and pass it (``wrap_with_ptl(model, config=PTLConfig(cell="v2"))``), or pass the same
    options as keywords (``wrap_with_ptl(model, cell="v2")``); each is checked here, when the config is
    made. The wrapped model's ``config`` holds the resolved values: ``stages`` the names of the paired
    stages whatever the call used (indices, names or ``None``), ``input_size`` the size used to find them;
    ``state_dict()`` carries it. Comparing two configs (``==``) ignores ``version``: a checkpoint written
    by another bconv version loads if its options are the same. The state options (``state_mode``,
    ``detach``, ``on_size_change``, ``sync_state``) and ``recompute`` (the cells recompute their gates in
    backward instead of keeping them: docs/memory.md; not compared, like ``version``) are
    :class:`bconv.cells.StateOptions`, inherited.

    Attributes:
        stages: the stages to pair: ``None`` (all), indices (negative allowed) or names as
            ``python -m bconv.inspect`` prints them; order does not matter. Resolved: their names in
            network order (``("layer2", "layer3", "layer4")``).
        cell: ``"v1"`` (paper Eq. 1) or ``"v2"`` (paper Fig. 1 right).
        input_size: ``(C, H, W)`` used to find the stages (``None``: the model's own, or 3x224x224).
        cell_width: cell output channels as a fraction of the paired stage's channels (at least 8), in (0, 4].
            At the default 1/8: ResNet-50 25.6M -> 27.8M parameters, DenseNet-161 28.7M -> 33.7M; with
            ``final_init="paper"`` 32.0M and 38.6M (paper: 28M -> 35M, 32M -> 42M).
        fuse_width: channels of each intermediate fusion ``z_i``, as a fraction of stage ``i``'s, in (0, 4].
        final_init: ``"identity"`` (default): ``out = x_n + proj(y_n)`` with the last cell silenced, so the
            wrapped model computes exactly what the original did and the ladder gets gradients from the first
            step; ``"paper"``: the released code's randomly initialised ``Fuse(cat(x_n, y_n))`` replaces
            ``x_n`` (docs/design.md §3).
        source: how to find the stages: ``"auto"``, ``"fx"`` or ``"feature_info"`` (timm).
        leaf_modules: module classes fx calls whole instead of tracing through. Recorded as
            ``"module:QualName"`` strings (a class is not a plain value a checkpoint may hold); the classes
            given are kept for the wrap.
        version: the bconv version that wrapped the model (informational, not compared).

    Raises:
        bconv.errors.ConfigError: an option outside its choices or range.
        bconv.errors.InputSizeError: a malformed ``input_size``.
        bconv.errors.LeafModuleError: ``leaf_modules`` holds something other than module classes.

    Example::

        >>> wrapped = wrap_with_ptl(torchvision.models.resnet18(), stages=[-2, -1], cell="v2")
        >>> wrapped.config.stages, wrapped.config.cell
        (('layer3', 'layer4'), 'v2')
    """

    stages: tuple[int | str, ...] | None = None
    cell: CellVersion = "v1"
    input_size: tuple[int, ...] | None = None
    cell_width: float = 0.125
    fuse_width: float = 0.125
    final_init: FinalInit = "identity"
    source: Source = "auto"
    leaf_modules: tuple[str, ...] = ()
    version: str = dataclasses.field(default=__version__, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        stages = self.stages
        if isinstance(stages, (numbers.Integral, str)) and not isinstance(stages, bool):
            stages = (stages,)
        elif stages is not None and isinstance(stages, Iterable):
            stages = tuple(stages)  # what each item names is checked against the model (StageSelectionError)
        object.__setattr__(self, "stages", stages)
        if self.input_size is not None:
            object.__setattr__(self, "input_size", _positive_ints(self.input_size))
        for name in ("cell_width", "fuse_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 4:
                raise ConfigError(f"{name} must be a fraction of the stage's channels in (0, 4]; got {value!r}")
            object.__setattr__(self, name, float(value))
        recorded = isinstance(self.leaf_modules, (list, tuple)) and all(
            isinstance(c, str) and ":" in c for c in self.leaf_modules
        )
        classes = () if recorded else check_leaf_modules(self.leaf_modules)
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules) if recorded else tuple(map(PTLConfig.class_name, classes)))
        object.__setattr__(self, "_classes", classes)  # the classes themselves, where they were given

    @classmethod
    def from_options(cls, config: PTLConfig | None = None, /, **options: Any) -> PTLConfig:
        """``config`` (or the defaults) with ``options`` replaced; an unknown option is named.

        Raises:
            bconv.errors.ConfigError: an unknown option, or a value outside its choices or range.
        """
        if config is None:
            return build(cls, options, "wrap_with_ptl")
        if not isinstance(config, cls):
            raise ConfigError(f"config must be a bconv.PTLConfig; got {type(config).__name__} ({config!r})")
        if not options:
            return config
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.name != "version"}
        if config.leaf_modules and "leaf_modules" not in options:
            values["leaf_modules"] = config.leaf_module_classes()
        return build(cls, {**values, **options}, "wrap_with_ptl")

    def leaf_module_classes(self, given: Iterable[type] | None = None) -> tuple[type[nn.Module], ...]:
        """The ``leaf_modules`` classes: ``given``, else the ones this config was made with, else imported.

        Raises:
            bconv.errors.CheckpointError: a recorded class cannot be imported and none was given.
        """
        if given is not None:
            return check_leaf_modules(given)
        if self._classes or not self.leaf_modules:
            return self._classes
        return tuple(_import_class(n) for n in self.leaf_modules)

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
        if not (
            isinstance(values.get("stages"), (list, tuple)) and values["stages"]
            and all(isinstance(v, str) for v in values["stages"])
        ):  # fmt: skip
            raise CheckpointError(_damaged("stages", values.get("stages"), "a non-empty list of stage names"))
        if not isinstance(values.get("input_size"), (list, tuple)):
            raise CheckpointError(_damaged("input_size", values.get("input_size"), "three positive integers (C, H, W)"))
        if not (isinstance(values.get("leaf_modules", []), (list, tuple))
                and all(isinstance(v, str) and ":" in v for v in values.get("leaf_modules", []))):  # fmt: skip
            raise CheckpointError(_damaged("leaf_modules", values["leaf_modules"], "a list of 'module:QualName' strings"))
        recorded = dict(values)
        for key in ("stages", "input_size", "leaf_modules"):
            if key in values:
                values[key] = tuple(values[key])
        try:
            return cls(**values)
        except BConvError as e:  # the config's own checks, on a value that was edited or damaged
            key = next((k for k in values if str(e).startswith((f"{k}=", f"{k} "))), None)
            raise CheckpointError(
                _damaged(key, recorded[key], f"valid ({e})") if key else f"this checkpoint's PTL config is damaged: {e}"
            ) from e

    def differences(self, other: PTLConfig) -> list[tuple[str, Any, Any]]:
        """``(option, self's value, other's value)`` for every compared option that differs."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.compare and getattr(self, f.name) != getattr(other, f.name)
        ]


def _positive_ints(size: Any) -> tuple[int, ...]:
    """``size`` checked as ``(C, H, W)``; another number of positive ints (a video's ``(C, T, H, W)``, a pair) is
    passed on for :func:`bconv.anatomy` to refuse with the model at hand (a video network, a missing channel count)."""
    try:
        values = list(size) if not isinstance(size, (str, bytes)) else None
    except TypeError:
        values = None
    if values is not None and len(values) != 3 and values and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in values
    ):
        return tuple(int(v) for v in values)
    return check_input_size(size)


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


def _damaged(key: str, value: Any, expected: str) -> str:
    return (
        f"this checkpoint's PTL config records {key}={value!r}, which should be {expected}: the config was "
        f"edited or damaged after PTLModel.state_dict() wrote it. Fix `{key}` in the checkpoint, or wrap the "
        f"network by hand and load the weights without the `_extra_state` key."
    )


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
