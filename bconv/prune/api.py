"""``cop_prune``: the one-call path (arguments, protections, the greedy planner, Torch-Pruning's removal,
and the model put back as it was on any failure)."""

from __future__ import annotations

import time
import typing
import warnings
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from .._deprecation import REMOVED_IN
from ..errors import BConvError, ConfigError, InputSizeError
from ..surgery import (
    check_input_size, check_module_paths, dummy_input, eval_mode, model_error_message, refuse_wrapped, select_stages,
)
from ..surgery.anatomy import anatomy
from .adapter import (
    RETRIES, Snapshot, build_graph, check_forward_padded, constant_input_layers, measure, out_channels, output_shapes,
    plain_history, protected_layers,
)
from .attention import attention_around, recording_input_shapes
from .importance import PRESETS, COPImportance
from .planner import TOLERANCE, Floors, Planner
from .report import LayerWidth, PruneError, PruneReport, PruneResult, PruneTargetError, skipped_hint

__all__ = ["cop_prune"]

Metric = Literal["flops", "params", "channels"]
Prefer = Literal["balanced", "smaller", "faster"]
_METRICS = typing.get_args(Metric)
# The keywords cop_prune took before importance= and floors= grouped them (deprecated).
_IMPORTANCE_KEYWORDS = ("alpha", "beta", "gamma", "top_k", "similarity", "normalize")
_FLOORS_KEYWORDS = ("min_channels", "max_fraction", "round_to")


