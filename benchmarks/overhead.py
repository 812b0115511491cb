"""What PTL costs: parameters, FLOPs, train-step time and activation memory, with and without the ladder.

For each backbone at default widths (``wrap_with_ptl(model)``, every stage paired, cell v1):

* parameters and forward FLOPs (batch 1, ``benchmarks.common.flops``: torch's FLOP counter) of the plain and
  the wrapped model;
* train-step time (forward, backward, SGD step, ``detach_state``) of a plain copy and a wrapped copy,
  interleaved step by step in one process, median over repeats after warm-up; the ratio wrapped/plain
  is the figure to read (absolute times on a shared 2-core machine are noise);
* memory of a train step: on CUDA the peak allocated bytes; on CPU the bytes of the tensors autograd
  saves for backward (measured with ``torch.autograd.graph.saved_tensors_hooks``), which is what a
  training step's peak grows with.

The bar: the time ratio stays within 1.15x of the FLOP ratio (the ladder's work runs as efficiently as
the backbone's own).

The cost of the ladder's hooks and of its checks (every paired stage ran, once, in order; checkpointing)
is measured against a hand-wired PTL ResNet-50 (``benchmarks.common.HandWiredPTLResNet``): the same network
and the same ladder modules (copied from the wrapped model), called from an explicit forward with no hooks.
Its train steps are interleaved with the wrapped model's (in alternating order, ABBA), and the figure is the
median of the per-pair time ratios wrapped/hand-wired. Bar: <= 1.02.

Writes ``benchmarks/results/overhead.md`` and ``.json``. Reproduce::

    python -m benchmarks.overhead                          # the paper's backbones + EfficientNet-B0, ConvNeXt-T
    python -m benchmarks.overhead --models torchvision:resnet50 --batch 16 --repeats 9 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from bconv import wrap_with_ptl
from bconv._zoo import build, resolve

from benchmarks.common import (RESULTS, HandWiredPTLResNet, command, flops, input_size_of, params, ratios, run_record,
                               seeded, side_by_side, write_results)  # fmt: skip

MODELS = ["torchvision:resnet50", "torchvision:densenet161", "torchvision:efficientnet_b0", "torchvision:convnext_tiny"]


def _step(model, opt, x, y) -> None:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if hasattr(model, "detach_state"):
        model.detach_state()


def _memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak CUDA bytes of one step, or on CPU the bytes autograd saves for backward."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.device)
        saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(saved.values())


def _train_steps(models: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """Name -> one train step of that model on ``(x, y)`` (cross-entropy, SGD lr 1e-3 momentum 0.9, its own optimizer)."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    return {k: functools.partial(_step, m, opts[k], x, y) for k, m in models.items()}


