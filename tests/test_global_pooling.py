"""MAC, SPoC, GeM (shared and per-channel p) and CroW against the NumPy references of NOTES.md."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aggnets.heads import CroW, GeM, MAC, SPoC
from tests import references as R
from tests.helpers import assert_close, rand_map

SHAPES = [(1, 1), (1, 5), (3, 4), (7, 5), (6, 6)]


def ref_batch(fn, x, mask=None):
    return R.per_image(lambda X, m: fn(R.descriptors(X, m)), x, mask)


def random_mask(B, H, W, p=0.6):
    m = torch.rand(B, H, W) < p
    for b in range(B):  # at least one valid position per image
        if not m[b].any():
            m[b, torch.randint(H, ()), torch.randint(W, ())] = True
    return m


@pytest.mark.parametrize("H,W", SHAPES)
def test_mac_matches_reference(H, W):
    x = rand_map(2, 5, H, W)
    y = MAC(5).double()(x)
    assert y.shape == (2, 5) and y.dtype == torch.float64
    assert_close(y, ref_batch(R.mac_ref, x))


@pytest.mark.parametrize("H,W", SHAPES)
def test_spoc_matches_reference(H, W):
    x = rand_map(2, 5, H, W)
    y = SPoC(5).double()(x)
    assert y.shape == (2, 5) and y.dtype == torch.float64
    assert_close(y, ref_batch(R.spoc_ref, x))


@pytest.mark.parametrize("name,cls,ref", [("mac", MAC, R.mac_ref), ("spoc", SPoC, R.spoc_ref)])
def test_mac_spoc_with_irregular_mask(name, cls, ref):
    x = rand_map(3, 4, 5, 6)
    m = random_mask(3, 5, 6)
    y = cls(4).double()(x, mask=m)
    assert_close(y, ref_batch(ref, x, m))


@pytest.mark.parametrize("p", [1.0, 2.5, 3.0, 6.0])
@pytest.mark.parametrize("kind", ["positive", "normal"])  # "normal": the eps clamp is active on negatives
def test_gem_shared_p_matches_reference(p, kind):
    x = rand_map(2, 5, 4, 6, kind=kind)
    head = GeM(5, p=p).double()
    y = head(x)
    assert y.shape == (2, 5) and y.dtype == torch.float64
    assert_close(y, ref_batch(lambda D: R.gem_ref(D, p, 1e-6), x))


def test_gem_default_is_p3_eps1e6():
    x = rand_map(2, 5, 4, 6, kind="normal")
    assert_close(GeM(5).double()(x), ref_batch(lambda D: R.gem_ref(D, 3.0, 1e-6), x))


def test_gem_custom_eps():
    x = rand_map(2, 5, 4, 6, kind="normal")
    assert_close(GeM(5, p=2.0, eps=0.1).double()(x), ref_batch(lambda D: R.gem_ref(D, 2.0, 0.1), x))


def test_gem_parameter_shapes():
    shared = GeM(7, p=3.0)
    per_ch = GeM(7, p=3.0, per_channel=True)
    assert isinstance(shared.p, torch.nn.Parameter) and tuple(shared.p.shape) == (1,)
    assert isinstance(per_ch.p, torch.nn.Parameter) and tuple(per_ch.p.shape) == (7,)
    assert torch.all(per_ch.p.detach() == 3.0) and float(shared.p.detach()) == 3.0
    assert shared.p.requires_grad and per_ch.p.requires_grad
    frozen = GeM(7, p=3.0, learn_p=False)
    assert not any(q.requires_grad for q in frozen.parameters())


def test_gem_per_channel_p_matches_reference():
    C = 6
    head = GeM(C, per_channel=True).double()
    p = 1.0 + 4.0 * torch.rand(C, dtype=torch.float64)
    with torch.no_grad():
        head.p.copy_(p)
    x = rand_map(3, C, 5, 4, kind="normal")
    assert_close(head(x), ref_batch(lambda D: R.gem_ref(D, p.numpy(), 1e-6), x))


def test_gem_p1_equals_spoc():
    x = rand_map(2, 5, 6, 7, kind="positive")
    assert_close(GeM(5, p=1.0).double()(x), SPoC(5).double()(x))
    assert_close(GeM(5, p=1.0).double()(x), ref_batch(R.spoc_ref, x))


def test_gem_large_p_approaches_mac():
    """Power-mean bounds: N^(-1/p) * max <= M_p <= max, and M_p is non-decreasing in p."""
    H, W = 6, 6
    N = H * W
    x = rand_map(2, 5, H, W, kind="positive")
    mac = torch.from_numpy(ref_batch(R.mac_ref, x))
    g20 = GeM(5, p=20.0).double()(x).detach()
    g200 = GeM(5, p=200.0).double()(x).detach()
    assert torch.all(g200 <= mac * (1 + 1e-12))
    assert torch.all(g200 >= mac * N ** (-1.0 / 200.0) * (1 - 1e-12))
    assert torch.all(g200 >= g20 * (1 - 1e-12))
    assert (g200 - mac).abs().max() < (g20 - mac).abs().max()
    torch.testing.assert_close(g200, mac, rtol=math.log(N) / 200.0, atol=0.0)


@pytest.mark.parametrize("a,b", [(2.0, 2.0), (1.0, 3.0), (3.0, 1.0)])
def test_crow_matches_reference(a, b):
    x = rand_map(2, 6, 5, 7, kind="nonneg")
    x[0, 2] = 0.0  # a channel that is never active: Q_c = 0
    head = CroW(6, a=a, b=b).double()
    y = head(x)
    assert y.shape == (2, 6) and y.dtype == torch.float64
    assert_close(y, ref_batch(lambda D: R.crow_ref(D, a, b, 1e-6), x))


def test_crow_default_is_a2_b2():
    x = rand_map(2, 6, 5, 7, kind="nonneg")
    assert_close(CroW(6).double()(x), ref_batch(lambda D: R.crow_ref(D, 2.0, 2.0, 1e-6), x))


def test_crow_with_irregular_mask():
    x = rand_map(2, 6, 5, 7, kind="nonneg")
    m = random_mask(2, 5, 7, p=0.7)
    assert_close(CroW(6).double()(x, mask=m), ref_batch(lambda D: R.crow_ref(D, 2.0, 2.0, 1e-6), x, m))


@pytest.mark.parametrize(
    "cls,kw,ref,kind",
    [
        (MAC, {}, R.mac_ref, "normal"),
        (SPoC, {}, R.spoc_ref, "normal"),
        (GeM, {"p": 3.0}, lambda D: R.gem_ref(D, 3.0, 1e-6), "normal"),
        (CroW, {}, lambda D: R.crow_ref(D), "nonneg"),
    ],
    ids=["mac", "spoc", "gem", "crow"],
)
def test_normalize_true_gives_l2_normalised_reference(cls, kw, ref, kind):
    x = rand_map(2, 5, 4, 5, kind=kind)
    y = cls(5, normalize=True, **kw).double()(x)
    assert_close(y, ref_batch(lambda D: R.l2n(ref(D)), x))
    assert_close(y.norm(dim=1), np.ones(2))
    # and normalize defaults to False
    y0 = cls(5, **kw).double()(x)
    assert_close(y0, ref_batch(ref, x))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    C=st.integers(1, 6),
    H=st.integers(1, 6),
    W=st.integers(1, 6),
    p=st.floats(0.5, 8.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_gem_property_random_shapes(B, C, H, W, p, seed):
    torch.manual_seed(seed)
    x = rand_map(B, C, H, W, kind="normal")
    y = GeM(C, p=p).double()(x)
    assert_close(y, ref_batch(lambda D: R.gem_ref(D, p, 1e-6), x), rtol=1e-7, atol=1e-10)