def cop_prune(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    ratio: float = 0.5,
    metric: Metric = "flops",
    prefer: Prefer | None = None,
    *,
    importance: COPImportance | None = None,
    floors: Floors | None = None,
    stages: Sequence[str | int] | None = None,
    protect: Sequence[str] = (),
    keep_feature_width: bool = False,
    calibration: Iterable[Tensor] | None = None,
    tolerance: float | None = None,
    **deprecated: Any,
) -> PruneResult:
    """Prune ``model``'s channels with COP until ``ratio`` of ``metric`` is removed.

    Args:
        model: a plain CNN (timm, torchvision or your own), pruned in place. A PTL-wrapped
            model is refused: prune the plain student that STD distilled from it.
        input_size: ``(C, H, W)`` of the dummy input that traces the model and counts FLOPs.
        ratio: fraction of ``metric`` to remove, in (0, 1); met within ``tolerance``, or refused with the
            reachable figure.
        metric: ``"flops"``, ``"params"`` or ``"channels"`` (output channels of all convolutions
            and linear layers), each counted on the whole model.
        prefer: preset of ``(alpha, beta, gamma)`` (``PRESETS``): ``"balanced"`` (1, 1, 1, the default),
            ``"smaller"`` (1, 0, 3: parameters weigh), ``"faster"`` (1, 3, 0: FLOPs weigh). Pass it or
            ``importance``, not both.
        importance: COP's score, its weights and similarity: a :class:`COPImportance` (its ``alpha``, ``beta``,
            ``gamma``, ``top_k``, ``similarity`` and ``normalize`` are read; its ``example_inputs`` are not,
            FLOPs are counted at ``input_size``). Default: ``COPImportance(*PRESETS[prefer])`` with
            ``top_k=3``, ``similarity="pearson"``, ``normalize="max"``.
        floors: how far any one layer may be narrowed, a :class:`Floors` (``min_channels``, ``max_fraction``,
            ``round_to``). Default: ``Floors()``, at least 1 channel kept and at most 90% removed.
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
        **deprecated: the keywords ``alpha``, ``beta``, ``gamma`` (each overriding ``prefer``'s weight),
            ``top_k``, ``similarity``, ``normalize`` (now ``importance=``) and ``min_channels``,
            ``max_fraction``, ``round_to`` (now ``floors=``) still work, with a ``DeprecationWarning`` each,
            until bconv 0.5.

    Returns:
        A :class:`PruneResult`: ``.model`` (the same object), ``.report`` and ``.history``.

    Raises:
        ValueError: a bad argument (names what is valid), ``tolerance`` included.
        TypeError: ``importance`` or ``floors`` of another type, or an unknown keyword.
        bconv.errors.ConfigError: ``importance`` with ``prefer`` or a deprecated keyword of COP's score, or
            ``floors`` with a deprecated keyword of the floors.
        bconv.errors.InputSizeError: a malformed ``input_size``, or one the model rejects.
        bconv.errors.StageSelectionError: ``stages`` names no stage of the model (as in ``wrap_with_ptl``).
        bconv.errors.ModulePathError: ``protect`` names a module the model does not have.
        bconv.errors.WrappedModelError: a PTL-wrapped model.
        PruneTargetError: ``ratio`` is not reachable with the floors, or not within ``tolerance`` (the message
            gives the asked and the reachable figures); the model is unchanged.
        PruneError: Torch-Pruning cannot trace or prune the model; the model is unchanged.

    Example::

        >>> result = cop_prune(torchvision.models.resnet18(), ratio=0.5, metric="flops", prefer="faster")
        >>> print(format_report(result.report))
        >>> x = torch.randn(1, 3, 224, 224)
        >>> result = cop_prune(torchvision.models.resnet18(), (3, 224, 224), ratio=0.5, metric="params",
        ...                    importance=COPImportance(1.0, 0.0, 3.0, top_k=5, example_inputs=x),
        ...                    floors=Floors(min_channels=16, round_to=8))
    """
    start = time.perf_counter()
    _check_target(ratio, metric, prefer)
    _check_grouped(importance, floors, prefer, deprecated)
    input_size = check_input_size(input_size)
    _warn_deprecated(deprecated, prefer, input_size)
    refuse_wrapped(model, _PTL_REFUSAL)
    protect = check_module_paths(model, protect, "protect")
    x = dummy_input(model, input_size)
    if importance is None:
        weights, options = _spelled_importance(deprecated, prefer)
        importance = COPImportance(*weights, **options, example_inputs=x)
    if floors is None:
        floors = Floors(**{k: deprecated[k] for k in _FLOORS_KEYWORDS if k in deprecated})
    allowed = _stage_modules(model, input_size, stages)
    snapshot = Snapshot(model)
    tol = _tolerance(ratio, tolerance)
    whole_classes: list[type] = []
    aim = ratio  # the cost model's target: corrected once if the measured reduction overshoots it
    try:
        while True:
            try:
                graph, planner, before, after, achieved, padded = _prune(
                    model, x, input_size, ratio, aim, metric, tol, importance, floors, stages, protect,
                    keep_feature_width, calibration, allowed, whole_classes,
                )  # fmt: skip
                break
            except PruneTargetError as e:
                # The cost model counts convolutions and linear layers at their planned widths; where the cuts
                # remove more than it says (FLOPs of ops around the layers), plan once more for less.
                overshoot = getattr(e, "overshoot", None)
                if overshoot is None or aim != ratio or overshoot[0] >= overshoot[1]:
                    raise  # replanned once already, or the cost model did not undercount: the step is coarse
                snapshot.restore()
                estimated, measured_cut = overshoot
                aim = ratio * estimated / measured_cut
            except PruneError as e:
                # The pruned forward failed inside a module whose widths Torch-Pruning does not update, padding the
                # stream of an attention did not mend it: once per class, keep that class whole and retry.
                failed = _failing_class(model, getattr(e, "module_path", None))
                if failed is None or failed in whole_classes or len(whole_classes) >= RETRIES:
                    raise
                snapshot.restore()
                whole_classes.append(failed)
    except BaseException:
        snapshot.restore()
        raise
    report = PruneReport(
        metric=metric, ratio=ratio, achieved=achieved,
        params_before=before["params"], params_after=after["params"],
        flops_before=before["flops"], flops_after=after["flops"],
        channels_before=before["channels"], channels_after=after["channels"],
        layers=[LayerWidth(n, w, out_channels(model.get_submodule(n))) for n, w in planner.widths_before.items()
                if out_channels(model.get_submodule(n)) != w],
        alpha=importance.alpha, beta=importance.beta, gamma=importance.gamma, skipped=planner.skipped,
        input_size=input_size, seconds=time.perf_counter() - start, tolerance=tol,
        padded=[f"{c.__module__}.{c.__qualname__}" for c in padded],
    )  # fmt: skip
    history = plain_history(graph.pruning_history())
    return PruneResult(model=model, report=report, history=history)


def _tolerance(ratio: float, tolerance: float | None) -> float:
    """How far the removed fraction may miss ``ratio``: the caller's, or 2 points and at most 4% of what remains
    (so that ratio=0.999 keeps 0.1% +- 0.004%, not 1.7%)."""
    if tolerance is None:
        return min(TOLERANCE, 0.04 * (1 - ratio))
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance={tolerance!r} must be a fraction of the metric, strictly between 0 and 1 "
                         f"(the removed fraction may miss ratio by this much)")  # fmt: skip
    return float(tolerance)


def _failing_class(model: nn.Module, path: str | None) -> type | None:
    """The class of the attention around ``path`` (a module that keeps a head count), else of the innermost module
    around it that is not one of torch's own layers (a timm or torchvision block), or None."""
    attention = attention_around(model, path)
    if attention is not None:
        return attention
    while path:
        cls = type(model.get_submodule(path))
        if not cls.__module__.startswith("torch."):
            return cls
        path = path.rpartition(".")[0]
    return None


