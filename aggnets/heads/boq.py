"""BoQ: learned queries that cross-attend to the (encoder-refined) tokens of the map."""
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import functional as AF
from ..registry import register_head
from .base import HeadCapabilities, PoolingHead, check_positive_int
from .reference import StateDictError, check_unexpected, reference_prefix, reference_tensor

__all__ = ["BoQ"]


class Attention(nn.Module):
    """Multi-head attention parameters in ``nn.MultiheadAttention``'s layout and initialisation (``in_proj_weight``
    (3d, d) Xavier-uniform, ``in_proj_bias`` zero, ``out_proj`` a Linear with zero bias), computed by
    :func:`aggnets.functional.multi_head_attention` (``F.scaled_dot_product_attention``)."""

    num_heads: int

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * width, width)))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        return AF.multi_head_attention(query, key, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight,
                                       self.out_proj.bias, self.num_heads, key_mask)

    def weights(self, query: Tensor, key: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """The attention weights averaged over the heads (B, Lq, Lk)."""
        return AF.attention_weights(query, key, self.in_proj_weight, self.in_proj_bias, self.num_heads, key_mask)


class EncoderLayer(nn.Module):
    """A post-norm transformer encoder layer (``nn.TransformerEncoderLayer(d, h, 4d, dropout=0,
    batch_first=True)``'s parameters and computation): ``x <- LN1(x + SelfAttn(x))``,
    ``x <- LN2(x + W2 ReLU(W1 x + b1) + b2)``; padded tokens are never attended to."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = Attention(width, num_heads)
        self.linear1 = nn.Linear(width, 4 * width)
        self.linear2 = nn.Linear(4 * width, width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        x = self.norm1(x + self.self_attn(x, x, key_mask))
        return self.norm2(x + self.linear2(torch.relu(self.linear1(x))))


class BoQBlock(nn.Module):
    """One BoQ block: the encoder layer on the tokens, the learned queries refined by their own self-attention
    (``q <- LN(q + SelfAttn(q))``, independent of the image: computed once per forward, for the whole batch), and
    their cross-attention to the tokens, ``o = LN(CrossAttn(q, x))``."""

    def __init__(self, width: int, num_queries: int, num_heads: int) -> None:
        super().__init__()
        self.encoder = EncoderLayer(width, num_heads)
        self.queries = nn.Parameter(torch.randn(1, num_queries, width))
        self.self_attn = Attention(width, num_heads)
        self.norm_q = nn.LayerNorm(width)
        self.cross_attn = Attention(width, num_heads)
        self.norm_out = nn.LayerNorm(width)

    def refined_queries(self) -> Tensor:
        """``LN(q + SelfAttn(q))`` (1, Q, d)."""
        return self.norm_q(self.queries + self.self_attn(self.queries, self.queries))

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(x', o)``: the encoded tokens (B, n, d) and the block's output (B, Q, d)."""
        x = self.encoder(x, key_mask)
        queries = self.refined_queries().to(x.dtype)
        return x, self.norm_out(self.cross_attn(queries, x, key_mask))


@register_head("boq")
class BoQ(PoolingHead):
    """BoQ (Ali-bey, Chaib-draa & Giguère, "BoQ: A place is worth a bag of learnable queries", CVPR 2024;
    amaralibey/Bag-of-Queries).

    A 3x3 convolution ``proj_c`` (C -> d = ``proj_channels``, padding 1) on the map, flattened to n tokens, LayerNorm;
    then L = ``num_layers`` blocks in cascade, each (:class:`BoQBlock`): a transformer encoder layer on the tokens
    (post-norm, ReLU feed-forward 4d, h heads), Q = ``num_queries`` learned queries ``q <- LN(q + SelfAttn(q))``,
    and ``o_i = LN(CrossAttn(q, tokens))`` (Q x d). The L outputs concatenated (L Q x d), ``fc`` =
    ``Linear(L Q -> R)`` (R = ``row_dim``) across the query axis, flattened d-major (index ``c R + r``), L2.
    out_dim = d R. h = ``num_heads``, default d // 64 as the authors (1 below d = 64).

    The authors' two configurations (their ``hubconf.py`` and training script; the same module): ResNet-50 layer3
    (C = 1024) with d = 512, Q = 64, R = 32 (16384-d, 320 px training / 384 px evaluation) and DINOv2 ViT-B/14
    (C = 768, the last block's tokens *without* DINOv2's final norm) with d = 384, Q = 64, R = 32 (12288-d, 224 / 322
    px), both L = 2. ``conf/head/boq.yaml`` and ``boq_dinov2.yaml``.

    Masks: masked positions are zeroed before the convolution (a rectangle of valid positions then sees the zero
    padding the unpadded map gets), and are left out of every attention as keys (a key padding mask in the encoders'
    self-attention and in the cross-attention), so a padded image with its mask gives the unpadded descriptor.
    Attention runs on ``F.scaled_dot_product_attention``; the queries' self-attention, which does not depend on the
    image, once per forward (the authors repeat it for every image of the batch). The forward returns the
    descriptor only; the cross-attention weights (which positions each query looks at) are the ``cross_attention``
    map of :meth:`internal_maps` (B, L Q, H, W).

    Parameters in the authors' layout (so :meth:`from_reference` reads their keys one to one): ``proj_c``,
    ``norm_input``, ``boqs.{i}.encoder.{self_attn.{in_proj_weight, in_proj_bias, out_proj}, linear1, linear2, norm1,
    norm2}``, ``boqs.{i}.queries`` (1, Q, d), ``boqs.{i}.{self_attn, norm_q, cross_attn, norm_out}``, ``fc``.
    """

    capabilities = HeadCapabilities(l2_output=True, maps=("cross_attention",))

    def __init__(self, in_channels: int, proj_channels: int = 512, num_queries: int = 32, num_layers: int = 2,
                 row_dim: int = 32, num_heads: Optional[int] = None) -> None:
        proj_channels = check_positive_int("BoQ", "proj_channels", proj_channels)
        num_queries = check_positive_int("BoQ", "num_queries", num_queries)
        num_layers = check_positive_int("BoQ", "num_layers", num_layers)
        row_dim = check_positive_int("BoQ", "row_dim", row_dim)
        if num_heads is None:
            num_heads = max(proj_channels // 64, 1)
        num_heads = check_positive_int("BoQ", "num_heads", num_heads)
        if proj_channels % num_heads:
            raise ValueError(f"BoQ: num_heads={num_heads} must divide proj_channels={proj_channels}")
        super().__init__(in_channels, proj_channels * row_dim)
        self.proj_channels, self.num_queries, self.num_layers = proj_channels, num_queries, num_layers
        self.row_dim, self.num_heads = row_dim, num_heads
        self.proj_c = nn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj_channels)
        self.boqs = nn.ModuleList([BoQBlock(proj_channels, num_queries, num_heads) for _ in range(num_layers)])
        self.fc = nn.Linear(num_layers * num_queries, row_dim)

    def _tokens(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The normalised projected tokens (B, n, d); masked positions zeroed before the convolution."""
        x = self.proj_c(AF.zero_masked(AF.accumulation_dtype(x), mask))
        return self.norm_input(x.flatten(2).transpose(1, 2))

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        key_mask: Optional[Tensor] = None
        if mask is not None:
            key_mask = mask.flatten(1)
        tokens = self._tokens(x, mask)
        outputs: List[Tensor] = []
        for block in self.boqs:
            tokens, out = block(tokens, key_mask)
            outputs.append(out)
        rows = self.fc(torch.cat(outputs, dim=1).transpose(1, 2))                       # (B, d, R)
        return AF.l2_normalize(AF.accumulation_dtype(rows).flatten(1), dim=-1)

    def internal_maps(self, x: Tensor, mask: Optional[Tensor] = None,
                      token: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``cross_attention`` (B, L Q, H, W): each query's attention weights over the positions (averaged over the
        heads; block-major: block i's queries are rows i Q .. i Q + Q - 1), each summing to 1 over the valid
        positions, zero at masked ones."""
        AF.check_feature_map(x, mask, self.in_channels, "BoQ")
        key_mask = None if mask is None else mask.flatten(1)
        tokens = self._tokens(x, mask)
        maps = []
        for block in self.boqs:
            tokens = block.encoder(tokens, key_mask)
            maps.append(block.cross_attn.weights(block.refined_queries().to(tokens.dtype), tokens, key_mask))
        return {"cross_attention": torch.cat(maps, dim=1).unflatten(-1, x.shape[-2:])}

    @classmethod
    def from_reference(cls, state_dict: Mapping[str, Any], num_heads: Optional[int] = None,
                       prefix: Optional[str] = None) -> "BoQ":
        """The head from the authors' ``BoQ`` state dict (amaralibey/Bag-of-Queries ``src/boq.py``; the released
        ``resnet50_16384.pth`` and ``dinov2_12288.pth`` hold it under ``aggregator.``, auto-detected, or
        ``prefix=``): ``proj_c.{weight,bias}`` ((d, C, 3, 3)), ``norm_input.*``, ``boqs.{i}.encoder.*``
        (``nn.TransformerEncoderLayer``: ``self_attn.in_proj_weight`` (3d, d), ``self_attn.out_proj.*``,
        ``linear1`` (4d, d), ``linear2``, ``norm1``, ``norm2``), ``boqs.{i}.queries`` (1, Q, d),
        ``boqs.{i}.self_attn.*``, ``boqs.{i}.norm_q.*``, ``boqs.{i}.cross_attn.*``, ``boqs.{i}.norm_out.*``,
        ``fc.{weight,bias}`` ((R, L Q)). C, d, Q, L and R come from the shapes; the number of heads is not in the
        weights: ``num_heads``, default d // 64 (the authors' rule). Takes the weights' dtype."""
        what = "BoQ.from_reference"
        prefix = reference_prefix(state_dict, ["proj_c.weight", "norm_input.weight"], what, prefix)
        proj = reference_tensor(state_dict, prefix + "proj_c.weight", what, dims=4)
        width, in_channels = proj.shape[:2]
        if tuple(proj.shape[2:]) != (3, 3):
            raise StateDictError(f"{what}: {prefix + 'proj_c.weight'!r} must be a 3x3 convolution (d, C, 3, 3), "
                                 f"found {tuple(proj.shape)}")
        layers = 0
        while any(isinstance(k, str) and k.startswith(f"{prefix}boqs.{layers}.") for k in state_dict):
            layers += 1
        if layers == 0:
            raise StateDictError(f"{what}: missing key {prefix + 'boqs.0.queries'!r} (no BoQ block in the state_dict)")
        queries = reference_tensor(state_dict, prefix + "boqs.0.queries", what, dims=3)
        fc = reference_tensor(state_dict, prefix + "fc.weight", what, dims=2)
        head = cls(in_channels, width, queries.shape[1], layers, fc.shape[0], num_heads)
        expected = head.state_dict()
        ours = {}
        for key, value in expected.items():
            ours[key] = reference_tensor(state_dict, prefix + key, what, shape=tuple(value.shape))
        check_unexpected(state_dict, prefix, ["proj_c", "norm_input", "boqs", "fc"], {prefix + k for k in ours}, what)
        head = head.to(proj.dtype)
        head.load_state_dict(ours)
        return head

    def _options(self) -> List[str]:
        return [f"proj_channels={self.proj_channels}", f"num_queries={self.num_queries}",
                f"num_layers={self.num_layers}", f"row_dim={self.row_dim}", f"num_heads={self.num_heads}"]
