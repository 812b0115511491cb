"""How a stage's output reaches the ladder, and how the ladder's result goes back: one small object per layout.

The ladder computes on NCHW maps. A stage's output may be another form of the same map: channels-last
(``[B, H, W, C]``, Swin), and later token sequences. A :class:`Layout` turns the output into the NCHW map
(:meth:`~Layout.to_map`) and the ladder's result back into the stage's own form (:meth:`~Layout.from_map`),
and checks that the output is still what was measured when the network was wrapped
(:meth:`~Layout.check`). A new kind of backbone adds a layout here, not branches through the wrapper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..errors import BConvError
from ..surgery import Stage

__all__ = ["Layout", "ChannelsFirst", "ChannelsLast", "layout_of"]


def _ceil_div(n: int, r: int) -> int:
    return -(-n // r)


@dataclass(frozen=True)
class Layout:
    """A paired stage's output form, with what was measured of it when the network was wrapped.

    Attributes:
        stage: the stage's name (named in errors).
        channels: the output's channel count.
        reduction: the output's stride relative to the image.
        offset: ``(dh, dw)``: how many pixels the measured output fell short of ``ceil(H / reduction)`` (the
            ladder's cells' size) at the wrap's input size: 0 for padded convolutions, a few for unpadded
            ones (Inception's stem).
    """

    stage: str
    channels: int
    reduction: int
    offset: tuple[int, int]
    name = "NCHW"

    def to_map(self, out: Tensor) -> Tensor:
        """The stage output as an NCHW map ``[B, C, H, W]``."""
        return out

    def from_map(self, result: Tensor, out: Tensor) -> Tensor:
        """The ladder's NCHW ``result`` in the form of the stage's own output ``out``."""
        return result

    def check(self, x: Tensor, image_size: tuple[int, int]) -> None:
        """Raise if the NCHW map ``x`` is not what this stage measured, for an image of ``image_size``.

        Its channels must be the measured count, and each spatial size within one pixel of what the measured
        reduction and offset give (``ceil(H / reduction) - offset``): a network changed after wrapping (a
        stage's stride or width) is an error that names the stage, not a silently resized map.
        """
        expected = tuple(_ceil_div(n, self.reduction) - d for n, d in zip(image_size, self.offset))
        if (
            x.dim() != 4
            or x.shape[1] != self.channels
            or any(abs(got - want) > 1 for got, want in zip(x.shape[-2:], expected))
        ):
            want = f"[batch, {self.channels}, {expected[0]}, {expected[1]}]"
            raise BConvError(
                f"paired stage `{self.stage}` returned a map of shape {tuple(x.shape)} ({self.name}) for an image of "
                f"{image_size[0]}x{image_size[1]}, where wrapping measured {want} (channels {self.channels}, "
                f"stride {self.reduction}). The network changed after it was wrapped, or this stage's output "
                f"depends on more than the image size. Wrap the changed network anew (unwrap_ptl, then "
                f"wrap_with_ptl); python -m bconv.inspect shows its stages."
            )


class ChannelsFirst(Layout):
    """``[B, C, H, W]``: the ladder's own layout; nothing to convert."""


class ChannelsLast(Layout):
    """``[B, H, W, C]`` (Swin, timm's NHWC stages): permuted to NCHW and back."""

    name = "NHWC"

    def to_map(self, out: Tensor) -> Tensor:
        return out.permute(0, 3, 1, 2)

    def from_map(self, result: Tensor, out: Tensor) -> Tensor:
        return result.permute(0, 2, 3, 1)


_LAYOUTS: dict[str, type[Layout]] = {"NCHW": ChannelsFirst, "NHWC": ChannelsLast}


def layout_of(stage: Stage, input_size: tuple[int, ...]) -> Layout:
    """The :class:`Layout` of ``stage``, measured at ``input_size`` ``(C, H, W)``."""
    spatial = stage.shape[1:] if stage.layout == "NCHW" else stage.shape[:2]
    offset = tuple(_ceil_div(n, stage.reduction) - s for n, s in zip(input_size[1:], spatial))
    return _LAYOUTS[stage.layout](stage.name, stage.channels, stage.reduction, offset)  # type: ignore[arg-type]
