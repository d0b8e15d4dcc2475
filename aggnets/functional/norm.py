"""Normalisations used by the heads: L2, signed power, intra-normalisation."""
import torch
from torch import Tensor

__all__ = ["l2_normalize", "signed_power", "intra_normalize", "accumulation_dtype"]


def accumulation_dtype(x: Tensor) -> Tensor:
    """Return ``x`` in at least float32 (half-precision values are upcast; float64 stays float64)."""
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        return x.float()
    return x


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """``x / max(||x||_2, eps)`` along ``dim``; a zero vector stays zero with a finite gradient.

    Written as ``x * rsqrt(max(sum x^2, eps^2))``: the same value as ``F.normalize``, with a backward pass of three
    element-wise sweeps instead of about eight (it matters on NetVLAD's (B, C, N) input normalisation).
    """
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        # the sum of squares in float32 (in float16 it overflows above |x| ~ 256, and eps^2 flushes to 0, so a zero
        # vector gave 0 * rsqrt(0) = NaN); eps at least 2^-7 in float16 so that 1 / eps, the gradient scale at 0, is
        # representable
        eps = max(eps, 2.0 ** -7 if x.dtype == torch.float16 else 2.0 ** -63)
        squares = x.float().pow(2).sum(dim=dim, keepdim=True)
        return x * squares.clamp_min(eps * eps).rsqrt().to(x.dtype)
    return x * (x * x).sum(dim=dim, keepdim=True).clamp_min(eps * eps).rsqrt()


def signed_power(x: Tensor, alpha: float | Tensor = 0.5, eps: float = 1e-12) -> Tensor:
    """Power normalisation ``sign(z) |z|^alpha`` (Perronnin et al., ECCV 2010; alpha = 0.5 is the signed square root).

    Exact for ``|z| >= eps``; below ``eps`` it continues linearly with the same value at ``eps`` so that the
    gradient stays finite at zero (the exact derivative ``alpha |z|^(alpha-1)`` is infinite there).
    """
    # The same two lines for a tensor and a float ``alpha``: TorchScript needs ``alpha`` refined to one type (and a
    # refined branch that falls through would not reload after torch.jit.save).
    if isinstance(alpha, Tensor):
        magnitude = x.abs()
        return _blend(x, magnitude, magnitude.clamp_min(eps).pow(alpha), magnitude * (eps ** (alpha - 1)), eps)
    if alpha == 1:
        return x
    magnitude = x.abs()
    return _blend(x, magnitude, magnitude.clamp_min(eps).pow(alpha), magnitude * (eps ** (alpha - 1)), eps)


def _blend(x: Tensor, magnitude: Tensor, powered: Tensor, linear: Tensor, eps: float) -> Tensor:
    """``sign(x)`` times ``powered`` where ``|x| > eps``, else times ``linear``."""
    return torch.sign(x) * torch.where(magnitude > eps, powered, linear)


def intra_normalize(x: Tensor, num_groups: int, eps: float = 1e-12) -> Tensor:
    """L2-normalise each of ``num_groups`` equal blocks of the last dimension (Arandjelović & Zisserman, CVPR 2013).

    ``x``: (..., num_groups * D), e.g. a flattened VLAD (B, K * C); the shape is preserved.
    """
    shape = x.shape
    if shape[-1] % num_groups != 0:
        raise ValueError(f"intra_normalize: last dimension {shape[-1]} is not divisible by num_groups={num_groups}")
    grouped = x.unflatten(-1, (num_groups, shape[-1] // num_groups))
    return l2_normalize(grouped, dim=-1, eps=eps).reshape(shape)
