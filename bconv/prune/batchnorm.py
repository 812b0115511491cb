"""BatchNorm statistics re-estimated after pruning: read no accuracy of a pruned network without it."""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["reestimate_batchnorm"]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance on a few batches of training inputs.

    Pruning removes channels that the next BatchNorm's running statistics were measured with, so right
    after pruning they describe another network: most of the accuracy lost before any fine-tuning is
    stale statistics, not the channels' choice. Each running statistic becomes the plain average over the
    batches (``momentum=None``, as ``torch.optim.swa_utils.update_bn``). Unlike ``update_bn``, only the
    BatchNorm layers run in training mode: dropout and stochastic depth (timm's ``drop_path_rate``) stay
    off, so the statistics are those of the network that eval runs.

    Args:
        model: any network; its BatchNorm layers that track running statistics are re-estimated in place.
        batches: input batches, or ``(input, target, ...)`` tuples as a DataLoader yields them (the first
            element is the input). A few dozen batches of training images are plenty.
        max_batches: read at most this many batches from ``batches``.

    Returns:
        ``model``, with every module's training flag and each BatchNorm's momentum as they were.

    Raises:
        ValueError: ``batches`` yielded nothing, or ``max_batches`` is not a positive integer; the
            statistics are then unchanged, as after any error in the forward.

    Example::

        >>> cop_prune(model, (3, 32, 32), ratio=0.5)
        >>> reestimate_batchnorm(model, (x for x, _ in train_loader), max_batches=20)
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r} must be a positive integer or None")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    training = {m: m.training for m in model.modules()}
    saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms}  # fmt: skip
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    ok = False
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        seen = 0
        for batch in batches if max_batches is None else islice(batches, max_batches):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device) if isinstance(x, torch.Tensor) else x)
            seen += 1
        if not seen:
            raise ValueError("reestimate_batchnorm got no batch: pass an iterable of input batches")
        ok = True
    finally:
        for m, (momentum, mean, var, tracked) in saved.items():
            m.momentum = momentum
            if not ok:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
        for m, flag in training.items():
            m.train(flag)
    return model
