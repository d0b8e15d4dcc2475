"""Common interface: registry, out_dim, repr, constructor signatures, dtypes (incl. half precision and CPU bf16
autocast), CUDA (skipped without a GPU), and the post-processing modules (Whitening, L2Norm, PowerNorm, IntraNorm)."""

import inspect

import numpy as np
import pytest
import torch

import aggnets
from aggnets import heads as AH
from tests import references as R
from tests.conftest import requires_cuda
from tests.helpers import (CODEBOOK, EXPECTED_NAMES, HEAD_NAMES, MASKED, assert_close, expected_out_dim,
                           input_kind, make_head, rand_map, rel_err)

C, K = 4, 3


def _x(name, B=2, H=5, W=6, dtype=torch.float32):
    return rand_map(B, C, H, W, kind=input_kind(name), dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# registry


def test_list_heads_sorted_and_contains_contract_names():
    names = aggnets.list_heads()
    assert list(names) == sorted(names)
    assert set(EXPECTED_NAMES) <= set(names)
    assert len(set(names)) == len(names)


def test_build_head_netvlad_example():
    head = aggnets.build_head("netvlad", in_channels=16, num_clusters=8)
    assert isinstance(head, AH.NetVLAD) and isinstance(head, torch.nn.Module)
    assert head.out_dim == 128 and head.in_channels == 16
    assert head(torch.randn(2, 16, 3, 4)).shape == (2, 128)


@pytest.mark.parametrize(
    "name,kwargs,cls,out_dim",
    [
        ("mac", {"in_channels": 6}, "MAC", 6),
        ("spoc", {"in_channels": 6}, "SPoC", 6),
        ("gem", {"in_channels": 6, "p": 2.0}, "GeM", 6),
        ("crow", {"in_channels": 6}, "CroW", 6),
        ("rmac", {"in_channels": 6, "levels": 2}, "RMAC", 6),
        ("spatial_pyramid", {"head": "mac", "in_channels": 6, "levels": (1, 2)}, "SpatialPyramid", 30),
        ("netvlad", {"in_channels": 6, "num_clusters": 5}, "NetVLAD", 30),
        ("vlad", {"in_channels": 6, "num_clusters": 5}, "VLAD", 30),
        ("netbof", {"in_channels": 6, "num_clusters": 5}, "NetBoF", 5),
        ("bof", {"in_channels": 6, "num_clusters": 5}, "BoF", 5),
        ("netfv", {"in_channels": 6, "num_clusters": 5}, "NetFV", 60),
        ("fisher_vector", {"in_channels": 6, "num_clusters": 5}, "FisherVector", 60),
    ],
)
def test_build_head_builds_the_right_class(name, kwargs, cls, out_dim):
    head = aggnets.build_head(name, **kwargs)
    assert type(head) is getattr(AH, cls)
    assert head.out_dim == out_dim and isinstance(head.out_dim, int)
    assert head.in_channels == 6
    assert head(torch.rand(2, 6, 5, 4)).shape == (2, out_dim)
    assert aggnets.build_head(name, **kwargs) is not head


def test_build_head_unknown_name_lists_names():
    with pytest.raises((KeyError, ValueError)) as exc:
        aggnets.build_head("no_such_head", in_channels=4)
    msg = str(exc.value)
    for n in ("netvlad", "gem", "rmac"):
        assert n in msg


def test_functional_exposes_contract_functions():
    import aggnets.functional as F

    for fn in ("l2_normalize", "signed_power", "intra_normalize", "mac", "spoc", "gem", "crow", "rmac",
               "rmac_regions", "netvlad", "netbof"):
        assert callable(getattr(F, fn)), fn


# ----------------------------------------------------------------------------------------------------------------------
# every head


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_out_dim_matches_output_for_every_head(name):
    head = make_head(name, C, K, dtype=torch.float32)
    assert isinstance(head, torch.nn.Module)
    assert isinstance(head.out_dim, int) and head.in_channels == C
    exp = expected_out_dim(name, C, K)
    if exp is not None:
        assert head.out_dim == exp
    for B, H, W in [(1, 1, 1), (2, 5, 6), (3, 7, 3)]:
        sized = head if head.map_size is None else make_head(name, C, K, dtype=torch.float32, size=(H, W))
        y = sized(_x(name, B, H, W))
        assert y.shape == (B, sized.out_dim)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_repr_contains_in_channels_and_out_dim(name):
    head = make_head(name, C=13, K=3, dtype=torch.float32)
    r = repr(head)
    assert "13" in r and str(head.out_dim) in r, r


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_constructor_signature(name):
    cls = type(make_head(name, C, K))
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    if name == "spatial_pyramid":  # SpatialPyramid(head, levels=(1, 2, 4), in_channels=None, head_kwargs=None)
        assert params[:4] == ["head", "levels", "in_channels", "head_kwargs"]
        return
    assert params[0] == "in_channels"
    if name in CODEBOOK:
        assert params[1] == "num_clusters"


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_output_dtype_follows_input(name, dtype):
    head = make_head(name, C, K, dtype=dtype)
    y = head(_x(name, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_input_gives_float32(name, half):
    head = make_head(name, C, K, dtype=torch.float32)
    xh = _x(name).to(half)
    y = head(xh)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert rel_err(y, head(xh.float())) < 5e-2


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_cpu_bf16_autocast_gives_finite_float32_close_to_float32(name):
    head = make_head(name, C, K, dtype=torch.float32)
    x = _x(name)
    ref = head(x)
    x.requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = head(x)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert rel_err(y, ref) < 5e-2
    if not y.requires_grad:  # BoF: a histogram of hard assignments has no gradient
        return
    y.square().sum().backward()  # the backward runs too (training under bf16-mixed on CPU)
    assert x.grad is None or torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------------------------------
# CUDA (skipped on machines without a GPU)


@requires_cuda
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_cuda_matches_cpu(name):
    head = make_head(name, C, K, dtype=torch.float64)
    x = _x(name, dtype=torch.float64)
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    mask[1, 4:, :] = False
    if name not in MASKED:
        mask = None
    ref = head(x, mask=mask)
    y = head.cuda()(x.cuda(), mask=mask.cuda())
    assert y.device.type == "cuda" and y.dtype == torch.float64
    assert_close(y.cpu(), ref, rtol=1e-7, atol=1e-9)


@requires_cuda
@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cuda_autocast_gives_float32(name, half):
    head = make_head(name, C, K, dtype=torch.float32)
    x = _x(name)
    ref = head(x)
    head = head.cuda()
    with torch.autocast(device_type="cuda", dtype=half):
        y = head(x.cuda())
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert rel_err(y.cpu(), ref) < 5e-2


@requires_cuda
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_cuda_backward(name):
    head = make_head(name, C, K, dtype=torch.float32).cuda()
    x = _x(name).cuda().requires_grad_(True)
    y = head(x)
    if y.requires_grad:
        y.square().sum().backward()
        assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------------------------------
# post-processing modules


def test_whitening_is_linear_and_identity_at_init():
    w = AH.Whitening(6)
    assert isinstance(w, torch.nn.Linear)
    assert w.in_features == 6 and w.out_features == 6
    assert torch.equal(w.weight.detach(), torch.eye(6))
    assert w.bias is not None and torch.equal(w.bias.detach(), torch.zeros(6))
    assert w.weight.requires_grad and w.bias.requires_grad
    x = torch.randn(3, 6, dtype=torch.float64)
    assert_close(w.double()(x), np.stack([R.l2n(v) for v in x.numpy()]))
    plain = AH.Whitening(6, normalize=False).double()
    assert_close(plain(x), x.numpy())


def test_whitening_from_mean_projection_matches_reference():
    D, Dout = 6, 4
    m = torch.randn(D, dtype=torch.float64)
    P = torch.randn(Dout, D, dtype=torch.float64)
    w = AH.Whitening.from_mean_projection(m, P).double()
    assert isinstance(w, torch.nn.Linear) and w.in_features == D and w.out_features == Dout
    x = torch.randn(5, D, dtype=torch.float64)
    ref = []
    for v in x.numpy():
        y = [sum(P.numpy()[i, j] * (v[j] - m.numpy()[j]) for j in range(D)) for i in range(Dout)]
        ref.append(R.l2n(np.array(y)))
    # from_mean_projection may store float32 parameters: float32-level tolerance
    assert_close(w(x), np.stack(ref), rtol=1e-5, atol=1e-6)


def test_whitening_from_mean_projection_exact_float64():
    """Dyadic mean/projection: exact in any parameter precision, so the float64 result must match tightly."""
    D, Dout = 5, 3
    m = torch.randint(-8, 9, (D,)).double() / 8
    P = torch.randint(-8, 9, (Dout, D)).double() / 8
    P[0, 0] = 1.0
    w = AH.Whitening.from_mean_projection(m, P).double()
    x = torch.randn(4, D, dtype=torch.float64)
    ref = np.stack([R.l2n(P.numpy() @ (v - m.numpy())) for v in x.numpy()])
    assert_close(w(x), ref, rtol=1e-10, atol=1e-12)


def test_l2norm_matches_reference():
    x = torch.randn(4, 7, dtype=torch.float64)
    assert_close(AH.L2Norm()(x), np.stack([R.l2n(v) for v in x.numpy()]))


@pytest.mark.parametrize("alpha", [0.5, 0.25, 1.0])
def test_powernorm_matches_reference(alpha):
    x = torch.randn(4, 7, dtype=torch.float64)
    assert_close(AH.PowerNorm(power=alpha)(x), R.signed_power(x.numpy(), alpha))
    with pytest.warns(FutureWarning, match="exponent is called power"):
        assert AH.PowerNorm(alpha=alpha).power == alpha


def test_powernorm_default_alpha_half():
    x = torch.randn(4, 7, dtype=torch.float64)
    assert_close(AH.PowerNorm()(x), R.signed_power(x.numpy(), 0.5))


def test_intranorm_matches_reference():
    Kc, Cc = 3, 5
    x = torch.randn(4, Kc * Cc, dtype=torch.float64)
    x[1, Cc:2 * Cc] = 0.0  # an empty cluster block stays zero
    ref = np.stack([np.concatenate([R.l2n(v[k * Cc:(k + 1) * Cc]) for k in range(Kc)]) for v in x.numpy()])
    assert_close(AH.IntraNorm(Kc)(x), ref)


@pytest.mark.parametrize("cls", ["L2Norm", "PowerNorm", "IntraNorm", "Whitening"])
def test_norm_modules_are_not_registered_heads(cls):
    assert cls.lower() not in aggnets.list_heads()
    assert hasattr(AH, cls)


def test_feat_mult_is_deprecated_for_out_dim():
    head = AH.NetVLAD(4, 3)
    with pytest.warns(FutureWarning, match="use head.out_dim / head.in_channels"):
        assert head.feat_mult() == head.out_dim / head.in_channels == 3.0
