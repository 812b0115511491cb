"""The stage rules: where the Conv-block boundaries (stages) of a traced CNN are.

Private: :func:`bconv.surgery.anatomy.anatomy` is the one public entry point to a network's
description, and :func:`bconv.anatomy` a view of it. The import graph reads
``_trace`` (tracing, shapes) -> ``_stages`` (these rules) -> ``anatomy`` -> the ladder and the
companion techniques; nothing here imports the anatomy.

A stage ends at the last module output before the spatial resolution drops,
at a point of the graph that every path from the input to the output passes
through (a dominator of the output). Stages are named by module path, so
that a forward hook on ``stage.name`` sees the stage output, and carry the
module paths computed between the previous stage's end and their own.

Two sources:

* ``"fx"``: trace with torch.fx, propagate shapes once, take the dominators.
* ``"feature_info"``: timm's hand-written ``model.feature_info``, checked by
  one forward pass with hooks.

``"auto"`` uses timm's ``feature_info`` when the model has a usable one (it
is written by the model's authors) and fx otherwise.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from ..errors import BConvError, NoSpatialStagesError
from ._trace import Traced, geometry, run_at_two_sizes

__all__ = [
    "Stage", "Tokens", "Source", "SOURCES", "Layout", "spatial_layout", "main_chain", "stage_runs", "fx_stages", "group_modules",
    "feature_info_entries", "feature_info_stages", "is_global_pool", "head_start",
]  # fmt: skip

Layout = Literal["NCHW", "NHWC", "NLC"]
Source = Literal["auto", "fx", "feature_info"]
SOURCES = typing.get_args(Source)


@dataclass(frozen=True)
class Tokens:
    """Where the patch grid sits in a token stage's ``[B, N, C]`` output (ViT, DeiT, EVA, Mixer, ...).

    The tokens are ``prefix`` tokens (class, distillation, registers), then the ``grid``'s cells row by row,
    as timm's ``forward_intermediates`` reads them. Everything here is measured (docs/design.md §3.6).

    Attributes:
        prefix: tokens before the grid at this stage (CaiT's blocks carry none; ConViT's class token joins late).
        grid: ``(Hp, Wp)`` at the anatomy's input size.
        patch: image pixels per grid cell ``(ph, pw)`` (16, 14): ``grid`` is ``image // patch`` (or its ceiling,
            for a model that pads the image).
        reaches_output: whether this stage's grid tokens reach the network's output. On a model that classifies
            from its class token, the last block's grid tokens never do: a ladder ending there does nothing.
    """

    prefix: int
    grid: tuple[int, int]
    patch: tuple[int, int]
    reaches_output: bool = True


@dataclass(frozen=True)
class Stage:
    """One Conv-block boundary of a network.

    Attributes:
        index: position among the model's stages, from the input.
        name: module path whose output is the stage output (``layer3``, ``features.denseblock2``, ``stages.1``).
        channels: channel count of the output.
        reduction: stride relative to the input, rounded to a power of two; a token stage's patch size (16, 14).
        layout: ``"NCHW"``, ``"NHWC"`` (Swin-like models) or ``"NLC"`` (tokens ``[B, N, C]``: ViT-like models).
        shape: output shape at the ``input_size`` used, without the batch dimension.
        modules: outermost module paths computed after the previous stage's end and up to this
            stage's end; the stem belongs to the first stage.
        source: ``"fx"`` or ``"feature_info"``: how this stage was found.
        tokens: for a token stage (``layout == "NLC"``), where its patch grid sits (:class:`Tokens`); else None.
    """

    index: int
    name: str
    channels: int
    reduction: int
    layout: Layout
    shape: tuple[int, ...]
    modules: tuple[str, ...]
    source: str
    tokens: Tokens | None = None


# --------------------------------------------------------------------------- geometry


# ``(layout, reduction, channels)`` of a feature map, measured from its shapes at two input sizes (or read
# from one, strictly): the one geometry rule, kept under its public name here.
spatial_layout = geometry


# --------------------------------------------------------------------------- fx path


def _dominators(nodes: list[fx.Node], carries_tensor: set[fx.Node]) -> tuple[fx.Node | None, dict[fx.Node, fx.Node]]:
    """``(input, idom)``: the immediate dominator of every node that depends on the (first) input.

    Cooper-Harvey-Kennedy's intersection on a DAG whose node list is already topologically sorted.
    Edges that carry no tensor (``x.shape``, sizes computed from it) are not paths of data.
    """
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        return None, {}
    src = placeholders[0]
    order = {n: i for i, n in enumerate(nodes)}
    idom: dict[fx.Node, fx.Node] = {src: src}

    def intersect(a: fx.Node, b: fx.Node) -> fx.Node:
        while a is not b:
            while order[a] > order[b]:
                a = idom[a]
            while order[b] > order[a]:
                b = idom[b]
        return a

    for n in nodes[order[src] + 1 :]:
        preds = [p for p in n.all_input_nodes if p in idom and (p is src or p in carries_tensor)]
        if not preds:
            continue  # does not depend on the input (constants, parameters)
        d = preds[0]
        for p in preds[1:]:
            d = intersect(d, p)
        idom[n] = d
    return src, idom


def _chain_to(node: fx.Node, src: fx.Node, idom: dict[fx.Node, fx.Node], inclusive: bool) -> list[fx.Node]:
    if node not in idom:
        return []
    chain = []
    n = node if inclusive else idom[node]
    while n is not src:
        chain.append(n)
        n = idom[n]
    return chain[::-1]


def main_chain(traced: Traced) -> list[fx.Node]:
    """The dominator chain of the model's main output, in graph order.

    A model that returns one tensor has one chain: the nodes every path from the input to it passes
    through. A model that returns several (a segmentation model's ``out`` and ``aux``, a feature
    pyramid, a features-only backbone) is read along the output that goes deepest into the network
    (the highest reduction before its head; the first such output on ties): an auxiliary output that
    branches off early does not cut the backbone's later stages off the chain.
    """
    src, idom = _dominators(traced.nodes, traced.carries_tensor)
    if src is None:
        return []
    output = next(n for n in traced.nodes if n.op == "output")
    leaves = list(dict.fromkeys(n for n in _flatten_nodes(output.args[0] if output.args else None)))
    if len(leaves) <= 1:
        return _chain_to(output, src, idom, inclusive=False)
    best: tuple[int, list[fx.Node]] | None = None
    for leaf in leaves:
        chain = _chain_to(leaf, src, idom, inclusive=True)
        runs = stage_runs(traced, chain)
        depth = max((r for r, _ in runs), default=0)
        if best is None or depth > best[0]:
            best = (depth, chain)
    return best[1] if best else []


def _flatten_nodes(value: Any) -> list[fx.Node]:
    """The graph nodes in a (nested) output structure, in order."""
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _flatten_nodes(v)]
    return []


_ADAPTIVE_POOLS = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_REDUCTIONS = {"mean", "amax", "max", "sum", "logsumexp", "flatten", "adaptive_avg_pool2d", "adaptive_max_pool2d"}
# Module names that timm, torchvision and the dense-prediction libraries give to what follows the
# backbone's last stage: a classifier, a neck (SAM's projection after its blocks, a detection FPN), a
# segmentation head or decoder (torchvision's `classifier`/`aux_classifier`, mmseg's `decode_head`).
_HEAD_NAME = re.compile(r"(^|_)(head|neck)(_|$)|^(aux_)?classifier$|^(fpn|decoder|decode_head)$")


def is_global_pool(node: fx.Node, traced: Traced) -> bool:
    """Adaptive pooling, or a reduction/flatten that removes the spatial dims: the head starts here."""
    if node.op == "call_module":
        return isinstance(traced.modules[str(node.target)], _ADAPTIVE_POOLS)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or not isinstance(name, str):
        return False
    if name.startswith(("adaptive_", "select_adaptive_pool")):
        return True
    if name not in _REDUCTIONS or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    out, x = traced.shapes.get(node), traced.shapes.get(node.args[0])
    if out is None or x is None or len(x) < 4:
        return False
    if len(out) <= 2:
        return True  # [B, C]: the spatial dims are gone
    collapsed = [i for i, (a, b) in enumerate(zip(x, out)) if a != b]
    return len(out) == len(x) and len(collapsed) >= 2 and all(out[i] == 1 for i in collapsed)


def head_start(traced: Traced) -> int:
    """Index of the first node computed inside a module named like a head (``head``, ``conv_head``, ``neck``).

    A module so named that still downsamples is part of the backbone (SelecSLS calls its last strided
    convs ``head``): a classifier head or a neck works at the resolution it is given.
    """
    starts = [
        calls[0][0]
        for path, calls in traced.calls.items()
        if path and _HEAD_NAME.search(path.rpartition(".")[2]) and not _downsamples(traced, calls[0][0], calls[-1][1])
    ]
    return min(starts, default=len(traced.nodes) + 1)


def _geometry(traced: Traced, node: fx.Node) -> tuple[Layout, int, int] | None:
    """:func:`spatial_layout` of a node's output, None for a node that is not a feature map."""
    return traced.geometry(node)  # type: ignore[return-value]


