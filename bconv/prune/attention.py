"""Attention whose forward reads its inner width from its input, made to read it from its own weights.

COP prunes the residual stream an attention reads and writes, and keeps its heads (the channels its inner
projections produce, the inputs of its output projection; docs/pruning-coverage.md). Some attentions
compute their head width as ``C // num_heads`` with ``C`` the width of their *input*: once the stream is
narrower than the heads, their reshapes fail. torchvision's Swin (V1 and V2) is one: its
``shifted_window_attention`` reshapes the queries, keys and values with the input's ``C``.

For each such class, bconv has a subclass whose forward is the original one with the inner width read from
the projection's weight instead of the input. Before the unpruned widths change, the two are the same
computation (a test checks equality); afterwards only the subclass runs. :func:`decouple_widths` gives each
instance of such a class (exactly that class: a user's subclass keeps its own forward) its bconv subclass,
in place: same parameters, buffers and hooks; ``isinstance`` of the original class still holds, and the
pickled model names the subclass. ``cop_prune`` and ``load_pruned`` call it on the model they prune, and put
the original classes back when they fail (:class:`~.adapter.Snapshot`).

The upstream fix would be one line in each forward (the width from ``qkv_weight.shape[0] // 3``); the
subclasses here can be dropped once torchvision and timm read it so.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import swin_transformer as swin

__all__ = [
    "SUBCLASSES", "PadStream", "ShiftedWindowAttention", "ShiftedWindowAttentionV2", "TakeStream", "attention_around",
    "checking_padding", "decouple_widths", "head_count", "pad_streams", "recording_input_shapes",
]  # fmt: skip


def _swin_forward(self: nn.Module, input: Tensor) -> Tensor:
    """torchvision's ``shifted_window_attention`` (``torchvision.models.swin_transformer``, BSD-3-Clause, the
    torchvision authors) as a method, with two changes: the queries', keys' and values' width is read from
    ``self.qkv`` (its outputs / 3) and the output's from ``self.proj``, not from the input's channels (the
    stream it reads and writes may be narrower than its heads); and the projections are called as the modules
    they are (torchvision calls ``F.linear`` on their weights, which no module hook and no Torch-Pruning graph
    sees). V2 zeroes the keys' bias in every forward: subtracting it from the module's output is the same."""
    window_size, num_heads, shift_size = self.window_size, self.num_heads, list(self.shift_size)
    logit_scale = getattr(self, "logit_scale", None)
    B, H, W, C = input.shape
    inner = self.qkv.out_features // 3
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    if window_size[0] >= pad_H:  # a window as large as the map needs no shift
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    qkv = self.qkv(x)
    if logit_scale is not None and self.qkv.bias is not None:
        qkv = qkv - F.pad(self.qkv.bias[inner : 2 * inner], (inner, inner))  # the keys' bias, zeroed
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, inner // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # cosine attention (V2)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * (inner // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + self.get_relative_position_bias()
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=self.attention_dropout, training=self.training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), inner)
    x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
    out = x.size(-1)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], out)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, out)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


class ShiftedWindowAttention(swin.ShiftedWindowAttention):
    """torchvision's Swin attention, whose heads' width is read from its weights (see the module's docstring)."""

    forward = _swin_forward


class ShiftedWindowAttentionV2(swin.ShiftedWindowAttentionV2):
    """torchvision's Swin V2 attention, whose heads' width is read from its weights (see the module's docstring)."""

    forward = _swin_forward


# Each attention class that reads its inner width from its input, with bconv's subclass of it.
SUBCLASSES: dict[type, type] = {
    swin.ShiftedWindowAttention: ShiftedWindowAttention,
    swin.ShiftedWindowAttentionV2: ShiftedWindowAttentionV2,
}


def decouple_widths(model: nn.Module) -> list[nn.Module]:
    """Give each attention in ``model`` whose forward reads its inner width from its input (exactly one of the
    classes this module knows) bconv's subclass of its class, in place; return the modules changed."""
    changed = [m for m in model.modules() if type(m) in SUBCLASSES]
    for m in changed:
        m.__class__ = SUBCLASSES[type(m)]
    return changed


# ------------------------------------------------------------------ any other attention: its stream padded back


def head_count(module: nn.Module) -> int | None:
    """The head count a module keeps (timm and torchvision: ``num_heads``; Hiera: ``heads``; MaxViT: ``n_heads``),
    or None."""
    heads = next((h for h in (getattr(module, a, None) for a in ("num_heads", "heads", "n_heads")) if h), None)
    return heads if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 else None


@contextmanager
def recording_input_shapes(model: nn.Module, shapes: dict[nn.Module, torch.Size]) -> Iterator[None]:
    """While inside, forwards record into ``shapes`` the shape of the first input of every module that keeps a
    head count."""

    def hook(m: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], Tensor):
            shapes[m] = args[0].shape

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if head_count(m)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


