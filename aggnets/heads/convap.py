"""ConvAP: a 1x1 convolution and adaptive average pooling to a small grid (GSV-Cities)."""

from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor, nn

from .. import functional as AF
from ..registry import register_head
from .base import HeadCapabilities, PoolingHead, check_positive_int
from .reference import check_unexpected, reference_prefix, reference_tensor

__all__ = ["ConvAP"]


# --- the head ---------------------------------------------------------------------------------------------------------

@register_head("convap")
class ConvAP(PoolingHead):
    """ConvAP (Ali-bey, Chaib-draa & Giguère, "GSV-Cities: Toward appropriate supervised visual place recognition",
    Neurocomputing 2022; amaralibey/gsv-cities).

    ``f = L2( vec[ avg_cell(W x_n + b) ]_{cells} )``: a 1x1 convolution C -> d (``out_channels``, with bias),
    adaptive average pooling to ``s1`` x ``s2`` cells (cell (i, j) spans rows ``[floor(i H / s1), ceil((i + 1) H /
    s1))`` and the same for columns, as ``F.adaptive_avg_pool2d``), the (d, s1, s2) result flattened d-major (index
    ``k s1 s2 + i s2 + j``, the authors' ``flatten(1)``), L2. out_dim = d s1 s2 (defaults 512 x 2 x 2 = 2048).
    Computed as the convolution of the cell means (equal: the cell weights sum to 1), with s1 s2 / (H W) of the
    convolution's work.

    Masks: the grid is laid on the bounding box of each image's valid positions (as R-MAC and SpatialPyramid do), and
    each cell averages its valid positions; a cell with none gives a zero d-vector. So a padded map with its mask
    gives the descriptor of the unpadded map. The box and the cells are computed with tensor arithmetic (no crop), so
    the masked forward is one graph, scripts, and exports at any H x W.

    Parameter ``channel_pool`` is the authors' ``nn.Conv2d(C, d, 1)`` (same keys, shapes and default init; it holds
    the weights, its own forward is not called: hooks on it do not fire): :meth:`from_reference` loads their state
    dict.
    """

    capabilities = HeadCapabilities(l2_output=True)
    s1: int
    s2: int

    def __init__(self, in_channels: int, out_channels: int = 512, s1: int = 2, s2: int = 2) -> None:
        out_channels = check_positive_int("ConvAP", "out_channels", out_channels)
        s1 = check_positive_int("ConvAP", "s1", s1)
        s2 = check_positive_int("ConvAP", "s2", s2)
        super().__init__(in_channels, out_channels * s1 * s2)
        self.out_channels = out_channels
        self.s1, self.s2 = s1, s2
        self.channel_pool = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return AF.convap(x, self.channel_pool.weight, self.channel_pool.bias, self.s1, self.s2, mask)

    @classmethod
    def from_reference(cls, state_dict: Mapping[str, Any], s1: int = 2, s2: int = 2,
                       prefix: Optional[str] = None) -> "ConvAP":
        """The head from the authors' ``ConvAP`` state dict (amaralibey/gsv-cities ``models/aggregators/convap.py``):
        ``channel_pool.weight`` (d, C, 1, 1) and ``channel_pool.bias`` (d,), bare or under a prefix (``aggregator.``
        in their ``VPRModel``; auto-detected, or ``prefix=``). ``s1``, ``s2``: the pooled grid (not in the weights;
        the authors' default 2 x 2). Takes the weights' dtype."""
        what = "ConvAP.from_reference"
        prefix = reference_prefix(state_dict, ["channel_pool.weight"], what, prefix)
        weight = reference_tensor(state_dict, prefix + "channel_pool.weight", what, dims=4)
        d, c = weight.shape[0], weight.shape[1]
        if tuple(weight.shape[2:]) != (1, 1):
            reference_tensor(state_dict, prefix + "channel_pool.weight", what, shape=(d, c, 1, 1))
        bias = reference_tensor(state_dict, prefix + "channel_pool.bias", what, shape=(d,))
        check_unexpected(state_dict, prefix, ["channel_pool"], {prefix + "channel_pool.weight",
                                                                 prefix + "channel_pool.bias"}, what)
        head = cls(c, d, s1=s1, s2=s2).to(weight.dtype)
        head.load_state_dict({"channel_pool.weight": weight, "channel_pool.bias": bias})
        return head

    def _options(self) -> list[str]:
        return [f"out_channels={self.out_channels}", f"s1={self.s1}", f"s2={self.s2}"]
