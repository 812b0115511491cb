"""Fine-tune a timm or torchvision network with PTL under Hugging Face Accelerate; resume exactly after an interruption.

Accelerate leaves the loop to you, so the plain loop's three PTL lines stay (``reset_state`` every epoch,
``detach_state`` after every step); ``bconv.LatentState`` puts the cells' state into ``accelerator.save_state``,
beside the weights, the optimizer, the RNG states and the loader's position.

    pip install -e ".[accelerate]"
    python examples/accelerate_finetune.py --fake-data 256
    accelerate launch examples/accelerate_finetune.py --data DIR      # several GPUs or processes

Run the same command again after an interruption: it goes on from ``--checkpoint`` (a folder), bitwise as the
uninterrupted run with ``--no-augment``. With random augmentation it goes on correctly but not bitwise: Accelerate's
loader has drawn the next batch (and its augmentation, from the global RNG) before ``save_state`` records the RNG
states, so the resumed run draws that batch's augmentation from a later state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm import tqdm

import bconv

sys.path.insert(0, str(Path(__file__).parent))
from ptl_finetune import add_common_arguments, build_network, datasets_from  # noqa: E402  (shared)


class Progress:
    """Where the run stands, saved with the rest."""

    epoch, step = 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state):
        self.epoch, self.step = state["epoch"], state["step"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    p.add_argument("--no-augment", action="store_true", help="no random crop or flip (a resume is then bitwise)")
    p.add_argument("--checkpoint", default="checkpoint", help="a folder, written every --checkpoint-every steps")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS")
    p.add_argument("--log-usage-every", type=int, default=50, metavar="STEPS", help="ladder_usage every N steps")
    p.add_argument("--log", default="ladder_usage.jsonl", help="where the ladder diagnostic goes, one JSON line each")
    p.add_argument("--out", default="ptl.pt", help="the final weights (load with bconv.load_ptl)")
    p.add_argument("--stop-after", type=int, metavar="STEPS", help="simulate an interruption after this many steps")
    args = p.parse_args(argv)

    set_seed(args.seed)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(
        use_stateful_dataloader=True, use_seedable_sampler=True))  # resumable loader, permutation from (seed, epoch)
    train_set, val_set, classes = datasets_from(args)
    network = build_network(args.model, classes, args.pretrained and not os.path.isdir(args.checkpoint))
    model = bconv.wrap_with_ptl(network, input_size=(3, args.image_size, args.image_size))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers,
                                         drop_last=True)  # fmt: skip
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size, num_workers=args.workers)
    model, opt, loader, val_loader = accelerator.prepare(model, opt, loader, val_loader)
    ptl = accelerator.unwrap_model(model)  # the PTLModel, whatever wraps it for distribution
    progress = Progress()
    accelerator.register_for_checkpointing(bconv.LatentState(ptl), progress)
    if os.path.isdir(args.checkpoint):
        accelerator.load_state(args.checkpoint)  # weights, optimizer, RNGs, loader position, latent state
        accelerator.print(f"resuming from {args.checkpoint}: epoch {progress.epoch}, step {progress.step}")

    steps_this_run, accuracy = 0, None
    while progress.epoch < args.epochs:
        if progress.step == 0:
            ptl.reset_state()  # forget the last epoch's history
        model.train()
        loader.set_epoch(progress.epoch)
        bar = tqdm(loader, initial=progress.step, total=len(loader), desc=f"epoch {progress.epoch}",
                   disable=args.no_progress or not accelerator.is_main_process)  # fmt: skip
        for x, y in bar:  # a resumed epoch goes on with the batches it had left
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            ptl.detach_state()
            progress.step += 1
            steps_this_run += 1
            if progress.step % args.log_usage_every == 0 and accelerator.is_main_process:
                usage = bconv.ladder_usage(ptl, x, y)  # the model is left exactly as it was
                with open(args.log, "a") as f:
                    f.write(json.dumps({"epoch": progress.epoch, "step": progress.step, **usage.as_dict()}) + "\n")
                bar.set_postfix(loss=f"{loss.item():.3f}", share=f"{usage.output_share:.1e}")
            stopping = args.stop_after is not None and steps_this_run >= args.stop_after
            if progress.step % args.checkpoint_every == 0 or stopping:
                accelerator.save_state(args.checkpoint)
            if stopping:
                accelerator.print(f"stopped after {steps_this_run} steps; run the same command again to resume")
                return {"stopped": True}
        model.eval()  # eval: zero state, the training history neither read nor written
        with torch.no_grad():
            hits = [accelerator.gather_for_metrics((model(x).argmax(1) == y).float()) for x, y in val_loader]
        accuracy = torch.cat(hits).mean().item()
        accelerator.print(f"epoch {progress.epoch}: validation accuracy {accuracy:.3f}")
        progress.epoch, progress.step = progress.epoch + 1, 0

    accelerator.save(ptl.state_dict(), args.out)  # later: bconv.load_ptl(build_network(...), torch.load(args.out))
    return {"stopped": False, "accuracy": accuracy}


if __name__ == "__main__":
    main(sys.argv[1:])
