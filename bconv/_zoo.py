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


def _timm_tags(base: str) -> tuple[str, ...]:
    """The pretrained tags timm knows for ``base`` (``resnet50`` -> ``a1_in1k``, ...), none downloaded."""
    import timm

    return tuple(n.split(".", 1)[1] for n in timm.list_pretrained(f"{base}.*"))


def _close(name: str, candidates: Sequence[str], n: int = 5) -> list[str]:
    """Close names, best first: ``difflib``'s ratio on lower case, with a name that ``name`` starts, or that starts
    with ``name``, ahead of one merely similar (``resnet50`` before ``resnet50_gn`` for ``resnet50x``)."""
    lower = {c.lower(): c for c in candidates}
    key = name.lower()
    close = difflib.get_close_matches(key, list(lower), n=20, cutoff=0.6)
    close.sort(key=lambda c: (
        not (key.startswith(c) or c.startswith(key)), -difflib.SequenceMatcher(None, key, c).ratio()
    ))
    return [lower[c] for c in dict.fromkeys(close)][:n]


def _user_name(spec: str) -> tuple[str, str]:
    """The zoo (``""``: either) and name of a model as users copy it from a model card.

    ``timm:NAME`` and ``torchvision:NAME`` choose the zoo; ``hf-hub:timm/NAME`` and ``timm/NAME`` (the Hugging
    Face Hub repository of a timm model) and ``NAME.TAG`` (timm's pretrained tag, ``resnet50.a1_in1k``) are timm's.
    """
    zoo, _, name = spec.partition(":") if ":" in spec else ("", "", spec)
    if zoo == "hf-hub":
        org, _, rest = name.partition("/")
        if org != "timm" or not rest:
            raise UnknownModelError(
                f"{spec!r} is a Hugging Face Hub repository outside timm's: its architecture is described by a "
                "file on the Hub, and bconv builds models offline. Pass the timm architecture it names "
                "(timm:NAME or hf-hub:timm/NAME)"
            )
        zoo, name = "timm", rest
    elif not zoo and name.startswith("timm/"):
        zoo, name = "timm", name[len("timm/") :]
    if zoo not in ("", "torchvision", "timm"):
        raise UnknownModelError(
            f"unknown zoo {zoo!r} in {spec!r}: use torchvision:NAME, timm:NAME, hf-hub:timm/NAME or a bare NAME"
        )
    if not zoo and "." in name:
        zoo = "timm"  # a pretrained tag: only timm's names have one
    return zoo, name


def resolve(spec: str) -> ZooModel:
    """A model name as users copy it, checked against the zoos' registries (nothing is downloaded).

    Accepted: ``resnet50`` (torchvision first, then timm), ``timm:resnet50``, ``torchvision:resnet50``, and timm's
    names as model cards print them: ``resnet50.a1_in1k`` (a pretrained tag: its input size is used, its weights
    are not), ``timm/resnet50.a1_in1k`` and ``hf-hub:timm/resnet50.a1_in1k``.

    Raises:
        UnknownModelError: with the closest names of the zoos searched (or the model's known tags).
    """
    zoo, name = _user_name(spec)
    zoos = {"torchvision": torchvision_all_names, "timm": timm_names}
    searched = [zoo] if zoo else ["torchvision", "timm"]
    base, _, tag = name.partition(".")
    for z in searched:
        if base in zoos[z]():
            if z == "timm" and tag:
                tags = _timm_tags(base)
                if tag not in tags:
                    near = _close(tag, tags) or list(tags[:5])
                    known = f"; closest: {', '.join(f'{base}.{t}' for t in near)}" if near else " (it has none)"
                    raise UnknownModelError(f"timm knows no pretrained tag {tag!r} for {base!r}{known}")
            return ZooModel(z, name)
    candidates = [n for z in searched for n in zoos[z]()]
    close = _close(base, candidates)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise UnknownModelError(f"no model named {base!r} in {' or '.join(searched)}{hint}")


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
