"""The backbone's class token as the descriptor (the ViT baseline every transformer head is compared with)."""
from typing import List, Optional

import torch
from torch import Tensor

from .. import functional as AF
from ..registry import register_head
from .base import HeadCapabilities, PoolingHead

__all__ = ["ClassToken"]


@register_head("class_token")
class ClassToken(PoolingHead):
    """The class token ``t`` of a vision transformer as the descriptor: ``f = t``; with ``patch_pool="mean"``,
    ``f = [t; (1/N) sum_n x_n]``, the class token beside the mean of the valid patch tokens — the feature of
    DINOv2's linear evaluation (Oquab et al., TMLR 2024) and the "DINOv2 CLS" baseline of AnyLoc (Keetha et al.,
    RA-L 2023). ``out_dim`` = C, or 2C with the patch mean.

    On a backbone without a class token (a CNN), ``t`` is the masked mean of the map (:class:`PoolingHead`), so the
    head is SPoC there.
    """

    capabilities = HeadCapabilities(global_token="optional", orderless=True)
    patch_pool: Optional[str]

    def __init__(self, in_channels: int, patch_pool: Optional[str] = None) -> None:
        if patch_pool not in (None, "mean"):
            raise ValueError(f"ClassToken: patch_pool must be None or 'mean', got {patch_pool!r}")
        super().__init__(in_channels, in_channels * (2 if patch_pool == "mean" else 1))
        self.patch_pool = patch_pool

    def pool_token(self, x: Tensor, mask: Optional[Tensor], token: Tensor) -> Tensor:
        token = AF.accumulation_dtype(token)
        if self.patch_pool is None:
            return token
        return torch.cat([token, AF.spoc(x, mask).to(token.dtype)], dim=1)

    def _options(self) -> List[str]:
        return [f"patch_pool={self.patch_pool!r}"]
