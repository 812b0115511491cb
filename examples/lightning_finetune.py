"""Fine-tune a timm or torchvision network with PTL under Lightning; resume exactly after an interruption.

Lightning owns the loop, the progress bar and the checkpoint; ``PTLCallback`` resets the cells' state every epoch,
detaches it after every optimizer step, saves it in Lightning's checkpoint and logs ``bconv.ladder_usage`` to the
Trainer's loggers (here a CSV file: ``LOGDIR/version_0/metrics.csv``, columns ``bconv/...``).

    pip install -e ".[lightning]"
    python examples/lightning_finetune.py --data DIR            # DIR/train/CLASS/*.png and DIR/val/CLASS/*.png
    python examples/lightning_finetune.py --fake-data 256

Run the same command again after an interruption: ``fit(ckpt_path="last")`` goes on from ``CKPTDIR/last.ckpt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torchdata.stateful_dataloader import StatefulDataLoader

import bconv
from bconv.integrations.lightning import PTLCallback

sys.path.insert(0, str(Path(__file__).parent))
from ptl_finetune import add_common_arguments, build_network, datasets_from  # noqa: E402  (shared)


class Classifier(L.LightningModule):
    def __init__(self, network: torch.nn.Module, input_size: tuple[int, int, int], lr: float, epochs: int):
        super().__init__()
        self.net = bconv.wrap_with_ptl(network, input_size=input_size)  # PTLCallback finds it anywhere in the module
        self.lr, self.epochs = lr, epochs

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch  # eval mode: zero state, the training history neither read nor written
        self.log("val/accuracy", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)]


def main(argv: list[str] | None = None) -> L.Trainer:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS")
    p.add_argument("--log-usage-every", type=int, default=50, metavar="STEPS", help="ladder_usage every N steps")
    p.add_argument("--dir", default="lightning_run", help="checkpoints in DIR/checkpoints, logs in DIR/logs")
    args = p.parse_args(argv)

    L.seed_everything(args.seed)
    train_set, val_set, classes = datasets_from(args)
    loader = StatefulDataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True)
    val_loader = StatefulDataLoader(val_set, args.batch_size, num_workers=args.workers)
    model = Classifier(build_network(args.model, classes, args.pretrained),
                       (3, args.image_size, args.image_size), args.lr, args.epochs)  # fmt: skip
    checkpoints = ModelCheckpoint(dirpath=Path(args.dir, "checkpoints"), every_n_train_steps=args.checkpoint_every,
                                  save_last=True)  # fmt: skip
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[PTLCallback(log_every_n_steps=args.log_usage_every), checkpoints],
        logger=CSVLogger(Path(args.dir, "logs"), name=""), log_every_n_steps=1,
        enable_progress_bar=not args.no_progress, enable_model_summary=False,
    )  # fmt: skip
    last = Path(args.dir, "checkpoints", "last.ckpt")
    trainer.fit(model, loader, val_loader, ckpt_path="last" if last.exists() else None)  # fresh, or goes on
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
