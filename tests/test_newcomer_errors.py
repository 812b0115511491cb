"""Dead ends a newcomer met (issue 32): each now ends in one message that says what to do."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bconv
from bconv import BConvError, TraceError
from bconv.errors import StateGraphError
from conftest import TinyCNN


class BranchingNet(nn.Module):
    """A network whose own forward branches on a tensor's value: fx cannot trace it, nor make it a leaf."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.a(x)
        if x.mean() > 0:
            x = x * 2
        return self.fc(self.b(x).mean((2, 3)))


def test_control_flow_in_the_networks_own_forward_is_not_told_to_make_the_network_a_leaf():
    net = BranchingNet()
    with pytest.raises(TraceError) as err:
        bconv.wrap_with_ptl(net, input_size=(3, 32, 32))
    message = str(err.value)
    assert "BranchingNet.forward itself, which cannot be a leaf" in message
    assert "move it into a submodule" in message and "Mark the module that does this" not in message


def test_detach_false_without_detach_state_says_what_to_call_before_torch_fails():
    model = bconv.wrap_with_ptl(TinyCNN(), input_size=(3, 16, 16), detach=False).train()
    x = torch.randn(4, 3, 16, 16)
    model(x).sum().backward()  # frees the graph the stored state points into
    with pytest.raises(StateGraphError, match=r"detach_state\(\).*retain_graph=True") as err:
        model(x)
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, BConvError)  # torch's kind of error too
    model.detach_state()  # the fix the message names
    model(x).sum().backward()


def test_detach_false_with_retained_graph_or_a_window_is_not_refused():
    model = bconv.wrap_with_ptl(TinyCNN(), input_size=(3, 16, 16), detach=False).train()
    x = torch.randn(4, 3, 16, 16)
    model(x).sum().backward(retain_graph=True)  # the graph stays: back-propagating through it again is fine
    model(x).sum().backward()
    model.detach_state()
    torch.stack([model(x).sum() for _ in range(3)]).sum().backward()  # a k=3 window, one backward


def test_one_resolution_change_gives_one_warning_not_one_per_cell():
    model = bconv.wrap_with_ptl(TinyCNN(), input_size=(3, 16, 16)).train()
    cells = [m for m in model.ptl.modules() if isinstance(m, bconv.cells.StatefulCell)]
    assert len(cells) == 3
    model(torch.randn(2, 3, 16, 16))
    before = [c.c_prev.shape[-2:] for c in cells]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(2, 3, 32, 32))
    changed = [w for w in caught if "spatial size of its state changed" in str(w.message)]
    assert len(changed) == 1 and "every other cell's of the same ladder" in str(changed[0].message)
    after = [c.c_prev.shape[-2:] for c in cells]
    assert all(a[0] == 2 * b[0] for a, b in zip(after, before))  # every cell reset, its state now at the new size
