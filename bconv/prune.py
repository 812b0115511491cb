"""COP: correlation-based filter pruning (Wang, Fu, Guo, Cai, He, IJCAI 2019) on any backbone.

Torch-Pruning's dependency graph says which channels are coupled (residual sums,
concatenations, depthwise convolutions) and removes them; bconv decides *which* channels go,
with the importance of the released COP code (see DESIGN.md §8):

- redundancy is data-free: for each spatial tap of the kernel that consumes a layer's
  channels, every input channel is a vector over the consumer's filters; the |Pearson|
  correlation of every pair, averaged over the taps, with a zero diagonal, normalised once;
  ``r_i`` is the mean of channel i's ``top_k`` largest correlations;
- cost terms use log2 of the params and FLOPs of the layer and its consumers at their current
  widths: ``imp = alpha (1 - r) + beta (1 - rf) + gamma (1 - rp)``, lowest pruned first;
- selection is greedy and global, one channel at a time; only the rows of the correlation
  matrices that held the cut channel among their top-k, and the cost terms, are recomputed.

Where bconv departs from the released code: coupled layers (every kernel that reads the same
channels) average their redundancies; a channel whose consumer weights are constant (a dead
channel) is the most redundant, not the least; every layer keeps a floor (``min_channels``,
``max_fraction``, ``round_to``); the target is met within 2% of the metric or refused before
anything is changed.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import Tensor, nn

from ._flops import TotalFlopCounter
from .errors import BConvError, TraceError
from .surgery._hooks import original_network
from .surgery._trace import dummy_input, eval_mode

__all__ = [
    "cop_prune",
    "save_pruned",
    "load_pruned",
    "format_report",
    "PruneResult",
    "PruneReport",
    "LayerWidth",
    "PruneError",
    "PruneTargetError",
    "PRESETS",
]

Metric = Literal["flops", "params", "channels"]
Prefer = Literal["balanced", "smaller", "faster"]

PRESETS: dict[str, tuple[float, float, float]] = {
    "balanced": (1.0, 1.0, 1.0),  # COP's ResNet-18 ImageNet recipe
    "smaller": (1.0, 0.0, 3.0),  # COP's VGG16 CIFAR recipe: parameters weigh
    "faster": (1.0, 3.0, 0.0),  # COP's ResNet-32 CIFAR recipe: FLOPs weigh
}
_METRICS = ("flops", "params", "channels")
_SIMILARITIES = ("pearson", "cosine", "inner")
_NORMALIZATIONS = ("max", "l1", "l2")
TOLERANCE = 0.02  # the target is met within this fraction of the metric
# Work cap for one consumer's correlation matrix (taps x filters x channels^2): a Linear that reads a
# flattened 7x7 map (VGG's classifier) would otherwise cost tens of GFLOPs for one matrix.
_CORRELATION_BUDGET = 2e9


class PruneError(BConvError, RuntimeError):
    """Torch-Pruning cannot prune this model (an op it cannot follow); names the layer or op."""


class PruneTargetError(BConvError, ValueError):
    """The requested ratio is not reachable with the floors given; says which ratio is."""


@dataclass(frozen=True)
class LayerWidth:
    """Output channels of one convolution or linear layer before and after pruning."""

    name: str
    before: int
    after: int


@dataclass
class PruneReport:
    """What :func:`cop_prune` did.

    Attributes:
        metric, ratio: the target (fraction of ``metric`` to remove).
        achieved: fraction of ``metric`` removed, measured on the pruned model.
        params_before, params_after: parameter counts.
        flops_before, flops_after: FLOPs of one forward at ``input_size`` (torch's FlopCounterMode:
            convolutions and matrix products, 2 per multiply-add).
        channels_before, channels_after: output channels of all convolutions and linear layers.
        layers: every layer whose output width changed.
        alpha, beta, gamma: the importance weights used.
        skipped: channel groups that were not candidates, ``(root layer, reason)``.
        input_size, seconds: the dummy input size and the wall time of the call.
    """

    metric: str
    ratio: float
    achieved: float
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    channels_before: int
    channels_after: int
    layers: list[LayerWidth]
    alpha: float
    beta: float
    gamma: float
    skipped: list[tuple[str, str]]
    input_size: tuple[int, ...]
    seconds: float


@dataclass
class PruneResult:
    """``model`` (the same object, pruned in place), its ``report`` and the pruning ``history``.

    ``history`` lists Torch-Pruning's operations in order: ``[root layer, is_output_channels,
    channel indices at that moment]``; :func:`save_pruned` stores it, :func:`load_pruned` replays it.
    """

    model: nn.Module
    report: PruneReport
    history: list[list[Any]] = field(repr=False)


# --------------------------------------------------------------------------- public API


def cop_prune(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    ratio: float = 0.5,
    metric: Metric = "flops",
    prefer: Prefer = "balanced",
    *,
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    top_k: int = 3,
    similarity: Literal["pearson", "cosine", "inner"] = "pearson",
    normalize: Literal["max", "l1", "l2"] = "max",
    min_channels: int = 1,
    max_fraction: float = 0.9,
    round_to: int = 1,
    stages: Sequence[str | int] | None = None,
    protect: Sequence[str] = (),
    calibration: Iterable[Tensor] | None = None,
) -> PruneResult:
    """Prune ``model``'s channels with COP until ``ratio`` of ``metric`` is removed.

    Args:
        model: a plain CNN (timm, torchvision or your own), pruned in place. A PTL-wrapped
            model is refused: prune the plain student that STD distilled from it.
        input_size: ``(C, H, W)`` of the dummy input that traces the model and counts FLOPs.
        ratio: fraction of ``metric`` to remove, in (0, 1); met within 2% of the metric.
        metric: ``"flops"``, ``"params"`` or ``"channels"`` (output channels of all convolutions
            and linear layers), each counted on the whole model.
        prefer: preset of ``(alpha, beta, gamma)``: ``"balanced"`` (1, 1, 1), ``"smaller"``
            (1, 0, 3: parameters weigh), ``"faster"`` (1, 3, 0: FLOPs weigh).
        alpha, beta, gamma: override the preset's weight of redundancy, FLOPs and params.
        top_k: how many of a channel's largest correlations make its redundancy.
        similarity: ``"pearson"`` (COP's default), ``"cosine"`` or ``"inner"`` (inner product).
        normalize: how each layer's correlation matrix is scaled once: so that its largest
            entry (``"max"``), its mean row L1 norm (``"l1"``) or its mean row L2 norm (``"l2"``) is 1.
        min_channels: no layer keeps fewer channels than this (and never fewer than 1).
        max_fraction: the largest fraction of a layer's channels that may be removed.
        round_to: kept widths are multiples of this (the original width is always allowed).
        stages: only prune channels produced inside these stages, named (or indexed) as
            ``python -m bconv.inspect MODEL`` prints them. Default: every stage.
        protect: extra module paths whose channels must not change.
        calibration: optional input batches (an extension of COP, which is data-free): redundancy is
            then the correlation of the channels' activations (each layer's output, over samples and
            positions) instead of their consumer kernels. A few batches suffice.

    Returns:
        A :class:`PruneResult`: ``.model`` (the same object), ``.report`` and ``.history``.

    Raises:
        ValueError: a bad argument (names what is valid).
        PruneTargetError: ``ratio`` is not reachable with the floors; the model is unchanged.
        PruneError: Torch-Pruning cannot trace or prune the model; the model is unchanged.

    Example::

        >>> result = cop_prune(torchvision.models.resnet18(), ratio=0.5, metric="flops", prefer="faster")
        >>> print(format_report(result.report))
    """
    start = time.perf_counter()
    weights = _check_arguments(ratio, metric, prefer, alpha, beta, gamma, top_k, similarity, normalize,
                               min_channels, max_fraction, round_to)  # fmt: skip
    input_size = tuple(int(s) for s in input_size)
    _refuse_ptl(model)
    allowed = _stage_modules(model, input_size, stages)
    backup = copy.deepcopy(model)
    try:
        with eval_mode(model), torch.no_grad():
            x = dummy_input(model, input_size)
            positions: dict[nn.Module, int] = {}
            before, out = _measure(model, x, positions)
            reference_shapes = _output_shapes(out)
        graph = _build_graph(model, x)
        protected = _protected_layers(model, input_size, graph, protect)
        try:
            planner = _Planner(model, graph, positions, protected, allowed, weights, top_k, similarity, normalize,
                               min_channels, max_fraction, round_to, calibration)  # fmt: skip
        except BConvError:
            raise
        except Exception as e:  # Torch-Pruning's groups of an op it mis-handles (seen: ZeroDivisionError, IndexError)
            raise PruneError(
                f"Torch-Pruning's dependency groups of {type(model).__name__} could not be read: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}. Pass stages=[...] to prune only some stages; the model "
                f"is unchanged."
            ) from e
        target = ratio
        history: list[list[Any]] = []
        achieved = 0.0
        measured = before
        for _ in range(6):
            reached = planner.run(metric, target, before)
            reachable = planner.estimated_reduction(metric, before)
            if not reached and planner.applied_cuts == 0 and reachable < ratio - TOLERANCE:
                raise PruneTargetError(
                    f"ratio={ratio} of {metric} is not reachable: with every prunable layer at its floor "
                    f"(min_channels={min_channels}, max_fraction={max_fraction}, round_to={round_to}"
                    f"{', stages=' + repr(list(stages)) if stages is not None else ''}) about {reachable:.3f} "
                    f"can be removed. Pass ratio<={reachable:.3f}, or loosen the floors."
                    + _skipped_hint(planner.skipped)
                )
            history += planner.apply()
            with eval_mode(model), torch.no_grad():
                measured = _check_forward(model, x, reference_shapes)
            achieved = 1 - measured[metric] / before[metric]
            if achieved >= ratio - TOLERANCE / 4 or not reached:
                break
            # The estimate counts convolutions and linear layers only: ask it for the remaining gap.
            target += ratio - achieved
        if achieved > ratio + TOLERANCE:
            raise PruneTargetError(
                f"ratio={ratio} of {metric} cannot be met within {TOLERANCE:.0%}: the smallest step that reaches it "
                f"removes {achieved:.3f} (one channel of this model is a large share of its {metric}). "
                f"Pass ratio={achieved:.3f}, or another metric."
            )
        if achieved < ratio - TOLERANCE:
            raise PruneTargetError(
                f"ratio={ratio} of {metric} is not reachable: pruning stopped at {achieved:.3f} with every "
                f"prunable layer at its floor (min_channels={min_channels}, max_fraction={max_fraction}, "
                f"round_to={round_to}). Pass ratio<={achieved:.3f}, or loosen the floors."
                + _skipped_hint(planner.skipped)
            )
    except BaseException:
        _restore(model, backup)
        raise
    report = PruneReport(
        metric=metric, ratio=ratio, achieved=achieved,
        params_before=before["params"], params_after=measured["params"],
        flops_before=before["flops"], flops_after=measured["flops"],
        channels_before=before["channels"], channels_after=measured["channels"],
        layers=[LayerWidth(n, w, _out_channels(model.get_submodule(n))) for n, w in planner.widths_before.items()
                if _out_channels(model.get_submodule(n)) != w],
        alpha=weights[0], beta=weights[1], gamma=weights[2], skipped=planner.skipped,
        input_size=input_size, seconds=time.perf_counter() - start,
    )  # fmt: skip
    return PruneResult(model=model, report=report, history=history)


def save_pruned(result: PruneResult, path: str) -> None:
    """Store a pruned model's weights and its pruning history (plain types, no pickled model).

    Args:
        result: what :func:`cop_prune` returned (``result.model`` may have been fine-tuned since).
        path: file to write; it loads with ``torch.load(path, weights_only=True)``.

    Example::

        >>> save_pruned(result, "pruned.pt")
        >>> model = load_pruned(torchvision.models.resnet18(), "pruned.pt")
    """
    torch.save({
        "format": "bconv.prune/1",
        "model_class": type(result.model).__name__,
        "input_size": list(result.report.input_size),
        "history": [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in result.history],
        "state_dict": result.model.state_dict(),
    }, path)  # fmt: skip


def load_pruned(model: nn.Module, path: str) -> nn.Module:
    """Replay a saved pruning history on a freshly built original ``model`` and load the weights.

    Args:
        model: the original architecture, unpruned (e.g. ``torchvision.models.resnet50()``); pruned in place.
        path: a file written by :func:`save_pruned`.

    Returns:
        ``model``, pruned as the saved one was and holding its weights.

    Raises:
        ValueError: the file is not a bconv pruning file, or was saved from another model class.

    Example::

        >>> model = load_pruned(torchvision.models.resnet18(), "pruned.pt")
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != "bconv.prune/1":
        raise ValueError(f"{path} was not written by bconv.prune.save_pruned")
    if data["model_class"] != type(model).__name__:
        raise ValueError(
            f"{path} holds a pruned {data['model_class']}, not a {type(model).__name__}: build the original "
            f"{data['model_class']} and pass it to load_pruned"
        )
    with eval_mode(model):
        graph = _build_graph(model, dummy_input(model, data["input_size"]))
        for name, is_out, idxs in data["history"]:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{path} prunes `{name}`, which {type(model).__name__} does not have") from None
            pruner = graph.get_pruner_of_module(module)
            fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
            graph.get_pruning_group(module, fn, idxs).prune(record_history=False)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.load_state_dict({k: v.to(device) for k, v in data["state_dict"].items()})
    return model


