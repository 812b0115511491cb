"""COP's selection: greedy and global, one channel at a time, on Torch-Pruning's channel groups.

The cost terms use log2 of the params and FLOPs of each layer and its consumers at their current
widths: ``imp = alpha (1 - r) + beta (1 - rf) + gamma (1 - rp)``, lowest pruned first (DESIGN.md §8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch_pruning as tp
from torch import Tensor, nn

from .adapter import Protection, _all_groups, _depthwise, _has, _in_channels, _inside, _is_layer, _out_channels, _taps
from .importance import COPImportance, _activations, _cost_terms, _group_matrices, _Redundancy, _similarity, _split
from .report import PruneError, PruneTargetError, _skipped_hint

TOLERANCE = 0.02  # the target is met within this fraction of the metric


@dataclass
class _Group:
    root: nn.Module
    root_name: str
    n: int  # channels at the start
    ch_groups: int  # channels move in units of ch_groups (grouped convolutions prune every group alike)
    step: int  # units removed per greedy step (round_to)
    floor: int  # fewest units kept
    consumers: _Redundancy | None  # None: no kernel reads the group's channels one by one
    alive_ch: np.ndarray = field(init=False)  # original channel -> still there
    applied: np.ndarray = field(init=False)  # original channel -> its cut was already applied to the model
    cuts: int = 0  # channels cut (planned)

    def __post_init__(self) -> None:
        self.alive_ch = np.ones(self.n, dtype=bool)
        self.applied = np.zeros(self.n, dtype=bool)

    @property
    def units(self) -> int:
        return self.n // self.ch_groups

    @property
    def alive_units(self) -> int:
        return (self.n - self.cuts) // self.ch_groups

    def channels_of(self, unit: int) -> list[int]:
        return [unit + g * self.units for g in range(self.ch_groups)]

    def unit_redundancy(self) -> np.ndarray:
        """Redundancy of each unit, averaged over the consumers (coupled layers) and the unit's channels."""
        r = self.consumers.mean if self.consumers is not None else np.zeros(self.n)
        if self.ch_groups > 1:
            r = r.reshape(self.ch_groups, self.units).mean(axis=0)
            return np.where(self.alive_ch.reshape(self.ch_groups, self.units).all(axis=0), r, -np.inf)
        return np.where(self.alive_ch, r, -np.inf)

    def cut_unit(self, unit: int) -> None:
        for ch in self.channels_of(unit):
            self.alive_ch[ch] = False
            if self.consumers is not None:
                self.consumers.cut(ch, self.alive_ch)
        self.cuts += self.ch_groups