def _downsamples(traced: Traced, start: int, end: int) -> bool:
    """Whether a feature map computed by nodes ``[start, end)`` has a higher reduction than the one entering them."""
    before = next((g[1] for n in reversed(traced.nodes[:start]) if (g := _geometry(traced, n))), None)
    return before is not None and any(g[1] > before for n in traced.nodes[start:end] if (g := _geometry(traced, n)))


_ALIASES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


def _stage_module(traced: Traced, node: fx.Node, previous: fx.Node | None) -> str | None:
    """The outermost module called once whose forward returns ``node``; None if there is none.

    A module that returns its input unchanged in eval (Identity, Dropout) does not name a new stage
    end: the node before it is the same tensor.
    """
    paths = [p for p in traced.returned_by.get(node, []) if p and len(traced.calls.get(p, [])) == 1]
    if not paths:
        return None
    outermost = min(paths, key=lambda p: p.count("."))
    if previous is not None and node.args and node.args[0] is previous:
        if isinstance(traced.modules[outermost], _ALIASES):
            return None
    return outermost


def _cut_level(traced: Traced, node: fx.Node) -> int | None:
    """How deep in the module tree a stage boundary after ``node`` would cut; None if it would cut a block.

    Cutting a plain ``nn.Sequential`` between two children is a clean boundary; cutting any other
    module that goes on past ``node`` (an inverted-residual block whose expansion conv precedes the
    strided one, a stage with its own downsample, a named ``nn.Sequential`` subclass such as DenseNet's
    transition) is not. Among clean boundaries the shallowest is preferred: between two stages of the
    network rather than inside a downsampling ``nn.Sequential(norm, conv)``. The top level counts as 1.
    """
    i = traced.index(node)
    returned = set(traced.returned_by.get(node, ()))
    level = 1
    for path, calls in traced.calls.items():
        if not path or path in returned or not any(start <= i < end for start, end in calls):
            continue
        if type(traced.modules[path]) is not nn.Sequential:
            return None
        level = max(level, path.count(".") + 1)
    return level


