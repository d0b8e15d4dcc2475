"""Descriptor extraction (aggnets.retrieval.extraction): loading, padding + masks, batched == one-at-a-time,
multi-scale, bounding boxes, descriptor files, bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from aggnets import Embedder
from aggnets.backbones import build_backbone
from aggnets.backbones.extractor import FeatureExtractor
from aggnets.heads import MAC, RMAC, GeM, NetVLAD
from aggnets.retrieval import (extract_descriptors, feature_mask, load_descriptors, load_image, masking_problem,
                               pad_batch, save_descriptors)
from aggnets.retrieval.extraction import image_size

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# heights / widths chosen to hit every residue modulo the stride, both orientations, and two equal sizes
SIZES = [(64, 48), (41, 70), (57, 57), (48, 64), (70, 33), (64, 48), (35, 52)]


def _randomise_batchnorm(module: nn.Module) -> None:
    """Trained-looking BN: with the fresh init (mean 0, var 1, affine identity) a zero input stays zero, which
    would hide padding leaks."""
    gen = torch.Generator().manual_seed(1)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 1.5 + 0.5)
            bn.weight.data.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.data.copy_(torch.randn(bn.num_features, generator=gen) * 0.5)


@pytest.fixture(scope="module")
def resnet_layer2():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", "layer2", weights=None)  # stride 8, 128 channels
    _randomise_batchnorm(backbone)
    return backbone.eval()


def _stub(norm: str = "bn") -> FeatureExtractor:
    """A 2-conv + max-pool stub backbone (stride 4, 16 channels)."""
    norm_layer = {"bn": lambda c: nn.BatchNorm2d(c), "gn": lambda c: nn.GroupNorm(4, c)}[norm]
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), norm_layer(8), nn.ReLU(),
                         nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
    _randomise_batchnorm(body)
    return FeatureExtractor(body, name="stub", layer="5", out_channels=16, stride=4, mean=MEAN, std=STD).eval()


def _images(sizes=SIZES, dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    return [torch.rand(3, h, w, generator=gen, dtype=torch.float64).to(dtype) for h, w in sizes]


def _one_by_one(model, images, **kwargs):
    return torch.cat([extract_descriptors(model, [image], progress=False, **kwargs) for image in images])


def _save_png(path, height, width, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(path)
    return str(path)


# ---- pad_batch / feature_mask ----------------------------------------------------------------------------------

def test_pad_batch_shapes_masks_and_fill():
    images = [torch.rand(3, 5, 7), torch.rand(3, 9, 4)]
    batch, mask = pad_batch(images)
    assert batch.shape == (2, 3, 9, 7) and mask.shape == (2, 9, 7) and mask.dtype == torch.bool
    assert mask[0, :5, :7].all() and not mask[0, 5:].any() and mask.sum().item() == 35 + 36
    assert torch.equal(batch[0, :, :5, :7], images[0]) and torch.equal(batch[1, :, :9, :4], images[1])
    assert (batch[0, :, 5:] == 0).all() and (batch[1, :, :, 4:] == 0).all()
    batch, mask = pad_batch(images, multiple=4, value=MEAN)
    assert batch.shape == (2, 3, 12, 8) and not mask[:, 9:].any()
    assert torch.allclose(batch[1, :, 10, 6], torch.tensor(MEAN))
    with pytest.raises(ValueError, match="no images"):
        pad_batch([])
    with pytest.raises(ValueError, match="channels"):
        pad_batch([torch.rand(3, 4, 4), torch.rand(1, 4, 4)])


def test_feature_mask_rules():
    _, image_mask = pad_batch([torch.rand(3, 17, 8), torch.rand(3, 9, 24)])  # canvas 17 x 24
    by_sizes = feature_mask(image_mask, (3, 3), sizes=[[3, 1], [2, 3]])
    expected = torch.zeros(2, 3, 3, dtype=torch.bool)
    expected[0, :3, :1] = True
    expected[1, :2, :3] = True
    assert torch.equal(by_sizes, expected)
    # stride 8: ceil -> ceil(17/8)=3 x ceil(8/8)=1 and ceil(9/8)=2 x 3; floor -> 2 x 1 and 1 x 3
    assert torch.equal(feature_mask(image_mask, (3, 3), stride=8, rule="ceil"), expected)
    floor = feature_mask(image_mask, (3, 3), stride=8, rule="floor")
    assert floor[0].sum() == 2 and floor[0, :2, 0].all() and floor[1].sum() == 3 and floor[1, 0].all()
    with pytest.raises(ValueError, match="fit"):
        feature_mask(image_mask, (3, 3), sizes=[[4, 1], [2, 3]])
    with pytest.raises(ValueError, match="sizes .* or stride"):
        feature_mask(image_mask, (3, 3))


def test_stride_rule_matches_the_backbone_rounding(resnet_layer2):
    """ResNet (padded convs and pooling): a lone h x w image gives ceil(h/8) x ceil(w/8) at layer2, which is what
    the ``ceil`` rule (receptive-field centre i*stride inside the image) gives on a padded canvas."""
    heights = [33, 40, 41, 47, 48, 57]
    for h in heights:
        assert resnet_layer2.output_size(h, 40) == (-(-h // 8), 5)
    images = [torch.rand(3, h, 61 - h) for h in heights]
    batch, image_mask = pad_batch(images)
    with torch.no_grad():
        size = tuple(resnet_layer2(batch).shape[-2:])
    sizes = [resnet_layer2.output_size(*image.shape[1:]) for image in images]
    assert torch.equal(feature_mask(image_mask, size, stride=8, rule="ceil"),
                       feature_mask(image_mask, size, sizes=sizes))


# ---- the key property: batched == one image at a time ----------------------------------------------------------

HEADS = {
    "gem": lambda c: GeM(c, p=3.0),
    "mac": lambda c: MAC(c),
    "rmac": lambda c: RMAC(c, levels=2),
    "netvlad": lambda c: NetVLAD(c, 8),
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_batched_equals_one_at_a_time(resnet_layer2, head):
    """Per-layer re-masking makes a padded batch of different sizes give each image's lone descriptor: float64
    to ~1e-15 (measured <= 1e-15), float32 to 1e-5 (measured <= 2e-7). Output order = input order although the
    batches are sorted by size."""
    torch.manual_seed(0)
    model = Embedder(resnet_layer2, lambda in_channels: HEADS[head](in_channels))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        model = model.to(dtype)
        images = _images(dtype=dtype)
        alone = _one_by_one(model, images)
        batched = extract_descriptors(model, images, batch_size=4, progress=False, batching="masked")
        assert batched.dtype == dtype and batched.shape == (len(images), model.out_dim)
        assert (batched - alone).abs().max().item() <= tol
        assert torch.allclose(batched.norm(dim=1), torch.ones((), dtype=dtype))
    model.float()


def test_mask_only_at_the_end_is_not_exact(resnet_layer2):
    """Why the per-layer masking: padding the canvas (even with the normalisation mean) and masking only the final
    map leaks the padding into the border positions (measured ~5e-2 on these tiny images)."""
    model = Embedder(resnet_layer2, lambda in_channels: GeM(in_channels))
    images = _images()
    alone = _one_by_one(model, images)
    padded = extract_descriptors(model, images, batch_size=8, progress=False, batching="padded")
    assert (padded - alone).abs().max().item() > 1e-3
    assert torch.allclose(padded.norm(dim=1), torch.ones(()))
    auto = extract_descriptors(model, images, batch_size=8, progress=False)
    assert (auto - alone).abs().max().item() <= 1e-5


def test_unsupported_backbone_falls_back_to_same_size_batches():
    backbone = _stub("gn")  # GroupNorm: statistics over the whole map, padding included
    assert "GroupNorm" in masking_problem(backbone)
    model = Embedder(backbone, lambda in_channels: GeM(in_channels))
    images = _images()
    alone = _one_by_one(model, images)
    # same-size batches hold no padding (two images here share a size: equal up to float reduction order)
    assert torch.allclose(extract_descriptors(model, images, batch_size=4, progress=False), alone, atol=1e-6)
    assert torch.allclose(extract_descriptors(model, images, batch_size=4, progress=False, batching="same_size"),
                          alone, atol=1e-6)
    with pytest.raises(ValueError, match="GroupNorm.*same_size"):
        extract_descriptors(model, images, progress=False, batching="masked")


class _DynamicPadConv(nn.Conv2d):
    """A conv that pads in its forward (like TF 'same'): its output size breaks the static formula."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


