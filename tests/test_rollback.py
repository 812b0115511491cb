"""Rolling-back refine-tuning: exact roll-backs, disjoint covering optimizer groups, the period schedule, on plain and
PTL-wrapped models."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from functools import lru_cache

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bconv
import bconv.surgery
import timm
from bconv.rollback import Rollback
from bconv.surgery import BConvHook

from conftest import zoo_model

SIZE = (3, 32, 32)


class PrefixNet(nn.Module):
    """Module names that share prefixes: ``layer1`` is a stage, ``layer10`` the next, ``layer100`` the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer10 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.layer100 = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer10(self.layer1(self.stem(x)))
        return self.layer100(x.mean((2, 3)))


def _owner(name: str, stages) -> int | None:
    """Index of the stage whose module paths contain the tensor ``name`` (path components, not prefixes)."""
    for s in stages:
        if any(name.startswith(m + ".") for m in s.modules):
            return s.index
    return None


def _train(model: nn.Module, steps: int = 2, size=SIZE, lr: float = 0.1) -> None:
    """A few SGD steps in train mode: weights and BN statistics (and their counters) all move."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, *size)).square().mean().backward()
        optimizer.step()


def _equal(a: dict, b: dict, names) -> bool:
    return all(torch.equal(a[n], b[n]) for n in names)


# --------------------------------------------------------------------------- blocks


def test_resnet_blocks_are_the_stages_with_the_stem_first_and_the_head_apart():
    rb = Rollback(zoo_model("torchvision:resnet18"), SIZE)
    assert [s.name for s in rb.stages] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert rb.stages[0].modules == ("conv1", "bn1", "relu") and rb.stages[1].modules == ("maxpool", "layer1")
    assert "layer4" in repr(rb)


@pytest.mark.parametrize("keep", [0, 2, 5])
def test_roll_back_restores_rolled_stages_exactly_and_leaves_kept_stages_and_head(keep):
    model = zoo_model("torchvision:resnet18")
    pretrained = copy.deepcopy(model.state_dict())
    rb = Rollback(model, SIZE)
    params = {n: p for n, p in model.named_parameters()}
    _train(model)
    trained = copy.deepcopy(model.state_dict())
    rb.roll_back(keep=keep)
    now = model.state_dict()
    owners = {n: _owner(n, rb.stages) for n in now}
    rolled = [n for n in now if owners[n] is not None and owners[n] >= keep]
    others = [n for n in now if n not in rolled]
    assert _equal(now, pretrained, rolled)  # parameters, running stats and num_batches_tracked, bit for bit
    assert _equal(now, trained, others)
    assert any("running_mean" in n for n in rolled) == (keep < 5)
    assert not _equal(now, pretrained, [n for n in others if n.startswith("fc.")])  # the head keeps training
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameter objects


def test_stages_are_matched_by_module_path_not_by_name_prefix():
    model = PrefixNet()
    pretrained = copy.deepcopy(model.state_dict())
    rb = Rollback(model, (3, 16, 16))
    assert [s.name for s in rb.stages] == ["stem", "layer1", "layer10"]
    _train(model, size=(3, 16, 16))
    trained = copy.deepcopy(model.state_dict())
    rb.roll_back(keep=2)  # keeps stem and layer1; rolls back layer10 only
    now = model.state_dict()
    for name in now:
        expected = pretrained if name.startswith("layer10.") else trained
        assert torch.equal(now[name], expected[name]), name
    groups = {g["name"]: {id(p) for p in g["params"]} for g in rb.param_groups(keep=2)}
    ids = lambda module: {id(p) for p in module.parameters()}  # noqa: E731
    assert ids(model.layer1) <= groups["kept"] and ids(model.layer10) == groups["rolled_back"]
    assert ids(model.layer100) == groups["head"]


def test_inception_aux_classifier_that_fx_never_traced_trains_as_head():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    rb = Rollback(model, (3, 75, 75))
    head = next(g for g in rb.param_groups(keep=0) if g["name"] == "head")
    aux = {id(p) for p in model.AuxLogits.parameters()}
    assert aux and aux <= {id(p) for p in head["params"]}


def test_timm_model_with_feature_info_stages():
    model = timm.create_model("test_resnet", pretrained=False)
    rb = Rollback(model, (3, 64, 64))
    assert {s.source for s in rb.stages} == {"feature_info"}
    pretrained = copy.deepcopy(model.state_dict())
    _train(model, size=(3, 64, 64))
    rb.roll_back(keep=0)
    now = model.state_dict()
    assert _equal(now, pretrained, [n for n in now if _owner(n, rb.stages) is not None])


class CifarNet(nn.Module):
    """A CIFAR ResNet's layout: a stride-1 stem that fx folds into the first stage, then three stages."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def test_a_stem_folded_into_the_first_stage_is_rolled_back_as_a_block_of_its_own():
    # The released ResNet scripts keep conv1 + bn1 alone in their second period, then add layer1.
    model = CifarNet()
    rb = Rollback(model, SIZE)
    assert rb.stages[0].modules == ("conv1", "bn1", "layer1")  # discovery folds the stem into layer1's stage
    assert [(b.name, b.modules) for b in rb.blocks] == [
        ("stem", ("conv1", "bn1")), ("layer1", ("layer1",)), ("layer2", ("layer2",)), ("layer3", ("layer3",)),
    ]  # fmt: skip
    pretrained = copy.deepcopy(model.state_dict())
    _train(model)
    trained = copy.deepcopy(model.state_dict())
    rb.roll_back(keep=1)  # keeps the stem only
    now = model.state_dict()
    for name in now:
        kept = name.split(".")[0] in ("conv1", "bn1", "fc")
        assert torch.equal(now[name], (trained if kept else pretrained)[name]), name
    groups = {g["name"]: {id(p) for p in g["params"]} for g in rb.param_groups(keep=1)}
    ids = lambda *modules: {id(p) for m in modules for p in m.parameters()}  # noqa: E731
    assert groups["kept"] == ids(model.conv1, model.bn1)
    assert groups["rolled_back"] == ids(model.layer1, model.layer2, model.layer3)


