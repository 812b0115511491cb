"""One description of a network: its stem, its stages and its head, found once and read by every technique.

``anatomy(model)`` traces the network with torch.fx once, propagates shapes on meta tensors at two
input sizes (so layouts, channels and reductions are measured and no real convolution runs), and
returns an :class:`Anatomy`: the stages (as :func:`bconv.anatomy` reports them), the stem (its own
block even where it is folded into the first stage) and the :class:`Head` (everything after the deepest stage: global pooling,
the classifier, the pooled feature width). PTL (``wrap_with_ptl``), distillation
(``pooled_features``, ``STDTrainer``), rolling back (``Rollback``) and pruning all read it, so
none of them decides again, with rules of its own, where the head begins.

:func:`find_stages` is a view of it (its stages). The stage rules themselves live in the private
``_stages`` module below this one: the import graph reads ``_trace`` -> ``_stages`` -> ``anatomy`` ->
the ladder and the companion techniques, which import only this module.

The result is cached per model (weakly, so the cache keeps no model alive) and measured anew whenever
anything that decides shapes changes: the module structure (a new classifier, a replaced block), a
parameter's shape (pruning), or a module's settings (a convolution's or pooling's stride, padding,
dilation, kernel size: ReID's "last stride 1").
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from torch import fx, nn

from ..errors import (
    BConvError,
    ClassifierNotFoundError,
    ConfigError,
    InputSizeError,
    NoSpatialStagesError,
    TraceError,
    UnsupportedModelError,
)
from ._checks import check_input_size, check_leaf_modules, default_input_size
from ._hooks import bconv_hooks_suspended, original_network
from ._stages import (
    SOURCES,
    Source,
    Stage,
    feature_info_entries,
    feature_info_stages,
    fx_stages,
    is_global_pool,
    main_chain,
)
from ._tokens import token_stages
from ._trace import Traced, eval_mode, propagate_shapes, trace

__all__ = [
    "Anatomy", "Head", "Stage", "Source", "anatomy", "find_stages", "stem_modules", "default_input_size",
    "UnsupportedModelError",
]  # fmt: skip


@dataclass(frozen=True)
class Head:
    """What follows the deepest stage.

    Attributes:
        modules: outermost module paths computed after the last stage (pooling, classifier, a segmentation
            head or decoder, a detection neck).
        pool: the global pooling: a module path (``avgpool``) or the function (``mean``, ``adaptive_avg_pool2d``);
            None when the network keeps its maps (segmentation, features only).
        classifier: module path of the final classifier, whose input is the pooled feature vector
            (``fc``, ``classifier.6``, ``head.fc``); None when there is none (see ``reason``).
        features: width of the pooled feature vector that enters the classifier (or leaves the pooling).
        reason: why there is no classifier, when ``classifier`` is None.
    """

    modules: tuple[str, ...]
    pool: str | None
    classifier: str | None
    features: int | None
    reason: str | None = None


@dataclass(frozen=True)
class Anatomy:
    """A network's stem, stages and head, as measured at ``input_size``.

    Attributes:
        stages: the stages, from the input (see :class:`bconv.Stage`).
        stem: the network's stem: the modules of the first stage that come before its own block (see
            :func:`stem_modules`), or all of them when the first stage is the stem itself.
        head: see :class:`Head`.
        input_size: ``(C, H, W)`` of the measurement.
        shapes_from: ``"meta"`` (meta tensors: no real compute) or ``"real"`` (a model that meta tensors
            cannot run got one real forward per input size).
        layout_measured: True when shapes were propagated at two input sizes, so every layout was measured;
            False for a model that accepts one input size only (then only unambiguous shapes count).
    """

    stages: tuple[Stage, ...]
    stem: tuple[str, ...]
    head: Head
    input_size: tuple[int, ...]
    shapes_from: str
    layout_measured: bool
    # Why there are no stages (such a network, CrossViT say, still has a head that distillation can read).
    stages_error: BConvError | None = field(default=None, repr=False, compare=False)

    def with_prefix(self, prefix: str) -> Anatomy:
        """The same anatomy with every module path under ``prefix`` (a PTL wrapper's ``model.``)."""
        if not prefix:
            return self
        stages = tuple(replace(s, name=prefix + s.name, modules=tuple(prefix + m for m in s.modules)) for s in self.stages)
        pool = self.head.pool
        if pool is not None and any(pool == m or pool.startswith(m + ".") for m in self.head.modules):
            pool = prefix + pool  # a module path, not a function's name
        head = replace(
            self.head,
            modules=tuple(prefix + m for m in self.head.modules),
            pool=pool,
            classifier=prefix + self.head.classifier if self.head.classifier else None,
        )
        return replace(self, stages=stages, stem=tuple(prefix + m for m in self.stem), head=head)


# model -> {(fingerprint, input_size, source, leaves): Anatomy}; weak, so the cache keeps no model alive.
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Anatomy]] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    """Everything about ``model`` that decides the shapes of its maps: module paths and types, parameter shapes,
    and each module's own settings (its plain attributes: a convolution's stride, padding, dilation and kernel
    size, a pooling's, a user block's ``self.stride``). A new head, a module swapped for another, a layer whose
    width changed (pruning, ``reset_classifier(10)``) or whose stride changed (ReID's last stride 1) is measured
    anew; new weights of the same shapes are not. A ``forward`` replaced on an instance counts too.
    """
    return tuple(
        (
            name,
            type(m),
            tuple(tuple(p.shape) for p in m.parameters(recurse=False)),
            tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in m.__dict__.items() if _is_setting(k, v)),
            id(m.__dict__["forward"]) if "forward" in m.__dict__ else None,
        )
        for name, m in model.named_modules()
    )


