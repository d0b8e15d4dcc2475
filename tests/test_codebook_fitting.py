"""Codebook fitting (aggnets.codebook): k-means and diagonal-GMM engines against scikit-learn and against
independent NumPy float64 references written here (Lloyd step, EM step, log-likelihood); chunking, empty clusters,
bad inputs, and data-parallel agreement over two gloo processes."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aggnets.codebook import (GMMResult, KMeansResult, assign_nearest, fit_gmm, fit_kmeans, gmm_log_likelihood,
                              kmeans_inertia)

# local (not tests.conftest's): the spawned DDP workers import this module, keep that import light
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def KMeans(*args, **kwargs):  # noqa: N802 - scikit-learn imported lazily, for the same reason
    return pytest.importorskip("sklearn.cluster").KMeans(*args, **kwargs)


def GaussianMixture(*args, **kwargs):  # noqa: N802
    return pytest.importorskip("sklearn.mixture").GaussianMixture(*args, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The sets here are tiny: one thread per library avoids paying OpenMP / BLAS synchronisation on a busy machine."""
    from threadpoolctl import threadpool_limits

    faiss = None
    try:
        import faiss
    except ImportError:
        pass
    torch_threads = torch.get_num_threads()
    faiss_threads = faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(1)
    if faiss:
        faiss.omp_set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(torch_threads)
    if faiss:
        faiss.omp_set_num_threads(faiss_threads)


def clustered(n=1500, c=8, centers=12, seed=0, dtype=np.float32) -> np.ndarray:
    """Anisotropic Gaussian blobs passed through a ReLU (non-negative, exact zeros), like CNN features."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.5, 1.5, (centers, c))
    scales = rng.uniform(0.1, 0.6, (centers, c))
    label = rng.integers(centers, size=n)
    return np.maximum(means[label] + scales[label] * rng.standard_normal((n, c)), 0).astype(dtype)


# --- independent NumPy float64 references ------------------------------------------------------------------------

def np_assign(x, c):
    d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    return d.argmin(1), d.min(1)


def np_lloyd_step(x, c):
    label, _ = np_assign(x, c)
    new = c.copy()
    for k in range(len(c)):
        if (label == k).any():
            new[k] = x[label == k].mean(0)
    return new


def np_log_joint(x, w, m, v):
    """log w_k N(x_n; m_k, diag v_k), (N, K), directly from the density."""
    return np.log(w)[None] - 0.5 * (np.log(2 * np.pi * v)[None] + (x[:, None] - m[None]) ** 2 / v[None]).sum(-1)


def np_mean_ll(x, w, m, v):
    lj = np_log_joint(x, w, m, v)
    top = lj.max(1, keepdims=True)
    return float((top[:, 0] + np.log(np.exp(lj - top).sum(1))).mean())


def np_m_step(x, resp, reg):
    nk = resp.sum(0) + 10 * np.finfo(np.float64).eps
    means = resp.T @ x / nk[:, None]
    variances = np.stack([(resp[:, k:k + 1] * (x - means[k]) ** 2).sum(0) / nk[k] for k in range(len(nk))]) + reg
    return nk / nk.sum(), means, variances


def np_em_step(x, w, m, v, reg):
    lj = np_log_joint(x, w, m, v)
    resp = np.exp(lj - lj.max(1, keepdims=True))
    return np_m_step(x, resp / resp.sum(1, keepdims=True), reg)


def np_gmm_start(x, centroids, reg):
    """The EM start: one M-step from the one-hot k-means assignment."""
    label, _ = np_assign(x, centroids)
    return np_m_step(x, np.eye(len(centroids))[label], reg)


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(torch.as_tensor(a).double()), np.asarray(b, dtype=np.float64), rtol=rtol,
                               atol=atol)


# --- k-means ------------------------------------------------------------------------------------------------------

def smooth(n=2000, c=8, seed=0) -> np.ndarray:
    """A ReLU'd correlated Gaussian: no well-separated blobs, so k-means optima from different seeds are close."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(c, c)) / np.sqrt(c)
    return np.maximum(2 * rng.standard_normal((n, c)) @ mixing + 0.3, 0).astype(np.float32)


def test_kmeans_from_same_start_matches_sklearn():
    x = clustered()
    c0 = x[np.random.default_rng(1).choice(len(x), 8, replace=False)]
    reference = KMeans(8, init=c0.astype(np.float64), n_init=1, tol=0).fit(x.astype(np.float64)).inertia_ / len(x)
    ours = fit_kmeans(x, 8, init=torch.from_numpy(c0), iters=300, tol=0, max_points_per_centroid=None)
    assert isinstance(ours, KMeansResult) and ours.engine == "torch"
    assert ours.inertia == pytest.approx(reference, rel=1e-4)


