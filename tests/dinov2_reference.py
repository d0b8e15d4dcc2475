"""DINOv2's vision transformer written from the authors' definition (Oquab et al., TMLR 2024;
facebookresearch/dinov2 ``DinoVisionTransformer``), as plain functions over a state dict in the authors' key layout
(``cls_token``, ``pos_embed`` for a 37 x 37 grid, ``register_tokens``, ``mask_token``, ``blocks.N.ls1.gamma``, a
SwiGLU ``mlp.w12`` / ``mlp.w3`` for ViT-G). No timm and no aggnets: the independent reference of the backbone tests.

Token preparation as the authors': patch embedding (a stride-14 convolution), the class token prepended, position
embeddings added (the 37 x 37 grid interpolated bicubically: scale factor ``(n + 0.1) / 37`` without antialiasing
for the models without registers, size-based with antialiasing for the register models), then the registers inserted
after the class token. Blocks ``x + ls1 * attn(norm1(x))``, ``x + ls2 * mlp(norm2(x))``; LayerNorm eps 1e-6; GELU
(erf) MLP or SwiGLU ``w3(silu(a) * b)`` with ``[a, b] = w12(x)``.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

PATCH = 14
GRID = 37  # 518 px / 14


def random_state(dim: int, depth: int, *, registers: int = 0, swiglu: bool = False, chunked: bool = False,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the authors' layout (trained-looking scales: layer scale ~0.1, LayerNorm near 1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.02):
        return torch.randn(*shape, generator=gen) * scale

    def dyadic(t):  # multiples of 1/1024: timm's register layout folds the class position into cls_token, and the
        return (t * 1024).round() / 1024  # float32 sum of such values is exact, as the float64 reference's

    state = {
        "cls_token": dyadic(randn(1, 1, dim, scale=1.0)),
        "pos_embed": dyadic(randn(1, 1 + GRID * GRID, dim, scale=0.5)),
        "mask_token": randn(1, dim),
        "patch_embed.proj.weight": randn(dim, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": randn(dim, scale=0.1),
        "norm.weight": 1.0 + randn(dim, scale=0.1),
        "norm.bias": randn(dim, scale=0.1),
    }
    if registers:
        state["register_tokens"] = randn(1, registers, dim, scale=1.0)
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    for i in range(depth):
        prefix = f"blocks.{i // 2}.{i}." if chunked else f"blocks.{i}."  # training checkpoints: 2 blocks a chunk
        block = {
            "norm1.weight": 1.0 + randn(dim, scale=0.1), "norm1.bias": randn(dim, scale=0.1),
            "attn.qkv.weight": randn(3 * dim, dim, scale=dim ** -0.5), "attn.qkv.bias": randn(3 * dim, scale=0.1),
            "attn.proj.weight": randn(dim, dim, scale=dim ** -0.5), "attn.proj.bias": randn(dim, scale=0.1),
            "ls1.gamma": 0.1 + randn(dim, scale=0.05),
            "norm2.weight": 1.0 + randn(dim, scale=0.1), "norm2.bias": randn(dim, scale=0.1),
            "ls2.gamma": 0.1 + randn(dim, scale=0.05),
        }
        if swiglu:
            block.update({"mlp.w12.weight": randn(2 * hidden, dim, scale=dim ** -0.5),
                          "mlp.w12.bias": randn(2 * hidden, scale=0.1),
                          "mlp.w3.weight": randn(dim, hidden, scale=hidden ** -0.5), "mlp.w3.bias": randn(dim)})
        else:
            block.update({"mlp.fc1.weight": randn(hidden, dim, scale=dim ** -0.5),
                          "mlp.fc1.bias": randn(hidden, scale=0.1),
                          "mlp.fc2.weight": randn(dim, hidden, scale=hidden ** -0.5), "mlp.fc2.bias": randn(dim)})
        state.update({prefix + key: value for key, value in block.items()})
    return state


def _block_params(state: dict, index: int) -> dict:
    """Block ``index``'s tensors, keyed without their prefix (``blocks.N.`` or chunked ``blocks.<chunk>.N.``)."""
    params = {}
    for key, value in state.items():
        match = re.match(r"^blocks\.(?:\d+\.)?(\d+)\.([a-z].*)$", key)
        if match and int(match.group(1)) == index:
            params[match.group(2)] = value
    return params