_SETTING_TYPES = (int, float, str, bool)


def _is_setting(name: str, value: object) -> bool:
    """A public attribute with a plain value that can decide a shape: a number, a string, or a tuple or list of
    them (``(2, 2)``); not ``training``, which changes at every ``train()``/``eval()`` and decides no shape."""
    if name[0] == "_" or name == "training":
        return False
    if isinstance(value, _SETTING_TYPES):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, _SETTING_TYPES) for v in value)


def find_stages(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    source: Source = "auto",
    *,
    leaf_modules: Iterable[type] = (),
) -> list[Stage]:
    """Find the stages of ``model``: where its feature maps change resolution (a view of :func:`anatomy`).

    Args:
        model: any CNN (timm, torchvision, or your own). It is not modified; its train/eval
            flags are restored.
        input_size: ``(C, H, W)`` of the dummy input used to propagate shapes. Defaults to the
            model's own (timm's ``pretrained_cfg``) or ``(3, 224, 224)``.
        source: ``"fx"``, ``"feature_info"`` (timm models), or ``"auto"`` (feature_info when
            usable, else fx). Each stage's ``source`` says which was used.
        leaf_modules: extra module classes that fx should call as a whole instead of tracing
            through (for code with data-dependent control flow).

    Returns:
        The stages in order from the input: with strictly increasing reduction, or a token backbone's blocks
        (all at the patch size, ``layout="NLC"``).

    Raises:
        ValueError: for an unknown ``source``.
        bconv.errors.InputSizeError: a malformed ``input_size``, or one the model rejects (shows its message).
        bconv.errors.LeafModuleError: ``leaf_modules`` holds something other than module classes.
        bconv.errors.TraceError: fx could not trace the model (names the module and the fix).
        bconv.errors.NoSpatialStagesError: neither spatial stages nor a token grid (CrossViT, TNT, PiT).

    Example::

        >>> import torchvision
        >>> stages = find_stages(torchvision.models.resnet18())
        >>> [(s.name, s.channels, s.reduction) for s in stages]
        [('relu', 64, 2), ('layer1', 64, 4), ('layer2', 128, 8), ('layer3', 256, 16), ('layer4', 512, 32)]
    """
    return list(anatomy(model, input_size, source, leaf_modules=leaf_modules).stages)


