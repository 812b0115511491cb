"""COP pruning (bconv.prune): which channels go, coupled widths, floors, targets, save/load, errors."""

import json
import math
import warnings
from copy import deepcopy

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

import bconv
import bconv.surgery
from bconv.errors import ConfigError
from bconv.prune import (
    COPImportance, Floors, PruneError, PruneTargetError, cop_prune, format_report, load_pruned, save_pruned,
)
from conftest import zoo_model

SMALL = (3, 32, 32)


class Chain(nn.Module):
    """conv1 (8 channels) -> conv2 -> pool -> fc; with keep_feature_width=True only conv1's channels are candidates."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


def one_cut(model: nn.Module) -> list[int]:
    # 8 + 16 + 4 output channels: removing 1 of the 28 is 3.6%, so ratio 0.035 of "channels" is one cut.
    result = cop_prune(model, SMALL, ratio=0.035, metric="channels", keep_feature_width=True)
    assert result.report.channels_before - result.report.channels_after == 1
    ((name, is_out, idxs),) = result.history
    assert name == "conv1" and is_out
    return idxs


@pytest.mark.parametrize("source, copy", [(2, 5), (6, 1)])
def test_channel_whose_consumer_column_duplicates_another_is_cut_first(source, copy):
    model = Chain()
    with torch.no_grad():
        model.conv2.weight[:, copy] = 2 * model.conv2.weight[:, source] + 0.1  # perfectly correlated
    assert one_cut(model)[0] in (source, copy)


def test_dead_channel_is_cut_first_not_kept():
    # The released code gives a constant consumer column correlation 0, i.e. maximal importance.
    model = Chain()
    with torch.no_grad():
        model.conv2.weight[:, 3] = 0.0
    assert one_cut(model) == [3]


def test_calibration_cuts_a_channel_whose_activation_duplicates_another():
    model = Chain()
    with torch.no_grad():  # channel 6 computes exactly what channel 1 computes
        model.conv1.weight[6] = model.conv1.weight[1]
        model.conv1.bias[6] = model.conv1.bias[1]
    batches = [torch.randn(4, *SMALL) for _ in range(2)]
    result = cop_prune(model, SMALL, ratio=0.035, metric="channels", calibration=batches, keep_feature_width=True)
    assert result.history[0][2][0] in (1, 6)


def test_resnet_residual_widths_stay_consistent_and_classes_kept():
    model = torchvision.models.resnet18(num_classes=10)
    result = cop_prune(model, SMALL, ratio=0.5, metric="flops")
    for block in [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]:
        identity = block.downsample[0].out_channels if block.downsample is not None else block.conv1.in_channels
        assert block.conv2.out_channels == block.bn2.num_features == identity
        assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels
    assert model.fc.out_features == 10 and model.fc.in_features == model.layer4[1].conv2.out_channels
    assert model(torch.randn(2, *SMALL)).shape == (2, 10)
    assert any(w.after < w.before for w in result.report.layers)
    assert "fc" not in {w.name for w in result.report.layers}


def test_classifier_input_is_pruned_by_default_as_in_the_released_code():
    # COP scores the channels that feed the classifier against its weights (VGG's conv5_3, ResNet's last
    # residual stream): ResNet-18 goes to -95% of its parameters, which the pooled width's lock kept at ~93%.
    model = torchvision.models.resnet18(num_classes=10)
    result = cop_prune(model, SMALL, ratio=0.95, metric="params")
    assert abs(result.report.achieved - 0.95) <= 0.02
    assert model.fc.out_features == 10 and model.fc.in_features < 512
    assert model(torch.randn(2, *SMALL)).shape == (2, 10)


def test_keep_feature_width_keeps_the_pooled_feature_for_std():
    model = torchvision.models.resnet18(num_classes=10)
    cop_prune(model, SMALL, ratio=0.5, metric="params", keep_feature_width=True)
    assert (model.fc.in_features, model.fc.out_features) == (512, 10)
    assert model.layer4[1].conv2.out_channels == 512
    with pytest.raises(PruneTargetError, match="can be removed"):
        cop_prune(torchvision.models.resnet18(num_classes=10), SMALL, ratio=0.95, metric="params",
                  keep_feature_width=True)  # fmt: skip


class ConvOut(nn.Module):
    """conv1 -> bn -> relu -> conv2 -> mean: conv2 produces the output; conv1's channels are its inputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x)))).mean((2, 3))


def test_output_layer_keeps_its_outputs_but_its_inputs_are_pruned():
    model = ConvOut()
    result = cop_prune(model, SMALL, ratio=0.3, metric="params")
    assert model.conv2.out_channels == 8 and model.conv1.out_channels == model.conv2.in_channels < 16
    assert abs(result.report.achieved - 0.3) <= 0.02
    assert model(torch.randn(2, *SMALL)).shape == (2, 8)


