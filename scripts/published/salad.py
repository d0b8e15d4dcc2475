"""SALAD in its published formulation (serizba/salad, ``models/aggregators/salad.py``), re-written for the benchmark:
1x1 convolutions on the (B, C, H, W) map for the scores and features, a linear MLP on the token, the log-domain
Sinkhorn with a dustbin row built in a fresh (B, m + 1, n) tensor, and the aggregation as the published code writes
it — the plan and the features each repeated to (B, l, m, n), multiplied and summed over the tokens (four
B x l x m x n tensors, where aggnets does one (B, l, n) x (B, n, m) product)."""
import math

import torch
import torch.nn.functional as F
from torch import nn


def _sinkhorn(scores, dust_bin, iters=3):
    """The published log-domain Sinkhorn on (B, m, n) scores: the log plan plus log(n + m), dustbin row last."""
    batch, m, n = scores.shape
    augmented = torch.empty(batch, m + 1, n, dtype=scores.dtype, device=scores.device)
    augmented[:, :m] = scores
    augmented[:, m] = dust_bin
    norm = -math.log(n + m)
    log_a = torch.full((batch, m + 1), norm, dtype=scores.dtype, device=scores.device)
    log_a[:, m] += math.log(n - m)
    log_b = torch.full((batch, n), norm, dtype=scores.dtype, device=scores.device)
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iters):
        u = log_a - torch.logsumexp(augmented + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(augmented + u.unsqueeze(2), dim=1)
    return augmented + u.unsqueeze(2) + v.unsqueeze(1) - norm


class PublishedSALAD(nn.Module):
    def __init__(self, channels: int, clusters: int, cluster_dim: int, token_dim: int, hidden: int,
                 dropout: float) -> None:
        super().__init__()
        self.clusters, self.cluster_dim = clusters, cluster_dim
        drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.token_features = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, token_dim))
        self.cluster_features = nn.Sequential(nn.Conv2d(channels, hidden, 1), drop, nn.ReLU(),
                                              nn.Conv2d(hidden, cluster_dim, 1))
        self.score = nn.Sequential(nn.Conv2d(channels, hidden, 1), drop, nn.ReLU(), nn.Conv2d(hidden, clusters, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    def forward(self, inputs):
        x, t = inputs
        f = self.cluster_features(x).flatten(2)                     # (B, l, n)
        p = self.score(x).flatten(2)                                # (B, m, n)
        t = self.token_features(t)
        p = torch.exp(_sinkhorn(p, self.dust_bin))[:, :-1]
        p = p.unsqueeze(1).repeat(1, self.cluster_dim, 1, 1)       # (B, l, m, n)
        f = f.unsqueeze(2).repeat(1, 1, self.clusters, 1)          # (B, l, m, n)
        v = F.normalize((f * p).sum(dim=-1), p=2, dim=1).flatten(1)
        return F.normalize(torch.cat([F.normalize(t, p=2, dim=-1), v], dim=-1), p=2, dim=-1)

    @classmethod
    def from_head(cls, head) -> "PublishedSALAD":
        """The published formulation with the weights of an :class:`aggnets.heads.SALAD`."""
        model = cls(head.in_channels, head.num_clusters, head.cluster_dim, head.token_dim, head.hidden_dim,
                    head.dropout)
        weight = head.score.weight
        model = model.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for ours, theirs in ((head.score_hidden, model.score[0]), (head.score, model.score[3]),
                                 (head.feature_hidden, model.cluster_features[0]),
                                 (head.feature, model.cluster_features[3])):
                theirs.weight.copy_(ours.weight.view_as(theirs.weight))
                theirs.bias.copy_(ours.bias)
            model.token_features[0].load_state_dict(head.scene_hidden.state_dict())
            model.token_features[2].load_state_dict(head.scene.state_dict())
            model.dust_bin.copy_(head.dust_bin)
        return model


def from_head(head) -> PublishedSALAD:
    return PublishedSALAD.from_head(head)
