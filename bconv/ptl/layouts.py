"""How a stage's output reaches the ladder, and how the ladder's result goes back: one small object per layout.

The ladder computes on NCHW maps. A stage's output may be another form of the same map: channels-last
(``[B, H, W, C]``, Swin), or tokens (``[B, P + Hp*Wp, C]``: ViT, DeiT, EVA, Mixer). A :class:`Layout` turns the
output into the NCHW map (:meth:`~Layout.to_map`) and the ladder's result back into the stage's own form
(:meth:`~Layout.from_map`), and checks that the output is still what was measured when the network was
wrapped (:meth:`~Layout.check`). A new kind of backbone adds a layout here, not branches through the wrapper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import BConvError
from ..surgery import Stage

__all__ = ["Layout", "ChannelsFirst", "ChannelsLast", "TokenGrid", "layout_of"]


def _ceil_div(n: int, r: int) -> int:
    return -(-n // r)


@dataclass(frozen=True)
class Layout:
    """A paired stage's output form, with what was measured of it when the network was wrapped.

    Attributes:
        stage: the stage's name (named in errors).
        channels: the output's channel count.
        reduction: the output's stride relative to the image (rounded to a power of two).
        measured: the output's spatial size ``(h, w)`` at the wrap's input size.
        image: the wrap's input size ``(H, W)``.
    """

    stage: str
    channels: int
    reduction: int
    measured: tuple[int, int]
    image: tuple[int, int]
    name = "NCHW"

    def to_map(self, out: Tensor, image_size: tuple[int, int]) -> Tensor:
        """The stage output as an NCHW map ``[B, C, H, W]``, for an image of ``image_size`` ``(H, W)``."""
        return out

    def from_map(self, result: Tensor, out: Tensor) -> Tensor:
        """The ladder's NCHW ``result`` in the form of the stage's own output ``out``."""
        return result

    def check(self, x: Tensor, image_size: tuple[int, int]) -> None:
        """Raise if the NCHW map ``x`` is not what this stage measured, for an image of ``image_size``.

        Its channels must be the measured count, and each spatial size what the measurement gives for this
        image, within about a pixel: either scaled with the image (``h * H / H_wrap``), or as the ladder's
        cells size it less the pixels the stage fell short of them at wrap time (``ceil(H / r) - offset``:
        unpadded convolutions, as in Inception's stem, lose a few pixels whatever the size). A network
        changed after wrapping (a stage's stride or width) is an error that names the stage, not a silently
        resized map.
        """
        if x.dim() == 4 and x.shape[1] == self.channels and all(map(self._fits, x.shape[-2:], image_size, (0, 1))):
            return
        shown = "x".join(map(str, self.image))
        raise BConvError(
            f"paired stage `{self.stage}` returned a map of shape {tuple(x.shape)} ({self.name}) for a "
            f"{image_size[0]}x{image_size[1]} image, where wrapping measured [batch, {self.channels}, "
            f"{self.measured[0]}, {self.measured[1]}] for a {shown} image (stride {self.reduction}). The network "
            f"changed after it was wrapped, or this stage's output depends on more than the image size. Wrap the "
            f"changed network anew (unwrap_ptl, then wrap_with_ptl); python -m bconv.inspect shows its stages."
        )

    def _fits(self, size: int, image: int, dim: int) -> bool:
        scaled = self.measured[dim] * image / self.image[dim]
        offset = _ceil_div(self.image[dim], self.reduction) - self.measured[dim]
        return abs(size - scaled) <= 1.5 or abs(size - (_ceil_div(image, self.reduction) - offset)) <= 1


class ChannelsFirst(Layout):
    """``[B, C, H, W]``: the ladder's own layout; nothing to convert."""


class ChannelsLast(Layout):
    """``[B, H, W, C]`` (Swin, timm's NHWC stages): permuted to NCHW and back."""

    name = "NHWC"

    def to_map(self, out: Tensor, image_size: tuple[int, int]) -> Tensor:
        return out.permute(0, 3, 1, 2)

    def from_map(self, result: Tensor, out: Tensor) -> Tensor:
        return result.permute(0, 2, 3, 1)


@dataclass(frozen=True)
class TokenGrid(Layout):
    """``[B, P + Hp*Wp, C]``: ``prefix`` tokens (class, distillation, registers), then the patch grid row by row.

    The grid tokens become the NCHW map ``[B, C, Hp, Wp]`` and the ladder's result goes back into them; the
    prefix tokens pass through untouched. The grid follows the image, so a ``dynamic_img_size`` model at
    another size keeps working: ``Hp = H // ph`` (or its ceiling, for a model that pads the image), checked
    against the token count at every forward.

    Attributes:
        prefix: tokens before the grid, measured at this stage (docs/design.md §3.6).
        patch: image pixels per grid cell ``(ph, pw)``.
    """

    prefix: int = 0
    patch: tuple[int, int] = (16, 16)
    name = "NLC"

    def grid(self, tokens: int, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(Hp, Wp)`` of ``tokens`` tokens for an image of ``image_size``; raises if they are no such grid."""
        (h, w), (ph, pw) = image_size, self.patch
        for rounding in (math.floor, math.ceil):
            hp, wp = rounding(h / ph), rounding(w / pw)
            if tokens == self.prefix + hp * wp:
                return hp, wp
        shown = "x".join(map(str, self.image))
        raise BConvError(
            f"paired stage `{self.stage}` returned {tokens} tokens for a {h}x{w} image, where its {self.prefix} "
            f"prefix token(s) and a {h // ph}x{w // pw} grid of {ph}x{pw} patches make {self.prefix + (h // ph) * (w // pw)} "
            f"(wrapping measured {self.prefix} + {self.measured[0]}x{self.measured[1]} for a {shown} image). Tokens "
            f"were dropped or added: patch dropout (timm's patch_drop_rate) drops them in training, and a "
            f"network changed after wrapping adds others. Set patch_drop_rate=0, or wrap the changed network anew."
        )

    def to_map(self, out: Tensor, image_size: tuple[int, int]) -> Tensor:
        if out.dim() != 3:
            raise BConvError(
                f"paired stage `{self.stage}` returned a tensor of shape {tuple(out.shape)}, where wrapping measured "
                f"tokens [batch, {self.prefix} + {self.measured[0]}*{self.measured[1]}, {self.channels}]: wrap the "
                f"changed network anew (unwrap_ptl, then wrap_with_ptl)."
            )
        b, n, c = out.shape
        hp, wp = self.grid(n, image_size)
        return out[:, self.prefix :].transpose(1, 2).reshape(b, c, hp, wp)

    def from_map(self, result: Tensor, out: Tensor) -> Tensor:
        grid = result.flatten(2).transpose(1, 2)
        return torch.cat([out[:, : self.prefix], grid], dim=1) if self.prefix else grid

    def check(self, x: Tensor, image_size: tuple[int, int]) -> None:
        """The grid was checked against the image by :meth:`to_map`; the channels are checked here."""
        if x.shape[1] != self.channels:
            raise BConvError(
                f"paired stage `{self.stage}` returned tokens of {x.shape[1]} channels, where wrapping measured "
                f"{self.channels}: wrap the changed network anew (unwrap_ptl, then wrap_with_ptl)."
            )


_LAYOUTS: dict[str, type[Layout]] = {"NCHW": ChannelsFirst, "NHWC": ChannelsLast, "NLC": TokenGrid}


def layout_of(stage: Stage, input_size: tuple[int, ...]) -> Layout:
    """The :class:`Layout` of ``stage``, measured at ``input_size`` ``(C, H, W)``."""
    image = tuple(input_size[1:])
    if stage.tokens is not None:
        t = stage.tokens
        return TokenGrid(stage.name, stage.channels, stage.reduction, t.grid, image, prefix=t.prefix, patch=t.patch)  # type: ignore[arg-type]
    spatial = stage.shape[1:] if stage.layout == "NCHW" else stage.shape[:2]
    return _LAYOUTS[stage.layout](stage.name, stage.channels, stage.reduction, tuple(spatial), image)  # type: ignore[arg-type]
