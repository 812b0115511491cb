"""The PTL wrapper as a stand-in for the network: writes reach the network, and a wrapper taken apart refuses to run."""

import pytest
import torch
import torchvision
from torch import nn

from bconv import BConvError, unwrap_ptl, wrap_with_ptl
from conftest import TinyCNN

SIZE = (3, 32, 32)


# --------------------------------------------------------------------------- writes through the wrapper


def test_a_new_classifier_written_through_the_wrapper_replaces_the_networks():
    wrapped = wrap_with_ptl(torchvision.models.resnet18(), input_size=SIZE)
    head = nn.Linear(512, 5)
    wrapped.fc = head
    assert wrapped.model.fc is head and "fc" not in wrapped._modules
    out = wrapped(torch.randn(2, *SIZE))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert any(p is head.weight for p in wrapped.parameters())


def test_a_plain_attribute_written_through_the_wrapper_reaches_the_network():
    import timm

    wrapped = wrap_with_ptl(timm.create_model("resnet18", num_classes=4), input_size=SIZE)
    wrapped.drop_rate = 0.5  # timm's forward_head reads self.drop_rate
    assert wrapped.model.drop_rate == 0.5 and "drop_rate" not in wrapped.__dict__
    wrapped.train()
    x = torch.randn(8, *SIZE)
    torch.manual_seed(0)
    a = wrapped(x)
    wrapped.reset_state()
    torch.manual_seed(1)
    b = wrapped(x)
    assert not torch.allclose(a, b)  # dropout before the classifier now acts


def test_a_classifier_block_written_through_the_wrapper_of_another_family():
    # MobileNetV3 keeps its head in `classifier`; the new one must be the one that runs and learns.
    wrapped = wrap_with_ptl(torchvision.models.mobilenet_v3_small(), input_size=SIZE)
    wrapped.classifier = nn.Sequential(nn.Linear(576, 3))
    out = wrapped(torch.randn(2, *SIZE))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert wrapped.model.classifier[0].weight.grad is not None


class _Scaled(TinyCNN):
    """A user's CNN whose forward reads a plain attribute."""

    temperature = 1.0

    def forward(self, x):
        return super().forward(x) / self.temperature


def test_a_users_attribute_written_through_the_wrapper_changes_what_the_network_computes():
    wrapped = wrap_with_ptl(_Scaled(), input_size=SIZE).eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        before = wrapped(x)
        wrapped.temperature = 2.0
        after = wrapped(x)
    assert wrapped.model.temperature == 2.0
    torch.testing.assert_close(after, before / 2)


def test_the_wrappers_own_attributes_stay_on_the_wrapper():
    wrapped = wrap_with_ptl(TinyCNN(), input_size=SIZE)
    network = wrapped.model
    wrapped.eval()
    assert not wrapped.training and not network.training  # train()/eval() set both, as before
    wrapped._is_replica = False  # what nn.DataParallel's replicate writes
    assert "_is_replica" in wrapped.__dict__ and "_is_replica" not in network.__dict__
    stages = wrapped.stages
    wrapped.stages = stages
    assert "stages" in wrapped.__dict__ and not hasattr(network, "stages")
    del wrapped.head  # deletes reach the network too
    assert not hasattr(network, "head")


# --------------------------------------------------------------------------- a wrapper after unwrap_ptl


def test_a_wrapper_used_after_unwrap_refuses_to_run():
    wrapped = wrap_with_ptl(TinyCNN(), input_size=SIZE)
    network = unwrap_ptl(wrapped)
    x = torch.randn(2, *SIZE)
    with pytest.raises(BConvError, match="unwrap_ptl"):
        wrapped(x)
    assert network(x).shape == (2, 5)  # the network itself is the one to call


def test_a_network_method_through_a_wrapper_after_unwrap_refuses_to_run():
    import timm

    wrapped = wrap_with_ptl(timm.create_model("resnet18", num_classes=4), input_size=SIZE)
    unwrap_ptl(wrapped)
    with pytest.raises(BConvError, match="unwrap_ptl"):
        wrapped.eval().forward_features(torch.randn(2, *SIZE))


def test_an_old_wrapper_does_not_run_the_ladder_of_a_new_one():
    network = TinyCNN()
    old = wrap_with_ptl(network, input_size=SIZE)
    unwrap_ptl(old)
    new = wrap_with_ptl(network, input_size=SIZE, final_init="paper")
    x = torch.randn(2, *SIZE)
    assert new(x).shape == (2, 5)
    with pytest.raises(BConvError, match="unwrap_ptl"):
        old(x)  # it would return the new ladder's output under the old wrapper's name
