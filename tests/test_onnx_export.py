"""ONNX export (aggnets.export): every head alone and backbone + head, onnxruntime vs PyTorch at several input sizes
through one graph where dynamic H x W is claimed (R-MAC and spatial pyramids included: square, landscape and portrait
maps whose R-MAC grids differ), and a fixed-size graph that rejects another H x W where it is not."""
import warnings

import pytest
import torch

import aggnets
from aggnets.export import check_onnx, export_onnx, supports_dynamic_hw
from aggnets.functional.regions import _extra_regions
from aggnets.heads import GeM, MAC, NetBoF, NetVLAD, RMAC, SPoC, SpatialPyramid

from .helpers import capabilities, input_kind, make_head, rand_map

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

C, K = 4, 3


@pytest.mark.parametrize("name", aggnets.list_heads())
def test_head_export(name, tmp_path):
    torch.manual_seed(0)
    head = make_head(name, C=C, K=K, dtype=torch.float32)
    dynamic = capabilities(name).dynamic_onnx
    assert supports_dynamic_hw(head) == dynamic
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(head, tmp_path / f"{name}.onnx", example_size=(2, C, 5, 6), verify=False)
    fixed_warning = [w for w in caught if "fixed H x W" in str(w.message)]
    assert bool(fixed_warning) == (not dynamic)

    def maps(*shapes):  # a head that takes the global token is exported with a second input, token (B, C)
        xs = [rand_map(*s, kind=input_kind(name), dtype=torch.float32) for s in shapes]
        return [(x, torch.randn(x.shape[0], C)) for x in xs] if head.uses_token else xs

    if dynamic:  # square, landscape and portrait H x W (and batch sizes) through one graph
        assert check_onnx(head, path, maps((2, C, 5, 6), (3, C, 7, 9), (1, C, 9, 7), (2, C, 8, 8)), atol=1e-4) <= 1e-4
    else:  # right at the traced H x W for any batch; another H x W is rejected by onnxruntime, never wrong
        assert check_onnx(head, path, maps((2, C, 5, 6), (1, C, 5, 6), (3, C, 5, 6)), atol=1e-4) <= 1e-4
        with pytest.raises(Exception, match="(?i)invalid|dimension|built for"):  # onnxruntime, or a fixed-size head
            check_onnx(head, path, maps((2, C, 7, 9)))


@pytest.mark.parametrize("name", ["gem", "netvlad"])
def test_backbone_and_head_export(name, tmp_path):
    torch.manual_seed(0)
    backbone = aggnets.backbones.build_backbone("resnet18", "layer2", weights=None)
    head = aggnets.build_head(name, in_channels=backbone.out_channels, **({"num_clusters": 8} if name == "netvlad"
                                                                           else {}))
    model = aggnets.Embedder(backbone, head).eval()
    path = export_onnx(model, tmp_path / "model.onnx", example_size=(1, 3, 64, 64), verify=False)
    images = [torch.randn(1, 3, 64, 64), torch.randn(3, 3, 96, 80)]
    assert check_onnx(model, path, images, atol=1e-4) <= 1e-4


def test_token_head_graph_uses_its_token_input(tmp_path):
    """A bare head that takes the global token has a token input, and the graph really reads it."""
    import onnx

    head = aggnets.heads.ClassToken(C, patch_pool="mean")
    path = export_onnx(head, tmp_path / "class_token.onnx", example_size=(2, C, 5, 6))  # verify=True
    assert [i.name for i in onnx.load(path).graph.input] == ["x", "token"]
    x, token = torch.randn(3, C, 4, 7), torch.randn(3, C)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": x.numpy(), "token": token.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), torch.cat([token, x.mean(dim=(2, 3))], dim=1), atol=1e-6)


def test_export_verify_and_training_flag(tmp_path):
    head = make_head("netbof", C=C, K=K, dtype=torch.float32).train()
    export_onnx(head, tmp_path / "netbof.onnx", example_size=(1, C, 5, 6))  # verify=True: checks a second size
    assert head.training


