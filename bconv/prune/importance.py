"""COP's importance: how redundant each channel is, and what it costs (docs/design.md §8).

Redundancy is data-free: for each spatial tap of the kernel that consumes a layer's channels,
every input channel is a vector over the consumer's filters; the |Pearson| correlation of every
pair, averaged over the taps, with a zero diagonal, normalised once; ``r_i`` is the mean of
channel i's ``top_k`` largest correlations. The cost terms are log2 of the params ``P`` and FLOPs
``F`` of the layers a channel group touches, over the largest group's:

    imp_i = alpha (1 - r_i) + beta (1 - log2 F / max log2 F) + gamma (1 - log2 P / max log2 P)

and the lowest goes first. This module is the one place that formula is written:
:func:`redundancy_term` is its first term and :func:`cost_terms` the other two. :class:`COPImportance`
is the score as a Torch-Pruning importance; ``cop_prune``'s greedy planner (``planner.py``) calls the
same functions and, after each cut, recomputes only the rows that held the cut channel among their top-k.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Iterable, Literal

import numpy as np
import torch
import torch_pruning as tp
from torch import Tensor, nn

from ..errors import ConfigError
from ..surgery import eval_mode
from .adapter import all_groups, is_depthwise, is_layer, out_channels, recording_positions

__all__ = [
    "COPImportance", "PRESETS", "SIMILARITIES", "NORMALIZATIONS", "Similarity", "Normalization",
    "Redundancy", "cost_terms", "group_matrices", "layer_activations", "mean_abs_similarity", "redundancy_term",
    "similarity_matrix", "split_group",
]  # fmt: skip

Similarity = Literal["pearson", "cosine", "inner"]
Normalization = Literal["max", "l1", "l2"]
SIMILARITIES = typing.get_args(Similarity)
NORMALIZATIONS = typing.get_args(Normalization)
PRESETS: dict[str, tuple[float, float, float]] = {
    "balanced": (1.0, 1.0, 1.0),  # COP's ResNet-18 ImageNet recipe
    "smaller": (1.0, 0.0, 3.0),  # COP's VGG16 CIFAR recipe: parameters weigh
    "faster": (1.0, 3.0, 0.0),  # COP's ResNet-32 CIFAR recipe: FLOPs weigh
}

# Work cap for one consumer's correlation matrix (taps x filters x channels^2): a Linear that reads a
# flattened 7x7 map (VGG's classifier) would otherwise cost tens of GFLOPs for one matrix.
_CORRELATION_BUDGET = 2e9


# Rows per strip in which a wide similarity matrix is computed (see mean_abs_similarity).
_STRIP = 256


def mean_abs_similarity(z: Tensor, scale: Tensor | None, filters: int, out: Tensor | None = None) -> Tensor:
    """``mean_t |z_t^T z_t / filters / (scale_t scale_t^T + 1e-8)|`` (no scale: ``mean_t |z_t^T z_t|``),
    the n x n matrix of ``z`` [taps, filters, n] and ``scale`` [taps, n], written into ``out`` when given.

    The matrix is symmetric: rows i..i+256 are computed against columns i.. only, scaled while the strip
    is in cache, and mirrored into the rows below, so each off-diagonal block is computed once. Each entry
    is the same dot product and the same divisions as in one ``bmm`` of the whole (equal up to the order
    of float additions), in about 0.6x the time for n >= 1024 (ResNet-50's 2048-wide residual stream,
    read by its classifier).
    """
    taps, _, n = z.shape
    size = n if n <= _STRIP else _STRIP
    out = z.new_empty(n, n) if out is None else out
    for i in range(0, n, size):
        j = i + size
        strip = torch.bmm(z[:, :, i:j].transpose(1, 2), z[:, :, i:])  # [taps, rows i:j, columns i:]
        if filters != 1:
            strip.div_(filters)
        if scale is not None:
            strip.div_(torch.mul(scale[:, i:j, None], scale[:, None, i:]).add_(1e-8))
        strip = strip[0].abs_() if taps == 1 else strip.abs_().mean(dim=0)
        out[i:j, i:] = strip
        out[j:, i:j] = strip[:, size:].t()
    return out


def similarity_matrix(w: Tensor, kind: str, normalize: str, out: Tensor | None = None) -> Tensor:
    """COP's normalised n x n redundancy matrix from a consumer kernel ``w`` of shape [taps, filters, n]
    (written into ``out`` when given).

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
    w = w.float().contiguous()  # a consumer's [taps, filters, n] is a permuted view: bmm would copy it per strip
    if kind == "pearson":
        z = w - w.mean(dim=1, keepdim=True)
        scale = z.pow(2).mean(dim=1).sqrt()  # population std, as np.std
        m = mean_abs_similarity(z, scale, w.shape[1], out)
    else:
        scale = w.norm(dim=1)
        m = mean_abs_similarity(w, scale if kind == "cosine" else None, 1, out)
    m.fill_diagonal_(0)
    if normalize == "max":
        norm = m.max()
    elif normalize == "l1":
        norm = m.sum() / 2
    else:
        norm = m.norm()
    if norm > 0:
        m.div_(norm)
    dead = (scale <= 1e-6 * scale.amax(dim=1, keepdim=True).clamp_min(1e-30)).all(dim=0)
    if dead.any():
        m[dead] = 1.0
        m.fill_diagonal_(0)
    return m


