"""Torch-Pruning's dependency graph with the tensor shapes it already holds: fixes for the ops it does not follow.

Torch-Pruning (1.6) infers the channel counts at a concatenation or a reshape by walking the graph to the
nearest layer, and gives up (or divides by zero) where that walk finds nothing: a concatenation of strided
slices (Swin's patch merging), of an addition and a slice (DPN, CSPNet), of a class token and the patch
tokens (CoaT, TNT); a channel shuffle (ShuffleNetV2). Yet every autograd node it traces knows the exact shape
of the tensors it saw (``grad_fn._input_metadata``). :class:`ShapedGraph` reads them:

* a concatenation maps each input to its exact offsets, on the channel dimension only (a concatenation of
  tokens or of rows keeps every channel where it is, as Torch-Pruning's identity mapping says);
* the ops whose channel indices Torch-Pruning cannot follow are named (:attr:`ShapedGraph.unfollowable`):
  a reshape that splits the channel dimension into groups (a channel shuffle, split attention, attention
  heads), a split of the channel dimension into fixed widths (``torch.split``, ``split_with_sizes``: the
  widths are the forward's own numbers, which pruning cannot update). A channel group that crosses one of them
  is not pruned; every other group stays prunable;
* a split into equal pieces that meet again before any layer (a gated MLP: SwiGLU, GEGLU) is followed: channel
  ``i`` of every piece is pruned together, on whichever dimension holds the channels;
* concatenations and followed splits map onto their inputs' current widths, narrowed by every cut made;
* a 4-D parameter added to an NCHW map (Visformer's position embedding ``[1, C, H, W]``) is pruned along its
  channels, where Torch-Pruning guesses its last dimension;
* timm's layers that keep a per-channel tensor of their own get a customised pruner (Torch-Pruning's
  ``customized_pruners``): ``ScaledStdConv2d``'s and ``ScaledStdConv2dSame``'s gain (NFNet, DM-NFNet),
  ``BlurPool2d``'s filter (TResNet's
  anti-aliasing), MetaFormer's ``Scale`` and the shape it views its scale as (CAFormer, ConvFormer, PoolFormer).

Each fix is small and self-contained, and could be offered to Torch-Pruning as it is (its
``update_concat_index_mapping`` and ``update_reshape_index_mapping``). The patches are in effect only inside
:class:`ShapedGraph`'s own calls and :func:`shaped_index_mapping`; Torch-Pruning is left as it was.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping

__all__ = [
    "BlurPoolPruner", "ShapedGraph", "ShapedScalePruner", "StdConvGainPruner", "shaped_index_mapping", "unfollowable_op",
]


def _shape(fn: Any, nr: int = 0) -> tuple[int, ...] | None:
    """The shape of the tensor that autograd node ``fn``'s forward produced (its output ``nr``)."""
    if fn is None:
        return None
    if hasattr(fn, "variable"):  # a leaf: the tensor itself
        return tuple(fn.variable.shape)
    try:
        return tuple(fn._input_metadata[nr].shape)
    except (AttributeError, IndexError, RuntimeError):
        return None


def _dim(saved: int, ndim: int) -> int:
    """A dimension saved by autograd (a negative one is stored as an unsigned 64-bit integer), made positive."""
    if saved >= 2**63:
        saved -= 2**64
    return saved % ndim if ndim else 0


def _nearest_layer(node: Any) -> nn.Module | None:
    """The nearest convolution or linear layer upstream of ``node`` (breadth first), or None."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if isinstance(n.module, (nn.Linear, nn.modules.conv._ConvNd)):
            return n.module
        stack.extend(n.inputs)
    return None


def _channels_last(node: Any) -> bool | None:
    """Whether the tensor at ``node`` holds its channels last: the nearest layer upstream is a Linear (True) or a
    convolution (False); None when no layer is upstream."""
    layer = _nearest_layer(node)
    return None if layer is None else isinstance(layer, nn.Linear)


_CHANNEL_DIMS: "weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], int | None]]" = weakref.WeakKeyDictionary()


def _channel_dim(node: Any, shape: Sequence[int]) -> int | None:
    """The channel dimension of a tensor of ``shape`` at ``node``: the one dimension as wide as the nearest layer's
    outputs (a transposed token map [B, C, N] included), else the last of a 2-D or 3-D one (features, tokens),
    1 of an NCHW map or 3 of an NHWC one; None where that cannot be told.

    ``shape`` is the traced one, and the answer is the one given at the graph's first index mapping, before any
    channel was pruned: afterwards the traced shapes and the layers' widths no longer agree."""
    known = _CHANNEL_DIMS.setdefault(node, {})
    if tuple(shape) not in known:
        known[tuple(shape)] = _traced_channel_dim(node, shape)
    return known[tuple(shape)]


