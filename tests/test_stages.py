"""Stage discovery: the invariants every discovered stage must satisfy, on the zoos and on users' own CNNs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import timm
from bconv import InputSizeError, NoSpatialStagesError, Stage, TraceError
from bconv.surgery import find_stages
from bconv._zoo import torchvision_input_size, torchvision_names
from bconv.surgery import second_size
from bconv.surgery import spatial_layout

from conftest import timm_family_params, zoo_model

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


@pytest.mark.parametrize("spec", ["torchvision:vit_b_16", "timm:test_vit"])
def test_plain_vit_has_no_spatial_stages(spec):
    model = zoo_model(spec)
    with pytest.raises(NoSpatialStagesError, match="no spatial stages.*tokens"):
        find_stages(model, (3, 224, 224) if spec.startswith("torchvision") else None)


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


def test_bad_source_and_feature_info_without_timm():
    with pytest.raises(ValueError, match="source='magic' is not one of"):
        find_stages(UserCNN(), (3, 32, 32), source="magic")
    with pytest.raises(ValueError, match="no feature_info"):
        find_stages(UserCNN(), (3, 32, 32), source="feature_info")


def test_stage_is_a_frozen_record():
    stage = find_stages(UserCNN(), (3, 32, 32))[0]
    with pytest.raises(AttributeError):
        stage.name = "other"  # type: ignore[misc]


# ----------------------------------------------------------------------------------- whole zoos (slow)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("family,name", timm_family_params())
def test_every_timm_family(family, name):
    model = zoo_model(f"timm:{name}")
    try:
        stages = find_stages(model, source="fx")
    except NoSpatialStagesError:
        pytest.skip(f"{name}: no spatial stages (ViT-like)")
    check_stage_invariants(model, stages, tuple(model.pretrained_cfg["input_size"]))
