"""Global poolings of a feature map (B, C, H, W) into one vector per image (B, C).

Masks (B, H, W), True = valid, restrict every pooling to the valid positions exactly.
"""
from typing import Optional

import torch
from torch import Tensor

from .masking import flatten_positions, zero_masked
from .norm import accumulation_dtype, signed_power
from .precision import bmm_full_range

__all__ = ["mac", "spoc", "gem", "crow", "clamped_power"]


def clamped_power(x: Tensor, p: Tensor | float, eps: float) -> Tensor:
    """``max(x, eps)^p`` as ``exp(p log max(x, eps))``: the same value, and a backward about twice as fast as
    ``pow``'s when ``p`` is a trainable tensor."""
    logs = torch.log(x.clamp(min=eps))
    if isinstance(p, Tensor):  # the same product in both branches: TorchScript needs ``p`` refined to one type
        return torch.exp(p * logs)
    return torch.exp(p * logs)


def _masked_mean(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of ``x`` (B, C, H, W) over the valid positions -> (B, C)."""
    if mask is None:
        return x.mean(dim=(-2, -1))
    flat, _, counts = flatten_positions(x, mask)
    return flat.sum(dim=-1) / counts


def mac(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """MAC, maximum activation of convolutions (Tolias et al., ICLR 2016): ``f_c = max_n x_{n,c}``."""
    flat = x.flatten(2)
    if mask is not None:
        flat = torch.where(mask.flatten(1).unsqueeze(1), flat, torch.full((), float("-inf"), dtype=x.dtype,
                                                                          device=x.device))
    # max() with indices: its backward is one scatter, amax's compares the whole map with the maximum
    return accumulation_dtype(flat.max(dim=-1).values)


def spoc(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """SPoC, sum-pooled convolutional features (Babenko & Lempitsky, ICCV 2015): ``f = (1/N) sum_n x_n``."""
    return _masked_mean(accumulation_dtype(x), mask)


def gem(x: Tensor, p: Tensor | float = 3.0, eps: float = 1e-6, mask: Optional[Tensor] = None) -> Tensor:
    """GeM, generalised-mean pooling (Radenović et al., TPAMI 2018).

    ``f_c = ( (1/N) sum_n max(x_{n,c}, eps)^{p_c} )^{1/p_c}``; ``p`` is a float, a (1,) or a (C,) tensor.
    p = 1 is SPoC (for inputs >= eps); p -> inf tends to MAC.
    """
    x = zero_masked(accumulation_dtype(x), mask)
    # powers relative to the per-channel max m: f = m ((1/N) sum (x/m)^p)^(1/p), the same value and gradient (m is a
    # constant), and x^p cannot overflow (float32 does once max(x)^p > 3.4e38, e.g. x ~ 1e4 with p > 9)
    logs = torch.log(x.clamp(min=eps))
    shift = logs.detach().amax(dim=[-2, -1], keepdim=True)                              # log m, (B, C, 1, 1)
    scale = shift.exp().flatten(1)                                                      # m, (B, C)
    if isinstance(p, Tensor):
        p = p.to(x.dtype)
        per_channel = p.numel() > 1
        exponent = p.view(1, -1, 1, 1) if per_channel else p.reshape(())
        inverse = 1.0 / (p.view(1, -1) if per_channel else p.reshape(()))
        return _masked_mean(torch.exp(exponent * (logs - shift)), mask).pow(inverse) * scale
    return _masked_mean(torch.exp(p * (logs - shift)), mask).pow(1.0 / p) * scale


def crow(x: Tensor, mask: Optional[Tensor] = None, a: float = 2.0, b: float = 2.0, eps: float = 1e-6) -> Tensor:
    """CroW, cross-dimensional weighting (Kalantidis et al., ECCV Workshops 2016).

    Spatial weights ``S'_n = (S_n / (sum_m S_m^a)^{1/a})^{1/b}`` from the channel sums ``S_n = sum_c x_{n,c}``
    (clamped at 0: CroW assumes non-negative activations); channel weights ``Omega_c = log(sum_k Q_k / (eps + Q_c))``
    with ``Q_c`` the fraction of valid positions where channel c is positive; ``f_c = Omega_c sum_n S'_n x_{n,c}``.
    """
    flat, _, counts = flatten_positions(accumulation_dtype(x), mask)
    sums = flat.sum(dim=1).clamp(min=0)                              # (B, N)
    # clamped before the root: the same value, and no infinite derivative of x^(1/a) at 0 on an all-zero map
    norm = sums.pow(a).sum(dim=-1, keepdim=True).clamp(min=eps ** a).pow(1.0 / a)  # (B, 1), >= eps
    spatial = signed_power(sums / norm, 1.0 / b)                     # (B, N)
    positive = (flat > 0).to(flat.dtype)                             # masked positions are 0: not counted
    fraction = positive.sum(dim=-1) / counts                         # (B, C)
    total = fraction.sum(dim=-1, keepdim=True).clamp(min=eps)
    channel = torch.log(total / (eps + fraction))
    # never in float16 (under autocast the sum overflowed for activations above ~1e3)
    return channel * bmm_full_range(flat, spatial.unsqueeze(-1)).squeeze(-1)
