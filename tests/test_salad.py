"""SALAD (Izquierdo & Civera, CVPR 2024) against a forward written here from the NOTES.md equations in NumPy, on state
dicts in the authors' key names (serizba/salad models/aggregators/salad.py: score.{0,3}, cluster_features.{0,3} 1x1
convolutions, token_features.{0,2} linears, dust_bin): one image at a time, the Sinkhorn iterations in the scaling
(not log) domain, the aggregation as an explicit double sum. Also masks, the n <= m case, dropout, the global token
from a ViT and its CNN substitute, the internal maps, the converter's errors, gradients."""
import math

import numpy as np
import pytest
import torch

import aggnets
from aggnets import Embedder
from aggnets import functional as AF
from aggnets.backbones import build_backbone
from aggnets.convert import StateDictError, from_reference
from aggnets.heads import SALAD
from tests.helpers import autocast_output_and_gradients, gradcheck_head, pad_with_garbage

DT = torch.float64


def authors_state(C, m=4, l=3, g=2, hidden=6, prefix="", seed=0):
    """A random state dict in the authors' key names and shapes."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=DT)

    return {prefix + k: v for k, v in {
        "token_features.0.weight": rand(hidden, C, scale=C ** -0.5), "token_features.0.bias": rand(hidden, scale=0.3),
        "token_features.2.weight": rand(g, hidden, scale=hidden ** -0.5), "token_features.2.bias": rand(g, scale=0.3),
        "cluster_features.0.weight": rand(hidden, C, 1, 1, scale=C ** -0.5),
        "cluster_features.0.bias": rand(hidden, scale=0.3),
        "cluster_features.3.weight": rand(l, hidden, 1, 1, scale=hidden ** -0.5),
        "cluster_features.3.bias": rand(l, scale=0.3),
        "score.0.weight": rand(hidden, C, 1, 1, scale=C ** -0.5), "score.0.bias": rand(hidden, scale=0.3),
        "score.3.weight": rand(m, hidden, 1, 1, scale=2 * hidden ** -0.5), "score.3.bias": rand(m, scale=0.3),
        "dust_bin": torch.tensor(0.7, dtype=DT),
    }.items()}


def reference_plan(S, z, iters=3):
    """The scaled plan of the NOTES.md equations for one image: scores S (m, n), dustbin score z; Sinkhorn in the
    scaling domain, K = exp([S; z]), u = a / (K v), v = b / (K^T u) from v = 1; (n + m) diag(u) K diag(v)."""
    m, n = S.shape
    a = np.full(m + 1, 1.0 / (n + m))
    a[m] = max(n - m, 0) / (n + m)
    b = np.full(n, 1.0 / (n + m))
    K = np.exp(np.vstack([S, np.full((1, n), z)]))
    v = np.ones(n)
    for _ in range(iters):
        u = a / (K @ v)
        v = b / (K.T @ u)
    return (n + m) * (u[:, None] * K * v[None, :])


def reference_salad(sd, x, t, prefix="", valid=None, keep=None, dropped=0.0):
    """SALAD of each image from the authors' tensors: x (B, C, H, W), t (B, C); ``valid`` (B, H, W) picks the tokens.
    ``keep`` (B, H * W, 2 * hidden) 0 / 1: the dropout masks of the score MLP's hidden units (first half) and the
    feature MLP's (second half), applied as the authors' Conv -> Dropout -> ReLU with drop probability ``dropped``."""
    p = {k[len(prefix):]: v.numpy() for k, v in sd.items()}

    def mlp(tokens, first, second, kept=None):  # tokens (n, C); the 1x1 convs as matrices
        w1, w2 = p[first + ".weight"].reshape(p[first + ".weight"].shape[0], -1), p[second + ".weight"]
        hidden = tokens @ w1.T + p[first + ".bias"]
        if kept is not None:
            hidden = hidden * kept / (1.0 - dropped)
        hidden = np.maximum(hidden, 0.0)
        return hidden @ w2.reshape(w2.shape[0], -1).T + p[second + ".bias"]

    out = []
    for i, image in enumerate(x.numpy()):
        tokens = image.reshape(image.shape[0], -1).T                      # (N, C)
        if valid is not None:
            tokens = tokens[valid[i].flatten().numpy()]
        kept = [None, None]
        if keep is not None:
            width = p["score.0.weight"].shape[0]
            kept = [keep[i].numpy()[:, :width], keep[i].numpy()[:, width:]]
        S = mlp(tokens, "score.0", "score.3", kept[0]).T                  # (m, n)
        f = mlp(tokens, "cluster_features.0", "cluster_features.3", kept[1]).T     # (l, n)
        g = mlp(t[i].numpy()[None], "token_features.0", "token_features.2")[0]
        P = reference_plan(S, float(p["dust_bin"]))[:-1]
        l, m = f.shape[0], P.shape[0]
        V = np.zeros((l, m))
        for j in range(l):
            for k in range(m):
                V[j, k] = sum(f[j, q] * P[k, q] for q in range(f.shape[1]))
        V = V / np.linalg.norm(V, axis=0, keepdims=True)
        d = np.concatenate([g / np.linalg.norm(g), V.reshape(-1)])   # l-major: index j * m + k
        out.append(d / np.linalg.norm(d))
    return torch.from_numpy(np.stack(out))


def _inputs(B=2, C=5, H=3, W=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=gen, dtype=DT), torch.randn(B, C, generator=gen, dtype=DT)


@pytest.mark.parametrize("sizes", [dict(m=4, l=3, g=2, hidden=6), dict(m=2, l=5, g=4, hidden=3),
                                   dict(m=7, l=2, g=1, hidden=8)])
def test_from_reference_equals_the_equations(sizes):
    sd = authors_state(5, **sizes)
    head = from_reference("salad", sd).eval()
    assert head.num_clusters == sizes["m"] and head.out_dim == sizes["m"] * sizes["l"] + sizes["g"]
    x, t = _inputs()
    got = head(x, None, t)
    assert got.dtype == DT
    torch.testing.assert_close(got, reference_salad(sd, x, t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("wrap", ["aggregator.", "module.aggregator.", "checkpoint"])
def test_from_reference_in_a_whole_model_checkpoint(wrap):
    prefix = "aggregator." if wrap == "checkpoint" else wrap
    sd = authors_state(5, prefix=prefix)
    sd[prefix.replace("aggregator.", "backbone.") + "model.norm.weight"] = torch.ones(5, dtype=DT)
    loaded = {"state_dict": sd, "epoch": 3} if wrap == "checkpoint" else sd
    head = from_reference("salad", loaded).eval()
    x, t = _inputs()
    torch.testing.assert_close(head(x, None, t), reference_salad(sd, x, t, prefix=prefix), rtol=0, atol=1e-12)


def test_padded_images_with_masks_equal_the_unpadded_ones():
    sd = authors_state(5, m=3)
    head = from_reference("salad", sd).eval()
    x, t = _inputs(H=3, W=4)
    padded, mask = pad_with_garbage(x, 6, 7, top=1, left=2)
    torch.testing.assert_close(head(padded, mask, t), reference_salad(sd, x, t), rtol=0, atol=1e-12)
    irregular = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(3)) > 0.3
    irregular[:, 0, :2] = True
    torch.testing.assert_close(head(x, irregular, t), reference_salad(sd, x, t, valid=irregular), rtol=0, atol=1e-12)


def test_sinkhorn_meets_the_marginals_and_the_dustbin_takes_the_excess():
    gen = torch.Generator().manual_seed(0)
    m, n = 4, 9
    scores = torch.randn(2, m, n, generator=gen, dtype=DT)
    plan = AF.sinkhorn_dustbin(scores, torch.tensor(0.5, dtype=DT), None, torch.full((2, 1), float(n), dtype=DT),
                               iters=300)
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(2, n, dtype=DT))                     # each token: 1
    torch.testing.assert_close(plan.sum(dim=2), torch.tensor([[1.0] * m + [n - m]] * 2, dtype=DT))
    three = AF.sinkhorn_dustbin(scores, torch.tensor(0.5, dtype=DT), None, torch.full((2, 1), float(n), dtype=DT))
    torch.testing.assert_close(three[0].numpy(), reference_plan(scores[0].numpy(), 0.5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 4])  # m = 4: fewer tokens than clusters, and n = m
def test_no_more_tokens_than_clusters_gives_a_finite_plan_without_dustbin(n):
    head = from_reference("salad", authors_state(5, m=4)).eval()
    x, t = _inputs(H=1, W=n)
    out = head(x, None, t)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, dtype=DT))
    plan = head.transport_plan(x)
    torch.testing.assert_close(plan[:, -1], torch.zeros_like(plan[:, -1]))             # the dustbin gets nothing
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(2, 1, n, dtype=DT))          # every token's unit mass
    xg = x.clone().requires_grad_(True)
    head(xg, None, t).sum().backward()
    assert torch.isfinite(xg.grad).all()
    # the same image padded, with its mask: the same defined result
    padded, mask = pad_with_garbage(x, 3, n + 2)
    torch.testing.assert_close(head(padded, mask, t), out, rtol=0, atol=1e-12)


def test_one_more_token_than_clusters_follows_the_paper():
    sd = authors_state(5, m=4)
    x, t = _inputs(H=1, W=5)
    torch.testing.assert_close(from_reference("salad", sd).eval()(x, None, t), reference_salad(sd, x, t),
                               rtol=0, atol=1e-12)


def test_dropout_acts_in_train_mode_only():
    head = from_reference("salad", authors_state(5), dropout=0.5)
    x, t = _inputs()
    head.train()
    torch.manual_seed(0)
    first = head(x, None, t)
    torch.manual_seed(1)
    assert not torch.allclose(first, head(x, None, t))
    head.eval()
    torch.testing.assert_close(head(x, None, t), head(x, None, t), rtol=0, atol=0)
    assert from_reference("salad", authors_state(5)).dropout == 0.3


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_train_mode_equals_the_equations_with_the_dropout_masks_it_drew(p):
    """The masks are drawn from the global generator, so the same seed draws them again for the reference: one
    independent mask per hidden unit of each MLP and token, the 1 / (1 - q) scale of inverted dropout."""
    sd = authors_state(5)
    head = from_reference("salad", sd, dropout=p).train()
    x, t = _inputs()
    torch.manual_seed(3)
    got = head(x, None, t)
    torch.manual_seed(3)
    keep, dropped = AF.dropout_keep(torch.empty(2, 12, 12, dtype=DT), p)
    assert abs(dropped - p) <= 2.0 ** -17 and 0.0 < float(keep.mean()) < 1.0
    torch.testing.assert_close(got, reference_salad(sd, x, t, keep=keep, dropped=dropped), rtol=0, atol=1e-12)


def test_the_global_token_comes_from_the_vit_and_the_mean_stands_in_on_a_cnn():
    vit = build_backbone("timm:vit_small_patch14_dinov2", weights=None,
                         model_kwargs={"embed_dim": 24, "depth": 1, "num_heads": 2}).eval()
    head = SALAD(24, num_clusters=3, cluster_dim=4, token_dim=2, hidden_dim=8).eval()
    images = torch.rand(2, 3, 42, 56)
    with torch.no_grad():
        features = vit.extract(images)
        model = Embedder(vit, head, normalize=False).eval()
        torch.testing.assert_close(model(images), head(features.map, None, features.token))
        assert not torch.allclose(model(images), head(features.map))
    cnn_map = torch.randn(2, 24, 4, 5)
    torch.testing.assert_close(head(cnn_map), head(cnn_map, None, cnn_map.mean(dim=(2, 3))))


def test_internal_maps_are_the_plan_over_the_image():
    head = SALAD(5, num_clusters=3, cluster_dim=4, token_dim=2, hidden_dim=8).double().eval()
    x, _ = _inputs()
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, 2:, :] = False
    maps = aggnets.inspection.head_maps(head, x, mask)
    assignment, dustbin = maps["assignment"], maps["dustbin"]
    assert assignment.shape == (2, 3, 3, 4) and dustbin.shape == (2, 1, 3, 4)
    total = (assignment.sum(dim=1) + dustbin[:, 0])
    torch.testing.assert_close(total, mask.to(DT))
    assert dustbin[:, 0][mask].min() > 0  # n = 12 or 8 > m = 3: the dustbin takes a share
    assert set(head.internals()) == {"dust_bin"}


def test_state_dict_keys_and_defaults():
    head = SALAD(768)
    assert head.out_dim == 8448 and head.dropout == 0.3 and float(head.dust_bin.detach()) == 1.0
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "score_hidden.weight": (512, 768), "score_hidden.bias": (512,), "score.weight": (64, 512), "score.bias": (64,),
        "feature_hidden.weight": (512, 768), "feature_hidden.bias": (512,), "feature.weight": (128, 512),
        "feature.bias": (128,), "scene_hidden.weight": (512, 768), "scene_hidden.bias": (512,),
        "scene.weight": (256, 512), "scene.bias": (256,), "dust_bin": ()}


def test_converter_errors_name_the_key():
    sd = authors_state(5)
    with pytest.raises(StateDictError, match="score.3.weight"):
        from_reference("salad", {k: v for k, v in sd.items() if k != "score.3.weight"})
    bad = dict(sd, **{"cluster_features.0.weight": torch.zeros(6, 4, 1, 1, dtype=DT)})
    with pytest.raises(StateDictError, match=r"cluster_features.0.weight.*\(6, 5, 1, 1\)"):
        from_reference("salad", bad)
    with pytest.raises(StateDictError, match="unexpected.*score.6.weight"):
        from_reference("salad", dict(sd, **{"score.6.weight": torch.zeros(1)}))
    with pytest.raises(StateDictError, match="1x1"):
        from_reference("salad", dict(sd, **{"score.0.weight": torch.zeros(6, 5, 3, 3, dtype=DT)}))


@pytest.mark.parametrize("kwargs, word", [({"num_clusters": 0}, "num_clusters"), ({"cluster_dim": 1.5}, "cluster_dim"),
                                          ({"dropout": 1.0}, "dropout"), ({"token_dim": -1}, "token_dim")])
def test_bad_constructor_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SALAD(8, **kwargs)


def test_gradcheck_with_mask_and_token():
    torch.manual_seed(0)
    head = SALAD(3, num_clusters=2, cluster_dim=2, token_dim=2, hidden_dim=3, dropout=0.0).double()
    x = torch.randn(2, 3, 2, 3, dtype=DT)
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    mask[1, 1, 1:] = False
    assert gradcheck_head(head, x, mask)
    token = torch.randn(2, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: head(x, mask, t), (token,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("autocast", [torch.bfloat16, None])
def test_autocast_output_and_gradients(autocast):
    torch.manual_seed(0)
    head = SALAD(16, num_clusters=4, cluster_dim=8, token_dim=4, hidden_dim=32, dropout=0.0)
    autocast_output_and_gradients(head, torch.randn(2, 16, 5, 6), autocast)


def test_published_formulation_matches():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "published" / "salad.py"
    spec = importlib.util.spec_from_file_location("published_salad", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    head = from_reference("salad", authors_state(5)).eval()
    published = module.from_head(head).eval()
    x, t = _inputs()
    torch.testing.assert_close(published((x, t)), head(x, None, t), rtol=0, atol=1e-12)
    assert math.isclose(float(published.dust_bin.detach()), float(head.dust_bin.detach()))
