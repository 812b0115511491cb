"""Stage discovery and the anatomy of a network (find_stages, bconv.anatomy), which every technique reads.

The invariants every discovered stage must satisfy, on the zoos and on users' own CNNs; layouts measured at two
input sizes on meta tensors; small and non-square inputs; networks changed after a first look (the cached anatomy
is measured anew); the stem and the head; dense, detection and video models; clear errors.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bconv import BConvError, InputSizeError, NoSpatialStagesError, Stage, TraceError, wrap_with_ptl
from bconv._zoo import torchvision_input_size, torchvision_names
from bconv.distill import STDTrainer, classifier_path
from bconv.errors import UnsupportedModelError
from bconv.rollback import Rollback
from bconv.surgery import anatomy, find_stages, second_size, spatial_layout

from conftest import TinyCNN, timm_family_params, zoo_model


anatomy_module = importlib.import_module("bconv.surgery.anatomy")  # the module: bconv.surgery.anatomy is the function


# A representative subset for the default run: residual, dense, inverted-residual, plain, inception,
# NHWC transformer, anytime-pooled, and timm's tiny test models of several families.
DEFAULT_MODELS = [
    ("torchvision:resnet18", (3, 64, 64)),
    ("torchvision:densenet121", (3, 64, 64)),
    ("torchvision:mobilenet_v3_small", (3, 64, 64)),
    ("torchvision:efficientnet_b0", (3, 64, 64)),
    ("torchvision:convnext_tiny", (3, 64, 64)),
    ("torchvision:vgg11", (3, 64, 64)),
    ("torchvision:googlenet", (3, 64, 64)),
    ("torchvision:squeezenet1_1", (3, 64, 64)),
    ("torchvision:regnet_y_400mf", (3, 64, 64)),
    ("torchvision:swin_t", (3, 64, 64)),
    ("timm:test_resnet", (3, 64, 64)),
    ("timm:test_efficientnet", (3, 64, 64)),
    ("timm:test_convnext", (3, 64, 64)),
    ("timm:test_byobnet", (3, 64, 64)),
    ("timm:dla34", (3, 64, 64)),
]


# Models whose only feature map is a patch embedding: bconv must refuse them with NoSpatialStagesError.
TORCHVISION_NO_SPATIAL = {"vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"}


def _stage_outputs(model: nn.Module, stages: list[Stage], x: torch.Tensor) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {s.name: [] for s in stages}
    handles = [modules[s.name].register_forward_hook(lambda m, a, o, n=s.name: seen[n].append(o)) for s in stages]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _output_ignores_input_when_stage_is_replaced(model: nn.Module, stage: Stage, input_size) -> bool:
    """Every path from input to output passes through the stage: fixing its output fixes the model's output."""
    module = dict(model.named_modules())[stage.name]
    fixed = torch.randn(1, *stage.shape)
    handle = module.register_forward_hook(lambda m, a, o: fixed)
    try:
        with torch.no_grad():
            a = model(torch.randn(1, *input_size))
            b = model(torch.randn(1, *input_size))
    finally:
        handle.remove()
    return torch.equal(a, b)


