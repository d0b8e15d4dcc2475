"""Spatial pyramid around any head."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import functional as AF
from ..registry import build_head, register_head
from .base import HeadCapabilities, PoolingHead, check_positive_int

__all__ = ["SpatialPyramid"]


@register_head("spatial_pyramid")
class SpatialPyramid(PoolingHead):
    """Spatial pyramid (Lazebnik, Schmid & Ponce, CVPR 2006): encode each cell of an l x l grid, for every l in
    ``levels``, with ``head`` and concatenate (levels in order, cells row-major). ``out_dim = head.out_dim * sum l^2``
    (a BoF pyramid with levels (1, 2, 4) is 21x the flat histogram).

    ``head`` is a head module, or a registered name built with ``in_channels`` and ``head_kwargs``. Cells follow the
    adaptive-pooling convention (:func:`aggnets.functional.pyramid.cell_bounds`); all cells of a level go through the
    head as one batch, padded cells with a mask. With a mask, the grid covers each image's valid bounding box and a
    cell with no valid position encodes to zeros. Under ``torch.export`` (ONNX) the cells are laid out with tensor
    arithmetic on H, W, so the exported graph takes any H x W (without a mask).

    Capabilities: like R-MAC, the masked form is not one graph and the cell layout is outside the TorchScript subset;
    an instance inherits its wrapped head's codebook, maps and input domain, and exports at any H x W when the
    wrapped head does and takes a mask in one graph.
    """

    capabilities = HeadCapabilities(fullgraph=False, scriptable=False)

    def __init__(self, head: Union[nn.Module, str], levels: Sequence[int] = (1, 2, 4), *,
                 in_channels: Optional[int] = None, head_kwargs: Optional[dict[str, Any]] = None) -> None:
        if isinstance(head, str):
            if in_channels is None:
                raise ValueError("SpatialPyramid: in_channels is required when head is given by name")
            head = build_head(head, in_channels=in_channels, **(head_kwargs or {}))
        elif head_kwargs:
            raise ValueError("SpatialPyramid: head_kwargs only apply when head is given by name")
        if not isinstance(head, PoolingHead):
            raise TypeError(f"SpatialPyramid: head must be an aggnets head or a head name, got {type(head).__name__}")
        if in_channels is not None and in_channels != head.in_channels:
            raise ValueError(f"SpatialPyramid: in_channels={in_channels} but the head has {head.in_channels}")
        levels = tuple(check_positive_int("SpatialPyramid", "levels", level) for level in levels)
        if not levels:
            raise ValueError("SpatialPyramid: levels must not be empty")
        if head.uses_token or head.map_size is not None or not head.capabilities.mask:
            raise ValueError(f"SpatialPyramid: the wrapped {type(head).__name__} must take a mask and any map size "
                             "and no global token (it encodes cells of varying size)")
        super().__init__(head.in_channels, head.out_dim * sum(level * level for level in levels))
        self.head = head
        self.levels = levels
        inner = head.capabilities
        self.capabilities = type(self).capabilities.replace(
            codebook=inner.codebook, maps=inner.maps, input_domain=inner.input_domain,
            dynamic_onnx=inner.dynamic_onnx and inner.fullgraph)

    def _encode(self, x: Tensor, mask: Optional[Tensor], dynamic: Optional[bool] = None) -> Tensor:
        """Encode every level; ``dynamic`` as in :func:`aggnets.functional.pyramid_cells` (default: when exporting
        with a symbolic H or W)."""
        batch = x.shape[0]
        outputs = []
        for level in self.levels:
            cells, cell_mask, empty = AF.pyramid_cells(x, level, mask, dynamic=dynamic)
            encoded = self.head(cells, cell_mask)
            if empty is not None:
                encoded = torch.where(empty.unsqueeze(1), torch.zeros((), dtype=encoded.dtype,
                                                                      device=encoded.device), encoded)
            outputs.append(encoded.reshape(batch, -1))
        return torch.cat(outputs, dim=1)

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        if mask is None:
            return self._encode(x, None)
        if torch.compiler.is_exporting():
            raise ValueError("SpatialPyramid: cannot export with a mask (the grid follows each image's valid bounding "
                             "box, which depends on the data); export without a mask")
        return AF.map_valid_boxes(self._encode, x, mask)

    def init_from_descriptors(self, descriptors: Any, **kwargs: Any) -> dict:
        """Initialise the wrapped codebook head from descriptors (one codebook shared by all cells, as in
        Lazebnik et al.)."""
        if not hasattr(self.head, "init_from_descriptors"):
            raise TypeError(f"SpatialPyramid: the wrapped {type(self.head).__name__} has no codebook to initialise")
        return self.head.init_from_descriptors(descriptors, **kwargs)

    def assignment_map(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The wrapped head's per-position assignment (B, K, H, W) of the whole map: one codebook is shared by all
        cells and a position's assignment does not depend on its cell. ``TypeError`` when the wrapped head has no
        ``assignment_map`` (e.g. GeM)."""
        if not hasattr(self.head, "assignment_map"):
            raise TypeError(f"SpatialPyramid: the wrapped {type(self.head).__name__} has no assignment_map")
        AF.check_feature_map(x, mask, self.in_channels, type(self).__name__)
        return self.head.assignment_map(x, mask)

    def internal_maps(self, x: Tensor, mask: Optional[Tensor] = None,
                      token: Optional[Tensor] = None) -> dict[str, Tensor]:
        """The wrapped head's maps of the whole map (one codebook is shared by all cells)."""
        return self.head.internal_maps(x, mask) if self.head.capabilities.maps else {}

    def _options(self) -> list[str]:
        return [f"levels={self.levels}"]
