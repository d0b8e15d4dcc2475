"""CRN: NetVLAD with a contextual reweighting network (Kim, Dunn & Frahm, CVPR 2017)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from .. import functional as AF
from ..functional.crn import CRN_FILTERS, crn, crn_context
from ..registry import register_head
from .base import HeadCapabilities
from .netvlad import NetVLAD
from .reference import check_unexpected, reference_prefix, reference_tensor

__all__ = ["CRN", "ContextNetwork"]


class ContextNetwork(nn.Module):
    """The contextual reweighting network: (B, C, H, W) map -> context weights (B, 1, H, W) >= 0
    (:func:`aggnets.functional.crn_context`).

    3 x 3 average pooling with stride 2, the "same" convolutions ``filter3`` / ``filter5`` / ``filter7`` (32 / 32 / 20
    filters, bias; Xavier-normal weights and zero biases at construction, as the authors' code), concatenated, ReLU,
    the weighted sum ``accumulation_weight`` (1, 84, 1, 1) + ``accumulation_bias`` (1,) (ones and zero), ReLU,
    bilinear upsampling to H x W. The accumulation is fixed (buffers) unless ``learn_accumulation`` (parameters).
    """

    def __init__(self, in_channels: int, learn_accumulation: bool = False) -> None:
        super().__init__()
        self.learn_accumulation = bool(learn_accumulation)
        filters = 0
        for kernel, count in CRN_FILTERS:
            conv = nn.Conv2d(in_channels, count, kernel_size=kernel, padding=kernel // 2)
            nn.init.xavier_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.add_module(f"filter{kernel}", conv)
            filters += count
        self.num_filters = filters
        weight, bias = torch.ones(1, filters, 1, 1), torch.zeros(1)
        if self.learn_accumulation:
            self.accumulation_weight = nn.Parameter(weight)
            self.accumulation_bias = nn.Parameter(bias)
        else:
            self.register_buffer("accumulation_weight", weight)
            self.register_buffer("accumulation_bias", bias)

    def filter_modules(self) -> list[nn.Conv2d]:
        """The context convolutions, 3 x 3 first."""
        return [getattr(self, f"filter{kernel}") for kernel, _ in CRN_FILTERS]

    def forward(self, x: Tensor) -> Tensor:
        """The context weights (B, 1, H, W) of ``x`` (B, C, H, W), the map as the network sees it (CRN: L2-normalised
        per position); :func:`aggnets.functional.crn_context`."""
        return crn_context(x, [self.filter3.weight, self.filter5.weight, self.filter7.weight],
                           [self.filter3.bias, self.filter5.bias, self.filter7.bias], self.accumulation_weight,
                           self.accumulation_bias)

    def extra_repr(self) -> str:
        return f"learn_accumulation={self.learn_accumulation}"


# The authors' key names (CRN(NetVLAD) of gmberton/deep-visual-geo-localization-benchmark, model/aggregation.py) ->
# ours, with the expected shape (C, K symbolic; "F" = 84 filters).
_REFERENCE_KEYS = {
    "centroids": ("centroids", ("K", "C")),
    "conv.weight": ("assign.weight", ("K", "C", 1, 1)),
    "crn.filter_3_3.weight": ("context.filter3.weight", (32, "C", 3, 3)),
    "crn.filter_3_3.bias": ("context.filter3.bias", (32,)),
    "crn.filter_5_5.weight": ("context.filter5.weight", (32, "C", 5, 5)),
    "crn.filter_5_5.bias": ("context.filter5.bias", (32,)),
    "crn.filter_7_7.weight": ("context.filter7.weight", (20, "C", 7, 7)),
    "crn.filter_7_7.bias": ("context.filter7.bias", (20,)),
    "crn.acc_w.weight": ("context.accumulation_weight", (1, 84, 1, 1)),
    "crn.acc_w.bias": ("context.accumulation_bias", (1,)),
}
_REFERENCE_OPTIONAL = {"conv.bias": ("assign.bias", ("K",))}


@register_head("crn")
class CRN(NetVLAD):
    """CRN (Kim, Dunn & Frahm, CVPR 2017): NetVLAD whose soft assignment is reweighted by a context network.

    ``V_k = sum_n m_n a_k(x_n) (x_n - c_k)``, ``a_k(x) = softmax_k(w_k^T x + b_k)`` on L2-normalised descriptors,
    ``m = context(x)`` (B, 1, H, W) >= 0 from :class:`ContextNetwork` on the same L2-normalised map; each ``V_k``
    intra-normalised, the K * C vector L2-normalised, exactly as :class:`NetVLAD`. Computed as
    ``(A * m) X^T - ((A * m) 1) c`` (:func:`aggnets.functional.crn`): two matrix products, no loop over clusters.

    Parameters: NetVLAD's (``centroids``, ``assign``; k-means initialisation by ``init_from_descriptors`` /
    ``from_centroids`` / ``load_centroids``) and ``context.filter{3,5,7}`` (trainable); ``context.accumulation_*``
    are fixed buffers (ones, zero), as in the authors' code, unless ``learn_accumulation=True``. The authors' weights
    load with :meth:`from_reference`.

    Any map size: the context weights are upsampled to exactly H x W. The authors' code upsamples by a factor of 2,
    which gives the same values for even H and W and breaks for odd ones (their map is one row / column short); an
    axis of length 1, where their pooling has no output, averages over its one clipped window.

    Masks: each image is cropped to the bounding box of its valid positions (as R-MAC and the spatial pyramid do;
    images sharing a box are encoded together), so that the context network's pooling grid, convolutions (their zero
    padding is the image's own border) and upsampling see the image alone: a padded image gives the descriptor of the
    unpadded one. Masked positions inside the box are zeros for the context network and get no assignment.

    Capabilities: reading the boxes is data-dependent, so the masked forward is not one graph under
    ``torch.compile`` and is not exported to ONNX (without a mask: one graph, any H x W); the box grouping is written
    in the TorchScript subset (no ``map_valid_boxes`` callable), so the head scripts. The context weights depend on
    the layout (not orderless). Maps: ``assignment`` (a_k, before reweighting) and ``context`` (m).
    """

    capabilities = HeadCapabilities(codebook="centroids", l2_output=True, fullgraph=False,
                                    maps=("assignment", "context"),
                                    internals=("alpha", "assign_weight_norm", "centroid_norm", "context_filter_norm",
                                               "context_filter_bias"))

    def __init__(self, in_channels: int, num_clusters: int = 64, *, alpha: Optional[float] = None,
                 normalize_input: bool = True, intra_norm: bool = True, power: Optional[float] = None,
                 bias: bool = True, assignment: str = "soft", learn_accumulation: bool = False) -> None:
        super().__init__(in_channels, num_clusters, alpha=alpha, normalize_input=normalize_input,
                         intra_norm=intra_norm, power=power, bias=bias, assignment=assignment)
        if not isinstance(learn_accumulation, bool):
            raise ValueError(f"CRN: learn_accumulation must be a bool, got {learn_accumulation!r}")
        self.context = ContextNetwork(in_channels, learn_accumulation)
        if learn_accumulation:  # an instance refines its class's declaration: the learnt weights are worth watching
            self.capabilities = type(self).capabilities.replace(
                internals=(*type(self).capabilities.internals, "accumulation_weight"))

    # --- forward ------------------------------------------------------------------------------------------------

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        if mask is not None and not torch.jit.is_scripting():
            if torch.compiler.is_exporting():
                raise ValueError("CRN: cannot export with a mask (the context network runs on each image's valid "
                                 "bounding box, which depends on the data); export without a mask")
        context = self.context
        centroids = self.centroids
        assert centroids is not None  # CRN always has them (a refinement for TorchScript: NetVLAD's may be None)
        return crn(x, self.assign_weight, self.assign.bias, centroids,
                   [context.filter3.weight, context.filter5.weight, context.filter7.weight],
                   [context.filter3.bias, context.filter5.bias, context.filter7.bias], context.accumulation_weight,
                   context.accumulation_bias, mask, hard=self.assignment == "hard",
                   normalize_input=self.normalize_input, intra_norm=self.intra_norm, power=self.power)

    # --- looking inside -----------------------------------------------------------------------------------------

    def _context_of(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        x = AF.zero_masked(AF.accumulation_dtype(x), mask)
        if self.normalize_input:
            x = AF.l2_normalize(x, dim=1)
        context = self.context(x)
        if mask is not None:
            context = AF.zero_masked(context, mask)
        return context

    def context_map(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The context weights ``m`` (B, 1, H, W) >= 0 of ``x`` (B, C, H, W), exactly as the forward pass computes
        them (on each image's valid bounding box when ``mask`` is given); zero at masked positions. Differentiable;
        float32 for half-precision inputs."""
        AF.check_feature_map(x, mask, self.in_channels, type(self).__name__)
        if mask is None:
            return self._context_of(x, None)
        x = AF.accumulation_dtype(x)
        rows = []
        for index, (top, left, bottom, right) in enumerate(AF.valid_boxes(mask)):
            crop = self._context_of(x[index:index + 1, :, top:bottom, left:right],
                                    mask[index:index + 1, top:bottom, left:right])
            rows.append(nn.functional.pad(crop, (left, x.shape[-1] - right, top, x.shape[-2] - bottom)))
        return torch.cat(rows, dim=0)

    def internal_maps(self, x: Tensor, mask: Optional[Tensor] = None,
                      token: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``assignment``: :meth:`assignment_map` (a_k before reweighting); ``context``: :meth:`context_map`."""
        return {"assignment": self.assignment_map(x, mask), "context": self.context_map(x, mask)}

    def internals(self) -> Dict[str, Tensor]:
        """NetVLAD's (``alpha``, ``assign_weight_norm``, ``centroid_norm``), the context filters' weight norms
        ``context_filter_norm`` ``||W_f||_2`` (84,) and biases ``context_filter_bias`` (84,) (filters of 3 x 3, then
        5 x 5, then 7 x 7: a bias drifting far below zero is a filter whose ReLU died), and with
        ``learn_accumulation`` the ``accumulation_weight`` (84,)."""
        values = super().internals()
        filters = self.context.filter_modules()
        values["context_filter_norm"] = torch.cat([torch.linalg.vector_norm(f.weight.flatten(1), dim=1)
                                                   for f in filters])
        values["context_filter_bias"] = torch.cat([f.bias for f in filters])
        if self.context.learn_accumulation:
            values["accumulation_weight"] = self.context.accumulation_weight.flatten()
        return values

    def _options(self) -> list[str]:
        options = super()._options()
        if self.context.learn_accumulation:
            options.append("learn_accumulation=True")
        return options

    # --- the authors' weights -----------------------------------------------------------------------------------

    @classmethod
    def from_reference(cls, state_dict: Mapping[str, Any], prefix: Optional[str] = None,
                       normalize_input: bool = True, **kwargs: Any) -> "CRN":
        """A CRN with the same output as the authors' ``CRN`` module (gmberton/deep-visual-geo-localization-benchmark,
        ``model/aggregation.py``) holding ``state_dict``.

        Their keys: ``centroids`` (K, C), ``conv.weight`` (K, C, 1, 1) (``conv.bias`` (K,) if present: their
        convolution has none), ``crn.filter_3_3.weight`` (32, C, 3, 3) / ``.bias`` (32,), ``crn.filter_5_5.*``
        (32, C, 5, 5), ``crn.filter_7_7.*`` (20, C, 7, 7), ``crn.acc_w.weight`` (1, 84, 1, 1) / ``.bias`` (1,); C and
        K come from ``centroids``. ``prefix``: where the module sits in a whole model's state dict; None finds it
        (``""``, ``"aggregation."``, ``"module.aggregation."`` of their DataParallel checkpoints, ...).
        ``normalize_input`` must match theirs (default True, as their ``get_aggregation`` builds it); other keyword
        arguments go to the constructor (their forward is soft assignment, intra-normalisation, no power). The head
        takes the centroids' dtype. Errors (:class:`~aggnets.heads.reference.StateDictError`) name the missing,
        unexpected or misshapen key.
        """
        what = "CRN.from_reference"
        for fixed in ("intra_norm", "power", "assignment"):
            if fixed in kwargs:
                raise ValueError(f"{what}: {fixed} is fixed by the authors' forward (soft assignment, "
                                 "intra-normalisation, no power); build CRN(...) directly for another variant")
        prefix = reference_prefix(state_dict, ["centroids", "crn.acc_w.weight"], what, prefix)
        centroids = reference_tensor(state_dict, prefix + "centroids", what, dims=2)
        sizes = {"K": centroids.shape[0], "C": centroids.shape[1]}
        ours: Dict[str, Tensor] = {}
        for name, (target, symbolic) in {**_REFERENCE_KEYS, **_REFERENCE_OPTIONAL}.items():
            shape = tuple(sizes.get(s, s) if isinstance(s, str) else s for s in symbolic)
            value = reference_tensor(state_dict, prefix + name, what, shape=shape,
                                     optional=name in _REFERENCE_OPTIONAL)
            if value is not None:
                ours[target] = value
        check_unexpected(state_dict, prefix, ["centroids", "conv", "crn"],
                         {prefix + name for name in (*_REFERENCE_KEYS, *_REFERENCE_OPTIONAL)}, what)
        head = cls(sizes["C"], sizes["K"], normalize_input=normalize_input, bias="assign.bias" in ours, **kwargs)
        head = head.to(dtype=centroids.dtype if centroids.is_floating_point() else torch.get_default_dtype())
        ours["alpha"] = head.alpha.detach().clone()
        head.load_state_dict(ours)
        return head
