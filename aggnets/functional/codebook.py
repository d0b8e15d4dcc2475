"""Codebook encodings written as matrix products: NetVLAD / VLAD, soft / hard bag-of-features, Fisher vectors.

Descriptors are the columns of ``X`` (B, C, N) from :func:`flatten_positions`; an assignment is ``A`` (B, K, N).
No per-cluster loop and no (B, K, C, N) residual tensor: ``sum_n a_k(x_n)(x_n - c_k) = (A X^T)_k - (A 1)_k c_k``.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking import flatten_positions
from .norm import accumulation_dtype, l2_normalize, signed_power
from .precision import autocast_enabled, bmm_full_range

__all__ = ["assign", "assignment_statistics", "netvlad", "netbof", "gmm_assignment", "gmm_log_posteriors",
           "fisher_vector", "netfv"]


def _left_multiply(matrix: Tensor, batch: Tensor) -> Tensor:
    """``matrix`` (K, D) times every ``batch[b]`` (D, N) -> (B, K, N) as one batched GEMM on the (B, D, N) layout
    (``torch.matmul`` would fold the batch and copy a transposed (B * N, D) operand)."""
    return bmm_full_range(matrix.unsqueeze(0).expand(batch.shape[0], -1, -1), batch)


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


def _statistics_reference(descriptors: Tensor, weight: Tensor, bias: Optional[Tensor], valid: Optional[Tensor],
                          normalize_input: bool, hard: bool, with_squares: bool) -> tuple[Tensor, Tensor]:
    """Plain-autograd :class:`_AssignmentStatistics` (used for inference and autocast, and as its reference)."""
    if normalize_input:
        descriptors = l2_normalize(descriptors, dim=1)
    if with_squares:
        descriptors = torch.cat([descriptors, descriptors * descriptors], dim=1)
    assignment = assign(descriptors, weight, bias, hard, valid)
    statistics = bmm_full_range(descriptors, assignment.transpose(1, 2)).transpose(1, 2)
    return assignment.sum(dim=-1), accumulation_dtype(statistics)


class _AssignmentStatistics(torch.autograd.Function):
    """Zeroth and first order statistics of a soft (or hard) assignment: ``mass = A 1`` (B, K) and
    ``stats = A Z^T`` (B, K, D) with ``A = softmax_k(W Z + b)`` (masked columns zeroed), where ``Z`` is the
    descriptors, optionally L2-normalised, optionally stacked with their squares ``[X; X^2]`` (Fisher vectors).

    Hand-written backward: three GEMMs (the two right-hand sides of ``dZ = [dS^T | W^T] [A; dL]`` stacked into one)
    and a few element-wise sweeps over the (B, C, N) descriptors, instead of autograd's gradient accumulations and
    normalisation graph. Values and gradients equal :func:`_statistics_reference` (gradcheck in the tests).
    """

    @staticmethod
    def forward(ctx, descriptors, weight, bias, valid, normalize_input, hard, with_squares):
        inverse_norm = None
        if normalize_input:
            inverse_norm = torch.linalg.vector_norm(descriptors, dim=1, keepdim=True).clamp_min(1e-12).reciprocal()
            descriptors = descriptors * inverse_norm
        stacked = torch.cat([descriptors, descriptors * descriptors], dim=1) if with_squares else descriptors
        logits = _left_multiply(weight, stacked)
        if bias is not None:
            logits = logits + bias.unsqueeze(-1)
        assignment = _hard_assignment(logits) if hard else logits.softmax(dim=1)
        if valid is not None:
            assignment = assignment * valid
        statistics = torch.bmm(stacked, assignment.transpose(1, 2)).transpose(1, 2)
        ctx.save_for_backward(stacked, inverse_norm, weight, assignment)
        ctx.hard, ctx.has_bias, ctx.with_squares = hard, bias is not None, with_squares
        mass = assignment.sum(dim=-1)
        if hard:
            ctx.mark_non_differentiable(mass)
        return mass, statistics

    @staticmethod
    def backward(ctx, grad_mass, grad_statistics):
        stacked, inverse_norm, weight, assignment = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        batch = stacked.shape[0]
        if grad_mass is None:
            grad_mass = torch.zeros(assignment.shape[:2], dtype=assignment.dtype, device=assignment.device)
        if grad_statistics is None:
            grad_statistics = torch.zeros(batch, assignment.shape[1], stacked.shape[1], dtype=stacked.dtype,
                                          device=stacked.device)
        grad_logits = None
        if not ctx.hard and (needs_x or needs_w or needs_b):
            grad_assignment = torch.bmm(grad_statistics, stacked) + grad_mass.unsqueeze(-1)
            grad_logits = assignment * (grad_assignment - (assignment * grad_assignment).sum(dim=1, keepdim=True))
            if needs_w:
                grad_w = torch.bmm(grad_logits, stacked.transpose(1, 2)).sum(dim=0)
            if needs_b and ctx.has_bias:
                grad_b = grad_logits.sum(dim=(0, 2))
        if needs_x:
            left, right = grad_statistics.transpose(1, 2), assignment                     # (B, D, K), (B, K, N)
            if grad_logits is not None:
                left = torch.cat([left, weight.t().unsqueeze(0).expand(batch, -1, -1)], dim=2)
                right = torch.cat([assignment, grad_logits], dim=1)
            grad_x = torch.bmm(left, right)                                                # (B, D, N)
            if ctx.with_squares:
                channels = stacked.shape[1] // 2
                descriptors = stacked[:, :channels]
                grad_x = torch.addcmul(grad_x[:, :channels], descriptors, grad_x[:, channels:], value=2.0)
            else:
                descriptors = stacked
            if inverse_norm is not None:
                projection = (descriptors * grad_x).sum(dim=1, keepdim=True)
                grad_x = torch.addcmul(grad_x, descriptors, projection, value=-1.0).mul_(inverse_norm)
        return grad_x, grad_w, grad_b, None, None, None, None


def _needs_fast_backward(*tensors: Optional[Tensor]) -> bool:
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_grad_enabled() or autocast_enabled(device_type):
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def assignment_statistics(descriptors: Tensor, weight: Tensor, bias: Optional[Tensor], valid: Optional[Tensor] = None,
                          normalize_input: bool = False, hard: bool = False, with_squares: bool = False
                          ) -> tuple[Tensor, Tensor]:
    """``(A 1, A Z^T)`` for descriptors (B, C, N): see :class:`_AssignmentStatistics`. Training uses the hand-written
    backward; inference, autocast and TorchScript (which cannot compile a custom ``autograd.Function``) use plain
    autograd ops with the same values."""
    if not torch.jit.is_scripting():
        if _needs_fast_backward(descriptors, weight, bias):
            return _AssignmentStatistics.apply(descriptors, weight, bias, valid, normalize_input, hard, with_squares)
    return _statistics_reference(descriptors, weight, bias, valid, normalize_input, hard, with_squares)


def netvlad(x: Tensor, weight: Tensor, bias: Optional[Tensor], centroids: Tensor, mask: Optional[Tensor] = None,
            hard: bool = False, normalize_input: bool = True, intra_norm: bool = True,
            power: Optional[float] = None) -> Tensor:
    """NetVLAD (Arandjelović et al., CVPR 2016) and, with ``hard=True``, VLAD (Jégou et al., CVPR 2010).

    ``V_k = sum_n a_k(x_n) (x_n - c_k)`` with ``a_k(x) = softmax_k(w_k^T x + b_k)`` (or its arg-max one-hot),
    optionally on L2-normalised inputs; then optional signed power, optional intra-normalisation (per-k L2), and L2 of
    the flattened (K * C) vector, k-major. ``weight`` (K, C), ``bias`` (K,) or None, ``centroids`` (K, C).
    """
    descriptors, valid, _ = flatten_positions(accumulation_dtype(x), mask)
    dtype = descriptors.dtype
    weight, centroids = weight.to(dtype), centroids.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    mass, first = assignment_statistics(descriptors, weight, bias, valid, normalize_input, hard)
    vlad = first - mass.unsqueeze(-1) * centroids
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


def gmm_assignment(log_weights: Tensor, means: Tensor, log_vars: Tensor) -> tuple[Tensor, Tensor]:
    """The diagonal-GMM posterior as a linear score on ``[X; X^2]``: ``log gamma_n(k) = log_softmax_k(W [x; x^2] + b)``
    with ``W = [mu / s^2, -1 / (2 s^2)]`` (K, 2C) and ``b_k = log w_k - (1/2) sum_c (mu^2 / s^2 + log s^2 + log 2 pi)``.
    """
    precision = torch.exp(-log_vars)
    weight = torch.cat([means * precision, -0.5 * precision], dim=1)
    constant = (means * means * precision + log_vars).sum(dim=1) + means.shape[1] * math.log(2 * math.pi)
    return weight, torch.log_softmax(log_weights, dim=0) - 0.5 * constant


def gmm_log_posteriors(descriptors: Tensor, log_weights: Tensor, means: Tensor, log_vars: Tensor) -> Tensor:
    """Log-posteriors ``log gamma_n(k)`` (B, K, N) of a diagonal GMM (``log_weights`` normalised by log-softmax,
    ``means``, ``log_vars`` (K, C)) for descriptors (B, C, N)."""
    weight, bias = gmm_assignment(log_weights, means, log_vars)
    stacked = torch.cat([descriptors, descriptors * descriptors], dim=1)
    return (_left_multiply(weight, stacked) + bias.unsqueeze(-1)).log_softmax(dim=1)


def fisher_vector(zeroth: Tensor, first: Tensor, second: Tensor, counts: Tensor, log_weights: Tensor, means: Tensor,
                  log_vars: Tensor) -> Tensor:
    """Fisher vector gradients ``[G^mu, G^sigma]`` (B, 2, K, C) (Perronnin & Dance 2007; Perronnin et al. 2010).

    ``G^mu_k = 1/(N sqrt(w_k)) sum_n gamma_n(k) (x_n - mu_k) / sigma_k``,
    ``G^sigma_k = 1/(N sqrt(2 w_k)) sum_n gamma_n(k) [(x_n - mu_k)^2 / sigma_k^2 - 1]``, from the posterior
    statistics ``zeroth = sum_n gamma`` (B, K), ``first = sum_n gamma x``, ``second = sum_n gamma x^2`` (B, K, C).
    """
    zeroth = zeroth.unsqueeze(-1)
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
    The posterior is a softmax of a linear score on ``[X; X^2]`` (:func:`gmm_assignment`), so the statistics are the
    same two GEMMs as NetVLAD's, with 2C rows. Runs in float32 (or float64) even under autocast: the expanded
    quadratic forms cancel badly in half precision.
    """
    # if / else: TorchScript compiles only the first branch (its autocast needs a device type known when compiling,
    # and scripted code ignored `autocast(enabled=False)` on CPU): call a scripted NetFV outside autocast.
    if torch.jit.is_scripting():
        return _netfv(x, log_weights, means, log_vars, mask, power)
    else:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _netfv(x, log_weights, means, log_vars, mask, power)


def _netfv(x: Tensor, log_weights: Tensor, means: Tensor, log_vars: Tensor, mask: Optional[Tensor],
           power: Optional[float]) -> Tensor:
    """:func:`netfv` outside autocast."""
    descriptors, valid, counts = flatten_positions(accumulation_dtype(x), mask)
    dtype = descriptors.dtype
    log_weights, means, log_vars = log_weights.to(dtype), means.to(dtype), log_vars.to(dtype)
    weight, bias = gmm_assignment(log_weights, means, log_vars)
    zeroth, statistics = assignment_statistics(descriptors, weight, bias, valid, with_squares=True)
    first, second = statistics.split(means.shape[1], dim=-1)
    fv = fisher_vector(zeroth, first, second, counts, log_weights, means, log_vars).flatten(1)
    if power is not None and power != 1:
        fv = signed_power(fv, power)
    return l2_normalize(fv, dim=-1)
