"""What does discovery cost next to one real forward of the model?

Stage discovery traces the model with torch.fx and propagates shapes on meta tensors at two input
sizes, so no real convolution runs: its cost must not grow with the model's FLOPs or the input
resolution. For each model, timed interleaved in one process (median over repeats, after a warm-up):

* one real batch-1 eval forward under ``torch.no_grad()`` (the reference);
* ``find_stages(model)`` (auto) and ``find_stages(model, source="fx")``;
* ``wrap_with_ptl(model)`` (discovery, building and initialising the ladder, the wiring check),
  followed by ``unwrap_ptl`` outside the timing.

bconv caches a model's anatomy; the cache is cleared before every timed discovery, so each one
measures the whole work. Writes ``benchmarks/results/find_stages_speed.{md,json}``. Reproduce::

    python -m benchmarks.find_stages_speed          # ResNet-50 at 224 and 600, RegNetY-32GF and EfficientNet-B7 at 600
    python -m benchmarks.find_stages_speed --models torchvision:resnet50@224 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bconv import unwrap_ptl, wrap_with_ptl
from bconv.surgery import find_stages
from bconv._zoo import build, resolve
from bconv.surgery import anatomy as anatomy_module

from benchmarks.common import RESULTS, command as run_command

DEFAULT = ["torchvision:resnet50@224", "torchvision:resnet50@600", "torchvision:regnet_y_32gf@600", "torchvision:efficientnet_b7@600"]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(spec_at: str, repeats: int) -> dict:
    spec_text, _, px = spec_at.partition("@")
    spec = resolve(spec_text)
    model = build(spec).eval()
    size = (3, int(px or 224), int(px or 224))
    x = torch.randn(1, *size)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def discover(source: str):
        def run() -> None:
            anatomy_module._CACHE.clear()
            find_stages(model, size, source=source)

        return run

    def wrap() -> float:
        anatomy_module._CACHE.clear()
        start = time.perf_counter()
        wrapped = wrap_with_ptl(model, input_size=size)
        elapsed = time.perf_counter() - start
        unwrap_ptl(wrapped)
        return elapsed

    runs = {"forward": forward, "find_stages": discover("auto"), 'find_stages(source="fx")': discover("fx")}
    for run in runs.values():  # warm-up: imports, allocator, first-call caches
        run()
    wrap()
    times: dict[str, list[float]] = {name: [] for name in [*runs, "wrap_with_ptl"]}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_timed(run))
        times["wrap_with_ptl"].append(wrap())
    shapes_from = anatomy_module.anatomy(model, size).shapes_from
    base = statistics.median(times["forward"])
    return {
        "model": str(spec),
        "input_size": list(size),
        "shapes_from": shapes_from,
        "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "ratio_to_forward": {k: round(statistics.median(v) / base, 3) for k, v in times.items()},
        "all_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=DEFAULT, help="zoo names with @pixels (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "find_stages_speed", help="output path without suffix")
    args = parser.parse_args()

    rows = []
    for spec in args.models:
        rows.append(measure(spec, args.repeats))
        print(json.dumps(rows[-1]["ratio_to_forward"]), spec, flush=True)
    command = run_command("find_stages_speed", None)
    lines = [
        "# Discovery cost next to one real forward",
        "",
        f"Made by `{command.strip()}`; runs interleaved in one process, median of {args.repeats} after a warm-up;",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. The anatomy cache is cleared before every",
        "timed discovery. Ratios are to one real batch-1 eval forward of the same model at the same size.",
        "",
        "| model | input | shapes from | forward s | find_stages s (ratio) | find_stages fx s (ratio) | wrap_with_ptl s (ratio) |",
        "|---|---|---|---|---|---|---|",
    ]
    fx = 'find_stages(source="fx")'
    for r in rows:
        m, q = r["median_s"], r["ratio_to_forward"]
        size = "x".join(map(str, r["input_size"][1:]))
        lines.append(
            f"| {r['model']} | {size} | {r['shapes_from']} | {m['forward']:.3f} | "
            f"{m['find_stages']:.3f} ({q['find_stages']:.3f}) | {m[fx]:.3f} ({q[fx]:.3f}) | "
            f"{m['wrap_with_ptl']:.3f} ({q['wrap_with_ptl']:.3f}) |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
