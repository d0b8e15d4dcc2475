"""Precision helpers: where half precision's range is too small for a product, autocast's state, and the flush of
negligible values that would reach a matrix product as subnormal floats."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["autocast_enabled", "autocast_dtype", "bmm_full_range", "linear_full_range", "flush_tiny", "flush_tiny_values",
           "tiny_threshold"]


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument (CUDA), CPU separately
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts matmuls to on ``device_type``, or None when autocast is off there."""
    if not autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def bmm_full_range(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm``, but never in float16, whose range (65504) the logits and sums of large activations exceed
    (bfloat16 has float32's range and keeps autocast's speed)."""
    if torch.jit.is_scripting():  # TorchScript: no autocast context with a run-time device type
        if a.dtype == torch.float16:
            return torch.bmm(a.float(), b.float())
        return torch.bmm(a, b)
    if a.dtype == torch.float16 or autocast_dtype(a.device.type) == torch.float16:
        with torch.autocast(device_type=a.device.type, enabled=False):
            return torch.bmm(a.float(), b.float())
    return torch.bmm(a, b)


def linear_full_range(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear``, but never in float16, whose range (65504) a projection of large activations exceeds (bfloat16
    has float32's range and keeps autocast's speed)."""
    if torch.jit.is_scripting():  # TorchScript: no autocast context with a run-time device type
        if x.dtype == torch.float16:
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return F.linear(x, weight, bias)
    if x.dtype == torch.float16 or autocast_dtype(x.device.type) == torch.float16:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(x, weight, bias)


def tiny_threshold(dtype: torch.dtype) -> float:
    """The magnitude below which :func:`flush_tiny` zeroes a value of ``dtype``: 2^-1000 (~9.3e-302) for float64,
    else 2^-100 (~7.9e-31; float32, and bfloat16 / float16, whose range is no wider). Each lies 2^26 above its type's
    smallest normal number (2^-1022, 2^-126). Literals here: TorchScript cannot read module-level floats."""
    if dtype == torch.float64:
        return 2.0 ** -1000
    return 2.0 ** -100


def flush_tiny(x: Tensor) -> Tensor:
    """``x`` with every value of magnitude at most 2^-100 (float64: 2^-1000) set to zero; NaN and inf are kept.

    Why: a soft assignment (a softmax / GMM posterior) spreads each descriptor's unit mass over K clusters, and most
    of the K values of a sharp column are astronomically small: 10 to 15 % of NetFV's posteriors (at GMM or random
    initialisation) are subnormal floats (< 2^-126 ~ 1.18e-38), and so are some of the gradients of the logits,
    ``a * (g - sum_k a g)``. Intel cores run a GEMM (MKL) with subnormal operands through micro-code assists, up to
    ~100x slower (NetFV's backward: 1.9 s instead of 94 ms); ``torch.set_flush_denormal(True)`` does not reach the
    GEMM's worker threads. So every probability-like tensor that feeds a matrix product goes through this flush.

    Why 2^-100, and why it changes no result: each column of an assignment sums to 1, so its largest entry is at
    least 1/K, and a value below 2^-100 is K * 2^-100 (< 2^-84 for any K up to 65536) of it, 2^-60 below float32's
    resolution (2^-24). Summed over N positions into the mass ``A 1`` or the statistics ``A X^T``, the flushed values
    move a cluster's sums by less than ``N * 2^-100 * max|x|`` in absolute terms (< 1e-24 for a million unit
    descriptors). After the normalisations, whose floor is 1e-12 (``x / max(||x||, 1e-12)``), that is < 1e-12 on a
    unit-norm descriptor even for a cluster that receives nothing but such values, i.e. below float32's rounding
    of its entries. NetFV's extra factors ``1 / (N sqrt(w_k) sigma)`` leave it far below too. For the gradient of the
    logits the same absolute threshold is negligible as long as the gradient scale is above ~2^-76 (~1e-23); a
    float32 gradient that small is lost anyway (below every optimiser's epsilon). The threshold sits 2^26 above the
    smallest normal number, so a surviving value times any operand of magnitude >= 2^-26 is still a normal float
    inside the GEMM.

    float64: flushed at 2^-1000 (float64's subnormals are < 2^-1022 ~ 2.2e-308, and float64 GEMMs stall on them the
    same way; they appear only with logit gaps above ~708, e.g. a very large alpha). 2^-1000 is ~2^-948 below
    float64's resolution: float64 results are unchanged to every tolerance the tests use.

    Gradient: zero where flushed, one elsewhere. One element-wise kernel, ``hardshrink`` (``where(|x| <= t, 0, x)``):
    on CPU ~25x faster than ``masked_fill`` / ``torch.where`` with a computed mask, whose extra sweeps cost more
    than the GEMM they protect; fuses under ``torch.compile``; TorchScript- and ONNX- (``Shrink``) compatible.
    """
    return F.hardshrink(x, tiny_threshold(x.dtype))


def flush_tiny_values(x: Tensor) -> Tensor:
    """:func:`flush_tiny` of the value with the gradient of the identity (straight through), for parameter-derived
    GEMM operands such as NetFV's ``W = [mu / sigma^2, -1 / (2 sigma^2)]``: a mean fitted by EM can be ~1e-40
    (a channel seen only by descriptors the component barely owns), and the flushed entry's gradient
    (``x / sigma^2``) must still reach the mean. The value changes by less than 2^-100 (float64: 2^-1000), which
    moves no logit visibly; the gradient is exact."""
    if not x.requires_grad:
        return flush_tiny(x)
    return x + (flush_tiny(x) - x).detach()
