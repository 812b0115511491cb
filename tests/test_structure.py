"""The package's shape: imports by public names only, a small public surface, moved names that still resolve."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import bconv

PACKAGE = Path(bconv.__file__).parent
ERRORS = {name for name in bconv.__all__ if name.endswith("Error")}


def _bconv_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _underscore_imports(path: Path) -> list[str]:
    """``from bconv.X import _name`` (or a module ``_name`` of bconv imported as a name) anywhere in ``path``."""
    module = _module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, node, path.name == "__init__.py")
            if not source.startswith("bconv"):
                continue  # torch's and timm's own private helpers are theirs to name
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: from {source} import {alias.name}")
    return found


def test_no_module_imports_another_modules_underscore_name():
    found = [line for path in _bconv_modules() for line in _underscore_imports(path)]
    assert found == []


def test_the_check_itself_finds_an_underscore_import(tmp_path):
    probe = PACKAGE / "surgery" / "_probe_for_test.py"
    probe.write_text("from ._trace import _first_line\nfrom torch.utils._pytree import tree_leaves\n")
    try:
        assert _underscore_imports(probe) == ["bconv/surgery/_probe_for_test.py:1: from bconv.surgery._trace import _first_line"]
    finally:
        probe.unlink()


def test_public_surface_is_small_and_each_name_resolves():
    public = set(bconv.__all__) - ERRORS - {"__version__"}
    assert len(public) <= 16, sorted(public)
    for name in bconv.__all__:
        assert getattr(bconv, name) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # importing bconv and its public names warns about nothing
        importlib.reload(bconv)


def test_importing_bconv_imports_no_optional_dependency():
    code = "import sys, bconv, bconv.prune, bconv.distill, bconv.rollback; print(sorted({'lightning', 'accelerate'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


MOVED = [
    ("bconv", "find_stages", "bconv.anatomy(model).stages"),
    ("bconv", "reset_state", "model.reset_state()"),
    ("bconv", "detach_state", "model.detach_state()"),
    ("bconv", "latent_state_dict", "model.latent_state_dict()"),
    ("bconv", "load_latent_state_dict", "model.load_latent_state_dict"),
    ("bconv.surgery", "wrap_with_ptl", "bconv.wrap_with_ptl"),
    ("bconv.surgery", "PTLModel", "bconv.PTLModel"),
    ("bconv.surgery.ptl", "wrap_with_ptl", "bconv.wrap_with_ptl"),
    ("bconv.surgery.ptl", "PTLLadder", "bconv.ptl.PTLLadder"),
    ("bconv.surgery.ptl", "FinalFusion", "bconv.ptl.ladder.FinalFusion"),
    ("bconv.surgery.config", "PTLConfig", "bconv.PTLConfig"),
    ("bconv.surgery.checkpoint", "load_ptl", "bconv.load_ptl"),
    ("bconv.surgery.usage", "ladder_usage", "bconv.ladder_usage"),
    ("bconv.surgery.plan", "ptl_plan", "bconv.ptl.ptl_plan"),
    ("bconv.surgery.stages", "Stage", "bconv.Stage"),
    ("bconv.state", "LatentState", "bconv.LatentState"),
]


@pytest.mark.parametrize("module, name, new", MOVED, ids=[f"{m}.{n}" for m, n, _ in MOVED])
def test_moved_names_still_resolve_with_a_deprecation_warning_naming_the_new_one(module, name, new):
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} is deprecated .* use {new}".replace("(", r"\(").replace(")", r"\)")):
        value = getattr(importlib.import_module(module), name)
    assert value is not None
    with pytest.raises(AttributeError):
        getattr(importlib.import_module(module), "no_such_name")


def test_a_deprecated_function_still_does_its_job():
    from conftest import TinyCNN

    wrapped = bconv.wrap_with_ptl(TinyCNN(), input_size=(3, 16, 16))
    import torch

    wrapped(torch.randn(2, 3, 16, 16))
    assert all(s["c_prev"] is not None for s in wrapped.latent_state_dict().values())
    with pytest.warns(DeprecationWarning):
        reset = bconv.reset_state
    reset(wrapped)
    assert all(s["c_prev"] is None for s in wrapped.latent_state_dict().values())
