"""PTL inside Lightning's ``Trainer``: :class:`PTLCallback`.

Lightning owns the epoch loop, the optimizer step and the checkpoint, so the three extra lines of a
plain loop (``reset_state()`` every epoch, ``detach_state()`` after every optimizer step, the latent
state beside the weights) have no place in user code there. :class:`PTLCallback` is where they live:
``Trainer(callbacks=[PTLCallback()])`` and nothing else.

Needs the ``lightning`` package (``pip install "bconv[lightning]"``); ``import bconv`` never imports it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as error:
    raise ImportError(
        "bconv.integrations.lightning needs Lightning 2.5 or newer (the `lightning` package): "
        'pip install "bconv[lightning]". The standalone `pytorch_lightning` package is not supported: '
        "its Trainer takes only its own Callback class."
    ) from error

from ..ptl import state as cell_state
from ..cells import StatefulCell
from ..errors import BConvError
from ..ptl import LadderUsage, PTLModel, ladder_usage

__all__ = ["PTLCallback"]

Inputs = Callable[[Any], "torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]"]


class PTLCallback(pl.Callback):
    """Resets, detaches, checkpoints and watches every PTL model inside a ``LightningModule``.

    - **Every training epoch starts from zero state** (``reset_state()``, as the paper does).
    - **After every optimizer step** the state is detached (``detach_state()``). With
      ``accumulate_grad_batches=k`` that is after the k-th batch, not after each: a model wrapped
      with ``detach=False`` then keeps the state's graph across the accumulation window, which is
      k-step truncated back-propagation (the same gradients as the plain loop that sums k losses
      and calls backward once). Lightning calls backward once per batch, so the graph of the window's
      earlier batches must survive their backward: override ``backward`` in the ``LightningModule``
      with ``loss.backward(retain_graph=True)``. Without that override this combination is refused
      at fit start (torch would fail at the second batch of each window). With ``detach=True`` (the
      default) each batch stores its state detached already and the step's timing changes nothing.
    - **Checkpoints hold the latent state** of every cell, under the key ``"bconv"`` of Lightning's
      checkpoint, and ``trainer.fit(ckpt_path=...)`` restores it: a run resumed mid-epoch continues
      the interrupted epoch with the state it had (the epoch's reset is skipped); one resumed from an
      end-of-epoch checkpoint starts the next epoch from zero state.
    - **The ladder diagnostic** (:func:`bconv.ladder_usage` on the current batch) is sent to the
      Trainer's loggers every ``log_every_n_steps`` optimizer steps, as ``bconv/<name>`` (with the PTL
      model's module path in the name when the module holds several).

    PTL models are found anywhere inside the ``LightningModule`` (``self.net``, a student's backbone,
    a list of heads), and any other module holding BConv-Cells is reset, detached and checkpointed
    too. Under DistributedDataParallel the checkpoint that rank 0 writes holds every rank's latent
    state, and each rank resumes with its own (a run resumed on another number of ranks takes rank
    0's, with a warning).

    Args:
        log_every_n_steps: optimizer steps between two diagnostics; ``None`` turns it off, and so does a
            Trainer without a logger. The diagnostic runs a few extra forwards (and a backward, given a
            target) on one batch.
        inputs: maps a training batch to the PTL model's input, or to ``(input, target)``. The
            default takes a tensor batch as the input, and a tuple or list batch as
            ``(input, target)`` (``target`` ``None`` when the second item is not a tensor).
        loss_fn: the loss for the diagnostic's gradient norms, as :func:`bconv.ladder_usage` takes it.

    Attributes:
        models: the PTL models found at fit start, by module path inside the ``LightningModule``.
        last_usage: the latest diagnostic of each PTL model, by module path.

    Example::

        >>> trainer = lightning.Trainer(max_epochs=10, callbacks=[PTLCallback(log_every_n_steps=50)])
        >>> trainer.fit(module, loader, ckpt_path="last")
    """

    CHECKPOINT_KEY = "bconv"

    def __init__(
        self, log_every_n_steps: int | None = 100, inputs: Inputs | None = None, loss_fn: Callable | None = None
    ) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be a positive int or None; got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        self.inputs = inputs
        self.loss_fn = loss_fn
        self.models: dict[str, PTLModel] = {}
        self.last_usage: dict[str, LadderUsage] = {}
        self._epoch_position: tuple[int, int] | None = None  # (epoch, batches trained in it) of the latest epoch
        self._restored_epoch: int | None = None  # set by a mid-epoch checkpoint until its epoch goes on
        self._step_before: int | None = None

    # -- finding the models and refusing what cannot work ----------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in setup(): a LightningModule may build its network in configure_model(), after setup.
        cells = [m for m in pl_module.modules() if isinstance(m, StatefulCell)]
        if not cells:
            raise BConvError(
                f"PTLCallback: {type(pl_module).__name__} holds no PTL model (no BConv-Cell in any of its "
                f"modules). Wrap the network inside it with bconv.wrap_with_ptl, or remove the callback."
            )
        self.models = {name: m for name, m in pl_module.named_modules() if isinstance(m, PTLModel)}
        keeps_graph = sorted(
            {name for name, m in pl_module.named_modules() if isinstance(m, StatefulCell) and not m.detach}
        )
        if keeps_graph and trainer.accumulate_grad_batches > 1 and not is_overridden("backward", pl_module):
            raise BConvError(
                f"PTLCallback: the cells {keeps_graph[:4]}{' ...' if len(keeps_graph) > 4 else ''} keep their "
                f"state's graph across batches (wrapped with detach=False) and the Trainer accumulates gradients "
                f"over {trainer.accumulate_grad_batches} batches with one backward per batch: the second batch's "
                f"backward would run through the first batch's graph, which the first backward has freed. "
                f"For truncated back-propagation through each accumulation window, override `backward` in "
                f"{type(pl_module).__name__} with `loss.backward(retain_graph=True)` (the callback detaches the "
                f"state after each optimizer step, so a graph spans one window); or wrap with detach=True."
            )

    # -- reset every epoch, detach after every optimizer step ------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored_epoch == trainer.current_epoch:
            return  # resumed mid-epoch (Lightning before 2.5 calls this hook again): keep the restored state
        self._restored_epoch = None
        cell_state.reset_state(pl_module)
        self._epoch_position = (trainer.current_epoch, 0)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._restored_epoch is not None:
            if self._restored_epoch != trainer.current_epoch:
                # Lightning went on with another epoch than the checkpoint's: its history does not belong here.
                cell_state.reset_state(pl_module)
                self._epoch_position = (trainer.current_epoch, batch_idx)
            self._restored_epoch = None
        if self._step_before is None and self._logs(trainer):
            self._unpack(batch)  # a batch the diagnostic cannot read fails now, not after hours of training
        self._step_before = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._epoch_position = (trainer.current_epoch, batch_idx + 1)
        if trainer.global_step == self._step_before:
            return  # gradients are still accumulating: the state's graph spans the window until its step
        cell_state.detach_state(pl_module)
        if self._logs(trainer) and trainer.global_step % self.log_every_n_steps == 0:
            self._log_ladder_usage(trainer, batch)

    # -- the latent state in Lightning's checkpoint ----------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        position = self._epoch_position
        mid_epoch = position is not None and position[1] < trainer.num_training_batches
        if position is not None and not mid_epoch:
            _mark_spent_loaders(checkpoint)
        latent = cell_state.latent_state_dict(pl_module)  # plain values and tensors: weights_only loads it
        checkpoint[self.CHECKPOINT_KEY] = {
            "latent_state": latent,
            # Lightning writes rank 0's checkpoint only; every rank's own state goes into it.
            "latent_state_per_rank": _gather_from_ranks(trainer, latent),
            "mid_epoch": mid_epoch,
            "epoch": position[0] if mid_epoch else None,
            "batches_done": position[1] if mid_epoch else None,
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(self.CHECKPOINT_KEY)
        if not isinstance(saved, Mapping) or "latent_state" not in saved:
            warnings.warn(
                "PTLCallback: this checkpoint holds no latent state (it was written without PTLCallback); "
                "the cells resume with no history, so a run resumed mid-epoch ends elsewhere than the "
                "uninterrupted run would have.",
                UserWarning,
                stacklevel=2,
            )
            return
        if not saved.get("mid_epoch"):
            # The saved epoch had trained all its batches: the next one starts from zero state. Reset here, as
            # Lightning (2.6) resumes a checkpoint written at an epoch's last batch without on_train_epoch_start.
            cell_state.reset_state(pl_module)
            return
        latent, per_rank = saved["latent_state"], saved.get("latent_state_per_rank")
        if per_rank is not None and len(per_rank) == trainer.world_size:
            latent = per_rank[trainer.global_rank]
        elif per_rank is not None:
            warnings.warn(
                f"PTLCallback: the checkpoint holds the latent state of {len(per_rank)} ranks and this run has "
                f"{trainer.world_size}: every rank resumes with rank 0's state (exact only with "
                f"state_mode='pooled', sync_state=True, where all ranks hold the same state).",
                UserWarning,
                stacklevel=2,
            )
        # Checked in full before anything changes; a model built otherwise gets BConvError listing why.
        cell_state.load_latent_state_dict(pl_module, latent)
        self._restored_epoch = saved["epoch"]
        self._epoch_position = (saved["epoch"], saved["batches_done"])

    # -- the ladder diagnostic -------------------------------------------------------------------

    def _logs(self, trainer: pl.Trainer) -> bool:
        # Without a logger the diagnostic's extra forwards would be spent on nothing.
        return self.log_every_n_steps is not None and bool(trainer.loggers)

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.inputs is not None:
            got = self.inputs(batch)
            x, target = got if isinstance(got, tuple) else (got, None)
        elif isinstance(batch, torch.Tensor):
            x, target = batch, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            x = batch[0]
            target = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        else:
            x = None
        if not isinstance(x, torch.Tensor):
            raise BConvError(
                f"PTLCallback cannot find the PTL model's input in a training batch of type {type(batch).__name__}: "
                f"it reads a tensor batch, or (input, target) from a tuple or list. Pass "
                f"PTLCallback(inputs=lambda batch: (batch['image'], batch['label'])) or the like, or "
                f"log_every_n_steps=None to log no diagnostic."
            )
        return x, target

    def _log_ladder_usage(self, trainer: pl.Trainer, batch: Any) -> None:
        if not self.models:
            return  # cells outside any PTL model: reset, detached and checkpointed, but no ladder to measure
        x, target = self._unpack(batch)
        metrics: dict[str, float] = {}
        # Every rank computes it (a pooled, synced state all-reduces in a training forward); loggers write on rank 0.
        for name, model in self.models.items():
            usage = ladder_usage(model, x, target=target, loss_fn=self.loss_fn)
            self.last_usage[name] = usage
            prefix = f"bconv/{name}/" if len(self.models) > 1 else "bconv/"
            metrics.update({prefix + key: value for key, value in usage.as_dict().items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _gather_from_ranks(trainer: pl.Trainer, latent: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's latent state, in rank order (``None`` in a single process).

    Lightning calls ``on_save_checkpoint`` on every rank (``save_checkpoint`` is collective), so the
    gather meets on all of them. The states travel on CPU: they are small, and a pickled CUDA tensor
    would be rebuilt on the device of the rank that saved it.
    """
    if trainer.world_size < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    on_cpu = {
        name: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in cell.items()}
        for name, cell in latent.items()
    }
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, on_cpu)
    return gathered


def _mark_spent_loaders(checkpoint: dict[str, Any]) -> None:
    """Mark the saved position of torchdata's ``StatefulDataLoader`` as a finished epoch.

    A checkpoint written once the epoch's last batch has trained (at that batch's end, or at the epoch's
    end) holds a loader that yielded every batch but was never asked for one more, so its state says
    "not finished". Lightning (2.6) loads that state into the resumed run's next epoch, whose iterator
    then yields nothing: the run would silently train one epoch less. Marked finished, the loader starts
    the next epoch with the permutation the uninterrupted run drew. Loaders of other kinds are left alone.
    """
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    for loader_state in fit_loop.get("state_dict", {}).get("combined_loader", []):
        if isinstance(loader_state, dict) and loader_state.get("_iterator_finished") is False:
            loader_state["_iterator_finished"] = True
