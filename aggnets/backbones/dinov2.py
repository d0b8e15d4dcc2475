"""DINOv2 (Oquab et al., TMLR 2024; facebookresearch/dinov2) as timm vision transformers: the authors' checkpoints
converted to timm's layout, and the authors' position-embedding interpolation.

The authors' checkpoints (``dinov2_vitb14_pretrain.pth``, ``dinov2_vitb14_reg4_pretrain.pth``, …) hold
``cls_token`` (1, 1, C), ``pos_embed`` (1, 1 + 37 * 37, C) for 518 px, ``mask_token`` (1, C) (used only in training),
``register_tokens`` (1, 4, C) in the register models, ``patch_embed.proj.*``, ``blocks.N.{norm1, attn.qkv,
attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`` (ViT-G: a fused SwiGLU ``mlp.w12``, ``mlp.w3``) and
``norm.*``; training checkpoints chunk the blocks (``blocks.<chunk>.N.``). timm's ``vit_*_patch14[_reg4]_dinov2``
models hold the same tensors, except that the register models keep no position for the class token (the class
position is added into ``cls_token``), the registers are ``reg_token`` and the SwiGLU layers are ``fc1`` / ``fc2``.

Position embeddings at another grid than the stored 37 x 37 (any other image size): the authors' non-register
models interpolate bicubically with the scale factor ``(h + 0.1) / 37`` and no antialiasing (a historical offset
kept for compatibility); their register models interpolate bicubically to the size, antialiased, as timm does.
:func:`interpolate_pos_embed` implements both (``mode="dinov2"`` and ``"timm"``).
"""
from __future__ import annotations

import re
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["POS_INTERPOLATIONS", "interpolate_pos_embed", "is_dinov2_layout", "convert_dinov2_state_dict",
           "default_pos_interpolation"]

POS_INTERPOLATIONS = ("timm", "dinov2")
_DINOV2_OFFSET = 0.1


def default_pos_interpolation(model_name: str) -> str:
    """``"dinov2"`` for the authors' non-register DINOv2 models (their interpolation), ``"timm"`` otherwise (also
    what the register models use)."""
    name = model_name.lower()
    return "dinov2" if "dinov2" in name and "reg" not in name else "timm"


def interpolate_pos_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str) -> Tensor:
    """Patch position embeddings ``pos`` (1, old_h * old_w, C) resampled to ``new_grid`` (1, new_h * new_w, C),
    computed in float32 and returned in ``pos``'s dtype; unchanged when the grids are equal.

    ``mode="timm"``: bicubic to the size, antialiased (timm's ``resample_abs_pos_embed``; the DINOv2 register
    models). ``"dinov2"``: bicubic with the scale factors ``(new + 0.1) / old`` and no antialiasing (the DINOv2
    models without registers).
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos
    if mode not in POS_INTERPOLATIONS:
        raise ValueError(f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got {mode!r}")
    channels = pos.shape[-1]
    grid = pos.float().reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2)
    if mode == "timm":
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True)
    else:
        scale = ((new_grid[0] + _DINOV2_OFFSET) / old_grid[0], (new_grid[1] + _DINOV2_OFFSET) / old_grid[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(grid.shape[-2:]) != tuple(new_grid):  # the offset keeps floor(old * scale) == new
            raise RuntimeError(f"DINOv2 position interpolation gave {tuple(grid.shape[-2:])}, not {tuple(new_grid)}")
    return grid.permute(0, 2, 3, 1).reshape(1, -1, channels).to(pos.dtype)


def is_dinov2_layout(state: dict[str, Any]) -> bool:
    """Whether a state dict is in the authors' DINOv2 layout (it has ``mask_token``, ``register_tokens`` or a
    SwiGLU ``w12``)."""
    return "mask_token" in state or "register_tokens" in state or any(".mlp.w12." in key for key in state)


def convert_dinov2_state_dict(state: dict[str, Tensor], model: nn.Module, source: str = "checkpoint") -> dict:
    """The authors' DINOv2 state dict in the layout of the timm model ``model`` (``vit_*_patch14[_reg4]_dinov2``).
    Raises ``ValueError`` naming the key when the checkpoint and the model disagree (registers, grid, shapes)."""
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "mask_token":  # the masked-image-modelling token, not used at inference
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # chunked training checkpoints
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)
        key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
        converted[key] = value
    model_registers = getattr(model, "reg_token", None)
    registers = converted.pop("register_tokens", None)
    if (registers is None) != (model_registers is None):
        has = "has" if registers is not None else "has no"
        raise ValueError(f"{source}: key 'register_tokens': the checkpoint {has} registers but the model "
                         f"({type(model).__name__}, reg_token {'absent' if model_registers is None else 'present'}) "
                         "does not match; use a '_reg4_dinov2' model for a register checkpoint and a plain "
                         "'_dinov2' one otherwise")
    if registers is not None:
        converted["reg_token"] = registers
    if "pos_embed" not in converted or "cls_token" not in converted:
        raise ValueError(f"{source}: key 'pos_embed' or 'cls_token' is missing; not a DINOv2 ViT checkpoint")
    pos = converted["pos_embed"]
    if getattr(model, "no_embed_class", False):  # timm keeps the class position inside cls_token
        converted["cls_token"] = converted["cls_token"] + pos[:, :1]
        converted["pos_embed"] = pos = pos[:, 1:]
    expected = tuple(model.pos_embed.shape)
    if tuple(pos.shape) != expected:
        raise ValueError(f"{source}: key 'pos_embed' has shape {tuple(pos.shape)} (after conversion) but the model "
                         f"expects {expected}; the DINOv2 checkpoints are for img_size=518 (37 x 37 patches): build "
                         "the timm model with its default img_size")
    return converted
