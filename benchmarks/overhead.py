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
the backbone's own). Writes ``benchmarks/results/overhead.md`` and ``.json``. Reproduce::

    python benchmarks/overhead.py                          # the paper's backbones + EfficientNet-B0, ConvNeXt-T
    python benchmarks/overhead.py --models torchvision:resnet50 --batch 16 --repeats 9 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bconv import wrap_with_ptl
from bconv._zoo import build, resolve, torchvision_input_size

RESULTS = Path(__file__).parent / "results"
MODELS = ["torchvision:resnet50", "torchvision:densenet161", "torchvision:efficientnet_b0", "torchvision:convnext_tiny"]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
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
    torch.manual_seed(0)
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


def write(rows: list[dict], args: argparse.Namespace, device: torch.device, seconds: float) -> None:
    memory = "peak CUDA MB of a step" if device.type == "cuda" else "MB saved for backward"
    lines = [
        "# PTL overhead at default widths (every stage paired, cell v1)",
        "",
        f"Made by `python benchmarks/overhead.py --models {' '.join(r['model'] for r in rows)} --batch {args.batch} "
        f"--repeats {args.repeats} --device {device.type}"
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"device": device.type, "torch": torch.__version__, "rows": rows}, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
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
    write(rows, args, device, time.perf_counter() - start)


if __name__ == "__main__":
    main()
