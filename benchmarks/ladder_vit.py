"""The ladder on a token backbone: plain fine-tuning of a small ViT against PTL, across learning rates.

The task of :mod:`benchmarks.ladder` (scikit-learn's digits, bundled: pre-train on 0-4, fine-tune on 5-9
with 300 training images and a new classifier) on timm's own ``VisionTransformer``, built small: 16x16
images in 4x4-pixel patches (a 4x4 grid and a class token), 6 blocks of width 64 with 4 heads. It is
trained as ViTs are fine-tuned: AdamW (weight decay 0.05), batch 32, the cells' state reset every epoch and
detached after every step. PTL pairs the default stages: 4 evenly spaced blocks whose grid reaches the
logits (the class token reads the last block, so ``blocks.5``'s grid never reaches them; the results
name the blocks paired). Reported as in :mod:`benchmarks.ladder`: last-epoch loss, the largest loss after the first step,
held-out accuracy and :func:`bconv.ladder_usage` after the fine-tune.

Reproduce::

    python -m benchmarks.ladder_vit                # writes benchmarks/results/ladder_vit.{md,json}
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import bconv
from benchmarks.common import RESULTS, command, digits, ladder_table, run_record, target_split, train, write_results

SIZE = (3, 16, 16)
CONDITIONS = ("plain", "ptl")


def small_vit(classes: int = 5) -> VisionTransformer:
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=6, num_heads=4, num_classes=classes)


@functools.lru_cache(maxsize=1)
def pretrained_state() -> dict[str, torch.Tensor]:
    x, y = digits()
    torch.manual_seed(0)
    net = small_vit()
    train(net, x[y < 5], y[y < 5], lr=1e-3, epochs=30, seed=0, adamw=True)
    return {k: v.clone() for k, v in net.state_dict().items()}


def fresh_pretrained(seed: int) -> VisionTransformer:
    net = small_vit()
    net.load_state_dict(pretrained_state())
    torch.manual_seed(seed)
    net.head = nn.Linear(64, 5)  # the new task's classifier
    return net


def run(lr: float, seed: int, condition: str, epochs: int) -> dict:
    """One fine-tune; its losses, held-out accuracy and (PTL) ladder usage."""
    (xt, yt), (xv, yv) = target_split(seed)
    model: nn.Module = fresh_pretrained(seed)
    if condition == "ptl":
        model = bconv.wrap_with_ptl(model, input_size=SIZE)
    losses = train(model, xt, yt, lr, epochs, seed, ptl=condition == "ptl", adamw=True)
    with torch.no_grad():
        accuracy = (model.eval()(xv).argmax(1) == yv).float().mean().item()
    row = dict(lr=lr, seed=seed, condition=condition, accuracy=accuracy,
               final_loss=statistics.mean(losses[-len(losses) // epochs :]), max_loss=max(losses[1:]))  # fmt: skip
    if condition == "ptl":
        row["stages"] = list(model.config.stages)
        with torch.no_grad():
            model.train()(xt[-32:])  # a history for the state effect
        row.update(bconv.ladder_usage(model, xt[:64], yt[:64]).as_dict())
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "ladder_vit"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    made = run_record(command("ladder_vit", argv))
    start = time.perf_counter()
    x, y = digits()
    pre = small_vit()
    pre.load_state_dict(pretrained_state())
    with torch.no_grad():
        source_accuracy = (pre.eval()(x[y < 5]).argmax(1) == y[y < 5]).float().mean().item()
    rows = [run(lr, seed, c, args.epochs) for lr in args.lrs for seed in range(args.seeds) for c in CONDITIONS]
    seconds = time.perf_counter() - start
    stages = next(r["stages"] for r in rows if r["condition"] == "ptl")
    text = [
        "# The ladder on a small ViT across learning rates: plain fine-tuning against PTL",
        "",
        f"Made by `{made['command']}` in {seconds:.0f} s. timm's VisionTransformer at 16x16 px (4-pixel patches, "
        f"6 blocks of width 64, a class token), pre-trained on digits 0-4 (training accuracy {source_accuracy:.3f}), "
        f"fine-tuned on 5-9 (300 training images, the rest held out) for {args.epochs} epochs with AdamW (weight "
        f"decay 0.05), batch 32; mean ± std over {args.seeds} seeds. PTL pairs the default stages {', '.join(stages)}. "
        "Shares and state effect from `bconv.ladder_usage` after the fine-tune.",
        "",
        *ladder_table(rows, args.lrs, CONDITIONS),
    ]
    write_results(Path(args.out), {"run": made, "rows": rows, "seconds": seconds}, text)
    print("\n".join(text))


if __name__ == "__main__":
    main()
