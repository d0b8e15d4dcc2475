"""MixVPR (Ali-bey et al., WACV 2023) against an independent forward in the authors' layout and order
(amaralibey/MixVPR models/aggregators/mixvpr.py: flatten (B, C, HW); blocks x + Linear(ReLU(Linear(LN(x)))) along HW;
channel_proj on the (B, HW, C) transpose; row_proj on the (B, d, HW) transpose; flatten d-major; L2), written here
with plain torch.nn.functional and NumPy; the converter from the authors' state dict, the fixed map size and its
resample option, the refusal of masks, gradients, precision, and the published formulation of the benchmark."""
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import aggnets
from aggnets.convert import StateDictError, from_reference
from aggnets.heads import MixVPR
from tests.helpers import autocast_output_and_gradients, gradcheck_head

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def _published():
    spec = importlib.util.spec_from_file_location("published_mixvpr", ROOT / "scripts" / "published" / "mixvpr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the authors' layout, and their forward re-derived from the paper's equations --------------------------------------

def authors_state(C, H, W, d=5, L=2, hidden=None, R=3, row_bias=True, prefix="", seed=0):
    """A random state dict in the authors' key names and shapes (mix.{i}.mix.{0,1,3}, channel_proj, row_proj)."""
    g = torch.Generator().manual_seed(seed)
    N = H * W
    M = N if hidden is None else hidden
    sd = {}
    for i in range(L):
        b = f"{prefix}mix.{i}.mix."
        sd[b + "0.weight"] = 1 + 0.3 * torch.randn(N, generator=g, dtype=DT)
        sd[b + "0.bias"] = 0.2 * torch.randn(N, generator=g, dtype=DT)
        sd[b + "1.weight"] = torch.randn(M, N, generator=g, dtype=DT) / math.sqrt(N)
        sd[b + "1.bias"] = 0.2 * torch.randn(M, generator=g, dtype=DT)
        sd[b + "3.weight"] = torch.randn(N, M, generator=g, dtype=DT) / math.sqrt(M)
        sd[b + "3.bias"] = 0.2 * torch.randn(N, generator=g, dtype=DT)
    sd[prefix + "channel_proj.weight"] = torch.randn(d, C, generator=g, dtype=DT) / math.sqrt(C)
    sd[prefix + "channel_proj.bias"] = torch.randn(d, generator=g, dtype=DT)
    sd[prefix + "row_proj.weight"] = torch.randn(R, N, generator=g, dtype=DT) / math.sqrt(N)
    if row_bias:
        sd[prefix + "row_proj.bias"] = torch.randn(R, generator=g, dtype=DT)
    return sd


def authors_forward(x, sd, prefix="", eps=1e-5):
    """The authors' forward order with torch.nn.functional (not aggnets)."""
    z = x.flatten(2)
    i = 0
    while f"{prefix}mix.{i}.mix.0.weight" in sd:
        b = f"{prefix}mix.{i}.mix."
        h = F.layer_norm(z, (z.shape[-1],), sd[b + "0.weight"], sd[b + "0.bias"], eps)
        h = F.linear(F.relu(F.linear(h, sd[b + "1.weight"], sd[b + "1.bias"])), sd[b + "3.weight"], sd[b + "3.bias"])
        z = z + h
        i += 1
    y = F.linear(z.permute(0, 2, 1), sd[prefix + "channel_proj.weight"], sd[prefix + "channel_proj.bias"])
    y = F.linear(y.permute(0, 2, 1), sd[prefix + "row_proj.weight"], sd.get(prefix + "row_proj.bias"))
    return F.normalize(y.flatten(1), p=2, dim=-1)


def numpy_mixvpr(x, sd, eps=1e-5):
    """The NOTES.md equations, element-wise in NumPy: per row c, X_c <- X_c + W2 relu(W1 LN(X_c) + b1) + b2 with
    LN(v) = (v - mean) / sqrt(var + eps) * gamma + beta (biased variance); out[k, r] = sum_n W_r[r, n] (sum_c
    W_c[k, c] X[c, n] + b_c[k]) + b_r[r]; flatten k-major; L2."""
    sd = {k: v.numpy() for k, v in sd.items()}
    out = []
    for image in x.numpy():
        X = image.reshape(image.shape[0], -1).copy()
        i = 0
        while f"mix.{i}.mix.0.weight" in sd:
            b = f"mix.{i}.mix."
            for c in range(X.shape[0]):
                v = X[c]
                ln = (v - v.mean()) / np.sqrt(((v - v.mean()) ** 2).mean() + eps) * sd[b + "0.weight"] + sd[b + "0.bias"]
                hidden = np.maximum(sd[b + "1.weight"] @ ln + sd[b + "1.bias"], 0.0)
                X[c] = v + sd[b + "3.weight"] @ hidden + sd[b + "3.bias"]
            i += 1
        Wc, bc, Wr = sd["channel_proj.weight"], sd["channel_proj.bias"], sd["row_proj.weight"]
        br = sd.get("row_proj.bias", np.zeros(Wr.shape[0]))
        d, R = Wc.shape[0], Wr.shape[0]
        o = np.zeros((d, R))
        for k in range(d):
            y = Wc[k] @ X + bc[k]                     # (N,): the channel projection of every position
            for r in range(R):
                o[k, r] = Wr[r] @ y + br[r]
        v = o.reshape(-1)
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


CONFIGS = {  # name -> (C, H, W, d, L, hidden (None: N), R, row_bias)
    "default_like": (6, 3, 4, 5, 2, None, 3, True),
    "ratio2": (4, 2, 3, 3, 1, 12, 2, True),
    "ratio_half": (5, 4, 3, 4, 3, 6, 4, True),
    "no_mixer": (3, 2, 2, 2, 0, None, 2, True),
    "first_version_no_row_bias": (6, 3, 3, 5, 2, None, 3, False),
    "one_by_one": (4, 1, 1, 3, 2, None, 1, True),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_from_reference_equals_the_authors_forward(config):
    C, H, W, d, L, hidden, R, row_bias = CONFIGS[config]
    sd = authors_state(C, H, W, d, L, hidden, R, row_bias)
    head = from_reference("mixvpr", sd, in_h=H, in_w=W).eval()
    assert isinstance(head, MixVPR) and head.map_size == (H, W)
    assert (head.in_channels, head.out_channels, head.mix_depth, head.out_rows, head.out_dim) == (C, d, L, R, d * R)
    assert head.channel_proj.weight.dtype == DT
    x = torch.randn(3, C, H, W, dtype=DT)
    y = head(x)
    expected = authors_forward(x, sd)
    assert (y - expected).abs().max() <= 1e-12
    np.testing.assert_allclose(y.detach().numpy(), numpy_mixvpr(x, sd), rtol=0, atol=1e-12)


@pytest.mark.parametrize("prefix", ["aggregator.", "module.aggregator."])
def test_from_reference_in_a_whole_model_checkpoint(prefix):
    sd = authors_state(4, 3, 5, prefix=prefix)
    sd[prefix.replace("aggregator", "backbone") + "layer1.0.conv1.weight"] = torch.zeros(4, 3, 3, 3, dtype=DT)
    for given in (None, prefix, prefix.rstrip(".")):
        head = from_reference("mixvpr", {"epoch": 1, "state_dict": sd}, in_h=3, in_w=5, prefix=given)
        x = torch.randn(2, 4, 3, 5, dtype=DT)
        assert (head(x) - authors_forward(x, sd, prefix)).abs().max() <= 1e-12


def test_from_reference_map_size_from_one_side_or_a_square():
    sd = authors_state(4, 4, 4)
    assert from_reference("mixvpr", sd).map_size == (4, 4)                  # a square N: the square map
    assert from_reference("mixvpr", sd, in_h=2).map_size == (2, 8)
    assert from_reference("mixvpr", sd, in_w=8).map_size == (2, 8)
    with pytest.raises(ValueError, match="in_h and in_w"):
        from_reference("mixvpr", authors_state(4, 2, 3))                    # N = 6: not square
    with pytest.raises(ValueError, match=r"in_h \* in_w = 3 \* 5 = 15.*N = 16"):
        from_reference("mixvpr", sd, in_h=3, in_w=5)
    with pytest.raises(ValueError, match="in_h=3 does not divide"):
        from_reference("mixvpr", sd, in_h=3)


def test_converter_errors_name_the_key():
    sd = authors_state(4, 2, 3, L=2)
    with pytest.raises(StateDictError, match=r"'mix\.1\.mix\.3\.weight'"):
        from_reference("mixvpr", {k: v for k, v in sd.items() if k != "mix.1.mix.3.weight"}, in_h=2, in_w=3)
    with pytest.raises(StateDictError, match=r"'mix\.0\.mix\.0\.bias' must have shape \(6,\), found \(5,\)"):
        from_reference("mixvpr", dict(sd, **{"mix.0.mix.0.bias": torch.zeros(5, dtype=DT)}), in_h=2, in_w=3)
    with pytest.raises(StateDictError, match=r"'channel_proj\.bias' must have shape \(5,\), found \(4,\)"):
        from_reference("mixvpr", dict(sd, **{"channel_proj.bias": torch.zeros(4, dtype=DT)}), in_h=2, in_w=3)
    with pytest.raises(StateDictError, match=r"'mix\.1\.mix\.1\.weight' has shape \(7, 6\).*block 0"):
        bad = dict(sd, **{"mix.1.mix.1.weight": torch.zeros(7, 6, dtype=DT), "mix.1.mix.1.bias": torch.zeros(7),
                          "mix.1.mix.3.weight": torch.zeros(6, 7, dtype=DT)})
        from_reference("mixvpr", bad, in_h=2, in_w=3)
    with pytest.raises(StateDictError, match=r"unexpected key.*'mix\.0\.gamma'"):
        from_reference("mixvpr", dict(sd, **{"mix.0.gamma": torch.ones(4, dtype=DT)}), in_h=2, in_w=3)
    with pytest.raises(StateDictError, match=r"missing key 'channel_proj\.weight'"):
        from_reference("mixvpr", {"backbone.conv.weight": torch.zeros(2)})
    with pytest.raises(StateDictError, match="ambiguous"):
        from_reference("mixvpr", {**sd, **authors_state(4, 2, 3, prefix="other.")}, in_h=2, in_w=3)
    with pytest.raises(StateDictError, match=r"missing key 'aggregator\.channel_proj\.weight'"):
        from_reference("mixvpr", sd, in_h=2, in_w=3, prefix="aggregator.")


# --- the head itself -------------------------------------------------------------------------------------------------

def test_state_dict_keys_and_shapes():
    head = MixVPR(7, in_h=2, in_w=3, out_channels=5, mix_depth=3, mlp_ratio=2, out_rows=4)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "mix_norm_weight": (3, 6), "mix_norm_bias": (3, 6), "mix_fc1_weight": (3, 12, 6), "mix_fc1_bias": (3, 12),
        "mix_fc2_weight": (3, 6, 12), "mix_fc2_bias": (3, 6), "channel_proj.weight": (5, 7),
        "channel_proj.bias": (5,), "row_proj.weight": (4, 6), "row_proj.bias": (4,)}
    assert head.out_dim == 20 and head.map_size == (2, 3)


def test_defaults_and_init_are_the_authors():
    torch.manual_seed(0)
    head = MixVPR(1024)
    assert (head.in_h, head.in_w, head.out_channels, head.mix_depth, head.mlp_ratio, head.out_rows) == (
        20, 20, 512, 4, 1, 4)
    assert head.out_dim == 2048 and head.map_size == (20, 20) and not head.resample
    for w in (head.mix_fc1_weight.detach(), head.mix_fc2_weight.detach()):
        assert abs(float(w.std()) - 0.02) < 5e-4 and float(w.abs().max()) < 0.2
    for b in (head.mix_fc1_bias, head.mix_fc2_bias, head.mix_norm_bias):
        assert torch.all(b == 0)
    assert torch.all(head.mix_norm_weight == 1)
    bound = 1 / math.sqrt(1024)  # nn.Linear's default (kaiming uniform, a = sqrt(5)): U(-1/sqrt(fan_in), ...)
    weight = head.channel_proj.weight.detach()
    assert float(weight.abs().max()) <= bound and float(weight.std()) > bound / 3
    params = sum(p.numel() for p in head.parameters() if p.requires_grad)
    assert params == 4 * (2 * 400 + 400 * 400 + 400 + 400 * 400 + 400) + 1024 * 512 + 512 + 400 * 4 + 4


def test_published_formulation_matches():
    torch.manual_seed(3)
    head = MixVPR(6, in_h=3, in_w=4, out_channels=5, mix_depth=3, mlp_ratio=2, out_rows=3).double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    published = _published().from_head(head)
    x = torch.randn(4, 6, 3, 4, dtype=DT)
    assert (published(x) - head(x)).abs().max() <= 1e-12
    assert (published(x) - authors_forward(x, _authors_keys(head))).abs().max() <= 1e-12


def _authors_keys(head):
    """Our parameters under the authors' key names (the inverse of from_reference, written independently)."""
    sd = {"channel_proj.weight": head.channel_proj.weight, "channel_proj.bias": head.channel_proj.bias,
          "row_proj.weight": head.row_proj.weight, "row_proj.bias": head.row_proj.bias}
    for i in range(head.mix_depth):
        for ours, theirs in (("norm_weight", "0.weight"), ("norm_bias", "0.bias"), ("fc1_weight", "1.weight"),
                             ("fc1_bias", "1.bias"), ("fc2_weight", "3.weight"), ("fc2_bias", "3.bias")):
            sd[f"mix.{i}.mix.{theirs}"] = getattr(head, "mix_" + ours)[i]
    return {k: v.detach() for k, v in sd.items()}


def test_round_trip_through_the_authors_layout():
    torch.manual_seed(4)
    head = MixVPR(5, in_h=2, in_w=4, out_channels=3, mix_depth=2, out_rows=2).double()
    again = from_reference("mixvpr", _authors_keys(head), in_h=2, in_w=4)
    for k, v in head.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_other_sizes_and_masks_are_refused():
    head = MixVPR(4, in_h=3, in_w=5, out_channels=2, mix_depth=1, out_rows=2)
    head(torch.randn(2, 4, 3, 5))
    with pytest.raises(ValueError, match=r"built for 3x5 maps but x is 5x3.*in_h=H, in_w=W.*resample=True"):
        head(torch.randn(2, 4, 5, 3))
    with pytest.raises(ValueError, match="does not take a mask"):
        head(torch.randn(2, 4, 3, 5), torch.ones(2, 3, 5, dtype=torch.bool))
    assert not MixVPR.capabilities.mask and not MixVPR.capabilities.any_size
    assert MixVPR.capabilities.size_args == ("in_h", "in_w")


@pytest.mark.parametrize("size", [(3, 5), (6, 10), (2, 2), (7, 3), (1, 1)])
def test_resample_takes_any_size(size):
    torch.manual_seed(5)
    head = MixVPR(4, in_h=3, in_w=5, out_channels=3, mix_depth=2, out_rows=2, resample=True).double()
    assert head.map_size is None and head.capabilities.any_size and head.capabilities.dynamic_onnx
    assert type(head).capabilities.size_args == ("in_h", "in_w") and head.capabilities.size_args == ()
    plain = MixVPR(4, in_h=3, in_w=5, out_channels=3, mix_depth=2, out_rows=2).double()
    plain.load_state_dict(head.state_dict())
    x = torch.randn(2, 4, *size, dtype=DT)
    shrinking = size[0] > 3 or size[1] > 5
    resized = F.interpolate(x, size=(3, 5), mode="bilinear", align_corners=False, antialias=shrinking)
    assert (head(x) - authors_forward(resized, _authors_keys(plain))).abs().max() <= 1e-12
    if size == (3, 5):  # the identity at the trained size
        assert torch.equal(head(x), plain(x))
    with pytest.raises(ValueError, match="does not take a mask"):
        head(x, torch.ones(2, *size, dtype=torch.bool))


BAD_ARGS = [
    ({"in_channels": 0}, "in_channels"), ({"in_h": 0}, "in_h"), ({"in_w": -2}, "in_w"), ({"in_h": 2.5}, "in_h"),
    ({"out_channels": 0}, "out_channels"), ({"out_rows": 1.5}, "out_rows"), ({"mix_depth": -1}, "mix_depth"),
    ({"mix_depth": True}, "mix_depth"), ({"mlp_ratio": 0}, "mlp_ratio"), ({"mlp_ratio": 0.001}, "mlp_ratio"),
    ({"mlp_ratio": "1"}, "mlp_ratio"), ({"resample": "yes"}, "resample"),
]


@pytest.mark.parametrize("kwargs,word", BAD_ARGS, ids=[str(a) for a, _ in BAD_ARGS])
def test_bad_constructor_arguments(kwargs, word):
    args = {"in_channels": 4, "in_h": 3, "in_w": 4, **kwargs}
    with pytest.raises(ValueError, match=word):
        MixVPR(**args)


def test_registry_config_and_repr():
    head = aggnets.build_head("mixvpr", in_channels=13, in_h=2, in_w=3, out_channels=4, out_rows=2)
    assert type(head) is MixVPR and head.out_dim == 8
    r = repr(head)
    assert "in_channels=13" in r and "in_h=2" in r and "out_dim=8" in r


def test_gradcheck_input_and_every_parameter():
    torch.manual_seed(6)
    head = MixVPR(3, in_h=2, in_w=3, out_channels=2, mix_depth=2, mlp_ratio=1, out_rows=2).double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    assert gradcheck_head(head, torch.randn(2, 3, 2, 3, dtype=DT))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_huge_activations_under_autocast_stay_finite(autocast):
    """Activations of 1e4 on 64 coherent (positive) channels: the projections sum 64 x 20 terms of ~1e4, past
    float16's range (65504) if they ran in float16."""
    torch.manual_seed(7)
    head = MixVPR(64, in_h=4, in_w=5, out_channels=16, mix_depth=2, out_rows=4)
    with torch.no_grad():
        head.channel_proj.weight.abs_()
        head.row_proj.weight.abs_()
    autocast_output_and_gradients(head, 1e4 * torch.rand(2, 64, 4, 5), autocast)


def test_half_input_gives_float32():
    head = MixVPR(4, in_h=2, in_w=3, out_channels=3, out_rows=2)
    x = torch.randn(2, 4, 2, 3)
    for half in (torch.float16, torch.bfloat16):
        y = head(x.to(half))
        assert y.dtype == torch.float32 and (y - head(x.to(half).float())).abs().max() < 1e-6
    assert head.double()(x.double()).dtype == DT


def test_script_and_compile_match_eager():
    torch.manual_seed(8)
    for resample in (False, True):
        head = MixVPR(4, in_h=3, in_w=4, out_channels=3, mix_depth=2, out_rows=2, resample=resample).double().eval()
        x = torch.randn(2, 4, 3, 4, dtype=DT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.script(head)
        compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            assert (scripted(x) - head(x)).abs().max() <= 1e-12
            assert (compiled(x) - head(x)).abs().max() <= 1e-12
            if resample:
                x2 = torch.randn(1, 4, 6, 5, dtype=DT)
                assert (scripted(x2) - head(x2)).abs().max() <= 1e-12
