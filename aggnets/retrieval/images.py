"""Reading images for retrieval: any file to a float32 (3, h, w) RGB tensor in [0, 1], cropped to a box, at its native
aspect ratio (longer side ``max_size``) or at a fixed size."""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_image", "RESAMPLE_METHODS"]

PathLike = Union[str, os.PathLike]
BBox = Sequence[float]


def check_max_size(max_size: Optional[int]) -> None:
    if max_size is not None and (not isinstance(max_size, int) or isinstance(max_size, bool) or max_size <= 0):
        raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")


def crop_box(bbox: Optional[BBox], width: int, height: int, what: str) -> Optional[tuple[int, int, int, int]]:
    """``bbox`` (x1, y1, x2, y2) in pixels, rounded to ints (as PIL's crop does) and checked to lie in the image."""
    if bbox is None:
        return None
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: bbox must be 4 numbers (x1, y1, x2, y2), got {bbox!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: bbox must be 4 finite numbers (x1, y1, x2, y2), got {bbox!r}")
    x1, y1, x2, y2 = (int(round(v)) for v in values)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"{what}: bbox {tuple(bbox)} (x1, y1, x2, y2) does not lie inside the {width}x{height} "
                         f"(width x height) image, or is empty: need 0 <= x1 < x2 <= {width} and "
                         f"0 <= y1 < y2 <= {height} after rounding")
    return x1, y1, x2, y2


def resized(height: int, width: int, max_size: Optional[int], upscale: bool) -> tuple[int, int]:
    """(height, width) with the longer side ``max_size`` and the aspect ratio kept."""
    longer = max(height, width)
    if max_size is None or longer == max_size or (longer < max_size and not upscale):
        return height, width
    factor = max_size / longer
    return max(1, round(height * factor)), max(1, round(width * factor))


RESAMPLE_METHODS = ("bicubic", "bilinear")


def check_size(size: Any) -> Optional[tuple[int, int]]:
    if size is None:
        return None
    values = list(size) if isinstance(size, (list, tuple)) or hasattr(size, "__len__") else None
    if values is None or len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                      for v in values):
        raise ValueError(f"size must be None or (height, width), two positive ints, got {size!r}")
    return int(values[0]), int(values[1])


def check_resample(resample: str) -> str:
    if resample not in RESAMPLE_METHODS:
        raise ValueError(f"resample must be one of {RESAMPLE_METHODS}, got {resample!r}")
    return resample


def check_file(path: PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    return path


def load_image(path: PathLike, max_size: Optional[int] = 1024, bbox: Optional[BBox] = None, *,
               upscale: bool = True, size: Optional[Sequence[int]] = None, resample: str = "bicubic") -> Tensor:
    """An image file as a float32 (3, h, w) tensor in [0, 1], at its native aspect ratio.

    Any PIL mode is converted to RGB by :func:`aggnets.data.decode.to_rgb` (16-bit scaled to 8 bits, transparency
    composited onto white); a file that cannot be decoded raises :class:`~aggnets.data.decode.UnreadableImageError`.
    ``bbox`` = (x1, y1, x2, y2) in the original pixel coordinates (rounded to ints, as PIL does) crops the image
    *before* resizing (the revisited Oxford/Paris protocol crops the queries). The image (or crop) is then resized,
    antialiased (PIL, ``resample`` "bicubic" or "bilinear"), so that its longer side is ``max_size`` (``None``: no
    resizing; ``upscale=False``: smaller images keep their size); or, with ``size`` = (h, w), to exactly that size
    whatever its aspect ratio (the place-recognition papers' evaluation: 320 x 320, 322 x 322; ``max_size`` ignored).
    EXIF orientation tags are ignored (as the retrieval benchmarks do).
    """
    from PIL import Image

    from ..data.decode import open_rgb

    check_max_size(max_size)
    size = check_size(size)
    method = check_resample(resample)
    path = check_file(path)
    image = open_rgb(path)  # any mode to RGB (16-bit scaled, alpha on white); UnreadableImageError names the file
    box = crop_box(bbox, image.width, image.height, path)
    if box is not None:
        image = image.crop(box)
    height, width = size or resized(image.height, image.width, max_size, upscale)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), getattr(Image.Resampling, method.upper()))
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def image_size(path: str, bbox: Optional[BBox], max_size: Optional[int], upscale: bool,
                size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """The (h, w) that :func:`load_image` will return, read from the file header (no decoding)."""
    from PIL import Image

    if size is not None:
        return size
    with Image.open(path) as image:
        width, height = image.size
    box = crop_box(bbox, width, height, path)
    if box is not None:
        width, height = box[2] - box[0], box[3] - box[1]
    return resized(height, width, max_size, upscale)
