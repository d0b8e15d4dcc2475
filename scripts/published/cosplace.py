"""The CosPlace / EigenPlaces aggregation in its published formulation (gmberton/CosPlace ``GeoLocalizationNet``),
re-written for the benchmark: ``nn.Sequential(L2 over channels, GeM as avg_pool2d(x.clamp(eps).pow(p)).pow(1/p),
take the 1 x 1 map, Linear, L2)``. No mask."""
import torch
import torch.nn.functional as F
from torch import nn


class ChannelL2(nn.Module):
    def forward(self, x):
        return F.normalize(x, p=2.0, dim=1)


class PlainGeM(nn.Module):
    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        return F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.shape[-2], x.shape[-1])).pow(1.0 / self.p)


class TakeVector(nn.Module):
    def forward(self, x):
        return x[:, :, 0, 0]


def published_cosplace(in_channels: int, out_dim: int) -> nn.Sequential:
    """The authors' layout: state_dict keys ``1.p``, ``3.weight``, ``3.bias``."""
    return nn.Sequential(ChannelL2(), PlainGeM(), TakeVector(), nn.Linear(in_channels, out_dim), ChannelL2())


def from_head(head) -> nn.Sequential:
    """The published formulation with the weights of an :class:`aggnets.heads.CosPlace`."""
    model = published_cosplace(head.in_channels, head.out_dim).to(device=head.fc.weight.device,
                                                                  dtype=head.fc.weight.dtype)
    with torch.no_grad():
        model[1].p.copy_(head.p)
        model[3].load_state_dict(head.fc.state_dict())
    return model
