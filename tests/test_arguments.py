"""The same mistake gets the same error from every public function that can meet it.

Arguments are checked before they reach torch, by one function per rule, with one error class per mistake: a
malformed input_size, a protected path, leaf_modules, a stage selection, an already wrapped model, a file that is
no checkpoint of bconv's. Most tests here call several public functions with one mistake and compare what they
raise; the rest pin a shared rule through the one function that exercises it most (cop_prune's input size and
protect, leaf_modules) or pin where the rules and error classes live (bconv.errors, the import graph). Checks of
one function's own options are in that function's file (wrap_with_ptl's: tests/test_wrapper.py).
"""

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import bconv
from bconv import load_ptl, wrap_with_ptl
from bconv.surgery import find_stages
from bconv.distill import STDTrainer, classifier_path
from bconv.errors import (
    CheckpointError,
    InputSizeError,
    LeafModuleError,
    ModulePathError,
    StageSelectionError,
    WrappedModelError,
)
from bconv.prune import cop_prune, load_pruned
from bconv.rollback import Rollback
from conftest import TinyCNN

SIZE = (3, 32, 32)


def _unchanged(model: nn.Module):
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    return lambda: all(v.shape == saved[k].shape and torch.equal(v, saved[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- input_size


def test_cop_prune_checks_input_size_as_wrap_with_ptl_does():
    model = torchvision.models.resnet18()
    same = _unchanged(model)
    with pytest.raises(InputSizeError, match=r"three positive integers \(C, H, W\).*got \(224, 224\).*\(3, 224, 224\)"):
        cop_prune(model, input_size=(224, 224))
    assert same()


def test_cop_prune_reports_a_size_the_model_rejects_with_the_models_message():
    model = torchvision.models.resnet18()
    same = _unchanged(model)
    with pytest.raises(InputSizeError, match=r"rejected a dummy input of shape \(1, 1, 32, 32\).*3 channels"):
        cop_prune(model, input_size=(1, 32, 32))  # a grey-scale size for an RGB network
    assert same()


PUBLIC_WITH_INPUT_SIZE = {
    "find_stages": lambda m, size: find_stages(m, size),
    "anatomy": lambda m, size: bconv.anatomy(m, size),
    "wrap_with_ptl": lambda m, size: wrap_with_ptl(m, input_size=size),
    "cop_prune": lambda m, size: cop_prune(m, input_size=size),
    "Rollback": lambda m, size: Rollback(m, input_size=size),
    "STDTrainer": lambda m, size: STDTrainer(TinyCNN(), m, input_size=size),
    "classifier_path": lambda m, size: classifier_path(m, size),
}


@pytest.mark.parametrize("size", [(32, 32), (3, 32, 32.5), "3x32x32", (3, 0, 32), 5])
@pytest.mark.parametrize("name", list(PUBLIC_WITH_INPUT_SIZE))
def test_every_public_function_rejects_a_malformed_input_size_alike(name, size):
    with pytest.raises(InputSizeError, match=re.escape(f"input_size must be three positive integers (C, H, W), e.g. (3, 224, 224); got {size!r}")):
        PUBLIC_WITH_INPUT_SIZE[name](TinyCNN(), size)


# --------------------------------------------------------------------------- protect


def test_a_protected_path_the_model_does_not_have_is_an_error():
    model = torchvision.models.resnet18()
    same = _unchanged(model)
    with pytest.raises(ModulePathError, match=r"no module `layer4\.1\.conv9`.*Closest: layer4\.1\.conv2, layer4\.1\.conv1"):
        cop_prune(model, SIZE, ratio=0.3, protect=["layer4.1.conv9"])
    assert same()
    with pytest.raises(ModulePathError, match=r"names a parameter: pass its module `layer4\.1\.conv1`"):
        cop_prune(model, SIZE, ratio=0.3, protect="layer4.1.conv1.weight")


def test_a_protected_block_keeps_every_layer_inside_it():
    model = torchvision.models.resnet18()
    widths = {n: m.weight.shape[:2] for n, m in model.layer4.named_modules() if isinstance(m, nn.Conv2d)}
    result = cop_prune(model, SIZE, ratio=0.15, metric="channels", protect="layer4")  # one path, not a list
    assert result.report.achieved > 0.12
    assert {n: m.weight.shape[:2] for n, m in model.layer4.named_modules() if isinstance(m, nn.Conv2d)} == widths
    assert not any(w.name.startswith("layer4.") for w in result.report.layers)


# --------------------------------------------------------------------------- leaf_modules


def test_leaf_modules_given_by_name_say_that_classes_are_needed():
    with pytest.raises(LeafModuleError, match=r"must hold nn\.Module classes.*got 'Conv2d'.*leaf_modules=\[torch\.nn\.Conv2d\]") as info:
        wrap_with_ptl(torchvision.models.resnet18(), input_size=SIZE, leaf_modules=["Conv2d"])
    assert "conv1" not in str(info.value)  # the model's first conv is not what is wrong


def test_leaf_modules_given_as_instances_say_that_classes_are_needed():
    with pytest.raises(LeafModuleError, match=r"the class, not an instance: leaf_modules=\[ReLU\]"):
        find_stages(TinyCNN(), SIZE, leaf_modules=[nn.ReLU()])
    assert find_stages(TinyCNN(), SIZE, leaf_modules=nn.ReLU)  # a lone class is a list of one


# --------------------------------------------------------------------------- stage selection, written once


@pytest.mark.parametrize("stages", [[True], [1.0], ["layer9"], [9], ["layer3", "layer3"], [], ["fc"]])
def test_stage_selection_is_one_rule_for_ptl_and_pruning(stages):
    model = torchvision.models.resnet18()
    same = _unchanged(model)
    with pytest.raises(StageSelectionError) as from_ptl:
        wrap_with_ptl(model, stages=stages, input_size=SIZE)
    with pytest.raises(StageSelectionError) as from_prune:
        cop_prune(model, SIZE, ratio=0.1, stages=stages)
    assert str(from_ptl.value) == str(from_prune.value)
    assert same()


def test_both_accept_the_same_stage_names_and_indices():
    model = torchvision.models.resnet18()
    result = cop_prune(model, SIZE, ratio=0.05, metric="channels", stages=[-1, "layer3"])
    assert {w.name.split(".")[0] for w in result.report.layers} <= {"layer3", "layer4"}


# --------------------------------------------------------------------------- "already wrapped", written once


def test_a_wrapped_model_is_the_same_error_everywhere(tmp_path):
    wrapped = wrap_with_ptl(TinyCNN(), input_size=SIZE)
    for call in (
        lambda: wrap_with_ptl(wrapped, input_size=SIZE),
        lambda: cop_prune(wrapped, SIZE, ratio=0.1),
        lambda: load_pruned(wrapped, tmp_path / "never-read.pt"),
    ):
        with pytest.raises(WrappedModelError, match="already wrapped with PTL"):
            call()


def test_a_network_holding_a_wrapped_one_is_the_same_error_everywhere():
    holder = nn.Sequential(wrap_with_ptl(TinyCNN(), input_size=SIZE), nn.Linear(5, 2))
    for call in (lambda: wrap_with_ptl(holder, input_size=SIZE), lambda: cop_prune(holder, SIZE, ratio=0.1)):
        with pytest.raises(WrappedModelError, match="holds a PTL-wrapped network"):
            call()


# ----------------------------------------------- a file that is no checkpoint of bconv's, one error for both loaders


def test_a_bad_file_is_the_same_error_from_both_loaders(tmp_path):
    # One mistake, one error class: a file that is no checkpoint of bconv's.
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    other = torch.load(tmp_path / "other.pt", weights_only=True)
    with pytest.raises(CheckpointError):
        load_pruned(torchvision.models.resnet18(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError):
        load_ptl(torchvision.models.resnet18(), other)
    assert issubclass(CheckpointError, bconv.BConvError) and issubclass(CheckpointError, ValueError)


# --------------------------------------------------------------------------- where errors and rules live


def _bconv_modules() -> list[str]:
    return ["bconv"] + [m.name for m in pkgutil.walk_packages(bconv.__path__, "bconv.")]


def test_every_error_class_is_defined_in_bconv_errors():
    elsewhere = []
    for name in _bconv_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name
                and name != "bconv.errors" and not attr.startswith("_")
            ):  # fmt: skip
                elsewhere.append(f"{name}.{attr}")
    assert not elsewhere, f"error classes outside bconv/errors.py: {elsewhere}"
    from bconv.prune import PruneError, PruneTargetError  # still importable where they used to be

    assert PruneError is bconv.errors.PruneError and PruneTargetError is bconv.errors.PruneTargetError


def _imports() -> dict[str, set[str]]:
    """``module -> bconv modules it imports``, function bodies included (a lazy import is an import too)."""
    root = Path(bconv.__file__).parent
    known = set(_bconv_modules())
    graph: dict[str, set[str]] = {}
    for name in known:
        path = root.joinpath(*name.split(".")[1:])
        file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in known and m != name}
    return graph


def test_anatomy_and_the_stage_rules_do_not_import_each_other():
    graph = _imports()
    assert "bconv.surgery.anatomy" not in graph["bconv.surgery._stages"]
    assert "bconv.surgery._stages" in graph["bconv.surgery.anatomy"]
    assert "bconv.surgery.stages" not in graph["bconv.surgery.anatomy"]


def test_the_import_graph_of_bconv_has_no_cycle():
    graph = _imports()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            assert nxt not in path, "import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt])
            if nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])


def test_companion_techniques_read_the_network_through_the_anatomy_only():
    graph = _imports()
    for name, imported in graph.items():
        if name.startswith(("bconv.distill", "bconv.rollback", "bconv.prune")):
            assert not imported & {"bconv.surgery._stages", "bconv.surgery.stages"}, name