def format_report(report: PruneReport, stages: Sequence[Any] | None = None) -> str:
    """The report as text: per stage (when ``stages`` from :func:`bconv.find_stages` are given) the
    summed widths of its pruned layers before and after, then params and FLOPs before and after.

    Example::

        >>> print(format_report(cop_prune(model).report, bconv.find_stages(model)))
    """
    lines = []
    if stages:
        header = ("stage", "layers narrowed", "their channels before", "after", "removed")
        rows = [header]
        for s in stages:
            inside = [w for w in report.layers if any(w.name == m or w.name.startswith(m + ".") for m in s.modules)]
            b, a = sum(w.before for w in inside), sum(w.after for w in inside)
            rows.append((s.name, str(len(inside)), str(b), str(a), f"{100 * (b - a) / b:.1f}%" if b else "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        table = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        table.insert(1, "  ".join("-" * w for w in widths))
        lines += [t.rstrip() for t in table] + [""]

    def change(b: int, a: int, unit: str = "", scale: float = 1.0) -> str:
        return f"{b / scale:,.3f}{unit} -> {a / scale:,.3f}{unit} (-{100 * (b - a) / max(b, 1):.1f}%)"

    lines.append(f"parameters {report.params_before:,} -> {report.params_after:,} "
                 f"(-{100 * (report.params_before - report.params_after) / max(report.params_before, 1):.1f}%)")
    lines.append(f"FLOPs      {change(report.flops_before, report.flops_after, 'G', 1e9)}")
    lines.append(f"channels   {report.channels_before:,} -> {report.channels_after:,} "
                 f"(-{100 * (report.channels_before - report.channels_after) / max(report.channels_before, 1):.1f}%)")
    lines.append(f"target: -{100 * report.ratio:.0f}% {report.metric}, reached -{100 * report.achieved:.1f}%, "
                 f"(alpha, beta, gamma) = ({report.alpha:g}, {report.beta:g}, {report.gamma:g}), "
                 f"{len(report.layers)} layers narrowed in {report.seconds:.1f} s")  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------- checks


def _check_arguments(ratio, metric, prefer, alpha, beta, gamma, top_k, similarity, normalize,
                     min_channels, max_fraction, round_to) -> tuple[float, float, float]:  # fmt: skip
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"ratio={ratio!r} must be a fraction of the metric to remove, strictly between 0 and 1")
    if metric not in _METRICS:
        raise ValueError(f"metric={metric!r} is not one of {', '.join(map(repr, _METRICS))}")
    if prefer not in PRESETS:
        raise ValueError(f"prefer={prefer!r} is not one of {', '.join(map(repr, PRESETS))}")
    if similarity not in _SIMILARITIES:
        raise ValueError(f"similarity={similarity!r} is not one of {', '.join(map(repr, _SIMILARITIES))}")
    if normalize not in _NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not one of {', '.join(map(repr, _NORMALIZATIONS))}")
    for name, value in (("top_k", top_k), ("min_channels", min_channels), ("round_to", round_to)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if not isinstance(max_fraction, (int, float)) or not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction={max_fraction!r} must be in (0, 1]: the largest fraction of a layer removed")
    preset = PRESETS[prefer]
    chosen = tuple(float(p if v is None else v) for v, p in zip((alpha, beta, gamma), preset))
    if any(w < 0 or not math.isfinite(w) for w in chosen) or not any(chosen):
        raise ValueError(f"(alpha, beta, gamma)={chosen} must be finite, >= 0 and not all zero")
    return chosen  # type: ignore[return-value]


def _refuse_ptl(model: nn.Module) -> None:
    from .surgery._hooks import BConvHook

    wrapped = original_network(model)[1] != "" or any(
        isinstance(h, BConvHook) for m in model.modules() for h in m._forward_hooks.values()
    )
    if wrapped:
        raise ValueError(
            "cop_prune does not prune a PTL-wrapped model: its ladder's fusions read the widths of the stages "
            "it is paired with. Prune the plain network instead: distil the PTL teacher into a plain student "
            "(bconv.distill.STDTrainer), then cop_prune(student, ...), then fine-tune the student."
        )


def _stage_modules(model: nn.Module, input_size: tuple[int, ...], stages: Sequence[str | int] | None) -> list[str] | None:
    """Module paths inside the chosen stages, or None for the whole model."""
    if stages is None:
        return None
    from .surgery.stages import find_stages

    if isinstance(stages, (str, int)):
        stages = [stages]
    found = find_stages(model, input_size)
    by_name = {s.name: s for s in found}
    chosen = []
    for s in stages:
        stage = found[s] if isinstance(s, int) and -len(found) <= s < len(found) else by_name.get(s)  # type: ignore[arg-type]
        if stage is None:
            valid = ", ".join(f"{i}: {st.name}" for i, st in enumerate(found))
            raise ValueError(
                f"unknown stage {s!r} for {type(model).__name__}; its stages are {valid} "
                f"(see python -m bconv.inspect)"
            )
        chosen += stage.modules
    return chosen


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or p == "" for p in prefixes)


# --------------------------------------------------------------------------- graph


def _build_graph(model: nn.Module, x: Tensor) -> tp.DependencyGraph:
    try:
        with warnings.catch_warnings(), torch.enable_grad(), eval_mode(model):
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    except Exception as e:  # Torch-Pruning raises whatever its tracing hits
        raise PruneError(
            f"Torch-Pruning cannot build the dependency graph of {type(model).__name__}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. It traces autograd from the output: "
            f"the forward must return tensors computed from the input by differentiable ops."
        ) from e


def _protected_layers(
    model: nn.Module, input_size: tuple[int, ...], graph: tp.DependencyGraph, extra: Sequence[str]
) -> dict[str, str]:
    """Module paths whose channels must not change, with the reason: what counts as the head.

    The classifier keeps its input and output width (so the pooled feature width, which STD
    distils, is kept too), and every layer whose output channels reach a model output keeps them.
    """
    from .surgery.anatomy import anatomy

    protected = {name: "protected by the caller" for name in extra}
    try:
        # The network's anatomy, the one description PTL, STD and rollback read, says where its head is.
        classifier = anatomy(model, input_size, need_stages=False).head.classifier
    except TraceError:
        classifier = None
    if classifier is not None:
        protected[classifier] = "the classifier"
    # A model with no classifier (segmentation, features only) has its outputs protected below.
    # Attention keeps its widths: Torch-Pruning does not update head counts and head dims (timm's
    # Attention reshapes with self.num_heads), so pruning its projections breaks the forward.
    # Only the innermost modules that keep a head count are attention: a block that keeps num_heads too
    # (torchvision's ViT EncoderBlock, timm's DaViT blocks) keeps its MLP prunable.
    # timm and torchvision: num_heads; Hiera: heads; torchvision's MaxViT: n_heads.
    with_heads = {}
    for name, module in model.named_modules():
        heads = next((h for h in (getattr(module, a, None) for a in ("num_heads", "heads", "n_heads")) if h), None)
        if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0:
            with_heads[name] = (module, heads)
    for name, (module, heads) in with_heads.items():
        if any(other != name and (name == "" or other.startswith(name + ".")) for other in with_heads):
            continue  # an inner module keeps the heads
        for sub, layer in module.named_modules():
            if _is_layer(layer) or isinstance(layer, nn.MultiheadAttention):
                protected.setdefault(f"{name}.{sub}" if sub else name, f"attention with {heads} heads")
    # Walk back from every model output through parameter-free ops (add, interpolate, reshape, ...): the
    # first module with parameters on each path produces output channels.
    # Torch-Pruning adds an output node only where an op, not a module, ends the forward: the sinks of its
    # graph (nodes nothing reads) are where the outputs come from.
    names = graph._module2name
    stack = [node for node in graph.module2node.values() if node.type == tp.ops.OPTYPE.OUTPUT or not node.outputs]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        module = node.module
        if isinstance(module, nn.Module) and module in names and any(True for _ in module.parameters(recurse=False)):
            protected.setdefault(names[module], "produces a model output")
        else:
            stack.extend(node.inputs)
    return protected


def _output_shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tp.utils.flatten_as_list(out) if isinstance(t, Tensor)]


