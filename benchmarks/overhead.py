"""What PTL costs: parameters, FLOPs, train-step time and activation memory, with and without the ladder.

For each backbone at default widths (``wrap_with_ptl(model)``, every stage paired, cell v1):

* parameters and forward FLOPs (torch's ``FlopCounterMode``, batch 1) of the plain and the wrapped model;
* train-step time (forward, backward, SGD step, ``detach_state``) of a plain copy and a wrapped copy,
  interleaved step by step in one process, median over repeats after warm-up; the ratio wrapped/plain
  is the figure to read (absolute times on a shared 2-core machine are noise);
* memory of a train step: on CUDA the peak allocated bytes; on CPU the bytes of the tensors autograd
  saves for backward (measured with ``torch.autograd.graph.saved_tensors_hooks``), which is what a
  training step's peak grows with.

The bar: the time ratio stays within 1.15x of the FLOP ratio (the ladder's work runs as efficiently as
the backbone's own).

The cost of the ladder's hooks and of its checks (every paired stage ran, once, in order; checkpointing)
is measured against a hand-wired PTL ResNet-50: the same network and the same ladder modules (copied
from the wrapped model), called from an explicit forward with no hooks. Its train steps are interleaved
with the wrapped model's (in alternating order, ABBA), and the figure is the median of the per-pair
time ratios wrapped/hand-wired. Bar: <= 1.02.

Writes ``benchmarks/results/overhead.md`` and ``.json``. Reproduce::

    python -m benchmarks.overhead                          # the paper's backbones + EfficientNet-B0, ConvNeXt-T
    python -m benchmarks.overhead --models torchvision:resnet50 --batch 16 --repeats 9 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from bconv import PTLModel, unwrap_ptl, wrap_with_ptl
from bconv.surgery import TotalFlopCounter
from bconv._zoo import build, resolve, torchvision_input_size

from benchmarks.common import RESULTS, seeded

MODELS = ["torchvision:resnet50", "torchvision:densenet161", "torchvision:efficientnet_b0", "torchvision:convnext_tiny"]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    model.eval()
    with torch.no_grad(), TotalFlopCounter() as counter:
        model(x[:1])
    return int(counter.get_total_flops())


def _step(model, opt, x, y) -> None:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if hasattr(model, "detach_state"):
        model.detach_state()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _memory(model, opt, x, y, device: torch.device) -> int:
    """Peak CUDA bytes of one step, or on CPU the bytes autograd saves for backward."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(model, opt, x, y)
        return torch.cuda.max_memory_allocated() - base
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.device)
        saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(model, opt, x, y)
    return sum(saved.values())


