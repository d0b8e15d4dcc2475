"""aggnets.convert: weights from pytorch-NetVlad and cirtorch layouts give the same outputs; load_head_state errors
name the key; the state_dict keys of every registered head are pinned."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aggnets import build_head, list_heads
from aggnets.convert import (HEAD_STATE_KEYS, StateDictError, format_head_state_keys, gem_from_cirtorch,
                             head_state_keys, load_head_state, netvlad_from_pytorch_netvlad)
from aggnets.heads import GeM, NetVLAD

DT = torch.float64


# --- independent re-implementations of the peer layers' forward passes ---------------------------------------------

def pytorch_netvlad_forward(x, conv_weight, conv_bias, centroids, normalize_input=True):
    """pytorch-NetVlad's NetVLAD.forward (per-cluster residual loop, as in its netvlad.py)."""
    n, c = x.shape[:2]
    k = centroids.shape[0]
    if normalize_input:
        x = F.normalize(x, p=2, dim=1)
    soft_assign = F.conv2d(x, conv_weight, conv_bias).view(n, k, -1)
    soft_assign = F.softmax(soft_assign, dim=1)
    x_flatten = x.view(n, c, -1)
    vlad = torch.zeros(n, k, c, dtype=x.dtype)
    for j in range(k):
        residual = x_flatten - centroids[j].view(1, c, 1)              # (N, C, HW)
        residual = residual * soft_assign[:, j:j + 1, :]
        vlad[:, j, :] = residual.sum(dim=-1)
    vlad = F.normalize(vlad, p=2, dim=2)       # intra-normalisation
    vlad = vlad.view(n, -1)                    # k-major flatten
    return F.normalize(vlad, p=2, dim=1)


def cirtorch_gem(x, p, eps=1e-6):
    """cirtorch's functional gem: avg_pool2d(x.clamp(min=eps).pow(p), (H, W)).pow(1/p)."""
    p = p.view(1, -1, 1, 1)
    return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)


def _peer_netvlad_state(k, c, bias, prefix, extra=True):
    g = torch.Generator().manual_seed(k * 100 + c)
    sd = {prefix + "conv.weight": torch.randn(k, c, 1, 1, generator=g, dtype=DT) * 3,
          prefix + "centroids": torch.rand(k, c, generator=g, dtype=DT)}
    if bias:
        sd[prefix + "conv.bias"] = torch.randn(k, generator=g, dtype=DT)
    if extra:   # a backbone alongside, as in a whole-network checkpoint
        sd["encoder.0.weight"] = torch.randn(c, 3, 3, 3, generator=g, dtype=DT)
        sd["encoder.0.bias"] = torch.randn(c, generator=g, dtype=DT)
    return sd


SIZES = [(1, 1), (3, 5), (7, 4), (13, 13)]


@pytest.mark.parametrize("prefix", ["", "pool.", "module.pool."])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("normalize_input", [True, False])
def test_netvlad_from_pytorch_netvlad_matches(prefix, bias, normalize_input):
    k, c = 6, 10
    sd = _peer_netvlad_state(k, c, bias, prefix)
    for given in ([None] if not prefix else [None, prefix, prefix.rstrip(".")]):
        head = netvlad_from_pytorch_netvlad(sd, prefix=given or "", normalize_input=normalize_input)
        assert isinstance(head, NetVLAD) and head.num_clusters == k and head.in_channels == c
        assert (head.assign.bias is not None) == bias
        assert head.centroids.dtype == DT and head.out_dim == k * c
        g = torch.Generator().manual_seed(1)
        for h, w in SIZES:
            x = torch.randn(3, c, h, w, generator=g, dtype=DT)
            expected = pytorch_netvlad_forward(x, sd[prefix + "conv.weight"], sd.get(prefix + "conv.bias"),
                                               sd[prefix + "centroids"], normalize_input)
            torch.testing.assert_close(head(x), expected, rtol=0, atol=1e-10)


def test_netvlad_converter_unwraps_checkpoint_and_trains():
    sd = _peer_netvlad_state(4, 8, True, "pool.")
    head = netvlad_from_pytorch_netvlad({"epoch": 3, "state_dict": sd})
    assert all(p.requires_grad for p in head.parameters())
    head(torch.randn(2, 8, 5, 5, dtype=DT)).sum().backward()
    assert head.centroids.grad is not None and head.assign.weight.grad is not None