def _check_forward(model: nn.Module, x: Tensor, shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """Measure the pruned model; it must still run and return outputs of the same shapes (else name the
    failing module)."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(m: nn.Module, args: Any) -> None:
        stack.append(names[m])

    def leave(m: nn.Module, args: Any, out: Any) -> None:
        stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        measured, out = _measure(model, x)
    except Exception as e:
        where = stack[-1] if stack else type(model).__name__
        raise PruneError(
            f"after pruning, {type(model).__name__} fails in `{where or '(top level)'}`: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Torch-Pruning did not update something this module "
            f"depends on (a static shape or head count, an op it cannot follow); pass stages=[...] without it, "
            f"or protect=['{where}']. The model is unchanged."
        ) from e
    finally:
        for h in handles:
            h.remove()
    if _output_shapes(out) != shapes:
        raise PruneError(f"after pruning, {type(model).__name__}'s outputs have shapes {_output_shapes(out)} "
                         f"instead of {shapes}; the model is unchanged")  # fmt: skip
    return measured


def _restore(model: nn.Module, backup: nn.Module) -> None:
    """Put back the model the user passed (Torch-Pruning replaced parameters and attributes in place)."""
    model.__dict__.clear()
    model.__dict__.update(backup.__dict__)


def _skipped_hint(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    reasons: dict[str, int] = {}
    for _, why in skipped:
        reasons[why] = reasons.get(why, 0) + 1
    return " Not prunable: " + "; ".join(f"{n} channel group(s) {why}" for why, n in reasons.items()) + "."


# --------------------------------------------------------------------------- measuring


def _out_channels(module: nn.Module) -> int:
    return int(module.out_features if isinstance(module, nn.Linear) else module.out_channels)


def _is_layer(module: Any) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


def _measure(model: nn.Module, x: Tensor, positions: dict[nn.Module, int] | None = None) -> tuple[dict[str, int], Any]:
    """Params, FLOPs and channels, and the output, from one forward; ``positions`` receives each convolution's
    and linear layer's output positions per sample (its FLOPs are 2 x weight x positions)."""
    def hook(m: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Tensor) and positions is not None:
            positions[m] = positions.get(m, 0) + out.numel() // max(out.shape[0], 1) // _out_channels(m)

    handles = [m.register_forward_hook(hook) for m in model.modules() if _is_layer(m)] if positions is not None else []
    try:
        with TotalFlopCounter() as counter:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": int(counter.get_total_flops()),
        "channels": sum(_out_channels(m) for m in model.modules() if _is_layer(m)),
    }, out


