"""AnyLoc (Keetha et al., RA-L 2023) as a recipe: the value facet of a DINOv2 block, a cosine k-means vocabulary and
hard VLAD by cosine similarity. Checked against AnyLoc's algorithm written here in NumPy (AnyLoc/AnyLoc utilities.py
``VLAD``: descriptors L2-normalised, labels = arg-max cosine similarity to the centroids, per used cluster the sum of
residuals to its centroid, intra-normalised, the whole vector L2-normalised; the vocabulary by cosine k-means whose
centroids are plain means), then the experiment configs on a random ViT, end to end through scripts/extract.py's
code."""
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from aggnets.codebook import assign_nearest, fit_kmeans, init_head_from_descriptors
from aggnets.heads import VLAD
from aggnets_train.retrieval_run import build_embedder, run_extract
from tests.test_retrieval_scripts import CONF

DT = torch.float64


def anyloc_vlad(descriptors, centroids):
    """AnyLoc's hard VLAD of one image's descriptors (n, C) with its centroids (K, C)."""
    x = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True)
    c = centroids
    labels = np.argmax(x @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T, axis=1)
    out = np.zeros((len(c), x.shape[1]))
    for k in set(labels.tolist()):
        total = (x[labels == k] - c[k]).sum(axis=0)
        out[k] = total / np.linalg.norm(total)
    v = out.reshape(-1)
    return v / np.linalg.norm(v)


def cosine_kmeans(x, start, iters):
    """Lloyd's iterations with cosine assignments and mean centroids (fast_pytorch_kmeans' cosine mode)."""
    c = start.copy()
    for _ in range(iters):
        labels = np.argmax(x @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T, axis=1)
        c = np.stack([x[labels == k].mean(axis=0) if (labels == k).any() else c[k] for k in range(len(c))])
    return c


def _clustered(n=400, C=6, K=5, seed=0):
    gen = np.random.default_rng(seed)
    directions = gen.normal(size=(K, C))
    x = directions[gen.integers(K, size=n)] + 0.6 * gen.normal(size=(n, C))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cosine_kmeans_is_lloyd_with_cosine_assignments_and_mean_centroids():
    x = _clustered()
    start = x[[3, 50, 100, 150, 200]]
    ours = fit_kmeans(torch.from_numpy(x), 5, init=torch.from_numpy(start), iters=8, tol=0.0,
                      max_points_per_centroid=None, metric="cosine")
    expected = cosine_kmeans(x, start, ours.n_iter)
    np.testing.assert_allclose(ours.centroids.numpy(), expected, rtol=0, atol=1e-12)
    assert (np.linalg.norm(expected, axis=1) < 1 - 1e-3).all()  # means of unit vectors: not renormalised
    euclidean = fit_kmeans(torch.from_numpy(x), 5, init=torch.from_numpy(start), iters=8, tol=0.0,
                           max_points_per_centroid=None)
    assert not np.allclose(euclidean.centroids.numpy(), expected)
    labels = assign_nearest(torch.from_numpy(x), torch.from_numpy(expected), metric="cosine").numpy()
    np.testing.assert_array_equal(labels, np.argmax(x @ (expected / np.linalg.norm(expected, axis=1)[:, None]).T, 1))
    with pytest.raises(ValueError, match="torch engine only"):
        fit_kmeans(torch.from_numpy(x), 5, engine="sklearn", metric="cosine")
    with pytest.raises(ValueError, match="metric must be one of"):
        fit_kmeans(torch.from_numpy(x), 5, metric="manhattan")


def test_cosine_vlad_is_anylocs_vlad():
    gen = torch.Generator().manual_seed(0)
    centroids = 0.5 * torch.randn(6, 5, generator=gen, dtype=DT)
    centroids[2] *= 3  # norms that differ a lot: the cosine and Euclidean nearest centroids disagree
    head = VLAD.from_centroids(centroids, normalize_input=True, intra_norm=True, metric="cosine")
    x = torch.randn(3, 5, 4, 6, generator=gen, dtype=DT)
    expected = np.stack([anyloc_vlad(image.reshape(5, -1).T.numpy(), centroids.numpy()) for image in x])
    np.testing.assert_allclose(head(x).numpy(), expected, rtol=0, atol=1e-12)
    euclidean = VLAD.from_centroids(centroids, normalize_input=True, intra_norm=True)
    assert not np.allclose(euclidean(x).numpy(), expected)
    mask = torch.zeros(3, 4, 6, dtype=torch.bool)
    mask[:, 1:, 2:] = True
    valid = np.stack([anyloc_vlad(image[:, 1:, 2:].reshape(5, -1).T.numpy(), centroids.numpy()) for image in x])
    np.testing.assert_allclose(head(x, mask).numpy(), valid, rtol=0, atol=1e-12)
    assert "metric='cosine'" in repr(head)
    with pytest.raises(ValueError, match="metric"):
        VLAD(5, 3, metric="l1")


