"""VLAD / NetVLAD / BoF / NetBoF / FisherVector / NetFV against NumPy references, and the equivalences of NOTES.md.

Centroids are dyadic and alphas powers of two (see helpers.rand_centroids), so the contract's initialisations are
exact in any precision and float64 comparisons can be tight.
"""

import math

import numpy as np
import pytest
import torch

from aggnets.heads import BoF, FisherVector, NetBoF, NetFV, NetVLAD, VLAD
from tests import references as R
from tests.helpers import assert_close, rand_centroids, rand_gmm, rand_map

C, K = 4, 3


def desc_batch(fn, x, mask=None):
    return R.per_image(lambda X, m: fn(R.descriptors(X, m)), x, mask)


def distance_init(cent, alpha):
    """The contract's "distance" scheme: w_k = 2 alpha c_k, b_k = -alpha ||c_k||^2 (NumPy)."""
    c = cent.numpy()
    return 2.0 * alpha * c, -alpha * (c ** 2).sum(1)


# ----------------------------------------------------------------------------------------------------------------------
# NetVLAD


def test_netvlad_parameters_and_out_dim():
    head = NetVLAD(C, K)
    assert head.out_dim == K * C and head.in_channels == C
    assert tuple(head.centroids.shape) == (K, C) and isinstance(head.centroids, torch.nn.Parameter)
    assert isinstance(head.assign, torch.nn.Conv2d)
    assert tuple(head.assign.weight.shape) == (K, C, 1, 1) and tuple(head.assign.bias.shape) == (K,)
    assert all(p.requires_grad for p in head.parameters())
    assert NetVLAD(C, K, bias=False).assign.bias is None


def test_netvlad_default_num_clusters_64():
    assert NetVLAD(5).out_dim == 64 * 5


@pytest.mark.parametrize("alpha", [1.0, 4.0, 32.0])
def test_netvlad_from_centroids_distance_scheme(alpha):
    cent = rand_centroids(K, C)
    head = NetVLAD.from_centroids(cent, alpha=alpha).double()
    Wt, b = distance_init(cent, alpha)
    assert_close(head.centroids, cent.numpy())
    assert_close(head.assign.weight.reshape(K, C), Wt)
    assert_close(head.assign.bias, b)
    x = rand_map(2, C, 4, 5)
    assert_close(head(x), desc_batch(lambda D: R.netvlad_ref(D, cent.numpy(), Wt, b), x))


