"""ConvAP (Ali-bey et al., GSV-Cities, Neurocomputing 2022) against an independent forward in the authors' layout and
order (amaralibey/gsv-cities models/aggregators/convap.py: Conv2d(C, d, 1) ``channel_pool``, AdaptiveAvgPool2d((s1,
s2)), flatten(1), L2), written here with plain torch.nn.functional, and against a NumPy reference of the masked
semantics (grid on each image's valid bounding box, each cell the mean of its valid positions, an empty cell zero);
the converter, gradients, precision, compile / script, and the published formulation of the benchmark."""
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import aggnets
from aggnets.convert import StateDictError, from_reference
from aggnets.heads import ConvAP
from tests.helpers import autocast_output_and_gradients, garbage_like, gradcheck_head, pad_with_garbage

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def _published():
    spec = importlib.util.spec_from_file_location("published_convap", ROOT / "scripts" / "published" / "convap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def authors_state(C, d, prefix="", seed=0):
    g = torch.Generator().manual_seed(seed)
    return {prefix + "channel_pool.weight": torch.randn(d, C, 1, 1, generator=g, dtype=DT),
            prefix + "channel_pool.bias": torch.randn(d, generator=g, dtype=DT)}


def authors_forward(x, sd, s1, s2, prefix=""):
    """The authors' order with torch.nn.functional: conv on every position, adaptive average pooling, flatten, L2."""
    y = F.conv2d(x, sd[prefix + "channel_pool.weight"], sd[prefix + "channel_pool.bias"])
    return F.normalize(F.adaptive_avg_pool2d(y, (s1, s2)).flatten(1), p=2, dim=1)


def numpy_convap(x, weight, bias, s1, s2, mask=None):
    """Loops from the definition: the 1x1 convolution at every valid position; the s1 x s2 adaptive-pooling grid
    (cell i spans [floor(i n / s), ceil((i + 1) n / s))) on the bounding box of the valid positions (the whole map
    without a mask); each cell the mean of its valid positions (zeros if none); flatten d-major; L2."""
    x, W, b = x.numpy(), weight.numpy().reshape(weight.shape[0], -1), bias.numpy()
    out = []
    for n in range(x.shape[0]):
        H, Wd = x.shape[2:]
        valid = np.ones((H, Wd), bool) if mask is None else mask[n].numpy()
        rows = [i for i in range(H) if valid[i].any()]
        cols = [j for j in range(Wd) if valid[:, j].any()]
        top, height = rows[0], rows[-1] + 1 - rows[0]
        left, width = cols[0], cols[-1] + 1 - cols[0]
        cells = np.zeros((W.shape[0], s1, s2))
        for i in range(s1):
            for j in range(s2):
                r0, r1 = top + (i * height) // s1, top + -((-(i + 1) * height) // s1)
                c0, c1 = left + (j * width) // s2, left + -((-(j + 1) * width) // s2)
                conv = [W @ x[n, :, r, c] + b for r in range(r0, r1) for c in range(c0, c1) if valid[r, c]]
                if conv:
                    cells[:, i, j] = np.mean(conv, axis=0)
        v = cells.reshape(-1)
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


SIZES = [(1, 1), (2, 2), (3, 5), (5, 3), (7, 7), (4, 9), (1, 6)]


@pytest.mark.parametrize("s1,s2", [(2, 2), (1, 1), (3, 2), (2, 4)])
def test_from_reference_equals_the_authors_forward(s1, s2):
    C, d = 6, 5
    sd = authors_state(C, d)
    head = from_reference("convap", sd, s1=s1, s2=s2).eval()
    assert isinstance(head, ConvAP) and (head.in_channels, head.out_channels, head.s1, head.s2) == (C, d, s1, s2)
    assert head.out_dim == d * s1 * s2 and head.channel_pool.weight.dtype == DT
    g = torch.Generator().manual_seed(1)
    for h, w in SIZES:
        x = torch.randn(3, C, h, w, generator=g, dtype=DT)
        y = head(x)
        assert (y - authors_forward(x, sd, s1, s2)).abs().max() <= 1e-12, (h, w)
        np.testing.assert_allclose(y.detach().numpy(), numpy_convap(x, sd["channel_pool.weight"], sd["channel_pool.bias"],
                                                           s1, s2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("prefix", ["aggregator.", "module.aggregator."])
def test_from_reference_in_a_whole_model_checkpoint(prefix):
    sd = authors_state(4, 3, prefix=prefix)
    sd[prefix.replace("aggregator", "backbone") + "model.conv1.weight"] = torch.zeros(4, 3, 7, 7, dtype=DT)
    for given in (None, prefix):
        head = from_reference("convap", {"state_dict": sd}, prefix=given)
        x = torch.randn(2, 4, 5, 6, dtype=DT)
        assert (head(x) - authors_forward(x, sd, 2, 2, prefix)).abs().max() <= 1e-12


def test_converter_errors_name_the_key():
    sd = authors_state(4, 3)
    with pytest.raises(StateDictError, match=r"missing key 'channel_pool\.bias'"):
        from_reference("convap", {"channel_pool.weight": sd["channel_pool.weight"]})
    with pytest.raises(StateDictError, match=r"'channel_pool\.weight' must have shape \(3, 4, 1, 1\), found "
                                             r"\(3, 4, 3, 3\)"):
        from_reference("convap", dict(sd, **{"channel_pool.weight": torch.zeros(3, 4, 3, 3, dtype=DT)}))
    with pytest.raises(StateDictError, match=r"'channel_pool\.weight' must have shape a 4-D tensor, found \(3, 4\)"):
        from_reference("convap", dict(sd, **{"channel_pool.weight": torch.zeros(3, 4, dtype=DT)}))
    with pytest.raises(StateDictError, match=r"'channel_pool\.bias' must have shape \(3,\), found \(2,\)"):
        from_reference("convap", dict(sd, **{"channel_pool.bias": torch.zeros(2, dtype=DT)}))
    with pytest.raises(StateDictError, match=r"missing key 'channel_pool\.weight'"):
        from_reference("convap", {"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="s1"):
        from_reference("convap", sd, s1=0)


# --- masks: the grid on each image's valid bounding box -----------------------------------------------------------------

def _random_head(C=5, d=4, s1=2, s2=3, seed=2):
    torch.manual_seed(seed)
    return ConvAP(C, d, s1, s2).double()


def _masks(B, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(B, H, W, generator=g) < 0.5, torch.zeros(B, H, W, dtype=torch.bool)]
    masks[1][:, 1:H - 1, 2:] = True          # a rectangle off the corner
    points = torch.zeros(B, H * W, dtype=torch.bool)
    for b in range(B):
        points[b, torch.randperm(H * W, generator=g)[:3]] = True    # 3 scattered points: empty cells in the box
    masks.append(points.view(B, H, W))
    for m in masks:
        m[:, 0, 0] |= ~m.flatten(1).any(1)
    return masks


@pytest.mark.parametrize("seed", range(4))
def test_masked_forward_equals_the_numpy_reference(seed):
    head = _random_head(seed=seed)
    x = torch.randn(3, 5, 6, 7, dtype=DT)
    for mask in _masks(3, 6, 7, seed):
        garbage = torch.where(mask.unsqueeze(1), x, garbage_like(x.shape))
        y = head(garbage, mask)
        assert torch.isfinite(y).all()
        expected = numpy_convap(x, head.channel_pool.weight.detach(), head.channel_pool.bias.detach(), 2, 3, mask)
        np.testing.assert_allclose(y.detach().numpy(), expected, rtol=0, atol=1e-12)


def test_empty_cell_is_zero_and_padding_equals_the_crop():
    head = _random_head(s1=2, s2=2)
    x = torch.randn(2, 5, 4, 4, dtype=DT)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 0, 0] = mask[:, 3, 3] = True          # box = whole map; cells (0, 1), (1, 0) have no valid position
    y = head(x, mask).view(2, 4, 2, 2)
    assert torch.all(y[:, :, 0, 1] == 0) and torch.all(y[:, :, 1, 0] == 0)
    assert torch.all(y[:, :, 0, 0] != 0) and torch.all(y[:, :, 1, 1] != 0)
    padded, pmask = pad_with_garbage(x, 7, 9, top=2, left=3)
    assert (head(padded, pmask) - head(x)).abs().max() <= 1e-12


def test_all_true_mask_equals_no_mask():
    head = _random_head()
    x = torch.randn(2, 5, 5, 8, dtype=DT)
    assert (head(x, torch.ones(2, 5, 8, dtype=torch.bool)) - head(x)).abs().max() <= 1e-14


def test_gradcheck_with_and_without_mask():
    head = _random_head(C=3, d=2, s1=2, s2=2)
    x = torch.randn(2, 3, 4, 5, dtype=DT)
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, :, 1] = False
    for m in (None, mask):
        assert gradcheck_head(head, x, m)


# --- the head itself -------------------------------------------------------------------------------------------------

def test_state_dict_keys_shapes_defaults_and_init():
    head = ConvAP(7)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "channel_pool.weight": (512, 7, 1, 1), "channel_pool.bias": (512,)}
    assert (head.out_channels, head.s1, head.s2, head.out_dim) == (512, 2, 2, 2048)
    assert float(head.channel_pool.weight.detach().abs().max()) <= 1 / 7 ** 0.5   # nn.Conv2d's default init
    assert ConvAP(1024).out_dim == 2048 and sum(p.numel() for p in ConvAP(1024).parameters()) == 1024 * 512 + 512


def test_published_formulation_matches():
    head = _random_head(C=6, d=5, s1=2, s2=3)
    published = _published().from_head(head)
    for h, w in SIZES:
        x = torch.randn(2, 6, h, w, dtype=DT)
        assert (published(x) - head(x)).abs().max() <= 1e-12


BAD_ARGS = [({"in_channels": 0}, "in_channels"), ({"out_channels": 0}, "out_channels"), ({"s1": 0}, "s1"),
            ({"s2": 1.5}, "s2"), ({"s1": True}, "s1"), ({"out_channels": "8"}, "out_channels")]


@pytest.mark.parametrize("kwargs,word", BAD_ARGS, ids=[str(a) for a, _ in BAD_ARGS])
def test_bad_constructor_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ConvAP(**{"in_channels": 4, **kwargs})


def test_registry_and_repr():
    head = aggnets.build_head("convap", in_channels=13, out_channels=3, s1=1, s2=2)
    assert type(head) is ConvAP and head.out_dim == 6
    assert "in_channels=13" in repr(head) and "out_dim=6" in repr(head) and "s2=2" in repr(head)
    caps = ConvAP.capabilities
    assert caps.mask and caps.any_size and caps.fullgraph and caps.scriptable and caps.dynamic_onnx
    assert caps.l2_output and not caps.orderless


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_huge_activations_under_autocast_stay_finite(autocast):
    """1e4 activations on 256 coherent channels: the projection of a cell mean sums 256 terms of ~1e4 * w."""
    torch.manual_seed(9)
    head = ConvAP(256, 8)
    with torch.no_grad():
        head.channel_pool.weight.abs_()
    mask = torch.ones(2, 6, 5, dtype=torch.bool)
    mask[1, 4:] = False
    autocast_output_and_gradients(head, 1e4 * torch.rand(2, 256, 6, 5), autocast, mask)


def test_script_and_compile_match_eager_with_a_mask():
    head = _random_head().eval()
    x = torch.randn(2, 5, 6, 7, dtype=DT)
    mask = _masks(2, 6, 7, 0)[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(head)
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for args in ((x,), (x, mask), (x[:, :, :3], mask[:, :3] | (~mask[:, :3].flatten(1).any(1))[:, None, None])):
            assert (scripted(*args) - head(*args)).abs().max() <= 1e-12
            assert (compiled(*args) - head(*args)).abs().max() <= 1e-12
