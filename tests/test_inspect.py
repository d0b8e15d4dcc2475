"""head.assignment_map and aggnets.inspection (codebook_heads, head_internals, cluster_usage, UsageAccumulator, palette,
assignment_overlay), against independent computations written here."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aggnets.heads import BoF, FisherVector, GeM, NetBoF, NetFV, NetVLAD, SpatialPyramid, VLAD
from aggnets.inspection import (UsageAccumulator, assignment_overlay, codebook_heads, cluster_usage, head_internals,
                             palette)
from tests.helpers import assert_close, pad_with_garbage, rand_centroids, rand_gmm, rand_map

C, K = 4, 3


def conv_heads():
    return {
        "netvlad": NetVLAD.from_centroids(rand_centroids(K, C), alpha=8.0),
        "vlad": VLAD.from_centroids(rand_centroids(K, C)),
        "netbof": NetBoF.from_centroids(rand_centroids(K, C), alpha=1.0),
        "bof": BoF.from_centroids(rand_centroids(K, C)),
        "netbof_nobias": NetBoF(C, K, bias=False, normalize_input=True).double(),
    }


def expected_conv_assignment(head, x):
    """softmax_k of the 1x1 conv (or its arg-max one-hot), on L2-normalised x when the head says so."""
    if head.normalize_input:
        x = x / x.norm(dim=1, keepdim=True)
    logits = F.conv2d(x, head.assign.weight, head.assign.bias)
    if head.assignment == "hard":
        return F.one_hot(logits.argmax(dim=1), K).permute(0, 3, 1, 2).to(x.dtype)
    return logits.softmax(dim=1)


def expected_gmm_posteriors(head, x):
    """gamma_n(k) from torch.distributions: w_k N(x; mu_k, sigma_k) normalised over k."""
    normal = torch.distributions.Normal(head.means.detach(), head.variances.detach().sqrt())        # (K, C)
    points = x.permute(0, 2, 3, 1).unsqueeze(-2)                                                   # (B, H, W, 1, C)
    log_joint = normal.log_prob(points).sum(-1) + head.weights.detach().log()                        # (B, H, W, K)
    return log_joint.softmax(dim=-1).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# assignment_map


@pytest.mark.parametrize("name", ["netvlad", "vlad", "netbof", "bof", "netbof_nobias"])
def test_conv_assignment_map_matches_softmax_of_conv(name):
    head = conv_heads()[name]
    x = rand_map(2, C, 3, 5)
    a = head.assignment_map(x)
    assert a.shape == (2, K, 3, 5) and a.dtype == torch.float64
    assert_close(a, expected_conv_assignment(head, x), rtol=1e-10, atol=1e-12)
    assert_close(a.sum(dim=1), torch.ones(2, 3, 5, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head_class", [NetFV, FisherVector])
def test_netfv_assignment_map_is_gmm_posterior(head_class):
    head = head_class.from_gmm(*rand_gmm(K, C))
    x = rand_map(2, C, 4, 3)
    a = head.assignment_map(x)
    assert a.shape == (2, K, 4, 3)
    assert_close(a, expected_gmm_posteriors(head, x), rtol=1e-9, atol=1e-12)
    assert_close(a.sum(dim=1), torch.ones(2, 4, 3, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["netvlad", "vlad", "netbof", "netfv", "pyramid"])
def test_assignment_map_masked_positions_are_zero(name):
    if name == "netfv":
        head, expected = NetFV.from_gmm(*rand_gmm(K, C)), expected_gmm_posteriors
    elif name == "pyramid":
        head = SpatialPyramid(conv_heads()["netvlad"], levels=(1, 2))
        expected = lambda h, x: expected_conv_assignment(h.head, x)                               # noqa: E731
    else:
        head, expected = conv_heads()[name], expected_conv_assignment
    x = rand_map(2, C, 3, 4)
    canvas, mask = pad_with_garbage(x, 5, 6, top=1, left=2)                                       # NaN/inf outside
    a = head.assignment_map(canvas, mask)
    assert torch.isfinite(a).all()
    assert (a.sum(dim=1)[~mask] == 0).all()
    assert_close(a.sum(dim=1)[mask], torch.ones(int(mask.sum()), dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert_close(a[:, :, 1:4, 2:6], expected(head, x), rtol=1e-9, atol=1e-12)


def test_netvlad_forward_is_vlad_of_assignment_map():
    head = NetVLAD.from_centroids(rand_centroids(K, C), alpha=4.0)
    x = rand_map(2, C, 3, 4)
    canvas, mask = pad_with_garbage(x, 4, 5, nan=False)
    a = head.assignment_map(canvas, mask).flatten(2)                                               # (B, K, N)
    xn = F.normalize(canvas, dim=1).flatten(2)                                                     # (B, C, N)
    residuals = xn.unsqueeze(1) - head.centroids.detach()[None, :, :, None]                        # (B, K, C, N)
    vlad = (a.unsqueeze(2) * residuals).sum(-1)                                                    # (B, K, C)
    expected = F.normalize(F.normalize(vlad, dim=-1).flatten(1), dim=-1)
    assert_close(head(canvas, mask), expected, rtol=1e-9, atol=1e-12)


def test_netbof_forward_is_mean_of_assignment_map():
    head = NetBoF.from_centroids(rand_centroids(K, C), alpha=1.0)
    x = rand_map(2, C, 3, 4)
    canvas, mask = pad_with_garbage(x, 4, 5)
    a = head.assignment_map(canvas, mask)
    assert_close(head(canvas, mask), a.sum(dim=(2, 3)) / mask.sum(dim=(1, 2)).unsqueeze(1), rtol=1e-12, atol=1e-14)


def test_pyramid_assignment_map_delegates_or_raises():
    inner = conv_heads()["netbof"]
    x = rand_map(1, C, 4, 4)
    assert torch.equal(SpatialPyramid(inner).assignment_map(x), inner.assignment_map(x))
    with pytest.raises(TypeError, match="assignment_map"):
        SpatialPyramid(GeM(C)).assignment_map(x)


@pytest.mark.parametrize("head", [NetVLAD(C, K), NetFV(C, K), SpatialPyramid(NetBoF(C, K))])
def test_assignment_map_validates_like_forward(head):
    with pytest.raises(ValueError, match="channels"):
        head.assignment_map(torch.randn(1, C + 1, 2, 2))
    with pytest.raises(TypeError, match="bool"):
        head.assignment_map(torch.randn(1, C, 2, 2), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="no valid"):
        head.assignment_map(torch.randn(1, C, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))


def test_assignment_map_is_differentiable_and_upcasts_half():
    head = NetVLAD(C, K)
    x = torch.randn(1, C, 2, 3, requires_grad=True)
    (head.assignment_map(x)[:, 0] ** 2).sum().backward()
    assert x.grad is not None and head.assign.weight.grad is not None
    assert head.assignment_map(x.detach().bfloat16()).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# codebook_heads, head_internals


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, C, 1)
        self.vlad = NetVLAD(C, K)
        self.pyramid = SpatialPyramid(NetBoF(C, 5), levels=(1, 2))
        self.gem_pyramid = SpatialPyramid(GeM(C), levels=(1, 2))
        self.heads = nn.ModuleDict({"fv": NetFV(C, 2), "gem": GeM(C, per_channel=True)})


def test_codebook_heads_lists_each_codebook_once():
    model = Model()
    found = codebook_heads(model)
    assert [name for name, _ in found] == ["vlad", "pyramid", "heads.fv"]
    assert [module for _, module in found] == [model.vlad, model.pyramid, model.heads.fv]
    assert codebook_heads(model.pyramid) == [("", model.pyramid)]
    assert codebook_heads(model.gem_pyramid) == [] and codebook_heads(nn.Linear(2, 2)) == []


def test_head_internals_keys_and_values():
    model = Model()
    values = head_internals(model)
    assert set(values) == {
        "vlad/alpha", "vlad/assign_weight_norm", "vlad/centroid_norm",
        "pyramid.head/alpha", "pyramid.head/assign_weight_norm",
        "gem_pyramid.head/p", "heads.fv/mixture_weights", "heads.fv/mean_variance", "heads.gem/p",
    }
    for value in values.values():
        assert value.dtype == torch.float32 and value.device.type == "cpu" and not value.requires_grad
    assert values["vlad/alpha"].shape == () and float(values["vlad/alpha"]) == NetVLAD.default_alpha
    assert_close(values["vlad/assign_weight_norm"], model.vlad.assign.weight.detach().reshape(K, C).norm(dim=1))
    assert_close(values["vlad/centroid_norm"], model.vlad.centroids.detach().norm(dim=1))
    assert values["pyramid.head/assign_weight_norm"].shape == (5,)
    assert values["gem_pyramid.head/p"].shape == (1,) and values["heads.gem/p"].shape == (C,)
    assert_close(values["heads.fv/mixture_weights"], torch.full((2,), 0.5))
    assert_close(values["heads.fv/mean_variance"], model.heads.fv.log_vars.detach().exp().mean(dim=1))


def test_head_internals_of_a_bare_head_and_hard_alpha():
    values = head_internals(VLAD.from_centroids(rand_centroids(K, C)))
    assert set(values) == {"alpha", "assign_weight_norm", "centroid_norm"}
    assert math.isinf(float(values["alpha"]))


# ----------------------------------------------------------------------------------------------------------------------
# cluster_usage, UsageAccumulator


def test_cluster_usage_uniform_and_one_hot():
    uniform = cluster_usage(torch.full((8,), 3.0, dtype=torch.float64))
    assert_close(uniform["fractions"], torch.full((8,), 0.125))
    assert_close(uniform["entropy"], torch.tensor(math.log(8)))
    assert_close(uniform["perplexity"], torch.tensor(8.0), rtol=1e-12)
    assert_close(uniform["normalized_entropy"], torch.tensor(1.0))
    assert int(uniform["dead"]) == 0
    one_hot = cluster_usage(torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0]))
    assert float(one_hot["entropy"]) == 0 and float(one_hot["perplexity"]) == 1
    assert float(one_hot["normalized_entropy"]) == 0 and int(one_hot["dead"]) == 4


def test_cluster_usage_matches_categorical_entropy_and_threshold():
    mass = torch.tensor([10.0, 5.0, 4.99, 0.009, 0.0], dtype=torch.float64)
    usage = cluster_usage(mass)
    expected = torch.distributions.Categorical(probs=mass / mass.sum()).entropy()
    assert_close(usage["entropy"], expected, rtol=1e-12)
    assert_close(usage["normalized_entropy"], expected / math.log(5), rtol=1e-12)
    assert int(usage["dead"]) == 2                                               # fraction < 0.01 / 5 = 0.002
    assert int(cluster_usage(mass, dead_threshold=1.0)["dead"]) == 2             # 0.2: 4.99/20 = 0.2495 is alive
    assert int(cluster_usage(mass, dead_threshold=1.249)["dead"]) == 3           # 0.2498: 5/19.999 is alive
    assert_close(cluster_usage(7 * mass)["fractions"], usage["fractions"], rtol=1e-12)


def test_cluster_usage_edge_cases():
    single = cluster_usage(torch.tensor([2.0]))
    assert float(single["normalized_entropy"]) == 1 and int(single["dead"]) == 0
    empty = cluster_usage(torch.zeros(3))
    assert (empty["fractions"] == 0).all() and float(empty["entropy"]) == 0 and int(empty["dead"]) == 3
    assert_close(cluster_usage(torch.tensor([1, 1]))["entropy"], torch.tensor(math.log(2), dtype=torch.float64))
    with pytest.raises(ValueError):
        cluster_usage(torch.ones(2, 2))


def test_usage_accumulator_sums_assignment_maps():
    head = NetBoF.from_centroids(rand_centroids(K, C), alpha=1.0)
    accumulator = UsageAccumulator()
    with pytest.raises(RuntimeError):
        accumulator.compute()
    maps = []
    for _ in range(3):
        canvas, mask = pad_with_garbage(rand_map(2, C, 2, 3), 3, 4)
        maps.append(head.assignment_map(canvas, mask))
        accumulator.update(maps[-1])
    expected_mass = sum(a.sum(dim=(0, 2, 3)) for a in maps)
    assert_close(accumulator.mass, expected_mass, rtol=1e-12)
    assert_close(accumulator.mass.sum(), torch.tensor(3 * 2 * 6.0, dtype=torch.float64), rtol=1e-12)
    usage = accumulator.compute()
    assert_close(usage["entropy"], cluster_usage(expected_mass)["entropy"], rtol=1e-12)
    accumulator.reset()
    assert accumulator.mass is None
    accumulator.update(torch.ones(1, 5, 2, 2))                                    # K is free again after reset
    assert accumulator.mass.tolist() == [4.0] * 5


def test_usage_accumulator_preallocated_and_checks_k():
    accumulator = UsageAccumulator(4, dead_threshold=0.5)
    assert torch.equal(accumulator.mass, torch.zeros(4, dtype=torch.float64))
    one_hot = F.one_hot(torch.tensor([[[0, 1], [1, 1]]]), 4).permute(0, 3, 1, 2).float()            # (1, 4, 2, 2)
    accumulator.update(one_hot)
    assert accumulator.mass.tolist() == [1.0, 3.0, 0.0, 0.0]
    assert int(accumulator.compute()["dead"]) == 2
    with pytest.raises(ValueError):
        accumulator.update(torch.ones(1, 3, 2, 2))
    accumulator.reset()
    assert torch.equal(accumulator.mass, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        accumulator.update(torch.ones(1, 3, 2, 2))
    assert torch.equal(accumulator.mass, torch.zeros(4, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------------------
# palette, assignment_overlay


def test_palette_is_deterministic_distinct_and_in_range():
    colours = palette(64)
    assert colours.shape == (64, 3) and colours.dtype == torch.float32
    assert (colours >= 0).all() and (colours <= 1).all()
    assert torch.equal(colours, palette(64)) and torch.equal(palette(5), colours[:5])
    assert torch.pdist(colours.double()).min() > 1e-3
    assert_close(colours[0], torch.tensor([1.0, 0.25, 0.25]))                 # hue 0: red with saturation 0.75
    with pytest.raises(ValueError):
        palette(0)


def test_overlay_colours_argmax_cluster_at_the_right_pixels():
    B, H, W, scale = 2, 2, 3, 4
    clusters = torch.randint(0, K, (B, H, W))
    confidence = 0.5 + 0.5 * torch.rand(B, H, W)
    assignments = F.one_hot(clusters, K).permute(0, 3, 1, 2) * confidence.unsqueeze(1)
    images = torch.rand(B, 3, H * scale, W * scale)
    out = assignment_overlay(images, assignments, alpha=0.25)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert (out >= 0).all() and (out <= 1).all()
    colours = palette(K)
    for b in range(B):
        for i in range(H * scale):
            for j in range(W * scale):
                cell = (b, i // scale, j // scale)
                expected = 0.75 * images[b, :, i, j] + 0.25 * colours[clusters[cell]] * confidence[cell]
                assert_close(out[b, :, i, j], expected, rtol=1e-6, atol=1e-6)


def test_overlay_alpha_extremes_and_masked_positions():
    images = torch.rand(1, 3, 6, 6)
    assignments = torch.softmax(torch.randn(1, 5, 3, 3), dim=1)
    assert torch.equal(assignment_overlay(images, assignments, alpha=0.0), images)
    assignments[:, :, 0, 0] = 0                                                   # a masked position: all-zero column
    full = assignment_overlay(images, assignments, alpha=1.0)
    assert (full[:, :, :2, :2] == 0).all()
    confidence, cluster = assignments.max(dim=1)
    assert_close(full[0, :, 5, 5], palette(5)[cluster[0, 2, 2]] * confidence[0, 2, 2], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        assignment_overlay(images, assignments, alpha=1.5)
    with pytest.raises(ValueError):
        assignment_overlay(images[:, :2], assignments)
    with pytest.raises(ValueError):
        assignment_overlay(images, assignments.repeat(2, 1, 1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_assignment_map_autocast_accumulator_and_overlay():
    head = NetFV.from_gmm(*rand_gmm(K, C)).float().cuda()
    x = torch.randn(2, C, 3, 4, device="cuda")
    mask = torch.ones(2, 3, 4, dtype=torch.bool, device="cuda")
    mask[1, :, 3] = False
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = head.assignment_map(x.half(), mask)
    assert a.dtype == torch.float32 and a.device.type == "cuda"
    assert_close(a.cpu(), head.cpu().assignment_map(x.cpu().half(), mask.cpu()), rtol=1e-5, atol=1e-6)
    accumulator = UsageAccumulator(K)
    accumulator.update(a)
    assert accumulator.mass.device.type == "cuda" and abs(float(accumulator.mass.sum()) - 21) < 1e-9
    out = assignment_overlay(torch.rand(2, 3, 6, 8), a)
    assert out.device.type == "cpu" and out.shape == (2, 3, 6, 8)


def test_the_old_module_name_still_works_with_a_warning():
    import subprocess
    import sys
    code = ("import warnings; warnings.simplefilter('error', FutureWarning); import aggnets\n"
            "try:\n    aggnets.inspect\nexcept FutureWarning as w:\n    print('warned:', w)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "warned: aggnets.inspect is deprecated: import aggnets.inspection" in out.stdout, out.stderr
