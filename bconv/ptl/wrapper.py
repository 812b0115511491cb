"""Wrapping a network with the PTL ladder: :func:`wrap_with_ptl`, the :class:`PTLModel` it returns, :func:`unwrap_ptl`.

The wrap finds the network's stages once (:func:`bconv.anatomy`), builds the :class:`~bconv.ptl.ladder.PTLLadder`
for the chosen ones, and attaches a :class:`~bconv.ptl.adapter.LadderAdapter` whose hooks feed it. The
ladder reads the backbone and feeds back only at the last paired stage, so the rest of the network
(pooling, head) is the user's own and the wrapped model returns what the original returned
(docs/design.md §3).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import BConvError, CheckpointError, ConfigError, StageSelectionError, WrappedModelError
from ..surgery import (
    Stage, anatomy, dummy_input, eval_mode, meta_input, on_meta, refuse_wrapped, select_stages, shape_keeping_skipped,
)
from . import state as latent
from .adapter import LadderAdapter, tap_modules
from .config import PTLConfig, mismatch_message
from .ladder import PTLLadder
from .layouts import layout_of

__all__ = ["PTLModel", "wrap_with_ptl", "unwrap_ptl", "check_ladder_version", "pairable_stages"]

# Token backbones pair this many evenly spaced blocks by default (a CNN pairs every stage: it has 4 or 5).
TOKEN_STAGES = 4


class PTLModel(nn.Module):
    """A network with a PTL ladder injected beside its stages. Returned by :func:`wrap_with_ptl`.

    The original network is ``self.model`` (its ``state_dict`` keys get the prefix ``model.``), the
    injected modules are ``self.ptl``. Attributes the wrapper does not have are looked up on the
    original network, so ``wrapped.fc``, ``wrapped.reset_classifier(10)`` or
    ``wrapped.forward_features(x)`` work as before (and run the ladder). Writes go to the original
    network too: ``wrapped.fc = nn.Linear(512, 5)`` replaces the network's classifier and
    ``wrapped.drop_rate = 0.5`` sets the network's, exactly as on the bare network. Only the wrapper's
    own attributes are written on the wrapper: ``model``, ``ptl``, ``adapter``, ``stages``, ``config``, its
    methods, ``training`` and names that start with an underscore. ``model``, ``ptl`` and ``adapter`` cannot be
    replaced: another network put in place of ``model`` would run without the ladder.

    After :func:`unwrap_ptl` the wrapper refuses to run: its network no longer feeds the ladder.

    ``state_dict()`` carries :attr:`config` (key ``_extra_state``): loading a checkpoint written with
    other options raises a :class:`~bconv.BConvError` naming each one, and :func:`bconv.load_ptl`
    rebuilds the wrapper from it. A checkpoint without that key (written before bconv recorded it)
    loads as before.

    Attributes:
        model: the original network, with the adapter's hooks on it.
        ptl: the :class:`~bconv.ptl.ladder.PTLLadder` (the injected modules).
        adapter: the :class:`~bconv.ptl.adapter.LadderAdapter` that feeds the ladder from the network's hooks.
        stages: the paired stages, in order.
        config: the options of :func:`wrap_with_ptl` that built this model (a :class:`PTLConfig`).
    """

    def __init__(
        self,
        model: nn.Module,
        ladder: PTLLadder,
        adapter: LadderAdapter,
        stages: Sequence[Stage],
        config: PTLConfig | None = None,
    ):
        super().__init__()
        self.model = model
        self.ptl = ladder
        self.adapter = adapter
        self.stages = tuple(stages)
        self.config = config

    def get_extra_state(self) -> torch.Tensor:
        return self.config.to_extra_state() if self.config is not None else torch.zeros(0, dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        if self.config is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            return  # a wrapper built by hand, without a config: nothing to compare
        saved = PTLConfig.from_extra_state(state)
        if saved != self.config:
            raise BConvError(mismatch_message(saved, self.config))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:
        check_ladder_version(state_dict, prefix)  # before any tensor of this model is touched
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # a checkpoint from before the config was recorded: load it as it is

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("model", "ptl", "adapter") and name in self.__dict__.get("_modules", {}) | self.__dict__:
            self._refuse_replacing(name)
        if self._owns(name):
            super().__setattr__(name, value)
        else:
            # The user addresses the network (``wrapped.fc = ...``): set on the wrapper, it would be a module
            # or value the network never reads.
            setattr(self._modules["model"], name, value)

    def __delattr__(self, name: str) -> None:
        if name in ("model", "ptl", "adapter"):
            self._refuse_replacing(name)
        if self._owns(name):
            super().__delattr__(name)
        else:
            delattr(self._modules["model"], name)

    def _owns(self, name: str) -> bool:
        """Whether an attribute write ``name`` is the wrapper's own rather than the network's."""
        d = self.__dict__
        if "model" not in d.get("_modules", {}) or name in _WRAPPER_ATTRIBUTES or name.startswith("_"):
            return True  # still being built, or the wrapper's own state (DataParallel's _is_replica too)
        return (
            name in d or name in d["_modules"] or name in d["_parameters"] or name in d["_buffers"]
            or hasattr(type(self), name)  # methods (accelerate replaces forward on the module it hooks)
        )  # fmt: skip

    def _refuse_replacing(self, name: str) -> None:
        raise WrappedModelError(
            f"a PTLModel's `{name}` cannot be replaced or deleted: the ladder's hooks sit on the network it was "
            f"built with, so another network would run without the ladder. To put PTL on another network, "
            f"wrap it: bconv.wrap_with_ptl(other) (bconv.unwrap_ptl(wrapped) hands back this one)."
        )

    def _refuse_if_unwrapped(self) -> None:
        if self.__dict__.get("_unwrapped", False):
            raise BConvError(
                "this PTLModel was taken apart by unwrap_ptl(): its network no longer feeds the ladder, so the "
                "wrapper would return the bare backbone's output. Use the network unwrap_ptl returned "
                "(wrapped.model), or wrap it again with wrap_with_ptl (bconv.load_ptl restores a checkpoint)."
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_if_unwrapped()
        if getattr(self, "_is_replica", False):
            raise BConvError(
                "A PTL model cannot run under nn.DataParallel: its replicas are rebuilt at every forward, "
                "so the cells' state they write is lost. Use DistributedDataParallel (one process per "
                "device), which keeps the module and its state: see docs/guides/ptl-loop.md, 'Several GPUs'."
            )
        try:
            return self.model(*args, **kwargs)  # the network's own hook checks that every paired stage ran
        except BaseException:
            self.adapter.reset()  # an interrupted forward (KeyboardInterrupt too) must not fail the next one
            raise

    def reset_state(self) -> None:
        """Forget the history of every cell: the next forward starts from zero state (call it every epoch)."""
        latent.reset_state(self)

    def detach_state(self) -> None:
        """Cut every cell's state from the autograd graph (after each optimizer step)."""
        latent.detach_state(self)

    def latent_state_dict(self) -> dict[str, dict[str, Any]]:
        """Every cell's state, keyed by the cell's module path; see :func:`bconv.ptl.state.latent_state_dict`."""
        return latent.latent_state_dict(self)

    def load_latent_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the cells' state from :meth:`latent_state_dict`; see :func:`bconv.ptl.state.load_latent_state_dict`."""
        latent.load_latent_state_dict(self, state_dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            model = modules.get("model")
            if model is None:
                raise
            value = getattr(model, name)
            adapter = self.__dict__.get("adapter")
            if inspect.ismethod(value) and adapter is not None:
                self._refuse_if_unwrapped()
                return _checked(value, adapter)  # forward_features(x) & co. skip the network's __call__
            return value


# Written on the wrapper itself; every other attribute a user writes goes to the network.
_WRAPPER_ATTRIBUTES = frozenset({"model", "ptl", "adapter", "stages", "config", "training"})


# A key only the earlier ladder (bconv 0.1: plain 1x1 fusions without BatchNorm) wrote: its final fusion was
# a bare Conv2d, where the current one is FinalFusion(fuse=Fusion(conv, bn, relu), scale).
_EARLIER_LADDER_KEY = "ptl.final_fuse.weight"


def check_ladder_version(state_dict: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse a checkpoint written by the earlier ladder with a message that says what to do.

    Raises:
        bconv.errors.CheckpointError: ``state_dict`` holds the earlier ladder's plain 1x1 fusions.
    """
    if prefix + _EARLIER_LADDER_KEY not in state_dict:
        return
    backbone = prefix + "model."
    raise CheckpointError(
        "this checkpoint was written by bconv's earlier PTL ladder (bconv 0.1: plain 1x1 fusions, no "
        "BatchNorm), which this bconv no longer builds: that ladder stayed dormant or destabilised "
        "fine-tuning (docs/design.md §3). Nothing was loaded. Its backbone weights still load into the wrapped "
        "network: `wrapped.model.load_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)})` "
        f"with p = {backbone!r}, and the new ladder is then trained from its function-preserving start; to "
        "keep using the old ladder as it is, load the checkpoint with bconv 0.1."
    )


def _checked(method: Any, adapter: LadderAdapter) -> Any:
    """``method`` of the original network, with the ladder's end-of-pass check after it."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            result = method(*args, **kwargs)
        except BaseException:
            adapter.reset()
            raise
        adapter.end()
        return result

    return call


def wrap_with_ptl(
    model: nn.Module,
    stages: Sequence[int | str] | int | str | None = None,
    config: PTLConfig | None = None,
    **options: Any,
) -> PTLModel:
    """Inject the PTL ladder (BConv-Cells and 1x1 fusions) beside the stages of ``model``.

    ``model`` itself gets forward hooks (``unwrap_ptl`` removes them); its weights are not touched.
    Every option is an attribute of :class:`PTLConfig`, declared and documented there once: pass a
    config, keywords, or both (keywords replace the config's values).

    Args:
        model: a torchvision or timm network, or your own CNN.
        stages: the stages to pair: ``None`` (all), indices (negative allowed) or names, as
            ``python -m bconv.inspect`` prints them. Order does not matter; duplicates are refused.
        config: a :class:`PTLConfig` (default: its defaults).
        **options: any :class:`PTLConfig` attribute: ``cell``, ``input_size``, ``cell_width``,
            ``fuse_width``, ``state_mode``, ``sync_state``, ``detach``, ``on_size_change``, ``final_init``,
            ``source``, ``leaf_modules``.

    Returns:
        A :class:`PTLModel`: call it as the original, plus ``reset_state()`` and ``detach_state()``;
        ``config`` records the resolved options (and ``state_dict()`` carries them, see :func:`bconv.load_ptl`).

    Raises:
        bconv.errors.ConfigError: an unknown option, or a value outside its choices (a ``ValueError``).
        bconv.errors.StageSelectionError: unknown, duplicate or empty ``stages`` (a ``ValueError``).
        bconv.errors.WrappedModelError: an already wrapped model.
        bconv.errors.InputSizeError: a malformed ``input_size``, or one the model rejects.
        bconv.errors.LeafModuleError: ``leaf_modules`` holds something other than module classes.
        bconv.BConvError: a model wrapped in (Distributed)DataParallel, or the errors of :func:`bconv.anatomy`.

    Example::

        >>> model = wrap_with_ptl(torchvision.models.resnet50(), stages=["layer2", "layer3", "layer4"])
        >>> for epoch in range(epochs):
        ...     model.reset_state()
        ...     for x, y in loader:
        ...         loss = criterion(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        ...         model.detach_state()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_with_ptl needs an nn.Module; got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise BConvError(
            f"wrap the bare network, then put the wrapped model in DistributedDataParallel; got a "
            f"{type(model).__name__} (its .module is the network)"
        )
    refuse_wrapped(model, "call unwrap_ptl(model) first to start again")
    if isinstance(config, str):
        raise ConfigError(
            f"config must be a bconv.PTLConfig; got {config!r}. The options are keywords: "
            f"wrap_with_ptl(model, stages, cell={config!r})"
        )
    if stages is not None:
        options["stages"] = stages
    config = PTLConfig.from_options(config, **options)  # every option checked before anything is built

    leaf_modules = config.leaf_module_classes()
    body = anatomy(model, config.input_size, config.source, leaf_modules=leaf_modules)
    chosen = pairable_stages(body.stages, config.stages, model)
    input_size = body.input_size
    if chosen[0].tokens is not None:
        refuse_patch_dropout(model)
    config = dataclasses.replace(
        config, stages=tuple(s.name for s in chosen), input_size=input_size, leaf_modules=leaf_modules
    )
    tokens = chosen[0].tokens is not None
    ladder = PTLLadder([s.channels for s in chosen], [s.reduction for s in chosen], input_size[0], config, taper=tokens)
    param = next(model.parameters(), None)
    if param is not None:
        ladder.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    adapter = LadderAdapter(ladder, [layout_of(s, input_size) for s in chosen], tap_modules(model, config.stages))
    adapter.attach(model, first=tap_modules(model, [body.stem[0]], end=0)[0])
    wrapped = PTLModel(model, ladder, adapter, chosen, config)
    _check_wiring(wrapped, input_size)
    return wrapped


def pairable_stages(found: Sequence[Stage], stages: Any, model: nn.Module) -> list[Stage]:
    """The stages ``stages`` names (:func:`bconv.surgery.select_stages`), checked for a PTL ladder.

    ``None`` pairs every stage of a CNN; on a token backbone, whose stages are its blocks (12 to 40 of
    them), :data:`TOKEN_STAGES` evenly spaced blocks whose grid tokens reach the output, the last of them the
    last such block. A ladder ends by writing into its last stage's grid tokens, so a last stage whose grid
    never reaches the output (the last block of a model that classifies from its class token) is refused:
    the ladder would get no gradient and do nothing.

    Raises:
        bconv.errors.StageSelectionError: what :func:`~bconv.surgery.select_stages` refuses, or a last stage
            whose grid tokens never reach the output (naming the ones that do).
    """
    reaching = [s for s in found if s.tokens is None or s.tokens.reaches_output]
    if stages is None and any(s.tokens is not None for s in found):
        n = len(reaching)
        return [reaching[round(n * (k + 1) / min(TOKEN_STAGES, n)) - 1] for k in range(min(TOKEN_STAGES, n))]
    chosen = select_stages(found, stages, model)
    last = chosen[-1]
    if last.tokens is not None and not last.tokens.reaches_output:
        names = ", ".join(s.name for s in reaching[-3:])
        raise StageSelectionError(
            f"stage `{last.name}` cannot end a PTL ladder: its grid tokens never reach the output ({type(model).__name__} "
            f"classifies from its prefix tokens, which the ladder leaves untouched), so the ladder would get no "
            f"gradient and change nothing. End at a block whose grid reaches the output: the last ones are {names} "
            f"(stages=None chooses {TOKEN_STAGES} of them)."
        )
    return chosen


def refuse_patch_dropout(model: nn.Module) -> None:
    """Refuse a network that drops tokens in training (timm's ``PatchDropout``): its grid is broken."""
    dropping = next(
        (n for n, m in model.named_modules() if type(m).__name__ == "PatchDropout" and getattr(m, "prob", 0) > 0), None
    )
    if dropping is not None:
        raise BConvError(
            f"{type(model).__name__} drops tokens in training (`{dropping}`, prob {model.get_submodule(dropping).prob}): "
            f"the patch grid a token ladder reads is then incomplete. Build the model with patch_drop_rate=0 "
            f"(timm.create_model(..., patch_drop_rate=0.0)) to pair its blocks."
        )


def _check_wiring(wrapped: PTLModel, input_size: Sequence[int]) -> None:
    """One eval forward: the image reaches the first cell and the ladder reaches its last stage
    (the network's own end-of-pass check raises otherwise).

    The forward runs on meta tensors (no real compute; see :func:`bconv.surgery.on_meta`), and for real only
    where meta tensors cannot run the model. On failure the hooks are removed again, so the user's model is
    left as it was.
    """
    try:
        with eval_mode(wrapped):
            try:
                with shape_keeping_skipped(wrapped.model):
                    on_meta(wrapped, wrapped, meta_input(wrapped.model, input_size))
            except BConvError:
                raise
            except Exception:
                with torch.no_grad():
                    wrapped(dummy_input(wrapped.model, input_size))
    except BConvError:
        unwrap_ptl(wrapped)
        raise
    except Exception as e:
        unwrap_ptl(wrapped)
        raise BConvError(f"the PTL ladder does not fit this model: {type(e).__name__}: {e}") from e


def unwrap_ptl(model: PTLModel) -> nn.Module:
    """The original network, with every hook of bconv removed (the injected modules stay in ``model.ptl``).

    The wrapper is done with: calling it (or a network method through it) afterwards raises a
    :class:`~bconv.BConvError` rather than returning the bare network's output.

    Raises:
        ValueError: ``model`` is not a PTL-wrapped model.
    """
    if not isinstance(model, PTLModel):
        raise ValueError(f"unwrap_ptl needs a model returned by wrap_with_ptl; got {type(model).__name__}")
    model._unwrapped = True
    model.adapter.remove()
    return model.model