def test_netvlad_from_centroids_cosine_scheme():
    # rows with entries +-1 have norm exactly 2 when C=4: alpha c/||c|| is exact in any precision
    cent = (torch.randint(0, 2, (K, C)).double() * 2 - 1)
    cent[1] = torch.tensor([1.0, -1.0, 1.0, 1.0])
    cent[2] = torch.tensor([-1.0, -1.0, 1.0, -1.0])
    alpha = 8.0
    head = NetVLAD.from_centroids(cent, alpha=alpha, scheme="cosine").double()
    Wt = alpha * cent.numpy() / 2.0
    assert_close(head.assign.weight.reshape(K, C), Wt)
    assert head.assign.bias is None or float(head.assign.bias.detach().abs().max()) == 0.0
    x = rand_map(2, C, 4, 5)
    assert_close(head(x), desc_batch(lambda D: R.netvlad_ref(D, cent.numpy(), Wt, np.zeros(K)), x))


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"normalize_input": False},
        {"intra_norm": False},
        {"power": 0.5},
        {"power": 0.5, "intra_norm": False, "normalize_input": False},
        {"assignment": "hard"},
        {"bias": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_soft_netvlad_with_given_weights_matches_reference(opts):
    head = NetVLAD(C, K, **opts).double()
    Wt = torch.randn(K, C, dtype=torch.float64) * 3
    b = torch.randn(K, dtype=torch.float64)
    cent = torch.randn(K, C, dtype=torch.float64) * 0.5
    with torch.no_grad():
        head.assign.weight.copy_(Wt.view(K, C, 1, 1))
        if head.assign.bias is not None:
            head.assign.bias.copy_(b)
        head.centroids.copy_(cent)
    bias = None if opts.get("bias", True) is False else b.numpy()
    ref_kw = dict(
        normalize_input=opts.get("normalize_input", True),
        intra_norm=opts.get("intra_norm", True),
        power=opts.get("power"),
        assignment=opts.get("assignment", "soft"),
    )
    x = rand_map(3, C, 5, 4)
    y = head(x)
    assert y.shape == (3, K * C) and y.dtype == torch.float64
    assert_close(y, desc_batch(lambda D: R.netvlad_ref(D, cent.numpy(), Wt.numpy(), bias, **ref_kw), x))


def test_netvlad_layout_is_k_major():
    """Flatten order: k outer, c inner. With intra_norm=False and one cluster-specific residual, check blocks."""
    head = NetVLAD(C, 2, normalize_input=False, intra_norm=False).double()
    cent = torch.zeros(2, C, dtype=torch.float64)
    cent[1] = 1.0
    with torch.no_grad():
        head.centroids.copy_(cent)
        head.assign.weight.zero_()
        head.assign.bias.copy_(torch.tensor([100.0, -100.0], dtype=torch.float64))  # everything -> cluster 0
    x = rand_map(1, C, 2, 2, kind="positive")
    y = head(x)[0]
    v0 = x[0].reshape(C, -1).sum(1)  # sum of residuals to cluster 0 (centroid 0)
    expected = torch.cat([v0, torch.zeros(C, dtype=torch.float64)])
    assert_close(y, R.l2n(expected.numpy()), atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# VLAD and the NetVLAD -> VLAD limit


@pytest.mark.parametrize(
    "opts",
    [{}, {"intra_norm": True}, {"normalize_input": True}, {"power": 0.5}, {"intra_norm": True, "power": 0.5}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_vlad_matches_reference(opts):
    cent = rand_centroids(K, C)
    head = VLAD.from_centroids(cent, **opts).double()
    assert head.out_dim == K * C
    x = rand_map(2, C, 5, 6)
    ref_kw = dict(normalize_input=opts.get("normalize_input", False), intra_norm=opts.get("intra_norm", False),
                  power=opts.get("power"))
    assert_close(head(x), desc_batch(lambda D: R.vlad_ref(D, cent.numpy(), **ref_kw), x))


def test_vlad_is_frozen():
    head = VLAD.from_centroids(rand_centroids(K, C))
    assert len(list(head.parameters())) > 0
    assert not any(p.requires_grad for p in head.parameters())


def test_vlad_reference_differs_between_options():
    """Guard against vacuous equivalence tests: the VLAD variants really differ on this data."""
    cent = rand_centroids(K, C).numpy()
    D = R.descriptors(rand_map(1, C, 5, 6)[0].numpy())
    plain = R.vlad_ref(D, cent)
    full = R.vlad_ref(D, cent, normalize_input=True, intra_norm=True)
    assert np.abs(plain - full).max() > 1e-3


def test_netvlad_alpha_inf_equals_vlad_intra_norm_normalize_input():
    cent = rand_centroids(K, C)
    x = rand_map(3, C, 5, 6)
    net = NetVLAD.from_centroids(cent, alpha=float("inf")).double()
    vlad = VLAD.from_centroids(cent, intra_norm=True, normalize_input=True).double()
    ref = desc_batch(lambda D: R.vlad_ref(D, cent.numpy(), normalize_input=True, intra_norm=True), x)
    assert_close(net(x), ref)
    assert_close(vlad(x), ref)
    assert_close(net(x), vlad(x), rtol=1e-12, atol=1e-14)


def test_netvlad_large_alpha_approaches_vlad():
    cent = rand_centroids(K, C)
    x = rand_map(2, C, 5, 6)
    # precondition: the nearest centroid wins by a margin, so exp(-alpha * gap) is negligible at alpha = 2**14
    gaps = []
    c = cent.numpy()
    for b in range(2):
        for xn in R.descriptors(x[b].numpy()):
            xn = R.l2n(xn)
            d = sorted(float(((xn - c[k]) ** 2).sum()) for k in range(K))
            gaps.append(d[1] - d[0])
    assert min(gaps) * 2.0 ** 14 > 60.0, min(gaps)
    ref = desc_batch(lambda D: R.vlad_ref(D, c, normalize_input=True, intra_norm=True), x)
    err = {}
    for alpha in (1.0, 2.0 ** 14):
        y = NetVLAD.from_centroids(cent, alpha=alpha).double()(x).detach().numpy()
        err[alpha] = np.abs(y - ref).max()
    assert err[1.0] > 1e-3  # soft assignment is really different at alpha=1 ...
    assert err[2.0 ** 14] < 1e-9  # ... and indistinguishable from hard at large alpha


# ----------------------------------------------------------------------------------------------------------------------
# BoF / NetBoF


def test_bof_matches_histogram_reference_and_sums_to_one():
    cent = rand_centroids(K, C)
    head = BoF.from_centroids(cent).double()
    assert head.out_dim == K
    x = rand_map(3, C, 4, 5)
    y = head(x)
    ref = desc_batch(lambda D: R.bof_ref(D, cent.numpy()), x)
    assert_close(y, ref)
    assert_close(y.sum(1), np.ones(3), rtol=1e-12)
    counts = y.detach().numpy() * 20
    assert_close(counts, np.round(counts), atol=1e-9)  # multiples of 1/N


def test_bof_is_frozen():
    head = BoF.from_centroids(rand_centroids(K, C))
    assert not any(p.requires_grad for p in head.parameters())


def test_netbof_hard_equals_bof():
    cent = rand_centroids(K, C)
    x = rand_map(3, C, 4, 5)
    hard = NetBoF.from_centroids(cent, alpha=float("inf")).double()
    bof = BoF.from_centroids(cent).double()
    ref = desc_batch(lambda D: R.bof_ref(D, cent.numpy()), x)
    assert_close(hard(x), ref)
    assert_close(hard(x), bof(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha", [0.25, 1.0, 4.0])
def test_netbof_soft_matches_reference(alpha):
    cent = rand_centroids(K, C)
    head = NetBoF.from_centroids(cent, alpha=alpha).double()
    assert head.out_dim == K
    Wt, b = distance_init(cent, alpha)
    x = rand_map(2, C, 4, 5)
    y = head(x)
    assert_close(y, desc_batch(lambda D: R.netbof_ref(D, Wt, b), x))
    assert_close(y.sum(1), np.ones(2), rtol=1e-12)


@pytest.mark.parametrize("opts", [{}, {"normalize_input": True}, {"bias": False}, {"assignment": "hard"}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_netbof_with_given_weights_matches_reference(opts):
    head = NetBoF(C, K, **opts).double()
    Wt = torch.randn(K, C, dtype=torch.float64)
    b = torch.randn(K, dtype=torch.float64)
    with torch.no_grad():
        head.assign.weight.copy_(Wt.view(K, C, 1, 1))
        if head.assign.bias is not None:
            head.assign.bias.copy_(b)
    bias = None if opts.get("bias", True) is False else b.numpy()
    x = rand_map(2, C, 4, 5)
    ref = desc_batch(lambda D: R.netbof_ref(D, Wt.numpy(), bias, normalize_input=opts.get("normalize_input", False),
                                            assignment=opts.get("assignment", "soft")), x)
    assert_close(head(x), ref)


# ----------------------------------------------------------------------------------------------------------------------
# Fisher vectors


def set_gmm_params(head, log_w, means, log_vars):
    with torch.no_grad():
        head.log_weights.copy_(log_w)
        head.means.copy_(means)
        head.log_vars.copy_(log_vars)


def test_netfv_parameters_and_out_dim():
    head = NetFV(C, K)
    assert head.out_dim == 2 * K * C
    assert tuple(head.log_weights.shape) == (K,)
    assert tuple(head.means.shape) == (K, C) and tuple(head.log_vars.shape) == (K, C)
    assert all(p.requires_grad for p in (head.log_weights, head.means, head.log_vars))
    assert not any(p.requires_grad for p in FisherVector(C, K).parameters())


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_netfv_with_given_parameters_matches_reference(power):
    """Exact float64 check through the trainable parameterisation (w = softmax(log_weights), var = exp(log_vars))."""
    head = NetFV(C, K, power=power).double()
    log_w = torch.randn(K, dtype=torch.float64)
    means = torch.randn(K, C, dtype=torch.float64)
    log_vars = torch.randn(K, C, dtype=torch.float64) * 0.5
    set_gmm_params(head, log_w, means, log_vars)
    w = np.exp(log_w.numpy()) / np.exp(log_w.numpy()).sum()
    var = np.exp(log_vars.numpy())
    x = rand_map(2, C, 4, 5)
    y = head(x)
    assert y.shape == (2, 2 * K * C) and y.dtype == torch.float64
    assert_close(y, desc_batch(lambda D: R.fisher_vector_ref(D, w, means.numpy(), var, power), x))


def test_netfv_default_power_is_half():
    head = NetFV(C, K).double()
    log_w = torch.randn(K, dtype=torch.float64)
    means = torch.randn(K, C, dtype=torch.float64)
    log_vars = torch.zeros(K, C, dtype=torch.float64)
    set_gmm_params(head, log_w, means, log_vars)
    w = np.exp(log_w.numpy()) / np.exp(log_w.numpy()).sum()
    x = rand_map(1, C, 3, 3)
    assert_close(head(x), desc_batch(lambda D: R.fisher_vector_ref(D, w, means.numpy(), np.ones((K, C)), 0.5), x))


def test_fv_from_gmm_netfv_equals_fisher_vector_equals_reference():
    """from_gmm may build float32 parameters (log of weights/variances): compare with the reference at float32
    tolerance, and the two heads with each other exactly."""
    w, means, var = rand_gmm(K, C)
    net = NetFV.from_gmm(w, means, var).double()
    fv = FisherVector.from_gmm(w, means, var).double()
    assert net.out_dim == fv.out_dim == 2 * K * C
    x = rand_map(3, C, 4, 5)
    ref = desc_batch(lambda D: R.fisher_vector_ref(D, w.numpy(), means.numpy(), var.numpy(), 0.5), x)
    assert_close(net(x), ref, rtol=1e-5, atol=1e-6)
    assert_close(fv(x), ref, rtol=1e-5, atol=1e-6)
    assert_close(net(x), fv(x), rtol=1e-12, atol=1e-14)
    # the GMM is stored through the contract's parameterisation
    assert_close(torch.softmax(net.log_weights.double(), 0), w.numpy(), rtol=1e-6)
    assert_close(net.means, means.numpy(), rtol=1e-6)
    assert_close(torch.exp(net.log_vars.double()), var.numpy(), rtol=1e-6)


def test_fisher_vector_is_frozen():
    fv = FisherVector.from_gmm(*rand_gmm(K, C))
    assert not any(p.requires_grad for p in fv.parameters())


def test_fv_reference_sanity_single_gaussian():
    """Reference self-check against a closed form: K=1, unit variance, w=1 -> gamma=1,
    G^mu = mean(x - mu), G^sigma = mean((x-mu)^2 - 1)/sqrt(2)."""
    D = np.random.default_rng(1).normal(size=(6, 3))
    mu = np.array([[0.1, -0.2, 0.3]])
    gmu = (D - mu).mean(0)
    gsig = ((D - mu) ** 2 - 1).mean(0) / math.sqrt(2)
    expected = R.l2n(np.concatenate([gmu, gsig]))
    np.testing.assert_allclose(R.fisher_vector_ref(D, np.ones(1), mu, np.ones((1, 3)), power=1.0), expected,
                               rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# property tests: random shapes and irregular masks, against the references

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _random_mask(B, H, W, p):
    m = torch.rand(B, H, W) < p
    for b in range(B):
        m[b, torch.randint(H, ()), torch.randint(W, ())] = True
    return m


_shapes = dict(B=st.integers(1, 3), H=st.integers(1, 5), W=st.integers(1, 5), p=st.floats(0.2, 1.0),
               seed=st.integers(0, 2**31 - 1))


@settings(max_examples=20, deadline=None)
@given(**_shapes)
def test_netvlad_property_masked(B, H, W, p, seed):
    torch.manual_seed(seed)
    head = NetVLAD(C, K).double()
    Wt = torch.randn(K, C, dtype=torch.float64) * 2
    b = torch.randn(K, dtype=torch.float64)
    cent = torch.randn(K, C, dtype=torch.float64) * 0.5
    with torch.no_grad():
        head.assign.weight.copy_(Wt.view(K, C, 1, 1))
        head.assign.bias.copy_(b)
        head.centroids.copy_(cent)
    x = rand_map(B, C, H, W)
    m = _random_mask(B, H, W, p)
    ref = desc_batch(lambda D: R.netvlad_ref(D, cent.numpy(), Wt.numpy(), b.numpy()), x, m)
    assert_close(head(x, mask=m), ref, rtol=1e-7, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(**_shapes)
def test_vlad_and_bof_property_masked(B, H, W, p, seed):
    torch.manual_seed(seed)
    cent = rand_centroids(K, C)
    x = rand_map(B, C, H, W)
    m = _random_mask(B, H, W, p)
    vlad = VLAD.from_centroids(cent).double()
    bof = BoF.from_centroids(cent).double()
    assert_close(vlad(x, mask=m), desc_batch(lambda D: R.vlad_ref(D, cent.numpy()), x, m))
    assert_close(bof(x, mask=m), desc_batch(lambda D: R.bof_ref(D, cent.numpy()), x, m))


@settings(max_examples=20, deadline=None)
@given(**_shapes)
def test_netfv_property_masked(B, H, W, p, seed):
    torch.manual_seed(seed)
    head = NetFV(C, K).double()
    log_w = torch.randn(K, dtype=torch.float64)
    means = torch.randn(K, C, dtype=torch.float64)
    log_vars = torch.randn(K, C, dtype=torch.float64) * 0.5
    set_gmm_params(head, log_w, means, log_vars)
    w = np.exp(log_w.numpy()) / np.exp(log_w.numpy()).sum()
    x = rand_map(B, C, H, W)
    m = _random_mask(B, H, W, p)
    ref = desc_batch(lambda D: R.fisher_vector_ref(D, w, means.numpy(), np.exp(log_vars.numpy()), 0.5), x, m)
    assert_close(head(x, mask=m), ref, rtol=1e-7, atol=1e-10)
