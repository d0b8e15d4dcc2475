"""aggnets.pretrained on checkpoints synthesised here in each publisher's exact key layout (random values; names and
shapes from their code), loaded from a file or through the download path (a file:// URL into torch.hub's cache), each
compared with a forward written here independently: torchvision's own ResNet / VGG modules cut as the authors cut them,
the authors' DINOv2 (tests/dinov2_reference.py) and the aggregators' references of the head tests."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import aggnets
from aggnets import pretrained
from aggnets.convert import StateDictError
from tests import dinov2_reference
from tests.test_boq import authors_state as boq_state
from tests.test_mixvpr import authors_forward as mixvpr_forward
from tests.test_mixvpr import authors_state as mixvpr_state
from tests.test_salad import authors_state as salad_state
from tests.test_salad import reference_salad

DT = torch.float64
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=DT).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=DT).view(1, 3, 1, 1)


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    """A torchvision module with random weights and trained-looking BatchNorm statistics, float64, eval."""
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.normal_(m.weight, 1.0, 0.1)
            nn.init.normal_(m.bias, 0.0, 0.1)
    return module.double().eval()


def resnet_children(name: str, upto: int, seed: int = 0) -> nn.Sequential:
    """``nn.Sequential(*resnet.children()[:upto])`` as CosPlace (8), BoQ (7) cut torchvision's ResNet."""
    return _randomised(nn.Sequential(*list(getattr(torchvision.models, name)(weights=None).children())[:upto]), seed)


def vgg_features(upto: int, seed: int = 0) -> nn.Sequential:
    """VGG16 ``features[:upto]``: 29 = up to conv5_3 (CosPlace, NetVLAD), 30 = with its ReLU (cnnimageretrieval)."""
    return _randomised(nn.Sequential(*list(torchvision.models.vgg16(weights=None).features.children())[:upto]), seed)


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _save(tmp_path, checkpoint, name="model.pth"):
    path = tmp_path / name
    torch.save(checkpoint, path)
    return str(path)


def _images(h=64, w=80, seed=1):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _ours(name, path):
    model = pretrained.load(name, file=path).double()
    assert model.preprocessing == pretrained.info(name).preprocessing and not model.training
    return model


def _close(got, expected, tol=1e-5):
    torch.testing.assert_close(got.to(expected.dtype), expected, rtol=0, atol=tol)


def gem(x, p, eps=1e-6):
    return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)[:, :, 0, 0]


@pytest.mark.parametrize("family", ["cosplace", "eigenplaces"])
def test_cosplace_and_eigenplaces_resnet(tmp_path, family):
    backbone = resnet_children("resnet18", 8)
    g = torch.Generator().manual_seed(2)
    p, weight, bias = torch.tensor([3.4], dtype=DT), torch.randn(256, 512, generator=g, dtype=DT) / 20, \
        torch.randn(256, generator=g, dtype=DT)
    state = {**_prefixed("backbone.", backbone.state_dict()), "aggregation.1.p": p.float(),
             "aggregation.3.weight": weight.float(), "aggregation.3.bias": bias.float()}
    model = _ours(f"{family}_resnet18_256", _save(tmp_path, state))
    images = _images()
    with torch.no_grad():
        x = backbone((images - MEAN) / STD)
        expected = F.normalize(F.linear(gem(F.normalize(x, dim=1), float(p)), weight, bias), dim=1)
        _close(model(images), expected, 1e-6)


def test_cosplace_vgg16(tmp_path):
    backbone = vgg_features(29)
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(64, 512, generator=g, dtype=DT) / 20, torch.randn(64, generator=g, dtype=DT)
    state = {**_prefixed("backbone.", backbone.state_dict()), "aggregation.1.p": torch.tensor([3.0]),
             "aggregation.3.weight": weight.float(), "aggregation.3.bias": bias.float()}
    model = _ours("cosplace_vgg16_64", _save(tmp_path, state))
    images = _images()
    with torch.no_grad():
        x = backbone((images - MEAN) / STD)
        expected = F.normalize(F.linear(gem(F.normalize(x, dim=1), 3.0), weight, bias), dim=1)
        _close(model(images), expected, 1e-6)


