"""hubconf.py through torch.hub from this clone (source="local"): the entry points, a random backbone + head, the
published architectures with random weights, and a published one from a local checkpoint file."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.test_pretrained import _prefixed, _save, resnet_children

ROOT = str(Path(__file__).resolve().parents[1])


def test_torch_hub_lists_and_loads_the_entry_points(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("aggnets_hubconf", Path(ROOT) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dependencies == ["torch", "torchvision", "timm", "numpy", "PIL", "tqdm"]
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert {"embedder", "cosplace", "eigenplaces", "mixvpr", "boq", "salad", "netvlad", "patch_netvlad", "cirtorch",
            "pretrained_model"} <= entries
    model = torch.hub.load(ROOT, "embedder", source="local", backbone="resnet18", layer="layer3", head="netvlad",
                           num_clusters=8)
    assert model.out_dim == 8 * 256 and model(torch.rand(1, 3, 64, 64)).shape == (1, 2048)
    random = torch.hub.load(ROOT, "cosplace", source="local", backbone="resnet18", fc_output_dim=64, pretrained=False)
    assert random.out_dim == 64 and random.preprocessing.size is None
    boq = torch.hub.load(ROOT, "boq", source="local", pretrained=False)
    assert boq.out_dim == 16384 and boq.preprocessing.size == (384, 384)


def test_a_published_model_from_a_local_file_equals_the_random_architecture_loaded(tmp_path):
    backbone = resnet_children("resnet18", 8)
    state = {**_prefixed("backbone.", backbone.state_dict()), "aggregation.1.p": torch.tensor([3.0]),
             "aggregation.3.weight": torch.randn(64, 512), "aggregation.3.bias": torch.randn(64)}
    path = _save(tmp_path, state, "ResNet18_64_cosplace.pth")
    model = torch.hub.load(ROOT, "cosplace", source="local", backbone="ResNet18", fc_output_dim=64, file=path)
    random = torch.hub.load(ROOT, "cosplace", source="local", backbone="resnet18", fc_output_dim=64, pretrained=False)
    random.load_state_dict(model.state_dict())  # the same architecture, key for key
    images = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(random(images), model(images))
    assert model.pretrained.name == "cosplace_resnet18_64"