# --------------------------------------------------------------------------- redundancy


def _similarity(w: Tensor, kind: str, normalize: str) -> Tensor:
    """COP's n x n redundancy matrix from a consumer kernel ``w`` of shape [taps, filters, n]."""
    w = w.float()
    if kind == "pearson":
        z = w - w.mean(dim=1, keepdim=True)
        scale = z.pow(2).mean(dim=1).sqrt()  # population std, as the released code
        z = z / (scale.unsqueeze(1) + 1e-8)
        sim = torch.einsum("toi,toj->tij", z, z) / w.shape[1]
    elif kind == "cosine":
        scale = w.norm(dim=1)
        z = w / (scale.unsqueeze(1) + 1e-8)
        sim = torch.einsum("toi,toj->tij", z, z)
    else:
        scale = w.norm(dim=1)
        sim = torch.einsum("toi,toj->tij", w, w)
    sim = sim.abs()
    # A dead channel (constant consumer weights: zero std, zero norm) correlates with nothing, which
    # the released code reads as "unique, keep". It carries no information: make it the most redundant.
    dead = scale <= 1e-6 * scale.amax(dim=1, keepdim=True).clamp_min(1e-30)
    if dead.any():
        full = torch.ones(()) if kind != "inner" else sim.amax()
        sim = torch.where(dead.unsqueeze(2), full, sim)
    m = sim.mean(dim=0)
    m.fill_diagonal_(0)
    if normalize == "max":
        scale_m = m.max()
    elif normalize == "l1":
        scale_m = m.sum(dim=1).mean()
    else:
        scale_m = m.norm(dim=1).mean()
    return m / scale_m if scale_m > 0 else m


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