def _traced_channel_dim(node: Any, shape: Sequence[int]) -> int | None:
    layer, ndim = _nearest_layer(node), len(shape)
    if layer is not None:
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        dims = [d for d in range(1, ndim) if shape[d] == width]
        if len(dims) == 1:
            return dims[0]
    if ndim in (2, 3):
        return ndim - 1
    if ndim == 4 and layer is not None:
        return 3 if isinstance(layer, nn.Linear) else 1
    return None


def _concat_index_mapping(graph: tp.DependencyGraph, node: Any) -> None:
    """Torch-Pruning's ``update_concat_index_mapping``, with each input's exact width along the concatenated
    dimension (read from autograd) instead of one inferred from the nearest layer, which can be None."""
    fn = node.grad_fn
    out = _shape(fn)
    if out is None or not hasattr(fn, "_saved_dim"):
        return
    dim = _dim(fn._saved_dim, len(out))
    if dim != _channel_dim(node, out):
        return  # tokens, rows or an unknown layout: every channel stays where it is (the identity mapping)
    # Offsets over every input in autograd's order, the ones the graph leaves out (constants) included: the traced
    # widths, less what pruning removed since (ShapedGraph keeps them; autograd's are the unpruned ones).
    inputs = [(f, nr) for f, nr in fn.next_functions]
    widths = getattr(graph, "concat_widths", {}).get(node)
    if widths is None:
        widths = [(_shape(f, nr) or (0,) * len(out))[dim] if f is not None else 0 for f, nr in inputs]
        if hasattr(graph, "concat_widths"):
            graph.concat_widths[node] = widths
    starts = [sum(widths[:i]) for i in range(len(widths))]
    spans, used = [], set()
    for n in node.inputs:
        i = next((i for i, (f, _) in enumerate(inputs) if f is n.grad_fn and i not in used), None)
        if i is None:
            return  # an input the graph holds but autograd's order does not: leave Torch-Pruning's mapping
        used.add(i)
        spans.append([starts[i], starts[i] + widths[i]])
    node.module.concat_sizes = [b - a for a, b in spans]
    node.module.offsets = [s[0] for s in spans] + [spans[-1][1]] if spans else None
    if not node.enable_index_mapping:
        return
    for n, span in zip(node.inputs, spans):
        _map_span(node, n, 1, index_mapping._ConcatIndexMapping, span, outward_reverse=True)


def _map_span(node: Any, other: Any, slot: int, mapping: type, span: list[int], outward_reverse: bool) -> None:
    """Set the index mapping of ``span`` (an input's offsets in a concatenation, a piece's in a split) on the edges
    between op ``node`` and its neighbour ``other``, both ways: ``outward_reverse`` on node -> other."""
    for dep in node.dependencies:
        if dep.target is other:
            dep.index_mapping[slot] = mapping(offset=span, reverse=outward_reverse)
    for dep in other.dependencies:
        if dep.target is node:
            dep.index_mapping[slot] = mapping(offset=span, reverse=not outward_reverse)


_reshape_index_mapping = index_mapping.update_reshape_index_mapping


def _keeps_channels(node: Any) -> bool:
    """Whether a reshape leaves the channel dimension whole, first (NCHW: ``flatten(2)``) or last (tokens, NHWC
    windows) as it was: then every channel maps to itself."""
    fn = node.grad_fn
    if not hasattr(fn, "_saved_self_sym_sizes") or not node.inputs:
        return False
    before, after = tuple(int(s) for s in fn._saved_self_sym_sizes), _shape(fn)
    channel = _channel_dim(node.inputs[0], before)
    if after is None or channel is None:
        return False
    if channel == len(before) - 1:
        return len(after) > 1 and after[-1] == before[-1]
    return channel == 1 and len(after) > 2 and after[:2] == before[:2]


def _guarded_reshape_index_mapping(graph: tp.DependencyGraph, node: Any) -> None:
    """Torch-Pruning's ``update_reshape_index_mapping`` (which reads a reshape as a flatten of the channels), only
    where the reshape does not keep the channel dimension whole (Swin's window partitions do: Torch-Pruning
    multiplied their indices), and leaving the identity mapping where its inferred widths are zero (it divides
    by them: ShuffleNetV2, SHViT)."""
    if _keeps_channels(node):
        return
    try:
        _reshape_index_mapping(graph, node)
    except ZeroDivisionError:
        return