def test_netvlad_converter_float32():
    sd = {k: v.float() for k, v in _peer_netvlad_state(4, 8, False, "").items()}
    head = netvlad_from_pytorch_netvlad(sd)
    x = torch.randn(2, 8, 6, 5)
    torch.testing.assert_close(head(x), pytorch_netvlad_forward(x, sd["conv.weight"], None, sd["centroids"]),
                               rtol=1e-5, atol=1e-6)


def test_netvlad_converter_errors_name_the_key():
    sd = _peer_netvlad_state(4, 8, True, "pool.")
    missing = {k: v for k, v in sd.items() if k != "pool.centroids"}
    with pytest.raises(StateDictError, match="centroids"):
        netvlad_from_pytorch_netvlad(missing)
    with pytest.raises(StateDictError, match="pool.centroids"):
        netvlad_from_pytorch_netvlad(missing, prefix="pool.")
    bad = dict(sd, **{"pool.centroids": torch.zeros(5, 8, dtype=DT)})
    with pytest.raises(StateDictError, match=r"pool\.conv\.weight.*\(5, 8, 1, 1\).*\(4, 8, 1, 1\)"):
        netvlad_from_pytorch_netvlad(bad)
    bad = dict(sd, **{"pool.conv.bias": torch.zeros(3, dtype=DT)})
    with pytest.raises(StateDictError, match=r"pool\.conv\.bias.*\(4,\).*\(3,\)"):
        netvlad_from_pytorch_netvlad(bad)
    bad = dict(sd, **{"pool.centroids": torch.zeros(4, 8, 2, dtype=DT)})
    with pytest.raises(StateDictError, match=r"pool\.centroids.*\(4, 8, 2\)"):
        netvlad_from_pytorch_netvlad(bad)
    two = {**sd, **_peer_netvlad_state(4, 8, False, "other.", extra=False)}
    with pytest.raises(StateDictError, match="ambiguous.*other\\..*pool\\."):
        netvlad_from_pytorch_netvlad(two)
    assert netvlad_from_pytorch_netvlad(two, prefix="other.").assign.bias is None


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("prefix", [None, "pool.", "module.pool."])
def test_gem_from_cirtorch_matches(per_channel, prefix):
    c = 9
    g = torch.Generator().manual_seed(2)
    key = (prefix or "pool.") + "p"
    p = 1.0 + 4 * torch.rand(c if per_channel else 1, generator=g, dtype=DT)
    sd = {"features.0.weight": torch.randn(c, 3, 3, 3, dtype=DT), key: p}
    head = gem_from_cirtorch(sd, prefix=prefix, in_channels=c)
    assert isinstance(head, GeM) and head.p.shape == p.shape and head.eps == 1e-6 and head.in_channels == c
    for h, w in SIZES:
        x = torch.randn(2, c, h, w, generator=g, dtype=DT).relu()        # post-ReLU maps, zeros included
        torch.testing.assert_close(head(x), cirtorch_gem(x, p).flatten(1), rtol=0, atol=1e-10)
    normed = gem_from_cirtorch(sd, prefix=prefix, in_channels=c, normalize=True)
    x = torch.rand(2, c, 4, 6, dtype=DT)
    torch.testing.assert_close(normed(x), F.normalize(cirtorch_gem(x, p).flatten(1), dim=1), rtol=0, atol=1e-10)


def test_gem_from_cirtorch_in_channels_inference_and_errors():
    p = torch.tensor([3.2], dtype=DT)
    checkpoint = {"meta": {"architecture": "resnet101", "pooling": "gem", "outputdim": 16},
                  "state_dict": {"features.0.weight": torch.zeros(1), "pool.p": p}}
    assert gem_from_cirtorch(checkpoint).in_channels == 16
    assert gem_from_cirtorch({"pool.p": p, "whiten.weight": torch.zeros(16, 12)}).in_channels == 12
    assert gem_from_cirtorch({"pool.p": torch.full((5,), 2.0)}).in_channels == 5
    with pytest.raises(ValueError, match="in_channels"):
        gem_from_cirtorch({"pool.p": p})
    with pytest.raises(StateDictError, match="pool.p"):
        gem_from_cirtorch({"features.0.weight": torch.zeros(1)}, in_channels=4)
    with pytest.raises(StateDictError, match=r"pool\.p.*\(5,\)"):
        gem_from_cirtorch({"pool.p": torch.ones(5)}, in_channels=4)
    with pytest.raises(StateDictError, match=r"pool\.p.*\(1, 1\)"):
        gem_from_cirtorch({"pool.p": torch.ones(1, 1)}, in_channels=4)
    with pytest.raises(StateDictError, match="ambiguous"):
        gem_from_cirtorch({"pool.p": p, "module.pool.p": p}, in_channels=4)


