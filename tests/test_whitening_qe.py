"""Retrieval post-processing: PCA / learned whitening fitted from descriptors (aggnets.retrieval.whitening) and
query expansion / database-side augmentation (aggnets.retrieval.query_expansion).

References are independent NumPy implementations (Cholesky-based Lw, eigh-based PCA, loops for QE)."""

import numpy as np
import pytest
import torch

from aggnets.heads import Whitening
from aggnets.retrieval import (alpha_query_expansion, average_query_expansion, database_side_augmentation,
                               fit_learned_whitening, fit_pca_whitening, learned_whitening_params, load_whitening,
                               pca_whitening_params, save_whitening)


# ----------------------------------------------------------------------------------------------------------------------
# helpers / references


def _anisotropic(rng, n, d, scales=None):
    """n points in R^d with distinct variances ``scales**2`` along a random rotation ``R`` (columns), mean != 0."""
    scales = np.linspace(5.0, 0.5, d) if scales is None else np.asarray(scales)
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x = (rng.standard_normal((n, d)) * scales) @ rot.T + rng.standard_normal(d) * 3
    return x, rot


def _pre_l2(w, x):
    """The affine part ``P (x - m)`` of a Whitening module (before its L2)."""
    return torch.nn.functional.linear(torch.as_tensor(x, dtype=w.weight.dtype), w.weight, w.bias).detach().numpy()


def _cov(y):
    return np.cov(y, rowvar=False, bias=True)


def _same_up_to_row_signs(a, b, atol):
    s = np.sign(np.sum(a * b, axis=1, keepdims=True))
    np.testing.assert_allclose(a, s * b, atol=atol, rtol=0)


def _np_pca(x, dim):
    m = x.mean(0)
    lam, u = np.linalg.eigh(_cov(x))
    order = np.argsort(lam)[::-1][:dim]
    return m, u[:, order].T / np.sqrt(lam[order])[:, None], lam[order]


def _np_lw(x, pairs, dim):
    """Learned whitening via the Cholesky factor (cnnimageretrieval's whitenlearn path), eigh for the rotation."""
    m = x[np.unique(pairs)].mean(0)
    df = x[pairs[:, 0]] - x[pairs[:, 1]]
    cs = df.T @ df / len(pairs)
    pw = np.linalg.inv(np.linalg.cholesky(cs))  # pw cs pw^T = I, lower-triangular, not symmetric
    z = (x - m) @ pw.T
    mu, e = np.linalg.eigh(z.T @ z)
    order = np.argsort(mu)[::-1][:dim]
    return m, e[:, order].T @ pw


def _pairs_data(rng, n_classes=40, per_class=4, d=6):
    """Class centres with large spread, small anisotropic intra-class noise; all pairs within a class; plus
    unpaired descriptors."""
    centres = rng.standard_normal((n_classes, d)) * 4
    noise_dirs, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x = np.repeat(centres, per_class, axis=0) + (rng.standard_normal((n_classes * per_class, d))
                                                 * np.linspace(1.0, 0.1, d)) @ noise_dirs.T
    pairs = [(c * per_class + a, c * per_class + b) for c in range(n_classes)
             for a in range(per_class) for b in range(a + 1, per_class)]
    unpaired = rng.standard_normal((10, d)) * 4 + 2  # in the training set, in no pair: not in the mean m
    return np.concatenate([x, unpaired]), np.array(pairs)


