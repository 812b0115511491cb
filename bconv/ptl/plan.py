"""What PTL adds to a network: per paired stage, the cells and fusion, their shapes, parameters and FLOPs.

FLOPs come from torch's own counter (``torch.utils.flop_counter.FlopCounterMode``, total only), which counts
convolutions and matrix products (the gates' element-wise work is not counted, as in most FLOP
tables). Each ladder module is counted on the input it received in one eval forward at ``input_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..surgery import TotalFlopCounter, dummy_input, eval_mode
from .wrapper import PTLModel

__all__ = ["PlanRow", "Plan", "ptl_plan"]


@dataclass(frozen=True)
class PlanRow:
    stage: str
    cells: str  # e.g. "v1 3->8 s2"
    cell_output: tuple[int, ...]
    fusion: str  # e.g. "1x1 72->8" or "final 1x1 2304->2048"
    params: int
    flops: int


@dataclass(frozen=True)
class Plan:
    rows: tuple[PlanRow, ...]
    base_params: int
    base_flops: int

    @property
    def added_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def added_flops(self) -> int:
        return sum(r.flops for r in self.rows)


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _flops(module: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    with TotalFlopCounter() as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def ptl_plan(wrapped: PTLModel, input_size: Sequence[int]) -> Plan:
    """Count what the ladder of ``wrapped`` adds, per paired stage, at ``input_size`` (batch 1).

    The model's train/eval flags and the cells' state are left as they were.
    """
    ladder = wrapped.ptl
    parts = [*ladder.cells, *ladder.fuses, ladder.final_fuse]
    seen: dict[int, tuple[torch.Tensor, ...]] = {}
    handles = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(id(m), a)) for m in parts]
    outputs: dict[int, torch.Tensor] = {}
    handles += [c.register_forward_hook(lambda m, a, o: outputs.__setitem__(id(m), o)) for c in ladder.cells]
    x = dummy_input(wrapped.model, input_size)
    try:
        with eval_mode(wrapped), torch.no_grad():
            with TotalFlopCounter() as counter:
                wrapped(x)
            total = int(counter.get_total_flops())
            flops = {id(m): _flops(m, seen[id(m)]) for m in parts}
    finally:
        for h in handles:
            h.remove()

    rows = []
    n = len(ladder.cells)
    for i, (name, chain) in enumerate(zip(wrapped.adapter.stage_names, ladder.cells)):
        first, last = chain[0], chain[-1]
        version = "v2" if hasattr(first, "recover") else "v1"
        widths = "->".join(map(str, dict.fromkeys([first.in_channels, *(c.out_channels for c in chain)])))
        tapered = len({c.out_channels for c in chain}) > 1  # a token backbone's first chain widens as it goes
        cells = f"{version} {widths if tapered else f'{first.in_channels}->{last.out_channels}'} " + "x".join(
            f"s{c.stride}" for c in chain
        )
        fuse = ladder.fuses[i] if i < n - 1 else ladder.final_fuse
        if i < n - 1:
            fusion = f"1x1+BN+ReLU {fuse.in_channels}->{fuse.out_channels}"
        elif fuse.residual:
            fusion = f"x + 1x1 {fuse.cell_channels}->{fuse.out_channels}"
        else:
            fusion = f"final 1x1+BN+ReLU {fuse.in_channels}->{fuse.out_channels}"
        rows.append(
            PlanRow(
                stage=name,
                cells=cells,
                cell_output=tuple(outputs[id(chain)].shape[1:]),
                fusion=fusion,
                params=_params(chain, fuse),
                flops=flops[id(chain)] + flops[id(fuse)],
            )
        )
    added_flops = sum(r.flops for r in rows)
    return Plan(tuple(rows), _params(wrapped.model), total - added_flops)
