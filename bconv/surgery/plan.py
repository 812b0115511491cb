"""Deprecated: ``bconv.surgery.plan`` moved in bconv 0.3 (see CHANGELOG.md); its names still resolve, with a warning."""

from bconv._deprecation import module_getattr

__getattr__ = module_getattr(
    'bconv.surgery.plan',
    {
        'ptl_plan': ('bconv.ptl.ptl_plan', 'bconv.ptl', 'ptl_plan'),
        'Plan': ('bconv.ptl.Plan', 'bconv.ptl', 'Plan'),
        'PlanRow': ('bconv.ptl.PlanRow', 'bconv.ptl', 'PlanRow'),
    },
)