def test_mixvpr(tmp_path):
    resnet = torchvision.models.resnet50(weights=None)
    trunk = _randomised(nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1,
                                      resnet.layer2, resnet.layer3), 0)
    named = {k: v for k, v in resnet.state_dict().items() if not k.startswith(("layer4.", "fc."))}
    aggregator = mixvpr_state(1024, 20, 20, d=64, L=4, R=2)
    state = {**_prefixed("backbone.model.", named), **_prefixed("aggregator.", aggregator)}
    model = _ours("mixvpr_resnet50_128", _save(tmp_path, state))
    images = _images(320, 320)
    with torch.no_grad():
        _close(model(images), mixvpr_forward(trunk((images - MEAN) / STD), aggregator), 1e-6)


def test_boq_resnet50(tmp_path):
    backbone = resnet_children("resnet50", 7)
    aggregator, reference = boq_state(C=1024, d=64, Q=3, L=2, R=4, heads=1)
    state = {**_prefixed("backbone.net.", backbone.state_dict()), **_prefixed("aggregator.", aggregator)}
    model = _ours("boq_resnet50_16384", _save(tmp_path, state))
    images = _images()
    with torch.no_grad():
        _close(model(images), reference(backbone((images - MEAN) / STD))[0], 1e-6)


@pytest.fixture(scope="module")
def dinov2_b():
    return {k: v.float() for k, v in dinov2_reference.random_state(768, 12, seed=4).items()}


def _authors_dinov2(state, images, norm):
    """The authors' ViT-B/14 (all 12 blocks) on ImageNet-normalised images, float64: (patch tokens, class token)."""
    with torch.no_grad():
        return dinov2_reference.forward({k: v.double() for k, v in state.items()}, (images - MEAN) / STD, heads=12,
                                        block=11, norm=norm)


def test_boq_dinov2_skips_the_final_norm(tmp_path, dinov2_b):
    aggregator, reference = boq_state(C=768, d=64, Q=3, L=2, R=4, heads=1)
    state = {**_prefixed("backbone.dino.", dinov2_b), **_prefixed("aggregator.", aggregator)}
    model = _ours("boq_dinov2_12288", _save(tmp_path, state))
    images = _images(28, 42)
    tokens, _ = _authors_dinov2(dinov2_b, images, norm=False)
    with torch.no_grad():
        _close(model(images), reference(tokens)[0], 1e-5)


def test_salad(tmp_path, dinov2_b):
    aggregator = salad_state(768)
    state = {**_prefixed("backbone.model.", dinov2_b), **_prefixed("aggregator.", aggregator)}
    model = _ours("salad_dinov2_8448", _save(tmp_path, state))
    images = _images(28, 42)
    tokens, token = _authors_dinov2(dinov2_b, images, norm=True)
    with torch.no_grad():
        _close(model(images), reference_salad(aggregator, tokens, token), 1e-5)


def netvlad_reference(x, conv, centroids):
    """pytorch-NetVlad's NetVLAD (vladv1: no bias): L2 over channels, softmax of a 1 x 1 conv, residual sums,
    intra-L2, flattened cluster-major, L2."""
    x = F.normalize(x, dim=1)
    soft = F.softmax(F.conv2d(x, conv), dim=1).flatten(2)                      # (B, K, N)
    flat = x.flatten(2)                                                         # (B, C, N)
    vlad = torch.einsum("bkn,bcn->bkc", soft, flat) - soft.sum(-1, keepdim=True) * centroids[None]
    return F.normalize(F.normalize(vlad, dim=2).flatten(1), dim=1)


@pytest.mark.parametrize("wpca", [False, True])
def test_netvlad_and_patch_netvlad(tmp_path, wpca):
    encoder = vgg_features(29)
    g = torch.Generator().manual_seed(5)
    conv, centroids = torch.randn(4, 512, 1, 1, generator=g, dtype=DT), torch.randn(4, 512, generator=g, dtype=DT)
    state = {**_prefixed("encoder.", encoder.state_dict()), "pool.conv.weight": conv.float(),
             "pool.centroids": centroids.float()}
    wpca_weight, wpca_bias = torch.randn(16, 2048, 1, 1, generator=g, dtype=DT) / 40, torch.randn(16, generator=g,
                                                                                                   dtype=DT)
    if wpca:
        state.update({"WPCA.0.weight": wpca_weight.float(), "WPCA.0.bias": wpca_bias.float()})
        name, checkpoint = "patch_netvlad_pitts_wpca128", {"num_pcs": 16, "state_dict": state}
    else:
        name, checkpoint = "netvlad_vgg16_pitts30k", {"epoch": 3, "state_dict": state, "best_score": 0.8}
    model = _ours(name, _save(tmp_path, checkpoint))
    images = _images()
    with torch.no_grad():
        expected = netvlad_reference(encoder((images - MEAN) / STD), conv, centroids)
        if wpca:
            expected = F.normalize(F.linear(expected, wpca_weight.flatten(1), wpca_bias), dim=1)
        _close(model(images), expected, 1e-6)


