"""Decoding image files into RGB the same way everywhere, and the policy for files that cannot be decoded.

:func:`to_rgb` handles every PIL mode: grayscale and palette images are expanded, CMYK is converted, 16-bit and
32-bit integer images (``I;16``, ``I``) are scaled from 0..65535 to 0..255 (``Image.convert`` would clip them to
white), float images (``F``) are clipped to 0..255, and transparency (``RGBA``, ``LA``, ``PA``, palette
transparency) is composited onto white. :func:`open_rgb` adds the file handling: JPEGs far larger than needed are
decoded at a reduced scale (``Image.draft``), PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is
respected, and every failure is an :class:`UnreadableImageError` naming the file.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Union

import numpy as np
from PIL import Image

__all__ = ["UnreadableImageError", "open_rgb", "to_rgb", "BAD_IMAGE_POLICIES"]

BAD_IMAGE_POLICIES = ("skip", "raise")
BACKGROUND = (255, 255, 255)


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (missing, empty, truncated, corrupt, not an image, too large)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB (see the module docstring for each mode)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if mode != "F":
            array = array / 257.0  # 16-bit range onto 8 bits: 65535 -> 255
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info) or (
            mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: Union[str, os.PathLike], min_size: Optional[int] = None) -> Image.Image:
    """Decode ``path`` into an RGB image; ``min_size``: the shorter side the caller needs at least (JPEGs may then be
    decoded at 1/2, 1/4 or 1/8 scale, never below it). Raises :class:`UnreadableImageError` naming the file."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            # under PIL's hard limit (2 x MAX_IMAGE_PIXELS) a large image is decoded; above it, it is an error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if min_size is not None and image.format == "JPEG" and min(image.size) > 2 * min_size:
                    factor = min_size / min(image.size)  # draft keeps the decoded size >= the requested one
                    image.draft(image.mode, (math.ceil(image.width * factor), math.ceil(image.height * factor)))
                image.load()
                return to_rgb(image)
    except FileNotFoundError as error:
        raise UnreadableImageError(f"image file {path!r} does not exist") from error
    except Image.DecompressionBombError as error:
        raise UnreadableImageError(f"image file {path!r} is too large to decode safely ({error}); raise "
                                   "PIL.Image.MAX_IMAGE_PIXELS to allow it") from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:  # PIL raises all of these for bad files
        reason = "is empty (0 bytes)" if _is_empty(path) else f"cannot be decoded ({type(error).__name__}: {error})"
        raise UnreadableImageError(f"image file {path!r} {reason}") from error


def _is_empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False
