"""Shared machinery of the codebook heads that assign descriptors with a 1x1 convolution (NetVLAD, NetBoF)."""
import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from .. import functional as AF
from .base import PoolingHead, check_positive_int

__all__ = ["ConvAssignmentHead"]


def _as_centroids(centroids: Any, owner: str) -> Tensor:
    centroids = torch.as_tensor(centroids)
    if centroids.dim() != 2 or 0 in centroids.shape:
        raise ValueError(f"{owner}.from_centroids: centroids must be a non-empty (K, C) matrix, "
                         f"got shape {tuple(centroids.shape)}")
    if not centroids.is_floating_point():
        centroids = centroids.float()
    return centroids.detach().clone()


class ConvAssignmentHead(PoolingHead):
    """A head whose assignment ``a_k(x) = softmax_k(w_k^T x + b_k)`` is a 1x1 convolution ``assign`` (weight
    (K, C, 1, 1), optional bias), or its arg-max one-hot when ``assignment="hard"``.

    ``frozen`` heads (the classical encoders) have every parameter's ``requires_grad`` off.

    ``ghost_clusters`` G > 0 (GhostVLAD): ``assign`` has K + G outputs, the soft-max runs over all of them, and the
    last G rows (the ghosts) are left out of the encoding; ``assign_weight`` is (K + G, C), ghost rows last.
    """

    default_alpha: float = 1.0
    frozen: bool = False

    def __init__(self, in_channels: int, num_clusters: int, out_dim: int, *, alpha: Optional[float] = None,
                 normalize_input: bool = False, bias: bool = True, assignment: str = "soft",
                 ghost_clusters: int = 0) -> None:
        super().__init__(in_channels, out_dim)
        if assignment not in ("soft", "hard"):
            raise ValueError(f"{type(self).__name__}: assignment must be 'soft' or 'hard', got {assignment!r}")
        self.num_clusters = check_positive_int(type(self).__name__, "num_clusters", num_clusters)
        if not isinstance(ghost_clusters, int) or isinstance(ghost_clusters, bool) or ghost_clusters < 0:
            raise ValueError(f"{type(self).__name__}: ghost_clusters must be a non-negative int, got {ghost_clusters!r}")
        self.ghost_clusters = ghost_clusters
        self.normalize_input = normalize_input
        self.assignment = assignment
        self.assign = nn.Conv2d(in_channels, num_clusters + ghost_clusters, kernel_size=1, bias=bias)
        self.register_buffer("alpha", torch.tensor(float(self.default_alpha if alpha is None else alpha)))

    def _random_centroids(self) -> Tensor:
        """(K + G, C) random centroids (the ghosts' last)."""
        centroids = torch.randn(self.num_clusters + self.ghost_clusters, self.in_channels)
        if self.normalize_input:
            centroids = nn.functional.normalize(centroids, dim=1)
        return centroids

    @torch.no_grad()
    def set_assignment_from_centroids(self, centroids: Tensor, alpha: float, scheme: str = "distance") -> None:
        """Initialise ``assign`` from (K + G, C) centroids, the ghosts' last (NOTES.md, NetVLAD init).

        ``"distance"``: ``w_k = 2 alpha c_k``, ``b_k = -alpha ||c_k||^2``, so ``a = softmax_k(-alpha ||x - c_k||^2)``;
        ``alpha = inf`` switches to hard nearest-centroid assignment (``alpha`` = 1 in the weights).
        ``"cosine"``: ``w_k = alpha c_k / ||c_k||``, ``b = 0``; with ``alpha = inf``, hard assignment to the
        centroid of highest cosine similarity (AnyLoc's VLAD).
        """
        if scheme not in ("distance", "cosine"):
            raise ValueError(f"{type(self).__name__}: scheme must be 'distance' or 'cosine', got {scheme!r}")
        hard = math.isinf(alpha)
        if not alpha > 0:
            raise ValueError(f"{type(self).__name__}: alpha must be positive (or inf), got {alpha}")
        scale = 1.0 if hard else float(alpha)
        centroids = centroids.to(self.assign.weight)
        if scheme == "distance":
            if self.assign.bias is None:
                raise ValueError(f"{type(self).__name__}: scheme='distance' needs bias=True")
            weight, bias = 2.0 * scale * centroids, -scale * centroids.pow(2).sum(dim=1)
        else:
            weight, bias = scale * nn.functional.normalize(centroids, dim=1), torch.zeros(len(centroids))
        self.assign.weight.copy_(weight.view_as(self.assign.weight))
        if self.assign.bias is not None:
            self.assign.bias.copy_(bias)
        self.alpha.fill_(alpha)
        if hard:
            self.assignment = "hard"

    @classmethod
    def from_centroids(cls, centroids: Any, alpha: Optional[float] = None, scheme: str = "distance",
                       ghost_centroids: Any = None, **kwargs: Any) -> "ConvAssignmentHead":
        """Build the head from a (K, C) codebook (e.g. k-means centroids); ``alpha=float('inf')`` = hard.

        The parameters take the centroids' floating dtype (float64 centroids give a float64 head). With
        ``ghost_clusters=G`` (a keyword of the heads that have ghosts), ``ghost_centroids`` (G, C) places the ghosts'
        assignment rows like the others' (e.g. the last G of a K + G k-means fit); omitted, the ghost rows are zero
        (see :meth:`load_centroids`).
        """
        centroids = _as_centroids(centroids, cls.__name__)
        if ghost_centroids is not None:
            ghost_centroids = torch.as_tensor(ghost_centroids).detach().to(centroids.dtype)
        head = cls(centroids.shape[1], centroids.shape[0], **kwargs).to(dtype=centroids.dtype)
        head.load_centroids(centroids, cls.default_alpha if alpha is None else alpha, scheme, ghost_centroids)
        return head

    def load_centroids(self, centroids: Tensor, alpha: float, scheme: str = "distance",
                       ghost_centroids: Optional[Tensor] = None) -> None:
        """Set the assignment from the K centroids (and the G ghosts' centroids when the head has ghosts).

        ``ghost_centroids`` (G, C) None with G > 0: the ghost rows are zero (weight and bias), i.e. a ghost centroid
        at the origin under ``scheme="distance"`` (``softmax_k(-alpha ||x - c_k||^2)`` with ``c = 0``): on
        L2-normalised descriptors the ghosts then start nearly unused (distance 1 against < 1 to the nearest
        centroid, sharpened by alpha) and training decides what they absorb. ``init_head_from_descriptors`` instead
        fits K + G k-means centroids and gives the last G to the ghosts (as the GhostVLAD / SuperVLAD code does).
        """
        name = type(self).__name__
        if tuple(centroids.shape) != (self.num_clusters, self.in_channels):
            raise ValueError(f"{name}: centroids must have shape "
                             f"{(self.num_clusters, self.in_channels)}, got {tuple(centroids.shape)}")
        if ghost_centroids is None:
            ghost_centroids = centroids.new_zeros(self.ghost_clusters, self.in_channels)
        elif tuple(ghost_centroids.shape) != (self.ghost_clusters, self.in_channels):
            raise ValueError(f"{name}: ghost_centroids must have shape {(self.ghost_clusters, self.in_channels)} "
                             f"(ghost_clusters={self.ghost_clusters}), got {tuple(ghost_centroids.shape)}")
        if self.ghost_clusters > 0:
            centroids = torch.cat([centroids, ghost_centroids.to(centroids)], dim=0)
        self.set_assignment_from_centroids(centroids, float(alpha), scheme)

    def init_from_descriptors(self, descriptors: Any, **kwargs: Any) -> dict:
        """Fit this head's codebook to sampled local descriptors (N, C) and load it — see
        :func:`aggnets.codebook.init_head_from_descriptors` for the options (k-means engine, ``scheme``,
        ``alpha="auto"``). Returns a summary dict."""
        from ..codebook.init import init_head_from_descriptors
        return init_head_from_descriptors(self, descriptors, **kwargs)

    def _freeze_if_classical(self) -> None:
        if self.frozen:
            self.requires_grad_(False)

    @property
    def assign_weight(self) -> Tensor:
        """The assignment weight as a (K + G, C) matrix (G = ``ghost_clusters``, ghost rows last)."""
        return self.assign.weight.flatten(1)

    def assignment_map(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The assignment ``a_k(x_n)`` (B, K, H, W) of every position of ``x`` (B, C, H, W), exactly as the forward
        pass computes it: ``softmax_k(w_k^T x_n + b_k)`` (the arg-max one-hot when ``assignment="hard"``), on
        L2-normalised ``x_n`` when ``normalize_input``. Columns of masked positions are all zero. Differentiable
        (soft); float32 for half-precision inputs. With ghost clusters only the K real clusters' rows are returned
        (the soft-max includes the ghosts, so a column sums to 1 minus the ghosts' share)."""
        AF.check_feature_map(x, mask, self.in_channels, type(self).__name__)
        descriptors, valid, _ = AF.flatten_positions(AF.accumulation_dtype(x), mask)
        if self.normalize_input:
            descriptors = AF.l2_normalize(descriptors, dim=1)
        assignment = AF.assign(descriptors, self.assign_weight, self.assign.bias, self.assignment == "hard", valid)
        return assignment[:, :self.num_clusters].unflatten(-1, x.shape[-2:])

    def internals(self) -> Dict[str, Tensor]:
        """``alpha`` (0-d; inf for hard assignment) and ``assign_weight_norm`` ``||w_k||_2`` (K + G,: ghosts last)."""
        return {"alpha": self.alpha, "assign_weight_norm": torch.linalg.vector_norm(self.assign_weight, dim=1)}

    def internal_maps(self, x: Tensor, mask: Optional[Tensor] = None,
                      token: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``assignment``: :meth:`assignment_map`."""
        return {"assignment": self.assignment_map(x, mask)}

    def _options(self) -> list[str]:
        options = [f"num_clusters={self.num_clusters}", f"assignment={self.assignment!r}",
                   f"normalize_input={self.normalize_input}"]
        if self.ghost_clusters:
            options.insert(1, f"ghost_clusters={self.ghost_clusters}")
        return options
