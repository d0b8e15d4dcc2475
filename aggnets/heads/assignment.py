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
    """

    default_alpha: float = 1.0
    frozen: bool = False

    def __init__(self, in_channels: int, num_clusters: int, out_dim: int, *, alpha: Optional[float] = None,
                 normalize_input: bool = False, bias: bool = True, assignment: str = "soft") -> None:
        super().__init__(in_channels, out_dim)
        if assignment not in ("soft", "hard"):
            raise ValueError(f"{type(self).__name__}: assignment must be 'soft' or 'hard', got {assignment!r}")
        self.num_clusters = check_positive_int(type(self).__name__, "num_clusters", num_clusters)
        self.normalize_input = normalize_input
        self.assignment = assignment
        self.assign = nn.Conv2d(in_channels, num_clusters, kernel_size=1, bias=bias)
        self.register_buffer("alpha", torch.tensor(float(self.default_alpha if alpha is None else alpha)))

    def _random_centroids(self) -> Tensor:
        centroids = torch.randn(self.num_clusters, self.in_channels)
        if self.normalize_input:
            centroids = nn.functional.normalize(centroids, dim=1)
        return centroids

    @torch.no_grad()
    def set_assignment_from_centroids(self, centroids: Tensor, alpha: float, scheme: str = "distance") -> None:
        """Initialise ``assign`` from centroids (NOTES.md, NetVLAD init).

        ``"distance"``: ``w_k = 2 alpha c_k``, ``b_k = -alpha ||c_k||^2``, so ``a = softmax_k(-alpha ||x - c_k||^2)``;
        ``alpha = inf`` switches to hard nearest-centroid assignment (``alpha`` = 1 in the weights).
        ``"cosine"``: ``w_k = alpha c_k / ||c_k||``, ``b = 0``.
        """
        if scheme not in ("distance", "cosine"):
            raise ValueError(f"{type(self).__name__}: scheme must be 'distance' or 'cosine', got {scheme!r}")
        hard = math.isinf(alpha)
        if not alpha > 0:
            raise ValueError(f"{type(self).__name__}: alpha must be positive (or inf), got {alpha}")
        if hard and scheme != "distance":
            raise ValueError(f"{type(self).__name__}: alpha=inf needs scheme='distance'")
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
                       **kwargs: Any) -> "ConvAssignmentHead":
        """Build the head from a (K, C) codebook (e.g. k-means centroids); ``alpha=float('inf')`` = hard.

        The parameters take the centroids' floating dtype (float64 centroids give a float64 head).
        """
        centroids = _as_centroids(centroids, cls.__name__)
        head = cls(centroids.shape[1], centroids.shape[0], **kwargs).to(dtype=centroids.dtype)
        head.load_centroids(centroids, cls.default_alpha if alpha is None else alpha, scheme)
        return head

    def load_centroids(self, centroids: Tensor, alpha: float, scheme: str = "distance") -> None:
        if tuple(centroids.shape) != (self.num_clusters, self.in_channels):
            raise ValueError(f"{type(self).__name__}: centroids must have shape "
                             f"{(self.num_clusters, self.in_channels)}, got {tuple(centroids.shape)}")
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
        """The assignment weight as a (K, C) matrix."""
        return self.assign.weight.flatten(1)

    def assignment_map(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The assignment ``a_k(x_n)`` (B, K, H, W) of every position of ``x`` (B, C, H, W), exactly as the forward
        pass computes it: ``softmax_k(w_k^T x_n + b_k)`` (the arg-max one-hot when ``assignment="hard"``), on
        L2-normalised ``x_n`` when ``normalize_input``. Columns of masked positions are all zero. Differentiable
        (soft); float32 for half-precision inputs."""
        AF.check_feature_map(x, mask, self.in_channels, type(self).__name__)
        descriptors, valid, _ = AF.flatten_positions(AF.accumulation_dtype(x), mask)
        if self.normalize_input:
            descriptors = AF.l2_normalize(descriptors, dim=1)
        assignment = AF.assign(descriptors, self.assign_weight, self.assign.bias, self.assignment == "hard", valid)
        return assignment.unflatten(-1, x.shape[-2:])

    def internals(self) -> Dict[str, Tensor]:
        """``alpha`` (0-d; inf for hard assignment) and ``assign_weight_norm`` ``||w_k||_2`` (K,)."""
        return {"alpha": self.alpha, "assign_weight_norm": torch.linalg.vector_norm(self.assign_weight, dim=1)}

    def internal_maps(self, x: Tensor, mask: Optional[Tensor] = None,
                      token: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``assignment``: :meth:`assignment_map`."""
        return {"assignment": self.assignment_map(x, mask)}

    def _options(self) -> list[str]:
        return [f"num_clusters={self.num_clusters}", f"assignment={self.assignment!r}",
                f"normalize_input={self.normalize_input}"]
