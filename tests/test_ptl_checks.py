"""The ladder checks itself at every forward, and follows gradient checkpointing exactly."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bconv import BConvError, wrap_with_ptl
from bconv.cells import StatefulCell


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
    assert wrapped.ptl.tap_names[-1] == "1.2"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = wrapped(x)
        h = x
        for block in (*net[0], *net[1], *net[2:]):
            h = block(h)
        wrapped.ptl.end()
    torch.testing.assert_close(h, expected)


def test_an_error_inside_a_forward_does_not_fail_the_next_one():
    wrapped, net = _wrapped_bypass_net()
    with pytest.raises(RuntimeError):
        wrapped(torch.randn(2, 5, 32, 32))  # wrong channels: fails in the stem, after the image tap fired
    with pytest.raises(RuntimeError):
        wrapped.model(torch.randn(2, 5, 32, 32))
    assert wrapped(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# -- gradient checkpointing -----------------------------------------------------------------------------------


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
    last_block = dict(ckpt.model.named_modules())[ckpt.ptl.tap_names[-1]]
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
