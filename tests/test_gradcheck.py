"""float64 torch.autograd.gradcheck with respect to the input AND every trainable parameter of each trainable head.

Max-based heads get inputs with distinct values (no ties); power-based heads get positive inputs (away from eps).
"""

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from aggnets.heads import CroW, GeM, MAC, NetBoF, NetFV, NetVLAD, RMAC, SPoC, SpatialPyramid
from tests.helpers import rand_centroids, rand_map

C, K = 3, 2


def _gradcheck_head(head, x, mask=None, expect_params=True):
    head = head.double()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in head.named_parameters() if p.requires_grad}
    if expect_params:
        assert params, "this head must have trainable parameters"
    names = list(params)

    def f(x, *ps):
        return functional_call(head, dict(zip(names, ps)), (x,), {} if mask is None else {"mask": mask})

    x = x.detach().clone().requires_grad_(True)
    assert gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-6, rtol=1e-4)


def _per_channel_gem():
    head = GeM(C, per_channel=True).double()
    with torch.no_grad():
        head.p.copy_(torch.tensor([1.5, 3.0, 4.5], dtype=torch.float64))
    return head


def _pyramid_gem():
    return SpatialPyramid(GeM(C, p=2.5), levels=(1, 2))


CASES = {
    "gem_shared": (lambda: GeM(C, p=3.0), "positive", True),
    "gem_per_channel": (_per_channel_gem, "positive", True),
    "rmac_max": (lambda: RMAC(C), "distinct", False),
    "rmac_max_global": (lambda: RMAC(C, include_global=True), "distinct", False),
    "rmac_gem": (lambda: RMAC(C, pool="gem", p=3.0), "positive", True),
    "netvlad": (lambda: NetVLAD.from_centroids(rand_centroids(K, C), alpha=4.0), "normal", True),
    "netvlad_power_no_intra": (lambda: NetVLAD(C, K, power=0.5, intra_norm=False, alpha=2.0), "positive", True),
    "netbof": (lambda: NetBoF.from_centroids(rand_centroids(K, C), alpha=1.0), "normal", True),
    "netbof_normalize_input": (lambda: NetBoF(C, K, normalize_input=True), "normal", True),
    "netfv_power1": (lambda: NetFV(C, K, power=1.0), "normal", True),
    "netfv_default_power": (lambda: NetFV(C, K), "normal", True),
    "spatial_pyramid_gem": (_pyramid_gem, "positive", True),
    "crow": (lambda: CroW(C), "positive", False),
    "mac": (lambda: MAC(C), "distinct", False),
    "spoc": (lambda: SPoC(C), "normal", False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradcheck_input_and_parameters(case):
    build, kind, has_params = CASES[case]
    head = build()
    x = rand_map(2, C, 4, 5, kind=kind)
    _gradcheck_head(head, x, expect_params=has_params)


@pytest.mark.parametrize("case", ["gem_shared", "netvlad", "netbof", "netfv_power1", "spatial_pyramid_gem", "rmac_gem"])
def test_gradcheck_with_mask(case):
    build, kind, has_params = CASES[case]
    x = rand_map(2, C, 4, 5, kind=kind)
    m = torch.ones(2, 4, 5, dtype=torch.bool)
    m[0, 3:, :] = False
    m[1, :, 3:] = False
    _gradcheck_head(build(), x, mask=m, expect_params=has_params)