def test_kmeans_inertia_within_1pct_of_sklearn_and_engines_agree():
    """Best of 5 seeds against scikit-learn's KMeans(n_init=5): single runs of any k-means (scikit-learn's
    included) land a few % apart on this set, the best of a few agree."""
    x, k = smooth(), 16
    reference = KMeans(k, n_init=5, random_state=0).fit(x.astype(np.float64)).inertia_ / len(x)
    for engine, tol in (("torch", 0.01), ("faiss", 0.01), ("sklearn-full", 0.01), ("sklearn", 0.07)):
        if engine == "faiss":
            pytest.importorskip("faiss")
        runs = [fit_kmeans(x, k, engine=engine, seed=seed, iters=100, max_points_per_centroid=None)
                for seed in range(5)]
        for r in runs:
            assert r.engine == engine and r.centroids.shape == (k, 8) and int(r.counts.sum()) == len(x)
            assert r.inertia == pytest.approx(kmeans_inertia(x, r.centroids), rel=1e-9)
        assert min(r.inertia for r in runs) <= reference * (1 + tol), engine
    for seed in range(2):
        assert fit_kmeans(x, k, init="kmeans++", seed=seed, max_points_per_centroid=None).inertia <= reference * 1.05


def test_one_lloyd_step_equals_numpy_reference():
    x = clustered(400, 5, seed=1)
    c0 = x[np.random.default_rng(2).choice(len(x), 7, replace=False)].astype(np.float64)
    expected = np_lloyd_step(x.astype(np.float64), c0)
    for data, tol in ((x, 1e-5), (x.astype(np.float64), 1e-12)):
        r = fit_kmeans(data, 7, init=torch.from_numpy(c0), iters=1, max_points_per_centroid=None)
        assert r.n_iter == 1 and r.centroids.dtype == (torch.float64 if data.dtype == np.float64 else torch.float32)
        close(r.centroids, expected, rtol=tol, atol=tol)
        label, dist2 = np_assign(x.astype(np.float64), expected)
        close(r.inertia, dist2.mean(), rtol=max(tol, 1e-12))
        close(r.counts, np.bincount(label, minlength=7), rtol=0, atol=0)
        assert torch.equal(assign_nearest(data, r.centroids), torch.from_numpy(label))


def test_kmeans_chunked_equals_unchunked():
    x = clustered(600, 6, seed=3)
    c0 = torch.from_numpy(x[:9].copy())
    a = fit_kmeans(x, 9, init=c0, iters=8, tol=0, max_points_per_centroid=None)
    b = fit_kmeans(x, 9, init=c0, iters=8, tol=0, max_points_per_centroid=None, chunk_size=7)
    close(a.centroids, b.centroids.numpy(), rtol=1e-5, atol=1e-6)
    assert torch.equal(a.counts, b.counts) and a.n_iter == b.n_iter
    close(a.inertia, b.inertia, rtol=1e-6)
    close(kmeans_inertia(x, a.centroids), kmeans_inertia(x, a.centroids, chunk_size=5), rtol=1e-9)


def test_kmeans_subsample_rule_and_determinism():
    x = clustered(3000, 6, seed=4)
    a = fit_kmeans(x, 4, max_points_per_centroid=50, seed=5)  # iterates on 200 of the 3000 descriptors
    b = fit_kmeans(x, 4, max_points_per_centroid=50, seed=5)
    assert torch.equal(a.centroids, b.centroids)
    assert int(a.counts.sum()) == 3000  # inertia and counts are over all descriptors
    close(a.inertia, kmeans_inertia(x, a.centroids), rtol=1e-9)
    full = fit_kmeans(x, 4, max_points_per_centroid=None, seed=5)
    assert a.inertia <= 1.1 * full.inertia


@pytest.mark.parametrize("case", ["duplicates", "k_equals_n_with_duplicates", "k_equals_n"])
def test_empty_clusters_give_distinct_finite_centroids(case):
    rng = np.random.default_rng(6)
    if case == "duplicates":
        x, k = np.repeat(rng.random((10, 4)), 5, axis=0).astype(np.float32), 20
    elif case == "k_equals_n_with_duplicates":
        x, k = np.repeat(rng.random((3, 4)), 4, axis=0).astype(np.float32), 12
    else:
        x, k = rng.random((30, 4)).astype(np.float32), 30
    for init in ("random", "kmeans++"):
        r = fit_kmeans(x, k, init=init, max_points_per_centroid=None)
        c = r.centroids
        assert c.shape == (k, 4) and bool(torch.isfinite(c).all())
        assert bool((torch.cdist(c.double(), c.double()) + torch.eye(k, dtype=torch.float64) > 0).all())
        assert int(r.counts.sum()) == len(x)
        if case == "k_equals_n" and init == "random":
            assert r.inertia == pytest.approx(0.0, abs=1e-6)  # float32 round-off of ||x||^2 - 2 x.c + ||c||^2


