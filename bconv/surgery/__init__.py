"""Tracing, stage discovery and injection: trace -> stages -> ladder -> hooks."""

from .checkpoint import load_ptl
from .config import PTLConfig
from .ptl import PTLModel, unwrap_ptl, wrap_with_ptl
from .stages import Stage, default_input_size, find_stages

__all__ = ["Stage", "find_stages", "default_input_size", "wrap_with_ptl", "unwrap_ptl", "PTLModel", "PTLConfig", "load_ptl"]
