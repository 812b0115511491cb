"""Deprecated: ``bconv.state`` moved in bconv 0.3 (see CHANGELOG.md); its names still resolve, with a warning."""

from bconv._deprecation import module_getattr

__getattr__ = module_getattr(
    'bconv.state',
    {
        'reset_state': ('PTLModel.reset_state() (bconv.ptl.state.reset_state for a model that holds one)', 'bconv.ptl.state', 'reset_state'),
        'detach_state': ('PTLModel.detach_state() (bconv.ptl.state.detach_state for a model that holds one)', 'bconv.ptl.state', 'detach_state'),
        'latent_state_dict': ('PTLModel.latent_state_dict() (bconv.ptl.state.latent_state_dict for a model that holds one)', 'bconv.ptl.state', 'latent_state_dict'),
        'load_latent_state_dict': ('PTLModel.load_latent_state_dict() (bconv.ptl.state.load_latent_state_dict for a model that holds one)', 'bconv.ptl.state', 'load_latent_state_dict'),
        'LatentState': ('bconv.LatentState', 'bconv.ptl.state', 'LatentState'),
    },
)
