"""CosPlace / EigenPlaces head (Berton et al., CVPR 2022 / ICCV 2023) against an independent forward in the authors'
layout and order (gmberton/CosPlace GeoLocalizationNet.aggregation = Sequential(L2Norm(), GeM(), Flatten(),
Linear(C, D), L2Norm()), GeM = avg_pool2d(x.clamp(eps).pow(p), (H, W)).pow(1/p)), written here with plain
torch.nn.functional and NumPy; masks (GeM over the valid positions), the converter (Sequential keys, whole-model and
gsv-cities layouts), gradients, precision, and the published formulation of the benchmark."""
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import aggnets
from aggnets.convert import StateDictError, from_reference
from aggnets.heads import CosPlace
from tests.helpers import autocast_output_and_gradients, garbage_like, gradcheck_head, pad_with_garbage

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]
KEYS = {"sequential": ("1.p", "3.weight", "3.bias"), "gsv_cities": ("gem.p", "fc.weight", "fc.bias")}


def _published():
    spec = importlib.util.spec_from_file_location("published_cosplace", ROOT / "scripts" / "published" / "cosplace.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def authors_state(C, D, prefix="", layout="sequential", p=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    p_key, w_key, b_key = KEYS[layout]
    return {prefix + p_key: torch.tensor([p], dtype=DT),
            prefix + w_key: torch.randn(D, C, generator=g, dtype=DT),
            prefix + b_key: torch.randn(D, generator=g, dtype=DT)}


def authors_forward(x, p, weight, bias, eps=1e-6):
    """The authors' Sequential with torch.nn.functional: L2 over channels, GeM by avg_pool2d, [:, :, 0, 0], Linear,
    L2."""
    x = F.normalize(x, p=2.0, dim=1)
    x = F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)
    return F.normalize(F.linear(x[:, :, 0, 0], weight, bias), p=2.0, dim=1)


def numpy_cosplace(descriptors, p, weight, bias, eps=1e-6):
    """From the equation, on the (N, C) valid descriptors of one image: f = L2(W GeM_p({x_n / ||x_n||}) + b)."""
    X = np.asarray(descriptors, dtype=np.float64)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    g = (np.maximum(X, eps) ** p).mean(axis=0) ** (1.0 / p)
    v = weight.numpy() @ g + bias.numpy()
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("p", [3.0, 1.7, 6.5])
def test_from_reference_equals_the_authors_forward(p):
    C, D = 6, 5
    sd = authors_state(C, D, p=p)
    head = from_reference("cosplace", sd).eval()
    assert isinstance(head, CosPlace) and (head.in_channels, head.out_dim) == (C, D)
    assert head.p.shape == (1,) and float(head.p.detach()) == p and head.fc.weight.dtype == DT
    g = torch.Generator().manual_seed(1)
    for h, w in [(1, 1), (2, 3), (5, 5), (7, 4)]:
        x = torch.randn(3, C, h, w, generator=g, dtype=DT)
        y = head(x)
        expected = authors_forward(x, sd["1.p"], sd["3.weight"], sd["3.bias"])
        assert (y - expected).abs().max() <= 1e-12
        for b in range(3):
            ref = numpy_cosplace(x[b].flatten(1).T.numpy(), p, sd["3.weight"], sd["3.bias"])
            np.testing.assert_allclose(y[b].detach().numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", sorted(KEYS))
@pytest.mark.parametrize("prefix", ["", "aggregation.", "module.aggregation.", "aggregator."])
def test_from_reference_layouts_and_prefixes(layout, prefix):
    sd = authors_state(4, 3, prefix=prefix, layout=layout, p=2.5)
    sd[(prefix.replace("aggregation", "backbone").replace("aggregator", "backbone") or "x.") + "0.weight"] = \
        torch.zeros(4, 3, 3, 3, dtype=DT)
    head = from_reference("cosplace", {"state_dict": sd})
    p_key, w_key, b_key = (prefix + k for k in KEYS[layout])
    x = torch.randn(2, 4, 5, 6, dtype=DT)
    assert (head(x) - authors_forward(x, sd[p_key], sd[w_key], sd[b_key])).abs().max() <= 1e-12
    if prefix:
        assert torch.equal(from_reference("cosplace", sd, prefix=prefix)(x), head(x))


def test_converter_errors_name_the_key():
    sd = authors_state(4, 3, prefix="aggregation.")
    with pytest.raises(StateDictError, match=r"missing key 'aggregation\.3\.bias'"):
        from_reference("cosplace", {k: v for k, v in sd.items() if k != "aggregation.3.bias"})
    with pytest.raises(StateDictError, match=r"'aggregation\.1\.p' must have shape \(1,\), found \(4,\)"):
        from_reference("cosplace", dict(sd, **{"aggregation.1.p": torch.ones(4, dtype=DT)}))
    with pytest.raises(StateDictError, match=r"'aggregation\.3\.bias' must have shape \(3,\), found \(2,\)"):
        from_reference("cosplace", dict(sd, **{"aggregation.3.bias": torch.ones(2, dtype=DT)}))
    with pytest.raises(StateDictError, match=r"'aggregation\.3\.weight' must have shape a 2-D tensor"):
        from_reference("cosplace", dict(sd, **{"aggregation.3.weight": torch.ones(3, 4, 1, dtype=DT)}))
    with pytest.raises(StateDictError, match=r"missing key '1\.p'"):
        from_reference("cosplace", {"backbone.0.weight": torch.zeros(1)})
    with pytest.raises(StateDictError, match="ambiguous"):
        from_reference("cosplace", {**sd, **authors_state(4, 3, prefix="other.")})
    with pytest.raises(StateDictError, match=r"unexpected key.*'aggregation\.4\.weight'"):
        from_reference("cosplace", dict(sd, **{"aggregation.4.weight": torch.ones(3, dtype=DT)}))


# --- masks: GeM over the valid positions ------------------------------------------------------------------------------

def _random_head(C=5, D=4, p=2.7, seed=3):
    torch.manual_seed(seed)
    head = CosPlace(C, D, p=p).double()
    with torch.no_grad():
        head.fc.bias.normal_()
    return head


@pytest.mark.parametrize("seed", range(3))
def test_mask_keeps_only_the_valid_descriptors(seed):
    head = _random_head(seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 6, 7, generator=g, dtype=DT)
    mask = torch.rand(3, 6, 7, generator=g) < 0.4
    mask[:, 2, 3] = True
    y = head(torch.where(mask.unsqueeze(1), x, garbage_like(x.shape)), mask)
    assert torch.isfinite(y).all()
    for b in range(3):
        ref = numpy_cosplace(x[b][:, mask[b]].T.numpy(), float(head.p.detach()), head.fc.weight.detach(), head.fc.bias.detach())
        np.testing.assert_allclose(y[b].detach().numpy(), ref, rtol=0, atol=1e-12)


def test_padded_equals_unpadded_and_gradients_ignore_the_padding():
    head = _random_head()
    x = torch.randn(2, 5, 4, 5, dtype=DT, requires_grad=True)
    padded, mask = pad_with_garbage(x.detach(), 7, 9, top=1, left=2)
    padded.requires_grad_(True)
    y = head(padded, mask)
    assert (y - head(x)).abs().max() <= 1e-12
    y.sum().backward()
    assert torch.all(padded.grad[:, :, ~mask[0]] == 0) and torch.isfinite(padded.grad).all()


def test_gradcheck_with_and_without_mask():
    head = _random_head(C=3, D=2)
    x = torch.randn(2, 3, 3, 4, dtype=DT)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[0, 2:] = False
    mask[1, :, 0] = False
    for m in (None, mask):
        assert gradcheck_head(head, x, m)


# --- the head itself -------------------------------------------------------------------------------------------------

def test_state_dict_keys_shapes_defaults_and_internals():
    head = CosPlace(7)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "p": (1,), "fc.weight": (512, 7), "fc.bias": (512,)}
    assert head.out_dim == 512 and float(head.p.detach()) == 3.0 and head.eps == 1e-6 and head.p.requires_grad
    assert set(head.internals()) == {"p"} and head.internals()["p"] is head.p
    assert sum(p.numel() for p in CosPlace(2048).parameters()) == 1 + 2048 * 512 + 512


