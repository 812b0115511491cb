"""Errors raised by bconv.

Every error names the bad input and what would be valid, and points at
``python -m bconv.inspect`` where that helps. All subclass :class:`BConvError`,
so ``except bconv.BConvError`` catches anything bconv raises on purpose.
"""

__all__ = [
    "BConvError", "TraceError", "NoSpatialStagesError", "InputSizeError", "ClassifierNotFoundError",
    "UnsupportedModelError",
]  # fmt: skip


class BConvError(Exception):
    """Base class of every error bconv raises on purpose."""


class TraceError(BConvError, RuntimeError):
    """torch.fx could not trace the model (data-dependent control flow, an op fx cannot proxy, ...)."""


class NoSpatialStagesError(BConvError, ValueError):
    """The model has no convolutional stages at several resolutions (for example a plain ViT)."""


class InputSizeError(BConvError, ValueError):
    """The model rejected the dummy input built from ``input_size``."""


class ClassifierNotFoundError(BConvError, ValueError):
    """The model has no final classifier that reads a pooled feature vector."""


class UnsupportedModelError(BConvError, ValueError):
    """A kind of network bconv does not handle: a video (3-D) or 1-D network."""
