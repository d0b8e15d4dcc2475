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

__all__ = ["rmac_regions", "rmac", "region_max", "region_sums", "rmac_region_vectors_dynamic"]

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


Scale = tuple[int, int, list[int], list[int]]  # (side_h, side_w, tops, lefts)


def _region_argmax(x: Tensor, scales: list[Scale]) -> Tensor:
    """Flat (h W + w) position of the maximum of every region of (B, C, H, W) -> (B, C, R) int64, without autograd.

    One ``max_pool2d`` per scale (region size as kernel, region spacing as stride; stride 1 plus a selection where the
    spacing is uneven) on a channels-last copy of the map, where pooling vectorises over channels.
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
        return torch.cat(indices, dim=-1)


def _encode_scales(scales: list[Scale]) -> list[int]:
    """The scales as one flat int list ``[side_h, side_w, n_tops, *tops, n_lefts, *lefts, ...]`` (a custom-op
    argument)."""
    flat: list[int] = []
    for side_h, side_w, tops, lefts in scales:
        flat += [side_h, side_w, len(tops), *tops, len(lefts), *lefts]
    return flat


def _decode_scales(flat: list[int]) -> list[Scale]:
    """The inverse of :func:`_encode_scales`."""
    scales, i = [], 0
    while i < len(flat):
        side_h, side_w, n_tops = flat[i:i + 3]
        tops = list(flat[i + 3:i + 3 + n_tops])
        i += 3 + n_tops
        lefts = list(flat[i + 1:i + 1 + flat[i]])
        i += 1 + flat[i]
        scales.append((side_h, side_w, tops, lefts))
    return scales


@torch.library.custom_op("aggnets::rmac_region_argmax", mutates_args=())
def _region_argmax_op(x: Tensor, layout: list[int]) -> Tensor:
    """:func:`_region_argmax` as an opaque operator for ``torch.compile``: inductor would otherwise decompose the
    channels-last pooling into a per-(b, c) arg-max loop over every window, ~2x slower than the ATen kernel."""
    return _region_argmax(x, _decode_scales(layout))


@_region_argmax_op.register_fake
def _(x: Tensor, layout: list[int]) -> Tensor:
    count = sum(len(tops) * len(lefts) for _, _, tops, lefts in _decode_scales(layout))
    return x.new_empty((x.shape[0], x.shape[1], count), dtype=torch.long)


def region_max(x: Tensor, scales: list[Scale]) -> Tensor:
    """Max of (B, C, H, W) over every region of every scale -> (B, C, R), regions ordered as in the scales.

    The arg-max of every region comes from :func:`_region_argmax` (one channels-last ``max_pool2d`` per scale,
    without autograd); the maxima are then gathered from ``x``: the backward pass is a single scatter into the map.
    No loop over regions. Under ``torch.compile`` (not ``torch.export``) the arg-max runs as the opaque operator
    ``aggnets::rmac_region_argmax`` and only the gather and what follows are compiled.
    """
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        index = torch.ops.aggnets.rmac_region_argmax(x.detach(), _encode_scales(scales))
    else:
        index = _region_argmax(x, scales)
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


# ----------------------------------------------------------------------------------------------------------------------
# The same grid computed with tensors from the symbolic H, W: one exported graph for every H x W (torch.export / ONNX).

MAX_EXTRA = 6  # e in 1..6 regions added along the long side


def symbolic_layout(x: Tensor) -> bool:
    """Whether ``torch.export`` (hence the ONNX dynamo exporter) traces ``x`` with a symbolic H or W: then the layout
    is computed with tensors instead of Python ints, so that the exported graph does not fix H and W."""
    return torch.compiler.is_exporting() and not all(isinstance(n, int) for n in x.shape[-2:])


def _extra_regions_tensor(height: Tensor, width: Tensor, overlap: float) -> Tensor:
    """:func:`_extra_regions` on 0-d int64 tensors: ``e = 1 + argmin_{s=2..7} |(w^2 - w b_s)/w^2 - overlap|`` with
    ``w = min(H, W)``, ``b_s = (max(H, W) - w)/(s - 1)``; 0 when H = W.

    Evaluated in float64 in the same order as the Python version, so ties resolve identically (first minimum).
    """
    short = torch.minimum(height, width).double()
    long_side = torch.maximum(height, width).double()
    steps = torch.arange(2, MAX_EXTRA + 2, dtype=torch.float64, device=height.device)
    step = (long_side - short) / (steps - 1)
    errors = ((short * short - short * step) / (short * short) - overlap).abs()
    extra = errors.argmin() + 1
    return torch.where(height == width, torch.zeros_like(extra), extra)


def _offsets_tensor(length: Tensor, side: Tensor, count: Tensor, max_count: int) -> tuple[Tensor, Tensor]:
    """:func:`_offsets` padded to ``max_count``: ``(floor(i (L - s)/(n - 1)), i < n)`` for i < max_count (0 when
    n = 1)."""
    i = torch.arange(max_count, dtype=torch.float64, device=length.device)
    step = (length - side).double() / (count - 1).clamp(min=1).double()
    offsets = torch.where(count > 1, torch.floor(i * step), torch.zeros_like(i)).long()
    return offsets, i < count


def level_grid_tensor(height: Tensor, width: Tensor, level: int, extra: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`level_grid` with tensors and a fixed number of rows and columns, ``level + 6`` each.

    Returns ``(side, tops, top_valid, lefts, left_valid)``: region (i, j) exists iff ``top_valid[i] & left_valid[j]``
    and ``side > 0``.
    """
    side = (2 * torch.minimum(height, width)) // (level + 1)
    zero = torch.zeros_like(extra)
    rows = level + torch.where(height > width, extra, zero)
    cols = level + torch.where(width > height, extra, zero)
    tops, top_valid = _offsets_tensor(height, side, rows, level + MAX_EXTRA)
    lefts, left_valid = _offsets_tensor(width, side, cols, level + MAX_EXTRA)
    return side, tops, top_valid, lefts, left_valid