def _layer_norm(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"].to(x), state[f"{name}.bias"].to(x), eps=1e-6)


def _interpolated_positions(state: dict, h: int, w: int, registers: bool) -> torch.Tensor:
    pos = state["pos_embed"].float()
    if h == w == GRID:
        return pos
    patch_pos = pos[:, 1:].reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
    if registers:  # interpolate_offset = 0, interpolate_antialias = True
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", antialias=True)
    else:  # interpolate_offset = 0.1, no antialiasing
        patch_pos = F.interpolate(patch_pos, scale_factor=((h + 0.1) / GRID, (w + 0.1) / GRID), mode="bicubic",
                                  antialias=False)
    assert patch_pos.shape[-2:] == (h, w)
    return torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


def _attention(x, p, heads):
    batch, tokens, dim = x.shape
    qkv = F.linear(x, p["attn.qkv.weight"].to(x), p["attn.qkv.bias"].to(x))
    q, k, v = qkv.reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return F.linear(out, p["attn.proj.weight"].to(x), p["attn.proj.bias"].to(x))


def _mlp(x, p):
    if "mlp.w12.weight" in p:
        a, b = F.linear(x, p["mlp.w12.weight"].to(x), p["mlp.w12.bias"].to(x)).chunk(2, dim=-1)
        return F.linear(F.silu(a) * b, p["mlp.w3.weight"].to(x), p["mlp.w3.bias"].to(x))
    hidden = F.gelu(F.linear(x, p["mlp.fc1.weight"].to(x), p["mlp.fc1.bias"].to(x)))
    return F.linear(hidden, p["mlp.fc2.weight"].to(x), p["mlp.fc2.bias"].to(x))


def forward(state: dict, images: torch.Tensor, *, heads: int, block: int, norm: bool = True,
            facet: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens (B, C, h, w), class token (B, C)) after ``block`` (0-based) of the authors' model on
    normalised ``images`` (B, 3, H, W), H and W multiples of 14; ``norm``: the final LayerNorm (DINOv2's
    ``get_intermediate_layers(norm=True)``); ``facet`` "query" / "key" / "value": that third of ``qkv(norm1(x))`` at
    ``block`` instead of its output."""
    batch, _, height, width = images.shape
    h, w = height // PATCH, width // PATCH
    registers = state.get("register_tokens")
    x = F.conv2d(images, state["patch_embed.proj.weight"].to(images), state["patch_embed.proj.bias"].to(images),
                 stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].to(x).expand(batch, -1, -1), x], dim=1)
    x = x + _interpolated_positions(state, h, w, registers is not None).to(x.dtype)
    if registers is not None:
        x = torch.cat([x[:, :1], registers.to(x).expand(batch, -1, -1), x[:, 1:]], dim=1)
    for index in range(block + 1):
        p = _block_params(state, index)
        if index == block and facet != "token":
            qkv = F.linear(_layer_norm(x, p, "norm1"), p["attn.qkv.weight"].to(x), p["attn.qkv.bias"].to(x))
            x = qkv.chunk(3, dim=-1)[("query", "key", "value").index(facet)]
            break
        x = x + p["ls1.gamma"].to(x) * _attention(_layer_norm(x, p, "norm1"), p, heads)
        x = x + p["ls2.gamma"].to(x) * _mlp(_layer_norm(x, p, "norm2"), p)
    if norm:
        x = _layer_norm(x, state, "norm")
    prefix = 1 + (0 if registers is None else registers.shape[1])
    patches = x[:, prefix:].reshape(batch, h, w, -1).permute(0, 3, 1, 2)
    return patches, x[:, 0]

