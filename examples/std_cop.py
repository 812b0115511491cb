"""PTL -> STD -> COP -> STD: a PTL teacher, distilled into a plain student, pruned, fine-tuned, saved and reloaded.

The network you deploy has no cells: Student-Teacher Distillation (PTL paper §IV) carries the PTL model's gain into a
plain backbone, COP pruning (``bconv.prune``) makes that student smaller or faster, its BatchNorm statistics are
re-estimated, and a short distillation fine-tune recovers what pruning cost. The pruned student is saved as weights
plus Torch-Pruning's history (no pickle) and rebuilt from a fresh network.

    python examples/std_cop.py --data DIR              # DIR/train/CLASS/*.png and DIR/val/CLASS/*.png
    python examples/std_cop.py --fake-data 256 --prune 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import bconv
from bconv.distill import STDTrainer
from bconv.prune import cop_prune, format_report, load_pruned, reestimate_batchnorm, save_pruned

sys.path.insert(0, str(Path(__file__).parent))
from ptl_finetune import add_common_arguments, build_network, datasets_from, evaluate  # noqa: E402


def train_ptl(model: bconv.PTLModel, loader, epochs: int, lr: float, progress: bool) -> None:
    """The teacher: the plain PTL loop (reset every epoch, detach after every step)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs):
        model.reset_state()
        model.train()
        for x, y in tqdm(loader, desc=f"teacher epoch {epoch}", disable=not progress):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.detach_state()


def distil(student, teacher, loader, epochs: int, lr: float, input_size, progress: bool, what: str) -> None:
    """STD (paper Eq. 4): (1 - lam) CE + lam L1 between the pooled features of student and teacher."""
    trainer = STDTrainer(student, teacher=teacher, lam=0.8, input_size=input_size)
    optimizer = torch.optim.SGD(trainer.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)  # student + projection
    for epoch in range(epochs):
        bar = tqdm(loader, desc=f"{what} epoch {epoch}", disable=not progress)
        for x, y in bar:
            step = trainer.step(x, y, optimizer)  # step.loss, step.ce, step.l1 (detached)
            bar.set_postfix(ce=f"{step.ce.item():.3f}", l1=f"{step.l1.item():.3f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p, epochs=False)  # --model: the teacher's and the student's network
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--std-epochs", type=int, default=5)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--prune", type=float, default=0.5, metavar="RATIO", help="fraction of FLOPs to remove")
    p.add_argument("--out", default="pruned.pt", help="the pruned student (load with bconv.prune.load_pruned)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train_set, val_set, classes = datasets_from(args)
    loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size)
    input_size = (3, args.image_size, args.image_size)
    progress = not args.no_progress

    teacher = bconv.wrap_with_ptl(build_network(args.model, classes, args.pretrained), input_size=input_size)
    train_ptl(teacher, loader, args.teacher_epochs, args.lr, progress)
    student = build_network(args.model, classes, args.pretrained)
    distil(student, teacher, loader, args.std_epochs, args.lr, input_size, progress, "STD")
    accuracy = {"teacher": evaluate(teacher, val_loader), "student": evaluate(student, val_loader)}

    # keep_feature_width: the pruned student's pooled feature keeps the teacher's width, so STD needs no projection
    result = cop_prune(student, input_size, ratio=args.prune, metric="flops", keep_feature_width=True)
    print(format_report(result.report, bconv.anatomy(student, input_size).stages))
    reestimate_batchnorm(student, loader, max_batches=20)  # before reading any accuracy of a pruned network
    accuracy["pruned"] = evaluate(student, val_loader)
    distil(student, teacher, loader, args.finetune_epochs, args.lr / 10, input_size, progress, "fine-tune")
    accuracy["pruned + fine-tune"] = evaluate(student, val_loader)

    save_pruned(result, args.out)  # weights + Torch-Pruning's history, no pickle
    deployed = load_pruned(build_network(args.model, classes, pretrained=False), args.out)
    accuracy["reloaded"] = evaluate(deployed, val_loader)
    for name, value in accuracy.items():
        print(f"{name:>18}: validation accuracy {value:.3f}")
    return {"accuracy": accuracy, "report": result.report, "student": student, "deployed": deployed}


if __name__ == "__main__":
    main(sys.argv[1:])
