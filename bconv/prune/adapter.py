"""Everything bconv asks of Torch-Pruning: the dependency graph, its channel groups (with the patches
they need), which layers are protected, and measuring the model before and after."""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from ..errors import BConvError, TraceError
from ..surgery import TotalFlopCounter, eval_mode
from .attention import attention_around, checking_padding, decouple_widths, head_count, pad_streams
from .graph import ShapedGraph, shaped_index_mapping
from .report import PruneError

__all__ = [
    "RETRIES", "Protection", "Snapshot", "all_groups", "build_graph", "check_forward", "check_forward_padded",
    "constant_input_layers", "has_submodule", "in_channels",
    "is_depthwise", "is_inside", "is_layer", "kernel_taps", "measure", "out_channels", "output_shapes",
    "plain_history", "protected_layers", "recording_positions",
]  # fmt: skip


def build_graph(
    model: nn.Module, x: Tensor, forward: Callable[[nn.Module, Tensor], Any] | None = None
) -> ShapedGraph:
    """Torch-Pruning's dependency graph of ``model`` (a :class:`~.graph.ShapedGraph`, whose index mappings read the
    traced shapes), traced from one forward of ``x`` (eval mode, autograd on).

    Attentions that read their inner width from their input get bconv's subclass first (see
    :mod:`.attention`): the same computation at these widths, and one that still runs once the stream is pruned.

    ``forward(model, x)`` runs that forward when given (``cop_prune`` measures the model in it); it must
    return the model's output. An error of bconv's own raised in it passes through unchanged.
    """
    # A forward of our own by default too: given a tensor, Torch-Pruning first tries model(*x), which a network
    # that accepts unbatched input (ResNet's convolutions do) runs almost to the end before failing, every layer
    # it ran then counted as reused; then it runs model(x).
    forward = forward or (lambda m, inputs: m(inputs))
    decouple_widths(model)
    try:
        with warnings.catch_warnings(), torch.enable_grad(), eval_mode(model):
            warnings.simplefilter("ignore")
            return ShapedGraph().build_dependency(model, example_inputs=x, forward_fn=forward, verbose=False)
    except BConvError:
        raise
    except Exception as e:  # Torch-Pruning raises whatever its tracing hits
        raise PruneError(
            f"Torch-Pruning cannot build the dependency graph of {type(model).__name__}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. It traces autograd from the output: "
            f"the forward must return tensors computed from the input by differentiable ops."
        ) from e


@dataclass
class Protection:
    """Module paths that pruning must leave alone, each with the reason shown in ``report.skipped``.

    Attributes:
        whole: neither input nor output channels change (attention, ``protect=``, and the classifier
            when the pooled feature width is kept).
        outputs: output channels stay; input channels may go as any consumer's do (every layer that
            produces a model output, the classifier's classes included, and attention's inner projections).
        inputs: input channels stay; output channels may go (attention's output projection).
    """

    whole: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)


