"""PTLCallback: PTL's duties inside Lightning's Trainer, and the exact mid-epoch resume through its checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import bconv
from bconv import BConvError
from bconv.integrations.lightning import PTLCallback

from conftest import TinyCNN, docs_block

SIZE = (3, 16, 16)
SAMPLES, BATCH, EPOCHS = 44, 8, 3  # 6 batches an epoch, the last of 4 samples: per-sample slots 4..7 keep their state
BATCHES = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(SAMPLES, *SIZE, generator=g)
    return TensorDataset(x, torch.randint(0, 5, (SAMPLES,), generator=g), torch.arange(SAMPLES))


class Classifier(L.LightningModule):
    """A wrapped TinyCNN, SGD with momentum and a per-step scheduler; records which samples each step saw."""

    def __init__(self, options: dict | None = None, loader: type = StatefulDataLoader, shuffle: bool = True):
        super().__init__()
        self.net = bconv.wrap_with_ptl(TinyCNN(), input_size=SIZE, **(options or {}))
        self.loader, self.shuffle = loader, shuffle
        self.seen: list[tuple[int, int, list[int]]] = []  # (epoch, batch_idx, sample indices)
        self.read_state: list[tuple[int, int, str]] = []  # what the first cell's state was when a batch read it

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append((self.current_epoch, batch_idx, index.tolist()))
        c = self.first_cell().c_prev
        self.read_state.append(
            (self.current_epoch, batch_idx, "none" if c is None else "graph" if c.grad_fn is not None else "detached")
        )
        return F.cross_entropy(self(x), y)

    def first_cell(self) -> nn.Module:
        return self.net.ptl.cells[0][0]

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return self.loader(_dataset(), batch_size=BATCH, shuffle=self.shuffle)


class TBPTTClassifier(Classifier):
    """k-step truncated back-propagation over Lightning's accumulation window (detach=False)."""

    def backward(self, loss, *args, **kwargs):
        loss.backward(*args, retain_graph=True, **kwargs)


class _Preempted(Exception):
    pass


class Preempt(L.Callback):
    """Kills the run at the batch after optimizer step ``step`` (a checkpoint was written at that step)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Preempted


def _trainer(*callbacks, accumulate: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=kwargs.pop("max_epochs", EPOCHS),
        accumulate_grad_batches=accumulate,
        logger=kwargs.pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kwargs,
    )


def _weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fit(module_cls=Classifier, *, callbacks=(), ckpt_path=None, seed=0, accumulate=1, **module_kwargs):
    torch.manual_seed(seed)  # another seed for a resumed run: its weights must come from the checkpoint
    module = module_cls(**module_kwargs)
    _trainer(PTLCallback(log_every_n_steps=None), *callbacks, accumulate=accumulate).fit(module, ckpt_path=ckpt_path)
    return module


def _interrupted(tmp_path: Path, step: int, module_cls=Classifier, accumulate=1, **module_kwargs) -> Path:
    """Train until optimizer step ``step`` (ModelCheckpoint writes there), then die at the next batch."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=step, save_top_k=-1)
    with pytest.raises(_Preempted):
        _fit(module_cls, callbacks=[Preempt(step), checkpoint], accumulate=accumulate, **module_kwargs)
    (path,) = tmp_path.glob("*.ckpt")
    return path


# -- import boundaries ---------------------------------------------------------------------------


