"""Normalisation and projection layers for descriptors (B, D)."""
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .. import functional as AF
from .base import check_positive_int

__all__ = ["L2Norm", "PowerNorm", "IntraNorm", "Whitening", "ContextGating"]


class L2Norm(nn.Module):
    """``y = x / max(||x||_2, eps)`` along ``dim``."""

    def __init__(self, dim: int = -1, eps: float = 1e-12) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: Tensor) -> Tensor:
        return AF.l2_normalize(x, self.dim, self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class PowerNorm(nn.Module):
    """Signed power normalisation ``y = sign(x) |x|^power`` (power = 0.5: signed square root; Perronnin et al. 2010);
    ``power`` as in NetVLAD / NetFV (``alpha`` is the deprecated name: ``alpha`` is the assignment sharpness
    elsewhere)."""

    def __init__(self, power: float = 0.5, eps: float = 1e-12, *, alpha: Optional[float] = None) -> None:
        super().__init__()
        if alpha is not None:
            warnings.warn("PowerNorm(alpha=...) is deprecated: the exponent is called power, as in NetVLAD and NetFV",
                          FutureWarning, stacklevel=2)
            power = alpha
        if power <= 0:
            raise ValueError(f"PowerNorm: power must be positive, got {power}")
        self.power, self.eps = power, eps

    @property
    def alpha(self) -> float:
        """Deprecated name of :attr:`power`."""
        return self.power

    def forward(self, x: Tensor) -> Tensor:
        return AF.signed_power(x, self.power, self.eps)

    def extra_repr(self) -> str:
        return f"power={self.power}"


class IntraNorm(nn.Module):
    """Intra-normalisation (Arandjelović & Zisserman, CVPR 2013): L2 of each of ``num_clusters`` blocks of x (B, K*D)."""

    def __init__(self, num_clusters: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.num_clusters = check_positive_int("IntraNorm", "num_clusters", num_clusters)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return AF.intra_normalize(x, self.num_clusters, self.eps)

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}"


class Whitening(nn.Linear):
    """Whitening / projection ``y = L2(P (x - m))`` as an ``nn.Linear`` (weight ``P``, bias ``-P m``), fine-tunable.

    Identity at construction (first ``out_features`` coordinates when reducing); fitted by PCA whitening or learned
    whitening (Radenović et al.) elsewhere and loaded with :meth:`from_mean_projection` / :meth:`load_mean_projection`.
    """

    def __init__(self, in_features: int, out_features: Optional[int] = None, normalize: bool = True) -> None:
        out_features = in_features if out_features is None else out_features
        check_positive_int("Whitening", "in_features", in_features)
        check_positive_int("Whitening", "out_features", out_features)
        if out_features > in_features:
            raise ValueError(f"Whitening: out_features={out_features} exceeds in_features={in_features}")
        super().__init__(in_features, out_features, bias=True)
        self.normalize = normalize
        with torch.no_grad():
            self.weight.copy_(torch.eye(out_features, in_features))
            self.bias.zero_()

    @classmethod
    def from_mean_projection(cls, mean: Any, projection: Any, normalize: bool = True) -> "Whitening":
        projection = torch.as_tensor(projection)
        if projection.dim() != 2:
            raise ValueError(f"Whitening: projection must be (out, in), got shape {tuple(projection.shape)}")
        layer = cls(projection.shape[1], projection.shape[0], normalize)
        if projection.dtype == torch.float64:
            layer = layer.double()
        layer.load_mean_projection(mean, projection)
        return layer

    @torch.no_grad()
    def load_mean_projection(self, mean: Any, projection: Any) -> None:
        """Set ``P`` (out, in) and ``m`` (in,): weight = P, bias = -P m."""
        projection = torch.as_tensor(projection, dtype=torch.float64)
        mean = torch.as_tensor(mean, dtype=torch.float64)
        if tuple(projection.shape) != (self.out_features, self.in_features) or tuple(mean.shape) != (self.in_features,):
            raise ValueError(f"Whitening: expected projection {(self.out_features, self.in_features)} and mean "
                             f"({self.in_features},), got {tuple(projection.shape)} and {tuple(mean.shape)}")
        self.weight.copy_(projection)
        self.bias.copy_(-(projection @ mean))

    @property
    def out_dim(self) -> int:
        return self.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)  # nn.Linear.forward (TorchScript has no super())
        return AF.l2_normalize(y, dim=-1) if self.normalize else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize}"


class ContextGating(nn.Module):
    """Context gating (Miech, Laptev & Sivic, "Learnable pooling with Context Gating for video classification",
    2017; antoine77340/LOUPE): ``y = sigmoid(W x + b) * x`` on a (B, dim) descriptor, re-weighting each dimension
    by a gate computed from the whole descriptor.

    ``batch_norm=True`` (LOUPE's ``gating_add_batch_norm``) normalises ``W x`` with a batch norm instead of adding a
    bias: ``y = sigmoid(BN(W x)) * x``. Parameters: ``fc.weight`` (dim, dim) (and ``fc.bias`` (dim,) without the batch
    norm), ``bn.*``. Initialised as LOUPE: ``W ~ N(0, 1/dim)``, ``b = 0``.
    """

    def __init__(self, dim: int, batch_norm: bool = False) -> None:
        super().__init__()
        check_positive_int("ContextGating", "dim", dim)
        self.dim = dim
        self.fc = nn.Linear(dim, dim, bias=not batch_norm)
        self.bn = nn.BatchNorm1d(dim) if batch_norm else None
        with torch.no_grad():
            self.fc.weight.normal_(0.0, dim ** -0.5)
            if self.fc.bias is not None:
                self.fc.bias.zero_()

    @property
    def out_dim(self) -> int:
        return self.dim

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ContextGating: x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        gates = self.fc(x)
        if self.bn is not None:
            gates = self.bn(gates)
        return torch.sigmoid(gates) * x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, batch_norm={self.bn is not None}"
