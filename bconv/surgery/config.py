"""Deprecated: ``bconv.surgery.config`` moved in bconv 0.3 (see CHANGELOG.md); its names still resolve, with a warning."""

from bconv._deprecation import module_getattr

__getattr__ = module_getattr(
    'bconv.surgery.config',
    {
        'PTLConfig': ('bconv.PTLConfig', 'bconv.ptl', 'PTLConfig'),
    },
)
