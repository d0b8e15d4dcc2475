"""Property-based input battery (hypothesis) over EVERY registered head.

Random batch sizes, non-square maps from 1 x 1 up to 9 x 9, C in 4..8, K in 2..4, and random masks: none, all-True,
Bernoulli, a single valid position per image, 2-4 scattered valid positions, whole rows / columns invalid, a valid
sub-rectangle. float32 and float64
(half-precision inputs for the output-dtype property), CPU and CUDA (skipped without a GPU).

Properties: output shape (B, head.out_dim), dtype as documented in aggnets/heads/base.py, all finite; masked-out
values never change the output nor reach a gradient; heads without geometry (all but rmac / spatial_pyramid) see a
masked map as the multiset of its valid descriptors (a single valid position is a 1 x 1 map); an image's output does
not depend on the rest of the batch. Bad inputs raise ONE TypeError / ValueError (as documented in
aggnets/functional/checks.py) whose message names the argument. NaN / Inf at valid positions: the behaviour actually
observed is asserted (INF_BEHAVIOUR below), never an exception.

Examples are derandomised (settings below): CI runs the same examples every time.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggnets.heads import RMAC, GeM, NetBoF, NetFV, NetVLAD, SpatialPyramid
from tests.conftest import requires_cuda
from tests.helpers import (HEAD_NAMES, MASKED, SPATIAL, assert_close, capabilities, input_kind, make_head,
                           rand_centroids, rand_gmm, rand_map)

GEOMETRY_FREE = [n for n in HEAD_NAMES if n not in SPATIAL]
MASKED_HEADS = sorted(MASKED)  # the mask properties apply to the heads that declare masks; the others refuse one

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW, SOME = 8, 12  # max_examples per (head, dtype) test

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)


# "points": 2 to 4 scattered valid positions (grid heads then get cells with no valid position inside the bounding box)
MASK_KINDS = ["none", "all", "bernoulli", "single", "points", "rows_cols", "rectangle"]


def _make_mask(kind, B, H, W, gen):
    """A (B, H, W) bool mask of the given kind (None for "none"); every image keeps at least one valid position."""
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(B, H, W, dtype=torch.bool)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    for b in range(B):
        if kind == "bernoulli":
            q = float(torch.rand((), generator=gen))
            m = torch.rand(H, W, generator=gen) < q
        elif kind == "single":
            m = torch.zeros(H, W, dtype=torch.bool)
        elif kind == "points":
            m = torch.zeros(H * W, dtype=torch.bool)
            m[torch.randperm(H * W, generator=gen)[:int(torch.randint(2, 5, (), generator=gen))]] = True
            m = m.view(H, W)
        elif kind == "rows_cols":  # whole rows and whole columns invalid
            rows = torch.rand(H, generator=gen) < 0.6
            cols = torch.rand(W, generator=gen) < 0.6
            rows[int(torch.randint(0, H, (), generator=gen))] = True
            cols[int(torch.randint(0, W, (), generator=gen))] = True
            m = rows[:, None] & cols[None, :]
        elif kind == "rectangle":
            t, bt = sorted(int(v) for v in torch.randint(0, H, (2,), generator=gen))
            l, r = sorted(int(v) for v in torch.randint(0, W, (2,), generator=gen))
            m = torch.zeros(H, W, dtype=torch.bool)
            m[t:bt + 1, l:r + 1] = True
        else:
            raise AssertionError(kind)
        if not bool(m.any()):  # "single", or an unlucky draw: one random valid position
            m[int(torch.randint(0, H, (), generator=gen)), int(torch.randint(0, W, (), generator=gen))] = True
        mask[b] = m
    return mask


@st.composite
def problems(draw, name, dtype, mask_kinds=tuple(MASK_KINDS), max_batch=3, build=None):
    """(head, x, mask or None, generator): a random head of the registry name (or ``build(C, K)``) and a random input
    for it. A registered head that takes no mask gets none; a fixed-size one is built for the drawn H x W."""
    C = draw(st.integers(4, 8))
    K = draw(st.integers(2, 4))
    B = draw(st.integers(1, max_batch))
    H = draw(st.integers(1, 9))
    W = draw(st.integers(1, 9))
    kind = draw(st.sampled_from(list(mask_kinds)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = make_head(name, C, K, dtype=dtype, size=(H, W)) if build is None else build(C, K).to(dtype)
    if build is None and not capabilities(name).mask:
        kind = "none"
    x = rand_map(B, C, H, W, kind=input_kind(name), dtype=dtype)
    return head, x, _make_mask(kind, B, H, W, gen), gen


def _fill_masked(x, mask, how, gen):
    """x with the masked-out positions replaced by garbage of the given kind."""
    if mask is None:
        return x
    if how == "zeros":
        g = torch.zeros_like(x)
    elif how == "random":
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    elif how == "huge":
        g = (torch.sign(torch.randn(x.shape, generator=gen, dtype=torch.float64)) * 1e30).to(x.dtype)
    elif how == "nan":
        g = torch.full_like(x, float("nan"))
    elif how == "inf":
        g = torch.full_like(x, float("inf"))
        g[:, ::2] = -float("inf")
    else:
        raise AssertionError(how)
    return torch.where(mask.unsqueeze(1), x, g)


# ----------------------------------------------------------------------------------------------------------------------
# shape, dtype, finiteness


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64"),
                                      pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_output_shape_dtype_finite(name, in_dtype, device):
    """(B, out_dim), finite; dtype: the input's, float32 for half-precision input (base.py; head in float32 then)."""
    head_dtype = in_dtype if in_dtype in (torch.float32, torch.float64) else torch.float32
    out_dtype = head_dtype

    @settings(max_examples=SOME, **SETTINGS)
    @given(problems(name, head_dtype))
    def check(problem):
        head, x, mask, gen = problem
        head = head.to(device)
        x = _fill_masked(x, mask, "nan", gen).to(device=device, dtype=in_dtype)
        y = head(x, mask=None if mask is None else mask.to(device))
        assert y.shape == (x.shape[0], head.out_dim)
        assert y.dtype == out_dtype and y.device == x.device
        assert torch.isfinite(y).all(), y

    check()