def check_stage_invariants(model: nn.Module, stages: list[Stage], input_size) -> None:
    assert stages, "no stages"
    assert [s.index for s in stages] == list(range(len(stages)))
    if stages[0].tokens is not None:
        return check_token_stage_invariants(model, stages, input_size)
    reductions = [s.reduction for s in stages]
    assert reductions == sorted(set(reductions)), f"reductions not strictly increasing: {reductions}"
    assert all(r & (r - 1) == 0 for r in reductions), reductions
    x = torch.randn(1, *input_size)
    outputs = _stage_outputs(model.eval(), stages, x)
    alt_size = second_size(input_size)
    try:
        alt_outputs = _stage_outputs(model, stages, torch.randn(1, *alt_size))
    except Exception:  # a model that accepts one input size only: the strict one-shape reading
        alt_size, alt_outputs = None, {s.name: [None] for s in stages}
    for s in stages:
        assert len(outputs[s.name]) == 1, f"{s.name} ran {len(outputs[s.name])} times"
        out = outputs[s.name][0]
        assert tuple(out.shape[1:]) == s.shape
        # Layout re-measured with real tensors at two sizes: the reported one is what the data says.
        alt = tuple(alt_outputs[s.name][0].shape[1:]) if alt_size else None
        layout, reduction, channels = spatial_layout(s.shape, input_size, alt, alt_size)
        assert (layout, reduction, channels) == (s.layout, s.reduction, s.channels)
        assert _output_ignores_input_when_stage_is_replaced(model, s, input_size), f"a path bypasses {s.name}"
    # Module groups: disjoint, outermost, each a real submodule, the stage's own module inside its group.
    names = dict(model.named_modules())
    grouped = [m for s in stages for m in s.modules]
    assert len(grouped) == len(set(grouped))
    for m in grouped:
        assert m in names
        assert not any(m.startswith(o + ".") for o in grouped), f"{m} is inside another grouped module"
    for s in stages:
        assert any(s.name == m or s.name.startswith(m + ".") or m.startswith(s.name + ".") for m in s.modules) or (
            s.index == len(stages) - 1
        ), f"stage {s.name} not covered by its modules {s.modules}"


def check_token_stage_invariants(model: nn.Module, stages: list[Stage], input_size) -> None:
    """Token stages (tests/test_tokens.py has the details): one grid and patch, each output P + Hp*Wp tokens."""
    assert all(s.layout == "NLC" and s.tokens is not None for s in stages)
    assert len({(s.tokens.grid, s.tokens.patch, s.reduction, s.channels) for s in stages}) == 1
    grid = stages[0].tokens.grid
    outputs = _stage_outputs(model.eval(), stages, torch.randn(1, *input_size))
    for s in stages:
        assert len(outputs[s.name]) == 1 and tuple(outputs[s.name][0].shape[1:]) == s.shape
        assert s.shape[0] == s.tokens.prefix + grid[0] * grid[1]
    reaching = [s.tokens.reaches_output for s in stages]
    assert reaching[0] and reaching == sorted(reaching, reverse=True), reaching  # unreachable: a suffix at most
    grouped = [m for s in stages for m in s.modules]
    assert len(grouped) == len(set(grouped))


# -------------------------------------------------------------------- the invariants on the zoos, and named networks


@pytest.mark.parametrize("spec,input_size", DEFAULT_MODELS, ids=[m for m, _ in DEFAULT_MODELS])
def test_stages_of_zoo_models_satisfy_invariants(spec, input_size):
    model = zoo_model(spec)
    stages = find_stages(model, input_size, source="fx")
    check_stage_invariants(model, stages, input_size)


def test_resnet50_stages_are_its_layers():
    model = zoo_model("torchvision:resnet50")
    stages = find_stages(model, (3, 224, 224))
    assert [(s.name, s.channels, s.reduction) for s in stages] == [
        ("relu", 64, 2), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32),
    ]  # fmt: skip
    assert stages[0].modules == ("conv1", "bn1", "relu")
    assert stages[1].modules == ("maxpool", "layer1")
    assert stages[4].shape == (2048, 7, 7) and stages[4].source == "fx"
    # The head is no stage's: fc and avgpool belong to nobody.
    assert not {"fc", "avgpool"} & {m for s in stages for m in s.modules}


def test_densenet_stages_end_at_dense_blocks_not_inside_transitions():
    stages = find_stages(zoo_model("torchvision:densenet121"), (3, 64, 64))
    assert [s.name for s in stages[1:4]] == ["features.denseblock1", "features.denseblock2", "features.denseblock3"]


def test_inverted_residual_stage_ends_between_blocks_not_at_an_expansion_conv():
    stages = find_stages(zoo_model("torchvision:efficientnet_b0"), (3, 64, 64))
    assert [s.name for s in stages[:4]] == ["features.1", "features.2", "features.3", "features.5"]


def test_nhwc_stages_of_swin_are_reported_as_nhwc():
    stages = find_stages(zoo_model("torchvision:swin_t"), (3, 224, 224))
    assert [s.layout for s in stages[:3]] == ["NHWC"] * 3
    assert [(s.channels, s.reduction, s.shape) for s in stages[:2]] == [(96, 4, (56, 56, 96)), (192, 8, (28, 28, 192))]


