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
import importlib
import json
import statistics
from pathlib import Path

import torch

from bconv import unwrap_ptl, wrap_with_ptl
from bconv.surgery import find_stages
from bconv._zoo import build, resolve

# The module, whose cache each timed discovery clears (``bconv.surgery.anatomy`` is the function of that name).
anatomy_module = importlib.import_module("bconv.surgery.anatomy")

from benchmarks.common import RESULTS, command, run_record, side_by_side, write_results

DEFAULT = ["torchvision:resnet50@224", "torchvision:resnet50@600", "torchvision:regnet_y_32gf@600", "torchvision:efficientnet_b7@600"]
_FX = 'find_stages(source="fx")'


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

    def before(name: str) -> None:
        if name == "wrap_with_ptl":
            anatomy_module._CACHE.clear()

    def after(name: str, wrapped, seconds: float) -> None:
        if name == "wrap_with_ptl":
            unwrap_ptl(wrapped)  # outside the timing

    steps = {"forward": forward, "find_stages": discover("auto"), _FX: discover("fx"),
             "wrap_with_ptl": lambda: wrap_with_ptl(model, input_size=size)}  # fmt: skip
    # A warm-up (imports, allocator, first-call caches), then the steps interleaved.
    times = side_by_side(steps, repeats, warmup=1, before=before, after=after)["wall"]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=DEFAULT, help="zoo names with @pixels (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "find_stages_speed", help="output path without suffix")
    args = parser.parse_args(argv)

    run = run_record(command("find_stages_speed", argv))
    rows = []
    for spec in args.models:
        rows.append(measure(spec, args.repeats))
        print(json.dumps(rows[-1]["ratio_to_forward"]), spec, flush=True)
    lines = [
        "# Discovery cost next to one real forward",
        "",
        f"Made by `{run['command']}`; runs interleaved in one process, median of {args.repeats} after a warm-up;",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. The anatomy cache is cleared before every",
        "timed discovery. Ratios are to one real batch-1 eval forward of the same model at the same size.",
        "",
        "| model | input | shapes from | forward s | find_stages s (ratio) | find_stages fx s (ratio) | wrap_with_ptl s (ratio) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, q = r["median_s"], r["ratio_to_forward"]
        size = "x".join(map(str, r["input_size"][1:]))
        lines.append(
            f"| {r['model']} | {size} | {r['shapes_from']} | {m['forward']:.3f} | "
            f"{m['find_stages']:.3f} ({q['find_stages']:.3f}) | {m[_FX]:.3f} ({q[_FX]:.3f}) | "
            f"{m['wrap_with_ptl']:.3f} ({q['wrap_with_ptl']:.3f}) |"
        )
    write_results(args.out, {"run": run, "rows": rows}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
