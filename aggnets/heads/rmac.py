"""R-MAC: regional maximum activations of convolutions."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as AF
from ..registry import register_head
from .base import HeadCapabilities, PoolingHead, check_positive_int

__all__ = ["RMAC"]


@register_head("rmac")
class RMAC(PoolingHead):
    """R-MAC (Tolias, Sicre & Jégou, ICLR 2016): ``L2( sum_r L2( pool_r(x) ) )`` over square regions at
    ``levels`` scales (see :func:`aggnets.functional.rmac_regions`: side ``floor(2 min(H, W)/(l + 1))``, ~40 %
    overlap, any aspect ratio).

    ``pool="max"`` (the paper) or ``"gem"`` (regional GeM with a trainable ``p``). ``include_global=False`` follows
    the paper's grid; ``True`` adds the whole map as one more region, as cnnimageretrieval-pytorch does. With a
    mask, the grid is laid on the bounding box of each image's valid positions, so a padded image gives the
    descriptor of the unpadded one. Vectorised: one separable pooling per scale, no loop over regions.
    Under ``torch.export`` (ONNX) the grid is computed with tensors from H, W
    (:func:`aggnets.functional.regions.rmac_region_vectors_dynamic`), so the exported graph takes any H x W (without
    a mask).

    Capabilities: the masked form crops each image to its valid box (data-dependent sizes): not one graph under
    ``torch.compile``, no mask at export; the region code is outside the TorchScript subset (use ``torch.jit.trace``
    at a fixed size, or ``torch.compile``).
    """

    capabilities = HeadCapabilities(fullgraph=False, scriptable=False, l2_output=True)

    def __init__(self, in_channels: int, levels: int = 3, overlap: float = 0.4, include_global: bool = False,
                 pool: str = "max", p: float = 3.0, learn_p: bool = True, eps: float = 1e-6) -> None:
        super().__init__(in_channels, in_channels)
        if pool not in ("max", "gem"):
            raise ValueError(f"RMAC: pool must be 'max' or 'gem', got {pool!r}")
        self.levels = check_positive_int("RMAC", "levels", levels)
        self.overlap = overlap
        self.include_global = include_global
        self.pool_type = pool
        self.eps = eps
        self.p = nn.Parameter(torch.tensor([float(p)]), requires_grad=learn_p) if pool == "gem" else None

    def _rmac(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return AF.rmac(x, mask, self.levels, self.overlap, self.include_global, self.pool_type, self.p, self.eps)

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        if mask is None:
            return self._rmac(x, None)
        if torch.compiler.is_exporting():
            raise ValueError("RMAC: cannot export with a mask (the grid follows each image's valid bounding box, which "
                             "depends on the data); export without a mask")
        return AF.map_valid_boxes(self._rmac, x, mask)

    def _options(self) -> list[str]:
        options = [f"levels={self.levels}", f"overlap={self.overlap}", f"include_global={self.include_global}",
                   f"pool={self.pool_type!r}"]
        if self.p is not None:
            options.append(f"p={self.p.item():.4g}")
        return options
