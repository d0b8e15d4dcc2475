"""Mask semantics, for EVERY registered head (parametrised over aggnets.list_heads()).

Contract: positions where the mask is False are ignored exactly (their values, even NaN, never reach the output);
a padded image plus a mask gives the descriptor of the unpadded image; RMAC / SpatialPyramid lay their grid on the
bounding box of the valid positions; an image whose mask is all False is a ValueError mentioning "mask".
"""

import pytest
import torch

from tests.helpers import (ANY_SIZE, MASKED, ORDERLESS, assert_close, garbage_like, input_kind, make_head,
                           pad_with_garbage, rand_map)

# the heads that declare they honour a mask and take any size (the others' refusals: tests/test_capabilities.py)
HEAD_NAMES = sorted(MASKED & ANY_SIZE)

C = 4


def _x(name, B, H, W, dtype=torch.float64):
    return rand_map(B, C, H, W, kind=input_kind(name), dtype=dtype)


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("nan", [True, False], ids=["nan_garbage", "finite_garbage"])
def test_bottom_right_garbage_padding_equals_unpadded(name, nan):
    head = make_head(name, C)
    x = _x(name, 2, 5, 6)
    padded, mask = pad_with_garbage(x, 8, 9, nan=nan)
    y = head(padded, mask=mask)
    assert torch.isfinite(y).all()
    assert_close(y, head(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_zero_padding_equals_unpadded(name):
    head = make_head(name, C)
    x = _x(name, 2, 5, 6)
    padded = torch.zeros(2, C, 7, 10, dtype=x.dtype)
    padded[:, :, :5, :6] = x
    mask = torch.zeros(2, 7, 10, dtype=torch.bool)
    mask[:, :5, :6] = True
    assert_close(head(padded, mask=mask), head(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_padding_on_all_sides_equals_unpadded(name):
    """The valid region need not touch the top-left corner (grid heads use its bounding box)."""
    head = make_head(name, C)
    x = _x(name, 2, 5, 6)
    padded, mask = pad_with_garbage(x, 9, 10, top=2, left=3)
    assert_close(head(padded, mask=mask), head(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_float32_padding_equals_unpadded(name):
    head = make_head(name, C, dtype=torch.float32)
    x = _x(name, 2, 5, 6, dtype=torch.float32)
    padded, mask = pad_with_garbage(x, 7, 8)
    y = head(padded, mask=mask)
    assert y.dtype == torch.float32
    assert_close(y, head(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_all_true_mask_equals_no_mask(name):
    head = make_head(name, C)
    x = _x(name, 2, 5, 6)
    assert_close(head(x, mask=torch.ones(2, 5, 6, dtype=torch.bool)), head(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_batch_mixing_two_valid_sizes_equals_per_image(name):
    head = make_head(name, C)
    a = _x(name, 1, 5, 7)
    b = _x(name, 1, 7, 4)
    canvas = garbage_like((2, C, 7, 7))
    canvas[0, :, :5, :7] = a[0]
    canvas[1, :, :7, :4] = b[0]
    mask = torch.zeros(2, 7, 7, dtype=torch.bool)
    mask[0, :5, :7] = True
    mask[1, :7, :4] = True
    y = head(canvas, mask=mask)
    assert y.shape == (2, head.out_dim)
    assert_close(y[0], head(a)[0], rtol=1e-9, atol=1e-10)
    assert_close(y[1], head(b)[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_image_results_are_independent_of_the_rest_of_the_batch(name):
    head = make_head(name, C)
    x = _x(name, 3, 5, 6)
    y = head(x)
    for b in range(3):
        assert_close(y[b], head(x[b:b + 1])[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("which", [0, 1])
def test_all_false_mask_raises_value_error(name, which):
    head = make_head(name, C)
    x = _x(name, 2, 4, 5)
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[which] = False
    with pytest.raises(ValueError, match="mask"):
        head(x, mask=mask)


@pytest.mark.parametrize("name", sorted(ORDERLESS & set(HEAD_NAMES)))
def test_orderless_heads_irregular_mask_equals_valid_descriptors_as_a_strip(name):
    """For heads that only see the set of valid descriptors, an irregular mask equals a 1 x N map of them."""
    head = make_head(name, C)
    x = _x(name, 1, 5, 6)
    mask = torch.rand(1, 5, 6) < 0.5
    mask[0, 0, 0] = True
    x_g = x.clone()
    x_g[:, :, ~mask[0]] = float("nan")
    strip = x[0][:, mask[0]].reshape(1, C, 1, -1)
    assert_close(head(x_g, mask=mask), head(strip), rtol=1e-9, atol=1e-10)
    perm = torch.randperm(strip.shape[-1])
    assert_close(head(strip[..., perm]), head(strip), rtol=1e-9, atol=1e-10)


def _trainable(head):
    return {n: p for n, p in head.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("nan", [False, True], ids=["finite_garbage", "nan_garbage"])
def test_masked_positions_get_zero_gradient(name, nan):
    """The output does not depend on masked-out values, so its gradient w.r.t. them is 0, and the gradients w.r.t.
    the valid positions and the parameters are those of the unpadded image."""
    head = make_head(name, C)
    x = _x(name, 2, 5, 6)
    if name in ("mac", "rmac"):
        x = rand_map(2, C, 5, 6, kind="distinct")
    padded, mask = pad_with_garbage(x, 7, 8, nan=nan)

    xp = padded.clone().requires_grad_(True)
    head.zero_grad()
    if not head(xp, mask=mask).requires_grad:
        assert not _trainable(head), "trainable parameters but no gradient path"
        pytest.skip("output carries no gradient (piecewise-constant head, e.g. hard BoF histogram)")
    head(xp, mask=mask).pow(2).mul(torch.arange(1, head.out_dim + 1, dtype=x.dtype)).sum().backward()
    g_pad = xp.grad.clone()
    pg_pad = {n: p.grad.clone() for n, p in _trainable(head).items() if p.grad is not None}

    xu = x.clone().requires_grad_(True)
    head.zero_grad()
    head(xu).pow(2).mul(torch.arange(1, head.out_dim + 1, dtype=x.dtype)).sum().backward()
    pg_ref = {n: p.grad.clone() for n, p in _trainable(head).items() if p.grad is not None}

    assert torch.isfinite(g_pad).all(), "non-finite input gradient"
    assert torch.all(g_pad[:, :, ~mask[0]] == 0)
    assert_close(g_pad[:, :, :5, :6], xu.grad, rtol=1e-8, atol=1e-10)
    assert set(pg_pad) == set(pg_ref)
    for n in pg_ref:
        assert torch.isfinite(pg_pad[n]).all(), f"non-finite gradient for parameter {n}"
        assert_close(pg_pad[n], pg_ref[n], rtol=1e-8, atol=1e-10, msg=n)
