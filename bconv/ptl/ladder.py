"""The PTL ladder as a plain module: the paper's equations (docs/design.md §3) and nothing else.

Given the image and the outputs x_1..x_n of the paired stages (NCHW maps at strides r_1 <= ... <= r_n)::

    y_1 = Cell_1(image)                        # strided from the image to r_1
    z_i = Fuse_i(x_i, y_i)                     # Conv1x1(cat(x_i, y_i), bias) -> BN -> ReLU, i = 1..n-1
    y_{i+1} = Cell_{i+1}(z_i)                  # stride r_{i+1}/r_i: a chain of stride-2 cells
    out = x_n + proj(y_n)                      # replaces x_n; y_n starts at exactly 0

:meth:`PTLLadder.forward` is these lines. How the stage outputs reach it from a network (forward hooks,
the checks that run every forward, gradient checkpointing, layouts other than NCHW) is
:mod:`bconv.ptl.adapter`'s; the ladder knows nothing of hooks or of the network.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cells import BConvCell, BConvCellV2, StatefulCell, StateOptions
from ..errors import BConvError
from .config import PTLConfig

__all__ = ["PTLLadder", "Fusion", "FinalFusion", "CELLS", "ladder_width", "released_init"]

CELLS: dict[str, type[StatefulCell]] = {"v1": BConvCell, "v2": BConvCellV2}


def ladder_width(fraction: float, channels: int) -> int:
    """Channels of a cell or fusion: ``fraction`` of the paired stage's ``channels``, at least 8."""
    return max(8, round(fraction * channels))