_checking: list[bool] = [False]


@contextmanager
def checking_padding() -> Iterator[None]:
    """While inside, each :class:`TakeStream` checks that what it drops is still the padding (zeros)."""
    _checking[0] = True
    try:
        yield
    finally:
        _checking[0] = False


class PadStream:
    """Forward pre-hook of an attention whose forward reads its width from its input: the stream it receives,
    narrower once pruned, padded with zeros back to the width it had (its heads' width), so that its own
    reshapes still fit. Which dimension is the channels' is read on the first call (bconv's check, at the
    input it was measured with): the one dimension that is narrower than it was."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(shape)
        self.dim: int | None = None  # counted from the end, so that any batch size fits
        self.width = 0
        self.resolved = False

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        if not self.resolved:
            narrower = [d for d in range(x.dim()) if x.dim() == len(self.shape) and x.shape[d] < self.shape[d]]
            if len(narrower) == 1:
                self.dim, self.width = narrower[0] - x.dim(), self.shape[narrower[0]]
            self.resolved = True
        if self.dim is None or x.shape[self.dim] >= self.width:
            return None
        pad = [0, 0] * (-self.dim - 1) + [0, self.width - x.shape[self.dim]]
        return (F.pad(x, pad), *args[1:])


class TakeStream:
    """Forward pre-hook of a convolution or linear layer inside such an attention: of an input wider than the layer
    reads, the first channels (the stream; the rest is :class:`PadStream`'s zeros)."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], Tensor):
            return None
        x, linear = args[0], isinstance(module, nn.Linear)
        width, dim = (module.in_features, -1) if linear else (module.in_channels, 1)
        if x.dim() < 2 or x.shape[dim] <= width:
            return None
        if _checking[0] and x.narrow(dim, width, x.shape[dim] - width).any():
            raise RuntimeError(
                f"the zeros bconv padded this attention's stream with were mixed into it before this layer (an op "
                f"across its channels); it cannot run narrower than its heads"
            )  # fmt: skip
        return (x.narrow(dim, 0, width), *args[1:])


def pad_streams(model: nn.Module, cls: type, shapes: dict[nn.Module, torch.Size]) -> int:
    """Give every module of class ``cls`` in ``model`` a :class:`PadStream` (from the input shape it had before
    pruning, in ``shapes``), and every convolution and linear layer inside it a :class:`TakeStream`; return how
    many modules got one."""
    count = 0
    for m in model.modules():
        if type(m) is cls and m in shapes:
            m.register_forward_pre_hook(PadStream(shapes[m]), prepend=True)
            for layer in m.modules():
                if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
                    layer.register_forward_pre_hook(TakeStream(), prepend=True)
            count += 1
    return count


def attention_around(model: nn.Module, path: str | None) -> type | None:
    """The class of the innermost module around ``path`` that keeps a head count, or None."""
    while path:
        module = model.get_submodule(path)
        if head_count(module):
            return type(module)
        path = path.rpartition(".")[0]
    return None
