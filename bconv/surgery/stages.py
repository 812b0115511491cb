"""Deprecated: ``bconv.surgery.stages`` moved in bconv 0.3 (see CHANGELOG.md); its names still resolve, with a warning."""

from bconv._deprecation import module_getattr

__getattr__ = module_getattr(
    'bconv.surgery.stages',
    {
        'Stage': ('bconv.Stage', 'bconv.surgery', 'Stage'),
        'find_stages': ('bconv.anatomy(model).stages', 'bconv.surgery', 'find_stages'),
        'default_input_size': ('bconv.surgery.default_input_size', 'bconv.surgery', 'default_input_size'),
        'spatial_layout': ('bconv.surgery.spatial_layout', 'bconv.surgery', 'spatial_layout'),
    },
)