def test_timm_auto_uses_feature_info_and_fx_agrees_on_resnet():
    model = timm.create_model("resnet18", pretrained=False)
    auto = find_stages(model, (3, 64, 64))
    assert {s.source for s in auto} == {"feature_info"}
    assert [s.name for s in auto] == [f["module"] for f in model.feature_info]
    fx = find_stages(model, (3, 64, 64), source="fx")
    assert [(s.name, s.channels, s.reduction) for s in fx] == [(s.name, s.channels, s.reduction) for s in auto]
    assert [s.modules for s in fx] == [s.modules for s in auto]


def test_timm_nhwc_swin_via_feature_info_and_fx():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    for source in ("feature_info", "fx"):
        stages = find_stages(model, (3, 224, 224), source=source)
        assert [s.layout for s in stages[:3]] == ["NHWC"] * 3, source
        check_stage_invariants(model, stages, (3, 224, 224))


def test_torchvision_auto_uses_fx():
    stages = find_stages(zoo_model("torchvision:resnet18"), (3, 64, 64), source="auto")
    assert {s.source for s in stages} == {"fx"}


# --------------------------------------------------------------------------- users' own networks


class UserCNN(nn.Module):
    """A user's own network with functional activations at the top level and a stride-1 stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.side = nn.Conv2d(16, 32, 1, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.block1(x)
        x = self.block2(x) + self.side(x)  # a residual at the top level
        return self.fc(x.mean((2, 3)))


def test_users_own_cnn():
    model = UserCNN()
    stages = find_stages(model, (3, 32, 32))
    assert [(s.name, s.channels, s.reduction) for s in stages] == [("stem", 8, 1), ("block1", 16, 2)]
    assert stages[1].modules == ("block1",)
    # block2 and side join in an add that is no module's output: the last stage cannot be hooked there.
    check_stage_invariants(model, stages, (3, 32, 32))


class NHWCNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 24, 4, stride=4)
        self.mix1 = nn.Linear(24, 24)
        self.down = nn.Linear(4 * 24, 48)
        self.mix2 = nn.Linear(48, 48)
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # NHWC from here on
        x = x + self.mix1(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)
        x = self.down(x)
        x = self.mix2(x)
        return self.head(x.mean((1, 2)))


def test_users_own_nhwc_model():
    model = NHWCNet()
    stages = find_stages(model, (3, 32, 32))
    # At reduction 4 the residual add is no module's output, so the stage is named by the embedding conv.
    # At reduction 8 the top-level pointwise `mix2` just before pooling is left to the head, as a
    # conv_head would be.
    assert [(s.name, s.layout, s.channels, s.reduction, s.shape) for s in stages] == [
        ("embed", "NCHW", 24, 4, (24, 8, 8)), ("down", "NHWC", 48, 8, (4, 4, 48)),
    ]  # fmt: skip
    check_stage_invariants(model, stages, (3, 32, 32))


class StridedHeadNet(nn.Module):
    """SelecSLS-like: the last strided convs live in a module called ``head``, the classifier is ``fc``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 1))
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        return self.fc(self.head(self.features(self.stem(x))).mean((2, 3)))


