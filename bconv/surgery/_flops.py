"""torch's FLOP counter, for the one figure bconv reads from it: the total."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["TotalFlopCounter"]


class _NoModuleTracking:
    """Stands in for FlopCounterMode's ModuleTracker: every count goes to the total only."""

    parents = ("Global",)

    def __enter__(self) -> "_NoModuleTracking":
        return self

    def __exit__(self, *args: object) -> None:
        return None


class TotalFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that counts the total only, without the per-module breakdown.

    The breakdown's module tracker registers backward hooks on every module's inputs and fails on
    some of them (timm's PiT and CaiT pass a parameter's view through a module:
    ``AssertionError: Expected gradient function to be set``, in no_grad and inference mode alike).
    The counting itself, torch's per-op formulas, is unchanged.

    Counting also switches off ``nn.MultiheadAttention``'s (and ``nn.TransformerEncoderLayer``'s) fast
    path, which runs only without autograd, as one fused op the counter has no formula for: its matmuls
    would count with autograd on and not without, so the same network would count differently in
    ``torch.no_grad()``. The fast path is restored on exit.

    Example::

        >>> with TotalFlopCounter() as counter:
        ...     model(x)
        >>> counter.get_total_flops()
    """

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _NoModuleTracking()
        self._fastpath: list[bool] = []

    def __enter__(self) -> "TotalFlopCounter":
        self._fastpath.append(torch.backends.mha.get_fastpath_enabled())
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return super().__enter__()
        except BaseException:
            torch.backends.mha.set_fastpath_enabled(self._fastpath.pop())
            raise

    def __exit__(self, *args: object) -> None:
        try:
            super().__exit__(*args)
        finally:
            torch.backends.mha.set_fastpath_enabled(self._fastpath.pop())