class TinySegmenter(nn.Module):
    """No classifier: the last conv's channels reach the output through an upsampling."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        return {"out": nn.functional.interpolate(self.head(self.body(x)), size=x.shape[-2:], mode="bilinear")}


def test_layer_producing_a_model_output_keeps_its_channels():
    model = TinySegmenter()
    report = cop_prune(model, SMALL, ratio=0.06, metric="channels").report  # 2 of 35 channels
    assert model.head.out_channels == 3 and model.head.in_channels == model.body[2].out_channels
    assert report.channels_before - report.channels_after == 2 and "head" not in {w.name for w in report.layers}
    assert model(torch.randn(1, *SMALL))["out"].shape == (1, 3, 32, 32)


def test_densenet_concatenation_widths_stay_consistent():
    # DenseNet-121's layout at a third of its depth: every layer reads the concatenation of all before it.
    model = torchvision.models.DenseNet(growth_rate=16, block_config=(3, 4, 3), num_init_features=32, num_classes=10)
    cop_prune(model, SMALL, ratio=0.4, metric="flops")
    for name, m in model.named_modules():
        if isinstance(m, torchvision.models.densenet._DenseLayer):
            assert m.norm1.num_features == m.conv1.in_channels, name
            assert m.norm2.num_features == m.conv1.out_channels == m.conv2.in_channels, name
    assert model(torch.randn(2, *SMALL)).shape == (2, 10)


@pytest.mark.parametrize("spec", ["torchvision:mobilenet_v2", "timm:efficientnet_b0", "timm:convnext_atto"])
def test_depthwise_and_convnext_still_run_after_pruning(spec):
    model = zoo_model(spec)
    x = torch.randn(2, 3, 64, 64)
    shape = model.eval()(x).shape
    result = cop_prune(model, (3, 64, 64), ratio=0.3, metric="flops")
    assert abs(result.report.achieved - 0.3) <= 0.02
    assert model(x).shape == shape
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels  # depthwise stayed depthwise


def cifar_vgg16_bn() -> nn.Module:
    """VGG16-BN as COP prunes it on CIFAR: torchvision's features, a 512-wide classifier."""
    vgg = torchvision.models.vgg
    features = vgg.make_layers(vgg.cfgs["D"], batch_norm=True)
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


@pytest.mark.parametrize("build", [cifar_vgg16_bn, lambda: torchvision.models.resnet18(num_classes=10)], ids=["vgg16_bn", "resnet18"])
def test_ablation_direction_smaller_removes_params_faster_removes_flops(build):
    # COP's ablation (docs/design.md §7): gamma favours parameters, beta favours FLOPs, at the same channel count.
    reports = {}
    for prefer in ("smaller", "faster"):
        torch.manual_seed(0)
        reports[prefer] = cop_prune(build(), SMALL, ratio=0.3, metric="channels", prefer=prefer).report
    smaller, faster = reports["smaller"], reports["faster"]
    assert abs(smaller.channels_after - faster.channels_after) <= 0.02 * smaller.channels_before
    assert smaller.params_after < faster.params_after
    assert faster.flops_after < smaller.flops_after


@pytest.mark.parametrize("metric", ["flops", "params", "channels"])
def test_target_met_within_two_percent(metric):
    result = cop_prune(torchvision.models.resnet18(num_classes=10), SMALL, ratio=0.4, metric=metric)
    report = result.report
    before, after = {"flops": (report.flops_before, report.flops_after),
                     "params": (report.params_before, report.params_after),
                     "channels": (report.channels_before, report.channels_after)}[metric]  # fmt: skip
    assert abs(1 - after / before - 0.4) <= 0.02
    assert report.achieved == pytest.approx(1 - after / before)


def test_unreachable_target_is_refused_with_reachable_ratio_and_model_unchanged():
    model = torchvision.models.resnet18(num_classes=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneTargetError, match=r"about 0\.\d+ can be removed"):
        cop_prune(model, SMALL, ratio=0.9, metric="params", floors=Floors(max_fraction=0.5))
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert model.layer1[0].conv1.out_channels == 64


class HardWired(Chain):
    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = y.view(y.shape[0], 8, *y.shape[2:])  # conv1's width written into the code: pruning it breaks this
        return self.fc(self.conv2(y).mean((2, 3)))


def test_a_failure_after_pruning_puts_back_the_very_objects_the_user_holds():
    # Torch-Pruning had already replaced conv1's weight and width when the pruned forward failed.
    model = HardWired()
    x = torch.randn(2, *SMALL)
    before = model(x)
    weight, optimizer = model.conv1.weight, torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    handle = model.conv1.register_forward_hook(lambda m, args, out: calls.append(out.shape[1]))
    with pytest.raises(PruneError, match="after pruning, HardWired fails"):
        cop_prune(model, SMALL, ratio=0.3, metric="channels")
    assert model.conv1.weight is weight and model.conv1.out_channels == 8 and weight.shape[0] == 8
    assert optimizer.param_groups[0]["params"][0] is model.conv1.weight  # the optimizer still trains the model
    assert torch.equal(model(x), before) and calls[-1] == 8
    handle.remove()  # the user's handle still reaches the hook
    n = len(calls)
    model(x)
    assert len(calls) == n


