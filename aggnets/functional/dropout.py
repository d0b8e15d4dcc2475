"""Dropout before a ReLU on CPU, with the keep mask drawn as 16 random bits per element and kept in floats."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import is_tracing

__all__ = ["dropout_keep", "relu_dropout"]


def dropout_keep(like: Tensor, p: float) -> Tuple[Tensor, float]:
    """A keep mask for dropout with probability ``p``: ``(k, q)`` with k of ``like``'s shape and dtype, each element
    independently 0 (dropped) with probability q and 1 otherwise, where ``q = round(p 2^16) / 2^16`` is p to within
    2^-17 (the mask compares 16 random bits with ``round(p 2^16)``; pass q's ``1 / (1 - q)`` as the dropout scale
    and the output is unbiased exactly). ``0 <= p < 1 - 2^-17``. Seeded by ``torch.manual_seed``.

    Why not ``bernoulli_``: on CPU it draws a double per element and a boolean mask then costs a slow sweep;
    this draws four masks per 64-bit word and writes the floats directly (measured in ``scripts/bench_heads.py``,
    SALAD's row)."""
    steps = int(round(p * 65536.0))
    if steps < 0 or steps >= 65536:
        raise ValueError(f"dropout_keep: p must lie in [0, 1 - 2^-17), got {p}")
    numel = like.numel()
    words = torch.empty(((numel + 3) // 4,), dtype=torch.int64, device=like.device)
    words = words.random_(-9223372036854775807 - 1, None)                     # all 64 bits (literal: TorchScript)
    bits = words.view(torch.int16)[:numel].view(like.shape)                  # uniform over [-2^15, 2^15)
    keep = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    torch.ge(bits, steps - 32768, out=keep)                                  # P(drop) = steps / 2^16
    return keep, steps / 65536.0


def relu_dropout(h: Tensor, p: float, training: bool) -> Tuple[Tensor, float]:
    """``ReLU(dropout_p(h))`` as ``(r, s)`` with ``ReLU(dropout_p(h)) = s r``: ``r = ReLU(k * h)`` for a keep mask
    k (0 with probability p, else 1, per element) and ``s = 1 / (1 - p)``. ReLU is positively homogeneous, so a
    caller that multiplies r by a weight matrix next folds s into that matrix rather than sweeping r again.

    In training on CPU, ``h`` (a fresh intermediate that nothing else uses) is overwritten: k from
    :func:`dropout_keep` (p rounded to a multiple of 2^-16, s = 1 / (1 - that)), then ``k * h`` and the ReLU in
    place. Eval mode or p = 0: ``(ReLU(h), 1)``. On CUDA, under tracing / compile, or p within 2^-17 of 1:
    ``F.dropout`` then ReLU, with s = 1."""
    if not training or p == 0.0:
        return torch.relu(h), 1.0
    if h.device.type != "cpu" or is_tracing() or p >= 1.0 - 2.0 ** -17:
        return torch.relu(F.dropout(h, p, True)), 1.0
    keep, dropped = dropout_keep(h, p)
    return h.mul_(keep).relu_(), 1.0 / (1.0 - dropped)
