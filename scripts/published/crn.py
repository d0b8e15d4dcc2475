"""CRN in its published formulation, for benchmarks and cross-checks: the structure of the authors' ``CRN`` module
(gmberton/deep-visual-geo-localization-benchmark, ``model/aggregation.py``), re-written here: the context network as
modules (average pooling, three convolutions, 1 x 1 accumulation, upsampling by a factor of 2), then NetVLAD with a
Python loop over the clusters that builds each cluster's (B, C, N) residual and weights it by the reweighted soft
assignment. Its state dict has the authors' keys (``centroids``, ``conv.*``, ``crn.filter_3_3.*``,
``crn.filter_5_5.*``, ``crn.filter_7_7.*``, ``crn.acc_w.*``).

Like the original, it needs even map sizes (the upsampled weights must cover H x W) and takes no mask. Not part of the
library: :class:`aggnets.heads.CRN` computes the same descriptor with two matrix products.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PublishedContext(nn.Module):
    """Contextual reweighting network, module by module as published."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        self.filter_3_3 = nn.Conv2d(in_channels, 32, kernel_size=3, padding=1)
        self.filter_5_5 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.filter_7_7 = nn.Conv2d(in_channels, 20, kernel_size=7, padding=3)
        self.acc_w = nn.Conv2d(84, 1, kernel_size=1)
        nn.init.ones_(self.acc_w.weight)
        nn.init.zeros_(self.acc_w.bias)
        self.acc_w.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        small = self.pool(x)
        responses = [self.filter_3_3(small), self.filter_5_5(small), self.filter_7_7(small)]
        weights = F.relu(self.acc_w(F.relu(torch.cat(responses, dim=1))))
        return F.interpolate(weights, scale_factor=2, mode="bilinear")


class PublishedCRN(nn.Module):
    """The published CRN: NetVLAD with a per-cluster residual loop on the context-reweighted soft assignment."""

    def __init__(self, in_channels: int, num_clusters: int = 64, normalize_input: bool = True,
                 bias: bool = False) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.normalize_input = normalize_input
        self.conv = nn.Conv2d(in_channels, num_clusters, kernel_size=1, bias=bias)
        self.centroids = nn.Parameter(torch.rand(num_clusters, in_channels))
        self.crn = PublishedContext(in_channels)

    @classmethod
    @torch.no_grad()
    def from_head(cls, head: nn.Module) -> "PublishedCRN":
        """The published module holding the weights of an :class:`aggnets.heads.CRN` (same dtype and output)."""
        if head.assignment != "soft" or not head.intra_norm or head.power is not None:
            raise ValueError("PublishedCRN.from_head: the published CRN is soft-assignment, intra-normalised, without "
                             "power normalisation")
        model = cls(head.in_channels, head.num_clusters, head.normalize_input, bias=head.assign.bias is not None)
        model = model.to(dtype=head.centroids.dtype, device=head.centroids.device)
        model.centroids.copy_(head.centroids)
        model.conv.weight.copy_(head.assign.weight)
        if head.assign.bias is not None:
            model.conv.bias.copy_(head.assign.bias)
        for kernel in (3, 5, 7):
            ours, theirs = getattr(head.context, f"filter{kernel}"), getattr(model.crn, f"filter_{kernel}_{kernel}")
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
        model.crn.acc_w.weight.copy_(head.context.accumulation_weight)
        model.crn.acc_w.bias.copy_(head.context.accumulation_bias)
        return model

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=1)
        reweighting = self.crn(x).view(batch, 1, height * width)
        assignment = F.softmax(self.conv(x).view(batch, self.num_clusters, -1), dim=1) * reweighting
        flat = x.view(batch, channels, -1)
        vlad = x.new_zeros(batch, self.num_clusters, channels)
        for k in range(self.num_clusters):
            residual = flat - self.centroids[k].view(1, channels, 1)          # (B, C, N)
            vlad[:, k] = (residual * assignment[:, k:k + 1]).sum(dim=-1)
        vlad = F.normalize(vlad, p=2, dim=2)
        return F.normalize(vlad.flatten(1), p=2, dim=1)
