"""Batch-related Convolutional Cells (Yu et al., Progressive Transfer Learning, arXiv 1908.02492)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from typing import Any

from bconv.cells._state import StatefulCell

__all__ = ["BConvCell", "BConvCellV2"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


class _BConvBase(StatefulCell):
    """Validation and description shared by the two cells."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, **options: Any) -> None:
        super().__init__(**options)
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.stride = _positive_int("stride", stride)

    def _state_shape(self, x: Tensor) -> tuple[int, int, int, int]:
        """Check ``x`` and return the shape of the state (= output) it produces."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects an input of shape "
                f"[batch, {self.in_channels}, height, width] (in_channels={self.in_channels}); "
                f"got {tuple(x.shape)}. The channel count of a cell's input is fixed at "
                "construction."
            )
        batch, _, height, width = x.shape
        # 3x3 conv, padding 1: out = floor((in - 1) / stride) + 1
        out_h, out_w = (height - 1) // self.stride + 1, (width - 1) // self.stride + 1
        return batch, self.out_channels, out_h, out_w

    def _state_channels(self) -> int:
        return self.out_channels

    def _step(self, gates: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The LSTM update from the gate pre-activations ``(i, f, o, g)``: stores ``C_b``, returns ``y_b``."""
        i, f, o, g = gates.chunk(4, dim=1)
        i, f, o, g = i.sigmoid(), f.sigmoid(), o.sigmoid(), g.tanh()
        c = f * self._read_state("c_prev", shape, like=f) + i * g
        self._write_state("c_prev", c)
        return o * torch.tanh(c)

    def silence_(self) -> _BConvBase:
        """Zero the candidate rows (``g``) of the gate convolution, in place.

        With zero candidate weights, ``C_b = f * C_{b-1} + i * tanh(0) = 0`` from a zero state, so the cell
        outputs exactly 0 until those weights learn, while they receive the gradient
        ``dL/dy * o * i * x`` from the first step. :func:`bconv.wrap_with_ptl` silences the last cell of the
        ladder so that a freshly wrapped model computes exactly what the original computed.

        Returns:
            The cell itself.
        """
        with torch.no_grad():
            self.conv.weight[3 * self.out_channels :].zero_()
        return self

    def extra_repr(self) -> str:
        text = (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"stride={self.stride}, state_mode={self.state_mode!r}"
        )
        if not self.detach:
            text += ", detach=False"
        if self.on_size_change != "reset":
            text += f", on_size_change={self.on_size_change!r}"
        return text


class BConvCell(_BConvBase):
    r"""BConv-Cell v1 (paper Eq. 1): a convolutional cell whose state spans mini-batches.

    For mini-batch :math:`b` with input :math:`x_b`, one 3x3 convolution ``conv``
    (no bias) produces the four gates, split along channels in the order
    :math:`(i, f, o, g)`:

    .. math::

        i_b = \sigma(W_{xi} * x_b), \quad f_b = \sigma(W_{xf} * x_b), \quad
        o_b = \sigma(W_{xo} * x_b)

        C_b = f_b \odot C_{b-1} + i_b \odot \tanh(W_{xc} * x_b)

        y_b = o_b \odot \tanh(C_b)

    The gates depend on the input only (no hidden-to-hidden term). The latent state
    :math:`C` has the output's shape ``[B, out_channels, H_out, W_out]`` and is kept
    as described in :class:`~bconv.cells.StatefulCell`: zeros without history and in
    eval mode; one slot per batch position (or one pooled state); detached after each
    batch by default; reset with a warning when the spatial size changes.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output and of the state.
        stride: stride of the 3x3 convolution (``H_out = (H - 1) // stride + 1``).
        **options: how the state is kept: the :class:`~bconv.cells.StateOptions`
            (``state_mode``, ``detach``, ``on_size_change``, ``sync_state``).

    Example::

        >>> cell = BConvCell(64, 32, stride=2)
        >>> y = cell(torch.randn(8, 64, 56, 56))      # state C is now [8, 32, 28, 28]
        >>> y.shape
        torch.Size([8, 32, 28, 28])
        >>> cell.reset_state()                          # e.g. at the start of an epoch
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, **options)
        self.conv = nn.Conv2d(
            in_channels, 4 * out_channels, 3, stride=stride, padding=1, bias=False
        )
        self._register_state("c_prev")

    def forward(self, x: Tensor) -> Tensor:
        shape = self._state_shape(x)  # checks x before the conv sees it
        return self._step(self.conv(x), shape)


class BConvCellV2(_BConvBase):
    r"""BConv-Cell v2 (paper Fig. 1, right): v1 that also sees its previous output.

    The previous output :math:`y_{b-1}` is brought back to the input's resolution by
    a 3x3 transpose convolution ``recover`` (``out -> in`` channels, undoing the
    stride, exactly to ``x_b``'s spatial size, odd sizes included), concatenated after
    :math:`x_b`, and one 3x3 convolution ``conv`` (``2*in -> 4*out``, no bias) yields
    the gates in the order :math:`(i, f, o, g)`:

    .. math::

        r_b = \mathrm{ConvT}(y_{b-1}), \quad
        [i_b, f_b, o_b, g_b] = \mathrm{split}(W * [x_b, r_b])

        C_b = \sigma(f_b) \odot C_{b-1} + \sigma(i_b) \odot \tanh(g_b)

        y_b = \sigma(o_b) \odot \tanh(C_b)

    The cell keeps both :math:`C` and :math:`y` as state. Without history (after
    :meth:`reset_state`, or in eval mode) :math:`y_{b-1} = 0`, hence :math:`r_b = 0`
    (``recover`` has no bias). State handling is that of :class:`BConvCell`.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output and of the state.
        stride: stride of the 3x3 convolution and of the transpose convolution.
        **options: how the state is kept: the :class:`~bconv.cells.StateOptions`
            (``state_mode``, ``detach``, ``on_size_change``, ``sync_state``).

    Example::

        >>> cell = BConvCellV2(64, 32, stride=2)
        >>> y = cell(torch.randn(8, 64, 55, 55))      # odd sizes are fine
        >>> y.shape
        torch.Size([8, 32, 28, 28])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, **options)
        self.conv = nn.Conv2d(
            2 * in_channels, 4 * out_channels, 3, stride=stride, padding=1, bias=False
        )
        self.recover = nn.ConvTranspose2d(
            out_channels, in_channels, 3, stride=stride, padding=1, bias=False
        )
        self._register_state("c_prev")
        self._register_state("y_prev")

    def forward(self, x: Tensor) -> Tensor:
        shape = self._state_shape(x)
        y_prev = self._read_state("y_prev", shape, like=x)
        r = self.recover(y_prev, output_size=x.shape[-2:])
        y = self._step(self.conv(torch.cat([x, r.to(x.dtype)], dim=1)), shape)
        self._write_state("y_prev", y)
        return y