def unfollowable_op(node: Any) -> str | None:
    """Why Torch-Pruning cannot follow channel indices through ``node`` (a reshape that splits the channel
    dimension into groups, a split of it into fixed widths), or None."""
    fn = node.grad_fn
    if isinstance(node.module, tp.ops._ReshapeOp) and hasattr(fn, "_saved_self_sym_sizes"):
        before, after = tuple(int(s) for s in fn._saved_self_sym_sizes), _shape(fn)
        if after is None or len(after) <= len(before):
            return None
        channel = _channel_dim(node.inputs[0], before) if node.inputs else None
        if channel is None:
            return None
        # The dimensions before the channel one are kept, the channel one is cut into >= 2 factors above 1.
        if after[:channel] != before[:channel]:
            return None
        pieces, product = [], 1
        for s in after[channel:]:
            if product == before[channel]:
                break
            pieces.append(s)
            product *= s
        if product == before[channel] and sum(p > 1 for p in pieces) >= 2:
            return f"a reshape splits the {before[channel]} channels into groups {list(pieces)} (channel shuffle, " \
                   f"split attention, heads)"
    if isinstance(node.module, tp.ops._SplitOp) and hasattr(fn, "_saved_dim"):
        before = tuple(int(s) for s in getattr(fn, "_saved_self_sym_sizes", ()))
        if not before:
            return None
        if _dim(fn._saved_dim, len(before)) == _channel_dim(node.inputs[0] if node.inputs else node, before):
            if _gated_halves(node) is not None:
                return None  # followable: see _gated_halves
            return f"a split of the {before[_dim(fn._saved_dim, len(before))]} channels into fixed widths " \
                   f"(torch.split, chunk)"
    if isinstance(node.module, tp.ops._SliceOp) and hasattr(fn, "_saved_self_sym_sizes"):
        before = tuple(int(s) for s in fn._saved_self_sym_sizes)
        dim = _dim(node.module.dim, len(before))
        end = min(before[dim], node.module.end if node.module.end is not None else before[dim])
        whole = node.module.start in (0, None) and end >= before[dim] and node.module.step == 1
        if not whole and dim == _channel_dim(node.inputs[0] if node.inputs else node, before):
            return f"a slice of the {before[dim]} channels at fixed indices ({node.module.start}:{end})"
    return None


def _pieces(node: Any) -> list[tuple[int, Any]]:
    """The output nodes of split ``node``, each with the index of the piece it reads (autograd's output number)."""
    found = []
    for out in node.outputs:
        nr = next((nr for f, nr in getattr(out.grad_fn, "next_functions", ()) if f is node.grad_fn), None)
        if nr is not None:
            found.append((nr, out))
    return found


def _gated_halves(node: Any) -> list[int] | None:
    """The traced widths of a split of the channels into equal pieces that meet again in one op before any layer
    reads them (a gated MLP: ``x1, x2 = fc1(x).chunk(2); fc2(x1 * act(x2))``), or None for any other split.

    Such a split is followed: channel ``i`` of every piece is one unit (``fc1``'s outputs ``i`` and ``H + i`` go
    together), so the pieces stay equal and a ``chunk`` computes them from its input as before. A split of fixed
    widths that happens to look like this (``torch.split(x, 64)``) fails the check after pruning, and the module
    around it is kept whole."""
    fn = node.grad_fn
    widths = []
    for i in range(len(getattr(fn, "_input_metadata", ()))):
        shape = _shape(fn, i)
        if shape is None:
            return None
        widths.append(shape[_dim(fn._saved_dim, len(shape))])
    pieces = _pieces(node)
    if len(widths) < 2 or len(set(widths)) != 1 or sorted(nr for nr, _ in pieces) != list(range(len(widths))):
        return None
    reached = []
    for _, out in pieces:  # every op each piece reaches before a layer (a few dozen at most)
        seen, stack = set(), [out]
        while stack and len(seen) < 64:
            n = stack.pop()
            if n in seen or isinstance(n.module, (nn.Linear, nn.modules.conv._ConvNd)):
                continue
            seen.add(n)
            stack.extend(n.outputs)
        reached.append(seen)
    return widths if set.intersection(*reached) else None


