"""bconv: model surgery on any CNN backbone (Progressive Transfer Learning with BConv-Cells)."""

from .cells import BConvCell, BConvCellV2
from .errors import BConvError, InputSizeError, NoSpatialStagesError, TraceError, UnsupportedModelError
from ._version import __version__
from .state import detach_state, latent_state_dict, load_latent_state_dict, reset_state
from .surgery.anatomy import Anatomy, Head, anatomy
from .surgery import PTLConfig, PTLModel, Stage, find_stages, load_ptl, unwrap_ptl, wrap_with_ptl
from .surgery.usage import LadderUsage, ladder_usage

__all__ = [
    "wrap_with_ptl",
    "unwrap_ptl",
    "PTLModel",
    "PTLConfig",
    "load_ptl",
    "ladder_usage",
    "LadderUsage",
    "reset_state",
    "detach_state",
    "latent_state_dict",
    "load_latent_state_dict",
    "find_stages",
    "Stage",
    "anatomy",
    "Anatomy",
    "Head",
    "BConvCell",
    "BConvCellV2",
    "BConvError",
    "TraceError",
    "NoSpatialStagesError",
    "InputSizeError",
    "UnsupportedModelError",
    "__version__",
]
