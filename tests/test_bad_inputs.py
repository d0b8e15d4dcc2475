"""Bad inputs, for every registered head: ValueError / TypeError whose message names the argument (x or mask).
Also the documented NaN/Inf propagation (no error)."""

import pytest
import torch

from aggnets.heads import NetBoF, NetVLAD
from tests.helpers import HEAD_NAMES, MASKED, assert_close, input_kind, make_head, rand_centroids, rand_map

C = 4
NAMES_X = r"\bx\b"  # the message must name the argument `x` (as a word)
NAMES_MASK = r"mask"


def _good_x(name, B=2, H=5, W=6):
    return rand_map(B, C, H, W, kind=input_kind(name), dtype=torch.float32)


BAD_X = {
    "wrong_channels": lambda: torch.rand(2, C + 1, 5, 6),
    "too_few_channels": lambda: torch.rand(2, C - 1, 5, 6),
    "3d": lambda: torch.rand(C, 5, 6),
    "5d": lambda: torch.rand(2, C, 5, 6, 1),
    "2d": lambda: torch.rand(2, C),
    "empty_batch": lambda: torch.rand(0, C, 5, 6),
    "zero_height": lambda: torch.rand(2, C, 0, 6),
    "zero_width": lambda: torch.rand(2, C, 5, 0),
    "integer": lambda: torch.randint(0, 5, (2, C, 5, 6)),
    "bool": lambda: torch.rand(2, C, 5, 6) > 0.5,
}


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("case", sorted(BAD_X))
def test_bad_x_raises_naming_x(name, case):
    head = make_head(name, C, dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=NAMES_X):
        head(BAD_X[case]())


BAD_MASK = {
    "wrong_height": lambda: torch.ones(2, 6, 6, dtype=torch.bool),
    "wrong_width": lambda: torch.ones(2, 5, 7, dtype=torch.bool),
    "wrong_batch": lambda: torch.ones(3, 5, 6, dtype=torch.bool),
    "missing_batch_dim": lambda: torch.ones(5, 6, dtype=torch.bool),
    "extra_dim": lambda: torch.ones(2, 1, 5, 6, dtype=torch.bool),
    "float": lambda: torch.ones(2, 5, 6),
    "uint8": lambda: torch.ones(2, 5, 6, dtype=torch.uint8),
    "int64": lambda: torch.ones(2, 5, 6, dtype=torch.int64),
}


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("case", sorted(BAD_MASK))
def test_bad_mask_raises_naming_mask(name, case):
    head = make_head(name, C, dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=NAMES_MASK):
        head(_good_x(name), mask=BAD_MASK[case]())


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_all_false_mask_is_value_error(name):
    head = make_head(name, C, dtype=torch.float32)
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=NAMES_MASK):
        head(_good_x(name), mask=mask)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_good_input_does_not_raise(name):
    """Guard for the tests above: the same head accepts well-formed inputs (so the errors are about the input)."""
    head = make_head(name, C, dtype=torch.float32)
    mask = torch.ones(2, 5, 6, dtype=torch.bool) if name in MASKED else None
    y = head(_good_x(name), mask=mask)
    assert y.shape == (2, head.out_dim)


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_at_valid_position_propagates(name, value):
    """Documented: NaN at a valid position makes that image's output non-finite; NaN/Inf raise no error; the other
    images of the batch are unaffected."""
    head = make_head(name, C, dtype=torch.float64)
    x = rand_map(2, C, 5, 6, kind=input_kind(name))
    clean = head(x)
    x[0, 1, 2, 3] = value
    y = head(x)  # no error, for NaN and Inf alike
    assert y.shape == (2, head.out_dim)
    if value != value:  # NaN: the contract says non-finite output (Inf: only "no error" is specified)
        assert not torch.isfinite(y[0]).all(), y[0]
    assert_close(y[1], clean[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(MASKED))
def test_nan_at_masked_position_is_ignored(name):
    head = make_head(name, C, dtype=torch.float64)
    x = rand_map(2, C, 5, 6, kind=input_kind(name))
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    mask[:, 4, :] = False
    ref = head(x[:, :, :4, :])
    x[:, :, 4, :] = float("nan")
    y = head(x, mask=mask)
    assert torch.isfinite(y).all()
    assert_close(y, ref, rtol=1e-9, atol=1e-10)


HARD_VARIANTS = {
    "netbof_alpha_inf": lambda c: NetBoF.from_centroids(c, alpha=float("inf")),
    "netvlad_alpha_inf": lambda c: NetVLAD.from_centroids(c, alpha=float("inf")),
    "netbof_hard_assignment": lambda c: NetBoF(C, 3, assignment="hard"),
}


@pytest.mark.parametrize("variant", sorted(HARD_VARIANTS))
def test_nan_propagates_through_hard_assignment_variants(variant):
    """Hard (arg-max) assignment must not swallow a NaN descriptor either."""
    head = HARD_VARIANTS[variant](rand_centroids(3, C)).double()
    x = rand_map(2, C, 5, 6)
    x[0, 1, 2, 3] = float("nan")
    y = head(x)
    assert not torch.isfinite(y[0]).all(), y[0]
    assert torch.isfinite(y[1]).all()
