"""What :func:`~bconv.prune.cop_prune` returns and raises: the result, its report and the errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from ..errors import PruneError, PruneTargetError  # defined with every other error; importable from here too

__all__ = [
    "PruneError", "PruneTargetError", "LayerWidth", "PruneReport", "PruneResult", "format_report", "skipped_hint",
]  # fmt: skip


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
        tolerance: how far ``achieved`` was allowed to miss ``ratio``.
        padded: the attention classes (module.qualname) whose forward reads its width from its input and whose
            pruned stream is padded back to it with zeros (forward pre-hooks; docs/pruning-coverage.md).
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
    tolerance: float = 0.02
    padded: list[str] = field(default_factory=list)


@dataclass
class PruneResult:
    """``model`` (the same object, pruned in place), its ``report`` and the pruning ``history``.

    ``history`` is Torch-Pruning's ``DependencyGraph.pruning_history()``: ``[root layer, is_output_channels,
    channel indices at that moment]``; :func:`save_pruned` stores it, :func:`load_pruned` replays it.
    """

    model: nn.Module
    report: PruneReport
    history: list[list[Any]] = field(repr=False)


def format_report(report: PruneReport, stages: Sequence[Any] | None = None) -> str:
    """The report as text: per stage (when ``stages`` from :func:`bconv.anatomy` are given) the
    summed widths of its pruned layers before and after, then params and FLOPs before and after.

    Example::

        >>> print(format_report(cop_prune(model).report, bconv.anatomy(model).stages))
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
    lines.append(f"target: -{100 * report.ratio:.4g}% {report.metric} (keep {100 * (1 - report.ratio):.4g}% "
                 f"+-{100 * report.tolerance:.2g}), reached -{100 * report.achieved:.4g}% "
                 f"(keeps {100 * (1 - report.achieved):.4g}%), "
                 f"(alpha, beta, gamma) = ({report.alpha:g}, {report.beta:g}, {report.gamma:g}), "
                 f"{len(report.layers)} layers narrowed in {report.seconds:.1f} s")  # fmt: skip
    if report.padded:
        lines.append(f"stream padded back to the heads' width in: {', '.join(report.padded)}")
    return "\n".join(lines)


def skipped_hint(skipped: list[tuple[str, str]]) -> str:
    """A sentence for an error message: how many channel groups were not prunable, for each reason in ``skipped``
    (``(root layer, reason)`` pairs, as :attr:`PruneReport.skipped`); empty when there are none."""
    if not skipped:
        return ""
    reasons: dict[str, int] = {}
    for _, why in skipped:
        reasons[why] = reasons.get(why, 0) + 1
    return " Not prunable: " + "; ".join(f"{n} channel group(s) {why}" for why, n in reasons.items()) + "."
