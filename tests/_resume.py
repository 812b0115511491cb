"""An interruptible training run of a wrapped TinyCNN, for the exact-resume tests (test_checkpoint.py).

``run`` trains for a few epochs with a shuffling DataLoader, SGD with momentum, a per-batch LR
scheduler and augmentation drawn from torch, numpy and python's ``random``. With ``stop`` it stops
mid-epoch and writes one checkpoint, as docs/guides/checkpoints.md's "Resuming an interrupted run" does; with
``resume`` it continues from such a checkpoint. Run as a script, it resumes checkpoints in a new
Python process::

    python tests/_resume.py OUT CHECKPOINT [CHECKPOINT ...]

and saves, per checkpoint, the final weights and an eval output, resumed with and without the
cells' latent state, to ``OUT``.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bconv

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyCNN  # noqa: E402

EPOCHS = 3
BATCH = 8
SAMPLES = 44  # 6 batches per epoch, the last one smaller (4 samples): per-sample slots 4..7 keep their state
STOP = (1, 4)  # the run is interrupted in epoch 1, after its 4th batch
STOP_DDP = (1, 2)  # under DDP with two ranks an epoch has 3 batches per rank (8, 8, 6)
K = 2  # with detach=False: k-step truncated back-propagation, one optimizer step and detach_state() every K batches

VARIANTS = {
    "v1-per_sample": dict(cell="v1"),
    "v1-pooled": dict(cell="v1", state_mode="pooled"),
    "v2-per_sample": dict(cell="v2"),
    "v2-pooled": dict(cell="v2", state_mode="pooled"),
    "v1-per_sample-detach_every_k": dict(cell="v1", detach=False),
    "v2-pooled-detach_every_k": dict(cell="v2", state_mode="pooled", detach=False),
}


def rng_states() -> dict:
    """The global RNG states, as tensors and plain values (``torch.load(weights_only=True)`` reads them)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _data() -> tuple[TensorDataset, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(SAMPLES, 3, 16, 16, generator=g)
    y = torch.randint(0, 5, (SAMPLES,), generator=g)
    return TensorDataset(x, y), torch.randn(6, 3, 16, 16, generator=g)


def run(
    options: dict | None = None,
    *,
    stop: tuple[int, int] | None = None,
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    latent: bool = True,
    latent_from: str | Path | None = None,
    rank: int = 0,
    world: int = 1,
) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """Train from scratch (``options``: wrap_with_ptl's) or from ``resume``; stop at ``stop`` and save.

    Args:
        stop: ``(epoch, batches done in it)``: write ``checkpoint`` there and return None.
        resume: a checkpoint written by an earlier call with ``stop``.
        latent: restore the cells' latent state on resume (False: start the epoch's rest from zero).
        latent_from: take the latent state from this checkpoint instead (another rank's).
        rank, world: under DistributedDataParallel (an initialised gloo process group).

    Returns:
        ``(final state dict, eval output)``, or None when stopped.
    """
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    dataset, eval_x = _data()
    loader_rng = torch.Generator().manual_seed(1)
    if world > 1:
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=1)  # permutation from (seed, epoch)
        loader = DataLoader(dataset, BATCH, sampler=sampler)
    else:
        loader = DataLoader(dataset, BATCH, shuffle=True, generator=loader_rng)
    if resume is None:
        model = bconv.wrap_with_ptl(TinyCNN(), input_size=(3, 16, 16), **(options or {}))
    else:
        ckpt = torch.load(resume, weights_only=True)
        model = bconv.load_ptl(TinyCNN(), ckpt["model"])  # the options come from the checkpoint
    net = DDP(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)  # stepped per optimizer step
    k = 1 if model.config.detach else K
    start_epoch, done = 0, 0
    if resume is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, done = ckpt["epoch"], ckpt["step"]

    for epoch in range(start_epoch, EPOCHS):
        resuming = resume is not None and epoch == start_epoch
        if world > 1:
            sampler.set_epoch(epoch)
        if resuming:
            loader_rng.set_state(ckpt["loader_rng"])  # the same permutation as the interrupted epoch
        epoch_rng = loader_rng.get_state()
        batches = iter(loader)
        for _ in range(done if resuming else 0):
            next(batches)  # skip the batches the interrupted run had trained on
        if resuming:
            if latent:
                latent_state = torch.load(latent_from, weights_only=True)["latent"] if latent_from else ckpt["latent"]
                model.load_latent_state_dict(latent_state)
            else:
                model.reset_state()
            set_rng_states(ckpt["rng"])
        else:
            model.reset_state()
        model.train()
        total = 0.0
        for step, (x, y) in enumerate(batches, start=done if resuming else 0):
            if random.random() < 0.5:
                x = x.flip(-1)
            x = x + float(np.random.uniform(0.0, 0.2)) * torch.randn_like(x)
            total = total + F.cross_entropy(net(x), y)
            if (step + 1) % k == 0 or step + 1 == len(loader):
                opt.zero_grad()
                total.backward()
                opt.step()
                sched.step()
                model.detach_state()
                total = 0.0
            if stop == (epoch, step + 1):
                torch.save(
                    {
                        "model": model.state_dict(),  # weights and the wrap options (model.config)
                        "latent": model.latent_state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "epoch": epoch,
                        "step": step + 1,  # batches of this epoch already trained on
                        "loader_rng": epoch_rng,  # the loader's generator when this epoch's permutation was drawn
                        "rng": rng_states(),
                    },
                    checkpoint,
                )
                return None
    model.eval()
    with torch.no_grad():
        out = net(eval_x)
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}, out


def ddp_worker(rank: int, world: int, port: int, out: str, phase: str, variants: dict) -> None:
    """One rank of the DDP resume test: ``phase`` "train" (uninterrupted and interrupted runs) or "resume"."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    out = Path(out)
    try:
        for name, options in variants.items():
            ckpt = out / f"{name}-rank{rank}.pt"
            if phase == "train":
                torch.save(run(options, rank=rank, world=world), out / f"{name}-full-rank{rank}.pt")
                run(options, stop=STOP_DDP, checkpoint=ckpt, rank=rank, world=world)
            else:
                # With sync_state every rank holds the same state: rank 0's copy restores them all.
                shared = out / f"{name}-rank0.pt" if options.get("sync_state") else None
                torch.save(
                    run(resume=ckpt, latent_from=shared, rank=rank, world=world), out / f"{name}-resumed-rank{rank}.pt"
                )
    finally:
        torch.distributed.destroy_process_group()


def main(out: str, checkpoints: list[str]) -> None:
    torch.set_num_threads(1)
    for path in checkpoints:
        name = Path(path).stem
        torch.save(
            {"with_latent": run(resume=path), "without_latent": run(resume=path, latent=False)},
            Path(out) / f"{name}-resumed.pt",
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
