"""MixVPR in its published formulation (amaralibey/MixVPR, ``models/aggregators/mixvpr.py``), re-written for the
benchmark: a ModuleList of Feature-Mixer blocks, each ``x + Linear(ReLU(Linear(LayerNorm(x))))`` on the (B, C, H W)
map, then ``channel_proj`` on the (B, H W, C) transpose, ``row_proj`` on the (B, d, H W) transpose, flatten, L2 —
the projections in the authors' order (d x C x N multiply-adds for the channel projection)."""
import torch
import torch.nn.functional as F
from torch import nn


class MixerBlock(nn.Module):
    """One Feature-Mixer: a residual MLP along the flattened spatial axis."""

    def __init__(self, positions: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(positions)
        self.fc1 = nn.Linear(positions, hidden)
        self.fc2 = nn.Linear(hidden, positions)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class PublishedMixVPR(nn.Module):
    def __init__(self, in_channels: int, in_h: int, in_w: int, out_channels: int, mix_depth: int, hidden: int,
                 out_rows: int) -> None:
        super().__init__()
        positions = in_h * in_w
        self.blocks = nn.ModuleList(MixerBlock(positions, hidden) for _ in range(mix_depth))
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(positions, out_rows)

    def forward(self, x):
        x = x.flatten(2)                                   # (B, C, N)
        for block in self.blocks:
            x = block(x)
        x = self.channel_proj(x.transpose(1, 2))           # (B, N, d)
        x = self.row_proj(x.transpose(1, 2))               # (B, d, R)
        return F.normalize(x.flatten(1), p=2, dim=-1)

    @classmethod
    def from_head(cls, head) -> "PublishedMixVPR":
        """The published formulation with the weights of an :class:`aggnets.heads.MixVPR`."""
        hidden = head.mix_fc1_weight.shape[1]
        model = cls(head.in_channels, head.in_h, head.in_w, head.out_channels, head.mix_depth, hidden, head.out_rows)
        model = model.to(device=head.channel_proj.weight.device, dtype=head.channel_proj.weight.dtype)
        with torch.no_grad():
            for i, block in enumerate(model.blocks):
                block.norm.weight.copy_(head.mix_norm_weight[i])
                block.norm.bias.copy_(head.mix_norm_bias[i])
                block.fc1.weight.copy_(head.mix_fc1_weight[i])
                block.fc1.bias.copy_(head.mix_fc1_bias[i])
                block.fc2.weight.copy_(head.mix_fc2_weight[i])
                block.fc2.bias.copy_(head.mix_fc2_bias[i])
            model.channel_proj.load_state_dict(head.channel_proj.state_dict())
            model.row_proj.load_state_dict(head.row_proj.state_dict())
        return model


def from_head(head) -> PublishedMixVPR:
    return PublishedMixVPR.from_head(head)
