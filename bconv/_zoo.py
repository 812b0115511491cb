"""Model names from torchvision's and timm's registries, built with random weights.

Shared by ``python -m bconv.inspect``, the benchmarks and the tests. Nothing is downloaded:
torchvision models get ``weights=None``, timm models ``pretrained=False``.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from torch import nn

from .errors import UnknownModelError

__all__ = [
    "ZooModel", "resolve", "build", "torchvision_names", "torchvision_all_names", "timm_names", "timm_families",
    "UnknownModelError",
]  # fmt: skip


@dataclass(frozen=True)
class ZooModel:
    zoo: str  # "torchvision" or "timm"
    name: str

    def __str__(self) -> str:
        return f"{self.zoo}:{self.name}"


@lru_cache(maxsize=None)
def torchvision_names() -> tuple[str, ...]:
    """Classification models of torchvision (``torchvision.models.list_models(module=torchvision.models)``)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


@lru_cache(maxsize=None)
def torchvision_all_names() -> tuple[str, ...]:
    """Every model torchvision knows (``torchvision.models.list_models()``): the classifiers, then segmentation,
    detection, video, optical flow and quantization models, which ``resolve`` finds as well."""
    import torchvision

    classifiers = torchvision_names()
    return classifiers + tuple(n for n in torchvision.models.list_models() if n not in set(classifiers))


@lru_cache(maxsize=None)
def timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def resolve(spec: str) -> ZooModel:
    """``resnet50`` (torchvision first, then timm), ``timm:resnet50`` or ``torchvision:resnet50``.

    Raises:
        UnknownModelError: with the closest names of the zoos searched.
    """
    zoo, _, name = spec.rpartition(":")
    zoos = {"torchvision": torchvision_all_names, "timm": timm_names}
    if zoo and zoo not in zoos:
        raise UnknownModelError(f"unknown zoo {zoo!r} in {spec!r}: use torchvision:NAME or timm:NAME")
    searched = [zoo] if zoo else ["torchvision", "timm"]
    for z in searched:
        if name in zoos[z]():
            return ZooModel(z, name)
    candidates = [n for z in searched for n in zoos[z]()]
    close = list(dict.fromkeys(difflib.get_close_matches(name, candidates, n=8, cutoff=0.6)))[:5]
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise UnknownModelError(f"no model named {name!r} in {' or '.join(searched)}{hint}")


def build(model: ZooModel | str, **kwargs) -> nn.Module:
    """Build a zoo model with random weights (nothing is downloaded)."""
    model = resolve(model) if isinstance(model, str) else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's init-weights FutureWarnings
        if model.zoo == "torchvision":
            import inspect

            import torchvision

            builder = torchvision.models.get_model_builder(model.name)
            if "weights_backbone" in inspect.signature(builder).parameters:
                kwargs.setdefault("weights_backbone", None)  # segmentation and detection models load one by default
            return builder(weights=None, **kwargs)
        import timm

        return timm.create_model(model.name, pretrained=False, **kwargs)


def torchvision_input_size(name: str, model: nn.Module | None = None) -> tuple[int, int, int]:
    """The crop size torchvision's weights were trained at (299 for Inception v3), else 224.

    A model built with fixed-size position embeddings says its own size: ``vit_h_14`` built without
    weights takes 224, not the 518 of its only weights.
    """
    import torchvision

    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return (3, size, size)
    try:
        weights = torchvision.models.get_model_weights(name)
        crop = list(weights)[0].transforms().crop_size
        return (3, int(crop[0]), int(crop[-1]))
    except (ValueError, IndexError, AttributeError, TypeError):
        return (3, 224, 224)


# Lower is smaller: the representative of a family is its smallest-sounding model.
_SMALL = [re.compile(p) for p in (
    r"^test_", "atto", "femto", "pico", "nano", "xxs", "tiny", r"xs\b|_xs", "mini", "small", "lite",
    r"_s\d*(_|$)", "b0", r"\D18(\D|$)", "050",
)]  # fmt: skip
_LARGE = re.compile(r"large|huge|giant|enormous|gigantic|_xl|_l\b|\b1b|3b|[^0-9](384|448|512|518|560)")


def _smallness(name: str) -> tuple[int, int, int, str]:
    rank = next((i for i, k in enumerate(_SMALL) if k.search(name)), len(_SMALL))
    return (bool(_LARGE.search(name)), rank, len(name), name)


def timm_families(exclude: Sequence[str] = ()) -> dict[str, str]:
    """One representative model per timm family (the module that registers it), the smallest-sounding one."""
    import timm

    return {
        family: min(timm.list_models(module=family), key=_smallness)
        for family in timm.list_modules()
        if family not in exclude and timm.list_models(module=family)
    }
