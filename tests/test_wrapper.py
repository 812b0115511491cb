"""wrap_with_ptl and the PTLModel it returns: the ladder put beside any backbone's stages and run anywhere.

Wrapping (any classifier, dense prediction, the zoos), its options and argument checks, the wrapped model in a
user's loop (the state at model level, batch sizes, resolutions, dtypes), the wrapper as a stand-in for the
network (attributes, unwrap_ptl, copies), the checks it runs at every forward, gradient checkpointing, and the
other ways a model is run: DistributedDataParallel, torch.compile, torch.jit.trace and torch.export.
What the ladder computes is tests/test_ladder.py; saving and loading, tests/test_checkpoint.py.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint
from torchvision.models import detection, segmentation

import bconv
from bconv import BConvError, unwrap_ptl, wrap_with_ptl
from bconv._zoo import torchvision_names
from bconv.cells import StatefulCell

from conftest import TinyCNN, free_port, latent_tensors, stateful_cells, timm_family_params, zoo_model

SIZE = (3, 32, 32)


# --------------------------------------------------------------------------- any backbone


# Representative: residual, dense, inverted residual, ConvNeXt, NHWC Swin (torchvision and timm),
# inception (tuple outputs in training), and timm's own small models.
DEFAULT_MODELS = [
    ("torchvision:resnet18", (3, 64, 64)),
    ("torchvision:densenet121", (3, 64, 64)),
    ("torchvision:efficientnet_b0", (3, 64, 64)),
    ("torchvision:convnext_tiny", (3, 64, 64)),
    ("torchvision:swin_t", (3, 64, 64)),
    ("torchvision:mobilenet_v3_small", (3, 64, 64)),
    ("torchvision:regnet_y_400mf", (3, 64, 64)),
    ("timm:test_resnet", (3, 64, 64)),
    ("timm:test_efficientnet", (3, 64, 64)),
    ("timm:test_convnext", (3, 64, 64)),
    ("timm:swin_tiny_patch4_window7_224", (3, 224, 224)),
]


def _train_step(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> torch.Tensor:
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    loss = logits.float().pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.detach_state()
    return loss


@pytest.mark.parametrize("spec,input_size", DEFAULT_MODELS, ids=[m for m, _ in DEFAULT_MODELS])
def test_wrapped_model_is_function_preserving_and_trains(spec, input_size):
    model = zoo_model(spec).eval()
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        expected = model(x)
    wrapped = wrap_with_ptl(model, input_size=input_size).eval()
    with torch.no_grad():
        got = wrapped(x)
    got, expected = tree_leaves(got), tree_leaves(expected)
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected)), "exactly the original"

    # Training in the user's loop: the first step moves the silenced cell, the next ones reach every cell.
    wrapped.train()
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    for _ in range(3):
        _train_step(wrapped, x, opt)
    assert all(c.c_prev is not None for c in stateful_cells(wrapped)), "every cell stored a state"
    grads = [p.grad for p in wrapped.ptl.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads[:-1])


def test_a_users_own_cnn_is_wrapped_at_its_three_stages():
    model = TinyCNN()
    wrapped = wrap_with_ptl(model, input_size=(3, 32, 32))
    assert [s.name for s in wrapped.stages] == ["stem", "stage1", "stage2"]
    assert wrapped(torch.randn(3, 3, 32, 32)).shape == (3, 5)


def test_inception_returns_its_auxiliary_outputs_in_training():
    model = zoo_model("torchvision:inception_v3")
    wrapped = wrap_with_ptl(model, input_size=(3, 299, 299)).train()
    out = wrapped(torch.randn(2, 3, 299, 299))
    assert type(out).__name__ == "InceptionOutputs" and out.logits.shape == out.aux_logits.shape == (2, 1000)
    out.logits.sum().backward()


@pytest.mark.slow  # the whole torchvision zoo
@pytest.mark.parametrize("name", torchvision_names())
def test_every_torchvision_classifier_wraps(name):
    from bconv._zoo import torchvision_input_size
    from bconv.errors import NoSpatialStagesError

    model = zoo_model(f"torchvision:{name}").eval()
    input_size = torchvision_input_size(name, model)
    try:
        wrapped = wrap_with_ptl(model, input_size=input_size)
    except NoSpatialStagesError:
        pytest.skip("no spatial stages (ViT)")
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(x), unwrap_ptl(copy.deepcopy(wrapped)).eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # a model of every timm family
@pytest.mark.parametrize("family,name", timm_family_params())
def test_one_model_of_every_timm_family_wraps(family, name):
    from bconv.errors import NoSpatialStagesError

    model = zoo_model(f"timm:{name}").eval()
    input_size = tuple(model.pretrained_cfg["input_size"])
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        expected = model(x)
    try:
        wrapped = wrap_with_ptl(model, input_size=input_size)
    except NoSpatialStagesError:
        pytest.skip("no spatial stages (ViT-like)")
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(x), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------- dense prediction: segmentation and a detector's backbone


DENSE_SIZE = (3, 64, 64)


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
    x, target = torch.randn(batch, *DENSE_SIZE), torch.randint(0, 3, (batch, *DENSE_SIZE[1:]))

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
    wrapped = wrap_with_ptl(model, input_size=DENSE_SIZE)
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
    wrapped = wrap_with_ptl(model, stages=[f"{s}.block.0" for s in stages], input_size=DENSE_SIZE)
    _assert_ladder_trained(wrapped, _segmentation_loss(wrapped))


def test_timm_features_only_backbone_trains():
    model = timm.create_model("resnet18", pretrained=False, features_only=True)
    wrapped = wrap_with_ptl(model, input_size=DENSE_SIZE)
    assert [s.name for s in wrapped.stages] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    x = torch.randn(2, *DENSE_SIZE)

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
    det.backbone.body = wrap_with_ptl(body, input_size=DENSE_SIZE)
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


# --------------------------------------------- options: one declaration, PTLConfig; argument checks of wrap_with_ptl


def test_a_config_and_keywords_build_the_same_wrapper():
    from bconv import PTLConfig

    by_keywords = wrap_with_ptl(TinyCNN(), input_size=(3, 16, 16), cell="v2", state_mode="pooled")
    by_config = wrap_with_ptl(TinyCNN(), config=PTLConfig(input_size=(3, 16, 16), cell="v2", state_mode="pooled"))
    mixed = wrap_with_ptl(TinyCNN(), config=PTLConfig(cell="v1", state_mode="pooled"), input_size=(3, 16, 16), cell="v2")
    assert by_keywords.config == by_config.config == mixed.config
    assert by_config.config.stages == ("stem", "stage1", "stage2")


def test_an_unknown_option_is_named_with_the_closest_known_one():
    from bconv import ConfigError

    model = TinyCNN()
    with pytest.raises(ConfigError, match=r"wrap_with_ptl has no option 'cell_with'. Did you mean cell_width\?"):
        wrap_with_ptl(model, cell_with=0.5)
    with pytest.raises(ConfigError, match=r"options are keywords: wrap_with_ptl\(model, stages, cell='v2'\)"):
        wrap_with_ptl(model, None, "v2")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_option_errors_are_bconv_errors_and_value_errors_listing_the_choices_from_the_annotation():
    import typing

    from bconv import BConvError, ConfigError, PTLConfig
    from bconv.ptl.config import CellVersion

    with pytest.raises(ConfigError) as info:
        PTLConfig(cell="v3")
    assert isinstance(info.value, BConvError) and isinstance(info.value, ValueError)
    assert str(info.value) == "cell='v3' is not one of " + ", ".join(map(repr, typing.get_args(CellVersion)))
    with pytest.raises(ConfigError, match="detach must be True or False"):
        PTLConfig(detach=1)


def test_the_cells_take_the_state_options_declared_once():
    import dataclasses

    from bconv.cells import BConvCell, StateOptions
    from bconv import PTLConfig

    state_fields = {f.name: f.default for f in dataclasses.fields(StateOptions)}
    assert {f.name: f.default for f in dataclasses.fields(PTLConfig) if f.name in state_fields} == state_fields
    cell = BConvCell(3, 4, 2, state_mode="pooled", detach=False)
    assert (cell.state_mode, cell.detach, cell.on_size_change) == ("pooled", False, StateOptions.on_size_change)
    wrapped = wrap_with_ptl(TinyCNN(), input_size=(3, 16, 16), state_mode="pooled", on_size_change="raise")
    assert {(c.state_mode, c.on_size_change) for c in wrapped.ptl.modules() if isinstance(c, BConvCell)} == {("pooled", "raise")}


def test_the_readme_options_example_runs_as_written(capsys):
    from conftest import docs_block

    exec(docs_block("guides/ptl-loop.md", "## Options: `PTLConfig`"), {})
    assert capsys.readouterr().out.startswith("('layer3', 'layer4') v2")


@pytest.mark.parametrize(
    "stages,expected",
    [
        (None, ["relu", "layer1", "layer2", "layer3", "layer4"]),
        ([-1], ["layer4"]),
        ([3, "layer1"], ["layer1", "layer3"]),  # unordered: the network fixes the order
        ("layer2", ["layer2"]),
    ],
)
def test_stage_selection(stages, expected):
    wrapped = wrap_with_ptl(zoo_model("torchvision:resnet18"), stages=stages, input_size=(3, 32, 32))
    assert [s.name for s in wrapped.stages] == expected


@pytest.mark.parametrize(
    "stages,message",
    [
        ([7], r"stage index 7 is out of range for 5 stages. Valid stages: 0: relu.*python -m bconv.inspect"),
        (["layer9"], r"'layer9' is not a module of the model. Valid stages: .*4: layer4"),
        (["layer1.0"], r"'layer1.0' is a module of the model but not a stage"),
        ([1, "layer1"], r"stage 1 \(layer1\) is chosen twice"),
        ([], "stages is empty"),
        ([1.5], "must hold stage indices or names"),
    ],
)
def test_bad_stage_choices_are_clear_value_errors(stages, message):
    with pytest.raises(ValueError, match=message):
        wrap_with_ptl(zoo_model("torchvision:resnet18"), stages=stages, input_size=(3, 32, 32))


def test_bad_options_are_clear_errors():
    model = zoo_model("torchvision:resnet18")
    with pytest.raises(ValueError, match="cell='v3' is not one of 'v1', 'v2'"):
        wrap_with_ptl(model, cell="v3", input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="cell_width must be a fraction"):
        wrap_with_ptl(model, cell_width=0, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="needs state_mode='pooled'"):
        wrap_with_ptl(model, sync_state=True, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="final_init"):
        wrap_with_ptl(model, final_init="zeros", input_size=(3, 32, 32))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_wrapping_twice_is_refused():
    model = zoo_model("torchvision:resnet18")
    wrapped = wrap_with_ptl(model, input_size=(3, 32, 32))
    with pytest.raises(BConvError, match="already wrapped"):
        wrap_with_ptl(wrapped, input_size=(3, 32, 32))
    with pytest.raises(BConvError, match="already wrapped"):
        wrap_with_ptl(model, input_size=(3, 32, 32))


# -------------------------------------- in a user's loop: the state at model level, batch sizes, resolutions, dtypes


def test_state_carries_across_batches_and_eval_ignores_it():
    model = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32), final_init="paper")
    a, b = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        model(a)
        after_a = model(b)
        model.reset_state()
        fresh = model(b)
    assert not torch.allclose(after_a, fresh), "the state of batch a must change the output on batch b"
    with torch.no_grad():
        model.train()
        model(a)  # a training state now exists (and BN statistics moved)
        model.eval()
        with_history = model(b)
        alone = model(b[:1])
        model.reset_state()
        without_history = model(b)
    torch.testing.assert_close(with_history, without_history)  # eval reads no history
    torch.testing.assert_close(alone, with_history[:1], rtol=1e-4, atol=1e-5)  # nor the batch companions


def _trained_default(**options) -> nn.Module:
    torch.manual_seed(0)
    wrapped = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), **options)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    for _ in range(2):  # move off the exact start, so the cells contribute
        wrapped.train()(torch.randn(4, 3, 32, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return wrapped.eval()


def test_eval_output_of_the_default_ladder_is_independent_of_batch_companions():
    wrapped = _trained_default()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        together = wrapped(x)
        alone = torch.cat([wrapped(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone)


def test_batch_size_changes_never_crash():
    model = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 64, 64)).train()
    for batch in (4, 3, 5, 1, 4):
        assert model(torch.randn(batch, 3, 64, 64)).shape == (batch, 1000)


def test_resolution_change_follows_the_cells_policy():
    model = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32)).train()
    model(torch.randn(2, 3, 32, 32))
    with pytest.warns(UserWarning, match="spatial size of its state changed"):
        model(torch.randn(2, 3, 64, 64))
    strict = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32), on_size_change="raise").train()
    strict(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="reset_state"):
        strict(torch.randn(2, 3, 64, 64))


def test_reset_and_detach_reach_every_cell():
    model = wrap_with_ptl(zoo_model("torchvision:resnet18"), cell="v2", input_size=(3, 32, 32), detach=False).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    cells = stateful_cells(model)
    assert len(cells) == 5  # one stride-2 cell per stage: image -> r2 -> r4 -> ... -> r32
    assert all(c.c_prev.grad_fn is not None for c in cells)
    model.detach_state()
    assert all(c.c_prev.grad_fn is None and c.y_prev is not None for c in cells)
    model.reset_state()
    assert all(c.c_prev is None and c.y_prev is None for c in cells)


@pytest.mark.parametrize("cell", ["v1", "v2"])
def test_an_empty_batch_leaves_the_pooled_state_as_it_was(cell):
    model = wrap_with_ptl(TinyCNN(), input_size=SIZE, cell=cell, state_mode="pooled").train()
    model(torch.randn(4, *SIZE))
    before = {k: v.clone() for k, v in latent_tensors(model).items()}
    assert model(torch.randn(0, *SIZE)).shape == (0, 5)
    after = latent_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.isfinite(model(torch.randn(4, *SIZE))).all()


def test_an_empty_first_batch_leaves_no_state():
    model = wrap_with_ptl(TinyCNN(), input_size=SIZE, state_mode="pooled").train()
    model(torch.randn(0, *SIZE))
    assert all(v is None for v in latent_tensors(model).values())


def test_an_empty_batch_on_every_rank_leaves_the_synced_state_as_it_was(tmp_path):
    # sync_state averages over the samples of all ranks: when no rank has one, nothing is averaged.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = wrap_with_ptl(TinyCNN(), input_size=SIZE, state_mode="pooled", sync_state=True).train()
        model(torch.randn(4, *SIZE))
        before = {k: v.clone() for k, v in latent_tensors(model).items()}
        model(torch.randn(0, *SIZE))
        assert all(torch.equal(before[k], v) for k, v in latent_tensors(model).items())
        assert torch.isfinite(model(torch.randn(4, *SIZE))).all()
    finally:
        dist.destroy_process_group()


def test_a_training_forward_under_inference_mode_is_handled_as_under_no_grad():
    model = wrap_with_ptl(TinyCNN(), input_size=SIZE).train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, *SIZE)
    with torch.inference_mode():
        model(x)
    with torch.no_grad():
        twin(x)
    ours, theirs = latent_tensors(model), latent_tensors(twin)
    assert all(not v.is_inference() and torch.equal(v, theirs[k]) for k, v in ours.items())
    loss = model(torch.randn(4, *SIZE)).sum()
    loss.backward()  # the stored state is usable by autograd
    assert model.model.head.weight.grad is not None


def test_bf16_autocast_on_cpu():
    wrapped = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32), final_init="paper").train()
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.01)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = wrapped(torch.randn(2, 3, 32, 32))
        assert out.dtype == torch.bfloat16
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(c.c_prev).all() for c in stateful_cells(wrapped))


def test_channels_last_and_bf16_autocast_on_the_default_ladder():
    wrapped = _trained_default().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = wrapped(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = wrapped.train()(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert torch.isfinite(reference).all()


# -------------------------------------------------------- a stand-in for the network: attributes, unwrap_ptl, copies


def test_original_attributes_stay_reachable_torchvision():
    model = zoo_model("torchvision:resnet18")
    wrapped = wrap_with_ptl(model, input_size=(3, 32, 32))
    assert wrapped.fc is model.fc and wrapped.layer4 is model.layer4
    with pytest.raises(AttributeError, match="no_such_thing"):
        wrapped.no_such_thing  # noqa: B018


def test_original_attributes_stay_reachable_timm():
    model = timm.create_model("test_resnet", pretrained=False)
    wrapped = wrap_with_ptl(model, input_size=(3, 64, 64))
    assert wrapped.pretrained_cfg is model.pretrained_cfg
    wrapped.reset_classifier(7)
    assert wrapped(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    wrapped.train()
    feats = wrapped.forward_features(torch.randn(2, 3, 64, 64))
    assert feats.dim() == 4
    assert all(c.c_prev is not None for c in stateful_cells(wrapped)), "forward_features ran the ladder"


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


@pytest.mark.parametrize("name", ["model", "ptl", "adapter"])
def test_the_wrappers_network_and_ladder_cannot_be_replaced(name):
    wrapped = wrap_with_ptl(TinyCNN(), input_size=SIZE)
    original = getattr(wrapped, name)
    with pytest.raises(bconv.WrappedModelError, match=rf"`{name}` cannot be replaced.*wrap_with_ptl\(other\)"):
        setattr(wrapped, name, TinyCNN())
    with pytest.raises(bconv.WrappedModelError):
        delattr(wrapped, name)
    assert getattr(wrapped, name) is original
    assert wrapped(torch.randn(2, *SIZE)).shape == (2, 5)


def test_unwrap_restores_the_original_network():
    model = zoo_model("torchvision:resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    wrapped = wrap_with_ptl(model, input_size=(3, 32, 32), final_init="paper")
    original = unwrap_ptl(wrapped)
    assert original is model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(isinstance(m, StatefulCell) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="needs a model returned by wrap_with_ptl"):
        unwrap_ptl(model)


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


def test_a_deep_copy_is_a_wrapper_of_its_own():
    import copy

    wrapped = wrap_with_ptl(TinyCNN(), input_size=SIZE)
    twin = copy.deepcopy(wrapped)
    network = unwrap_ptl(twin)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in network.modules())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in wrapped.model.modules()) == 5  # image, 3 stages, end
    x = torch.randn(2, *SIZE)
    wrapped(x)
    assert all(s["c_prev"] is not None for s in wrapped.latent_state_dict().values()), "the original still runs its ladder"


# ---------------------------------------- the checks at every forward: stages that did not run, ran twice or changed


class Pair(nn.Module):
    """A stage that is not a plain Sequential: a network may call its children instead of it."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return self.b(self.a(x))


