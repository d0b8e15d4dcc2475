"""MixVPR (Ali-bey, Chaib-draa & Giguère, WACV 2023): Feature-Mixer blocks along the flattened spatial axis, then a
channel projection and a row projection, flatten, L2.

The two projections are reassociated: ``W_c X W_r^T`` is computed as ``W_c (X W_r^T)`` (C x N x R + d x C x R
multiply-adds instead of d x C x N + d x N x R), the biases folded in as ``b_c (W_r 1)^T + 1 b_r^T``: the same
descriptor (float64: ~1e-16 relative), ~N / R times less work on the projections.
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .precision import linear_full_range
from .norm import accumulation_dtype, l2_normalize

__all__ = ["feature_mix", "mixvpr"]


def feature_mix(z: Tensor, norm_weight: Tensor, norm_bias: Tensor, fc1_weight: Tensor, fc1_bias: Tensor,
                fc2_weight: Tensor, fc2_bias: Tensor, eps: float = 1e-5) -> Tensor:
    """L Feature-Mixer blocks on ``z`` (B, C, N), each acting along the last (spatial) axis of every row:
    ``z <- z + W2 ReLU(W1 LN(z) + b1) + b2``. Parameters stacked over the blocks: ``norm_weight``, ``norm_bias``
    (L, N), ``fc1_weight`` (L, M, N), ``fc1_bias`` (L, M), ``fc2_weight`` (L, N, M), ``fc2_bias`` (L, N); M = r N."""
    positions = z.shape[-1]
    for layer in range(norm_weight.shape[0]):
        hidden = F.layer_norm(z, [positions], norm_weight[layer], norm_bias[layer], eps)
        hidden = F.relu(F.linear(hidden, fc1_weight[layer], fc1_bias[layer]))
        z = z + F.linear(hidden, fc2_weight[layer], fc2_bias[layer]).to(z.dtype)
    return z


def mixvpr(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, fc1_weight: Tensor, fc1_bias: Tensor,
           fc2_weight: Tensor, fc2_bias: Tensor, channel_weight: Tensor, channel_bias: Optional[Tensor],
           row_weight: Tensor, row_bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
    """MixVPR: ``f = L2(vec_d-major[ W_c Z W_r^T + b_c (W_r 1)^T + 1 b_r^T ])``, ``Z`` the (C, N) map after the
    Feature-Mixer blocks (:func:`feature_mix`), ``W_c`` (d, C), ``W_r`` (R, N); out_dim = d R, index ``k R + r``.

    ``x`` (B, C, H, W) with H W = N (the size the weights were trained for). The projections never run in float16
    (their sums of large activations would overflow its range).
    """
    x = accumulation_dtype(x)
    z = feature_mix(x.flatten(2), norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps)
    rows = linear_full_range(z, row_weight)                                        # (B, C, R)
    out = linear_full_range(rows.transpose(1, 2), channel_weight).to(x.dtype)      # (B, R, d)
    if channel_bias is not None:
        out = out + (row_weight.sum(dim=1).unsqueeze(1) * channel_bias.unsqueeze(0)).to(x.dtype)
    if row_bias is not None:
        out = out + row_bias.unsqueeze(1).to(x.dtype)
    return l2_normalize(out.transpose(1, 2).flatten(1), dim=-1)
