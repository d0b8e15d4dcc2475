"""An aggnets head dropped into a model that is not ours: trains, gradients reach the head, state_dict round trip."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from aggnets.convert import load_head_state
from aggnets.data import MotifDataset
from aggnets.heads import GeM, NetVLAD


class TinyCNN(nn.Module):
    """Somebody else's backbone: 3 x 32 x 32 image -> 16 x 8 x 8 feature map."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))

    def forward(self, x):
        return self.body(x)


class MyModel(nn.Module):
    def __init__(self, backbone, head, num_classes, scale=1.0):
        super().__init__()
        self.backbone, self.pool, self.scale = backbone, head, scale
        self.fc = nn.Linear(head.out_dim, num_classes)

    def forward(self, images):
        # NetVLAD's output is unit-norm: a fixed scale (a temperature) keeps the classifier's logits useful
        return self.fc(self.scale * self.pool(self.backbone(images)))


HEADS = {"netvlad": lambda c: NetVLAD(c, num_clusters=8), "gem": lambda c: GeM(c)}
SCALE = {"netvlad": 10.0, "gem": 1.0}


@pytest.fixture(scope="module")
def batch():
    data = MotifDataset("train", size=64, image_size=32)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.as_tensor([data[i][1] for i in range(len(data))])
    return images, labels, data.num_classes


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_in_a_foreign_model_trains(name, batch):
    torch.manual_seed(0)
    images, labels, num_classes = batch
    model = MyModel(TinyCNN(), HEADS[name](16), num_classes, SCALE[name])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = {k: v.detach().clone() for k, v in model.pool.named_parameters()}
    losses = []
    model.train()
    for _ in range(12):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        for k, p in model.pool.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, k
        opt.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < losses[0] - 0.05, losses
    for k, p in model.pool.named_parameters():
        assert not torch.equal(p.detach(), before[k]), f"head parameter {k} did not move"

    # state_dict round trip: the whole model, and the head alone via the prefix
    model.eval()
    fresh = MyModel(TinyCNN(), HEADS[name](16), num_classes, SCALE[name]).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(images[:8]), model(images[:8]), rtol=0, atol=0)
    head = HEADS[name](16)
    load_head_state(head, model.state_dict(), prefix="pool.")
    feats = model.backbone(images[:4]).detach()
    torch.testing.assert_close(head(feats), model.pool(feats), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_on_torchvision_resnet(name):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    trunk = nn.Sequential(*list(tv.models.resnet18(weights=None).children())[:-2])     # (B, 512, H/32, W/32)
    model = MyModel(trunk, HEADS[name](512), 5)
    out = model(torch.rand(2, 3, 64, 96))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.pool.parameters())
    assert trunk[0].weight.grad is not None
