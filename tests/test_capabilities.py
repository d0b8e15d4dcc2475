"""The head contract: declared capabilities (pinned for the seed heads against the papers' facts), what the base class
enforces from a declaration (masks, fixed sizes, the global token), and the readers of the declarations (Embedder,
inspect, codebook initialisation, spatial pyramids). Heads defined here are local, never registered."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import Tensor

import aggnets
from aggnets import Embedder
from aggnets.backbones import build_backbone
from aggnets.codebook import init_head_from_descriptors
from aggnets.heads import RMAC, GeM, HeadCapabilities, NetVLAD, PoolingHead, SpatialPyramid
from aggnets.inspection import codebook_heads, head_internals, head_maps

from .helpers import ANY_SIZE, HEAD_NAMES, MASKED, capabilities, input_kind, make_head, rand_map

# What each seed head is, from its paper and its implementation (not read from the code under test).
SEED = {
    "mac": {"orderless": True},
    "spoc": {"orderless": True},
    "gem": {"orderless": True, "internals": ("p",)},
    "crow": {"orderless": True, "input_domain": "nonnegative"},
    "rmac": {"fullgraph": False, "scriptable": False, "l2_output": True},
    "spatial_pyramid": {"fullgraph": False, "scriptable": False},
    "netvlad": {"codebook": "centroids", "orderless": True, "l2_output": True, "maps": ("assignment",),
                "internals": ("alpha", "assign_weight_norm", "centroid_norm")},
    "netbof": {"codebook": "centroids", "orderless": True, "maps": ("assignment",),
               "internals": ("alpha", "assign_weight_norm")},
    "netfv": {"codebook": "gmm", "orderless": True, "l2_output": True, "maps": ("assignment",),
              "internals": ("mixture_weights", "mean_variance")},
    "class_token": {"global_token": "optional", "orderless": True},
}
SEED["vlad"], SEED["bof"], SEED["fisher_vector"] = SEED["netvlad"], SEED["netbof"], SEED["netfv"]

# The place-recognition heads: MixVPR's mixers are dense over the N = in_h * in_w positions (no mask, one size, a
# graph fixed at that size); ConvAP's cells depend on where a position is (not orderless); CosPlace is GeM on
# normalised descriptors (orderless); CRN's context convolutions see the layout, and its masked forward crops to
# each image's box (a data-dependent step).
FIELD = {
    "mixvpr": {"mask": False, "any_size": False, "size_args": ("in_h", "in_w"), "dynamic_onnx": False,
               "l2_output": True},
    "convap": {"l2_output": True},
    "cosplace": {"orderless": True, "l2_output": True, "internals": ("p",)},
    "crn": {"codebook": "centroids", "l2_output": True, "fullgraph": False, "maps": ("assignment", "context"),
            "internals": ("alpha", "assign_weight_norm", "centroid_norm", "context_filter_norm",
                          "context_filter_bias")},
    # SALAD: per-token MLPs, a transport plan over the set of valid tokens and a sum (orderless); the class token
    # when the backbone has one. BoQ: a 3x3 convolution before the attention (positions matter); attention maps.
    "salad": {"global_token": "optional", "orderless": True, "l2_output": True, "internals": ("dust_bin",),
              "maps": ("assignment", "dustbin")},
    "boq": {"l2_output": True, "maps": ("cross_attention",)},
}


@pytest.mark.parametrize("name", sorted(SEED) + sorted(FIELD))
def test_seed_heads_declare_what_they_are(name):
    assert capabilities(name) == HeadCapabilities(**{**SEED, **FIELD}[name])


def test_every_registered_head_is_pinned():
    assert set(aggnets.list_heads()) == set(SEED) | set(FIELD), "a head was added: pin its declaration here"


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_declared_internals_and_maps_are_what_the_head_gives(name):
    head = make_head(name, C=4, K=3)
    caps = head.capabilities
    assert set(head.internals()) == set(caps.internals)
    x = rand_map(2, 4, 5, 6, kind=input_kind(name))
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    mask[1, 3:, :] = False
    maps = head.internal_maps(x, mask)
    assert set(maps) == set(caps.maps)
    for value in maps.values():
        assert value.shape[0] == 2 and value.shape[-2:] == (5, 6)
        assert value[1][:, ~mask[1]].abs().max() == 0  # nothing at masked positions
    assert [n for n, _ in codebook_heads(head)] == ([""] if caps.codebook != "none" else [])


def test_declarations_are_validated():
    with pytest.raises(ValueError, match="global_token"):
        HeadCapabilities(global_token="sometimes")
    with pytest.raises(ValueError, match="codebook"):
        HeadCapabilities(codebook="pq")
    with pytest.raises(ValueError, match="assignment"):
        HeadCapabilities(codebook="centroids")
    with pytest.raises(ValueError, match="size_args"):
        HeadCapabilities(any_size=False)


@pytest.mark.parametrize("name", sorted(set(HEAD_NAMES) - MASKED))
def test_registered_heads_without_masks_refuse_one(name):
    head = make_head(name, C=4, K=3)
    x = rand_map(2, 4, *(head.map_size or (5, 6)), kind=input_kind(name))
    head(x)
    with pytest.raises(ValueError, match="does not take a mask"):
        head(x, torch.ones(2, *x.shape[-2:], dtype=torch.bool))


@pytest.mark.parametrize("name", sorted(set(HEAD_NAMES) - ANY_SIZE))
def test_registered_fixed_size_heads_refuse_other_sizes(name):
    head = make_head(name, C=4, K=3, size=(5, 6))
    assert head.map_size == (5, 6)
    head(rand_map(1, 4, 5, 6, kind=input_kind(name)))
    with pytest.raises(ValueError, match=capabilities(name).size_args[0]):
        head(rand_map(1, 4, 6, 6, kind=input_kind(name)))


# ---- what the base class enforces ------------------------------------------------------------------------------------

class _Sum(PoolingHead):
    """``f = sum_n x_n``, to exercise declarations (the sum is not meaningful with padding: no mask)."""
    capabilities = HeadCapabilities(mask=False, any_size=False, size_args=("in_h", "in_w"))

    def __init__(self, in_channels: int, in_h: int = 4, in_w: int = 5) -> None:
        super().__init__(in_channels, in_channels)
        self._fix_map_size(in_h, in_w)

    def pool(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return x.sum(dim=(2, 3))


class _TokenSum(PoolingHead):
    """``f = t + sum_n x_n`` (``global_token`` set per test)."""
    capabilities = HeadCapabilities(global_token="optional")
    seen: Optional[Tensor] = None

    def __init__(self, in_channels: int) -> None:
        super().__init__(in_channels, in_channels)

    def pool_token(self, x: Tensor, mask: Optional[Tensor], token: Tensor) -> Tensor:
        type(self).seen = token
        return token + torch.where(mask.unsqueeze(1), x, 0.0).sum(dim=(2, 3)) if mask is not None else token + x.sum(
            dim=(2, 3))


class _RequiresToken(_TokenSum):
    capabilities = HeadCapabilities(global_token="required")


def test_a_head_that_takes_no_mask_refuses_one():
    head = _Sum(3)
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(head(x), x.sum(dim=(2, 3)))
    with pytest.raises(ValueError, match="_Sum: this head does not take a mask"):
        head(x, torch.ones(2, 4, 5, dtype=torch.bool))


def test_a_fixed_size_head_refuses_another_size_naming_its_arguments():
    head = _Sum(3, in_h=4, in_w=5)
    assert head.map_size == (4, 5) and GeM(3).map_size is None
    with pytest.raises(ValueError, match=r"built for 4x5 maps but x is 6x5 .*\(in_h=H, in_w=W\)"):
        head(torch.randn(1, 3, 6, 5))


def test_an_optional_token_head_gets_the_masked_mean_without_one():
    head = _TokenSum(3).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[0, :2, :3] = True
    mask[1, 1:, 2:] = True
    x_garbage = torch.where(mask.unsqueeze(1), x, torch.full_like(x, float("nan")))
    out = head(x_garbage, mask)
    for b in range(2):
        valid = x[b][:, mask[b]]
        torch.testing.assert_close(_TokenSum.seen[b], valid.mean(dim=1))
        torch.testing.assert_close(out[b], valid.mean(dim=1) + valid.sum(dim=1))
    token = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(head(x, None, token), token + x.sum(dim=(2, 3)))


def test_token_errors_name_the_argument():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="GeM: this head does not take a global token"):
        GeM(3)(x, None, torch.randn(2, 3))
    with pytest.raises(ValueError, match="needs the backbone's global token"):
        _RequiresToken(3)(x)
    with pytest.raises(ValueError, match=r"token must have shape \(B, C\) = \(2, 3\)"):
        _TokenSum(3)(x, None, torch.randn(2, 4))
    with pytest.raises(TypeError, match="token must be a floating-point tensor"):
        _TokenSum(3)(x, None, torch.ones(2, 3, dtype=torch.long))


def test_embedder_passes_the_token_only_to_heads_that_use_it():
    vit = build_backbone("timm:vit_small_patch14_dinov2", weights=None,
                         model_kwargs={"embed_dim": 24, "depth": 1, "num_heads": 2}).eval()
    images = torch.rand(2, 3, 42, 56)
    model = Embedder(vit, _RequiresToken(24), normalize=False)
    with torch.no_grad():
        out, features = model(images), vit.extract(images)
    torch.testing.assert_close(out, features.token + features.map.sum(dim=(2, 3)))
    assert Embedder(vit, GeM(24))(images).shape == (2, 24)  # no token for GeM (it would raise)
    cnn = build_backbone("resnet18", "layer1", weights=None)
    with pytest.raises(ValueError, match="requires the backbone's global token"):
        Embedder(cnn, _RequiresToken(64))
    assert Embedder(cnn, _TokenSum(64))(images).shape == (2, 64)  # optional: the masked mean stands in


def test_scripted_heads_keep_the_declared_checks():
    scripted = torch.jit.script(GeM(3))
    with pytest.raises((ValueError, torch.jit.Error), match="does not take a global token"):
        scripted(torch.randn(1, 3, 2, 2), None, torch.randn(1, 3))


# ---- readers of the declarations -------------------------------------------------------------------------------------

def test_spatial_pyramid_inherits_its_heads_declarations():
    pyramid = SpatialPyramid(NetVLAD(4, 3), levels=(1, 2))
    assert pyramid.capabilities.codebook == "centroids" and pyramid.capabilities.maps == ("assignment",)
    assert type(pyramid).capabilities.codebook == "none"  # the class declares none of its own
    assert pyramid.capabilities.dynamic_onnx and not SpatialPyramid(RMAC(4)).capabilities.dynamic_onnx
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(head_maps(pyramid, x)["assignment"], pyramid.head.assignment_map(x))
    with pytest.raises(ValueError, match="must take a mask and any map size"):
        SpatialPyramid(_Sum(4))
    with pytest.raises(ValueError, match="no global token"):
        SpatialPyramid(_TokenSum(4))


def test_inspect_refuses_internals_that_differ_from_the_declaration():
    class Liar(GeM):
        def internals(self):
            return {"p": self.p, "q": self.p}

    with pytest.raises(RuntimeError, match=r"Liar.internals\(\) returned \['p', 'q'\] but the class declares \['p'\]"):
        head_internals(Liar(3))
    assert set(head_internals(SpatialPyramid(GeM(3), levels=(1,)))) == {"head/p"}


def test_codebook_init_reads_the_declaration():
    with pytest.raises(TypeError, match="capabilities.codebook is 'none'"):
        init_head_from_descriptors(GeM(4), torch.randn(50, 4))
    pyramid = SpatialPyramid(aggnets.build_head("netbof", in_channels=4, num_clusters=3), levels=(1, 2))
    assert [name for name, _ in codebook_heads(pyramid)] == [""]