def anatomy(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    source: Source = "auto",
    *,
    leaf_modules: Iterable[type] = (),
    need_stages: bool = True,
) -> Anatomy:
    """The stem, stages and head of ``model``, found once and cached.

    For a PTL-wrapped model, the anatomy of its original network with paths under ``model.``.

    Args:
        model: any CNN (timm, torchvision or your own). It is not modified; its train/eval flags are restored.
        input_size: ``(C, H, W)`` of the measurement; defaults to the model's own (timm's ``pretrained_cfg``)
            or ``(3, 224, 224)``. Non-square sizes (256x128 for person re-identification) work.
        source: how to find the stages: ``"fx"``, ``"feature_info"`` (timm) or ``"auto"``.
        leaf_modules: module classes that fx should call whole instead of tracing through.
        need_stages: raise when the model has no spatial stages (default); ``False`` returns the anatomy
            with no stages and its head (for distillation).

    Returns:
        An :class:`Anatomy`.

    Raises:
        ValueError: an unknown ``source``.
        bconv.errors.InputSizeError: a malformed ``input_size``, or one the model rejects.
        bconv.errors.LeafModuleError: ``leaf_modules`` holds something other than module classes.
        bconv.errors.TraceError: fx cannot trace the model (names the module, the fix, and a traceable
            submodule to use instead when there is one, such as a detector's ``model.backbone.body``).
        bconv.errors.NoSpatialStagesError: neither spatial stages nor a token grid (CrossViT, TNT, PiT).
        UnsupportedModelError: a video (3-D) or 1-D network.

    Example::

        >>> a = anatomy(torchvision.models.resnet50())
        >>> [s.name for s in a.stages], a.head.pool, a.head.classifier, a.head.features
        (['relu', 'layer1', 'layer2', 'layer3', 'layer4'], 'avgpool', 'fc', 2048)
    """
    if source not in SOURCES:
        raise ConfigError(f"source={source!r} is not one of {', '.join(map(repr, SOURCES))}")
    network, prefix = original_network(model)
    _check_kind(network)  # a video network's (C, T, H, W) is no malformed input_size: say what it is first
    size = check_input_size(input_size, network)
    leaves = check_leaf_modules(leaf_modules)
    info = feature_info_entries(network) if source != "fx" else ""
    described = info if isinstance(info, str) else tuple(e["module"] for e in info)
    key = (_fingerprint(network), described, size, source, leaves)
    cached = _CACHE.setdefault(network, {})
    if key not in cached:
        # A PTL-wrapped network's hooks would run the ladder on the dummy input: switch them off.
        with eval_mode(network), bconv_hooks_suspended(network):
            cached[key] = _measure(network, size, source, leaves, info)
    found = cached[key]
    if need_stages and found.stages_error is not None:
        raise found.stages_error
    return found.with_prefix(prefix)


def _measure(
    model: nn.Module,
    input_size: tuple[int, ...],
    source: str,
    leaf_modules: tuple[type, ...],
    entries: list[dict] | str,
) -> Anatomy:
    """Trace once, propagate shapes once (at two sizes), and read the stages and the head from that."""
    traced: Traced | None = None
    trace_error: TraceError | None = None
    try:
        traced = trace(model, leaf_modules)
        propagate_shapes(traced, model, input_size)
    except TraceError as e:
        traced, trace_error = None, e
    except InputSizeError as e:
        hint = _submodule_hint(model)
        if hint:
            raise InputSizeError(f"{hint} (As a whole: {e})") from e
        raise

    stages: list[Stage] | None = None
    chain: list[fx.Node] = []
    if source == "feature_info" and isinstance(entries, str):
        raise ValueError(f"source='feature_info' is not usable for {type(model).__name__}: {entries}")
    if source != "fx" and not isinstance(entries, str):
        try:
            stages = feature_info_stages(model, entries, input_size)
        except InputSizeError:
            raise
        except BConvError:
            if source == "feature_info":
                raise
            stages = None  # feature_info does not describe spatial module outputs here: fx decides
    stages_error: NoSpatialStagesError | None = None
    if traced is not None:
        chain = main_chain(traced)
        if stages is None:
            try:
                stages = fx_stages(model, traced, chain)
            except NoSpatialStagesError as e:
                try:  # one feature map, then tokens: a ViT-like network's blocks are its stages
                    stages = token_stages(model, traced, chain, input_size, _classifier_or_none(model, traced), str(e))
                except NoSpatialStagesError as token_error:
                    stages, stages_error = [], token_error
    elif stages is None:
        assert trace_error is not None
        hint = _submodule_hint(model)
        if hint:
            raise TraceError(f"{hint} (As a whole: {trace_error})") from trace_error
        raise trace_error

    assert stages is not None
    tokens = bool(stages) and stages[0].tokens is not None  # measured by probes, not read from one shape
    if traced is not None and traced.alt_input_size is None and stages and not tokens:
        warnings.warn(
            f"{type(model).__name__} accepts only its input size {tuple(input_size)}: layouts were read from one "
            f"shape per tensor, and maps whose layout that leaves ambiguous ([56, 56, 56] from a square input) are "
            f"not stages. A non-square input_size, if the model takes one, lets bconv measure every layout.",
            UserWarning,
            stacklevel=3,
        )
    head = _head(model, traced, chain, stages)
    return Anatomy(
        stages=tuple(stages),
        stem=stem_modules(model, stages[0]) if stages else (),
        head=head,
        input_size=input_size,
        shapes_from=traced.shapes_from if traced is not None else "meta",
        layout_measured=traced.alt_input_size is not None if traced is not None else True,
        stages_error=stages_error,
    )


