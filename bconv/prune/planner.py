"""COP's selection: greedy and global, one channel at a time, on Torch-Pruning's channel groups.

Each step cuts from the group with the lowest ``imp = alpha (1 - r) + beta (1 - rf) + gamma (1 - rp)``
(docs/design.md §8), the formula of :mod:`.importance` (:func:`~.importance.redundancy_term` and
:func:`~.importance.cost_terms`), with ``rf`` and ``rp`` read from a linear cost model of every layer at the
planned widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

import numpy as np
import torch
import torch_pruning as tp
from torch import Tensor, nn

from .adapter import (
    Protection, all_groups, has_submodule, in_channels, is_depthwise, is_inside, is_layer, kernel_taps, out_channels,
)
from .importance import (
    COPImportance, Redundancy, cost_terms, group_matrices, layer_activations, redundancy_term, similarity_matrix,
    split_group,
)
from .report import PruneError, PruneTargetError, skipped_hint

__all__ = ["Floors", "Planner", "TOLERANCE"]

TOLERANCE = 0.02  # the target is met within this fraction of the metric


@dataclass
class _Group:
    root: nn.Module
    root_name: str
    n: int  # channels at the start
    ch_groups: int  # channels move in units of ch_groups (grouped convolutions prune every group alike)
    step: int  # units removed per greedy step (round_to)
    floor: int  # fewest units kept
    consumers: Redundancy | None  # None: no kernel reads the group's channels one by one
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
    """How far :func:`~bconv.prune.cop_prune` may narrow any one layer.

    Every layer keeps at least ``max(1, min_channels, ceil(width x (1 - max_fraction)))`` channels, and
    its kept width is a multiple of ``round_to`` (or its original width).

    Args:
        min_channels: no layer keeps fewer channels than this (and never fewer than 1).
        max_fraction: the largest fraction of a layer's channels that may be removed, in (0, 1].
        round_to: kept widths are multiples of this (the original width is always allowed).

    Raises:
        ValueError: ``min_channels`` or ``round_to`` is not an integer >= 1, or ``max_fraction`` is not a
            number in (0, 1].

    Example::

        >>> cop_prune(model, (3, 224, 224), ratio=0.5, floors=Floors(min_channels=16, max_fraction=0.75, round_to=8))
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


class _Coverage(NamedTuple):
    """What one channel of a group removes: ``row_in`` / ``row_out`` input / output channels of each layer
    (in ``Planner.layers`` order), and ``per_channel`` parameters of the other modules it prunes (norms,
    bare parameters)."""

    row_in: np.ndarray
    row_out: np.ndarray
    per_channel: float


