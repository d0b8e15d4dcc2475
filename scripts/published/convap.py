"""ConvAP in its published formulation (amaralibey/gsv-cities, ``models/aggregators/convap.py``), re-written for the
benchmark: the 1x1 convolution on every position (d x C x H W multiply-adds), then ``nn.AdaptiveAvgPool2d((s1, s2))``,
flatten (d-major), L2. No mask."""
import torch
import torch.nn.functional as F
from torch import nn


class PublishedConvAP(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, s1: int, s2: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
        self.pool = nn.AdaptiveAvgPool2d((s1, s2))

    def forward(self, x):
        return F.normalize(self.pool(self.conv(x)).flatten(1), p=2, dim=1)

    @classmethod
    def from_head(cls, head) -> "PublishedConvAP":
        """The published formulation with the weights of an :class:`aggnets.heads.ConvAP`."""
        weight = head.channel_pool.weight
        model = cls(head.in_channels, head.out_channels, head.s1, head.s2).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            model.conv.weight.copy_(weight)
            model.conv.bias.copy_(head.channel_pool.bias)
        return model


def from_head(head) -> PublishedConvAP:
    return PublishedConvAP.from_head(head)
