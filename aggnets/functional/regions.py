"""R-MAC: regional maximum activations of convolutions (Tolias, Sicre & Jégou, ICLR 2016)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking import zero_masked
from .norm import accumulation_dtype, l2_normalize

__all__ = ["rmac_regions", "rmac", "region_pool"]

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
    regions: list[Region] = []
    for level in range(1, levels + 1):
        side, tops, lefts = level_grid(height, width, level, overlap)
        if side > 0:
            regions.extend((top, left, side) for top in tops for left in lefts)
    return regions


def region_pool(x: Tensor, side_h: int, side_w: int, tops: list[int], lefts: list[int], pool: str) -> Tensor:
    """Pool (max or sum) every ``side_h`` x ``side_w`` window at (tops x lefts) -> (B, C, len(tops) * len(lefts)).

    Separable: a stride-1 pooling along W, keep the needed columns, then along H, keep the needed rows. No Python loop
    over regions.
    """
    pool_fn = F.max_pool2d if pool == "max" else F.avg_pool2d
    left_index = torch.tensor(lefts, device=x.device)
    top_index = torch.tensor(tops, device=x.device)
    cols = pool_fn(x, kernel_size=(1, side_w), stride=1).index_select(-1, left_index)
    rows = pool_fn(cols, kernel_size=(side_h, 1), stride=1).index_select(-2, top_index)
    pooled = rows.flatten(2)
    if pool != "max":
        pooled = pooled * float(side_h * side_w)
    return pooled


def _regional_vectors(x: Tensor, mask: Optional[Tensor], levels: int, overlap: float, include_global: bool,
                      pool: str, p: Optional[Tensor], eps: float) -> Tensor:
    """(B, C, R) region vectors (max or GeM over each region), masked positions excluded."""
    height, width = x.shape[-2:]
    scales = []
    if include_global:
        scales.append((height, width, [0], [0]))
    for level in range(1, levels + 1):
        side, tops, lefts = level_grid(height, width, level, overlap)
        if side > 0:
            scales.append((side, side, tops, lefts))
    if pool == "max":
        if mask is not None:
            x = torch.where(mask.unsqueeze(1), x, torch.full((), float("-inf"), dtype=x.dtype, device=x.device))
        vectors = torch.cat([region_pool(x, sh, sw, t, l, "max") for sh, sw, t, l in scales], dim=-1)
        if mask is not None:  # a region with no valid position pools to -inf: it contributes nothing
            vectors = torch.where(torch.isneginf(vectors), torch.zeros((), dtype=x.dtype, device=x.device), vectors)
        return vectors
    exponent = p.to(x.dtype).view(1, -1, 1, 1) if p is not None and p.numel() > 1 else p
    powered = zero_masked(x, mask).clamp(min=eps).pow(exponent)
    if mask is not None:
        weights = mask.unsqueeze(1).to(x.dtype)
        powered = powered * weights
        counts = torch.cat([region_pool(weights, sh, sw, t, l, "sum") for sh, sw, t, l in scales], dim=-1).round()
    else:
        counts = torch.cat([torch.full((1, 1, len(t) * len(l)), float(sh * sw), dtype=x.dtype, device=x.device)
                            for sh, sw, t, l in scales], dim=-1)
    sums = torch.cat([region_pool(powered, sh, sw, t, l, "sum") for sh, sw, t, l in scales], dim=-1)
    inverse = 1.0 / (p.to(x.dtype).view(1, -1, 1) if p.numel() > 1 else p.to(x.dtype))
    means = sums / counts.clamp(min=1)
    return torch.where(counts > 0, means.clamp(min=0).pow(inverse), torch.zeros((), dtype=x.dtype, device=x.device))


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
