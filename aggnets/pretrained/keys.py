"""The published checkpoints' backbone keys in the layout of :func:`aggnets.backbones.build_backbone`."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..backbones.dinov2 import convert_dinov2_state_dict
from ..convert import unwrap_state_dict
from ..heads.reference import StateDictError

__all__ = ["unwrap_checkpoint", "sub_state", "resnet_children_keys", "vgg_features_keys", "resnet_named_keys",
           "dinov2_keys", "load_backbone_state"]

# torchvision ResNet's children(): the index of each one in an nn.Sequential(*children()[:n])
_RESNET_CHILDREN = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}


def unwrap_checkpoint(checkpoint: Any, what: str) -> dict[str, Any]:
    """The state dict of a checkpoint: bare, or under ``state_dict`` / ``model_state_dict`` / ``model``; a
    DataParallel ``module.`` prefix removed."""
    try:
        state = unwrap_state_dict(checkpoint)
    except TypeError as error:
        raise StateDictError(f"{what}: {error}") from None
    if not all(isinstance(k, str) for k in state):
        raise StateDictError(f"{what}: expected a state dict (a mapping of names to tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def sub_state(state: Mapping[str, Any], prefix: str, what: str) -> dict[str, Any]:
    """The entries under ``prefix`` with it removed; StateDictError when there are none."""
    found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not found:
        roots = sorted({k.split(".")[0] for k in state})
        raise StateDictError(f"{what}: no key under {prefix!r} (the published layout); top-level names found: "
                             f"{roots[:12]}")
    return found


def resnet_children_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``<i>.rest`` of an ``nn.Sequential(*resnet.children()[:n])`` -> ``body.<conv1|bn1|layerN>.rest``."""
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) not in _RESNET_CHILDREN:
            raise StateDictError(f"unexpected backbone key {key!r}: not one of a torchvision ResNet's children "
                                 f"(0 conv1, 1 bn1, 4..7 layer1..4)")
        out[f"body.{_RESNET_CHILDREN[int(index)]}.{rest}"] = value
    return out


def resnet_named_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``conv1.*``, ``bn1.*``, ``layerN.*`` (a torchvision ResNet's own names) -> ``body.*``."""
    return {f"body.{key}": value for key, value in state.items() if not key.startswith(("fc.", "avgpool."))}


def vgg_features_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``<i>.weight`` of VGG ``features[:n]`` as an ``nn.Sequential`` -> ``body.features.<i>.weight``."""
    out = {}
    for key, value in state.items():
        if not re.fullmatch(r"\d+\.(weight|bias)", key):
            raise StateDictError(f"unexpected backbone key {key!r}: not a layer of VGG's features")
        out[f"body.features.{key}"] = value
    return out


def dinov2_keys(state: Mapping[str, Tensor], backbone: nn.Module, source: str) -> dict[str, Tensor]:
    """The authors' DINOv2 keys (torch.hub ``dinov2_vit*14``) -> ``body.*`` of an aggnets ViT backbone."""
    try:
        converted = convert_dinov2_state_dict(dict(state), backbone.body, source=source)
    except ValueError as error:
        raise StateDictError(str(error)) from None
    return {f"body.{key}": value for key, value in converted.items()}


def load_backbone_state(backbone: nn.Module, state: Mapping[str, Tensor], what: str,
                        ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` (aggnets keys) into ``backbone``, every key on both sides accounted for; ``ignore``: keys the
    checkpoint holds that the model does not use (e.g. BoQ's unused DINOv2 final norm)."""
    state = {k: v for k, v in state.items() if k not in ignore}
    own = backbone.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise StateDictError(f"{what}: the backbone weights do not match the published architecture: "
                             f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                             f"(e.g. {unexpected[:3]})")
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        key, found, expected = wrong[0]
        raise StateDictError(f"{what}: backbone key {key!r} has shape {found}, the architecture expects {expected} "
                             f"({len(wrong)} such keys)")
    backbone.load_state_dict(state, strict=False)
