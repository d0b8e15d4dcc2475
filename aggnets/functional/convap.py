"""ConvAP (Ali-bey, Chaib-draa & Giguère, GSV-Cities, Neurocomputing 2022): a 1x1 convolution C -> d, adaptive
average pooling to s1 x s2 cells, flatten, L2.

The average of an affine map is the affine map of the average (the cell weights sum to 1), so the cells are pooled
first and the convolution is applied to the s1 * s2 cell means: the same descriptor with ``s1 s2 / (H W)`` of the
convolution's work. The cells are one matrix product with a (S, H W) weight matrix built with tensor arithmetic on
H, W (and the mask), so the masked form is one graph and the exported graph takes any H x W.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .masking import zero_masked
from .norm import accumulation_dtype, l2_normalize
from .precision import bmm_full_range, linear_full_range

__all__ = ["convap", "convap_cell_weights"]


def _axis_cells(valid: Tensor, cells: int) -> Tensor:
    """Cell membership along one axis: ``valid`` (B', L) marks the positions of the axis that hold a valid position;
    the ``cells`` cells are laid on ``[first, last]`` of them with the adaptive-pooling convention (cell i spans
    ``[first + floor(i n / cells), first + ceil((i + 1) n / cells))``, n = last - first + 1). Returns (B', cells, L)
    bool. Tensor arithmetic only (no Python value of L or of the mask)."""
    length = valid.shape[1]
    flags = valid.to(torch.int64)
    position = torch.arange(length, device=valid.device)
    first = length - (flags * torch.arange(length, 0, -1, device=valid.device)).amax(dim=1)    # (B',)
    end = (flags * (position + 1)).amax(dim=1)                                                   # last + 1
    size = (end - first).unsqueeze(1)
    index = torch.arange(cells, device=valid.device).unsqueeze(0)                                # (1, cells)
    low = first.unsqueeze(1) + (index * size) // cells
    high = first.unsqueeze(1) + ((index + 1) * size + cells - 1) // cells
    return (position >= low.unsqueeze(-1)) & (position < high.unsqueeze(-1))


def convap_cell_weights(x: Tensor, s1: int, s2: int, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The averaging weights of the s1 x s2 cells of ``x`` (B, C, H, W): ``(weights, nonempty)`` with ``weights``
    (B', s1 * s2, H * W) in x's dtype (each row sums to 1 over the valid positions of its cell, or is 0) and
    ``nonempty`` (B', s1 * s2) bool; B' is 1 without a mask. Cells follow the adaptive-pooling convention on the whole
    map, or with a mask on the bounding box of each image's valid positions (then only the valid positions of a
    cell are averaged; a cell may have none)."""
    height, width = x.shape[2], x.shape[3]
    if mask is None:
        rows_valid = torch.ones((1, height), dtype=torch.bool, device=x.device)
        cols_valid = torch.ones((1, width), dtype=torch.bool, device=x.device)
    else:
        rows_valid = mask.any(dim=2)
        cols_valid = mask.any(dim=1)
    rows = _axis_cells(rows_valid, s1).to(x.dtype)                                   # (B', s1, H)
    cols = _axis_cells(cols_valid, s2).to(x.dtype)                                   # (B', s2, W)
    weights = rows.unsqueeze(2).unsqueeze(4) * cols.unsqueeze(1).unsqueeze(3)         # (B', s1, s2, H, W)
    if mask is not None:
        weights = weights * mask.unsqueeze(1).unsqueeze(1).to(x.dtype)
    weights = weights.flatten(3).flatten(1, 2)                                        # (B', S, H W)
    counts = weights.sum(dim=-1, keepdim=True)
    return weights / counts.clamp(min=1.0), counts.squeeze(-1) > 0


def convap(x: Tensor, weight: Tensor, bias: Optional[Tensor], s1: int = 2, s2: int = 2,
           mask: Optional[Tensor] = None) -> Tensor:
    """ConvAP: ``f = L2(vec_d-major[ W avg_cell(x) + b ])`` over the s1 x s2 adaptive-pooling cells.

    ``weight`` (d, C) or the convolution's (d, C, 1, 1), ``bias`` (d,) or None. Without a mask the cells are those of
    ``F.adaptive_avg_pool2d(x, (s1, s2))`` (cell i spans rows ``[floor(i H / s1), ceil((i + 1) H / s1))``); with a mask
    they are laid on each image's valid bounding box and average its valid positions, and a cell with none gives a
    zero d-vector. The (d, s1, s2) result is flattened d-major (index ``k s1 s2 + i s2 + j``), as the authors'.
    """
    x = zero_masked(accumulation_dtype(x), mask)
    batch, channels = x.shape[0], x.shape[1]
    weights, nonempty = convap_cell_weights(x, s1, s2, mask)
    cells = s1 * s2
    pooled = bmm_full_range(x.flatten(2), weights.transpose(1, 2).expand(batch, x.shape[2] * x.shape[3], cells))
    projected = linear_full_range(pooled.transpose(1, 2), weight.reshape(weight.shape[0], channels), bias)
    projected = torch.where(nonempty.unsqueeze(-1), projected.to(x.dtype),
                            torch.zeros((), dtype=x.dtype, device=x.device))          # (B, S, d)
    return l2_normalize(projected.transpose(1, 2).flatten(1), dim=-1)
