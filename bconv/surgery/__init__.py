"""Tracing, stage discovery and injection: trace -> stage rules -> anatomy -> ladder -> hooks.

The function ``anatomy`` is ``bconv.anatomy`` (``bconv.surgery.anatomy`` is its module).
"""

from .anatomy import Anatomy, Head, Stage, default_input_size, find_stages
from .checkpoint import load_ptl
from .config import PTLConfig
from .ptl import PTLModel, unwrap_ptl, wrap_with_ptl

__all__ = [
    "Anatomy", "Head", "Stage", "find_stages", "default_input_size", "wrap_with_ptl", "unwrap_ptl", "PTLModel",
    "PTLConfig", "load_ptl",
]  # fmt: skip