def _is_pointwise(module: nn.Module) -> bool:
    """Norms and at most one 1x1 conv or linear layer, with weights: what a network puts between its last
    stage and its pooling (a final norm, a ``conv_head``). An attention or MLP block has several layers;
    a lone activation has no weights and closes the block before it.
    """
    if next(module.parameters(), None) is None:
        return False
    layers = 0
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and all(k == 1 for k in m.kernel_size):
            layers += 1
        elif isinstance(m, nn.Linear):
            layers += 1
        else:
            return False
    return layers <= 1


def _choose_end(traced: Traced, run: list[fx.Node], last: bool) -> tuple[fx.Node, str] | None:
    """The stage end of one run of chain nodes at a resolution.

    The shallowest clean boundary, the latest among equals. In the last run, trailing norms and 1x1 convs
    (a final norm, timm's ``conv_head``-like expansions) are left to the head, as timm's ``feature_info``
    does; a final activation stays: it closes the last block (Xception's and NASNet's final ReLU).
    """
    named = []
    for i, node in enumerate(run):
        name = _stage_module(traced, node, run[i - 1] if i else None)
        if name is not None:
            named.append((node, name, _cut_level(traced, node)))
    if not named:
        return None
    if last:
        while len(named) > 1:
            # The unit that produced the last candidate: the outermost module returning it that started
            # after the candidate before it (a whole residual block, not the ReLU that ends it). It is
            # left to the head only if it is pointwise with weights (a norm, a 1x1 conv) and stands outside
            # every module holding the candidate before it: a final norm at the top level, not the ReLU
            # closing a conv block nor a lone activation after the last block.
            before, after = traced.index(named[-2][0]), traced.index(named[-1][0])
            units = [p for p in traced.returned_by[named[-1][0]] if traced.calls[p][0][0] > before]
            unit = traced.modules[min(units, key=lambda p: p.count("."))] if units else None
            if unit is None or not _is_pointwise(unit):
                break
            if any(s <= before and after <= e for p, calls in traced.calls.items() if p for s, e in calls):
                break
            named.pop()
    clean = [c for c in named if c[2] is not None]
    if not clean:
        return named[-1][:2]
    best = min(level for _, _, level in clean)
    return [c for c in clean if c[2] == best][-1][:2]


