"""Stage discovery where it used to be silently wrong: small inputs, and networks changed after a first look.

Reductions come from what the network does at two input sizes, not from one ratio rounded with a
tolerance; the cached anatomy is keyed on everything that decides shapes, settings included.
"""

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bconv import wrap_with_ptl
from bconv.surgery import find_stages
from bconv.rollback import Rollback
from conftest import TinyCNN


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


# --------------------------------------------------------------------------- a network changed after a first look


def _last_stride_one(model: nn.Module) -> None:
    """Person ReID's standard change: layer4 keeps layer3's resolution; no parameter changes shape."""
    model.layer4[0].conv1.stride = (1, 1)  # BasicBlock strides its first conv (Bottleneck its second)
    model.layer4[0].downsample[0].stride = (1, 1)


def test_last_stride_one_after_an_earlier_call_is_measured_anew():
    model, size = torchvision.models.resnet18(), (3, 64, 64)
    assert _names_and_reductions(find_stages(model, size)) == RESNET  # cached
    _last_stride_one(model)
    stages = find_stages(model, size)
    assert _names_and_reductions(stages) == [("relu", 2), ("layer1", 4), ("layer2", 8), ("layer4", 16)]
    assert stages[-1].shape == (512, 4, 4)
    wrapped = wrap_with_ptl(model, input_size=size)
    assert (wrapped.stages[-1].name, wrapped.stages[-1].reduction) == ("layer4", 16)
    assert wrapped(torch.randn(2, *size)).shape == (2, 1000)


def test_a_pooling_setting_changed_after_an_earlier_call_is_measured_anew():
    # The stem's max pooling made stride 1 (a common change for small images): no parameter at all changes.
    model, size = torchvision.models.resnet18(), (3, 64, 64)
    find_stages(model, size)
    model.maxpool.stride = 1
    assert [s.reduction for s in find_stages(model, size)] == [2, 4, 8, 16]


class _Shrink(nn.Module):
    """A user's block whose resolution drop is a plain attribute read in its forward."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return F.avg_pool2d(x, self.factor)


def test_a_users_own_setting_changed_after_an_earlier_call_is_measured_anew():
    model = TinyCNN()
    model.stage2 = nn.Sequential(_Shrink(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
    size = (3, 32, 32)
    assert [s.reduction for s in find_stages(model, size)] == [2, 4, 8]
    model.stage2[0].factor = 4
    assert [s.reduction for s in find_stages(model, size)] == [2, 4, 16]
