"""NetVLAD's GhostVLAD (``ghost_clusters``) and SuperVLAD (``residual=False``) options against references written here
from the definitions (NOTES.md; NumPy loops, float64, no aggnets):

- GhostVLAD (Zhong, Arandjelović & Zisserman, ACCV 2018): ``a_k(x) = softmax_k(w_k^T x + b_k)`` over the K + G
  clusters, ``V_k = sum_n a_k(x_n) (x_n - c_k)`` for the K real clusters only; intra-norm, flatten, L2.
- SuperVLAD (Lu et al., NeurIPS 2024): no centroids, ``V_k = sum_n a_k(x_n) x_n``, usually with one ghost cluster.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aggnets import build_head
from aggnets import functional as AF
from aggnets.codebook import fit_kmeans, init_head_from_descriptors
from aggnets.functional import codebook
from aggnets.heads import NetVLAD

C, K, G = 5, 3, 2


# ---- the reference ---------------------------------------------------------------------------------------------------

def _l2(v: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return v / max(float(np.sqrt((v * v).sum())), eps)


def reference(x: torch.Tensor, weight, bias, centroids, num_clusters: int, mask=None, normalize_input=True,
              intra_norm=True, hard=False) -> np.ndarray:
    """(B, K * C) by loops: the descriptors of each image (masked positions left out), the soft-max (or arg-max) over
    every row of ``weight`` (K + G), the K first clusters aggregated (residual to ``centroids``, or plain sums when
    ``centroids`` is None), intra-normalised, flattened k-major, L2."""
    x = x.detach().double().numpy()
    weight = np.asarray(weight, dtype=np.float64)
    bias = np.zeros(len(weight)) if bias is None else np.asarray(bias, dtype=np.float64)
    out = []
    for b in range(x.shape[0]):
        descriptors = [x[b, :, i, j] for i in range(x.shape[2]) for j in range(x.shape[3])
                       if mask is None or bool(mask[b, i, j])]
        vlad = np.zeros((num_clusters, x.shape[1]))
        for d in descriptors:
            if normalize_input:
                d = _l2(d)
            scores = weight @ d + bias
            if hard:
                a = np.zeros(len(scores))
                a[int(np.argmax(scores))] = 1.0
            else:
                a = np.exp(scores - scores.max())
                a = a / a.sum()
            for k in range(num_clusters):
                residual = d if centroids is None else d - np.asarray(centroids[k], dtype=np.float64)
                vlad[k] += a[k] * residual
        if intra_norm:
            vlad = np.stack([_l2(v) for v in vlad])
        out.append(_l2(vlad.reshape(-1)))
    return np.stack(out)


def params(head: NetVLAD):
    weight = head.assign_weight.detach().double().numpy()
    bias = None if head.assign.bias is None else head.assign.bias.detach().double().numpy()
    centroids = None if head.centroids is None else head.centroids.detach().double().numpy()
    return weight, bias, centroids


def randomise(head: NetVLAD, scale: float = 3.0) -> NetVLAD:
    """Random assignment weights (so that the ghosts take a real share) and centroids."""
    with torch.no_grad():
        head.assign.weight.copy_(scale * torch.randn_like(head.assign.weight))
        if head.assign.bias is not None:
            head.assign.bias.copy_(torch.randn_like(head.assign.bias))
        if head.centroids is not None:
            head.centroids.copy_(0.5 * torch.randn_like(head.centroids))
    return head


def rand_map(b=2, h=4, w=5, dtype=torch.float64):
    return torch.randn(b, C, h, w, dtype=dtype)


VARIANTS = {
    "ghostvlad": dict(ghost_clusters=G),
    "ghostvlad_1": dict(ghost_clusters=1),
    "supervlad": dict(ghost_clusters=1, residual=False),
    "supervlad_no_ghost": dict(residual=False),
    "ghostvlad_no_bias": dict(ghost_clusters=G, bias=False),
    "supervlad_raw": dict(ghost_clusters=1, residual=False, normalize_input=False, intra_norm=False),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_reference(variant):
    opts = VARIANTS[variant]
    head = randomise(NetVLAD(C, K, **opts).double())
    x = rand_map()
    y = head(x)
    assert y.shape == (2, K * C) and y.dtype == torch.float64
    expected = reference(x, *params(head), K, normalize_input=opts.get("normalize_input", True),
                         intra_norm=opts.get("intra_norm", True))
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the plain-autograd (inference) path too
        np.testing.assert_allclose(head(x).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_hard_ghost_assignment_drops_descriptors_owned_by_ghosts():
    head = randomise(NetVLAD(C, K, ghost_clusters=G, assignment="hard").double())
    x = rand_map()
    np.testing.assert_allclose(head(x).detach().numpy(), reference(x, *params(head), K, hard=True),
                               rtol=1e-10, atol=1e-12)


def test_ghostvlad_is_the_first_k_clusters_of_a_k_plus_g_netvlad_renormalised():
    """The definition: the soft-max includes the ghosts, the output drops their blocks, and the K * C vector that
    remains is L2-normalised again (the intra-normalised blocks of a K + G NetVLAD each have norm 1 / sqrt(K + G))."""
    ghost = randomise(NetVLAD(C, K, ghost_clusters=G).double())
    full = NetVLAD(C, K + G).double()
    with torch.no_grad():
        full.assign.weight.copy_(ghost.assign.weight)
        full.assign.bias.copy_(ghost.assign.bias)
        full.centroids[:K].copy_(ghost.centroids)
        full.centroids[K:].copy_(torch.randn(G, C))  # the ghosts' centroids do not matter
    x = rand_map()
    kept = full(x)[:, :K * C]
    torch.testing.assert_close(ghost(x), kept / kept.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-14)
    # and it is not the K-cluster NetVLAD of the same K rows (the ghosts take their share of every column)
    real_only = NetVLAD(C, K).double()
    with torch.no_grad():
        real_only.assign.weight.copy_(ghost.assign.weight[:K])
        real_only.assign.bias.copy_(ghost.assign.bias[:K])
        real_only.centroids.copy_(ghost.centroids)
    assert float((real_only(x) - ghost(x)).detach().abs().max()) > 1e-3


def test_supervlad_is_the_non_residual_sum():
    head = randomise(NetVLAD(C, 4, ghost_clusters=1, residual=False, intra_norm=False, normalize_input=False).double())
    x = rand_map(1, 3, 3)
    logits = torch.einsum("kc,cn->kn", head.assign_weight.detach(), x[0].flatten(1)) + head.assign.bias.detach()[:, None]
    a = torch.softmax(logits, dim=0)[:4]                                       # (4, N), ghost dropped
    v = torch.stack([(a[k] * x[0].flatten(1)).sum(dim=1) for k in range(4)])  # sum_n a_k(x_n) x_n
    torch.testing.assert_close(head(x)[0], (v / v.norm()).flatten(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", ["ghostvlad", "supervlad", "ghostvlad_no_bias"])
def test_masked_equals_crop(variant):
    head = randomise(NetVLAD(C, K, **VARIANTS[variant]).double())
    x = rand_map(2, 3, 4)
    canvas = torch.randn(2, C, 6, 7, dtype=torch.float64) * 1e3
    canvas[:, :, 1:4, 2:6] = x
    canvas[:, 0, 0, 0] = float("nan")  # garbage outside the mask never leaks
    mask = torch.zeros(2, 6, 7, dtype=torch.bool)
    mask[:, 1:4, 2:6] = True
    torch.testing.assert_close(head(canvas, mask), head(x), rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(head(canvas, mask), head(x), rtol=1e-12, atol=1e-14)
    # an irregular mask against the reference
    mask = torch.rand(2, 3, 4) > 0.4
    mask[:, 0, 0] = True
    np.testing.assert_allclose(head(x, mask).detach().numpy(), reference(x, *params(head), K, mask=mask),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["ghostvlad", "supervlad", "supervlad_raw"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(variant, masked):
    opts = VARIANTS[variant]
    head = randomise(NetVLAD(C, K, **opts).double(), scale=1.0)
    x = rand_map(2, 3, 3).requires_grad_()
    mask = (torch.rand(2, 3, 3) > 0.3) if masked else None
    weight = head.assign_weight.detach().clone().requires_grad_()
    bias = head.assign.bias.detach().clone().requires_grad_()
    centroids = None if head.centroids is None else head.centroids.detach().clone().requires_grad_()
    ghosts = opts.get("ghost_clusters", 0)

    def fn(x, weight, bias, *rest):
        return AF.netvlad(x, weight, bias, rest[0] if rest else None, mask,
                          normalize_input=opts.get("normalize_input", True), intra_norm=opts.get("intra_norm", True),
                          ghost_clusters=ghosts)

    inputs = (x, weight, bias) + (() if centroids is None else (centroids,))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("normalize_input,with_squares,masked,bias",
                         [(True, False, False, True), (False, True, True, True), (True, False, True, False),
                          (False, False, False, True)])
def test_fast_statistics_with_ghosts_match_autograd(normalize_input, with_squares, masked, bias):
    """The hand-written backward with ghosts (their assignments get a zero upstream gradient) against plain
    autograd, and gradcheck."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=generator)
    mask = torch.rand(2, 3, 3, generator=generator) > 0.3 if masked else None
    descriptors, valid, _ = AF.flatten_positions(x, mask)
    descriptors = descriptors.detach().requires_grad_()
    rows = 8 if with_squares else 4
    weight = torch.randn(K + G, rows, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(K + G, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    flags = (normalize_input, False, with_squares, G)
    fast = codebook._AssignmentStatistics.apply(descriptors, weight, b, valid, *flags)
    ref = codebook._statistics_reference(descriptors, weight, b, valid, *flags)
    assert fast[0].shape == (2, K) and fast[1].shape == (2, K, rows)
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    wrt = [t for t in (descriptors, weight, b) if t is not None]
    cotangents = [torch.randn_like(t, generator=generator) for t in ref]
    got = torch.autograd.grad(fast, wrt, cotangents)
    want = torch.autograd.grad(ref, wrt, cotangents)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda d, w, *bb: codebook._AssignmentStatistics.apply(d, w, bb[0] if bb else None, valid, *flags),
        tuple(wrt))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated
@pytest.mark.parametrize("variant", ["ghostvlad", "supervlad"])
def test_torchscript(variant, tmp_path):
    head = randomise(NetVLAD(C, K, **VARIANTS[variant]))
    scripted = torch.jit.script(head)
    x = rand_map(dtype=torch.float32)
    mask = torch.rand(2, 4, 5) > 0.3
    mask[:, 0, 0] = True
    torch.testing.assert_close(scripted(x), head(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scripted(x, mask), head(x, mask), rtol=1e-5, atol=1e-6)
    torch.jit.save(scripted, tmp_path / "head.pt")
    torch.testing.assert_close(torch.jit.load(tmp_path / "head.pt")(x), head(x), rtol=1e-5, atol=1e-6)


def test_out_dim_state_dict_and_internals():
    ghost = NetVLAD(6, 4, ghost_clusters=2)
    assert ghost.out_dim == 24 and ghost.num_clusters == 4 and ghost.ghost_clusters == 2
    assert {k: tuple(v.shape) for k, v in ghost.state_dict().items()} == {
        "centroids": (4, 6), "alpha": (), "assign.weight": (6, 6, 1, 1), "assign.bias": (6,)}
    assert set(ghost.internals()) == {"alpha", "assign_weight_norm", "centroid_norm"}
    assert ghost.internals()["assign_weight_norm"].shape == (6,)

    super_ = NetVLAD(6, 4, ghost_clusters=1, residual=False)
    assert super_.out_dim == 24 and super_.centroids is None
    assert {k: tuple(v.shape) for k, v in super_.state_dict().items()} == {
        "alpha": (), "assign.weight": (5, 6, 1, 1), "assign.bias": (5,)}
    assert "centroids" not in dict(super_.named_parameters())
    assert set(super_.internals()) == set(super_.capabilities.internals) == {"alpha", "assign_weight_norm"}
    assert NetVLAD.capabilities.internals == ("alpha", "assign_weight_norm", "centroid_norm")  # class unchanged
    assert "ghost_clusters=1" in repr(super_) and "residual=False" in repr(super_)

    # a state dict round trip, and the defaults keep the old layout
    clone = NetVLAD(6, 4, ghost_clusters=1, residual=False)
    clone.load_state_dict(super_.state_dict())
    x = torch.randn(1, 6, 3, 3)
    torch.testing.assert_close(clone(x), super_(x))
    assert set(NetVLAD(6, 4).state_dict()) == {"centroids", "alpha", "assign.weight", "assign.bias"}
    assert build_head("netvlad", in_channels=6, num_clusters=4, ghost_clusters=1, residual=False).out_dim == 24

    # the assignment map has the K real clusters; the ghosts' share is what a column lacks to sum to 1
    amap = randomise(NetVLAD(6, 4, ghost_clusters=2)).assignment_map(torch.randn(2, 6, 3, 3))
    assert amap.shape == (2, 4, 3, 3) and bool((amap.sum(dim=1) < 1).all())

    with pytest.raises(ValueError, match="ghost_clusters"):
        NetVLAD(6, 4, ghost_clusters=-1)


def test_from_centroids_and_load_centroids_with_ghosts():
    centroids = torch.randint(-8, 9, (K, C)).double() / 8
    ghosts = torch.randint(-8, 9, (G, C)).double() / 8
    alpha = 4.0
    head = NetVLAD.from_centroids(centroids, alpha=alpha, ghost_clusters=G, ghost_centroids=ghosts)
    every = torch.cat([centroids, ghosts])
    torch.testing.assert_close(head.assign_weight, 2 * alpha * every)
    torch.testing.assert_close(head.assign.bias, -alpha * every.pow(2).sum(1))
    torch.testing.assert_close(head.centroids, centroids)
    # without ghost centroids: the ghost rows are zero (a ghost centroid at the origin)
    head = NetVLAD.from_centroids(centroids, alpha=alpha, ghost_clusters=G)
    assert float(head.assign_weight[K:].detach().abs().max()) == 0.0
    assert float(head.assign.bias[K:].detach().abs().max()) == 0.0
    torch.testing.assert_close(head.assign_weight[:K], 2 * alpha * centroids)
    # SuperVLAD: the assignment from the centroids, no centroids parameter
    head = NetVLAD.from_centroids(centroids, alpha=alpha, scheme="cosine", ghost_clusters=1, residual=False,
                                  bias=False, ghost_centroids=ghosts[:1])
    torch.testing.assert_close(head.assign_weight,
                               alpha * torch.nn.functional.normalize(torch.cat([centroids, ghosts[:1]]), dim=1))
    assert head.centroids is None and head.assign.bias is None
    with pytest.raises(ValueError, match="ghost_centroids"):
        NetVLAD(C, K, ghost_clusters=G).load_centroids(centroids, 1.0, ghost_centroids=ghosts[:1])
    with pytest.raises(ValueError, match="centroids must have shape"):
        NetVLAD(C, K, ghost_clusters=G).load_centroids(every, 1.0)


def clustered(n=600, c=8, k=6, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(k, c, generator=g)
    return (centres[torch.arange(n) % k] + 0.3 * torch.randn(n, c, generator=g)).double()


@pytest.mark.parametrize("variant", ["ghostvlad", "supervlad", "supervlad_cosine"])
def test_codebook_init_fits_k_plus_g_centroids(variant):
    """init_head_from_descriptors: k-means with K + G centroids, the first K for the clusters, the last G for the
    ghosts' assignment rows; alpha="auto" as for NetVLAD."""
    descriptors = clustered()
    if variant == "ghostvlad":
        head, ghosts = NetVLAD(8, 4, ghost_clusters=2), 2
    elif variant == "supervlad":
        head, ghosts = NetVLAD(8, 5, ghost_clusters=1, residual=False), 1
    else:
        head, ghosts = NetVLAD(8, 5, ghost_clusters=1, residual=False, bias=False), 1
    summary = init_head_from_descriptors(head, descriptors, alpha="auto", seed=0)
    k = head.num_clusters
    expected = fit_kmeans(torch.nn.functional.normalize(descriptors.float(), dim=1), k + ghosts, seed=0).centroids
    alpha = summary["alpha"]
    assert math.isfinite(alpha) and alpha > 0
    if variant == "supervlad_cosine":  # no bias: the cosine scheme by default
        assert summary["scheme"] == "cosine"
        torch.testing.assert_close(head.assign_weight,
                                   alpha * torch.nn.functional.normalize(expected.float(), dim=1), rtol=1e-5,
                                   atol=1e-5)
    else:
        assert summary["scheme"] == "distance"
        torch.testing.assert_close(head.assign_weight, (2 * alpha * expected).float(), rtol=1e-5, atol=1e-5)
    if head.centroids is not None:
        torch.testing.assert_close(head.centroids, expected[:k].float())
    x = torch.randn(2, 8, 4, 4)
    y = head(x)
    assert y.shape == (2, k * 8) and bool(torch.isfinite(y).all())
