"""Stage agreement: do the stages fx finds output the tensors that a model's ``feature_info`` taps?

Shared by ``benchmarks.feature_info_agreement`` (one model per timm family) and ``benchmarks.zoo`` (every
wrapped model whose stages came from ``feature_info``). For every feature_info stage fx does not match,
:func:`diagnose` says why, measured against the stage rule itself (see ``benchmarks/feature_info_agreement.py``).
"""

from __future__ import annotations

import math

import torch

from bconv.surgery import propagate_shapes, trace
from bconv.surgery import group_modules, main_chain, stage_runs

from benchmarks.common import first_line

__all__ = ["agreement", "diagnose"]


def _pow2(r: int) -> int:
    return 2 ** round(math.log2(r))


def _input(input_size: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _capture(model: torch.nn.Module, names: set[str], input_size: tuple[int, ...]) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out.detach().clone()))
        for n in names
    ]
    try:
        with torch.no_grad():
            model(_input(input_size))
    finally:
        for h in handles:
            h.remove()
    return outputs


class _Values(torch.fx.Interpreter):
    """Runs a traced graph, keeping a copy of the value of some nodes (copied: later in-place ops)."""

    def __init__(self, module: torch.fx.GraphModule, keep: set):
        super().__init__(module)
        self.keep = keep
        self.values: dict = {}

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        if n in self.keep and isinstance(out, torch.Tensor):
            self.values[n] = out.detach().clone()
        return out


def diagnose(model: torch.nn.Module, input_size: tuple[int, ...], unmatched: list, taps: dict[str, torch.Tensor]) -> list[list]:
    """``[reduction, feature_info module, kind, detail]`` for each unmatched feature_info stage (see the module doc).

    ``taps`` holds the outputs of their modules, captured by :func:`_capture` on the same input.
    """
    traced = trace(model)
    x = _input(input_size)
    propagate_shapes(traced, model, input_size)
    chain = main_chain(traced)
    runs = stage_runs(traced, chain)
    recorder = _Values(traced.graph_module, set(chain))
    with torch.no_grad():
        recorder.run(x)
    spans = {p: (calls[0][0], calls[-1][1]) for p, calls in traced.calls.items() if p}
    out = []
    for s in unmatched:
        found = [n for n in chain if n in recorder.values and _same(recorder.values[n], taps[s.name])]
        last = next((nodes[-1] for r, nodes in reversed(runs) if r == _pow2(s.reduction)), None)
        if not found:
            out.append([s.reduction, s.name, "not-a-dominator", "no tensor that every path passes through has its values"])
            continue
        tap = found[-1]
        if last is None or traced.index(tap) > traced.index(last):
            out.append([s.reduction, s.name, "rule-compatible", "a dominator past fx's last one at this reduction"])
        elif last in found:
            out.append([s.reduction, s.name, "rule-compatible", "the last dominator at its reduction"])
        else:
            after = group_modules(spans, [traced.index(tap), traced.index(last)])[1]
            shown = ", ".join(after[:3]) + (f" and {len(after) - 3} more" if len(after) > 3 else "")
            out.append([s.reduction, s.name, "not-last", f"followed at the same resolution by {shown or 'unnamed ops'}"])
    return out


def agreement(model: torch.nn.Module, input_size: tuple[int, ...], fx_stages: list, fi_stages: list) -> dict:
    """``matched`` ("k/n"), ``agree`` and ``mismatches`` of the fx stages against the feature_info stages.

    A feature_info stage is matched when the fx stage at the same reduction outputs the same tensor
    (both captured by forward hooks in one pass of ``model``, which should be in eval mode).
    """
    # feature_info may give a patch size (7, 14) as reduction: compare at the nearest power of two.
    by_reduction = {s.reduction: s for s in fx_stages}
    names = {s.name for s in fi_stages} | {s.name for s in fx_stages}
    out = _capture(model, names, input_size)
    matched = []
    for s in fi_stages:
        f = by_reduction.get(_pow2(s.reduction))
        matched.append(f is not None and _same(out[f.name], out[s.name]))
    unmatched = [s for s, m in zip(fi_stages, matched) if not m]
    row = {
        "matched": f"{sum(matched)}/{len(matched)}",
        "agree": all(matched),
        "mismatches": [
            [s.reduction, s.name, by_reduction[_pow2(s.reduction)].name if _pow2(s.reduction) in by_reduction else None]
            for s in unmatched
        ],
    }
    if unmatched:
        try:
            row["why"] = diagnose(model, input_size, unmatched, out)
        except Exception as e:  # the diagnosis reports, it does not stop the benchmark
            row["why"] = [[None, None, "unknown", first_line(e, 200)]]
    return row
