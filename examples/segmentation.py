"""Semantic segmentation with PTL: a torchvision segmentation network wrapped whole, trained on its output dict.

The stages are the backbone's; the segmentation head (``classifier``, ``aux_classifier``) is head, never a stage,
and only the last paired stage's output is replaced, so the decoder reads what it always read plus the ladder.

    python examples/segmentation.py --data DIR        # DIR/images/NAME.png with DIR/masks/NAME.png (class ids)
    python examples/segmentation.py --fake-data 64    # generated shapes on a background, nothing to download
    python examples/segmentation.py --fake-data 64 --model fcn_resnet50 --image-size 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from tqdm import tqdm

import bconv


class MaskFolder(torch.utils.data.Dataset):
    """``DIR/images/NAME.png`` with ``DIR/masks/NAME.png``, whose pixel values are class ids."""

    def __init__(self, root: str, size: int):
        self.images = sorted(Path(root, "images").glob("*.png"))
        self.masks = [Path(root, "masks", p.name) for p in self.images]
        self.size = size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = Image.open(self.images[i]).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        mask = Image.open(self.masks[i]).resize((self.size, self.size), Image.NEAREST)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        return (x - 0.45) / 0.225, torch.from_numpy(np.asarray(mask, dtype=np.int64))


class Shapes(torch.utils.data.Dataset):
    """Generated images: a rectangle of class k (1..classes-1) in its own colour on background 0, with noise."""

    def __init__(self, n: int, size: int, classes: int, seed: int = 0):
        self.n, self.size, self.classes, self.seed = n, size, classes, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        k = int(torch.randint(1, self.classes, (), generator=g))
        y0, x0 = torch.randint(0, self.size // 2, (2,), generator=g).tolist()
        h, w = torch.randint(self.size // 4, self.size // 2, (2,), generator=g).tolist()
        mask = torch.zeros(self.size, self.size, dtype=torch.int64)
        mask[y0 : y0 + h, x0 : x0 + w] = k
        colours = torch.linspace(-1, 1, self.classes)
        x = colours[mask].expand(3, -1, -1).clone() * torch.tensor([1.0, -1.0, 0.5]).view(3, 1, 1)
        return x + 0.3 * torch.randn(x.shape, generator=g), mask


def mean_iou(model, loader, classes: int) -> float:
    model.eval()
    inter, union = torch.zeros(classes), torch.zeros(classes)
    with torch.no_grad():
        for x, mask in loader:
            pred = model(x)["out"].argmax(1)
            for k in range(classes):
                inter[k] += ((pred == k) & (mask == k)).sum()
                union[k] += ((pred == k) | (mask == k)).sum()
    seen = union > 0
    return (inter[seen] / union[seen]).mean().item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="a folder with images/ and masks/ (PNG, same names, mask values = class ids)")
    data.add_argument("--fake-data", type=int, metavar="N", help="N generated training images instead")
    p.add_argument("--classes", type=int, default=4, help="classes including the background (default: 4)")
    p.add_argument("--model", default="lraspp_mobilenet_v3_large", help="a torchvision segmentation model")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out", default="segmentation_ptl.pt", help="the final weights (load with bconv.load_ptl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    if args.data:
        dataset = MaskFolder(args.data, args.image_size)
        val_size = max(len(dataset) // 5, 1)
        train_set, val_set = torch.utils.data.random_split(dataset, [len(dataset) - val_size, val_size])
    else:
        train_set = Shapes(args.fake_data, args.image_size, args.classes, seed=args.seed)
        val_set = Shapes(max(args.fake_data // 4, 1), args.image_size, args.classes, seed=args.seed + 1)
    loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size)

    # weights_backbone=None as well as weights=None: a segmentation builder fetches an ImageNet backbone by default
    network = torchvision.models.get_model(args.model, weights=None, weights_backbone=None, num_classes=args.classes)
    model = bconv.wrap_with_ptl(network, input_size=(3, args.image_size, args.image_size))
    print("paired stages:", ", ".join(s.name for s in model.stages))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    for epoch in range(args.epochs):
        model.reset_state()
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=args.no_progress)
        for x, mask in bar:
            out = model(x)  # the network's own output dict: "out" (and "aux" where it has one)
            loss = F.cross_entropy(out["out"], mask)
            if "aux" in out:
                loss = loss + 0.5 * F.cross_entropy(out["aux"], mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.detach_state()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        print(f"epoch {epoch}: validation mIoU {mean_iou(model, val_loader, args.classes):.3f}")
    usage = bconv.ladder_usage(model, x, mask, loss_fn=lambda out, m: F.cross_entropy(out["out"], m))
    print(f"ladder output share {usage.output_share:.2e}, state effect {usage.state_effect:.2e}")
    torch.save(model.state_dict(), args.out)
    return {"miou": mean_iou(model, val_loader, args.classes), "usage": usage, "model": model}


if __name__ == "__main__":
    main(sys.argv[1:])
