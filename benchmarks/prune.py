"""COP pruning where its claim lives: an over-parameterised VGG-style network, every criterion on the same rules.

(a) accuracy: a VGG-style CNN (widths 64, 128, 256, 512, 512 and a 512-wide dense layer, as COP's CIFAR
    VGG16 with one conv per stage below 512) trained on Fashion-MNIST (``apt-get install
    dataset-fashion-mnist``: its IDX files are read from disk, nothing is downloaded), pruned to -50%, -70%
    and -90% of its parameters by COP (each preset: ``cop_prune``'s global greedy selection) and by
    Torch-Pruning's L1 magnitude, FPGM and random importances (``MetaPruner`` one shot, every layer by the
    same fraction, the fraction found by bisection so that the parameter target is reached). The same
    rules for all: the classes are protected and nothing else (the last conv and the dense layer are
    prunable for every criterion); BatchNorm statistics are re-estimated (``reestimate_batchnorm``) on the
    same training batches before any accuracy is read; every pruned network is fine-tuned on the same
    images in the same order. Reported: accuracy after re-estimation and after the fine-tune, over seeds,
    with paired 95% t-intervals of each COP preset against each other criterion.
(b) the preset ablation of docs/design.md §7: at the same channel count, the gamma-only preset ("smaller")
    should remove more parameters and the beta-only preset ("faster") more FLOPs.
(c) speed: ``cop_prune`` on ResNet-50 (224x224) to -50% FLOPs, timed side by side with Torch-Pruning's
    one-shot magnitude pruner (``MetaPruner`` + ``MagnitudeImportance(p=1)``, the classes protected) at the
    channel ratio that reaches the same FLOPs (bisection beforehand, untimed), repetitions interleaved on
    fresh models, Python's garbage collected before each (a collection falling inside one run cost it up to
    0.3 s), the median of 5.

Writes ``benchmarks/results/prune.md``, ``.json`` and ``.png`` (``--out`` elsewhere). Reproduce::

    python -m benchmarks.prune                  # everything, as committed
    python -m benchmarks.prune --part speed
    python -m benchmarks.prune --quick --data-dir DIR --out /tmp/prune   # tiny, for the tests
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from bconv.prune import cop_prune, reestimate_batchnorm
from benchmarks.common import (RESULTS, Split, command, environment, evaluate, flops, interval, load_fashion_mnist,
                               paired, params, positive_int, seeded, shift, side_by_side, train_epochs)  # fmt: skip

COP = ["cop-balanced", "cop-smaller", "cop-faster"]
OTHERS = ["l1", "fpgm", "random"]
METHODS = COP + OTHERS
# docs/design.md §7: what the COP paper's README reports (retrained with the full schedule), not measured here.
REFERENCE = [
    ("CIFAR-10 VGG16", "93.56%", "93.31% at -92.8% params, -73.5% FLOPs"),
    ("CIFAR-10 ResNet-32", "92.64%", "91.97% at -57.5% params, -53.9% FLOPs"),
    ("ImageNet ResNet-18 top-1", "70.29%", "66.98% at -45.1% params, -43.3% FLOPs"),
    ("CIFAR-100 VGG16 ablation", "", "gamma=3, beta=0: -73.2% params / -43.1% FLOPs; gamma=0, beta=3: -46.0% / -48.8%"),
]


class VGGStyle(nn.Module):
    """A VGG-style CNN for 1x28x28 images: 3x3 conv-BN-ReLU at widths ``widths`` (a max-pool after each of the
    first three), global average pooling, then ``Linear(w, w) -> ReLU -> Linear(w, 10)`` as COP's CIFAR VGG16."""

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512, 512), classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def tp_one_shot(model: nn.Module, x: Tensor, importance: tp.importance.Importance, channel_ratio: float,
                classes: nn.Module) -> None:  # fmt: skip
    """Torch-Pruning's one-shot pruner, every layer by ``channel_ratio``; ``classes`` keeps its outputs (its
    inputs are pruned with the layer that feeds it, as COP's)."""
    tp.pruner.MetaPruner(model, x, importance=importance, pruning_ratio=channel_ratio, ignored_layers=[classes]).step()