def _interval_masks(length: int, starts: Tensor, size: Tensor) -> Tensor:
    """(n, length) bool: row r marks positions ``starts[r] <= t < starts[r] + size``."""
    position = torch.arange(length, device=starts.device)
    return (position >= starts.unsqueeze(1)) & (position < (starts + size).unsqueeze(1))


def _interval_max(x: Tensor, inside: Tensor, dim: int) -> Tensor:
    """``max_{t : inside[r, t]} x`` along ``dim`` for every interval r (-inf for an empty one), stacked at ``dim``.

    A loop over the (fixed) number of intervals: each step is one masked ``amax`` of the size of ``x``.
    """
    view = [1] * x.dim()
    view[dim] = -1
    minus_inf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    return torch.stack([torch.where(row.view(view), x, minus_inf).amax(dim=dim) for row in inside.unbind(0)], dim=dim)


def _level_vectors(x: Tensor, powered: Optional[Tensor], height: Tensor, width: Tensor, level: int, extra: Tensor,
                   p: Optional[Tensor]) -> Tensor:
    """(B, C, (l + 6)^2) vectors of the l-th scale, zero for the regions that do not exist at this H x W.

    Max: separable, ``max_{rows of r} max_{cols of c} x``. GeM: ``(I_r^T powered I_c / s^2)^(1/p)`` with 0/1 interval
    matrices ``I``.
    """
    side, tops, top_valid, lefts, left_valid = level_grid_tensor(height, width, level, extra)
    row_inside = _interval_masks(x.shape[-2], tops, side)
    col_inside = _interval_masks(x.shape[-1], lefts, side)
    if powered is None:
        vectors = _interval_max(_interval_max(x, row_inside, dim=-2), col_inside, dim=-1)
    else:
        per_col = torch.matmul(powered, col_inside.t().to(x.dtype))
        sums = torch.matmul(row_inside.to(x.dtype), per_col)
        means = sums / (side * side).clamp(min=1).to(x.dtype)
        vectors = means.clamp(min=0).pow(_inverse(p, x.dtype, 4))
    valid = (top_valid.unsqueeze(1) & left_valid.unsqueeze(0)) & (side > 0)
    return torch.where(valid, vectors, torch.zeros((), dtype=x.dtype, device=x.device)).flatten(2)


