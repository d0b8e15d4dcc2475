"""Helpers that make masked positions vanish exactly, and that run a region-based pooling per valid box."""

from typing import Callable, Optional

import torch
from torch import Tensor

from .checks import is_tracing

__all__ = ["zero_masked", "flatten_positions", "valid_boxes", "map_valid_boxes"]


def zero_masked(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``x`` (B, C, H, W) with positions where ``mask`` (B, H, W) is False set to 0 (so NaN/Inf there cannot leak into
    values or gradients through later non-linearities)."""
    if mask is None:
        return x
    return torch.where(mask.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def flatten_positions(x: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """(B, C, H, W) -> descriptors ``X`` (B, C, N) with masked positions set to exactly zero.

    Returns ``(X, weights, counts)``: ``weights`` (B, 1, N) is 1 at valid positions and 0 elsewhere (``None`` without a
    mask) and ``counts`` (B, 1) the number of valid positions N_b, in X's dtype.
    """
    flat = x.flatten(2)
    if mask is None:
        if is_tracing():  # N from the graph's shape, not a Python constant (ONNX / torch.export with dynamic H, W)
            counts = torch.ones_like(flat[:, :1, :]).sum(dim=-1)
        else:
            counts = torch.full((x.shape[0], 1), float(flat.shape[-1]), dtype=flat.dtype, device=flat.device)
        return flat, None, counts
    valid = mask.flatten(1).unsqueeze(1)
    flat = torch.where(valid, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
    weights = valid.to(flat.dtype)
    return flat, weights, weights.sum(dim=-1)


def valid_boxes(mask: Tensor) -> list[tuple[int, int, int, int]]:
    """Bounding box ``(top, left, bottom, right)`` (exclusive ends) of the True positions of each mask (B, H, W)."""
    rows = mask.any(dim=2)
    cols = mask.any(dim=1)
    height, width = mask.shape[1:]
    top = rows.int().argmax(dim=1)
    bottom = height - rows.flip(1).int().argmax(dim=1)
    left = cols.int().argmax(dim=1)
    right = width - cols.flip(1).int().argmax(dim=1)
    return [tuple(b) for b in torch.stack([top, left, bottom, right], dim=1).tolist()]


def map_valid_boxes(fn: Callable[[Tensor, Optional[Tensor]], Tensor], x: Tensor, mask: Tensor) -> Tensor:
    """Apply ``fn(x_crop, mask_crop)`` with each image cropped to the bounding box of its valid positions.

    Geometry-aware poolings (R-MAC regions, pyramid cells) lay their grid on the image, not on the padding, so a padded
    image gives the same descriptor as the unpadded one. Images sharing a box are processed together (one call per
    distinct box); ``mask_crop`` is ``None`` when the crop is entirely valid.
    """
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for index, box in enumerate(valid_boxes(mask)):
        groups.setdefault(box, []).append(index)
    if len(groups) == 1:
        (top, left, bottom, right), = groups
        crop_mask = mask[:, top:bottom, left:right]
        return fn(x[:, :, top:bottom, left:right], None if bool(crop_mask.all()) else crop_mask)
    outputs: list[Tensor] = []
    order: list[int] = []
    for (top, left, bottom, right), members in groups.items():
        index = torch.tensor(members, device=x.device)
        crop_mask = mask.index_select(0, index)[:, top:bottom, left:right]
        crop = x.index_select(0, index)[:, :, top:bottom, left:right]
        outputs.append(fn(crop, None if bool(crop_mask.all()) else crop_mask))
        order.extend(members)
    stacked = torch.cat(outputs, dim=0)
    inverse = torch.empty(len(order), dtype=torch.long, device=x.device)
    inverse[torch.tensor(order, device=x.device)] = torch.arange(len(order), device=x.device)
    return stacked.index_select(0, inverse)
