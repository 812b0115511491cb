"""bconv: model surgery on any CNN backbone (Progressive Transfer Learning with BConv-Cells)."""

from .errors import BConvError, InputSizeError, NoSpatialStagesError, TraceError
from .surgery import Stage, find_stages

__version__ = "0.1.0"

__all__ = [
    "Stage",
    "find_stages",
    "BConvError",
    "TraceError",
    "NoSpatialStagesError",
    "InputSizeError",
]
