"""ONNX export (aggnets.export): every head alone and backbone + head, onnxruntime vs PyTorch at two input sizes where
dynamic H x W is claimed, and a fixed-size graph that rejects another H x W where it is not."""
import warnings

import pytest
import torch

import aggnets
from aggnets.export import ONNX_DYNAMIC_HW, check_onnx, export_onnx, supports_dynamic_hw

from .helpers import input_kind, make_head, rand_map

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

C, K = 4, 3


def test_table_covers_every_head():
    assert sorted(ONNX_DYNAMIC_HW) == aggnets.list_heads()


@pytest.mark.parametrize("name", aggnets.list_heads())
def test_head_export(name, tmp_path):
    torch.manual_seed(0)
    head = make_head(name, C=C, K=K, dtype=torch.float32)
    dynamic = ONNX_DYNAMIC_HW.get(name, False)
    assert supports_dynamic_hw(head) == dynamic
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(head, tmp_path / f"{name}.onnx", example_size=(2, C, 5, 6), verify=False)
    fixed_warning = [w for w in caught if "fixed H x W" in str(w.message)]
    assert bool(fixed_warning) == (not dynamic)

    def maps(*shapes):
        return [rand_map(*s, kind=input_kind(name), dtype=torch.float32) for s in shapes]

    if dynamic:  # two H x W (and batch sizes) through one graph
        assert check_onnx(head, path, maps((2, C, 5, 6), (3, C, 7, 9), (1, C, 9, 7)), atol=1e-4) <= 1e-4
    else:  # right at the traced H x W for any batch; another H x W is rejected by onnxruntime, never wrong
        assert check_onnx(head, path, maps((2, C, 5, 6), (1, C, 5, 6), (3, C, 5, 6)), atol=1e-4) <= 1e-4
        with pytest.raises(Exception, match="(?i)invalid|dimension"):
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


def test_export_verify_and_training_flag(tmp_path):
    head = make_head("netbof", C=C, K=K, dtype=torch.float32).train()
    export_onnx(head, tmp_path / "netbof.onnx", example_size=(1, C, 5, 6))  # verify=True: checks a second size
    assert head.training