def test_floors_hold():
    model = torchvision.models.resnet18(num_classes=10)
    floors = Floors(min_channels=24, max_fraction=0.6, round_to=8)
    report = cop_prune(model, SMALL, ratio=0.5, metric="flops", floors=floors).report
    assert report.layers
    for w in report.layers:
        assert w.after >= max(24, math.ceil(0.4 * w.before)), w
        assert w.after % 8 == 0, w


def test_stages_limit_pruning_to_the_named_stage():
    model = torchvision.models.resnet18(num_classes=10)
    report = cop_prune(model, SMALL, ratio=0.1, metric="flops", stages=["layer3"]).report
    assert report.layers and all(w.name.startswith("layer3.") for w in report.layers)


def test_save_load_round_trip_reproduces_outputs_exactly(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    result = cop_prune(model, SMALL, ratio=0.5)
    with torch.no_grad():  # as if fine-tuned: the saved weights are not the pruned original's
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pruned(result, tmp_path / "pruned.pt")
    assert torch.load(tmp_path / "pruned.pt", weights_only=True)["history"]
    loaded = load_pruned(torchvision.models.resnet18(num_classes=10), tmp_path / "pruned.pt")
    x = torch.randn(3, *SMALL)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_load_pruned_refuses_another_architecture(tmp_path):
    result = cop_prune(Chain(), SMALL, ratio=0.1, metric="channels")
    save_pruned(result, tmp_path / "p.pt")
    with pytest.raises(ValueError, match="holds a pruned Chain"):
        load_pruned(torchvision.models.resnet18(), tmp_path / "p.pt")


@pytest.mark.parametrize("kwargs, match", [
    (lambda: {"ratio": 0.0}, "strictly between 0 and 1"),
    (lambda: {"ratio": 1.5}, "strictly between 0 and 1"),
    (lambda: {"metric": "latency"}, "'flops', 'params', 'channels'"),
    (lambda: {"prefer": "fast"}, "'balanced', 'smaller', 'faster'"),
    (lambda: {"importance": COPImportance(similarity="spearman", example_inputs=torch.randn(1, *SMALL))},
     "'pearson', 'cosine', 'inner'"),
    (lambda: {"floors": Floors(max_fraction=0.0)}, r"\(0, 1\]"),
    (lambda: {"floors": Floors(round_to=0)}, ">= 1"),
    (lambda: {"stages": ["layer9"]}, r"stage 'layer9' is not a module of the model.*layer3.*bconv\.inspect"),
], ids=["ratio0", "ratio1.5", "metric", "prefer", "similarity", "max_fraction", "round_to", "stages"])  # fmt: skip
def test_bad_arguments_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cop_prune(torchvision.models.resnet18(num_classes=10), SMALL, **kwargs())


# --------------------------------------------------------------------------- grouped arguments, deprecated keywords


def test_deprecated_keywords_warn_and_prune_exactly_as_the_grouped_objects():
    # The keywords of COP's score and of the floors still work until bconv 0.5: each warns with its new spelling,
    # and alpha= overrides prefer's weight as it did.
    model = torchvision.models.resnet18(num_classes=10)
    twin = deepcopy(model)
    old = {"alpha": 2.0, "top_k": 5, "similarity": "cosine", "min_channels": 4, "round_to": 2}
    with pytest.warns(DeprecationWarning) as caught:
        before = cop_prune(model, SMALL, ratio=0.4, metric="params", prefer="faster", **old)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(messages) == len(old)
    for keyword, message in zip(old, messages):
        group = "importance=COPImportance" if keyword in ("alpha", "top_k", "similarity") else "floors=Floors"
        assert message.startswith(f"cop_prune({keyword}=...) is deprecated and will be removed in bconv 0.5: "
                                  f"use cop_prune({group}({keyword}=...))"), message  # fmt: skip
    assert "importance=COPImportance(2.0, 3.0, 0.0, top_k=5, similarity='cosine', " \
           "example_inputs=torch.zeros(1, 3, 32, 32))" in messages[0]  # fmt: skip
    assert "floors=Floors(min_channels=4, round_to=2)" in messages[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new spelling does not warn
        importance = COPImportance(2.0, 3.0, 0.0, top_k=5, similarity="cosine", example_inputs=torch.zeros(1, *SMALL))
        after = cop_prune(twin, SMALL, ratio=0.4, metric="params", importance=importance,
                          floors=Floors(min_channels=4, round_to=2))  # fmt: skip
    assert after.history == before.history and after.history
    assert after.report.layers == before.report.layers and after.report.achieved == before.report.achieved
    assert (after.report.alpha, after.report.beta, after.report.gamma) == (2.0, 3.0, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


@pytest.mark.parametrize("kwargs, match", [
    ({"similarity": "spearman"}, "'pearson', 'cosine', 'inner'"),
    ({"max_fraction": 0.0}, r"\(0, 1\]"),
    ({"round_to": 0}, ">= 1"),
])  # fmt: skip
def test_deprecated_keywords_still_get_clear_errors(kwargs, match):
    with pytest.warns(DeprecationWarning, match="is deprecated"), pytest.raises(ValueError, match=match):
        cop_prune(torchvision.models.resnet18(num_classes=10), SMALL, **kwargs)


def test_floors_is_exported_and_validates_its_input():
    import dataclasses

    import bconv.prune

    assert "Floors" in bconv.prune.__all__ and bconv.prune.Floors is Floors
    assert (Floors().min_channels, Floors().max_fraction, Floors().round_to) == (1, 0.9, 1)
    assert Floors(16, 0.5, 8) == Floors(min_channels=16, max_fraction=0.5, round_to=8)
    for bad, match in [
        ({"min_channels": 0}, r"min_channels=0 must be an integer >= 1"),
        ({"min_channels": 2.5}, r"min_channels=2\.5 must be an integer >= 1"),
        ({"min_channels": True}, r"min_channels=True must be an integer >= 1"),
        ({"round_to": 0}, r"round_to=0 must be an integer >= 1"),
        ({"max_fraction": 0.0}, r"max_fraction=0\.0 must be in \(0, 1\]"),
        ({"max_fraction": 1.5}, r"max_fraction=1\.5 must be in \(0, 1\]"),
        ({"max_fraction": "0.5"}, r"max_fraction='0\.5' must be in \(0, 1\]"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Floors(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Floors().round_to = 8


@pytest.mark.parametrize("kwargs, error, match", [
    (lambda: {"importance": COPImportance(beta=0.0), "alpha": 2.0}, ConfigError, r"importance= and alpha="),
    (lambda: {"importance": COPImportance(beta=0.0), "top_k": 5, "normalize": "l1"}, ConfigError,
     r"importance= and top_k=, normalize="),
    (lambda: {"importance": COPImportance(beta=0.0), "prefer": "faster"}, ConfigError,
     r"importance= and prefer='faster'"),
    (lambda: {"floors": Floors(), "round_to": 8}, ConfigError,
     r"floors= and round_to=.*floors=Floors\(round_to=\.\.\."),
    (lambda: {"importance": "faster"}, TypeError, r"importance='faster' must be a bconv\.prune\.COPImportance"),
    (lambda: {"floors": (1, 0.9, 1)}, TypeError, r"must be a bconv\.prune\.Floors"),
    (lambda: {"min_channel": 4}, TypeError, r"unexpected keyword argument 'min_channel'"),
], ids=["importance+alpha", "importance+options", "importance+prefer", "floors+round_to", "importance-type",
        "floors-type", "unknown-keyword"])  # fmt: skip
def test_conflicting_or_unknown_spellings_are_refused_before_anything_changes(kwargs, error, match):
    model = Chain()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # refused before any deprecation warning
        with pytest.raises(error, match=match):
            cop_prune(model, SMALL, ratio=0.1, metric="channels", **kwargs())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, bconv.BConvError)


def test_cost_terms_are_cops_log_ratios_over_the_largest_group():
    # imp = alpha (1 - r) + beta (1 - log2 F / max log2 F) + gamma (1 - log2 P / max log2 P), computed in one place.
    from bconv.prune.importance import cost_terms, redundancy_term

    costs = np.array([[8.0, 64.0], [2.0, 1.0], [32.0, 16.0]])  # (params, FLOPs); below 2 counts as 2
    gamma, beta = 3.0, 0.5
    expected = [beta * (1 - math.log2(max(f, 2)) / 6) + gamma * (1 - math.log2(p) / 5) for p, f in costs]
    np.testing.assert_allclose(cost_terms(costs, np.array([gamma, beta])), expected, rtol=1e-12)
    largest = np.array([math.log2(64), math.log2(128)])  # another group of the network is the largest
    np.testing.assert_allclose(cost_terms(costs[:1], np.array([gamma, beta]), largest),
                               [beta * (1 - 6 / 7) + gamma * (1 - 3 / 6)], rtol=1e-12)  # fmt: skip
    np.testing.assert_allclose(redundancy_term(np.array([0.0, 0.25, 1.0]), 2.0), [2.0, 1.5, 0.0])


class Detached(nn.Module):
    """conv1's output reaches the rest through .detach(): autograd, hence Torch-Pruning, cannot follow it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x).detach()).mean((2, 3)))


def test_untraceable_model_gets_an_error_naming_the_layer():
    model = Detached()
    with pytest.raises(PruneError, match="does not reach `conv1`"):
        cop_prune(model, SMALL, ratio=0.2)
    assert model.conv1.out_channels == 8


class Branchy(nn.Module):
    """fx cannot trace it (Python control flow on a tensor value), so its anatomy has no head to read."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        if x.mean() > -1:  # always true; fx cannot know
            x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def test_wrong_input_size_and_a_forward_that_needs_no_grad_get_their_own_errors():
    # cop_prune measures the network in the forward that builds Torch-Pruning's graph (autograd on):
    # the model's own rejection of the input is an InputSizeError, a failure with autograd only a PruneError.
    from bconv.errors import InputSizeError

    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputSizeError, match="rejected a dummy input of shape"):
        cop_prune(model, (5, 32, 32), ratio=0.5)

    class BumpsItsWeight(Chain):  # an in-place update of a parameter: fine under no_grad only
        def forward(self, x):
            self.conv1.weight.add_(0.0)
            return super().forward(x)

    bumps = BumpsItsWeight()
    with pytest.raises(PruneError, match="Torch-Pruning cannot build the dependency graph of BumpsItsWeight"):
        cop_prune(bumps, SMALL, ratio=0.3)
    assert bumps.conv1.out_channels == 8
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_flops_before_and_after_are_counted_alike_on_multihead_attention():
    # torch's FLOP counter sees nn.MultiheadAttention's matmuls with autograd on and not in its no-grad fast
    # path; counted one way before pruning and the other after, -50% read as -79% and the ViT was refused.
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=256,
                            num_classes=10)  # fmt: skip
    result = cop_prune(vit, SMALL, ratio=0.5, metric="flops")
    assert abs(result.report.achieved - 0.5) <= 0.02
    with torch.no_grad(), bconv.surgery.TotalFlopCounter() as counter:
        vit.eval()(torch.randn(1, *SMALL))
    assert counter.get_total_flops() == result.report.flops_after


def test_flop_counter_counts_multihead_attention_alike_with_and_without_autograd():
    from bconv.surgery import TotalFlopCounter

    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 10, 32)
    counts = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), TotalFlopCounter() as counter:
            mha(x, x, x)
        counts.append(counter.get_total_flops())
    # in- and out-projections (2 x 4 x 20 x 32 x 32) and the two attention matmuls (2 x 2 x 2 x 10 x 10 x 32)
    assert counts[0] == counts[1] == 2 * 4 * 20 * 32 * 32 + 2 * 2 * 2 * 10 * 10 * 32
    assert torch.backends.mha.get_fastpath_enabled()  # switched off while counting only


def test_layer_producing_the_output_is_kept_when_fx_cannot_find_the_head():
    model = Branchy()
    result = cop_prune(model, SMALL, ratio=0.3, metric="channels")
    assert model.head.out_features == 5 and model.head.in_features == model.conv2.out_channels
    assert model(torch.randn(2, *SMALL)).shape == (2, 5)
    assert result.report.channels_after < result.report.channels_before


def test_flops_are_counted_on_modules_that_receive_a_parameter_view():
    # torch's FlopCounterMode's module tracker raises "Expected gradient function to be set" on PiT.
    from bconv.surgery import TotalFlopCounter
    from torch.utils.flop_counter import FlopCounterMode

    resnet = torchvision.models.resnet18().eval()
    x = torch.randn(1, *SMALL)
    with torch.no_grad(), FlopCounterMode(display=False) as reference, TotalFlopCounter() as total:
        resnet(x)
    assert total.get_total_flops() == reference.get_total_flops() > 0
    pit = zoo_model("timm:pit_ti_224").eval()
    with torch.no_grad(), TotalFlopCounter() as counter:
        pit(torch.randn(1, 3, 224, 224))
    assert counter.get_total_flops() > 0


def test_groups_torch_pruning_cannot_build_are_skipped_and_the_rest_pruned():
    # EfficientFormerV2's attention reshapes make Torch-Pruning map 1,024 channels onto 131,072 indices;
    # each such group is skipped with its reason and the other channels stay prunable.
    model = zoo_model("timm:efficientformerv2_s0").eval()
    x = torch.randn(1, 3, 224, 224)
    result = cop_prune(model, (3, 224, 224), ratio=0.3, metric="flops")
    assert any("cannot be grouped by Torch-Pruning" in why for _, why in result.report.skipped)
    assert abs(result.report.achieved - 0.3) <= 0.02
    assert model(x).shape == (1, 1000)


def test_vit_mlps_prune_while_attention_keeps_its_widths():
    # torchvision's EncoderBlock keeps num_heads itself: only its nn.MultiheadAttention keeps its widths.
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=128,
                              num_classes=10).eval()  # fmt: skip
    result = cop_prune(model, SMALL, ratio=0.3, metric="params")
    assert abs(result.report.achieved - 0.3) <= 0.02
    narrowed = {w.name for w in result.report.layers}
    assert narrowed and all(".mlp." in n for n in narrowed), narrowed
    assert all(b.self_attention.embed_dim == 32 for b in model.encoder.layers)
    assert model(torch.randn(2, *SMALL)).shape == (2, 10)