def protected_layers(
    model: nn.Module,
    input_size: tuple[int, ...],
    graph: tp.DependencyGraph,
    extra: Sequence[str],
    keep_feature_width: bool = False,
    order: Sequence[nn.Module] = (),
    whole_classes: Iterable[type] = (),
) -> Protection:
    """What counts as the head, and what the caller protects.

    As in the released COP code, the classifier keeps its classes but its input channels (the last
    convolution's, VGG's dense layers', ResNet's last residual stream) are pruned like any consumer's;
    ``keep_feature_width`` keeps the classifier whole, so the pooled feature that STD compares keeps its
    width. Every layer whose output channels reach a model output keeps them. ``order`` lists the layers
    in the order the forward ran them (the last of an attention's is its output projection);
    ``whole_classes`` are module classes whose layers keep every width (their forward failed once pruned).
    """
    whole_classes = set(whole_classes)
    from ..surgery.anatomy import anatomy

    # A caller's path keeps every layer inside it: protect=["layer4"] keeps the block whole.
    protected = Protection(
        whole={
            f"{name}.{sub}" if sub else name: "protected by the caller"
            for name in extra
            for sub, _ in model.get_submodule(name).named_modules()
        }
    )
    try:
        # The network's anatomy, the one description PTL, STD and rollback read, says where its head is.
        classifier = anatomy(model, input_size, need_stages=False).head.classifier
    except TraceError:
        classifier = None
    if classifier is not None:
        if keep_feature_width:
            protected.whole[classifier] = "the classifier, keep_feature_width=True"
        else:
            protected.outputs[classifier] = "the classifier's classes"
    # A model with no classifier (segmentation, features only) has its outputs protected below.
    # Attention keeps its head structure: Torch-Pruning does not update head counts and head dims (timm's
    # Attention reshapes with self.num_heads and self.head_dim), so the channels its projections produce
    # inside it (queries, keys, values, relative-position biases per head) stay, and so do the inputs of
    # its output projection, the last of its layers to run. The residual stream it reads and writes (the
    # projections' inputs, the output projection's outputs) is pruned like any other; an attention whose
    # forward reads its width from its input (torchvision's Swin: C // num_heads) fails the check after
    # pruning, and cop_prune then keeps every module of its class whole (``whole_classes``).
    # The modules that keep a head count and own a layer directly, or hold no inner one that keeps a head
    # count, are attention: a block that keeps num_heads too (torchvision's ViT EncoderBlock, timm's DaViT
    # blocks) keeps its MLP prunable. timm and torchvision: num_heads; Hiera: heads; torchvision's MaxViT: n_heads.
    with_heads = {name: (module, heads) for name, module in model.named_modules() if (heads := head_count(module))}
    ran = {m: i for i, m in enumerate(order)}
    for name, (module, heads) in with_heads.items():
        inner = any(other != name and (name == "" or other.startswith(name + ".")) for other in with_heads)
        if inner and not any(is_layer(child) for child in module.children()):
            continue  # an inner module keeps the heads
        why = f"attention with {heads} heads"
        layers = [(f"{name}.{sub}" if sub else name, m) for sub, m in module.named_modules() if is_layer(m)]
        if type(module) in whole_classes:
            for path, _ in layers:
                protected.whole.setdefault(path, f"{why}, whose forward failed once its widths changed")
            continue
        last = max(layers, key=lambda pm: ran.get(pm[1], -1))[0] if layers else None
        for path, _ in layers:
            if path == last:
                protected.inputs.setdefault(path, f"{why}: its output projection reads the heads")
            else:
                protected.outputs.setdefault(path, f"{why}: its heads")
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            protected.whole.setdefault(name, "attention")
        if type(module) in whole_classes:
            for sub, m in module.named_modules():
                if is_layer(m) or isinstance(m, nn.MultiheadAttention):
                    protected.whole.setdefault(f"{name}.{sub}" if sub else name,
                                               f"inside a {type(module).__name__}, whose forward failed once pruned")
    # Walk back from every model output through parameter-free ops (add, interpolate, reshape, ...): the
    # first module with parameters on each path produces output channels.
    # Torch-Pruning adds an output node only where an op, not a module, ends the forward: the sinks of its
    # graph (nodes nothing reads) are where the outputs come from.
    names = graph._module2name
    stack = [node for node in graph.module2node.values() if node.type == tp.ops.OPTYPE.OUTPUT or not node.outputs]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        module = node.module
        if isinstance(module, nn.Module) and module in names and any(True for _ in module.parameters(recurse=False)):
            protected.outputs.setdefault(names[module], "produces a model output")
        else:
            stack.extend(node.inputs)
    return protected


def constant_input_layers(model: nn.Module, x: Tensor, layers: Sequence[nn.Module]) -> set[nn.Module]:
    """Those of ``layers`` whose input does not depend on the model's input (Swin V2's continuous position bias
    MLP reads a fixed table of coordinates): equal on two forwards of different inputs."""
    seen: dict[nn.Module, list[Tensor]] = {m: [] for m in layers}

    def hook(m: nn.Module, args: Any) -> None:
        seen[m].append(args[0].detach().clone() if args and isinstance(args[0], Tensor) else None)

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
            model(torch.randn_like(x) * 2 + 1)
    finally:
        for h in handles:
            h.remove()
    half = {m: len(v) // 2 for m, v in seen.items()}
    return {
        m for m, v in seen.items()
        if v and all(a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)
                     for a, b in zip(v[:half[m]], v[half[m]:]))
    }  # fmt: skip


def output_shapes(out: Any) -> list[tuple[int, ...]]:
    """The shapes of every tensor in a model's output (nested lists, tuples and dicts flattened)."""
    return [tuple(t.shape) for t in tp.utils.flatten_as_list(out) if isinstance(t, Tensor)]