# --- GMM --------------------------------------------------------------------------------------------------------

def _gmm_data():
    x = clustered(1200, 6, centers=8, seed=7)
    km = fit_kmeans(x, 5, init="kmeans++", iters=50, max_points_per_centroid=None, seed=1)
    return x, km


def test_gmm_history_non_decreasing_and_constraints():
    x, km = _gmm_data()
    r = fit_gmm(x, 5, init=km, iters=60, tol=1e-8, reg_covar=1e-3)
    assert isinstance(r, GMMResult) and len(r.history) == r.n_iter >= 2
    assert all(b >= a - 1e-5 * abs(a) for a, b in zip(r.history, r.history[1:]))
    assert r.log_likelihood == pytest.approx(r.history[-1], rel=1e-12)
    assert float(r.weights.sum()) == pytest.approx(1.0, abs=1e-6) and bool((r.weights > 0).all())
    assert bool((r.variances >= 1e-3 * (1 - 1e-6)).all())
    assert r.weights.dtype == r.means.dtype == r.variances.dtype == torch.float32
    close(r.log_likelihood, gmm_log_likelihood(x, r.weights, r.means, r.variances), rtol=1e-6)


def test_gmm_within_half_percent_of_sklearn_from_same_start():
    x, km = _gmm_data()
    x64 = x.astype(np.float64)
    w0, m0, v0 = np_gmm_start(x64, km.centroids.double().numpy(), 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = GaussianMixture(5, covariance_type="diag", max_iter=100, tol=1e-3, weights_init=w0, means_init=m0,
                             precisions_init=1 / v0, init_params="random_from_data").fit(x64)
    sk_ll = np_mean_ll(x64, sk.weights_, sk.means_, sk.covariances_)
    ours = fit_gmm(x, 5, init=km, iters=100, tol=1e-3)
    assert abs(ours.log_likelihood - sk_ll) <= 0.005 * abs(sk_ll)
    close(ours.log_likelihood, np_mean_ll(x64, *(t.double().numpy() for t in (ours.weights, ours.means,
                                                                               ours.variances))), rtol=1e-5)
    wrapped = fit_gmm(x, 5, engine="sklearn", init=km)  # the same start through the engine switch
    assert wrapped.engine == "sklearn" and abs(wrapped.log_likelihood - sk_ll) <= 0.005 * abs(sk_ll)


def test_one_em_step_equals_numpy_reference():
    x, km = _gmm_data()
    x64 = x.astype(np.float64)
    start = np_gmm_start(x64, km.centroids.double().numpy(), 1e-4)
    expected = np_em_step(x64, *start, 1e-4)
    for data, tol in ((x, 2e-4), (x64, 1e-9)):
        r = fit_gmm(data, 5, init=km, iters=1, tol=-1, reg_covar=1e-4)
        assert r.n_iter == 1 and not r.converged and len(r.history) == 1
        for got, want in zip((r.weights, r.means, r.variances), expected):
            close(got, want, rtol=tol, atol=tol)
        close(r.log_likelihood, np_mean_ll(x64, *expected), rtol=tol)


def test_gmm_degenerate_data_floors_variances():
    x = clustered(300, 5, seed=8)
    x[:, 2] = 0.0  # a dimension without variance
    x[:40] = x[0]  # a block of identical descriptors
    r = fit_gmm(x, 6, iters=30, reg_covar=1e-4)
    assert bool(torch.isfinite(r.means).all() and torch.isfinite(r.variances).all())
    assert bool((r.variances >= 1e-4 * (1 - 1e-6)).all())
    assert float(r.weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert np.isfinite(r.log_likelihood)


def test_gmm_chunked_equals_unchunked():
    x, km = _gmm_data()
    a = fit_gmm(x, 5, init=km, iters=6, tol=-1)
    b = fit_gmm(x, 5, init=km, iters=6, tol=-1, chunk_size=5)
    for u, v in zip((a.weights, a.means, a.variances), (b.weights, b.means, b.variances)):
        close(u, v.numpy(), rtol=1e-4, atol=1e-5)
    close(a.history, np.array(b.history), rtol=1e-5)


def test_gmm_default_start_and_progress_bar(capsys):
    x = clustered(500, 4, seed=9)
    r = fit_gmm(torch.from_numpy(x), 3, iters=5, progress=True)
    assert r.n_iter <= 5 and r.seconds > 0 and np.isfinite(r.log_likelihood)
    k = fit_kmeans(x, 3, iters=5, progress=True)
    assert k.n_iter <= 5


# --- bad inputs -----------------------------------------------------------------------------------------------

FITS = {"kmeans": fit_kmeans, "gmm": fit_gmm}


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_bad_inputs(fit):
    good = clustered(20, 3)
    with pytest.raises(ValueError, match=r"k=25 is larger than the number of descriptors N=20"):
        fit(good, 25)
    nan = good.copy()
    nan[3, 1] = np.nan
    nan[5, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\) \(NaN or Inf\)"):
        fit(nan, 3)
    with pytest.raises(ValueError, match=r"empty"):
        fit(np.zeros((0, 3), np.float32), 1)
    with pytest.raises(ValueError, match=r"must be 2-D \(N, C\), got 1-D"):
        fit(good[:, 0], 2)
    with pytest.raises(ValueError, match=r"unknown .* engine 'nope'; valid engines: torch"):
        fit(good, 2, engine="nope")
    with pytest.raises(ValueError, match=r"k must be a positive int"):
        fit(good, 0)
    with pytest.raises(TypeError, match=r"floating point"):
        fit(good.astype(np.int64), 2)
    with pytest.raises(RuntimeError, match=r"torch.distributed is not initialised"):
        fit(good, 2, distributed=True)


def test_bad_init_and_helpers():
    good = clustered(20, 3)
    with pytest.raises(ValueError, match=r"init must have shape \(k, C\) = \(2, 3\)"):
        fit_kmeans(good, 2, init=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"init must be 'kmeans\+\+', 'random'"):
        fit_kmeans(good, 2, init="first")
    with pytest.raises(TypeError, match=r"KMeansResult"):
        fit_gmm(good, 2, init=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"non-finite"):
        kmeans_inertia(np.full((4, 3), np.nan, np.float32), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"centroids must have shape \(K, C=3\)"):
        assign_nearest(good, torch.zeros(2, 4))


# --- data-parallel agreement (two gloo processes, each with its own shard) ------------------------------------

K_DDP = 4


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, x: torch.Tensor, c0: torch.Tensor) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = x[:700] if rank == 0 else x[700:]  # different shards of different sizes
        km = fit_kmeans(shard, K_DDP, init=c0, iters=6, tol=0, max_points_per_centroid=None)
        auto = fit_kmeans(shard, K_DDP, max_points_per_centroid=40, seed=3)  # rank 0 seeds, subsample per rank
        gmm = fit_gmm(shard, K_DDP, init=km, iters=4, tol=-1)
        torch.save({"km": km, "auto": auto, "gmm": gmm}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_two_ranks_agree_with_single_process(tmp_path):
    x = torch.from_numpy(clustered(1200, 5, seed=10))
    c0 = x[torch.randperm(1200, generator=torch.Generator().manual_seed(0))[:K_DDP]].clone()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), x, c0), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for key in ("km", "auto", "gmm"):
        a, b = r0[key], r1[key]
        tensors = ("centroids", "counts") if key != "gmm" else ("weights", "means", "variances")
        assert all(torch.equal(getattr(a, t), getattr(b, t)) for t in tensors), key
    assert int(r0["auto"].counts.sum()) == 1200
    single = fit_kmeans(x, K_DDP, init=c0, iters=6, tol=0, max_points_per_centroid=None)
    close(r0["km"].centroids, single.centroids.numpy(), rtol=1e-5, atol=1e-5)
    assert torch.equal(r0["km"].counts, single.counts)
    close(r0["km"].inertia, single.inertia, rtol=1e-6)
    gmm = fit_gmm(x, K_DDP, init=single, iters=4, tol=-1)
    for t in ("weights", "means", "variances"):
        close(getattr(r0["gmm"], t), getattr(gmm, t).numpy(), rtol=1e-5, atol=1e-5)
    close(r0["gmm"].history, np.array(gmm.history), rtol=1e-6)


# --- CUDA -----------------------------------------------------------------------------------------------------

@requires_cuda
def test_cuda_matches_cpu():
    x = torch.from_numpy(clustered(800, 6, seed=11))
    c0 = x[:6].clone()
    cpu = fit_kmeans(x, 6, init=c0, iters=5, tol=0, max_points_per_centroid=None)
    gpu = fit_kmeans(x.cuda(), 6, init=c0.cuda(), iters=5, tol=0, max_points_per_centroid=None)
    assert gpu.centroids.device.type == "cuda"
    close(gpu.centroids.cpu(), cpu.centroids.numpy(), rtol=1e-4, atol=1e-4)
    g_cpu = fit_gmm(x, 6, init=cpu, iters=5, tol=-1)
    g_gpu = fit_gmm(x.cuda(), 6, init=gpu, iters=5, tol=-1)
    assert g_gpu.means.device.type == "cuda"
    close(g_gpu.log_likelihood, g_cpu.log_likelihood, rtol=1e-4)
    close(g_gpu.means.cpu(), g_cpu.means.numpy(), rtol=1e-3, atol=1e-3)
