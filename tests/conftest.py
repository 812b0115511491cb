import pytest
import torch
from torch import nn

from bconv._zoo import ZooModel, build


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
