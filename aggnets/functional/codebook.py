"""Codebook encodings written as matrix products: NetVLAD / VLAD, soft / hard bag-of-features, Fisher vectors.

Descriptors are the columns of ``X`` (B, C, N) from :func:`flatten_positions`; an assignment is ``A`` (B, K, N).
No per-cluster loop and no (B, K, C, N) residual tensor: ``sum_n a_k(x_n)(x_n - c_k) = (A X^T)_k - (A 1)_k c_k``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking import flatten_positions
from .norm import accumulation_dtype, l2_normalize, signed_power

__all__ = ["assign", "netvlad", "netbof", "gmm_log_posteriors", "fisher_vector", "netfv"]


def _left_multiply(matrix: Tensor, batch: Tensor) -> Tensor:
    """``matrix`` (K, D) times every ``batch[b]`` (D, N) -> (B, K, N) as one batched GEMM on the (B, D, N) layout
    (``torch.matmul`` would fold the batch and copy a transposed (B * N, D) operand)."""
    return torch.bmm(matrix.unsqueeze(0).expand(batch.shape[0], -1, -1), batch)


def assign(descriptors: Tensor, weight: Tensor, bias: Optional[Tensor], hard: bool = False,
           valid: Optional[Tensor] = None) -> Tensor:
    """Cluster assignment ``A`` (B, K, N) of descriptors (B, C, N) by a linear score ``w_k^T x + b_k``.

    Soft: ``softmax_k``; hard: one-hot of the arg-max (nearest centroid when ``w_k = 2 c_k``, ``b_k = -||c_k||^2``).
    ``valid`` (B, 1, N) zeroes the columns of masked positions.
    """
    logits = _left_multiply(weight.to(descriptors.dtype), descriptors)
    if bias is not None:
        logits = logits + bias.to(descriptors.dtype).unsqueeze(-1)
    logits = accumulation_dtype(logits)
    if hard:
        assignment = _hard_assignment(logits)
    else:
        assignment = logits.softmax(dim=1)
    if valid is not None:
        assignment = assignment * valid
    return assignment


def _hard_assignment(logits: Tensor) -> Tensor:
    assignment = F.one_hot(logits.argmax(dim=1), logits.shape[1]).transpose(1, 2).to(logits.dtype)
    # arg-max silently picks a cluster for a NaN descriptor; keep the NaN visible instead
    return torch.where(torch.isnan(logits).any(dim=1, keepdim=True),
                       torch.full((), float("nan"), dtype=logits.dtype, device=logits.device), assignment)


def _vlad_core_reference(descriptors: Tensor, weight: Tensor, bias: Optional[Tensor], centroids: Tensor,
                         valid: Optional[Tensor], normalize_input: bool, hard: bool) -> Tensor:
    """``V = A X^T - (A 1) c`` (B, K, C) with plain autograd (used for inference, autocast and as the reference)."""
    if normalize_input:
        descriptors = l2_normalize(descriptors, dim=1)
    assignment = assign(descriptors, weight, bias, hard, valid)
    vlad = torch.bmm(descriptors, assignment.transpose(1, 2)).transpose(1, 2)
    return accumulation_dtype(vlad) - assignment.sum(dim=-1, keepdim=True) * centroids.to(assignment.dtype)


class _VLADCore(torch.autograd.Function):
    """``V = A X^T - (A 1) c`` with ``A = softmax(W X + b)`` on optionally L2-normalised ``X``, with a hand-written
    backward: three GEMMs (one of them with the two right-hand sides stacked) and three element-wise sweeps over the
    (B, C, N) descriptors, instead of autograd's ~15 sweeps. Same values and gradients as
    :func:`_vlad_core_reference` (checked by gradcheck in the tests)."""

    @staticmethod
    def forward(ctx, descriptors, weight, bias, centroids, valid, normalize_input, hard):
        inverse_norm = None
        if normalize_input:
            inverse_norm = torch.linalg.vector_norm(descriptors, dim=1, keepdim=True).clamp_min(1e-12).reciprocal()
            descriptors = descriptors * inverse_norm
        logits = _left_multiply(weight, descriptors)
        if bias is not None:
            logits = logits + bias.unsqueeze(-1)
        assignment = _hard_assignment(logits) if hard else logits.softmax(dim=1)
        if valid is not None:
            assignment = assignment * valid
        mass = assignment.sum(dim=-1, keepdim=True)                                        # (B, K, 1)
        vlad = torch.bmm(descriptors, assignment.transpose(1, 2)).transpose(1, 2) - mass * centroids
        ctx.save_for_backward(descriptors, inverse_norm, weight, centroids, assignment, mass)
        ctx.hard, ctx.has_bias = hard, bias is not None
        return vlad

    @staticmethod
    def backward(ctx, grad_vlad):
        descriptors, inverse_norm, weight, centroids, assignment, mass = ctx.saved_tensors
        needs_x, needs_w, needs_b, needs_c = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = grad_c = None
        if needs_c:
            grad_c = -(mass * grad_vlad).sum(dim=0)
        grad_logits = None
        if not ctx.hard and (needs_x or needs_w or needs_b):
            grad_assignment = torch.bmm(grad_vlad, descriptors) - (grad_vlad * centroids).sum(dim=-1, keepdim=True)
            grad_logits = assignment * (grad_assignment - (assignment * grad_assignment).sum(dim=1, keepdim=True))
            if needs_w:
                grad_w = torch.bmm(grad_logits, descriptors.transpose(1, 2)).sum(dim=0)
            if needs_b and ctx.has_bias:
                grad_b = grad_logits.sum(dim=(0, 2))
        if needs_x:
            left = grad_vlad.transpose(1, 2)                                                 # (B, C, K)
            right = assignment
            if grad_logits is not None:
                left = torch.cat([left, weight.t().unsqueeze(0).expand(left.shape[0], -1, -1)], dim=2)
                right = torch.cat([assignment, grad_logits], dim=1)
            grad_x = torch.bmm(left, right)                                                  # (B, C, N)
            if inverse_norm is not None:
                projection = (descriptors * grad_x).sum(dim=1, keepdim=True)
                grad_x = torch.addcmul(grad_x, descriptors, projection, value=-1.0).mul_(inverse_norm)
        return grad_x, grad_w, grad_b, grad_c, None, None, None


def _needs_fast_backward(*tensors: Optional[Tensor]) -> bool:
    if not torch.is_grad_enabled() or torch.is_autocast_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def netvlad(x: Tensor, weight: Tensor, bias: Optional[Tensor], centroids: Tensor, mask: Optional[Tensor] = None,
            hard: bool = False, normalize_input: bool = True, intra_norm: bool = True,
            power: Optional[float] = None) -> Tensor:
    """NetVLAD (Arandjelović et al., CVPR 2016) and, with ``hard=True``, VLAD (Jégou et al., CVPR 2010).

    ``V_k = sum_n a_k(x_n) (x_n - c_k)`` with ``a_k(x) = softmax_k(w_k^T x + b_k)`` (or its arg-max one-hot),
    optionally on L2-normalised inputs; then optional signed power, optional intra-normalisation (per-k L2), and L2 of
    the flattened (K * C) vector, k-major. ``weight`` (K, C), ``bias`` (K,) or None, ``centroids`` (K, C).
    Training uses a hand-written backward (:class:`_VLADCore`); inference and autocast use plain autograd ops.
    """
    descriptors, valid, _ = flatten_positions(accumulation_dtype(x), mask)
    dtype = descriptors.dtype
    weight, centroids = weight.to(dtype), centroids.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    if _needs_fast_backward(descriptors, weight, bias, centroids):
        vlad = _VLADCore.apply(descriptors, weight, bias, centroids, valid, normalize_input, hard)
    else:
        vlad = _vlad_core_reference(descriptors, weight, bias, centroids, valid, normalize_input, hard)
    if power is not None and power != 1:
        vlad = signed_power(vlad, power)
    if intra_norm:
        vlad = l2_normalize(vlad, dim=-1)
    return l2_normalize(vlad.flatten(1), dim=-1)


def netbof(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor] = None, hard: bool = False,
           normalize_input: bool = False) -> Tensor:
    """Soft-assignment bag-of-features ``h_k = (1/N) sum_n a_k(x_n)`` (NetBoF / SoftDBoW, Miech et al. 2017).

    With ``hard=True`` it is the classical BoF histogram (Sivic & Zisserman 2003; Csurka et al. 2004): counts of
    nearest centroids divided by N, i.e. L1-normalised.
    """
    descriptors, valid, counts = flatten_positions(accumulation_dtype(x), mask)
    if normalize_input:
        descriptors = l2_normalize(descriptors, dim=1)
    return assign(descriptors, weight, bias, hard, valid).sum(dim=-1) / counts


def gmm_log_posteriors(descriptors: Tensor, log_weights: Tensor, means: Tensor, log_vars: Tensor,
                       stacked: Optional[Tensor] = None) -> Tensor:
    """Log-posteriors ``log gamma_n(k)`` (B, K, N) of a diagonal GMM for descriptors (B, C, N).

    ``log_weights`` (K,) are normalised with log-softmax; ``means``, ``log_vars`` (K, C). The quadratic form
    ``sum_c (x_c - mu_kc)^2 / s_kc^2`` is expanded into one matrix product with ``stacked = [X; X^2]`` (B, 2C, N).
    """
    if stacked is None:
        stacked = torch.cat([descriptors, descriptors * descriptors], dim=1)
    precision = torch.exp(-log_vars)
    quadratic_weight = torch.cat([-2.0 * means * precision, precision], dim=1)            # (K, 2C)
    constant = (means * means * precision + log_vars).sum(dim=1) + means.shape[1] * math.log(2 * math.pi)
    log_likelihood = -0.5 * (_left_multiply(quadratic_weight, stacked) + constant.unsqueeze(-1))
    return (log_likelihood + torch.log_softmax(log_weights, dim=0).unsqueeze(-1)).log_softmax(dim=1)


def fisher_vector(stacked: Tensor, posteriors: Tensor, counts: Tensor, log_weights: Tensor, means: Tensor,
                  log_vars: Tensor) -> Tensor:
    """Fisher vector gradients ``[G^mu, G^sigma]`` (B, 2, K, C) (Perronnin & Dance 2007; Perronnin et al. 2010).

    ``G^mu_k = 1/(N sqrt(w_k)) sum_n gamma_n(k) (x_n - mu_k) / sigma_k``,
    ``G^sigma_k = 1/(N sqrt(2 w_k)) sum_n gamma_n(k) [(x_n - mu_k)^2 / sigma_k^2 - 1]``, from the zeroth, first and
    second order statistics ``S0 = gamma 1``, ``[S1, S2] = gamma [X; X^2]^T`` (one matrix product).
    """
    channels = means.shape[1]
    zeroth = posteriors.sum(dim=-1).unsqueeze(-1)                                          # (B, K, 1)
    first, second = torch.matmul(posteriors, stacked.transpose(1, 2)).split(channels, dim=-1)
    precision = torch.exp(-log_vars)
    weights = torch.softmax(log_weights, dim=0).unsqueeze(-1)                              # (K, 1)
    scale = 1.0 / (counts.unsqueeze(-1) * weights.sqrt())                                  # (B, K, 1)
    g_mu = (first - zeroth * means) * precision.sqrt() * scale
    g_sigma = ((second - 2.0 * first * means + zeroth * means * means) * precision - zeroth) * (scale / math.sqrt(2))
    return torch.stack([g_mu, g_sigma], dim=1)


def netfv(x: Tensor, log_weights: Tensor, means: Tensor, log_vars: Tensor, mask: Optional[Tensor] = None,
          power: Optional[float] = 0.5) -> Tensor:
    """Fisher vector of a feature map under a diagonal GMM, with its own posteriors as the soft assignment.

    Improved FV (Perronnin et al., ECCV 2010): signed power (``power``, 0.5 = signed square root) then L2 of the
    flattened ``[G^mu; G^sigma]`` (2 * K * C). Differentiable in the input and in every GMM parameter (NetFV).
    Runs in float32 (or float64) even under autocast: the expanded quadratic forms cancel badly in half precision.
    """
    device_type = x.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        descriptors, valid, counts = flatten_positions(accumulation_dtype(x), mask)
        dtype = descriptors.dtype
        log_weights, means, log_vars = log_weights.to(dtype), means.to(dtype), log_vars.to(dtype)
        stacked = torch.cat([descriptors, descriptors * descriptors], dim=1)
        posteriors = gmm_log_posteriors(descriptors, log_weights, means, log_vars, stacked).exp()
        if valid is not None:
            posteriors = posteriors * valid
        fv = fisher_vector(stacked, posteriors, counts, log_weights, means, log_vars).flatten(1)
        if power is not None and power != 1:
            fv = signed_power(fv, power)
        return l2_normalize(fv, dim=-1)
