"""Deprecated: ``bconv.surgery.checkpoint`` moved in bconv 0.3 (see CHANGELOG.md); its names still resolve, with a warning."""

from bconv._deprecation import module_getattr

__getattr__ = module_getattr(
    'bconv.surgery.checkpoint',
    {
        'load_ptl': ('bconv.load_ptl', 'bconv.ptl', 'load_ptl'),
    },
)
