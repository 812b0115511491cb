"""One anatomy per network: layouts measured at two sizes on meta tensors, the head, dense and video models."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import bconv.surgery.anatomy as anatomy_module
from bconv import BConvError, InputSizeError, TraceError, wrap_with_ptl
from bconv.surgery import find_stages
from bconv.distill import STDTrainer, classifier_path
from bconv.rollback import Rollback
from bconv.errors import UnsupportedModelError
from bconv.surgery import anatomy
from bconv.surgery import spatial_layout

from conftest import TinyCNN, zoo_model
from test_stages import check_stage_invariants


# --------------------------------------------------------------------------- layouts are measured


def test_channels_last_map_whose_width_looks_like_a_channel_count_is_nhwc():
    """mambaout's stages.0 outputs [56, 56, 48]: 224/48 is near a power of two, yet 48 are its channels."""
    model = zoo_model("timm:mambaout_femto")
    stages = find_stages(model, (3, 224, 224), source="fx")
    first = next(s for s in stages if s.name == "stages.0")
    assert (first.layout, first.channels, first.reduction, first.shape) == ("NHWC", 48, 4, (56, 56, 48))
    check_stage_invariants(model, stages, (3, 224, 224))
    # The ladder concatenates along the channels, and the wrapped model computes what the original did.
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model.eval()(x)
        got = wrap_with_ptl(model, stages=["stages.0", "stages.1"], input_size=(3, 224, 224)).eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_two_sizes_tell_channels_from_space_where_one_shape_cannot():
    # [56, 56, 56] from a 224x224 input reads both ways: with one shape it is no feature map, not a guess.
    assert spatial_layout((56, 56, 56), (3, 224, 224)) is None
    assert spatial_layout((56, 56, 56), (3, 224, 224), (56, 112, 112), (3, 448, 448)) == ("NCHW", 4, 56)
    assert spatial_layout((56, 56, 56), (3, 224, 224), (112, 112, 56), (3, 448, 448)) == ("NHWC", 4, 56)
    # A globally pooled [C, 1, 1] does not follow the input: not a feature map.
    assert spatial_layout((256, 1, 1), (3, 224, 224), (256, 1, 1), (3, 448, 448)) is None
    # One shape: the aspect ratio must survive (56x48 is no map of a square input).
    assert spatial_layout((56, 56, 48), (3, 224, 224)) == ("NHWC", 4, 48)


NON_SQUARE = [
    "torchvision:resnet50",
    "torchvision:densenet121",
    "torchvision:efficientnet_b0",
    "torchvision:mobilenet_v3_large",
    "torchvision:convnext_tiny",
    "torchvision:swin_t",
    "torchvision:regnet_y_400mf",
    "timm:test_resnet",
    "timm:test_convnext",
    "timm:test_efficientnet",
]


@pytest.mark.parametrize("spec", NON_SQUARE)
def test_person_reid_input_384x128_is_measured_and_wraps(spec):
    size = (3, 384, 128)
    model = zoo_model(spec)
    stages = find_stages(model, size, source="fx")
    check_stage_invariants(model, stages, size)
    for s in stages:
        h, w = (s.shape[1:] if s.layout == "NCHW" else s.shape[:2])
        assert abs(h * s.reduction - 384) <= s.reduction and abs(w * s.reduction - 128) <= s.reduction, s
    wrapped = wrap_with_ptl(model, input_size=size).eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), _unwrapped_output(wrapped, x), rtol=1e-5, atol=1e-5)


def _unwrapped_output(wrapped, x):
    from bconv.surgery import bconv_hooks_suspended

    with bconv_hooks_suspended(wrapped.model):
        return wrapped.model(x)


# --------------------------------------------------------------------------- no real compute


def test_discovery_runs_no_real_convolution():
    model = zoo_model("torchvision:resnet18")
    devices = []
    handles = [m.register_forward_pre_hook(lambda m, a: devices.append(a[0].device.type)) for m in model.modules() if isinstance(m, nn.Conv2d)]
    a = anatomy(model, (3, 96, 80))
    for h in handles:
        h.remove()
    assert a.shapes_from == "meta" and a.layout_measured
    assert devices and set(devices) == {"meta"}
    assert all(p.device.type == "cpu" for p in model.parameters()), "the model's own tensors are untouched"
    wrapped = wrap_with_ptl(model, input_size=(3, 96, 80))  # its wiring check runs on meta tensors too
    assert not [n for n, t in [*wrapped.named_parameters(), *wrapped.named_buffers()] if t.is_meta]


