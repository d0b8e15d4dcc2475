"""The CosPlace / EigenPlaces head: L2, GeM, a linear layer, L2."""

from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from .. import functional as AF
from ..registry import register_head
from .base import HeadCapabilities, PoolingHead, check_positive_int
from .reference import check_unexpected, reference_prefix, reference_tensor

__all__ = ["CosPlace"]


@register_head("cosplace")
class CosPlace(PoolingHead):
    """CosPlace's aggregation (Berton, Masone & Caputo, "Rethinking visual geo-localization for large-scale
    applications", CVPR 2022; gmberton/CosPlace), also EigenPlaces' (Berton et al., ICCV 2023; the same module).

    ``f = L2( W GeM_p( {x_n / ||x_n||} ) + b )``: every local descriptor L2-normalised over the channels, GeM over the
    positions ``( (1/N) sum_n max(x_nc, eps)^p )^{1/p}`` with a trainable ``p`` (shape (1,), init 3, eps 1e-6), a
    ``Linear(C -> out_dim)`` with bias, L2. out_dim = ``out_dim`` (default 512).

    Masks: GeM over the valid positions only (orderless: the descriptor depends on the set of valid descriptors).
    Parameters ``p`` (1,) and ``fc`` (``nn.Linear``, default init as the authors'); :meth:`from_reference` loads the
    authors' ``aggregation`` ``nn.Sequential(L2Norm(), GeM(), Flatten(), nn.Linear(C, D), L2Norm())`` state dict.
    """

    capabilities = HeadCapabilities(orderless=True, l2_output=True, internals=("p",))
    eps: float

    def __init__(self, in_channels: int, out_dim: int = 512, p: float = 3.0) -> None:
        out_dim = check_positive_int("CosPlace", "out_dim", out_dim)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0 or p == float("inf"):
            raise ValueError(f"CosPlace: p must be a positive finite number, got {p!r}")
        super().__init__(in_channels, out_dim)
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.fc = nn.Linear(in_channels, out_dim)
        self.eps = 1e-6

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return AF.cosplace(x, self.p, self.fc.weight, self.fc.bias, self.eps, mask)

    def internals(self) -> Dict[str, Tensor]:
        """``p``: the GeM exponent (1,)."""
        return {"p": self.p}

    @classmethod
    def from_reference(cls, state_dict: Mapping[str, Any], prefix: Optional[str] = None) -> "CosPlace":
        """The head from the authors' aggregation state dict: the ``nn.Sequential`` keys ``1.p`` (1,),
        ``3.weight`` (D, C), ``3.bias`` (D,) of gmberton/CosPlace and gmberton/EigenPlaces (``aggregation.`` in their
        whole ``GeoLocalizationNet`` / torch.hub model, ``module.aggregation.`` after DataParallel), or gsv-cities'
        copy (``gem.p``, ``fc.weight``, ``fc.bias``). The prefix is auto-detected (or ``prefix=``). Takes the
        weights' dtype."""
        what = "CosPlace.from_reference"
        prefix = reference_prefix(state_dict, ["1.p", "gem.p"], what, prefix)
        if prefix + "1.p" in state_dict or prefix + "3.weight" in state_dict:
            keys, roots = ("1.p", "3.weight", "3.bias"), ["0", "1", "2", "3", "4"]
        else:
            keys, roots = ("gem.p", "fc.weight", "fc.bias"), ["gem", "fc"]
        p_key, weight_key, bias_key = (prefix + k for k in keys)
        p = reference_tensor(state_dict, p_key, what, shape=(1,))
        weight = reference_tensor(state_dict, weight_key, what, dims=2)
        bias = reference_tensor(state_dict, bias_key, what, shape=(weight.shape[0],))
        check_unexpected(state_dict, prefix, roots, {p_key, weight_key, bias_key}, what)
        head = cls(weight.shape[1], weight.shape[0]).to(weight.dtype)
        head.load_state_dict({"p": p.to(weight.dtype), "fc.weight": weight, "fc.bias": bias})
        return head

    def _options(self) -> list[str]:
        return [f"p={self.p.item():.4g}"]