class BypassNet(nn.Module):
    """Three stages; ``bypass`` names a stage whose children the forward calls directly (after wrapping)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.stage1 = Pair(8, 16)
        self.stage2 = Pair(16, 32)
        self.head = nn.Linear(32, 5)
        self.bypass = ""

    def _run(self, name: str, x):
        stage = getattr(self, name)
        return stage.b(stage.a(x)) if self.bypass == name else stage(x)

    def forward_features(self, x):
        return self._run("stage2", self._run("stage1", self.stem(x)))

    def forward(self, x):
        return self.head(self.forward_features(x).mean((2, 3)))


def _wrapped_bypass_net() -> tuple[nn.Module, BypassNet]:
    net = BypassNet()
    wrapped = wrap_with_ptl(net, input_size=(3, 32, 32))
    assert [s.name for s in wrapped.stages] == ["stem", "stage1", "stage2"]
    return wrapped, net


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bypassed", ["stage1", "stage2"], ids=["middle", "last"])
def test_a_bypassed_stage_is_an_error_naming_it(bypassed, train):
    wrapped, net = _wrapped_bypass_net()
    wrapped.train(train)
    x = torch.randn(2, 3, 32, 32)
    wrapped(x)  # the stages run as modules: fine
    net.bypass = bypassed
    message = rf"paired stage `{bypassed}` did not run .*bypassed.*checkpointing"
    with pytest.raises(BConvError, match=message):
        wrapped(x)
    with pytest.raises(BConvError, match=message):
        wrapped.forward_features(x)  # a method of the original reached through the wrapper
    with pytest.raises(BConvError, match=message):
        wrapped.model(x)  # the network called directly
    net.bypass = ""
    assert wrapped(x).shape == (2, 5), "a failed check leaves the next forward clean"


def test_a_forward_that_skips_every_hook_of_the_network_is_caught_at_the_next_forward():
    wrapped, net = _wrapped_bypass_net()
    net.bypass = "stage2"
    x = torch.randn(2, 3, 32, 32)
    net.forward(x)  # not net(x): no hook of the network itself runs at the end of this pass
    net.bypass = ""
    with pytest.raises(BConvError, match="`stage2` did not run in the previous forward"):
        wrapped(x)
    assert wrapped(x).shape == (2, 5)


def test_wrapping_a_network_that_never_runs_a_chosen_stage_is_refused():
    class TracedOneWayRunOther(BypassNet):
        def forward_features(self, x):  # fx sees stage2 called; a real forward calls its children
            self.bypass = "" if torch.fx._symbolic_trace.is_fx_tracing() else "stage2"
            return super().forward_features(x)

    net = TracedOneWayRunOther()
    with pytest.raises(BConvError, match="paired stage `stage2` did not run in this forward"):
        wrap_with_ptl(net, input_size=(3, 32, 32))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules()), "the model is left as it was"


def test_a_stage_whose_blocks_are_called_directly_still_feeds_the_ladder():
    # A Sequential stage is read at its last block: calling the blocks one by one (timm's checkpoint_seq with
    # flatten=True, a user's loop) gives the same output as calling the stage.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    wrapped = wrap_with_ptl(net, input_size=(3, 32, 32), final_init="paper").eval()
    assert wrapped.adapter.tap_names[-1] == "1.2"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = wrapped(x)
        h = x
        for block in (*net[0], *net[1], *net[2:]):
            h = block(h)
        wrapped.adapter.end()
    torch.testing.assert_close(h, expected)


def test_an_error_inside_a_forward_does_not_fail_the_next_one():
    wrapped, net = _wrapped_bypass_net()
    with pytest.raises(RuntimeError):
        wrapped(torch.randn(2, 5, 32, 32))  # wrong channels: fails in the stem, after the image tap fired
    with pytest.raises(RuntimeError):
        wrapped.model(torch.randn(2, 5, 32, 32))
    assert wrapped(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_a_stage_that_runs_twice_in_a_forward_is_an_error():
    model = zoo_model("torchvision:resnet18")
    wrapped = wrap_with_ptl(model, input_size=(3, 32, 32))

    def forward_with_layer2_twice(x):  # e.g. a user's test-time augmentation inside forward
        x = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
        x = model.layer2(x) + model.layer2(x)
        return model.fc(torch.flatten(model.avgpool(model.layer4(model.layer3(x))), 1))

    model.forward = forward_with_layer2_twice
    with pytest.raises(BConvError, match="stage `layer2` ran again in one forward"):
        wrapped(torch.randn(2, 3, 32, 32))


def test_a_stage_whose_output_changed_after_wrapping_is_an_error_naming_it_and_both_shapes():
    wrapped = wrap_with_ptl(TinyCNN(), input_size=SIZE)
    wrapped(torch.randn(2, *SIZE))
    wrapped.model.stage1[0].stride = (1, 1)  # stage1 no longer halves the resolution
    with pytest.raises(BConvError, match=r"stage `stage1` returned a map of shape \(2, 16, 16, 16\).*measured \[batch, 16, 8, 8\] for a 32x32 image"):
        wrapped(torch.randn(2, *SIZE))
    wrapped.model.stage1[0].stride = (2, 2)
    assert wrapped(torch.randn(2, *SIZE)).shape == (2, 5), "a failed check leaves the next forward clean"


def test_a_stage_whose_channels_changed_is_an_error_not_a_torch_shape_error():
    wrapped = wrap_with_ptl(TinyCNN(), input_size=SIZE)
    wrapped.model.stage2[0] = nn.Conv2d(16, 24, 3, stride=2, padding=1)  # the stage's hook stays on stage2.1
    wrapped.model.head = nn.Linear(24, 5)
    with pytest.raises(BConvError, match=r"`stage2`.*\(2, 24, 4, 4\).*measured \[batch, 32, 4, 4\]"):
        wrapped(torch.randn(2, *SIZE))


def test_another_input_size_and_unpadded_stages_still_pass_the_shape_check():
    wrapped = wrap_with_ptl(torchvision.models.inception_v3(init_weights=False, aux_logits=False), input_size=(3, 299, 299))
    wrapped.eval()
    with torch.no_grad():
        assert wrapped(torch.randn(1, 3, 320, 288)).shape == (1, 1000)


def test_dataparallel_is_detected_with_ddp_as_the_answer():
    wrapped = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32))
    replica = copy.deepcopy(wrapped)
    replica._is_replica = True  # what torch.nn.parallel.replicate sets on every replica
    with pytest.raises(BConvError, match="DataParallel.*DistributedDataParallel"):
        replica(torch.randn(2, 3, 32, 32))
    with pytest.raises(BConvError, match="DistributedDataParallel"):
        wrap_with_ptl(nn.DataParallel(zoo_model("torchvision:resnet18")), input_size=(3, 32, 32))


# --------------------------------------------------------------------------- gradient checkpointing


def _count_cell_calls(model: nn.Module) -> dict:
    calls = {"n": 0}
    for m in model.modules():
        if isinstance(m, StatefulCell):
            m.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def _assert_same_training(plain: nn.Module, ckpt: nn.Module, input_size: tuple, steps: int = 3, batch: int = 2) -> None:
    """Train both side by side: the same losses and gradients, cells run once per forward, state carried."""
    n_cells = sum(isinstance(m, StatefulCell) for m in ckpt.modules())
    calls = _count_cell_calls(ckpt)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, ckpt)]
    plain.train()
    ckpt.train()
    for step in range(steps):
        x, y = torch.randn(batch, *input_size), torch.randint(0, 5, (batch,))
        losses = []
        for model, opt in zip((plain, ckpt), opts):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            losses.append(loss)
        assert calls["n"] == n_cells * (step + 1), "every cell runs once per forward, never in the recompute"
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=f"gradient of {name}")
        assert all(p.grad.abs().sum() > 0 for p in ckpt.ptl.parameters()), "the loss reaches every ladder parameter"
        for opt in opts:
            opt.step()
    for a, b in zip(plain.modules(), ckpt.modules()):
        if isinstance(a, StatefulCell):
            torch.testing.assert_close(b.c_prev, a.c_prev)


@pytest.mark.parametrize(
    "name",
    [
        "test_resnet",  # checkpoint_seq(flatten=True) over layer1..layer4: the stage modules never run
        pytest.param("test_efficientnet", marks=pytest.mark.slow),  # flatten=True over blocks
        "test_convnext",  # blocks checkpointed inside each stage module
        pytest.param("resnet26d", marks=pytest.mark.slow),
    ],
)
def test_timm_grad_checkpointing_is_exact(name):
    model = timm.create_model(name, pretrained=False, num_classes=5)
    plain = wrap_with_ptl(model, input_size=(3, 64, 64), final_init="paper")
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    recomputed = {"n": 0}
    last_block = dict(ckpt.model.named_modules())[ckpt.adapter.tap_names[-1]]
    last_block.register_forward_pre_hook(lambda *_: recomputed.__setitem__("n", recomputed["n"] + 1))
    _assert_same_training(plain, ckpt, (3, 64, 64))
    if name != "test_convnext":
        assert recomputed["n"] == 6, "checkpointing entered the last stage's block again in each backward"


class CheckpointNet(nn.Module):
    """A user's net that checkpoints its blocks, and a last region running past the last stage into the head."""

    def __init__(self, reentrant: bool = False):
        super().__init__()
        self.reentrant = reentrant
        self.ckpt = False
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = Pair(8, 16)
        self.stage2 = nn.Sequential(Pair(16, 32), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))

    def _tail(self, x):
        return self.head(self.stage2[2](self.stage2[1](x)))

    def forward(self, x):
        if not self.ckpt:
            return self.head(self.stage2(self.stage1(self.stem(x))))
        run = lambda f, *a: checkpoint(f, *a, use_reentrant=self.reentrant)  # noqa: E731
        x = run(self.stem, x)  # the image tap is inside a checkpoint too
        x = run(self.stage1, x)  # a whole (non-Sequential) stage
        x = run(self.stage2[0], x)
        return run(self._tail, x)  # the last stage's last blocks and the head in one region


