"""Input validation shared by every head: one clear error naming the argument."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["check_feature_map", "is_tracing"]


def is_tracing() -> bool:
    """True under ``torch.compile``/``torch.export``/tracing, where data-dependent checks are skipped."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    return torch.compiler.is_compiling()


def check_feature_map(x: Tensor, mask: Optional[Tensor] = None, in_channels: Optional[int] = None,
                      name: str = "head") -> None:
    """Validate a feature map ``x`` (B, C, H, W) and an optional boolean ``mask`` (B, H, W).

    Raises ``TypeError`` for wrong types/dtypes and ``ValueError`` for wrong shapes, an empty batch or map, a channel
    count different from ``in_channels``, or an image whose mask has no valid (True) position.
    Non-finite values are not checked (that would synchronise with the device); they propagate to the output unless
    masked out.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be 4-D (B, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    if in_channels is not None and channels != in_channels:
        raise ValueError(f"{name}: x has {channels} channels but the head was built with in_channels={in_channels}"
                         f" (x shape {tuple(x.shape)})")
    if batch == 0:
        raise ValueError(f"{name}: x has an empty batch (B=0), shape {tuple(x.shape)}")
    if height == 0 or width == 0:
        raise ValueError(f"{name}: x has an empty spatial map (H={height}, W={width}), shape {tuple(x.shape)}")
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: mask must be a bool torch.Tensor of shape (B, H, W), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: mask must have dtype torch.bool (True = valid position), got {mask.dtype}")
    if tuple(mask.shape) != (batch, height, width):
        raise ValueError(f"{name}: mask must have shape (B, H, W) = {(batch, height, width)} to match x, "
                         f"got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{name}: mask is on {mask.device} but x is on {x.device}")
    if not is_tracing():
        empty = ~mask.flatten(1).any(dim=1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(f"{name}: mask has no valid (True) position for batch item(s) {rows}; "
                             "an image needs at least one valid position")