# ----------------------------------------------------------------------------------------------------------------------
# masks


MASKED_KINDS = tuple(k for k in MASK_KINDS if k not in ("none", "all"))


def _check_masked_values_do_not_matter(head, x, mask, gen, how, dtype, device):
    """Output and gradients with the masked-out values replaced by ``how`` garbage equal those with zeros there."""
    head, mask = head.to(device), mask.to(device)
    results = []
    for fill in ("zeros", how):
        xx = _fill_masked(x, mask.cpu(), fill, gen).to(device).requires_grad_(True)
        head.zero_grad(set_to_none=True)
        y = head(xx, mask=mask)
        grads = None
        if y.requires_grad:
            r = torch.linspace(-1, 2, y.numel(), dtype=y.dtype, device=device).view_as(y)
            (y * r).sum().backward()
            grads = (xx.grad, {n: p.grad for n, p in head.named_parameters() if p.requires_grad})
        results.append((y.detach(), grads))
    (y0, g0), (y1, g1) = results
    assert torch.isfinite(y1).all(), f"masked {how} leaked into the output: {y1}"
    assert_close(y1, y0, **_tol(dtype), msg=f"masked {how}")
    if g0 is None:
        return
    assert torch.isfinite(g1[0]).all(), f"masked {how} leaked into the input gradient"
    assert torch.all(g1[0].transpose(0, 1)[:, ~mask] == 0), "non-zero gradient at masked positions"
    assert_close(g1[0], g0[0], **_tol(dtype))
    assert set(g1[1]) == set(g0[1])
    for n in g0[1]:
        assert (g0[1][n] is None) == (g1[1][n] is None), n
        if g0[1][n] is not None:
            assert torch.isfinite(g1[1][n]).all(), f"masked {how} leaked into the gradient of {n}"
            assert_close(g1[1][n], g0[1][n], **_tol(dtype), msg=n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MASKED_HEADS)
def test_masked_values_do_not_change_output_or_gradients(name, dtype, device):
    """Replacing the masked-out values by random / +-1e30 / NaN / +-inf values changes neither the output nor the
    gradients (input gradient 0 at masked positions, parameter gradients unchanged, all finite)."""

    @settings(max_examples=SOME, **SETTINGS)
    @given(problems(name, dtype, mask_kinds=MASKED_KINDS), st.sampled_from(["random", "huge", "nan", "inf"]))
    def check(problem, how):
        _check_masked_values_do_not_matter(*problem, how, dtype, device)

    check()