def test_torch_checkpoint_around_blocks_in_a_users_net_is_exact():
    plain = wrap_with_ptl(CheckpointNet(), input_size=(3, 32, 32), final_init="paper")
    assert [s.name for s in plain.stages] == ["stem", "stage1", "stage2"]
    ckpt = copy.deepcopy(plain)
    ckpt.model.ckpt = True
    _assert_same_training(plain, ckpt, (3, 32, 32), batch=3)


def test_two_forwards_before_backward_through_a_checkpoint_past_the_last_stage_is_an_error():
    wrapped = wrap_with_ptl(CheckpointNet(), input_size=(3, 32, 32)).train()
    wrapped.model.ckpt = True
    loss = wrapped(torch.randn(2, 3, 32, 32)).sum() + wrapped(torch.randn(2, 3, 32, 32)).sum()
    with pytest.raises(BConvError, match="more than one training forward"):
        loss.backward()


REENTRANT_WARNING = pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")


@REENTRANT_WARNING
def test_reentrant_checkpointing_is_refused_at_the_first_forward():
    wrapped = wrap_with_ptl(CheckpointNet(reentrant=True), input_size=(3, 32, 32)).train()
    wrapped.model.ckpt = True
    before = copy.deepcopy(wrapped.state_dict())
    with pytest.raises(BConvError, match=r"checkpoint with use_reentrant=True.*use_reentrant=False"):
        wrapped(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(v, before[k]) for k, v in wrapped.state_dict().items() if "num_batches" not in k)
    assert all(c.c_prev is None for c in wrapped.modules() if isinstance(c, StatefulCell)), "no state written"
    with torch.no_grad():
        wrapped.eval()(torch.randn(2, 3, 32, 32))  # no training: nothing to lose, allowed