def stem_modules(model: nn.Module, first: Stage) -> tuple[str, ...]:
    """The modules of ``model``'s stem, given its first stage.

    A stage ends where the resolution drops, so a stem that does not drop it below the first stage's
    (a CIFAR ResNet's stride-1 conv, ConvNeXt's and Swin's patchify stems, EfficientNet's ``conv_stem``
    before ``blocks.0``) ends inside the first stage, whose modules then hold the stem and the stage's own
    block: the container module that the stage is named by (``layer1``, ``stages.0``, ``features.1``). The
    stem is what comes before that block. Where the first stage has no such block (torchvision's ResNet
    stage ``relu`` is ``conv1, bn1, relu``; a VGG's first stage ends at a ReLU), the first stage is the stem.

    Args:
        model: the network the stage's module paths are relative to.
        first: its first stage.

    Returns:
        Module paths, in the stage's order.

    Example::

        >>> stem_modules(model, find_stages(model)[0])  # timm's efficientnet_b0: stage blocks.0
        ('conv_stem', 'bn1')
    """
    modules = dict(model.named_modules())
    own = next((i for i, m in enumerate(first.modules) if first.name == m or first.name.startswith(m + ".")), None)
    if not own:  # None, or the stage's block comes first: nothing precedes it
        return first.modules
    block, before = modules[first.modules[own]], first.modules[:own]
    is_container = next(block.children(), None) is not None and next(block.parameters(), None) is not None
    if is_container and any(next(modules[m].parameters(), None) is not None for m in before):
        return before
    return first.modules


# --------------------------------------------------------------------------- kinds of networks bconv refuses


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_kind(model: nn.Module) -> None:
    """Refuse video (3-D) and 1-D networks before tracing: BConv-Cells are 2-D."""
    first = next(((p, m) for p, m in model.named_modules() if isinstance(m, _CONVS)), None)
    if first is None or isinstance(first[1], nn.Conv2d):
        return
    if isinstance(first[1], nn.Conv1d) and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return  # a 1-D conv inside a 2-D network (ECA attention) is no 1-D network
    path, conv = first
    kind = "a video (3-D) network" if isinstance(conv, nn.Conv3d) else "a 1-D (sequence or audio) network"
    raise UnsupportedModelError(
        f"{type(model).__name__} is {kind}: its first convolution `{path}` is a {type(conv).__name__}. "
        f"BConv-Cells are 2-D convolutional cells over image feature maps [C, H, W]; bconv handles image "
        f"networks (any timm or torchvision classifier, segmentation backbone or detector body)."
    )


# Submodules that hold a traceable image backbone inside a whole model (torchvision detectors keep
# theirs at backbone.body, under the FPN), in the order they are worth suggesting.
_BACKBONE_PATHS = ("backbone.body", "body", "backbone", "encoder", "features", "trunk", "model")


def _submodule_hint(model: nn.Module) -> str:
    """A sentence naming a submodule bconv can wrap, for a whole model it cannot trace; '' if none."""
    modules = dict(model.named_modules())
    for path in _BACKBONE_PATHS:
        sub = modules.get(path)
        if sub is None or sub is model:
            continue
        try:
            found = anatomy(sub, default_input_size(sub))
        except Exception:
            continue
        names = ", ".join(s.name for s in found.stages)
        return (
            f"{type(model).__name__} is a whole model that torch.fx cannot trace, but its submodule "
            f"`model.{path}` ({type(sub).__name__}) is a backbone bconv can trace (stages: {names}): wrap that "
            f"one in place, `model.{path} = wrap_with_ptl(model.{path})`, and train the whole model with its "
            f"own loss (see docs/guides/dense-prediction.md; python -m bconv.inspect shows the stages)."
        )
    return ""


# --------------------------------------------------------------------------- the head


# Ops between the classifier and the model's output that only reshape or drop out.
_PASS_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_PASS_OPS = {"flatten", "view", "reshape", "squeeze", "contiguous", "dropout", "float", "to", "clone"}


