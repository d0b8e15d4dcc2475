"""Looking inside heads: which modules hold a codebook, their parameters worth watching, how evenly the clusters are
used, and a colour overlay of the per-position cluster assignment. Pure torch, no logging framework: a monitoring
callback turns these tensors into scalars, histograms and images.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads.base import PoolingHead

__all__ = ["codebook_heads", "head_internals", "head_maps", "cluster_usage", "UsageAccumulator", "palette",
           "assignment_overlay"]

_GOLDEN_RATIO_CONJUGATE = (math.sqrt(5.0) - 1.0) / 2.0


def _capabilities(module: nn.Module):
    return module.capabilities if isinstance(module, PoolingHead) else None


def codebook_heads(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the heads inside ``module`` (itself included, name ``""``) that declare a codebook
    (``capabilities.codebook`` is ``"centroids"`` or ``"gmm"``: NetVLAD, VLAD, NetBoF, BoF, NetFV, FisherVector, and
    SpatialPyramids around one of them); each has ``assignment_map(x, mask)``.

    Each codebook is listed once, under the outermost head that sees the whole feature map: a SpatialPyramid is
    listed and its wrapped head (which only sees pyramid cells) is not. A pyramid around a head without codebook
    (e.g. GeM) is not listed.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        capabilities = _capabilities(sub)
        if capabilities is None or capabilities.codebook == "none":
            continue
        if not any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            found.append((name, sub))
    return found


def _watch(value: Tensor) -> Tensor:
    return value.detach().to(device="cpu", dtype=torch.float32)


def head_internals(module: nn.Module) -> dict[str, Tensor]:
    """The values worth watching of every head inside ``module`` (each head's :meth:`~PoolingHead.internals`,
    declared in ``capabilities.internals``), keyed ``"<module path>/<name>"`` (just ``"<name>"`` for ``module``
    itself); detached float32 CPU tensors, scalars 0-d, per-cluster values (K,).

    - GeM: ``p`` (the exponent, (1,) or (C,)).
    - NetVLAD / VLAD / NetBoF / BoF: ``alpha`` (0-d; inf for hard assignment) and ``assign_weight_norm``
      ``||w_k||_2`` (K,); NetVLAD / VLAD also ``centroid_norm`` ``||c_k||_2`` (K,).
    - NetFV / FisherVector: ``mixture_weights`` ``w_k = softmax(log_weights)_k`` (K,) and ``mean_variance``
      ``(1/C) sum_c sigma_kc^2`` (K,).

    A SpatialPyramid's wrapped head is reported under its own path (``"<pyramid path>.head/..."``).
    """
    values: dict[str, Tensor] = {}
    for path, sub in module.named_modules():
        if not isinstance(sub, PoolingHead):
            continue
        prefix = f"{path}/" if path else ""
        entries = sub.internals()
        declared = set(sub.capabilities.internals)
        if set(entries) != declared:
            raise RuntimeError(f"{type(sub).__name__}.internals() returned {sorted(entries)} but the class declares "
                               f"{sorted(declared)} (capabilities.internals)")
        values.update({prefix + name: _watch(value) for name, value in entries.items()})
    return values


def head_maps(module: nn.Module, x: Tensor, mask: Optional[Tensor] = None,
              token: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The per-position maps of the outermost heads inside ``module`` that declare some (``capabilities.maps``,
    e.g. ``assignment`` for a codebook head), keyed ``"<module path>/<name>"``: detached (B, M, H, W) tensors of the
    feature map ``x``. A SpatialPyramid reports its wrapped head's maps of the whole map."""
    maps: dict[str, Tensor] = {}
    seen: list[str] = []
    for path, sub in module.named_modules():
        capabilities = _capabilities(sub)
        if capabilities is None or not capabilities.maps or any(path.startswith(f"{o}.") or o == "" for o in seen):
            continue
        seen.append(path)
        prefix = f"{path}/" if path else ""
        with torch.no_grad():
            entries = sub.internal_maps(x, mask, token if sub.uses_token else None)
        maps.update({prefix + name: value.detach() for name, value in entries.items()})
    return maps


def cluster_usage(mass: Tensor, *, dead_threshold: float = 0.01) -> dict[str, Tensor]:
    """How evenly K clusters are used, from the assignment mass ``m_k = sum_{b, n} a_k(x_{b,n})`` (K,).

    ``fractions`` ``f_k = m_k / sum_j m_j`` (K,) (all zero when there is no mass), ``entropy``
    ``H = -sum_k f_k log f_k`` (natural log, 0 log 0 = 0), ``perplexity`` ``exp(H)`` (the effective number of clusters,
    1 to K), ``normalized_entropy`` ``H / log K`` (0 to 1; 1 when K = 1) and ``dead``, the number of clusters with
    ``f_k < dead_threshold / K`` (int64). Values are 0-d tensors except ``fractions``.
    """
    if mass.dim() != 1 or mass.numel() == 0:
        raise ValueError(f"cluster_usage: mass must be a non-empty (K,) vector, got shape {tuple(mass.shape)}")
    mass = mass.detach()
    if not mass.is_floating_point():
        mass = mass.double()
    num_clusters = mass.numel()
    total = mass.sum()
    fractions = torch.where(total > 0, mass / total.clamp_min(torch.finfo(mass.dtype).tiny), torch.zeros_like(mass))
    entropy = -torch.special.xlogy(fractions, fractions).sum()
    normalized = entropy / math.log(num_clusters) if num_clusters > 1 else torch.ones_like(entropy)
    return {"fractions": fractions, "entropy": entropy, "perplexity": entropy.exp(), "normalized_entropy": normalized,
            "dead": (fractions < dead_threshold / num_clusters).sum()}


