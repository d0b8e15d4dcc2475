"""BoQ in its published formulation (amaralibey/Bag-of-Queries, ``src/boq.py``), re-written for the benchmark:
``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` modules, the learned queries repeated for every image
of the batch and refined by their self-attention per image, the cross-attention weights computed (and returned
beside the descriptor, as the authors' forward does). The parameter names are the authors', which are aggnets'."""
import torch
import torch.nn.functional as F
from torch import nn


class PublishedBlock(nn.Module):
    def __init__(self, width: int, queries: int, heads: int) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model=width, nhead=heads, dim_feedforward=4 * width,
                                                  batch_first=True, dropout=0.0)
        self.queries = nn.Parameter(torch.randn(1, queries, width))
        self.self_attn = nn.MultiheadAttention(width, num_heads=heads, batch_first=True)
        self.norm_q = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, num_heads=heads, batch_first=True)
        self.norm_out = nn.LayerNorm(width)

    def forward(self, x):
        x = self.encoder(x)
        q = self.queries.repeat(x.shape[0], 1, 1)
        q = self.norm_q(q + self.self_attn(q, q, q)[0])
        out, attn = self.cross_attn(q, x, x)
        return x, self.norm_out(out), attn.detach()


class PublishedBoQ(nn.Module):
    def __init__(self, channels: int, width: int, queries: int, layers: int, rows: int, heads: int) -> None:
        super().__init__()
        self.proj_c = nn.Conv2d(channels, width, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(width)
        self.boqs = nn.ModuleList([PublishedBlock(width, queries, heads) for _ in range(layers)])
        self.fc = nn.Linear(layers * queries, rows)

    def forward(self, x):
        x = self.norm_input(self.proj_c(x).flatten(2).permute(0, 2, 1))
        outs, attns = [], []
        for block in self.boqs:
            x, out, attn = block(x)
            outs.append(out)
            attns.append(attn)
        out = self.fc(torch.cat(outs, dim=1).permute(0, 2, 1)).flatten(1)
        return F.normalize(out, p=2, dim=-1), attns

    @classmethod
    def from_head(cls, head) -> "PublishedBoQ":
        """The published formulation with the weights of an :class:`aggnets.heads.BoQ` (the same key names)."""
        model = cls(head.in_channels, head.proj_channels, head.num_queries, head.num_layers, head.row_dim,
                    head.num_heads)
        model = model.to(device=head.fc.weight.device, dtype=head.fc.weight.dtype)
        model.load_state_dict(head.state_dict())
        return model


class DescriptorOnly(nn.Module):
    """The published module's descriptor (its forward returns ``(descriptor, attentions)``)."""

    def __init__(self, model: PublishedBoQ) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


def from_head(head) -> DescriptorOnly:
    return DescriptorOnly(PublishedBoQ.from_head(head))
