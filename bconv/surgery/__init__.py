"""The shared core: one description of a network, computed once, that every technique reads.

Data flows one way: :func:`trace` (torch.fx, with timm's and torchvision's non-traceable lists as
leaves) -> the stage rules -> :func:`anatomy` (stem, stages, head; cached per model) -> a technique
(:mod:`bconv.ptl`, :mod:`bconv.distill`, :mod:`bconv.rollback`, :mod:`bconv.prune`). The argument
checks that several public functions share, bconv's hook marker and the FLOP counter live here too,
so that every technique imports them by these public names.
"""

from .._deprecation import module_getattr
from ._checks import (
    check_input_size,
    check_leaf_modules,
    check_module_paths,
    default_input_size,
    is_wrapped,
    refuse_wrapped,
    select_stages,
)
from ._flops import TotalFlopCounter
from ._hooks import BConvHook, bconv_hooks_suspended, original_network
from ._stages import SOURCES, Source, Stage, feature_info_entries, group_modules, main_chain, spatial_layout, stage_runs
from ._trace import (
    Traced,
    dummy_input,
    eval_mode,
    meta_input,
    model_error_message,
    on_meta,
    propagate_shapes,
    second_size,
    shape_keeping_skipped,
    trace,
)
from .anatomy import Anatomy, Head, anatomy, find_stages, stem_modules

__all__ = [
    "anatomy", "Anatomy", "Head", "Stage", "Source", "SOURCES", "stem_modules", "find_stages",
    "trace", "Traced", "propagate_shapes", "second_size", "main_chain", "stage_runs", "group_modules",
    "feature_info_entries", "spatial_layout",
    "dummy_input", "meta_input", "on_meta", "eval_mode", "shape_keeping_skipped", "model_error_message",
    "default_input_size", "check_input_size", "check_leaf_modules", "check_module_paths", "select_stages",
    "is_wrapped", "refuse_wrapped", "BConvHook", "bconv_hooks_suspended", "original_network", "TotalFlopCounter",
]  # fmt: skip

# PTL lived here before bconv 0.3: its names still resolve, with a DeprecationWarning.
_MOVED_TO_PTL = ("wrap_with_ptl", "unwrap_ptl", "PTLModel", "PTLConfig", "load_ptl")
__getattr__ = module_getattr("bconv.surgery", {name: (f"bconv.{name}", "bconv.ptl", name) for name in _MOVED_TO_PTL})
