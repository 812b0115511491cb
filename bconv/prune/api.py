"""``cop_prune``: the one-call path (arguments, protections, the greedy planner, Torch-Pruning's removal,
and the model put back as it was on any failure)."""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from ..errors import BConvError, InputSizeError
from ..surgery._checks import check_input_size, check_module_paths, refuse_wrapped, select_stages
from ..surgery._trace import dummy_input, eval_mode, model_error_message
from ..surgery.anatomy import anatomy
from .adapter import _build_graph, _check_forward, _measure, _out_channels, _output_shapes, _protected_layers, _restore
from .planner import TOLERANCE, _Planner
from .report import LayerWidth, PruneError, PruneReport, PruneResult, PruneTargetError, _skipped_hint

__all__ = ["cop_prune", "PRESETS"]

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
        protect: extra module paths whose channels must not change; a block's path (``layer4``) keeps every
            layer inside it. A path the model does not have is an error, not ignored.
        calibration: optional input batches (an extension of COP, which is data-free): redundancy is
            then the correlation of the channels' activations (each layer's output, over samples and
            positions) instead of their consumer kernels. A few batches suffice.

    Returns:
        A :class:`PruneResult`: ``.model`` (the same object), ``.report`` and ``.history``.

    Raises:
        ValueError: a bad argument (names what is valid).
        bconv.errors.InputSizeError: a malformed ``input_size``, or one the model rejects.
        bconv.errors.StageSelectionError: ``stages`` names no stage of the model (as in ``wrap_with_ptl``).
        bconv.errors.ModulePathError: ``protect`` names a module the model does not have.
        bconv.errors.WrappedModelError: a PTL-wrapped model.
        PruneTargetError: ``ratio`` is not reachable with the floors; the model is unchanged.
        PruneError: Torch-Pruning cannot trace or prune the model; the model is unchanged.

    Example::

        >>> result = cop_prune(torchvision.models.resnet18(), ratio=0.5, metric="flops", prefer="faster")
        >>> print(format_report(result.report))
    """
    start = time.perf_counter()
    weights = _check_arguments(ratio, metric, prefer, alpha, beta, gamma, top_k, similarity, normalize,
                               min_channels, max_fraction, round_to)  # fmt: skip
    input_size = check_input_size(input_size)
    refuse_wrapped(model, _PTL_REFUSAL)
    protect = check_module_paths(model, protect, "protect")
    allowed = _stage_modules(model, input_size, stages)
    backup = copy.deepcopy(model)
    try:
        with eval_mode(model), torch.no_grad():
            x = dummy_input(model, input_size)
            positions: dict[nn.Module, int] = {}
            try:
                before, out = _measure(model, x, positions)
            except Exception as e:  # the model's own complaint, as find_stages and wrap_with_ptl report it
                raise InputSizeError(model_error_message(model, x, e)) from e
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


_PTL_REFUSAL = (
    "cop_prune does not prune a PTL-wrapped model: its ladder's fusions read the widths of the stages it is "
    "paired with. Prune the plain network instead: distil the PTL teacher into a plain student "
    "(bconv.distill.STDTrainer), then cop_prune(student, ...), then fine-tune the student."
)


def _stage_modules(model: nn.Module, input_size: tuple[int, ...], stages: Sequence[str | int] | None) -> list[str] | None:
    """Module paths inside the chosen stages (chosen as :func:`bconv.wrap_with_ptl` chooses), or None for all."""
    if stages is None:
        return None
    found = anatomy(model, input_size).stages
    return [m for stage in select_stages(found, stages, model) for m in stage.modules]
