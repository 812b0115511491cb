"""Progressive Transfer Learning: a ladder of BConv-Cells beside any backbone's stages.

Given the chosen stages s_1..s_n with outputs x_1..x_n (DESIGN.md §3, paper Eq. 3)::

    y_1 = Cell_1(image)                        # strided from the image to r_1
    z_i = Fuse_i(cat(x_i, y_i))                # Conv1x1(bias) -> BN -> ReLU, i = 1..n-1
    y_{i+1} = Cell_{i+1}(z_i)                  # stride r_{i+1}/r_i: a chain of stride-2 cells
    out = x_n + proj(y_n)                      # replaces x_n; y_n starts at exactly 0

Every fusion is the released code's ``Conv1x1(bias) -> BatchNorm -> ReLU`` and every convolution
of the branch starts from ``kaiming_normal_(fan_in)`` (ZJULearning/PTL, DESIGN.md §3). The ladder
reads the backbone through forward hooks and feeds back only at the last paired stage, so the rest
of the network (pooling, head) is the user's own and the wrapped model returns what the original
returned. The final fusion is the paper's 1x1 conv over ``cat(x_n, y_n)`` with its ``x_n`` part fixed
to the identity, and the last cell's candidate weights start at zero, so that cell outputs exactly 0
at first: a freshly wrapped model computes exactly what the original computed, while the gradient
``proj^T g`` reaches the ladder from the first step (see :class:`FinalFusion`).
``final_init="paper"`` gives the released code's ``out = Fuse(cat(x_n, y_n))`` instead.

The ladder checks itself at every forward: once the image has reached it, every paired stage
must run, in order, or the forward raises (never a backbone-only output). Each stage's output
is read at the innermost module that returns it (the last block of a Sequential stage), so a
network that calls the blocks directly, as timm's gradient checkpointing does, still feeds the
ladder. Under ``torch.utils.checkpoint`` (non-reentrant) the ladder's own activations are kept,
not recomputed: the cells run once per forward, and the recompute in backward replays only the
final fusion, with the cell output of the first pass.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import math
import sys
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import state as latent
from ..cells import BConvCell, BConvCellV2, StatefulCell
from ..errors import BConvError, CheckpointError
from ..surgery import (
    BConvHook,
    Stage,
    anatomy,
    check_leaf_modules,
    dummy_input,
    eval_mode,
    meta_input,
    on_meta,
    refuse_wrapped,
    select_stages,
    shape_keeping_skipped,
)
from .config import PTLConfig, mismatch_message

__all__ = ["PTLModel", "PTLLadder", "Fusion", "FinalFusion", "wrap_with_ptl", "unwrap_ptl", "CELLS"]

CELLS: dict[str, type[StatefulCell]] = {"v1": BConvCell, "v2": BConvCellV2}
_FINAL_INITS = ("identity", "paper")


def _width(fraction: float, channels: int) -> int:
    return max(8, round(fraction * channels))


class Fusion(nn.Sequential):
    """The released code's fusion: ``Conv1x1(bias) -> BatchNorm -> ReLU`` (ZJULearning/PTL, ``mgn_ptl.py``).

    The BatchNorm keeps the fused signal at unit scale whatever the scale of the backbone's features, so
    the ladder neither vanishes beside them nor swamps them (DESIGN.md §3).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            collections.OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, bias=True),
                bn=nn.BatchNorm2d(out_channels),
                relu=nn.ReLU(),
            )
        )

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels


class FinalFusion(nn.Module):
    r"""The last fusion, whose output replaces the last paired stage's output ``x``.

    ``final_init="identity"`` (bconv's default), the paper's 1x1 conv over ``cat(x, y)`` with its ``x``
    part fixed to the identity::

        out = x + proj(y)           # proj: Conv1x1(y's channels -> x's), kaiming_normal_(fan_in), no bias

    and the last cell's candidate weights (the ``g`` rows of its gate conv) start at zero, so with no
    history that cell outputs exactly 0 (:meth:`~bconv.cells.BConvCell.silence_`): a freshly wrapped model
    computes exactly what the original computed. The ladder is awake from the first step: the gradient
    reaching ``y`` is ``proj^T g``, of the order of the stage output's own gradient ``g``, and the silenced
    candidate weights, with the fan-in of a 3x3 conv, grow at the rate of any conv layer. Unlike a zero
    scale or a zero BatchNorm weight on a fusion's output, nothing multiplies the ladder's path by zero;
    and since the ``x`` part is fixed, the ladder adds no trainable layer on the backbone's own features:
    with the cells' output zeroed the model is the plain backbone. The contribution is bounded like
    the cell's output (``|y| < 1``), so it cannot swamp the stage's features.

    ``final_init="paper"``: ``out = Fusion(cat(x, y))``, the released code's randomly initialised, normalised
    reduction layer (its BatchNorm weight drawn from N(1, 0.02), as ``MGN_PTL._init_reduction`` does).
    """

    def __init__(self, channels: int, cell_channels: int, residual: bool) -> None:
        super().__init__()
        self.channels, self.cell_channels, self.residual = channels, cell_channels, residual
        if residual:
            self.proj = nn.Conv2d(cell_channels, channels, 1, bias=False)
        else:
            self.fuse = Fusion(channels + cell_channels, channels)
            with torch.no_grad():
                self.fuse.bn.weight.normal_(1.0, 0.02)

    @property
    def in_channels(self) -> int:
        return self.channels + self.cell_channels

    @property
    def out_channels(self) -> int:
        return self.channels

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.to(x.dtype)
        if self.residual:
            return x + self.proj(y)
        return self.fuse(torch.cat([x, y], dim=1))

    def extra_repr(self) -> str:
        return "out = x + proj(y)" if self.residual else "out = fuse(cat(x, y))"