@dataclass
class _Group:
    root: nn.Module
    root_name: str
    n: int  # channels at the start
    ch_groups: int  # channels move in units of ch_groups (grouped convolutions prune every group alike)
    step: int  # units removed per greedy step (round_to)
    floor: int  # fewest units kept
    consumers: list[_Redundancy]
    alive_ch: np.ndarray = field(init=False)  # original channel -> still there
    applied: np.ndarray = field(init=False)  # original channel -> its cut was already applied to the model
    cuts: int = 0  # channels cut (planned)

    def __post_init__(self) -> None:
        self.alive_ch = np.ones(self.n, dtype=bool)
        self.applied = np.zeros(self.n, dtype=bool)
        self.total = np.sum([c.r for c in self.consumers], axis=0) if self.consumers else np.zeros(self.n)

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
        r = self.total / max(1, len(self.consumers))
        if self.ch_groups > 1:
            r = r.reshape(self.ch_groups, self.units).mean(axis=0)
            return np.where(self.alive_ch.reshape(self.ch_groups, self.units).all(axis=0), r, -np.inf)
        return np.where(self.alive_ch, r, -np.inf)

    def cut_unit(self, unit: int) -> None:
        for ch in self.channels_of(unit):
            self.alive_ch[ch] = False
            for c in self.consumers:
                c.cut(ch, self.alive_ch, self.total)
        self.cuts += self.ch_groups


