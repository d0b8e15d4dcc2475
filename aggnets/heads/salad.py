"""SALAD: optimal-transport assignment of the tokens to clusters and a dustbin, plus the global token."""
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import functional as AF
from ..registry import register_head
from .base import HeadCapabilities, PoolingHead, check_positive_int
from .reference import StateDictError, check_unexpected, reference_prefix, reference_tensor

__all__ = ["SALAD"]

_HIDDEN = 512  # the width of SALAD's three MLPs (fixed in the authors' module)


@register_head("salad")
class SALAD(PoolingHead):
    """SALAD (Izquierdo & Civera, "Optimal transport aggregation for visual place recognition", CVPR 2024;
    serizba/salad).

    For the n valid tokens x_i (C) of the map and the global token t: scores ``S = MLP_s(x)`` (m x n) and features
    ``f = MLP_f(x)`` (l x n), each MLP ``Linear(C -> 512)``, dropout, ReLU, ``Linear(512 -> m or l)``; the scene
    vector ``g = Linear(512 -> g)(ReLU(Linear(C -> 512)(t)))``. A dustbin row of constant learnable score z joins S;
    three log-domain Sinkhorn steps with row marginals ``[1/(n+m)] * m ++ [(n-m)/(n+m)]`` and column marginals
    ``1/(n+m)`` give the plan, scaled by n + m, whose m cluster rows are P (m x n)
    (:func:`aggnets.functional.sinkhorn_dustbin`). ``V = f P^T`` (l x m, one matrix product), each cluster's l-vector
    L2-normalised, flattened l-major, after ``L2(g)``: ``L2([L2(g); vec(V)])``. out_dim = m l + g (defaults
    m = ``num_clusters`` 64, l = ``cluster_dim`` 128, g = ``token_dim`` 256: 8448).

    Global token: DINOv2's class token (the paper's input: ViT-B/14 with its final norm, ``backbone=dinov2_vitb14``),
    passed by :class:`aggnets.Embedder`; on a backbone without one (a CNN) the masked mean of the map stands in for
    t (:class:`PoolingHead`). Masks: masked tokens take no part (the marginals use each image's own n), so a padded
    image with its mask gives the unpadded descriptor. n <= m valid tokens: the dustbin gets no mass (the paper's
    ``log(n - m)`` is undefined; see :func:`~aggnets.functional.sinkhorn_dustbin`): finite, never NaN.

    ``dropout`` (default 0.3, the authors') acts in train mode after the first layer of the two token MLPs (on CPU
    with p rounded to a multiple of 2^-16 and the matching scale: :func:`aggnets.functional.relu_dropout`).
    Parameters (``nn.Linear``): ``score_hidden``, ``score``, ``feature_hidden``, ``feature``, ``scene_hidden``,
    ``scene`` (the MLP of g), and ``dust_bin`` (0-d, init 1); the MLP layers start as the authors' (PyTorch's ``Conv2d`` /
    ``Linear`` defaults). :meth:`from_reference` loads the authors' state dict (``score.0`` / ``score.3``,
    ``cluster_features.0`` / ``.3``, ``token_features.0`` / ``.2``, ``dust_bin``). Internals: ``dust_bin``; maps
    over the image: ``assignment`` (the plan's m cluster rows, each column summing to 1 minus the dustbin's share)
    and ``dustbin`` (that share).
    """

    capabilities = HeadCapabilities(global_token="optional", orderless=True, l2_output=True,
                                    internals=("dust_bin",), maps=("assignment", "dustbin"))
    dropout: float
    iters: int

    def __init__(self, in_channels: int, num_clusters: int = 64, cluster_dim: int = 128, token_dim: int = 256,
                 dropout: float = 0.3, hidden_dim: int = _HIDDEN) -> None:
        num_clusters = check_positive_int("SALAD", "num_clusters", num_clusters)
        cluster_dim = check_positive_int("SALAD", "cluster_dim", cluster_dim)
        token_dim = check_positive_int("SALAD", "token_dim", token_dim)
        hidden_dim = check_positive_int("SALAD", "hidden_dim", hidden_dim)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"SALAD: dropout must be a number in [0, 1), got {dropout!r}")
        super().__init__(in_channels, num_clusters * cluster_dim + token_dim)
        self.num_clusters, self.cluster_dim, self.token_dim = num_clusters, cluster_dim, token_dim
        self.hidden_dim = hidden_dim
        self.dropout = float(dropout)
        self.iters = 3
        self.score_hidden = nn.Linear(in_channels, hidden_dim)
        self.score = nn.Linear(hidden_dim, num_clusters)
        self.feature_hidden = nn.Linear(in_channels, hidden_dim)
        self.feature = nn.Linear(hidden_dim, cluster_dim)
        self.scene_hidden = nn.Linear(in_channels, hidden_dim)
        self.scene = nn.Linear(hidden_dim, token_dim)
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    def _hidden(self) -> Tuple[Tensor, Tensor]:
        """The first layers of the score and feature MLPs stacked into one product (scores' rows first)."""
        return (torch.cat([self.score_hidden.weight, self.feature_hidden.weight], dim=0),
                torch.cat([self.score_hidden.bias, self.feature_hidden.bias], dim=0))

    def pool_token(self, x: Tensor, mask: Optional[Tensor], token: Tensor) -> Tensor:
        hidden_weight, hidden_bias = self._hidden()
        return AF.salad(x, token, hidden_weight, hidden_bias, self.score.weight, self.score.bias,
                        self.feature.weight, self.feature.bias, self.scene_hidden.weight, self.scene_hidden.bias,
                        self.scene.weight, self.scene.bias, self.dust_bin, mask, self.dropout, self.training,
                        self.iters)

    def transport_plan(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The plan (B, m + 1, H, W) over the map, scaled by n + m (each valid column sums to 1), the dustbin's row
        last, exactly as the forward pass computes it (dropout as the module's mode); zero at masked positions."""
        AF.check_feature_map(x, mask, self.in_channels, "SALAD")
        work = AF.zero_masked(AF.accumulation_dtype(x), mask)
        hidden_weight, hidden_bias = self._hidden()
        scores, _ = AF.salad_scores_and_features(work.flatten(2).transpose(1, 2), hidden_weight, hidden_bias,
                                                 self.score.weight, self.score.bias, self.feature.weight,
                                                 self.feature.bias, self.dropout, self.training)
        return AF.salad_plan(scores, self.dust_bin, mask, self.iters).unflatten(-1, x.shape[-2:])

    def internals(self) -> Dict[str, Tensor]:
        """``dust_bin``: the dustbin's score z (0-d)."""
        return {"dust_bin": self.dust_bin}

    def internal_maps(self, x: Tensor, mask: Optional[Tensor] = None,
                      token: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``assignment`` (B, m, H, W): the transport plan's cluster rows; ``dustbin`` (B, 1, H, W): the share of
        each token's mass that goes to the dustbin."""
        plan = self.transport_plan(x, mask)
        return {"assignment": plan[:, :-1], "dustbin": plan[:, -1:]}

    @classmethod
    def from_reference(cls, state_dict: Mapping[str, Any], dropout: float = 0.3,
                       prefix: Optional[str] = None) -> "SALAD":
        """The head from the authors' ``SALAD`` state dict (serizba/salad ``models/aggregators/salad.py``):
        ``score.0.{weight,bias}`` ((512, C, 1, 1) conv), ``score.3.*`` ((m, 512, 1, 1)), ``cluster_features.0.*``,
        ``cluster_features.3.*`` ((l, 512, 1, 1)), ``token_features.0.*`` ((512, C) linear), ``token_features.2.*``
        ((g, 512)), ``dust_bin`` (0-d). Bare or under a prefix (``aggregator.`` in their ``VPRModel`` checkpoint
        ``dino_salad.ckpt``, whose ``state_dict`` holder is unwrapped by :func:`aggnets.convert.from_reference`;
        auto-detected, or ``prefix=``). C, m, l, g and the hidden width come from the shapes; ``dropout`` (train mode
        only) is not in the weights. Takes the weights' dtype."""
        what = "SALAD.from_reference"
        prefix = reference_prefix(state_dict, ["dust_bin", "score.0.weight"], what, prefix)
        score_hidden = reference_tensor(state_dict, prefix + "score.0.weight", what, dims=4)
        hidden, in_channels = score_hidden.shape[:2]
        if tuple(score_hidden.shape[2:]) != (1, 1):
            raise StateDictError(f"{what}: {prefix + 'score.0.weight'!r} must be a 1x1 convolution (512, C, 1, 1), "
                                 f"found {tuple(score_hidden.shape)}")
        score = reference_tensor(state_dict, prefix + "score.3.weight", what, dims=4)
        feature = reference_tensor(state_dict, prefix + "cluster_features.3.weight", what, dims=4)
        token = reference_tensor(state_dict, prefix + "token_features.2.weight", what, dims=2)
        clusters, cluster_dim, token_dim = score.shape[0], feature.shape[0], token.shape[0]
        layers = {  # ours: (theirs, weight shape)
            "score_hidden": ("score.0", (hidden, in_channels, 1, 1)), "score": ("score.3", (clusters, hidden, 1, 1)),
            "feature_hidden": ("cluster_features.0", (hidden, in_channels, 1, 1)),
            "feature": ("cluster_features.3", (cluster_dim, hidden, 1, 1)),
            "scene_hidden": ("token_features.0", (hidden, in_channels)),
            "scene": ("token_features.2", (token_dim, hidden)),
        }
        ours: Dict[str, Tensor] = {}
        used = {prefix + "dust_bin"}
        for name, (theirs, shape) in layers.items():
            weight = reference_tensor(state_dict, f"{prefix}{theirs}.weight", what, shape=shape)
            ours[name + ".weight"] = weight.reshape(shape[0], shape[1])
            ours[name + ".bias"] = reference_tensor(state_dict, f"{prefix}{theirs}.bias", what, shape=(shape[0],))
            used |= {f"{prefix}{theirs}.weight", f"{prefix}{theirs}.bias"}
        dust_bin = reference_tensor(state_dict, prefix + "dust_bin", what)
        if dust_bin.numel() != 1:
            raise StateDictError(f"{what}: {prefix + 'dust_bin'!r} must be a scalar, found {tuple(dust_bin.shape)}")
        ours["dust_bin"] = dust_bin.reshape(())
        check_unexpected(state_dict, prefix, ["score", "cluster_features", "token_features", "dust_bin"], used, what)
        head = cls(in_channels, clusters, cluster_dim, token_dim, dropout=dropout, hidden_dim=hidden)
        head = head.to(score_hidden.dtype)
        head.load_state_dict(ours)
        return head

    def _options(self) -> List[str]:
        options = [f"num_clusters={self.num_clusters}", f"cluster_dim={self.cluster_dim}",
                   f"token_dim={self.token_dim}", f"dropout={self.dropout}"]
        return options + ([f"hidden_dim={self.hidden_dim}"] if self.hidden_dim != _HIDDEN else [])