def test_the_codebook_fit_follows_the_metric():
    x = torch.from_numpy(_clustered(C=5))
    head = VLAD(5, 4, normalize_input=True, intra_norm=True, metric="cosine").double()
    summary = init_head_from_descriptors(head, x, seed=3)
    assert summary["scheme"] == "cosine" and summary["alpha"] == float("inf")
    # the head normalises its input, so the fit sees the (float32) unit descriptors
    fitted = fit_kmeans(torch.nn.functional.normalize(x.float(), dim=1), 4, seed=3, metric="cosine").centroids
    torch.testing.assert_close(head.centroids.detach(), fitted.to(DT))
    unit = torch.nn.functional.normalize(fitted.to(DT), dim=1)
    torch.testing.assert_close(head.assign_weight.detach(), unit)
    torch.testing.assert_close(head.assign.bias.detach(), torch.zeros(4, dtype=DT))


def _compose(name, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("experiment, model, layer", [("anyloc_dinov2", "timm:vit_giant_patch14_dinov2", 31),
                                                      ("anyloc_dinov2_vitb14", "timm:vit_base_patch14_dinov2", 10),
                                                      ("anyloc_dinov2_vits14", "timm:vit_small_patch14_dinov2", 10)])
@pytest.mark.parametrize("config", ["train", "extract", "evaluate"])
def test_the_experiments_are_the_papers_setting(experiment, model, layer, config):
    cfg = _compose(config, f"experiment={experiment}")
    assert (cfg.backbone.name, cfg.backbone.layer, cfg.backbone.facet, cfg.backbone.norm, cfg.backbone.freeze) == (
        model, f"blocks.{layer}", "value", False, True)
    assert cfg.head._target_ == "aggnets.heads.VLAD" and cfg.head.num_clusters == 32
    assert (cfg.head.normalize_input, cfg.head.intra_norm, cfg.head.metric) == (True, True, "cosine")


def test_extract_runs_anyloc_on_a_random_vit(tmp_path):
    """scripts/extract.py's code with experiment=anyloc_dinov2_vits14 on a tiny random ViT: the vocabulary fitted by
    cosine k-means on the images' value-facet descriptors, then each image's descriptor is AnyLoc's VLAD of them."""
    images = tmp_path / "images"
    images.mkdir()
    gen = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(gen.integers(0, 256, size=(70, 84, 3), dtype=np.uint8)).save(images / f"{i}.png")
    small = ["backbone.weights=null", "backbone.model_kwargs={embed_dim: 24, depth: 2, num_heads: 2}",
             "backbone.layer=blocks.1", "head.num_clusters=4", "codebook.per_image=30", "extraction.max_size=84"]
    cfg = _compose("extract", "experiment=anyloc_dinov2_vits14", f"images={images}",
                   f"output={tmp_path / 'd.npy'}", *small)
    torch.manual_seed(0)
    run_extract(cfg)
    descriptors = np.load(tmp_path / "d.npy")
    assert descriptors.shape == (4, 4 * 24)
    # the same model, its vocabulary refitted the same way, and AnyLoc's VLAD of the value facet written out here
    torch.manual_seed(0)
    embedder, _ = build_embedder(cfg)
    vit = embedder.backbone
    assert (vit.facet, vit.norm, vit.layer, vit.out_channels) == ("value", False, "blocks.1", 24)
    from aggnets_train.retrieval_run import _fit_codebooks
    _fit_codebooks(embedder, sorted(str(p) for p in images.iterdir()), cfg)
    centroids = embedder.head.centroids.detach().double().numpy()
    for i in range(4):
        image = torch.from_numpy(np.array(Image.open(images / f"{i}.png"))).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            values = vit(image)[0].double()                       # (C, 5, 6): the value facet of block 1
        expected = anyloc_vlad(values.reshape(24, -1).T.numpy(), centroids)
        np.testing.assert_allclose(descriptors[i], expected, rtol=0, atol=2e-5)
