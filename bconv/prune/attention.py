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

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import swin_transformer as swin

__all__ = ["SUBCLASSES", "ShiftedWindowAttention", "ShiftedWindowAttentionV2", "decouple_widths"]


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
