"""Deprecated: ``bconv.surgery.usage`` moved in bconv 0.3 (see CHANGELOG.md); its names still resolve, with a warning."""

from bconv._deprecation import module_getattr

__getattr__ = module_getattr(
    'bconv.surgery.usage',
    {
        'ladder_usage': ('bconv.ladder_usage', 'bconv.ptl', 'ladder_usage'),
        'LadderUsage': ('bconv.LadderUsage', 'bconv.ptl', 'LadderUsage'),
    },
)