def _l2n(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------------------
# PCA whitening


@pytest.mark.parametrize("dim", [None, 3])
def test_pca_whitening_identity_covariance_and_reference(rng, dim):
    x, _ = _anisotropic(rng, 400, 6)
    w = fit_pca_whitening(x, dim=dim, eps=0.0)
    d_out = 6 if dim is None else dim
    assert isinstance(w, Whitening) and w.in_features == 6 and w.out_dim == d_out and w.normalize
    assert w.weight.dtype == torch.float64  # float64 numpy input
    y = _pre_l2(w, x)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(_cov(y), np.eye(d_out), atol=1e-10)
    m, p, lam = _np_pca(x, d_out)
    _same_up_to_row_signs(w.weight.detach().numpy(), p, atol=1e-9)
    np.testing.assert_allclose(w.bias.detach().numpy(), -w.weight.detach().numpy() @ m, atol=1e-9)
    _, _, vals = pca_whitening_params(x, dim=dim, eps=0.0)
    np.testing.assert_allclose(vals.numpy(), lam, rtol=1e-10)


def test_pca_whitening_keeps_the_leading_components_in_order(rng):
    scales = [6.0, 4.0, 3.0, 1.0, 0.5, 0.2]
    x, rot = _anisotropic(rng, 4000, 6, scales)
    m, p, lam = pca_whitening_params(x, dim=3, eps=0.0)
    assert list(lam.numpy()) == sorted(lam.numpy(), reverse=True)
    np.testing.assert_allclose(np.sqrt(lam.numpy()), scales[:3], rtol=0.06)
    directions = _l2n(p.numpy())  # row i is along the i-th principal axis (rotation column i)
    np.testing.assert_allclose(np.abs(np.sum(directions * rot[:, :3].T, axis=1)), 1.0, atol=0.02)


def test_pca_whitening_gram_path_for_fewer_descriptors_than_dims(rng):
    x = rng.standard_normal((12, 40)) * np.linspace(3, 0.1, 40) + 1.0  # N < D: the N x N Gram route
    w = fit_pca_whitening(x, dim=8, eps=0.0)
    np.testing.assert_allclose(_cov(_pre_l2(w, x)), np.eye(8), atol=1e-9)
    _, p, _ = _np_pca(x, 8)
    _same_up_to_row_signs(w.weight.detach().numpy(), p, atol=1e-7)


def test_pca_whitening_shrinkage_documented_formula(rng):
    x, _ = _anisotropic(rng, 300, 5)
    eps = 0.1
    w = fit_pca_whitening(x, eps=eps)
    lam = np.linalg.eigvalsh(_cov(x))[::-1]
    r = eps * lam.mean()
    np.testing.assert_allclose(_cov(_pre_l2(w, x)), np.diag(lam / (lam + r)), atol=1e-10)


def test_pca_whitening_dtype_device_and_l2_output(rng):
    x = torch.as_tensor(_anisotropic(rng, 100, 5)[0], dtype=torch.float32)
    w = fit_pca_whitening(x, dim=4)
    assert w.weight.dtype == torch.float32 and w.bias.dtype == torch.float32
    assert getattr(w, "whitening_kind") == "pca"
    out = w(x)
    assert out.shape == (100, 4)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(100), atol=1e-6, rtol=0)
    assert fit_pca_whitening(x, dtype=torch.float64).weight.dtype == torch.float64


# ----------------------------------------------------------------------------------------------------------------------
# learned whitening (Radenović et al.)


@pytest.mark.parametrize("dim", [None, 4])
def test_learned_whitening_against_cholesky_reference(rng, dim):
    x, pairs = _pairs_data(rng)
    d_out = 6 if dim is None else dim
    w = fit_learned_whitening(x, pairs, dim=dim, eps=0.0)
    assert w.out_dim == d_out and getattr(w, "whitening_kind") == "learned"
    p = w.weight.detach().numpy()
    m_ref, p_ref = _np_lw(x, pairs, d_out)
    _same_up_to_row_signs(p, p_ref, atol=1e-9)
    np.testing.assert_allclose(w.bias.detach().numpy(), -p @ m_ref, atol=1e-9)
    # whitened pair differences: identity covariance (second moment)
    y = _pre_l2(w, x)
    df = y[pairs[:, 0]] - y[pairs[:, 1]]
    np.testing.assert_allclose(df.T @ df / len(pairs), np.eye(d_out), atol=1e-9)
    # rotation: the whitened training set is decorrelated, variances decreasing
    second = y.T @ y / len(y)
    np.testing.assert_allclose(second - np.diag(np.diag(second)), 0, atol=1e-8)
    assert np.all(np.diff(np.diag(second)) <= 1e-12)
    _, _, mu = learned_whitening_params(x, pairs, dim=dim, eps=0.0)
    np.testing.assert_allclose(np.diag(second), mu.numpy(), rtol=1e-9)


def test_learned_whitening_output_l2_and_differs_from_pca(rng):
    x, pairs = _pairs_data(rng)
    w = fit_learned_whitening(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(pairs))
    out = w(torch.as_tensor(x, dtype=torch.float32))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(x)), atol=1e-6, rtol=0)
    # Lw suppresses intra-class variation: matching pairs get closer relative to PCA whitening
    pca = fit_pca_whitening(torch.as_tensor(x, dtype=torch.float32))
    xt = torch.as_tensor(x, dtype=torch.float32)

    def pos_sim(mod):
        o = mod(xt)
        return (o[pairs[:, 0]] * o[pairs[:, 1]]).sum(1).mean()

    assert pos_sim(w) > pos_sim(pca)


# ----------------------------------------------------------------------------------------------------------------------
# fine-tuning, save / load