def check_forward(model: nn.Module, x: Tensor, shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """Measure the pruned model; it must still run and return outputs of the same shapes (else name the
    failing module)."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(m: nn.Module, args: Any) -> None:
        stack.append(names[m])

    def leave(m: nn.Module, args: Any, out: Any) -> None:
        stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        measured, out = measure(model, x)
    except Exception as e:
        where = stack[-1] if stack else type(model).__name__
        error = PruneError(
            f"after pruning, {type(model).__name__} fails in `{where or '(top level)'}`: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Torch-Pruning did not update something this module "
            f"depends on (a static shape or head count, an op it cannot follow); pass stages=[...] without it, "
            f"or protect=['{where}']. The model is unchanged."
        )
        error.module_path = stack[-1] if stack else None
        raise error from e
    finally:
        for h in handles:
            h.remove()
    if output_shapes(out) != shapes:
        raise PruneError(f"after pruning, {type(model).__name__}'s outputs have shapes {output_shapes(out)} "
                         f"instead of {shapes}; the model is unchanged")  # fmt: skip
    return measured


RETRIES = 3  # module classes padded, or kept whole, after a failed pruned forward: at most this many each


def check_forward_padded(
    model: nn.Module, x: Tensor, shapes: list[tuple[int, ...]], input_shapes: dict[nn.Module, torch.Size],
    padded: list[type],
) -> dict[str, int]:
    """:func:`check_forward`; where the pruned forward fails inside an attention (a module that keeps a head count:
    one whose forward reads its width from its input), every module of its class gets its stream padded back to
    the width it had (:func:`.attention.pad_streams`; ``input_shapes`` from before pruning) and the check runs
    again, for at most three classes. ``padded`` holds the classes padded so far and receives the new ones. A
    failure that padding does not mend is raised as it is (the caller's snapshot takes the hooks off)."""
    while True:
        try:
            with checking_padding():
                return check_forward(model, x, shapes)
        except PruneError as e:
            cls = attention_around(model, getattr(e, "module_path", None))
            if cls is None or cls in padded or len(padded) >= RETRIES or not pad_streams(model, cls, input_shapes):
                raise
            padded.append(cls)


def plain_history(history: Iterable[Any]) -> list[list[Any]]:
    """Torch-Pruning's ``pruning_history()`` as plain ``[name, prunes_outputs, [indices]]`` lists (JSON, torch.save)."""
    return [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in history]


class Snapshot:
    """Every module's attributes as they are now, to put back if pruning fails half way.

    Torch-Pruning prunes by assignment, never by writing into a tensor: a new ``Parameter`` from
    ``index_select``, new buffers, new widths (``out_channels``), all through ``setattr``. Each module's
    attributes, and the contents of the containers among them (``_parameters``, ``_buffers``, hook dicts, an
    RNN's ``_flat_weights``), are therefore enough to restore the model exactly, in place: the same module,
    parameter, buffer and container objects the user holds (an optimizer built on the parameters, a hook's
    handle), with no copy of the weights. Each module's class is kept too (an attention may have been given
    bconv's subclass, :mod:`.attention`).
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved = []
        for module in model.modules():
            attributes = dict(vars(module))
            contents = [(v, copy.copy(v)) for v in attributes.values() if isinstance(v, (dict, list, set))]
            self._saved.append((module, module.__class__, attributes, contents))

    def restore(self) -> None:
        for module, cls, attributes, contents in self._saved:
            module.__class__ = cls  # an attention given bconv's subclass (see .attention) gets its own back
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for container, items in contents:
                container.clear()
                container.extend(items) if isinstance(container, list) else container.update(items)


def out_channels(module: nn.Module) -> int:
    """A convolution's or linear layer's output channels."""
    return int(module.out_features if isinstance(module, nn.Linear) else module.out_channels)


def is_layer(module: Any) -> bool:
    """Whether ``module`` is a convolution or a linear layer, the layers COP prunes."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


@contextmanager
def recording_positions(model: nn.Module, positions: dict[nn.Module, int] | None) -> Iterator[None]:
    """While inside, forwards add each convolution's and linear layer's output positions per sample to
    ``positions`` (its FLOPs are 2 x weight x positions); nothing is recorded when it is None."""
    def hook(m: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            positions[m] = positions.get(m, 0) + out.numel() // max(out.shape[0], 1) // out_channels(m)

    handles = [m.register_forward_hook(hook) for m in model.modules() if is_layer(m)] if positions is not None else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def measure(model: nn.Module, x: Tensor, positions: dict[nn.Module, int] | None = None) -> tuple[dict[str, int], Any]:
    """Params, FLOPs and channels, and the output, from one forward; ``positions`` receives each convolution's
    and linear layer's output positions per sample."""
    with recording_positions(model, positions), TotalFlopCounter() as counter:
        out = model(x)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": int(counter.get_total_flops()),
        "channels": sum(out_channels(m) for m in model.modules() if is_layer(m)),
    }, out


class _RunawayMapping(Exception):
    """Torch-Pruning's index mapping grew past any width in the model."""


def all_groups(model: nn.Module, graph: tp.DependencyGraph) -> list[tuple[nn.Module, Any, str]]:
    """Torch-Pruning's ``get_all_groups`` (every convolution and linear layer as a root, each layer in one
    group), one group at a time: ``(root, group, "")``, or ``(root, None, why)`` for a group it cannot build.

    Torch-Pruning raises from deep inside for one group of an op it mis-handles (seen: ZeroDivisionError
    on GCViT, Hiera and NesT), and its reshape mappings multiply through chained window reshapes (Swin:
    tens of GB for one group); its own loop stops at the first failure. Here that one group is skipped and
    the others stay prunable. Three of Torch-Pruning's functions are swapped while the groups are listed,
    and put back before this returns.
    """
    from torch_pruning.dependency import index_mapping

    # No channel index of a real group exceeds the model's widest parameter dimension (a Linear reading a
    # flattened map included), so a mapping past it has lost track of the channels.
    bound = max((max(p.shape) for p in model.parameters() if p.dim()), default=1)
    flatten = index_mapping._FlattenIndexMapping.__call__

    def bounded(self, idxs):
        if not self.reverse and len(idxs) * self._stride > bound:
            raise _RunawayMapping(f"a reshape maps {len(idxs)} channels onto {len(idxs) * self._stride} indices")
        return flatten(self, idxs)

    # A real group holds each node's in- and out-channel operation at most a few times (a concatenation
    # reads one input twice); past that, Torch-Pruning is cycling through index sets that keep changing
    # (HaloNet's blocked attention: minutes, then memory).
    most_items = 4 * len(graph.module2node) + 16
    add_dep = tp.dependency.Group.add_dep

    def bounded_add(self, dep, idxs):
        if len(self._group) >= most_items:
            raise _RunawayMapping(f"a group grew past {most_items} operations")
        return add_dep(self, dep, idxs)

    # Torch-Pruning recomputes every concatenation's index mapping for each group it builds; nothing is
    # pruned while the groups are listed, so once is enough (DenseNet: 70 ms per group otherwise).
    update = index_mapping.update_index_mapping
    with shaped_index_mapping():
        update(graph)
    found: list[tuple[nn.Module, Any, str]] = []
    visited: set[nn.Module] = set()
    index_mapping.update_index_mapping = lambda graph: None
    index_mapping._FlattenIndexMapping.__call__ = bounded
    tp.dependency.Group.add_dep = bounded_add
    try:
        for m in list(graph.module2node):
            if not is_layer(m) or m in visited or m in graph.IGNORED_LAYERS_IN_TRACING:
                continue
            pruner = graph.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                group = graph.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            except Exception as e:  # noqa: BLE001 - whatever Torch-Pruning hits on this one group
                visited.add(m)
                why = str(e).splitlines()[0] if str(e) else ""
                found.append((m, None, (why if isinstance(e, _RunawayMapping) else f"{type(e).__name__}: {why}")[:200]))
                continue
            visited |= {dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)}
            found.append((m, group, ""))
    finally:
        index_mapping.update_index_mapping = update
        index_mapping._FlattenIndexMapping.__call__ = flatten
        tp.dependency.Group.add_dep = add_dep
    return found


def has_submodule(model: nn.Module, path: str) -> bool:
    """Whether ``model`` has a submodule at ``path``."""
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def is_depthwise(m: nn.Module) -> bool:
    """Whether ``m`` is a depthwise convolution (one group per output channel, more than one group)."""
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.out_channels


def in_channels(m: nn.Module) -> int:
    """A convolution's or linear layer's input channels."""
    return int(m.in_features if isinstance(m, nn.Linear) else m.in_channels)


def kernel_taps(m: nn.Module) -> int:
    """A convolution's kernel positions (``kh x kw``); 1 for a linear layer."""
    return int(math.prod(m.kernel_size)) if isinstance(m, nn.modules.conv._ConvNd) else 1


def is_inside(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module path ``name`` is one of ``prefixes`` or inside one of them (``""`` holds every path)."""
    return any(name == p or name.startswith(p + ".") or p == "" for p in prefixes)
