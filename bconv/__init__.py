"""bconv: model surgery on any vision backbone (Progressive Transfer Learning with BConv-Cells).

The public surface is the short list in ``__all__``; the techniques around PTL are the subpackages
:mod:`bconv.distill`, :mod:`bconv.rollback` and :mod:`bconv.prune`, and every error is in
:mod:`bconv.errors` (also re-exported here).
"""

from ._deprecation import module_getattr
from ._version import __version__
from .cells import BConvCell, BConvCellV2
from .errors import (
    BConvError,
    CheckpointError,
    ConfigError,
    InputSizeError,
    LeafModuleError,
    ModulePathError,
    NoSpatialStagesError,
    StageSelectionError,
    TraceError,
    UnsupportedModelError,
    WrappedModelError,
)
from .ptl import LadderUsage, LatentState, PTLConfig, PTLModel, ladder_usage, load_ptl, unwrap_ptl, wrap_with_ptl
from .surgery import Anatomy, Head, Stage, anatomy

__all__ = [
    "wrap_with_ptl", "unwrap_ptl", "load_ptl", "PTLModel", "PTLConfig", "ladder_usage", "LadderUsage",
    "LatentState", "anatomy", "Anatomy", "Head", "Stage", "BConvCell", "BConvCellV2", "__version__",
    "BConvError", "TraceError", "NoSpatialStagesError", "InputSizeError", "UnsupportedModelError",
    "StageSelectionError", "ModulePathError", "LeafModuleError", "WrappedModelError", "CheckpointError",
    "ConfigError",
]  # fmt: skip

# Synonyms of bconv 0.2, kept for a while: one way to do each thing (CHANGELOG.md).
__getattr__ = module_getattr(
    "bconv",
    {
        "find_stages": ("bconv.anatomy(model).stages", "bconv.surgery.anatomy", "find_stages"),
        "reset_state": ("model.reset_state()", "bconv.ptl.state", "reset_state"),
        "detach_state": ("model.detach_state()", "bconv.ptl.state", "detach_state"),
        "latent_state_dict": ("model.latent_state_dict()", "bconv.ptl.state", "latent_state_dict"),
        "load_latent_state_dict": ("model.load_latent_state_dict(...)", "bconv.ptl.state", "load_latent_state_dict"),
    },
)
