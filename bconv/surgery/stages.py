"""Kept so that ``from bconv.surgery.stages import find_stages, Stage`` still works.

A network's description, stages included, comes from :mod:`bconv.surgery.anatomy`, the one public
entry point; the stage rules are the private ``bconv.surgery._stages``. Import from ``bconv`` or
``bconv.surgery.anatomy`` in new code.
"""

from ._checks import default_input_size
from ._stages import Stage, spatial_layout
from .anatomy import find_stages

__all__ = ["Stage", "find_stages", "default_input_size", "spatial_layout"]