# non-default configurations of the registered heads (trainable parameters inside grid heads, other pooling modes)
VARIANTS = {
    "rmac_gem": lambda C, K: RMAC(C, pool="gem"),
    "rmac_include_global": lambda C, K: RMAC(C, include_global=True),
    "gem_per_channel": lambda C, K: GeM(C, per_channel=True),
    "spatial_pyramid_netvlad": lambda C, K: SpatialPyramid(NetVLAD.from_centroids(rand_centroids(K, C), alpha=4.0),
                                                           levels=(1, 2, 3)),
    "spatial_pyramid_netfv": lambda C, K: SpatialPyramid(NetFV.from_gmm(*rand_gmm(K, C)), levels=(2,)),
    "netvlad_hard": lambda C, K: NetVLAD.from_centroids(rand_centroids(K, C), alpha=float("inf")),
    "netvlad_power_raw_input": lambda C, K: NetVLAD(C, K, power=0.5, normalize_input=False, alpha=2.0),
    "netbof_normalize_input": lambda C, K: NetBoF(C, K, normalize_input=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_masked_values_do_not_matter_for_head_variants(variant, dtype):
    @settings(max_examples=FEW, **SETTINGS)
    @given(problems(variant, dtype, mask_kinds=MASKED_KINDS, build=VARIANTS[variant]),
           st.sampled_from(["random", "huge", "nan", "inf"]))
    def check(problem, how):
        _check_masked_values_do_not_matter(*problem, how, dtype, "cpu")

    check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [n for n in GEOMETRY_FREE if n in MASKED])
def test_geometry_free_heads_see_only_the_valid_descriptors(name, dtype):
    """For heads without geometry, image b of a masked map equals the 1 x N_b map of its valid descriptors (row-major
    order; any order would do) — in particular a single valid position equals the 1 x 1 map of that position."""

    @settings(max_examples=SOME, **SETTINGS)
    @given(problems(name, dtype, mask_kinds=("bernoulli", "single", "points", "rows_cols", "rectangle")))
    def check(problem):
        head, x, mask, gen = problem
        y = head(_fill_masked(x, mask, "nan", gen), mask=mask)
        for b in range(x.shape[0]):
            strip = x[b][:, mask[b]].reshape(1, x.shape[1], 1, -1)
            assert_close(y[b], head(strip)[0], **_tol(dtype), msg=f"image {b}, {int(mask[b].sum())} valid")
            column = strip.transpose(2, 3)  # N x 1 instead of 1 x N: no geometry, same descriptor
            assert_close(head(column)[0], y[b], **_tol(dtype))

    check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MASKED_HEADS)
def test_single_valid_position_equals_one_by_one_map(name, dtype):
    """One valid position (anywhere, the rest NaN): the output is that of the 1 x 1 map of its descriptor — for the
    grid heads too, since their grid is laid on the bounding box of the valid positions (a 1 x 1 box)."""

    @settings(max_examples=FEW, **SETTINGS)
    @given(problems(name, dtype, mask_kinds=("single",)))
    def check(problem):
        head, x, mask, gen = problem
        y = head(_fill_masked(x, mask, "nan", gen), mask=mask)
        for b in range(x.shape[0]):
            (i,), (j,) = torch.nonzero(mask[b], as_tuple=True)
            assert_close(y[b], head(x[b:b + 1, :, i:i + 1, j:j + 1])[0], **_tol(dtype))

    check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MASKED_HEADS)