def measure(spec_name: str, batch: int, repeats: int, device: torch.device) -> dict:
    spec = resolve(spec_name)
    seeded(0)
    plain = build(spec).to(device)
    input_size = input_size_of(spec, plain)
    wrapped = wrap_with_ptl(copy.deepcopy(plain), input_size=input_size)
    x = torch.randn(batch, *input_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    row = {
        "model": str(spec),
        "input_size": list(input_size),
        "batch": batch,
        "params_plain": params(plain),
        "params_ptl": params(wrapped),
        "flops_plain": flops(plain, x),
        "flops_ptl": flops(wrapped, x),
    }
    models = {"plain": plain.train(), "ptl": wrapped.train()}
    steps = _train_steps(models, x, y)
    for k, step in steps.items():  # warm-up, and memory
        step()
        row[f"memory_{k}"] = _memory(step, device)
    times = side_by_side(steps, repeats, device=device)["wall"]
    paired = ratios(times["ptl"], times["plain"])
    row.update(
        step_s_plain=statistics.median(times["plain"]),
        step_s_ptl=statistics.median(times["ptl"]),
        time_ratio=statistics.median(paired),
        time_ratio_min=min(paired),
        time_ratio_max=max(paired),
    )
    row["flop_ratio"] = row["flops_ptl"] / row["flops_plain"]
    row["param_ratio"] = row["params_ptl"] / row["params_plain"]
    row["memory_ratio"] = row["memory_ptl"] / max(row["memory_plain"], 1)
    row["within_bar"] = row["time_ratio"] <= 1.15 * row["flop_ratio"]
    return row


def measure_hand_wired(batch: int, repeats: int, device: torch.device, size: int = 224,
                       spec_name: str = "torchvision:resnet50") -> dict:  # fmt: skip
    """Train-step time of wrap_with_ptl(resnet50) over the same PTL ResNet-50 wired by hand
    (:class:`benchmarks.common.HandWiredPTLResNet`; ``spec_name``: another torchvision ResNet)."""
    seeded(0)
    wrapped = wrap_with_ptl(build(resolve(spec_name)), input_size=(3, size, size))
    wrapped.to(device)
    hand = HandWiredPTLResNet(wrapped).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad():  # the same function: the comparison is of wiring alone
        torch.testing.assert_close(wrapped.eval()(x), hand.eval()(x))
    steps = _train_steps({"wrapped": wrapped.train(), "hand": hand.train()}, x, y)
    # On a shared CPU the wall time of a step mostly measures the neighbours; the process's CPU time
    # (time.process_time, all of its threads) measures the work itself. Both are recorded; on CUDA, wall.
    # One warm-up step each, then pairs in alternating order (ABBA).
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = side_by_side(steps, repeats, warmup=1, order="alternate", device=device, clocks=clocks)
    main = "cpu" if device.type == "cpu" else "wall"
    row = {"model": spec_name, "input_size": [3, size, size], "batch": batch, "repeats": repeats, "clock": main}
    for c in clocks:
        paired = ratios(times[c]["wrapped"], times[c]["hand"])
        row.update(
            {
                f"step_s_wrapped_{c}": statistics.median(times[c]["wrapped"]),
                f"step_s_hand_{c}": statistics.median(times[c]["hand"]),
                f"time_ratio_{c}": statistics.median(paired),
                f"time_ratio_{c}_min": min(paired),
                f"time_ratio_{c}_max": max(paired),
                f"ratios_{c}": paired,
            }
        )
    row["time_ratio"] = row[f"time_ratio_{main}"]
    row["within_bar"] = row["time_ratio"] <= 1.02
    return row


def write(rows: list[dict], args: argparse.Namespace, device: torch.device, seconds: float, run: dict,
          hand: dict | None = None) -> None:  # fmt: skip
    memory = "peak CUDA MB of a step" if device.type == "cuda" else "MB saved for backward"
    lines = [
        "# PTL overhead at default widths (every stage paired, cell v1)",
        "",
        f"Made by `{run['command']}` in {seconds:.0f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Time ratio: wrapped/plain train step, interleaved, median of "
        f"{args.repeats} (min-max). Bar: time ratio <= 1.15 x FLOP ratio.",
        "",
        f"| model | params | FLOPs (fwd, batch 1) | train step s (plain / PTL) | time ratio | FLOP ratio | bar | {memory} (plain / PTL) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_plain'] / 1e6:.1f}M -> {r['params_ptl'] / 1e6:.1f}M (+{100 * (r['param_ratio'] - 1):.0f}%) "
            f"| {r['flops_plain'] / 1e9:.2f}G -> {r['flops_ptl'] / 1e9:.2f}G (+{100 * (r['flop_ratio'] - 1):.0f}%) "
            f"| {r['step_s_plain']:.3f} / {r['step_s_ptl']:.3f} "
            f"| {r['time_ratio']:.2f} ({r['time_ratio_min']:.2f}-{r['time_ratio_max']:.2f}) | {r['flop_ratio']:.2f} "
            f"| {'within' if r['within_bar'] else 'OVER'} "
            f"| {r['memory_plain'] / 2**20:.0f} / {r['memory_ptl'] / 2**20:.0f} (x{r['memory_ratio']:.2f}) |"
        )
    if hand is not None:
        lines += [
            "",
            "## The ladder's hooks and checks against a hand-wired PTL ResNet-50",
            "",
            f"The same network and ladder modules, called from an explicit forward without hooks; train steps "
            f"interleaved in alternating order, batch {hand['batch']} at {hand['input_size'][1]}x{hand['input_size'][2]}, "
            f"median of {hand['repeats']} per-pair ratios (min-max), by the process's CPU time and by wall time. "
            f"The bar (<= 1.02) is read on the {hand['clock']} clock"
            + (": on a shared CPU, wall time mostly measures the neighbours." if hand["clock"] == "cpu" else "."),
            "",
            "| model | clock | train step s (hand-wired / wrapped) | time ratio wrapped / hand-wired | bar |",
            "|---|---|---|---|---|",
        ]
        for c in ("cpu", "wall"):
            lines.append(
                f"| {hand['model']} | {c} | {hand[f'step_s_hand_{c}']:.3f} / {hand[f'step_s_wrapped_{c}']:.3f} "
                f"| {hand[f'time_ratio_{c}']:.3f} ({hand[f'time_ratio_{c}_min']:.3f}-{hand[f'time_ratio_{c}_max']:.3f}) "
                f"| {('within' if hand[f'time_ratio_{c}'] <= 1.02 else 'OVER') if c == hand['clock'] else '-'} |"
            )
    write_results(args.out, {"run": run, "device": device.type, "rows": rows, "hand_wired": hand}, lines)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hand-wired-repeats", type=int, default=15, help="pairs of hand-wired/wrapped steps (0: skip)")
    parser.add_argument("--hand-wired-batch", type=int, default=None, help="default: --batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = run_record(command("overhead", argv))
    start = time.perf_counter()
    rows = []
    for name in args.models:
        rows.append(measure(name, args.batch, args.repeats, device))
        print(f"{name}: time ratio {rows[-1]['time_ratio']:.2f}, FLOP ratio {rows[-1]['flop_ratio']:.2f}", flush=True)
    hand = None
    if args.hand_wired_repeats:
        hand = measure_hand_wired(args.hand_wired_batch or args.batch, args.hand_wired_repeats, device)
        print(f"hand-wired PTL ResNet-50: time ratio wrapped/hand-wired {hand['time_ratio']:.3f}", flush=True)
    write(rows, args, device, time.perf_counter() - start, run, hand)


if __name__ == "__main__":
    main()
