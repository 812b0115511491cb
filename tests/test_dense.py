"""Dense prediction: segmentation networks and a detector's backbone train with the PTL ladder."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import detection, segmentation

from bconv import wrap_with_ptl

SIZE = (3, 64, 64)


def _assert_ladder_trained(wrapped: nn.Module, loss_fn, steps: int = 2) -> None:
    """A few steps of the user's loop: by the last one the loss reaches every ladder parameter.

    The final fusion starts as [identity | 0], so the cells get their first gradient at the second step.
    """
    wrapped.train()
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        wrapped.detach_state()
    missing = [n for n, p in wrapped.ptl.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


def _segmentation_loss(model: nn.Module, batch: int = 2):
    x, target = torch.randn(batch, *SIZE), torch.randint(0, 3, (batch, *SIZE[1:]))

    def loss():
        out = model(x)
        return F.cross_entropy(out["out"], target) + (F.cross_entropy(out["aux"], target) if "aux" in out else 0)

    return loss


@pytest.mark.parametrize(
    "name",
    [
        "fcn_resnet50",
        "deeplabv3_mobilenet_v3_large",  # its classifier is head, never a stage
        "lraspp_mobilenet_v3_large",
    ],
)
def test_segmentation_wraps_with_backbone_stages_and_trains(name):
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3)
    wrapped = wrap_with_ptl(model, input_size=SIZE)
    head = [s.name for s in wrapped.stages if not s.name.startswith("backbone.")]
    assert not head, f"stages outside the backbone: {head}"
    _assert_ladder_trained(wrapped, _segmentation_loss(wrapped))


@pytest.mark.parametrize(
    "name,stages",
    [
        ("deeplabv3_mobilenet_v3_large", ["backbone.2", "backbone.4", "backbone.7"]),
        ("lraspp_mobilenet_v3_large", ["backbone.2", "backbone.4"]),
    ],
)
def test_segmentation_trains_with_backbone_stages_chosen_by_name(name, stages):
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3, aux_loss=None)
    wrapped = wrap_with_ptl(model, stages=[f"{s}.block.0" for s in stages], input_size=SIZE)
    _assert_ladder_trained(wrapped, _segmentation_loss(wrapped))


def test_timm_features_only_backbone_trains():
    model = timm.create_model("resnet18", pretrained=False, features_only=True)
    wrapped = wrap_with_ptl(model, input_size=SIZE)
    assert [s.name for s in wrapped.stages] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    x = torch.randn(2, *SIZE)

    def loss():
        features = wrapped(x)  # a list of maps, the last one replaced by the ladder's final fusion
        assert [f.shape[1] for f in features] == model.feature_info.channels()
        return sum(f.pow(2).mean() for f in features)

    _assert_ladder_trained(wrapped, loss)


def test_detector_backbone_body_wrapped_in_place_trains_with_the_detectors_loss():
    few = dict(rpn_pre_nms_top_n_train=32, rpn_post_nms_top_n_train=16, box_batch_size_per_image=16)
    det = detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64, **few
    )
    body = det.backbone.body  # an IntermediateLayerGetter: returns an OrderedDict of feature maps
    det.backbone.body = wrap_with_ptl(body, input_size=SIZE)
    assert det.backbone.body.model is body
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 8.0, 30.0, 60.0], [0.0, 0.0, 20.0, 20.0]]), "labels": torch.tensor([2, 1])},
    ]

    def loss():
        return sum(det(images, targets).values())  # the detector's own losses, in training mode

    det.train()
    _assert_ladder_trained(det.backbone.body, loss)
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2 and {"boxes", "labels", "scores"} <= set(out[0])
