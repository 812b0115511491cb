"""The ladder as a method: function-preserving at the start, awake, stable across learning rates, and able to
carry information across batches through the cells' state. Each test fails on a dormant or destabilising ladder."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bconv
from bconv import BConvError, ladder_usage, wrap_with_ptl
from bconv.errors import CheckpointError
from bconv.ptl.ladder import FinalFusion, Fusion

from benchmarks.ladder import SmallNet, fresh_pretrained, target_split, train

from conftest import TinyCNN, single_thread, zoo_model

LEARNING_RATES = (0.01, 0.03, 0.1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: one thread is fastest, and many threads on a busy machine are far slower."""
    with single_thread():
        yield
SEEDS = (0, 1, 2)
EPOCHS = 8


# ------------------------------------------------------------------ the released code's ladder


def test_fusions_are_the_released_conv_bn_relu_with_kaiming_init():
    torch.manual_seed(0)
    wrapped = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 64, 64))
    for fuse in wrapped.ptl.fuses:
        assert isinstance(fuse, Fusion)
        assert [type(m) for m in fuse] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
        assert fuse.conv.bias is not None and fuse.conv.kernel_size == (1, 1)
    # kaiming_normal_(fan_in): std sqrt(2 / fan_in), where PyTorch's default draws from U(+-1/sqrt(fan_in))
    convs = [c.conv for chain in wrapped.ptl.cells for c in chain][:-1] + [f.conv for f in wrapped.ptl.fuses]
    for conv in convs:
        fan_in = conv.weight[0].numel()
        assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.15)


def test_paper_start_is_the_released_normalised_final_fusion():
    wrapped = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), final_init="paper")
    final = wrapped.ptl.final_fuse
    assert isinstance(final, FinalFusion) and isinstance(final.fuse, Fusion)
    assert (final.fuse.conv.in_channels, final.fuse.conv.out_channels) == (32 + 8, 32)
    assert 0.9 < final.fuse.bn.weight.mean().item() < 1.1 and final.fuse.bn.weight.std().item() > 0  # N(1, 0.02)
    assert all(c.conv.weight.abs().sum() > 0 for chain in wrapped.ptl.cells for c in chain)  # no cell silenced


def test_default_start_is_exactly_the_original_and_the_last_cell_is_silent():
    net = TinyCNN().eval()
    x = torch.randn(4, 3, 32, 32)
    expected = net(x)
    wrapped = wrap_with_ptl(net, input_size=(3, 32, 32))
    assert torch.equal(wrapped.eval()(x), expected)
    wrapped.train()(x)  # a training forward too: the silenced cell outputs exactly 0 with or without history
    last = wrapped.ptl.cells[-1][-1]
    assert torch.equal(last.c_prev, torch.zeros_like(last.c_prev))


def test_the_ladder_gets_a_gradient_of_the_order_of_the_features_at_the_first_step():
    """Nothing multiplies the ladder's path by zero: dL/dy of the last cell is of the order of dL/dx of the stage."""
    torch.manual_seed(0)
    wrapped = wrap_with_ptl(fresh_pretrained(0), input_size=(3, 16, 16)).train()
    grads = {}

    def keep_grad(name):
        def hook(module, args, out):
            out.register_hook(lambda g: grads.__setitem__(name, g))

        return hook

    last_cell = wrapped.ptl.cells[-1][-1]
    last_cell.register_forward_hook(keep_grad("y"))
    wrapped.model.stage3.register_forward_hook(keep_grad("x"))
    (x, y), _ = target_split(0)
    F.cross_entropy(wrapped(x[:32]), y[:32]).backward()
    ratio = (grads["y"].norm() / grads["y"].numel() ** 0.5) / (grads["x"].norm() / grads["x"].numel() ** 0.5)
    assert 0.1 < ratio < 10, f"per-element gradient at the cells' output / at the stage's output: {ratio:.3g}"
    assert last_cell.conv.weight.grad[3 * last_cell.out_channels :].norm() > 0  # the silenced weights learn


# ------------------------------------------------------------------ stable and alive on a real fine-tune


@pytest.fixture(scope="module")
def lr_sweep():
    """Plain and PTL (defaults) fine-tuned from the same pre-trained weights at each learning rate and seed."""
    results = {}
    for lr in LEARNING_RATES:
        for seed in SEEDS:
            (xt, yt), (xv, yv) = target_split(seed)
            for kind in ("plain", "ptl"):
                model = fresh_pretrained(seed)
                if kind == "ptl":
                    model = wrap_with_ptl(model, input_size=(3, 16, 16))
                losses = train(model, xt, yt, lr, EPOCHS, seed, ptl=kind == "ptl")
                with torch.no_grad():
                    accuracy = (model.eval()(xv).argmax(1) == yv).float().mean().item()
                usage = None
                if kind == "ptl":
                    with torch.no_grad():
                        model.train()(xt[-32:])  # a history for the state effect
                    usage = ladder_usage(model, xt[:64], yt[:64])
                results[lr, seed, kind] = dict(losses=losses, accuracy=accuracy, usage=usage)
    return results