class Fusion(nn.Module):
    """The released code's fusion of a stage output ``x`` and a cell output ``y``:
    ``ReLU(BN(Conv1x1(cat(x, y))))`` (ZJULearning/PTL, ``mgn_ptl.py``).

    The BatchNorm keeps the fused signal at unit scale whatever the scale of the backbone's features, so
    the ladder neither vanishes beside them nor swamps them (docs/design.md §3).

    The convolution over the concatenation is computed as the sum of its two column blocks,
    ``W[:, :C_x] * x + W[:, C_x:] * y + b``: the same parameters and ``state_dict`` keys, and no concatenated
    copy of the backbone's stage output for autograd to keep (``x`` itself is kept, which the backbone's
    next layer keeps anyway; docs/memory.md).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        weight, split = self.conv.weight, x.shape[1]
        fused = F.conv2d(x, weight[:, :split], self.conv.bias) + F.conv2d(y, weight[:, split:])  # = conv(cat(x, y))
        return self.relu(self.bn(fused))


class FinalFusion(nn.Module):
    r"""The last fusion, whose output replaces the last paired stage's output ``x``.

    ``final_init="identity"`` (bconv's default), the paper's 1x1 conv over ``cat(x, y)`` with its ``x``
    part fixed to the identity::

        out = x + proj(y)           # proj: Conv1x1(y's channels -> x's), kaiming_normal_(fan_in), no bias

    and the last cell's candidate weights (the ``g`` rows of its gate conv) start at zero, so with no
    history that cell outputs exactly 0 (:meth:`~bconv.cells.BConvCell.silence_`): a freshly wrapped model
    computes exactly what the original computed. The ladder is awake from the first step: the gradient
    reaching ``y`` is ``proj^T g``, of the order of the stage output's own gradient ``g``, and the silenced
    candidate weights, with the fan-in of a 3x3 conv, grow at the rate of any conv layer. Unlike a zero
    scale or a zero BatchNorm weight on a fusion's output, nothing multiplies the ladder's path by zero;
    and since the ``x`` part is fixed, the ladder adds no trainable layer on the backbone's own features:
    with the cells' output zeroed the model is the plain backbone. The contribution is bounded like
    the cell's output (``|y| < 1``), so it cannot swamp the stage's features.

    ``final_init="paper"``: ``out = Fusion(x, y)``, the released code's randomly initialised, normalised
    reduction layer (its BatchNorm weight drawn from N(1, 0.02), as ``MGN_PTL._init_reduction`` does).
    """

    def __init__(self, channels: int, cell_channels: int, residual: bool) -> None:
        super().__init__()
        self.channels, self.cell_channels, self.residual = channels, cell_channels, residual
        if residual:
            self.proj = nn.Conv2d(cell_channels, channels, 1, bias=False)
        else:
            self.fuse = Fusion(channels + cell_channels, channels)
            with torch.no_grad():
                self.fuse.bn.weight.normal_(1.0, 0.02)

    @property
    def in_channels(self) -> int:
        return self.channels + self.cell_channels

    @property
    def out_channels(self) -> int:
        return self.channels

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return x + self.proj(y) if self.residual else self.fuse(x, y)

    def extra_repr(self) -> str:
        return "out = x + proj(y)" if self.residual else "out = fuse(cat(x, y))"


def released_init(module: nn.Module) -> None:
    """``kaiming_normal_(mode="fan_in")`` on every convolution of ``module``, as the released code initialises
    the PTL branch (``PTL.init_param``); biases and BatchNorm keep PyTorch's defaults."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in")


def cell_chain(
    cell: type[StatefulCell], c_in: int, c_out: int, stride: int, state: StateOptions, taper: bool = False
) -> nn.Sequential:
    """One cell for stride 1 or 2; a chain of stride-2 cells for 4, 8, ... (docs/design.md §3).

    A stride that is no power of two (a ViT's 14-pixel patches) gets the stride-2 cells below it (3 for 14:
    224 -> 28 pixels); :meth:`PTLLadder.cell_output` resizes their output to the stage's grid (16).
    With ``taper`` each cell of the chain but the last has half the width of the next (at least 8), as a
    CNN's stem widens while it downsamples: a token backbone's first chain climbs from the image to a grid
    16 times smaller, and at its stage's full width its first cells would cost more than the backbone
    (docs/design.md §3.6).
    """
    if stride < 1:
        raise BConvError(f"stage strides must be positive; got {stride}")
    steps = int(math.log2(stride))
    options = vars(state.state_options())
    if steps == 0:
        return nn.Sequential(cell(c_in, c_out, 1, **options))
    widths = [max(8, c_out >> (steps - 1 - k)) if taper else c_out for k in range(steps)]
    return nn.Sequential(*[cell(([c_in] + widths)[k], widths[k], 2, **options) for k in range(steps)])


class PTLLadder(nn.Module):
    """The injected modules: one chain of cells and one fusion per paired stage, and the final fusion.

    Args:
        channels: channel count of each paired stage's output, in network order.
        reductions: each stage's stride relative to the image (powers of two, non-decreasing).
        in_channels: the image's channels.
        config: the options (cell version, widths, ``final_init``, the cells' state options).
        taper: the first chain's cells widen as they downsample (a token backbone's; see :func:`cell_chain`).

    Attributes:
        cells: ``cells[i]`` takes the image (``i == 0``) or ``z_{i-1}`` to stage ``i``'s resolution.
        fuses: ``fuses[i]`` (``i < n - 1``) is the :class:`Fusion` ``(x_i, y_i) -> z_i``.
        final_fuse: the :class:`FinalFusion` ``(x_n, y_n) -> x_n``'s channels.
        zero_cells: when ``True``, the cells do not run and the final fusion sees zeros in place of the
            last cell's output: the ladder minus its cells (an ablation: :func:`bconv.ladder_usage`
            compares with it; with the default ``final_init`` the model is then the plain backbone).

    Example::

        >>> ladder = PTLLadder([64, 128], [4, 8], 3, PTLConfig())
        >>> x1, x2 = torch.randn(2, 64, 8, 8), torch.randn(2, 128, 4, 4)
        >>> ladder(torch.randn(2, 3, 32, 32), [x1, x2]).shape     # replaces x2
        torch.Size([2, 128, 4, 4])
    """

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        in_channels: int,
        config: PTLConfig,
        taper: bool = False,
    ) -> None:
        super().__init__()
        cells, fuses = [], []
        c_in, reduction = in_channels, 1
        for i, (c, r) in enumerate(zip(channels, reductions)):
            width = ladder_width(config.cell_width, c)
            cells.append(cell_chain(CELLS[config.cell], c_in, width, r // reduction, config, taper=taper and i == 0))
            if i < len(channels) - 1:
                fused = ladder_width(config.fuse_width, c)
                fuses.append(Fusion(c + width, fused))
                c_in, reduction = fused, r
        self.cells = nn.ModuleList(cells)
        self.fuses = nn.ModuleList(fuses)
        last = channels[-1]
        residual = config.final_init == "identity"
        self.final_fuse = FinalFusion(last, ladder_width(config.cell_width, last), residual=residual)
        released_init(self)
        if residual:
            self.cells[-1][-1].silence_()  # the last cell outputs 0 until it learns: out == x_n exactly
        for cell in [c for chain in self.cells for c in chain][1:]:
            cell.report_size_change = False  # a new resolution reaches every cell: the first one's warning says it
        self.zero_cells = False

    def forward(self, image: Tensor, stage_outputs: Sequence[Tensor]) -> Tensor:
        """The ladder beside a whole forward: ``out``, which replaces the last stage's output (paper Eq. 3)."""
        z = image
        for i, x in enumerate(stage_outputs):
            z = self.rung(i, z, x)
        return z

    def rung(self, i: int, z: Tensor | None, x: Tensor) -> Tensor | None:
        """``z_i = Fuse_i(x_i, Cell_i(z_{i-1}))``; at the last rung ``out = FinalFuse(x_n, Cell_n(z_{n-1}))``.

        With :attr:`zero_cells`, the rungs before the last compute nothing (``None``).
        """
        if self.zero_cells and i < len(self.fuses):
            return None
        return self.fuse(i, x, self.cell_output(i, z, x))

    def cell_output(self, i: int, z: Tensor | None, x: Tensor) -> Tensor:
        """``y_i = Cell_i(z_{i-1})`` (``z_0`` is the image), at ``x_i``'s size and dtype; zeros under :attr:`zero_cells`."""
        if self.zero_cells:  # the ablation: no cell runs (nor touches its state)
            return x.new_zeros((x.shape[0], self.cells[i][-1].out_channels, *x.shape[-2:]))
        y = self.cells[i](z)
        if y.shape[-2:] != x.shape[-2:]:
            # Stages made with unpadded convs (Inception) are a few pixels off the cells' ceil(H / 2); a
            # patch that is no power of two (14) leaves the cells at 28x28 for a 16x16 grid: an exact resize.
            y = F.adaptive_avg_pool2d(y, x.shape[-2:])
        return y.to(x.dtype)

    def fuse(self, i: int, x: Tensor, y: Tensor) -> Tensor:
        """``Fuse_i(x_i, y_i)``, or the final fusion at the last rung."""
        return self.fuses[i](x, y) if i < len(self.fuses) else self.final_fuse(x, y)
