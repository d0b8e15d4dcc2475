"""Spatial pyramid cells (Lazebnik, Schmid & Ponce, CVPR 2006) gathered into a batch, so that any head encodes all
cells of a level in one call."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .regions import symbolic_layout

__all__ = ["cell_bounds", "pyramid_cells", "dynamic_axis_index"]


def cell_bounds(length: int, cells: int) -> list[tuple[int, int]]:
    """Cell i of ``cells`` along an axis spans ``[floor(i L / n), ceil((i + 1) L / n))`` (adaptive-pooling convention:
    never empty, neighbours share at most one position when L is not divisible by n)."""
    return [((i * length) // cells, -((-(i + 1) * length) // cells)) for i in range(cells)]


def _axis_index(length: int, cells: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
    bounds = cell_bounds(length, cells)
    size = max(end - start for start, end in bounds)
    offsets = torch.arange(size, device=device)
    starts = torch.tensor([start for start, _ in bounds], device=device).unsqueeze(1)
    ends = torch.tensor([end for _, end in bounds], device=device).unsqueeze(1)
    index = starts + offsets
    valid = index < ends
    return torch.minimum(index, ends - 1), valid, size


def dynamic_axis_index(length: int, cells: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`_axis_index` without Python arithmetic on ``length`` (which may be a symbolic size under
    ``torch.export``): ``(index, valid)`` of shape (cells, size) with ``size = (L - 1) // n + 2``, a bound on every cell
    (a cell spans fewer than ``L/n + 2`` positions), or ``size = L`` for one cell.

    Cell i spans ``[floor(i L / n), ceil((i + 1) L / n))``, the ceiling written ``floor((a + n - 1) / n)`` on
    non-negative ints. Positions past a cell's end repeat its last position and are marked invalid.
    """
    size = length if cells == 1 else (length - 1) // cells + 2
    i = torch.arange(cells, device=device).unsqueeze(1)
    starts = (i * length) // cells
    ends = ((i + 1) * length + cells - 1) // cells
    index = starts + torch.arange(size, device=device)
    return torch.minimum(index, ends - 1), index < ends


def _equal_cells(length: int, cells: int) -> bool:
    """Whether every cell along an axis has the same size (then no cell needs padding)."""
    return len({end - start for start, end in cell_bounds(length, cells)}) == 1


def pyramid_cells(x: Tensor, level: int, mask: Optional[Tensor] = None, dynamic: Optional[bool] = None
                  ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Split (B, C, H, W) into ``level`` x ``level`` cells stacked as (B * level^2, C, h, w), row-major per image.

    Cells smaller than the largest are padded (by repeating their last row/column) and the returned mask
    (B * level^2, h, w) marks their own positions; it is ``None`` when every cell is full and no ``mask`` is given.
    The third value flags cells with no valid position (``None`` without a mask): the mask of such a cell is set
    all-True so that heads can run, and the caller replaces their output.

    ``dynamic`` (default: only under ``torch.export`` with a symbolic H or W) lays the cells out with tensor
    arithmetic on H, W (:func:`dynamic_axis_index`): every cell padded to a bound of the largest, always with a mask
    (``None`` only for level 1, the whole map), so that one exported graph serves every H x W; no user ``mask`` then.
    """
    if dynamic is None:
        dynamic = symbolic_layout(x)
    if dynamic:
        if mask is not None:
            raise ValueError("pyramid_cells: the tensor-computed (export) layout takes no mask")
        return _dynamic_cells(x, level)
    batch, channels, height, width = x.shape
    rows, row_valid, cell_h = _axis_index(height, level, x.device)
    cols, col_valid, cell_w = _axis_index(width, level, x.device)
    cells = x.index_select(2, rows.flatten()).index_select(3, cols.flatten())
    cells = cells.view(batch, channels, level, cell_h, level, cell_w).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(batch * level * level, channels, cell_h, cell_w)
    geometric = (row_valid[:, None, :, None] & col_valid[None, :, None, :])            # (l, l, h, w)
    if mask is None:
        if _equal_cells(height, level) and _equal_cells(width, level):  # from the shape, not data (torch.export)
            return cells, None, None
        cell_mask = geometric.expand(batch, -1, -1, -1, -1).reshape(-1, cell_h, cell_w)
        return cells, cell_mask, None
    user = mask.index_select(1, rows.flatten()).index_select(2, cols.flatten())
    user = user.view(batch, level, cell_h, level, cell_w).permute(0, 1, 3, 2, 4)
    cell_mask = (user & geometric).reshape(-1, cell_h, cell_w)
    # zero the masked-out values: an empty cell is encoded on an all-True mask (its output is then replaced by zeros),
    # and NaN / inf there would still reach the wrapped head's gradients (0 * NaN)
    cells = torch.where(cell_mask.unsqueeze(1), cells, torch.zeros((), dtype=cells.dtype, device=cells.device))
    empty = ~cell_mask.flatten(1).any(dim=1)
    cell_mask = cell_mask | empty[:, None, None]
    return cells, cell_mask, empty


def _dynamic_cells(x: Tensor, level: int) -> tuple[Tensor, Optional[Tensor], None]:
    """:func:`pyramid_cells` without a mask, laid out by :func:`dynamic_axis_index` (no Python value from H, W)."""
    if level == 1:
        return x, None, None
    batch, channels = x.shape[:2]
    rows, row_valid = dynamic_axis_index(x.shape[2], level, x.device)
    cols, col_valid = dynamic_axis_index(x.shape[3], level, x.device)
    cell_h, cell_w = rows.shape[1], cols.shape[1]
    cells = x.index_select(2, rows.flatten()).index_select(3, cols.flatten())
    cells = cells.view(batch, channels, level, cell_h, level, cell_w).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(batch * level * level, channels, cell_h, cell_w)
    geometric = row_valid[:, None, :, None] & col_valid[None, :, None, :]               # (l, l, h, w)
    return cells, geometric.expand(batch, -1, -1, -1, -1).reshape(-1, cell_h, cell_w), None
