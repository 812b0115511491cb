"""What PTL costs: parameters, FLOPs, train-step time and activation memory, with and without the ladder.

For each backbone at default widths (``wrap_with_ptl(model)``, every stage paired, cell v1):

* parameters and forward FLOPs (batch 1, ``benchmarks.common.flops``: torch's FLOP counter) of the plain and
  the wrapped model;
* train-step time (forward, backward, SGD step, ``detach_state``) of a plain copy, a wrapped copy and a wrapped
  copy whose backbone is frozen, interleaved step by step in one process, median over repeats after warm-up; the
  ratios to the plain step are the figures to read (absolute times on a shared 2-core machine are noise);
* memory of a train step: on CUDA the peak allocated bytes; on CPU the bytes of the tensors autograd
  saves for backward (measured with ``torch.autograd.graph.saved_tensors_hooks``, each storage once, weights
  included), which is what a training step's peak grows with. Measured for the plain model, the wrapped model
  (the default: cells recomputed in backward), the wrapped model with ``recompute=False`` (the stored path)
  and the frozen-backbone mode.

**Frozen backbone**: every parameter of the network requires no gradient except its head's (``bconv.anatomy``'s
``head.modules``: pooling and classifier); the ladder and the head train, as in ladder side-tuning (Sung et al.,
NeurIPS 2022). Nothing of the backbone needs keeping for backward then, except the stage outputs the fusions
read (their weights' gradients need them): the run reports how much of that mode's memory they are.

The bars: memory ratio <= FLOP ratio (the ladder keeps no more for backward, relative to the backbone, than it
computes), and time ratio <= 1.05 x FLOP ratio (the ladder's work, recompute included, runs as efficiently as
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
from typing import Callable, Sequence

import torch

from bconv import anatomy, wrap_with_ptl
from bconv._zoo import build, resolve

from benchmarks.common import (RESULTS, HandWiredPTLResNet, command, flops, input_size_of, params, ratios, run_record,
                               seeded, side_by_side, write_results)  # fmt: skip

TIME_BAR = 1.05  # time ratio <= TIME_BAR x FLOP ratio
MODELS = ["torchvision:resnet50", "torchvision:densenet161", "torchvision:efficientnet_b0", "torchvision:convnext_tiny"]


def _step(model, opt, x, y) -> None:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if hasattr(model, "detach_state"):
        model.detach_state()


def _memory(step: Callable[[], None], device: torch.device, watch: Callable[[], set[int]] | None = None) -> dict:
    """Peak CUDA bytes of one step, or on CPU the bytes autograd saves for backward (``bytes``); on CPU also
    ``watched``: the bytes of those whose storage is in ``watch()`` (called after the step)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return {"bytes": torch.cuda.max_memory_allocated() - base}
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.device)
        saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    result = {"bytes": sum(saved.values())}
    if watch is not None:
        watched = watch()
        result["watched"] = sum(n for (ptr, _), n in saved.items() if ptr in watched)
    return result


def frozen_backbone(wrapped: torch.nn.Module, head: Sequence[str]) -> torch.nn.Module:
    """``wrapped`` with every parameter of its network frozen except those of the ``head`` modules (names in the
    network); the ladder trains."""
    for name, p in wrapped.model.named_parameters():
        p.requires_grad_(any(name.startswith(m + ".") for m in head))
    return wrapped


def _stage_outputs(wrapped: torch.nn.Module) -> tuple[Callable[[], set[int]], list]:
    """A ``watch`` for :func:`_memory`: the storages of the stage outputs of the wrapped model's last forward
    (read at the adapter's taps); and the hook handles, to remove."""
    seen: set[int] = set()
    modules = dict(wrapped.model.named_modules())

    def record(module, args, out) -> None:
        seen.add(out.untyped_storage().data_ptr())

    handles = [modules[tap].register_forward_hook(record, prepend=True) for tap in wrapped.adapter.tap_names]
    return (lambda: set(seen)), handles