def _split_index_mapping(graph: tp.DependencyGraph, node: Any) -> None:
    """Torch-Pruning's ``update_split_index_mapping`` for the splits :func:`_gated_halves` follows, on any channel
    dimension (it maps dimension 1 only, and only from each piece's position in the graph's outputs, which need not
    be its position in the split), with each piece's current width (ShapedGraph keeps them, as for
    concatenations). Every other split keeps the identity mapping: a group crossing it is not pruned."""
    if node.module in getattr(graph, "unfollowable", {}):
        return  # decided once the graph was built (the pieces' walk is not repeated at every group)
    fn = node.grad_fn
    before = tuple(int(s) for s in getattr(fn, "_saved_self_sym_sizes", ()))
    if not before or not node.inputs or _dim(fn._saved_dim, len(before)) != _channel_dim(node.inputs[0], before):
        return
    widths = getattr(graph, "split_widths", {}).get(node)
    if widths is None:
        widths = _gated_halves(node)
        if widths is None:
            return
        if hasattr(graph, "split_widths"):
            graph.split_widths[node] = widths
    starts = [sum(widths[:i]) for i in range(len(widths) + 1)]
    for nr, out in _pieces(node):
        _map_span(node, out, 0, index_mapping._SplitIndexMapping, starts[nr : nr + 2], outward_reverse=False)


_slice_index_mapping = index_mapping.update_slice_index_mapping


def _channel_slice_index_mapping(graph: tp.DependencyGraph, node: Any) -> None:
    """Torch-Pruning's ``update_slice_index_mapping`` for slices of the channel dimension only: it takes dim 1 of
    any 4-D tensor for channels, and so maps LeViT's strided rows of an NHWC map onto channels."""
    fn = node.grad_fn
    if hasattr(fn, "_saved_self_sym_sizes") and node.inputs:
        before = tuple(int(s) for s in fn._saved_self_sym_sizes)
        if _dim(node.module.dim, len(before)) != _channel_dim(node.inputs[0], before):
            return
    _slice_index_mapping(graph, node)


_PATCHES = {
    "update_concat_index_mapping": _concat_index_mapping,
    "update_split_index_mapping": _split_index_mapping,
    "update_reshape_index_mapping": _guarded_reshape_index_mapping,
    "update_slice_index_mapping": _channel_slice_index_mapping,
}


@contextmanager
def shaped_index_mapping() -> Iterator[None]:
    """While inside, Torch-Pruning maps concatenations, reshapes and slices as :class:`ShapedGraph` does."""
    saved = {name: getattr(index_mapping, name) for name in _PATCHES}
    for name, patch in _PATCHES.items():
        setattr(index_mapping, name, patch)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(index_mapping, name, original)


class StdConvGainPruner(tp.pruner.function.ConvPruner):
    """Torch-Pruning's convolution pruner, for timm's ``ScaledStdConv2d``: its ``gain`` (one per output channel)
    goes with the output channels it scales."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.out_channels)) - set(idxs))
        super().prune_out_channels(layer, idxs)
        layer.gain = self._prune_parameter_and_grad(layer.gain, keep, 0)
        return layer


class BlurPoolPruner(tp.pruner.function.BasePruningFunc):
    """timm's ``BlurPool2d`` (a fixed depthwise blur): its ``filt`` buffer and ``channels`` follow the channels it
    blurs, input and output alike."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.channels)) - set(idxs))
        layer.filt = layer.filt[keep]
        layer.channels = len(keep)
        return layer

    prune_in_channels = prune_out_channels  # one channel in, the same channel out (as Torch-Pruning's norms)

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.channels

    get_in_channels = get_out_channels


