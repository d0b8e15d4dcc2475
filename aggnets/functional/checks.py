"""Input validation shared by every head: one clear error naming the argument.

Written in the TorchScript subset (a scripted head runs the same checks); the messages are the same in both.
"""
from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["check_feature_map", "check_head_input", "is_tracing"]


def is_tracing() -> bool:
    """True under ``torch.compile``/``torch.export``/tracing, where data-dependent checks are skipped."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    return torch.compiler.is_compiling()


def _shape(x: Tensor) -> str:
    """``str(tuple(x.shape))``, e.g. ``(2, 3)`` or ``(5,)``, written so that TorchScript gives the same text."""
    sizes = [str(size) for size in x.shape]
    return "(" + sizes[0] + ",)" if len(sizes) == 1 else "(" + ", ".join(sizes) + ")"


def _check_is_tensor(value: object, name: str, expected: str) -> None:
    """``TypeError`` unless ``value`` is a tensor (eager only: a TorchScript signature already enforces it)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: {expected}, got {type(value).__name__}")


def check_feature_map(x: Tensor, mask: Optional[Tensor] = None, in_channels: Optional[int] = None,
                      name: str = "head") -> None:
    """Validate a feature map ``x`` (B, C, H, W) and an optional boolean ``mask`` (B, H, W).

    Raises ``TypeError`` for wrong types/dtypes and ``ValueError`` for wrong shapes, an empty batch or map, a channel
    count different from ``in_channels``, or an image whose mask has no valid (True) position.
    Non-finite values are not checked (that would synchronise with the device); they propagate to the output unless
    masked out. Under TorchScript the dtypes in the messages print as TorchScript's dtype numbers.
    """
    if not torch.jit.is_scripting():
        _check_is_tensor(x, name, "x must be a torch.Tensor of shape (B, C, H, W)")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be 4-D (B, C, H, W), got {x.dim()}-D with shape {_shape(x)}")
    batch, channels, height, width = x.shape
    if in_channels is not None and channels != in_channels:
        raise ValueError(f"{name}: x has {channels} channels but the head was built with in_channels={in_channels}"
                         f" (x shape {_shape(x)})")
    if batch == 0:
        raise ValueError(f"{name}: x has an empty batch (B=0), shape {_shape(x)}")
    if height == 0 or width == 0:
        raise ValueError(f"{name}: x has an empty spatial map (H={height}, W={width}), shape {_shape(x)}")
    if mask is not None:
        _check_mask(mask, x, name)


def _check_mask(mask: Tensor, x: Tensor, name: str) -> None:
    if not torch.jit.is_scripting():
        _check_is_tensor(mask, name, "mask must be a bool torch.Tensor of shape (B, H, W)")
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: mask must have dtype torch.bool (True = valid position), got {mask.dtype}")
    if list(mask.shape) != [batch, height, width]:
        raise ValueError(f"{name}: mask must have shape (B, H, W) = {(batch, height, width)} to match x, "
                         f"got {_shape(mask)}")
    if mask.device != x.device:
        raise ValueError(f"{name}: mask is on {mask.device} but x is on {x.device}")
    # data-dependent (a device sync): skipped where a graph is captured, kept in a scripted module
    if torch.jit.is_scripting() or not is_tracing():
        empty = ~mask.flatten(1).any(dim=1)
        if bool(empty.any()):
            rows: List[int] = empty.nonzero().flatten().tolist()
            raise ValueError(f"{name}: mask has no valid (True) position for batch item(s) {rows}; "
                             "an image needs at least one valid position")


def check_head_input(x: Tensor, mask: Optional[Tensor], token: Optional[Tensor], name: str, takes_mask: bool,
                     token_use: int, fixed_h: int, fixed_w: int, size_hint: str) -> None:
    """Check ``x`` / ``mask`` / ``token`` against what a head declares it takes (``HeadCapabilities``): a mask only
    if ``takes_mask``; the map size ``fixed_h`` x ``fixed_w`` when non-zero (``size_hint`` says how to build the head
    for another size); a (B, C) floating ``token`` when ``token_use`` is 2 (required), allowed when 1, refused when
    0. ``ValueError`` / ``TypeError`` naming the argument."""
    if mask is not None and not takes_mask:
        raise ValueError(f"{name}: this head does not take a mask (its output depends on every position); pass "
                         "mask=None, or use same-size batches instead of padding")
    if fixed_h > 0 and (x.shape[2] != fixed_h or x.shape[3] != fixed_w):
        raise ValueError(f"{name}: the head was built for {fixed_h}x{fixed_w} maps but x is "
                         f"{x.shape[2]}x{x.shape[3]} (shape {_shape(x)}); build it for this size ({size_hint})")
    if token is None:
        if token_use == 2:
            raise ValueError(f"{name}: this head needs the backbone's global token: call head(x, mask, token) with a "
                             "(B, C) token, or use it inside aggnets.Embedder (which passes the class token of a ViT "
                             "backbone, or the masked mean of a CNN map)")
        return
    if token_use == 0:
        raise ValueError(f"{name}: this head does not take a global token; call it as head(x, mask)")
    if not torch.jit.is_scripting():
        _check_is_tensor(token, name, "token must be a torch.Tensor of shape (B, C)")
    if not token.is_floating_point():
        raise TypeError(f"{name}: token must be a floating-point tensor, got {token.dtype}")
    if token.dim() != 2 or token.shape[0] != x.shape[0] or token.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: token must have shape (B, C) = {(x.shape[0], x.shape[1])} to match x, "
                         f"got {_shape(token)}")
    if token.device != x.device:
        raise ValueError(f"{name}: token is on {token.device} but x is on {x.device}")