class _NeedsRealData(nn.Module):
    """A CNN that makes a CPU tensor in its forward (meta tensors cannot mix with it): a real forward it is."""

    def __init__(self):
        super().__init__()
        self.body = TinyCNN()

    def forward(self, x):
        ramp = torch.arange(x.shape[-1]).to(x.dtype)  # on the CPU, whatever x is on
        return self.body(x + 0 * ramp)


def test_model_meta_tensors_cannot_run_gets_a_real_forward_and_says_so():
    model = _NeedsRealData()
    a = anatomy(model, (3, 32, 32), source="fx", leaf_modules=())
    assert a.shapes_from == "real"
    assert [s.name for s in a.stages] == ["body.stem", "body.stage1", "body.stage2"]


class _OneSizeOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = TinyCNN()

    def forward(self, x):
        torch._assert(x.shape[-1] <= 64, "this model takes images up to 64 pixels wide")
        return self.body(x)


def test_model_that_accepts_one_size_reads_unambiguous_layouts():
    with pytest.warns(UserWarning, match="accepts only its input size"):
        a = anatomy(_OneSizeOnly(), (3, 64, 48), source="fx")
    assert not a.layout_measured
    assert [(s.name, s.layout, s.channels, s.reduction) for s in a.stages] == [
        ("body.stem", "NCHW", 8, 2), ("body.stage1", "NCHW", 16, 4), ("body.stage2", "NCHW", 32, 8),
    ]  # fmt: skip
    # At 64x64, stage1's [16, 16, 16] reads both ways: it is left out rather than guessed.
    with pytest.warns(UserWarning, match="ambiguous"):
        square = anatomy(_OneSizeOnly(), (3, 64, 64), source="fx")
    assert "body.stage1" not in [s.name for s in square.stages]


# --------------------------------------------------------------------------- one anatomy, read by everyone


def test_anatomy_is_traced_once_for_ptl_distillation_and_rollback(monkeypatch):
    traces = []
    real_trace = anatomy_module.trace
    monkeypatch.setattr(anatomy_module, "trace", lambda *a, **k: traces.append(1) or real_trace(*a, **k))
    teacher = TinyCNN()
    size = (3, 32, 32)
    wrapped = wrap_with_ptl(teacher, input_size=size)
    assert classifier_path(wrapped, size) == "model.head"
    Rollback(wrapped, input_size=size)
    STDTrainer(TinyCNN(), wrapped, input_size=size)  # the student is another network: its own anatomy
    assert len(traces) == 2


def test_anatomy_is_measured_anew_when_a_layer_changes_width():
    # A pruned network (same modules, narrower layers) must not be read from the cached anatomy.
    from bconv.prune import cop_prune

    model, size = zoo_model("torchvision:regnet_x_400mf").eval(), (3, 64, 64)
    before = [s.channels for s in find_stages(model, size)]
    cop_prune(model, size, ratio=0.4, metric="params")
    after = find_stages(model, size)
    assert [s.channels for s in after] != before
    assert [s.channels for s in after] == [s.channels for s in find_stages(model, size, source="fx")]
    wrapped = wrap_with_ptl(model, input_size=size)
    assert wrapped(torch.randn(2, *size)).shape == (2, 1000)


@pytest.mark.parametrize("spec, first, stem", [
    ("timm:convnext_atto", ("stem", "stages.0"), ("stem",)),  # patchify stem at the first stage's resolution
    ("timm:swin_tiny_patch4_window7_224", ("patch_embed", "layers.0"), ("patch_embed",)),
    ("torchvision:efficientnet_b0", ("features.0", "features.1"), ("features.0",)),
    ("torchvision:vgg11", ("features.0", "features.1"), ("features.0", "features.1")),  # no block: the stage is the stem
])  # fmt: skip
def test_stem_is_what_precedes_the_first_stages_own_block(spec, first, stem):
    model = zoo_model(spec)
    size = (3, 224, 224) if "swin" in spec else (3, 64, 64)
    a = anatomy(model, size)
    assert a.stages[0].modules == first and a.stem == stem
    wrapper = nn.Module()
    wrapper.model, wrapper.ptl = model, nn.Identity()  # shaped like a PTL wrapper: the same stem under model.
    assert anatomy(wrapper, size).stem == tuple("model." + m for m in stem)


def test_head_of_a_classifier():
    a = anatomy(zoo_model("torchvision:resnet50"), (3, 224, 224))
    assert a.stem == ("conv1", "bn1", "relu")
    assert (a.head.modules, a.head.pool, a.head.classifier, a.head.features) == (("avgpool", "fc"), "avgpool", "fc", 2048)
    vgg = anatomy(zoo_model("torchvision:vgg11"), (3, 64, 64))
    assert (vgg.head.classifier, vgg.head.features) == ("classifier.6", 4096)


