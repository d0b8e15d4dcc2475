"""CRN (Kim, Dunn & Frahm, CVPR 2017) against an independent forward written here from /work/shared/NOTES.md and the
order of operations of the authors' ``CRN`` module (gmberton/deep-visual-geo-localization-benchmark,
``model/aggregation.py``): plain torch.nn.functional, a loop over clusters, on random weights in the AUTHORS' key
names, read through ``aggnets.convert.from_reference("crn", ...)``.

Also: odd and 1-wide map sizes (explicit H x W upsampling), masks (a padded map is its crop, garbage ignored, zero
gradient there), float64 gradcheck (input, every trainable parameter), the hand-written backward against plain
autograd, the published per-cluster formulation (scripts/published/crn.py), converter errors, constructor errors,
the declared internals / maps, and the codebook initialisation inherited from NetVLAD.
"""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import aggnets
from aggnets.convert import StateDictError, from_reference
from aggnets.heads import CRN, NetVLAD

from .helpers import garbage_like, gradcheck_head, pad_with_garbage

DT = torch.float64
KERNELS = ((3, 32), (5, 32), (7, 20))
FC = importlib.import_module("aggnets.functional.crn")

# --- the independent reference ---------------------------------------------------------------------------------------


def authors_state_dict(C, K, seed=0, conv_bias=False, accumulation="fixed"):
    """A random state dict of the authors' CRN module, in their key names. Filter weights and biases are drawn so that
    some ReLUs are off and the context weights vary over the map; ``accumulation="random"`` replaces the authors'
    fixed ones / zero by random positive weights and a negative bias (their layout, other values)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"centroids": torch.randn(K, C, generator=g, dtype=DT) * 0.5,
          "conv.weight": torch.randn(K, C, 1, 1, generator=g, dtype=DT) * 3.0}
    if conv_bias:
        sd["conv.bias"] = torch.randn(K, generator=g, dtype=DT)
    for k, filters in KERNELS:
        sd[f"crn.filter_{k}_{k}.weight"] = torch.randn(filters, C, k, k, generator=g, dtype=DT) * 0.3
        sd[f"crn.filter_{k}_{k}.bias"] = torch.randn(filters, generator=g, dtype=DT) * 0.2
    if accumulation == "fixed":
        sd["crn.acc_w.weight"] = torch.ones(1, 84, 1, 1, dtype=DT)
        sd["crn.acc_w.bias"] = torch.zeros(1, dtype=DT)
    else:
        sd["crn.acc_w.weight"] = torch.rand(1, 84, 1, 1, generator=g, dtype=DT) * 2.0
        sd["crn.acc_w.bias"] = torch.tensor([-0.5], dtype=DT)
    return sd


def clipped_window_pool(x):
    """3 x 3 windows with stride 2, each averaged over the part inside the map; max(1, floor(L / 2)) windows per
    axis (the authors' ceil-mode pooling for L >= 2, and one clipped window for L = 1). Loops, no pooling op."""
    B, C, H, W = x.shape
    rows, cols = max(1, H // 2), max(1, W // 2)
    out = torch.zeros(B, C, rows, cols, dtype=x.dtype)
    for i in range(rows):
        for j in range(cols):
            out[:, :, i, j] = x[:, :, 2 * i:min(2 * i + 3, H), 2 * j:min(2 * j + 3, W)].mean(dim=(2, 3))
    return out


def reference_context(sd, x, upsample="authors", pool="authors"):
    """The context weights (B, 1, H, W) of the (already normalised) map ``x``, in the authors' order: pooling, three
    convolutions, concatenation, ReLU, 1 x 1 accumulation, ReLU, bilinear upsampling."""
    H, W = x.shape[-2:]
    if pool == "authors":
        small = F.avg_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
    else:
        small = clipped_window_pool(x)
    g = torch.cat([F.conv2d(small, sd[f"crn.filter_{k}_{k}.weight"], sd[f"crn.filter_{k}_{k}.bias"], padding=k // 2)
                   for k, _ in KERNELS], dim=1)
    w = F.relu(F.conv2d(F.relu(g), sd["crn.acc_w.weight"], sd["crn.acc_w.bias"]))
    if upsample == "none":
        return w
    if upsample == "authors":
        return F.interpolate(w, scale_factor=2, mode="bilinear")
    return F.interpolate(w, size=(H, W), mode="bilinear", align_corners=False)


def reference_crn(sd, x, upsample="authors", pool="authors", holes=None, reweight=True):
    """The CRN descriptor (B, K * C) of ``x`` (B, C, H, W): L2 over channels, context weights, soft assignment of the
    1 x 1 convolution times the weights, per-cluster residual sums, intra-normalisation, flatten k-major, L2.
    ``holes`` (B, H, W) bool, True = valid: invalid positions are zeroed before everything and get no assignment."""
    K, C = sd["centroids"].shape
    B, _, H, W = x.shape
    if holes is not None:
        x = x * holes[:, None].to(x.dtype)
    x = F.normalize(x, p=2, dim=1)
    m = reference_context(sd, x, upsample, pool).reshape(B, 1, H * W)
    a = F.softmax(F.conv2d(x, sd["conv.weight"], sd.get("conv.bias")).reshape(B, K, H * W), dim=1)
    if reweight:
        a = a * m
    if holes is not None:
        a = a * holes.reshape(B, 1, H * W).to(a.dtype)
    flat = x.reshape(B, C, H * W)
    vlad = torch.zeros(B, K, C, dtype=x.dtype)
    for k in range(K):
        vlad[:, k] = (a[:, k:k + 1] * (flat - sd["centroids"][k].view(1, C, 1))).sum(dim=-1)
    vlad = F.normalize(vlad, p=2, dim=2).reshape(B, K * C)
    return F.normalize(vlad, p=2, dim=1)


def _max_err(a, b):
    return float((a.detach() - b.detach()).abs().max())


def _head(C=5, K=3, seed=0, **kwargs):
    return from_reference("crn", authors_state_dict(C, K, seed, **kwargs)).eval()


# --- exact to the authors' forward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(2, 2), (4, 6), (8, 10), (10, 4), (20, 20)])
@pytest.mark.parametrize("variant", ["fixed", "random_accumulation", "conv_bias"])
def test_matches_the_authors_forward_at_even_sizes(size, variant):
    C, K = 5, 3
    sd = authors_state_dict(C, K, seed=size[0] * 31 + size[1], conv_bias=variant == "conv_bias",
                            accumulation="random" if variant == "random_accumulation" else "fixed")
    head = from_reference("crn", sd).eval()
    assert head.centroids.dtype == DT and (head.assign.bias is not None) == (variant == "conv_bias")
    x = torch.randn(3, C, *size, dtype=DT)
    expected = reference_crn(sd, x)
    with torch.no_grad():
        assert _max_err(head(x), expected) <= 1e-10
    assert _max_err(head(x), expected) <= 1e-10  # training path (hand-written backward) has the same values
    m = head.internal_maps(x)["context"]
    assert _max_err(m, reference_context(sd, F.normalize(x, dim=1))) <= 1e-12
    if size[0] >= 4 and size[1] >= 4:  # the test can fail: the reweighting and its upsampling matter
        assert float(m.detach().std()) > 1e-3
        assert _max_err(reference_crn(sd, x, reweight=False), expected) > 1e-3
        small = reference_context(sd, F.normalize(x, dim=1), upsample="none")
        assert _max_err(F.interpolate(small, size=size, mode="bilinear", align_corners=True), m) > 1e-6


@pytest.mark.parametrize("size", [(3, 3), (5, 7), (7, 4), (9, 9), (2, 5)])
def test_odd_sizes_match_explicit_upsampling_where_the_published_code_breaks(size):
    C, K = 4, 3
    sd = authors_state_dict(C, K, seed=7)
    head = from_reference("crn", sd).eval()
    x = torch.randn(2, C, *size, dtype=DT)
    expected = reference_crn(sd, x, upsample="size")
    assert _max_err(head(x), expected) <= 1e-10
    with pytest.raises(RuntimeError):  # their upsampled map is (2 floor(H/2), 2 floor(W/2)): one row / column short
        reference_crn(sd, x, upsample="authors")


@pytest.mark.parametrize("size", [(1, 1), (1, 6), (5, 1), (1, 2), (2, 1)])
def test_one_wide_maps_average_their_clipped_window(size):
    C, K = 4, 2
    sd = authors_state_dict(C, K, seed=3)
    head = from_reference("crn", sd).eval()
    x = torch.randn(2, C, *size, dtype=DT)
    expected = reference_crn(sd, x, upsample="size", pool="clipped")
    y = head(x)
    assert torch.isfinite(y).all() and _max_err(y, expected) <= 1e-10


@pytest.mark.parametrize("size", [(2, 2), (3, 4), (5, 5), (8, 7), (10, 10)])
def test_clipped_window_pool_is_the_authors_ceil_mode_pooling(size):
    """Ties the 1-wide reference above to the authors' pooling: equal wherever theirs is defined."""
    x = torch.randn(2, 3, *size, dtype=DT)
    theirs = F.avg_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
    assert _max_err(clipped_window_pool(x), theirs) <= 1e-14
    assert _max_err(aggnets.functional.context_pool(x), theirs) <= 1e-14


def test_functional_is_the_head():
    head = _head(C=4, K=3)
    x = torch.randn(2, 4, 6, 5, dtype=DT)
    mask = torch.ones(2, 6, 5, dtype=torch.bool)
    mask[1, 4:, :] = False
    c = head.context
    args = (head.assign_weight, head.assign.bias, head.centroids, [c.filter3.weight, c.filter5.weight, c.filter7.weight],
            [c.filter3.bias, c.filter5.bias, c.filter7.bias], c.accumulation_weight, c.accumulation_bias)
    with torch.no_grad():
        for m in (None, mask):
            assert torch.equal(aggnets.functional.crn(x, *args, m), head(x, m))


def test_published_formulation_equals_the_head():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from published.crn import PublishedCRN
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    for bias in (True, False):
        head = CRN(6, 4, bias=bias).double()
        with torch.no_grad():
            for conv in head.context.filter_modules():
                conv.bias.normal_(0.0, 0.2)
        published = PublishedCRN.from_head(head)
        x = torch.randn(3, 6, 8, 6, dtype=DT)
        assert _max_err(published(x), head(x)) <= 1e-12
        # its state dict has the authors' keys: from_reference reads it back
        keys = set(published.state_dict())
        assert keys == set(authors_state_dict(6, 4, conv_bias=bias))
        assert _max_err(from_reference("crn", published.state_dict())(x), head(x)) <= 1e-12
    with pytest.raises(ValueError):
        PublishedCRN.from_head(CRN(6, 4, power=0.5))


# --- masks --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [(0, 0), (2, 3), (1, 0)])
@pytest.mark.parametrize("size", [(4, 6), (5, 3)])
def test_padded_map_with_mask_is_its_crop(offset, size):
    C, K = 4, 3
    sd = authors_state_dict(C, K, seed=11)
    head = from_reference("crn", sd).eval()
    x = torch.randn(2, C, *size, dtype=DT)
    padded, mask = pad_with_garbage(x, size[0] + 4, size[1] + 5, top=offset[0], left=offset[1])
    y = head(padded, mask)
    assert torch.isfinite(y).all()
    upsample = "authors" if size[0] % 2 == 0 and size[1] % 2 == 0 else "size"
    assert _max_err(y, reference_crn(sd, x, upsample=upsample)) <= 1e-10
    assert torch.equal(y, head(x))
    context = head.internal_maps(padded, mask)["context"]
    assert torch.equal(context[:, :, offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]],
                       head.internal_maps(x)["context"])
    assert context[~mask.unsqueeze(1)].abs().max() == 0


def test_batch_of_different_valid_boxes_and_holes():
    """Images with different boxes are encoded apart; holes inside a box are zeros for the context network and get
    no assignment (the reference zeroes them likewise, on the crop)."""
    C, K = 4, 3
    sd = authors_state_dict(C, K, seed=5)
    head = from_reference("crn", sd).eval()
    canvas = garbage_like((4, C, 9, 8))
    mask = torch.zeros(4, 9, 8, dtype=torch.bool)
    crops = [torch.randn(1, C, h, w, dtype=DT) for h, w in ((6, 8), (9, 4), (6, 8), (5, 5))]
    boxes = [(0, 0), (0, 2), (3, 0), (2, 3)]
    for b, (crop, (top, left)) in enumerate(zip(crops, boxes)):
        h, w = crop.shape[-2:]
        canvas[b, :, top:top + h, left:left + w] = crop[0]
        mask[b, top:top + h, left:left + w] = True
    holes = torch.ones(5, 5, dtype=torch.bool)
    holes[1, 2] = holes[3, 0] = holes[2, 4] = False  # not on the box's border rows / columns: the box stays 5 x 5
    mask[3, 2:7, 3:8] = holes
    y = head(canvas, mask)
    assert torch.isfinite(y).all()
    for b, crop in enumerate(crops):
        h, w = crop.shape[-2:]
        upsample = "authors" if h % 2 == 0 and w % 2 == 0 else "size"
        crop_holes = holes[None] if b == 3 else None
        assert _max_err(y[b:b + 1], reference_crn(sd, crop, upsample=upsample, holes=crop_holes)) <= 1e-10


@pytest.mark.parametrize("nan", [True, False])
def test_masked_positions_get_no_gradient_and_the_rest_is_the_crop_gradient(nan):
    torch.manual_seed(0)
    head = CRN(4, 3, alpha=2.0).double()
    x = torch.randn(2, 4, 5, 6, dtype=DT)
    padded, mask = pad_with_garbage(x, 7, 9, top=1, left=2, nan=nan)
    weights = torch.randn(2, head.out_dim, dtype=DT)
    xp = padded.clone().requires_grad_(True)
    (head(xp, mask) * weights).sum().backward()
    grads_padded = {n: p.grad.clone() for n, p in head.named_parameters() if p.requires_grad}
    head.zero_grad()
    xc = x.clone().requires_grad_(True)
    (head(xc) * weights).sum().backward()
    assert torch.isfinite(xp.grad).all() and xp.grad[:, :, ~mask[0]].abs().max() == 0
    assert _max_err(xp.grad[:, :, 1:6, 2:8], xc.grad) <= 1e-12
    for n, p in head.named_parameters():
        if p.requires_grad:
            assert _max_err(grads_padded[n], p.grad) <= 1e-12, n


# --- gradients ------------------------------------------------------------------------------------------------------

def _gradcheck(head, x, mask=None, fast_mode=False):
    assert any(n.startswith("context.filter") for n, p in head.named_parameters() if p.requires_grad)
    assert gradcheck_head(head, x, mask, fast_mode=fast_mode)


def _lively(head):
    """Biases spread so that some context filters are active and some are not (ReLU kinks away from the samples)."""
    with torch.no_grad():
        for conv in head.context.filter_modules():
            conv.bias.normal_(0.0, 0.3)
    return head


def test_gradcheck_input_and_every_trainable_parameter():
    torch.manual_seed(0)
    head = _lively(CRN(2, 2, alpha=3.0).double())
    _gradcheck(head, torch.randn(1, 2, 3, 4, dtype=DT))


@pytest.mark.parametrize("kwargs", [{"learn_accumulation": True, "bias": False}, {"power": 0.5, "intra_norm": False}])
def test_gradcheck_variants_with_a_mask(kwargs):
    torch.manual_seed(1)
    head = _lively(CRN(3, 2, alpha=3.0, **kwargs).double())
    x = torch.randn(2, 3, 5, 4, dtype=DT)
    mask = torch.ones(2, 5, 4, dtype=torch.bool)
    mask[0, 3:, :] = False
    mask[1, 1, 2] = False
    _gradcheck(head, x, mask, fast_mode=True)


@pytest.mark.parametrize("kwargs", [{}, {"bias": False, "normalize_input": False}, {"assignment": "hard"},
                                    {"learn_accumulation": True, "power": 0.5}])
def test_hand_written_backward_equals_plain_autograd(kwargs, monkeypatch):
    torch.manual_seed(2)
    head = _lively(CRN(4, 3, alpha=2.0, **kwargs).double())
    x = torch.randn(2, 4, 6, 7, dtype=DT)
    mask = torch.ones(2, 6, 7, dtype=torch.bool)
    mask[1, :, 5:] = False
    mask[0, 2, 3] = False
    weights = torch.randn(2, head.out_dim, dtype=DT)
    trainable = [p for p in head.parameters() if p.requires_grad]

    def grads():
        xr = x.clone().requires_grad_(True)
        y = head(xr, mask)
        return [y, *torch.autograd.grad((y * weights).sum(), [xr, *trainable], allow_unused=True)]

    fast = grads()
    monkeypatch.setattr(FC, "_needs_fast_backward", lambda *args: False)
    plain = grads()
    for a, b in zip(fast, plain):
        assert (a is None) == (b is None)
        if a is not None:
            assert _max_err(a, b) <= 1e-12


# --- construction, keys, conversion ---------------------------------------------------------------------------------

OUR_KEYS = {"centroids": ("K", "C"), "alpha": (), "assign.weight": ("K", "C", 1, 1), "assign.bias": ("K",),
            "context.accumulation_weight": (1, 84, 1, 1), "context.accumulation_bias": (1,),
            "context.filter3.weight": (32, "C", 3, 3), "context.filter3.bias": (32,),
            "context.filter5.weight": (32, "C", 5, 5), "context.filter5.bias": (32,),
            "context.filter7.weight": (20, "C", 7, 7), "context.filter7.bias": (20,)}


@pytest.mark.parametrize("learn", [False, True])
def test_out_dim_keys_and_trainable_parameters(learn):
    C, K = 7, 5
    head = CRN(C, K, learn_accumulation=learn)
    assert head.out_dim == K * C and head(torch.randn(2, C, 4, 3)).shape == (2, K * C)
    sizes = {"C": C, "K": K}
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        k: tuple(sizes.get(s, s) for s in shape) for k, shape in OUR_KEYS.items()}
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    accumulation = {"context.accumulation_weight", "context.accumulation_bias"}
    assert trainable == ({"centroids", "assign.weight", "assign.bias", "context.filter3.weight",
                          "context.filter3.bias", "context.filter5.weight", "context.filter5.bias",
                          "context.filter7.weight", "context.filter7.bias"} | (accumulation if learn else set()))
    assert torch.equal(head.context.accumulation_weight, torch.ones(1, 84, 1, 1))
    assert torch.equal(head.context.filter7.bias, torch.zeros(20))
    assert ("accumulation_weight" in head.capabilities.internals) == learn
    assert set(head.internals()) == set(head.capabilities.internals)
    assert head.internals()["context_filter_norm"].shape == (84,)


@pytest.mark.parametrize("kwargs, match", [
    ({"in_channels": 0}, "in_channels"), ({"in_channels": 4, "num_clusters": 0}, "num_clusters"),
    ({"in_channels": 4, "num_clusters": 2.5}, "num_clusters"), ({"in_channels": 4, "assignment": "fuzzy"}, "assignment"),
    ({"in_channels": 4, "learn_accumulation": "yes"}, "learn_accumulation"), ({"in_channels": 4, "alpha": -1.0}, "alpha"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        aggnets.build_head("crn", **kwargs)


@pytest.mark.parametrize("prefix", ["", "aggregation.", "module.aggregation."])
def test_from_reference_prefixes_and_checkpoints(prefix):
    sd = authors_state_dict(4, 3, seed=9)
    full = {prefix + k: v for k, v in sd.items()}
    full["backbone.0.weight"] = torch.randn(4, 3, 3, 3, dtype=DT)  # a whole model around it
    if prefix == "":
        del full["backbone.0.weight"]
    x = torch.randn(2, 4, 6, 4, dtype=DT)
    expected = reference_crn(sd, x)
    for given in (full, {"model_state_dict": full, "epoch_num": 3}, {"state_dict": full}):
        head = from_reference("crn", given)
        assert _max_err(head(x), expected) <= 1e-10
    assert _max_err(CRN.from_reference(full, prefix=prefix.rstrip("."))(x), expected) <= 1e-10
    assert from_reference("crn", {k: v.float() for k, v in full.items()}).centroids.dtype == torch.float32


def test_from_reference_errors_name_the_key():
    sd = authors_state_dict(4, 3)
    for key in ("crn.filter_5_5.bias", "conv.weight", "crn.acc_w.weight"):
        broken = {k: v for k, v in sd.items() if k != key}
        with pytest.raises(StateDictError, match=re.escape(key)):
            from_reference("crn", broken)
    broken = {("aggregation." + k): v for k, v in sd.items() if k != "centroids"}
    with pytest.raises(StateDictError, match="centroids"):
        from_reference("crn", broken)
    for key, bad in (("crn.filter_7_7.weight", torch.zeros(20, 4, 5, 5, dtype=DT)),
                     ("conv.weight", torch.zeros(3, 5, 1, 1, dtype=DT)),
                     ("crn.acc_w.weight", torch.zeros(1, 80, 1, 1, dtype=DT)),
                     ("conv.bias", torch.zeros(4, dtype=DT))):
        with pytest.raises(StateDictError, match=re.escape(key) + ".*must have shape") as error:
            from_reference("crn", {**sd, key: bad})
        assert str(tuple(bad.shape)) in str(error.value)
    with pytest.raises(StateDictError, match=r"crn\.filter_9_9\.weight"):
        from_reference("crn", {**sd, "crn.filter_9_9.weight": torch.zeros(1)})
    two = {**{"a." + k: v for k, v in sd.items()}, **{"b." + k: v for k, v in sd.items()}}
    with pytest.raises(StateDictError, match="ambiguous"):
        from_reference("crn", two)
    assert torch.equal(from_reference("crn", two, prefix="b.").centroids, sd["centroids"])
    with pytest.raises(StateDictError, match=r"c\.centroids"):
        from_reference("crn", two, prefix="c.")
    with pytest.raises(ValueError, match="intra_norm"):
        from_reference("crn", sd, intra_norm=False)


# --- looking inside, codebook initialisation -------------------------------------------------------------------------

def test_internal_maps_and_internals():
    head = _head(C=4, K=3)
    x = torch.randn(2, 4, 6, 6, dtype=DT)
    mask = torch.ones(2, 6, 6, dtype=torch.bool)
    mask[1, 4:, :] = False
    mask[1, 1, 1] = False
    maps = head.internal_maps(x, mask)
    assert set(maps) == {"assignment", "context"} == set(head.capabilities.maps)
    assert maps["context"].shape == (2, 1, 6, 6) and (maps["context"] >= 0).all()
    assert maps["context"][~mask.unsqueeze(1)].abs().max() == 0
    assert maps["assignment"][:, :, ~mask[1]][1].abs().max() == 0
    assert torch.equal(maps["context"][0], head.internal_maps(x[:1])["context"][0])
    values = head.internals()
    assert set(values) == set(head.capabilities.internals)
    c = head.context
    norms = torch.cat([c.filter3.weight.flatten(1).norm(dim=1), c.filter5.weight.flatten(1).norm(dim=1),
                       c.filter7.weight.flatten(1).norm(dim=1)])
    assert _max_err(values["context_filter_norm"], norms) <= 1e-12
    assert head.capabilities.codebook == "centroids" and not head.capabilities.orderless
    assert [n for n, _ in aggnets.inspection.codebook_heads(head)] == [""]
    maps = aggnets.inspection.head_maps(head, x, mask)
    assert set(maps) == {"assignment", "context"}


def test_codebook_initialisation_is_netvlads():
    torch.manual_seed(0)
    descriptors = torch.randn(400, 6, dtype=DT)
    crn_head, netvlad = CRN(6, 4).double(), NetVLAD(6, 4).double()
    summary = crn_head.init_from_descriptors(descriptors, alpha=5.0, seed=0)
    netvlad.init_from_descriptors(descriptors, alpha=5.0, seed=0)
    assert summary["alpha"] == 5.0
    assert torch.equal(crn_head.centroids, netvlad.centroids)
    assert torch.equal(crn_head.assign.weight, netvlad.assign.weight)
    built = CRN.from_centroids(netvlad.centroids.detach(), alpha=5.0)
    assert built.centroids.dtype == DT and torch.equal(built.assign.bias, netvlad.assign.bias)