def _node_cost(node: fx.Node, traced: Traced) -> float:
    """Rough multiply-accumulates of a module node: its parameter count times its output positions."""
    if node.op != "call_module" or node not in traced.shapes:
        return 0.0
    out = traced.shapes[node][1:]
    if not out:
        return 0.0
    params = sum(p.numel() for p in traced.modules[str(node.target)].parameters())
    measured = _geometry(traced, node)
    channels = measured[2] if measured else out[-1]
    return float(params) * math.prod(out) / max(channels, 1)


def stage_runs(traced: Traced, chain: list[fx.Node]) -> list[tuple[int, list[fx.Node]]]:
    """Runs of consecutive spatial chain nodes at one reduction, up to the head (global pooling)."""
    runs: list[tuple[int, list[fx.Node]]] = []
    previous_hw: int | None = None
    head = head_start(traced)
    for node in chain:
        if traced.index(node) >= head or is_global_pool(node, traced):
            break
        geometry = _geometry(traced, node)
        if geometry is None:
            continue
        layout, r, _ = geometry
        shape = traced.shapes[node]
        hw = shape[2] * shape[3] if layout == "NCHW" else shape[1] * shape[2]
        if hw == 1 and previous_hw is not None and previous_hw > 16:
            break  # a 1x1 map after a drop of more than 4x per side is global pooling
        previous_hw = hw
        if runs and runs[-1][0] == r:
            runs[-1][1].append(node)
        else:
            runs.append((r, [node]))
    return runs


def fx_stages(model: nn.Module, traced: Traced, chain: list[fx.Node]) -> list[Stage]:
    """The stages of a traced model whose shapes were propagated, on its main dominator chain (:func:`main_chain`)."""
    runs = stage_runs(traced, chain)

    ends: list[tuple[int, fx.Node, str]] = []
    for k, (r, run) in enumerate(runs):
        chosen = _choose_end(traced, run, last=k == len(runs) - 1)
        if chosen is None:
            continue
        end = (r, *chosen)
        # Classification backbones only downsample along the path every input takes. A run at a lower
        # reduction than one already seen is a reshaped token tensor that looks like a feature map
        # (NesT's blocks [B, T, N, C]): ignore it. A later run at the same reduction extends that level.
        if ends and r < ends[-1][0]:
            continue
        if ends and r == ends[-1][0]:
            ends.pop()
        ends.append(end)

    _check_spatial(model, traced, chain, ends)

    boundaries = [traced.index(node) for _, node, _ in ends]
    spans = {p: (calls[0][0], calls[-1][1]) for p, calls in traced.calls.items() if p}
    groups = group_modules(spans, boundaries)
    stages = []
    for i, ((r, node, name), modules) in enumerate(zip(ends, groups)):
        layout, _, channels = _geometry(traced, node)  # type: ignore[misc]
        stages.append(Stage(i, name, channels, r, layout, traced.shapes[node][1:], tuple(modules), "fx"))
    return stages


def _check_spatial(model: nn.Module, traced: Traced, chain: list[fx.Node], ends: list[tuple[int, fx.Node, str]]) -> None:
    """A single spatial level followed by most of the computation on tokens is a ViT-like model."""
    name = type(model).__name__
    if not ends:
        raise NoSpatialStagesError(
            f"{name} has no spatial stages: no feature map [C, H, W] or [H, W, C] that every path of the "
            f"network passes through was found."
        )
    if len(ends) > 1:
        return
    end_index = traced.index(ends[0][1])
    stage_cost = sum(_node_cost(n, traced) for n in traced.nodes if traced.index(n) <= end_index)
    head_cost = sum(_node_cost(n, traced) for n in traced.nodes if traced.index(n) > end_index)
    if head_cost > stage_cost:
        tokens = next(
            (traced.shapes[n] for n in chain if traced.index(n) > end_index and len(traced.shapes.get(n, ())) == 3),
            None,
        )
        after = f" the network then works on flattened tokens {list(tokens[1:])}" if tokens else " most of the work follows it"
        raise NoSpatialStagesError(
            f"{name} has no spatial stages: its only feature map is the output of `{ends[0][2]}` "
            f"(reduction {ends[0][0]}), and{after}."
        )


