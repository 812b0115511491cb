"""Feeding the ladder from a network's forward: hooks that collect the stage outputs and write the result back.

:class:`LadderAdapter` is the plumbing around :class:`~bconv.ptl.ladder.PTLLadder`: a forward pre-hook on
the network's first module hands it the image, a forward hook on each paired stage runs the ladder's rung
for that stage (the rungs run as the stages do, so no stage output is held longer than the backbone holds
it), and a hook on the network itself closes the pass. It keeps the :class:`~torch.utils.hooks.RemovableHandle`
of each hook. Each stage's output is read at the innermost module that returns it (the last block of a
Sequential stage), so a network that calls the blocks directly, as timm's gradient checkpointing does,
still feeds the ladder; each goes through its stage's :class:`~bconv.ptl.layouts.Layout`.

The checks that run every forward live here: once the image has reached the ladder, every paired stage
must run, once, in order, or the forward raises (never a backbone-only output); each stage output must
still have the shape measured when the network was wrapped. So does gradient checkpointing: under
``torch.utils.checkpoint`` (non-reentrant) the ladder's own activations are kept, not recomputed (the
cells run once per forward, so their state is read and written once), and the recompute in backward
replays only the final fusion, with the cell output of the first pass (:mod:`.checkpointing`).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import BConvError
from ..surgery import BConvHook
from .checkpointing import in_backward, inside_reentrant_checkpoint, own_saved_tensors
from .ladder import PTLLadder
from .layouts import Layout

__all__ = ["LadderAdapter", "tap_modules"]


class LadderAdapter:
    """The per-forward state machine that runs a :class:`PTLLadder` beside a network, through hooks.

    Args:
        ladder: the ladder to run.
        layouts: one :class:`Layout` per paired stage, in network order.
        tap_names: where each stage's output is read (module paths of the network, named in errors).

    Attributes:
        handles: the hooks' :class:`~torch.utils.hooks.RemovableHandle` objects (:meth:`remove` removes them).
    """

    def __init__(self, ladder: PTLLadder, layouts: Sequence[Layout], tap_names: Sequence[str]) -> None:
        self.ladder = ladder
        self.layouts = tuple(layouts)
        self.stage_names = tuple(layout.stage for layout in layouts)
        self.tap_names = tuple(tap_names)
        self.handles: list[RemovableHandle] = []
        self.reset()
        self._replay_y: Tensor | None = None
        self._replay_size: tuple[int, int] = (0, 0)
        self._unreached = 0

    # -- hooks -----------------------------------------------------------------------------------

    def attach(self, network: nn.Module, first: str) -> None:
        """Register the hooks: the image at module ``first``'s input, each stage at its tap, the end on ``network``."""
        modules = dict(network.named_modules())
        self.handles.append(modules[first].register_forward_pre_hook(_ImageTap(self)))
        for i, tap in enumerate(self.tap_names):
            self.handles.append(modules[tap].register_forward_hook(_StageTap(self, i)))
        self.handles.append(network.register_forward_hook(_EndTap(self), always_call=True))

    def remove(self) -> None:
        """Remove every hook this adapter registered."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # -- one forward pass ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the pass in progress (plain attributes, cleared at the last stage: no activation outlives it)."""
        self._image: Tensor | None = None
        self._z: Tensor | None = None
        self._next = 0

    def begin(self, image: Tensor) -> None:
        """The image reached the network's first module: a pass begins."""
        if in_backward():
            return  # a checkpoint recomputing the stem in backward: the forward already ran
        if self._image is not None:
            # A forward that bypassed both PTLModel and the network's __call__ (wrapped.model.forward_features)
            # left a pass open: the check at the end of the pass could not run, so it runs here, once.
            pending = self._next
            self.reset()
            raise self._not_run(pending, "in the previous forward of the model (found when the next one began)")
        self._refuse_reentrant_checkpoint("the network's first module")
        self._image = image

    def end(self) -> None:
        """Close a forward of the network: raise if the image reached the ladder but a paired stage did not run."""
        if self._image is not None and not in_backward():
            pending = self._next
            self.reset()
            raise self._not_run(pending, "in this forward")

    def stage(self, i: int, out: Tensor) -> Tensor | None:
        """Run the ladder's rung at stage ``i`` with the stage's output ``out``; the replaced output at the last."""
        if in_backward():
            return self._recompute(i, out)
        if self._image is None:
            return None  # the stage module was called on its own, outside a forward of the model
        self._check_order(i)
        self._refuse_reentrant_checkpoint(f"stage `{self.stage_names[i]}`")
        layout = self.layouts[i]
        image_size = tuple(self._image.shape[-2:])
        x = layout.to_map(out, image_size)
        layout.check(x, image_size)
        if i < len(self.layouts) - 1:
            with own_saved_tensors():
                self._z = self.ladder.rung(i, self._image if i == 0 else self._z, x)
            self._next += 1
            return None
        z = self._image if i == 0 else self._z
        self.reset()
        with own_saved_tensors():
            y = self.ladder.cell_output(i, z, x)
            result = self.ladder.fuse(i, x, y)
        if result.requires_grad and not torch.compiler.is_compiling():
            # A checkpoint whose region goes on past this stage recomputes this output in backward: it
            # replays the final fusion with this y, so the cells never run (nor touch their state) again.
            self._replay_y, self._replay_size = y.detach(), image_size
            self._unreached += 1
            result.register_hook(self._reached)
        return layout.from_map(result, out)

    def _check_order(self, i: int) -> None:
        if i == self._next:
            return
        name, expected = self.stage_names[i], self._next
        self.reset()
        if i < expected:
            raise BConvError(
                f"stage `{name}` ran again in one forward: PTL needs each paired stage to run once per "
                f"forward, in order. Choose other stages (python -m bconv.inspect shows them)."
            )
        raise self._not_run(expected, f"before stage `{name}` in this forward")

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

    def _refuse_reentrant_checkpoint(self, what: str) -> None:
        # A reentrant checkpoint runs its region under no_grad and only its outputs join the graph: the
        # ladder's side branch would silently get no gradient. Only a training forward without grad looks.
        if self.ladder.training and not torch.is_grad_enabled() and inside_reentrant_checkpoint():
            self.reset()
            raise BConvError(
                f"{what} runs inside torch.utils.checkpoint with use_reentrant=True (gradient checkpointing), "
                f"which computes it without autograd: the PTL ladder's gradients would be lost. Use "
                f"use_reentrant=False (timm: timm.layers.set_reentrant_ckpt(False)), which bconv supports exactly."
            )

    # -- gradient checkpointing's recompute in backward ------------------------------------------

    def _reached(self, grad: Tensor) -> None:
        self._unreached = 0

    def _recompute(self, i: int, out: Tensor) -> Tensor | None:
        """A checkpoint recomputing stage ``i`` in backward: the same output, without running the cells."""
        if i < len(self.layouts) - 1:
            return None  # the ladder's activations were kept in the forward: nothing to recompute
        y, last = self._replay_y, self.stage_names[i]
        if y is None or self._unreached > 1:
            raise BConvError(
                f"a gradient checkpoint that ends after the last paired stage `{last}` is recomputed in backward, "
                f"but {'no' if y is None else 'more than one'} training forward of the PTL model is waiting for "
                f"its backward, so bconv cannot tell which ladder output to replay. Call backward after each "
                f"training forward, or end the checkpointed region at `{last}`."
            )
        layout = self.layouts[i]
        x = layout.to_map(out, self._replay_size)
        if y.shape[0] != x.shape[0] or y.shape[-2:] != x.shape[-2:]:
            raise BConvError(
                f"the checkpoint recomputing stage `{last}` has a batch of shape {tuple(x.shape)}, but the last "
                f"forward's ladder output has shape {tuple(y.shape)}: call backward after each training forward."
            )
        with own_saved_tensors():
            return layout.from_map(self.ladder.fuse(i, x, y), out)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_image=None, _z=None, _next=0, _replay_y=None, _unreached=0)  # never a forward's activations
        return state


class _ImageTap(BConvHook):
    """Forward pre-hook on the network's first module: hands the image to the adapter."""

    def __init__(self, adapter: LadderAdapter):
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.adapter.begin(args[0])


class _StageTap(BConvHook):
    """Forward hook on a paired stage: runs its rung, and replaces the last stage's output."""

    def __init__(self, adapter: LadderAdapter, index: int):
        self.adapter = adapter
        self.index = index

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        return self.adapter.stage(self.index, output)


class _EndTap(BConvHook):
    """Forward hook on the network itself (always called): a pass that left a paired stage out raises."""

    def __init__(self, adapter: LadderAdapter):
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if output is None and sys.exc_info()[1] is not None:
            self.adapter.reset()  # the forward raised: its error is the one to see, the next pass starts clean
        else:
            self.adapter.end()


def tap_modules(model: nn.Module, names: Sequence[str], end: int = -1) -> tuple[str, ...]:
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
