"""Errors raised by bconv, all in one place.

Every error names the bad input and what would be valid, and points at
``python -m bconv.inspect`` where that helps. All subclass :class:`BConvError`,
so ``except bconv.BConvError`` catches anything bconv raises on purpose. Each also
subclasses the built-in error a Python user would expect (``ValueError`` for a bad
value, ``TypeError`` for a bad type, ``RuntimeError`` for what fails while running),
so code written against those keeps working.

The same mistake raises the same class from every public function: a malformed or
rejected ``input_size`` is an :class:`InputSizeError` in ``find_stages``,
``wrap_with_ptl``, ``cop_prune`` and the distillation and rollback helpers alike; a
checkpoint that does not fit is a :class:`CheckpointError` in ``load_ptl`` and
``load_pruned`` alike.
"""

__all__ = [
    "BConvError", "TraceError", "NoSpatialStagesError", "InputSizeError", "ClassifierNotFoundError",
    "UnsupportedModelError", "StageSelectionError", "ModulePathError", "LeafModuleError", "WrappedModelError",
    "CheckpointError", "ConfigError", "PruneError", "PruneTargetError", "UnknownModelError", "StateGraphError",
]  # fmt: skip


class BConvError(Exception):
    """Base class of every error bconv raises on purpose."""


class TraceError(BConvError, RuntimeError):
    """torch.fx could not trace the model (data-dependent control flow, an op fx cannot proxy, ...)."""


class NoSpatialStagesError(BConvError, ValueError):
    """The model has no stages: no feature maps at several resolutions, and no patch grid on tokens (CrossViT, TNT, PiT)."""


class InputSizeError(BConvError, ValueError):
    """``input_size`` is not three positive integers ``(C, H, W)``, or the model rejects an input of that size."""


class ClassifierNotFoundError(BConvError, ValueError):
    """The model has no final classifier that reads a pooled feature vector."""


class UnsupportedModelError(BConvError, ValueError):
    """A kind of network bconv does not handle: a video (3-D) or 1-D network."""


class StageSelectionError(BConvError, ValueError):
    """``stages=[...]`` does not name stages of the model (unknown, out of range, repeated, empty, not a name or index)."""


class ModulePathError(BConvError, ValueError):
    """A module path the model does not have (a typo in ``protect=[...]``); lists the closest paths."""


class ConfigError(BConvError, ValueError):
    """An option of :class:`bconv.PTLConfig` (or of ``wrap_with_ptl``) that is unknown or out of its range;
    names the option and its valid values."""


class LeafModuleError(BConvError, TypeError):
    """``leaf_modules`` holds something other than ``nn.Module`` classes (a class name, an instance)."""


class WrappedModelError(BConvError, ValueError):
    """A PTL-wrapped model where a plain network is needed (wrapping twice, pruning a wrapper)."""


class CheckpointError(BConvError, ValueError):
    """A checkpoint or saved file that is not bconv's, is damaged, or does not fit the network given;
    raised before anything of the network is changed."""


class PruneError(BConvError, RuntimeError):
    """Torch-Pruning cannot prune this model (an op it cannot follow); names the layer or op."""


class PruneTargetError(BConvError, ValueError):
    """The requested ratio is not reachable with the floors given; says which ratio is."""


class UnknownModelError(BConvError, LookupError):
    """No model zoo knows the name; the message suggests the closest names."""


class StateGraphError(BConvError, RuntimeError):
    """With ``detach=False``, the cells' state still points into an autograd graph that ``backward()`` has freed:
    call ``detach_state()`` after each optimizer step (or back-propagate with ``retain_graph=True``)."""