# In the default run although it starts a child process (about 12 s on two busy cores): the only test of the callback's
# import without Lightning, and of the frameworks import bconv leaves out.
def test_import_bconv_imports_no_framework_and_the_callback_without_lightning_names_the_extra():
    code = (
        "import sys, bconv\n"
        "frameworks = ('lightning', 'pytorch_lightning', 'accelerate', 'torchdata')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in frameworks)\n"
        "assert not bad, bad\n"
        "sys.modules['lightning'] = None  # as if it were not installed\n"
        "try:\n"
        "    import bconv.integrations.lightning\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('imported without lightning')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'pip install "bconv[lightning]"' in done.stdout


# -- reset every epoch, detach after every optimizer step ----------------------------------------


def test_every_epoch_starts_from_zero_state_and_steps_see_a_detached_state():
    module = _fit(options=dict(detach=False))  # the cell keeps its graph: only the callback detaches it
    assert [epoch for epoch, batch, read in module.read_state if read == "none"] == [0, 1, 2]
    assert all(read == "none" for epoch, batch, read in module.read_state if batch == 0)
    assert all(read == "detached" for epoch, batch, read in module.read_state if batch > 0)


def test_without_the_callback_the_kept_graph_breaks_the_second_step():
    """What the callback does is measured: the same module trained without it keeps history and graph."""
    torch.manual_seed(0)
    module = Classifier(options=dict(detach=False))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _trainer().fit(module)
    assert module.read_state[1][2] == "graph"


def test_with_gradient_accumulation_the_graph_spans_the_window_and_is_cut_at_its_step():
    module = _fit(TBPTTClassifier, options=dict(detach=False), accumulate=2)
    reads = {(epoch, batch): read for epoch, batch, read in module.read_state}
    for epoch in range(EPOCHS):
        assert reads[epoch, 0] == "none"
        assert [reads[epoch, b] for b in range(1, BATCHES)] == ["graph", "detached", "graph", "detached", "graph"]


def test_accumulated_steps_give_the_truncated_backprop_gradients_of_a_plain_loop():
    """Lightning with accumulate_grad_batches=2 and detach=False equals the plain loop that sums two losses."""

    def plain(detach_every_batch: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = TBPTTClassifier(options=dict(detach=False), shuffle=False)
        opt = module.configure_optimizers()["optimizer"]
        module.net.reset_state()
        batches = list(DataLoader(_dataset(), batch_size=BATCH))
        for first in range(0, BATCHES, 2):
            total = 0
            for x, y, _ in batches[first : first + 2]:
                total = total + F.cross_entropy(module(x), y) / 2
                if detach_every_batch:
                    module.net.detach_state()
            opt.zero_grad()
            total.backward()
            opt.step()
            module.net.detach_state()
        return _weights(module)

    torch.manual_seed(0)
    module = TBPTTClassifier(options=dict(detach=False), shuffle=False)
    trainer = _trainer(PTLCallback(log_every_n_steps=None), accumulate=2, max_epochs=1)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    trainer.fit(module)
    lightning_weights, tbptt, one_step = _weights(module), plain(False), plain(True)
    assert all(torch.allclose(lightning_weights[k], tbptt[k], atol=1e-6) for k in tbptt)
    # The window's graph acts: cut after every batch instead, the same run ends measurably elsewhere.
    assert max((lightning_weights[k] - one_step[k]).abs().max().item() for k in tbptt) > 1e-4


def test_a_graph_kept_across_accumulated_batches_without_retain_graph_is_refused_at_fit_start():
    torch.manual_seed(0)
    module = Classifier(options=dict(detach=False))
    with pytest.raises(BConvError, match=r"(?s)detach=False.*accumulates gradients over 2.*retain_graph=True"):
        _trainer(PTLCallback(log_every_n_steps=None), accumulate=2).fit(module)
    assert module.seen == []  # refused before any training


# -- exact mid-epoch resume ----------------------------------------------------------------------

RESUME_VARIANTS = {
    "v1-per_sample": (Classifier, dict(cell="v1"), 1),
    "v2-pooled": (Classifier, dict(cell="v2", state_mode="pooled"), 1),
    "v1-detach_false-accumulate2": (TBPTTClassifier, dict(cell="v1", detach=False), 2),
}


@pytest.mark.parametrize("variant", list(RESUME_VARIANTS))
def test_a_run_stopped_mid_epoch_resumes_bitwise_through_fit_ckpt_path(tmp_path, variant):
    module_cls, options, accumulate = RESUME_VARIANTS[variant]
    step = 10 // accumulate  # epoch 1, after its 4th batch
    full = _fit(module_cls, options=options, accumulate=accumulate)
    path = _interrupted(tmp_path, step, module_cls, accumulate, options=options)
    saved = torch.load(path, weights_only=True)  # Lightning's checkpoint, bconv's entry included, loads safely
    assert saved["bconv"]["mid_epoch"] and (saved["bconv"]["epoch"], saved["bconv"]["batches_done"]) == (1, 4)
    resumed = _fit(module_cls, ckpt_path=path, seed=1, accumulate=accumulate, options=options)
    # The data order: StatefulDataLoader continues the interrupted epoch's permutation where it stopped.
    assert resumed.seen == full.seen[BATCHES + 4 :]
    assert _equal(_weights(full), _weights(resumed))

    # Resumed without the latent state (a checkpoint written without the callback), the run ends elsewhere.
    del saved["bconv"]
    torch.save(saved, tmp_path / "without_latent.pt")
    with pytest.warns(UserWarning, match="holds no latent state"):
        plain = _fit(
            module_cls, ckpt_path=tmp_path / "without_latent.pt", seed=1, accumulate=accumulate, options=options
        )
    assert plain.seen == resumed.seen and not _equal(_weights(full), _weights(plain))


def test_an_end_of_epoch_checkpoint_resumes_the_next_epoch_from_zero_state_with_a_new_permutation(tmp_path):
    """ModelCheckpoint's default, a checkpoint at each epoch's end: Lightning (2.6) calls that no restart.

    The PTL state is right (the next epoch starts from zero state) and every epoch is trained, but
    Lightning does not restore the loader's state for a finished epoch: the next epoch's permutation is
    drawn anew, so the run goes on correctly and not bitwise.
    """
    full = _fit()
    with pytest.raises(_Preempted):
        _fit(callbacks=[Preempt(BATCHES), ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)])
    (path,) = tmp_path.glob("*.ckpt")
    saved = torch.load(path, weights_only=True)["bconv"]
    assert saved["mid_epoch"] is False
    resumed = _fit(ckpt_path=path, seed=1)
    assert resumed.read_state[:2] == [(1, 0, "none"), (1, 1, "detached")]
    assert [(e, b) for e, b, _ in resumed.seen] == [(e, b) for e, b, _ in full.seen[BATCHES:]]
    assert resumed.seen != full.seen[BATCHES:]


def test_a_checkpoint_at_an_epochs_last_batch_resumes_the_next_epoch_bitwise(tmp_path):
    """A step-based checkpoint that falls on an epoch's last batch: the loader's spent iterator is marked finished.

    Unmarked, Lightning 2.6 hands the saved iterator (every batch yielded, never exhausted) to the next
    epoch, which then has no batch: the resumed run would train one epoch less.
    """
    full = _fit()
    path = _interrupted(tmp_path, BATCHES)  # every_n_train_steps=6: the end of epoch 0's last batch
    loader_state = torch.load(path, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["_iterator_finished"] is True
    resumed = _fit(ckpt_path=path, seed=1)
    assert resumed.read_state[0] == (1, 0, "none")  # Lightning skips on_train_epoch_start here: reset at load
    assert resumed.seen == full.seen[BATCHES:] and _equal(_weights(full), _weights(resumed))

    loader_state["_iterator_finished"] = False  # as Lightning wrote it
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0] = loader_state
    torch.save(checkpoint, tmp_path / "unmarked.pt")
    unmarked = _fit(ckpt_path=tmp_path / "unmarked.pt", seed=1)
    assert [epoch for epoch, _, _ in unmarked.seen] == [2] * BATCHES  # epoch 1 had no batch


def test_lightning_mid_epoch_resume_with_a_plain_dataloader_restarts_the_iterator(tmp_path):
    """What Lightning (2.6) does with the data order, as the README states it.

    A plain DataLoader is not resumable: Lightning warns, keeps counting the epoch's batches from where
    the checkpoint was, but draws them from a new iterator: a fresh permutation, from its first batch.
    The resumed epoch trains on 2 full batches instead of the interrupted permutation's last 12
    samples. Lightning's checkpoint holds no RNG state either.
    """
    full = _fit(loader=DataLoader)
    path = _interrupted(tmp_path, 10, loader=DataLoader)
    with pytest.warns(UserWarning, match="dataloader is not resumable"):
        resumed = _fit(ckpt_path=path, seed=1, loader=DataLoader)
    first_epoch = [(e, b, len(i)) for e, b, i in resumed.seen if e == 1]
    assert first_epoch == [(1, 4, BATCH), (1, 5, BATCH)]  # batch 5 is a full one: the start of a permutation
    assert [i for e, b, i in resumed.seen if e == 1] != [i for e, b, i in full.seen if e == 1 and b >= 4]
    assert "rng" not in " ".join(torch.load(path, weights_only=True)).lower()


@pytest.mark.slow  # four runs of two DDP processes each, every one importing torch and Lightning
def test_under_ddp_every_rank_resumes_with_its_own_latent_state(tmp_path):
    script, root = Path(__file__).with_name("_lightning_ddp.py"), Path(__file__).parents[1]  # this checkout's bconv

    def run(phase: str) -> None:
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path), phase],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=root,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))},
        )
        assert done.returncode == 0, done.stderr[-3000:]

    for phase in ("full", "stopped"):
        run(phase)
    checkpoint = torch.load(tmp_path / "stopped.ckpt", weights_only=True)
    per_rank = checkpoint["bconv"]["latent_state_per_rank"]
    assert len(per_rank) == 2 and not torch.equal(
        per_rank[0]["net.ptl.cells.0.0"]["c_prev"], per_rank[1]["net.ptl.cells.0.0"]["c_prev"]
    )  # two ranks, two histories
    del checkpoint["bconv"]["latent_state_per_rank"]  # as if only rank 0's state had been written
    torch.save(checkpoint, tmp_path / "rank0.ckpt")
    for phase in ("resumed", "rank0"):
        run(phase)
    full, resumed, rank0 = (torch.load(tmp_path / f"{p}.pt", weights_only=True) for p in ("full", "resumed", "rank0"))
    assert _equal(full, resumed)
    assert not _equal(full, rank0)  # rank 1 resumed with rank 0's history: the run ends elsewhere


