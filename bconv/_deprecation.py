"""Names that moved, kept working for a while: each use warns (DeprecationWarning) where it is made.

CHANGELOG.md lists every moved name with the version that will remove it.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable

__all__ = ["moved", "module_getattr"]

REMOVED_IN = "0.5"


def moved(old: str, new: str, module: str, name: str, stacklevel: int = 3) -> Any:
    """``module.name``, after a :class:`DeprecationWarning` that ``old`` is now ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in bconv {REMOVED_IN}: use {new}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return getattr(importlib.import_module(module), name)


def module_getattr(old_module: str, moves: dict[str, tuple[str, str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for a module whose names moved: ``{name: (new spelling, module, attribute)}``."""

    def __getattr__(name: str) -> Any:
        if name in moves:
            new, module, attribute = moves[name]
            return moved(f"{old_module}.{name}", new, module, attribute)
        raise AttributeError(f"module {old_module!r} has no attribute {name!r}")

    return __getattr__