def test_dynamic_padding_is_detected_at_run_time():
    backbone = _stub()
    backbone.body[0] = _DynamicPadConv(3, 8, 3, stride=2, padding=0)
    assert masking_problem(backbone) is None  # the static check cannot see it
    model = Embedder(backbone, lambda in_channels: GeM(in_channels))
    images = _images()
    with pytest.raises(ValueError, match="static size formula"):
        extract_descriptors(model, images, progress=False, batching="masked")
    alone = _one_by_one(model, images)
    assert torch.allclose(extract_descriptors(model, images, batch_size=4, progress=False), alone, atol=1e-6)


def test_order_preserved_and_same_size_batches():
    model = Embedder(_stub(), lambda in_channels: GeM(in_channels))
    images = _images()
    reference = extract_descriptors(model, images, batch_size=3, progress=False)
    permutation = [4, 0, 6, 2, 5, 1, 3]
    permuted = extract_descriptors(model, [images[i] for i in permutation], batch_size=2, progress=False)
    assert torch.allclose(permuted, reference[permutation], atol=1e-6)
    assert torch.allclose(reference, _one_by_one(model, images), atol=1e-6)
    # equal images of equal size give equal rows
    twice = extract_descriptors(model, [images[0], images[3], images[0].clone()], progress=False)
    assert torch.equal(twice[0], twice[2])