# -- PTL models anywhere inside the LightningModule ---------------------------------------------


class TwoBranch(Classifier):
    """Two PTL models, nested in containers, feeding one head: an RGB branch and a v2 depth branch."""

    def __init__(self, options: dict | None = None, **kwargs):
        super().__init__(options, **kwargs)
        del self.net
        rgb = bconv.wrap_with_ptl(TinyCNN(), input_size=SIZE, **(options or {}))
        depth = bconv.wrap_with_ptl(TinyCNN(), input_size=SIZE, cell="v2", state_mode="pooled")
        self.branches = nn.ModuleDict({"rgb": nn.Sequential(rgb), "depth": depth})

    def forward(self, x):
        return self.branches["rgb"](x) + self.branches["depth"](x.flip(-1))

    def first_cell(self) -> nn.Module:
        return self.branches["rgb"][0].ptl.cells[0][0]


def test_the_callback_finds_ptl_models_nested_in_the_module_and_resumes_them_all(tmp_path):
    callback = PTLCallback(log_every_n_steps=None)
    torch.manual_seed(0)
    module = TwoBranch()
    _trainer(callback, max_epochs=1).fit(module)
    assert list(callback.models) == ["branches.rgb.0", "branches.depth"]
    assert callback.models["branches.depth"] is module.branches["depth"]

    full = _fit(TwoBranch)
    path = _interrupted(tmp_path, 10, TwoBranch)
    latent = torch.load(path, weights_only=True)["bconv"]["latent_state"]
    assert {k.split(".ptl.")[0] for k in latent} == {"branches.rgb.0", "branches.depth"}
    assert all(state["c_prev"] is not None for state in latent.values())
    assert _equal(_weights(full), _weights(_fit(TwoBranch, ckpt_path=path, seed=1)))


