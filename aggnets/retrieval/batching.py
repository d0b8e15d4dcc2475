"""Images of different sizes in one batch: a zero canvas with each image at its top-left corner, and which positions of a
feature map belong to each image (see :mod:`aggnets.retrieval.extraction` for why masking the final map alone is
not exact, and :mod:`aggnets.retrieval.remasking` for the per-layer fix)."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["pad_batch", "feature_mask"]


def pad_batch(images: Sequence[Tensor], multiple: int = 1,
              value: Union[float, Sequence[float], Tensor] = 0.0) -> tuple[Tensor, Tensor]:
    """Stack (C, h_i, w_i) images into a (B, C, H, W) canvas, each at the top-left corner.

    ``H``, ``W`` are the largest height and width rounded up to a multiple of ``multiple``; the rest is filled with
    ``value`` (a number, or one value per channel, e.g. the normalisation mean so that the padding is 0 after
    normalisation). Returns ``(batch, image_mask)``, ``image_mask`` (B, H, W) bool, True on image pixels.
    """
    if isinstance(images, Tensor):
        images = list(images)
    if len(images) == 0:
        raise ValueError("pad_batch: no images")
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple <= 0:
        raise ValueError(f"pad_batch: multiple must be a positive int, got {multiple!r}")
    first = images[0]
    for index, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3:
            raise ValueError(f"pad_batch: image {index} must be a (C, h, w) tensor, got "
                             f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
        if image.shape[0] != first.shape[0] or image.dtype != first.dtype or image.device != first.device:
            raise ValueError(f"pad_batch: image {index} has {image.shape[0]} channels, {image.dtype} on "
                             f"{image.device}; image 0 has {first.shape[0]} channels, {first.dtype} on {first.device}")
    channels = first.shape[0]
    height = -(-max(image.shape[1] for image in images) // multiple) * multiple
    width = -(-max(image.shape[2] for image in images) // multiple) * multiple
    fill = torch.as_tensor(value, dtype=first.dtype, device=first.device).flatten()
    if fill.numel() not in (1, channels):
        raise ValueError(f"pad_batch: value must be a number or {channels} per-channel values, got {fill.numel()}")
    batch = fill.view(1, -1, 1, 1).expand(len(images), channels, height, width).clone()
    mask = torch.zeros(len(images), height, width, dtype=torch.bool, device=first.device)
    for index, image in enumerate(images):
        batch[index, :, :image.shape[1], :image.shape[2]] = image
        mask[index, :image.shape[1], :image.shape[2]] = True
    return batch, mask


def block_mask(sizes: Tensor, height: int, width: int) -> Tensor:
    """(B, height, width) bool, True on the top-left ``sizes[b]`` = (h_b, w_b) block of each map."""
    sizes = sizes.to(torch.long)
    rows = torch.arange(height, device=sizes.device).view(1, -1, 1) < sizes[:, 0].view(-1, 1, 1)
    cols = torch.arange(width, device=sizes.device).view(1, 1, -1) < sizes[:, 1].view(-1, 1, 1)
    return rows & cols


def _pair(value: Any, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"feature_mask: {name} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def feature_mask(image_mask: Tensor, feature_size: Sequence[int], *, sizes: Optional[Any] = None,
                 stride: Union[int, Sequence[int], None] = None, rule: str = "ceil") -> Tensor:
    """The (B, H', W') bool mask of the feature positions that belong to each image of a padded batch.

    ``image_mask`` (B, H, W): True on image pixels (:func:`pad_batch`); ``feature_size`` = (H', W') of the batch's
    feature map. Two ways to decide:

    * ``sizes`` (B, 2): the feature-map size ``(h'_i, w'_i)`` each image gives when extracted alone (exact for
      images placed at the top-left corner): the top-left ``h'_i x w'_i`` block is valid.
    * ``stride`` (int or (sh, sw)) and ``rule``: ``"ceil"`` keeps position (i, j) when pixel (i*sh, j*sw) is valid
      — the receptive-field centre of cell (i, j) for padded ("same") convolutions and pooling, as in ResNet,
      giving ``ceil(h / stride)`` positions; ``"floor"`` keeps it when all pixels of its cell
      ``[i*sh, (i+1)*sh) x [j*sw, (j+1)*sw)`` are valid (``floor(h / stride)``: unpadded pooling, as in VGG).
      Works for any mask shape, not only top-left rectangles.
    """
    if not isinstance(image_mask, Tensor) or image_mask.dim() != 3 or image_mask.dtype != torch.bool:
        raise ValueError("feature_mask: image_mask must be a (B, H, W) bool tensor")
    feature_height, feature_width = _pair(tuple(feature_size), "feature_size")
    batch = image_mask.shape[0]
    if sizes is not None:
        if stride is not None:
            raise ValueError("feature_mask: give sizes or stride, not both")
        sizes = torch.as_tensor(sizes, device=image_mask.device)
        if sizes.shape != (batch, 2):
            raise ValueError(f"feature_mask: sizes must have shape ({batch}, 2), got {tuple(sizes.shape)}")
        if bool((sizes[:, 0] > feature_height).any() | (sizes[:, 1] > feature_width).any() | (sizes <= 0).any()):
            raise ValueError(f"feature_mask: sizes {sizes.tolist()} must be positive and fit in the "
                             f"{feature_height}x{feature_width} feature map")
        return block_mask(sizes, feature_height, feature_width)
    if stride is None:
        raise ValueError("feature_mask: give sizes (per-image feature sizes) or stride")
    step_h, step_w = _pair(stride, "stride")
    height, width = image_mask.shape[1:]
    if rule == "ceil":
        sampled = image_mask[:, ::step_h, ::step_w][:, :feature_height, :feature_width]
    elif rule == "floor":
        cells_h, cells_w = min(feature_height, height // step_h), min(feature_width, width // step_w)
        crop = image_mask[:, :cells_h * step_h, :cells_w * step_w]
        sampled = crop.reshape(batch, cells_h, step_h, cells_w, step_w).all(dim=4).all(dim=2)
    else:
        raise ValueError(f"feature_mask: rule must be 'ceil' or 'floor', got {rule!r}")
    out = torch.zeros(batch, feature_height, feature_width, dtype=torch.bool, device=image_mask.device)
    out[:, :sampled.shape[1], :sampled.shape[2]] = sampled
    return out