# ---- multi-scale ------------------------------------------------------------------------------------------------

def test_multiscale():
    model = Embedder(_stub(), lambda in_channels: GeM(in_channels))
    images = _images()[:4]
    single = extract_descriptors(model, images, progress=False)
    assert torch.equal(extract_descriptors(model, images, scales=(1.0,), progress=False), single)
    assert torch.equal(extract_descriptors(model, images, scales=[1], multiscale="gem", progress=False), single)
    half_images = [nn.functional.interpolate(i[None], size=(round(i.shape[1] / 2), round(i.shape[2] / 2)),
                                             mode="bilinear", antialias=True)[0].clamp(0, 1) for i in images]
    half = extract_descriptors(model, half_images, progress=False)
    both = extract_descriptors(model, images, scales=(1.0, 0.5), progress=False)
    expected = nn.functional.normalize(single + half, dim=1)
    assert torch.allclose(both, expected, atol=1e-6)
    gem = extract_descriptors(model, images, scales=(1.0, 0.5), multiscale="gem", gem_p=3.0, progress=False)
    cube_mean = (single.pow(3) + half.pow(3)) / 2  # GeM outputs are non-negative
    assert torch.allclose(gem, nn.functional.normalize(cube_mean.pow(1 / 3), dim=1), atol=1e-6)
    p1 = extract_descriptors(model, images, scales=(1.0, 0.5), multiscale="gem", gem_p=1.0, progress=False)
    assert torch.allclose(p1, both, atol=1e-6)


# ---- images, bounding boxes, paths -----------------------------------------------------------------------------

def test_load_image_aspect_modes_and_size_prediction(tmp_path):
    path = _save_png(tmp_path / "a.png", 30, 50)
    full = load_image(path, max_size=None)
    assert full.shape == (3, 30, 50) and full.dtype == torch.float32 and 0 <= full.min() and full.max() <= 1
    assert torch.equal(full, torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255)
    assert load_image(path, max_size=20).shape == (3, 12, 20)
    assert load_image(path, max_size=100).shape == (3, 60, 100)
    assert load_image(path, max_size=100, upscale=False).shape == (3, 30, 50)
    for mode in ("L", "RGBA", "CMYK"):
        other = _save_png(tmp_path / f"m_{mode}.{'jpg' if mode == 'CMYK' else 'png'}", 21, 13, mode=mode)
        assert load_image(other, max_size=26).shape == (3, 26, 16)
    for bbox, max_size, upscale in [(None, 20, True), ((3.4, 2, 40, 29.6), 17, True), ((0, 0, 7, 5), 9, False)]:
        assert tuple(load_image(path, max_size, bbox, upscale=upscale).shape[1:]) == \
            image_size(path, bbox, max_size, upscale)


