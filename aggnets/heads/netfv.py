"""NetFV — a differentiable Fisher-vector layer on its own diagonal GMM — and, frozen, the classical Fisher vector."""
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from .. import functional as AF
from ..registry import register_head
from .base import HeadCapabilities, PoolingHead, check_positive_int

__all__ = ["NetFV", "FisherVector"]


@register_head("netfv")
class NetFV(PoolingHead):
    """Differentiable Fisher vector (NetFV; Miech, Laptev & Sivic 2017) whose soft assignment is the posterior of its
    own trainable diagonal GMM: ``log_weights`` (K,) (``w = softmax(log_weights)``), ``means`` (K, C) and
    ``log_vars`` (K, C) (``sigma^2 = exp(log_vars)``).

    ``gamma_n(k) = w_k N(x_n; mu_k, sigma_k) / sum_j w_j N(x_n; mu_j, sigma_j)``,
    ``G^mu_k = 1/(N sqrt(w_k)) sum_n gamma_n(k) (x_n - mu_k)/sigma_k``,
    ``G^sigma_k = 1/(N sqrt(2 w_k)) sum_n gamma_n(k) [(x_n - mu_k)^2/sigma_k^2 - 1]``;
    output ``L2(sign(z)|z|^power)`` of ``z = [G^mu; G^sigma]`` (2 * K * C, layout (2, K, C)). At GMM initialisation
    (:meth:`from_gmm`) this is exactly the improved Fisher vector (Perronnin, Sánchez & Mensink, ECCV 2010).
    """

    capabilities = HeadCapabilities(codebook="gmm", orderless=True, l2_output=True, maps=("assignment",),
                                    internals=("mixture_weights", "mean_variance"))
    frozen: bool = False
    power: Optional[float]  # annotated: an int value still scripts (as a float)

    def __init__(self, in_channels: int, num_clusters: int = 64, *, power: Optional[float] = 0.5) -> None:
        num_clusters = check_positive_int(type(self).__name__, "num_clusters", num_clusters)
        super().__init__(in_channels, 2 * num_clusters * in_channels)
        self.num_clusters = num_clusters
        self.power = power
        self.log_weights = nn.Parameter(torch.zeros(num_clusters))
        self.means = nn.Parameter(torch.randn(num_clusters, in_channels))
        self.log_vars = nn.Parameter(torch.zeros(num_clusters, in_channels))
        if self.frozen:
            self.requires_grad_(False)

    @classmethod
    def from_gmm(cls, weights: Any, means: Any, variances: Any, **kwargs: Any) -> "NetFV":
        """Build from a fitted diagonal GMM: ``weights`` (K,), ``means`` (K, C), ``variances`` (K, C) (sigma^2).

        float64 means give a float64 head; anything else float32.
        """
        means = torch.as_tensor(means).detach()
        if means.dim() != 2 or 0 in means.shape:
            raise ValueError(f"{cls.__name__}.from_gmm: means must be a non-empty (K, C) matrix, "
                             f"got {tuple(means.shape)}")
        head = cls(means.shape[1], means.shape[0], **kwargs)
        if means.dtype == torch.float64:
            head = head.double()
        head.load_gmm(weights, means, variances)
        return head

    @torch.no_grad()
    def load_gmm(self, weights: Any, means: Any, variances: Any) -> None:
        """Set the GMM parameters (weights are renormalised to sum to 1)."""
        name = type(self).__name__
        shape = (self.num_clusters, self.in_channels)
        weights = torch.as_tensor(weights, dtype=torch.float64).detach()
        means = torch.as_tensor(means, dtype=torch.float64).detach()
        variances = torch.as_tensor(variances, dtype=torch.float64).detach()
        if tuple(weights.shape) != (self.num_clusters,):
            raise ValueError(f"{name}: weights must have shape ({self.num_clusters},), got {tuple(weights.shape)}")
        if tuple(means.shape) != shape or tuple(variances.shape) != shape:
            raise ValueError(f"{name}: means and variances must have shape {shape}, got "
                             f"{tuple(means.shape)} and {tuple(variances.shape)}")
        if not bool((weights > 0).all()) or not bool((variances > 0).all()):
            raise ValueError(f"{name}: GMM weights and variances must be positive")
        self.log_weights.copy_(torch.log(weights / weights.sum()))
        self.means.copy_(means)
        self.log_vars.copy_(torch.log(variances))

    def init_from_descriptors(self, descriptors: Any, **kwargs: Any) -> dict:
        """Fit this head's GMM (EM from a k-means start) to sampled local descriptors (N, C) and load it — see
        :func:`aggnets.codebook.init_head_from_descriptors` for the options (engine, iterations). Returns a summary dict."""
        from ..codebook.init import init_head_from_descriptors
        return init_head_from_descriptors(self, descriptors, **kwargs)

    @property
    def weights(self) -> Tensor:
        return torch.softmax(self.log_weights, dim=0)

    @property
    def variances(self) -> Tensor:
        return torch.exp(self.log_vars)

    def assignment_map(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The GMM posteriors ``gamma_n(k) = w_k N(x_n; mu_k, sigma_k) / sum_j w_j N(x_n; mu_j, sigma_j)``
        (B, K, H, W) of every position of ``x`` (B, C, H, W) — the soft assignment of the forward pass. Columns of
        masked positions are all zero. Differentiable; float32 (or float64) even under autocast, like the forward;
        posteriors below 2^-100 (float64: 2^-1000) are zero, as in the forward (:func:`aggnets.functional.flush_tiny`)."""
        AF.check_feature_map(x, mask, self.in_channels, type(self).__name__)
        with torch.autocast(device_type=x.device.type, enabled=False):
            descriptors, valid, _ = AF.flatten_positions(AF.accumulation_dtype(x), mask)
            dtype = descriptors.dtype
            posteriors = AF.flush_tiny(AF.gmm_log_posteriors(descriptors, self.log_weights.to(dtype),
                                                          self.means.to(dtype), self.log_vars.to(dtype)).exp())
            if valid is not None:
                posteriors = posteriors * valid
            return posteriors.unflatten(-1, x.shape[-2:])

    def internals(self) -> Dict[str, Tensor]:
        """``mixture_weights`` ``w_k`` (K,) and ``mean_variance`` ``(1/C) sum_c sigma_kc^2`` (K,)."""
        return {"mixture_weights": self.weights, "mean_variance": self.variances.mean(dim=1)}

    def internal_maps(self, x: Tensor, mask: Optional[Tensor] = None,
                      token: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``assignment``: the GMM posteriors (:meth:`assignment_map`)."""
        return {"assignment": self.assignment_map(x, mask)}

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return AF.netfv(x, self.log_weights, self.means, self.log_vars, mask, self.power)

    def _options(self) -> list[str]:
        return [f"num_clusters={self.num_clusters}", f"power={self.power}"]


@register_head("fisher_vector")
class FisherVector(NetFV):
    """Improved Fisher vector (Perronnin & Dance, CVPR 2007; Perronnin, Sánchez & Mensink, ECCV 2010) under a fixed
    diagonal GMM — NetFV with frozen parameters (same code path). Build it with
    ``FisherVector.from_gmm(weights, means, variances)``."""

    frozen = True
