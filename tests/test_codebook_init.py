"""Descriptor sampling (bounded reservoir) and initialising the codebook heads from descriptors, incl. DDP."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aggnets import heads
from aggnets.codebook import (DescriptorReservoir, auto_alpha, fit_gmm, fit_head_codebook, fit_kmeans,
                              init_head_from_descriptors, sample_descriptors)


def clustered(n=600, c=8, k=4, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(k, c, generator=g)
    return (centres[torch.arange(n) % k] + 0.3 * torch.randn(n, c, generator=g)).double()


# ---- reservoir and sampling ---------------------------------------------------------------------------------
def test_reservoir_is_uniform_and_bounded():
    counts = torch.zeros(500)
    for seed in range(200):
        reservoir = DescriptorReservoir(50, 1, seed=seed)
        for start in range(0, 500, 23):
            reservoir.add(torch.arange(start, min(start + 23, 500)).float()[:, None])
        kept = reservoir.tensor().flatten().long()
        assert len(kept) == 50 and len(set(kept.tolist())) == 50 and reservoir.seen == 500
        counts[kept] += 1
    # each row is kept with probability 0.1: 20 expected of 200 draws, binomial sd ~4.2
    assert abs(float(counts.mean()) - 20) < 1e-9
    assert abs(float(counts[:250].mean()) - float(counts[250:].mean())) < 1.5


def test_reservoir_without_capacity_keeps_everything():
    reservoir = DescriptorReservoir(None, 3)
    reservoir.add(torch.ones(4, 3))
    reservoir.add(torch.zeros(2, 3))
    assert reservoir.tensor().shape == (6, 3)


def _maps_loader(n_images=10, c=5, h=4, w=6, batch=3, kind="tuple"):
    maps = torch.arange(n_images * c * h * w, dtype=torch.float32).view(n_images, c, h, w)
    if kind == "tensor":
        return maps, DataLoader(maps, batch_size=batch)
    if kind == "dict":
        return maps, DataLoader([{"image": m, "label": 0} for m in maps], batch_size=batch)
    return maps, DataLoader(TensorDataset(maps, torch.zeros(n_images)), batch_size=batch)


@pytest.mark.parametrize("kind", ["tuple", "tensor", "dict"])
def test_sample_descriptors_draws_real_positions(kind):
    maps, loader = _maps_loader(kind=kind)
    descriptors = sample_descriptors(nn.Identity(), loader, per_image=7, progress=False)
    assert descriptors.shape == (70, 5)
    every_position = maps.flatten(2).transpose(1, 2).reshape(-1, 5)
    matches = (descriptors[:, None, :] == every_position[None]).all(-1).sum(1)
    assert bool((matches == 1).all())  # each sampled row is one real position, none repeated
    assert len(torch.unique(descriptors, dim=0)) == 70


def test_sample_descriptors_memory_cap_and_all_positions():
    _, loader = _maps_loader()
    assert sample_descriptors(nn.Identity(), loader, per_image=None, max_descriptors=None,
                              progress=False).shape == (240, 5)
    assert sample_descriptors(nn.Identity(), loader, per_image=100, max_descriptors=50,
                              progress=False).shape == (50, 5)


def test_sample_descriptors_empty_loader():
    with pytest.raises(ValueError, match="no images"):
        sample_descriptors(nn.Identity(), DataLoader(torch.zeros(0, 3, 4, 4)), progress=False)


def test_sample_descriptors_rejects_flat_outputs():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        sample_descriptors(nn.Flatten(), DataLoader(torch.zeros(2, 3, 4, 4)), progress=False)


# ---- head initialisation ------------------------------------------------------------------------------------
def test_netvlad_distance_init_gives_softmax_of_distances():
    x = clustered()
    head = heads.NetVLAD(8, 4, normalize_input=False).double()
    summary = init_head_from_descriptors(head, x, alpha=3.0)
    c = head.centroids.detach()
    logits = head.assign(x.T[None, :, :, None])[0, :, :, 0].T
    expected = -3.0 * torch.cdist(x, c).pow(2)
    torch.testing.assert_close(logits.softmax(1), expected.softmax(1))
    assert summary["alpha"] == 3.0 and summary["scheme"] == "distance"
    reference = fit_kmeans(x, 4, seed=0)
    torch.testing.assert_close(c, reference.centroids)


def test_auto_alpha_definition():
    x = clustered().float()
    c = fit_kmeans(x, 4).centroids
    for scheme in ("distance", "cosine"):
        alpha = auto_alpha(x, c, scheme)
        scores = (x @ nn.functional.normalize(c, dim=1).T) if scheme == "cosine" else -torch.cdist(x, c).pow(2)
        top = scores.topk(2, dim=1).values
        assert alpha * float((top[:, 0] - top[:, 1]).double().mean()) == pytest.approx(math.log(100), rel=1e-4)


def test_netvlad_cosine_init_matches_pytorch_netvlad_scheme():
    x = clustered().float()
    head = heads.NetVLAD(8, 4)
    summary = init_head_from_descriptors(head, x, scheme="cosine")
    unit_x = nn.functional.normalize(x, dim=1)
    c = fit_kmeans(unit_x, 4, seed=0).centroids
    alpha = auto_alpha(unit_x, c, "cosine")
    assert summary["alpha"] == pytest.approx(alpha)
    torch.testing.assert_close(head.assign_weight, alpha * nn.functional.normalize(c, dim=1))
    torch.testing.assert_close(head.assign.bias, torch.zeros(4))


def test_sharp_netvlad_init_approaches_vlad():
    x = clustered(c=8)
    maps = x[:120].T.reshape(1, 8, 10, 12)
    netvlad = heads.NetVLAD(8, 4, normalize_input=False).double()
    init_head_from_descriptors(netvlad, x, alpha=1e4)
    vlad = heads.VLAD(8, 4, intra_norm=True).double()
    init_head_from_descriptors(vlad, x)
    assert vlad.assignment == "hard" and not any(p.requires_grad for p in vlad.parameters())
    torch.testing.assert_close(netvlad(maps), vlad(maps), rtol=1e-6, atol=1e-6)


def test_bof_and_netbof_init():
    x = clustered().float()
    bof = heads.BoF(8, 4)
    init_head_from_descriptors(bof, x)
    maps = x[:24].T.reshape(1, 8, 4, 6)
    labels = torch.cdist(x[:24], fit_kmeans(x, 4).centroids).argmin(1)
    torch.testing.assert_close(bof(maps)[0], torch.bincount(labels, minlength=4).float() / 24)
    netbof = heads.NetBoF(8, 4)
    summary = netbof.init_from_descriptors(x)
    assert math.isfinite(summary["alpha"]) and summary["alpha"] > 0
    torch.testing.assert_close(netbof(maps).sum(), torch.tensor(1.0))


@pytest.mark.parametrize("cls", [heads.NetFV, heads.FisherVector])
def test_fisher_heads_init_from_gmm(cls):
    x = clustered().float()
    head = cls(8, 4)
    summary = head.init_from_descriptors(x, iters=20)
    gmm = fit_gmm(x, 4, iters=20, seed=0)
    torch.testing.assert_close(head.means.detach(), gmm.means)
    torch.testing.assert_close(head.weights.detach(), gmm.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.variances.detach(), gmm.variances, rtol=1e-5, atol=1e-6)
    assert summary["log_likelihood"] == pytest.approx(gmm.log_likelihood)
    assert head.means.requires_grad == (cls is heads.NetFV)


def test_netfv_with_a_kmeans_only_engine_starts_em_from_it():
    pytest.importorskip("faiss")
    x = clustered().float()
    head = heads.NetFV(8, 4)
    summary = head.init_from_descriptors(x, engine="faiss", iters=20)
    start = fit_kmeans(x, 4, engine="faiss", seed=0)
    gmm = fit_gmm(x, 4, init=start, iters=20, seed=0)
    assert summary["engine"] == "torch"
    torch.testing.assert_close(head.means.detach(), gmm.means)


def test_pyramid_delegates_to_its_codebook_head():
    x = clustered().float()
    pyramid = heads.SpatialPyramid(heads.BoF(8, 4), levels=(1, 2))
    pyramid.init_from_descriptors(x)
    torch.testing.assert_close(pyramid.head.assign.bias.detach(), -fit_kmeans(x, 4).centroids.pow(2).sum(1))


def test_init_bad_inputs():
    with pytest.raises(ValueError, match=r"descriptors must have shape \(N, 8\)"):
        init_head_from_descriptors(heads.NetVLAD(8, 4), torch.randn(50, 7))
    with pytest.raises(TypeError, match="no codebook"):
        init_head_from_descriptors(heads.GeM(8), torch.randn(50, 8))
    with pytest.raises(ValueError, match="larger than the number of descriptors"):
        heads.NetVLAD(8, 64).init_from_descriptors(torch.randn(10, 8))
    bad = torch.randn(50, 8)
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan|finite"):
        heads.NetVLAD(8, 4, normalize_input=False).init_from_descriptors(bad)


def test_fit_head_codebook_end_to_end():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU())
    images = torch.rand(12, 3, 17, 17)
    head = heads.NetVLAD(6, 5)
    summary = fit_head_codebook(head, backbone, DataLoader(images, batch_size=4), per_image=20, progress=False)
    assert summary["descriptors"] == 12 * 20 and summary["alpha"] > 0
    assert head(backbone(images)).isfinite().all()


# ---- DDP: two gloo processes, each sampling its own shard, end with the same codebook ----------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU())  # same weights on both ranks (seed)
        images = torch.rand(16, 3, 17, 17, generator=torch.Generator().manual_seed(1))
        loader = DataLoader(images, batch_size=2)  # no DistributedSampler: batches are split by rank
        netvlad, netfv = heads.NetVLAD(6, 4), heads.NetFV(6, 3)
        fit_head_codebook(netvlad, backbone, loader, per_image=30, progress=False)
        fit_head_codebook(netfv, backbone, loader, per_image=30, progress=False, iters=10)
        shard = sample_descriptors(backbone, loader, per_image=30, progress=False)
        torch.save({"netvlad": netvlad.state_dict(), "netfv": netfv.state_dict(), "shard": shard},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_end_with_the_same_codebook(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["shard"], r1["shard"])  # each rank saw different images
    assert len(r0["shard"]) == len(r1["shard"]) == 8 * 30
    for head in ("netvlad", "netfv"):
        for key, value in r0[head].items():
            torch.testing.assert_close(value, r1[head][key], rtol=0, atol=0, msg=f"{head}.{key} differs")
