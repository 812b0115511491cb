import pytest
import torch

from bconv._zoo import ZooModel, build


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def zoo_model(spec: str) -> torch.nn.Module:
    zoo, _, name = spec.partition(":")
    return build(ZooModel(zoo, name))