def test_published_formulation_matches():
    head = _random_head(C=6, D=5)
    published = _published().from_head(head)
    assert set(published.state_dict()) == {"1.p", "3.weight", "3.bias"}
    for h, w in [(1, 1), (4, 6), (7, 3)]:
        x = torch.randn(2, 6, h, w, dtype=DT)
        assert (published(x) - head(x)).abs().max() <= 1e-12
    again = from_reference("cosplace", published.state_dict())
    assert all(torch.equal(again.state_dict()[k], v) for k, v in head.state_dict().items())


BAD_ARGS = [({"in_channels": 0}, "in_channels"), ({"out_dim": 0}, "out_dim"), ({"out_dim": 2.0}, "out_dim"),
            ({"p": 0}, "p must"), ({"p": -1.0}, "p must"), ({"p": float("inf")}, "p must"),
            ({"p": float("nan")}, "p must"), ({"p": "3"}, "p must")]


@pytest.mark.parametrize("kwargs,word", BAD_ARGS, ids=[str(a) for a, _ in BAD_ARGS])
def test_bad_constructor_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        CosPlace(**{"in_channels": 4, **kwargs})


def test_registry_and_repr():
    head = aggnets.build_head("cosplace", in_channels=13, out_dim=6)
    assert type(head) is CosPlace and "in_channels=13" in repr(head) and "out_dim=6" in repr(head)
    caps = CosPlace.capabilities
    assert caps.mask and caps.any_size and caps.orderless and caps.l2_output and caps.internals == ("p",)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_huge_activations_under_autocast_stay_finite(autocast):
    torch.manual_seed(9)
    head = CosPlace(256, 16)
    autocast_output_and_gradients(head, 1e4 * torch.rand(2, 256, 6, 5), autocast)


def test_script_and_compile_match_eager_with_a_mask():
    head = _random_head().eval()
    x = torch.randn(2, 5, 6, 7, dtype=DT)
    mask = torch.rand(2, 6, 7) < 0.5
    mask[:, 0, 0] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(head)
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for args in ((x,), (x, mask)):
            assert (scripted(*args) - head(*args)).abs().max() <= 1e-12
            assert (compiled(*args) - head(*args)).abs().max() <= 1e-12
