"""Batch-related Convolutional Cells: convolutional cells whose state spans mini-batches.

``BConvCell`` is the paper's v1 (Eq. 1), ``BConvCellV2`` its v2 (Fig. 1, right), and
``StatefulCell`` the base class that holds the state contract; model-level helpers
find every cell with ``isinstance(m, StatefulCell)`` over ``model.modules()``.
"""

from bconv.cells._state import StatefulCell, StateOptions
from bconv.cells.bconv_cell import BConvCell, BConvCellV2

__all__ = ["BConvCell", "BConvCellV2", "StatefulCell", "StateOptions"]
