"""Student-Teacher Distillation: Eq. 4, the pooled features of any classifier, and one STD step, on plain and
PTL-wrapped models."""

from __future__ import annotations

import copy
import importlib
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bconv
from bconv.surgery import BConvHook
import timm
from bconv.distill import (
    ClassifierNotFoundError,
    STDTrainer,
    classifier_path,
    forward_with_features,
    pooled_features,
    std_loss,
)
from bconv.errors import TraceError

from conftest import zoo_model

anatomy_module = importlib.import_module("bconv.surgery.anatomy")  # the module: bconv.surgery.anatomy is the function


class TinyNet(nn.Module):
    """A small classifier whose feature width is ``width``."""

    def __init__(self, width: int = 8, classes: int = 5, conv_classifier: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_classifier = conv_classifier
        self.fc = nn.Conv2d(width, classes, 1) if conv_classifier else nn.Linear(width, classes)

    def forward(self, x):
        x = self.pool(self.body(x))
        return self.fc(x).flatten(1) if self.conv_classifier else self.fc(x.flatten(1))


# --------------------------------------------------------------------------- Eq. 4


@settings(max_examples=30, deadline=None)
@given(lam=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_std_loss_is_eq4_with_mean_reductions(lam, seed):
    g = torch.Generator().manual_seed(seed)
    logits, s, t = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    labels = torch.randint(0, 4, (6,), generator=g)
    expected = (1 - lam) * F.cross_entropy(logits, labels) + lam * (s - t).abs().mean()
    torch.testing.assert_close(std_loss(logits, labels, s, t, lam=lam), expected)


def test_std_loss_endpoints_are_cross_entropy_and_l1_and_default_lam_is_papers():
    logits, labels, s, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.randn(4, 7), torch.randn(4, 7)
    torch.testing.assert_close(std_loss(logits, labels, s, t, lam=0.0), F.cross_entropy(logits, labels))
    torch.testing.assert_close(std_loss(logits, labels, s, t, lam=1.0), F.l1_loss(s, t))
    torch.testing.assert_close(std_loss(logits, labels, s, t), std_loss(logits, labels, s, t, lam=0.8))


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan"), True, "0.8"])
def test_std_loss_rejects_lam_outside_unit_interval(lam):
    with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\]"):
        std_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 4), torch.randn(2, 4), lam=lam)


def test_std_loss_with_different_feature_widths_points_at_the_projection():
    with pytest.raises(ValueError, match="projection"):
        std_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 4), torch.randn(2, 8))


def test_std_loss_never_sends_gradient_to_the_teacher():
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5, requires_grad=True)
    std_loss(torch.randn(3, 2, requires_grad=True), torch.tensor([0, 1, 1]), student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


# --------------------------------------------------------------------------- pooled features


def test_pooled_features_of_resnet50_are_flattened_avgpool_of_layer4():
    model = zoo_model("torchvision:resnet50").eval()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    handle = model.layer4.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        logits, feats = forward_with_features(model, x)
    handle.remove()
    torch.testing.assert_close(feats, torch.flatten(model.avgpool(seen[-1]), 1))
    assert feats.shape == (2, 2048)
    torch.testing.assert_close(model.fc(feats), logits)
    assert classifier_path(model) == "fc"


def _hand_features(spec: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What each torchvision model's classifier layer reads, computed from its own parts."""
    if spec in ("torchvision:vgg11", "torchvision:mobilenet_v3_small"):
        # A classifier block: the input of its last Linear (VGG's fc7, MobileNetV3's 1024-d vector).
        pooled = torch.flatten(model.avgpool(model.features(x)), 1)
        return model.classifier[:-1](pooled)
    if spec == "torchvision:convnext_tiny":
        return model.classifier[:-1](model.avgpool(model.features(x)))  # LayerNorm2d, Flatten
    if spec == "torchvision:swin_t":
        return torch.flatten(model.avgpool(model.permute(model.norm(model.features(x)))), 1)
    raise KeyError(spec)


@pytest.mark.parametrize(
    "spec,path",
    [
        pytest.param("torchvision:vgg11", "classifier.6", marks=pytest.mark.slow),  # 133M parameters to build
        ("torchvision:mobilenet_v3_small", "classifier.3"),
        ("torchvision:convnext_tiny", "classifier.2"),
        ("torchvision:swin_t", "head"),
    ],
)
def test_pooled_features_are_the_input_of_the_last_classifier_layer(spec, path):
    model = zoo_model(spec).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = forward_with_features(model, x)
        assert classifier_path(model) == path
        torch.testing.assert_close(feats, _hand_features(spec, model, x))
        torch.testing.assert_close(model.get_submodule(path)(feats), logits)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"])
def test_pooled_features_of_timm_models_match_pre_logits_and_get_classifier(name):
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = pooled_features(model, x)
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats, expected)
    assert model.get_submodule(classifier_path(model, (3, 64, 64))) is model.get_classifier()


def test_one_by_one_conv_classifier_after_global_pooling_gives_a_flat_vector():
    model = TinyNet(width=6, conv_classifier=True).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        feats = pooled_features(model, x)
        torch.testing.assert_close(feats, model.pool(model.body(x)).flatten(1))
    assert feats.shape == (3, 6) and classifier_path(model, (3, 16, 16)) == "fc"


def test_squeezenet_classifies_before_pooling_and_is_refused():
    with pytest.raises(ClassifierNotFoundError, match="before pooling"):
        pooled_features(zoo_model("torchvision:squeezenet1_1").eval(), torch.randn(1, 3, 64, 64))


def test_model_without_classifier_is_refused_with_a_hint():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    with pytest.raises(ClassifierNotFoundError, match="num_classes=0"):
        pooled_features(model, torch.randn(1, 3, 64, 64))


class DictOutput(TinyNet):
    def forward(self, x):
        return {"logits": super().forward(x)}


def test_model_returning_no_single_tensor_is_refused():
    with pytest.raises(ClassifierNotFoundError, match="not one tensor of logits"):
        pooled_features(DictOutput().eval(), torch.randn(1, 3, 16, 16))


def test_features_come_from_one_forward_pass_and_the_classifier_is_found_once(monkeypatch):
    model = TinyNet().eval()
    traces = []
    real_trace = anatomy_module.trace
    monkeypatch.setattr(anatomy_module, "trace", lambda *a, **k: traces.append(1) or real_trace(*a, **k))
    calls = []
    model.body[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 16, 16)
    pooled_features(model, x)  # finds the classifier (traces once), then runs the model
    calls.clear()
    for _ in range(3):
        pooled_features(model, x)
    assert calls == [1, 1, 1] and traces == [1]


def test_classifier_cache_follows_a_replaced_head():
    model = TinyNet(width=8).eval()
    x = torch.randn(2, 3, 16, 16)
    assert classifier_path(model, (3, 16, 16)) == "fc"
    model.fc = nn.Linear(8, 3)  # same structure: the cached path stays right
    assert pooled_features(model, x).shape == (2, 8)
    model.fc = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))  # a new head: found again
    assert classifier_path(model, (3, 16, 16)) == "fc.2"
    assert pooled_features(model, x).shape == (2, 4)


