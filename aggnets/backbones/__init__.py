"""Backbones: torchvision / timm / offline CNNs and timm vision transformers truncated at any layer, returning a
(B, C, H, W) feature map (and, for transformers, the class token)."""
from .extractor import FeatureExtractor
from .output import BackboneOutput
from .vit import ViTExtractor
from .factory import build_backbone, list_backbones, list_layers, load_weights_file
from .efficientnet_lite import efficientnet_lite0, efficientnet_lite0_weights_path
from .mobilenet import mobilenet_v2, mobilenet_v2_weights_path

__all__ = ["FeatureExtractor", "ViTExtractor", "BackboneOutput", "build_backbone", "list_backbones", "list_layers",
           "load_weights_file", "efficientnet_lite0", "efficientnet_lite0_weights_path", "mobilenet_v2",
           "mobilenet_v2_weights_path"]