def _prune(
    model: nn.Module, x: Tensor, input_size: tuple[int, ...], ratio: float, aim: float, metric: str, tol: float,
    importance: COPImportance, floors: Floors, stages: Sequence[str | int] | None, protect: Sequence[str],
    keep_feature_width: bool, calibration: Iterable[Tensor] | None, allowed: list[str] | None,
    whole_classes: Sequence[type],
) -> tuple[Any, Planner, dict[str, int], dict[str, int], float, list[type]]:
    """One attempt: the graph, the plan (the cost model aiming at ``aim``), the removal and the checks against
    ``ratio`` (the caller restores the model on failure), and the attention classes whose stream was padded. An
    overshoot's PruneTargetError carries ``overshoot = (estimated, measured)`` reductions."""
    positions: dict[nn.Module, int] = {}
    measured: dict[str, Any] = {}
    input_shapes: dict[nn.Module, torch.Size] = {}  # of each attention, for padding its stream (.attention)
    padded: list[type] = []  # the attention classes whose stream is padded

    def measuring_forward(m: nn.Module, inputs: Tensor) -> Any:
        # Torch-Pruning's tracing forward measures the model too, one forward fewer. It runs with autograd
        # on, and so does the check after pruning: both count alike (see TotalFlopCounter).
        positions.clear()  # should a Torch-Pruning version run it twice, positions are counted once
        try:
            with recording_input_shapes(m, input_shapes):
                measured["before"], out = measure(m, inputs, positions)
        except Exception as e:
            try:
                with torch.no_grad():
                    m(inputs)
            except Exception:  # the model's own complaint, as find_stages and wrap_with_ptl report it
                raise InputSizeError(model_error_message(model, x, e)) from e
            raise  # it fails with autograd only: Torch-Pruning's graph cannot be built (a PruneError)
        measured["shapes"] = output_shapes(out)
        return out

    graph = build_graph(model, x, measuring_forward)
    before, reference_shapes = measured["before"], measured["shapes"]
    # Layers Torch-Pruning's graph does not reach are refused by the planner, unless they compute from constants
    # only (a position-bias MLP): those keep their widths, as nothing in the graph reads their channels.
    unreached = [m for m in positions if m not in graph.module2node]
    for m in constant_input_layers(model, x, unreached) if unreached else ():
        del positions[m]
    protection = protected_layers(model, input_size, graph, protect, keep_feature_width, list(positions),
                                  whole_classes)  # fmt: skip
    try:
        planner = Planner(model, graph, importance=importance, floors=floors, positions=positions,
                          protection=protection, allowed=allowed, calibration=calibration, tolerance=tol)  # fmt: skip
    except BConvError:
        raise
    except Exception as e:  # Torch-Pruning's groups of an op it mis-handles (seen: ZeroDivisionError, IndexError)
        raise PruneError(
            f"Torch-Pruning's dependency groups of {type(model).__name__} could not be read: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Pass stages=[...] to prune only some stages; the model "
            f"is unchanged."
        ) from e
    target = aim
    achieved = estimated = 0.0
    after = before
    asked = f"ratio={ratio} of {metric} (keep {1 - ratio:.4g} of it, +-{tol:.2g})"
    for _ in range(6):
        reached = planner.run(metric, target, before)
        reachable = planner.estimated_reduction(metric, before)
        if not reached and planner.applied_cuts == 0 and reachable < aim - tol:
            raise PruneTargetError(
                f"{asked} is not reachable: with every prunable layer at its floor "
                f"({_floors_text(floors)}{', stages=' + repr(list(stages)) if stages is not None else ''}) "
                f"about {reachable:.3f} can be removed (keep {1 - reachable:.4g}). Pass ratio<={reachable:.3f}, or "
                f"loosen the floors." + skipped_hint(planner.skipped)
            )
        estimated = planner.estimated_reduction(metric, before)
        planner.apply()
        with eval_mode(model), torch.enable_grad():
            after = check_forward_padded(model, x, reference_shapes, input_shapes, padded)
        achieved = 1 - after[metric] / before[metric]
        if achieved >= ratio - tol / 4 or not reached:
            break
        # The estimate counts convolutions and linear layers only: ask it for the remaining gap.
        target += ratio - achieved
    if achieved > ratio + tol:
        error = PruneTargetError(
            f"{asked} cannot be met: the smallest step that reaches it removes {achieved:.4g} (keeps "
            f"{1 - achieved:.4g}; one channel of this model is a large share of its {metric}). Pass "
            f"ratio={achieved:.4g}, a larger tolerance=, or another metric."
        )
        error.overshoot = (estimated, achieved)
        raise error
    if achieved < ratio - tol:
        raise PruneTargetError(
            f"{asked} is not reachable: pruning stopped at {achieved:.4g} (keeps {1 - achieved:.4g}) with every "
            f"prunable layer at its floor ({_floors_text(floors)}). Pass ratio<={achieved:.4g}, a larger "
            f"tolerance=, or loosen the floors." + skipped_hint(planner.skipped)
        )
    return graph, planner, before, after, achieved, padded


