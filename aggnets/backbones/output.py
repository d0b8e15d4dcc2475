"""What a backbone hands to the head."""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

__all__ = ["BackboneOutput"]


class BackboneOutput(NamedTuple):
    """``map`` (B, C, H, W): the local descriptors; ``token`` (B, C): the global (class) token of a vision
    transformer, None for a CNN; ``mask`` (B, H, W) bool: the positions that belong to each image of a padded batch
    (``extract(images, sizes=...)``), None when every position is valid."""

    map: Tensor
    token: Optional[Tensor] = None
    mask: Optional[Tensor] = None
