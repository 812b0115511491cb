"""COP's importance: how redundant each channel is (DESIGN.md §8).

Redundancy is data-free: for each spatial tap of the kernel that consumes a layer's channels,
every input channel is a vector over the consumer's filters; the |Pearson| correlation of every
pair, averaged over the taps, with a zero diagonal, normalised once; ``r_i`` is the mean of
channel i's ``top_k`` largest correlations. Only the rows that held a cut channel among their
top-k are recomputed after a cut.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from ..surgery._trace import eval_mode

# Work cap for one consumer's correlation matrix (taps x filters x channels^2): a Linear that reads a
# flattened 7x7 map (VGG's classifier) would otherwise cost tens of GFLOPs for one matrix.
_CORRELATION_BUDGET = 2e9


def _similarity(w: Tensor, kind: str, normalize: str) -> Tensor:
    """COP's normalised n x n redundancy matrix from a consumer kernel ``w`` of shape [taps, filters, n].

    The released code (``prune_common.get_correlation``, ``get_cosine_sim``, ``get_inner_product``,
    ``get_normalized_feature``), for each tap t and input channels i, j seen as vectors over the filters:

        pearson:  |sum_o (w_oi - mean_i)(w_oj - mean_j)| / filters / (std_i std_j + 1e-8)   (population std)
        cosine:   |<w_i, w_j>| / (|w_i| |w_j| + 1e-8)
        inner:    |<w_i, w_j>|

    averaged over the taps; the diagonal is zeroed and the matrix divided once by its largest entry
    (``"max"``), by the sum of the whole matrix / 2 (``"l1"``) or by its Frobenius norm (``"l2"``).

    A dead channel (constant consumer weights at every tap: zero std, zero norm) has a zero row and
    column here, as in the released code, where it then counts as unique and is never cut. bconv
    gives it the largest redundancy, 1, in its own row only, after normalising: the scale and every
    other channel's redundancy are what the released code computes.
    """
    w = w.float()
    filters = w.shape[1]
    if kind == "pearson":
        z = w - w.mean(dim=1, keepdim=True)
        scale = z.pow(2).mean(dim=1).sqrt()  # population std, as np.std
        sim = torch.einsum("toi,toj->tij", z, z) / filters / (scale.unsqueeze(2) * scale.unsqueeze(1) + 1e-8)
    elif kind == "cosine":
        scale = w.norm(dim=1)
        sim = torch.einsum("toi,toj->tij", w, w) / (scale.unsqueeze(2) * scale.unsqueeze(1) + 1e-8)
    else:
        scale = w.norm(dim=1)
        sim = torch.einsum("toi,toj->tij", w, w)
    m = sim.abs().mean(dim=0)
    m.fill_diagonal_(0)
    if normalize == "max":
        norm = m.max()
    elif normalize == "l1":
        norm = m.sum() / 2
    else:
        norm = m.norm()
    m = m / norm if norm > 0 else m
    dead = (scale <= 1e-6 * scale.amax(dim=1, keepdim=True).clamp_min(1e-30)).all(dim=0)
    if dead.any():
        m[dead] = 1.0
        m.fill_diagonal_(0)
    return m


_CALIBRATION_SAMPLES = 8192  # activation vectors kept per layer (positions x samples, drawn evenly)


def _activations(model: nn.Module, roots: list[nn.Module], batches: Iterable[Tensor]) -> dict[nn.Module, Tensor]:
    """Each root layer's output channels as columns: [samples x positions (capped), channels]."""
    seen: dict[nn.Module, list[Tensor]] = {m: [] for m in roots}

    def hook(m: nn.Module, args: Any, out: Any) -> None:
        if not isinstance(out, Tensor):
            return
        a = out.detach().float()
        a = a.movedim(1, -1) if isinstance(m, nn.modules.conv._ConvNd) else a
        a = a.reshape(-1, a.shape[-1])
        step = max(1, a.shape[0] // (_CALIBRATION_SAMPLES // 4))
        seen[m].append(a[::step])

    handles = [m.register_forward_hook(hook) for m in roots]
    try:
        with eval_mode(model), torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for m, parts in seen.items():
        if parts:
            a = torch.cat(parts)
            out[m] = a[:: max(1, a.shape[0] // _CALIBRATION_SAMPLES)]
    return out


def _consumer_kernel(module: nn.Module, idxs: list[int], root_idxs: list[int], n: int) -> Tensor | None:
    """The part of ``module``'s kernel that reads the group's n channels, as [taps, filters, n]; None if
    the layer cannot give per-channel vectors (grouped or depthwise convolutions, partial coverage)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        return None  # depthwise and grouped: skipped as in COP; correlate through the next pointwise kernel
    w = module.weight.detach()
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        w = w.transpose(0, 1)
    w = w.reshape(w.shape[0], w.shape[1], -1)  # [filters, in, taps]
    if len(set(root_idxs)) != n or len(idxs) % n or max(idxs) >= w.shape[1]:
        return None  # Torch-Pruning maps the channels through a reshape this kernel does not read one to one
    order = sorted(range(len(idxs)), key=lambda i: (root_idxs[i], i))
    cols = torch.tensor([idxs[i] for i in order])
    per = len(idxs) // n  # >1 for a Linear reading a flattened map: each channel spans `per` inputs
    sel = w[:, cols, :].reshape(w.shape[0], n, per * w.shape[2])  # [filters, n, taps]
    taps = sel.shape[2]
    affordable = max(1, int(_CORRELATION_BUDGET // max(1, sel.shape[0] * n * n)))
    if taps > affordable:
        sel = sel[:, :, torch.linspace(0, taps - 1, affordable).round().long()]
    return sel.permute(2, 0, 1)


class _Redundancy:
    """One consumer's normalised matrix and each row's current top-k (updated row by row on a cut)."""

    def __init__(self, matrix: Tensor, top_k: int):
        self.m = matrix.numpy().astype(np.float32)
        self.k = max(1, min(top_k, self.m.shape[0] - 1))
        self.r = np.zeros(self.m.shape[0])
        self.kth = np.zeros(self.m.shape[0], dtype=np.float32)
        self._rows(np.arange(self.m.shape[0]))

    def _rows(self, rows: np.ndarray) -> None:
        # After partitioning the negated rows, the first k entries are the k largest and entry k-1 the
        # k-th largest itself (ndarray.mean/min cost more in call overhead than the partition here).
        top = np.partition(-self.m[rows], self.k - 1, axis=1)
        self.r[rows] = -top[:, : self.k].sum(axis=1) / self.k  # exactly ndarray.mean's float32 result
        self.kth[rows] = -top[:, self.k - 1]

    def cut(self, j: int, alive: np.ndarray, total: np.ndarray) -> None:
        """Remove channel j; ``total`` (the sum of r over the group's consumers) follows the changed rows."""
        col = self.m[:, j]
        # Only rows that held j among their top-k change; zeroing an entry that is 0 changes nothing.
        rows = np.flatnonzero((col > 0) & (col >= self.kth) & alive)
        self.m[j, :] = 0
        self.m[:, j] = 0
        if len(rows):
            old = self.r[rows]
            self._rows(rows)
            total[rows] += self.r[rows] - old
