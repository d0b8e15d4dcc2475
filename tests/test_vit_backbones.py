"""Vision-transformer backbones (timm ViT / DINOv2 / EVA): the patch-token map and class token against an independent
DINOv2 forward in the authors' layout (tests/dinov2_reference.py), any image size, blocks, facets, freezing, the
authors' checkpoints, padded batches, and the heads on top. Small random models (embed 48, 2-4 blocks)."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import aggnets
from aggnets.backbones import build_backbone
from aggnets.heads import ClassToken
from aggnets.retrieval import extract_descriptors

from . import dinov2_reference as ref

# 48 channels: timm's ViT-G MLP width (5.33 x 48 = 256) equals the authors' SwiGLU rule there
DIM, DEPTH, HEADS = 48, 3, 2
TINY = {"embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS}
VARIANTS = {  # name -> (timm model, state-dict options)
    "plain": ("timm:vit_small_patch14_dinov2", {}),
    "reg4": ("timm:vit_small_patch14_reg4_dinov2", {"registers": 4}),
    "giant_swiglu": ("timm:vit_giant_patch14_dinov2", {"swiglu": True}),
    "chunked": ("timm:vit_small_patch14_dinov2", {"chunked": True}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The authors' layout, one file per variant: (path, state)."""
    folder = tmp_path_factory.mktemp("dinov2")
    out = {}
    for variant, (_, options) in VARIANTS.items():
        state = ref.random_state(DIM, DEPTH, seed=len(out), **options)
        path = folder / f"dinov2_{variant}_pretrain.pth"
        torch.save(state, path)
        out[variant] = (path, state)
    return out


def _dinov2(variant, checkpoints, layer=-1, **kwargs):
    name, _ = VARIANTS[variant]
    return build_backbone(name, layer, weights=str(checkpoints[variant][0]), model_kwargs=TINY,
                          normalize_images=False, **kwargs).double().eval()


