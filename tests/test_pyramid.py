"""SpatialPyramid over MAC / GeM / BoF / NetVLAD against a per-cell loop reference."""

import numpy as np
import pytest
import torch

from aggnets.heads import BoF, GeM, MAC, NetVLAD, SpatialPyramid
from tests import references as R
from tests.helpers import assert_close, rand_centroids, rand_map

SHAPES = [(8, 8), (7, 5), (3, 3), (12, 9), (1, 6), (5, 2)]


def test_reference_cell_bounds_adaptive_convention():
    # S=5, l=4: [0,2), [1,3), [2,4), [3,5) (floor(i*5/4), ceil((i+1)*5/4)); S=3, l=4 overlapping tiny cells.
    assert R.cell_bounds(5, 4) == [(0, 2), (1, 3), (2, 4), (3, 5)]
    assert R.cell_bounds(3, 4) == [(0, 1), (0, 2), (1, 3), (2, 3)]
    assert R.cell_bounds(8, 2) == [(0, 4), (4, 8)]
    assert R.cell_bounds(7, 1) == [(0, 7)]


@pytest.mark.parametrize("hw", SHAPES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_pyramid_mac_matches_reference(hw):
    H, W = hw
    C = 4
    x = rand_map(2, C, H, W)
    head = SpatialPyramid(MAC(C), levels=(1, 2, 4)).double()
    assert head.out_dim == C * 21
    y = head(x)
    assert y.shape == (2, C * 21) and y.dtype == torch.float64
    assert_close(y, R.per_image(lambda X, m: R.pyramid_ref(X, R.mac_ref, C, (1, 2, 4), m), x))


@pytest.mark.parametrize("levels", [(1, 3), (2,), (3, 1), (1, 2, 4)])
@pytest.mark.parametrize("hw", [(7, 5), (9, 9)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_pyramid_gem_matches_reference(hw, levels):
    H, W = hw
    C = 3
    x = rand_map(2, C, H, W, kind="positive")
    head = SpatialPyramid(GeM(C, p=2.5), levels=levels).double()
    assert head.out_dim == C * sum(l * l for l in levels)
    ref = R.per_image(lambda X, m: R.pyramid_ref(X, lambda D: R.gem_ref(D, 2.5, 1e-6), C, levels, m), x)
    assert_close(head(x), ref)


def test_pyramid_from_registry_name_with_head_kwargs():
    C = 3
    x = rand_map(2, C, 6, 7, kind="positive")
    head = SpatialPyramid("gem", levels=(1, 2), in_channels=C, head_kwargs={"p": 2.0}).double()
    assert head.out_dim == 5 * C and head.in_channels == C
    ref = R.per_image(lambda X, m: R.pyramid_ref(X, lambda D: R.gem_ref(D, 2.0, 1e-6), C, (1, 2), m), x)
    assert_close(head(x), ref)


@pytest.mark.parametrize("hw", [(8, 8), (7, 5)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_pyramid_bof_is_21x_flat_size_and_matches_reference(hw):
    H, W = hw
    C, K = 3, 4
    cent = rand_centroids(K, C)
    head = SpatialPyramid(BoF.from_centroids(cent), levels=(1, 2, 4)).double()
    assert head.out_dim == 21 * K  # NOTES.md: a BoF pyramid of levels 0..2 is 21x the flat size
    x = rand_map(2, C, H, W)
    ref = R.per_image(lambda X, m: R.pyramid_ref(X, lambda D: R.bof_ref(D, cent.numpy()), K, (1, 2, 4), m), x)
    assert_close(head(x), ref)


def test_pyramid_netvlad_matches_reference():
    C, K = 3, 2
    cent = rand_centroids(K, C)
    inner = NetVLAD.from_centroids(cent, alpha=4.0)
    head = SpatialPyramid(inner, levels=(1, 2)).double()
    Wt = (2 * 4.0 * cent).numpy()
    b = (-4.0 * (cent ** 2).sum(1)).numpy()
    x = rand_map(2, C, 5, 6)
    cell = lambda D: R.netvlad_ref(D, cent.numpy(), Wt, b)
    assert_close(head(x), R.per_image(lambda X, m: R.pyramid_ref(X, cell, K * C, (1, 2), m), x))


def test_pyramid_out_dim_various_levels():
    for levels in [(1,), (1, 2), (1, 2, 4), (2, 3), (1, 2, 3, 4)]:
        head = SpatialPyramid(MAC(5), levels=levels)
        assert head.out_dim == 5 * sum(l * l for l in levels)
        assert head(torch.randn(1, 5, 8, 8)).shape == (1, head.out_dim)


def test_pyramid_default_levels_1_2_4():
    assert SpatialPyramid(MAC(2)).out_dim == 2 * 21


def test_pyramid_cells_without_valid_positions_give_zeros():
    """L-shaped valid region: its bounding box is the whole map, but some cells hold no valid position."""
    C = 3
    H, W = 8, 8
    x = rand_map(1, C, H, W, kind="positive")  # positive: a MAC cell is never 0 unless it is empty
    m = torch.zeros(1, H, W, dtype=torch.bool)
    m[0, :, 0:2] = True
    m[0, 6:8, :] = True
    head = SpatialPyramid(MAC(C), levels=(1, 2, 4)).double()
    y = head(x, mask=m)
    ref = R.per_image(lambda X, mm: R.pyramid_ref(X, R.mac_ref, C, (1, 2, 4), mm), x, m)
    assert_close(y, ref)
    # explicitly: level-2 cell (0, 1) (top-right quadrant) is empty -> zeros
    lvl2 = y[0, C * 1:C * 5].reshape(4, C)
    assert torch.all(lvl2[1] == 0)
    assert torch.all(lvl2[0] > 0) and torch.all(lvl2[2] > 0) and torch.all(lvl2[3] > 0)


def test_pyramid_in_channels_from_inner_head():
    assert SpatialPyramid(MAC(5)).in_channels == 5
    assert SpatialPyramid("mac", in_channels=7).in_channels == 7


def _l_shaped_mask(H=8, W=8):
    m = torch.zeros(1, H, W, dtype=torch.bool)
    m[0, :, 0:2] = True
    m[0, 6:8, :] = True
    return m


@pytest.mark.parametrize("inner", ["gem", "bof", "netvlad", "netfv"])
def test_pyramid_empty_cells_give_zeros_for_any_inner_head(inner):
    """An empty cell must give zeros (not an all-False-mask error from the inner head, not NaN)."""
    from aggnets.heads import NetFV

    C, K = 3, 2
    cent = rand_centroids(K, C)
    if inner == "gem":
        head, cell, dim = GeM(C, p=2.0), (lambda D: R.gem_ref(D, 2.0, 1e-6)), C
    elif inner == "bof":
        head, cell, dim = BoF.from_centroids(cent), (lambda D: R.bof_ref(D, cent.numpy())), K
    elif inner == "netvlad":
        Wt, b = (2 * 4.0 * cent).numpy(), (-4.0 * (cent ** 2).sum(1)).numpy()
        head, cell, dim = NetVLAD.from_centroids(cent, alpha=4.0), (lambda D: R.netvlad_ref(D, cent.numpy(), Wt, b)), K * C
    else:
        head = NetFV(C, K).double()
        with torch.no_grad():
            head.log_weights.zero_()
            head.means.copy_(cent)
            head.log_vars.zero_()
        cell = lambda D: R.fisher_vector_ref(D, np.full(K, 1.0 / K), cent.numpy(), np.ones((K, C)), 0.5)
        dim = 2 * K * C
    pyr = SpatialPyramid(head, levels=(1, 2, 4)).double()
    x = rand_map(1, C, 8, 8, kind="positive")
    m = _l_shaped_mask()
    y = pyr(x, mask=m)
    assert torch.isfinite(y).all()
    assert_close(y, R.per_image(lambda X, mm: R.pyramid_ref(X, cell, dim, (1, 2, 4), mm), x, m))
    assert torch.all(y[0, dim * 2:dim * 3] == 0)  # level 2, cell (0, 1): no valid position


# ----------------------------------------------------------------------------------------------------------------------
# the tensor-computed cells used under torch.export (one graph for every H x W) against the Python layout

@pytest.mark.parametrize("cells", [1, 2, 3, 4, 5, 7])
def test_dynamic_axis_index_covers_exactly_each_cell(cells):
    from aggnets.functional.pyramid import cell_bounds, dynamic_axis_index

    for length in range(1, 41):
        index, valid = dynamic_axis_index(length, cells, torch.device("cpu"))
        assert index.min() >= 0 and index.max() < length
        for i, (start, end) in enumerate(cell_bounds(length, cells)):
            assert index[i][valid[i]].tolist() == list(range(start, end)), (length, cells, i)


@pytest.mark.parametrize("inner", ["mac", "gem", "spoc", "netvlad"])
def test_dynamic_cells_give_the_eager_pyramid_exhaustively(inner):
    """The export layout (cells padded to a bound and masked; always masked except level 1) gives the eager output at
    every H, W in 1..24."""
    from aggnets.heads import SPoC

    C, K = 3, 2
    head = {"mac": lambda: MAC(C), "gem": lambda: GeM(C, p=2.5), "spoc": lambda: SPoC(C),
            "netvlad": lambda: NetVLAD.from_centroids(rand_centroids(K, C), alpha=4.0)}[inner]()
    pyramid = SpatialPyramid(head, levels=(1, 2, 3)).double()
    for H in range(1, 25):
        for W in range(1, 25):
            x = rand_map(2, C, H, W, kind="positive")
            assert_close(pyramid._encode(x, None, dynamic=True), pyramid._encode(x, None, dynamic=False),
                         rtol=1e-10, atol=1e-12)


def test_dynamic_cells_take_no_mask():
    from aggnets.functional import pyramid_cells

    with pytest.raises(ValueError, match="no mask"):
        pyramid_cells(torch.randn(1, 2, 5, 5), 2, torch.ones(1, 5, 5, dtype=torch.bool), dynamic=True)