def test_mixvpr_with_resample_exports_one_graph_for_every_size(tmp_path):
    """MixVPR is built for one map size; resample=True resizes any map to it first, and the ONNX graph does too: one
    graph, maps smaller and larger than in_h x in_w (shrinking is antialiased) and of that size."""
    torch.manual_seed(0)
    head = aggnets.heads.MixVPR(C, in_h=5, in_w=6, out_channels=3, mix_depth=2, out_rows=2, resample=True).eval()
    assert supports_dynamic_hw(head)
    path = export_onnx(head, tmp_path / "mixvpr.onnx", example_size=(2, C, 5, 6), verify=False)
    maps = [torch.randn(*s) for s in ((2, C, 5, 6), (1, C, 9, 7), (3, C, 3, 4), (1, C, 12, 12))]
    assert check_onnx(head, path, maps, atol=1e-4) <= 1e-4


def test_fixed_hw_export_rejects_other_sizes(tmp_path):
    """``dynamic_hw=False``: right at the traced H x W for any batch; another H x W is rejected, never wrong."""
    torch.manual_seed(0)
    head = make_head("gem", C=C, dtype=torch.float32)
    path = export_onnx(head, tmp_path / "gem.onnx", example_size=(2, C, 5, 6), dynamic_hw=False, verify=False)
    assert check_onnx(head, path, [rand_map(*s, dtype=torch.float32) for s in ((2, C, 5, 6), (3, C, 5, 6))]) <= 1e-4
    with pytest.raises(Exception, match="(?i)invalid|dimension"):
        check_onnx(head, path, [rand_map(2, C, 7, 9, dtype=torch.float32)])


# One graph, many sizes: square (e = 0), landscape and portrait with 1, 2, 5 and 6 extra regions along the long side
# (R-MAC; 5 x 9 is an exact tie of the overlap criterion, resolved as in Python), cells of equal and unequal sizes
# (pyramid), and 1-wide maps (levels whose side is 0 are skipped).
SIZES = [(2, C, 7, 7), (1, C, 6, 9), (3, C, 12, 5), (1, C, 5, 12), (1, C, 5, 9), (2, C, 16, 4), (1, C, 1, 20),
         (1, C, 8, 8), (1, C, 1, 1)]


def test_sizes_cover_every_rmac_extra_count():
    assert {_extra_regions(h, w, 0.4) for _, _, h, w in SIZES} == {0, 1, 2, 5, 6}
    assert any(h > w for _, _, h, w in SIZES) and any(h < w for _, _, h, w in SIZES)


@pytest.mark.parametrize("pool", ["max", "gem"])
@pytest.mark.parametrize("include_global", [False, True])
def test_rmac_one_graph_every_size(pool, include_global, tmp_path):
    torch.manual_seed(0)
    head = RMAC(C, include_global=include_global, pool=pool, p=2.5)
    assert supports_dynamic_hw(head)
    path = export_onnx(head, tmp_path / "rmac.onnx", example_size=(2, C, 5, 6))  # verify=True: a second size too
    kind = "positive" if pool == "gem" else "normal"
    assert check_onnx(head, path, [rand_map(*s, kind=kind, dtype=torch.float32) for s in SIZES], atol=1e-4) <= 1e-4


@pytest.mark.parametrize("inner", ["gem", "mac", "spoc", "netvlad", "netbof"])
def test_spatial_pyramid_one_graph_every_size(inner, tmp_path):
    torch.manual_seed(0)
    head = {"gem": lambda: GeM(C, p=2.5), "mac": lambda: MAC(C), "spoc": lambda: SPoC(C),
            "netvlad": lambda: NetVLAD(C, K), "netbof": lambda: NetBoF(C, K)}[inner]()
    pyramid = SpatialPyramid(head, levels=(1, 2, 3))
    assert supports_dynamic_hw(pyramid)
    path = export_onnx(pyramid, tmp_path / "pyramid.onnx", example_size=(2, C, 6, 7))
    assert check_onnx(pyramid, path, [rand_map(*s, kind="positive", dtype=torch.float32) for s in SIZES],
                      atol=1e-4) <= 1e-4