def test_run_keeps_the_stem_then_adds_one_stage_per_period():
    model = CifarNet()
    rb = Rollback(model, SIZE)
    kept = []

    def train_fn(m, optimizer, period):
        kept.append([n for g in optimizer.param_groups if g["name"] == "kept" for n, p in m.named_parameters()
                     if any(p is q for q in g["params"])])  # fmt: skip

    rb.run(train_fn, periods=4)
    assert kept == [[], ["conv1.weight", "bn1.weight", "bn1.bias"],
                    ["conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.weight", "layer1.0.bias", "layer1.1.weight",
                     "layer1.1.bias"], kept[3]]  # fmt: skip
    assert {n.split(".")[0] for n in kept[3]} == {"conv1", "bn1", "layer1", "layer2"}


def test_given_stages_split_the_folded_stem_too():
    model = CifarNet()
    rb = Rollback(model, stages=bconv.surgery.find_stages(model, SIZE))
    assert [b.name for b in rb.blocks] == ["stem", "layer1", "layer2", "layer3"]


@pytest.mark.parametrize("spec, stem", [
    ("timm:convnext_atto", ("stem",)),  # a patchify stem at the first stage's resolution
    ("timm:efficientnet_b0", ("conv_stem", "bn1")),
    ("torchvision:mobilenet_v2", ("features.0",)),
    ("torchvision:resnet18", ("conv1", "bn1", "relu")),  # the stem reduces: it is the first stage already
    ("torchvision:densenet121", ("features.conv0", "features.norm0", "features.relu0")),
])  # fmt: skip
def test_the_first_block_is_the_stem_across_the_zoo(spec, stem):
    rb = Rollback(zoo_model(spec), (3, 64, 64))
    assert rb.blocks[0].modules == stem
    modules = [m for b in rb.blocks for m in b.modules]
    assert modules == [m for s in rb.stages for m in s.modules]  # the blocks split the stages, nothing else


def test_the_default_optimizer_is_the_released_one():
    rb = Rollback(PrefixNet(), (3, 16, 16))
    made = []
    rb.run(lambda m, optimizer, p: made.append(optimizer), periods=2)
    assert len(made) == 2  # one optimizer a period: the loop below checks both
    for optimizer in made:
        assert type(optimizer) is torch.optim.SGD
        assert {(g["momentum"], g["nesterov"], g["weight_decay"]) for g in optimizer.param_groups} == {(0.9, True, 5e-4)}


# --------------------------------------------------------------------------- optimizer groups


@lru_cache(maxsize=None)
def _resnet_rollback() -> Rollback:
    return Rollback(zoo_model("torchvision:resnet18"), SIZE)


