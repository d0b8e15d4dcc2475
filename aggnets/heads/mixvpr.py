"""MixVPR: Feature-Mixer blocks over the flattened map, then channel and row projections."""

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as AF
from ..registry import register_head
from .base import HeadCapabilities, PoolingHead, check_positive_int
from .reference import StateDictError, check_unexpected, reference_prefix, reference_tensor

__all__ = ["MixVPR"]


@register_head("mixvpr")
class MixVPR(PoolingHead):
    """MixVPR (Ali-bey, Chaib-draa & Giguère, "MixVPR: Feature mixing for visual place recognition", WACV 2023;
    amaralibey/MixVPR).

    The map is flattened to C rows of length N = H W (``Z = x.flatten(2)``); ``mix_depth`` = L Feature-Mixer blocks
    ``Z <- Z + W2 ReLU(W1 LN(Z) + b1) + b2`` act along the N axis of every row (shared over rows; ``W1`` (r N, N),
    ``W2`` (N, r N), r = ``mlp_ratio``); then a channel projection ``Linear(C -> d)`` (d = ``out_channels``) and a
    row projection ``Linear(N -> R)`` (R = ``out_rows``): ``f = L2(vec_d-major[ W_c Z W_r^T + b_c (W_r 1)^T +
    1 b_r^T ])``, out_dim = d R (defaults 512 x 4 = 2048; the paper's 4096-d model has d = 1024). The projections are
    reassociated (``W_c (Z W_r^T)``, see :func:`aggnets.functional.mixvpr`): the same descriptor, ~N / R times less
    work on them.

    The mixer weights fix the map size: the head takes ``in_h`` x ``in_w`` maps only (ResNet-50 layer3 at 320 x 320
    px: 20 x 20) and raises ``ValueError`` for another size. ``resample=True`` (opt-in) resizes any map to
    ``in_h`` x ``in_w`` first (``F.interpolate``, bilinear, ``align_corners=False``, antialiased when shrinking; an
    identity at that size), so the instance takes any size (its ``capabilities``: ``any_size``, ``dynamic_onnx``) —
    at the cost of one resize of the (B, C, H, W) map per forward (and of its backward), and of descriptors that are
    not the authors' for other image sizes (the weights were trained at one resolution: a resized map is an
    approximation).

    No mask: the mixers mix all N positions densely (a padded position changes every output), so a mask raises
    ``ValueError``; use same-size batches. Init as the authors': mixer linears trunc-normal (std 0.02), zero biases,
    LayerNorm (1, 0); the projections PyTorch's ``nn.Linear`` default. LayerNorm eps 1e-5 (``nn.LayerNorm``'s).
    Parameters: the L blocks stacked, ``mix_norm_weight`` / ``mix_norm_bias`` (L, N), ``mix_fc1_weight`` (L, rN, N),
    ``mix_fc1_bias`` (L, rN), ``mix_fc2_weight`` (L, N, rN), ``mix_fc2_bias`` (L, N); ``channel_proj`` and
    ``row_proj`` (``nn.Linear``, the authors' names). :meth:`from_reference` loads the authors' state dict
    (``mix.{i}.mix.{0,1,3}``, ``channel_proj``, ``row_proj``).
    """

    capabilities = HeadCapabilities(mask=False, any_size=False, size_args=("in_h", "in_w"), dynamic_onnx=False,
                                    l2_output=True)
    in_h: int
    in_w: int
    resample: bool
    eps: float

    def __init__(self, in_channels: int, in_h: int = 20, in_w: int = 20, out_channels: int = 512, mix_depth: int = 4,
                 mlp_ratio: float = 1, out_rows: int = 4, resample: bool = False) -> None:
        in_h = check_positive_int("MixVPR", "in_h", in_h)
        in_w = check_positive_int("MixVPR", "in_w", in_w)
        out_channels = check_positive_int("MixVPR", "out_channels", out_channels)
        out_rows = check_positive_int("MixVPR", "out_rows", out_rows)
        if isinstance(mix_depth, bool) or not isinstance(mix_depth, int) or mix_depth < 0:
            raise ValueError(f"MixVPR: mix_depth must be a non-negative int, got {mix_depth!r}")
        positions = in_h * in_w
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0 \
                or int(positions * mlp_ratio) < 1 or math.isinf(mlp_ratio):
            raise ValueError(f"MixVPR: mlp_ratio must be a positive number with int(in_h * in_w * mlp_ratio) >= 1, "
                             f"got {mlp_ratio!r}")
        if not isinstance(resample, bool):
            raise ValueError(f"MixVPR: resample must be a bool, got {resample!r}")
        super().__init__(in_channels, out_channels * out_rows)
        self.in_h, self.in_w = in_h, in_w
        self.out_channels, self.mix_depth, self.mlp_ratio, self.out_rows = out_channels, mix_depth, mlp_ratio, out_rows
        self.resample = resample
        self.eps = 1e-5
        hidden = int(positions * mlp_ratio)
        self.mix_norm_weight = nn.Parameter(torch.ones(mix_depth, positions))
        self.mix_norm_bias = nn.Parameter(torch.zeros(mix_depth, positions))
        self.mix_fc1_weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(mix_depth, hidden, positions), std=0.02))
        self.mix_fc1_bias = nn.Parameter(torch.zeros(mix_depth, hidden))
        self.mix_fc2_weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(mix_depth, positions, hidden), std=0.02))
        self.mix_fc2_bias = nn.Parameter(torch.zeros(mix_depth, positions))
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(positions, out_rows)
        if resample:
            # any size, and one exported graph for every H x W (the resize to a fixed size exports with tensors)
            self.capabilities = type(self).capabilities.replace(any_size=True, size_args=(), dynamic_onnx=True)
        else:
            self._fix_map_size(in_h, in_w, "or resample=True to resize any map to in_h x in_w first")

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        if self.resample:
            x = F.interpolate(AF.accumulation_dtype(x), size=(self.in_h, self.in_w), mode="bilinear",
                              align_corners=False, antialias=True)
        return AF.mixvpr(x, self.mix_norm_weight, self.mix_norm_bias, self.mix_fc1_weight, self.mix_fc1_bias,
                         self.mix_fc2_weight, self.mix_fc2_bias, self.channel_proj.weight, self.channel_proj.bias,
                         self.row_proj.weight, self.row_proj.bias, self.eps)

    @classmethod
    def from_reference(cls, state_dict: Mapping[str, Any], in_h: Optional[int] = None, in_w: Optional[int] = None,
                       resample: bool = False, prefix: Optional[str] = None) -> "MixVPR":
        """The head from the authors' ``MixVPR`` state dict (amaralibey/MixVPR ``models/aggregators/mixvpr.py``):
        ``mix.{i}.mix.0.{weight,bias}`` (LayerNorm, (N,)), ``mix.{i}.mix.1.{weight,bias}`` ((rN, N), (rN,)),
        ``mix.{i}.mix.3.{weight,bias}`` ((N, rN), (N,)), ``channel_proj.{weight,bias}`` ((d, C), (d,)),
        ``row_proj.weight`` (R, N) and ``row_proj.bias`` (R,) — absent in the repository's first version
        (``bias=False``): then a zero bias, the same output. Bare or under a prefix (``aggregator.`` in their
        ``VPRModel`` checkpoints; auto-detected, or ``prefix=``).

        C, d, R, N, L and r come from the shapes; ``in_h`` x ``in_w`` (= N) is not in the weights: give them, or one
        of them, or neither for a square map (N a perfect square; a wrong guess is never silent: another map size
        raises). ``resample`` as in the constructor. Takes the weights' dtype.
        """
        what = "MixVPR.from_reference"
        prefix = reference_prefix(state_dict, ["channel_proj.weight", "row_proj.weight"], what, prefix)
        channel_weight = reference_tensor(state_dict, prefix + "channel_proj.weight", what, dims=2)
        out_channels, in_channels = channel_weight.shape
        channel_bias = reference_tensor(state_dict, prefix + "channel_proj.bias", what, shape=(out_channels,))
        row_weight = reference_tensor(state_dict, prefix + "row_proj.weight", what, dims=2)
        out_rows, positions = row_weight.shape
        row_bias = reference_tensor(state_dict, prefix + "row_proj.bias", what, shape=(out_rows,), optional=True)
        used = {prefix + k for k in ("channel_proj.weight", "channel_proj.bias", "row_proj.weight", "row_proj.bias")}
        blocks = []
        while True:
            block = f"{prefix}mix.{len(blocks)}.mix."
            if not any(isinstance(k, str) and k.startswith(block) for k in state_dict):
                break
            fc1 = reference_tensor(state_dict, block + "1.weight", what, dims=2)
            hidden = fc1.shape[0]
            tensors = [reference_tensor(state_dict, block + "0.weight", what, shape=(positions,)),
                       reference_tensor(state_dict, block + "0.bias", what, shape=(positions,)),
                       reference_tensor(state_dict, block + "1.weight", what, shape=(hidden, positions)),
                       reference_tensor(state_dict, block + "1.bias", what, shape=(hidden,)),
                       reference_tensor(state_dict, block + "3.weight", what, shape=(positions, hidden)),
                       reference_tensor(state_dict, block + "3.bias", what, shape=(positions,))]
            if blocks and hidden != blocks[0][2].shape[0]:
                raise StateDictError(f"{what}: {block + '1.weight'!r} has shape {tuple(fc1.shape)} but block 0 has "
                                     f"{tuple(blocks[0][2].shape)} (the blocks share mlp_ratio)")
            used |= {block + k for k in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")}
            blocks.append(tensors)
        check_unexpected(state_dict, prefix, ["mix", "channel_proj", "row_proj"], used, what)
        in_h, in_w = _map_size(positions, in_h, in_w, what)
        hidden = blocks[0][2].shape[0] if blocks else positions
        mlp_ratio: float = hidden // positions if hidden % positions == 0 else hidden / positions
        if int(positions * mlp_ratio) != hidden:  # a ratio whose product rounds down below the hidden width
            mlp_ratio = (hidden + 0.5) / positions
        head = cls(in_channels, in_h, in_w, out_channels, len(blocks), mlp_ratio, out_rows, resample=resample)
        head = head.to(channel_weight.dtype)

        def stacked(index: int, shape: tuple) -> Tensor:
            if not blocks:
                return torch.zeros(shape, dtype=channel_weight.dtype)
            return torch.stack([tensors[index] for tensors in blocks])

        ours = {"mix_norm_weight": stacked(0, (0, positions)), "mix_norm_bias": stacked(1, (0, positions)),
                "mix_fc1_weight": stacked(2, (0, hidden, positions)), "mix_fc1_bias": stacked(3, (0, hidden)),
                "mix_fc2_weight": stacked(4, (0, positions, hidden)), "mix_fc2_bias": stacked(5, (0, positions)),
                "channel_proj.weight": channel_weight, "channel_proj.bias": channel_bias,
                "row_proj.weight": row_weight,
                "row_proj.bias": torch.zeros(out_rows, dtype=row_weight.dtype) if row_bias is None else row_bias}
        head.load_state_dict(ours)
        return head

    def _options(self) -> list[str]:
        options = [f"in_h={self.in_h}", f"in_w={self.in_w}", f"out_channels={self.out_channels}",
                   f"mix_depth={self.mix_depth}", f"mlp_ratio={self.mlp_ratio}", f"out_rows={self.out_rows}"]
        return options + (["resample=True"] if self.resample else [])


def _map_size(positions: int, in_h: Optional[int], in_w: Optional[int], what: str) -> tuple[int, int]:
    """(in_h, in_w) with in_h * in_w = positions, from those given (a square map when neither is)."""
    if in_h is None and in_w is None:
        side = math.isqrt(positions)
        if side * side != positions:
            raise ValueError(f"{what}: the weights are for N = {positions} positions, not a square map: pass in_h and "
                             "in_w (in_h * in_w = N)")
        return side, side
    if in_h is None or in_w is None:
        given = in_w if in_h is None else in_h
        if not isinstance(given, int) or given <= 0 or positions % given:
            raise ValueError(f"{what}: {'in_w' if in_h is None else 'in_h'}={given!r} does not divide the N = "
                             f"{positions} positions of the weights")
        other = positions // given
        return (other, given) if in_h is None else (given, other)
    if in_h * in_w != positions:
        raise ValueError(f"{what}: in_h * in_w = {in_h} * {in_w} = {in_h * in_w}, but the weights are for N = "
                         f"{positions} positions (row_proj.weight has shape (R, N))")
    return in_h, in_w
