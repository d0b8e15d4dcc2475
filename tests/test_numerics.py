"""Numerical robustness of every registered head at the edges of the input range.

Inputs: all-zero maps, huge activations (1e4 scale; signed as well for the heads that take signed input, see
tests/helpers.input_kind), tiny ones (1e-8) and a mix of all scales in one map. Precisions: float32, float64, CPU
autocast with bfloat16 and float16 (float16 only where CPU autocast supports it), and the same on CUDA (skipped
without a GPU). Property: the forward output is finite AND, after backward of a random linear functional of the
output, the gradient w.r.t. the input and w.r.t. every trainable parameter is finite.

Then the specific hazards: GeM's power (large p, huge inputs, trainable p), the softmax assignment of NetVLAD / NetBoF
(large alpha, huge inputs), the GMM posteriors of NetFV / FisherVector far from every mean (log-space), L2
normalisation of an all-zero vector (value and gradient), CroW on an all-zero map.
"""

import math

import pytest
import torch

import aggnets.functional as AF
from aggnets.heads import (BoF, CroW, FisherVector, GeM, IntraNorm, L2Norm, MAC, NetBoF, NetFV, NetVLAD, RMAC, SPoC,
                           SpatialPyramid, Whitening)
from tests.conftest import requires_cuda
from tests.helpers import HEAD_NAMES, MASKED, assert_close, input_kind, make_head, rand_centroids, rand_gmm

C, K = 5, 3
B, H, W = 2, 4, 5


def _cpu_autocast_supports(dtype):
    try:
        with torch.autocast(device_type="cpu", dtype=dtype):
            return torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == dtype
    except Exception:  # noqa: BLE001 - an unsupported dtype may raise or warn-and-disable depending on the version
        return False


CPU_F16_AUTOCAST = _cpu_autocast_supports(torch.float16)

# mode -> (device, parameter / input dtype, autocast dtype or None)
MODES = {
    "f32": ("cpu", torch.float32, None),
    "f64": ("cpu", torch.float64, None),
    "cpu_autocast_bf16": ("cpu", torch.float32, torch.bfloat16),
    "cpu_autocast_f16": ("cpu", torch.float32, torch.float16),
    "cuda_f32": ("cuda", torch.float32, None),
    "cuda_autocast_bf16": ("cuda", torch.float32, torch.bfloat16),
    "cuda_autocast_f16": ("cuda", torch.float32, torch.float16),
}


def _mode_params():
    out = []
    for mode in MODES:
        marks = []
        if mode.startswith("cuda"):
            marks.append(requires_cuda)
        if mode == "cpu_autocast_f16":
            marks.append(pytest.mark.skipif(not CPU_F16_AUTOCAST, reason="CPU autocast does not support float16"))
        out.append(pytest.param(mode, marks=marks, id=mode))
    return out


MODE_PARAMS = _mode_params()


def _signed(name):
    return input_kind(name) == "normal"


def _scaled(scale, signed, shape=(B, C, H, W)):
    z = torch.randn(shape, dtype=torch.float64)
    return scale * (z if signed else z.abs())


def _mix(signed, shape=(B, C, H, W)):
    """Each position at one of the scales 0, 1e-8, 1, 1e4 (all four present in every image)."""
    scales = torch.tensor([0.0, 1e-8, 1.0, 1e4], dtype=torch.float64)
    index = torch.randint(0, 4, (shape[0], 1, shape[2], shape[3]))
    index.view(shape[0], -1)[:, :4] = torch.arange(4)
    return scales[index] * _scaled(1.0, signed, shape)


CASES = {
    "zero": lambda name: torch.zeros(B, C, H, W, dtype=torch.float64),
    "huge": lambda name: _scaled(1e4, False),
    "huge_signed": lambda name: _scaled(1e4, True),
    "tiny": lambda name: _scaled(1e-8, False),
    "tiny_signed": lambda name: _scaled(1e-8, True),
    "mix": lambda name: _mix(_signed(name)),
}


def _trainable(module):
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _forward_backward(head, x, mode, mask=None):
    """Run ``head`` in ``mode`` on x (any dtype; converted), backward a random linear functional of the output.

    Returns (y, x_grad or None, {param name: grad}). Asserts the documented output dtype."""
    device, dtype, autocast = MODES[mode]
    head = head.to(device=device, dtype=dtype)
    head.zero_grad(set_to_none=True)
    x = x.to(device=device, dtype=dtype).detach().requires_grad_(True)
    if mask is not None:
        mask = mask.to(device)
    if autocast is None:
        y = head(x, mask=mask)
        assert y.dtype == dtype
    else:
        with torch.autocast(device_type=device, dtype=autocast):
            y = head(x, mask=mask)
        assert y.dtype == torch.float32, "the output is float32 under autocast (base.py)"
    assert y.shape == (x.shape[0], head.out_dim)
    if not y.requires_grad:
        assert not _trainable(head), "trainable parameters but no gradient path"
        return y, None, {}
    r = torch.randn(y.shape, dtype=torch.float64).to(device=device, dtype=y.dtype)
    (y * r).sum().backward()
    return y, x.grad, {n: p.grad for n, p in _trainable(head).items()}


