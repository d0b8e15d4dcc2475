"""Codebook encodings written as matrix products: NetVLAD / VLAD, soft / hard bag-of-features, Fisher vectors.

Descriptors are the columns of ``X`` (B, C, N) from :func:`flatten_positions`; an assignment is ``A`` (B, K, N).
No per-cluster loop and no (B, K, C, N) residual tensor: ``sum_n a_k(x_n)(x_n - c_k) = (A X^T)_k - (A 1)_k c_k``.

Every soft assignment and every gradient of its logits goes through :func:`~aggnets.functional.precision.flush_tiny`
before it reaches a matrix product (forward, the hand-written backward and the plain-autograd path): subnormal
operands slow MKL's GEMM down ~100x on Intel cores, and the values flushed are far below float32's resolution.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking import flatten_positions
from .norm import accumulation_dtype, l2_normalize, signed_power
from .precision import autocast_enabled, bmm_full_range, flush_tiny, flush_tiny_values

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
    ``valid`` (B, 1, N) zeroes the columns of masked positions. Soft values below 2^-100 (float64: 2^-1000) are zero,
    and so are those of the gradient of the logits (:func:`~aggnets.functional.precision.flush_tiny`).
    """
    logits = _left_multiply(weight.to(descriptors.dtype), descriptors)
    if bias is not None:
        logits = logits + bias.to(descriptors.dtype).unsqueeze(-1)
    logits = accumulation_dtype(logits)
    if hard:
        assignment = _hard_assignment(logits)
    else:
        assignment = soft_assignment(logits)
    if valid is not None:
        assignment = assignment * valid
    return assignment


def soft_assignment(logits: Tensor) -> Tensor:
    """``flush_tiny(softmax_k(logits))`` over dim 1, whose backward flushes the gradient of the logits too (eager and
    ``torch.compile``; TorchScript, which cannot compile a custom ``autograd.Function``, flushes the forward only)."""
    if torch.jit.is_scripting():
        return flush_tiny(logits.softmax(dim=1))
    return _FlushedSoftmax.apply(logits)


class _FlushedSoftmax(torch.autograd.Function):
    """``a = flush_tiny(softmax_k(l))``; backward ``flush_tiny(a * (g - sum_k a g))``, the softmax gradient with the
    same flush, so that the gradient of the logits reaches the GEMMs of the assignment's backward without subnormals
    (autograd's softmax backward would multiply the unflushed ``a`` by ``-sum_k a g``)."""

    @staticmethod
    def forward(ctx, logits):
        assignment = flush_tiny(logits.softmax(dim=1))
        ctx.save_for_backward(assignment)
        return assignment

    @staticmethod
    def backward(ctx, grad):
        assignment, = ctx.saved_tensors
        return flush_tiny(_softmax_gradient(grad, assignment))


def _softmax_gradient(grad: Tensor, assignment: Tensor) -> Tensor:
    """``a * (g - sum_k a g)`` over dim 1 (the softmax backward given its output ``a``), as aten's fused kernel."""
    return torch.ops.aten._softmax_backward_data(grad, assignment, 1, grad.dtype)


def _hard_assignment(logits: Tensor) -> Tensor:
    assignment = F.one_hot(logits.argmax(dim=1), logits.shape[1]).transpose(1, 2).to(logits.dtype)
    # arg-max silently picks a cluster for a NaN descriptor; keep the NaN visible instead
    return torch.where(torch.isnan(logits).any(dim=1, keepdim=True),
                       torch.full((), float("nan"), dtype=logits.dtype, device=logits.device), assignment)


def _statistics_reference(descriptors: Tensor, weight: Tensor, bias: Optional[Tensor], valid: Optional[Tensor],
                          normalize_input: bool, hard: bool, with_squares: bool,
                          ghosts: int = 0) -> tuple[Tensor, Tensor]:
    """Plain-autograd :class:`_AssignmentStatistics` (used for inference and autocast, and as its reference)."""
    if normalize_input:
        descriptors = l2_normalize(descriptors, dim=1)
    if with_squares:
        descriptors = torch.cat([descriptors, descriptors * descriptors], dim=1)
    assignment = assign(descriptors, weight, bias, hard, valid)
    if ghosts > 0:
        assignment = assignment[:, :assignment.shape[1] - ghosts]
    statistics = bmm_full_range(descriptors, assignment.transpose(1, 2)).transpose(1, 2)
    return assignment.sum(dim=-1), accumulation_dtype(statistics)


