"""Checkpoints of a PTL model: the state dict and the config it carries (PTLConfig, load_state_dict, load_ptl),
torch.save of the whole model, the cells' latent state, exact resume in a new process, and the checkpoints of
earlier versions. A load that is refused leaves the user's network as it was.

Pruned files (save_pruned, load_pruned) are tests/test_prune_checkpoint.py; the resume recipes of Lightning and
Accelerate, tests/test_lightning.py and tests/test_accelerate.py.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from torch import nn

import bconv
import bconv.ptl.state
from bconv import BConvError, PTLConfig, load_ptl, unwrap_ptl, wrap_with_ptl
from bconv.errors import CheckpointError

import _resume
from conftest import (
    Preempted,
    Snapshot,
    TinyCNN,
    docs_block,
    free_port,
    latent_tensors,
    preempt_after_checkpoint,
    stateful_cells,
    zoo_model,
)

SIZE = (3, 16, 16)
SIZE_32 = (3, 32, 32)


def _wrap(**options) -> bconv.PTLModel:
    return wrap_with_ptl(TinyCNN(), input_size=SIZE, **options)


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _train(model: nn.Module, batches=(4, 4, 3)) -> None:
    model.train()
    for b in batches:
        model(torch.randn(b, *SIZE))


# --------------------------------------------------------------------------- the config


class _LocalLeaf(nn.Module):  # importable by its qualified name: tests/ is on sys.path
    def forward(self, x):
        return x


def test_config_records_every_option_with_the_stage_names():
    wrapped = _wrap(
        stages=[-2, -1],
        cell="v2",
        cell_width=0.5,
        fuse_width=0.25,
        state_mode="pooled",
        sync_state=True,
        detach=False,
        on_size_change="raise",
        final_init="paper",
        source="fx",
        leaf_modules=[_LocalLeaf],
        recompute=False,
    )
    assert wrapped.config == PTLConfig(
        stages=("stage1", "stage2"),
        cell="v2",
        input_size=SIZE,
        cell_width=0.5,
        fuse_width=0.25,
        state_mode="pooled",
        sync_state=True,
        detach=False,
        on_size_change="raise",
        final_init="paper",
        source="fx",
        leaf_modules=("test_checkpoint:_LocalLeaf",),
        recompute=False,
    )
    assert wrapped.config.recompute is False and wrapped.ptl.cells[0][0].recompute is False
    assert wrapped.config.version == bconv.__version__
    with pytest.raises(dataclasses.FrozenInstanceError):
        wrapped.config.cell = "v1"
    # The call above passed every option PTLConfig declares (input_size through _wrap), and each was recorded.
    passed = {"stages", "cell", "cell_width", "fuse_width", "state_mode", "sync_state", "detach", "on_size_change",
              "final_init", "source", "leaf_modules", "input_size", "recompute"}  # fmt: skip
    assert passed == {f.name for f in dataclasses.fields(PTLConfig)} - {"version"}


def test_state_dict_carries_the_config_through_torch_load_weights_only():
    wrapped = _wrap(cell="v2", stages=["stage1", "stage2"])
    loaded = _roundtrip(wrapped.state_dict())  # weights_only=True: plain values only
    assert PTLConfig.from_extra_state(loaded["_extra_state"]) == wrapped.config
    twin = _wrap(cell="v2", stages=["stage1", "stage2"])
    twin.load_state_dict(loaded)
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), wrapped.parameters()))


def test_the_state_dict_stays_all_tensors_for_ema_and_safetensors():
    """The config is a uint8 tensor, so code that treats every state-dict value as a tensor keeps working."""
    from safetensors.torch import load as st_load, save as st_save
    from timm.utils import ModelEmaV2, ModelEmaV3

    wrapped = _wrap(cell="v2", final_init="paper")
    sd = wrapped.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values()) and sd["_extra_state"].dtype == torch.uint8
    for ema in (ModelEmaV2(wrapped, decay=0.5), ModelEmaV3(wrapped, decay=0.5)):
        ema.update(wrapped)
    loaded = load_ptl(TinyCNN(), st_load(st_save(sd)))
    assert loaded.config == wrapped.config


def test_loading_into_a_wrapper_with_other_options_lists_each_difference():
    saved = _wrap(cell="v2", state_mode="pooled", final_init="paper").state_dict()
    other = _wrap(stages=["stage1", "stage2"], cell_width=0.25, final_init="paper")
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(BConvError) as info:
        other.load_state_dict(saved)
    message = str(info.value)
    assert "(4 differ)" in message
    for option, ckpt, mine in [
        ("stages", "['stem', 'stage1', 'stage2']", "['stage1', 'stage2']"),
        ("cell", "'v2'", "'v1'"),
        ("cell_width", "0.125", "0.25"),
        ("state_mode", "'pooled'", "'per_sample'"),
    ]:
        line = next(line for line in message.splitlines() if line.strip().startswith(option + " "))
        assert f"checkpoint: {ckpt}" in line and f"this model: {mine}" in line, line
    assert "bconv.load_ptl" in message
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "_extra_state")  # nothing loaded


def test_behaviour_options_differ_even_when_every_shape_agrees():
    saved = _wrap(detach=False).state_dict()
    with pytest.raises(BConvError, match=r"detach\s+checkpoint: False\s+this model: True"):
        _wrap().load_state_dict(saved)


def test_a_checkpoint_in_todays_format_loads_into_a_wrapper_built_by_hand():
    wrapped = _wrap(final_init="paper")
    old = wrapped.state_dict()
    del old["_extra_state"]  # the format written before the config was recorded
    twin = _wrap(final_init="paper")
    twin.load_state_dict(old)  # strict: the missing config key is not an error
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), wrapped.eval()(x))
    # Strict loading still reports what it always reported.
    with pytest.raises(RuntimeError, match="Unexpected key.*bogus"):
        twin.load_state_dict({**old, "bogus": torch.zeros(1)})
    del old["ptl.final_fuse.fuse.conv.weight"]
    with pytest.raises(RuntimeError, match="Missing key.*ptl.final_fuse.fuse.conv.weight"):
        twin.load_state_dict(old)


@pytest.mark.parametrize(
    "options", [dict(), dict(cell="v2", state_mode="pooled", stages=["stage1", "stage2"], cell_width=0.5)]
)
def test_load_ptl_wraps_a_fresh_network_as_the_checkpoint_was(options):
    wrapped = _wrap(final_init="paper", **options)
    _train(wrapped)
    state_dict = _roundtrip(wrapped.state_dict())
    loaded = load_ptl(TinyCNN(), state_dict)
    assert isinstance(loaded, bconv.PTLModel) and loaded.config == wrapped.config
    assert [s.name for s in loaded.stages] == [s.name for s in wrapped.stages]
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), wrapped.eval()(x))
    assert not any(
        v is not None for c in loaded.latent_state_dict().values() for k, v in c.items() if k != "state_mode"
    )


def test_load_ptl_imports_leaf_modules_back_or_asks_for_them():
    class Inner(nn.Module):  # defined in a function: its qualified name cannot be imported
        def forward(self, x):
            return x

    recorded = _wrap(leaf_modules=[nn.ReLU]).state_dict()
    assert load_ptl(TinyCNN(), recorded).config.leaf_modules == ("torch.nn.modules.activation:ReLU",)
    local = _wrap(leaf_modules=[Inner]).state_dict()
    with pytest.raises(BConvError, match=r"cannot be imported.*leaf_modules=\[YourClass\]"):
        load_ptl(TinyCNN(), local)
    assert load_ptl(TinyCNN(), local, leaf_modules=[Inner]).config.leaf_modules == (PTLConfig.class_name(Inner),)


def test_load_ptl_without_a_config_says_to_wrap_by_hand():
    old = _wrap().state_dict()
    del old["_extra_state"]
    with pytest.raises(BConvError, match=r"no PTL config.*wrap_with_ptl\(network.*load_state_dict"):
        load_ptl(TinyCNN(), old)


def test_load_ptl_names_the_prefix_of_a_nested_state_dict():
    nested = {f"module.{k}": v for k, v in _wrap().state_dict().items()}  # as DDP(wrapped).state_dict()
    with pytest.raises(BConvError, match=r"under the prefix 'module\.'.*consume_prefix_in_state_dict_if_present"):
        load_ptl(TinyCNN(), nested)


def test_load_ptl_refuses_a_network_without_the_checkpoints_stages():
    saved = _wrap().state_dict()
    other = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(BConvError, match=r"does not fit this network.*\['stem', 'stage1', 'stage2'\]"):
        load_ptl(other, saved)


def test_load_ptl_leaves_a_network_whose_weights_do_not_fit_unwrapped():
    class Wider(TinyCNN):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(32, 7)

    network = Wider()
    with pytest.raises(bconv.errors.CheckpointError, match=r"size mismatch for model\.head\.weight: \[5, 32\] in the checkpoint"):
        load_ptl(network, _wrap().state_dict())
    assert not bconv.surgery.is_wrapped(network)
    wrap_with_ptl(network, input_size=SIZE)  # can be wrapped again


class _Scaled(nn.Module):
    """A layer with its own non-tensor extra state (a dict), as some user modules keep."""

    def __init__(self):
        super().__init__()
        self.factor, self.refuse = 1.0, False

    def forward(self, x):
        return x * self.factor

    def get_extra_state(self):
        return {"factor": self.factor}

    def set_extra_state(self, state):
        if self.refuse:
            raise RuntimeError("this build cannot take that state")
        self.factor = state["factor"]


class _WithExtraState(TinyCNN):
    def __init__(self):
        super().__init__()
        self.stage1.append(_Scaled())


def test_load_ptl_takes_a_modules_own_extra_state_and_unwraps_when_it_refuses():
    source = wrap_with_ptl(_WithExtraState(), input_size=SIZE)
    source.model.stage1[2].factor = 0.5
    saved = source.state_dict()
    loaded = load_ptl(_WithExtraState(), saved)  # a dict, not a tensor, under stage1.2._extra_state
    assert loaded.model.stage1[2].factor == 0.5
    network = _WithExtraState()
    network.stage1[2].refuse = True
    with pytest.raises(RuntimeError, match="cannot take that state"):
        load_ptl(network, saved)
    assert not bconv.surgery.is_wrapped(network)  # handed back as it came, not left wrapped


def test_a_corrupt_config_gets_a_clear_error():
    saved = _wrap().state_dict()
    stored = json.loads(bytes(saved["_extra_state"].tolist()))
    stored["config"]["new_option"] = 1
    saved["_extra_state"] = torch.tensor(list(json.dumps(stored).encode()), dtype=torch.uint8)
    with pytest.raises(BConvError, match="does not know: new_option"):
        load_ptl(TinyCNN(), saved)
    saved["_extra_state"] = "something else"
    with pytest.raises(BConvError, match="not a bconv PTL config"):
        _wrap().load_state_dict(saved)


# -------------------------------------- a refused load_ptl leaves the network bit-identical, with no hook left on it


def test_load_ptl_into_another_architecture_changes_nothing():
    saved = wrap_with_ptl(torchvision.models.resnet18(), input_size=SIZE_32).state_dict()
    network = torchvision.models.resnet34()
    snapshot = Snapshot(network)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: model\.layer1\.2\.conv1\.weight"):
        load_ptl(network, saved)
    snapshot.assert_unchanged()
    wrap_with_ptl(network, input_size=SIZE_32)  # nothing is left in the way of wrapping it


def test_load_ptl_into_the_same_architecture_with_another_head_changes_nothing():
    saved = wrap_with_ptl(torchvision.models.resnet18(num_classes=10), input_size=SIZE_32).state_dict()
    network = torchvision.models.resnet18()
    snapshot = Snapshot(network)
    with pytest.raises(CheckpointError, match=r"size mismatch for model\.fc\.weight: \[10, 512\] in the checkpoint"):
        load_ptl(network, saved)
    snapshot.assert_unchanged()


def _with_config(state_dict: dict, **changes) -> dict:
    stored = json.loads(bytes(state_dict["_extra_state"].tolist()))
    stored["config"].update(changes)
    return {**state_dict, "_extra_state": torch.tensor(list(json.dumps(stored).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize("option, value", [("stages", None), ("input_size", 5)])
def test_a_recorded_option_of_the_wrong_type_is_named(option, value):
    saved = _with_config(wrap_with_ptl(TinyCNN(), input_size=SIZE_32).state_dict(), **{option: value})
    network = TinyCNN()
    snapshot = Snapshot(network)
    with pytest.raises(CheckpointError, match=re.escape(f"{option}={value!r}, which should be")):
        load_ptl(network, saved)
    snapshot.assert_unchanged()


@pytest.mark.parametrize("option, value", [("leaf_modules", 5), ("sync_state", "no"), ("input_size", [3, "32", 32])])
def test_more_recorded_options_of_the_wrong_type_are_named(option, value):
    saved = _with_config(wrap_with_ptl(TinyCNN(), input_size=SIZE_32).state_dict(), **{option: value})
    with pytest.raises(CheckpointError, match=re.escape(f"{option}={value!r}, which should be")):
        load_ptl(TinyCNN(), saved)


# ------------------------------------------------------------ the whole model: state dict keys, torch.save, deepcopy


def test_state_dict_keys_and_loading():
    model = zoo_model("torchvision:resnet18")
    plain = copy.deepcopy(model.state_dict())
    wrapped = wrap_with_ptl(model, input_size=(3, 32, 32), final_init="paper").train()
    wrapped(torch.randn(2, 3, 32, 32))  # a state exists now; it must stay out of the state dict
    sd = wrapped.state_dict()
    assert {k for k in sd if k.startswith("model.")} == {f"model.{k}" for k in plain}
    assert set(sd) - {f"model.{k}" for k in plain} == {k for k in sd if k.startswith("ptl.")} | {"_extra_state"}
    assert not any("c_prev" in k or "y_prev" in k for k in sd)

    twin = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32), final_init="paper")
    twin.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), wrapped.eval()(x))

    # A plain pre-trained checkpoint goes into the original network: one line.
    fresh = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32))
    fresh.model.load_state_dict(plain)
    with torch.no_grad():
        reference = zoo_model("torchvision:resnet18").eval()
        reference.load_state_dict(plain)
        torch.testing.assert_close(fresh.eval()(x), reference(x))


def test_torch_save_load_and_deepcopy():
    wrapped = wrap_with_ptl(zoo_model("torchvision:resnet18"), input_size=(3, 32, 32), final_init="paper").train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        wrapped(x)
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(wrapped)
    with torch.no_grad():
        expected = wrapped(x)
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(clone(x), expected)
    # The copies' hooks drive their own ladders, not the original's.
    before = stateful_cells(wrapped)[0].c_prev.clone()
    with torch.no_grad():
        clone(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(stateful_cells(wrapped)[0].c_prev, before)
    assert unwrap_ptl(clone) is clone.model


# --------------------------------------------------------------------------- the latent state


@pytest.mark.parametrize("cell", ["v1", "v2"])
@pytest.mark.parametrize("mode", ["per_sample", "pooled"])
def test_latent_state_dict_round_trip_continues_identically(cell, mode):
    wrapped = _wrap(cell=cell, state_mode=mode, final_init="paper")
    _train(wrapped, batches=(5, 3))  # per-sample: 5 slots, the last 2 untouched by the batch of 3
    latent = _roundtrip(wrapped.latent_state_dict())
    paths = [n for n, m in wrapped.named_modules() if isinstance(m, bconv.cells.StatefulCell)]
    assert list(latent) == paths == ["ptl.cells.0.0", "ptl.cells.1.0", "ptl.cells.2.0"]
    names = {"v1": {"c_prev"}, "v2": {"c_prev", "y_prev"}}[cell]
    for path, state in latent.items():
        assert state["state_mode"] == mode and set(state) == names | {"state_mode"}
        assert all(state[n].shape[0] == (5 if mode == "per_sample" else 1) for n in names)

    resumed = load_ptl(TinyCNN(), wrapped.state_dict())
    resumed.load_latent_state_dict(latent)
    x = torch.randn(4, *SIZE)
    assert torch.equal(resumed.train()(x), wrapped(x))
    for a, b in zip(resumed.latent_state_dict().values(), wrapped.latent_state_dict().values()):
        assert all(torch.equal(a[n], b[n]) for n in names)
    # Without the state, the same batch gives another output: the state matters.
    fresh = load_ptl(TinyCNN(), wrapped.state_dict()).train()
    assert not torch.equal(fresh(x), resumed(x))


def test_latent_state_keeps_dtype_and_device_and_none_when_empty():
    wrapped = _wrap(cell="v2").double()
    assert all(v is None for s in wrapped.latent_state_dict().values() for k, v in s.items() if k != "state_mode")
    wrapped.train()(torch.randn(2, *SIZE, dtype=torch.float64))
    latent = wrapped.latent_state_dict()
    assert {s["c_prev"].dtype for s in latent.values()} == {torch.float64}
    assert {s["c_prev"].device for s in latent.values()} == {torch.device("cpu")}
    twin = load_ptl(TinyCNN().double(), wrapped.state_dict())
    twin.load_latent_state_dict(latent)
    assert {s["y_prev"].dtype for s in twin.latent_state_dict().values()} == {torch.float64}
    # Restoring copies: changing the saved dict afterwards does not change the model.
    latent["ptl.cells.0.0"]["c_prev"].add_(1.0)
    assert not torch.equal(twin.latent_state_dict()["ptl.cells.0.0"]["c_prev"], latent["ptl.cells.0.0"]["c_prev"])


def test_latent_state_with_detach_false_is_saved_detached():
    wrapped = _wrap(detach=False).train()
    wrapped(torch.randn(2, *SIZE))
    assert all(c.c_prev.grad_fn is not None for c in wrapped.modules() if isinstance(c, bconv.cells.StatefulCell))
    assert all(s["c_prev"].grad_fn is None for s in wrapped.latent_state_dict().values())


def test_a_latent_state_restored_under_inference_mode_trains():
    model = wrap_with_ptl(TinyCNN(), input_size=SIZE_32, cell="v2").train()
    model(torch.randn(4, *SIZE_32))
    saved = model.latent_state_dict()
    fresh = copy.deepcopy(model)
    fresh.reset_state()
    with torch.inference_mode():
        fresh.load_latent_state_dict(saved)
    assert not any(v.is_inference() for v in latent_tensors(fresh).values())
    fresh(torch.randn(4, *SIZE_32)).sum().backward()


def _states(model):
    return {
        k: {n: None if v is None or isinstance(v, str) else v.clone() for n, v in s.items()}
        for k, s in model.latent_state_dict().items()
    }


@pytest.mark.parametrize(
    "saved_options, edit, message",
    [
        (dict(), lambda sd: sd.pop("ptl.cells.1.0"), r"no state for the cells \['ptl.cells.1.0'\]"),
        (
            dict(),
            lambda sd: sd.update({"ptl.cells.9.0": sd["ptl.cells.0.0"]}),
            r"states for \['ptl.cells.9.0'\], which are not cells",
        ),
        (
            dict(state_mode="pooled"),
            None,
            r"ptl.cells.0.0: saved from a cell with state_mode='pooled', this cell has state_mode='per_sample'",
        ),
        (
            dict(cell="v2"),
            None,
            r"ptl.cells.0.0: this BConvCell keeps \['c_prev'\]; the saved state has unknown \['y_prev'\]",
        ),
        (dict(cell_width=0.5), None, r"ptl.cells.2.0: c_prev has 16 channels, this cell's state has 8"),
        (
            dict(),
            lambda sd: sd["ptl.cells.2.0"].update(c_prev=torch.zeros(4, 8)),
            r"ptl.cells.2.0: c_prev must be a floating-point tensor \[batch, channels, H, W\]; got a torch.float32 tensor of shape \(4, 8\)",
        ),
    ],
    ids=["missing", "unexpected", "state_mode", "v2_into_v1", "channels", "shape"],
)
def test_a_latent_state_that_does_not_fit_is_refused_and_nothing_changes(saved_options, edit, message):
    source = _wrap(**saved_options)
    _train(source)
    latent = source.latent_state_dict()
    if edit is not None:
        edit(latent)
    target = _wrap()
    _train(target, batches=(2,))
    before = _states(target)
    with pytest.raises(BConvError, match=message):
        target.load_latent_state_dict(latent)
    after = _states(target)
    assert all(torch.equal(before[k]["c_prev"], after[k]["c_prev"]) for k in before)


def test_a_pooled_cell_refuses_a_state_with_several_slots():
    source = _wrap(state_mode="pooled")
    _train(source)
    latent = source.latent_state_dict()
    latent["ptl.cells.0.0"]["c_prev"] = latent["ptl.cells.0.0"]["c_prev"].expand(3, -1, -1, -1)
    with pytest.raises(BConvError, match="c_prev has 3 batch slots; a pooled state has exactly one"):
        _wrap(state_mode="pooled").load_latent_state_dict(latent)


def test_model_level_functions_work_on_a_ptl_model_nested_in_another_network():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = _wrap(cell="v2", detach=False)
            self.extra = nn.Linear(5, 2)

        def forward(self, x):
            return self.extra(self.backbone(x))

    outer = Outer().train()
    outer(torch.randn(3, *SIZE))
    latent = bconv.ptl.state.latent_state_dict(outer)
    assert list(latent) == ["backbone.ptl.cells.0.0", "backbone.ptl.cells.1.0", "backbone.ptl.cells.2.0"]
    assert {
        k.removeprefix("backbone."): v for k, v in latent.items()
    }.keys() == outer.backbone.latent_state_dict().keys()

    twin = Outer()
    twin.load_state_dict(outer.state_dict())  # the nested config is checked too
    bconv.ptl.state.load_latent_state_dict(twin, latent)
    x = torch.randn(3, *SIZE)
    assert torch.equal(twin.train()(x), outer(x))

    bconv.ptl.state.reset_state(outer)
    assert all(v is None for s in bconv.ptl.state.latent_state_dict(outer).values() for k, v in s.items() if k != "state_mode")
    outer(x)
    assert outer.backbone.ptl.cells[0][0].c_prev.grad_fn is not None
    bconv.ptl.state.detach_state(outer)
    assert outer.backbone.ptl.cells[0][0].c_prev.grad_fn is None
    for fn in (bconv.ptl.state.reset_state, bconv.ptl.state.detach_state, bconv.ptl.state.latent_state_dict):
        with pytest.raises(ValueError, match="holds no BConv-Cell.*wrap_with_ptl"):
            fn(TinyCNN())


# --------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """For each variant: the uninterrupted run, and the interrupted run resumed in ONE new Python process."""
    out = tmp_path_factory.mktemp("resume")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same as the new process: reductions in the same order
    try:
        full = {name: _resume.run(options) for name, options in _resume.VARIANTS.items()}
        for name, options in _resume.VARIANTS.items():
            _resume.run(options, stop=_resume.STOP, checkpoint=out / f"{name}.pt")
    finally:
        torch.set_num_threads(threads)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(bconv.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(Path(_resume.__file__)), str(out), *(str(out / f"{n}.pt") for n in _resume.VARIANTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: (full[name], torch.load(out / f"{name}-resumed.pt", weights_only=True)) for name in _resume.VARIANTS}


# In the default run although its fixture starts a child process (about 11 s in all on two busy cores): the only test
# of a resume in a new Python process, which the README states the default run proves.
@pytest.mark.parametrize("variant", list(_resume.VARIANTS))
def test_a_run_interrupted_mid_epoch_resumes_bitwise_in_a_new_process(resumed, variant):
    (weights, output), results = resumed[variant]
    resumed_weights, resumed_output = results["with_latent"]
    assert weights.keys() == resumed_weights.keys()
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights), [
        k for k in weights if not torch.equal(weights[k], resumed_weights[k])
    ]
    assert torch.equal(output, resumed_output)
    # The latent state is what makes it exact: resumed without it, the same run ends elsewhere.
    plain_weights, plain_output = results["without_latent"]
    assert not torch.equal(output, plain_output)
    assert not all(torch.equal(weights[k], plain_weights[k]) for k in weights)


DDP_VARIANTS = {
    "per_sample": dict(cell="v2"),  # each rank saves and restores its own state
    "pooled_sync": dict(cell="v1", state_mode="pooled", sync_state=True),  # rank 0's copy restores both
}


@pytest.mark.slow  # about a minute: two rounds of two spawned processes, each importing torch and bconv
def test_ddp_run_resumes_bitwise_with_two_gloo_processes(tmp_path):
    for phase in ("train", "resume"):  # the resume runs in new processes
        mp.spawn(_resume.ddp_worker, args=(2, free_port(), str(tmp_path), phase, DDP_VARIANTS), nprocs=2, join=True)
    for name, options in DDP_VARIANTS.items():
        for rank in range(2):
            weights, output = torch.load(tmp_path / f"{name}-full-rank{rank}.pt", weights_only=True)
            resumed_weights, resumed_output = torch.load(tmp_path / f"{name}-resumed-rank{rank}.pt", weights_only=True)
            assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights), (name, rank)
            assert torch.equal(output, resumed_output), (name, rank)
        states = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True)["latent"] for r in range(2)]
        same = all(torch.equal(states[0][k]["c_prev"], states[1][k]["c_prev"]) for k in states[0])
        assert same == bool(options.get("sync_state")), name  # synced: one state; else: each rank its own


def test_the_readme_resume_recipe_resumes_exactly(tmp_path, monkeypatch):
    """The docs' script (docs/guides/checkpoints.md), run as written: once uninterrupted, once preempted after a checkpoint and rerun."""
    monkeypatch.chdir(tmp_path)
    text = docs_block("guides/checkpoints.md", "## Resuming an interrupted run")
    recipe = compile(text, "docs/guides/checkpoints.md", "exec")
    g = torch.Generator().manual_seed(5)
    dataset = torch.utils.data.TensorDataset(
        torch.randn(150, *SIZE, generator=g), torch.randint(0, 5, (150,), generator=g)
    )
    def script(time_to_checkpoint):
        torch.manual_seed(0)
        namespace = dict(dataset=dataset, epochs=2, build_network=TinyCNN, time_to_checkpoint=time_to_checkpoint)
        exec(recipe, namespace)
        return namespace["model"]

    full = script(lambda: False)
    with pytest.raises(Preempted):
        script(preempt_after_checkpoint(2))  # in the first epoch (batches of 64, 64, 22), after its 2nd batch
    assert torch.load("run.pt", weights_only=True)["step"] == 2
    resumed = script(lambda: False)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- checkpoints of earlier versions