def _head(model: nn.Module, traced: Traced | None, chain: list[fx.Node], stages: Sequence[Stage]) -> Head:
    if traced is None:
        return _timm_head(model, stages)
    last_end = max(end for start, end in traced.calls.get(stages[-1].name, [(0, -1)])) if stages else -1
    grouped = {m for s in stages for m in s.modules}
    after = [
        p for p, calls in traced.calls.items()
        if p and calls[0][0] > last_end and not any(p == g or p.startswith(g + ".") for g in grouped)
    ]  # fmt: skip
    modules = tuple(p for p in after if not any(p.startswith(o + ".") for o in after))
    # The global pooling lies on the main chain: a pooling branch inside a head (ASPP's image pooling)
    # is not the network's, and a segmentation model has none.
    pool = next((n for n in chain if traced.index(n) > last_end and is_global_pool(n, traced)), None)
    pool_name = None
    features = None
    if pool is not None:
        pool_name = str(pool.target) if pool.op in ("call_module", "call_method") else getattr(pool.target, "__name__", pool.name)
        shape = traced.shapes.get(pool)
        if shape is not None:
            features = _width(shape)
    try:
        classifier, width = _find_classifier(model, traced)
    except ClassifierNotFoundError as e:
        return Head(modules, pool_name, None, features, str(e))
    return Head(modules, pool_name, classifier, width if width is not None else features)


def _classifier_or_none(model: nn.Module, traced: Traced) -> str | None:
    try:
        return _find_classifier(model, traced)[0]
    except ClassifierNotFoundError:
        return None


def _width(shape: Sequence[int]) -> int | None:
    """D of ``[B, D]`` or ``[B, D, 1, 1]`` (any layout); None for anything that is not a vector."""
    rest = [d for d in shape[1:] if d != 1]
    return rest[0] if len(rest) == 1 else (1 if not rest else None)


def _timm_head(model: nn.Module, stages: Sequence[Stage]) -> Head:
    """The head of a model fx cannot trace, from timm's own ``get_classifier()`` and ``num_features``."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    path = None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        path = next((name for name, m in model.named_modules() if m is head and name), None)
    width = getattr(model, "num_features", None)
    reason = None if path else f"{type(model).__name__} cannot be traced and has no timm get_classifier() with weights"
    return Head((path,) if path else (), None, path, width if isinstance(width, int) else None, reason)


def _find_classifier(model: nn.Module, traced: Traced) -> tuple[str, int | None]:
    """The final classifier's path and its input width, from the traced output backwards."""
    name = type(model).__name__
    output = next(n for n in traced.nodes if n.op == "output")
    logits = output.args[0]
    if not isinstance(logits, fx.Node) or traced.shapes.get(logits) is None:
        raise ClassifierNotFoundError(
            f"{name} returns {type(logits).__name__}, not one tensor of logits: pooled_features needs a "
            f"classifier's output (put the model in eval mode, or wrap it to return the logits)"
        )
    while _passes_through(logits, traced):
        logits = logits.args[0]
    # returned_by lists the modules that return a node innermost first: `classifier.6` before `classifier`.
    candidates = [p for p in traced.returned_by.get(logits, []) if any(True for _ in traced.modules[p].parameters())]
    if not candidates:
        raise ClassifierNotFoundError(
            f"{name} has no final classifier: its output is computed by `{_describe(logits)}`, not by a module "
            f"with parameters. A model built without a classifier (timm's num_classes=0, an nn.Identity head) "
            f"already returns its pooled features: use model(x)."
        )
    path = candidates[0]
    calls = traced.calls[path]
    if len(calls) != 1:
        raise ClassifierNotFoundError(f"{name}'s classifier `{path}` is called {len(calls)} times in one forward pass")
    source = _input_node(traced, calls[0])
    shape = traced.shapes.get(source) if source is not None else None
    if shape is None or _width(shape) is None:
        seen = f"a {list(shape[1:])} input" if shape else "no single tensor input"
        raise ClassifierNotFoundError(
            f"{name}'s final classifier `{path}` receives {seen}, not a pooled feature vector: the model "
            f"classifies before pooling (as SqueezeNet does), so there is no feature vector that enters a classifier"
        )
    return path, _width(shape)


def _passes_through(node: fx.Node, traced: Traced) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(traced.modules[str(node.target)], _PASS_MODULES)
    if node.op == "call_method":
        return node.target in _PASS_OPS
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _PASS_OPS


def _describe(node: fx.Node) -> str:
    if node.op in ("call_module", "call_method"):
        return str(node.target)
    return getattr(node.target, "__name__", node.name)


def _input_node(traced: Traced, call: tuple[int, int]) -> fx.Node | None:
    """The one tensor that a module call, spanning graph nodes ``call[0]..call[1]``, reads from outside itself."""
    start, end = call
    outside = {
        arg
        for node in traced.nodes
        if start <= traced.index(node) <= end
        for arg in node.all_input_nodes
        if traced.index(arg) < start and arg in traced.carries_tensor
    }
    return outside.pop() if len(outside) == 1 else None

