"""A small real transfer task for the ladder's tests: pre-train on digits 0-4, fine-tune on 5-9.

scikit-learn's digits ship with scikit-learn (nothing is downloaded). The 8x8 images are upsampled
to 16x16 RGB. The network is a user's own small CNN with BatchNorm, three stages at reductions
2, 4 and 8, pre-trained here so that fine-tuning starts from learnt features, as PTL assumes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class SmallNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.stage1, self.stage2, self.stage3 = _block(3, 16), _block(16, 32), _block(32, 64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.stage3(self.stage2(self.stage1(x))).mean((2, 3)))


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - x.mean()) / x.std(), torch.tensor(d.target)


def train(model, x, y, lr, epochs, seed, ptl=False, batch=32):
    """SGD (momentum 0.9, weight decay 5e-4) as a new user fine-tunes; the per-step training losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    losses = []
    for _ in range(epochs):
        if ptl:
            model.reset_state()
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if ptl:
                model.detach_state()
            losses.append(loss.item())
    return losses


@functools.lru_cache(maxsize=1)
def pretrained_state() -> dict[str, torch.Tensor]:
    x, y = digits()
    torch.manual_seed(0)
    net = SmallNet()
    train(net, x[y < 5], y[y < 5], lr=0.05, epochs=4, seed=0)
    return {k: v.clone() for k, v in net.state_dict().items()}


def target_split(seed: int, n_train: int = 300):
    x, y = digits()
    x, y = x[y >= 5], y[y >= 5] - 5
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return (x[perm[:n_train]], y[perm[:n_train]]), (x[perm[n_train:]], y[perm[n_train:]])


def fresh_pretrained(seed: int) -> SmallNet:
    net = SmallNet()
    net.load_state_dict(pretrained_state())
    torch.manual_seed(seed)
    net.fc = nn.Linear(64, 5)  # the new task's classifier
    return net