@pytest.mark.parametrize("cell", ["v1", "v2"])
def test_a_checkpoint_written_by_bconv_0_2_loads_and_computes_what_it_computed(cell, one_thread):
    """tests/data/ptl_checkpoints_0.2.0.pt: TinyCNN wrapped by bconv 0.2.0 (v1 identity / v2 paper start, pooled
    state), trained three steps; its state dict, latent state, an input and the outputs that version computed."""
    saved = torch.load(Path(__file__).parent / "data" / "ptl_checkpoints_0.2.0.pt", weights_only=True)[cell]
    model = load_ptl(TinyCNN(), saved["state_dict"])
    assert model.config == PTLConfig.from_extra_state(saved["state_dict"]["_extra_state"])  # every option as saved
    assert model.config.cell == cell and PTLConfig.from_extra_state(saved["state_dict"]["_extra_state"]).version == "0.2.0"
    model.load_latent_state_dict(saved["latent"])
    model.train()
    assert torch.allclose(model(saved["x"]), saved["train_output"], atol=1e-6)
    model.eval()
    assert torch.allclose(model(saved["x"]), saved["eval_output"], atol=1e-6)
    twin = _wrap(cell=cell, final_init="identity" if cell == "v1" else "paper", state_mode="pooled")
    twin.load_state_dict(saved["state_dict"])  # by hand, into a wrapper built with the same options
    twin.load_latent_state_dict(saved["latent"])
    assert torch.allclose(twin.train()(saved["x"]), saved["train_output"], atol=1e-6)  # and computes the same
    assert torch.allclose(twin.eval()(saved["x"]), saved["eval_output"], atol=1e-6)


