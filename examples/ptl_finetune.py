"""Fine-tune a timm or torchvision network with PTL on an image folder, and resume exactly after an interruption.

Everything a real run has: data from disk, a progress bar, the ladder diagnostic logged as it trains, evaluation,
a checkpoint every N steps that holds what an exact mid-epoch resume needs (weights and wrap options, the cells'
latent state, optimizer, scheduler, RNG states, the position in the epoch), and the final weights.

    python examples/ptl_finetune.py --data DIR            # DIR/train/CLASS/*.png and DIR/val/CLASS/*.png
    python examples/ptl_finetune.py --fake-data 256       # torchvision's FakeData: no files needed
    python examples/ptl_finetune.py --data DIR --model timm:convnext_tiny --pretrained --image-size 224

Run the same command again after an interruption: it goes on from ``--checkpoint`` exactly where the interrupted
run was (bitwise on the same machine and thread count). ``--pretrained`` downloads the network's weights; without
it the network starts from random weights (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision import datasets, transforms
from tqdm import tqdm

import bconv


def add_common_arguments(p: argparse.ArgumentParser, epochs: bool = True) -> None:
    """The data, model and optimizer options every example takes (``--help`` lists them)."""
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="a folder with train/ and val/ image folders (one subfolder per class)")
    data.add_argument("--fake-data", type=int, metavar="N", help="N generated training images instead (FakeData)")
    p.add_argument("--classes", type=int, default=10, help="classes of --fake-data (default: 10)")
    p.add_argument("--model", default="torchvision:resnet18", help="timm:NAME or torchvision:NAME")
    p.add_argument("--pretrained", action="store_true", help="start from pre-trained weights (a download)")
    p.add_argument("--image-size", type=int, default=224)
    if epochs:
        p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def build_network(name: str, classes: int, pretrained: bool) -> torch.nn.Module:
    """``timm:NAME`` or ``torchvision:NAME`` (a bare name: torchvision), with a new classifier for ``classes``."""
    zoo, _, arch = name.rpartition(":")
    if zoo == "timm":
        import timm

        return timm.create_model(arch, pretrained=pretrained, num_classes=classes)
    net = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None)
    head = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)][-1]  # the classifier: fc, ...
    old = net.get_submodule(head)
    parent, _, attr = head.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, torch.nn.Linear(old.in_features, classes))
    return net


def datasets_from(args) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, int]:
    """Training and validation sets: an image folder, or FakeData through the same transforms."""
    size = args.image_size
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    val_tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                                 normalize])  # fmt: skip
    train_tf = val_tf if getattr(args, "no_augment", False) else transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.6, 1.0)), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        normalize])  # fmt: skip
    if args.fake_data:
        n, classes = args.fake_data, args.classes
        train = datasets.FakeData(n, (3, size, size), classes, transform=train_tf, random_offset=0)
        val = datasets.FakeData(max(n // 4, 1), (3, size, size), classes, transform=val_tf, random_offset=n)
        return train, val, classes
    train = datasets.ImageFolder(os.path.join(args.data, "train"), transform=train_tf)
    val = datasets.ImageFolder(os.path.join(args.data, "val"), transform=val_tf)
    return train, val, len(train.classes)


def rng_state() -> dict:
    name, keys, *rest = np.random.get_state()  # numpy's array as a list: weights_only=True reads it
    return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), *rest], "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> float:
    model.eval()  # eval: zero state, the training history neither read nor written
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    p.add_argument("--checkpoint", default="run.pt", help="written every --checkpoint-every steps; resumed if present")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS")
    p.add_argument("--log-usage-every", type=int, default=50, metavar="STEPS", help="ladder_usage every N steps")
    p.add_argument("--log", default="ladder_usage.jsonl", help="where the ladder diagnostic goes, one JSON line each")
    p.add_argument("--out", default="ptl.pt", help="the final weights (load with bconv.load_ptl)")
    p.add_argument("--stop-after", type=int, metavar="STEPS", help="simulate an interruption: stop after this many "
                   "steps of this run, right after a checkpoint")  # fmt: skip
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    train_set, val_set, classes = datasets_from(args)
    loader_rng = torch.Generator().manual_seed(args.seed)  # the data order comes from this generator only
    loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, generator=loader_rng,
                                         num_workers=args.workers, drop_last=True)  # fmt: skip
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size, num_workers=args.workers)

    ckpt = torch.load(args.checkpoint, weights_only=True) if os.path.exists(args.checkpoint) else None
    network = build_network(args.model, classes, args.pretrained and ckpt is None)
    input_size = (3, args.image_size, args.image_size)
    model = bconv.load_ptl(network, ckpt["model"]) if ckpt else bconv.wrap_with_ptl(network, input_size=input_size)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(loader))
    start, done = (ckpt["epoch"], ckpt["step"]) if ckpt else (0, 0)
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        print(f"resuming from {args.checkpoint}: epoch {start}, {done} batches of it done")

    steps_this_run, accuracy = 0, None
    for epoch in range(start, args.epochs):
        resuming = ckpt is not None and epoch == start
        if resuming:
            loader_rng.set_state(ckpt["loader_rng"])  # the interrupted epoch's permutation, again
        epoch_rng = loader_rng.get_state()
        batches = iter(loader)
        if resuming:
            for _ in range(done):
                next(batches)  # skip the batches already trained on
            model.load_latent_state_dict(ckpt["latent"])  # the cells' state at the interruption
            set_rng_state(ckpt["rng"])
        else:
            model.reset_state()  # forget the last epoch's history (the paper does this)
        model.train()
        first = done if resuming else 0
        bar = tqdm(batches, total=len(loader), initial=first, desc=f"epoch {epoch}", disable=args.no_progress)
        for step, (x, y) in enumerate(bar, start=first):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            model.detach_state()  # cut the graph to the previous batch
            global_step = epoch * len(loader) + step + 1
            if global_step % args.log_usage_every == 0:
                usage = bconv.ladder_usage(model, x, y)  # the model is left exactly as it was
                with open(args.log, "a") as f:
                    f.write(json.dumps({"epoch": epoch, "step": global_step, **usage.as_dict()}) + "\n")
                bar.set_postfix(loss=f"{loss.item():.3f}", share=f"{usage.output_share:.1e}")
            steps_this_run += 1
            stopping = args.stop_after is not None and steps_this_run >= args.stop_after
            if global_step % args.checkpoint_every == 0 or stopping:
                torch.save({"model": model.state_dict(),  # weights and wrap options
                            "latent": model.latent_state_dict(),  # every cell's state
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "epoch": epoch, "step": step + 1,  # batches of this epoch done
                            "loader_rng": epoch_rng, "rng": rng_state()}, args.checkpoint)  # fmt: skip
            if stopping:
                bar.close()
                print(f"stopped after {steps_this_run} steps; run the same command again to resume")
                return {"stopped": True}
        accuracy = evaluate(model, val_loader)
        print(f"epoch {epoch}: validation accuracy {accuracy:.3f}")

    torch.save(model.state_dict(), args.out)  # later: bconv.load_ptl(build_network(...), torch.load(args.out))
    if os.path.exists(args.checkpoint):
        os.remove(args.checkpoint)  # the run is complete: a rerun starts afresh
    print(f"final weights in {args.out}")
    return {"stopped": False, "accuracy": accuracy}


if __name__ == "__main__":
    main(sys.argv[1:])
