"""Each published model family's checkpoint -> an :class:`aggnets.Embedder` with the same outputs (the backbone and
aggregator key layouts of the authors' code; see each function)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch

from ..backbones import build_backbone
from ..convert import gem_from_cirtorch, netvlad_from_pytorch_netvlad
from ..heads import CRN, MAC, RMAC, BoQ, ConvAP, CosPlace, MixVPR, SALAD, SPoC, Whitening
from ..heads.reference import StateDictError
from ..models import Embedder
from .keys import (dinov2_keys, load_backbone_state, resnet_children_keys, resnet_named_keys, sub_state,
                   unwrap_checkpoint, vgg_features_keys)

__all__ = ["cosplace_embedder", "mixvpr_embedder", "convap_embedder", "boq_embedder", "salad_embedder",
           "netvlad_embedder", "benchmark_embedder", "cirtorch_embedder"]

_DINOV2 = "timm:vit_base_patch14_dinov2"


def _only(state: Mapping[str, Any], roots: set[str], what: str) -> None:
    extra = sorted({k.split(".")[0] for k in state} - roots)
    if extra:
        raise StateDictError(f"{what}: unexpected top-level name(s) {extra} (the published layout has {sorted(roots)})")


def cosplace_embedder(checkpoint: Any, backbone: str, what: str = "CosPlace") -> Embedder:
    """gmberton/CosPlace and gmberton/EigenPlaces ``GeoLocalizationNet``: ``backbone.*`` (a torchvision ResNet's
    ``children()[:-2]`` as ``backbone.0`` conv1 .. ``backbone.7`` layer4, or VGG16 ``features[:-2]`` up to conv5_3),
    ``aggregation.{1.p, 3.weight, 3.bias}`` (L2, GeM, Flatten, Linear, L2: :class:`aggnets.heads.CosPlace`)."""
    state = unwrap_checkpoint(checkpoint, what)
    _only(state, {"backbone", "aggregation"}, what)
    vgg = backbone == "vgg16"
    net = build_backbone(backbone, "features.28" if vgg else "layer4", weights=None)
    keys = sub_state(state, "backbone.", what)
    load_backbone_state(net, vgg_features_keys(keys) if vgg else resnet_children_keys(keys), what)
    return Embedder(net, CosPlace.from_reference(sub_state(state, "aggregation.", what)))


def mixvpr_embedder(checkpoint: Any, what: str = "MixVPR") -> Embedder:
    """amaralibey/MixVPR ``VPRModel``: ``backbone.model.*`` (torchvision ResNet-50 without layer4: 1024 channels, 20 x 20
    at 320 x 320 px), ``aggregator.*`` (:meth:`aggnets.heads.MixVPR.from_reference`, a 20 x 20 map)."""
    state = unwrap_checkpoint(checkpoint, what)
    _only(state, {"backbone", "aggregator"}, what)
    net = build_backbone("resnet50", "layer3", weights=None)
    load_backbone_state(net, resnet_named_keys(sub_state(state, "backbone.model.", what)), what)
    return Embedder(net, MixVPR.from_reference(sub_state(state, "aggregator.", what), in_h=20, in_w=20))


def convap_embedder(checkpoint: Any, what: str = "ConvAP") -> Embedder:
    """amaralibey/gsv-cities ``VPRModel`` with ConvAP: ``backbone.model.*`` (torchvision ResNet-50 to layer4),
    ``aggregator.channel_pool.{weight, bias}`` (:meth:`aggnets.heads.ConvAP.from_reference`, 2 x 2 cells)."""
    state = unwrap_checkpoint(checkpoint, what)
    _only(state, {"backbone", "aggregator"}, what)
    net = build_backbone("resnet50", "layer4", weights=None)
    load_backbone_state(net, resnet_named_keys(sub_state(state, "backbone.model.", what)), what)
    return Embedder(net, ConvAP.from_reference(sub_state(state, "aggregator.", what), s1=2, s2=2))


def benchmark_embedder(checkpoint: Any, backbone: str, aggregation: str, what: str = "benchmark") -> Embedder:
    """gmberton/deep-visual-geo-localization-benchmark ``GeoLocalizationNet`` (bare, or under ``model_state_dict``):
    ``backbone.*`` (a torchvision ResNet's ``children()[:-3]`` up to layer3, "conv4", or ``[:-2]`` up to layer4,
    "conv5", told apart by the keys; VGG16 ``features[:-2]``) and ``aggregation.*``: NetVLAD (``conv.weight``,
    ``centroids``: the pytorch-NetVlad layer), CRN (:meth:`aggnets.heads.CRN.from_reference`) or GeM + FC
    (``0.1.p``, ``1.weight``, ``1.bias``: L2, GeM, Linear, L2 = :class:`aggnets.heads.CosPlace`)."""
    state = unwrap_checkpoint(checkpoint, what)
    _only(state, {"backbone", "aggregation"}, what)
    keys = sub_state(state, "backbone.", what)
    if backbone == "vgg16":
        net = build_backbone("vgg16", "features.28", weights=None)
        load_backbone_state(net, vgg_features_keys(keys), what)
    else:
        layer = "layer4" if any(k.startswith("7.") for k in keys) else "layer3"
        net = build_backbone(backbone, layer, weights=None)
        load_backbone_state(net, resnet_children_keys(keys), what)
    parts = sub_state(state, "aggregation.", what)
    if aggregation == "netvlad":
        head = netvlad_from_pytorch_netvlad(parts, normalize_input=True)
    elif aggregation == "crn":
        head = CRN.from_reference(parts)
    else:
        missing = [k for k in ("0.1.p", "1.weight", "1.bias") if k not in parts]
        if missing:
            raise StateDictError(f"{what}: the GeM + FC aggregation needs 'aggregation.0.1.p', 'aggregation.1.weight' "
                                 f"and 'aggregation.1.bias'; missing {['aggregation.' + k for k in missing]}")
        head = CosPlace.from_reference({"1.p": parts["0.1.p"], "3.weight": parts["1.weight"],
                                        "3.bias": parts["1.bias"]})
    return Embedder(net, head)


def boq_embedder(checkpoint: Any, backbone: str, what: str = "BoQ") -> Embedder:
    """amaralibey/Bag-of-Queries ``VPRModel``: ResNet-50 ``backbone.net.{0,1,4,5,6}`` (children up to layer3) or
    DINOv2 ViT-B/14 ``backbone.dino.*`` (all 12 blocks, no final norm: its weights are in the file, unused),
    ``aggregator.*`` (:meth:`aggnets.heads.BoQ.from_reference`)."""
    state = unwrap_checkpoint(checkpoint, what)
    _only(state, {"backbone", "aggregator"}, what)
    if backbone == "resnet50":
        net = build_backbone("resnet50", "layer3", weights=None)
        load_backbone_state(net, resnet_children_keys(sub_state(state, "backbone.net.", what)), what)
    else:
        net = build_backbone(_DINOV2, "blocks.11", weights=None, norm=False)
        load_backbone_state(net, dinov2_keys(sub_state(state, "backbone.dino.", what), net, what), what,
                            ignore=("body.norm.weight", "body.norm.bias"))
    return Embedder(net, BoQ.from_reference(sub_state(state, "aggregator.", what)))


def salad_embedder(checkpoint: Any, what: str = "SALAD") -> Embedder:
    """serizba/salad ``VPRModel``: DINOv2 ViT-B/14 ``backbone.model.*`` (all blocks, then the final norm; the class
    token to the head), ``aggregator.*`` (:meth:`aggnets.heads.SALAD.from_reference`)."""
    state = unwrap_checkpoint(checkpoint, what)
    _only(state, {"backbone", "aggregator"}, what)
    net = build_backbone(_DINOV2, "blocks.11", weights=None, norm=True)
    load_backbone_state(net, dinov2_keys(sub_state(state, "backbone.model.", what), net, what), what)
    return Embedder(net, SALAD.from_reference(sub_state(state, "aggregator.", what)))


def netvlad_embedder(checkpoint: Any, what: str = "NetVLAD") -> Embedder:
    """Nanne/pytorch-NetVlad and QVPR/Patch-NetVLAD: ``encoder.*`` (VGG16 ``features[:-2]``, conv1_1 .. conv5_3),
    ``pool.{conv.weight, centroids}`` (NetVLAD, cluster-major; :func:`aggnets.convert.netvlad_from_pytorch_netvlad`),
    and in Patch-NetVLAD's ``*_WPCA*`` files ``WPCA.0.{weight, bias}`` (a 1 x 1 convolution 512 K -> D on the
    VLAD vector, then L2: a :class:`aggnets.heads.Whitening`)."""
    state = unwrap_checkpoint(checkpoint, what)
    _only(state, {"encoder", "pool", "WPCA"}, what)
    net = build_backbone("vgg16", "features.28", weights=None)
    load_backbone_state(net, vgg_features_keys(sub_state(state, "encoder.", what)), what)
    embedder = Embedder(net, netvlad_from_pytorch_netvlad(sub_state(state, "pool.", what), normalize_input=True))
    if "WPCA.0.weight" in state:
        weight, bias = state["WPCA.0.weight"], state.get("WPCA.0.bias")
        if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or weight.shape[1] != embedder.head.out_dim:
            raise StateDictError(f"{what}: 'WPCA.0.weight' must be (D, {embedder.head.out_dim}, 1, 1) for this "
                                 f"NetVLAD, found {tuple(weight.shape)}")
        if bias is None or tuple(bias.shape) != (weight.shape[0],):
            raise StateDictError(f"{what}: 'WPCA.0.bias' must be ({weight.shape[0]},)")
        whitening = Whitening(weight.shape[1], weight.shape[0])
        whitening.load_state_dict({"weight": weight.reshape(weight.shape[0], -1), "bias": bias})
        embedder.set_whitening(whitening)
    return embedder


def _lw(meta: Mapping[str, Any], lw: str, what: str) -> Optional[Whitening]:
    learned = meta.get("Lw") if isinstance(meta, Mapping) else None
    if not learned:
        return None
    dataset = next(iter(learned))
    if lw not in learned[dataset]:
        raise StateDictError(f"{what}: meta['Lw'][{dataset!r}] has no {lw!r} whitening; it has {sorted(learned[dataset])}")
    entry = learned[dataset][lw]
    mean = torch.as_tensor(np.asarray(entry["m"], dtype=np.float64)).flatten()
    projection = torch.as_tensor(np.asarray(entry["P"], dtype=np.float64))
    return Whitening.from_mean_projection(mean, projection).float()


def cirtorch_embedder(checkpoint: Any, lw: str = "ms", what: str = "cnnimageretrieval") -> Embedder:
    """filipradenovic/cnnimageretrieval-pytorch ``ImageRetrievalNet``: ``meta`` (architecture, pooling, whitening,
    mean, std, outputdim) and ``state_dict`` with ``features.*`` (ResNet ``children()[:-2]``: ``features.0`` conv1 ..
    ``features.7`` layer4; VGG16 ``features[:-1]``, up to conv5_3's ReLU), ``pool.p`` (GeM), and for the ``-gem-w``
    networks ``whiten.{weight, bias}`` (a Linear after the pooling's L2). The older networks carry a learned
    whitening in ``meta['Lw'][<dataset>][lw]`` (``m``, ``P``; ``lw`` "ms" multi-scale, as their published numbers,
    or "ss"). Descriptor: ``L2(W L2(pool(f)) + b)``, ``pool`` the ``meta['pooling']``: GeM (the released networks),
    MAC, SPoC or R-MAC (:class:`aggnets.heads.RMAC` with the whole map as one more region, as theirs)."""
    meta = checkpoint.get("meta", {}) if isinstance(checkpoint, Mapping) else {}
    state = unwrap_checkpoint(checkpoint, what)
    architecture = str(meta.get("architecture", ""))
    for flag in ("local_whitening", "regional"):
        if meta.get(flag):
            raise StateDictError(f"{what}: meta[{flag!r}] is set; only global GeM networks (the released ones) load")
    pooling = meta.get("pooling", "gem")
    if pooling not in ("gem", "mac", "spoc", "rmac"):
        raise StateDictError(f"{what}: meta['pooling'] = {pooling!r}; GeM, MAC, SPoC and R-MAC networks load")
    features = sub_state(state, "features.", what)
    if architecture.startswith("vgg") or (not architecture and "0.weight" in features and "1.weight" not in features):
        net = build_backbone(architecture or "vgg16", "features.29", weights=None)
        load_backbone_state(net, vgg_features_keys(features), what)
    else:
        net = build_backbone(architecture or "resnet101", "layer4", weights=None)
        load_backbone_state(net, resnet_children_keys(features), what)
    for name in ("mean", "std"):  # the input normalisation the network was trained with (ImageNet's by default)
        if name in meta:
            getattr(net, name).copy_(torch.as_tensor(meta[name], dtype=torch.float32).view(1, -1, 1, 1))
    if pooling == "gem":
        head = gem_from_cirtorch(state, prefix="pool.", in_channels=net.out_channels, normalize=True)
    elif pooling == "rmac":  # their rmac(L=3): Tolias et al.'s grid plus the whole map, each region L2'd, summed
        head = RMAC(net.out_channels, levels=3, include_global=True)
    else:
        head = (MAC if pooling == "mac" else SPoC)(net.out_channels, normalize=True)
    whitening = None
    if "whiten.weight" in state:
        weight = state["whiten.weight"]
        whitening = Whitening(weight.shape[1], weight.shape[0])
        whitening.load_state_dict({"weight": weight, "bias": state["whiten.bias"]})
    else:
        whitening = _lw(meta, lw, what)
    _only(state, {"features", "pool", "whiten"}, what)
    return Embedder(net, head, whitening=whitening)