def channel_ratio_for(build: Callable[[], nn.Module], x: Tensor, target: float, measure: Callable, classes: Callable) -> float:
    """The channel ratio at which the one-shot pruner removes ``target`` of ``measure`` (bisection, untimed:
    with every layer pruned by the same fraction, widths depend on the ratio only, not on which channels go)."""
    base = measure(build(), x)
    lo, hi = 0.0, 0.99
    while hi - lo > 0.001:
        mid = (lo + hi) / 2
        model = build()
        tp_one_shot(model, x, tp.importance.MagnitudeImportance(p=1), mid, classes(model))
        lo, hi = (mid, hi) if 1 - measure(model, x) / base < target else (lo, mid)
    return hi


# ----------------------------------------------------------------------------------------------- (a), (b)


def prune_with(method: str, model: VGGStyle, target: float, seed: int, channel_ratio: float, x: Tensor) -> None:
    if method in COP:
        cop_prune(model, tuple(x.shape[1:]), ratio=target, metric="params", prefer=method[4:])
        return
    importance = {"l1": tp.importance.MagnitudeImportance(p=1), "fpgm": tp.importance.FPGMImportance(),
                  "random": tp.importance.RandomImportance()}[method]  # fmt: skip
    torch.manual_seed(seed)  # the random criterion's draw
    tp_one_shot(model, x, importance, channel_ratio, model.classifier[-1])


def load(data_dir: Path | None) -> tuple[Split, Split]:
    """Fashion-MNIST's training and test images, standardised with the training mean and std."""
    xtr, ytr, _ = load_fashion_mnist(data_dir, True)
    xte, yte, _ = load_fashion_mnist(data_dir, False)
    mean, std = xtr.mean(), xtr.std()
    return Split((xtr - mean) / std, ytr), Split((xte - mean) / std, yte)


def run_seed(seed: int, train: Split, test: Split, cfg: dict, ratios: dict[float, float]) -> tuple[list[dict], list[dict]]:
    """One seed: train, then every (target, criterion) pruned, re-estimated, read, fine-tuned, re-estimated, read."""
    gen = seeded(seed)
    order = torch.randperm(len(train), generator=gen)
    base_train = train.take(order[: cfg["train_images"]])
    finetune = train.take(order[: cfg["finetune_images"]])
    # The same BatchNorm batches for every criterion of this seed.
    bn_batches = [train.x[order[i : i + cfg["batch"]]] for i in range(0, cfg["bn_batches"] * cfg["batch"], cfg["batch"])]
    base = VGGStyle(cfg["widths"])
    start = time.perf_counter()
    opt = torch.optim.SGD(base.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=5e-4, nesterov=True)
    train_epochs(base, opt, base_train, cfg["epochs"], gen, batch_size=cfg["batch"], augment=shift, schedule="step")
    train_s = time.perf_counter() - start
    reestimate_batchnorm(base, bn_batches)
    x = torch.randn(1, *train.x.shape[1:])
    base_params, base_flops = params(base), flops(base, x)
    base_acc = evaluate(base, test)[0]
    rows = [{"seed": seed, "method": "unpruned", "target": 0.0, "params": 0.0, "flops": 0.0, "acc_bn": base_acc,
             "acc_ft": base_acc, "train_s": train_s}]  # fmt: skip
    print(f"seed {seed}: unpruned {base_acc:.2f}% (trained in {train_s:.0f} s)", flush=True)
    for target in cfg["targets"]:
        for method in METHODS:
            start = time.perf_counter()
            model = copy.deepcopy(base)
            prune_with(method, model, target, seed, ratios[target], x)
            reestimate_batchnorm(model, bn_batches)
            acc_bn = evaluate(model, test)[0]
            opt = torch.optim.SGD(model.parameters(), lr=cfg["finetune_lr"], momentum=0.9, weight_decay=5e-4, nesterov=True)
            train_epochs(model, opt, finetune, cfg["finetune_epochs"], torch.Generator().manual_seed(1000 + seed),
                         batch_size=cfg["finetune_batch"], augment=shift, schedule="step")  # fmt: skip
            reestimate_batchnorm(model, bn_batches)
            row = {"seed": seed, "method": method, "target": target, "params": 1 - params(model) / base_params,
                   "flops": 1 - flops(model, x) / base_flops, "acc_bn": acc_bn, "acc_ft": evaluate(model, test)[0],
                   "seconds": time.perf_counter() - start}  # fmt: skip
            rows.append(row)
            print(f"  -{100 * target:.0f}% params {method:13s} params -{100 * row['params']:.1f}% FLOPs "
                  f"-{100 * row['flops']:.1f}%  acc {row['acc_bn']:.2f}% -> {row['acc_ft']:.2f}% "
                  f"({row['seconds']:.0f} s)", flush=True)
    ablation = []
    for preset in ("balanced", "smaller", "faster"):  # docs/design.md §7: the same channel count, presets compared
        model = copy.deepcopy(base)
        cop_prune(model, tuple(x.shape[1:]), ratio=cfg["ablation_channels"], metric="channels", prefer=preset)
        ablation.append({"seed": seed, "preset": preset, "params": 1 - params(model) / base_params,
                         "flops": 1 - flops(model, x) / base_flops})  # fmt: skip
    return rows, ablation


