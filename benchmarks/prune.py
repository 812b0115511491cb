"""COP pruning: how fast, and does it beat the simple criteria?

(a) speed: ``cop_prune`` on ResNet-50 (224x224) to -50% FLOPs, timed side by side with Torch-Pruning's
    own one-shot magnitude pruner (``MetaPruner`` + ``MagnitudeImportance(p=1)``, the classifier ignored)
    at the channel ratio that reaches the same FLOPs target (found by bisection beforehand, untimed),
    the repetitions interleaved on fresh models. The ratio is the figure to read.
(b) accuracy: a small CNN trained on Fashion-MNIST (``apt-get install dataset-fashion-mnist``; its IDX
    files are read from disk, nothing is downloaded) or, with ``--data digits``, on scikit-learn's bundled
    digits, pruned to -30/-50/-70% FLOPs by COP (each preset), Torch-Pruning's L1 magnitude, FPGM and
    random channel selection, each fine-tuned for the same budget, over several seeds. The Torch-Pruning
    criteria prune every layer by the same fraction (MetaPruner's local ranking, one shot), the fraction
    found by bisection so that the FLOPs target is reached; COP prunes globally to the target.

Writes ``benchmarks/results/prune.md``, ``.json`` and ``prune_<data>.png``. Reproduce::

    python -m benchmarks.prune                 # both parts, Fashion-MNIST
    python -m benchmarks.prune --part speed --repeats 3 --threads 2
    python -m benchmarks.prune --part accuracy --seeds 3 --threads 1
    python -m benchmarks.prune --part accuracy --data digits --epochs 15 --finetune 2 --width 32
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from bconv._flops import TotalFlopCounter
from bconv.prune import cop_prune

from benchmarks.common import (FASHION_MNIST_DIR, RESULTS, Split, command as run_command, evaluate,
                               load_digits, load_fashion_mnist, shift, train_epochs)  # fmt: skip

METHODS = ["cop-balanced", "cop-smaller", "cop-faster", "tp-l1", "tp-fpgm", "random"]
# DESIGN.md §7: what the COP paper's README reports (retrained with the full schedule).
REFERENCE = [
    ("CIFAR-10 VGG16", "93.56%", "93.31% at -92.8% params, -73.5% FLOPs"),
    ("CIFAR-10 ResNet-32", "92.64%", "91.97% at -57.5% params, -53.9% FLOPs"),
    ("ImageNet ResNet-18 top-1", "70.29%", "66.98% at -45.1% params, -43.3% FLOPs"),
]


def flops(model: nn.Module, x: torch.Tensor) -> int:
    model.eval()
    with torch.no_grad(), TotalFlopCounter() as counter:
        model(x[:1])
    return int(counter.get_total_flops())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tp_one_shot(model: nn.Module, x: torch.Tensor, importance, channel_ratio: float, ignored: list[nn.Module]) -> None:
    """Torch-Pruning's one-shot pruner: every layer loses ``channel_ratio`` of its channels (local ranking)."""
    pruner = tp.pruner.MetaPruner(model, x, importance=importance, pruning_ratio=channel_ratio, ignored_layers=ignored)
    pruner.step()


def tp_ratio_for(build, x: torch.Tensor, target: float, ignore) -> float:
    """The channel ratio at which Torch-Pruning's one-shot pruner removes ``target`` of the FLOPs (bisection,
    untimed: with local ranking the FLOPs depend on the ratio only, not on which channels go)."""
    base = flops(build(), x)
    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        model = build()
        tp_one_shot(model, x, tp.importance.MagnitudeImportance(p=1), mid, ignore(model))
        if 1 - flops(model, x) / base < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 0.002:
            break
    return hi


# --------------------------------------------------------------------------- (a) speed


