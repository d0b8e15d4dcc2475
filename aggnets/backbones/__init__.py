"""Backbones: torchvision / timm / offline CNNs truncated at any layer, returning a (B, C, H, W) feature map."""
from .extractor import FeatureExtractor
from .factory import build_backbone, list_backbones, list_layers, load_weights_file
from .efficientnet_lite import efficientnet_lite0, efficientnet_lite0_weights_path

__all__ = ["FeatureExtractor", "build_backbone", "list_backbones", "list_layers", "load_weights_file",
           "efficientnet_lite0", "efficientnet_lite0_weights_path"]