def test_a_module_without_a_ptl_model_is_refused_with_the_fix():
    class Plain(Classifier):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

    with pytest.raises(BConvError, match=r"Plain holds no PTL model.*bconv\.wrap_with_ptl"):
        _trainer(PTLCallback()).fit(Plain())


# -- the ladder diagnostic through Lightning's loggers ------------------------------------------


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def test_a_batch_the_diagnostic_cannot_read_fails_at_the_first_step():
    class DictBatches(Classifier):
        def train_dataloader(self):
            x, y, _ = _dataset().tensors
            return DataLoader([{"image": a, "label": b} for a, b in zip(x, y)], batch_size=BATCH)

        steps: list[int] = []

        def training_step(self, batch, batch_idx):
            self.steps.append(batch_idx)
            return F.cross_entropy(self(batch["image"]), batch["label"])

    torch.manual_seed(0)
    with pytest.raises(BConvError, match=r"type dict.*PTLCallback\(inputs=lambda batch"):
        _trainer(PTLCallback(log_every_n_steps=1), logger=MemoryLogger()).fit(DictBatches())
    assert not DictBatches.steps  # refused before the first step
    callback, logger = PTLCallback(log_every_n_steps=1, inputs=lambda b: (b["image"], b["label"])), MemoryLogger()
    _trainer(callback, max_epochs=1, logger=logger).fit(DictBatches())  # told where the input is
    assert [step for step, m in logger.rows if "bconv/grad_norm/cells" in m] == list(range(1, BATCHES + 1))
    _trainer(PTLCallback(log_every_n_steps=1), max_epochs=1).fit(DictBatches())  # no logger: nothing to read
    assert len(DictBatches.steps) == 2 * BATCHES