def test_cirtorch_whitened_resnet(tmp_path):
    features = resnet_children("resnet50", 8)
    g = torch.Generator().manual_seed(6)
    weight, bias = torch.randn(2048, 2048, generator=g, dtype=DT) / 45, torch.randn(2048, generator=g, dtype=DT)
    checkpoint = {"meta": {"architecture": "resnet50", "pooling": "gem", "whitening": True, "local_whitening": False,
                           "regional": False, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                           "outputdim": 2048},
                  "state_dict": {**_prefixed("features.", features.state_dict()), "pool.p": torch.tensor([2.8]),
                                 "whiten.weight": weight.float(), "whiten.bias": bias.float()}}
    model = _ours("cirtorch_rSfM120k-tl-resnet50-gem-w", _save(tmp_path, checkpoint))
    images = _images()
    with torch.no_grad():
        pooled = F.normalize(gem(features((images - MEAN) / STD), 2.8), dim=1)
        _close(model(images), F.normalize(F.linear(pooled, weight, bias), dim=1), 1e-6)


def test_cirtorch_vgg_with_the_learned_whitening_in_meta(tmp_path):
    features = vgg_features(30)
    rng = np.random.default_rng(7)
    m, projection = rng.normal(size=(512, 1)) * 0.01, rng.normal(size=(512, 512)) / 20
    other = {"m": np.zeros((512, 1)), "P": np.eye(512)}
    meta = {"architecture": "vgg16", "pooling": "gem", "whitening": False, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "outputdim": 512,
            "Lw": {"retrieval-SfM-120k": {"ss": other, "ms": {"m": m, "P": projection}}}}
    checkpoint = {"meta": meta, "state_dict": {**_prefixed("features.", features.state_dict()),
                                               "pool.p": torch.tensor([3.0])}}
    model = _ours("cirtorch_retrievalSfM120k-vgg16-gem", _save(tmp_path, checkpoint))
    images = _images()
    with torch.no_grad():
        pooled = F.normalize(gem(features((images - MEAN) / STD), 3.0), dim=1)
        whitened = (torch.from_numpy(projection) @ (pooled.T - torch.from_numpy(m))).T
        _close(model(images), F.normalize(whitened, dim=1), 1e-6)


def test_the_download_path_caches_a_file_url_in_torch_hub(tmp_path, monkeypatch):
    backbone = resnet_children("resnet18", 8)
    state = {**_prefixed("backbone.", backbone.state_dict()), "aggregation.1.p": torch.tensor([3.0]),
             "aggregation.3.weight": torch.randn(32, 512), "aggregation.3.bias": torch.randn(32)}
    source = _save(tmp_path, state, "ResNet18_32_cosplace.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    name = "cosplace_resnet18_32"
    entry = dataclasses.replace(pretrained.info(name), url=f"file://{source}")
    monkeypatch.setitem(pretrained.MODELS, name, entry)
    model = pretrained.load(name, progress=False)
    cached = tmp_path / "hub" / "hub" / "checkpoints" / "ResNet18_32_cosplace.pth"
    assert cached.is_file() and model.out_dim == 32 and model.pretrained.name == name
    digest = __import__("hashlib").sha256(cached.read_bytes()).hexdigest()
    pretrained.load(name, sha256=digest[:12], progress=False)
    with pytest.raises(ValueError, match="has sha256 .* expected 000000"):
        pretrained.load(name, sha256="000000", progress=False)


def test_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="no model 'boq_resnet50'; did you mean 'boq_resnet50_16384'"):
        pretrained.info("boq_resnet50")
    with pytest.raises(ValueError, match=r"no direct download: Google Drive only .*file='path/to/file'"):
        pretrained.load("mixvpr_resnet50_4096")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint .*partial or corrupt download"):
        pretrained.load("boq_resnet50_16384", file=str(broken))
    other = _save(tmp_path, {"aggregation.1.p": torch.tensor([3.0])})
    with pytest.raises(StateDictError, match=r"unexpected top-level name\(s\) \['aggregation'\].*boq_resnet50_16384"):
        pretrained.load("boq_resnet50_16384", file=other)
    small = resnet_children("resnet18", 8)
    wrong = {**_prefixed("backbone.", small.state_dict()), "aggregation.1.p": torch.tensor([3.0]),
             "aggregation.3.weight": torch.randn(32, 512), "aggregation.3.bias": torch.randn(32)}
    with pytest.raises(StateDictError, match="backbone weights do not match the published architecture"):
        pretrained.load("cosplace_resnet50_32", file=_save(tmp_path, wrong, "r18.pth"))
    assert {"cosplace", "eigenplaces", "mixvpr", "convap", "boq", "salad", "netvlad", "patch_netvlad", "benchmark",
            "cirtorch"} == {
        pretrained.info(n).family for n in pretrained.list()}
    assert all(math.isfinite(v) for n in pretrained.list() for v in pretrained.info(n).reported.values())
    assert aggnets.pretrained is pretrained