@REENTRANT_WARNING
@pytest.mark.xfail(
    strict=True,
    raises=BConvError,
    reason="reentrant checkpointing runs the stage without autograd, so the ladder's side branch cannot be "
    "connected to the graph; bconv refuses it (use_reentrant=False is supported exactly)",
)
def test_reentrant_checkpointing_is_exact():
    plain = wrap_with_ptl(CheckpointNet(reentrant=True), input_size=(3, 32, 32), final_init="paper")
    ckpt = copy.deepcopy(plain)
    ckpt.model.ckpt = True
    _assert_same_training(plain, ckpt, (3, 32, 32))


def test_other_saved_tensor_hooks_see_the_ladders_tensors():
    # Only a checkpoint's hooks are kept away from the ladder: save_on_cpu or a user's own hooks see everything.
    wrapped, _ = _wrapped_bypass_net()
    ladder_params = {p.data_ptr() for p in wrapped.ptl.parameters() if p.dim() > 1}  # biases are not saved
    seen = []

    def pack(t):
        seen.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        wrapped.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert ladder_params <= set(seen), "every ladder weight saved for backward passed through the user's hook"


# ---------------------------------------------------------- DistributedDataParallel (two gloo processes on loopback)


DDP_MODES = {
    "per_sample": dict(),
    "pooled": dict(state_mode="pooled"),
    "pooled_sync": dict(state_mode="pooled", sync_state=True),
}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for mode, options in DDP_MODES.items():
            torch.manual_seed(0)  # the same initial weights on every rank
            wrapped = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), **options)  # the default ladder
            ddp = DDP(wrapped)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            torch.manual_seed(100 + rank)  # each rank its own shard, of its own batch size
            losses = []
            for _ in range(3):
                loss = ddp(torch.randn(4 + rank, 3, 32, 32)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                wrapped.detach_state()
                losses.append(loss.item())
            flat = torch.cat([p.detach().flatten() for p in wrapped.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            results[mode] = {
                "params_in_sync": all(torch.equal(g, gathered[0]) for g in gathered),
                "states": [c.c_prev.clone() for c in stateful_cells(wrapped)],
                "losses": losses,
            }
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch and bconv: about 25 s on two busy cores
def test_ddp_with_two_gloo_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for mode in DDP_MODES:
        assert r0[mode]["params_in_sync"] and r1[mode]["params_in_sync"], mode
        assert all(torch.isfinite(torch.tensor(r[mode]["losses"])).all() for r in (r0, r1))
    # Per-sample: each rank keeps its own slots (4 on rank 0, 5 on rank 1).
    assert [s.shape[0] for s in r0["per_sample"]["states"]] == [4] * 3
    assert [s.shape[0] for s in r1["per_sample"]["states"]] == [5] * 3
    # Pooled: one state per cell; without sync each rank summarises its own shard...
    assert all(s.shape[0] == 1 for s in r0["pooled"]["states"])
    assert not all(torch.allclose(a, b) for a, b in zip(r0["pooled"]["states"], r1["pooled"]["states"]))
    # ...with sync_state both ranks hold the same summary of all the data.
    for a, b in zip(r0["pooled_sync"]["states"], r1["pooled_sync"]["states"]):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------- torch.compile, torch.jit.trace, torch.export


def _compiled_and_eager(final_init: str = "paper"):
    torch.manual_seed(0)
    eager = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), final_init=final_init)
    if final_init == "identity":  # as after some training: the silenced cell contributes
        torch.nn.init.normal_(eager.ptl.cells[-1][-1].conv.weight, std=0.3)
    compiled_module = copy.deepcopy(eager)
    return eager, compiled_module, torch.compile(compiled_module, fullgraph=True)  # no graph breaks


@pytest.mark.slow  # compiling takes tens of seconds on CPU
@pytest.mark.parametrize("final_init", ["identity", "paper"])
def test_torch_compile_matches_eager_over_training_batches_and_eval(final_init):
    eager, module, compiled = _compiled_and_eager(final_init)
    eager.train()
    module.train()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    for x in batches:
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
        module.detach_state()
        eager.detach_state()
    for a, b in zip(stateful_cells(module), stateful_cells(eager)):
        torch.testing.assert_close(a.c_prev, b.c_prev, rtol=1e-4, atol=1e-5)
    eager.eval()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(batches[0]), eager(batches[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # compiling takes tens of seconds on CPU
def test_torch_compile_backward_matches_eager():
    eager, module, compiled = _compiled_and_eager()
    x = torch.randn(4, 3, 32, 32)
    for m, f in ((eager, eager), (module, compiled)):
        m.train()
        f(x)  # a first batch leaves a state
        f(x).pow(2).mean().backward()
    for (name, a), b in zip(eager.named_parameters(), module.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_jit_trace_and_torch_export_of_the_default_ladder_match_eager():
    wrapped = _trained_default()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = wrapped(x)
        traced = torch.jit.trace(wrapped, x, check_trace=False)
        torch.testing.assert_close(traced(x), expected)
        exported = torch.export.export(wrapped, (x,))
        torch.testing.assert_close(exported.module()(x), expected)
