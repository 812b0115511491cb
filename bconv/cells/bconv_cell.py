"""Batch-related Convolutional Cells (Yu et al., Progressive Transfer Learning, arXiv 1908.02492)."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from bconv.cells._state import StatefulCell

__all__ = ["BConvCell", "BConvCellV2"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


class _Source(NamedTuple):
    """How a cell's output was computed, for a next cell to compute it again instead of keeping it."""

    update: Callable[..., tuple[Tensor, ...]]
    args: tuple[Tensor, ...]
    version: int


# Attribute of a cell's output (under recompute) naming its _Source; a next cell reads it (a chain of cells).
_SOURCE = "_bconv_source"


def _source_of(x: Tensor) -> _Source | None:
    """The :class:`_Source` of ``x`` if ``x`` is a cell's output, unchanged since (not modified in place)."""
    source = getattr(x, _SOURCE, None)
    return source if source is not None and source.version == x._version else None


def _chained(first: Callable[..., tuple[Tensor, ...]], n: int, update: Callable[..., tuple[Tensor, ...]],
             *args: Tensor) -> tuple[Tensor, ...]:  # fmt: skip
    """``update(first(*args[:n])[0], *args[n:])``: a cell's update whose input is the previous cell's output,
    computed again from that cell's arguments (a pure function of ``args``, like each update)."""
    return update(first(*args[:n])[0], *args[n:])


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

    def forward(self, x: Tensor) -> Tensor:
        shape = self._state_shape(x)  # checks x before the conv sees it
        own = (*self._weights(), *self._previous(shape, x))
        if not (self.recompute and torch.is_grad_enabled() and any(a.requires_grad for a in (x, *own))):
            new = self._update(x, *own)
        elif torch.compiler.is_compiling():
            # The compiler's partitioner decides what to keep for backward in a compiled graph.
            new = torch.utils.checkpoint.checkpoint(self._update, x, *own, use_reentrant=False)
        else:
            new = self._recomputed(x, own)
        for name, value in zip(self._state_names, new[1:]):
            self._write_state(name, value)
        return new[0]

    def _recomputed(self, x: Tensor, own: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """:meth:`_update` under non-reentrant ``torch.utils.checkpoint``: autograd keeps only its arguments (the
        input, the weights, the previous state, each kept anyway by the backbone, the module or the state) and
        the gates are computed again in backward. The update is a pure function of its arguments, so the
        recompute neither reads nor writes the state. When ``x`` is the output of a previous cell (a chain of
        stride-2 cells), this cell's update takes that cell's arguments instead and computes ``x`` again
        itself, so that ``x`` is not kept either (it costs the previous cell's update once more)."""
        source = _source_of(x)
        if source is None:
            args, update = (x, *own), self._update
        else:
            args = (*source.args, *own)
            update = functools.partial(_chained, source.update, len(source.args), self._update)
        new = torch.utils.checkpoint.checkpoint(update, *args, use_reentrant=False, preserve_rng_state=False)
        if source is None:  # one step deep: a third cell in a chain keeps its input
            setattr(new[0], _SOURCE, _Source(self._update, args, new[0]._version))
        return new

    def _weights(self) -> tuple[Tensor, ...]:
        """The parameters :meth:`_update` reads, passed to it explicitly (so a saved-tensor hook sees them)."""
        raise NotImplementedError

    def _previous(self, shape: tuple[int, ...], x: Tensor) -> tuple[Tensor, ...]:
        """The previous states, in the order of ``_state_names``, for an input ``x`` whose state has ``shape``."""
        raise NotImplementedError

    def _update(self, x: Tensor, *weights_and_previous: Tensor) -> tuple[Tensor, ...]:
        """``(y_b, *new states)`` from the input, :meth:`_weights` and :meth:`_previous`: the cell's equations,
        a pure function of its arguments (it is computed again in backward under ``recompute``)."""
        raise NotImplementedError

    @staticmethod
    def _lstm(gates: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
        """The LSTM update from the gate pre-activations ``(i, f, o, g)``: ``(y_b, C_b)``."""
        i, f, o, g = gates.chunk(4, dim=1)
        i, f, o, g = i.sigmoid(), f.sigmoid(), o.sigmoid(), g.tanh()
        c = f * c_prev.to(f.dtype) + i * g
        return o * torch.tanh(c), c

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
        **options: how the state is kept, and whether the gates are recomputed in backward: the
            :class:`~bconv.cells.StateOptions` (``state_mode``, ``detach``, ``on_size_change``,
            ``sync_state``, ``recompute``).

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

    def _weights(self) -> tuple[Tensor, ...]:
        return (self.conv.weight,)

    def _previous(self, shape: tuple[int, ...], x: Tensor) -> tuple[Tensor, ...]:
        return (self._read_state("c_prev", shape, like=x, cast=False),)

    def _update(self, x: Tensor, weight: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
        return self._lstm(F.conv2d(x, weight, None, self.stride, 1), c_prev)


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
        **options: how the state is kept, and whether the gates are recomputed in backward: the
            :class:`~bconv.cells.StateOptions` (``state_mode``, ``detach``, ``on_size_change``,
            ``sync_state``, ``recompute``).

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

    def _weights(self) -> tuple[Tensor, ...]:
        return self.conv.weight, self.recover.weight

    def _previous(self, shape: tuple[int, ...], x: Tensor) -> tuple[Tensor, ...]:
        return self._read_state("c_prev", shape, like=x, cast=False), self._read_state("y_prev", shape, like=x)

    def _update(self, x: Tensor, weight: Tensor, recover: Tensor, c_prev: Tensor, y_prev: Tensor) -> tuple[Tensor, ...]:
        # The transpose conv's output_padding brings r back to exactly x's size ((H - 1) % stride extra rows).
        padding = tuple((size - 1) % self.stride for size in x.shape[-2:])
        r = F.conv_transpose2d(y_prev, recover, None, self.stride, 1, padding)
        y, c = self._lstm(F.conv2d(torch.cat([x, r.to(x.dtype)], dim=1), weight, None, self.stride, 1), c_prev)
        return y, c, y