class Planner:
    """The greedy COP selection on Torch-Pruning's groups, with a linear cost model of the network.

    Building one lists the candidate channel groups (:meth:`_candidates`: every Torch-Pruning group the
    protections, stages and floors leave prunable, each with its redundancy), then the cost model
    (:meth:`_build_cost_model`), then the state of the greedy selection before any cut (:meth:`_start`).
    :meth:`run` plans cuts, :meth:`apply` prunes them from the model.

    Args:
        model, graph: the network and Torch-Pruning's dependency graph of it.
        importance: COP's weights and similarity (its ``alpha``, ``beta``, ``gamma``, ``top_k``,
            ``similarity``, ``normalize``).
        floors: how far each layer may be narrowed.
        positions: each convolution's and linear layer's output positions per sample (FLOPs).
        protection: the layers left whole, and those whose output channels stay.
        allowed: module paths whose output channels may be pruned (the chosen stages), None for all.
        calibration: input batches whose activations replace the consumer kernels, or None.
        tolerance: how far the reduction may miss its target (a fraction of the metric).

    Raises:
        PruneError: Torch-Pruning's graph does not reach a layer the forward ran.
        PruneTargetError: no channel group may be pruned (``skipped`` says why).
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
        tolerance: float = TOLERANCE,
    ) -> None:
        self.model, self.graph = model, graph
        self.tolerance = tolerance
        self.alpha, self.beta, self.gamma = importance.alpha, importance.beta, importance.gamma
        self.skipped: list[tuple[str, str]] = []
        self.applied_cuts = 0
        _refuse_unreached_layers(model, graph, positions)
        names = graph._module2name
        self.layers = [m for m in graph.module2node if is_layer(m) and m in names]
        self.widths_before = {names[m]: out_channels(m) for m in self.layers}
        self._index = {m: i for i, m in enumerate(self.layers)}
        groups = self._buildable_groups()
        activations = None
        if calibration is not None:
            activations = layer_activations(model, [g[0].dep.target.module for g in groups], calibration)
        self.groups, coverage = self._candidates(groups, importance, floors, protection, allowed, activations)
        if not self.groups:
            raise PruneTargetError(
                f"no channel of {type(model).__name__} may be pruned." + skipped_hint(self.skipped)
            )
        self._build_cost_model(coverage, positions)
        self._start()

    def _buildable_groups(self) -> list[Any]:
        """Torch-Pruning's channel groups of the model; those it cannot build are added to ``skipped``."""
        names = self.graph._module2name
        groups = []
        for root, group, failure in all_groups(self.model, self.graph):
            if group is None:
                self.skipped.append((names.get(root, "?"), f"cannot be grouped by Torch-Pruning ({failure})"))
            else:
                groups.append(group)
        return groups

    def _candidates(
        self,
        groups: list[Any],
        importance: COPImportance,
        floors: Floors,
        protection: Protection,
        allowed: list[str] | None,
        activations: dict[nn.Module, Tensor] | None,
    ) -> tuple[list[_Group], list[_Coverage]]:
        """The groups the greedy selection may cut (one per root layer), each with what one of its channels
        removes; every other group is added to ``skipped`` with the reason."""
        model, names = self.model, self.graph._module2name
        whole = {model.get_submodule(p): why for p, why in protection.whole.items() if has_submodule(model, p)}
        outputs = {model.get_submodule(p): why for p, why in protection.outputs.items() if has_submodule(model, p)}
        inputs = {model.get_submodule(p): why for p, why in protection.inputs.items() if has_submodule(model, p)}
        widths_in = np.array([in_channels(m) for m in self.layers])
        widths_out = np.array([out_channels(m) for m in self.layers])
        seen_roots: set[nn.Module] = set()
        candidates: list[_Group] = []
        coverage: list[_Coverage] = []
        for group in groups:
            root = group[0].dep.target.module
            if root in seen_roots:
                continue
            root_name = names.get(root, "?")
            n = len(group[0].idxs)
            outs, ins = split_group(group, self.graph)
            touched = {m for m, _ in outs + ins if isinstance(m, nn.Module) and m in names}
            seen_roots |= {m for m, _ in outs if is_layer(m)}
            why = (self._protected(outs, ins, touched, whole, outputs, inputs, allowed)
                   or _unfollowable(group, self.graph))
            if why is None:
                coupled = _coupled_units(self.graph, root, n)
                if coupled is None:
                    why = "drag other channels of the same layer along in a pattern the planner cannot follow"
                else:
                    ch_groups = math.lcm(_channel_groups(touched), coupled)
                    step, floor = _floor_in_units(floors, n, ch_groups)
                    why = _too_narrow(n, ch_groups, floor)
            if why is not None:
                self.skipped.append((root_name, why))
                continue
            consumers = _redundancy(group, outs, ins, n, importance, activations, ch_groups)
            cover = self._coverage(outs, ins, n)
            most = n - floor * ch_groups
            if (cover.row_in * most > widths_in).any() or (cover.row_out * most > widths_out).any():
                # Torch-Pruning maps these channels through a reshape onto more inputs than a layer has.
                self.skipped.append((root_name, "are mapped by Torch-Pruning onto more channels than a layer has"))
                continue
            candidates.append(_Group(root, root_name, n, ch_groups, step, floor, consumers))
            coverage.append(cover)
        return candidates, coverage

    def _protected(
        self,
        outs: list[tuple[Any, Any]],
        ins: list[tuple[Any, Any]],
        touched: set[nn.Module],
        whole: dict[nn.Module, str],
        outputs: dict[nn.Module, str],
        inputs: dict[nn.Module, str],
        allowed: list[str] | None,
    ) -> str | None:
        """Why a group must stay (it touches a protected layer, or is produced outside the chosen stages), or None."""
        names = self.graph._module2name
        # A protected output keeps its output channels only: the layers that feed it stay prunable.
        hit = [(m, whole[m]) for m in touched if m in whole]
        hit += [(m, outputs[m]) for m, _ in outs if isinstance(m, nn.Module) and m in outputs]
        hit += [(m, inputs[m]) for m, _ in ins if isinstance(m, nn.Module) and m in inputs]
        if hit:
            return f"touch `{names.get(hit[0][0], '?')}` ({hit[0][1]})"
        if allowed is not None and not all(is_inside(names[m], allowed) for m, _ in outs if m in names):
            return "produced outside the chosen stages"
        return None

    def _coverage(self, outs: list[tuple[Any, Any]], ins: list[tuple[Any, Any]], n: int) -> _Coverage:
        """The input and output channels of each layer, and the other parameters, that one channel of a group
        of ``n`` removes."""
        graph, names, index = self.graph, self.graph._module2name, self._index
        row_in, row_out = np.zeros(len(self.layers)), np.zeros(len(self.layers))
        per_channel = 0.0
        for m, it in outs:
            if is_layer(m):
                row_out[index[m]] += len(it.idxs) / n
                if is_depthwise(m):
                    row_in[index[m]] += len(it.idxs) / n
            elif isinstance(m, nn.Module) and m in names:
                c = graph.get_out_channels(m) or 0
                if c:
                    per_channel += sum(p.numel() for p in m.parameters(recurse=False)) / c * len(it.idxs) / n
            elif isinstance(m, nn.Parameter):
                dim = graph.module2node[m].pruning_dim
                per_channel += m.numel() / m.shape[dim] * len(it.idxs) / n
        for m, it in ins:
            if is_layer(m) and not is_depthwise(m):
                row_in[index[m]] += len(it.idxs) / n
        return _Coverage(row_in, row_out, per_channel)

    def _build_cost_model(self, coverage: list[_Coverage], positions: dict[nn.Module, int]) -> None:
        """The linear cost model: what each group's channel removes from every layer, and each layer's params
        and FLOPs as a function of its widths."""
        layers = self.layers
        # Each group's channel removes a_io[group, layer] = (input, output) channels of each layer.
        a_in, a_out = np.stack([c.row_in for c in coverage]), np.stack([c.row_out for c in coverage])
        self.a_io = np.stack([a_in, a_out], axis=2)  # [groups, layers, 2]
        self.touch = (self.a_io.sum(axis=2) > 0).astype(np.float64)  # [groups, layers]
        self.extra = np.array([c.per_channel for c in coverage])
        # A layer's params are out x (in x taps / groups + bias), its FLOPs 2 x out x in x taps / groups x positions
        # (a depthwise layer's: taps per output channel, whatever its input width): [params, FLOPs] of every layer
        # is out x (in x rate + base), both [layers, 2].
        dw = np.array([is_depthwise(m) for m in layers])
        taps = np.array([kernel_taps(m) for m in layers], dtype=np.float64)
        conv_groups = np.array([getattr(m, "groups", 1) for m in layers], dtype=np.float64)
        bias = np.array([m.bias is not None for m in layers], dtype=np.float64)
        flops_per_mac = 2 * np.array([positions.get(m, 0) for m in layers], dtype=np.float64)
        per_in = np.where(dw, 0.0, taps / conv_groups)
        per_out = np.where(dw, taps, 0.0)
        self.rate = np.stack([per_in, per_in * flops_per_mac], axis=1)
        self.base = np.stack([per_out + bias, per_out * flops_per_mac], axis=1)

    def _start(self) -> None:
        """The greedy selection's state before any cut: widths, costs, and each group's importance terms."""
        self.cost_weights = np.array([self.gamma, self.beta])  # of the [params, FLOPs] terms
        self.cuts = np.zeros(len(self.groups))
        # [in, out] width of every layer, and its [params, FLOPs], at the planned cuts.
        self.io = np.array([[in_channels(m), out_channels(m)] for m in self.layers], dtype=np.float64)
        self.costs = self._layer_costs()
        self.params0, self.flops0 = self.costs.sum(axis=0)
        self.out0 = self.io[:, 1].sum()
        # Added to each group's importance: inf once another step would take it below its floor.
        self.closed = np.array([0.0 if self._can_step(g) else np.inf for g in self.groups])
        self.redundancy = [g.unit_redundancy() for g in self.groups]
        self.redundancy_term = redundancy_term(np.array([r.max() for r in self.redundancy]), self.alpha)

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
        """The fraction of ``metric`` the planned cuts remove, by the cost model."""
        return 1 - self.estimated(before, metric) / before[metric]

    def _group_cost_terms(self) -> np.ndarray:
        """Each group's cost terms at the planned widths."""
        return cost_terms(self.touch @ self.costs, self.cost_weights)

    def run(self, metric: str, target: float, before: dict[str, int]) -> bool:
        """Cut greedily until the estimated reduction of ``metric`` reaches ``target``; False if floors stop it."""
        # Per step only the cut group's redundancy term changes (and, through the layers, every cost term):
        # ResNet-50 takes ~4,300 steps, so the loop keeps its numpy calls few.
        reduction = self.estimated_reduction(metric, before)
        while reduction < target - self.tolerance / 4:  # within half a percent
            if np.isinf(self.closed).all():
                return False
            imp = self.redundancy_term + self._group_cost_terms() + self.closed
            gi = self._choose(imp, metric, target, before, reduction)
            g = self.groups[gi]
            for _ in range(self._step(g)):
                g.cut_unit(int(np.argmax(self.redundancy[gi])))
                self.redundancy[gi] = g.unit_redundancy()
            self.redundancy_term[gi] = redundancy_term(self.redundancy[gi].max(), self.alpha)
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
        if reduction < target - 2 * self.tolerance:
            return int(np.argmin(imp))  # the first of equals, as the stable order below
        order = np.argsort(imp, kind="stable")
        for gi in order:
            if not np.isfinite(imp[gi]):
                break
            step = self._step(self.groups[gi]) * self.groups[gi].ch_groups
            self._cut_channels(gi, step)
            fits = self.estimated_reduction(metric, before) <= target + self.tolerance / 2
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