def test_convap(tmp_path):
    resnet = torchvision.models.resnet50(weights=None)
    trunk = _randomised(nn.Sequential(*list(resnet.children())[:-2]), 0)
    named = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    g = torch.Generator().manual_seed(8)
    weight, bias = torch.randn(128, 2048, 1, 1, generator=g, dtype=DT) / 45, torch.randn(128, generator=g, dtype=DT)
    state = {**_prefixed("backbone.model.", named), "aggregator.channel_pool.weight": weight.float(),
             "aggregator.channel_pool.bias": bias.float()}
    model = _ours("convap_resnet50_512", _save(tmp_path, state))
    images = _images(96, 96)
    with torch.no_grad():
        cells = F.adaptive_avg_pool2d(F.conv2d(trunk((images - MEAN) / STD), weight, bias), (2, 2))
        _close(model(images), F.normalize(cells.flatten(1), dim=1), 1e-6)


def test_the_benchmarks_netvlad_at_conv4_and_gem_fc_at_conv5(tmp_path):
    conv4 = resnet_children("resnet18", 7)
    g = torch.Generator().manual_seed(9)
    conv, centroids = torch.randn(4, 256, 1, 1, generator=g, dtype=DT), torch.randn(4, 256, generator=g, dtype=DT)
    state = {**_prefixed("backbone.", conv4.state_dict()), "aggregation.conv.weight": conv.float(),
             "aggregation.centroids": centroids.float()}
    model = _ours("benchmark_resnet18_netvlad_pitts30k", _save(tmp_path, {"model_state_dict": state}))
    images = _images()
    with torch.no_grad():
        _close(model(images), netvlad_reference(conv4((images - MEAN) / STD), conv, centroids), 1e-6)
    conv5 = resnet_children("resnet50", 8)
    weight, bias = torch.randn(64, 2048, generator=g, dtype=DT) / 45, torch.randn(64, generator=g, dtype=DT)
    state = {**_prefixed("backbone.", conv5.state_dict()), "aggregation.0.1.p": torch.tensor([3.3]),
             "aggregation.1.weight": weight.float(), "aggregation.1.bias": bias.float()}
    model = _ours("benchmark_resnet50_gem_fc2048_msls", _save(tmp_path, state, "fc.pth"))
    with torch.no_grad():
        x = conv5((images - MEAN) / STD)
        expected = F.normalize(F.linear(gem(F.normalize(x, dim=1), 3.3), weight, bias), dim=1)
        _close(model(images), expected, 1e-6)


@pytest.mark.parametrize("pooling", ["rmac", "mac", "spoc"])
def test_a_cirtorch_network_of_ones_own_with_other_poolings(tmp_path, pooling):
    """from_checkpoint: R-MAC against the independent reference of tests/references.py (Tolias et al.'s grid plus the
    whole map, as cnnimageretrieval's rmac), MAC and SPoC by their definitions."""
    from tests.references import rmac_ref

    features = resnet_children("resnet18", 8)
    meta = {"architecture": "resnet18", "pooling": pooling, "whitening": False, "local_whitening": False,
            "regional": False, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "outputdim": 512}
    path = _save(tmp_path, {"meta": meta, "state_dict": _prefixed("features.", features.state_dict())})
    model = pretrained.from_checkpoint("cirtorch", path).double()
    assert not hasattr(model, "preprocessing")
    images = _images(96, 160)
    with torch.no_grad():
        x = features((images - MEAN) / STD)
        if pooling == "rmac":
            expected = torch.from_numpy(np.stack([rmac_ref(m.numpy(), include_global=True) for m in x]))
        else:
            expected = F.normalize(x.amax(dim=(2, 3)) if pooling == "mac" else x.mean(dim=(2, 3)), dim=1)
        _close(model(images), expected, 1e-6)
    with pytest.raises(ValueError, match="no family 'cosplac'"):
        pretrained.from_checkpoint("cosplac", path)