def _inverse(p: Tensor, dtype: torch.dtype, dims: int) -> Tensor:
    """``1/p`` shaped to broadcast over a ``dims``-D (B, C, ...) tensor (per-channel ``p`` or one ``p``)."""
    inverse = 1.0 / p.to(dtype)
    return inverse.view(1, -1, *[1] * (dims - 2)) if p.numel() > 1 else inverse


def rmac_region_vectors_dynamic(x: Tensor, levels: int = 3, overlap: float = 0.4, include_global: bool = False,
                                pool: str = "max", p: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """The R-MAC region vectors (B, C, R_max) of (B, C, H, W) with the grid computed by tensor arithmetic on H, W.

    Same values as the Python grid (:func:`rmac_regions`) in the same order, with zero vectors at the padding: scale
    l holds ``(l + 6)^2`` slots (``l + e`` regions along the long side, e <= 6) of which the absent ones are zero, so
    that ``sum_r L2(v_r)`` is unchanged. No Python value depends on H or W: ``torch.export`` records one graph for
    every size. No mask (the masked R-MAC lays its grid on data-dependent boxes).
    """
    height = torch.scalar_tensor(x.shape[-2], dtype=torch.long, device=x.device)
    width = torch.scalar_tensor(x.shape[-1], dtype=torch.long, device=x.device)
    extra = _extra_regions_tensor(height, width, overlap)
    powered = None
    if pool == "gem":
        exponent = p.to(x.dtype).view(1, -1, 1, 1) if p.numel() > 1 else p.to(x.dtype)
        powered = clamped_power(x, exponent, eps)
    vectors = []
    if include_global:
        whole = x.amax(dim=(-2, -1)) if powered is None else powered.mean(dim=(-2, -1)).clamp(min=0).pow(
            _inverse(p, x.dtype, 2))
        vectors.append(whole.unsqueeze(-1))
    for level in range(1, levels + 1):
        vectors.append(_level_vectors(x, powered, height, width, level, extra, p))
    return torch.cat(vectors, dim=-1)


def rmac(x: Tensor, mask: Optional[Tensor] = None, levels: int = 3, overlap: float = 0.4,
         include_global: bool = False, pool: str = "max", p: Optional[Tensor] = None, eps: float = 1e-6,
         dynamic: Optional[bool] = None) -> Tensor:
    """R-MAC descriptor ``L2( sum_r L2(pool_r(x)) )`` over the :func:`rmac_regions` grid -> (B, C).

    ``pool="max"`` is R-MAC; ``pool="gem"`` pools each region with GeM of exponent ``p``. ``include_global`` adds the
    whole map as one more region (the cnnimageretrieval-pytorch convention; the paper's grid alone is the default).
    Without a mask the grid is laid on the whole map; see :class:`aggnets.heads.RMAC` for masks.
    ``dynamic`` (default: only under ``torch.export`` with a symbolic H or W) computes the grid with tensors
    (:func:`rmac_region_vectors_dynamic`, same result) so that an exported graph takes any H x W; not with a mask.
    """
    if pool not in ("max", "gem"):
        raise ValueError(f"rmac: pool must be 'max' or 'gem', got {pool!r}")
    if pool == "gem" and p is None:
        p = torch.tensor([3.0], device=x.device)
    if dynamic is None:
        dynamic = symbolic_layout(x)
    if dynamic and mask is not None:
        raise ValueError("rmac: the tensor-computed (export) grid takes no mask; a masked R-MAC lays its grid on "
                         "each image's valid bounding box, which depends on the data")
    if dynamic:
        vectors = rmac_region_vectors_dynamic(accumulation_dtype(x), levels, overlap, include_global, pool, p, eps)
    else:
        vectors = _regional_vectors(accumulation_dtype(x), mask, levels, overlap, include_global, pool, p, eps)
    return l2_normalize(l2_normalize(vectors, dim=1).sum(dim=-1), dim=-1)