class ShapedScalePruner(tp.pruner.function.BasePruningFunc):
    """timm's MetaFormer ``Scale``: its ``scale`` (one per channel) goes with its channels, and the ``shape`` it is
    viewed as (``(C, 1, 1)`` or ``(C,)``) follows, where Torch-Pruning pruned the parameter alone."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.scale.shape[0])) - set(idxs))
        layer.scale = self._prune_parameter_and_grad(layer.scale, keep, 0)
        layer.shape = (len(keep), *layer.shape[1:])
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.scale.shape[0]

    get_in_channels = get_out_channels


def _customized_pruners(model: nn.Module) -> dict[type, Any]:
    """A pruner for each of timm's layer classes in ``model`` that Torch-Pruning's own pruners would break."""
    try:
        from timm.layers import BlurPool2d, ScaledStdConv2d, ScaledStdConv2dSame
        from timm.models.metaformer import Scale
    except ImportError:
        return {}
    pruners: dict[type, Any] = {}
    for m in model.modules():
        gain = isinstance(getattr(m, "gain", None), nn.Parameter)
        if isinstance(m, (ScaledStdConv2d, ScaledStdConv2dSame)) and gain:
            pruners[type(m)] = StdConvGainPruner()  # Torch-Pruning matches a customised class exactly
        elif isinstance(m, BlurPool2d) and m.channels is not None:
            pruners[type(m)] = BlurPoolPruner()
        elif isinstance(m, Scale) and isinstance(getattr(m, "shape", None), tuple):
            pruners[type(m)] = ShapedScalePruner()
    return pruners


def _fix_parameter_dims(graph: tp.DependencyGraph) -> None:
    """A 4-D parameter is pruned along its channel dimension, not Torch-Pruning's guess (its last dimension of more
    than one element): the one dimension as wide as the nearest layer's outputs where exactly one is (Visformer's
    ``[1, C, H, W]`` position embedding: 1; Nest's ``[1, blocks, tokens, C]``: 3), else 1 where the map it is
    added to is NCHW."""
    for node in graph.module2node.values():
        p = node.module
        if node.type != tp.ops.OPTYPE.PARAMETER or p.dim() != 4 or not node.outputs:
            continue
        layers = {_nearest_layer(out) for out in node.outputs}
        if len(layers) == 1 and None not in layers:
            layer = layers.pop()
            width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            dims = [d for d in range(1, 4) if p.shape[d] == width]
            if len(dims) == 1:
                node.pruning_dim = dims[0]
                continue
        if p.shape[1] > 1 and all(_channels_last(out) is False for out in node.outputs):
            node.pruning_dim = 1


class ShapedGraph(tp.DependencyGraph):
    """Torch-Pruning's ``DependencyGraph``, whose index mappings read the traced tensors' shapes (see the module's
    docstring), and which names the ops it cannot follow.

    Attributes:
        unfollowable: each op node whose channel indices cannot be followed, with the reason.
        concat_widths: each channel concatenation's input widths (autograd's order), traced, then narrowed by every
            group this graph prunes, so that later groups map onto the offsets as they are.
        split_widths: the same for each followed split's pieces (a gated MLP's halves).
    """

    def build_dependency(self, model: nn.Module, *args: Any, **kwargs: Any) -> "ShapedGraph":
        self.concat_widths: dict[Any, list[int]] = {}  # each channel concatenation's input widths, kept current
        self.split_widths: dict[Any, list[int]] = {}  # each followed split's piece widths, kept current
        self.unfollowable: dict[Any, str] = {}
        kwargs["customized_pruners"] = {**_customized_pruners(model), **(kwargs.get("customized_pruners") or {})}
        with shaped_index_mapping():
            super().build_dependency(model, *args, **kwargs)
        # Torch-Pruning turns the index mapping of every concatenation off where a 3-D parameter is upstream (its
        # guard for a ViT's class token, concatenated along tokens): the mapping above tells tokens from channels
        # itself, and a channel concatenation after one (Swin V2's patch merging, downstream of its logit scales)
        # would otherwise map every input onto the first one's offsets.
        for node in self.module2node.values():
            if node.type == tp.ops.OPTYPE.CONCAT:
                node.enable_index_mapping = True
        _fix_parameter_dims(self)
        self.unfollowable = {n.module: why for n in self.module2node.values() if (why := unfollowable_op(n))}
        return self

    def get_pruning_group(self, *args: Any, **kwargs: Any) -> Any:
        with shaped_index_mapping():
            group = super().get_pruning_group(*args, **kwargs)
        prune = group.prune

        def prune_and_narrow(idxs: Any = None, record_history: bool = True) -> None:
            removed = self._removed_from_concatenations(group) if idxs is None else {}
            prune(idxs, record_history)
            for node, counts in removed.items():
                widths = self.concat_widths if node in self.concat_widths else self.split_widths
                widths[node] = [w - c for w, c in zip(widths[node], counts)]

        group.prune = prune_and_narrow
        return group

    def _removed_from_concatenations(self, group: Any) -> dict[Any, list[int]]:
        """For each channel concatenation and followed split that ``group`` prunes, how many channels each input
        (piece) loses, from the group's indices in the concatenation's output (the split's input) and the current
        widths."""
        removed: dict[Any, set[int]] = {}
        for dep, idxs in group:
            if dep.target in self.concat_widths or dep.target in self.split_widths:
                removed.setdefault(dep.target, set()).update(int(i) for i in idxs)
        counts = {}
        for node, idxs in removed.items():
            widths, start, count = self.concat_widths.get(node) or self.split_widths[node], 0, []
            for w in widths:
                count.append(sum(start <= i < start + w for i in idxs))
                start += w
            counts[node] = count
        return counts