def test_valid_rectangle_equals_its_crop(name, dtype):
    """A valid sub-rectangle (garbage around it) equals the cropped map, for every head (grid heads included)."""

    @settings(max_examples=FEW, **SETTINGS)
    @given(problems(name, dtype, mask_kinds=("rectangle", "single")))
    def check(problem):
        head, x, mask, gen = problem
        y = head(_fill_masked(x, mask, "huge", gen), mask=mask)
        for b in range(x.shape[0]):
            rows = torch.nonzero(mask[b].any(1)).flatten()
            cols = torch.nonzero(mask[b].any(0)).flatten()
            crop = x[b:b + 1, :, int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
            assert_close(y[b], head(crop)[0], **_tol(dtype))

    check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_batch_items_are_independent(name, dtype, device):
    """A head applied to a batch equals each item alone (with its own mask)."""

    @settings(max_examples=SOME, **SETTINGS)
    @given(problems(name, dtype, max_batch=4))
    def check(problem):
        head, x, mask, gen = problem
        head, x = head.to(device), _fill_masked(x, mask, "nan", gen).to(device)
        mask = None if mask is None else mask.to(device)
        y = head(x, mask=mask)
        for b in range(x.shape[0]):
            alone = head(x[b:b + 1], mask=None if mask is None else mask[b:b + 1])
            assert_close(y[b], alone[0], **_tol(dtype), msg=f"item {b}")

    check()


# ----------------------------------------------------------------------------------------------------------------------
# NaN / Inf at valid positions: no exception; the behaviour observed (and now pinned) per head

NONFINITE, FINITE, EITHER = "non-finite", "finite", "either"
SINGLE = "non-finite iff the image has a single valid position"
# name -> (behaviour for +inf, behaviour for -inf) at one valid position of image 0 (NaN is always NON-FINITE).
#  gem / spatial_pyramid(gem): -inf is clamped at eps -> finite; +inf -> inf.
#  mac: +inf -> inf; -inf is not the max -> finite, unless it is the image's only valid position (then -inf): SINGLE.
#  rmac: +inf -> inf / inf = NaN in the L2 normalisation; -inf: finite, unless a region contains nothing else (1-wide
#        regions on tiny maps, unmasked) -> NaN: data-dependent.
#  bof: the arg-max of +-inf logits picks a cluster (finite histogram) unless a logit is NaN (0 * inf): data-dependent.
#  spoc, crow, netvlad, vlad, netbof, netfv, fisher_vector: non-finite for both signs.
INF_BEHAVIOUR = {
    "mac": (NONFINITE, SINGLE), "gem": (NONFINITE, FINITE), "spatial_pyramid": (NONFINITE, FINITE),
    "rmac": (NONFINITE, EITHER), "bof": (EITHER, EITHER),
    "spoc": (NONFINITE, NONFINITE), "crow": (NONFINITE, NONFINITE), "netvlad": (NONFINITE, NONFINITE),
    "vlad": (NONFINITE, NONFINITE), "netbof": (NONFINITE, NONFINITE), "netfv": (NONFINITE, NONFINITE),
    "fisher_vector": (NONFINITE, NONFINITE),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_nonfinite_at_a_valid_position(name, dtype, value):
    """No exception; image 0 behaves as documented in INF_BEHAVIOUR (NaN: non-finite output); the other images of
    the batch are unaffected. The same value at a masked-out position leaves the output finite and unchanged."""
    if value != value:
        expected = NONFINITE
    else:
        expected = INF_BEHAVIOUR.get(name, (EITHER, EITHER))[0 if value > 0 else 1]

    @settings(max_examples=FEW, **SETTINGS)
    @given(problems(name, dtype, max_batch=3), st.data())
    def check(problem, data):
        head, x, mask, gen = problem
        valid = torch.ones(x.shape[2:], dtype=torch.bool) if mask is None else mask[0]
        positions = torch.nonzero(valid).tolist()
        i, j = positions[data.draw(st.integers(0, len(positions) - 1), label="position")]
        c = data.draw(st.integers(0, x.shape[1] - 1), label="channel")
        clean = head(x, mask=mask)
        bad = x.clone()
        bad[0, c, i, j] = value
        y = head(bad, mask=mask)  # never raises
        assert y.shape == clean.shape
        single = int(valid.sum()) == 1
        if expected == NONFINITE or (expected == SINGLE and single):
            assert not torch.isfinite(y[0]).all(), f"{value} at a valid position vanished: {y[0]}"
        elif expected == FINITE or (expected == SINGLE and not single):
            assert torch.isfinite(y[0]).all(), f"{value} at a valid position: {y[0]}"
        if x.shape[0] > 1:
            assert_close(y[1:], clean[1:], **_tol(dtype), msg="other images changed")
        if mask is not None and not bool(mask[0].all()):  # the same value at a masked-out position is ignored
            (mi, mj) = torch.nonzero(~mask[0])[0].tolist()
            masked = x.clone()
            masked[0, c, mi, mj] = value
            ym = head(masked, mask=mask)
            assert torch.isfinite(ym).all()
            assert_close(ym, clean, **_tol(dtype))

    check()


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs: ONE TypeError / ValueError naming the argument


X_WORD = r"\bx\b"


def _raises_one(exc_types, pattern, fn):
    """fn() raises an instance of exc_types (and not a subclass of the other one) matching pattern, raised by the
    validation itself: not chained from another exception."""
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    err = info.value
    assert isinstance(err, exc_types), f"{type(err).__name__} instead of {exc_types}: {err}"
    assert info.match(pattern)
    assert err.__cause__ is None and err.__context__ is None, f"chained error: {err!r} from {err.__context__!r}"
    return err


@st.composite
def good_shapes(draw):
    return (draw(st.integers(1, 3)), draw(st.integers(4, 8)), draw(st.integers(2, 4)), draw(st.integers(1, 9)),
            draw(st.integers(1, 9)))


BAD_X = {  # case -> (x builder from (B, C, H, W, generator), expected exception type)
    "wrong_channels": (lambda B, C, H, W, r: torch.rand(B, C + int(r.integers(1, 5)) * int(r.choice([-1, 1])) or 1,
                                                        H, W), ValueError),
    "rank3": (lambda B, C, H, W, r: torch.rand(C, H, W), ValueError),
    "rank5": (lambda B, C, H, W, r: torch.rand(B, C, H, W, 1), ValueError),
    "rank5_leading": (lambda B, C, H, W, r: torch.rand(1, B, C, H, W), ValueError),
    "empty_batch": (lambda B, C, H, W, r: torch.rand(0, C, H, W), ValueError),
    "zero_height": (lambda B, C, H, W, r: torch.rand(B, C, 0, W), ValueError),
    "zero_width": (lambda B, C, H, W, r: torch.rand(B, C, H, 0), ValueError),
    "int64": (lambda B, C, H, W, r: torch.randint(0, 5, (B, C, H, W)), TypeError),
    "int32": (lambda B, C, H, W, r: torch.randint(0, 5, (B, C, H, W), dtype=torch.int32), TypeError),
    "uint8": (lambda B, C, H, W, r: torch.randint(0, 5, (B, C, H, W), dtype=torch.uint8), TypeError),
    "bool": (lambda B, C, H, W, r: torch.rand(B, C, H, W) > 0.5, TypeError),
    "numpy": (lambda B, C, H, W, r: np.random.default_rng(0).random((B, C, H, W)).astype(np.float32), TypeError),
    "nested_list": (lambda B, C, H, W, r: torch.rand(B, C, H, W).tolist(), TypeError),
    "none": (lambda B, C, H, W, r: None, TypeError),
}


@pytest.mark.parametrize("case", sorted(BAD_X))
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_bad_x_raises_one_error_naming_x(name, case):
    build, exc = BAD_X[case]

    @settings(max_examples=4, **SETTINGS)
    @given(good_shapes(), st.booleans(), st.integers(0, 2 ** 16))
    def check(shape, with_mask, seed):
        B, C, K, H, W = shape
        head = make_head(name, C, K, dtype=torch.float32)
        x = build(B, C, H, W, np.random.default_rng(seed))
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == C and x.is_floating_point():
            assert 0 in x.shape
        mask = None
        if with_mask and isinstance(x, torch.Tensor) and x.dim() >= 3:
            mask = torch.ones(*x.shape[:-3] or (1,), *x.shape[-2:], dtype=torch.bool)
            if x.dim() == 4:
                mask = torch.ones(x.shape[0], x.shape[2], x.shape[3], dtype=torch.bool)
        _raises_one(exc, X_WORD, lambda: head(x, mask=mask))

    check()


BAD_MASK = {  # case -> (mask builder from (B, H, W), expected exception type)
    "transposed": (lambda B, H, W: torch.ones(B, W + (H == W), H, dtype=torch.bool), ValueError),
    "taller": (lambda B, H, W: torch.ones(B, H + 1, W, dtype=torch.bool), ValueError),
    "narrower": (lambda B, H, W: torch.ones(B, H, W - 1, dtype=torch.bool), ValueError),
    "more_images": (lambda B, H, W: torch.ones(B + 1, H, W, dtype=torch.bool), ValueError),
    "no_batch_dim": (lambda B, H, W: torch.ones(H, W, dtype=torch.bool), ValueError),
    "channel_dim": (lambda B, H, W: torch.ones(B, 1, H, W, dtype=torch.bool), ValueError),
    "uint8": (lambda B, H, W: torch.ones(B, H, W, dtype=torch.uint8), TypeError),
    "float32": (lambda B, H, W: torch.ones(B, H, W), TypeError),
    "float64_zeros_and_ones": (lambda B, H, W: (torch.rand(B, H, W) < 0.5).double(), TypeError),
    "int64": (lambda B, H, W: torch.ones(B, H, W, dtype=torch.int64), TypeError),
    "numpy_bool": (lambda B, H, W: np.ones((B, H, W), dtype=bool), TypeError),
    "nested_list": (lambda B, H, W: torch.ones(B, H, W, dtype=torch.bool).tolist(), TypeError),
    "meta_device": (lambda B, H, W: torch.ones(B, H, W, dtype=torch.bool, device="meta"), ValueError),
}


@pytest.mark.parametrize("case", sorted(BAD_MASK))
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_bad_mask_raises_one_error_naming_mask(name, case):
    build, exc = BAD_MASK[case]

    @settings(max_examples=4, **SETTINGS)
    @given(good_shapes())
    def check(shape):
        B, C, K, H, W = shape
        if case == "narrower" and W == 1:
            W = 2
        head = make_head(name, C, K, dtype=torch.float32)
        x = rand_map(B, C, H, W, kind=input_kind(name), dtype=torch.float32)
        _raises_one(exc, "mask", lambda: head(x, mask=build(B, H, W)))

    check()


@pytest.mark.parametrize("name", MASKED_HEADS)
def test_all_false_mask_for_one_item_raises_value_error_naming_mask(name):
    @settings(max_examples=6, **SETTINGS)
    @given(problems(name, torch.float32, mask_kinds=("all", "bernoulli", "single", "points", "rows_cols")), st.data())
    def check(problem, data):
        head, x, mask, gen = problem
        mask = torch.ones(x.shape[0], *x.shape[2:], dtype=torch.bool) if mask is None else mask.clone()
        b = data.draw(st.integers(0, x.shape[0] - 1), label="empty image")
        mask[b] = False
        err = _raises_one(ValueError, "mask", lambda: head(x, mask=mask))
        assert str(b) in str(err)

    check()


@requires_cuda
@pytest.mark.parametrize("name", MASKED_HEADS)
def test_mask_on_another_device_raises_value_error_naming_mask(name):
    head = make_head(name, 4, 3, dtype=torch.float32)
    x = rand_map(2, 4, 5, 6, kind=input_kind(name), dtype=torch.float32)
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    _raises_one(ValueError, "mask", lambda: head(x, mask=mask.cuda()))
    _raises_one(ValueError, "mask", lambda: head.cuda()(x.cuda(), mask=mask))


# ----------------------------------------------------------------------------------------------------------------------
# memory layout: non-contiguous inputs give the same result as contiguous ones


def _layouts(x, mask):
    """(name, x', mask') with the same values as (x, mask) in other memory layouts."""
    B, C, H, W = x.shape
    yield "channels_last", x.contiguous(memory_format=torch.channels_last), mask
    wide = torch.full((B, C, H, 2 * W), float("nan"), dtype=x.dtype)
    wide[..., ::2] = x
    yield "strided_columns", wide[..., ::2], mask
    yield "transposed_view", x.transpose(2, 3).contiguous().transpose(2, 3), (
        None if mask is None else mask.transpose(1, 2).contiguous().transpose(1, 2))
    yield "expanded_batch", x[:1].expand(B, -1, -1, -1), None if mask is None else mask[:1].expand(B, -1, -1)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_non_contiguous_inputs_equal_contiguous(name):
    dtype = torch.float64

    @settings(max_examples=FEW, **SETTINGS)
    @given(problems(name, dtype))
    def check(problem):
        head, x, mask, gen = problem
        for layout, xl, ml in _layouts(x, mask):
            ref = head(xl.contiguous(), mask=None if ml is None else ml.contiguous())
            assert_close(head(xl, mask=ml), ref, **_tol(dtype), msg=layout)

    check()


# ----------------------------------------------------------------------------------------------------------------------
# explicit regression examples (found by the properties above; kept so that they run whatever hypothesis draws)


PYRAMID_EMPTY_CELL_HEADS = {
    "spatial_pyramid": lambda C, K: make_head("spatial_pyramid", C, K),
    "spatial_pyramid_netvlad": VARIANTS["spatial_pyramid_netvlad"],
}


@pytest.mark.parametrize("how", ["nan", "inf", "huge"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sorted(PYRAMID_EMPTY_CELL_HEADS))
def test_pyramid_cell_without_valid_position_ignores_masked_values(variant, dtype, how):
    """A 2 x 3 map whose level-2 cell (1, 0) has no valid position (it is encoded, then replaced by zeros): masked
    NaN / inf / 1e30 there must not reach the output nor any gradient (input or inner head's parameters)."""
    torch.manual_seed(0)
    head = PYRAMID_EMPTY_CELL_HEADS[variant](4, 3).to(dtype)
    x = rand_map(1, 4, 2, 3, kind="positive", dtype=dtype)
    mask = torch.tensor([[[True, False, True], [False, False, True]]])
    _check_masked_values_do_not_matter(head, x, mask, torch.Generator().manual_seed(0), how, dtype, "cpu")