def _train_steps(models: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """Name -> one train step of that model on ``(x, y)`` (cross-entropy, SGD lr 1e-3 momentum 0.9, its own optimizer)."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    return {k: functools.partial(_step, m, opts[k], x, y) for k, m in models.items()}


def measure(spec_name: str, batch: int, repeats: int, device: torch.device) -> dict:
    spec = resolve(spec_name)
    seeded(0)
    plain = build(spec).to(device)
    input_size = input_size_of(spec, plain)
    head = anatomy(plain, input_size).head.modules
    wrapped = wrap_with_ptl(copy.deepcopy(plain), input_size=input_size)
    stored = wrap_with_ptl(copy.deepcopy(plain), input_size=input_size, recompute=False)
    stored.ptl.load_state_dict(wrapped.ptl.state_dict())
    frozen = frozen_backbone(copy.deepcopy(wrapped), head)
    x = torch.randn(batch, *input_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    row = {
        "model": str(spec),
        "input_size": list(input_size),
        "batch": batch,
        "head": list(head),
        "params_plain": params(plain),
        "params_ptl": params(wrapped),
        "params_frozen_trained": sum(p.numel() for p in frozen.parameters() if p.requires_grad),
        "flops_plain": flops(plain, x),
        "flops_ptl": flops(wrapped, x),
    }
    models = {"plain": plain.train(), "ptl": wrapped.train(), "frozen": frozen.train(), "stored": stored.train()}
    steps = _train_steps(models, x, y)
    for k, step in steps.items():  # warm-up, and memory
        step()
        watch, handles = _stage_outputs(models[k]) if k == "frozen" else (None, [])
        memory = _memory(step, device, watch)
        for h in handles:
            h.remove()
        row[f"memory_{k}"] = memory["bytes"]
        if "watched" in memory:
            row["memory_frozen_stage_outputs"] = memory["watched"]
    del steps["stored"]  # its memory is the figure to compare; its time is not measured (keeps the run short)
    times = side_by_side(steps, repeats, device=device)["wall"]
    for k in ("plain", "ptl", "frozen"):
        row[f"step_s_{k}"] = statistics.median(times[k])
    for k in ("ptl", "frozen"):
        paired = ratios(times[k], times["plain"])
        prefix = "time_ratio" if k == "ptl" else "frozen_time_ratio"
        row.update({prefix: statistics.median(paired), f"{prefix}_min": min(paired), f"{prefix}_max": max(paired)})
    row["flop_ratio"] = row["flops_ptl"] / row["flops_plain"]
    row["param_ratio"] = row["params_ptl"] / row["params_plain"]
    for k in ("ptl", "stored", "frozen"):
        row[f"memory_ratio{'' if k == 'ptl' else '_' + k}"] = row[f"memory_{k}"] / max(row["memory_plain"], 1)
    row["time_within_bar"] = row["time_ratio"] <= TIME_BAR * row["flop_ratio"]
    row["memory_within_bar"] = row["memory_ratio"] <= row["flop_ratio"]
    row["within_bar"] = row["time_within_bar"] and row["memory_within_bar"]
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
    mb = lambda n: f"{n / 2**20:.0f}"  # noqa: E731
    lines = [
        "# PTL overhead at default widths (every stage paired, cell v1)",
        "",
        f"Made by `{run['command']}` at commit {run['commit']} in {seconds:.0f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device.type}. Batch {args.batch}. Time ratio: train step over "
        f"the plain model's, interleaved, median of {args.repeats} (min-max). Memory: {memory}, each storage once, "
        f"weights included. Bars: memory ratio <= FLOP ratio; time ratio <= {TIME_BAR} x FLOP ratio.",
        "",
        f"| model | params | FLOPs (fwd, batch 1) | FLOP ratio | {memory} (plain / PTL) | memory ratio "
        f"| train step s (plain / PTL) | time ratio | bar (memory, time) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_plain'] / 1e6:.1f}M -> {r['params_ptl'] / 1e6:.1f}M (+{100 * (r['param_ratio'] - 1):.0f}%) "
            f"| {r['flops_plain'] / 1e9:.2f}G -> {r['flops_ptl'] / 1e9:.2f}G | {r['flop_ratio']:.3f} "
            f"| {mb(r['memory_plain'])} / {mb(r['memory_ptl'])} | {r['memory_ratio']:.3f} "
            f"| {r['step_s_plain']:.3f} / {r['step_s_ptl']:.3f} "
            f"| {r['time_ratio']:.3f} ({r['time_ratio_min']:.2f}-{r['time_ratio_max']:.2f}) "
            f"| {'within' if r['memory_within_bar'] else 'OVER'}, {'within' if r['time_within_bar'] else 'OVER'} |"
        )
    lines += [
        "",
        "## What the recompute saves, and the frozen-backbone mode",
        "",
        "Stored: the same ladder with `recompute=False` (cells keep their gate activations). Frozen backbone: the "
        "network's parameters frozen except its head's (`bconv.anatomy(model).head.modules`), the ladder and the "
        "head train; of its memory, the stage outputs the fusions read (their weight gradients need them). Ratios "
        "are to the plain model's full fine-tuning step.",
        "",
        f"| model | {memory}: PTL / stored | memory ratio stored | frozen: trained params | frozen: {memory} "
        "| of which stage outputs | frozen memory ratio | frozen time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stage = r.get("memory_frozen_stage_outputs")
        lines.append(
            f"| {r['model']} | {mb(r['memory_ptl'])} / {mb(r['memory_stored'])} | {r['memory_ratio_stored']:.3f} "
            f"| {r['params_frozen_trained'] / 1e6:.2f}M | {mb(r['memory_frozen'])} "
            f"| {'-' if stage is None else mb(stage)} | {r['memory_ratio_frozen']:.3f} "
            f"| {r['frozen_time_ratio']:.3f} ({r['frozen_time_ratio_min']:.2f}-{r['frozen_time_ratio_max']:.2f}) |"
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
        r = rows[-1]
        print(f"{name}: time ratio {r['time_ratio']:.3f}, memory ratio {r['memory_ratio']:.3f}, "
              f"FLOP ratio {r['flop_ratio']:.3f}", flush=True)
    hand = None
    if args.hand_wired_repeats:
        hand = measure_hand_wired(args.hand_wired_batch or args.batch, args.hand_wired_repeats, device)
        print(f"hand-wired PTL ResNet-50: time ratio wrapped/hand-wired {hand['time_ratio']:.3f}", flush=True)
    write(rows, args, device, time.perf_counter() - start, run, hand)


if __name__ == "__main__":
    main()