def measure(spec_name: str, batch: int, repeats: int, device: torch.device) -> dict:
    spec = resolve(spec_name)
    seeded(0)
    plain = build(spec).to(device)
    if spec.zoo == "torchvision":
        input_size = torchvision_input_size(spec.name, plain)
    else:
        input_size = tuple(plain.pretrained_cfg["input_size"])
    wrapped = wrap_with_ptl(copy.deepcopy(plain), input_size=input_size)
    x = torch.randn(batch, *input_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    row = {
        "model": str(spec),
        "input_size": list(input_size),
        "batch": batch,
        "params_plain": _params(plain),
        "params_ptl": _params(wrapped),
        "flops_plain": _flops(plain, x),
        "flops_ptl": _flops(wrapped, x),
    }
    models = {"plain": plain.train(), "ptl": wrapped.train()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    for k, m in models.items():  # warm-up, and memory
        _step(m, opts[k], x, y)
        row[f"memory_{k}"] = _memory(m, opts[k], x, y, device)
    times: dict[str, list[float]] = {k: [] for k in models}
    ratios = []
    for _ in range(repeats):
        for k, m in models.items():
            _sync(device)
            start = time.perf_counter()
            _step(m, opts[k], x, y)
            _sync(device)
            times[k].append(time.perf_counter() - start)
        ratios.append(times["ptl"][-1] / times["plain"][-1])
    row.update(
        step_s_plain=statistics.median(times["plain"]),
        step_s_ptl=statistics.median(times["ptl"]),
        time_ratio=statistics.median(ratios),
        time_ratio_min=min(ratios),
        time_ratio_max=max(ratios),
    )
    row["flop_ratio"] = row["flops_ptl"] / row["flops_plain"]
    row["param_ratio"] = row["params_ptl"] / row["params_plain"]
    row["memory_ratio"] = row["memory_ptl"] / max(row["memory_plain"], 1)
    row["within_bar"] = row["time_ratio"] <= 1.15 * row["flop_ratio"]
    return row


class HandWiredPTLResNet(torch.nn.Module):
    """A PTL ResNet-50 (every stage paired) wired by hand: DESIGN.md §3's equations as an explicit forward.

    Holds copies of the wrapped model's network (hooks removed) and ladder modules, so it computes
    exactly what the wrapped model computes, with no hooks and no checks.
    """

    def __init__(self, wrapped: PTLModel):
        super().__init__()
        if [s.name for s in wrapped.stages] != ["relu", "layer1", "layer2", "layer3", "layer4"]:
            raise ValueError(f"a ResNet wrapped at every stage is needed; got stages {[s.name for s in wrapped.stages]}")
        twin = copy.deepcopy(wrapped)
        self.ptl = twin.ptl
        self.net = unwrap_ptl(twin)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        net, cells, fuses = self.net, self.ptl.cells, self.ptl.fuses
        x = net.relu(net.bn1(net.conv1(image)))
        z = fuses[0](torch.cat([x, cells[0](image)], 1))
        x = net.layer1(net.maxpool(x))
        z = fuses[1](torch.cat([x, cells[1](z)], 1))
        x = net.layer2(x)
        z = fuses[2](torch.cat([x, cells[2](z)], 1))
        x = net.layer3(x)
        z = fuses[3](torch.cat([x, cells[3](z)], 1))
        x = self.ptl.final_fuse(net.layer4(x), cells[4](z))  # x + proj(y), or the released Fuse(cat(x, y))
        return net.fc(torch.flatten(net.avgpool(x), 1))

    def detach_state(self) -> None:
        for m in self.ptl.modules():
            if hasattr(m, "detach_state"):
                m.detach_state()


def measure_hand_wired(batch: int, repeats: int, device: torch.device, size: int = 224) -> dict:
    """Train-step time of wrap_with_ptl(resnet50) over the same PTL ResNet-50 wired by hand."""
    seeded(0)
    wrapped = wrap_with_ptl(build(resolve("torchvision:resnet50")), input_size=(3, size, size))
    wrapped.to(device)
    hand = HandWiredPTLResNet(wrapped).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad():  # the same function: the comparison is of wiring alone
        torch.testing.assert_close(wrapped.eval()(x), hand.eval()(x))
    models = {"wrapped": wrapped.train(), "hand": hand.train()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    for k, m in models.items():
        _step(m, opts[k], x, y)  # warm-up
    # On a shared CPU the wall time of a step mostly measures the neighbours; the process's CPU time
    # (time.process_time, all of its threads) measures the work itself. Both are recorded; on CUDA, wall.
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {(k, c): [] for k in models for c in clocks}
    ratios: dict[str, list[float]] = {c: [] for c in clocks}
    for r in range(repeats):
        order = ("wrapped", "hand") if r % 2 == 0 else ("hand", "wrapped")
        for k in order:
            _sync(device)
            start = {c: clock() for c, clock in clocks.items()}
            _step(models[k], opts[k], x, y)
            _sync(device)
            for c, clock in clocks.items():
                times[k, c].append(clock() - start[c])
        for c in clocks:
            ratios[c].append(times["wrapped", c][-1] / times["hand", c][-1])
    main = "cpu" if device.type == "cpu" else "wall"
    row = {"model": "torchvision:resnet50", "input_size": [3, size, size], "batch": batch, "repeats": repeats, "clock": main}
    for c in clocks:
        row.update(
            {
                f"step_s_wrapped_{c}": statistics.median(times["wrapped", c]),
                f"step_s_hand_{c}": statistics.median(times["hand", c]),
                f"time_ratio_{c}": statistics.median(ratios[c]),
                f"time_ratio_{c}_min": min(ratios[c]),
                f"time_ratio_{c}_max": max(ratios[c]),
                f"ratios_{c}": ratios[c],
            }
        )
    row["time_ratio"] = row[f"time_ratio_{main}"]
    row["within_bar"] = row["time_ratio"] <= 1.02
    return row


def write(rows: list[dict], args: argparse.Namespace, device: torch.device, seconds: float, hand: dict | None = None) -> None:
    memory = "peak CUDA MB of a step" if device.type == "cuda" else "MB saved for backward"
    lines = [
        "# PTL overhead at default widths (every stage paired, cell v1)",
        "",
        f"Made by `python -m benchmarks.overhead --models {' '.join(r['model'] for r in rows)} --batch {args.batch} "
        f"--repeats {args.repeats} --hand-wired-repeats {args.hand_wired_repeats}"
        f"{f' --hand-wired-batch {args.hand_wired_batch}' if args.hand_wired_batch else ''} --device {device.type}"
        f"{f' --threads {args.threads}' if args.threads else ''}` in {seconds:.0f} s; torch {torch.__version__}, "
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    record = {"device": device.type, "torch": torch.__version__, "rows": rows, "hand_wired": hand}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hand-wired-repeats", type=int, default=15, help="pairs of hand-wired/wrapped steps (0: skip)")
    parser.add_argument("--hand-wired-batch", type=int, default=None, help="default: --batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    rows = []
    for name in args.models:
        rows.append(measure(name, args.batch, args.repeats, device))
        print(f"{name}: time ratio {rows[-1]['time_ratio']:.2f}, FLOP ratio {rows[-1]['flop_ratio']:.2f}", flush=True)
    hand = None
    if args.hand_wired_repeats:
        hand = measure_hand_wired(args.hand_wired_batch or args.batch, args.hand_wired_repeats, device)
        print(f"hand-wired PTL ResNet-50: time ratio wrapped/hand-wired {hand['time_ratio']:.3f}", flush=True)
    write(rows, args, device, time.perf_counter() - start, hand)


if __name__ == "__main__":
    main()
