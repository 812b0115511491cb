"""Deprecated: ``bconv.surgery.ptl`` moved in bconv 0.3 (see CHANGELOG.md); its names still resolve, with a warning."""

from bconv._deprecation import module_getattr

__getattr__ = module_getattr(
    'bconv.surgery.ptl',
    {
        'PTLModel': ('bconv.PTLModel', 'bconv.ptl', 'PTLModel'),
        'wrap_with_ptl': ('bconv.wrap_with_ptl', 'bconv.ptl', 'wrap_with_ptl'),
        'unwrap_ptl': ('bconv.unwrap_ptl', 'bconv.ptl', 'unwrap_ptl'),
        'PTLLadder': ('bconv.ptl.PTLLadder', 'bconv.ptl', 'PTLLadder'),
        'Fusion': ('bconv.ptl.ladder.Fusion', 'bconv.ptl.ladder', 'Fusion'),
        'FinalFusion': ('bconv.ptl.ladder.FinalFusion', 'bconv.ptl.ladder', 'FinalFusion'),
        'CELLS': ('bconv.ptl.ladder.CELLS', 'bconv.ptl.ladder', 'CELLS'),
    },
)