@dataclass(frozen=True)
class Floors:
    """How far any one layer may be narrowed.

    Attributes:
        min_channels: no layer keeps fewer channels than this (and never fewer than 1).
        max_fraction: the largest fraction of a layer's channels that may be removed.
        round_to: kept widths are multiples of this (the original width is always allowed).
    """

    min_channels: int = 1
    max_fraction: float = 0.9
    round_to: int = 1

    def __post_init__(self) -> None:
        for name in ("min_channels", "round_to"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if isinstance(self.max_fraction, bool) or not isinstance(self.max_fraction, (int, float)) \
                or not 0 < self.max_fraction <= 1:
            raise ValueError(f"max_fraction={self.max_fraction!r} must be in (0, 1]: the largest fraction of a "
                             f"layer removed")  # fmt: skip


class _Planner:
    """The greedy COP selection on Torch-Pruning's groups, with a linear cost model of the network.

    Args:
        model, graph: the network and Torch-Pruning's dependency graph of it.
        importance: COP's weights and similarity (its ``alpha``, ``beta``, ``gamma``, ``top_k``,
            ``similarity``, ``normalize``).
        floors: how far each layer may be narrowed.
        positions: each convolution's and linear layer's output positions per sample (FLOPs).
        protection: the layers left whole, and those whose output channels stay.
        allowed: module paths whose output channels may be pruned (the chosen stages), None for all.
        calibration: input batches whose activations replace the consumer kernels, or None.
    """

    def __init__(
        self,
        model: nn.Module,
        graph: tp.DependencyGraph,
        *,
        importance: COPImportance,
        floors: Floors,
        positions: dict[nn.Module, int],
        protection: Protection,
        allowed: list[str] | None = None,
        calibration: Iterable[Tensor] | None = None,
    ) -> None:
        self.model, self.graph = model, graph
        self.alpha, self.beta, self.gamma = importance.alpha, importance.beta, importance.gamma
        similarity, normalize, top_k = importance.similarity, importance.normalize, importance.top_k
        min_channels, max_fraction, round_to = floors.min_channels, floors.max_fraction, floors.round_to
        self.skipped: list[tuple[str, str]] = []
        self.applied_cuts = 0
        names = graph._module2name
        layers = [m for m in graph.module2node if _is_layer(m) and m in names]
        unseen = [n for n, m in model.named_modules() if m in positions and m not in graph.module2node]
        if unseen:
            raise PruneError(
                f"Torch-Pruning's dependency graph does not reach `{unseen[0]}`"
                f"{f' (and {len(unseen) - 1} more layers)' if len(unseen) > 1 else ''} of {type(model).__name__} "
                f"from the output: an op between them cannot be followed through autograd (.detach(), .data, "
                f"numpy, integer ops, torch.no_grad()). Its channels cannot be pruned safely; the model is unchanged."
            )
        self.layers = layers
        self.widths_before = {names[m]: _out_channels(m) for m in layers}
        index = {m: i for i, m in enumerate(layers)}
        groups: list[_Group] = []
        a_in: list[np.ndarray] = []
        a_out: list[np.ndarray] = []
        extra: list[float] = []
        whole = {model.get_submodule(p): why for p, why in protection.whole.items() if _has(model, p)}
        outputs = {model.get_submodule(p): why for p, why in protection.outputs.items() if _has(model, p)}
        seen_roots: set[nn.Module] = set()
        all_groups = []
        for root, group, failure in _all_groups(model, graph):
            if group is None:
                self.skipped.append((names.get(root, "?"), f"cannot be grouped by Torch-Pruning ({failure})"))
            else:
                all_groups.append(group)
        activations = None
        if calibration is not None:
            activations = _activations(model, [g[0].dep.target.module for g in all_groups], calibration)
        for group in all_groups:
            root = group[0].dep.target.module
            if root in seen_roots:
                continue
            root_name = names.get(root, "?")
            n = len(group[0].idxs)
            outs, ins = _split(group, graph)
            touched = {m for m, _ in outs + ins if isinstance(m, nn.Module) and m in names}
            seen_roots |= {m for m, _ in outs if _is_layer(m)}
            # A protected output keeps its output channels only: the layers that feed it stay prunable.
            hit = [(m, whole[m]) for m in touched if m in whole]
            hit += [(m, outputs[m]) for m, _ in outs if isinstance(m, nn.Module) and m in outputs]
            if hit:
                self.skipped.append((root_name, f"touch `{names.get(hit[0][0], '?')}` ({hit[0][1]})"))
                continue
            if allowed is not None and not all(_inside(names[m], allowed) for m, _ in outs if m in names):
                self.skipped.append((root_name, "produced outside the chosen stages"))
                continue
            convs = [m for m in touched if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1]
            ch_groups = max([m.groups for m in convs if not _depthwise(m)] or [1])
            if n % ch_groups:
                self.skipped.append((root_name, f"have {n} channels, not a multiple of groups={ch_groups}"))
                continue
            units = n // ch_groups
            q = round_to // math.gcd(round_to, ch_groups)  # units per step so widths stay multiples of round_to
            floor_ch = max(1, min_channels, math.ceil(n * (1 - max_fraction) - 1e-9))
            floor = math.ceil(floor_ch / ch_groups)
            floor = q * math.ceil(floor / q) if q > 1 else floor
            if floor >= units:
                self.skipped.append((root_name, "are at their floor already"))
                continue
            if activations is not None and root in activations:
                a = activations[root][:, torch.tensor(list(group[0].idxs))]
                matrices = _similarity(a.unsqueeze(0), similarity, normalize)[None]
            else:
                matrices = _group_matrices(outs, ins, n, similarity, normalize)
            consumers = _Redundancy(matrices, top_k) if matrices is not None else None
            g = _Group(root, root_name, n, ch_groups, q, floor, consumers)
            row_in, row_out = np.zeros(len(layers)), np.zeros(len(layers))
            per_channel = 0.0
            for m, it in outs:
                if _is_layer(m):
                    row_out[index[m]] += len(it.idxs) / n
                    if _depthwise(m):
                        row_in[index[m]] += len(it.idxs) / n
                elif isinstance(m, nn.Module) and m in names:
                    c = graph.get_out_channels(m) or 0
                    if c:
                        per_channel += sum(p.numel() for p in m.parameters(recurse=False)) / c * len(it.idxs) / n
                elif isinstance(m, nn.Parameter):
                    dim = graph.module2node[m].pruning_dim
                    per_channel += m.numel() / m.shape[dim] * len(it.idxs) / n
            for m, it in ins:
                if _is_layer(m) and not _depthwise(m):
                    row_in[index[m]] += len(it.idxs) / n
            most = n - floor * ch_groups
            widths_in = np.array([_in_channels(m) for m in layers])
            widths_out = np.array([_out_channels(m) for m in layers])
            if (row_in * most > widths_in).any() or (row_out * most > widths_out).any():
                # Torch-Pruning maps these channels through a reshape onto more inputs than a layer has.
                self.skipped.append((root_name, "are mapped by Torch-Pruning onto more channels than a layer has"))
                continue
            groups.append(g)
            a_in.append(row_in)
            a_out.append(row_out)
            extra.append(per_channel)
        self.groups = groups
        if not groups:
            raise PruneTargetError(
                f"no channel of {type(model).__name__} may be pruned." + _skipped_hint(self.skipped)
            )
        # Each group's channel removes a_io[group, layer] = (input, output) channels of each layer.
        self.a_io = np.stack([np.stack(a_in), np.stack(a_out)], axis=2)  # [groups, layers, 2]
        self.touch = (self.a_io.sum(axis=2) > 0).astype(np.float64)  # [groups, layers]
        self.extra = np.array(extra)
        # A layer's params are out x (in x taps / groups + bias), its FLOPs 2 x out x in x taps / groups x positions
        # (a depthwise layer's: taps per output channel, whatever its input width): [params, FLOPs] of every layer
        # is out x (in x rate + base), both [layers, 2].
        dw = np.array([_depthwise(m) for m in layers])
        taps = np.array([_taps(m) for m in layers], dtype=np.float64)
        conv_groups = np.array([getattr(m, "groups", 1) for m in layers], dtype=np.float64)
        bias = np.array([m.bias is not None for m in layers], dtype=np.float64)
        flops_per_mac = 2 * np.array([positions.get(m, 0) for m in layers], dtype=np.float64)
        per_in = np.where(dw, 0.0, taps / conv_groups)
        per_out = np.where(dw, taps, 0.0)
        self.rate = np.stack([per_in, per_in * flops_per_mac], axis=1)
        self.base = np.stack([per_out + bias, per_out * flops_per_mac], axis=1)
        self.cost_weights = np.array([self.gamma, self.beta])  # of the [params, FLOPs] terms
        self.cuts = np.zeros(len(groups))
        # [in, out] width of every layer, and its [params, FLOPs], at the planned cuts.
        self.io = np.array([[_in_channels(m), _out_channels(m)] for m in layers], dtype=np.float64)
        self.costs = self._layer_costs()
        self.params0, self.flops0 = self.costs.sum(axis=0)
        self.out0 = self.io[:, 1].sum()
        # Added to each group's importance: inf once another step would take it below its floor.
        self.closed = np.array([0.0 if self._can_step(g) else np.inf for g in groups])
        self.redundancy = [g.unit_redundancy() for g in groups]
        self.redundancy_term = self.alpha * (1 - np.array([r.max() for r in self.redundancy]))

    def _layer_costs(self) -> np.ndarray:
        """[params, FLOPs] of every layer at the current widths."""
        return self.io[:, 1:] * (self.io[:, :1] * self.rate + self.base)

    def _cut_channels(self, gi: int, count: float) -> None:
        """Widths and costs after ``count`` more channels of group gi are cut (negative: undo)."""
        self.cuts[gi] += count
        self.io = self.io - self.a_io[gi] * count
        self.costs = self._layer_costs()

    def estimated(self, before: dict[str, int], metric: str) -> float:
        """``metric`` of the network with the planned cuts (called a few times per greedy step: one metric only)."""
        if metric == "params":
            return before["params"] - (self.params0 - self.costs[:, 0].sum()) - float(self.extra @ self.cuts)
        if metric == "flops":
            return before["flops"] - (self.flops0 - self.costs[:, 1].sum())
        return before["channels"] - (self.out0 - self.io[:, 1].sum())

    def estimated_reduction(self, metric: str, before: dict[str, int]) -> float:
        return 1 - self.estimated(before, metric) / before[metric]

    def _cost_terms(self) -> np.ndarray:
        return _cost_terms(self.touch @ self.costs, self.cost_weights)

    def run(self, metric: str, target: float, before: dict[str, int]) -> bool:
        """Cut greedily until the estimated reduction of ``metric`` reaches ``target``; False if floors stop it."""
        # Per step only the cut group's redundancy term changes (and, through the layers, every cost term):
        # ResNet-50 takes ~4,300 steps, so the loop keeps its numpy calls few.
        reduction = self.estimated_reduction(metric, before)
        while reduction < target - TOLERANCE / 4:  # within half a percent
            if np.isinf(self.closed).all():
                return False
            imp = self.redundancy_term + self._cost_terms() + self.closed
            gi = self._choose(imp, metric, target, before, reduction)
            g = self.groups[gi]
            for _ in range(self._step(g)):
                g.cut_unit(int(np.argmax(self.redundancy[gi])))
                self.redundancy[gi] = g.unit_redundancy()
            self.redundancy_term[gi] = self.alpha * (1 - self.redundancy[gi].max())
            self._cut_channels(gi, g.cuts - self.cuts[gi])
            if not self._can_step(g):
                self.closed[gi] = np.inf
            reduction = self.estimated_reduction(metric, before)
        return True

    @staticmethod
    def _step(g: _Group) -> int:
        """Units cut by one greedy step; the first step of a group brings its width to a multiple of round_to."""
        return g.alive_units % g.step or g.step

    @classmethod
    def _can_step(cls, g: _Group) -> bool:
        return g.alive_units - cls._step(g) >= g.floor

    def _choose(self, imp: np.ndarray, metric: str, target: float, before: dict[str, int], reduction: float) -> int:
        """The least important group, unless its step would overshoot the target by more than the tolerance
        (near the end, a coarse step of a wide layer): then the least important group whose step fits."""
        if reduction < target - 2 * TOLERANCE:
            return int(np.argmin(imp))  # the first of equals, as the stable order below
        order = np.argsort(imp, kind="stable")
        for gi in order:
            if not np.isfinite(imp[gi]):
                break
            step = self._step(self.groups[gi]) * self.groups[gi].ch_groups
            self._cut_channels(gi, step)
            fits = self.estimated_reduction(metric, before) <= target + TOLERANCE / 2
            self._cut_channels(gi, -step)
            if fits:
                return int(gi)
        return int(order[0])

    def apply(self) -> None:
        """Prune the planned, not yet applied channels from the model with Torch-Pruning (which records each
        removal in its graph's ``pruning_history()``)."""
        for g in self.groups:
            todo = ~g.alive_ch & ~g.applied
            if not todo.any():
                continue
            present = ~g.applied  # channels still in the model, in their original order
            positions = np.cumsum(present) - 1
            idxs = [int(i) for i in positions[todo]]
            pruner = self.graph.get_pruner_of_module(g.root)
            try:
                group = self.graph.get_pruning_group(g.root, pruner.prune_out_channels, idxs)
                group.prune()
            except Exception as e:  # Torch-Pruning's own failure on an op it mis-handles
                raise PruneError(
                    f"Torch-Pruning failed to remove channels of `{g.root_name}` and the layers coupled to it: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Pass protect=['{g.root_name}'] "
                    f"or stages=[...] without it; the model is unchanged."
                ) from e
            g.applied |= todo
            self.applied_cuts += len(idxs)