def _refuse_unreached_layers(model: nn.Module, graph: tp.DependencyGraph, positions: dict[nn.Module, int]) -> None:
    """A :class:`PruneError` if the forward ran a layer that Torch-Pruning's graph does not reach."""
    unseen = [n for n, m in model.named_modules() if m in positions and m not in graph.module2node]
    if unseen:
        raise PruneError(
            f"Torch-Pruning's dependency graph does not reach `{unseen[0]}`"
            f"{f' (and {len(unseen) - 1} more layers)' if len(unseen) > 1 else ''} of {type(model).__name__} "
            f"from the output: an op between them cannot be followed through autograd (.detach(), .data, "
            f"numpy, integer ops, torch.no_grad()). Its channels cannot be pruned safely; the model is unchanged."
        )


def _unfollowable(group: Any, graph: tp.DependencyGraph) -> str | None:
    """Why a group crosses an op whose channel indices Torch-Pruning cannot follow (:mod:`.graph`), or None."""
    unfollowable = getattr(graph, "unfollowable", {})
    for dep, _ in group:
        for node in (dep.source, dep.target):
            if node.module in unfollowable:
                return f"cross {unfollowable[node.module]}, whose channels Torch-Pruning cannot follow"
    return None


def _channel_groups(touched: set[nn.Module]) -> int:
    """The unit a group's channels move in: a grouped (not depthwise) convolution it touches prunes every group
    alike, and so does a GroupNorm (its groups are contiguous runs of channels too: each keeps as many)."""
    convs = [m for m in touched if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1]
    groups = [m.groups for m in convs if not is_depthwise(m)]
    groups += [m.num_groups for m in touched if isinstance(m, nn.GroupNorm) and m.num_groups > 1]
    return math.lcm(*groups) if groups else 1


