"""Build a backbone (:class:`FeatureExtractor` for CNNs, :class:`ViTExtractor` for vision transformers) from a
torchvision or timm model name, a layer and a weights spec."""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..utils import close_names
from ..utils import is_none as _is_none
from .extractor import FeatureExtractor, FreezeSpec, probe_forward

__all__ = ["build_backbone", "list_backbones", "list_layers", "close_names", "load_weights_file"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PROBE_SIZE = 224
_HEAD_MODULES = {"fc", "classifier", "head", "heads", "avgpool", "global_pool", "AuxLogits", "aux_logits", "dropout"}
WeightsSpec = Union[None, bool, str, os.PathLike]

# Backbones that ship their weights with a pip package (no download): name -> builder(weights) -> (model, mean, std)
_OFFLINE: dict[str, Callable[[WeightsSpec], tuple[nn.Module, tuple, tuple]]] = {}


def register_offline_backbone(name: str):
    def decorator(builder):
        _OFFLINE[name] = builder
        return builder
    return decorator


def list_backbones(source: str = "all") -> list[str]:
    """Model names buildable by :func:`build_backbone`: ``source`` in {"all", "offline", "torchvision", "timm"}."""
    names: list[str] = []
    if source in ("all", "offline"):
        names += sorted(_OFFLINE)
    if source in ("all", "torchvision"):
        import torchvision
        names += [f"torchvision:{n}" if source == "all" else n for n in torchvision.models.list_models(
            module=torchvision.models)]
    if source in ("all", "timm"):
        import timm
        names += [f"timm:{n}" if source == "all" else n for n in timm.list_models()]
    return names


def list_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose output can be taken as the feature map (every named submodule)."""
    return [name for name, _ in model.named_modules() if name]


def build_backbone(name: str, layer: Union[str, int, None] = None, *, weights: WeightsSpec = None,
                   freeze: FreezeSpec = False, normalize_images: bool = True, strict: bool = True,
                   norm: Optional[bool] = None, facet: str = "token", uneven: str = "crop",
                   pos_interpolation: str = "auto", model_kwargs: Optional[dict] = None,
                   normalize_input: Optional[bool] = None) -> nn.Module:
    """A CNN or vision transformer truncated after ``layer``, returning its (B, C, H, W) map.

    ``name``: an offline backbone (``"efficientnet_lite0"``, ``"mobilenet_v2"``, weights from pip packages), a
    torchvision model (``"resnet50"``, ``"vgg16"``, ``"convnext_tiny"``…) or a timm model (``"timm:efficientnet_b0"``,
    ``"timm:vit_base_patch14_dinov2"``, ``"timm:vit_base_patch14_reg4_dinov2"``, ``"timm:vit_base_patch16_224"``,
    ``"timm:deit_small_patch16_224"``, ``"timm:eva02_base_patch14_224.mim_in22k"``…); prefix with
    ``"torchvision:"`` or ``"timm:"`` to choose when both libraries have the name (torchvision wins otherwise).

    CNNs (:class:`FeatureExtractor`): ``layer`` is a module name (``"layer3"``, ``"features.29"``, ``"blocks.4"``)
    or an int index into the model's feature stages (timm ``feature_info`` order; negative counts from the end);
    None = last stage.

    Vision transformers (:class:`ViTExtractor`: the patch tokens as a (B, C, H / p, W / p) map and the class token;
    any image size, position embeddings interpolated): ``layer`` is a block (``"blocks.7"``, 7, -1; None = last);
    ``facet`` ``"token"`` | ``"query"`` | ``"key"`` | ``"value"``; ``norm`` (final LayerNorm; default True for
    tokens); ``uneven`` ``"crop"`` | ``"pad"`` | ``"error"`` for sizes that are not a multiple of the patch size;
    ``pos_interpolation`` ``"auto"`` (the authors' DINOv2 rule for the DINOv2 models without registers, timm's
    otherwise), ``"timm"`` or ``"dinov2"``. ``freeze="blocks.7"`` freezes the embedding and blocks 0..7 and runs them
    without autograd.

    ``weights``: None (random init), ``"DEFAULT"`` or a library weights name (torchvision enum name such as
    ``"IMAGENET1K_V2"``, timm pretrained tag such as ``"in1k"`` / ``"lvd142m"``) — downloaded by the library where
    there is internet —, or a path to a local checkpoint (a state dict of the full model, loaded with
    ``weights_only=True``; the authors' DINOv2 checkpoints, e.g. ``dinov2_vitb14_pretrain.pth``, are converted to
    timm's layout). ``model_kwargs`` go to the model constructor (e.g. ``{"depth": 4}`` for a small test model).
    """
    from .vit import ViTExtractor, is_vision_transformer

    if normalize_input is not None:  # the old name; heads' normalize_input is the L2 of local descriptors
        warnings.warn("build_backbone(normalize_input=...) is deprecated: it is normalize_images", FutureWarning,
                      stacklevel=2)
        normalize_images = normalize_input

    source, model_name = _resolve_source(name)
    local_file = _as_local_file(weights)
    hub_weights = None if local_file is not None else weights
    kwargs = dict(model_kwargs or {})
    if source == "offline":
        if kwargs:
            raise ValueError(f"{name}: model_kwargs do not apply to an offline backbone")
        model, mean, std = _OFFLINE[model_name](hub_weights)
    elif source == "torchvision":
        model, mean, std = _torchvision_model(model_name, hub_weights, kwargs)
    else:
        model, mean, std = _timm_model(model_name, hub_weights, kwargs)
    vit = source == "timm" and is_vision_transformer(model)
    if local_file is not None:
        load_weights_file(model, local_file, strict=strict)
    if vit:
        if pos_interpolation == "auto":
            from .dinov2 import default_pos_interpolation
            pos_interpolation = default_pos_interpolation(model_name)
        return ViTExtractor(model, name=name, block=_vit_block(model, layer, name), mean=mean, std=std, facet=facet,
                            norm=norm, uneven=uneven, pos_interpolation=pos_interpolation,
                            normalize_images=normalize_images, freeze=freeze)
    vit_only = {"norm": (norm, None), "facet": (facet, "token"), "uneven": (uneven, "crop"),
                "pos_interpolation": (pos_interpolation, "auto")}
    for option, (value, default) in vit_only.items():
        if value != default:
            raise ValueError(f"{name}: {option}={value!r} applies to vision transformers only ({name} is a CNN)")
    layer_name = _resolve_layer(model, layer, name)
    body = _truncate(model, layer_name, source)
    extractor = FeatureExtractor(body, name=name, layer=layer_name, out_channels=1, stride=1, mean=mean, std=std,
                                 normalize_images=normalize_images, freeze=freeze, output_key="out")
    _probe(extractor, name)
    return extractor


# ---- name resolution ------------------------------------------------------------------------------------------
def _resolve_source(name: str) -> tuple[str, str]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    if ":" in name:
        source, model_name = name.split(":", 1)
        if source not in ("torchvision", "timm", "offline"):
            raise ValueError(f"unknown backbone source {source!r} in {name!r}: use 'torchvision:', 'timm:' or "
                             "'offline:'")
        if model_name not in list_backbones(source):
            raise ValueError(f"unknown {source} backbone {model_name!r}. "
                             f"{close_names(model_name, list_backbones(source))}")
        return source, model_name
    if name in _OFFLINE:
        return "offline", name
    import torchvision
    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision", name
    import timm
    if name in timm.list_models():
        return "timm", name
    raise ValueError(f"unknown backbone {name!r} (not an offline, torchvision or timm model). "
                     f"{close_names(name, list_backbones('offline') + list_backbones('torchvision') + timm.list_models())}")


def _as_local_file(weights: WeightsSpec) -> Optional[str]:
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and (
            os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors")))):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        return path
    return None


def _torchvision_model(name: str, weights: WeightsSpec, kwargs: dict) -> tuple[nn.Module, tuple, tuple]:
    import torchvision
    if _is_none(weights):
        return torchvision.models.get_model(name, weights=None, **kwargs), IMAGENET_MEAN, IMAGENET_STD
    enum = torchvision.models.get_model_weights(name)
    key = "DEFAULT" if weights is True else str(weights).split(".")[-1]
    try:
        resolved = enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ValueError(f"unknown torchvision weights {weights!r} for {name}; valid: DEFAULT, "
                         f"{', '.join(w.name for w in enum)}") from None
    transforms = resolved.transforms()
    mean = tuple(getattr(transforms, "mean", IMAGENET_MEAN))
    std = tuple(getattr(transforms, "std", IMAGENET_STD))
    return torchvision.models.get_model(name, weights=resolved, **kwargs), mean, std


def _timm_model(name: str, weights: WeightsSpec, kwargs: dict) -> tuple[nn.Module, tuple, tuple]:
    import timm
    if _is_none(weights):
        full_name, pretrained = name, False
    elif weights is True or str(weights).upper() == "DEFAULT":
        full_name, pretrained = name, True
    else:
        full_name, pretrained = f"{name}.{weights}", True
    try:  # transformers take any image size (position embeddings interpolated); CNNs refuse the argument
        model = timm.create_model(full_name, pretrained=pretrained, **{"dynamic_img_size": True, **kwargs})
    except TypeError as error:
        if "dynamic_img_size" not in str(error):
            raise
        model = timm.create_model(full_name, pretrained=pretrained, **kwargs)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return model, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def load_weights_file(model: nn.Module, path: str, strict: bool = True) -> None:
    """Load a local checkpoint into ``model`` without unpickling code (``weights_only=True``; ``.safetensors`` via
    safetensors). Accepts a bare state dict or one nested under ``state_dict`` / ``model``; strips ``module.``; the
    authors' DINOv2 layout is converted to timm's (:func:`aggnets.backbones.dinov2.convert_dinov2_state_dict`)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    from .dinov2 import convert_dinov2_state_dict, is_dinov2_layout
    if is_dinov2_layout(state) and hasattr(model, "pos_embed"):
        state = convert_dinov2_state_dict(state, model, source=path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches raise even with strict=False
        raise ValueError(f"{path} does not match the model: {error}") from None
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(f"{path} does not match the model: {len(result.missing_keys)} missing keys "
                         f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected keys "
                         f"(e.g. {result.unexpected_keys[:3]}); pass strict=False to load what matches")


# ---- layer selection ------------------------------------------------------------------------------------------
def _vit_block(model: nn.Module, layer: Union[str, int, None], name: str) -> int:
    """A transformer block index from ``None`` (last), an int, ``"7"`` or ``"blocks.7"``."""
    depth = len(model.blocks)
    if layer is None:
        return depth - 1
    text = str(layer).removeprefix("blocks.") if not isinstance(layer, int) or isinstance(layer, bool) else layer
    try:
        index = int(text)
    except (TypeError, ValueError):
        index = None
    if index is None or isinstance(layer, bool) or not -depth <= index < depth:
        raise ValueError(f"{name}: layer must be a block of this vision transformer: 'blocks.0' .. "
                         f"'blocks.{depth - 1}' or an index in [-{depth}, {depth - 1}], got {layer!r}")
    return index % depth



def _stage_names(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[0], dict):
        return [entry["module"] for entry in info]
    if hasattr(info, "module_name"):
        return list(info.module_name())
    stages = []
    for child_name, child in model.named_children():
        if child_name in _HEAD_MODULES or not any(True for _ in child.parameters()):
            continue
        if child_name == "features" and isinstance(child, nn.Sequential):
            stages += [f"features.{i}" for i, _ in enumerate(child)]
        else:
            stages.append(child_name)
    return stages


def _resolve_layer(model: nn.Module, layer: Union[str, int, None], name: str) -> str:
    stages = _stage_names(model)
    if layer is None:
        layer = -1
    if isinstance(layer, int) and not isinstance(layer, bool):
        if not -len(stages) <= layer < len(stages):
            raise ValueError(f"{name}: layer index {layer} out of range; the feature stages are "
                             f"{', '.join(f'{i}={s}' for i, s in enumerate(stages))}")
        return stages[layer]
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        return _resolve_layer(model, int(layer), name)
    modules = list_layers(model)
    if layer not in modules:
        raise ValueError(f"{name}: unknown layer {layer!r}. {close_names(str(layer), modules)} "
                         f"Feature stages: {', '.join(stages)}.")
    return layer


def _truncate(model: nn.Module, layer: str, source: str) -> nn.Module:
    if source == "torchvision":
        from torchvision.models.feature_extraction import create_feature_extractor
    else:
        from timm.models import create_feature_extractor
    return create_feature_extractor(model, return_nodes={layer: "out"})


def _probe(extractor: FeatureExtractor, name: str) -> None:
    """Fill ``out_channels`` and ``stride`` with one small no-grad forward (done once, at construction)."""
    try:
        out = _probe_output(extractor)
    except Exception as error:  # a model that cannot run at the probe size: say which
        raise ValueError(f"{name}: probing layer {extractor.layer!r} at {_PROBE_SIZE}x{_PROBE_SIZE} failed: "
                         f"{error}") from error
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name}: layer {extractor.layer!r} does not output a (B, C, H, W) feature map "
                         f"(got {shape}); choose a convolutional layer")
    extractor.out_channels = int(out.shape[1])
    extractor.stride = max(1, round(_PROBE_SIZE / out.shape[-1]))


def _probe_output(extractor: FeatureExtractor) -> Any:
    return probe_forward(extractor, _PROBE_SIZE, _PROBE_SIZE, lambda images: extractor.body(images)["out"],
                         channels=extractor.mean.shape[1])