def _images(batch, height, width, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- the authors' weights, exactly ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("size", [(518, 518), (70, 84), (98, 42)], ids=["518", "70x84", "98x42"])
def test_authors_checkpoint_equals_their_forward(variant, size, checkpoints):
    """Converted to timm's layout (registers, the class position, SwiGLU, chunks), the map and class token equal the
    authors' model at their 37 x 37 grid and at interpolated grids (their interpolation for each model family)."""
    if size == (518, 518) and variant != "reg4":
        pytest.skip("one variant at the full 37 x 37 grid is enough (1370 tokens)")
    backbone = _dinov2(variant, checkpoints)
    images = _images(2, *size)
    out = backbone.extract(images)
    patches, token = ref.forward(checkpoints[variant][1], images, heads=HEADS, block=DEPTH - 1)
    assert out.map.shape == (2, DIM, size[0] // 14, size[1] // 14)
    torch.testing.assert_close(out.map, patches, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.token, token, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("block", [0, 1])
def test_intermediate_blocks_with_and_without_the_final_norm(norm, block, checkpoints):
    backbone = _dinov2("reg4", checkpoints, f"blocks.{block}", norm=norm)
    assert len(backbone.body.blocks) == block + 1  # later blocks are not run: they are not even kept
    images = _images(1, 56, 70)
    out = backbone.extract(images)
    patches, token = ref.forward(checkpoints["reg4"][1], images, heads=HEADS, block=block, norm=norm)
    torch.testing.assert_close(out.map, patches, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.token, token, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("facet", ["query", "key", "value"])
def test_facets_are_the_attention_projections(facet, checkpoints):
    backbone = _dinov2("plain", checkpoints, 1, facet=facet)
    assert not backbone.norm
    images = _images(2, 42, 56)
    out = backbone.extract(images)
    patches, token = ref.forward(checkpoints["plain"][1], images, heads=HEADS, block=1, norm=False, facet=facet)
    torch.testing.assert_close(out.map, patches, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.token, token, rtol=1e-9, atol=1e-9)


def test_checkpoint_mismatches_name_the_key(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="register_tokens"):  # a register checkpoint into a plain model
        build_backbone("timm:vit_small_patch14_dinov2", weights=str(checkpoints["reg4"][0]), model_kwargs=TINY)
    with pytest.raises(ValueError, match="register_tokens"):
        build_backbone("timm:vit_small_patch14_reg4_dinov2", weights=str(checkpoints["plain"][0]), model_kwargs=TINY)
    with pytest.raises(ValueError, match="pos_embed"):  # a 224 px model has a 16 x 16 grid
        build_backbone("timm:vit_small_patch14_dinov2", weights=str(checkpoints["plain"][0]),
                       model_kwargs={**TINY, "img_size": 224})
    state = dict(checkpoints["plain"][1])
    del state["blocks.1.ls2.gamma"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.ls2\.gamma"):
        build_backbone("timm:vit_small_patch14_dinov2", weights=str(path), model_kwargs=TINY)


# ---- any size ------------------------------------------------------------------------------------------------------

def test_uneven_sizes_crop_pad_or_refuse(checkpoints):
    images = _images(1, 75, 90)
    crop = _dinov2("plain", checkpoints)
    assert crop.uneven == "crop" and crop.output_size(75, 90) == (5, 6)
    torch.testing.assert_close(crop(images), crop(images[..., :70, :84]), rtol=0, atol=0)
    pad = _dinov2("plain", checkpoints, uneven="pad")
    assert pad.output_size(75, 90) == (6, 7)
    padded = F.pad(images, (0, 98 - 90, 0, 84 - 75))  # zeros in normalised space (normalize_images=False here)
    torch.testing.assert_close(pad(images), pad(padded), rtol=0, atol=0)
    strict = _dinov2("plain", checkpoints, uneven="error")
    assert strict(images[..., :70, :84]).shape[-2:] == (5, 6)
    with pytest.raises(ValueError, match=r"75x90 is not a multiple of the patch size 14.*70x84.*uneven='crop'"):
        strict(images)
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        crop(_images(1, 13, 40))


def test_plain_vit_and_deit_any_size():
    for name, patch in (("timm:vit_base_patch16_224", 16), ("timm:deit_tiny_patch16_224", 16)):
        backbone = build_backbone(name, "blocks.1", weights=None, model_kwargs=TINY).eval()
        assert (backbone.out_channels, backbone.stride, backbone.padded_batches) == (DIM, patch, True)
        out = backbone.extract(torch.rand(2, 3, 48, 80))
        assert out.map.shape == (2, DIM, 3, 5) and out.token.shape == (2, DIM)
        assert backbone.extract(torch.rand(1, 3, 224, 224)).map.shape == (1, DIM, 14, 14)


def test_forward_intermediates_family():
    """EVA (rotary embeddings) and distilled DeiT (two prefix tokens) go through timm's forward_intermediates: the
    map and class token, no padded batches, no facets."""
    eva = build_backbone("timm:eva02_tiny_patch14_224", -1, weights=None, model_kwargs=TINY).eval()
    assert not eva.padded_batches and eva.stride == 14
    out = eva.extract(torch.rand(2, 3, 70, 84))
    assert out.map.shape == (2, DIM, 5, 6) and out.token.shape == (2, DIM)
    deit = build_backbone("timm:deit_tiny_distilled_patch16_224", 0, weights=None, model_kwargs=TINY).eval()
    assert deit.num_prefix_tokens == 2
    tokens = deit.body.forward_intermediates(torch.rand(1, 3, 64, 64), indices=[0], return_prefix_tokens=True,
                                             norm=True, intermediates_only=True, output_fmt="NCHW")
    out = deit.extract(torch.rand(1, 3, 64, 64))
    assert out.map.shape == (1, DIM, 4, 4) and tokens[0][1].shape[1] == 2
    with pytest.raises(ValueError, match="facets need timm's plain VisionTransformer"):
        build_backbone("timm:eva02_tiny_patch14_224", weights=None, model_kwargs=TINY, facet="value")
    with pytest.raises(ValueError, match="cannot mask a padded batch"):
        eva.extract(torch.rand(2, 3, 70, 84), sizes=torch.tensor([[70, 84], [56, 56]]))


# ---- padded batches -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["plain", "reg4"])
@pytest.mark.parametrize("uneven", ["crop", "pad"])
def test_padded_batch_equals_each_image_alone(variant, uneven, checkpoints):
    """Per-image position embeddings and an attention key mask: every image of a padded batch gets the map and class
    token it gets alone (float64)."""
    backbone = _dinov2(variant, checkpoints, uneven=uneven)
    sizes = [(70, 84), (45, 99), (98, 30), (14, 14)]
    images = [_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    canvas = torch.zeros(len(images), 3, 98, 99, dtype=torch.float64)
    for i, image in enumerate(images):
        canvas[i, :, : image.shape[1], : image.shape[2]] = image
    out = backbone.extract(canvas, sizes=torch.tensor(sizes))
    for i, image in enumerate(images):
        alone = backbone.extract(image[None])
        h, w = alone.map.shape[-2:]
        assert out.mask[i].sum() == h * w and out.mask[i, :h, :w].all()
        torch.testing.assert_close(out.map[i, :, :h, :w], alone.map[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.token[i], alone.token[0], rtol=1e-10, atol=1e-10)


def test_extraction_of_a_vit_model_equals_the_model_image_by_image(checkpoints):
    backbone = _dinov2("reg4", checkpoints)
    model = aggnets.Embedder(backbone, ClassToken(DIM, patch_pool="mean")).double()
    images = [torch.rand(3, h, w, dtype=torch.float64) for h, w in ((70, 84), (56, 99), (100, 42), (29, 30))]
    batched = extract_descriptors(model, images, batch_size=4, max_size=None, progress=False)
    with torch.no_grad():
        alone = torch.cat([model(image[None]) for image in images])
    torch.testing.assert_close(batched.double(), alone, rtol=1e-10, atol=1e-10)


# ---- freezing ------------------------------------------------------------------------------------------------------

def _saved_bytes(backbone, images):
    """Bytes of the tensors autograd keeps for the backward of one forward (the activation memory of training)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = backbone.extract(images)
    return total, out


def test_freezing_runs_the_frozen_blocks_without_autograd():
    model_kwargs = {"embed_dim": 48, "depth": 4, "num_heads": 2}
    full = build_backbone("timm:vit_small_patch14_dinov2", weights=None, model_kwargs=model_kwargs).train()
    frozen = build_backbone("timm:vit_small_patch14_dinov2", weights=None, model_kwargs=model_kwargs,
                            freeze="blocks.2").train()
    frozen.load_state_dict(full.state_dict())
    trainable = {name for name, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in frozen.named_parameters() if n.startswith(("body.blocks.3.", "body.norm."))}
    images = torch.rand(2, 3, 84, 84)
    full_bytes, full_out = _saved_bytes(full, images)
    frozen_bytes, frozen_out = _saved_bytes(frozen, images)
    torch.testing.assert_close(frozen_out.map, full_out.map)
    assert frozen_bytes < 0.35 * full_bytes, (frozen_bytes, full_bytes)  # one block of four (and the norm)
    frozen_out.map.sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in frozen.parameters())
    everything = build_backbone("timm:vit_small_patch14_dinov2", weights=None, model_kwargs=model_kwargs,
                                freeze=True).train()
    assert _saved_bytes(everything, images)[0] == 0
    with pytest.raises(ValueError, match="cannot freeze up to block 7"):
        build_backbone("timm:vit_small_patch14_dinov2", 1, weights=None, model_kwargs=model_kwargs, freeze="blocks.7")


# ---- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"layer": "blocks.3"}, "'blocks.0' .. 'blocks.2'"),
    ({"layer": "head"}, "'blocks.0' .. 'blocks.2'"),
    ({"facet": "value", "norm": True}, "norm=True applies to the block's output tokens"),
    ({"facet": "attention"}, "facet must be one of"),
    ({"uneven": "resize"}, "uneven must be one of"),
    ({"pos_interpolation": "bilinear"}, "pos_interpolation must be one of"),
])
def test_bad_vit_options(kwargs, message):
    layer = kwargs.pop("layer", None)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_backbone("timm:vit_small_patch14_dinov2", layer, weights=None, model_kwargs=TINY, **kwargs)


def test_vit_options_on_a_cnn_are_refused():
    with pytest.raises(ValueError, match="facet='value' applies to vision transformers only"):
        build_backbone("resnet18", "layer2", weights=None, facet="value")


# ---- heads on top --------------------------------------------------------------------------------------------------

def test_every_head_on_a_vit_map():
    backbone = build_backbone("timm:vit_small_patch14_reg4_dinov2", weights=None, model_kwargs=TINY).eval()
    for name in aggnets.list_heads():
        kwargs = {"num_clusters": 4} if aggnets.get_head_class(name).capabilities.codebook != "none" else {}
        if name == "spatial_pyramid":
            kwargs = {"head": "gem", "levels": (1, 2)}
        size_args = aggnets.get_head_class(name).capabilities.size_args
        kwargs.update(zip(size_args, backbone.output_size(56, 70)))  # a fixed-size head (MixVPR): the ViT's grid
        model = aggnets.Embedder(backbone, aggnets.build_head(name, in_channels=DIM, **kwargs)).eval()
        with torch.no_grad():
            out = model(torch.rand(2, 3, 56, 70))
        assert out.shape == (2, model.out_dim) and torch.isfinite(out).all(), name


def test_class_token_head_gets_the_class_token_and_a_cnn_its_mean():
    vit = build_backbone("timm:vit_small_patch14_dinov2", weights=None, model_kwargs=TINY).eval()
    images = torch.rand(2, 3, 56, 56)
    model = aggnets.Embedder(vit, ClassToken(DIM), normalize=False)
    with torch.no_grad():
        torch.testing.assert_close(model(images), vit.extract(images).token)
    cnn = build_backbone("resnet18", "layer2", weights=None).eval()
    model = aggnets.Embedder(cnn, ClassToken(128, patch_pool="mean"), normalize=False)
    mask = torch.ones(2, 7, 7, dtype=torch.bool)
    mask[1, 3:, :] = False
    with torch.no_grad():
        feature_map = cnn(images)
        out = model(images, mask)
    for b in range(2):  # the masked mean of the valid positions stands in for the class token
        mean = feature_map[b][:, mask[b]].mean(dim=1)
        torch.testing.assert_close(out[b], torch.cat([mean, mean]))


def test_compiled_vit_embedder_matches_eager_at_several_sizes():
    """torch.compile (dynamo + AOTAutograd) of a ViT embedder with its class token, recompiling for new grids,
    equals eager (inference)."""
    backbone = build_backbone("timm:vit_small_patch14_reg4_dinov2", weights=None, model_kwargs=TINY).eval()
    model = aggnets.Embedder(backbone, ClassToken(DIM, patch_pool="mean")).eval()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        for size in ((2, 3, 70, 84), (1, 3, 98, 56), (3, 3, 75, 90)):
            images = torch.rand(*size)
            torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
