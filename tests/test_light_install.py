"""`pip install aggnets` is light: the library's dependencies are torch, torchvision, timm, numpy, pillow and tqdm.
The training wiring's (lightning, hydra / omegaconf, torchmetrics, pytorch-metric-learning, tensorboard), scikit-learn
and aggnets_train itself are blocked from import in a fresh interpreter, which then imports aggnets, builds and runs
every head, builds backbones (a CNN and a ViT), extracts descriptors, fits a codebook and evaluates a place set."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "torchmetrics", "pytorch_metric_learning",
           "tensorboard", "sklearn", "aggnets_train")

SCRIPT = r'''
import sys
BLOCKED = set(sys.argv[1].split(","))


class Blocker:
    """An import of a blocked module fails as if it were not installed. (importlib.util.find_spec probes, e.g.
    torch._dynamo's list of known libraries, are let through: they import nothing.)"""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        frame, callers = sys._getframe(1), []
        while frame is not None and len(callers) < 4:
            callers.append(frame.f_code.co_filename)
            frame = frame.f_back
        if any("importlib.util" in caller for caller in callers):
            return None
        raise ModuleNotFoundError(f"blocked for the light-install test: {name}", name=name)


sys.meta_path.insert(0, Blocker())
import numpy as np
import torch

import aggnets
from aggnets import Embedder, heads, retrieval
from aggnets.backbones import build_backbone
from aggnets.codebook import fit_kmeans
from tests.helpers import make_head

names = aggnets.list_heads()
for name in names:
    head = make_head(name, C=8, K=3, dtype=torch.float32, size=(5, 6)).eval()
    x = torch.rand(2, 8, 5, 6)
    out = head(x) if not getattr(head, "uses_token", False) else head(x, None, torch.rand(2, 8))
    assert out.shape == (2, head.out_dim), name
cnn = build_backbone("resnet18", "layer3", weights=None)
vit = build_backbone("timm:vit_small_patch14_dinov2", weights=None,
                     model_kwargs={"embed_dim": 24, "depth": 1, "num_heads": 2})
for backbone, head in ((cnn, heads.GeM(cnn.out_channels)), (vit, heads.SALAD(24, 4, 4, 4, hidden_dim=8))):
    model = Embedder(backbone, head).eval()
    images = [torch.rand(3, 42, 56), torch.rand(3, 56, 42)]
    descriptors = retrieval.extract_descriptors(model, images, progress=True)
    assert descriptors.shape == (2, model.out_dim)
centroids = fit_kmeans(torch.randn(200, 8), 4, engine="torch")
assert tuple(getattr(centroids, "centroids", centroids).shape) == (4, 8)
found = retrieval.radius_positives(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0], [30.0, 0.0]]), 25.0)
assert found[0].tolist() == [0]
loaded = sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("light install ok:", len(names), "heads")
'''


def test_the_library_runs_without_the_training_dependencies():
    result = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(BLOCKED)], capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "light install ok" in result.stdout


def test_the_package_declares_what_the_library_imports_and_the_rest_as_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {dep.split(">")[0].split("=")[0].strip() for dep in project["dependencies"]}
    assert core == {"torch", "torchvision", "timm", "numpy", "pillow", "tqdm"}
    extras = project["optional-dependencies"]
    train = {dep.split(">")[0] for dep in extras["train"]}
    assert train == {"lightning", "torchmetrics", "hydra-core", "pytorch-metric-learning", "tensorboard"}
    assert {dep.split(">")[0] for dep in extras["sklearn"]} == {"scikit-learn"}
    assert "aggnets[train,sklearn,faiss,offline,onnx,docs]" in extras["dev"]
