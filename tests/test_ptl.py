"""wrap_with_ptl: the ladder on any backbone, in a user's training loop, saved, loaded and unwrapped."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import timm
from bconv import BConvError, unwrap_ptl, wrap_with_ptl
from bconv.cells import BConvCellV2, StatefulCell
from bconv._zoo import torchvision_names

from conftest import TinyCNN, timm_family_params, zoo_model

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


def _cells(model: nn.Module) -> list[StatefulCell]:
    return [m for m in model.modules() if isinstance(m, StatefulCell)]


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
    assert all(c.c_prev is not None for c in _cells(wrapped)), "every cell stored a state"
    grads = [p.grad for p in wrapped.ptl.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads[:-1])


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
    cells = _cells(model)
    assert len(cells) == 5  # one stride-2 cell per stage: image -> r2 -> r4 -> ... -> r32
    assert all(c.c_prev.grad_fn is not None for c in cells)
    model.detach_state()
    assert all(c.c_prev.grad_fn is None and c.y_prev is not None for c in cells)
    model.reset_state()
    assert all(c.c_prev is None and c.y_prev is None for c in cells)


def test_ladder_shapes_follow_the_stages():
    model = zoo_model("torchvision:resnet50")
    wrapped = wrap_with_ptl(model, stages=["layer2", "layer4"], cell="v2", input_size=(3, 64, 64))
    assert [s.name for s in wrapped.stages] == ["layer2", "layer4"]
    chain0, chain1 = wrapped.ptl.cells
    # image (r1) -> layer2 (r8): three stride-2 cells; layer2 -> layer4 (r32): two more.
    assert [c.stride for c in chain0] == [2, 2, 2] and [c.stride for c in chain1] == [2, 2]
    assert all(isinstance(c, BConvCellV2) for c in (*chain0, *chain1))
    assert chain0[0].in_channels == 3 and chain0[-1].out_channels == 64  # 512 / 8
    assert wrapped.ptl.fuses[0].in_channels == 512 + 64 and wrapped.ptl.fuses[0].out_channels == 64
    assert chain1[0].in_channels == 64 and chain1[-1].out_channels == 256
    assert (wrapped.ptl.final_fuse.in_channels, wrapped.ptl.final_fuse.out_channels) == (2048 + 256, 2048)


def test_overhead_on_resnet50_next_to_the_papers():
    base = sum(p.numel() for p in zoo_model("torchvision:resnet50").parameters())
    added = {
        init: sum(p.numel() for p in wrap_with_ptl(zoo_model("torchvision:resnet50"), input_size=(3, 64, 64),
                                                   final_init=init).ptl.parameters())
        for init in ("identity", "paper")
    }
    # The released layout (a (C + C/8) -> C normalised final fusion) costs what the paper reports: 28M -> 35M.
    assert 0.15 <= added["paper"] / base <= 0.40, f"+{added['paper'] / base:.0%} (paper: +25%)"
    # The default's final fusion is a C/8 -> C projection beside a fixed identity: about a third of that.
    assert 0.05 <= added["identity"] / base < added["paper"] / base / 2


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


def test_paper_init_is_not_function_preserving():
    model = zoo_model("torchvision:resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = wrap_with_ptl(model, input_size=(3, 32, 32), final_init="paper").eval()(x)
    assert not torch.allclose(got, expected)


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
    assert feats.dim() == 4 and all(c.c_prev is not None for c in _cells(wrapped)), "forward_features ran the ladder"


def test_inception_returns_its_auxiliary_outputs_in_training():
    model = zoo_model("torchvision:inception_v3")
    wrapped = wrap_with_ptl(model, input_size=(3, 299, 299)).train()
    out = wrapped(torch.randn(2, 3, 299, 299))
    assert type(out).__name__ == "InceptionOutputs" and out.logits.shape == out.aux_logits.shape == (2, 1000)
    out.logits.sum().backward()


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


def test_wrapping_twice_is_refused():
    model = zoo_model("torchvision:resnet18")
    wrapped = wrap_with_ptl(model, input_size=(3, 32, 32))
    with pytest.raises(BConvError, match="already wrapped"):
        wrap_with_ptl(wrapped, input_size=(3, 32, 32))
    with pytest.raises(BConvError, match="already wrapped"):
        wrap_with_ptl(model, input_size=(3, 32, 32))


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


def test_state_dict_keys_and_loading():
    model = zoo_model("torchvision:resnet18")
    plain = copy.deepcopy(model.state_dict())
    wrapped = wrap_with_ptl(model, input_size=(3, 32, 32), final_init="paper").train()
    wrapped(torch.randn(2, 3, 32, 32))  # a state exists now; it must stay out of the state dict
    sd = wrapped.state_dict()
    assert {k for k in sd if k.startswith("model.")} == {f"model.{k}" for k in plain}
    assert set(sd) - {f"model.{k}" for k in plain} == {k for k in sd if k.startswith("ptl.")} | {"_extra_state"}
    assert not any("c_prev" in k or "y_prev" in k for k in sd)

    twin = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32), final_init="paper")
    twin.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), wrapped.eval()(x))

    # A plain pre-trained checkpoint goes into the original network: one line.
    fresh = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32))
    fresh.model.load_state_dict(plain)
    with torch.no_grad():
        reference = zoo_model("torchvision:resnet18").eval()
        reference.load_state_dict(plain)
        torch.testing.assert_close(fresh.eval()(x), reference(x))


def test_torch_save_load_and_deepcopy():
    wrapped = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32), final_init="paper").train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        wrapped(x)
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(wrapped)
    with torch.no_grad():
        expected = wrapped(x)
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(clone(x), expected)
    # The copies' hooks drive their own ladders, not the original's.
    before = _cells(wrapped)[0].c_prev.clone()
    with torch.no_grad():
        clone(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(_cells(wrapped)[0].c_prev, before)
    assert unwrap_ptl(clone) is clone.model


def test_dataparallel_is_detected_with_ddp_as_the_answer():
    wrapped = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32))
    replica = copy.deepcopy(wrapped)
    replica._is_replica = True  # what torch.nn.parallel.replicate sets on every replica
    with pytest.raises(BConvError, match="DataParallel.*DistributedDataParallel"):
        replica(torch.randn(2, 3, 32, 32))
    with pytest.raises(BConvError, match="DistributedDataParallel"):
        wrap_with_ptl(nn.DataParallel(zoo_model("torchvision:resnet18")), input_size=(3, 32, 32))


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
    assert all(torch.isfinite(c.c_prev).all() for c in _cells(wrapped))


def test_users_own_cnn():
    model = TinyCNN()
    wrapped = wrap_with_ptl(model, input_size=(3, 32, 32))
    assert [s.name for s in wrapped.stages] == ["stem", "stage1", "stage2"]
    assert wrapped(torch.randn(3, 3, 32, 32)).shape == (3, 5)


@pytest.mark.slow
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


@pytest.mark.slow
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
