"""Every script in examples/ run end to end on tiny data the test makes itself (images written as PNG files, so the
real loading path runs), in-process through each script's ``main(argv)``; one also as a newcomer runs it."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bconv
from conftest import single_thread

EXAMPLES = Path(__file__).parents[1] / "examples"
TINY = ["--model", "timm:test_resnet", "--image-size", "32", "--batch-size", "4", "--no-progress"]


def example(name: str):
    """The script ``examples/NAME.py`` as a module (its ``main(argv)`` is what ``python examples/NAME.py`` runs)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_folder(root: Path, classes: int = 2, train: int = 8, val: int = 4, size: int = 32) -> Path:
    """``root/train/CLASS/*.png`` and ``root/val/CLASS/*.png``: a class is a colour, with noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 120 * k, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():  # bitwise comparisons need one thread count
        yield


def test_quickstart_runs_as_written_and_its_ladder_is_in_use(tmp_path, monkeypatch, capsys):
    # examples/quickstart.py is the README's and the docs' PTL example, shown as it is
    import runpy

    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(EXAMPLES / "quickstart.py"))
    assert not namespace["model"].training and "epoch 1: loss" in capsys.readouterr().out
    assert bconv.ladder_usage(namespace["model"], namespace["x"], namespace["y"]).output_share > 0


def test_ptl_finetune_logs_the_ladder_and_resumes_an_interrupted_run_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = image_folder(tmp_path / "data")
    script = example("ptl_finetune")
    common = ["--data", str(data), *TINY, "--epochs", "2", "--log-usage-every", "2"]
    assert script.main([*common, "--checkpoint", "a.pt", "--out", "a_final.pt", "--log", "a.jsonl"])["stopped"] is False
    b = [*common, "--checkpoint", "b.pt", "--out", "b_final.pt", "--log", "b.jsonl"]
    assert script.main([*b, "--stop-after", "6"])["stopped"] is True  # 4 steps an epoch: stopped mid-epoch 1
    assert Path("b.pt").exists() and not Path("b_final.pt").exists()
    assert script.main(b)["stopped"] is False  # the same command again: resumes
    final_a, final_b = (torch.load(f, weights_only=True) for f in ("a_final.pt", "b_final.pt"))
    assert state_equal(final_a, final_b)
    assert not Path("b.pt").exists()  # a finished run leaves no checkpoint to resume from
    log = [json.loads(line) for line in Path("a.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    assert all(r["output_share"] > 0 for r in log) and {"state_effect", "grad_norm/cells"} <= log[0].keys()
    # the saved weights rebuild the model with bconv.load_ptl and nothing else
    model = bconv.load_ptl(script.build_network("timm:test_resnet", 2, False), final_a)
    assert model.config.input_size == (3, 32, 32)


@pytest.mark.slow  # two Trainer runs: about 11 s on two busy cores
def test_lightning_example_logs_ladder_usage_checkpoints_and_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    script = example("lightning_finetune")
    common = ["--fake-data", "16", "--classes", "3", *TINY, "--log-usage-every", "2", "--checkpoint-every", "3"]
    trainer = script.main([*common, "--epochs", "2"])
    assert trainer.global_step == 8
    with open("lightning_run/logs/version_0/metrics.csv") as f:
        shares = [float(r["bconv/output_share"]) for r in csv.DictReader(f) if r["bconv/output_share"]]
    assert len(shares) == 4 and all(s > 0 for s in shares)
    last = torch.load("lightning_run/checkpoints/last.ckpt", weights_only=False)
    assert "bconv" in last  # the cells' latent state, by PTLCallback
    trainer = script.main([*common, "--epochs", "3"])  # the same run, one epoch longer: goes on from last.ckpt
    assert trainer.global_step == 12 and trainer.current_epoch == 3


def test_accelerate_example_resumes_an_interrupted_run_exactly(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    script = example("accelerate_finetune")
    common = ["--fake-data", "16", "--classes", "3", *TINY, "--epochs", "2", "--log-usage-every", "2", "--no-augment"]
    # --no-augment: Accelerate's loader draws the next batch before save_state records the RNG (the script's docstring)
    assert script.main([*common, "--checkpoint", "a", "--out", "a.pt"])["stopped"] is False
    b = [*common, "--checkpoint", "b", "--out", "b.pt"]
    assert script.main([*b, "--stop-after", "5"])["stopped"] is True
    assert script.main(b)["stopped"] is False
    assert state_equal(torch.load("a.pt", weights_only=True), torch.load("b.pt", weights_only=True))
    assert all(json.loads(line)["output_share"] > 0 for line in Path("ladder_usage.jsonl").read_text().splitlines())


def test_std_then_cop_then_fine_tune_saves_a_smaller_plain_student_that_reloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = image_folder(tmp_path / "data")
    out = example("std_cop").main(["--data", str(data), *TINY, "--teacher-epochs", "1", "--std-epochs", "1",
                                   "--finetune-epochs", "1", "--prune", "0.5"])  # fmt: skip
    student, deployed = out["student"], out["deployed"]
    assert not any(isinstance(m, bconv.PTLModel) for m in student.modules())  # the deployed network has no cells
    original = sum(p.numel() for p in example("ptl_finetune").build_network("timm:test_resnet", 2, False).parameters())
    assert sum(p.numel() for p in deployed.parameters()) < 0.75 * original
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(student.eval()(x), deployed.eval()(x))  # rebuilt from a fresh network + the saved history
    assert set(out["accuracy"]) == {"teacher", "student", "pruned", "pruned + fine-tune", "reloaded"}


def test_segmentation_example_trains_on_a_mask_folder_and_its_weights_reload(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (tmp_path / "seg" / sub).mkdir(parents=True)
    for i in range(10):
        mask = np.zeros((40, 40), np.uint8)
        k = 1 + i % 3
        mask[5 : 5 + 10 + i, 8 : 30] = k
        image = np.clip(rng.normal(50 + 60 * mask[..., None], 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "seg" / "images" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "seg" / "masks" / f"{i}.png")
    script = example("segmentation")
    out = script.main(["--data", str(tmp_path / "seg"), "--image-size", "64", "--epochs", "1", "--batch-size", "4",
                       "--no-progress"])  # fmt: skip
    assert 0 <= out["miou"] <= 1 and out["usage"].output_share > 0
    import torchvision

    network = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None,
                                           num_classes=4)  # fmt: skip
    reloaded = bconv.load_ptl(network, torch.load("segmentation_ptl.pt", weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(reloaded.eval()(x)["out"], out["model"].eval()(x)["out"])


@pytest.mark.slow  # a child process importing torch, timm and torchvision, as a newcomer runs the script
def test_an_example_runs_as_written_from_the_command_line(tmp_path):
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "ptl_finetune.py"), "--fake-data", "16", *TINY, "--epochs", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "validation accuracy" in run.stdout and (tmp_path / "ptl.pt").exists()