@pytest.mark.slow  # Swin-T: over ten seconds
def test_swin_prunes_its_mlps_and_leaves_its_functional_attention_alone():
    # Swin's window reshapes made Torch-Pruning's index mappings grow until 24 GB ran out, and its patch merging
    # concatenation had no width it could infer. Its attention reads qkv.weight functionally (F.linear), which
    # Torch-Pruning's graph cannot see: a residual-stream group crosses the heads' reshape and is not pruned.
    model = torchvision.models.swin_t(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    qkv = [m.attn.qkv.weight.shape for stage in model.features[1::2] for m in stage]
    result = cop_prune(model, (3, 64, 64), ratio=0.2, metric="flops")
    assert abs(result.report.achieved - 0.2) <= 0.02
    assert qkv == [m.attn.qkv.weight.shape for stage in model.features[1::2] for m in stage]
    assert result.report.layers and all(".mlp." in w.name for w in result.report.layers)
    assert model(x).shape == (1, 10)


def test_ptl_wrapped_model_is_refused_with_the_std_recipe():
    wrapped = bconv.wrap_with_ptl(torchvision.models.resnet18(num_classes=10), input_size=SMALL)
    with pytest.raises(ValueError, match="STDTrainer"):
        cop_prune(wrapped, SMALL, ratio=0.3)


def test_ptl_teacher_distilled_student_pruned_then_distilled_again():
    # The documented recipe: PTL teacher -> STD into a plain student -> cop_prune(student) -> STD again.
    from bconv.distill import STDTrainer

    teacher = bconv.wrap_with_ptl(torchvision.models.resnet18(num_classes=10), input_size=SMALL)
    student = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(4, *SMALL), torch.randint(0, 10, (4,))
    trainer = STDTrainer(student, teacher, input_size=SMALL)
    assert trainer.projection is None  # same pooled width: 512
    trainer.step(x, y, torch.optim.SGD(trainer.parameters(), lr=0.01))
    result = cop_prune(student, SMALL, ratio=0.4, metric="flops", keep_feature_width=True)
    assert abs(result.report.achieved - 0.4) <= 0.02 and student.fc.in_features == 512
    trainer = STDTrainer(student, teacher, input_size=SMALL)
    assert trainer.projection is None  # the pruned student still distils without a projection
    before = [p.detach().clone() for p in student.parameters()]
    step = trainer.step(x, y, torch.optim.SGD(trainer.parameters(), lr=0.01))
    assert torch.isfinite(step.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_report_formats_stage_widths():
    model = torchvision.models.resnet18(num_classes=10)
    stages = bconv.surgery.find_stages(model, SMALL)
    text = format_report(cop_prune(model, SMALL, ratio=0.5).report, stages)
    assert "layer3" in text and "parameters" in text and "FLOPs" in text


def test_inspect_previews_pruning(capsys):
    from bconv.inspect import main

    assert main(["resnet18", "--input-size", "3", "32", "32", "--prune", "0.5", "--prefer", "faster"]) == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "FLOPs" in out and "(1, 3, 0)" in out
    reached = float(out.split("reached -")[1].split("%")[0])
    assert abs(reached - 50) <= 2
    assert main(["resnet18", "--input-size", "3", "32", "32", "--prune", "2"]) == 1
    assert "strictly between 0 and 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "vgg16_bn", "densenet121", "mobilenet_v3_large", "regnet_y_400mf",
                                  "resnext50_32x4d", "efficientnet_b0", "convnext_tiny", "shufflenet_v2_x1_0"])
