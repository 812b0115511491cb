"""State machinery shared by the cells that carry a latent state across mini-batches.

The state contract (docs/design.md §4) lives here, once; the cells themselves hold only
their equations. A state is a plain tensor attribute of the module: not a Parameter,
not a buffer, never in ``state_dict()``. It is registered by name in one place
(:meth:`StatefulCell._register_state`), moved with the module by overriding
:meth:`~torch.nn.Module._apply` (as SpikingJelly's ``MemoryModule`` does), forgotten by
:meth:`StatefulCell.reset_state` and cut from the autograd graph by
:meth:`StatefulCell.detach_state`, saved and restored for a checkpoint by
:meth:`StatefulCell.latent_state` and :meth:`StatefulCell.load_latent_state`. Model-level helpers
(``bconv.state``) walk ``model.modules()`` and call these methods on every :class:`StatefulCell`;
there is no global registry.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bconv._options import build, check_fields
from bconv.errors import BConvError, ConfigError, StateGraphError

__all__ = ["StatefulCell", "StateOptions", "StateMode", "SizeChangePolicy"]

StateMode = Literal["per_sample", "pooled"]
SizeChangePolicy = Literal["reset", "raise"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateOptions:
    """How a cell keeps its state across mini-batches: the one declaration of these options.

    :class:`StatefulCell` takes them as keyword arguments and :class:`bconv.PTLConfig` inherits them,
    so each has one name, one type and one default (docs/design.md §4).

    Attributes:
        state_mode: ``"per_sample"`` (one state slot per batch position, as in the paper) or ``"pooled"``
            (one state, the batch mean; independent of the batch size).
        detach: store the new state detached from the autograd graph (truncated back-propagation of length
            one, as in the paper's code). ``False`` keeps the graph until ``detach_state()``.
        on_size_change: what a training forward does when the stored state's spatial size differs from the
            current one: ``"reset"`` (warn and start from zeros) or ``"raise"``.
        sync_state: with ``state_mode="pooled"``, average the pooled state across DistributedDataParallel ranks.
        recompute: in training, keep for backward only the cell's input, weights and previous state, and
            compute its gates again in backward (non-reentrant ``torch.utils.checkpoint`` over a pure function
            of those; the state is read before and written after, so the recompute never touches it). Same
            values and gradients as ``False``, which keeps the gate activations instead: less memory for a
            little more compute (docs/memory.md). Not compared when a checkpoint is loaded.

    Raises:
        bconv.errors.ConfigError: a value outside its choices, or ``sync_state`` without the pooled mode.
    """

    state_mode: StateMode = "per_sample"
    detach: bool = True
    on_size_change: SizeChangePolicy = "reset"
    sync_state: bool = False
    recompute: bool = dataclasses.field(default=True, compare=False)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.sync_state and self.state_mode != "pooled":
            raise ConfigError("sync_state=True averages the pooled state across ranks: it needs state_mode='pooled'")

    def state_options(self) -> StateOptions:
        """Only these options (of a record that extends them, such as :class:`bconv.PTLConfig`)."""
        return StateOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(StateOptions)})


def _usable_in_training(value: Tensor) -> Tensor:
    """``value``, or a normal copy of it if it is an inference tensor (made under ``torch.inference_mode()``):
    autograd cannot save an inference tensor, so the next training step would fail inside torch. A compiled
    forward is traced, and dynamo does not trace ``is_inference``: it keeps the plain path."""
    if torch.compiler.is_compiling() or not value.is_inference():
        return value
    with torch.inference_mode(False):
        return value.clone()


def _graph_freed(t: Tensor, nodes: int = 8) -> bool:
    """Whether ``backward()`` (without ``retain_graph``) has freed the graph behind ``t``: the saved tensors of
    the first autograd nodes reachable from ``t.grad_fn`` can no longer be read (torch raises on access)."""
    todo, seen = [t.grad_fn], 0
    while todo and seen < nodes:
        node = todo.pop(0)
        if node is None:
            continue
        seen += 1
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    value = getattr(node, name)
                except RuntimeError:
                    return True
                if isinstance(value, Tensor):
                    return False  # a readable saved tensor: the graph is alive
        todo.extend(f for f, _ in node.next_functions)
    return False


class StatefulCell(nn.Module):
    """Base class of modules that carry a state from one mini-batch to the next.

    Subclasses register their state names in ``__init__`` with
    :meth:`_register_state`, read the previous state with :meth:`_read_state` and store
    the new one with :meth:`_write_state`. Everything the state contract decides is
    decided here:

    * **No state means zeros.** After construction or :meth:`reset_state` the state
      reads as zeros.
    * **Training mode** reads the stored state and stores the new one, detached
      unless ``detach=False`` (then :meth:`detach_state` truncates explicitly, for
      k-step truncated back-propagation through time).
    * **Eval mode** reads zeros and stores nothing, so an eval forward between two
      training batches changes nothing and a sample's eval output depends on that
      sample alone.
    * **Batch slots** (``state_mode="per_sample"``, the paper's): sample ``k`` of a
      batch uses and updates slot ``k``. A batch of ``B`` uses the first ``B`` slots;
      the other slots keep their state; a batch larger than the state starts its new
      slots from zero.
    * **Pooled state** (``state_mode="pooled"``, beyond the paper): the stored state is
      the batch mean, shape ``[1, ...]``, broadcast to every sample of the next batch.
      It does not depend on the batch size or on a sample's position in its batch.
      Prefer it when batch sizes vary, when the order of samples carries no meaning
      (shuffled data: slot ``k`` of one batch has no relation to slot ``k`` of the
      next), and under DistributedDataParallel, where :meth:`_pool` is the one place
      that would average the state across ranks.
    * **Spatial size change** (another input resolution): ``on_size_change="reset"``
      forgets this cell's state with a :class:`UserWarning`; ``"raise"`` raises a
      :class:`ValueError`. Call :meth:`reset_state` when you change resolution to
      avoid both.
    * **Dtype**: the previous state is cast to the dtype the current forward computes
      in (the ``like`` tensor of :meth:`_read_state`, or the cell's gates), and the new state is stored in
      the dtype it was computed in. A state stored under ``torch.autocast`` (bf16) is
      therefore read in float32 by a later full-precision batch, and the other way
      round, without error.

    Args:
        **options: the :class:`StateOptions` (``state_mode``, ``detach``, ``on_size_change``,
            ``sync_state``, ``recompute``), declared there once with their defaults.
    """

    #: Warn when a new input resolution resets the state. A ladder sets it ``False`` on every cell but its
    #: first, so that one resolution change gives one warning, not one per cell.
    report_size_change: bool = True

    def __init__(self, **options: Any) -> None:
        super().__init__()
        opts = build(StateOptions, options, type(self).__name__)
        self.state_mode = opts.state_mode
        self.detach = opts.detach
        self.on_size_change = opts.on_size_change
        self.sync_state = opts.sync_state
        self.recompute = opts.recompute
        self._state_names: tuple[str, ...] = ()

    # -- registration, reset, detach, device and dtype moves -------------------------

    def _register_state(self, name: str) -> None:
        """Declare a state attribute ``name``; it starts empty (reads as zeros)."""
        if hasattr(self, name):
            raise ValueError(f"attribute {name!r} already exists on {type(self).__name__}")
        self._state_names = self._state_names + (name,)
        setattr(self, name, None)

    def reset_state(self) -> None:
        """Forget all history: the next forward starts from zero state."""
        for name in self._state_names:
            setattr(self, name, None)

    def detach_state(self) -> None:
        """Cut the stored state from the autograd graph, keeping its values."""
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.detach())

    # -- saving and restoring the state (checkpoints that resume mid-epoch) ----------

    def latent_state(self) -> dict[str, Any]:
        """This cell's state, for a checkpoint: ``{"state_mode": mode, name: tensor or None, ...}``.

        The tensors are the stored ones, detached (a graph cannot be saved), with their dtype and
        device; ``None`` for a state with no history. Only plain values and tensors, so that
        ``torch.load(..., weights_only=True)`` reads it back.
        """
        state: dict[str, Any] = {"state_mode": self.state_mode}
        for name in self._state_names:
            value = getattr(self, name)
            state[name] = None if value is None else value.detach()
        return state

    def latent_state_problems(self, state: Any) -> list[str]:
        """What prevents :meth:`load_latent_state` from restoring ``state`` here (empty: nothing)."""
        if not isinstance(state, Mapping):
            return [f"expected a dict from latent_state(), got {type(state).__name__}"]
        problems = []
        mode = state.get("state_mode")
        if mode != self.state_mode:
            problems.append(f"saved from a cell with state_mode={mode!r}, this cell has state_mode={self.state_mode!r}")
        missing = [n for n in self._state_names if n not in state]
        extra = [n for n in state if n != "state_mode" and n not in self._state_names]
        if missing or extra:
            problems.append(
                f"this {type(self).__name__} keeps {list(self._state_names)}; the saved state "
                + "; ".join(filter(None, [missing and f"lacks {missing}", extra and f"has unknown {extra}"]))
            )
        channels = self._state_channels()
        shapes = set()
        for name in self._state_names:
            value = state.get(name)
            if value is None:
                continue
            if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 4:
                what = (
                    f"{value.dtype} tensor of shape {tuple(value.shape)}"
                    if isinstance(value, Tensor)
                    else type(value).__name__
                )
                problems.append(f"{name} must be a floating-point tensor [batch, channels, H, W]; got a {what}")
                continue
            shapes.add(tuple(value.shape))
            if channels is not None and value.shape[1] != channels:
                problems.append(f"{name} has {value.shape[1]} channels, this cell's state has {channels}")
            if self.state_mode == "pooled" and value.shape[0] != 1:
                problems.append(f"{name} has {value.shape[0]} batch slots; a pooled state has exactly one")
        if len(shapes) > 1:
            problems.append(f"the saved states have different shapes {sorted(shapes)}; they are saved together")
        return problems

    def load_latent_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state returned by :meth:`latent_state` (copied, on this cell's device, dtype kept).

        Raises:
            bconv.BConvError: the state does not fit this cell (its names, state mode or channels);
                the cell's state is left as it was.
        """
        problems = self.latent_state_problems(state)
        if problems:
            raise BConvError(f"cannot restore the latent state of this {type(self).__name__}: " + "; ".join(problems))
        param = next(self.parameters(), None)
        for name in self._state_names:
            value = state[name]
            if value is not None:
                with torch.inference_mode(False):  # restored under inference_mode, it must still train
                    value = value.detach().to(device=param.device if param is not None else value.device, copy=True)
            setattr(self, name, value)

    def _state_channels(self) -> int | None:
        """Channels of the state, checked when a state is restored (``None``: not checked)."""
        return None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> StatefulCell:
        # .to(), .cuda(), .double(), .half() all come through here: move the state too.
        super()._apply(fn, recurse)
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        return self

    def __getstate__(self) -> dict[str, Any]:
        # A state kept with its graph (detach=False) cannot be deep-copied or pickled;
        # its values can.
        state = super().__getstate__()
        for name in state.get("_state_names", ()):
            if state.get(name) is not None:
                state[name] = state[name].detach()
        return state

    # -- reading and writing, used by the subclasses' forward -------------------------

    def _read_state(self, name: str, shape: Sequence[int], like: Tensor, *, cast: bool = True) -> Tensor:
        """The previous state ``name`` for a batch whose state has ``shape``.

        Returns a tensor of exactly ``shape`` ``[B, C, H, W]`` in ``like``'s dtype and
        device: zeros in eval mode or without history, else the stored state (its
        first ``B`` slots, zero-padded if the state has fewer; or the pooled state
        broadcast to ``B``). With ``cast=False`` a stored state keeps its own dtype: the
        cell casts it where it computes (the dtype of its gates is known only there).
        """
        shape = torch.Size(shape)
        stored = getattr(self, name)
        if stored is not None and self.training and stored.shape[-2:] != shape[-2:]:
            self._size_changed(tuple(stored.shape[-2:]), tuple(shape[-2:]))
            stored = None
        if stored is None or not self.training:
            return like.new_zeros(shape)
        if not self.detach and stored.grad_fn is not None and torch.is_grad_enabled() and _graph_freed(stored):
            raise StateGraphError(
                f"{type(self).__name__}: with detach=False the state kept from the previous batch still points "
                "into that batch's autograd graph, which backward() has already freed, so this batch's backward "
                "would fail with torch's 'Trying to backward through the graph a second time'. Call "
                "model.detach_state() after every optimizer step (every k batches for k-step truncated "
                "back-propagation), or backward(retain_graph=True) if you mean to back-propagate through it again."
            )
        stored = stored.to(dtype=like.dtype if cast else stored.dtype, device=like.device)
        if self.state_mode == "pooled":
            return stored.expand(shape)
        batch, slots = shape[0], stored.shape[0]
        if batch <= slots:
            return stored[:batch]
        return torch.cat([stored, stored.new_zeros((batch - slots, *shape[1:]))])

    def _write_state(self, name: str, value: Tensor) -> None:
        """Store ``value`` (shape ``[B, C, H, W]``) as the new state ``name``.

        Does nothing in eval mode. Per-sample: slots ``B`` and beyond keep their
        stored state. Pooled: the batch is reduced by :meth:`_pool`. An empty batch
        (``B == 0``) says nothing about the data and leaves the state as it was (its
        mean would be NaN, and every later output with it). A state computed under
        ``torch.inference_mode()`` is stored as a normal tensor, as under ``no_grad``, so
        the next training step can use it.
        """
        if not self.training:
            return
        synced = self.state_mode == "pooled" and self.sync_state and dist.is_available() and dist.is_initialized()
        if value.shape[0] == 0 and not synced:  # a synced rank still joins the other ranks' all_reduce
            return
        if self.detach:
            value = value.detach()
        if self.state_mode == "pooled":
            pooled = self._pool(value)
            if pooled is None:
                return
            value = pooled
        else:
            stored = getattr(self, name)
            if stored is not None and stored.shape[0] > value.shape[0]:
                value = torch.cat([value, stored[value.shape[0] :].to(value.dtype)])
        setattr(self, name, _usable_in_training(value))

    def _pool(self, value: Tensor) -> Tensor | None:
        """Reduce a batch of states ``[B, ...]`` to the pooled state ``[1, ...]``; None when no rank had a sample.

        The single place where the pooled state is formed. With ``sync_state=True``
        under an initialised ``torch.distributed`` process group, the mean is taken
        over the samples of every rank (one ``all_reduce`` of the sums and the sample
        counts), so each rank stores the same state: a summary of the whole dataset
        rather than of its shard. Every rank must run the same number of training
        forwards, as DistributedDataParallel already requires.
        """
        if not (self.sync_state and dist.is_available() and dist.is_initialized()):
            return value.mean(dim=0, keepdim=True) if value.shape[0] else None
        total = value.detach().sum(dim=0, keepdim=True).float()
        flat = torch.cat([total.flatten(), total.new_tensor([value.shape[0]])])
        dist.all_reduce(flat)
        if flat[-1] == 0:
            return None  # every rank's batch was empty
        return (flat[:-1] / flat[-1]).view_as(total).to(value.dtype)

    def _size_changed(self, old: tuple[int, ...], new: tuple[int, ...]) -> None:
        old_s, new_s = "x".join(map(str, old)), "x".join(map(str, new))
        what = (
            f"{type(self).__name__}: the spatial size of its state changed from {old_s} "
            f"to {new_s} (a new input resolution), so the stored state no longer fits. "
        )
        avoid = "Call reset_state() on the model when you change the input resolution."
        if self.on_size_change == "raise":
            raise ValueError(
                what + avoid + " (on_size_change='raise'; on_size_change='reset' would "
                "forget the state with a warning instead.)"
            )
        if self.report_size_change:
            warnings.warn(
                what + "The state was reset to zeros (on_size_change='reset'), as is every other cell's of "
                "the same ladder whose state no longer fits. " + avoid
                + " Pass on_size_change='raise' to make this an error.",
                UserWarning,
                stacklevel=2,
            )
        self.reset_state()