@settings(max_examples=40, deadline=None)
@given(
    keep=st.integers(0, 5),
    frozen=st.lists(st.booleans(), min_size=62, max_size=62),  # resnet18 has 62 parameters
    lrs=st.tuples(*[st.floats(1e-5, 1.0)] * 3),
)
def test_param_groups_are_disjoint_and_cover_every_trainable_parameter_once(keep, frozen, lrs):
    rb = _resnet_rollback()
    params = list(rb.model.parameters())
    for p, f in zip(params, frozen):
        p.requires_grad_(not f)
    try:
        lr_rolled, lr_kept, lr_head = lrs
        groups = rb.param_groups(keep, lr_rolled=lr_rolled, lr_kept=lr_kept, lr_head=lr_head)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in params if p.requires_grad}
        expected_lr = {"kept": lr_kept, "rolled_back": lr_rolled, "head": lr_head}
        names = {id(p): n for n, p in rb.model.named_parameters()}
        for g in groups:
            assert g["params"] and g["lr"] == expected_lr[g["name"]]
            for p in g["params"]:
                owner = _owner(names[id(p)], rb.stages)
                assert g["name"] == ("head" if owner is None else "kept" if owner < keep else "rolled_back")
        torch.optim.SGD(groups, momentum=0.9)  # torch accepts them as they are
    finally:
        for p in params:
            p.requires_grad_(True)


def test_param_groups_have_the_released_codes_learning_rates_by_default():
    groups = _resnet_rollback().param_groups(keep=2)
    assert [(g["name"], g["lr"]) for g in groups] == [("kept", 0.001), ("rolled_back", 0.01), ("head", 0.01)]
    assert [g["name"] for g in _resnet_rollback().param_groups(keep=0)] == ["rolled_back", "head"]
    assert [g["name"] for g in _resnet_rollback().param_groups(keep=5)] == ["kept", "head"]


@pytest.mark.parametrize("keep", [-1, 6, 1.5, True, "1", None])
def test_keep_outside_zero_to_number_of_stages_is_refused(keep):
    rb = _resnet_rollback()
    for call in (rb.roll_back, rb.param_groups):
        with pytest.raises(ValueError, match=r"keep must be an int from 0 .* to 5.*layer4"):
            call(keep)


# --------------------------------------------------------------------------- robustness


def test_construction_leaves_the_model_as_it_was():
    model = zoo_model("torchvision:resnet18").train()
    model.layer1.eval()
    before, flags = copy.deepcopy(model.state_dict()), [m.training for m in model.modules()]
    Rollback(model, SIZE)
    assert _equal(model.state_dict(), before, before) and [m.training for m in model.modules()] == flags


