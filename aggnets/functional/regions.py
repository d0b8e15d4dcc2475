"""R-MAC: regional maximum activations of convolutions (Tolias, Sicre & Jégou, ICLR 2016)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking import zero_masked
from .norm import accumulation_dtype, l2_normalize
from .pooling import clamped_power

__all__ = ["rmac_regions", "rmac", "region_max", "region_sums"]

Region = tuple[int, int, int]  # (top, left, size) of a square region


def _extra_regions(height: int, width: int, overlap: float) -> int:
    """Regions added along the long side so that neighbours overlap by about ``overlap`` (0 for a square map)."""
    if height == width:
        return 0
    short, long_side = min(height, width), max(height, width)
    errors = []
    for steps in range(2, 8):
        step = (long_side - short) / (steps - 1)
        errors.append(abs((short * short - short * step) / (short * short) - overlap))
    return errors.index(min(errors)) + 1


def _offsets(length: int, side: int, count: int) -> list[int]:
    if count == 1:
        return [0]
    step = (length - side) / (count - 1)
    return [math.floor(i * step) for i in range(count)]


def level_grid(height: int, width: int, level: int, overlap: float = 0.4) -> tuple[int, list[int], list[int]]:
    """The square regions of one R-MAC scale as ``(side, tops, lefts)``; every (top, left) pair is a region."""
    short = min(height, width)
    side = (2 * short) // (level + 1)
    extra = _extra_regions(height, width, overlap)
    rows = level + (extra if height > width else 0)
    cols = level + (extra if width > height else 0)
    return side, _offsets(height, side, rows), _offsets(width, side, cols)


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> list[Region]:
    """The R-MAC region grid on an ``height`` x ``width`` map as a list of ``(top, left, size)`` squares.

    At scale l = 1..L the side is ``floor(2 min(H, W) / (l + 1))``; l regions are placed uniformly along the short
    side and l + e along the long side, where e in 1..6 is chosen so that consecutive regions overlap by about
    ``overlap`` (40 %), as in the authors' MATLAB code. Scales whose side would be 0 are skipped.
    """
    return [(top, left, side) for side, _, tops, lefts in _scales(height, width, levels, overlap, False)
            for top in tops for left in lefts]


Interval = tuple[int, int]  # (start, size) along one axis


def _scales(height: int, width: int, levels: int, overlap: float, include_global: bool
            ) -> list[tuple[int, int, list[int], list[int]]]:
    """Every scale as ``(side_h, side_w, tops, lefts)``; the regions are all (top, left) pairs of a scale."""
    scales = [(height, width, [0], [0])] if include_global else []
    for level in range(1, levels + 1):
        side, tops, lefts = level_grid(height, width, level, overlap)
        if side > 0:
            scales.append((side, side, tops, lefts))
    return scales


def _region_layout(scales) -> tuple[list[Interval], list[Interval], list[int], list[int]]:
    """Distinct row and column intervals, and for each region the index of its row and column interval."""
    rows: dict[Interval, int] = {}
    cols: dict[Interval, int] = {}
    region_rows, region_cols = [], []
    for side_h, side_w, tops, lefts in scales:
        for top in tops:
            for left in lefts:
                region_rows.append(rows.setdefault((top, side_h), len(rows)))
                region_cols.append(cols.setdefault((left, side_w), len(cols)))
    return list(rows), list(cols), region_rows, region_cols


def _indicator(length: int, intervals: list[Interval], like: Tensor) -> Tensor:
    """(length, n) 0/1 matrix whose column j marks interval j."""
    position = torch.arange(length, device=like.device).unsqueeze(1)
    start = torch.tensor([a for a, _ in intervals], device=like.device)
    size = torch.tensor([b for _, b in intervals], device=like.device)
    return ((position >= start) & (position < start + size)).to(like.dtype)


def region_sums(x: Tensor, rows: list[Interval], cols: list[Interval], region_rows: list[int],
                region_cols: list[int]) -> Tensor:
    """Sums of (B, C', H, W) over rectangular regions -> (B, C', R): two products with 0/1 interval matrices."""
    height, width = x.shape[-2:]
    per_col = torch.matmul(x, _indicator(width, cols, x))                                 # (B, C', H, nc)
    per_cell = torch.matmul(_indicator(height, rows, x).t(), per_col)                       # (B, C', nr, nc)
    index = torch.tensor(region_rows, device=x.device) * len(cols) + torch.tensor(region_cols, device=x.device)
    return per_cell.flatten(2).index_select(-1, index)


def _stride_and_index(offsets: list[int]) -> tuple[int, list[int]]:
    """A pooling stride that lands on every offset, and the output positions to keep: the step itself when the
    offsets are evenly spaced, else 1 (then the offsets themselves are kept)."""
    if len(offsets) == 1:
        return 1, [0]
    step = offsets[1] - offsets[0]
    if step > 0 and all(offset == offsets[0] + i * step for i, offset in enumerate(offsets)) and offsets[0] == 0:
        return step, list(range(len(offsets)))
    return 1, offsets


def region_max(x: Tensor, scales: list[tuple[int, int, list[int], list[int]]]) -> Tensor:
    """Max of (B, C, H, W) over every region of every scale -> (B, C, R), regions ordered as in the scales.

    The arg-max of every region comes from one ``max_pool2d`` per scale (region size as kernel, region spacing as
    stride; stride 1 plus a selection where the spacing is uneven) on a channels-last copy of the map, where pooling
    vectorises over channels, without autograd. The maxima are then gathered from ``x``: the backward pass is a
    single scatter into the map. No loop over regions.
    """
    with torch.no_grad():
        channels_last = x.detach().contiguous(memory_format=torch.channels_last)
        indices = []
        for side_h, side_w, tops, lefts in scales:
            stride_h, keep_h = _stride_and_index(tops)
            stride_w, keep_w = _stride_and_index(lefts)
            _, index = F.max_pool2d(channels_last, (side_h, side_w), stride=(stride_h, stride_w),
                                    return_indices=True)
            if keep_h != list(range(index.shape[2])):
                index = index.index_select(2, torch.tensor(keep_h, device=x.device))
            if keep_w != list(range(index.shape[3])):
                index = index.index_select(3, torch.tensor(keep_w, device=x.device))
            indices.append(index.flatten(2))
        index = torch.cat(indices, dim=-1)
    return x.flatten(2).gather(-1, index)


def _regional_vectors(x: Tensor, mask: Optional[Tensor], levels: int, overlap: float, include_global: bool,
                      pool: str, p: Optional[Tensor], eps: float) -> Tensor:
    """(B, C, R) region vectors (max or GeM over each region), masked positions excluded."""
    height, width = x.shape[-2:]
    scales = _scales(height, width, levels, overlap, include_global)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if pool == "max":
        if mask is not None:
            x = torch.where(mask.unsqueeze(1), x, torch.full((), float("-inf"), dtype=x.dtype, device=x.device))
        vectors = region_max(x, scales)
        if mask is not None:  # a region with no valid position pools to -inf: it contributes nothing
            vectors = torch.where(torch.isneginf(vectors), zero, vectors)
        return vectors
    layout = _region_layout(scales)
    exponent = p.to(x.dtype).view(1, -1, 1, 1) if p.numel() > 1 else p.to(x.dtype)
    powered = clamped_power(zero_masked(x, mask), exponent, eps)
    if mask is not None:
        weights = mask.unsqueeze(1).to(x.dtype)
        powered = powered * weights
        counts = region_sums(weights, *layout).round()
    else:
        rows, cols, region_rows, region_cols = layout
        counts = torch.tensor([[[rows[r][1] * cols[c][1] for r, c in zip(region_rows, region_cols)]]],
                              dtype=x.dtype, device=x.device)
    sums = region_sums(powered, *layout)
    inverse = 1.0 / (p.to(x.dtype).view(1, -1, 1) if p.numel() > 1 else p.to(x.dtype))
    means = sums / counts.clamp(min=1)
    return torch.where(counts > 0, means.clamp(min=0).pow(inverse), zero)


def rmac(x: Tensor, mask: Optional[Tensor] = None, levels: int = 3, overlap: float = 0.4,
         include_global: bool = False, pool: str = "max", p: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """R-MAC descriptor ``L2( sum_r L2(pool_r(x)) )`` over the :func:`rmac_regions` grid -> (B, C).

    ``pool="max"`` is R-MAC; ``pool="gem"`` pools each region with GeM of exponent ``p``. ``include_global`` adds the
    whole map as one more region (the cnnimageretrieval-pytorch convention; the paper's grid alone is the default).
    Without a mask the grid is laid on the whole map; see :class:`aggnets.heads.RMAC` for masks.
    """
    if pool not in ("max", "gem"):
        raise ValueError(f"rmac: pool must be 'max' or 'gem', got {pool!r}")
    if pool == "gem" and p is None:
        p = torch.tensor([3.0], device=x.device)
    vectors = _regional_vectors(accumulation_dtype(x), mask, levels, overlap, include_global, pool, p, eps)
    return l2_normalize(l2_normalize(vectors, dim=1).sum(dim=-1), dim=-1)
