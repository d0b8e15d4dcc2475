"""BoQ (Ali-bey, Chaib-draa & Giguère, "BoQ: A place is worth a bag of learnable queries", CVPR 2024): transformer
attention written on ``F.scaled_dot_product_attention``, with key padding masks."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["multi_head_attention", "attention_weights"]


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, L, d) -> (B, heads, L, d / heads)."""
    batch, length, width = x.shape
    return x.reshape(batch, length, num_heads, width // num_heads).transpose(1, 2)


def _project(query: Tensor, key: Tensor, in_proj_weight: Tensor, in_proj_bias: Optional[Tensor]
             ) -> Tuple[Tensor, Tensor, Tensor]:
    """``q = W_q query + b_q``, ``k = W_k key + b_k``, ``v = W_v key + b_v`` with ``W = [W_q; W_k; W_v]`` (3d, d)
    (``nn.MultiheadAttention``'s packed layout); the key and value projections of ``key`` as one product."""
    width = query.shape[-1]
    bias_q: Optional[Tensor] = None
    bias_kv: Optional[Tensor] = None
    if in_proj_bias is not None:
        bias_q, bias_kv = in_proj_bias[:width], in_proj_bias[width:]
    q = F.linear(query, in_proj_weight[:width], bias_q)
    k, v = F.linear(key, in_proj_weight[width:], bias_kv).chunk(2, dim=-1)
    return q, k, v


def multi_head_attention(query: Tensor, key: Tensor, in_proj_weight: Tensor, in_proj_bias: Optional[Tensor],
                         out_proj_weight: Tensor, out_proj_bias: Optional[Tensor], num_heads: int,
                         key_mask: Optional[Tensor] = None) -> Tensor:
    """``MultiHead(Q, K, V = K) = [head_1 ... head_h] W_o + b_o``, ``head_i = softmax(q_i k_i^T / sqrt(d / h)) v_i``
    (Vaswani et al., NeurIPS 2017), the computation of ``nn.MultiheadAttention(d, h, batch_first=True)`` with
    ``need_weights=False``, on ``F.scaled_dot_product_attention`` (fused kernels where the device has them).
    ``query`` (B or 1, Lq, d), ``key`` (B, Lk, d); a query of batch 1 is shared by every image (projected once).
    ``key_mask`` (B, Lk) bool, True at the keys that take part (a key padding mask, inverted)."""
    q, k, v = _project(query, key, in_proj_weight, in_proj_bias)
    batch = key.shape[0]
    q = _heads(q, num_heads).expand(batch, -1, -1, -1)
    attn_mask: Optional[Tensor] = None
    if key_mask is not None:
        attn_mask = key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, _heads(k, num_heads), _heads(v, num_heads), attn_mask=attn_mask)
    out = out.transpose(1, 2).flatten(2)                                                  # (B, Lq, d)
    return F.linear(out, out_proj_weight, out_proj_bias)


def attention_weights(query: Tensor, key: Tensor, in_proj_weight: Tensor, in_proj_bias: Optional[Tensor],
                      num_heads: int, key_mask: Optional[Tensor] = None) -> Tensor:
    """The attention weights of :func:`multi_head_attention` averaged over the heads (B, Lq, Lk) — what
    ``nn.MultiheadAttention`` returns by default; zero at masked keys."""
    q, k, _ = _project(query, key, in_proj_weight, in_proj_bias)
    batch = key.shape[0]
    q, k = _heads(q, num_heads).expand(batch, -1, -1, -1), _heads(k, num_heads)
    logits = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)