def test_torchvision_models_prune_to_half_flops(name):
    model = torchvision.models.get_model(name, weights=None)
    x = torch.randn(1, 3, 64, 64)
    shape = model.eval()(x).shape
    result = cop_prune(model, (3, 64, 64), ratio=0.5)
    assert abs(result.report.achieved - 0.5) <= 0.02
    assert model(x).shape == shape


def test_zoo_benchmark_classifies_pruned_and_refused_models():
    from bconv._zoo import resolve

    from benchmarks import prune_zoo
    pruned = prune_zoo.measure(resolve("torchvision:squeezenet1_1"), "torchvision")
    assert pruned["status"] == "pruned" and pruned["forward"] == "same shape"
    assert abs(pruned["flops_removed"] - 0.5) <= 0.02
    refused = prune_zoo.measure(resolve("timm:skresnet18"), "sknet")
    assert refused["status"] == "refused" and refused["unchanged"] and "PruneTargetError" in refused["reason"]


def test_zoo_rewrite_keeps_the_runs_command_time_and_commit(tmp_path, monkeypatch):
    # --only-write re-renders the report from its rows: the header must still name the run, not the rewrite.
    from benchmarks import prune_zoo

    monkeypatch.setattr(prune_zoo, "RESULTS", tmp_path)
    monkeypatch.setattr(prune_zoo, "ROWS", tmp_path / "prune_zoo.jsonl")
    row = {"zoo": "torchvision", "family": "torchvision", "model": "resnet18", "input": "3x64x64", "status": "pruned",
           "flops_removed": 0.495, "params_removed": 0.7, "forward": "same shape", "seconds": 0.4}  # fmt: skip
    (tmp_path / "prune_zoo.jsonl").write_text(json.dumps(row) + "\n")
    prune_zoo.write("python -m benchmarks.prune_zoo --jobs 2", wall_s=120.0, at="abc1234")
    threads = torch.get_num_threads()
    try:
        prune_zoo.main(["--only-write", "--note", "re-rendered"])
    finally:
        torch.set_num_threads(threads)  # main sets its --threads
    text = (tmp_path / "prune_zoo.md").read_text()
    assert "Command: `python -m benchmarks.prune_zoo --jobs 2`" in text and "2.0 minutes in all" in text
    assert "at commit abc1234" in text and "re-rendered" in text