def speed(repeats: int) -> dict:
    import torchvision

    x = torch.randn(1, 3, 224, 224)
    ratio = tp_ratio_for(torchvision.models.resnet50, x, 0.5, lambda m: [m.fc])
    print(f"  Torch-Pruning one-shot channel ratio for -50% FLOPs: {ratio:.3f}", flush=True)
    times: dict[str, list[float]] = {"cop": [], "tp-magnitude": []}
    achieved: dict[str, list[float]] = {"cop": [], "tp-magnitude": []}
    for rep in range(repeats):
        for name in (("cop", "tp-magnitude") if rep % 2 == 0 else ("tp-magnitude", "cop")):
            model = torchvision.models.resnet50()
            base = flops(model, x)
            start = time.perf_counter()
            if name == "cop":
                cop_prune(model, (3, 224, 224), ratio=0.5, metric="flops")
            else:
                tp_one_shot(model, x, tp.importance.MagnitudeImportance(p=1), ratio, [model.fc])
            times[name].append(time.perf_counter() - start)
            achieved[name].append(1 - flops(model, x) / base)
            print(f"  speed rep {rep}: {name} {times[name][-1]:.1f} s, -{100 * achieved[name][-1]:.1f}% FLOPs", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"load_average_after": list(__import__("os").getloadavg()),"times_s": times, "median_s": med, "ratio": med["cop"] / med["tp-magnitude"], "achieved": achieved,
            "tp_channel_ratio": ratio}


# --------------------------------------------------------------------------- (b) accuracy


class SmallCNN(nn.Module):
    """A small VGG-like CNN for one-channel images: five 3x3 convs with BN, three resolutions."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(*block(1, width), *block(width, width), nn.MaxPool2d(2),
                                      *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
                                      *block(2 * width, 2 * width))  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's official 60,000 training and 10,000 test images, standardised with the training mean."""
    xtr, ytr, _ = load_fashion_mnist(FASHION_MNIST_DIR, True)
    xte, yte, _ = load_fashion_mnist(FASHION_MNIST_DIR, False)
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


DATA = {"fashion-mnist": "Fashion-MNIST (28x28, official train/test split)", "digits": "scikit-learn digits (8x8 upsampled to 16x16, 70/30 split)"}


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.model_selection import train_test_split

    x, y, _ = load_digits(16)
    x = (x - x.mean()) / x.std()
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