class UsageAccumulator:
    """Accumulates the assignment mass ``m_k = sum_{b, h, w} a_k`` of ``assignment_map`` outputs (B, K, H, W) over
    batches (float64, on the assignments' device); :meth:`compute` gives :func:`cluster_usage` of it.

    ``mass`` ((K,) or ``None`` before the first update) is public so that a distributed caller can all-reduce it
    (sum) before :meth:`compute`; pass ``num_clusters`` to have it allocated (zeros) from the start on every rank.
    """

    def __init__(self, num_clusters: Optional[int] = None, *, dead_threshold: float = 0.01) -> None:
        self.num_clusters = num_clusters
        self.dead_threshold = dead_threshold
        self.mass: Optional[Tensor] = None
        self.reset()

    def reset(self) -> None:
        """Forget the accumulated mass (zeros when ``num_clusters`` is known, else ``None``)."""
        self.mass = None if self.num_clusters is None else torch.zeros(self.num_clusters, dtype=torch.float64)

    @torch.no_grad()
    def update(self, assignments: Tensor) -> None:
        """Add the mass of ``assignments`` (B, K, H, W) (any layout with clusters on dim 1, e.g. (B, K, N))."""
        if assignments.dim() < 2:
            raise ValueError(f"UsageAccumulator: assignments must be (B, K, ...), got shape {tuple(assignments.shape)}")
        if self.mass is not None and assignments.shape[1] != self.mass.numel():
            raise ValueError(f"UsageAccumulator: expected {self.mass.numel()} clusters, got {assignments.shape[1]}")
        dims = [0, *range(2, assignments.dim())]
        mass = assignments.detach().to(torch.float64).sum(dim=dims)
        self.mass = mass if self.mass is None else self.mass.to(mass.device) + mass

    def compute(self) -> dict[str, Tensor]:
        """:func:`cluster_usage` of the accumulated mass."""
        if self.mass is None:
            raise RuntimeError("UsageAccumulator.compute: no assignments accumulated yet")
        return cluster_usage(self.mass, dead_threshold=self.dead_threshold)


def palette(k: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``k`` distinct, deterministic RGB colours (k, 3) in [0, 1]: hues ``h_i = frac(i (sqrt 5 - 1) / 2)`` (golden
    ratio, so consecutive clusters are far apart on the colour wheel), saturation 0.75, value 1, through
    ``HSV -> RGB``: ``channel_n = v - v s clamp(min(t, 4 - t), 0, 1)`` with ``t = (n + 6 h) mod 6``, n = 5, 3, 1.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"palette: k must be a positive int, got {k!r}")
    hue = (torch.arange(k, dtype=torch.float64) * _GOLDEN_RATIO_CONJUGATE).remainder(1.0)
    saturation, value = 0.75, 1.0
    t = (torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64) + 6.0 * hue.unsqueeze(1)).remainder(6.0)
    rgb = value - value * saturation * torch.minimum(t, 4.0 - t).clamp(0.0, 1.0)
    return rgb.to(device=device, dtype=dtype)


def assignment_overlay(images: Tensor, assignments: Tensor, alpha: float = 0.5) -> Tensor:
    """Colour every position by its arg-max cluster, ``palette(K)[argmax_k a_k]`` scaled by the confidence
    ``max_k a_k`` (masked positions, all-zero columns, are black), nearest-upsampled from (H, W) to the image size
    and alpha-blended: ``out = (1 - alpha) image + alpha colour``, clamped to [0, 1].

    ``images`` (B, 3, h, w) in [0, 1], ``assignments`` (B, K, H, W); returns (B, 3, h, w) in the images' dtype.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"assignment_overlay: images must be (B, 3, h, w), got shape {tuple(images.shape)}")
    if assignments.dim() != 4 or assignments.shape[0] != images.shape[0]:
        raise ValueError(f"assignment_overlay: assignments must be (B, K, H, W) with B = {images.shape[0]}, got "
                         f"shape {tuple(assignments.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"assignment_overlay: alpha must be in [0, 1], got {alpha}")
    assignments = assignments.detach().float().nan_to_num(0.0)
    confidence, cluster = assignments.max(dim=1)                                                  # (B, H, W)
    colours = palette(assignments.shape[1], assignments.device)[cluster] * confidence.unsqueeze(-1)
    colours = F.interpolate(colours.permute(0, 3, 1, 2), size=images.shape[-2:], mode="nearest-exact")
    blended = (1.0 - alpha) * images + alpha * colours.to(device=images.device, dtype=images.dtype)
    return blended.clamp(0.0, 1.0)
