"""CRN: NetVLAD whose soft assignment is reweighted by a contextual reweighting network (Kim, Dunn & Frahm, CVPR 2017).

``V_k = sum_n m_n a_k(x_n) (x_n - c_k)``: the context weight ``m_n >= 0`` of every position comes from a small
network on the (L2-normalised) map, and V is NetVLAD's two matrix products on the reweighted assignment ``A * m``:
``V = (A * m) X^T - ((A * m) 1) c`` (no per-cluster loop, no (B, K, C, N) residual tensor).

The context network, in the layout of the authors' code (``CRNModule`` of gmberton/deep-visual-geo-localization-
benchmark): 3 x 3 average pooling with stride 2 (no padding, ceil mode: the last window is clipped to the map), three
parallel "same" convolutions 3 x 3 / 5 x 5 / 7 x 7 with 32 / 32 / 20 filters (bias), concatenated, ReLU, a 1 x 1
convolution of the 84 channels to one (bias; ones and zero, kept fixed, in that code), ReLU, bilinear upsampling
(``align_corners=False``) back to H x W.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .codebook import assign, backward_through_assignment
from .masking import flatten_positions, zero_masked
from .norm import accumulation_dtype, l2_normalize, signed_power
from .precision import autocast_enabled, bmm_full_range

__all__ = ["CRN_FILTERS", "crn", "crn_context", "context_pool"]

# (kernel size, filters) of the three parallel context convolutions (the paper and the authors' code)
CRN_FILTERS: Tuple[Tuple[int, int], ...] = ((3, 32), (5, 32), (7, 20))


def context_pool(x: Tensor) -> Tensor:
    """The context network's downsampling: 3 x 3 average, stride 2, no padding, ceil mode (a last window that runs
    past the map is averaged over the positions it covers), as the authors' ``AvgPool2d(3, 2, ceil_mode=True)``.

    (B, C, H, W) -> (B, C, floor(H / 2), floor(W / 2)) for H, W >= 2. An axis of length 1 (where that pooling has no
    output) gives one row / column, the mean over its single window, i.e. the window clipped to the map like the
    others. ``count_include_pad=False`` changes nothing without padding (the divisor is the clipped window either
    way) and keeps that divisor in an exported ONNX graph.
    """
    if x.shape[-2] == 1:
        x = x.expand(-1, -1, 2, -1)
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 2)
    return F.avg_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True, count_include_pad=False)


def _context_filters(pooled: Tensor, weights: List[Tensor], biases: List[Optional[Tensor]]) -> Tensor:
    """ReLU of the concatenated "same" convolutions of the pooled map, (B, F, h, w)."""
    responses: List[Tensor] = []
    for w, b in zip(weights, biases):
        responses.append(F.conv2d(pooled, w, b, padding=w.shape[-1] // 2))
    return torch.relu(torch.cat(responses, dim=1))


def crn_context(x: Tensor, filter_weights: List[Tensor], filter_biases: List[Optional[Tensor]],
                accumulation_weight: Tensor, accumulation_bias: Optional[Tensor]) -> Tensor:
    """The context weights ``m`` (B, 1, H, W) >= 0 of a feature map ``x`` (B, C, H, W) (the map the context network
    sees: L2-normalised per position in CRN, masked positions zeroed).

    ``m = up(ReLU(w^T ReLU([conv_1(p); ...; conv_F(p)]) + b))`` with ``p`` = :func:`context_pool` ``(x)``,
    ``conv_f`` the "same" convolution (padding k // 2, odd k) with ``filter_weights[f]`` (F_f, C, k, k) and
    ``filter_biases[f]`` (F_f,) (None: no bias), ``w`` = ``accumulation_weight`` (1, sum F_f, 1, 1), ``b`` =
    ``accumulation_bias`` (1,) or None, and ``up`` bilinear interpolation (``align_corners=False``) to exactly
    (H, W).

    Against the authors' code: they upsample with ``scale_factor=2``, which gives (2 floor(H/2), 2 floor(W/2)): the
    same values when H and W are even (the bilinear source coordinates ``(y + 1/2) h / H - 1/2`` are those of scale
    2), and a map one row / column short for odd sizes, where their forward fails. Here the output always has the
    input's size; H or W = 1 work too (see :func:`context_pool`).
    """
    height, width = x.shape[-2], x.shape[-1]
    dtype = x.dtype
    pooled = context_pool(x)
    weights: List[Tensor] = []
    biases: List[Optional[Tensor]] = []
    for w in filter_weights:
        weights.append(w.to(dtype))
    for b in filter_biases:
        biases.append(None if b is None else b.to(dtype))
    responses = _context_filters(pooled, weights, biases)                       # (B, F, h, w)
    small = torch.relu(F.conv2d(responses, accumulation_weight.to(responses.dtype),
                                None if accumulation_bias is None else accumulation_bias.to(responses.dtype)))
    context = F.interpolate(small, size=[height, width], mode="bilinear", align_corners=False)
    return accumulation_dtype(context)


def crn(x: Tensor, weight: Tensor, bias: Optional[Tensor], centroids: Tensor, filter_weights: List[Tensor],
        filter_biases: List[Optional[Tensor]], accumulation_weight: Tensor, accumulation_bias: Optional[Tensor],
        mask: Optional[Tensor] = None, hard: bool = False, normalize_input: bool = True, intra_norm: bool = True,
        power: Optional[float] = None) -> Tensor:
    """CRN (Kim, Dunn & Frahm, CVPR 2017): NetVLAD on the assignment reweighted by the context weights.

    ``V_k = sum_n m_n a_k(x_n) (x_n - c_k)`` with ``a_k(x) = softmax_k(w_k^T x + b_k)`` (or its arg-max one-hot) on
    L2-normalised descriptors when ``normalize_input``, and ``m`` = :func:`crn_context` of that same map; then
    optional signed ``power``, optional intra-normalisation, L2 of the K * C vector (k-major). Computed as
    ``(A * m) X^T - ((A * m) 1) c``. ``weight`` (K, C), ``bias`` (K,) or None, ``centroids`` (K, C); the context
    network's tensors as in :func:`crn_context`.

    ``mask`` (B, H, W): each image is cropped to the bounding box of its valid positions first (images sharing a box
    are encoded together), so that the context network's pooling grid, convolutions (their zero padding is the
    image's own border) and upsampling see the image alone: a padded image gives the descriptor of the unpadded one.
    Inside the box, masked positions are zeroed before anything (NaN / inf there reach neither the output nor a
    gradient): the context network sees zeros there and their assignment is zero. Reading the boxes is
    data-dependent (a graph break under ``torch.compile``); written in the TorchScript subset.
    """
    if mask is None:
        return _crn_map(x, weight, bias, centroids, filter_weights, filter_biases, accumulation_weight,
                        accumulation_bias, None, hard, normalize_input, intra_norm, power)
    boxes: List[List[int]] = _valid_box_list(mask).tolist()
    unique: List[List[int]] = []
    members: List[List[int]] = []
    for index, box in enumerate(boxes):
        found = -1
        for j in range(len(unique)):
            if unique[j] == box:
                found = j
        if found < 0:
            unique.append(box)
            members.append([index])
        else:
            members[found].append(index)
    outputs: List[Tensor] = []
    order: List[int] = []
    for box, group in zip(unique, members):
        top, left, bottom, right = box[0], box[1], box[2], box[3]
        crop, crop_mask = x, mask
        if len(group) < len(boxes):
            index = torch.tensor(group, dtype=torch.long, device=x.device)
            crop, crop_mask = x.index_select(0, index), mask.index_select(0, index)
        crop_mask = crop_mask[:, top:bottom, left:right]
        crop_valid: Optional[Tensor] = None if bool(crop_mask.all()) else crop_mask
        outputs.append(_crn_map(crop[:, :, top:bottom, left:right], weight, bias, centroids, filter_weights,
                                filter_biases, accumulation_weight, accumulation_bias, crop_valid, hard,
                                normalize_input, intra_norm, power))
        order.extend(group)
    if len(outputs) == 1:
        return outputs[0]
    inverse = torch.empty(len(order), dtype=torch.long, device=x.device)
    inverse[torch.tensor(order, dtype=torch.long, device=x.device)] = torch.arange(len(order), device=x.device)
    return torch.cat(outputs, dim=0).index_select(0, inverse)


def _valid_box_list(mask: Tensor) -> Tensor:
    """(B, 4) int64 ``(top, left, bottom, right)`` (exclusive ends) of the True positions of each mask (B, H, W)."""
    rows = mask.any(dim=2).to(torch.int32)
    cols = mask.any(dim=1).to(torch.int32)
    top = rows.argmax(dim=1)
    bottom = mask.shape[1] - rows.flip([1]).argmax(dim=1)
    left = cols.argmax(dim=1)
    right = mask.shape[2] - cols.flip([1]).argmax(dim=1)
    return torch.stack([top, left, bottom, right], dim=1).to(torch.long)


def _crn_map(x: Tensor, weight: Tensor, bias: Optional[Tensor], centroids: Tensor, filter_weights: List[Tensor],
             filter_biases: List[Optional[Tensor]], accumulation_weight: Tensor, accumulation_bias: Optional[Tensor],
             mask: Optional[Tensor], hard: bool, normalize_input: bool, intra_norm: bool,
             power: Optional[float]) -> Tensor:
    """:func:`crn` on the whole map (no crop): masked positions are zeros for the context network."""
    x = zero_masked(accumulation_dtype(x), mask)
    dtype = x.dtype
    weight, centroids = weight.to(dtype), centroids.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    fast = False
    if not torch.jit.is_scripting():
        fast = _needs_fast_backward(x, weight, bias, centroids, filter_weights, filter_biases, accumulation_weight,
                                    accumulation_bias)
    if normalize_input:
        x = _normalize(x, fast)
    context = crn_context(x, filter_weights, filter_biases, accumulation_weight, accumulation_bias).to(dtype)
    descriptors, valid, _ = flatten_positions(x, mask)
    mass, first = _reweighted_statistics(descriptors, weight, bias, context.flatten(2), valid, hard, fast)
    vlad = first - mass.unsqueeze(-1) * centroids.to(first.dtype)
    if power is not None and power != 1:
        vlad = signed_power(vlad, power)
    if intra_norm:
        vlad = l2_normalize(vlad, dim=-1)
    return l2_normalize(vlad.flatten(1), dim=-1)


# --- training: hand-written backward passes (values identical to the plain-autograd path) ----------------------------

def _needs_fast_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], centroids: Tensor,
                         filter_weights: List[Tensor], filter_biases: List[Optional[Tensor]],
                         accumulation_weight: Tensor, accumulation_bias: Optional[Tensor]) -> bool:
    """Eager training (some input requires grad), outside autocast and graph capture: use the hand-written
    backward passes (:class:`_ChannelL2Normalize`, :class:`_ReweightedStatistics`). Inference, autocast,
    ``torch.compile`` / export and TorchScript use plain autograd ops with the same values."""
    if not torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if autocast_enabled(x.device.type):
        return False
    tensors = [x, weight, centroids, accumulation_weight, *filter_weights]
    for optional in [bias, accumulation_bias, *filter_biases]:
        if optional is not None:
            tensors.append(optional)
    return any(t.requires_grad for t in tensors)


def _normalize(x: Tensor, fast: bool) -> Tensor:
    """L2 normalisation over channels (dim 1), :func:`~aggnets.functional.l2_normalize`'s values."""
    if not torch.jit.is_scripting():
        if fast:
            return _ChannelL2Normalize.apply(x)
    return l2_normalize(x, dim=1)


def _reweighted_statistics(descriptors: Tensor, weight: Tensor, bias: Optional[Tensor], context: Tensor,
                           valid: Optional[Tensor], hard: bool, fast: bool) -> Tuple[Tensor, Tensor]:
    """``mass = (A * m) 1`` (B, K) and ``first = (A * m) Z^T`` (B, K, C) for descriptors ``Z`` (B, C, N), the
    assignment ``A = assign(Z)`` (masked columns zero) and context weights ``m`` (B, 1, N)."""
    if not torch.jit.is_scripting():
        if fast:
            return _ReweightedStatistics.apply(descriptors, weight, bias, context, valid, hard)
    reweighted = assign(descriptors, weight, bias, hard, valid) * context
    first = accumulation_dtype(bmm_full_range(reweighted, descriptors.transpose(1, 2)))
    return reweighted.sum(dim=-1).to(first.dtype), first


class _ChannelL2Normalize(torch.autograd.Function):
    """``y = x * rsqrt(max(sum_c x_c^2, eps^2))`` (eps = 1e-12; :func:`~aggnets.functional.l2_normalize`'s formula)
    with the backward ``(g - y <y, g>) / ||x||`` written out: three sweeps over (B, C, H, W) instead of autograd's
    six. Where the norm is below eps (the clamp is active) the gradient is ``g / eps``, as autograd's."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        squares = (x * x).sum(dim=1, keepdim=True)
        inverse = squares.clamp_min(1e-24).rsqrt()
        y = x * inverse
        ctx.save_for_backward(y, inverse, squares >= 1e-24)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        y, inverse, unclamped = ctx.saved_tensors
        projection = (y * grad).sum(dim=1, keepdim=True) * unclamped
        return torch.addcmul(grad, y, projection, value=-1.0).mul_(inverse)


class _ReweightedStatistics(torch.autograd.Function):
    """:func:`_reweighted_statistics` with a hand-written backward: with ``A`` the (soft) assignment, ``W = A * m``,
    ``G = dFirst Z + dMass`` (one GEMM) gives ``dm = sum_k G * A`` and, through the soft-max, ``dL = A * (G m -
    sum_k A G m)``; then ``dW = dL Z^T`` and ``dZ = [dFirst^T | W^T] [A m; dL]`` (the two right-hand sides stacked
    into one GEMM; :func:`~aggnets.functional.codebook.backward_through_assignment`, NetVLAD's). Hard assignment: no
    gradient to the assignment's weights (``dZ = dFirst^T (A m)``)."""

    @staticmethod
    def forward(ctx, descriptors: Tensor, weight: Tensor, bias: Optional[Tensor], context: Tensor,  # type: ignore
                valid: Optional[Tensor], hard: bool):
        assignment = assign(descriptors, weight, bias, hard, valid)
        reweighted = assignment * context
        first = torch.bmm(reweighted, descriptors.transpose(1, 2))
        ctx.save_for_backward(descriptors, weight, assignment, context, reweighted)
        ctx.hard, ctx.has_bias = hard, bias is not None
        return reweighted.sum(dim=-1), first

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mass: Optional[Tensor], grad_first: Optional[Tensor]):  # type: ignore[override]
        descriptors, weight, assignment, context, reweighted = ctx.saved_tensors
        needs_z, needs_w, needs_b, needs_m = ctx.needs_input_grad[:4]
        batch, clusters = assignment.shape[:2]
        if grad_first is None:
            grad_first = descriptors.new_zeros(batch, clusters, descriptors.shape[1])
        grad_weighted = torch.bmm(grad_first, descriptors)                                  # (B, K, N)
        if grad_mass is not None:
            grad_weighted = grad_weighted + grad_mass.unsqueeze(-1)
        grad_m = (grad_weighted * assignment).sum(dim=1, keepdim=True) if needs_m else None
        grad_assignment = None
        if not ctx.hard and (needs_z or needs_w or needs_b):
            grad_assignment = grad_weighted.mul_(context)
        grad_z, grad_w, grad_b = backward_through_assignment(grad_assignment, assignment, descriptors, weight,
                                                             grad_first, reweighted, needs_z, needs_w,
                                                             needs_b and ctx.has_bias)
        return grad_z, grad_w, grad_b, grad_m, None, None