def _assert_all_finite(y, gx, pgrads, what=""):
    assert torch.isfinite(y).all(), f"non-finite output {what}: {y}"
    if gx is not None:
        bad = gx.flatten()[~torch.isfinite(gx.flatten())]
        assert torch.isfinite(gx).all(), f"non-finite input gradient {what}: {bad.numel()} values, e.g. {bad[:5]}"
    for n, g in pgrads.items():
        assert g is not None, f"trainable parameter {n} got no gradient {what}"
        assert torch.isfinite(g).all(), f"non-finite gradient of parameter {n} {what}: {g}"


# ----------------------------------------------------------------------------------------------------------------------
# every head x every input scale x every precision


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_forward_and_gradients_are_finite(name, case, mode):
    if case.endswith("_signed") and not _signed(name):
        pytest.skip(f"{name} is defined for non-negative input (tests/helpers.input_kind)")
    head = make_head(name, C, K, dtype=torch.float32, size=(H, W))
    y, gx, pg = _forward_backward(head, CASES[case](name), mode)
    _assert_all_finite(y, gx, pg, f"({name}, {case}, {mode})")


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("name", sorted(MASKED))
def test_huge_map_with_masked_garbage_is_finite(name, mode):
    """Huge valid activations next to NaN / inf garbage at masked positions: still finite, gradient 0 on the garbage."""
    head = make_head(name, C, K, dtype=torch.float32, size=(H, W))
    x = _scaled(1e4, _signed(name))
    mask = torch.rand(B, H, W) < 0.6
    mask[:, 0, 0] = True
    mask[:, :, -1] = False  # a whole invalid column (outside the bounding box the grid heads crop to)
    mask[:, -1, 0] = True
    x = x.masked_fill(~mask.unsqueeze(1), float("nan"))
    x[:, 0].masked_fill_(~mask, float("inf"))
    y, gx, pg = _forward_backward(head, x, mode, mask=mask)
    _assert_all_finite(y, gx, pg, f"({name}, {mode})")
    if gx is not None:
        assert torch.all(gx.cpu()[~mask.unsqueeze(1).expand_as(gx)] == 0)


# ----------------------------------------------------------------------------------------------------------------------
# GeM: large p, huge inputs, trainable p


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared_p", "per_channel_p"])
@pytest.mark.parametrize("p", [3.0, 8.0, 16.0])
def test_gem_large_p_huge_input(p, per_channel, mode):
    """f = ((1/N) sum x^p)^(1/p) at x ~ 1e4, p = 8: x^p ~ 1e32..1e36 is close to float32's range (p = 16: 1e64, past
    it, but f itself is at most max(x) ~ 4e4); the result must stay finite, lie between the arithmetic mean and the
    max (power-mean inequality for p >= 1), and the gradient w.r.t. the trainable p must be finite and non-zero."""
    head = GeM(C, p=p, per_channel=per_channel)
    x = _scaled(1e4, False, (B, C, 6, 7)) + 1.0
    y, gx, pg = _forward_backward(head, x, mode)
    _assert_all_finite(y, gx, pg)
    assert set(pg) == {"p"} and torch.all(pg["p"] != 0)
    xd = x.double()
    mean, top = xd.mean(dim=(-2, -1)), xd.amax(dim=(-2, -1))
    yd = y.detach().double().cpu()
    tol = 1e-2 if MODES[mode][2] is not None else 1e-5
    assert torch.all(yd <= top * (1 + tol)) and torch.all(yd >= mean * (1 - tol)), (yd, mean, top)


