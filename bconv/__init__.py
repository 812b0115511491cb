"""bconv: model surgery on any CNN backbone (Progressive Transfer Learning with BConv-Cells)."""

from .cells import BConvCell, BConvCellV2
from .errors import BConvError, InputSizeError, NoSpatialStagesError, TraceError
from .surgery import PTLModel, Stage, find_stages, unwrap_ptl, wrap_with_ptl

__version__ = "0.1.0"

__all__ = [
    "wrap_with_ptl",
    "unwrap_ptl",
    "PTLModel",
    "find_stages",
    "Stage",
    "BConvCell",
    "BConvCellV2",
    "BConvError",
    "TraceError",
    "NoSpatialStagesError",
    "InputSizeError",
]