def _coupled_units(graph: tp.DependencyGraph, root: nn.Module, n: int) -> int | None:
    """How many of ``root``'s ``n`` channels one cut drags along: ``k`` where channel ``i`` goes with every
    ``i + j n/k`` (a gated MLP's halves; a ghost module's layer and its depthwise copy, concatenated), read from
    Torch-Pruning's group of the first and of the last channel; 1 where each goes alone. The group's channels
    then move in units of ``k``, as a grouped convolution's do. None for any other pattern."""
    fn = graph.get_pruner_of_module(root).prune_out_channels
    k = None
    for probe in (0, n - 1):
        group = graph.get_pruning_group(root, fn, [probe])
        dragged = sorted({int(i) for it in group if it.dep.target.module is root for i in it.idxs})
        k = len(dragged) if k is None else k
        if len(dragged) != k or n % k or dragged != [probe % (n // k) + j * (n // k) for j in range(k)]:
            return None
    return k


def _too_narrow(n: int, ch_groups: int, floor: int) -> str | None:
    """Why a group of ``n`` channels cannot be cut in units of ``ch_groups`` down to ``floor`` units, or None."""
    if n % ch_groups:
        return f"have {n} channels, not a multiple of groups={ch_groups}"
    if floor >= n // ch_groups:
        return "are at their floor already"
    return None


def _floor_in_units(floors: Floors, n: int, ch_groups: int) -> tuple[int, int]:
    """``(step, floor)`` of a group of ``n`` channels in units of ``ch_groups``: the units per greedy step that keep
    widths multiples of ``round_to``, and the fewest units kept."""
    step = floors.round_to // math.gcd(floors.round_to, ch_groups)
    floor_ch = max(1, floors.min_channels, math.ceil(n * (1 - floors.max_fraction) - 1e-9))
    floor = math.ceil(floor_ch / ch_groups)
    return step, step * math.ceil(floor / step) if step > 1 else floor


def _redundancy(
    group: Any,
    outs: list[tuple[Any, Any]],
    ins: list[tuple[Any, Any]],
    n: int,
    importance: COPImportance,
    activations: dict[nn.Module, Tensor] | None,
    ch_groups: int = 1,
) -> Redundancy | None:
    """The group's redundancy: from its root's activations when calibrating, else from its consumer kernels; None
    when no kernel reads its channels one by one."""
    root = group[0].dep.target.module
    if activations is not None and root in activations:
        a = activations[root][:, torch.tensor(list(group[0].idxs))]
        matrices = similarity_matrix(a.unsqueeze(0), importance.similarity, importance.normalize)[None]
    else:
        matrices = group_matrices(outs, ins, n, importance.similarity, importance.normalize, ch_groups)
    return Redundancy(matrices, importance.top_k) if matrices is not None else None
