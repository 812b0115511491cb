"""Stage discovery where it used to be silently wrong: small inputs.

Reductions come from what the network does at two input sizes, not from one ratio rounded with a
tolerance.
"""

import torchvision

from bconv import find_stages, wrap_with_ptl
from bconv.rollback import Rollback


def _names_and_reductions(stages):
    return [(s.name, s.reduction) for s in stages]


RESNET = [("relu", 2), ("layer1", 4), ("layer2", 8), ("layer3", 16), ("layer4", 32)]


# --------------------------------------------------------------------------- small inputs


def test_deepest_stage_is_kept_at_a_small_input():
    # At 48 px layer4 is a 2x2 map: 48 / 2 = 24 is no power of two, but at 96 px the same map is 3x3.
    size = (3, 48, 48)
    stages = find_stages(torchvision.models.resnet18(), size)
    assert _names_and_reductions(stages) == RESNET
    assert stages[-1].shape == (512, 2, 2)
    # Every technique reads the same stages: the ladder fuses at layer4, rolling back rolls layer4 back.
    assert wrap_with_ptl(torchvision.models.resnet18(), input_size=size).stages[-1].name == "layer4"
    assert Rollback(torchvision.models.resnet18(), input_size=size).stages[-1].name == "layer4"


def test_deepest_stage_is_kept_at_a_small_non_square_input():
    # A person-ReID-like 2:1 input at low resolution: layer4 is 3x2 (48 / 2 = 24 again) in another family.
    stages = find_stages(torchvision.models.mobilenet_v3_small(), (3, 96, 48))
    assert [s.reduction for s in stages] == [2, 4, 8, 16, 32]
    assert stages[-1].shape[1:] == (3, 2)


def test_tiny_input_keeps_every_stage_down_to_one_pixel():
    assert _names_and_reductions(find_stages(torchvision.models.resnet18(), (3, 24, 24))) == RESNET