def test_bbox_crop(tmp_path):
    path = _save_png(tmp_path / "a.png", 40, 60)
    full = load_image(path, max_size=None)
    bbox = (10.4, 5, 50, 33.5)  # rounded like PIL: x 10..50, y 5..34
    assert torch.equal(load_image(path, max_size=None, bbox=bbox), full[:, 5:34, 10:50])
    # cropped before the resize: the crop's longer side becomes max_size
    assert load_image(path, max_size=20, bbox=bbox).shape == (3, 14, 20)
    model = Embedder(_stub(), lambda in_channels: GeM(in_channels))
    images = _images()[:3]
    bboxes = [(2, 3, 30, 40), None, (0, 0, 41, 57)]
    cropped = [images[0][:, 3:40, 2:30], images[1], images[2][:, :57, :41]]
    assert torch.allclose(extract_descriptors(model, images, bboxes=bboxes, progress=False),
                          extract_descriptors(model, cropped, progress=False), atol=1e-6)
    from_path = extract_descriptors(model, [path, path], bboxes=[bbox, None], max_size=32, progress=False)
    loaded = [load_image(path, 32, bbox), load_image(path, 32)]
    assert torch.allclose(from_path, extract_descriptors(model, loaded, progress=False), atol=1e-6)


def test_eval_mode_restored_and_progress_bar(capsys):
    backbone = _stub()
    model = Embedder(backbone, lambda in_channels: GeM(in_channels)).train()
    model.head.eval()
    before = {name: m.training for name, m in model.named_modules()}
    out = extract_descriptors(model, _images()[:2], progress=True)
    assert {name: m.training for name, m in model.named_modules()} == before
    # a training-mode BN would have used batch statistics: the result equals the eval-mode extraction
    assert torch.allclose(out, extract_descriptors(model.eval(), _images()[:2], progress=False), atol=1e-6)


# ---- descriptor files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extension", ["npy", "pt"])
def test_save_load_round_trip(tmp_path, extension):
    descriptors = torch.nn.functional.normalize(torch.randn(5, 7), dim=1)
    names = [f"img_{i}.jpg" for i in range(5)]
    config = {"backbone": "resnet18", "scales": (1.0, 0.707), "max_size": 1024, "nested": {"p": 3.0}}
    path = tmp_path / "sub" / f"db.{extension}"
    save_descriptors(path, descriptors, names, config)
    loaded, loaded_names, loaded_config = load_descriptors(path)
    assert torch.equal(loaded, descriptors) and loaded_names == names
    assert loaded_config == {"backbone": "resnet18", "scales": [1.0, 0.707], "max_size": 1024, "nested": {"p": 3.0}}
    if extension == "npy":
        assert np.array_equal(np.load(path), descriptors.numpy())  # readable without aggnets
        assert json.loads((tmp_path / "sub" / "db.npy.json").read_text())["names"] == names
    else:
        assert torch.equal(torch.load(path, weights_only=True)["descriptors"], descriptors)
    save_descriptors(path, descriptors.numpy().astype(np.float64), names)  # numpy input, no config
    assert load_descriptors(path).descriptors.dtype == torch.float64 and load_descriptors(path).config == {}