def train(model: nn.Module, x, y, epochs: int, lr: float, seed: int) -> None:
    """SGD (Nesterov momentum 0.9, weight decay 5e-4), batch 64, cosine per step, random one-pixel shifts."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    train_epochs(model, opt, Split(x, y), epochs, torch.Generator().manual_seed(seed), batch_size=64, augment=shift,
                 schedule="step")  # fmt: skip


def accuracy(model: nn.Module, x, y) -> float:
    return evaluate(model, Split(x, y), batch_size=1000)[0] / 100


def prune_with(method: str, model: nn.Module, ratio: float, seed: int, channel_ratio: float, size: tuple) -> None:
    x = torch.randn(1, *size)
    if method.startswith("cop-"):
        cop_prune(model, size, ratio=ratio, metric="flops", prefer=method[4:])
        return
    importance = {
        "tp-l1": tp.importance.MagnitudeImportance(p=1),
        "tp-fpgm": tp.importance.FPGMImportance(),
        "random": tp.importance.RandomImportance(),
    }[method]
    torch.manual_seed(seed)
    tp_one_shot(model, x, importance, channel_ratio, [model.fc])


def accuracy_part(data: str, seeds: int, targets: list[float], epochs: int, finetune: int, finetune_images: int | None,
                  width: int) -> dict:  # fmt: skip
    xtr, ytr, xte, yte = fashion_mnist() if data == "fashion-mnist" else digits()
    size = tuple(xtr.shape[1:])
    x1 = torch.randn(1, *size)
    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        base = SmallCNN(width)
        train(base, xtr, ytr, epochs, 0.05, seed)
        base_acc = accuracy(base, xte, yte)
        base_flops, base_params = flops(base, x1), params(base)
        rows.append({"seed": seed, "method": "unpruned", "target": 0.0, "flops": 0.0, "params": 0.0,
                     "acc_pruned": base_acc, "acc": base_acc})  # fmt: skip
        print(f"seed {seed}: unpruned {100 * base_acc:.2f}%", flush=True)
        # Every pruned model is fine-tuned on the same images in the same order (the budget is equal).
        subset = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1000 + seed))[:finetune_images]
        xft, yft = xtr[subset], ytr[subset]
        for target in targets:
            channel_ratio = tp_ratio_for(lambda base=base: copy.deepcopy(base), x1, target, lambda m: [m.fc])
            for method in METHODS:
                model = copy.deepcopy(base)
                prune_with(method, model, target, seed, channel_ratio, size)
                acc0 = accuracy(model, xte, yte)
                train(model, xft, yft, finetune, 0.01, seed + 100)
                row = {"seed": seed, "method": method, "target": target,
                       "flops": 1 - flops(model, x1) / base_flops, "params": 1 - params(model) / base_params,
                       "acc_pruned": acc0, "acc": accuracy(model, xte, yte)}  # fmt: skip
                rows.append(row)
                print(f"  -{100 * target:.0f}% {method:13s} FLOPs -{100 * row['flops']:.1f}% params "
                      f"-{100 * row['params']:.1f}%  acc {100 * acc0:.2f}% -> {100 * row['acc']:.2f}%", flush=True)
    return {"rows": rows, "data": data, "width": width, "epochs": epochs, "finetune_epochs": finetune,
            "finetune_images": len(xft), "seeds": seeds, "targets": targets, "train": len(xtr), "test": len(xte)}  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    keys = sorted({(r["target"], r["method"]) for r in rows}, key=lambda k: (k[0], (["unpruned"] + METHODS).index(k[1])))
    out = []
    for target, method in keys:
        sel = [r for r in rows if r["target"] == target and r["method"] == method]
        acc = [100 * r["acc"] for r in sel]
        out.append({
            "target": target, "method": method, "n": len(sel),
            "flops": statistics.mean(r["flops"] for r in sel), "params": statistics.mean(r["params"] for r in sel),
            "acc_pruned": statistics.mean(100 * r["acc_pruned"] for r in sel),
            "acc": statistics.mean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        })  # fmt: skip
    return out


def plot(summary: list[dict], data: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key in zip(axes, ("flops", "params")):
        for method in METHODS:
            sel = [s for s in summary if s["method"] == method]
            ax.errorbar([100 * s[key] for s in sel], [s["acc"] for s in sel], yerr=[s["acc_std"] for s in sel],
                        marker="o", capsize=3, label=method)  # fmt: skip
        base = [s for s in summary if s["method"] == "unpruned"]
        if base:
            ax.axhline(base[0]["acc"], color="grey", ls="--", lw=1, label="unpruned")
        ax.set_xlabel(f"{'FLOPs' if key == 'flops' else 'parameters'} removed (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy after fine-tuning (%), mean ± std over seeds")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{DATA[data]}, small CNN: pruned then fine-tuned for the same budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(result: dict, command: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    old = {}
    path = RESULTS / "prune.json"
    if path.exists():  # one part at a time keeps the other part's last results
        old = json.loads(path.read_text())
    old.update(result)
    old["command_" + ("speed" if "speed" in result else "accuracy")] = command
    path.write_text(json.dumps(old, indent=1))
    lines = ["# COP pruning: speed and accuracy", ""]
    if "speed" in old:
        s = old["speed"]
        lines += [
            "## (a) Speed: ResNet-50, 224x224, -50% FLOPs", "",
            f"Command: `{old.get('command_speed', '')}` ({s['threads']} threads, repetitions interleaved on fresh models).", "",
            "| pruner | median time (s) | runs (s) | FLOPs removed |", "|---|---|---|---|",
        ]  # fmt: skip
        for k in ("cop", "tp-magnitude"):
            label = "bconv cop_prune" if k == "cop" else "Torch-Pruning MetaPruner + MagnitudeImportance(p=1), one-shot at the channel ratio that removes 50% of FLOPs"
            lines.append(f"| {label} | {s['median_s'][k]:.1f} | {', '.join(f'{t:.1f}' for t in s['times_s'][k])} | "
                         f"{', '.join(f'{100 * a:.1f}%' for a in s['achieved'][k])} |")  # fmt: skip
        lines += ["", f"cop_prune / Torch-Pruning magnitude: **{s['ratio']:.2f}x** the time."]
        if "load_average_after" in s:
            lines += ["", f"Load average (1, 5, 15 min) when the run ended: {', '.join(f'{v:.1f}' for v in s['load_average_after'])} "
                      f"on 2 cores (a shared machine): absolute times are inflated accordingly; the ratio is the figure."]
        lines += [""]
    if "accuracy" in old:
        a = old["accuracy"]
        lines += [
            f"## (b) Does COP beat the simple criteria? {DATA[a.get('data', 'digits')]}, small CNN", "",
            f"Command: `{old.get('command_accuracy', '')}`. {a['train']} training / {a['test']} test images, "
            f"a CNN of width {a.get('width', 32)} trained {a['epochs']} epochs per seed, then each pruned model "
            f"fine-tuned {a['finetune_epochs']} epoch(s) on the same {a.get('finetune_images', a['train'])} training "
            f"images in the same order (the same budget for every method), {a['seeds']} seeds. "
            f"Accuracy: mean ± std over seeds; 'before FT' is right after pruning.", "",
            "| FLOPs target | method | FLOPs removed | params removed | acc. before FT | acc. after FT |",
            "|---|---|---|---|---|---|",
        ]  # fmt: skip
        for s in a["summary"]:
            lines.append(f"| -{100 * s['target']:.0f}% | {s['method']} | {100 * s['flops']:.1f}% | {100 * s['params']:.1f}% | "
                         f"{s['acc_pruned']:.2f}% | {s['acc']:.2f} ± {s['acc_std']:.2f}% |")  # fmt: skip
        lines += ["", f"![accuracy against FLOPs and params removed](prune_{a.get('data', 'digits')}.png)", "",
                  "COP paper's reference results (DESIGN.md §7, not measured here):", "",
                  "| setting | baseline | COP |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {s} | {b} | {c} |" for s, b, c in REFERENCE]
        if a.get("verdict"):
            lines += ["", a["verdict"]]
    (RESULTS / "prune.md").write_text("\n".join(lines) + "\n")


def verdict(summary: list[dict], data: str) -> str:
    """One sentence, computed from the measured table: where COP's best preset stands against the others."""
    parts = []
    for target in sorted({s["target"] for s in summary if s["target"] > 0}):
        sel = {s["method"]: s for s in summary if s["target"] == target}
        cop = max((sel[m] for m in METHODS if m.startswith("cop-") and m in sel), key=lambda s: s["acc"])
        rest = max((sel[m] for m in METHODS if not m.startswith("cop-") and m in sel), key=lambda s: s["acc"])
        diff = cop["acc"] - rest["acc"]
        spread = max(cop["acc_std"], rest["acc_std"])
        word = "ahead of" if diff > spread else "behind" if diff < -spread else "within the seed spread of"
        parts.append(f"at -{100 * target:.0f}% FLOPs the best COP preset ({cop['method']}, {cop['acc']:.2f}%) is {word} "
                     f"the best simple criterion ({rest['method']}, {rest['acc']:.2f}%)")  # fmt: skip
    return ("Measured here: " + "; ".join(parts) + f". The paper's gains are measured on CIFAR/ImageNet after full "
            f"retraining of larger networks; {DATA[data].split(' (')[0]} with a small CNN and a short fine-tune is a "
            f"far smaller setting, so these figures test the direction, not the paper's margins.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("speed", "accuracy", "both"), default="both")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--data", choices=tuple(DATA), default="fashion-mnist")
    p.add_argument("--width", type=int, default=16, help="the CNN's first width (default 16)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the unpruned CNN, per seed")
    p.add_argument("--finetune", type=int, default=1, help="fine-tuning epochs of each pruned CNN")
    p.add_argument("--finetune-images", type=int, default=12000,
                   help="training images each pruned CNN is fine-tuned on (the same for every method)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = run_command("prune", argv)
    if args.part in ("speed", "both"):
        s = speed(args.repeats)
        s["threads"] = args.threads
        write({"speed": s}, command)
        print(f"speed: cop {s['median_s']['cop']:.1f} s, tp magnitude {s['median_s']['tp-magnitude']:.1f} s, "
              f"ratio {s['ratio']:.2f}")  # fmt: skip
    if args.part in ("accuracy", "both"):
        a = accuracy_part(args.data, args.seeds, args.targets, args.epochs, args.finetune, args.finetune_images,
                          args.width)  # fmt: skip
        a["summary"] = summarise(a["rows"])
        a["verdict"] = verdict(a["summary"], args.data)
        plot(a["summary"], args.data, RESULTS / f"prune_{args.data}.png")
        write({"accuracy": a}, command)
        print(a["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