# --- load_head_state -------------------------------------------------------------------------------------------------

def test_load_head_state_round_trip_and_prefix():
    src = NetVLAD(8, 4)
    dst = NetVLAD(8, 4)
    load_head_state(dst, src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    wrapped = {"backbone.conv.weight": torch.zeros(3), **{"head." + k: v for k, v in src.state_dict().items()}}
    load_head_state(NetVLAD(8, 4), wrapped, prefix="head.")
    with pytest.raises(StateDictError, match="prefix='head.'"):
        load_head_state(NetVLAD(8, 4), {"head." + k: v for k, v in src.state_dict().items()})


def test_load_head_state_errors_name_keys_and_shapes():
    head = NetVLAD(8, 4)
    sd = head.state_dict()
    with pytest.raises(StateDictError, match=r"missing key 'centroids' \(expected shape \(4, 8\)\)"):
        load_head_state(head, {k: v for k, v in sd.items() if k != "centroids"})
    with pytest.raises(StateDictError, match=r"shape mismatch for 'assign.weight': expected \(4, 8, 1, 1\), "
                                             r"found \(6, 8, 1, 1\)"):
        load_head_state(head, dict(sd, **{"assign.weight": torch.zeros(6, 8, 1, 1)}))
    with pytest.raises(StateDictError, match=r"unexpected key 'extra' \(found shape \(2,\)\)"):
        load_head_state(head, dict(sd, extra=torch.zeros(2)))
    load_head_state(head, dict(sd, extra=torch.zeros(2)), strict=False)          # non-strict: extra ignored
    with pytest.raises(StateDictError, match="shape mismatch"):                  # ... but shapes always checked
        load_head_state(head, dict(sd, centroids=torch.zeros(3, 8)), strict=False)


def test_load_head_state_hints_at_the_converters():
    peer = _peer_netvlad_state(4, 8, True, "pool.")
    with pytest.raises(StateDictError, match="netvlad_from_pytorch_netvlad"):
        load_head_state(NetVLAD(8, 4), peer)
    cirtorch = {"features.0.weight": torch.zeros(8, 3, 3, 3), "pool.p": torch.tensor([3.0])}
    with pytest.raises(StateDictError, match="gem_from_cirtorch"):
        load_head_state(GeM(8), cirtorch)


# --- stable keys -----------------------------------------------------------------------------------------------------

_ASSIGN = {"alpha": (), "assign.weight": ("K", "C", 1, 1), "assign.bias": ("K",)}
_GMM = {"log_weights": ("K",), "means": ("K", "C"), "log_vars": ("K", "C")}
PINNED = {
    "bof": _ASSIGN, "netbof": _ASSIGN,
    "netvlad": {**_ASSIGN, "centroids": ("K", "C")}, "vlad": {**_ASSIGN, "centroids": ("K", "C")},
    "fisher_vector": _GMM, "netfv": _GMM,
    "gem": {"p": (1,)}, "mac": {}, "spoc": {}, "crow": {}, "rmac": {}, "class_token": {},
    "spatial_pyramid": {"head." + k: v for k, v in {**_ASSIGN, "centroids": ("K", "C")}.items()},
    "mixvpr": {"mix_norm_weight": (4, 400), "mix_norm_bias": (4, 400), "mix_fc1_weight": (4, 400, 400),
               "mix_fc1_bias": (4, 400), "mix_fc2_weight": (4, 400, 400), "mix_fc2_bias": (4, 400),
               "channel_proj.weight": (512, "C"), "channel_proj.bias": (512,), "row_proj.weight": (4, 400),
               "row_proj.bias": (4,)},
    "convap": {"channel_pool.weight": (512, "C", 1, 1), "channel_pool.bias": (512,)},
    "cosplace": {"p": (1,), "fc.weight": (512, "C"), "fc.bias": (512,)},
    "crn": {"centroids": ("K", "C"), **_ASSIGN,
            "context.accumulation_weight": (1, 84, 1, 1), "context.accumulation_bias": (1,),
            "context.filter3.weight": (32, "C", 3, 3), "context.filter3.bias": (32,),
            "context.filter5.weight": (32, "C", 5, 5), "context.filter5.bias": (32,),
            "context.filter7.weight": (20, "C", 7, 7), "context.filter7.bias": (20,)},
    "salad": {"score_hidden.weight": (512, "C"), "score_hidden.bias": (512,), "score.weight": ("K", 512),
              "score.bias": ("K",), "feature_hidden.weight": (512, "C"), "feature_hidden.bias": (512,),
              "feature.weight": (128, 512), "feature.bias": (128,), "scene_hidden.weight": (512, "C"),
              "scene_hidden.bias": (512,), "scene.weight": (256, 512), "scene.bias": (256,), "dust_bin": ()},
}


def _boq_keys(d=512, queries=32, layers=2, rows=32):
    """BoQ's keys: the authors' (amaralibey/Bag-of-Queries src/boq.py), nn.MultiheadAttention's packed projections."""
    attention = {"in_proj_weight": (3 * d, d), "in_proj_bias": (3 * d,), "out_proj.weight": (d, d),
                 "out_proj.bias": (d,)}
    norm = {"weight": (d,), "bias": (d,)}
    keys = {"proj_c.weight": (d, "C", 3, 3), "proj_c.bias": (d,), "norm_input.weight": (d,), "norm_input.bias": (d,)}
    for i in range(layers):
        block = f"boqs.{i}."
        keys.update({block + "encoder.self_attn." + k: v for k, v in attention.items()})
        keys.update({block + "encoder.linear1.weight": (4 * d, d), block + "encoder.linear1.bias": (4 * d,),
                     block + "encoder.linear2.weight": (d, 4 * d), block + "encoder.linear2.bias": (d,)})
        for name in ("encoder.norm1", "encoder.norm2"):
            keys.update({f"{block}{name}.{k}": v for k, v in norm.items()})
        keys[block + "queries"] = (1, queries, d)
        keys.update({block + "self_attn." + k: v for k, v in attention.items()})
        keys.update({block + "norm_q." + k: v for k, v in norm.items()})
        keys.update({block + "cross_attn." + k: v for k, v in attention.items()})
        keys.update({block + "norm_out." + k: v for k, v in norm.items()})
    keys.update({"fc.weight": (rows, layers * queries), "fc.bias": (rows,)})
    return keys


PINNED["boq"] = _boq_keys()


def test_state_dict_keys_are_pinned():
    """A renamed parameter or buffer breaks every saved checkpoint: update the converters, add a translation in
    load_head_state and the README table before changing this."""
    table = head_state_keys()
    assert set(table) == set(list_heads()), "a head was added or removed: pin its keys here"
    for name, keys in PINNED.items():
        assert table[name] == keys, f"state_dict keys of {name!r} changed: {table[name]} != {keys}"
    assert HEAD_STATE_KEYS == table


def test_state_dict_key_variants():
    assert set(build_head("gem", in_channels=6, per_channel=True).state_dict()) == {"p"}
    assert build_head("gem", in_channels=6, per_channel=True).p.shape == (6,)
    assert set(build_head("netvlad", in_channels=6, num_clusters=3, bias=False).state_dict()) == {
        "alpha", "assign.weight", "centroids"}
    assert set(build_head("rmac", in_channels=6, pool="gem").state_dict()) <= {"p"}
    ghost = build_head("netvlad", in_channels=6, num_clusters=3, ghost_clusters=2).state_dict()
    assert ghost["assign.weight"].shape == (5, 6, 1, 1) and ghost["centroids"].shape == (3, 6)
    assert set(build_head("netvlad", in_channels=6, num_clusters=3, residual=False).state_dict()) == {
        "alpha", "assign.weight", "assign.bias"}


def test_head_state_keys_leaves_rng_alone_and_formats():
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    head_state_keys()
    assert torch.equal(torch.rand(3), a)
    md = format_head_state_keys()
    assert "| netvlad |" in md and "`centroids` (K, C)" in md and "`p` (1,)" in md