def _final_loss(losses: list[float]) -> float:
    return statistics.mean(losses[-len(losses) // EPOCHS :])  # the last epoch


@pytest.mark.parametrize("lr", LEARNING_RATES)
def test_ptl_trains_as_stably_as_plain_fine_tuning(lr_sweep, lr):
    for seed in SEEDS:
        plain, ptl = lr_sweep[lr, seed, "plain"], lr_sweep[lr, seed, "ptl"]
        # Margin: the last epoch's mean loss within 0.05 + 50% of plain's, and no spike above plain's worst.
        assert _final_loss(ptl["losses"]) <= 1.5 * _final_loss(plain["losses"]) + 0.05, (seed, ptl, plain)
        assert max(ptl["losses"][1:]) <= max(plain["losses"][1:]) + 0.5
    plain_acc = [lr_sweep[lr, s, "plain"]["accuracy"] for s in SEEDS]
    ptl_acc = [lr_sweep[lr, s, "ptl"]["accuracy"] for s in SEEDS]
    noise = max(statistics.stdev(plain_acc), 0.01)
    assert statistics.mean(ptl_acc) >= statistics.mean(plain_acc) - 2 * noise, (ptl_acc, plain_acc)


@pytest.mark.parametrize("lr", LEARNING_RATES)
def test_the_ladder_is_alive_after_fine_tuning(lr_sweep, lr):
    """Floors: 1% of the replaced stage output and 0.5% of the logits come from the cells (a dormant ladder: ~1e-4)."""
    for seed in SEEDS:
        usage = lr_sweep[lr, seed, "ptl"]["usage"]
        assert usage.stage_share > 0.01 and usage.output_share > 0.005, usage
        assert usage.state_effect > 0, usage
        assert usage.grad_norms["cells"] > 0 and usage.grad_norms["fusions"] > 0, usage


# ------------------------------------------------------------------ state propagation is learnable

MEMORY_CLASSES, MEMORY_BATCH, MEMORY_STEPS, MEMORY_K = 4, 8, 16, 2


def _memory_batch(classes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise with one bright quadrant: the quadrant is the sample's class."""
    x = torch.randn(len(classes), 3, 16, 16, generator=g) * 0.5
    for k, c in enumerate(classes.tolist()):
        r, q = divmod(c, 2)
        x[k, :, 8 * r : 8 * r + 8, 8 * q : 8 * q + 8] += 2.0
    return x


def _memory_task(reset_before_every_batch: bool, epochs: int = 20) -> float:
    """Each sample's target is the class of the sample in the same batch slot one batch earlier.

    Options (the README's for learning through the state): per-sample state, ``detach=False`` and
    ``detach_state()`` every ``MEMORY_K`` = 2 batches (2-step truncated back-propagation), Adam at 3e-3.
    Returns the accuracy in training mode on fresh sequences.
    """
    torch.manual_seed(0)
    model = wrap_with_ptl(SmallNet(MEMORY_CLASSES), input_size=(3, 16, 16), detach=False).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def sequence(learn: bool) -> tuple[int, int]:
        model.reset_state()
        previous, window, correct, seen = None, [], 0, 0
        for t in range(MEMORY_STEPS):
            if reset_before_every_batch:
                model.reset_state()
            classes = torch.randint(0, MEMORY_CLASSES, (MEMORY_BATCH,), generator=g)
            out = model(_memory_batch(classes, g))
            if previous is not None:
                window.append(F.cross_entropy(out, previous))
                correct += (out.argmax(1) == previous).sum().item()
                seen += MEMORY_BATCH
            if (t + 1) % MEMORY_K == 0:
                if learn and window:
                    opt.zero_grad()
                    torch.stack(window).mean().backward()
                    opt.step()
                window = []
                model.detach_state()
            previous = classes
        return correct, seen

    for _ in range(epochs):
        sequence(learn=True)
    with torch.no_grad():
        counts = [sequence(learn=False) for _ in range(5)]
    return sum(c for c, _ in counts) / sum(n for _, n in counts)


def test_a_target_from_the_previous_batch_is_learnt_through_the_cells_state():
    chance = 1 / MEMORY_CLASSES
    with_state = _memory_task(reset_before_every_batch=False)
    without_state = _memory_task(reset_before_every_batch=True)
    assert with_state > 0.6, f"with the state carried: {with_state:.2f} (chance {chance:.2f})"
    assert without_state < chance + 0.1, f"with the state reset before every batch: {without_state:.2f}"


# ------------------------------------------------------------------ the diagnostic


def test_ladder_usage_leaves_the_model_exactly_as_it_was():
    torch.manual_seed(0)
    wrapped = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), detach=False).train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))
    F.cross_entropy(wrapped(x), y).backward()  # a history kept with its graph, and gradients
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    states = [(c, c.c_prev) for c in wrapped.modules() if isinstance(c, bconv.BConvCell)]
    grads = {p: p.grad.clone() for p in wrapped.parameters() if p.grad is not None}
    wrapped.ptl.fuses[0].eval()  # a mixed train/eval flag survives too
    rng = torch.get_rng_state()

    usage = ladder_usage(wrapped, x, y)

    assert usage.grad_norms is not None and set(usage.grad_norms) == {"cells", "fusions", "backbone"}
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items())  # BatchNorm statistics too
    assert all(c.c_prev is state for c, state in states)  # the same tensors, graph included
    assert all(torch.equal(p.grad, g) for p, g in grads.items())
    assert wrapped.training and not wrapped.ptl.fuses[0].training
    assert torch.equal(torch.get_rng_state(), rng)


