"""NetVLAD (with its GhostVLAD and SuperVLAD options) and, as its hard-assignment frozen mode, classical VLAD."""
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

    ``ghost_clusters=G`` (GhostVLAD; Zhong, Arandjelović & Zisserman, ACCV 2018): the soft-max runs over K + G
    clusters (``assign`` has K + G outputs, the ghosts' rows last), ``a_k(x) = softmax_{k <= K+G}(w_k^T x + b_k)``, and
    only the K real clusters are aggregated: the ghosts absorb the share of unhelpful descriptors, the output stays
    K * C and ``centroids`` (K, C). :func:`~aggnets.codebook.init_head_from_descriptors` fits K + G k-means centroids
    and gives the last G to the ghosts' assignment rows; ``from_centroids`` / ``load_centroids`` take them as
    ``ghost_centroids`` (G, C), or set the ghost rows to zero.

    ``residual=False`` (SuperVLAD; Lu et al., NeurIPS 2024): no centroids, ``V_k = sum_n a_k(x_n) x_n``; then the
    same normalisations. The head has no ``centroids`` parameter (state dict: ``assign.weight``, ``assign.bias``
    only); the assignment is still initialised from k-means centroids. SuperVLAD's recipe: few clusters (e.g. 4)
    and one ghost, ``NetVLAD(C, 4, ghost_clusters=1, residual=False)`` (the authors also use ``bias=False`` with the
    ``"cosine"`` initialisation).
    """

    capabilities = HeadCapabilities(codebook="centroids", orderless=True, l2_output=True, maps=("assignment",),
                                    internals=("alpha", "assign_weight_norm", "centroid_norm"))
    default_alpha = 100.0
    power: Optional[float]  # annotated: an int value still scripts (as a float)
    centroids: Optional[Tensor]  # None when residual=False (SuperVLAD)

    def __init__(self, in_channels: int, num_clusters: int = 64, *, alpha: Optional[float] = None,
                 normalize_input: bool = True, intra_norm: bool = True, power: Optional[float] = None,
                 bias: bool = True, assignment: str = "soft", ghost_clusters: int = 0,
                 residual: bool = True) -> None:
        super().__init__(in_channels, num_clusters, num_clusters * in_channels, alpha=alpha,
                         normalize_input=normalize_input, bias=bias, assignment=assignment,
                         ghost_clusters=ghost_clusters)
        self.intra_norm = intra_norm
        self.power = power
        self.residual = bool(residual)
        centroids = self._random_centroids()  # (K + G, C), the ghosts' last
        if self.residual:
            self.centroids = nn.Parameter(centroids[:num_clusters].clone())
        else:
            self.register_parameter("centroids", None)
            # no centroids: no centroid_norm to watch (an instance refines its class's declaration)
            self.capabilities = type(self).capabilities.replace(
                internals=tuple(n for n in type(self).capabilities.internals if n != "centroid_norm"))
        if bias:
            self.set_assignment_from_centroids(centroids, float(self.alpha), "distance")
        self._freeze_if_classical()

    def load_centroids(self, centroids: Tensor, alpha: float, scheme: str = "distance",
                       ghost_centroids: Optional[Tensor] = None) -> None:
        """The assignment from ``centroids`` (K, C) (+ ``ghost_centroids`` (G, C), see
        :meth:`ConvAssignmentHead.load_centroids`) and, unless ``residual=False``, the ``centroids`` parameter."""
        super().load_centroids(centroids, alpha, scheme, ghost_centroids)
        if self.centroids is not None:
            with torch.no_grad():
                self.centroids.copy_(centroids)

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return AF.netvlad(x, self.assign_weight, self.assign.bias, self.centroids, mask,
                          hard=self.assignment == "hard", normalize_input=self.normalize_input,
                          intra_norm=self.intra_norm, power=self.power, ghost_clusters=self.ghost_clusters)

    def internals(self) -> Dict[str, Tensor]:
        """The assignment's (``alpha``, ``assign_weight_norm``) and ``centroid_norm`` ``||c_k||_2`` (K,) (not with
        ``residual=False``: no centroids)."""
        values = super().internals()
        if self.centroids is not None:
            values["centroid_norm"] = torch.linalg.vector_norm(self.centroids, dim=1)
        return values

    def _options(self) -> list[str]:
        options = [*super()._options(), f"intra_norm={self.intra_norm}", f"power={self.power}"]
        if not self.residual:
            options.append("residual=False")
        return options


@register_head("vlad")
class VLAD(NetVLAD):
    """VLAD (Jégou, Douze, Schmid & Pérez, CVPR 2010): ``v_k = sum_{n: NN(x_n) = k} (x_n - mu_k)``, concatenated,
    L2-normalised — NetVLAD in hard-assignment, frozen mode (same code path).

    Defaults follow the paper: raw descriptors, no intra-normalisation, no power normalisation; the later variants
    are options (``intra_norm=True``, ``power=0.5``). Build it with ``VLAD.from_centroids(centroids)``.

    ``metric``: how a descriptor finds its centroid, ``"euclidean"`` (the paper's nearest centroid) or ``"cosine"``
    (the highest cosine similarity ``x . c_k / ||c_k||``: AnyLoc's VLAD, Keetha et al., RA-L 2023, with
    ``normalize_input=True, intra_norm=True``). The codebook fit follows it (:func:`aggnets.codebook.fit_kmeans`
    with ``metric="cosine"``: cosine assignments, mean centroids), and the residuals are always ``x - c_k`` to the
    fitted (mean) centroids. The assignment scheme of :meth:`load_centroids` / ``from_centroids`` comes from
    ``metric`` (their ``scheme`` argument is not used).
    """

    frozen = True
    default_alpha = float("inf")
    metric: str

    def __init__(self, in_channels: int, num_clusters: int = 64, *, normalize_input: bool = False,
                 intra_norm: bool = False, power: Optional[float] = None, metric: str = "euclidean") -> None:
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"VLAD: metric must be 'euclidean' or 'cosine', got {metric!r}")
        self.metric = metric
        super().__init__(in_channels, num_clusters, alpha=float("inf"), normalize_input=normalize_input,
                         intra_norm=intra_norm, power=power, bias=True, assignment="hard")

    def set_assignment_from_centroids(self, centroids: Tensor, alpha: float, scheme: str = "distance") -> None:
        """Hard assignment from (K, C) centroids by :attr:`metric` (the ``scheme`` argument is not used)."""
        super().set_assignment_from_centroids(centroids, alpha, "cosine" if self.metric == "cosine" else "distance")

    def _options(self) -> list[str]:
        return [*super()._options(), *([f"metric={self.metric!r}"] if self.metric != "euclidean" else [])]
