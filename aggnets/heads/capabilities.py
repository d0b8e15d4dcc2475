"""What a head supports, declared once on its class and read by everything else (export, monitoring, codebook
initialisation, extraction, the generic tests) instead of per-head tables."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["HeadCapabilities", "TOKEN_USES", "CODEBOOK_KINDS", "INPUT_DOMAINS"]

TOKEN_USES = ("none", "optional", "required")
CODEBOOK_KINDS = ("none", "centroids", "gmm")
INPUT_DOMAINS = ("real", "nonnegative")


@dataclass(frozen=True)
class HeadCapabilities:
    """The declared behaviour of a head class (``HeadClass.capabilities``; an instance may refine it, e.g. a
    spatial pyramid inherits its wrapped head's codebook).

    ``mask``: the forward honours a (B, H, W) bool mask (masked positions never influence the output); False: a
    mask raises ``ValueError``.
    ``any_size``: any H x W; False: the head was built for one map size (``head.map_size``, (H, W)) and another
    size raises ``ValueError`` naming ``size_args``, the two constructor arguments that fix it (e.g.
    ``("in_h", "in_w")``).
    ``global_token``: whether ``forward(x, mask, token)`` takes the backbone's global (class) token (B, C):
    ``"none"`` (passing one raises), ``"optional"`` or ``"required"``. :class:`aggnets.Embedder` passes it to
    heads that use it, and substitutes the masked mean of the map on backbones without one.
    ``dynamic_onnx``: the exported ONNX graph is right at every H x W (else it is exported at a fixed H x W).
    ``fullgraph``: the masked forward is one graph (``torch.compile(fullgraph=True)``, ONNX export with a mask);
    False when the mask's layout is read in Python (graph breaks; export without a mask only).
    ``scriptable``: ``torch.jit.script`` compiles it (else use ``torch.jit.trace`` / ``torch.compile``).
    ``codebook``: ``"none"``, ``"centroids"`` (k-means init: ``num_clusters``, ``normalize_input``, ``frozen``,
    ``default_alpha``, ``load_centroids(centroids, alpha, scheme)``) or ``"gmm"`` (``num_clusters``,
    ``load_gmm(weights, means, variances)``); such heads also have ``assignment_map(x, mask)`` (B, K, H, W).
    ``internals``: the names of :meth:`PoolingHead.internals` (parameter-derived values worth watching);
    ``maps``: the names of :meth:`PoolingHead.internal_maps` (per-position maps of an input, drawn over images).
    ``orderless``: the descriptor depends only on the multiset of valid local descriptors (not their positions).
    ``l2_output``: the descriptor is L2-normalised by definition. ``input_domain``: ``"nonnegative"`` for heads
    defined on post-ReLU maps (CroW).
    """

    mask: bool = True
    any_size: bool = True
    size_args: tuple[str, ...] = ()
    global_token: str = "none"
    dynamic_onnx: bool = True
    fullgraph: bool = True
    scriptable: bool = True
    codebook: str = "none"
    internals: tuple[str, ...] = ()
    maps: tuple[str, ...] = ()
    orderless: bool = False
    l2_output: bool = False
    input_domain: str = "real"

    def __post_init__(self) -> None:
        for name, allowed in (("global_token", TOKEN_USES), ("codebook", CODEBOOK_KINDS),
                              ("input_domain", INPUT_DOMAINS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"HeadCapabilities: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.any_size and len(self.size_args) != 2:
            raise ValueError("HeadCapabilities: a fixed-size head (any_size=False) must name its two size arguments "
                             "(size_args, e.g. ('in_h', 'in_w'))")
        if self.codebook != "none" and "assignment" not in self.maps:
            raise ValueError("HeadCapabilities: a codebook head must list the 'assignment' map")

    def replace(self, **changes: Any) -> "HeadCapabilities":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
