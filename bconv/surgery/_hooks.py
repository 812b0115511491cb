"""bconv's own forward hooks: a marker class, switching them off, and finding a wrapper's network."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator

from torch import nn

__all__ = ["BConvHook", "bconv_hooks_suspended", "original_network"]

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


class BConvHook:
    """Base class of the hooks bconv registers on a user's modules, so they can be told from the user's own."""


@contextlib.contextmanager
def bconv_hooks_suspended(model: nn.Module) -> Iterator[None]:
    """Switch off bconv's hooks on ``model`` for the duration (tracing, shape propagation); the user's stay."""
    saved = []
    for m in model.modules():
        for kind in _HOOK_DICTS:
            hooks = getattr(m, kind)
            if any(isinstance(h, BConvHook) for h in hooks.values()):
                saved.append((m, kind, hooks))
                setattr(m, kind, OrderedDict((k, h) for k, h in hooks.items() if not isinstance(h, BConvHook)))
    try:
        yield
    finally:
        for m, kind, hooks in saved:
            setattr(m, kind, hooks)


def original_network(model: nn.Module) -> tuple[nn.Module, str]:
    """``(network, prefix)``: a PTL wrapper's original network and its path prefix, else ``(model, "")``.

    A PTL wrapper holds the original at ``.model`` and the injected modules at ``.ptl`` (registered
    children, not attributes forwarded by ``__getattr__``).
    """
    children = model._modules
    if isinstance(children.get("model"), nn.Module) and isinstance(children.get("ptl"), nn.Module):
        return children["model"], "model."
    return model, ""
