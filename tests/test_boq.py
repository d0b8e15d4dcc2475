"""BoQ (Ali-bey et al., CVPR 2024) against a forward written here from the NOTES.md equations with PyTorch's own
``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` (not aggnets' attention), loaded from state dicts in the
authors' key names (amaralibey/Bag-of-Queries src/boq.py); masks as key padding masks, the queries' self-attention
once per forward, the cross-attention maps, the converter's errors, gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aggnets
from aggnets.backbones import build_backbone
from aggnets.convert import StateDictError, from_reference
from aggnets.heads import BoQ
from tests.helpers import autocast_output_and_gradients, gradcheck_head, pad_with_garbage

DT = torch.float64


def authors_keys(L):
    """The authors' key names (nn.Conv2d, nn.LayerNorm, nn.TransformerEncoderLayer, nn.MultiheadAttention)."""
    attn = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    keys = ["proj_c.weight", "proj_c.bias", "norm_input.weight", "norm_input.bias", "fc.weight", "fc.bias"]
    for i in range(L):
        b = f"boqs.{i}."
        keys += [b + "encoder.self_attn." + a for a in attn]
        keys += [b + "encoder." + n + s for n in ("linear1", "linear2", "norm1", "norm2") for s in (".weight", ".bias")]
        keys += [b + "queries"] + [b + "self_attn." + a for a in attn] + [b + "cross_attn." + a for a in attn]
        keys += [b + n + s for n in ("norm_q", "norm_out") for s in (".weight", ".bias")]
    return keys


class Block(nn.Module):
    """One block of the NOTES.md equations, from PyTorch's modules."""

    def __init__(self, d, Q, heads):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.queries = nn.Parameter(torch.zeros(1, Q, d))
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm_q = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm_out = nn.LayerNorm(d)


class Reference(nn.Module):
    def __init__(self, C, d, Q, L, R, heads):
        super().__init__()
        self.proj_c = nn.Conv2d(C, d, 3, padding=1)
        self.norm_input = nn.LayerNorm(d)
        self.boqs = nn.ModuleList(Block(d, Q, heads) for _ in range(L))
        self.fc = nn.Linear(L * Q, R)

    def forward(self, x, mask=None):
        """x (B, C, H, W); mask (B, H, W): masked positions are zero for the convolution and padding keys after."""
        if mask is not None:
            x = torch.where(mask[:, None], x, torch.zeros_like(x))
        padding = None if mask is None else ~mask.flatten(1)
        tokens = self.norm_input(self.proj_c(x).flatten(2).transpose(1, 2))
        outs, attns = [], []
        for block in self.boqs:
            tokens = block.encoder(tokens, src_key_padding_mask=padding)
            q = block.queries.repeat(x.shape[0], 1, 1)
            q = block.norm_q(q + block.self_attn(q, q, q)[0])
            out, attn = block.cross_attn(q, tokens, tokens, key_padding_mask=padding)
            outs.append(block.norm_out(out))
            attns.append(attn)
        y = self.fc(torch.cat(outs, dim=1).transpose(1, 2))           # (B, d, R)
        return F.normalize(y.flatten(1), dim=-1), torch.cat(attns, dim=1)


def authors_state(C=5, d=8, Q=3, L=2, R=4, heads=2, prefix="", seed=0):
    """A random state dict in the authors' layout (every tensor random, LayerNorms away from (1, 0))."""
    torch.manual_seed(seed)
    ref = Reference(C, d, Q, L, R, heads).double()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else p.shape[-1] ** -0.5) + (1.0 if "norm" in name and
                                                                                            "weight" in name else 0.0))
    sd = {prefix + k: v for k, v in ref.state_dict().items()}
    return sd, ref.eval()


def test_the_authors_layout_is_ours():
    sd, _ = authors_state()
    assert set(sd) == set(authors_keys(2))
    assert set(BoQ(5, 8, 3, 2, 4, num_heads=2).state_dict()) == set(authors_keys(2))


@pytest.mark.parametrize("sizes", [dict(C=5, d=8, Q=3, L=2, R=4, heads=2), dict(C=3, d=12, Q=5, L=1, R=2, heads=3),
                                   dict(C=4, d=6, Q=2, L=3, R=5, heads=1)])
def test_from_reference_equals_the_equations(sizes):
    sd, ref = authors_state(**sizes)
    head = from_reference("boq", sd, num_heads=sizes["heads"]).eval()
    assert head.out_dim == sizes["d"] * sizes["R"] and head.num_layers == sizes["L"]
    x = torch.randn(2, sizes["C"], 3, 4, dtype=DT)
    got = head(x)
    assert got.dtype == DT
    torch.testing.assert_close(got, ref(x)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("prefix", ["aggregator.", "module.aggregator."])
def test_from_reference_in_a_whole_model_checkpoint(prefix):
    sd, ref = authors_state(prefix=prefix)
    sd[prefix.replace("aggregator.", "backbone.") + "net.0.weight"] = torch.zeros(3)
    head = from_reference("boq", {"state_dict": sd}, num_heads=2).eval()
    x = torch.randn(2, 5, 4, 4, dtype=DT)
    torch.testing.assert_close(head(x), ref(x)[0], rtol=0, atol=1e-12)


def test_masks_are_key_padding_masks():
    sd, ref = authors_state()
    head = from_reference("boq", sd, num_heads=2).eval()
    x = torch.randn(2, 5, 3, 4, dtype=DT)
    padded, mask = pad_with_garbage(x, 6, 7, top=2, left=1)
    torch.testing.assert_close(head(padded, mask), ref(x)[0], rtol=0, atol=1e-12)
    irregular = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)) > 0.4
    irregular[:, 0, 0] = True
    torch.testing.assert_close(head(x, irregular), ref(x, irregular)[0], rtol=0, atol=1e-12)