class _AssignmentStatistics(torch.autograd.Function):
    """Zeroth and first order statistics of a soft (or hard) assignment: ``mass = A 1`` (B, K) and
    ``stats = A Z^T`` (B, K, D) with ``A = softmax_k(W Z + b)`` (masked columns zeroed), where ``Z`` is the
    descriptors, optionally L2-normalised, optionally stacked with their squares ``[X; X^2]`` (Fisher vectors).
    ``ghosts`` > 0 (GhostVLAD): the soft-max runs over all rows of ``W`` but the last ``ghosts`` clusters are left out
    of ``mass`` and ``stats``. ``A`` and the gradient of the logits are flushed (:func:`flush_tiny`).

    Hand-written backward: three GEMMs (the two right-hand sides of ``dZ = [dS^T | W^T] [A; dL]`` stacked into one)
    and a few element-wise sweeps over the (B, C, N) descriptors, instead of autograd's gradient accumulations and
    normalisation graph. Values and gradients equal :func:`_statistics_reference` (gradcheck in the tests).
    """

    @staticmethod
    def forward(ctx, descriptors, weight, bias, valid, normalize_input, hard, with_squares, ghosts=0):
        inverse_norm = None
        if normalize_input:
            inverse_norm = torch.linalg.vector_norm(descriptors, dim=1, keepdim=True).clamp_min(1e-12).reciprocal()
            descriptors = descriptors * inverse_norm
        stacked = torch.cat([descriptors, descriptors * descriptors], dim=1) if with_squares else descriptors
        logits = _left_multiply(weight, stacked)
        if bias is not None:
            logits = logits + bias.unsqueeze(-1)
        assignment = _hard_assignment(logits) if hard else flush_tiny(logits.softmax(dim=1))
        if valid is not None:
            assignment = assignment * valid
        kept = assignment[:, :assignment.shape[1] - ghosts] if ghosts > 0 else assignment
        statistics = torch.bmm(stacked, kept.transpose(1, 2)).transpose(1, 2)
        ctx.save_for_backward(stacked, inverse_norm, weight, assignment)
        ctx.hard, ctx.has_bias, ctx.with_squares, ctx.ghosts = hard, bias is not None, with_squares, ghosts
        mass = kept.sum(dim=-1)
        if hard:
            ctx.mark_non_differentiable(mass)
        return mass, statistics

    @staticmethod
    def backward(ctx, grad_mass, grad_statistics):
        stacked, inverse_norm, weight, assignment = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        batch, ghosts = stacked.shape[0], ctx.ghosts
        kept = assignment[:, :assignment.shape[1] - ghosts] if ghosts > 0 else assignment
        if grad_mass is None:
            grad_mass = torch.zeros(kept.shape[:2], dtype=assignment.dtype, device=assignment.device)
        if grad_statistics is None:
            grad_statistics = torch.zeros(batch, kept.shape[1], stacked.shape[1], dtype=stacked.dtype,
                                          device=stacked.device)
        grad_assignment = None
        if not ctx.hard and (needs_x or needs_w or needs_b):
            # the ghosts' assignments get a zero gradient
            grad_assignment = torch.bmm(grad_statistics, stacked) + grad_mass.unsqueeze(-1)
            if ghosts > 0:
                grad_assignment = torch.cat([grad_assignment, grad_assignment.new_zeros(batch, ghosts,
                                                                                        grad_assignment.shape[2])],
                                            dim=1)
        grad_x, grad_w, grad_b = backward_through_assignment(grad_assignment, assignment, stacked, weight,
                                                             grad_statistics, kept, needs_x, needs_w,
                                                             needs_b and ctx.has_bias)
        if needs_x:
            if ctx.with_squares:
                channels = stacked.shape[1] // 2
                descriptors = stacked[:, :channels]
                grad_x = torch.addcmul(grad_x[:, :channels], descriptors, grad_x[:, channels:], value=2.0)
            else:
                descriptors = stacked
            if inverse_norm is not None:
                projection = (descriptors * grad_x).sum(dim=1, keepdim=True)
                grad_x = torch.addcmul(grad_x, descriptors, projection, value=-1.0).mul_(inverse_norm)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def backward_through_assignment(grad_assignment: Optional[Tensor], assignment: Tensor, descriptors: Tensor,
                                weight: Tensor, grad_statistics: Tensor, aggregated: Tensor, needs_x: bool,
                                needs_w: bool, needs_b: bool) -> tuple[Optional[Tensor], Optional[Tensor],
                                                                       Optional[Tensor]]:
    """The gradients of ``statistics = aggregated Z^T`` with ``aggregated`` a function of the assignment
    ``A = softmax_k(W Z + b)``, given ``dA`` (``grad_assignment`` (B, K', N); None for a hard assignment, which passes
    no gradient to ``W``, ``b``): ``dL = flush_tiny(A * (dA - sum_k A dA))``, ``dW = dL Z^T``, ``db = dL 1`` and
    ``dZ = [dS^T | W^T] [aggregated; dL]`` (the two right-hand sides stacked into one GEMM). ``descriptors`` Z
    (B, D, N), ``weight`` W (K', D), ``grad_statistics`` dS (B, K, D), ``aggregated`` (B, K, N) (K <= K': ghosts)."""
    grad_x = grad_w = grad_b = grad_logits = None
    if grad_assignment is not None:
        grad_logits = flush_tiny(_softmax_gradient(grad_assignment, assignment))
        if needs_w:
            grad_w = torch.bmm(grad_logits, descriptors.transpose(1, 2)).sum(dim=0)
        if needs_b:
            grad_b = grad_logits.sum(dim=(0, 2))
    if needs_x:
        left, right = grad_statistics.transpose(1, 2), aggregated                          # (B, D, K), (B, K, N)
        if grad_logits is not None:
            left = torch.cat([left, weight.t().unsqueeze(0).expand(descriptors.shape[0], -1, -1)], dim=2)
            right = torch.cat([aggregated, grad_logits], dim=1)
        grad_x = torch.bmm(left, right)                                                     # (B, D, N)
    return grad_x, grad_w, grad_b


