"""What does ``find_stages`` cost beside its inherent work: one fx trace plus one shape propagation?

Times, interleaved in one process (median over repeats):

* baseline: ``torch.fx.symbolic_trace(model)`` then ``ShapeProp(gm).propagate(x)``, the least any
  fx-based stage finder must do;
* ``find_stages(model, source="fx")`` (trace with module scopes, shape propagation, dominators,
  module groups) and ``find_stages(model)`` (auto).

Writes ``benchmarks/results/find_stages_speed.md``. Reproduce::

    python benchmarks/find_stages_speed.py                      # ResNet-50 at 3x224x224
    python benchmarks/find_stages_speed.py --model torchvision:densenet121 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.fx.passes.shape_prop import ShapeProp

from bconv import find_stages
from bconv._zoo import build, resolve, torchvision_input_size

RESULTS = Path(__file__).parent / "results"


def _baseline(model: torch.nn.Module, x: torch.Tensor) -> None:
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "find_stages_speed.md")
    args = parser.parse_args()

    spec = resolve(args.model)
    model = build(spec).eval()
    input_size = torchvision_input_size(spec.name) if spec.zoo == "torchvision" else tuple(model.pretrained_cfg["input_size"])
    x = torch.randn(1, *input_size)
    runs = {
        "fx trace + shape propagation (baseline)": lambda: _baseline(model, x),
        'find_stages(source="fx")': lambda: find_stages(model, input_size, source="fx"),
        "find_stages() (auto)": lambda: find_stages(model, input_size),
    }
    for run in runs.values():  # warm-up: imports, allocator, first-call caches
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["fx trace + shape propagation (baseline)"])
    lines = [
        f"# find_stages cost on {spec} at {'x'.join(map(str, input_size))}",
        "",
        f"Made by `python benchmarks/find_stages_speed.py --model {spec} --repeats {args.repeats}`;",
        f"runs interleaved in one process, median of {args.repeats} after a warm-up; torch {torch.__version__},",
        f"{torch.get_num_threads()} threads.",
        "",
        "| run | median s | min s | max s | / baseline |",
        "|---|---|---|---|---|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.3f} | {min(ts):.3f} | {max(ts):.3f} | {med / base:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