def test_features_carry_gradients_in_train_mode():
    model = TinyNet().train()
    feats = pooled_features(model, torch.randn(4, 3, 16, 16))
    feats.sum().backward()
    assert model.body[0].weight.grad is not None


def test_untraceable_timm_model_falls_back_to_get_classifier(monkeypatch):
    def fail(*args, **kwargs):
        raise TraceError("simulated")

    monkeypatch.setattr(anatomy_module, "trace", fail)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    assert classifier_path(model, (3, 64, 64)) == "fc"
    with pytest.raises(TraceError, match="simulated"):
        classifier_path(TinyNet(), (3, 16, 16))  # no get_classifier(): the trace error stands


# --------------------------------------------------------------------------- the STD step


def _record_mode(model: nn.Module, log: list) -> None:
    model.register_forward_pre_hook(lambda m, a: log.append((m.training, torch.is_grad_enabled())))


def test_std_step_runs_teacher_in_eval_without_grad_and_restores_its_flags():
    torch.manual_seed(0)
    teacher, student = TinyNet(width=8), TinyNet(width=8)
    teacher.train()
    teacher.body[1].eval()  # a user's frozen BN must stay frozen, the rest must return to train
    flags = [m.training for m in teacher.modules()]
    before = copy.deepcopy(teacher.state_dict())
    trainer = STDTrainer(student, teacher, input_size=(3, 16, 16))
    optimizer = torch.optim.SGD(trainer.parameters(), lr=0.1)
    teacher_log, student_log = [], []
    _record_mode(teacher, teacher_log)
    _record_mode(student, student_log)
    trainer.step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), optimizer)
    assert teacher_log == [(False, False)] and student_log == [(True, True)]
    assert [m.training for m in teacher.modules()] == flags
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics untouched
    assert all(p.grad is None for p in teacher.parameters())


def test_std_step_returns_eq4_terms_and_updates_student_and_projection():
    torch.manual_seed(0)
    student, teacher = TinyNet(width=4), TinyNet(width=12).eval()
    trainer = STDTrainer(student, teacher, lam=0.8, input_size=(3, 16, 16))
    assert (trainer.student_width, trainer.teacher_width) == (4, 12)
    assert isinstance(trainer.projection, nn.Linear)
    assert (trainer.projection.in_features, trainer.projection.out_features) == (4, 12)
    params = list(trainer.parameters())
    assert {id(p) for p in trainer.projection.parameters()} <= {id(p) for p in params}
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in params}

    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    # The same step computed by hand, on copies, before the update.
    s, proj = copy.deepcopy(student).train(), copy.deepcopy(trainer.projection)
    with torch.no_grad():
        t_feats = pooled_features(teacher, x)
        logits, s_feats = forward_with_features(s, x)
        ce, l1 = F.cross_entropy(logits, y), F.l1_loss(proj(s_feats), t_feats)
    w_student, w_proj = student.fc.weight.clone(), trainer.projection.weight.clone()
    step = trainer.step(x, y, torch.optim.SGD(params, lr=0.1))
    torch.testing.assert_close(step.ce, ce)
    torch.testing.assert_close(step.l1, l1)
    torch.testing.assert_close(step.loss, 0.2 * ce + 0.8 * l1)
    assert not step.loss.requires_grad
    assert not torch.equal(student.fc.weight, w_student) and not torch.equal(trainer.projection.weight, w_proj)


