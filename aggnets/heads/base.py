"""The interface every head shares: (B, C, H, W) feature map [+ (B, H, W) bool mask] -> (B, out_dim)."""
from typing import Optional

from torch import Tensor, nn

from ..functional.checks import check_feature_map

__all__ = ["PoolingHead"]


class PoolingHead(nn.Module):
    """Base class of the pooling heads.

    Subclasses set ``in_channels`` and ``out_dim`` at construction and implement :meth:`pool`; :meth:`forward`
    validates the input first. ``mask`` is True at valid positions; masked positions never influence the output.
    The output is float32 for half-precision inputs or under autocast, else the input's dtype.
    """

    in_channels: int
    out_dim: int
    _head_name: str  # the class name, for error messages (TorchScript cannot read ``type(self).__name__``)

    def __init__(self, in_channels: int, out_dim: int) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels <= 0:
            raise ValueError(f"{type(self).__name__}: in_channels must be a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        self.out_dim = out_dim
        self._head_name = type(self).__name__

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Pool ``x`` (B, C, H, W), restricted to ``mask`` (B, H, W) when given, into (B, out_dim)."""
        check_feature_map(x, mask, self.in_channels, self._head_name)
        return self.pool(x, mask)

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def feat_mult(self) -> float:
        """``out_dim / in_channels`` (timm-style introspection)."""
        return self.out_dim / self.in_channels

    def extra_repr(self) -> str:
        options = self._options()
        return ", ".join([f"in_channels={self.in_channels}", *options, f"out_dim={self.out_dim}"])

    def _options(self) -> list[str]:
        return []


def check_positive_int(owner: str, name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value
