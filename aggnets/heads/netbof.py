"""Soft-assignment bag-of-features and, as its hard frozen mode, the classical BoF histogram."""
from typing import Optional

from torch import Tensor

from .. import functional as AF
from ..registry import register_head
from .assignment import ConvAssignmentHead
from .base import HeadCapabilities

__all__ = ["NetBoF", "BoF"]


@register_head("netbof")
class NetBoF(ConvAssignmentHead):
    """Soft-assignment bag-of-features (NetBoF; SoftDBoW in Miech, Laptev & Sivic 2017):
    ``h_k = (1/N) sum_n a_k(x_n)``, ``a_k(x) = softmax_k(w_k^T x + b_k)``; the histogram sums to 1.

    ``NetBoF.from_centroids(c, alpha)`` sets ``a = softmax_k(-alpha ||x - c_k||^2)``; ``alpha=float('inf')`` is BoF.
    """

    capabilities = HeadCapabilities(codebook="centroids", orderless=True, maps=("assignment",),
                                    internals=("alpha", "assign_weight_norm"))
    default_alpha = 1.0

    def __init__(self, in_channels: int, num_clusters: int = 64, *, alpha: Optional[float] = None,
                 normalize_input: bool = False, bias: bool = True, assignment: str = "soft") -> None:
        super().__init__(in_channels, num_clusters, num_clusters, alpha=alpha, normalize_input=normalize_input,
                         bias=bias, assignment=assignment)
        if bias:
            self.set_assignment_from_centroids(self._random_centroids(), float(self.alpha), "distance")
        self._freeze_if_classical()

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return AF.netbof(x, self.assign_weight, self.assign.bias, mask, hard=self.assignment == "hard",
                         normalize_input=self.normalize_input)


@register_head("bof")
class BoF(NetBoF):
    """Bag of visual words (Sivic & Zisserman, ICCV 2003; Csurka et al., 2004): the L1-normalised histogram of
    nearest-centroid assignments — NetBoF in hard, frozen mode. Build it with ``BoF.from_centroids(centroids)``."""

    frozen = True
    default_alpha = float("inf")

    def __init__(self, in_channels: int, num_clusters: int = 64, *, normalize_input: bool = False) -> None:
        super().__init__(in_channels, num_clusters, alpha=float("inf"), normalize_input=normalize_input,
                         bias=True, assignment="hard")
