"""bconv: model surgery on any CNN backbone (Progressive Transfer Learning with BConv-Cells)."""

from .cells import BConvCell, BConvCellV2
from .errors import (
    BConvError,
    CheckpointError,
    InputSizeError,
    LeafModuleError,
    ModulePathError,
    NoSpatialStagesError,
    StageSelectionError,
    TraceError,
    UnsupportedModelError,
    WrappedModelError,
)
from ._version import __version__
from .state import LatentState, detach_state, latent_state_dict, load_latent_state_dict, reset_state
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
    "LatentState",
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
    "StageSelectionError",
    "ModulePathError",
    "LeafModuleError",
    "WrappedModelError",
    "CheckpointError",
    "__version__",
]