def test_gem_p_gradient_at_huge_input_matches_finite_differences():
    """float64 gradcheck w.r.t. p (shared and per channel) and x at the 1e4 scale with p = 8."""
    x = (_scaled(1e4, False, (2, 3, 3, 4)) + 100.0).requires_grad_(True)
    for per_channel in (False, True):
        head = GeM(3, p=8.0, per_channel=per_channel).double()
        p0 = head.p.detach().clone().requires_grad_(True)

        def f(xx, pp):
            return AF.gem(xx, pp, head.eps)

        assert torch.autograd.gradcheck(f, (x, p0), eps=1e-6, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# softmax assignment: NetVLAD / NetBoF with large alpha and huge inputs


SOFTMAX_HEADS = {
    "netvlad": lambda c, alpha: NetVLAD.from_centroids(c, alpha=alpha),
    "netvlad_raw_input": lambda c, alpha: NetVLAD.from_centroids(c, alpha=alpha, normalize_input=False),
    "netbof": lambda c, alpha: NetBoF.from_centroids(c, alpha=alpha),
    "netbof_normalize_input": lambda c, alpha: NetBoF.from_centroids(c, alpha=alpha, normalize_input=True),
}


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("alpha", [1e2, 1e4])
@pytest.mark.parametrize("variant", sorted(SOFTMAX_HEADS))
def test_softmax_assignment_large_alpha_huge_input(variant, alpha, mode):
    head = SOFTMAX_HEADS[variant](rand_centroids(K, C).float(), alpha)
    x = _scaled(1e4, True)
    y, gx, pg = _forward_backward(head, x, mode)
    _assert_all_finite(y, gx, pg, f"({variant}, alpha={alpha}, {mode})")
    with torch.no_grad():
        device, dtype, _ = MODES[mode]
        a = head.assignment_map(x.to(device=device, dtype=dtype))
    assert torch.isfinite(a).all() and torch.all(a >= 0)
    assert_close(a.sum(dim=1), torch.ones(B, H, W), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_netbof_large_alpha_on_huge_input_equals_hard_bof(dtype):
    """At x ~ 1e4 the squared-distance gaps are ~1e4: softmax(-alpha d^2) is the nearest-centroid one-hot."""
    c = rand_centroids(K, C)
    soft = NetBoF.from_centroids(c, alpha=1e2).to(dtype)
    hard = BoF.from_centroids(c).to(dtype)
    x = _scaled(1e4, True).to(dtype)
    assert_close(soft(x), hard(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# GMM posteriors (NetFV / FisherVector) far from every mean


def _log_space_posteriors(x, weights, means, variances):
    """Reference posteriors (B, K, N) in float64 from per-component log densities (no expanded quadratic form)."""
    X = x.double().flatten(2).transpose(1, 2).unsqueeze(2)                         # (B, N, 1, C)
    mu, var = means.double(), variances.double()
    log_density = -0.5 * (((X - mu) ** 2) / var + torch.log(2 * math.pi * var)).sum(-1)  # (B, N, K)
    return torch.softmax(log_density + torch.log(weights.double()), dim=-1).transpose(1, 2)


FAR = {
    "offset_1e4": lambda means: means.mean(0).view(1, -1, 1, 1) + 1e4 + _scaled(1.0, True),
    "spread_1e4": lambda means: _scaled(1e4, True),
    "offset_-1e3": lambda means: means.mean(0).view(1, -1, 1, 1) - 1e3 + _scaled(10.0, True),
}


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("far", sorted(FAR))
@pytest.mark.parametrize("cls", [NetFV, FisherVector], ids=["netfv", "fisher_vector"])
def test_gmm_posteriors_far_from_all_means(cls, far, mode):
    gmm = rand_gmm(K, C)
    head = cls.from_gmm(*gmm)
    x = FAR[far](gmm[1])
    device, dtype, autocast = MODES[mode]
    head = head.to(device=device, dtype=dtype)
    xx = x.to(device=device, dtype=dtype)
    with torch.no_grad(), torch.autocast(device_type=device, dtype=autocast or torch.bfloat16,
                                         enabled=autocast is not None):
        post = head.assignment_map(xx).flatten(2).cpu()
    assert not torch.isnan(post).any(), "NaN posterior"
    assert torch.all(post >= 0) and torch.all(post <= 1 + 1e-6)
    assert_close(post.sum(dim=1), torch.ones(B, H * W), rtol=1e-5, atol=1e-5)
    ref = _log_space_posteriors(x, *gmm)
    # the forward computes the posterior in float32 (or float64) even under autocast
    assert_close(post, ref, rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-3)
    y, gx, pg = _forward_backward(cls.from_gmm(*gmm), x, mode)
    _assert_all_finite(y, gx, pg, f"({far}, {mode})")


# ----------------------------------------------------------------------------------------------------------------------
# L2 normalisation of an all-zero vector: zeros (documented in functional/norm.py), finite gradient


L2_FUNCTIONS = {
    "l2_normalize": lambda v: AF.l2_normalize(v, dim=-1),
    "L2Norm": lambda v: L2Norm()(v),
    "IntraNorm": lambda v: IntraNorm(2)(v),
    "intra_normalize": lambda v: AF.intra_normalize(v, 2),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["f16", "bf16", "f32", "f64"])
@pytest.mark.parametrize("fn", sorted(L2_FUNCTIONS))
def test_l2_normalisation_of_zero_vector_is_zero_with_finite_gradient(fn, dtype):
    v = torch.randn(3, 6, dtype=torch.float64)
    v[0] = 0.0
    v[1, :3] = 0.0  # one zero block for IntraNorm(2)
    v = v.to(dtype).requires_grad_(True)
    out = L2_FUNCTIONS[fn](v)
    assert out.dtype == dtype
    assert torch.all(out[0] == 0), f"zero vector -> {out[0]}"
    assert torch.isfinite(out).all(), out
    (out.double() * torch.randn(out.shape, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(v.grad).all(), v.grad


ZERO_L2_HEADS = {
    "rmac": lambda: RMAC(C),
    "rmac_gem": lambda: RMAC(C, pool="gem"),
    "mac_normalize": lambda: MAC(C, normalize=True),
    "spoc_normalize": lambda: SPoC(C, normalize=True),
    "crow_normalize": lambda: CroW(C, normalize=True),
    "spatial_pyramid_spoc_normalize": lambda: SpatialPyramid("spoc", levels=(1, 2), in_channels=C,
                                                             head_kwargs={"normalize": True}),
}


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("variant", sorted(ZERO_L2_HEADS))
def test_heads_l2_normalising_a_zero_descriptor(variant, mode):
    """A zero map pools to a zero vector before the L2 normalisation: the output is exactly 0, gradients finite."""
    y, gx, pg = _forward_backward(ZERO_L2_HEADS[variant](), torch.zeros(B, C, H, W), mode)
    _assert_all_finite(y, gx, pg, f"({variant}, {mode})")
    if variant != "rmac_gem":  # GeM clamps at eps: the pooled vector is eps, not 0
        assert torch.all(y == 0), y


@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_whitening_of_the_mean_is_zero_with_finite_gradient(mode):
    """Whitening maps its mean to the zero vector, then L2-normalises it (autocast: nn.Linear runs in half)."""
    D = 6
    # small integers: P m is exact in every precision, so W m + b is exactly 0 (random floats would leave a rounding
    # residual ~1e-7 that the L2 normalisation correctly blows up to a unit vector)
    m = torch.randint(-2, 3, (D,)).double()
    P = torch.randint(-2, 3, (D, D)).double()
    layer = Whitening.from_mean_projection(m, P)
    device, dtype, autocast = MODES[mode]
    layer = layer.to(device=device, dtype=dtype)
    x = torch.stack([m, m + torch.randn(D, dtype=torch.float64)]).to(device=device, dtype=dtype).requires_grad_(True)
    with torch.autocast(device_type=device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = layer(x)
    assert torch.isfinite(y).all(), y
    assert torch.all(y[0] == 0), y[0]
    (y.float() * torch.randn(y.shape, device=device)).sum().backward()
    for name, grad in [("x", x.grad), ("weight", layer.weight.grad), ("bias", layer.bias.grad)]:
        assert torch.isfinite(grad).all(), f"non-finite gradient of {name}: {grad}"


# ----------------------------------------------------------------------------------------------------------------------
# CroW on an all-zero map


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "nan_garbage_masked"])
def test_crow_zero_map(mode, masked):
    """All channel sums are 0 (norm 0, no positive channel): the output is exactly 0 and gradients are finite; a
    non-zero image in the same batch is unaffected."""
    head = CroW(C)
    x = torch.zeros(B, C, H, W, dtype=torch.float64)
    x[1] = torch.relu(torch.randn(C, H, W, dtype=torch.float64))
    mask = None
    if masked:
        mask = torch.ones(B, H, W, dtype=torch.bool)
        mask[:, :, -2:] = False
        x = x.masked_fill(~mask.unsqueeze(1), float("nan"))
    ref = head.double()(x[1:].double(), mask=None if mask is None else mask[1:])
    y, gx, pg = _forward_backward(head, x, mode, mask=mask)
    _assert_all_finite(y, gx, pg, f"({mode})")
    assert torch.all(y[0] == 0), y[0]
    tol = 2e-2 if MODES[mode][2] is not None else 1e-5
    assert_close(y[1].double().cpu(), ref[0], rtol=tol, atol=tol)


def test_crow_all_zero_map_has_no_nan_anywhere_in_backward():
    """Not only a finite final gradient: anomaly detection (which users turn on to hunt NaNs) stays quiet."""
    from aggnets.heads import CroW

    x = torch.zeros(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    with torch.autograd.set_detect_anomaly(True):
        CroW(4).double()(x).sum().backward()
    assert torch.isfinite(x.grad).all()