def _check_target(ratio: float, metric: str, prefer: str | None) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"ratio={ratio!r} must be a fraction of the metric to remove, strictly between 0 and 1")
    if metric not in _METRICS:
        raise ConfigError(f"metric={metric!r} is not one of {', '.join(map(repr, _METRICS))}")
    if prefer is not None and prefer not in PRESETS:
        raise ConfigError(f"prefer={prefer!r} is not one of {', '.join(map(repr, PRESETS))}")


def _check_grouped(importance: Any, floors: Any, prefer: str | None, deprecated: dict[str, Any]) -> None:
    """``importance`` and ``floors`` of the right types, each given once: as the object or as the deprecated
    keywords, never both."""
    unknown = [k for k in deprecated if k not in _IMPORTANCE_KEYWORDS + _FLOORS_KEYWORDS]
    if unknown:
        raise TypeError(f"cop_prune() got an unexpected keyword argument {unknown[0]!r}")
    if importance is not None and not isinstance(importance, COPImportance):
        raise TypeError(f"importance={importance!r} must be a bconv.prune.COPImportance (or None: the preset's)")
    if floors is not None and not isinstance(floors, Floors):
        raise TypeError(f"floors={floors!r} must be a bconv.prune.Floors (or None: Floors())")
    for name, given, keywords, spelling in (
        ("importance", importance, _IMPORTANCE_KEYWORDS, "COPImportance"),
        ("floors", floors, _FLOORS_KEYWORDS, "Floors"),
    ):
        both = [k for k in keywords if k in deprecated]
        if given is not None and both:
            raise ConfigError(
                f"cop_prune got both {name}= and {', '.join(f'{k}=' for k in both)}, which {name}= already sets: "
                f"pass {name}={spelling}({', '.join(f'{k}=...' for k in both)}, ...) only"
            )
    if importance is not None and prefer is not None:
        raise ConfigError(
            f"cop_prune got both importance= and prefer={prefer!r}, which chooses the importance's weights: pass "
            f"importance=COPImportance(*PRESETS[{prefer!r}], ...) only, or prefer= only"
        )


def _spelled_importance(deprecated: dict[str, Any], prefer: str | None) -> tuple[list[Any], dict[str, Any]]:
    """The weights ``(alpha, beta, gamma)`` and the options of the :class:`COPImportance` that ``prefer`` and the
    deprecated keywords spell (each weight given, and not None, overrides the preset's)."""
    preset = PRESETS[prefer or "balanced"]
    weights = [p if deprecated.get(w) is None else deprecated[w] for w, p in zip(("alpha", "beta", "gamma"), preset)]
    return weights, {k: deprecated[k] for k in ("top_k", "similarity", "normalize") if k in deprecated}


def _warn_deprecated(deprecated: dict[str, Any], prefer: str | None, input_size: tuple[int, ...]) -> None:
    """One DeprecationWarning for each deprecated keyword, naming its new spelling and this call's equivalent."""
    if not deprecated:
        return
    weights, given = _spelled_importance(deprecated, prefer)
    options = [f"{k}={v!r}" for k, v in given.items()]
    if weights[1] != 0:  # COPImportance needs an example input to weigh FLOPs (cop_prune does not read it)
        options.append(f"example_inputs=torch.zeros(1, {', '.join(map(str, input_size))})")
    same_importance = f"importance=COPImportance({', '.join([*map(repr, weights), *options])})"
    same_floors = f"floors=Floors({', '.join(f'{k}={deprecated[k]!r}' for k in _FLOORS_KEYWORDS if k in deprecated)})"
    for k in deprecated:
        new, same = ("importance=COPImportance", same_importance) if k in _IMPORTANCE_KEYWORDS else \
            ("floors=Floors", same_floors)
        warnings.warn(
            f"cop_prune({k}=...) is deprecated and will be removed in bconv {REMOVED_IN}: use "
            f"cop_prune({new}({k}=...)); the same as this call: cop_prune(..., {same})",
            DeprecationWarning,
            stacklevel=3,
        )


def _floors_text(floors: Floors) -> str:
    return f"min_channels={floors.min_channels}, max_fraction={floors.max_fraction}, round_to={floors.round_to}"


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