def test_cross_attention_maps():
    sd, ref = authors_state()
    head = from_reference("boq", sd, num_heads=2).eval()
    x = torch.randn(2, 5, 3, 4, dtype=DT)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, :, 3:] = False
    maps = aggnets.inspection.head_maps(head, x, mask)["cross_attention"]
    assert maps.shape == (2, 2 * 3, 3, 4)
    torch.testing.assert_close(maps.flatten(2), ref(x, mask)[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 6, dtype=DT))
    assert maps[1][:, ~mask[1]].abs().max() == 0


def test_the_queries_self_attention_runs_once_per_forward():
    head = BoQ(5, 8, 3, 2, 4, num_heads=2).eval()
    calls = []
    for block in head.boqs:
        block.self_attn.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    head(torch.randn(7, 5, 3, 4))
    assert calls == [1, 1]  # once per block, for the whole batch of 7


def test_defaults_follow_the_authors():
    head = BoQ(1024)
    assert (head.proj_channels, head.num_queries, head.num_layers, head.row_dim, head.num_heads) == (512, 32, 2, 32, 8)
    assert head.out_dim == 16384 and head.proj_c.kernel_size == (3, 3)
    assert BoQ(768, proj_channels=384, num_queries=64).num_heads == 6 and BoQ(4, proj_channels=8).num_heads == 1
    reference = nn.MultiheadAttention(8, 2, batch_first=True)
    ours = BoQ(4, proj_channels=8, num_heads=2).boqs[0].cross_attn
    assert ours.in_proj_bias.abs().max() == 0 and ours.out_proj.bias.abs().max() == 0
    bound = (6 / (8 + 24)) ** 0.5  # Xavier-uniform of a (3d, d) matrix, as nn.MultiheadAttention
    assert ours.in_proj_weight.abs().max() <= bound and reference.in_proj_weight.abs().max() <= bound


def test_converter_errors_name_the_key():
    sd, _ = authors_state()
    with pytest.raises(StateDictError, match="boqs.1.cross_attn.in_proj_weight"):
        from_reference("boq", {k: v for k, v in sd.items() if k != "boqs.1.cross_attn.in_proj_weight"}, num_heads=2)
    with pytest.raises(StateDictError, match="fc.weight"):
        from_reference("boq", dict(sd, **{"fc.weight": torch.zeros(4, 5, dtype=DT)}), num_heads=2)
    with pytest.raises(StateDictError, match="unexpected.*boqs.0.extra"):
        from_reference("boq", dict(sd, **{"boqs.0.extra": torch.zeros(1)}), num_heads=2)
    with pytest.raises(StateDictError, match="3x3"):
        from_reference("boq", dict(sd, **{"proj_c.weight": torch.zeros(8, 5, 1, 1, dtype=DT)}), num_heads=2)
    with pytest.raises(ValueError, match="num_heads=3 must divide proj_channels=8"):
        from_reference("boq", sd, num_heads=3)


@pytest.mark.parametrize("kwargs, word", [({"proj_channels": 0}, "proj_channels"), ({"num_queries": 1.5}, "num_queries"),
                                          ({"row_dim": -1}, "row_dim"), ({"num_heads": 5}, "num_heads")])
def test_bad_constructor_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        BoQ(8, **kwargs)


def test_gradcheck_with_mask():
    torch.manual_seed(0)
    head = BoQ(2, proj_channels=4, num_queries=2, num_layers=1, row_dim=2, num_heads=2).double()
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    mask[1, 1, 2] = False
    assert gradcheck_head(head, torch.randn(2, 2, 2, 3, dtype=DT), mask)


@pytest.mark.parametrize("autocast", [torch.bfloat16, None])
def test_autocast_output_and_gradients(autocast):
    torch.manual_seed(0)
    autocast_output_and_gradients(BoQ(16, proj_channels=32, num_queries=4, row_dim=4, num_heads=2),
                                  torch.randn(2, 16, 5, 6), autocast)


def test_on_a_dinov2_map():
    vit = build_backbone("timm:vit_small_patch14_dinov2", weights=None, norm=False,
                         model_kwargs={"embed_dim": 24, "depth": 2, "num_heads": 2}).eval()
    model = aggnets.Embedder(vit, BoQ(24, proj_channels=8, num_queries=3, row_dim=2, num_heads=2)).eval()
    images = torch.rand(2, 3, 70, 56)
    with torch.no_grad():
        out = model(images)
        alone = model(images[1:])
    assert out.shape == (2, 16)
    torch.testing.assert_close(out[1:], alone)


def test_published_formulation_matches():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "published" / "boq.py"
    spec = importlib.util.spec_from_file_location("published_boq", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sd, ref = authors_state()
    head = from_reference("boq", sd, num_heads=2).eval()
    x = torch.randn(3, 5, 4, 4, dtype=DT)
    torch.testing.assert_close(module.from_head(head).eval()(x), head(x), rtol=0, atol=1e-12)