def summarise(rows: list[dict], ablation: list[dict]) -> dict:
    """Mean and std per (target, criterion); paired 95% intervals of each COP preset against every other."""
    table, pairs = [], []
    seeds = sorted({r["seed"] for r in rows})
    for target in sorted({r["target"] for r in rows}):
        sel = {m: sorted((r for r in rows if r["target"] == target and r["method"] == m), key=lambda r: r["seed"])
               for m in ["unpruned", *METHODS]}  # fmt: skip
        for method, rs in sel.items():
            if not rs:
                continue
            entry = {"target": target, "method": method, "n": len(rs)}
            for key in ("params", "flops", "acc_bn", "acc_ft"):
                values = [r[key] for r in rs]
                entry[key] = statistics.fmean(values)
                entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            table.append(entry)
        if target == 0.0 or len(seeds) < 2:
            continue
        for cop in COP:
            for other in METHODS:
                if other == cop or (other in COP and COP.index(other) < COP.index(cop)):
                    continue
                for key in ("acc_bn", "acc_ft"):
                    p = paired([r[key] for r in sel[cop]], [r[key] for r in sel[other]])
                    pairs.append({"target": target, "cop": cop, "other": other, "key": key, **p})
    presets = []
    for preset in ("balanced", "smaller", "faster"):
        sel = [a for a in ablation if a["preset"] == preset]
        presets.append({"preset": preset, "params": statistics.fmean(a["params"] for a in sel),
                        "flops": statistics.fmean(a["flops"] for a in sel), "n": len(sel)})  # fmt: skip
    return {"table": table, "pairs": pairs, "presets": presets}


def verdict(summary: dict) -> str:
    """One sentence per target, computed from the paired intervals after the fine-tune."""
    parts = []
    for target in sorted({p["target"] for p in summary["pairs"]}):
        words = []
        for other in OTHERS:
            sel = [p for p in summary["pairs"] if p["target"] == target and p["other"] == other and p["key"] == "acc_ft"]
            ahead = [p["cop"][4:] for p in sel if p["ci_low"] > 0]
            behind = [p["cop"][4:] for p in sel if p["ci_high"] < 0]
            words.append(f"vs {other}: " + ", ".join(
                ([f"ahead ({'/'.join(ahead)})"] if ahead else []) + ([f"behind ({'/'.join(behind)})"] if behind else [])
                + ([f"no detectable difference ({'/'.join(p['cop'][4:] for p in sel if p['ci_low'] <= 0 <= p['ci_high'])})"]
                   if any(p["ci_low"] <= 0 <= p["ci_high"] for p in sel) else [])))  # fmt: skip
        parts.append(f"At -{100 * target:.0f}% params, COP presets " + "; ".join(words))
    return "After the fine-tune (paired 95% intervals over seeds): " + ". ".join(parts) + "."


# ----------------------------------------------------------------------------------------------- (c) speed


def speed(repeats: int, model_name: str, size: int) -> dict:
    import torchvision

    build = lambda: torchvision.models.get_model(model_name, weights=None)  # noqa: E731
    x = torch.randn(1, 3, size, size)
    ratio = channel_ratio_for(build, x, 0.5, flops, lambda m: m.fc)
    print(f"  Torch-Pruning one-shot channel ratio for -50% FLOPs: {ratio:.3f}", flush=True)
    achieved: dict[str, list[float]] = {"cop": [], "tp-magnitude": []}
    fresh: dict = {}  # the model the next run prunes, and its FLOPs before

    def before(name: str) -> None:  # untimed: a fresh model, then Python's garbage collected
        fresh["model"] = build()
        fresh["base"] = flops(fresh["model"], x)
        gc.collect()

    def after(name: str, _, seconds: float) -> None:
        achieved[name].append(1 - flops(fresh["model"], x) / fresh["base"])
        rep = len(achieved[name]) - 1
        print(f"  speed rep {rep}: {name} {seconds:.1f} s, -{100 * achieved[name][-1]:.1f}% FLOPs", flush=True)

    steps = {"cop": lambda: cop_prune(fresh["model"], (3, size, size), ratio=0.5, metric="flops"),
             "tp-magnitude": lambda: tp_one_shot(fresh["model"], x, tp.importance.MagnitudeImportance(p=1), ratio,
                                                 fresh["model"].fc)}  # fmt: skip
    times = side_by_side(steps, repeats, order="alternate", before=before, after=after)["wall"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "size": size, "threads": torch.get_num_threads(), "times_s": times, "median_s": med,
            "ratio": med["cop"] / med["tp-magnitude"], "achieved": achieved, "tp_channel_ratio": ratio}  # fmt: skip


