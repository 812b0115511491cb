"""The argument checks that several public functions share, written once.

``input_size``, ``leaf_modules``, ``stages=[...]``, module paths and "is this model already
wrapped?" are taken by :func:`bconv.anatomy`, :func:`bconv.wrap_with_ptl`,
:func:`bconv.prune.cop_prune`, the distillation and rollback helpers and the loaders. Each is checked
here, so the same mistake gets the same error class and the same message from every one of them
(see :mod:`bconv.errors`). Nothing here traces or runs a model.
"""

from __future__ import annotations

import difflib
import numbers
from typing import Any, Iterable, Protocol, Sequence, TypeVar

from torch import nn

from ..errors import InputSizeError, LeafModuleError, ModulePathError, StageSelectionError, WrappedModelError
from ._hooks import BConvHook, original_network

__all__ = [
    "default_input_size", "check_input_size", "check_leaf_modules", "select_stages", "check_module_paths",
    "is_wrapped", "refuse_wrapped",
]  # fmt: skip


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The model's own input size where it declares one, else (3, 224, 224).

    The image size a model was built for (timm's ``patch_embed.img_size``, torchvision's ViT ``image_size``)
    comes first: ``create_model("vit_small_patch14_dinov2", img_size=224)`` keeps its weights' 518 in
    ``pretrained_cfg`` and refuses 518. Then timm's ``pretrained_cfg["input_size"]``.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    size = tuple(int(s) for s in size) if size and len(size) == 3 else (3, 224, 224)
    built = getattr(getattr(model, "patch_embed", None), "img_size", None) or getattr(model, "image_size", None)
    if isinstance(built, int) and not isinstance(built, bool):
        built = (built, built)
    if isinstance(built, (tuple, list)) and len(built) == 2 and all(isinstance(v, int) and v > 0 for v in built):
        return (size[0], int(built[0]), int(built[1]))
    return size  # type: ignore[return-value]


def check_input_size(input_size: Any, model: nn.Module | None = None) -> tuple[int, int, int]:
    """``input_size`` as a tuple of three positive ints ``(C, H, W)``; ``None`` gives ``model``'s default.

    Whether the model accepts that size is found when it runs (:class:`InputSizeError` with its message).

    Raises:
        InputSizeError: anything else, with the likely fix (a missing channel count, a batch dimension).
    """
    if input_size is None:
        if model is None:
            raise InputSizeError("input_size is needed: three positive integers (C, H, W), e.g. (3, 224, 224)")
        return default_input_size(model)
    size: tuple[int, ...] | None = None
    if not isinstance(input_size, (str, bytes)):
        try:
            values = list(input_size)
            if all(not isinstance(v, bool) and float(v).is_integer() and v > 0 for v in values):
                size = tuple(int(v) for v in values)
        except (TypeError, ValueError):
            size = None
    if size is not None and len(size) == 3:
        return size  # type: ignore[return-value]
    hint = ""
    if size is not None and len(size) == 2:
        hint = f" A pair is (H, W): add the channels first, e.g. (3, {size[0]}, {size[1]})."
    elif size is not None and len(size) == 4:
        hint = f" Leave the batch size out: {size[1:]}."
    raise InputSizeError(
        f"input_size must be three positive integers (C, H, W), e.g. (3, 224, 224); got {input_size!r}.{hint}"
    )


def check_leaf_modules(leaf_modules: Any) -> tuple[type[nn.Module], ...]:
    """``leaf_modules`` as a tuple of ``nn.Module`` classes; a single class is accepted as well.

    Raises:
        LeafModuleError: an item that is not an ``nn.Module`` class (its name as a string, an instance).
    """
    if leaf_modules is None:
        return ()
    if isinstance(leaf_modules, type):
        leaf_modules = (leaf_modules,)
    if isinstance(leaf_modules, (str, bytes, nn.Module)) or not isinstance(leaf_modules, Iterable):
        leaf_modules = (leaf_modules,)
    found = tuple(leaf_modules)
    for item in found:
        if isinstance(item, type) and issubclass(item, nn.Module):
            continue
        if isinstance(item, str):
            name = item.rpartition(".")[2]
            known = getattr(nn, name, None)
            where = "torch.nn." if isinstance(known, type) and issubclass(known, nn.Module) else ""
            fix = f"the class itself, not its name: leaf_modules=[{where}{name}]"
        elif isinstance(item, nn.Module):
            fix = f"the class, not an instance: leaf_modules=[{type(item).__name__}]"
        else:
            fix = "nn.Module subclasses, e.g. leaf_modules=[MyBlock]"
        raise LeafModuleError(
            f"leaf_modules must hold nn.Module classes (fx calls their instances whole instead of tracing through "
            f"them); got {item!r}. Pass {fix}."
        )
    return found