def test_the_ladder_diagnostic_is_logged_every_n_steps_without_changing_training():
    logger, callback = MemoryLogger(), PTLCallback(log_every_n_steps=4)
    torch.manual_seed(0)
    module = Classifier()
    _trainer(callback, logger=logger, log_every_n_steps=50).fit(module)
    rows = [(step, m) for step, m in logger.rows if any(k.startswith("bconv/") for k in m)]
    assert [step for step, _ in rows] == [4, 8, 12, 16]
    grads = [f"grad_norm/{group}" for group in ("cells", "fusions", "backbone")]
    names = {"stage_share", "output_share", "state_effect", *grads}
    for _, metrics in rows:
        assert set(metrics) == {f"bconv/{n}" for n in names}  # the target came from the (x, y, index) batch
        assert all(isinstance(v, float) and v == v for v in metrics.values())
    # The ladder acts and its state acts (both are 0 for a dormant ladder and for zero state).
    assert all(m["bconv/output_share"] > 0 and m["bconv/state_effect"] > 0 for _, m in rows)
    assert callback.last_usage["net"].output_share == rows[-1][1]["bconv/output_share"]
    # The diagnostic restores all it touches: training is bitwise the run without it.
    assert _equal(_weights(module), _weights(_fit()))


def test_with_several_ptl_models_each_is_logged_under_its_module_path():
    logger = MemoryLogger()
    torch.manual_seed(0)
    _trainer(PTLCallback(log_every_n_steps=3), logger=logger, max_epochs=1).fit(TwoBranch())
    (step, metrics), *_ = [(step, m) for step, m in logger.rows if any(k.startswith("bconv/") for k in m)]
    assert step == 3
    assert {k.rsplit("/", 1)[0] for k in metrics if "grad_norm" not in k} == {
        "bconv/branches.rgb.0",
        "bconv/branches.depth",
    }


# -- the docs' recipe -----------------------------------------------------------------------------


class PreemptibleDataset(TensorDataset):
    """Dies at its ``limit``-th item, as a preempted job dies wherever it is."""

    def __init__(self, *tensors, limit: int | None = None):
        super().__init__(*tensors)
        self.limit, self.fetched = limit, 0

    def __getitem__(self, index):
        self.fetched += 1
        if self.limit is not None and self.fetched > self.limit:
            raise _Preempted
        return super().__getitem__(index)


def test_the_readme_lightning_recipe_resumes_a_preempted_run_bitwise(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(5)
    data = torch.randn(150, *SIZE, generator=g), torch.randint(0, 5, (150,), generator=g)
    text = docs_block("guides/lightning-accelerate.md", "## PTL with Lightning")
    recipe = compile(text, "docs/guides/lightning-accelerate.md", "exec")

    def script(directory: Path, limit: int | None = None) -> dict:
        directory.mkdir(exist_ok=True)
        monkeypatch.chdir(directory)
        namespace = dict(
            dataset=PreemptibleDataset(*data, limit=limit), epochs=3, build_network=TinyCNN, checkpoint_every=4
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's notes on a small run; no last.ckpt on a fresh start
            exec(recipe, namespace)
        return namespace

    full = script(tmp_path / "full")
    (callback,) = [c for c in full["trainer"].callbacks if isinstance(c, PTLCallback)]
    assert list(callback.models) == ["net"]
    # Batches of 64, 64, 22: step 4 (a checkpoint) is epoch 1's first batch; the job dies fetching its second.
    with pytest.raises(_Preempted):
        script(tmp_path / "preempted", limit=150 + 64)
    assert torch.load("checkpoints/last.ckpt", weights_only=True)["bconv"]["batches_done"] == 1
    resumed = script(tmp_path / "preempted")  # the same script, rerun
    assert resumed["trainer"].global_step == full["trainer"].global_step == 9
    assert _equal(_weights(full["model"]), _weights(resumed["model"]))