def test_descriptor_file_errors(tmp_path):
    descriptors = torch.randn(3, 4)
    with pytest.raises(ValueError, match="2 names for 3 descriptors"):
        save_descriptors(tmp_path / "a.npy", descriptors, ["a", "b"])
    with pytest.raises(ValueError, match="extension"):
        save_descriptors(tmp_path / "a.txt", descriptors, ["a", "b", "c"])
    with pytest.raises(ValueError, match="JSON"):
        save_descriptors(tmp_path / "a.pt", descriptors, ["a", "b", "c"], {"model": object()})
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_descriptors(tmp_path / "missing.pt")
    save_descriptors(tmp_path / "a.npy", descriptors, ["a", "b", "c"])
    np.save(tmp_path / "a.npy", np.zeros((4, 4), dtype=np.float32))  # array rewritten, sidecar stale
    with pytest.raises(ValueError, match="3 names for 4 descriptors"):
        load_descriptors(tmp_path / "a.npy")
    (tmp_path / "a.npy.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.npy\.json"):
        load_descriptors(tmp_path / "a.npy")
    torch.save({"descriptors": descriptors}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an aggnets descriptor file"):
        load_descriptors(tmp_path / "other.pt")


# ---- bad inputs ------------------------------------------------------------------------------------------------

def test_bad_inputs(tmp_path):
    model = Embedder(_stub(), lambda in_channels: GeM(in_channels))
    image = torch.rand(3, 20, 30)
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        extract_descriptors(model, [image, missing], progress=False)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(missing)
    with pytest.raises(ValueError, match="empty"):
        extract_descriptors(model, [], progress=False)
    for scales in [(1.0, 0.0), (-1.0,), (), (float("nan"),)]:
        with pytest.raises(ValueError, match="scales"):
            extract_descriptors(model, [image], scales=scales, progress=False)
    with pytest.raises(ValueError, match=r"does not lie inside the 30x20"):
        extract_descriptors(model, [image], bboxes=[(0, 0, 31, 10)], progress=False)
    with pytest.raises(ValueError, match="does not lie inside"):
        extract_descriptors(model, [image], bboxes=[(10, 5, 10, 8)], progress=False)  # empty box
    path = _save_png(tmp_path / "a.png", 20, 30)
    with pytest.raises(ValueError, match=r"a\.png.*does not lie inside the 30x20"):
        load_image(path, bbox=(-5, 0, 10, 10))
    with pytest.raises(ValueError, match="1 bboxes for 2 images"):
        extract_descriptors(model, [image, image], bboxes=[None], progress=False)
    with pytest.raises(ValueError, match=r"shape \(3, h, w\)"):
        extract_descriptors(model, [torch.rand(1, 20, 30)], progress=False)
    with pytest.raises(ValueError, match="batching"):
        extract_descriptors(model, [image], batching="fast", progress=False)
    with pytest.raises(ValueError, match="multiscale"):
        extract_descriptors(model, [image], multiscale="max", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        extract_descriptors(model, [image], batch_size=0, progress=False)
    with pytest.raises(TypeError, match="features"):
        extract_descriptors(nn.Linear(3, 3), [image], progress=False)
    with pytest.raises(ValueError, match="max_size"):
        load_image(path, max_size=0)


def _random_whitening(in_features, out_features):
    from aggnets.heads import Whitening
    gen = torch.Generator().manual_seed(5)
    return Whitening.from_mean_projection(torch.randn(in_features, generator=gen),
                                          torch.randn(out_features, in_features, generator=gen))


@pytest.mark.parametrize("shape", ["head", "projection", "whitening", "projection+whitening", "token_head"])
def test_extracted_descriptors_equal_the_model_image_by_image(resnet_layer2, shape):
    """One path after the backbone: extraction gives ``model(image)`` for every model shape (a whitening trained
    with the model used to be dropped: 8-d descriptors from an Embedder whose out_dim was 4)."""
    from aggnets.heads import ClassToken
    torch.manual_seed(0)
    head = (lambda in_channels: ClassToken(in_channels, patch_pool="mean")) if shape == "token_head" else GeM
    model = Embedder(resnet_layer2, head, projection_dim=64 if "projection" in shape else None)
    if "whitening" in shape:
        before = 64 if "projection" in shape else model.head.out_dim
        model.set_whitening(_random_whitening(before, 16))
    images = _images()
    with torch.no_grad():
        alone = torch.cat([model(image[None]) for image in images])
    batched = extract_descriptors(model, images, batch_size=4, progress=False)
    assert batched.shape == (len(images), model.out_dim)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_the_whitening_bug_reproduction():
    """The issue's reproduction: Embedder(backbone, GeM(8), whitening=Whitening(8, 4)) -> 4-d descriptors."""
    from aggnets.heads import Whitening
    backbone = FeatureExtractor(nn.Conv2d(3, 8, 3, stride=2), name="conv", layer="0", out_channels=8, stride=2,
                                mean=MEAN, std=STD)
    model = Embedder(backbone, GeM(8), whitening=Whitening(8, 4))
    assert model.out_dim == 4
    assert extract_descriptors(model, _images()[:2], progress=False).shape == (2, 4)
