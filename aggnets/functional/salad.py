"""SALAD (Izquierdo & Civera, "Optimal transport aggregation for visual place recognition", CVPR 2024): a
log-domain Sinkhorn transport of the tokens to m clusters plus a dustbin, then one matrix product."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import is_tracing
from .dropout import relu_dropout
from .masking import zero_masked
from .norm import accumulation_dtype, l2_normalize
from .precision import bmm_full_range, flush_tiny

__all__ = ["salad", "salad_plan", "salad_scores_and_features", "sinkhorn_dustbin"]


def sinkhorn_dustbin(scores: Tensor, dust_bin: Tensor, valid: Optional[Tensor], counts: Tensor,
                     iters: int = 3) -> Tensor:
    """The transport plan of SALAD, scaled by ``n + m``: (B, m + 1, n), the dustbin's row last; zero at invalid
    columns.

    ``scores`` S (B, m, n), ``dust_bin`` z (0-d), ``valid`` (B, 1, n) 1 / 0 weights of the valid tokens (None: all
    valid), ``counts`` (B, 1) the number n_b of valid tokens of each image. With ``S~ = [S; z 1^T]`` ((m + 1) x n),
    row marginals ``a = [1/(n+m)] * m ++ [(n - m)/(n+m)]`` (the dustbin takes the excess mass) and column marginals
    ``b = 1/(n+m)``, ``iters`` log-domain Sinkhorn steps from ``u = v = 0``:
    ``u <- log a - logsumexp_i(S~ + v)``, ``v <- log b - logsumexp_k(S~ + u)``; the plan is
    ``(n + m) exp(S~ + u 1^T + 1 v^T)``. Each image uses its own n_b, so a padded image with its mask gets the plan
    of the unpadded one.

    n_b <= m (the paper's ``log(n - m)`` is undefined): the dustbin's mass ``max(n - m, 0)`` is zero, its row
    ``-inf`` in the log domain (zero in the plan); the last (column) step still gives every token unit mass over
    the m clusters. That is the limit n -> m+ of the paper's plan, finite, never NaN — but outside what a trained
    model has seen (use maps with more valid tokens than clusters).
    """
    batch, clusters, tokens = scores.shape
    work = accumulation_dtype(scores)
    rows = torch.cat([work, dust_bin.to(work.dtype).expand(batch, 1, tokens)], dim=1)      # (B, m + 1, n)
    counts = counts.to(work.dtype)
    log_norm = -torch.log(counts + clusters)                                                  # (B, 1)
    dustbin_mass = torch.log(torch.clamp(counts - clusters, min=0.0))                        # -inf when n <= m
    log_a = torch.cat([log_norm.expand(batch, clusters), log_norm + dustbin_mass], dim=1)   # (B, m + 1)
    log_b = log_norm                                                                          # (B, 1), every column
    keep: Optional[Tensor] = None
    if valid is not None:
        keep = valid > 0
        rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    u = torch.zeros_like(log_a)
    v = torch.zeros((batch, tokens), dtype=rows.dtype, device=rows.device)
    for _ in range(iters):
        over_tokens = rows + v.unsqueeze(1)
        if keep is not None:  # invalid columns take no part in a row's sum
            over_tokens = torch.where(keep, over_tokens, torch.full((), -math.inf, dtype=rows.dtype,
                                                                    device=rows.device))
        u = log_a - torch.logsumexp(over_tokens, dim=2)
        v = log_b - torch.logsumexp(rows + u.unsqueeze(2), dim=1)
    plan = torch.exp(rows + u.unsqueeze(2) + v.unsqueeze(1) - log_norm.unsqueeze(2))
    if keep is not None:
        plan = torch.where(keep, plan, torch.zeros((), dtype=plan.dtype, device=plan.device))
    return plan


def salad_scores_and_features(tokens: Tensor, hidden_weight: Tensor, hidden_bias: Tensor, score_weight: Tensor,
                              score_bias: Tensor, feature_weight: Tensor, feature_bias: Tensor, dropout: float = 0.0,
                              training: bool = False) -> Tuple[Tensor, Tensor]:
    """The two token MLPs of SALAD with their first layers as one product: ``h = ReLU(drop(W_h x + b_h))`` with
    ``W_h`` = [score rows; feature rows] (2 * 512, C); the first half of ``h`` gives the scores ``S = W_s h_s + b_s``
    (B, n, m), the second the features ``f = W_f h_f + b_f`` (B, n, l). ``tokens`` (B, n, C). Dropout (train mode
    only) draws an independent mask per hidden unit, as the authors' two dropout calls do; its 1 / (1 - p) scale
    multiplies ``W_s``, ``W_f`` rather than h (:func:`~aggnets.functional.dropout.relu_dropout`)."""
    hidden, scale = relu_dropout(F.linear(tokens, hidden_weight, hidden_bias), dropout, training)
    score_hidden, feature_hidden = hidden.split(score_weight.shape[1], dim=-1)  # split: its backward is one cat
    if scale != 1.0:
        score_weight, feature_weight = score_weight * scale, feature_weight * scale
    return F.linear(score_hidden, score_weight, score_bias), F.linear(feature_hidden, feature_weight, feature_bias)


def salad_plan(scores: Tensor, dust_bin: Tensor, mask: Optional[Tensor], iters: int = 3) -> Tensor:
    """The scaled plan (B, m + 1, n) of :func:`sinkhorn_dustbin` for scores (B, n, m) of the tokens of a
    (B, C, H, W) map restricted to ``mask`` (B, H, W)."""
    batch, tokens, _ = scores.shape
    if mask is None:
        valid = None
        if is_tracing():  # n from the graph's shape, not a Python constant (ONNX / torch.export with dynamic H, W)
            counts = torch.ones_like(accumulation_dtype(scores)[:, :, :1]).sum(dim=1)
        else:
            counts = torch.full((batch, 1), float(tokens), dtype=accumulation_dtype(scores).dtype,
                                device=scores.device)
    else:
        valid = mask.flatten(1).unsqueeze(1).to(accumulation_dtype(scores).dtype)             # (B, 1, n)
        counts = valid.sum(dim=2)
    return sinkhorn_dustbin(scores.transpose(1, 2), dust_bin, valid, counts, iters)


def salad(x: Tensor, token: Tensor, hidden_weight: Tensor, hidden_bias: Tensor, score_weight: Tensor,
          score_bias: Tensor, feature_weight: Tensor, feature_bias: Tensor, token_hidden_weight: Tensor,
          token_hidden_bias: Tensor, token_weight: Tensor, token_bias: Tensor, dust_bin: Tensor,
          mask: Optional[Tensor] = None, dropout: float = 0.0, training: bool = False, iters: int = 3) -> Tensor:
    """SALAD: ``f = L2([ L2(g); vec_l-major( L2-per-cluster( F P^T ) ) ])``.

    ``x`` (B, C, H, W) patch tokens, ``token`` (B, C) the global token t; ``S``, ``F`` from
    :func:`salad_scores_and_features` ((B, n, m), (B, n, l)), ``g = W_g2 ReLU(W_g1 t + b_g1) + b_g2`` (g), ``P`` the
    plan of :func:`sinkhorn_dustbin` without the dustbin row (B, m, n); ``V = F^T P^T`` (B, l, m): one batched
    matrix product, ``V_{j,k} = sum_i f_{j,i} P_{k,i}``. Each column ``V_{:,k}`` L2-normalised, flattened l-major
    (index ``j m + k``), concatenated after ``L2(g)``, L2. out_dim = m l + g. Masked tokens are zeroed before the
    MLPs and carry no mass in the plan.
    """
    x = zero_masked(accumulation_dtype(x), mask)
    tokens = x.flatten(2).transpose(1, 2)                                                     # (B, n, C)
    scores, features = salad_scores_and_features(tokens, hidden_weight, hidden_bias, score_weight, score_bias,
                                                 feature_weight, feature_bias, dropout, training)
    plan = salad_plan(scores, dust_bin, mask, iters)[:, :-1]                                 # (B, m, n)
    features = accumulation_dtype(features)
    clusters = bmm_full_range(features.transpose(1, 2), flush_tiny(plan).to(features.dtype).transpose(1, 2))  # (B, l, m)
    clusters = l2_normalize(accumulation_dtype(clusters).to(features.dtype), dim=1).flatten(1)
    scene = F.linear(torch.relu(F.linear(accumulation_dtype(token), token_hidden_weight, token_hidden_bias)),
                     token_weight, token_bias)
    scene = l2_normalize(accumulation_dtype(scene), dim=-1).to(clusters.dtype)
    return l2_normalize(torch.cat([scene, clusters], dim=1), dim=-1)
