"""Model assembly: backbone -> pooling head -> optional projection -> descriptor, and a linear classifier on top.

Plain ``nn.Module``s with no training framework, so they drop into anyone's code:

>>> backbone = build_backbone("efficientnet_lite0", "blocks.4", weights="DEFAULT")
>>> model = Embedder(backbone, lambda in_channels: NetVLAD(in_channels, 16), projection_dim=256)
>>> model(images).shape  # (B, 256), L2-normalised
"""
from __future__ import annotations

from typing import Callable, Optional, Union

from torch import Tensor, nn

from .backbones.output import BackboneOutput
from .heads.norm import ContextGating
from .functional.norm import l2_normalize

__all__ = ["Embedder", "Classifier"]

HeadSpec = Union[nn.Module, Callable[..., nn.Module]]


def _out_channels(backbone: nn.Module) -> int:
    channels = getattr(backbone, "out_channels", None)
    if not isinstance(channels, int):
        raise TypeError(f"Embedder: the backbone ({type(backbone).__name__}) must expose an int `out_channels` "
                        f"(aggnets.backbones.build_backbone does); got {channels!r}")
    return channels


class Embedder(nn.Module):
    """``f(image) = L2(Wh(CG(P · head(backbone(image)))))``: a global image descriptor of ``out_dim`` values.

    ``head`` is a pooling head module, or a factory called as ``head(in_channels=backbone.out_channels)`` (e.g. a
    ``functools.partial`` from a config), so the channel count never has to be written twice. ``projection_dim``
    adds a linear layer (a learned projection / dimensionality reduction), ``context_gating`` a
    :class:`aggnets.heads.ContextGating` after it (``context_gating_batch_norm``: with LOUPE's batch norm), ``whitening`` a fitted
    :class:`aggnets.heads.Whitening` (PCA or learned Lw, :mod:`aggnets.retrieval`); ``normalize`` L2-normalises the output
    (retrieval); a classifier usually keeps it off.

    A head that declares it uses the backbone's global token (``head.capabilities.global_token``) gets the class
    token of a vision transformer; on a backbone without one (a CNN) an ``"optional"`` head uses the masked mean of
    the map in its place (:class:`aggnets.heads.PoolingHead`) and a ``"required"`` one is refused at construction.
    Everything after the backbone is one method, :meth:`describe`, used by :meth:`forward`, the descriptor
    extraction and export alike.
    """

    def __init__(self, backbone: nn.Module, head: HeadSpec, *, projection_dim: Optional[int] = None,
                 normalize: bool = True, whitening: Optional[nn.Module] = None, context_gating: bool = False,
                 context_gating_batch_norm: bool = False) -> None:
        super().__init__()
        in_channels = _out_channels(backbone)
        if not isinstance(head, nn.Module):
            head = head(in_channels=in_channels)
        head_channels = getattr(head, "in_channels", in_channels)
        if head_channels != in_channels:
            raise ValueError(f"Embedder: the head expects {head_channels} channels but the backbone "
                             f"({getattr(backbone, 'name', type(backbone).__name__)}) gives {in_channels}")
        if not isinstance(getattr(head, "out_dim", None), int):
            raise TypeError(f"Embedder: the head ({type(head).__name__}) must expose an int `out_dim`")
        if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim <= 0):
            raise ValueError(f"Embedder: projection_dim must be a positive int or None, got {projection_dim!r}")
        self.head_uses_token = bool(getattr(head, "uses_token", False))
        capabilities = getattr(head, "capabilities", None)
        if (getattr(capabilities, "global_token", "none") == "required"
                and not getattr(backbone, "has_token", False)):
            raise ValueError(f"Embedder: the {type(head).__name__} head requires the backbone's global token, but the "
                             f"backbone ({getattr(backbone, 'name', type(backbone).__name__)}) has none; use a vision "
                             "transformer backbone")
        self.backbone = backbone
        self.head = head
        self.projection = nn.Linear(head.out_dim, projection_dim) if projection_dim else None
        dim = projection_dim or head.out_dim
        self.context_gating = ContextGating(dim, context_gating_batch_norm) if context_gating else None
        self.normalize = normalize
        self.whitening: Optional[nn.Module] = None
        if whitening is not None:
            self.set_whitening(whitening)

    @property
    def out_dim(self) -> int:
        """The descriptor size: the whitening's, else the projection's, else the head's."""
        if self.whitening is not None:
            return self.whitening.out_features
        return self.projection.out_features if self.projection is not None else self.head.out_dim

    def set_whitening(self, whitening: Optional[nn.Module]) -> None:
        """Append a fitted (PCA / learned) :class:`aggnets.heads.Whitening` after the head (and projection): it
        trains with the model and is saved in its state_dict (``whitening.weight``, ``whitening.bias``)."""
        if whitening is not None:
            in_features = getattr(whitening, "in_features", None)
            before = self.projection.out_features if self.projection is not None else self.head.out_dim
            if in_features != before:
                raise ValueError(f"Embedder: the whitening expects {in_features}-d input, the descriptor before it "
                                 f"has {before}")
        self.whitening = whitening

    def backbone_output(self, images: Tensor, sizes: Optional[Tensor] = None) -> BackboneOutput:
        """The backbone's map, global token (None for a CNN) and, for a padded batch given with each image's
        ``sizes`` (B, 2) (backbones with ``padded_batches``), the mask of each image's positions."""
        extract = getattr(self.backbone, "extract", None)
        if extract is None:  # a plain module returning the map
            if sizes is not None:
                raise ValueError("Embedder: this backbone does not take image sizes")
            return BackboneOutput(self.backbone(images))
        return extract(images) if sizes is None else extract(images, sizes)

    def features(self, images: Tensor) -> Tensor:
        """The backbone's (B, C, H, W) feature map (the head's input)."""
        return self.backbone_output(images).map

    def describe(self, x: Tensor, mask: Optional[Tensor] = None, token: Optional[Tensor] = None) -> Tensor:
        """Everything after the backbone: head (with the global token when it uses one) -> projection -> context
        gating -> whitening -> L2. ``x`` (B, C, H, W) map, ``mask`` (B, H, W), ``token`` (B, C) or None."""
        descriptor = self.head(x, mask, token) if self.head_uses_token else self.head(x, mask)
        if self.projection is not None:
            descriptor = self.projection(descriptor)
        if self.context_gating is not None:
            descriptor = self.context_gating(descriptor)
        if self.whitening is not None:
            descriptor = self.whitening(descriptor)
        return l2_normalize(descriptor, dim=1) if self.normalize else descriptor

    def forward(self, images: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """(B, 3, H, W) images [+ (B, h, w) feature-map mask] -> (B, out_dim) descriptors."""
        out = self.backbone_output(images)
        return self.describe(out.map, mask, out.token)


class Classifier(nn.Module):
    """``logits = W · BN(embedder(image)) + b``.

    The batch norm (on by default) rescales L2-normalised codebook descriptors (entries ~ 1/sqrt(out_dim)) so that
    a linear layer trains at a normal learning rate; ``dropout`` before the linear layer.
    """

    def __init__(self, embedder: Embedder, num_classes: int, *, batchnorm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"Classifier: num_classes must be an int >= 2, got {num_classes!r}")
        self.embedder = embedder
        self.norm = nn.BatchNorm1d(embedder.out_dim) if batchnorm else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(embedder.out_dim, num_classes)
        self.num_classes = num_classes

    def forward(self, images: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self.logits(self.embedder(images, mask))

    def logits(self, embedding: Tensor) -> Tensor:
        """Class scores (B, num_classes) of descriptors already computed by :attr:`embedder`."""
        return self.fc(self.dropout(self.norm(embedding)))