def released_init(module: nn.Module) -> None:
    """``kaiming_normal_(mode="fan_in")`` on every convolution of ``module``, as the released code initialises
    the PTL branch (``PTL.init_param``); biases and BatchNorm keep PyTorch's defaults."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in")


class PTLLadder(nn.Module):
    """The injected modules: one chain of cells and one fusion per paired stage, and the final fusion.

    Attributes:
        cells: ``cells[i]`` takes the image (``i == 0``) or ``z_{i-1}`` to stage ``i``'s resolution.
        fuses: ``fuses[i]`` (``i < n - 1``) is the :class:`Fusion` ``cat(x_i, y_i) -> z_i``.
        final_fuse: the :class:`FinalFusion` ``(x_n, y_n) -> x_n``'s channels.
        zero_cells: when ``True``, the cells do not run and the final fusion sees zeros in place of the
            last cell's output: the ladder minus its cells (an ablation: :func:`bconv.ladder_usage`
            compares with it; with the default ``final_init`` the model is then the plain backbone).
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        in_channels: int,
        cell: type[StatefulCell],
        cell_width: float,
        fuse_width: float,
        final_init: str,
        cell_kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        self.stage_names = tuple(s.name for s in stages)
        self.layouts = tuple(s.layout for s in stages)
        cells, fuses = [], []
        channels, reduction = in_channels, 1
        for i, s in enumerate(stages):
            width = _width(cell_width, s.channels)
            cells.append(_cell_chain(cell, channels, width, s.reduction // reduction, cell_kwargs))
            if i < len(stages) - 1:
                fused = _width(fuse_width, s.channels)
                fuses.append(Fusion(s.channels + width, fused))
                channels, reduction = fused, s.reduction
        self.cells = nn.ModuleList(cells)
        self.fuses = nn.ModuleList(fuses)
        last = stages[-1].channels
        self.final_fuse = FinalFusion(last, _width(cell_width, last), residual=final_init == "identity")
        released_init(self)
        if final_init == "identity":
            self.cells[-1][-1].silence_()  # the last cell outputs 0 until it learns: out == x_n exactly
        self.zero_cells = False
        # Where each stage's output is read (set by wrap_with_ptl; named in errors).
        self.tap_names = self.stage_names
        self._reset_pass()
        self._replay_y: torch.Tensor | None = None
        self._unreached = 0

    # Per-forward scratch: the image, the running z, which stage comes next. Plain attributes, cleared
    # at the last stage so no activation outlives its forward.
    def _reset_pass(self) -> None:
        self._image: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._next = 0

    def begin(self, image: torch.Tensor) -> None:
        if _in_backward():
            return  # a checkpoint recomputing the stem in backward: the forward already ran
        if self._image is not None:
            # A forward that bypassed both PTLModel and the network's __call__ (wrapped.model.forward_features)
            # left a pass open: the check at the end of the pass could not run, so it runs here, once.
            pending = self._next
            self._reset_pass()
            raise self._not_run(pending, "in the previous forward of the model (found when the next one began)")
        self._refuse_reentrant_checkpoint("the network's first module")
        self._image = image

    def _refuse_reentrant_checkpoint(self, what: str) -> None:
        # A reentrant checkpoint runs its region under no_grad and only its outputs join the graph: the
        # ladder's side branch would silently get no gradient. Only a training forward without grad looks.
        if self.training and not torch.is_grad_enabled() and _inside_reentrant_checkpoint():
            self._reset_pass()
            raise BConvError(
                f"{what} runs inside torch.utils.checkpoint with use_reentrant=True (gradient checkpointing), "
                f"which computes it without autograd: the PTL ladder's gradients would be lost. Use "
                f"use_reentrant=False (timm: timm.layers.set_reentrant_ckpt(False)), which bconv supports exactly."
            )

    def end(self) -> None:
        """Close a forward of the network: raise if the image reached the ladder but a paired stage did not run."""
        if self._image is not None and not _in_backward():
            pending = self._next
            self._reset_pass()
            raise self._not_run(pending, "in this forward")

    def _not_run(self, i: int, when: str) -> BConvError:
        name, tap = self.stage_names[i], self.tap_names[i]
        where = f"`{name}`" if tap == name else f"`{name}` (read at its last block `{tap}`)"
        return BConvError(
            f"paired stage {where} did not run {when}, although the image reached the PTL ladder; the "
            f"output would be the backbone's alone, without the ladder. Likely causes: the network calls the "
            f"stage's children instead of the stage module (the module `{tap}` is bypassed), or gradient "
            f"checkpointing that runs the stage's blocks in a way bconv cannot follow (timm's "
            f"set_grad_checkpointing and torch.utils.checkpoint(use_reentrant=False) around blocks are "
            f"supported). Pair stages whose modules the forward calls (python -m bconv.inspect shows them), "
            f"or call the model as a whole: wrapped(x)."
        )

    def stage(self, i: int, out: torch.Tensor) -> torch.Tensor | None:
        """Run the ladder at stage ``i`` with its output ``out``; the replaced output at the last stage."""
        if _in_backward():
            return self._recompute(i, out)
        if self._image is None:
            return None  # the stage module was called on its own, outside a forward of the model
        if i != self._next:
            name, expected = self.stage_names[i], self._next
            self._reset_pass()
            if i < expected:
                raise BConvError(
                    f"stage `{name}` ran again in one forward: PTL needs each paired stage to run once per "
                    f"forward, in order. Choose other stages (python -m bconv.inspect shows them)."
                )
            raise self._not_run(expected, f"before stage `{name}` in this forward")
        self._refuse_reentrant_checkpoint(f"stage `{self.stage_names[i]}`")
        nhwc = self.layouts[i] == "NHWC"
        x = out.permute(0, 3, 1, 2) if nhwc else out
        last = i == len(self.fuses)
        with _own_saved_tensors():
            if self.zero_cells:  # the ablation: no cell runs (nor touches its state), the fusion sees zeros
                y = x.new_zeros((x.shape[0], self.final_fuse.in_channels - x.shape[1], *x.shape[-2:]))
            else:
                y = self.cells[i](self._image if i == 0 else self._z)
                if y.shape[-2:] != x.shape[-2:]:
                    # Stages made with unpadded convs (Inception) are a few pixels off the cells' ceil(H / 2).
                    y = F.adaptive_avg_pool2d(y, x.shape[-2:])
                y = y.to(x.dtype)
            if not last:
                if not self.zero_cells:
                    self._z = self.fuses[i](torch.cat([x, y], dim=1))
                self._next += 1
                return None
            self._reset_pass()
            result = self.final_fuse(x, y)
        if result.requires_grad and not torch.compiler.is_compiling():
            # A checkpoint whose region goes on past this stage recomputes this output in backward: it
            # replays the final fusion with this y, so the cells never run (nor touch their state) again.
            self._replay_y = y.detach()
            self._unreached += 1
            result.register_hook(self._reached)
        return self._output(result, nhwc)

    @staticmethod
    def _output(result: torch.Tensor, nhwc: bool) -> torch.Tensor:
        return result.permute(0, 2, 3, 1) if nhwc else result

    def _reached(self, grad: torch.Tensor) -> None:
        self._unreached = 0

    def _recompute(self, i: int, out: torch.Tensor) -> torch.Tensor | None:
        """A checkpoint recomputing stage ``i`` in backward: the same output, without running the cells."""
        if i < len(self.stage_names) - 1:
            return None  # the ladder's activations were kept in the forward: nothing to recompute
        y, last = self._replay_y, self.stage_names[i]
        if y is None or self._unreached > 1:
            raise BConvError(
                f"a gradient checkpoint that ends after the last paired stage `{last}` is recomputed in backward, "
                f"but {'no' if y is None else 'more than one'} training forward of the PTL model is waiting for "
                f"its backward, so bconv cannot tell which ladder output to replay. Call backward after each "
                f"training forward, or end the checkpointed region at `{last}`."
            )
        nhwc = self.layouts[i] == "NHWC"
        x = out.permute(0, 3, 1, 2) if nhwc else out
        if y.shape[0] != x.shape[0] or y.shape[-2:] != x.shape[-2:]:
            raise BConvError(
                f"the checkpoint recomputing stage `{last}` has a batch of shape {tuple(x.shape)}, but the last "
                f"forward's ladder output has shape {tuple(y.shape)}: call backward after each training forward."
            )
        with _own_saved_tensors():
            result = self.final_fuse(x, y)
        return self._output(result, nhwc)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # never pickle a forward's activations
        state.update(_image=None, _z=None, _next=0, _replay_y=None, _unreached=0)
        return state


def _in_backward() -> bool:
    """True inside the autograd engine: a gradient checkpoint recomputing a forward.

    A compiled forward is traced, not recomputed by these hooks: dynamo takes the plain path.
    """
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


_REENTRANT_FORWARD = torch.utils.checkpoint.CheckpointFunction.forward.__code__


def _inside_reentrant_checkpoint() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _REENTRANT_FORWARD:
            return True
        frame = frame.f_back
    return False


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


# The saved-tensor hooks of torch.utils.checkpoint (non-reentrant): its forward and its recompute.
_CHECKPOINT_HOOKS = ("_checkpoint_hook.", "_recomputation_hook.")


def _own_saved_tensors() -> contextlib.AbstractContextManager:
    """Keep the ladder's saved activations out of an enclosing gradient checkpoint.

    Inside ``torch.utils.checkpoint`` the checkpoint's hooks would drop them and recompute them in
    backward, which would run the cells (and read and write their state) a second time. The ladder is
    narrow (1/8 of the stages' widths), so keeping its activations costs little. Other saved-tensor
    hooks (``save_on_cpu``, a user's own) see the ladder's tensors as usual.
    """
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return contextlib.nullcontext()
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None or not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return contextlib.nullcontext()
    pack = hooks[0]
    if getattr(pack, "__module__", None) != "torch.utils.checkpoint" or not getattr(pack, "__qualname__", "").startswith(
        _CHECKPOINT_HOOKS
    ):
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


def _cell_chain(cell: type[StatefulCell], c_in: int, c_out: int, stride: int, kwargs: dict) -> nn.Sequential:
    """One cell for stride 1 or 2; a chain of stride-2 cells for 4, 8, ... (DESIGN.md §3)."""
    steps = max(int(math.log2(stride)), 0)
    if 2**steps != stride:
        raise BConvError(f"stage strides must be powers of two; got {stride}")
    if steps == 0:
        return nn.Sequential(cell(c_in, c_out, 1, **kwargs))
    return nn.Sequential(*[cell(c_in if k == 0 else c_out, c_out, 2, **kwargs) for k in range(steps)])


class _ImageTap(BConvHook):
    """Forward pre-hook on the network's first module: hands the image to the ladder."""

    def __init__(self, ladder: PTLLadder):
        self.ladder = ladder

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.ladder.begin(args[0])


class _StageTap(BConvHook):
    """Forward hook on a paired stage: runs the ladder, and replaces the last stage's output."""

    def __init__(self, ladder: PTLLadder, index: int):
        self.ladder = ladder
        self.index = index

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return self.ladder.stage(self.index, output)


class _EndTap(BConvHook):
    """Forward hook on the network itself (always called): a pass that left a paired stage out raises."""

    def __init__(self, ladder: PTLLadder):
        self.ladder = ladder

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if output is None and sys.exc_info()[1] is not None:
            self.ladder._reset_pass()  # the forward raised: its error is the one to see, the next pass starts clean
        else:
            self.ladder.end()


def _tap_modules(model: nn.Module, names: Sequence[str], end: int = -1) -> tuple[str, ...]:
    """For each module in ``names``, the innermost module that ends (``end=-1``: returns the output of) or
    begins (``end=0``: receives the input of) it: descend the last (first) child of plain Sequentials.

    timm's gradient checkpointing (``checkpoint_seq(..., flatten=True)``) and users' loops over a stage's
    blocks call the blocks, not the stage: a hook on the last block still sees the stage's output. A block
    that is also reachable elsewhere in the network (a shared module) is not descended into.
    """
    modules = dict(model.named_modules())
    path = {id(m): n for n, m in modules.items()}
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    taps = []
    for name in names:
        module = modules[name]
        while type(module).forward is nn.Sequential.forward and len(module) > 0:
            child = module[end]
            if counts[id(child)] > 1:
                break
            module = child
        taps.append(path[id(module)])
    return tuple(taps)


class PTLModel(nn.Module):
    """A network with a PTL ladder injected beside its stages. Returned by :func:`wrap_with_ptl`.

    The original network is ``self.model`` (its ``state_dict`` keys get the prefix ``model.``), the
    injected modules are ``self.ptl``. Attributes the wrapper does not have are looked up on the
    original network, so ``wrapped.fc``, ``wrapped.reset_classifier(10)`` or
    ``wrapped.forward_features(x)`` work as before (and run the ladder). Writes go to the original
    network too: ``wrapped.fc = nn.Linear(512, 5)`` replaces the network's classifier and
    ``wrapped.drop_rate = 0.5`` sets the network's, exactly as on the bare network. Only the wrapper's
    own attributes are written on the wrapper: ``model``, ``ptl``, ``stages``, ``config``, its methods,
    ``training`` and names that start with an underscore.

    After :func:`unwrap_ptl` the wrapper refuses to run: its network no longer feeds the ladder.

    ``state_dict()`` carries :attr:`config` (key ``_extra_state``): loading a checkpoint written with
    other options raises a :class:`~bconv.BConvError` naming each one, and :func:`bconv.load_ptl`
    rebuilds the wrapper from it. A checkpoint without that key (written before bconv recorded it)
    loads as before.

    Attributes:
        stages: the paired stages, in order.
        config: the options of :func:`wrap_with_ptl` that built this model (a :class:`PTLConfig`).
    """

    def __init__(
        self, model: nn.Module, ladder: PTLLadder, stages: Sequence[Stage], config: PTLConfig | None = None
    ):
        super().__init__()
        self.model = model
        self.ptl = ladder
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
        if self._owns(name):
            super().__setattr__(name, value)
        else:
            # The user addresses the network (``wrapped.fc = ...``): set on the wrapper, it would be a module
            # or value the network never reads.
            setattr(self._modules["model"], name, value)

    def __delattr__(self, name: str) -> None:
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
                "device), which keeps the module and its state: see the README's DDP section."
            )
        try:
            return self.model(*args, **kwargs)  # the network's own hook checks that every paired stage ran
        except BaseException:
            self.ptl._reset_pass()  # an interrupted forward (KeyboardInterrupt too) must not fail the next one
            raise

    def reset_state(self) -> None:
        """Forget the history of every cell: the next forward starts from zero state (call it every epoch)."""
        latent.reset_state(self)

    def detach_state(self) -> None:
        """Cut every cell's state from the autograd graph (after each optimizer step)."""
        latent.detach_state(self)

    def latent_state_dict(self) -> dict[str, dict[str, Any]]:
        """Every cell's state, keyed by the cell's module path; see :func:`bconv.latent_state_dict`."""
        return latent.latent_state_dict(self)

    def load_latent_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the cells' state from :meth:`latent_state_dict`; see :func:`bconv.load_latent_state_dict`."""
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
            if inspect.ismethod(value) and isinstance(modules.get("ptl"), PTLLadder):
                self._refuse_if_unwrapped()
                return _checked(value, modules["ptl"])  # forward_features(x) & co. skip the network's __call__
            return value


# Written on the wrapper itself; every other attribute a user writes goes to the network.
_WRAPPER_ATTRIBUTES = frozenset({"model", "ptl", "stages", "config", "training"})


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
        "fine-tuning (DESIGN.md §3). Nothing was loaded. Its backbone weights still load into the wrapped "
        "network: `wrapped.model.load_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)})` "
        f"with p = {backbone!r}, and the new ladder is then trained from its function-preserving start; to "
        "keep using the old ladder as it is, load the checkpoint with bconv 0.1."
    )