def _needs_fast_backward(*tensors: Optional[Tensor]) -> bool:
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_grad_enabled() or autocast_enabled(device_type):
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def assignment_statistics(descriptors: Tensor, weight: Tensor, bias: Optional[Tensor], valid: Optional[Tensor] = None,
                          normalize_input: bool = False, hard: bool = False, with_squares: bool = False,
                          ghosts: int = 0) -> tuple[Tensor, Tensor]:
    """``(A 1, A Z^T)`` for descriptors (B, C, N): see :class:`_AssignmentStatistics`. Training uses the hand-written
    backward; inference, autocast and TorchScript (which cannot compile a custom ``autograd.Function``) use plain
    autograd ops with the same values. ``ghosts``: the last ``ghosts`` rows of ``weight`` (and ``bias``) are ghost
    clusters, in the soft-max but not in the returned (B, K) mass and (B, K, D) statistics."""
    if not torch.jit.is_scripting():
        if _needs_fast_backward(descriptors, weight, bias):
            return _AssignmentStatistics.apply(descriptors, weight, bias, valid, normalize_input, hard, with_squares,
                                               ghosts)
    return _statistics_reference(descriptors, weight, bias, valid, normalize_input, hard, with_squares, ghosts)


def netvlad(x: Tensor, weight: Tensor, bias: Optional[Tensor], centroids: Optional[Tensor],
            mask: Optional[Tensor] = None, hard: bool = False, normalize_input: bool = True, intra_norm: bool = True,
            power: Optional[float] = None, ghost_clusters: int = 0) -> Tensor:
    """NetVLAD (Arandjelović et al., CVPR 2016) and, with ``hard=True``, VLAD (Jégou et al., CVPR 2010).

    ``V_k = sum_n a_k(x_n) (x_n - c_k)`` with ``a_k(x) = softmax_k(w_k^T x + b_k)`` (or its arg-max one-hot),
    optionally on L2-normalised inputs; then optional signed power, optional intra-normalisation (per-k L2), and L2 of
    the flattened (K * C) vector, k-major. ``weight`` (K + G, C), ``bias`` (K + G,) or None, ``centroids`` (K, C).

    ``ghost_clusters`` G > 0 (GhostVLAD, Zhong, Arandjelović & Zisserman, ACCV 2018): the soft-max runs over the
    K + G rows of ``weight``, the last G (the ghosts) are dropped from the aggregation. ``centroids=None``
    (SuperVLAD, Lu et al., NeurIPS 2024): no residual, ``V_k = sum_n a_k(x_n) x_n``.
    """
    descriptors, valid, _ = flatten_positions(accumulation_dtype(x), mask)
    dtype = descriptors.dtype
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    mass, first = assignment_statistics(descriptors, weight, bias, valid, normalize_input, hard,
                                        ghosts=ghost_clusters)
    if centroids is not None:
        vlad = first - mass.unsqueeze(-1) * centroids.to(dtype)
    else:
        vlad = first
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
    ``W``'s entries below 2^-100 (float64: 2^-1000) are zero (a mean fitted by EM can be subnormal), with the exact
    gradient (:func:`~aggnets.functional.precision.flush_tiny_values`).
    """
    precision = torch.exp(-log_vars)
    weight = flush_tiny_values(torch.cat([means * precision, -0.5 * precision], dim=1))
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