class NeckNet(nn.Module):
    """SAM-like: a ``neck`` projects the last stage before pooling; it is not part of a stage."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.neck = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.Conv2d(24, 24, 3, padding=1))
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(self.neck(self.blocks(self.stem(x))).mean((2, 3)))


def test_a_head_named_module_that_downsamples_is_a_stage_and_a_neck_is_not():
    model = StridedHeadNet()
    stages = find_stages(model, (3, 32, 32))
    assert [(s.name, s.channels, s.reduction) for s in stages] == [("stem", 8, 2), ("features", 16, 4), ("head", 48, 8)]
    check_stage_invariants(model, stages, (3, 32, 32))
    model = NeckNet()
    stages = find_stages(model, (3, 32, 32))
    assert [(s.name, s.reduction) for s in stages] == [("stem", 2), ("blocks", 4)]
    assert "neck" not in {m for s in stages for m in s.modules}


class PreActNet(nn.Module):
    """Xception/NASNet-like ending: the last block, then a lone ``act`` (or a lone ``norm``) before pooling."""

    def __init__(self, tail: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.tail = tail
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.tail(self.block(self.stem(x))).mean((2, 3)))


def test_a_final_activation_closes_the_last_stage_and_a_final_norm_is_left_to_the_head():
    model = PreActNet(nn.ReLU())
    stages = find_stages(model, (3, 32, 32))
    assert [(s.name, s.reduction) for s in stages] == [("stem", 2), ("tail", 4)]
    check_stage_invariants(model, stages, (3, 32, 32))
    model = PreActNet(nn.BatchNorm2d(16))
    assert [(s.name, s.reduction) for s in find_stages(model, (3, 32, 32))] == [("stem", 2), ("block", 4)]


def test_feature_info_entry_naming_the_model_itself_is_skipped():
    # TResNet's feature_info starts with an entry for module '' that timm's own extraction leaves out.
    model = StridedHeadNet()
    model.feature_info = [
        dict(num_chs=3, reduction=2, module=""),
        dict(num_chs=16, reduction=4, module="features"),
        dict(num_chs=48, reduction=8, module="head"),
    ]
    stages = find_stages(model, (3, 32, 32), source="feature_info")
    assert [(s.name, s.reduction, s.source) for s in stages] == [("features", 4, "feature_info"), ("head", 8, "feature_info")]
    model.feature_info = [dict(num_chs=3, reduction=2, module="")]
    with pytest.raises(ValueError, match="names no submodule"):
        find_stages(model, (3, 32, 32), source="feature_info")
    assert find_stages(model, (3, 32, 32), source="auto")[0].source == "fx"


def test_torchvision_input_size_follows_a_fixed_size_model():
    # vit_h_14's only weights are at 518, but built without them it takes 224 (its image_size).
    vit = nn.Module()
    vit.image_size = 224
    assert torchvision_input_size("vit_h_14", vit) == (3, 224, 224)
    assert torchvision_input_size("vit_h_14") == (3, 518, 518)
    assert torchvision_input_size("inception_v3", zoo_model("torchvision:squeezenet1_1")) == (3, 299, 299)


def test_find_stages_leaves_the_model_as_it_was():
    model = zoo_model("torchvision:resnet18")
    model.train()
    model.layer1.eval()  # a user's frozen block
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    find_stages(model, (3, 64, 64))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


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


# --------------------------------------------------------------------------- small inputs


def _names_and_reductions(stages):
    return [(s.name, s.reduction) for s in stages]


RESNET = [("relu", 2), ("layer1", 4), ("layer2", 8), ("layer3", 16), ("layer4", 32)]


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


# --------------------------------------------- one anatomy, read by everyone, measured anew when the network changes


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


# --------------------------------------------------------------------------- the stem and the head


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


# --------------------------------------------------------------------------- errors


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace a branch on a tensor value
            return x * 2
        return x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.gate = DataDependent()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv2(self.gate(self.conv1(x))).mean((2, 3))


def test_untraceable_model_names_the_module_and_the_leaf_fix():
    with pytest.raises(TraceError) as err:
        find_stages(Untraceable(), (3, 32, 32))
    msg = str(err.value)
    assert "`gate`" in msg and "DataDependent" in msg and "leaf_modules=[DataDependent]" in msg
    stages = find_stages(Untraceable(), (3, 32, 32), leaf_modules=[DataDependent])
    assert [s.name for s in stages] == ["gate", "conv2"]


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


@pytest.mark.parametrize("spec", ["torchvision:vit_b_16", "timm:test_vit"])
def test_a_plain_vits_blocks_are_token_stages(spec):
    model = zoo_model(spec)
    size = (3, 224, 224) if spec.startswith("torchvision") else None
    stages = find_stages(model, size)
    check_token_stage_invariants(model, stages, size or (3, 160, 160))
    assert stages[-1].tokens.reaches_output is False  # both classify from the class token


def test_a_network_of_tokens_without_a_patch_grid_map_is_refused():
    class Tokens(nn.Module):  # patches embedded by a Linear over unfolded pixels: no [C, Hp, Wp] map
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3 * 64, 16)
            self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(3)])
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            tokens = F.unfold(x, 8, stride=8).transpose(1, 2)
            return self.head(self.blocks(self.embed(tokens)).mean(1))

    with pytest.raises(NoSpatialStagesError, match="no spatial stages.*patch embedding's \\[C, Hp, Wp\\] map"):
        find_stages(Tokens(), (3, 32, 32))


def test_input_size_the_model_rejects_shows_the_models_message():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    with pytest.raises(InputSizeError, match=r"rejected a dummy input of shape \(1, 3, 100, 100\).*224"):
        find_stages(model, (3, 100, 100), source="fx")
    with pytest.raises(InputSizeError, match="224"):
        find_stages(model, (3, 100, 100), source="feature_info")
    with pytest.raises(InputSizeError, match="channels"):
        find_stages(zoo_model("torchvision:resnet18"), (1, 64, 64))


@pytest.mark.parametrize("bad", [(3, 224), (3, 0, 224), "224", (3, 22.5, 224)])
def test_malformed_input_size_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match=r"input_size must be three positive integers"):
        find_stages(UserCNN(), bad)


def test_bad_input_size_still_says_what_is_valid():
    with pytest.raises(ValueError, match="three positive integers"):
        find_stages(TinyCNN(), (3, 32))
    with pytest.raises(InputSizeError):
        find_stages(TinyCNN(), (5, 32, 32))
    assert issubclass(UnsupportedModelError, BConvError)


def test_bad_source_and_feature_info_without_timm():
    with pytest.raises(ValueError, match="source='magic' is not one of"):
        find_stages(UserCNN(), (3, 32, 32), source="magic")
    with pytest.raises(ValueError, match="no feature_info"):
        find_stages(UserCNN(), (3, 32, 32), source="feature_info")


def test_stage_is_a_frozen_record():
    stage = find_stages(UserCNN(), (3, 32, 32))[0]
    with pytest.raises(AttributeError):
        stage.name = "other"  # type: ignore[misc]


# ------------------------------------------------------------------------- every timm family with channels-last maps


# The timm modules whose code mentions an NHWC layout (`grep -l NHWC timm/models/*.py`), one model each as
# bconv._zoo.timm_families() picks it; ViT-like ones (eva, vision_transformer*, deepseek/qwen ViTs) have no stages.
NHWC_FAMILIES = ["gcvit", "hieradet_sam2", "mambaout", "maxxvit", "nest", "sequencer", "swin_transformer", "swin_transformer_v2"]


def _measured_with_hooks(model: nn.Module, stages, input_size):
    """Each stage's (layout, reduction, channels) re-measured from real outputs at two sizes (one if refused)."""
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
    checked = []
    for source in ("fx", "auto"):
        try:
            stages = find_stages(model, size, source=source)
        except TraceError:
            continue  # fx cannot trace it (hieradet): auto reads feature_info, measured the same way
        assert stages
        assert [(s.layout, s.reduction, s.channels) for s in stages] == _measured_with_hooks(model, stages, size)
        checked.append(source)
    assert "auto" in checked, "auto reads every family: the layouts were compared at least once"


# --------------------------------------------------------------------------- whole zoos (slow)


@pytest.mark.slow  # the whole torchvision zoo
@pytest.mark.parametrize("name", torchvision_names())
def test_every_torchvision_classifier(name):
    model = zoo_model(f"torchvision:{name}")
    input_size = torchvision_input_size(name, model)
    if name in TORCHVISION_NO_SPATIAL:
        with pytest.raises(NoSpatialStagesError):
            find_stages(model, input_size)
        return
    stages = find_stages(model, input_size)
    check_stage_invariants(model, stages, input_size)


@pytest.mark.slow  # a model of every timm family
@pytest.mark.parametrize("family,name", timm_family_params())
def test_every_timm_family(family, name):
    model = zoo_model(f"timm:{name}")
    try:
        stages = find_stages(model, source="fx")
    except NoSpatialStagesError:
        pytest.skip(f"{name}: no spatial stages (ViT-like)")
    check_stage_invariants(model, stages, tuple(model.pretrained_cfg["input_size"]))
