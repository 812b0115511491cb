"""Is the ladder stable and alive across learning rates? Plain fine-tuning against PTL, side by side.

A small real transfer task: pre-train on scikit-learn's digits 0-4 (bundled, nothing is downloaded;
the 8x8 images upsampled to 16x16 RGB), then fine-tune on digits 5-9 with a new classifier, as a new
user fine-tunes: SGD with momentum 0.9 and weight decay 5e-4, batch 32, the state reset every epoch
and detached after every step. The network is a user's own small CNN with BatchNorm, three stages at
reductions 2, 4 and 8. For each learning rate and seed, from the same pre-trained weights and the
same batches: plain fine-tuning, PTL with the default (function-preserving) start and PTL with the
paper's start. Reported: the last epoch's mean training loss, the largest training loss after the
first step, held-out accuracy, and :func:`bconv.ladder_usage` after the fine-tune (the cells' share of
the replaced stage output and of the logits, the effect of the carried state).

``--trajectory`` measures instead how the ladder wakes up: ``bconv.ladder_usage`` on the same fixed batch
after every one of the first optimizer steps and at the end of every epoch, for the default start, the
paper's start and a frozen ladder (its parameters never trained: what a ladder that learns nothing reads).
It is what the diagnostic's guidance (docs/guides/ptl-loop.md, "Is the ladder doing anything?") stands on.

``tests/test_ladder.py`` runs the same task (3 seeds, 8 epochs) and asserts its margins. Reproduce::

    python -m benchmarks.ladder                    # writes benchmarks/results/ladder.{md,json}
    python -m benchmarks.ladder --trajectory       # writes benchmarks/results/ladder_trajectory.{md,json}
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bconv
from benchmarks.common import RESULTS, command, digits, ladder_table, run_record, target_split, train, write_results


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class SmallNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.stage1, self.stage2, self.stage3 = _block(3, 16), _block(16, 32), _block(32, 64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.stage3(self.stage2(self.stage1(x))).mean((2, 3)))


@functools.lru_cache(maxsize=1)
def pretrained_state() -> dict[str, torch.Tensor]:
    x, y = digits()
    torch.manual_seed(0)
    net = SmallNet()
    train(net, x[y < 5], y[y < 5], lr=0.05, epochs=4, seed=0)
    return {k: v.clone() for k, v in net.state_dict().items()}


def fresh_pretrained(seed: int) -> SmallNet:
    net = SmallNet()
    net.load_state_dict(pretrained_state())
    torch.manual_seed(seed)
    net.fc = nn.Linear(64, 5)  # the new task's classifier
    return net


CONDITIONS = {"plain": None, "ptl": "identity", "ptl_paper": "paper"}


def run(lr: float, seed: int, condition: str, epochs: int) -> dict:
    """One fine-tune; its losses, held-out accuracy and (PTL) ladder usage."""
    (xt, yt), (xv, yv) = target_split(seed)
    model = fresh_pretrained(seed)
    init = CONDITIONS[condition]
    if init is not None:
        model = bconv.wrap_with_ptl(model, input_size=(3, 16, 16), final_init=init)
    losses = train(model, xt, yt, lr, epochs, seed, ptl=init is not None)
    with torch.no_grad():
        accuracy = (model.eval()(xv).argmax(1) == yv).float().mean().item()
    row = dict(lr=lr, seed=seed, condition=condition, accuracy=accuracy,
               final_loss=statistics.mean(losses[-len(losses) // epochs :]), max_loss=max(losses[1:]))  # fmt: skip
    if init is not None:
        with torch.no_grad():
            model.train()(xt[-32:])  # a history for the state effect
        row.update(bconv.ladder_usage(model, xt[:64], yt[:64]).as_dict())
    return row


TRAJECTORY = {"ptl": ("identity", True), "ptl_paper": ("paper", True), "frozen": ("identity", False)}


def trajectory(lr: float, seed: int, condition: str, epochs: int, first_steps: int = 10) -> list[dict]:
    """``ladder_usage`` on one fixed training batch at step 0, after each of the first ``first_steps``
    optimizer steps, and after every epoch: the output share as it grows from a fresh wrap."""
    (xt, yt), _ = target_split(seed)
    init, trained = TRAJECTORY[condition]
    model = bconv.wrap_with_ptl(fresh_pretrained(seed), input_size=(3, 16, 16), final_init=init)
    if not trained:
        model.ptl.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    probe = (xt[:64], yt[:64])
    points = [dict(step=0, epoch=0, **bconv.ladder_usage(model, *probe).as_dict())]
    step = 0
    for epoch in range(1, epochs + 1):
        model.reset_state()
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt) - 32 + 1, 32):
            idx = perm[i : i + 32]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.detach_state()
            step += 1
            if step <= first_steps:
                points.append(dict(step=step, epoch=epoch, **bconv.ladder_usage(model, *probe).as_dict()))
        points.append(dict(step=step, epoch=epoch, end_of_epoch=True, **bconv.ladder_usage(model, *probe).as_dict()))
    return [dict(lr=lr, seed=seed, condition=condition, **p) for p in points]


def _trajectory_table(rows: list[dict], lrs: list[float]) -> list[str]:
    """Output share (median and range over seeds) per measuring point, a column per lr and condition."""
    columns = [(lr, c) for lr in lrs for c in TRAJECTORY]
    keys = sorted({(r["step"], r.get("end_of_epoch", False), r["epoch"]) for r in rows})
    lines = [
        "| step | " + " | ".join(f"{c} lr {lr}" for lr, c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for step, end, epoch in keys:
        cells = []
        for lr, c in columns:
            v = sorted(r["output_share"] for r in rows if r["lr"] == lr and r["condition"] == c
                       and r["step"] == step and r.get("end_of_epoch", False) == end)  # fmt: skip
            cells.append(f"{statistics.median(v):.1e} [{v[0]:.1e}, {v[-1]:.1e}]" if v else "-")
        label = f"{step} (end of epoch {epoch})" if end else str(step)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main_trajectory(args, argv) -> None:
    made = run_record(command("ladder", argv))
    start = time.perf_counter()
    rows = [p for lr in args.lrs for seed in range(args.seeds) for c in TRAJECTORY
            for p in trajectory(lr, seed, c, args.epochs)]  # fmt: skip
    seconds = time.perf_counter() - start
    steps_per_epoch = 300 // 32
    text = [
        "# How the ladder wakes up: output share over the first steps and epochs",
        "",
        f"Made by `{made['command']}` in {seconds:.0f} s. The task of `python -m benchmarks.ladder` (digits 0-4 "
        f"pre-training, 5-9 fine-tuning, 300 training images, batch 32: {steps_per_epoch} optimizer steps per "
        f"epoch), {args.epochs} epochs, {args.seeds} seeds. Each cell: `bconv.ladder_usage(model, x, y).output_share` "
        "on the same 64 training images, median [min, max] over the seeds, after that many optimizer steps "
        "(0: right after `wrap_with_ptl`). `ptl`: the default start; `ptl_paper`: `final_init=\"paper\"`; "
        "`frozen`: the default start with the ladder's parameters never trained (`model.ptl.requires_grad_(False)`), "
        "what a ladder that learns nothing reads.",
        "",
        *_trajectory_table(rows, args.lrs),
    ]
    write_results(Path(args.out), {"run": made, "rows": rows, "seconds": seconds}, text)
    print("\n".join(text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default=None, help="results file prefix (default: benchmarks/results/ladder"
                        " or ladder_trajectory)")
    parser.add_argument("--trajectory", action="store_true", help="the output share over the first steps and epochs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.trajectory:
        args.out = args.out or str(RESULTS / "ladder_trajectory")
        return main_trajectory(args, argv)
    args.out = args.out or str(RESULTS / "ladder")
    made = run_record(command("ladder", argv))
    start = time.perf_counter()
    rows = [run(lr, seed, c, args.epochs) for lr in args.lrs for seed in range(args.seeds) for c in CONDITIONS]
    seconds = time.perf_counter() - start
    text = [
        "# The ladder across learning rates: plain fine-tuning against PTL",
        "",
        f"Made by `{made['command']}` in {seconds:.0f} s. Digits 0-4 pre-training, 5-9 "
        f"fine-tuning (300 training images, the rest held out), {args.epochs} epochs, SGD momentum 0.9, weight "
        f"decay 5e-4, batch 32; mean ± std over {args.seeds} seeds. Shares and state effect from "
        "`bconv.ladder_usage` after the fine-tune (a dormant ladder's output share is about 1e-4).",
        "",
        *ladder_table(rows, args.lrs, CONDITIONS),
    ]
    write_results(Path(args.out), {"run": made, "rows": rows, "seconds": seconds}, text)
    print("\n".join(text))


if __name__ == "__main__":
    main()
