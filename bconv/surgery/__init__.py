"""Tracing, stage discovery and injection."""

from .stages import Stage, default_input_size, find_stages

__all__ = ["Stage", "find_stages", "default_input_size"]
