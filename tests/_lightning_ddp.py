"""A Lightning run under DDP (two CPU processes, gloo), for the per-rank latent state test (test_lightning.py).

Lightning's ``ddp`` strategy starts the second rank by running this script again, so it is a script::

    python tests/_lightning_ddp.py OUT PHASE

PHASE ``full`` trains 3 epochs; ``stopped`` writes a checkpoint at optimizer step 4 (epoch 1, after its
first of 3 batches per rank) and stops there; ``resumed`` goes on from that checkpoint,
``rank0`` from a copy that holds rank 0's latent state only. Rank 0 saves the final weights
to ``OUT/PHASE.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

sys.path.insert(0, str(Path(__file__).parent))
from test_lightning import BATCH, Classifier, _dataset, _weights  # noqa: E402

from bconv.integrations.lightning import PTLCallback  # noqa: E402

STOP = 4


class ShardedClassifier(Classifier):
    """Each rank reads its shard in one fixed order.

    Lightning (2.6) restores a StatefulDataLoader's position under DDP but draws the resumed epoch from
    the first epoch's permutation; a fixed order keeps the data exact, so that the test measures the
    latent state alone.
    """

    def train_dataloader(self):
        dataset = _dataset()
        return StatefulDataLoader(dataset, batch_size=BATCH, sampler=DistributedSampler(dataset, shuffle=False))


class Stop(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == STOP:
            trainer.should_stop = True  # on every rank at the same step: a clean stop after the checkpoint


def main(out: Path, phase: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0 if phase in ("full", "stopped") else 1)  # a resumed run's weights come from the checkpoint
    callbacks = [PTLCallback(log_every_n_steps=None)]
    if phase == "stopped":
        callbacks += [Stop(), ModelCheckpoint(dirpath=out, filename="stopped", every_n_train_steps=STOP)]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=phase == "stopped",
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    module = ShardedClassifier(options=dict(cell="v2"))  # per-sample state: each rank's own
    ckpt = {"resumed": out / "stopped.ckpt", "rank0": out / "rank0.ckpt"}.get(phase)
    trainer.fit(module, ckpt_path=ckpt)
    if trainer.global_rank == 0 and phase != "stopped":
        torch.save(_weights(module), out / f"{phase}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