_CALIBRATION_SAMPLES = 8192  # activation vectors kept per layer (positions x samples, drawn evenly)


def layer_activations(model: nn.Module, roots: list[nn.Module], batches: Iterable[Tensor]) -> dict[nn.Module, Tensor]:
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
    cols = [idxs[i] for i in order]
    per = len(idxs) // n  # >1 for a Linear reading a flattened map: each channel spans `per` inputs
    if cols == list(range(cols[0], cols[0] + len(cols))):  # the usual case: a slice, not a gathered copy
        sel = w[:, cols[0] : cols[0] + len(cols), :]
    else:
        sel = w[:, torch.tensor(cols), :]
    sel = sel.reshape(w.shape[0], n, per * w.shape[2])  # [filters, n, taps]
    taps = sel.shape[2]
    affordable = max(1, int(_CORRELATION_BUDGET // max(1, sel.shape[0] * n * n)))
    if taps > affordable:
        sel = sel[:, :, torch.linspace(0, taps - 1, affordable).round().long()]
    return sel.permute(2, 0, 1)


def group_matrices(
    outs: list[tuple[Any, Any]], ins: list[tuple[Any, Any]], n: int, similarity: str, normalize: str,
    ch_groups: int = 1,
) -> Tensor | None:
    """The normalised n x n matrices of a Torch-Pruning group's n channels, one per consumer kernel, as one
    [consumers, n, n] tensor (None: no kernel gives per-channel vectors).

    A group that moves in units of ``ch_groups`` channels may have consumers that read one column per unit (a
    gated MLP's ``fc2`` reads channel ``i`` of both halves through its column ``i``): the released matrix of those
    columns is computed (units x units) and each channel's row is its unit's, over the units of the first
    piece only, so that every channel's redundancy is its unit's as the released code computes it.
    """
    # A consumer read through a mapping Torch-Pruning widened (split, reshape) gives no per-channel kernel.
    units = n // ch_groups if ch_groups > 1 and n % ch_groups == 0 else None
    kernels: list[tuple[Tensor, bool]] = []  # (kernel, read once per unit)
    for m, it in ins:
        if not is_layer(m):
            continue
        idxs, roots = list(it.idxs), list(it.root_idxs)
        if units and len(idxs) == units and len({r % units for r in roots}) == units:
            by_unit = {r % units: i for r, i in zip(roots, idxs)}
            w = _consumer_kernel(m, [by_unit[u] for u in range(units)], list(range(units)), units)
            if w is not None:
                kernels.append((w, True))
            continue
        w = _consumer_kernel(m, idxs, roots, n)
        if w is not None:
            kernels.append((w, False))
    if not kernels:
        for m, it in outs:
            if is_layer(m) and not is_depthwise(m) and len(it.idxs) == n and max(it.idxs) < out_channels(m):
                w = m.weight.detach()
                w = w.transpose(0, 1) if getattr(m, "transposed", False) else w
                w = w.reshape(w.shape[0], -1)[torch.tensor(list(it.idxs))]
                kernels = [(w.t().unsqueeze(0), False)]
                break
    if not kernels:
        return None
    matrices = torch.empty(len(kernels), n, n, device=kernels[0][0].device)  # filled in place: no stacking copy
    for (w, per_unit), out in zip(kernels, matrices):
        if per_unit:
            unit = similarity_matrix(w, similarity, normalize)
            out.zero_()
            out[:, :units] = unit.repeat(ch_groups, 1)
        else:
            similarity_matrix(w, similarity, normalize, out)
    return matrices


def redundancy_term(r: Any, alpha: float) -> Any:
    """COP's first term, ``alpha (1 - r)``, of channels (or groups) with redundancy ``r`` (an array or a scalar).

    ``imp = redundancy_term(r, alpha) + cost_terms(costs, (gamma, beta))``: the module docstring's formula.

    Example::

        >>> redundancy_term(np.array([0.0, 0.25, 1.0]), alpha=2.0)
        array([2. , 1.5, 0. ])
    """
    return alpha * (1 - r)


def _log2_costs(costs: np.ndarray) -> np.ndarray:
    return np.log2(np.maximum(costs, 2.0))


def cost_terms(costs: np.ndarray, weights: np.ndarray, largest: np.ndarray | None = None) -> np.ndarray:
    """COP's cost terms ``beta (1 - rf) + gamma (1 - rp)`` of each channel group, ``rp = log2 P / max log2 P`` and
    ``rf = log2 F / max log2 F`` (params and FLOPs under 2 count as 2).

    Args:
        costs: ``[groups, 2]``: the params ``P`` and FLOPs ``F`` of the layers each group touches, at their
            current widths.
        weights: ``(gamma, beta)``, the weights of the params and FLOPs terms.
        largest: ``(max log2 P, max log2 F)`` over every group of the network, when ``costs`` holds only
            some of them (as :class:`COPImportance` scores one group at a time); by default the largest in
            ``costs``.

    Returns:
        The ``[groups]`` cost terms, float64.

    Example::

        >>> cost_terms(np.array([[8.0, 64.0], [32.0, 16.0]]), np.array([3.0, 0.5]))  # gamma=3, beta=0.5
        array([1.2       , 0.16666667])
    """
    logs = _log2_costs(costs)
    return (1 - logs / (logs.max(axis=0) if largest is None else largest)) @ weights


def _check_weights(alpha: float, beta: float, gamma: float) -> tuple[float, float, float]:
    chosen = tuple(float(w) for w in (alpha, beta, gamma))
    if any(w < 0 or not math.isfinite(w) for w in chosen) or not any(chosen):
        raise ValueError(f"(alpha, beta, gamma)={chosen} must be finite, >= 0 and not all zero")
    return chosen  # type: ignore[return-value]


# The smallest positive float32: ``col >= max(kth, _POSITIVE)`` is ``col > 0 and col >= kth``.
_POSITIVE = np.nextafter(np.float32(0), np.float32(1))


class Redundancy:
    """A group's normalised matrices [consumers, n, n], one per consumer kernel, and each row's current top-k,
    updated row by row on a cut (all consumers at once: they lose the same channel)."""

    def __init__(self, matrices: Tensor, top_k: int):
        self.m = matrices.detach().to("cpu", torch.float32).numpy()  # the greedy cut runs on the host
        consumers, n, _ = self.m.shape
        self.k = max(1, min(top_k, n - 1))
        self.reach = np.zeros((consumers, n), dtype=np.float32)  # a cut changes row i if m[c, i, j] >= reach[c, i]
        self.r = np.empty((consumers, n), dtype=np.float32)
        for c in range(consumers):
            self.r[c], self.reach[c] = self._top(self.m[c].copy())
        self.total = self.r.sum(axis=0)

    @property
    def mean(self) -> np.ndarray:
        """Each channel's redundancy averaged over the consumers."""
        return self.total / len(self.r)

    def _top(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's redundancy (the mean of its k largest entries) and reach (its k-th largest, or the smallest
        positive float), partitioning the rows ``a`` in place."""
        first = a.shape[1] - self.k
        a.partition(first, axis=1)  # the k largest last, the k-th largest itself at `first`
        top = a[:, first:]
        return top.sum(axis=1) / self.k, np.maximum(top[:, 0], _POSITIVE)  # ndarray.mean's float32 result

    def _rows(self, consumers: np.ndarray, rows: np.ndarray, alive: np.ndarray) -> np.ndarray:
        """The rows' redundancy among the channels still there (``alive``)."""
        # Cut channels count as 0 (masked here rather than written into the matrix: zeroing a column of a
        # 2048 x 2048 matrix is 2048 cache misses per cut). This runs once per cut for all the changed rows of
        # all consumers (ResNet-50: ~4,500 times), so it makes one copy and partitions it in place.
        a = self.m[consumers, rows]
        a *= alive
        r, self.reach[consumers, rows] = self._top(a)
        return r

    def cut(self, j: int, alive: np.ndarray) -> None:
        """Remove channel j (``alive``: the group's channels still there, j already not)."""
        # Only rows that held j (a positive entry) among their top-k change. The matrices are symmetric, so row j
        # (contiguous) reads as column j, except in a dead channel's row (all 1 there): its r stays 1 while k
        # channels remain.
        consumers, rows = ((self.m[:, j] >= self.reach) & alive).nonzero()
        if len(rows):
            self.r[consumers, rows] = self._rows(consumers, rows, alive)
            self.total[rows] = self.r[:, rows].sum(axis=0)  # summed afresh: no drift over thousands of cuts


class COPImportance(tp.importance.Importance):
    """COP's importance of every channel of a Torch-Pruning group, for ``tp.pruner.MetaPruner``.

    ``imp_i = alpha (1 - r_i) + beta (1 - rf) + gamma (1 - rp)``: ``r_i`` is channel i's redundancy in
    the kernels that consume the group (averaged over them, see the module docstring), ``rf`` and ``rp``
    the log2 FLOPs and params of every convolution and linear layer the group touches, at their current
    widths, over the largest group's in the network. Low scores are pruned first. Within one layer only
    ``r`` orders the channels; across layers (``global_pruning=True``) the cost terms weigh in as in COP.

    MetaPruner ranks once per step, where COP's own selection recomputes ``r`` after every cut:
    ``iterative_steps`` brings the two closer, and :func:`~bconv.prune.cop_prune` is COP's greedy
    selection itself.

    Args:
        alpha: the weight of redundancy (``PRESETS`` holds the released recipes' ``(alpha, beta, gamma)``:
            ``COPImportance(*PRESETS["faster"], example_inputs=x)``).
        beta: the weight of the FLOPs term.
        gamma: the weight of the parameters term.
        top_k: how many of a channel's largest correlations make its redundancy.
        similarity: ``"pearson"`` (COP's default), ``"cosine"`` or ``"inner"`` (inner product).
        normalize: ``"max"``, ``"l1"`` or ``"l2"``: how each matrix is scaled (see ``similarity_matrix``).
        example_inputs: the input you give MetaPruner; needed there when ``beta > 0`` (checked at the first
            score, not here: :func:`cop_prune` counts FLOPs itself and ignores it), to count each layer's
            output positions (FLOPs). Read once, on the first call.

    Example::

        >>> x = torch.randn(1, 3, 224, 224)
        >>> imp = COPImportance(example_inputs=x)
        >>> pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5, global_pruning=True,
        ...                               ignored_layers=[model.fc])
        >>> pruner.step()
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        *,
        top_k: int = 3,
        similarity: Similarity = "pearson",
        normalize: Normalization = "max",
        example_inputs: Tensor | None = None,
    ) -> None:
        self.alpha, self.beta, self.gamma = _check_weights(alpha, beta, gamma)
        if similarity not in SIMILARITIES:
            raise ConfigError(f"similarity={similarity!r} is not one of {', '.join(map(repr, SIMILARITIES))}")
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize={normalize!r} is not one of {', '.join(map(repr, NORMALIZATIONS))}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r} must be an integer >= 1")
        self.top_k, self.similarity, self.normalize = top_k, similarity, normalize
        self.example_inputs = example_inputs
        self._positions: dict[nn.Module, int] | None = None
        self._scale: tuple[Any, np.ndarray] | None = None  # (shapes, [max log2 params, max log2 FLOPs])

    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor:
        graph = group._DG
        n = len(group[0].idxs)
        outs, ins = split_group(group, graph)
        r = np.zeros(n)
        matrices = group_matrices(outs, ins, n, self.similarity, self.normalize)
        if matrices is not None:
            r = Redundancy(matrices, self.top_k).mean
        imp = redundancy_term(r, self.alpha)
        if self.beta or self.gamma:
            costs = np.array([self._costs([m for m, _ in outs + ins if is_layer(m)], graph)])
            imp = imp + cost_terms(costs, np.array([self.gamma, self.beta]), self._largest(graph))[0]
        return torch.as_tensor(imp, dtype=torch.float32)

    def _costs(self, layers: list[nn.Module], graph: Any) -> tuple[float, float]:
        if self._positions is None:
            if self.beta > 0 and self.example_inputs is None:  # cop_prune counts FLOPs itself: only MetaPruner's use needs them
                raise ValueError(
                    f"COPImportance(beta={self.beta:g}) weighs FLOPs, which need the input size: pass example_inputs= "
                    f"(the input you give MetaPruner), or beta=0"
                )
            self._positions = _output_positions(graph.model, self.example_inputs) if self.beta else {}
        unique = list(dict.fromkeys(layers))
        params = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in unique)
        flops = sum(2 * m.weight.numel() * self._positions.get(m, 0) for m in unique)
        return float(params), float(flops)

    def _largest(self, graph: Any) -> np.ndarray:
        """log2 of the largest group's params and FLOPs, recomputed when a layer's width has changed."""
        shapes = tuple(tuple(m.weight.shape) for m in graph.module2node if is_layer(m))
        if self._scale is None or self._scale[0] != shapes:
            costs = [self._costs([m for m, _ in sum(split_group(g, graph), []) if is_layer(m)], graph)
                     for _, g, _ in all_groups(graph.model, graph) if g is not None]  # fmt: skip
            self._scale = (shapes, _log2_costs(np.array(costs or [(2.0, 2.0)])).max(axis=0))
        return self._scale[1]


def split_group(group: Any, graph: Any) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]:
    """A group's ``(module, item)`` pairs whose output channels, and whose input channels, it prunes."""
    outs = [(it.dep.target.module, it) for it in group if graph.is_out_channel_pruning_fn(it.dep.handler)]
    ins = [(it.dep.target.module, it) for it in group if graph.is_in_channel_pruning_fn(it.dep.handler)]
    return outs, ins


def _output_positions(model: nn.Module, x: Any) -> dict[nn.Module, int]:
    """Each convolution's and linear layer's output positions per sample, from one forward of ``x``."""
    positions: dict[nn.Module, int] = {}
    with recording_positions(model, positions), eval_mode(model), torch.no_grad():
        model(*x) if isinstance(x, (list, tuple)) else model(x)
    return positions
