"""What the adapter needs to know of gradient checkpointing, from torch's internals, in one place.

``torch.utils.checkpoint`` recomputes a region's forward in backward. The ladder's cells must not run
again then (they would read and write their state a second time), so the adapter asks three questions,
each answered here from torch's internals (kept together so that a change in torch touches one file):
is this forward a recompute inside the autograd engine (:func:`in_backward`); is it inside a reentrant
checkpoint, which would silently cut the ladder from autograd (:func:`inside_reentrant_checkpoint`); and
it keeps the ladder's saved activations out of an enclosing non-reentrant checkpoint
(:func:`own_saved_tensors`). A compiled forward is traced, not recomputed by hooks: each takes the plain
path under ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.utils.checkpoint

__all__ = ["in_backward", "inside_reentrant_checkpoint", "own_saved_tensors"]


def in_backward() -> bool:
    """True inside the autograd engine: a gradient checkpoint recomputing a forward."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


_REENTRANT_FORWARD = torch.utils.checkpoint.CheckpointFunction.forward.__code__


def inside_reentrant_checkpoint() -> bool:
    """True when called (at any depth) from the forward of a reentrant ``torch.utils.checkpoint``."""
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


def own_saved_tensors() -> contextlib.AbstractContextManager:
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
