import contextlib

import pytest
import torch
from torch import nn

from bconv._zoo import ZooModel, build, timm_families
from bconv.errors import TraceError

# timm families bconv cannot handle yet, and why (benchmarks/results/zoo.md has the full messages).
TIMM_KNOWN_FAILURES = {
    "gemma4_vit": "torch.fx cannot trace Gemma4VitEncoder (control flow on traced values); it has no spatial "
    "stages, so it should be refused before tracing",
    "hiera": "Hiera's fx graph fails on inputs the model accepts (its mask-unit token layout), and its "
    "feature_info names token sequences, not feature maps",
}


def timm_family_params() -> list:
    """``(family, model name)`` of one model per timm family, the known failures as strict xfails."""
    return [
        pytest.param(family, name, marks=pytest.mark.xfail(strict=True, raises=TraceError, reason=TIMM_KNOWN_FAILURES[family]))
        if family in TIMM_KNOWN_FAILURES
        else pytest.param(family, name)
        for family, name in sorted(timm_families().items())
    ]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def single_thread():
    """torch on one thread inside the block, the previous thread count restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: bitwise equality needs one thread count across runs, and a tiny CNN
    on two shared cores runs many times faster on one thread than with two threads competing."""
    with single_thread():
        yield


def zoo_model(spec: str) -> torch.nn.Module:
    zoo, _, name = spec.partition(":")
    return build(ZooModel(zoo, name))


class TinyCNN(nn.Module):
    """A user's own small CNN: three stages at reductions 2, 4, 8."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


def docs_block(page: str, heading: str) -> str:
    """The first ```python block after the line ``heading`` of ``docs/PAGE``: what a test runs, so the docs cannot
    drift (tests/test_docs.py checks that every block marked ``<!-- test: tests/test_NAME.py -->`` is read here)."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / page).read_text()
    section = text[text.index(f"\n{heading}\n") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("\n```\n", start)]


class Preempted(Exception):
    """A job killed by its scheduler, in the resume tests."""


def preempt_after_checkpoint(at: int):
    """A ``time_to_checkpoint()`` for the docs' resume recipes: a checkpoint at call ``at``, killed right after."""
    calls = []

    def time_to_checkpoint():
        calls.append(None)
        if len(calls) == at + 1:
            raise Preempted  # the job dies right after writing its checkpoint
        return len(calls) == at

    return time_to_checkpoint


def free_port() -> int:
    """A free TCP port on the loopback, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stateful_cells(model: nn.Module) -> list:
    """Every BConv-Cell of ``model``, in module order."""
    from bconv.cells import StatefulCell

    return [m for m in model.modules() if isinstance(m, StatefulCell)]


def latent_tensors(model: nn.Module) -> dict:
    """``{state name: tensor or None}`` of every cell of a PTL model, read through ``latent_state_dict()``."""
    return {k: v for cell in model.latent_state_dict().values() for k, v in cell.items() if k != "state_mode"}


class Snapshot:
    """Everything of a network a failed load must leave alone: its tensors, its modules and its hooks."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tensors = {k: v.clone() for k, v in model.state_dict().items()}
        self.modules = [(name, type(m)) for name, m in model.named_modules()]
        self.parameters = [id(p) for p in model.parameters()]

    def assert_unchanged(self):
        now = self.model.state_dict()
        assert now.keys() == self.tensors.keys()
        changed = [k for k, v in self.tensors.items() if now[k].shape != v.shape or not torch.equal(now[k], v)]
        assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"
        assert [(name, type(m)) for name, m in self.model.named_modules()] == self.modules
        assert [id(p) for p in self.model.parameters()] == self.parameters
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in self.model.modules()), "hooks left behind"