class _StageLike(Protocol):
    index: int
    name: str
    channels: int
    reduction: int


S = TypeVar("S", bound=_StageLike)


def select_stages(found: Sequence[S], stages: Any, model: nn.Module) -> list[S]:
    """The stages ``stages`` names among ``found`` (all of them for ``None``), in network order.

    ``stages`` holds indices (negative allowed) or names as ``python -m bconv.inspect`` prints them;
    a single index or name is accepted as well.

    Raises:
        StageSelectionError: an unknown name (said whether it is a module that is no stage), an index out
            of range, a value that is neither (``True``, ``1.0``), a stage chosen twice, or none chosen;
            the message lists the valid stages.
    """
    if stages is None:
        return list(found)
    if isinstance(stages, (numbers.Integral, str)) and not isinstance(stages, bool):
        stages = [stages]
    valid = ", ".join(f"{s.index}: {s.name} ({s.channels}ch @ 1/{s.reduction})" for s in found)
    if not isinstance(stages, Iterable):
        raise StageSelectionError(f"stages must be a list of stage indices or names; got {stages!r}. Valid stages: {valid}")
    stages = list(stages)
    by_name = {s.name: s for s in found}
    chosen: list[S] = []
    for spec in stages:
        if isinstance(spec, bool) or not isinstance(spec, (numbers.Integral, str)):
            raise StageSelectionError(
                f"stages must hold stage indices or names; got {spec!r} ({type(spec).__name__}). Valid stages: {valid}"
            )
        if isinstance(spec, numbers.Integral):
            spec = int(spec)  # numpy's and torch's integers too
            if not -len(found) <= spec < len(found):
                raise StageSelectionError(
                    f"stage index {spec} is out of range for {len(found)} stages. Valid stages: {valid}. "
                    f"See python -m bconv.inspect."
                )
            chosen.append(found[spec])
        elif spec in by_name:
            chosen.append(by_name[spec])
        else:
            modules = dict(model.named_modules())
            what = (
                "is a module of the model but not a stage (a stage ends where the resolution drops, at a point "
                "every path passes through)"
                if spec in modules
                else "is not a module of the model"
            )
            raise StageSelectionError(f"stage {spec!r} {what}. Valid stages: {valid}. See python -m bconv.inspect.")
    seen: set[int] = set()
    for s in chosen:
        if s.index in seen:
            raise StageSelectionError(f"stage {s.index} ({s.name}) is chosen twice in stages={stages!r}")
        seen.add(s.index)
    if not chosen:
        raise StageSelectionError(f"stages is empty: choose at least one, or pass None for all. Valid stages: {valid}")
    return sorted(chosen, key=lambda s: s.index)  # the network fixes the order


def check_module_paths(model: nn.Module, paths: Any, argument: str) -> tuple[str, ...]:
    """``paths`` as a tuple of module paths ``model`` has; a single path is accepted as well.

    Raises:
        ModulePathError: a path that is no module of ``model`` (a typo, a parameter's name), with the closest.
    """
    if isinstance(paths, str):
        paths = (paths,)
    paths = tuple(paths)
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    for path in paths:
        if not isinstance(path, str):
            raise ModulePathError(f"{argument} must hold module paths (strings such as 'layer4.1.conv1'); got {path!r}")
        if path in known:
            continue
        owner = path.rpartition(".")[0]
        if owner in known and path.rpartition(".")[2] in dict(model.get_submodule(owner).named_parameters(recurse=False)):
            hint = f" It names a parameter: pass its module `{owner}`."
        else:
            close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
            hint = f" Closest: {', '.join(close)}." if close else ""
        raise ModulePathError(
            f"{argument}: {type(model).__name__} has no module `{path}`.{hint} Module paths are those of "
            f"model.named_modules() (python -m bconv.inspect shows the stages)."
        )
    return paths


def is_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` is a PTL wrapper, or holds bconv's hooks anywhere (a wrapped network, or one nested inside)."""
    return original_network(model)[1] != "" or any(
        isinstance(h, BConvHook) for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    )


def refuse_wrapped(model: nn.Module, refusal: str) -> None:
    """Raise :class:`WrappedModelError` with ``refusal`` (what the caller does not do, and what to do) if wrapped."""
    if is_wrapped(model):
        where = "" if original_network(model)[1] else f" (this {type(model).__name__} holds a PTL-wrapped network)"
        raise WrappedModelError(f"this model is already wrapped with PTL{where}: {refusal}")
