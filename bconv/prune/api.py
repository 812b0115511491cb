"""``cop_prune``: the one-call path (arguments, protections, the greedy planner, Torch-Pruning's removal,
and the model put back as it was on any failure)."""

from __future__ import annotations

import time
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from ..errors import BConvError, InputSizeError
from ..surgery import check_input_size, check_module_paths, dummy_input, eval_mode, model_error_message, refuse_wrapped, select_stages
from ..surgery.anatomy import anatomy
from .adapter import (
    _build_graph, _check_forward, _measure, _out_channels, _output_shapes, _plain_history, _protected_layers, _Snapshot,
)
from .importance import PRESETS, COPImportance, Normalization, Similarity
from .planner import TOLERANCE, Floors, _Planner
from .report import LayerWidth, PruneError, PruneReport, PruneResult, PruneTargetError, _skipped_hint

__all__ = ["cop_prune"]

Metric = Literal["flops", "params", "channels"]
Prefer = Literal["balanced", "smaller", "faster"]
_METRICS = ("flops", "params", "channels")


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
    similarity: Similarity = "pearson",
    normalize: Normalization = "max",
    min_channels: int = 1,
    max_fraction: float = 0.9,
    round_to: int = 1,
    stages: Sequence[str | int] | None = None,
    protect: Sequence[str] = (),
    keep_feature_width: bool = False,
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
        normalize: how each layer's correlation matrix (zero diagonal) is scaled once, as in the released
            code: divided by its largest entry (``"max"``), by the sum of the matrix / 2 (``"l1"``) or by
            its Frobenius norm (``"l2"``).
        min_channels: no layer keeps fewer channels than this (and never fewer than 1).
        max_fraction: the largest fraction of a layer's channels that may be removed.
        round_to: kept widths are multiples of this (the original width is always allowed).
        stages: only prune channels produced inside these stages, named (or indexed) as
            ``python -m bconv.inspect MODEL`` prints them. Default: every stage.
        protect: extra module paths whose channels must not change; a block's path (``layer4``) keeps every
            layer inside it. A path the model does not have is an error, not ignored.
        keep_feature_width: keep the classifier's input width, the pooled feature that STD compares
            between student and teacher (a bconv option). By default, as in the released code, the
            classifier keeps its classes only and the channels that feed it are pruned like any others.
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
    _check_target(ratio, metric, prefer)
    input_size = check_input_size(input_size)
    refuse_wrapped(model, _PTL_REFUSAL)
    protect = check_module_paths(model, protect, "protect")
    x = dummy_input(model, input_size)
    preset = PRESETS[prefer]
    weights = [p if w is None else w for w, p in zip((alpha, beta, gamma), preset)]
    importance = COPImportance(*weights, top_k=top_k, similarity=similarity, normalize=normalize, example_inputs=x)
    floors = Floors(min_channels, max_fraction, round_to)
    allowed = _stage_modules(model, input_size, stages)
    snapshot = _Snapshot(model)
    try:
        positions: dict[nn.Module, int] = {}
        measured: dict[str, Any] = {}

        def measuring_forward(m: nn.Module, inputs: Tensor) -> Any:
            # Torch-Pruning's tracing forward measures the model too, one forward fewer. It runs with autograd
            # on, and so does the check after pruning: both count alike (see TotalFlopCounter).
            positions.clear()  # should a Torch-Pruning version run it twice, positions are counted once
            try:
                measured["before"], out = _measure(m, inputs, positions)
            except Exception as e:
                try:
                    with torch.no_grad():
                        m(inputs)
                except Exception:  # the model's own complaint, as find_stages and wrap_with_ptl report it
                    raise InputSizeError(model_error_message(model, x, e)) from e
                raise  # it fails with autograd only: Torch-Pruning's graph cannot be built (a PruneError)
            measured["shapes"] = _output_shapes(out)
            return out

        graph = _build_graph(model, x, measuring_forward)
        before, reference_shapes = measured["before"], measured["shapes"]
        protection = _protected_layers(model, input_size, graph, protect, keep_feature_width)
        try:
            planner = _Planner(model, graph, importance=importance, floors=floors, positions=positions,
                               protection=protection, allowed=allowed, calibration=calibration)  # fmt: skip
        except BConvError:
            raise
        except Exception as e:  # Torch-Pruning's groups of an op it mis-handles (seen: ZeroDivisionError, IndexError)
            raise PruneError(
                f"Torch-Pruning's dependency groups of {type(model).__name__} could not be read: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}. Pass stages=[...] to prune only some stages; the model "
                f"is unchanged."
            ) from e
        target = ratio
        achieved = 0.0
        after = before
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
            planner.apply()
            with eval_mode(model), torch.enable_grad():
                after = _check_forward(model, x, reference_shapes)
            achieved = 1 - after[metric] / before[metric]
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
        snapshot.restore()
        raise
    report = PruneReport(
        metric=metric, ratio=ratio, achieved=achieved,
        params_before=before["params"], params_after=after["params"],
        flops_before=before["flops"], flops_after=after["flops"],
        channels_before=before["channels"], channels_after=after["channels"],
        layers=[LayerWidth(n, w, _out_channels(model.get_submodule(n))) for n, w in planner.widths_before.items()
                if _out_channels(model.get_submodule(n)) != w],
        alpha=importance.alpha, beta=importance.beta, gamma=importance.gamma, skipped=planner.skipped,
        input_size=input_size, seconds=time.perf_counter() - start,
    )  # fmt: skip
    history = _plain_history(graph.pruning_history())
    return PruneResult(model=model, report=report, history=history)


def _check_target(ratio: float, metric: str, prefer: str) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"ratio={ratio!r} must be a fraction of the metric to remove, strictly between 0 and 1")
    if metric not in _METRICS:
        raise ValueError(f"metric={metric!r} is not one of {', '.join(map(repr, _METRICS))}")
    if prefer not in PRESETS:
        raise ValueError(f"prefer={prefer!r} is not one of {', '.join(map(repr, PRESETS))}")


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