def group_modules(spans: dict[str, tuple[int, int]], boundaries: list[int]) -> list[list[str]]:
    """Outermost module paths whose whole span lies in each stage's interval ``(boundaries[k-1], boundaries[k]]``.

    ``spans`` maps a module path to the first and last event (graph node, or hook call) of all its calls.
    The first stage starts at the beginning, so the stem belongs to it.
    """
    groups: list[list[str]] = [[] for _ in boundaries]
    owner: dict[str, int] = {}
    for path, (start, end) in spans.items():
        lower = -1
        for k, upper in enumerate(boundaries):
            if lower < start and end <= upper:
                owner[path] = k
                break
            lower = upper
    for path in sorted(owner, key=lambda p: spans[p]):
        parent = path.rpartition(".")[0]
        while parent and parent not in owner:
            parent = parent.rpartition(".")[0]
        if not parent or owner[parent] != owner[path]:
            groups[owner[path]].append(path)
    return groups


# --------------------------------------------------------------------------- feature_info path


def feature_info_entries(model: nn.Module) -> list[dict[str, Any]] | str:
    """timm's feature_info entries when they can name stages, else the reason they cannot."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return f"{type(model).__name__} has no feature_info (only timm models carry one)"
    entries = list(info.info if hasattr(info, "info") else info)
    if not entries or not all(isinstance(e, dict) and "module" in e for e in entries):
        return "its feature_info does not list modules"
    # An entry naming the model itself (TResNet's first) is not a module output; timm's own feature
    # extraction leaves it out by default too.
    entries = [e for e in entries if e["module"]]
    if not entries:
        return "its feature_info names no submodule"
    modules = dict(model.named_modules())
    for e in entries:
        if e.get("hook_type", "forward") != "forward":
            return f"feature_info entry {e['module']!r} is read with a {e['hook_type']} hook, not from a module output"
        if e["module"] not in modules:
            return f"feature_info names {e['module']!r}, which is not a submodule"
    return entries


def feature_info_stages(model: nn.Module, entries: list[dict[str, Any]], input_size: tuple[int, ...]) -> list[Stage]:
    """Stages from timm's feature_info, with shapes and module groups from a forward pass with hooks.

    The pass runs on meta tensors at two input sizes (see :func:`bconv.surgery._trace.run_at_two_sizes`),
    so layouts and reductions are measured as on the fx path, at no real compute.
    """
    targets = {e["module"] for e in entries}

    def run(x: torch.Tensor) -> tuple[dict[str, int], dict[str, int], dict[str, list[Any]]]:
        clock = [0]
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        outputs: dict[str, list[Any]] = {t: [] for t in targets}

        def pre_hook(path: str):
            def hook(module: nn.Module, args: Any) -> None:
                first.setdefault(path, clock[0])
                clock[0] += 1

            return hook

        def post_hook(path: str):
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                last[path] = clock[0]
                clock[0] += 1
                if path in outputs:
                    outputs[path].append(tuple(out.shape) if isinstance(out, torch.Tensor) else None)

            return hook

        handles = []
        for path, module in model.named_modules():
            if path:
                handles.append(module.register_forward_pre_hook(pre_hook(path)))
                handles.append(module.register_forward_hook(post_hook(path)))
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        return first, last, outputs

    _, (first, last, outputs), second, alt_size = run_at_two_sizes(model, input_size, run)
    alt_size = alt_size if second is not None else None

    stages: list[Stage] = []
    boundaries: list[int] = []
    for e in entries:
        path = e["module"]
        calls = outputs[path]
        if len(calls) != 1 or calls[0] is None:
            raise BConvError(f"feature_info module {path!r} is called {len(calls)} times or returns no tensor")
        alt = second[2][path][0] if second is not None and len(second[2][path]) == 1 else None
        measured = spatial_layout(calls[0][1:], input_size, alt[1:] if alt else None, alt_size)
        if measured is None:
            raise NoSpatialStagesError(f"feature_info module {path!r} outputs {list(calls[0][1:])}, not a feature map")
        # The measured stride rounded to a power of two, as fx reports it: feature_info sometimes
        # gives a patch size (ConvMixer's and Sequencer's 7) or a stride its entry does not have.
        layout, r, channels = measured
        if stages and r <= stages[-1].reduction:
            stages.pop()  # several entries at one resolution: the last one before the drop is the stage
            boundaries.pop()
        stages.append(Stage(len(stages), path, channels, r, layout, calls[0][1:], (), "feature_info"))
        boundaries.append(last[path])
    spans = {p: (first[p], last[p]) for p in last}
    groups = group_modules(spans, boundaries)
    return [
        Stage(i, s.name, s.channels, s.reduction, s.layout, s.shape, tuple(g), s.source)
        for i, (s, g) in enumerate(zip(stages, groups))
    ]
