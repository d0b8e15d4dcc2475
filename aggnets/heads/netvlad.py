"""NetVLAD and, as its hard-assignment frozen mode, classical VLAD."""
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .. import functional as AF
from ..registry import register_head
from .assignment import ConvAssignmentHead
from .base import HeadCapabilities

__all__ = ["NetVLAD", "VLAD"]


@register_head("netvlad")
class NetVLAD(ConvAssignmentHead):
    """NetVLAD (Arandjelović, Gronat, Torii, Pajdla & Sivic, CVPR 2016).

    ``V_k = sum_n a_k(x_n) (x_n - c_k)``, ``a_k(x) = softmax_k(w_k^T x + b_k)``, on L2-normalised descriptors; each
    ``V_k`` intra-normalised, the K * C vector (k-major) L2-normalised. Optional signed ``power`` normalisation
    before intra-normalisation. Parameters: ``centroids`` (K, C) and the 1x1 convolution ``assign``.
    Computed as ``A X^T - (A 1) c`` (two matrix products, no residual tensor).
    ``NetVLAD.from_centroids(c, alpha)`` initialises ``w_k = 2 alpha c_k``, ``b_k = -alpha ||c_k||^2``;
    ``alpha=float('inf')`` gives hard assignment, i.e. VLAD with intra-normalisation.
    """

    capabilities = HeadCapabilities(codebook="centroids", orderless=True, l2_output=True, maps=("assignment",),
                                    internals=("alpha", "assign_weight_norm", "centroid_norm"))
    default_alpha = 100.0
    power: Optional[float]  # annotated: an int value still scripts (as a float)

    def __init__(self, in_channels: int, num_clusters: int = 64, *, alpha: Optional[float] = None,
                 normalize_input: bool = True, intra_norm: bool = True, power: Optional[float] = None,
                 bias: bool = True, assignment: str = "soft") -> None:
        super().__init__(in_channels, num_clusters, num_clusters * in_channels, alpha=alpha,
                         normalize_input=normalize_input, bias=bias, assignment=assignment)
        self.intra_norm = intra_norm
        self.power = power
        centroids = self._random_centroids()
        self.centroids = nn.Parameter(centroids)
        if bias:
            self.set_assignment_from_centroids(centroids, float(self.alpha), "distance")
        self._freeze_if_classical()

    def load_centroids(self, centroids: Tensor, alpha: float, scheme: str = "distance") -> None:
        super().load_centroids(centroids, alpha, scheme)
        with torch.no_grad():
            self.centroids.copy_(centroids)

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return AF.netvlad(x, self.assign_weight, self.assign.bias, self.centroids, mask,
                          hard=self.assignment == "hard", normalize_input=self.normalize_input,
                          intra_norm=self.intra_norm, power=self.power)

    def internals(self) -> Dict[str, Tensor]:
        """The assignment's (``alpha``, ``assign_weight_norm``) and ``centroid_norm`` ``||c_k||_2`` (K,)."""
        values = super().internals()
        values["centroid_norm"] = torch.linalg.vector_norm(self.centroids, dim=1)
        return values

    def _options(self) -> list[str]:
        return [*super()._options(), f"intra_norm={self.intra_norm}", f"power={self.power}"]


@register_head("vlad")
class VLAD(NetVLAD):
    """VLAD (Jégou, Douze, Schmid & Pérez, CVPR 2010): ``v_k = sum_{n: NN(x_n) = k} (x_n - mu_k)``, concatenated,
    L2-normalised — NetVLAD in hard-assignment, frozen mode (same code path).

    Defaults follow the paper: raw descriptors, no intra-normalisation, no power normalisation; the later variants
    are options (``intra_norm=True``, ``power=0.5``). Build it with ``VLAD.from_centroids(centroids)``.
    """

    frozen = True
    default_alpha = float("inf")

    def __init__(self, in_channels: int, num_clusters: int = 64, *, normalize_input: bool = False,
                 intra_norm: bool = False, power: Optional[float] = None) -> None:
        super().__init__(in_channels, num_clusters, alpha=float("inf"), normalize_input=normalize_input,
                         intra_norm=intra_norm, power=power, bias=True, assignment="hard")
