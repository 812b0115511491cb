"""Cost of a BConv-Cell against the bare convolution it wraps (forward + backward).

For each configuration the script times one training step (forward, ``sum()``,
backward, with gradients for the input too, as a cell inside a PTL ladder needs) of

* ``conv``: ``nn.Conv2d(C, 4*C, 3, stride, padding=1, bias=False)``, the gate conv;
* ``v1``:   ``BConvCell(C, C, stride)``, that conv plus the gating and the state;
* ``v2``:   ``BConvCellV2(C, C, stride)``, whose gate conv reads ``2*C`` channels and
  which adds a transpose conv, so it costs more than twice ``conv`` by construction.

The three are measured side by side, interleaved in one process (the order rotates
every repeat), after warm-up steps that also give the cells a history. The script
prints the median time of each, the ratios to ``conv`` (paired within a repeat), and
the command that reproduces the run. Every number it prints was measured in that run.

Usage::

    python -m benchmarks.cells                      # the two default configurations
    python -m benchmarks.cells --channels 64 --size 56 --batch 32 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from torch import nn

from bconv.cells import BConvCell, BConvCellV2

from benchmarks.common import command, ratios, seeded, side_by_side

# (channels, size, stride, batch): a ResNet-50 layer1-sized cell (64 ch, 56x56) and a
# strided one between stages (128 ch, 28x28 -> 14x14); batch 16 keeps the run
# under a minute on two CPU cores (pass --batch 32 for a larger one).
DEFAULT_CONFIGS = [(64, 56, 1, 16), (128, 28, 2, 16)]


def bench(
    channels: int, size: int, stride: int, batch: int, repeats: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Seconds per forward+backward step of each model, one entry per repeat."""
    seeded(0)
    models = {
        "conv": nn.Conv2d(channels, 4 * channels, 3, stride, padding=1, bias=False),
        "v1": BConvCell(channels, channels, stride),
        "v2": BConvCellV2(channels, channels, stride),
    }
    models = {name: m.to(device) for name, m in models.items()}
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)

    def clear(name: str, *_) -> None:  # untimed, after each step
        models[name].zero_grad(set_to_none=True)
        x.grad = None

    steps = {name: (lambda m=m: m(x).sum().backward()) for name, m in models.items()}
    return side_by_side(steps, repeats, warmup=warmup, order="rotate", device=device, after=clear)["wall"]


def _ratio(num: list[float], den: list[float]) -> str:
    # Paired within a repeat, so that load drifting during the run cancels out.
    r = ratios(num, den)
    return f"{statistics.median(r):.2f} [{min(r):.2f}-{max(r):.2f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, help="in = out channels of the cell")
    parser.add_argument("--size", type=int, help="input height = width")
    parser.add_argument("--stride", type=int, help="stride of the cell")
    parser.add_argument("--batch", type=int, help="batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    given = (args.channels, args.size, args.stride, args.batch)
    if any(v is not None for v in given):
        base = DEFAULT_CONFIGS[0]
        configs = [tuple(b if v is None else v for v, b in zip(given, base))]
    else:
        configs = DEFAULT_CONFIGS

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, device {args.device}, float32, train mode")
    print(f"median of {args.repeats} forward+backward steps, {args.warmup} warm-up, interleaved")
    print("ratios: median over repeats of the ratio within one repeat [min-max]")
    header = (
        f"{'C':>4} {'HxW':>7} {'s':>2} {'B':>3} | {'conv ms':>8} {'v1 ms':>8} {'v2 ms':>8} | "
        f"{'v1/conv':>16} {'v2/conv':>16}"
    )
    print(header)
    print("-" * len(header))
    for channels, size, stride, batch in configs:
        t = bench(channels, size, stride, batch, args.repeats, args.warmup, args.device)
        ms = {name: statistics.median(v) * 1e3 for name, v in t.items()}
        print(
            f"{channels:>4} {f'{size}x{size}':>7} {stride:>2} {batch:>3} | "
            f"{ms['conv']:>8.1f} {ms['v1']:>8.1f} {ms['v2']:>8.1f} | "
            f"{_ratio(t['v1'], t['conv']):>16} {_ratio(t['v2'], t['conv']):>16}"
        )
    print("reproduce: " + command("cells", argv))


if __name__ == "__main__":
    main()
