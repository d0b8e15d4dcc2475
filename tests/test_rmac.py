"""R-MAC: the Tolias et al. region grid (aggnets.functional.rmac_regions) and the full descriptor."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aggnets.functional import rmac_regions
from aggnets.heads import RMAC
from tests import references as R
from tests.helpers import assert_close, rand_map


def regions_as_tuples(regions):
    return [tuple(int(v) for v in r) for r in regions]


# Worked by hand from the algorithm (see the comments), to validate both the reference and the implementation.
HAND = {
    # square 7x7: w=7, no extra. l=1: side 7, one region. l=2: side floor(14/3)=4, offsets 0,3.
    # l=3: side floor(14/4)=3, offsets floor(i*4/2) = 0,2,4.
    (7, 7): [(0, 0, 7)]
    + [(t, l, 4) for t in (0, 3) for l in (0, 3)]
    + [(t, l, 3) for t in (0, 2, 4) for l in (0, 2, 4)],
    # 4:3, H=12, W=16: w=12, b_s = 4/(s-1); s=2 gives |1-4/12-0.4| = 0.267 (best), so extra=1 along W.
    # l=1: side 12, W offsets 0,4. l=2: side 8, H offsets 0,4, W offsets floor(i*8/2) = 0,4,8.
    # l=3: side 6, H offsets floor(i*6/2) = 0,3,6; W offsets floor(i*10/3) = 0,3,6,10.
    (12, 16): [(0, 0, 12), (0, 4, 12)]
    + [(t, l, 8) for t in (0, 4) for l in (0, 4, 8)]
    + [(t, l, 6) for t in (0, 3, 6) for l in (0, 3, 6, 10)],
    # 3:4 (the transpose): extra along H.
    (16, 12): [(0, 0, 12), (4, 0, 12)]
    + [(t, l, 8) for t in (0, 4, 8) for l in (0, 4)]
    + [(t, l, 6) for t in (0, 3, 6, 10) for l in (0, 3, 6)],
    # very thin 1x20: w=1, the criterion 1 - b_s - 0.4 is minimised by s=7 (extra=6); l=1: side 1, 7 regions at
    # floor(i*19/6) = 0,3,6,9,12,15,19; l=2,3: side floor(2/3)=floor(2/4)=0 -> skipped.
    (1, 20): [(0, l, 1) for l in (0, 3, 6, 9, 12, 15, 19)],
    (20, 1): [(t, 0, 1) for t in (0, 3, 6, 9, 12, 15, 19)],
}


@pytest.mark.parametrize("hw", sorted(HAND), ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_reference_regions_match_hand_computation(hw):
    assert R.rmac_regions_ref(*hw, levels=3, overlap=0.4) == HAND[hw]


@pytest.mark.parametrize("hw", sorted(HAND), ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_rmac_regions_hand_computed(hw):
    assert regions_as_tuples(rmac_regions(*hw, levels=3, overlap=0.4)) == HAND[hw]


@pytest.mark.parametrize("hw", sorted(HAND), ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_rmac_regions_defaults_are_levels3_overlap04(hw):
    assert regions_as_tuples(rmac_regions(*hw)) == HAND[hw]


SHAPES = [
    (7, 7),    # square
    (12, 16),  # 4:3 landscape
    (16, 12),  # 3:4 portrait
    (9, 16),   # 16:9
    (16, 9),
    (2, 30),   # very thin
    (30, 2),
    (1, 20),
    (20, 1),
    (1, 1),
    (3, 4),
    (14, 40),
    (37, 50),
]


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
@pytest.mark.parametrize("hw", SHAPES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_rmac_regions_match_reference(hw, levels):
    H, W = hw
    got = regions_as_tuples(rmac_regions(H, W, levels=levels, overlap=0.4))
    assert got == R.rmac_regions_ref(H, W, levels, 0.4)
    for (t, l, s) in got:  # every region is a square inside the map
        assert s >= 1 and 0 <= t and t + s <= H and 0 <= l and l + s <= W


@pytest.mark.parametrize("overlap", [0.2, 0.6])
@pytest.mark.parametrize("hw", [(12, 16), (9, 16), (16, 9), (10, 31)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_rmac_regions_other_overlap(hw, overlap):
    assert regions_as_tuples(rmac_regions(*hw, levels=3, overlap=overlap)) == R.rmac_regions_ref(*hw, 3, overlap)


def test_rmac_regions_exact_tie_follows_matlab_float_evaluation():
    """5x9: in exact arithmetic s=2 and s=3 tie (|0.2-0.4| = |0.6-0.4|); MATLAB's double evaluation of
    abs(((w^2 - w*b)/w^2) - ovr) picks s=3 (extra=2). The contract says "same as their MATLAB rmac_regions"."""
    ref = R.rmac_regions_ref(5, 9, 3, 0.4)
    assert ref[:3] == [(0, 0, 5), (0, 2, 5), (0, 4, 5)]  # 3 regions along W at level 1 -> extra = 2
    assert regions_as_tuples(rmac_regions(5, 9, levels=3, overlap=0.4)) == ref


@settings(max_examples=150, deadline=None)
@given(H=st.integers(1, 64), W=st.integers(1, 64), levels=st.integers(1, 5))
def test_rmac_regions_property(H, W, levels):
    assert regions_as_tuples(rmac_regions(H, W, levels=levels, overlap=0.4)) == R.rmac_regions_ref(H, W, levels, 0.4)


# ----------------------------------------------------------------------------------------------------------------------
# descriptor

DESC_SHAPES = [(7, 7), (6, 9), (9, 6), (5, 12), (2, 11), (1, 1)]


@pytest.mark.parametrize("include_global", [False, True])
@pytest.mark.parametrize("hw", DESC_SHAPES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_rmac_max_matches_reference(hw, include_global):
    H, W = hw
    C = 6
    x = rand_map(2, C, H, W, kind="normal")
    head = RMAC(C, include_global=include_global).double()
    y = head(x)
    assert y.shape == (2, C) and y.dtype == torch.float64 and head.out_dim == C
    ref = R.per_image(lambda X, m: R.rmac_ref(X, m, 3, 0.4, include_global, "max"), x)
    assert_close(y, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("p", [3.0, 2.5])
@pytest.mark.parametrize("include_global", [False, True])
@pytest.mark.parametrize("hw", [(7, 7), (6, 9), (9, 6)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_rmac_gem_matches_reference(hw, include_global, p):
    H, W = hw
    C = 5
    x = rand_map(2, C, H, W, kind="positive")
    head = RMAC(C, include_global=include_global, pool="gem", p=p).double()
    assert any(q.requires_grad for q in head.parameters()), "pool='gem' must have a learnable p"
    ref = R.per_image(lambda X, m: R.rmac_ref(X, m, 3, 0.4, include_global, "gem", p, 1e-6), x)
    assert_close(head(x), ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("levels,overlap", [(1, 0.4), (2, 0.4), (4, 0.4), (3, 0.6)])
def test_rmac_levels_and_overlap(levels, overlap):
    C = 4
    x = rand_map(2, C, 8, 13, kind="normal")
    head = RMAC(C, levels=levels, overlap=overlap).double()
    ref = R.per_image(lambda X, m: R.rmac_ref(X, m, levels, overlap, False, "max"), x)
    assert_close(head(x), ref, rtol=1e-7, atol=1e-9)


def test_rmac_default_is_max_without_global():
    """Sanity: the with/without-global conventions really differ on this input, and the default is without."""
    C = 4
    x = rand_map(2, C, 6, 9, kind="normal")
    y = RMAC(C).double()(x)
    without = R.per_image(lambda X, m: R.rmac_ref(X, m, 3, 0.4, False, "max"), x)
    with_g = R.per_image(lambda X, m: R.rmac_ref(X, m, 3, 0.4, True, "max"), x)
    assert np.abs(without - with_g).max() > 1e-6
    assert_close(y, without, rtol=1e-7, atol=1e-9)


def test_rmac_output_unit_norm():
    x = rand_map(3, 8, 9, 12, kind="normal")
    y = RMAC(8).double()(x)
    assert_close(y.norm(dim=1), np.ones(3), rtol=1e-9, atol=1e-9)


def test_rmac_with_rectangular_mask_uses_bounding_box():
    """The region grid is laid on the bounding box of the valid positions, wherever it is."""
    C = 4
    x = rand_map(2, C, 10, 12, kind="normal")
    m = torch.zeros(2, 10, 12, dtype=torch.bool)
    m[0, 2:8, 3:12] = True   # 6x9 box, away from the top-left corner
    m[1, 0:10, 1:5] = True   # 10x4 box
    y = RMAC(C).double()(x, mask=m)
    ref = R.per_image(lambda X, mm: R.rmac_ref(X, mm, 3, 0.4, False, "max"), x, m)
    assert_close(y, ref, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------------
# the tensor-computed grid used under torch.export (one graph for every H x W) against the Python grid

def dynamic_regions(H, W, levels, overlap):
    from aggnets.functional.regions import _extra_regions_tensor, level_grid_tensor

    h, w = torch.tensor(H), torch.tensor(W)
    extra = _extra_regions_tensor(h, w, overlap)
    regions = []
    for level in range(1, levels + 1):
        side, tops, top_valid, lefts, left_valid = level_grid_tensor(h, w, level, extra)
        if side > 0:
            regions += [(int(t), int(l), int(side)) for t, tv in zip(tops, top_valid)
                        for l, lv in zip(lefts, left_valid) if tv and lv]
    return regions


@pytest.mark.parametrize("overlap", [0.4, 0.2, 0.6])
def test_dynamic_grid_equals_python_grid_exhaustively(overlap):
    for H in range(1, 41):
        for W in range(1, 41):
            assert dynamic_regions(H, W, 4, overlap) == regions_as_tuples(rmac_regions(H, W, 4, overlap)), (H, W)


@pytest.mark.parametrize("pool", ["max", "gem"])
def test_dynamic_descriptor_equals_eager_exhaustively(pool):
    """rmac(dynamic=True) (the export path) gives the eager descriptor at every H, W in 1..24, levels 1..3, with and
    without the global region."""
    from aggnets.functional import rmac

    torch.manual_seed(0)
    p = torch.tensor([2.5], dtype=torch.float64)
    for H in range(1, 25):
        for W in range(1, 25):
            x = rand_map(2, 3, H, W, kind="positive" if pool == "gem" else "normal")
            for levels in (1, 2, 3):
                for include_global in (False, True):
                    args = dict(levels=levels, include_global=include_global, pool=pool, p=p)
                    eager = rmac(x, dynamic=False, **args)
                    assert_close(rmac(x, dynamic=True, **args), eager, rtol=1e-12, atol=1e-12)


def test_dynamic_descriptor_per_channel_p_and_gradient():
    from aggnets.functional import rmac

    x = rand_map(2, 3, 6, 11, kind="positive").requires_grad_()
    p = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    eager = rmac(x, pool="gem", p=p, include_global=True, dynamic=False)
    dynamic = rmac(x, pool="gem", p=p, include_global=True, dynamic=True)
    assert_close(dynamic, eager, rtol=1e-12, atol=1e-12)
    for pool in ("max", "gem"):
        g_eager, = torch.autograd.grad(rmac(x, pool=pool, dynamic=False).sum(), x)
        g_dynamic, = torch.autograd.grad(rmac(x, pool=pool, dynamic=True).sum(), x)
        assert_close(g_dynamic, g_eager, rtol=1e-10, atol=1e-12)


def test_dynamic_grid_takes_no_mask():
    from aggnets.functional import rmac

    with pytest.raises(ValueError, match="no mask"):
        rmac(torch.randn(1, 2, 5, 5), torch.ones(1, 5, 5, dtype=torch.bool), dynamic=True)