def _earlier_ladder_state_dict() -> dict[str, torch.Tensor]:
    """What bconv 0.1 wrote for a TinyCNN: plain 1x1 fusions, the final one a bare Conv2d."""
    state = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), final_init="paper").state_dict()
    old = {k: v for k, v in state.items() if not k.startswith(("ptl.fuses.", "ptl.final_fuse."))}
    old["ptl.fuses.0.weight"] = torch.zeros(2, 16 + 8, 1, 1)
    old["ptl.fuses.1.weight"] = torch.zeros(2, 32 + 8, 1, 1)
    old["ptl.final_fuse.weight"] = torch.zeros(32, 32 + 8, 1, 1)
    return old


def test_a_checkpoint_of_the_earlier_ladder_gets_a_clear_error_and_changes_nothing():
    old = _earlier_ladder_state_dict()
    with pytest.raises(CheckpointError, match="earlier PTL ladder.*Nothing was loaded.*'model.'"):
        bconv.load_ptl(TinyCNN(), old)
    wrapped = wrap_with_ptl(TinyCNN(), input_size=(3, 32, 32), final_init="paper")
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    old["model.stem.0.weight"] = old["model.stem.0.weight"] + 1
    with pytest.raises(CheckpointError, match="earlier PTL ladder"):
        wrapped.load_state_dict(old)
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items())
    # The recipe in the message: the backbone's weights load into the new ladder's network.
    p = "model."
    wrapped.model.load_state_dict({k[len(p) :]: v for k, v in old.items() if k.startswith(p)})
    assert torch.equal(wrapped.model.stem[0].weight, old["model.stem.0.weight"])