def test_projection_auto_is_none_for_equal_widths_and_linear_forces_one():
    student, teacher = TinyNet(width=8), TinyNet(width=8)
    assert STDTrainer(student, teacher, input_size=(3, 16, 16)).projection is None
    forced = STDTrainer(student, teacher, projection="linear", input_size=(3, 16, 16)).projection
    assert isinstance(forced, nn.Linear) and forced.in_features == forced.out_features == 8
    custom = nn.Sequential(nn.Linear(8, 8))
    trainer = STDTrainer(student, teacher, projection=custom)
    assert trainer.projection is custom and trainer.student_width is None
    assert {id(p) for p in custom.parameters()} <= {id(p) for p in trainer.parameters()}


def test_projection_none_with_different_widths_fails_at_the_step():
    trainer = STDTrainer(TinyNet(width=4), TinyNet(width=8), projection=None)
    optimizer = torch.optim.SGD(trainer.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="projection"):
        trainer.step(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), optimizer)


@pytest.mark.parametrize("kwargs,match", [({"projection": "mlp"}, "projection must be"), ({"lam": 2.0}, "lam must be")])
def test_std_trainer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        STDTrainer(TinyNet(), TinyNet(), input_size=(3, 16, 16), **kwargs)


def test_std_step_keeps_a_students_frozen_submodule_and_trains_an_eval_root():
    student, teacher = TinyNet(), TinyNet()
    trainer = STDTrainer(student, teacher, input_size=(3, 16, 16))
    optimizer = torch.optim.SGD(trainer.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    student.eval()
    trainer.step(x, y, optimizer)
    assert all(m.training for m in student.modules())
    student.body[1].eval()
    trainer.step(x, y, optimizer)
    assert student.training and not student.body[1].training


class NamedOutputs(TinyNet):
    """Returns a namedtuple with ``logits`` in train mode, as torchvision's GoogLeNet and Inception do."""

    Outputs = namedtuple("Outputs", ["logits", "aux"])

    def forward(self, x):
        logits = super().forward(x)
        return self.Outputs(logits, logits.detach() * 0) if self.training else logits


def test_std_step_with_a_student_that_returns_named_outputs_in_train_mode():
    trainer = STDTrainer(NamedOutputs(width=4), TinyNet(width=8), input_size=(3, 16, 16))
    optimizer = torch.optim.SGD(trainer.parameters(), lr=0.01)
    step = trainer.step(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), optimizer)
    assert torch.isfinite(step.loss) and step.ce > 0


# --------------------------------------------------------------------------- PTL-wrapped models


class _UntraceableBConvHook(BConvHook):
    def __call__(self, module, args, out):
        return out * 2 if out.sum() > 0 else out


class HookedWrapper(nn.Module):
    """Shaped like a PTL wrapper (original at ``.model``, injected modules at ``.ptl``), with a hook fx cannot trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.ptl = model, nn.Linear(2, 2)
        model.body.register_forward_hook(_UntraceableBConvHook())

    def forward(self, x):
        return self.model(x)


def test_classifier_of_a_wrapper_is_found_in_its_original_without_tracing_the_wrappers_hooks():
    wrapped = HookedWrapper(TinyNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    assert classifier_path(wrapped, (3, 16, 16)) == "model.fc"
    seen = []
    wrapped.model.fc.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        feats = pooled_features(wrapped, x)
    torch.testing.assert_close(feats, seen[-1])
    assert len(wrapped.model.body._forward_hooks) == 1  # the wrapper's hook is back in place


def _wrap(model: nn.Module) -> nn.Module:
    return bconv.wrap_with_ptl(model, input_size=(3, 64, 64))


def test_pooled_features_of_a_wrapped_model_enter_the_originals_classifier():
    original = zoo_model("torchvision:resnet18").eval()
    wrapped = _wrap(copy.deepcopy(original)).eval()
    x = torch.randn(2, 3, 64, 64)
    assert classifier_path(wrapped, (3, 64, 64)) == "model.fc"
    seen = []
    handle = wrapped.model.fc.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        feats = pooled_features(wrapped, x)
        wrapped(x)
    handle.remove()
    torch.testing.assert_close(feats, seen[-1])
    with torch.no_grad():  # a fresh wrapper computes what the original computed (function-preserving injection)
        torch.testing.assert_close(feats, pooled_features(original, x))


def test_std_step_with_a_wrapped_teacher_leaves_it_untouched():
    teacher = _wrap(zoo_model("torchvision:resnet18")).train()
    before = copy.deepcopy(teacher.state_dict())
    student = zoo_model("torchvision:resnet18")
    trainer = STDTrainer(student, teacher, input_size=(3, 64, 64))
    trainer.step(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]), torch.optim.SGD(trainer.parameters(), lr=0.01))
    assert teacher.training and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