def _zoo() -> list:
    from bconv._zoo import timm_families, torchvision_names

    excluded = {"vit_h_14", "regnet_y_128gf"}  # benchmarks/prune_zoo.py: more compute than the rest together
    specs = [(f"torchvision:{n}", "torchvision") for n in torchvision_names() if n not in excluded]
    return specs + [(f"timm:{n}", f) for f, n in sorted(timm_families().items())]


@pytest.mark.slow
@pytest.mark.parametrize("spec, family", _zoo(), ids=[s for s, _ in _zoo()])
def test_every_zoo_model_is_pruned_to_target_or_refused_unchanged(spec, family):
    # Each model in a child process, as benchmarks/prune_zoo.py measures it (64x64 where the model allows).
    from bconv._zoo import resolve

    from benchmarks import prune_zoo
    from benchmarks._isolated import isolated
    row = isolated(prune_zoo.measure, resolve(spec), family, timeout=900)
    assert row["status"] in ("pruned", "refused"), row
    if row["status"] == "pruned":
        assert row["forward"] == "same shape" and abs(row["flops_removed"] - 0.5) <= 0.02, row
    else:
        assert row["unchanged"], row


class DropBN(nn.Module):
    """conv -> dropout -> bn -> fc: re-estimated statistics must be those eval runs (dropout off)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.bn(self.drop(self.conv(x))).mean((2, 3)))


def test_reestimate_batchnorm_gives_the_eval_networks_statistics_and_restores_flags():
    from bconv.prune import reestimate_batchnorm

    model = DropBN().train()
    model.bn.momentum = 0.3
    batches = [torch.randn(8, *SMALL) for _ in range(3)]
    with torch.no_grad():
        h = torch.cat([model.conv(x) for x in batches])  # what the BN reads with dropout off
    reestimate_batchnorm(model, ((x, torch.zeros(8)) for x in batches))
    assert torch.allclose(model.bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([model.conv(x).var((0, 2, 3)) for x in batches]).mean(0).detach()
    assert torch.allclose(model.bn.running_var, per_batch_var, atol=1e-5)  # torch's unbiased batch variances, averaged
    assert model.training and model.drop.training and model.bn.training and model.bn.momentum == 0.3


def test_reestimate_batchnorm_leaves_statistics_unchanged_on_error():
    from bconv.prune import reestimate_batchnorm

    model = DropBN().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
    with pytest.raises(ValueError, match="no batch"):
        reestimate_batchnorm(model, [])
    with pytest.raises(RuntimeError):
        reestimate_batchnorm(model, [torch.randn(2, 5, 8, 8)])  # 5 channels: the conv refuses
    assert torch.equal(model.bn.running_mean, torch.full((6,), 0.5)) and model.bn.momentum == 0.1
    assert not model.training


# --------------------------------------------------------------------------- COP as a Torch-Pruning importance


def _metapruner_cut(model: nn.Module, importance) -> list[int]:
    """One of conv1's 8 channels removed by MetaPruner (local ranking, conv2's and fc's own channels ignored)."""
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(model, torch.randn(1, *SMALL), importance=importance, pruning_ratio=1 / 8,
                                  ignored_layers=[model.conv2, model.fc])  # fmt: skip
    pruner.step()
    ((name, is_out, idxs),) = pruner.pruning_history()
    assert name == "conv1" and is_out and model.conv1.out_channels == 7
    return [int(i) for i in idxs]


