"""Shared test helpers: random feature maps, garbage padding, and one factory that builds every registered head.

Which generic checks apply to a head comes from what its class declares (``capabilities``); test_capabilities.py
pins the seed heads' declarations against an independent table. Nothing here computes an expected value; see
references.py for that.
"""

from __future__ import annotations


import torch

import aggnets
from aggnets import heads as AH

HEAD_NAMES = aggnets.list_heads()


def capabilities(name):
    """The declared capabilities of registered head ``name`` (its class attribute)."""
    return aggnets.get_head_class(name).capabilities


# Heads whose output depends only on the multiset of valid local descriptors (not on their positions).
ORDERLESS = {n for n in HEAD_NAMES if capabilities(n).orderless}
# Heads that look at the spatial layout (region / cell grids, positions).
SPATIAL = set(HEAD_NAMES) - ORDERLESS
# Heads with a codebook (num_clusters is their second constructor argument).
CODEBOOK = {n for n in HEAD_NAMES if capabilities(n).codebook != "none"}
# Heads whose output is L2-normalised by definition.
L2_OUTPUT = {n for n in HEAD_NAMES if capabilities(n).l2_output}
# Heads that take the backbone's global token.
TOKEN = {n for n in HEAD_NAMES if capabilities(n).global_token != "none"}
# Heads that honour a mask (the others must refuse one), and heads that take any map size (the others are built for
# one with ``make_head(..., size=(H, W))`` and must refuse another).
MASKED = {n for n in HEAD_NAMES if capabilities(n).mask}
ANY_SIZE = {n for n in HEAD_NAMES if capabilities(n).any_size}

EXPECTED_NAMES = sorted(
    ["bof", "class_token", "crow", "fisher_vector", "gem", "mac", "netbof", "netfv", "netvlad", "rmac",
     "spatial_pyramid", "spoc", "vlad"]
)


def rand_map(B, C, H, W, kind="normal", dtype=torch.float64):
    """Random (B, C, H, W) feature map.

    kind: "normal" (N(0,1)), "positive" (U[0.5, 1.5]), "nonneg" (ReLU of N(0,1): exact zeros present),
    "distinct" (all entries distinct, pairwise >= 1/(numel) apart, in [0.5, 1.5]: no ties for max-based heads).
    """
    shape = (B, C, H, W)
    if kind == "normal":
        x = torch.randn(shape, dtype=torch.float64)
    elif kind == "positive":
        x = 0.5 + torch.rand(shape, dtype=torch.float64)
    elif kind == "nonneg":
        x = torch.relu(torch.randn(shape, dtype=torch.float64))
    elif kind == "distinct":
        n = B * C * H * W
        x = (0.5 + torch.randperm(n, dtype=torch.float64) / max(n - 1, 1)).reshape(shape)
    else:
        raise AssertionError(kind)
    return x.to(dtype)


def garbage_like(shape, dtype=torch.float64):
    """Garbage for padded positions: huge values of both signs, +-inf and NaN, interleaved."""
    g = torch.randn(shape, dtype=torch.float64) * 1e4
    flat = g.view(-1)
    flat[0::5] = float("nan")
    flat[1::7] = float("inf")
    flat[2::11] = -float("inf")
    return g.to(dtype)


def pad_with_garbage(x, H2, W2, top=0, left=0, nan=True):
    """Put x (B, C, H, W) at (top, left) of a (B, C, H2, W2) canvas filled with garbage; return canvas, mask."""
    B, C, H, W = x.shape
    if nan:
        canvas = garbage_like((B, C, H2, W2), dtype=x.dtype)
    else:
        canvas = (torch.randn((B, C, H2, W2), dtype=torch.float64) * 1e3).to(x.dtype)
    canvas[:, :, top:top + H, left:left + W] = x
    mask = torch.zeros((B, H2, W2), dtype=torch.bool)
    mask[:, top:top + H, left:left + W] = True
    return canvas, mask


def rand_centroids(K, C):
    """(K, C) float64 centroids with dyadic entries (multiples of 1/8 in [-1, 1]), distinct non-zero rows.

    Dyadic values make the contract's initialisations (w = 2 alpha c, b = -alpha ||c||^2, for alpha a power of two)
    exact even if an implementation builds its parameters in float32, so float64 comparisons stay exact.
    """
    while True:
        c = torch.randint(-8, 9, (K, C)).double() / 8.0
        if bool((c.abs().sum(1) > 0).all()) and len({tuple(r.tolist()) for r in c}) == K:
            return c


def rand_gmm(K, C):
    """(weights (K,), means (K, C), variances (K, C)) in float64."""
    w = torch.rand(K, dtype=torch.float64) + 0.5
    w = w / w.sum()
    means = torch.randn(K, C, dtype=torch.float64)
    var = 0.5 + 1.5 * torch.rand(K, C, dtype=torch.float64)
    return w, means, var


