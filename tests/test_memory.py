"""What the ladder keeps for backward (docs/memory.md): the recomputed cells and the column-block fusion compute
exactly what the stored path computes, keep less by the amount their design says, and a frozen backbone leaves
nothing of the backbone alive for backward but the stage outputs the fusions read.

Memory is counted as benchmarks/overhead.py counts it on CPU: the bytes of the storages autograd saves for
backward (``torch.autograd.graph.saved_tensors_hooks``), each storage once.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bconv import wrap_with_ptl
from bconv.cells import BConvCell, BConvCellV2, StatefulCell
from bconv.ptl.ladder import Fusion
from conftest import TinyCNN, stateful_cells


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class Stride4Net(nn.Module):
    """Stages at reductions 2, 4, 8, 16 (``stage3.1``) and 32; paired at ``STAGES`` (4, 8, 32), the ladder's
    first and last rungs are chains of two stride-2 cells."""

    STAGES = ["stage1", "stage2", "stage3"]

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.stage3 = nn.Sequential(
            nn.Conv2d(24, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.stage3(self.stage2(self.stage1(self.stem(x)))).mean((2, 3)))


def saved_bytes(step) -> tuple[int, dict[int, torch.Tensor]]:
    """Bytes of the storages autograd saves while ``step()`` runs (each once), and one tensor of each storage."""
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(t.untyped_storage().nbytes() for t in saved.values()), saved


def _pair(net: type[nn.Module], **options) -> tuple[nn.Module, nn.Module]:
    """The same wrapped network (same weights) with the stored and with the recomputed ladder."""
    models = []
    for recompute in (False, True):
        torch.manual_seed(0)
        stages = getattr(net, "STAGES", None)
        model = wrap_with_ptl(net(), stages, input_size=(3, 64, 64), recompute=recompute, **options)
        if options.get("final_init", "identity") == "identity":  # as after some training: the silenced cell acts
            nn.init.normal_(model.ptl.cells[-1][-1].conv.weight, std=0.3)
        models.append(model)
    assert all(c.recompute == r for m, r in zip(models, (False, True)) for c in stateful_cells(m))
    return models[0], models[1]


@pytest.mark.parametrize("cell", ["v1", "v2"])
@pytest.mark.parametrize("final_init", ["identity", "paper"])
def test_recomputed_ladder_equals_the_stored_one_over_training_steps(cell, final_init):
    # Bit for bit on CPU: the recompute runs the same operations on the same arguments.
    exact = dict(rtol=0, atol=0)
    stored, recomputed = _pair(Stride4Net, cell=cell, final_init=final_init)
    assert [len(chain) for chain in recomputed.ptl.cells] == [2, 1, 2], "chains at the first and last rungs"
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (stored, recomputed)]
    for step in range(4):
        x, y = torch.randn(3, 3, 64, 64), torch.randint(0, 5, (3,))
        x.requires_grad_(True)
        losses, inputs = [], []
        for model, opt in zip((stored, recomputed), opts):
            xi = x.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(model.train()(xi), y)
            opt.zero_grad()
            loss.backward()
            losses.append(loss)
            inputs.append(xi.grad)
        torch.testing.assert_close(losses[1], losses[0], **exact)
        torch.testing.assert_close(inputs[1], inputs[0], **exact, msg="gradient of the image")
        for (name, p), q in zip(stored.named_parameters(), recomputed.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **exact, msg=f"gradient of {name} at step {step}")
        if step:  # (v2's transpose conv gets a gradient once there is a previous output)
            assert all(p.grad.abs().sum() > 0 for p in recomputed.ptl.parameters()), "the loss reaches every weight"
        for opt in opts:
            opt.step()
    for a, b in zip(stateful_cells(stored), stateful_cells(recomputed)):
        for name in a._state_names:
            torch.testing.assert_close(getattr(b, name), getattr(a, name), **exact, msg=name)
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(recomputed.eval()(x), stored.eval()(x), **exact)


@pytest.mark.parametrize("cls", [BConvCell, BConvCellV2])
def test_a_recomputed_cell_keeps_five_state_sized_tensors_less_and_equals_the_stored_cell(cls):
    # The stored cell keeps sigmoid(i), sigmoid(f), sigmoid(o), tanh(g) and tanh(C), and v2 the concatenation
    # cat(x, r) for its gate conv; the recomputed one keeps only its arguments (input, weights, previous states).
    stored = cls(6, 4, 2, recompute=False)
    recomputed = copy.deepcopy(stored)
    recomputed.recompute = True
    x = torch.randn(3, 6, 10, 10, requires_grad=True)
    sizes, outputs = [], []
    for cell in (stored, recomputed):
        cell(x.detach())  # a first batch: the state is a real tensor now
        out = {}
        sizes.append(saved_bytes(lambda: out.setdefault("y", cell(x)))[0])
        out["y"].pow(2).sum().backward()
        outputs.append((out["y"], x.grad.clone(), cell.conv.weight.grad.clone()))
        x.grad = None
    state = stored.c_prev.untyped_storage().nbytes()
    assert sizes[0] - sizes[1] == 5 * state + (x.untyped_storage().nbytes() if cls is BConvCellV2 else 0)
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a)
    torch.testing.assert_close(recomputed.c_prev, stored.c_prev)


def test_a_chain_of_recomputed_cells_does_not_keep_the_first_cells_output():
    chain = nn.Sequential(BConvCell(3, 4, 2), BConvCell(4, 4, 2))
    x = torch.randn(2, 3, 16, 16)
    chain(x)  # a first batch: the states are real tensors now
    out = {}
    _, saved = saved_bytes(lambda: out.setdefault("y", chain(x)))
    out["y"].sum().backward()
    shapes = sorted(tuple(t.shape) for t in saved.values() if t.dim() == 4 and t.shape[0] == 2)
    # the image and the two previous states; not the first cell's output, of its state's shape [2, 4, 8, 8]
    assert shapes == [(2, 3, 16, 16), (2, 4, 4, 4), (2, 4, 8, 8)]
    assert all(c.conv.weight.grad.abs().sum() > 0 for c in chain)
    y = chain[0](x)
    y.mul_(2.0)  # changed in place after the first cell: the second cell keeps it as it is
    _, saved = saved_bytes(lambda: chain[1](y))
    assert y.untyped_storage().data_ptr() in saved


def test_the_fusion_keeps_no_concatenated_copy_and_equals_conv_over_the_concatenation():
    fusion = Fusion(16 + 4, 8)
    x, y = torch.randn(2, 16, 6, 6, requires_grad=True), torch.randn(2, 4, 6, 6, requires_grad=True)
    size, saved = saved_bytes(lambda: fusion(x, y))
    assert not any(t.dim() == 4 and t.shape[1] == 20 for t in saved.values() if t is not fusion.conv.weight)
    storages = {t.untyped_storage().data_ptr() for t in saved.values()}
    assert x.untyped_storage().data_ptr() in storages, "the stage output itself, shared with the backbone"
    reference = copy.deepcopy(fusion)
    expected = reference.relu(reference.bn(reference.conv(torch.cat([x, y], dim=1))))
    torch.testing.assert_close(fusion(x, y), expected)
    g = torch.randn_like(expected)
    grads = torch.autograd.grad(fusion(x, y), (x, y, fusion.conv.weight, fusion.conv.bias), g)
    ref_grads = torch.autograd.grad(expected, (x, y, reference.conv.weight, reference.conv.bias), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert fusion.state_dict().keys() == reference.state_dict().keys()


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    F.cross_entropy(model.train()(x), torch.tensor([0, 1, 2])).backward()


def test_the_wrapped_model_keeps_less_for_backward_with_recompute_by_the_cells_share():
    stored, recomputed = _pair(Stride4Net)
    x = torch.randn(3, 3, 64, 64)
    for model in (stored, recomputed):
        _train_step(model, x)  # the states are real tensors now
    kept = [saved_bytes(lambda m=m: _train_step(m, x))[0] for m in (stored, recomputed)]
    # Five state-sized tensors per cell, and the first cell's output of each of the two chains.
    cells = stateful_cells(recomputed)
    chains = [c[0] for c in recomputed.ptl.cells if len(c) > 1]
    expected = 5 * sum(c.c_prev.untyped_storage().nbytes() for c in cells)
    expected += sum(c.c_prev.untyped_storage().nbytes() for c in chains)
    assert kept[0] - kept[1] == expected


def test_a_frozen_backbone_keeps_only_the_stage_outputs_the_fusions_read():
    torch.manual_seed(0)
    wrapped = wrap_with_ptl(Stride4Net(), Stride4Net.STAGES, input_size=(3, 64, 64))
    full = copy.deepcopy(wrapped)
    for p in wrapped.model.parameters():
        p.requires_grad_(False)
    wrapped.model.head.requires_grad_(True)
    x = torch.randn(3, 3, 64, 64)
    outputs: dict[int, str] = {}  # storage -> module, for every module inside the stem and the stages
    for name, m in wrapped.model.named_modules():
        if name.startswith(("stem.", "stage")) and not list(m.children()):
            m.register_forward_hook(lambda m, a, o, n=name: outputs.__setitem__(o.untyped_storage().data_ptr(), n))
    _train_step(wrapped, x)
    outputs.clear()
    frozen, saved = saved_bytes(lambda: _train_step(wrapped, x))
    backbone = {outputs[k] for k in saved if k in outputs}
    # each paired stage's last module, whose output its fusion reads; the last stage's output is replaced by
    # x + proj(y), which keeps y, not x
    assert backbone == {"stage1.1", "stage2.2"}
    assert all(p.grad is not None for p in wrapped.ptl.parameters()) and wrapped.model.head.weight.grad is not None
    assert all(p.grad is None for n, p in wrapped.model.named_parameters() if not n.startswith("head"))
    _train_step(full, x)
    assert frozen < saved_bytes(lambda: _train_step(full, x))[0]


def test_recompute_is_saved_with_a_checkpoint_but_not_compared_when_one_loads():
    from bconv import PTLConfig, load_ptl

    stored = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), recompute=False)
    state = stored.state_dict()
    assert PTLConfig.from_extra_state(state["_extra_state"]).recompute is False
    default = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32))
    default.load_state_dict(state)  # an option of how the ladder runs, not of what it computes: no mismatch
    assert all(c.recompute for c in stateful_cells(default))
    rebuilt = load_ptl(TinyCNN(), state)
    assert rebuilt.config.recompute is False and not any(c.recompute for c in stateful_cells(rebuilt))