def test_ladder_usage_is_zero_at_the_default_start_and_measures_a_ladder_in_use():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    fresh = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32))
    usage = ladder_usage(fresh, x, y)
    assert usage.stage_share == 0 and usage.output_share == 0 and usage.state_effect == 0
    paper = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), final_init="paper").train()
    assert paper.state_dict  # the released start uses the cells from the first forward
    usage = ladder_usage(paper, x, y)
    assert usage.stage_share > 0.01 and usage.output_share > 0 and usage.state_effect == 0  # no history yet
    paper(x)
    assert ladder_usage(paper, x).state_effect > 0
    assert set(usage.as_dict("ptl/")) == {
        "ptl/stage_share", "ptl/output_share", "ptl/state_effect",
        "ptl/grad_norm/cells", "ptl/grad_norm/fusions", "ptl/grad_norm/backbone",
    }  # fmt: skip


def test_zeroing_the_cells_leaves_exactly_the_backbone():
    torch.manual_seed(0)
    net = TinyCNN()
    wrapped = wrap_with_ptl(net, input_size=(3, 32, 32))
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32)
        wrapped.train()(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(wrapped.eval()(x), bconv.unwrap_ptl(wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32)))(x))
        wrapped.ptl.zero_cells = True
        ablated = wrapped(x)
        wrapped.ptl.zero_cells = False
        plain = TinyCNN()
        plain.load_state_dict(wrapped.model.state_dict())
        assert torch.equal(ablated, plain.eval()(x))


def test_ladder_usage_finds_the_ptl_model_inside_a_network_and_refuses_none_or_two():
    class Outer(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.nets = nn.ModuleList(wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), final_init="paper") for _ in range(n))

        def forward(self, x):
            return sum(net(x) for net in self.nets)

    x = torch.randn(2, 3, 32, 32)
    assert ladder_usage(Outer(1), x).output_share > 0
    with pytest.raises(BConvError, match="holds 2"):
        ladder_usage(Outer(2), x)
    with pytest.raises(BConvError, match="holds 0"):
        ladder_usage(TinyCNN(), x)


# ------------------------------------------------------------------ checkpoints of the earlier ladder


def _earlier_ladder_state_dict() -> dict[str, torch.Tensor]:
    """What bconv 0.1 wrote for a TinyCNN: plain 1x1 fusions, the final one a bare Conv2d."""
    state = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), final_init="paper").state_dict()
    old = {k: v for k, v in state.items() if not k.startswith(("ptl.fuses.", "ptl.final_fuse."))}
    old["ptl.fuses.0.weight"] = torch.zeros(2, 16 + 8, 1, 1)
    old["ptl.fuses.1.weight"] = torch.zeros(2, 32 + 8, 1, 1)
    old["ptl.final_fuse.weight"] = torch.zeros(32, 32 + 8, 1, 1)
    return old


def test_a_checkpoint_of_the_earlier_ladder_gets_a_clear_error_and_changes_nothing():
    old = _earlier_ladder_state_dict()
    with pytest.raises(CheckpointError, match="earlier PTL ladder.*Nothing was loaded.*'model.'"):
        bconv.load_ptl(TinyCNN(), old)
    wrapped = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), final_init="paper")
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    old["model.stem.0.weight"] = old["model.stem.0.weight"] + 1
    with pytest.raises(CheckpointError, match="earlier PTL ladder"):
        wrapped.load_state_dict(old)
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items())
    # The recipe in the message: the backbone's weights load into the new ladder's network.
    p = "model."
    wrapped.model.load_state_dict({k[len(p) :]: v for k, v in old.items() if k.startswith(p)})
    assert torch.equal(wrapped.model.stem[0].weight, old["model.stem.0.weight"])


# ------------------------------------------------------------------ every export path on the default ladder


def _trained_default(**options) -> nn.Module:
    torch.manual_seed(0)
    wrapped = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), **options)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    for _ in range(2):  # move off the exact start, so the cells contribute
        wrapped.train()(torch.randn(4, 3, 32, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return wrapped.eval()


def test_jit_trace_and_torch_export_of_the_default_ladder_match_eager():
    wrapped = _trained_default()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = wrapped(x)
        traced = torch.jit.trace(wrapped, x, check_trace=False)
        torch.testing.assert_close(traced(x), expected)
        exported = torch.export.export(wrapped, (x,))
        torch.testing.assert_close(exported.module()(x), expected)


def test_eval_output_of_the_default_ladder_is_independent_of_batch_companions():
    wrapped = _trained_default()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        together = wrapped(x)
        alone = torch.cat([wrapped(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone)


def test_channels_last_and_bf16_autocast_on_the_default_ladder():
    wrapped = _trained_default().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = wrapped(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = wrapped.train()(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert torch.isfinite(reference).all()