def test_fitted_whitening_is_fine_tunable(rng):
    x = torch.as_tensor(_anisotropic(rng, 50, 5)[0], dtype=torch.float32)
    w = fit_pca_whitening(x, dim=3)
    before = w(x).detach().clone()
    loss = (w(x)[:, 0] ** 2).mean()
    loss.backward()
    assert w.weight.grad is not None and w.weight.grad.abs().sum() > 0 and w.bias.grad.abs().sum() > 0
    torch.optim.SGD(w.parameters(), lr=0.1).step()
    assert not torch.equal(w(x).detach(), before)
    assert set(w.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip_bit_identical(tmp_path, rng, dtype):
    x, pairs = _pairs_data(rng)
    xt = torch.as_tensor(x, dtype=dtype)
    w = fit_learned_whitening(xt, pairs, dim=5)
    path = tmp_path / "lw.pt"
    save_whitening(w, path)
    raw = torch.load(path, weights_only=True)
    assert raw["meta"] == {"kind": "learned", "dim": 5, "in_dim": 6, "normalize": True}
    w2 = load_whitening(path)
    assert isinstance(w2, Whitening) and w2.weight.dtype == dtype and getattr(w2, "whitening_kind") == "learned"
    assert torch.equal(w2.weight, w.weight) and torch.equal(w2.bias, w.bias)
    assert torch.equal(w2(xt), w(xt))
    # a plain Whitening (not fitted) saves as "custom"
    save_whitening(Whitening(4, 2, normalize=False), tmp_path / "c.pt")
    c = load_whitening(str(tmp_path / "c.pt"))
    assert getattr(c, "whitening_kind") == "custom" and not c.normalize and c.out_dim == 2


def test_load_whitening_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no whitening file"):
        load_whitening(tmp_path / "missing.pt")
    w = Whitening(4, 3)
    good = {"format": "aggnets.whitening", "version": 1, "state_dict": dict(w.state_dict()),
            "meta": {"kind": "pca", "dim": 3, "in_dim": 4, "normalize": True}}
    bad_keys = dict(good, state_dict={"weight": w.weight.detach(), "b": w.bias.detach()})
    torch.save(bad_keys, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match=r"state_dict: mismatched keys: missing \['bias'\], unexpected \['b'\]"):
        load_whitening(tmp_path / "keys.pt")
    torch.save(dict(good, meta={"kind": "pca", "dim": 2, "in_dim": 4, "normalize": True}), tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="do not match meta"):
        load_whitening(tmp_path / "shape.pt")
    torch.save(dict(w.state_dict()), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not an aggnets whitening file"):
        load_whitening(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable"):
        load_whitening(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="module must be"):
        save_whitening(torch.nn.Linear(3, 3), tmp_path / "x.pt")


# ----------------------------------------------------------------------------------------------------------------------
# whitening: bad inputs


def test_whitening_bad_inputs(rng):
    x, pairs = _pairs_data(rng)
    with pytest.raises(ValueError, match="descriptors must be 2-D"):
        fit_pca_whitening(x[0])
    with pytest.raises(ValueError, match="NaN"):
        fit_pca_whitening(np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x))
    with pytest.raises(ValueError, match=r"dim must be None or an integer in \[1, 6\]"):
        fit_pca_whitening(x, dim=7)
    with pytest.raises(ValueError, match="needs at least 6 descriptors"):
        fit_pca_whitening(x[:5], dim=5)
    with pytest.raises(ValueError, match="eps must be"):
        fit_pca_whitening(x, eps=-1.0)
    with pytest.raises(ValueError, match="singular"):
        fit_pca_whitening(np.repeat(x[:, :3], 2, axis=1), eps=0.0)  # rank 3 in 6 dims
    w = fit_pca_whitening(np.repeat(x[:, :3], 2, axis=1), eps=1e-3)  # regularised: fine
    assert torch.isfinite(w.weight).all()
    with pytest.raises(ValueError, match="pairs: indices must lie in"):
        fit_learned_whitening(x, np.array([[0, len(x)]]))
    with pytest.raises(ValueError, match=r"pairs must be a non-empty \(M, 2\)"):
        fit_learned_whitening(x, pairs[:, :1])
    with pytest.raises(ValueError, match="integer descriptor indices"):
        fit_learned_whitening(x, pairs.astype(float))
    with pytest.raises(ValueError, match="with itself"):
        fit_learned_whitening(x, np.array([[0, 1], [2, 2]]))
    with pytest.raises(ValueError, match="pairs: the covariance of the 2 pair differences is singular"):
        fit_learned_whitening(x, pairs[:2], eps=0.0)
    with pytest.raises(ValueError, match="needs at least 6 descriptors"):
        fit_learned_whitening(x[:5], np.array([[0, 1], [2, 3]]), eps=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# query expansion


def _np_qe(q, db, k, alpha):
    out = []
    for v in q:
        s = db @ v
        top = np.argsort(-s, kind="stable")[:k]
        acc = v.copy()
        for i in top:
            acc += (max(s[i], 0.0) ** alpha if alpha > 0 else 1.0) * db[i]
        out.append(acc / np.linalg.norm(acc))
    return np.array(out)


def _unit_rows(rng, n, d):
    return _l2n(rng.standard_normal((n, d)))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_qe_against_numpy_reference_and_alpha0_is_average(rng, k):
    q, db = _unit_rows(rng, 5, 8), _unit_rows(rng, 20, 8)
    aqe = average_query_expansion(q, db, k)
    assert isinstance(aqe, np.ndarray) and aqe.shape == (5, 8)
    np.testing.assert_allclose(aqe, _np_qe(q, db, k, 0.0), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(aqe, axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(alpha_query_expansion(q, db, k, alpha=0.0), aqe)
    a3 = alpha_query_expansion(torch.as_tensor(q), torch.as_tensor(db), k, alpha=3.0, chunk_size=2)
    assert isinstance(a3, torch.Tensor) and a3.dtype == torch.float64
    np.testing.assert_allclose(a3.numpy(), _np_qe(q, db, k, 3.0), atol=1e-12)


def test_qe_k0_leaves_queries_unchanged(rng):
    q, db = _unit_rows(rng, 4, 6), _unit_rows(rng, 10, 6)
    np.testing.assert_allclose(average_query_expansion(q, db, 0), q, atol=1e-15)
    np.testing.assert_allclose(alpha_query_expansion(3 * q, db, 0), q, atol=1e-15)  # after L2


def test_qe_pulls_query_towards_its_neighbour_cluster():
    q = _l2n(np.array([[1.0, 0.0, 0.9]], dtype=np.float32))
    cluster = _l2n(np.array([[1.0, 0.05, 0.2], [1.0, -0.05, 0.2], [1.0, 0.0, 0.15], [1.0, 0.6, 0.0]],
                            dtype=np.float32))
    distractor = _l2n(np.array([[0.3, -0.6, 1.0]], dtype=np.float32))
    db = np.concatenate([cluster, distractor])
    before = (db @ q[0])
    assert before[4] > before[3]  # the distractor is ranked above the far cluster member
    for new in (average_query_expansion(q, db, 3), alpha_query_expansion(q, db, 3, alpha=3)):
        assert new.dtype == np.float32
        after = db @ new[0]
        assert np.all(after[:4] > before[:4]) and after[4] < before[4]
        assert after[3] > after[4]  # ... and below it after expansion


def test_alpha_weights_ignore_negative_neighbours():
    q = np.array([[1.0, 0.0]])
    db = np.array([[0.0, 1.0], [-0.6, 0.8]])  # similarities 0 and -0.6
    np.testing.assert_allclose(alpha_query_expansion(q, db, 2, alpha=3), q)
    np.testing.assert_allclose(average_query_expansion(q, db, 2), _l2n(q + db.sum(0)))


def test_dba_counts_each_descriptor_once(rng):
    db = _unit_rows(rng, 15, 6)
    for alpha in (0.0, 3.0):
        out = database_side_augmentation(torch.as_tensor(db), 4, alpha=alpha)
        ref = []
        for i, v in enumerate(db):
            s = db @ v
            s[i] = -np.inf
            top = np.argsort(-s, kind="stable")[:4]
            acc = v + sum((max(s[j], 0.0) ** alpha if alpha > 0 else 1.0) * db[j] for j in top)
            ref.append(acc / np.linalg.norm(acc))
        np.testing.assert_allclose(out.numpy(), np.array(ref), atol=1e-12)
    np.testing.assert_allclose(database_side_augmentation(db, 0), db, atol=1e-15)
    # exact duplicates: the other copy is a neighbour, the descriptor itself is not counted twice
    dup = np.concatenate([db[:1], db[:1], db[1:3]])
    out = database_side_augmentation(dup, 1, alpha=3.0)
    np.testing.assert_allclose(out[:2], np.repeat(db[:1], 2, axis=0), atol=1e-12)


def test_qe_bad_inputs(rng):
    q, db = _unit_rows(rng, 3, 4), _unit_rows(rng, 5, 4)
    with pytest.raises(ValueError, match="same descriptor dimension"):
        average_query_expansion(q, _unit_rows(rng, 5, 3), 1)
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 5\] \(database size\), got 6"):
        alpha_query_expansion(q, db, 6)
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 4\]"):
        database_side_augmentation(db, 5)
    with pytest.raises(ValueError, match="k must be"):
        average_query_expansion(q, db, -1)
    with pytest.raises(ValueError, match="alpha must be"):
        alpha_query_expansion(q, db, 2, alpha=-1)
    with pytest.raises(ValueError, match="queries must be a non-empty 2-D"):
        average_query_expansion(q[0], db, 1)
    with pytest.raises(ValueError, match="database must be a numpy array or a torch tensor"):
        average_query_expansion(q, db.tolist(), 1)
    with pytest.raises(ValueError, match="NaN"):
        average_query_expansion(q, np.full((5, 4), np.nan), 1)