@pytest.mark.parametrize("source, copy", [(2, 5), (6, 1)])
def test_cop_importance_in_metapruner_cuts_what_cop_prune_cuts(source, copy):
    model = Chain()
    with torch.no_grad():
        model.conv2.weight[:, copy] = 2 * model.conv2.weight[:, source] + 0.1
    twin = Chain()
    twin.load_state_dict(model.state_dict())
    cut = _metapruner_cut(model, COPImportance(example_inputs=torch.randn(1, *SMALL)))
    assert cut[0] in (source, copy) and cut == one_cut(twin)
    dead = Chain()
    with torch.no_grad():
        dead.conv2.weight[:, 3] = 0.0  # a dead channel goes first
    assert _metapruner_cut(dead, COPImportance(beta=0.0)) == [3]


def test_cop_importance_scores_channels_in_metapruner_global_iterative_on_torchvision():
    import torch_pruning as tp

    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, *SMALL)
    params = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MetaPruner(model, x, importance=COPImportance(example_inputs=x), pruning_ratio=0.4,
                                  global_pruning=True, iterative_steps=2, ignored_layers=[model.fc])  # fmt: skip
    after = []
    for _ in range(2):
        pruner.step()
        after.append(sum(p.numel() for p in model.parameters()))
    assert params > after[0] > after[1]
    assert model.fc.out_features == 10 and model(torch.randn(2, *SMALL)).shape == (2, 10)
    reference = [m.out_channels for m in torchvision.models.resnet18().modules() if isinstance(m, nn.Conv2d)]
    kept = [m.out_channels / r for m, r in zip([m for m in model.modules() if isinstance(m, nn.Conv2d)], reference)]
    assert max(kept) - min(kept) > 0.1  # ranked globally, with COP's cost terms: layers lose different fractions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cop_prune_and_cop_importance_run_on_a_cuda_model():
    # The greedy cut runs on the host: the redundancy matrices leave the GPU before numpy sees them.
    import torch_pruning as tp

    model = torchvision.models.resnet18(num_classes=10).cuda()
    batches = [torch.randn(4, *SMALL, device="cuda")]
    result = cop_prune(model, SMALL, ratio=0.3, metric="params", calibration=batches)
    assert result.report.params_after < result.report.params_before
    assert model(torch.randn(2, *SMALL, device="cuda")).shape == (2, 10)
    model = torchvision.models.resnet18(num_classes=10).cuda()
    x = torch.randn(1, *SMALL, device="cuda")
    pruner = tp.pruner.MetaPruner(model, x, importance=COPImportance(example_inputs=x), pruning_ratio=0.3,
                                  ignored_layers=[model.fc])  # fmt: skip
    pruner.step()
    assert model(x).shape == (1, 10) and next(model.parameters()).is_cuda