# ----------------------------------------------------------------------------------------------- report


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    base = [s for s in summary["table"] if s["method"] == "unpruned"]
    for ax, key, title in zip(axes, ("acc_bn", "acc_ft"), ("after BN re-estimation", "after the short fine-tune")):
        for method in METHODS:
            sel = [s for s in summary["table"] if s["method"] == method]
            ax.errorbar([100 * s["params"] for s in sel], [s[key] for s in sel], yerr=[s[key + "_std"] for s in sel],
                        marker="o", capsize=3, label=method)  # fmt: skip
        if base:
            ax.axhline(base[0]["acc_ft"], color="grey", ls="--", lw=1, label="unpruned")
        ax.set_xlabel("parameters removed (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
    axes[1].legend(fontsize=8)
    fig.suptitle("Fashion-MNIST, VGG-style 64..512: every criterion, the same protections and BN re-estimation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["# COP pruning: accuracy where its claim lives, the preset ablation, speed", "",
             f"Command: `{result['command']}`  ", f"Environment: {result['environment']}", ""]  # fmt: skip
    if "accuracy" in result:
        a, cfg = result["accuracy"], result["accuracy"]["config"]
        s = a["summary"]
        if a.get("partial"):
            lines += [f"**{a['partial']}**", ""]
        if a.get("merged"):
            lines += [a["merged"], ""]
        lines += [
            "## (a) Accuracy: Fashion-MNIST, VGG-style widths " + ", ".join(map(str, cfg["widths"])), "",
            f"{len(a['seeds'])} seeds. Each seed trains the network {cfg['epochs']} epoch(s) on {cfg['train_images']} "
            f"training images; each pruned network is fine-tuned {cfg['finetune_epochs']} epoch on the same "
            f"{cfg['finetune_images']} images in the same order (batch {cfg['finetune_batch']}, lr {cfg['finetune_lr']}). BatchNorm statistics are re-estimated on the same "
            f"{cfg['bn_batches']} training batches of {cfg['batch']} before every accuracy is read. Test: "
            f"{a['test_images']} official test images. COP: `cop_prune(metric='params')`, global greedy; L1, FPGM, "
            f"random: Torch-Pruning's one-shot `MetaPruner`, every layer by the same fraction. Only the classes are "
            f"protected, for every criterion.", "",
            "| params target | criterion | params removed | FLOPs removed | acc. after BN re-est. | acc. after fine-tune |",
            "|---|---|---|---|---|---|",
        ]  # fmt: skip
        for e in s["table"]:
            tgt = "unpruned" if e["target"] == 0 else f"-{100 * e['target']:.0f}%"
            lines.append(f"| {tgt} | {e['method']} | {100 * e['params']:.1f}% | {100 * e['flops']:.1f}% | "
                         f"{e['acc_bn']:.2f} ± {e['acc_bn_std']:.2f}% | {e['acc_ft']:.2f} ± {e['acc_ft_std']:.2f}% |")
        if s["pairs"]:
            lines += ["", "Paired differences (COP preset minus criterion, accuracy points, mean [95% t-interval] "
                      "over seeds):", "",
                      "| params target | COP preset | vs | after BN re-est. | after fine-tune |", "|---|---|---|---|---|"]
            for p in [p for p in s["pairs"] if p["key"] == "acc_bn"]:
                ft = next(q for q in s["pairs"] if q["key"] == "acc_ft" and q["target"] == p["target"]
                          and q["cop"] == p["cop"] and q["other"] == p["other"])  # fmt: skip
                lines.append(f"| -{100 * p['target']:.0f}% | {p['cop']} | {p['other']} | {interval(p)} | {interval(ft)} |")
            lines += ["", a["verdict"]]
        lines += ["", "![accuracy against parameters removed](" + result["png"] + ")", ""]
        lines += ["## (b) Preset ablation (docs/design.md §7): the same channel count", "",
                  f"`cop_prune(metric='channels', ratio={cfg['ablation_channels']})` on each seed's trained network, "
                  f"mean over {len(a['seeds'])} seeds:", "",
                  "| preset (alpha, beta, gamma) | params removed | FLOPs removed |", "|---|---|---|"]  # fmt: skip
        weights = {"balanced": "(1, 1, 1)", "smaller": "(1, 0, 3)", "faster": "(1, 3, 0)"}
        for p in s["presets"]:
            lines.append(f"| {p['preset']} {weights[p['preset']]} | {100 * p['params']:.1f}% | {100 * p['flops']:.1f}% |")
        lines += ["", "COP paper's reference results (docs/design.md §7, not measured here):", "",
                  "| setting | baseline | COP |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {s_} | {b} | {c} |" for s_, b, c in REFERENCE]
        lines += [""]
    if "speed" in result:
        sp = result["speed"]
        lines += [f"## (c) Speed: {sp['model']}, {sp['size']}x{sp['size']}, -50% FLOPs", "",
                  f"Repetitions interleaved on fresh models, garbage collected before each, {sp['threads']} "
                  f"thread(s).", "",
                  "| pruner | median time (s) | runs (s) | FLOPs removed |", "|---|---|---|---|"]  # fmt: skip
        for k, label in (("cop", "bconv cop_prune"), ("tp-magnitude", "Torch-Pruning MetaPruner + MagnitudeImportance(p=1), "
                                                         f"one shot at channel ratio {sp['tp_channel_ratio']:.3f}")):
            lines.append(f"| {label} | {sp['median_s'][k]:.2f} | {', '.join(f'{t:.2f}' for t in sp['times_s'][k])} | "
                         f"{', '.join(f'{100 * v:.1f}%' for v in sp['achieved'][k])} |")
        lines += ["", f"cop_prune / Torch-Pruning magnitude: **{sp['ratio']:.2f}x** the time (goal: within 5x).", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


# Sized for about 20 minutes on two idle cores (measured: 20,000 training steps of the full network cost ~150
# CPU-seconds, each pruned network ~10-15 CPU-seconds for BN re-estimation, two test reads and the fine-tune).
FULL = {"widths": [64, 128, 256, 512, 512], "train_images": 8000, "epochs": 2, "lr": 0.05, "batch": 128,
        "finetune_images": 1000, "finetune_epochs": 1, "finetune_lr": 0.01, "finetune_batch": 64, "bn_batches": 8,
        "test_per_class": 200, "targets": [0.5, 0.7, 0.9], "ablation_channels": 0.5}  # fmt: skip
QUICK = {**FULL, "widths": [8, 16, 32, 64, 64], "train_images": 100, "epochs": 1, "finetune_images": 50, "batch": 25,
         "finetune_batch": 25, "bn_batches": 2, "test_per_class": 5, "targets": [0.5, 0.9]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("accuracy", "speed", "both"), default="both")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST's IDX files (default: the Debian package's)")
    p.add_argument("--quick", action="store_true", help="a tiny network and data: checks the script, measures nothing")
    p.add_argument("--repeats", type=positive_int, default=5, help="speed: repetitions of each pruner")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the accuracy part")
    p.add_argument("--speed-threads", type=int, default=1,
                   help="torch threads of the speed part (one: no waits for a second core on a shared machine)")
    p.add_argument("--out", type=Path, default=RESULTS / "prune", help="results path without suffix")
    p.add_argument("--report-from", type=Path, nargs="+", default=None, metavar="ROWS",
                   help="only write the report from the seeds earlier runs finished: an interrupted run's "
                        ".rows.json or a finished run's .json, several to merge runs of other seeds (each run's "
                        "command and commit are named); marked partial if the seeds fall short")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {"command": command("prune", argv), "environment": environment(), "png": args.out.name + ".png"}
    if args.report_from is not None:
        return report_partial(args, result)
    if args.part in ("accuracy", "both"):
        cfg = QUICK if args.quick else FULL
        train, test = load(args.data_dir)
        keep = torch.cat([torch.nonzero(test.y == c).flatten()[: cfg["test_per_class"]] for c in range(10)])
        test = test.take(keep)
        x = torch.randn(1, *train.x.shape[1:])
        ratios = {t: channel_ratio_for(lambda: VGGStyle(cfg["widths"]), x, t, lambda m, x: params(m),
                                       lambda m: m.classifier[-1]) for t in cfg["targets"]}  # fmt: skip
        rows, ablation = [], []
        for seed in args.seeds:
            r, a = run_seed(seed, train, test, cfg, ratios)
            rows += r
            ablation += a
            # Each finished seed is kept, so an interrupted run leaves what it measured (never the report).
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".rows.json").write_text(json.dumps(
                {"command": result["command"], "commit": result["environment"]["commit"], "seeds": args.seeds,
                 "rows": rows, "ablation": ablation}, indent=1))  # fmt: skip
        summary = summarise(rows, ablation)
        result["accuracy"] = {"config": cfg, "seeds": args.seeds, "test_images": len(test), "channel_ratios": ratios,
                              "rows": rows, "ablation": ablation, "summary": summary,
                              "verdict": verdict(summary) if summary["pairs"] else ""}  # fmt: skip
        plot(summary, args.out.with_suffix(".png"))
    if args.part in ("speed", "both"):
        torch.set_num_threads(args.speed_threads)
        result["speed"] = speed(1 if args.quick else args.repeats, "resnet18" if args.quick else "resnet50",
                                64 if args.quick else 224)  # fmt: skip
    result["environment"]["load_after"] = environment()["load"]
    write(result, args.out)
    args.out.with_suffix(".rows.json").unlink(missing_ok=True)
    return result