def make_head(name, C=4, K=3, dtype=torch.float64, size=None):
    """Build registered head `name` with small sizes and a sensible (random) initialisation.

    Codebook heads are initialised from random centroids / a random GMM, so that their assignments are
    non-trivial. Unknown (newly registered) names are built through the registry with in_channels (and
    num_clusters if accepted), so that they are covered by the generic tests automatically.
    """
    if name in ("mac", "spoc", "gem", "crow", "rmac"):
        head = aggnets.build_head(name, in_channels=C)
    elif name == "spatial_pyramid":
        head = aggnets.build_head(name, head="gem", in_channels=C, levels=(1, 2))
    elif name == "netvlad":
        head = AH.NetVLAD.from_centroids(rand_centroids(K, C), alpha=8.0)
    elif name == "vlad":
        head = AH.VLAD.from_centroids(rand_centroids(K, C))
    elif name == "netbof":
        head = AH.NetBoF.from_centroids(rand_centroids(K, C), alpha=1.0)
    elif name == "bof":
        head = AH.BoF.from_centroids(rand_centroids(K, C))
    elif name == "netfv":
        head = AH.NetFV.from_gmm(*rand_gmm(K, C))
    elif name == "fisher_vector":
        head = AH.FisherVector.from_gmm(*rand_gmm(K, C))
    elif name == "salad":  # small MLPs (the authors' width is 512); no dropout, so train-mode outputs are exact
        head = AH.SALAD(C, num_clusters=K, cluster_dim=5, token_dim=3, hidden_dim=8, dropout=0.0)
    elif name == "boq":  # small widths (d = 8, two heads), so the battery runs at the sizes above
        head = AH.BoQ(C, proj_channels=8, num_queries=3, num_layers=2, row_dim=2, num_heads=2)
    else:  # a head added later: build it generically (a fixed-size head for ``size``, through its size_args)
        kwargs = {"in_channels": C}
        size_args = capabilities(name).size_args
        if size_args:
            kwargs.update(zip(size_args, size or (5, 6)))
        try:
            head = aggnets.build_head(name, num_clusters=K, **kwargs)
        except TypeError:
            head = aggnets.build_head(name, **kwargs)
    return head.to(dtype)


def expected_out_dim(name, C=4, K=3):
    """out_dim for the heads built by make_head, from the contract (None for unknown names)."""
    return {
        "mac": C, "spoc": C, "gem": C, "crow": C, "rmac": C,
        "spatial_pyramid": C * (1 + 4),
        "netvlad": K * C, "vlad": K * C,
        "netbof": K, "bof": K,
        "netfv": 2 * K * C, "fisher_vector": 2 * K * C,
        "class_token": C,
    }.get(name)


def input_kind(name):
    """Input distribution suited to a head (its declared input domain: CroW is defined for non-negative maps).
    ``name`` is a registered head or a variant named after one (``"gem_per_channel"``)."""
    registered = max((n for n in HEAD_NAMES if name == n or name.startswith(n + "_")), key=len)
    return "nonneg" if capabilities(registered).input_domain == "nonnegative" else "normal"


def assert_close(actual, expected, rtol=1e-7, atol=1e-10, msg=""):
    import numpy as np

    a = actual.detach().cpu().double().numpy() if hasattr(actual, "detach") else np.asarray(actual, dtype=float)
    e = expected.detach().cpu().double().numpy() if hasattr(expected, "detach") else np.asarray(expected, dtype=float)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape} {msg}"
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=msg)


def rel_err(a, b):
    a = a.detach().double()
    b = b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("math",)]


def gradcheck_head(head, x, mask=None, fast_mode=False):
    """float64 gradcheck of ``head(x, mask)`` with respect to ``x`` and every trainable parameter of the head."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in head.named_parameters() if p.requires_grad}
    names = list(params)

    def f(x, *ps):
        kwargs = {} if mask is None else {"mask": mask}
        return torch.func.functional_call(head, dict(zip(names, ps)), (x,), kwargs)

    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast_mode)


def autocast_output_and_gradients(head, x, autocast, mask=None, rel=5e-2):
    """``head(x, mask)`` under CPU autocast (``autocast`` a half dtype, or None for plain float32): a float32, finite
    output within ``rel`` (relative L2) of the float64 forward, and finite gradients of the input and every
    parameter. ``head`` ends in float32."""
    args = (x,) if mask is None else (x, mask)
    ref = head.double()(*(a.double() if a.is_floating_point() else a for a in args)).float()
    head.float()
    x = x.detach().float().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = head(x) if mask is None else head(x, mask)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert (y - ref).norm() / ref.norm() < rel
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in head.parameters()
                                                if p.requires_grad)
    return y