def _checked(method: Any, ladder: PTLLadder) -> Any:
    """``method`` of the original network, with the ladder's end-of-pass check after it."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            result = method(*args, **kwargs)
        except BaseException:
            ladder._reset_pass()
            raise
        ladder.end()
        return result

    return call


def wrap_with_ptl(
    model: nn.Module,
    stages: Sequence[int | str] | int | str | None = None,
    cell: Literal["v1", "v2"] = "v1",
    input_size: Sequence[int] | None = None,
    *,
    cell_width: float = 0.125,
    fuse_width: float = 0.125,
    state_mode: Literal["per_sample", "pooled"] = "per_sample",
    sync_state: bool = False,
    detach: bool = True,
    on_size_change: Literal["reset", "raise"] = "reset",
    final_init: Literal["identity", "paper"] = "identity",
    source: Literal["auto", "fx", "feature_info"] = "auto",
    leaf_modules: Iterable[type] = (),
) -> PTLModel:
    """Inject the PTL ladder (BConv-Cells and 1x1 fusions) beside the stages of ``model``.

    ``model`` itself gets forward hooks (``unwrap_ptl`` removes them); its weights are not touched.

    Args:
        model: a torchvision or timm network, or your own CNN.
        stages: the stages to pair: ``None`` (all), indices (negative allowed) or names, as
            ``python -m bconv.inspect`` prints them. Order does not matter; duplicates are refused.
        cell: ``"v1"`` (paper Eq. 1) or ``"v2"`` (paper Fig. 1 right).
        input_size: ``(C, H, W)`` used to find the stages (default: the model's own, or 3x224x224).
        cell_width: cell output channels as a fraction of the paired stage's channels (at least 8).
            At the default 1/8: ResNet-50 25.6M -> 27.8M parameters, DenseNet-161 28.7M -> 33.7M; with
            ``final_init="paper"`` 32.0M and 38.6M (paper: 28M -> 35M, 32M -> 42M).
        fuse_width: channels of each intermediate fusion ``z_i``, as a fraction of stage ``i``'s channels.
        state_mode: ``"per_sample"`` (the paper's: one state slot per batch position) or ``"pooled"``
            (the batch mean, independent of batch size; see :class:`bconv.cells.StatefulCell`).
        sync_state: with ``state_mode="pooled"`` under DistributedDataParallel, average the pooled state
            across ranks after every training forward, so it summarises the whole dataset.
        detach: store the cells' state detached after each forward (default). With ``False`` the graph is
            kept across batches until ``detach_state()`` (k-step truncated back-propagation).
        on_size_change: what a cell does when the input resolution changes in training: ``"reset"``
            (forget its state with a warning) or ``"raise"``.
        final_init: ``"identity"`` (default): ``out = x_n + proj(y_n)`` with the last cell silenced (its
            candidate weights start at zero), so the wrapped model computes exactly what the original did
            and the ladder gets gradients from the first step; ``"paper"``: the released code's randomly
            initialised, normalised ``Fuse(cat(x_n, y_n))`` replaces ``x_n``.
        source: how to find stages (see :func:`bconv.find_stages`).
        leaf_modules: module classes fx should not trace through.

    Returns:
        A :class:`PTLModel`: call it as the original, plus ``reset_state()`` and ``detach_state()``;
        ``config`` records these options (and ``state_dict()`` carries them, see :func:`bconv.load_ptl`).

    Raises:
        bconv.errors.StageSelectionError: unknown, duplicate or empty ``stages`` (a ``ValueError``).
        bconv.errors.WrappedModelError: an already wrapped model.
        bconv.errors.InputSizeError: a malformed ``input_size``, or one the model rejects.
        bconv.errors.LeafModuleError: ``leaf_modules`` holds something other than module classes.
        ValueError: bad options.
        bconv.BConvError: a model wrapped in (Distributed)DataParallel, or the errors of :func:`bconv.find_stages`.

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
    if cell not in CELLS:
        raise ValueError(f"cell={cell!r} is not one of {', '.join(map(repr, CELLS))}")
    if final_init not in _FINAL_INITS:
        raise ValueError(f"final_init={final_init!r} is not one of {', '.join(map(repr, _FINAL_INITS))}")
    for name, value in (("cell_width", cell_width), ("fuse_width", fuse_width)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 4:
            raise ValueError(f"{name} must be a fraction of the stage's channels in (0, 4]; got {value!r}")
    if sync_state and state_mode != "pooled":
        raise ValueError("sync_state=True averages the pooled state across ranks: it needs state_mode='pooled'")
    leaf_modules = check_leaf_modules(leaf_modules)  # read twice: by discovery and by the config

    body = anatomy(model, input_size, source, leaf_modules=leaf_modules)
    input_size = body.input_size  # checked: three positive ints
    chosen = select_stages(body.stages, stages, model)
    cell_kwargs = dict(state_mode=state_mode, detach=detach, on_size_change=on_size_change)
    if sync_state:
        cell_kwargs["sync_state"] = True
    ladder = PTLLadder(chosen, input_size[0], CELLS[cell], cell_width, fuse_width, final_init, cell_kwargs)
    param = next(model.parameters(), None)
    if param is not None:
        ladder.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)

    modules = dict(model.named_modules())
    first = modules[_tap_modules(model, [body.stem[0]], end=0)[0]]
    first.register_forward_pre_hook(_ImageTap(ladder))
    ladder.tap_names = _tap_modules(model, [s.name for s in chosen])
    for i, tap in enumerate(ladder.tap_names):
        modules[tap].register_forward_hook(_StageTap(ladder, i))
    model.register_forward_hook(_EndTap(ladder), always_call=True)
    config = PTLConfig(
        stages=tuple(s.name for s in chosen), cell=cell, input_size=tuple(int(n) for n in input_size),
        cell_width=float(cell_width), fuse_width=float(fuse_width), state_mode=state_mode, sync_state=sync_state,
        detach=detach, on_size_change=on_size_change, final_init=final_init, source=source,
        leaf_modules=tuple(PTLConfig.class_name(c) for c in leaf_modules),
    )
    wrapped = PTLModel(model, ladder, chosen, config)
    _check_wiring(wrapped, input_size)
    return wrapped


def _check_wiring(wrapped: PTLModel, input_size: Sequence[int]) -> None:
    """One eval forward: the image reaches the first cell and the ladder reaches its last stage
    (the network's own end-of-pass check raises otherwise).

    The forward runs on meta tensors (no real compute; see ``_trace.on_meta``), and for real only where
    meta tensors cannot run the model. On failure the hooks are removed again, so the user's model is
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
    network = model.model
    for m in network.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, BConvHook)]:
                del hooks[key]
                m._forward_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)
                m._forward_pre_hooks_with_kwargs.pop(key, None)
    return network