def _saved_run(path: Path) -> dict:
    """The seeds' rows a run left: its ``.rows.json`` (interrupted) or its results ``.json`` (finished)."""
    saved = json.loads(path.read_text())
    if "accuracy" in saved:  # a finished run's results
        a = saved["accuracy"]
        saved = {"command": saved["command"], "commit": saved["environment"].get("commit"),
                 "seeds": a["seeds"], "rows": a["rows"], "ablation": a["ablation"]}  # fmt: skip
    if not saved.get("rows"):
        raise SystemExit(f"{path}: no rows of finished seeds in it")
    return saved


def report_partial(args: argparse.Namespace, result: dict) -> dict:
    """The report of the seeds earlier runs finished, saying which seeds of which command (and commit) it holds."""
    runs = [_saved_run(path) for path in args.report_from]
    rows = [r for run in runs for r in run["rows"]]
    ablation = [r for run in runs for r in run["ablation"]]
    by_seed = collections.Counter(r["seed"] for r in rows if r["method"] == "unpruned")
    if any(n > 1 for n in by_seed.values()):
        raise SystemExit(f"the runs overlap: seeds {sorted(s for s, n in by_seed.items() if n > 1)} are in more than one")
    cfg = QUICK if args.quick else FULL
    seeds = sorted(by_seed)
    asked = runs[0].get("seeds", [0, 1, 2, 3, 4]) if len(runs) == 1 else [0, 1, 2, 3, 4]
    summary = summarise(rows, ablation)
    result["accuracy"] = {"config": cfg, "seeds": seeds, "test_images": 10 * cfg["test_per_class"], "rows": rows,
                          "ablation": ablation, "summary": summary,
                          "verdict": verdict(summary) if summary["pairs"] else ""}  # fmt: skip
    origin = "; ".join(
        f"seeds {sorted({r['seed'] for r in run['rows']})} from `{run.get('command', 'python -m benchmarks.prune')}`"
        + (f" at commit {run['commit']}" if run.get("commit") else "")
        for run in runs
    )
    if not set(asked) <= set(seeds):
        run = runs[0].get("command", "python -m benchmarks.prune")
        result["accuracy"]["partial"] = (
            f"PARTIAL: `{run}` was stopped after {len(seeds)} of its {len(asked)} seeds (finished: {seeds}); "
            f"these are the finished seeds' rows, not the full run."
            + (f" Merged from: {origin}." if len(runs) > 1 else "")
        )
    else:
        result["accuracy"]["merged"] = (f"Merged from {len(runs)} runs of the same configuration: {origin}."
                                        if len(runs) > 1 else f"Reported from the rows of {origin}.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(summary, args.out.with_suffix(".png"))
    write(result, args.out)
    return result


if __name__ == "__main__":
    main()
