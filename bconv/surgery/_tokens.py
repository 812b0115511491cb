"""The stages of token backbones (ViT, DeiT, BEiT, EVA, DINOv2, CaiT, ConViT, MLP-Mixer, gMLP, torchvision's ViT).

Private: :func:`bconv.surgery.anatomy.anatomy` calls :func:`token_stages` where the spatial rules of
:mod:`._stages` find a single feature map followed by tokens. docs/design.md §3.6 gives the reasons.

A token backbone cuts the image into a grid of patches (the patch embedding's ``[C, Hp, Wp]`` map, the last
feature map on the network's main chain), flattens it row by row into tokens, puts ``P`` prefix tokens in
front (class, distillation, registers) and runs a sequence of blocks on ``[B, P + Hp*Wp, C]``. Every block on
the main chain whose output still holds that grid is a stage, named by its module path. Nothing is read
from a model's attributes (``num_prefix_tokens`` is wrong for CaiT, whose blocks carry no class token, and
for ConViT, whose class token joins at block 10): the grid comes from the map's shape, each stage's prefix
from its own token count, and two real forwards check the rest:

* a one-pixel probe: changing one pixel of patch ``(i, j)`` must change exactly token ``P + i * Wp + j`` of
  the first block's input (the grid is row-major and each token is its own patch);
* a gradient probe at the classifier's input (or the output): which stages' grid tokens reach it. On a model
  that classifies from its class token the last block's grid tokens never do; a gradient at the logits would
  mislead where the head starts at zero (Mixer, torchvision's ViT), one at the classifier's input does not.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx, nn

from ..errors import NoSpatialStagesError
from ._stages import Stage, Tokens, head_start, group_modules, is_global_pool
from ._trace import Traced, dummy_input

__all__ = ["token_stages"]

# Containers whose children are a network's blocks (timm's ``blocks``, torchvision's ``encoder.layers``).
_BLOCK_CONTAINERS = (nn.Sequential, nn.ModuleList)


class _Stop(Exception):
    """Ends a probe forward once it has what it needs."""


def token_stages(
    model: nn.Module, traced: Traced, chain: list[fx.Node], input_size: tuple[int, ...], classifier: str | None, why: str
) -> list[Stage]:
    """The token stages of ``model``: each block on its main chain whose output holds the patch grid.

    Args:
        model: the network (in eval mode).
        traced: its trace, with shapes propagated at ``input_size``.
        chain: its main dominator chain.
        input_size: ``(C, H, W)`` of the measurement.
        classifier: module path of the final classifier (the reachability probe reads its input), or None.
        why: the spatial rules' reason for finding no stages, for the error when this finds none either.

    Raises:
        NoSpatialStagesError: no block holds a patch grid, or the grid is not the patch grid row by row.
    """
    name = type(model).__name__
    head = head_start(traced)
    spatial = [n for n in chain if traced.index(n) < head and traced.geometry(n) is not None]
    if not spatial:
        raise NoSpatialStagesError(
            f"{why} Nor is it a token backbone that bconv can pair (a ViT, DeiT, EVA or Mixer): a token ladder needs the patch embedding's "
            f"[C, Hp, Wp] map on the path every input takes (CrossViT's two branches, NaFlexViT's patch "
            f"sequences and TNT's inner and outer tokens have none)."
        )
    grid_node = spatial[-1]
    grid = _grid(traced, grid_node, traced.shapes)
    alt_grid = _grid(traced, grid_node, traced.alt_shapes) if traced.alt_input_size is not None else None
    cells = grid[0] * grid[1]
    found: list[tuple[fx.Node, str, int, int]] = []
    for node in chain:
        i = traced.index(node)
        if i <= traced.index(grid_node) or i >= head or is_global_pool(node, traced):
            continue
        shape = traced.shapes.get(node)
        if shape is None or len(shape) != 3 or not 0 <= shape[1] - cells < cells:
            continue
        block = _block_module(traced, node)
        if block is None:
            continue
        prefix = shape[1] - cells
        alt = traced.alt_shapes.get(node) if alt_grid is not None else None
        if alt is not None and alt_grid is not None and (len(alt) != 3 or alt[1] - alt_grid[0] * alt_grid[1] != prefix):
            continue  # the token count does not follow the grid at the second size: not this grid's tokens
        found.append((node, block, prefix, shape[2]))
    if not found:
        raise NoSpatialStagesError(
            f"{why} Nor is it a token backbone that bconv can pair (a ViT, DeiT, EVA or Mixer): no block on the path every input takes returns "
            f"[B, P + {grid[0]}*{grid[1]}, C] tokens of the {grid[0]}x{grid[1]} patch grid of "
            f"`{_describe(traced, grid_node)}` (blocks that return tuples, as PiT's and MViTv2's pooling stages "
            f"do, or that change the token count, are not supported yet)."
        )
    later = next((b for n in chain[chain.index(found[-1][0]) + 1 :] if traced.index(n) < head and (b := _block_module(traced, n))), None)
    if later is not None:
        raise NoSpatialStagesError(
            f"{why} Nor is it a token backbone that bconv can pair (a ViT, DeiT, EVA or Mixer): its blocks hold the {grid[0]}x{grid[1]} patch grid "
            f"of `{_describe(traced, grid_node)}` up to `{found[-1][1]}`, then block `{later}` works on another "
            f"token count ({list(traced.shapes[n][1:]) if (n := _returned(traced, later)) is not None else '?'}): "
            f"a pooling (hierarchical) token backbone such as PiT or MViTv2, which a token ladder does not serve yet."
        )
    patch = (round(input_size[1] / grid[0]), round(input_size[2] / grid[1]))
    first_block = found[0][1]
    _check_grid_order(model, input_size, first_block, found[0][2], grid, patch)
    reach = _reaching(model, input_size, [(b, p) for _, b, p, _ in found], classifier)

    boundaries = [traced.index(node) for node, *_ in found]
    spans = {p: (calls[0][0], calls[-1][1]) for p, calls in traced.calls.items() if p}
    groups = group_modules(spans, boundaries)
    return [
        Stage(
            k, block, channels, max(patch), "NLC", tuple(traced.shapes[node][1:]), tuple(modules), "fx",
            Tokens(prefix, grid, patch, reaches),
        )
        for k, ((node, block, prefix, channels), modules, reaches) in enumerate(zip(found, groups, reach))
    ]  # fmt: skip


def _grid(traced: Traced, node: fx.Node, shapes: dict[fx.Node, tuple[int, ...]]) -> tuple[int, int]:
    layout = traced.geometry(node)[0]  # type: ignore[index]
    shape = shapes[node][1:]
    return (shape[1], shape[2]) if layout == "NCHW" else (shape[0], shape[1])


def _describe(traced: Traced, node: fx.Node) -> str:
    paths = traced.returned_by.get(node, [])
    return paths[0] if paths else node.name


def _returned(traced: Traced, path: str) -> fx.Node | None:
    return next((n for n, paths in traced.returned_by.items() if path in paths and n in traced.shapes), None)


def _block_module(traced: Traced, node: fx.Node) -> str | None:
    """The block that returns ``node``: the innermost module returning it, called once, held by a Sequential or
    ModuleList (``blocks.3``, ``encoder.layers.encoder_layer_3``). A final norm or a dropout is no block."""
    for path in traced.returned_by.get(node, []):
        parent = path.rpartition(".")[0]
        if path and parent and isinstance(traced.modules.get(parent), _BLOCK_CONTAINERS) and len(traced.calls.get(path, [])) == 1:
            return path
    return None


def _check_grid_order(
    model: nn.Module, input_size: tuple[int, ...], block: str, prefix: int, grid: tuple[int, int], patch: tuple[int, int]
) -> None:
    """Change one pixel of patch ``(Hp - 1, 1)``: exactly token ``prefix + (Hp - 1) * Wp + 1`` of the tokens
    entering ``block`` must change (row-major, one token per patch), or the grid cannot be read from them."""
    i, j = grid[0] - 1, min(1, grid[1] - 1)
    x = dummy_input(model, input_size)
    moved = x.clone()
    moved[:, :, i * patch[0] + patch[0] // 2, j * patch[1] + patch[1] // 2] += 1.0
    seen = []

    def capture(module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach())
        raise _Stop

    handle = model.get_submodule(block).register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            for image in (x, moved):
                try:
                    model(image)
                except _Stop:
                    pass
    finally:
        handle.remove()
    changed = ((seen[0] - seen[1]).abs().flatten(2).amax(-1)[0] > 0).nonzero().flatten().tolist()
    expected = prefix + i * grid[1] + j
    if changed != [expected]:
        raise NoSpatialStagesError(
            f"{type(model).__name__}'s tokens entering `{block}` are not its {grid[0]}x{grid[1]} patch grid row "
            f"by row after {prefix} prefix token(s): changing one pixel of patch ({i}, {j}) changed token(s) "
            f"{changed[:8]}, where a token ladder needs exactly token {expected} to change."
        )


def _reaching(
    model: nn.Module, input_size: tuple[int, ...], blocks: Sequence[tuple[str, int]], classifier: str | None
) -> list[bool]:
    """For each ``(block, prefix)``, whether the block's grid tokens reach the classifier's input (or the output).

    A gradient of a random projection of that tensor, with respect to each block's output: grid tokens that
    never reach it get none. Parameters' ``.grad`` are not touched (``torch.autograd.grad`` with inputs).
    """
    outputs: dict[str, torch.Tensor] = {}
    target: list[torch.Tensor] = []
    handles = []

    def keep(path: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            outputs[path] = out

        return hook

    for path, _ in blocks:
        handles.append(model.get_submodule(path).register_forward_hook(keep(path)))
    if classifier is not None:
        handles.append(model.get_submodule(classifier).register_forward_pre_hook(lambda m, args: target.append(args[0])))
    try:
        with torch.enable_grad():
            out = model(dummy_input(model, input_size).requires_grad_())
            t = target[0] if target else _first_tensor(out)
            if t is None or not t.requires_grad:
                return [True] * len(blocks)  # nothing to measure against: do not refuse on a guess
            projection = (t * torch.randn_like(t)).sum()
            inputs = [outputs[path] for path, _ in blocks]
            grads = torch.autograd.grad(projection, inputs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return [g is not None and bool(g[:, prefix:].abs().amax() > 0) for g, (_, prefix) in zip(grads, blocks)]


def _first_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return next((t for v in value if (t := _first_tensor(v)) is not None), None)
    return None
