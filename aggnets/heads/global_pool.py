"""Global poolings: MAC, SPoC, GeM, CroW — one C-dimensional vector per image."""
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .. import functional as AF
from ..registry import register_head
from .base import HeadCapabilities, PoolingHead

__all__ = ["MAC", "SPoC", "GeM", "CroW"]


class _GlobalPool(PoolingHead):
    capabilities = HeadCapabilities(orderless=True)

    def __init__(self, in_channels: int, normalize: bool = False) -> None:
        super().__init__(in_channels, in_channels)
        self.normalize = normalize

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        pooled = self._pool(x, mask)
        return AF.l2_normalize(pooled, dim=-1) if self.normalize else pooled

    def _pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def _options(self) -> list[str]:
        return [f"normalize={self.normalize}"] if self.normalize else []


@register_head("mac")
class MAC(_GlobalPool):
    """Maximum activation of convolutions (Tolias et al., ICLR 2016): ``f_c = max_n x_{n,c}``.

    ``normalize=True`` L2-normalises the output.
    """

    def _pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return AF.mac(x, mask)


@register_head("spoc")
class SPoC(_GlobalPool):
    """Sum-pooled convolutional features (Babenko & Lempitsky, ICCV 2015): ``f = (1/N) sum_n x_n``."""

    def _pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return AF.spoc(x, mask)


@register_head("gem")
class GeM(_GlobalPool):
    """Generalised-mean pooling (Radenović, Tolias & Chum, TPAMI 2018).

    ``f_c = ( (1/N) sum_n max(x_{n,c}, eps)^p )^{1/p}`` with a trainable exponent ``p`` (init 3), shared
    (``per_channel=False``, shape (1,)) or one per channel (shape (C,)). p = 1 is SPoC; p -> inf tends to MAC.
    """

    capabilities = HeadCapabilities(orderless=True, internals=("p",))
    eps: float  # annotated: an int value still scripts (as a float)

    def __init__(self, in_channels: int, p: float = 3.0, per_channel: bool = False, learn_p: bool = True,
                 eps: float = 1e-6, normalize: bool = False) -> None:
        super().__init__(in_channels, normalize)
        if p <= 0:
            raise ValueError(f"GeM: p must be positive, got {p}")
        self.p = nn.Parameter(torch.full((in_channels if per_channel else 1,), float(p)), requires_grad=learn_p)
        self.per_channel = per_channel
        self.eps = eps

    def _pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return AF.gem(x, self.p, self.eps, mask)

    def internals(self) -> Dict[str, Tensor]:
        """``p``: the exponent ((1,) or (C,))."""
        return {"p": self.p}

    def _options(self) -> list[str]:
        p = f"p={self.p.item():.4g}" if self.p.numel() == 1 else f"p=per_channel(mean={self.p.mean().item():.4g})"
        return [p, f"learn_p={self.p.requires_grad}", f"eps={self.eps}", *super()._options()]


@register_head("crow")
class CroW(_GlobalPool):
    """Cross-dimensional weighting (Kalantidis, Mellina & Osindero, ECCV Workshops 2016).

    ``f_c = Omega_c sum_n S'_n x_{n,c}``, spatial weights ``S'_n = (S_n / ||S||_a)^{1/b}`` from the channel sums
    ``S_n``, channel weights ``Omega_c = log(sum_k Q_k / (eps + Q_c))`` from the fractions ``Q_c`` of positive
    positions. Defaults a = b = 2. Meant for non-negative (post-ReLU) maps.
    """

    capabilities = HeadCapabilities(orderless=True, input_domain="nonnegative")
    a: float  # annotated: an int value still scripts (as a float)
    b: float
    eps: float

    def __init__(self, in_channels: int, a: float = 2.0, b: float = 2.0, eps: float = 1e-6,
                 normalize: bool = False) -> None:
        super().__init__(in_channels, normalize)
        self.a, self.b, self.eps = a, b, eps

    def _pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return AF.crow(x, mask, self.a, self.b, self.eps)

    def _options(self) -> list[str]:
        return [f"a={self.a}", f"b={self.b}", *super()._options()]
