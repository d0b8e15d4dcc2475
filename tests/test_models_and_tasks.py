"""aggnets.models (Embedder, Classifier) and the task pieces that are not Lightning plumbing: retrieval metrics against
a hand computation, the optimiser's parameter groups, the scheduler's filled-in step count."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from aggnets import Classifier, Embedder
from aggnets.heads import GeM, NetVLAD
from aggnets_train.tasks import ClassificationTask, retrieval_metrics


class TinyBackbone(nn.Module):
    out_channels = 6

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def test_embedder_builds_the_head_from_a_factory_and_normalises():
    embedder = Embedder(TinyBackbone(), functools.partial(NetVLAD, num_clusters=4), projection_dim=5)
    assert embedder.head.in_channels == 6 and embedder.out_dim == 5
    out = embedder(torch.rand(3, 3, 16, 16))
    assert out.shape == (3, 5)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    raw = Embedder(TinyBackbone(), GeM(6), normalize=False)
    assert raw.out_dim == 6 and not torch.allclose(raw(torch.rand(2, 3, 8, 8)).norm(dim=1), torch.ones(2))


def test_embedder_rejects_a_head_for_other_channels_and_bad_backbones():
    with pytest.raises(ValueError, match="head expects 8 channels but the backbone .* gives 6"):
        Embedder(TinyBackbone(), GeM(8))
    with pytest.raises(TypeError, match="out_channels"):
        Embedder(nn.Identity(), GeM(4))
    with pytest.raises(ValueError, match="projection_dim"):
        Embedder(TinyBackbone(), GeM(6), projection_dim=0)


def test_classifier_logits_and_errors():
    classifier = Classifier(Embedder(TinyBackbone(), GeM(6), normalize=False), num_classes=3)
    assert classifier(torch.rand(4, 3, 8, 8)).shape == (4, 3)
    with pytest.raises(ValueError, match="num_classes"):
        Classifier(Embedder(TinyBackbone(), GeM(6)), num_classes=1)


def average_precision(ranked_relevance: list[bool]) -> float:
    hits, total = 0, 0.0
    for rank, relevant in enumerate(ranked_relevance, start=1):
        if relevant:
            hits += 1
            total += hits / rank
    return total / max(hits, 1)


def test_retrieval_metrics_match_a_hand_computation():
    # 1-D embeddings on the unit circle: angles decide the ranking
    angles = torch.tensor([0.0, 0.3, 1.0, 1.2, 2.5])
    embeddings = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 0, 1, 2])  # item 4 has no positive: skipped
    scores = embeddings @ embeddings.T
    aps, hits1, hits2 = [], [], []
    for q in range(4):
        others = [j for j in range(5) if j != q]
        ranked = sorted(others, key=lambda j: -float(scores[q, j]))
        relevance = [bool(labels[j] == labels[q]) for j in ranked]
        aps.append(average_precision(relevance))
        hits1.append(any(relevance[:1]))
        hits2.append(any(relevance[:2]))
    metrics = retrieval_metrics(embeddings, labels, ks=(1, 2))
    assert math.isclose(float(metrics["mAP"]), sum(aps) / 4, rel_tol=1e-6)
    assert math.isclose(float(metrics["recall@1"]), sum(hits1) / 4, rel_tol=1e-6)
    assert math.isclose(float(metrics["recall@2"]), sum(hits2) / 4, rel_tol=1e-6)
    assert float(metrics["recall@1"]) < 1.0 < 1.0 + float(metrics["mAP"])


def _task(backbone_lr):
    return ClassificationTask(TinyBackbone(), GeM(6), num_classes=3, backbone_lr=backbone_lr,
                              optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
                              scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, pct_start=0.2))


class _FakeTrainer:
    estimated_stepping_batches = 37


def test_two_learning_rates_and_a_filled_in_schedule(monkeypatch):
    task = _task(backbone_lr=1e-4)
    monkeypatch.setattr(ClassificationTask, "trainer", _FakeTrainer(), raising=False)
    config = task.configure_optimizers()
    groups = {g["name"]: g for g in config["optimizer"].param_groups}
    assert set(groups) == {"head", "backbone"}
    backbone_ids = {id(p) for p in task.embedder.backbone.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone_ids
    assert not backbone_ids & {id(p) for p in groups["head"]["params"]}
    scheduler = config["lr_scheduler"]["scheduler"]
    assert scheduler.total_steps == 37 and config["lr_scheduler"]["interval"] == "step"
    assert [g["max_lr"] for g in config["optimizer"].param_groups] == [1e-2, 1e-4]


def test_backbone_lr_zero_leaves_the_backbone_out(monkeypatch):
    task = _task(backbone_lr=0)
    monkeypatch.setattr(ClassificationTask, "trainer", _FakeTrainer(), raising=False)
    groups = task.configure_optimizers()["optimizer"].param_groups
    assert [g["name"] for g in groups] == ["head"]
