"""The interface every head shares: (B, C, H, W) feature map [+ (B, H, W) bool mask] [+ (B, C) global token] ->
(B, out_dim), with what the head supports declared on its class (:class:`HeadCapabilities`)."""
import warnings
from typing import Dict, List, Optional

from torch import Tensor, nn

from ..functional.checks import check_feature_map, check_head_input
from ..functional.pooling import spoc
from .capabilities import HeadCapabilities

__all__ = ["PoolingHead", "HeadCapabilities"]

_TOKEN_USE = {"none": 0, "optional": 1, "required": 2}


class PoolingHead(nn.Module):
    """Base class of the pooling heads.

    Subclasses set ``in_channels`` and ``out_dim`` at construction, declare ``capabilities`` on the class and
    implement :meth:`pool` (or :meth:`pool_token` when they take the global token). :meth:`forward` validates the
    input against the declaration first: a mask given to a head that cannot take one, another map size for a
    fixed-size head, or a token given to a head that does not use one raise ``ValueError`` instead of a wrong
    descriptor. ``mask`` is True at valid positions; masked positions never influence the output. The output is
    float32 for half-precision inputs or under autocast, else the input's dtype.

    Global token: a head with ``global_token="optional"`` called without one (a CNN backbone has no class token)
    gets the masked mean of the map in its place, ``(1/N) sum_n x_n`` over the valid positions (what a class token
    summarises); a ``"required"`` one raises.
    """

    __jit_ignored_attributes__ = ["capabilities"]
    __jit_unused_properties__ = ["map_size", "uses_token"]
    capabilities = HeadCapabilities()

    in_channels: int
    out_dim: int
    _head_name: str  # the class name, for error messages (TorchScript cannot read ``type(self).__name__``)
    _takes_mask: bool
    _token_use: int  # 0: none, 1: optional, 2: required
    _fixed_h: int  # 0: any size
    _fixed_w: int
    _size_hint: str

    def __init__(self, in_channels: int, out_dim: int) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels <= 0:
            raise ValueError(f"{type(self).__name__}: in_channels must be a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        self.out_dim = out_dim
        self._head_name = type(self).__name__
        capabilities = type(self).capabilities
        self._takes_mask = capabilities.mask
        self._token_use = _TOKEN_USE[capabilities.global_token]
        self._fixed_h, self._fixed_w, self._size_hint = 0, 0, ""

    def _fix_map_size(self, height: int, width: int, hint: str = "") -> None:
        """Declare the one (H, W) this head takes (``capabilities.any_size`` is False); the error for another size
        names ``capabilities.size_args`` and ``hint`` (e.g. another way to take any size)."""
        names = self.capabilities.size_args
        args = f"{names[0]}=H, {names[1]}=W" if len(names) == 2 else "its size arguments"
        self._fixed_h, self._fixed_w = int(height), int(width)
        self._size_hint = args + (f"; {hint}" if hint else "")

    @property
    def map_size(self) -> Optional[tuple]:
        """The (H, W) a fixed-size head was built for; None when it takes any size."""
        return (self._fixed_h, self._fixed_w) if self._fixed_h > 0 else None

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, token: Optional[Tensor] = None) -> Tensor:
        """Pool ``x`` (B, C, H, W), restricted to ``mask`` (B, H, W) when given, into (B, out_dim); ``token``
        (B, C) is the backbone's global token, for heads that declare they use it."""
        check_feature_map(x, mask, self.in_channels, self._head_name)
        check_head_input(x, mask, token, self._head_name, self._takes_mask, self._token_use, self._fixed_h,
                         self._fixed_w, self._size_hint)
        if self._token_use == 0:
            return self.pool(x, mask)
        if token is None:
            token = spoc(x, mask)
        return self.pool_token(x, mask, token)

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The one method a head without a global token implements: ``x`` (B, C, H, W), already checked, and
        ``mask`` (B, H, W) bool (True = valid) or None, to the (B, out_dim) descriptor. :meth:`forward` calls it."""
        raise NotImplementedError

    def pool_token(self, x: Tensor, mask: Optional[Tensor], token: Tensor) -> Tensor:
        """What a head that uses the global token implements instead of :meth:`pool`: ``token`` (B, C) is the
        backbone's class token, or the masked mean of ``x`` on a backbone without one."""
        raise NotImplementedError

    @property
    def uses_token(self) -> bool:
        """Whether the forward takes the global token (``capabilities.global_token`` is not ``"none"``)."""
        return self._token_use > 0

    def internals(self) -> Dict[str, Tensor]:
        """The parameter-derived values worth watching while training (names in ``capabilities.internals``)."""
        return {}

    def internal_maps(self, x: Tensor, mask: Optional[Tensor] = None,
                      token: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Per-position maps (B, M, H, W) of an input (names in ``capabilities.maps``), e.g. a codebook head's
        soft assignment; masked positions are zero."""
        return {}

    def feat_mult(self) -> float:
        """Deprecated: ``out_dim / in_channels`` as a float, where timm's ``feat_mult`` is an integer pooling
        multiple; use ``head.out_dim`` (and ``head.in_channels``)."""
        warnings.warn("PoolingHead.feat_mult() is deprecated: use head.out_dim / head.in_channels", FutureWarning,
                      stacklevel=2)
        return self.out_dim / self.in_channels

    def extra_repr(self) -> str:
        options = self._options()
        return ", ".join([f"in_channels={self.in_channels}", *options, f"out_dim={self.out_dim}"])

    def _options(self) -> List[str]:
        return []


def check_positive_int(owner: str, name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value