def test_snapshot_is_a_copy_and_roll_back_finds_tensors_after_a_dtype_move():
    model = PrefixNet()
    pretrained = copy.deepcopy(model.state_dict())
    rb = Rollback(model, (3, 16, 16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # in place: a snapshot that aliased the weights would move too
    model.double()  # buffers are replaced by new tensors
    rb.roll_back(keep=0)
    now = model.state_dict()
    for name in pretrained:
        if not name.startswith("layer100."):
            assert now[name].dtype == (torch.long if "num_batches" in name else torch.float64)
            torch.testing.assert_close(now[name], pretrained[name].to(now[name].dtype), rtol=0, atol=0)


def test_given_stages_with_an_unknown_module_are_refused():
    stage = dataclasses.replace(Rollback(PrefixNet(), (3, 16, 16)).stages[1], modules=("layer2",))
    with pytest.raises(ValueError, match="'layer2'"):
        Rollback(PrefixNet(), stages=[stage])


def test_roll_back_after_a_stage_module_lost_its_tensors_says_so():
    model = PrefixNet()
    rb = Rollback(model, (3, 16, 16))
    model.layer10 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())  # no BN any more
    with pytest.raises(ValueError, match="layer10.1.weight"):
        rb.roll_back(keep=0)


# --------------------------------------------------------------------------- the schedule


def test_run_follows_the_released_schedule_with_a_fresh_optimizer_each_period():
    model = zoo_model("torchvision:resnet18")
    pretrained = copy.deepcopy(model.state_dict())
    rb = Rollback(model, SIZE)
    seen = []
    last = {}

    def train_fn(m, optimizer, period):
        assert m is model
        state = m.state_dict()
        owners = {n: _owner(n, rb.stages) for n in state}
        kept = [n for n in state if owners[n] is None or owners[n] < period]  # the head and stages[:period]
        seen.append({
            "optimizer": optimizer,
            "fresh": not optimizer.state,
            "lrs": {g["name"]: g["lr"] for g in optimizer.param_groups},
            "momentum": {g["momentum"] for g in optimizer.param_groups},
            "rolled": {k for k in range(5) if _equal(state, pretrained, [n for n in state if owners[n] == k])},
            "kept_as_trained": bool(last) and _equal(state, last, kept),
        })  # fmt: skip
        _train(m, steps=1)  # stands for a period of training; leaves momentum buffers in the optimizer
        optimizer.step()
        last.clear()
        last.update(copy.deepcopy(m.state_dict()))
        return period * 10

    assert rb.run(train_fn, periods=4) == [0, 10, 20, 30]
    assert [s["rolled"] for s in seen] == [{0, 1, 2, 3, 4}, {1, 2, 3, 4}, {2, 3, 4}, {3, 4}]
    assert [s["kept_as_trained"] for s in seen] == [False, True, True, True]
    assert seen[0]["lrs"] == {"rolled_back": 0.01, "head": 0.1}
    assert all(s["lrs"] == {"kept": 0.001, "rolled_back": 0.01, "head": 0.01} for s in seen[1:])
    assert all(s["fresh"] and s["momentum"] == {0.9} for s in seen)
    assert len({id(s["optimizer"]) for s in seen}) == 4


def test_run_uses_the_given_optimizer_factory_and_rates():
    rb = Rollback(PrefixNet(), (3, 16, 16))
    made = []

    def make(groups):
        made.append([(g["name"], g["lr"]) for g in groups])
        return torch.optim.Adam(groups)

    rates = dict(lr_rolled=1.0, lr_kept=2.0, lr_head=3.0, lr_head_first=4.0)
    rb.run(lambda m, o, p: None, periods=2, make_optimizer=make, **rates)
    assert made == [[("rolled_back", 1.0), ("head", 4.0)], [("kept", 2.0), ("rolled_back", 1.0), ("head", 3.0)]]


@pytest.mark.parametrize("periods", [0, 5, 2.0, True])
def test_run_refuses_more_periods_than_stages_to_keep(periods):
    rb = Rollback(PrefixNet(), (3, 16, 16))  # 3 stages: at most 4 periods
    with pytest.raises(ValueError, match="periods must be an int from 1 to 4"):
        rb.run(lambda m, o, p: None, periods=periods)


# --------------------------------------------------------------------------- PTL-wrapped models


class _UntraceableBConvHook(BConvHook):
    def __call__(self, module, args, out):
        return out * 2 if out.sum() > 0 else out


def test_stages_of_a_wrapper_come_from_its_original_without_tracing_the_wrappers_hooks():
    wrapper = nn.Module()
    wrapper.model, wrapper.ptl = PrefixNet(), nn.Linear(2, 2)  # shaped like a PTL wrapper
    wrapper.model.layer1.register_forward_hook(_UntraceableBConvHook())
    rb = Rollback(wrapper, (3, 16, 16))
    assert [s.modules for s in rb.stages] == [("model.stem",), ("model.layer1",), ("model.layer10",)]
    head = {id(p) for g in rb.param_groups(keep=0) if g["name"] == "head" for p in g["params"]}
    assert head == {id(p) for p in [*wrapper.ptl.parameters(), *wrapper.model.layer100.parameters()]}


def test_rollback_of_a_wrapped_model_trains_the_injected_modules_as_head():
    wrapped = bconv.wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=SIZE)
    rb = Rollback(wrapped, SIZE)
    assert [s.name for s in rb.stages] == ["model.relu", "model.layer1", "model.layer2", "model.layer3", "model.layer4"]
    pretrained = copy.deepcopy(wrapped.state_dict())
    _train(wrapped)
    trained = copy.deepcopy(wrapped.state_dict())
    rb.roll_back(keep=1)
    now = wrapped.state_dict()
    for name in now:
        owner = _owner(name, rb.stages)
        expected = pretrained if owner is not None and owner >= 1 else trained
        assert torch.equal(now[name], expected[name]), name
    assert any(n.startswith("ptl.") for n in now) and any(n.startswith("model.layer4.") for n in now)
    names = {id(p): n for n, p in wrapped.named_parameters()}
    head = next(g for g in rb.param_groups(keep=1) if g["name"] == "head")
    head_names = {names[id(p)] for p in head["params"]}
    assert {n for n in head_names if n.startswith("model.")} == {"model.fc.weight", "model.fc.bias"}
    assert {n for n in names.values() if n.startswith("ptl.")} <= head_names