def test_head_of_a_wrapped_model_points_into_the_original():
    wrapped = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 64, 64))
    a = anatomy(wrapped, (3, 64, 64))
    assert a.head.classifier == "model.fc" and a.head.pool == "model.avgpool" and a.stages[-1].name == "model.layer4"


# --------------------------------------------------------------------------- dense prediction, detection, video


SEGMENTATION = [
    ("fcn_resnet50", {}),
    ("deeplabv3_mobilenet_v3_large", {}),
    ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}),
    ("lraspp_mobilenet_v3_large", {}),
]


@pytest.mark.parametrize("name,kwargs", SEGMENTATION, ids=[f"{n}{'-aux' if k else ''}" for n, k in SEGMENTATION])
def test_segmentation_heads_are_never_stages(name, kwargs):
    model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, **kwargs)
    a = anatomy(model, (3, 96, 96))
    assert a.stages and all(s.name.startswith("backbone") for s in a.stages), [s.name for s in a.stages]
    assert "classifier" in a.head.modules and a.head.classifier is None and a.head.pool is None
    if name.startswith("deeplab"):
        assert a.stages[-1].reduction == 16, "the aux branch does not cut the deepest stages off"


def test_detector_is_refused_with_the_body_to_wrap():
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    with pytest.raises(TraceError, match=r"model\.backbone\.body") as info:
        wrap_with_ptl(model, input_size=(3, 128, 128))
    assert "wrap_with_ptl(model.backbone.body)" in str(info.value)
    assert not any(m._forward_hooks for m in model.modules()), "nothing was left on the detector"


def test_video_network_is_refused_because_cells_are_2d():
    model = torchvision.models.video.r3d_18()
    for call in (lambda: find_stages(model), lambda: wrap_with_ptl(model, input_size=(3, 16, 112, 112))):
        with pytest.raises(UnsupportedModelError, match="video .*Conv3d.*2-D"):
            call()


class _Untraceable(nn.Module):
    """A user's whole model with data-dependent control flow around a traceable backbone."""

    def __init__(self):
        super().__init__()
        self.backbone = TinyCNN()

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace a branch on a value
            return self.backbone(x)
        return -self.backbone(x)


def test_untraceable_whole_model_names_its_traceable_submodule():
    with pytest.raises(TraceError, match=r"model\.backbone.*stem, stage1, stage2"):
        find_stages(_Untraceable(), (3, 32, 32))


def test_bad_input_size_still_says_what_is_valid():
    with pytest.raises(ValueError, match="three positive integers"):
        find_stages(TinyCNN(), (3, 32))
    with pytest.raises(InputSizeError):
        find_stages(TinyCNN(), (5, 32, 32))
    assert issubclass(UnsupportedModelError, BConvError)


# --------------------------------------------------------------------------- every timm family with channels-last maps

# The timm modules whose code mentions an NHWC layout (`grep -l NHWC timm/models/*.py`), one model each as
# bconv._zoo.timm_families() picks it; ViT-like ones (eva, vision_transformer*, deepseek/qwen ViTs) have no stages.
NHWC_FAMILIES = ["gcvit", "hieradet_sam2", "mambaout", "maxxvit", "nest", "sequencer", "swin_transformer", "swin_transformer_v2"]


def _measured_with_hooks(model: nn.Module, stages, input_size):
    """Each stage's (layout, reduction, channels) re-measured from real outputs at two sizes (one if refused)."""
    from test_stages import _stage_outputs
    from bconv.surgery import second_size

    first = _stage_outputs(model.eval(), stages, torch.randn(1, *input_size))
    alt_size = second_size(input_size)
    try:
        second = _stage_outputs(model, stages, torch.randn(1, *alt_size))
    except Exception:
        alt_size, second = None, None
    return [
        spatial_layout(tuple(first[s.name][0].shape[1:]), input_size,
                       tuple(second[s.name][0].shape[1:]) if second else None, alt_size)
        for s in stages
    ]  # fmt: skip


@pytest.mark.parametrize("family", NHWC_FAMILIES)
def test_channels_last_families_report_what_their_tensors_are(family):
    from bconv._zoo import timm_families
    from bconv.surgery import default_input_size

    model = zoo_model(f"timm:{timm_families()[family]}")
    size = default_input_size(model)
    for source in ("fx", "auto"):
        try:
            stages = find_stages(model, size, source=source)
        except TraceError:
            continue  # fx cannot trace it (hieradet): auto reads feature_info, measured the same way
        assert stages
        assert [(s.layout, s.reduction, s.channels) for s in stages] == _measured_with_hooks(model, stages, size)
