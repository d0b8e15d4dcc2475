"""CosPlace / EigenPlaces head (Berton, Masone & Caputo, CVPR 2022; Berton et al., ICCV 2023): L2 over channels at
every position, GeM, a linear layer, L2."""
from typing import Optional

import torch
from torch import Tensor

from .masking import zero_masked
from .norm import accumulation_dtype, l2_normalize
from .pooling import gem

__all__ = ["cosplace"]


def cosplace(x: Tensor, p: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float = 1e-6,
             mask: Optional[Tensor] = None) -> Tensor:
    """``f = L2( W GeM_p( x_n / ||x_n|| ) + b )``: every local descriptor L2-normalised over the channels, GeM over
    the (valid) positions (``max(., eps)^p``, ``p`` a (1,) or (C,) tensor), ``Linear(C -> D)``, L2. Masked positions
    are ignored exactly."""
    x = zero_masked(accumulation_dtype(x), mask)
    pooled = gem(l2_normalize(x, dim=1), p, eps, mask)                  # (B, C), each entry in [eps, 1]
    projected = torch.nn.functional.linear(pooled, weight, bias)        # bounded input: no float16 range issue
    return l2_normalize(projected.to(pooled.dtype), dim=-1)