def test_cop_importance_in_metapruner_on_a_timm_model_with_grouped_convolutions():
    import torch_pruning as tp

    from bconv.prune import PRESETS

    model = zoo_model("timm:regnetx_002").eval()
    x = torch.randn(1, 3, 64, 64)
    shape = model(x).shape
    groups = {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    pruner = tp.pruner.MetaPruner(model, x, importance=COPImportance(*PRESETS["faster"], example_inputs=x),
                                  pruning_ratio=0.3, iterative_steps=2, ignored_layers=[model.get_classifier()])
    for _ in range(2):
        pruner.step()
    assert model(x).shape == shape
    for n, m in model.named_modules():
        if n in groups:  # grouped convolutions keep their group count, every group pruned alike
            assert m.groups == groups[n] and m.in_channels % m.groups == 0 == m.out_channels % m.groups


def test_cop_importance_prunes_attention_head_dims_with_metapruners_num_heads():
    # Torch-Pruning's recipe for ViTs: num_heads keeps the heads, head dims go. COP must rank the channels
    # of the attention groups (not hand MetaPruner a constant), and the pruned model must run.
    import timm
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=10)
    x = torch.randn(1, 3, 160, 160)
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    importance = COPImportance(example_inputs=x)
    scores: dict[str, Tensor] = {}

    def spy(group):
        scores[group[0].dep.target.name.split(" ")[0]] = imp = COPImportance.__call__(importance, group)
        return imp

    pruner = tp.pruner.MetaPruner(model, x, importance=spy, pruning_ratio=0.5, num_heads={m.qkv: m.num_heads for m in attention},
                                  prune_head_dims=True, prune_num_heads=False, ignored_layers=[model.head])  # fmt: skip
    pruner.step()
    for m in attention:  # the model's own bookkeeping, as in Torch-Pruning's ViT example
        m.attn_dim = m.qkv.out_features // 3
        m.head_dim = m.attn_dim // m.num_heads
    assert all(m.num_heads == 2 and m.qkv.out_features == 3 * 32 for m in attention)  # 2 heads of 32 -> of 16
    assert model(torch.randn(2, 3, 160, 160)).shape == (2, 10)
    proj = [imp for name, imp in scores.items() if name.endswith("attn.proj")]
    assert proj and all(imp.std() > 1e-3 for imp in proj)


def test_cop_importance_refuses_bad_arguments():
    import torch_pruning as tp

    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MetaPruner(model, x, importance=COPImportance(beta=1.0), pruning_ratio=0.3,
                                  ignored_layers=[model.fc])  # fmt: skip
    with pytest.raises(ValueError, match="example_inputs"):
        pruner.step()  # FLOPs need the input size: refused at the first score, before anything is pruned
    assert model.conv1.out_channels == 64
    with pytest.raises(ValueError, match="'pearson', 'cosine', 'inner'"):
        COPImportance(beta=0.0, similarity="spearman")
    with pytest.raises(ValueError, match="not all zero"):
        COPImportance(0.0, 0.0, 0.0)


def test_a_metapruner_pruned_model_saves_and_replays_from_torch_prunings_history(tmp_path):
    import torch_pruning as tp

    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, *SMALL)
    pruner = tp.pruner.MetaPruner(model, x, importance=COPImportance(example_inputs=x), pruning_ratio=0.3,
                                  ignored_layers=[model.fc])  # fmt: skip
    pruner.step()
    save_pruned(model, tmp_path / "p.pt", history=pruner.pruning_history(), input_size=SMALL)
    loaded = load_pruned(torchvision.models.resnet18(num_classes=10), tmp_path / "p.pt")
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    with pytest.raises(ValueError, match="history="):
        save_pruned(model, tmp_path / "q.pt")


def test_the_grouped_importance_needs_no_example_inputs_in_cop_prune():
    model = torchvision.models.resnet18(num_classes=10)
    result = cop_prune(model, (3, 32, 32), ratio=0.3, metric="flops", importance=COPImportance(1.0, 3.0, 0.0))
    assert result.report.achieved == pytest.approx(0.3, abs=0.02)