class _Planner:
    """The greedy COP selection on Torch-Pruning's groups, with a linear cost model of the network."""

    def __init__(self, model, graph, positions, protected, allowed, weights, top_k, similarity, normalize,
                 min_channels, max_fraction, round_to, calibration=None):  # fmt: skip
        self.model, self.graph = model, graph
        self.alpha, self.beta, self.gamma = weights
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
        protected_modules = {model.get_submodule(p) for p in protected if _has(model, p)}
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
            outs = [(it.dep.target.module, it) for it in group if graph.is_out_channel_pruning_fn(it.dep.handler)]
            ins = [(it.dep.target.module, it) for it in group if graph.is_in_channel_pruning_fn(it.dep.handler)]
            touched = {m for m, _ in outs + ins if isinstance(m, nn.Module) and m in names}
            seen_roots |= {m for m, _ in outs if _is_layer(m)}
            hit = [names.get(m, "?") for m in touched if m in protected_modules]
            if hit:
                self.skipped.append((root_name, f"touch `{hit[0]}` ({protected.get(hit[0], 'protected')})"))
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
            consumers = []
            if activations is not None and root in activations:
                a = activations[root][:, torch.tensor(list(group[0].idxs))]
                consumers.append(_Redundancy(_similarity(a.unsqueeze(0), similarity, normalize), top_k))
            for m, it in ([] if consumers else ins):
                if _is_layer(m):
                    w = _consumer_kernel(m, list(it.idxs), list(it.root_idxs), n)
                    if w is not None:
                        consumers.append(_Redundancy(_similarity(w, similarity, normalize), top_k))
            if not consumers:  # nothing reads these channels through a dense kernel: correlate the filters
                for m, it in outs:
                    if _is_layer(m) and not _depthwise(m) and len(it.idxs) == n and max(it.idxs) < _out_channels(m):
                        w = m.weight.detach()
                        w = w.transpose(0, 1) if getattr(m, "transposed", False) else w
                        w = w.reshape(w.shape[0], -1)[torch.tensor(list(it.idxs))]
                        consumers.append(_Redundancy(_similarity(w.t().unsqueeze(0), similarity, normalize), top_k))
                        break
            # A consumer read through a mapping Torch-Pruning widened (split, reshape) gives no per-channel matrix.
            consumers = [c for c in consumers if c.m.shape[0] == n]
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
        self.a_in, self.a_out = np.stack(a_in, 1), np.stack(a_out, 1)  # [layers, groups]
        self.touch = ((self.a_in + self.a_out) > 0).T.astype(np.float64)  # [groups, layers]
        self.extra = np.array(extra)
        self.in0 = np.array([_in_channels(m) for m in layers], dtype=np.float64)
        self.out0 = np.array([_out_channels(m) for m in layers], dtype=np.float64)
        self.taps = np.array([_taps(m) for m in layers], dtype=np.float64)
        self.conv_groups = np.array([1 if _depthwise(m) else getattr(m, "groups", 1) for m in layers], dtype=np.float64)
        self.dw = np.array([_depthwise(m) for m in layers])
        self.bias = np.array([m.bias is not None for m in layers], dtype=np.float64)
        self.pos = np.array([positions.get(m, 0) for m in layers], dtype=np.float64)
        self.cuts = np.zeros(len(groups))
        self.inn, self.out = self.in0.copy(), self.out0.copy()
        self.p0, self.f0 = self._layer_costs()
        self.p, self.f = self.p0, self.f0
        self.open = np.array([g.alive_units - self._step(g) >= g.floor for g in groups])
        self.redundancy = [g.unit_redundancy() for g in groups]
        self.best = np.array([r.max() for r in self.redundancy])

    def _layer_costs(self, inn: np.ndarray | None = None, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        inn = self.inn if inn is None else inn
        out = self.out if out is None else out
        per_filter = np.where(self.dw, 1.0, inn / self.conv_groups) * self.taps
        weight = out * per_filter
        return weight + self.bias * out, 2 * weight * self.pos

    def _cut_channels(self, gi: int, count: float) -> None:
        """Widths and costs after ``count`` more channels of group gi are cut (negative: undo)."""
        self.cuts[gi] += count
        self.inn = self.inn - self.a_in[:, gi] * count
        self.out = self.out - self.a_out[:, gi] * count
        self.p, self.f = self._layer_costs()

    def estimated(self, before: dict[str, int]) -> dict[str, float]:
        return {
            "params": before["params"] - (self.p0.sum() - self.p.sum()) - float(self.extra @ self.cuts),
            "flops": before["flops"] - (self.f0.sum() - self.f.sum()),
            "channels": before["channels"] - (self.out0.sum() - self.out.sum()),
        }

    def estimated_reduction(self, metric: str, before: dict[str, int]) -> float:
        return 1 - self.estimated(before)[metric] / before[metric]

    def _cost_terms(self) -> np.ndarray:
        p, f = self.p, self.f
        lp = np.log2(np.maximum(self.touch @ p, 2.0))
        lf = np.log2(np.maximum(self.touch @ f, 2.0))
        return self.beta * (1 - lf / lf.max()) + self.gamma * (1 - lp / lp.max())

    def run(self, metric: str, target: float, before: dict[str, int]) -> bool:
        """Cut greedily until the estimated reduction of ``metric`` reaches ``target``; False if floors stop it."""
        while self.estimated_reduction(metric, before) < target - TOLERANCE / 4:  # within half a percent
            if not self.open.any():
                return False
            imp = self.alpha * (1 - self.best) + self._cost_terms()
            imp[~self.open] = np.inf
            gi = self._choose(imp, metric, target, before)
            g = self.groups[gi]
            count = self._step(g)
            for _ in range(count):
                unit = int(np.argmax(self.redundancy[gi]))
                g.cut_unit(unit)
                self.redundancy[gi] = g.unit_redundancy()
            self.best[gi] = self.redundancy[gi].max()
            self._cut_channels(gi, g.cuts - self.cuts[gi])
            self.open[gi] = g.alive_units - self._step(g) >= g.floor
        return True

    @staticmethod
    def _step(g: _Group) -> int:
        """Units cut by one greedy step; the first step of a group brings its width to a multiple of round_to."""
        return g.alive_units % g.step or g.step

    def _choose(self, imp: np.ndarray, metric: str, target: float, before: dict[str, int]) -> int:
        """The least important group, unless its step would overshoot the target by more than the tolerance
        (near the end, a coarse step of a wide layer): then the least important group whose step fits."""
        order = np.argsort(imp, kind="stable")
        if self.estimated_reduction(metric, before) < target - 2 * TOLERANCE:
            return int(order[0])
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

    def apply(self) -> list[list[Any]]:
        """Prune the planned, not yet applied channels from the model with Torch-Pruning."""
        history = []
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
            history.append([g.root_name, True, idxs])
            g.applied |= todo
            self.applied_cuts += len(idxs)
        return history


class _RunawayMapping(Exception):
    """Torch-Pruning's index mapping grew past any width in the model."""


def _all_groups(model: nn.Module, graph: tp.DependencyGraph) -> list[tuple[nn.Module, Any, str]]:
    """Torch-Pruning's ``get_all_groups`` (every convolution and linear layer as a root, each layer in one
    group), one group at a time: ``(root, group, "")``, or ``(root, None, why)`` for a group it cannot build.

    Torch-Pruning raises from deep inside for one group of an op it mis-handles (seen: ZeroDivisionError
    on GCViT, Hiera and NesT), and its reshape mappings multiply through chained window reshapes (Swin:
    tens of GB for one group); its own loop stops at the first failure. Here that one group is skipped and
    the others stay prunable. Three of Torch-Pruning's functions are swapped while the groups are listed,
    and put back before this returns.
    """
    from torch_pruning.dependency import index_mapping

    # No channel index of a real group exceeds the model's widest parameter dimension (a Linear reading a
    # flattened map included), so a mapping past it has lost track of the channels.
    bound = max((max(p.shape) for p in model.parameters() if p.dim()), default=1)
    flatten = index_mapping._FlattenIndexMapping.__call__

    def bounded(self, idxs):
        if not self.reverse and len(idxs) * self._stride > bound:
            raise _RunawayMapping(f"a reshape maps {len(idxs)} channels onto {len(idxs) * self._stride} indices")
        return flatten(self, idxs)

    # A real group holds each node's in- and out-channel operation at most a few times (a concatenation
    # reads one input twice); past that, Torch-Pruning is cycling through index sets that keep changing
    # (HaloNet's blocked attention: minutes, then memory).
    most_items = 4 * len(graph.module2node) + 16
    add_dep = tp.dependency.Group.add_dep

    def bounded_add(self, dep, idxs):
        if len(self._group) >= most_items:
            raise _RunawayMapping(f"a group grew past {most_items} operations")
        return add_dep(self, dep, idxs)

    # Torch-Pruning recomputes every concatenation's index mapping for each group it builds; nothing is
    # pruned while the groups are listed, so once is enough (DenseNet: 70 ms per group otherwise).
    update = index_mapping.update_index_mapping
    update(graph)
    found: list[tuple[nn.Module, Any, str]] = []
    visited: set[nn.Module] = set()
    index_mapping.update_index_mapping = lambda graph: None
    index_mapping._FlattenIndexMapping.__call__ = bounded
    tp.dependency.Group.add_dep = bounded_add
    try:
        for m in list(graph.module2node):
            if not _is_layer(m) or m in visited or m in graph.IGNORED_LAYERS_IN_TRACING:
                continue
            pruner = graph.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                group = graph.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            except Exception as e:  # noqa: BLE001 - whatever Torch-Pruning hits on this one group
                visited.add(m)
                why = str(e).splitlines()[0] if str(e) else ""
                found.append((m, None, (why if isinstance(e, _RunawayMapping) else f"{type(e).__name__}: {why}")[:200]))
                continue
            visited |= {dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)}
            found.append((m, group, ""))
    finally:
        index_mapping.update_index_mapping = update
        index_mapping._FlattenIndexMapping.__call__ = flatten
        tp.dependency.Group.add_dep = add_dep
    return found


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.out_channels


def _in_channels(m: nn.Module) -> int:
    return int(m.in_features if isinstance(m, nn.Linear) else m.in_channels)


def _taps(m: nn.Module) -> int:
    return int(math.prod(m.kernel_size)) if isinstance(m, nn.modules.conv._ConvNd) else 1