def test_spatial_pyramid_of_rmac_exports_at_a_fixed_size(tmp_path):
    """R-MAC takes no mask at export, and padded pyramid cells need one: a pyramid of R-MAC is exported at the
    traced H x W (where its cells are equal and need no mask), with a warning."""
    torch.manual_seed(0)
    pyramid = SpatialPyramid(RMAC(C), levels=(1, 2))
    assert not supports_dynamic_hw(pyramid)
    with pytest.warns(UserWarning, match="fixed H x W"):
        path = export_onnx(pyramid, tmp_path / "pyramid_rmac.onnx", example_size=(2, C, 8, 8))
    assert check_onnx(pyramid, path, [torch.randn(3, C, 8, 8)]) <= 1e-4


@pytest.mark.parametrize("head", [RMAC(C), SpatialPyramid(GeM(C), levels=(1, 2))], ids=["rmac", "spatial_pyramid"])
def test_export_with_mask_is_refused(head):
    """Their masked form crops each image to its valid box (data-dependent): a clear error, not a wrong graph."""

    class WithMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, x, mask):
            return self.head(x, mask)

    x, mask = torch.randn(2, C, 6, 7), torch.ones(2, 6, 7, dtype=torch.bool)
    with pytest.raises(Exception, match="cannot export with a mask"):
        torch.export.export(WithMask().eval(), (x, mask))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("name", ["gem", "netvlad", "netfv", "rmac"])
def test_head_on_cuda_exports_and_matches(name, tmp_path):
    """A model that lives on the GPU exports (example input on its device); onnxruntime (CPU) matches the GPU output."""
    torch.manual_seed(0)
    head = make_head(name, C=C, K=K, dtype=torch.float32).cuda()
    path = export_onnx(head, tmp_path / f"{name}.onnx", example_size=(2, C, 5, 6), verify=False)
    inputs = [rand_map(*s, kind=input_kind(name), dtype=torch.float32).cuda() for s in ((2, C, 5, 6), (1, C, 9, 7))]
    assert check_onnx(head, path, inputs, atol=1e-4) <= 1e-4


@pytest.mark.parametrize("model_name,dynamic", [("timm:vit_small_patch14_reg4_dinov2", True),
                                                ("timm:vit_small_patch14_dinov2", False)])
def test_vit_embedder_export(model_name, dynamic, tmp_path):
    """A DINOv2 backbone with its class token exports; with timm's position interpolation (the register models) one
    graph takes any size; the authors' scale-factor rule (plain DINOv2) is baked by the exporter at the traced size,
    so it is exported at a fixed size (declared by the backbone: ``dynamic_onnx``) and another size is refused."""
    torch.manual_seed(0)
    backbone = aggnets.backbones.build_backbone(model_name, weights=None,
                                                model_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2})
    model = aggnets.Embedder(backbone, aggnets.heads.ClassToken(48, patch_pool="mean")).eval()
    assert supports_dynamic_hw(model) == dynamic
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(model, tmp_path / "vit.onnx", example_size=(1, 3, 70, 84), verify=False)
    assert any("fixed H x W" in str(w.message) for w in caught) == (not dynamic)
    if dynamic:  # another grid, and uneven sizes (cropped to the patch grid) through one graph
        images = [torch.rand(1, 3, 70, 84), torch.rand(3, 3, 98, 56), torch.rand(2, 3, 75, 90)]
    else:
        images = [torch.rand(1, 3, 70, 84), torch.rand(2, 3, 70, 84)]
        with pytest.raises(Exception, match="(?i)invalid|dimension"):
            check_onnx(model, path, [torch.rand(1, 3, 98, 56)])
    assert check_onnx(model, path, images, atol=1e-4) <= 1e-4
