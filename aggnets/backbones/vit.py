"""Vision transformers (timm: ViT, DeiT, DINOv2 with or without registers, EVA) truncated after one block, returning
the patch tokens as a (B, C, H / p, W / p) map and the class token beside it."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dinov2 import POS_INTERPOLATIONS, interpolate_pos_embed
from .extractor import BackboneBase, FreezeSpec
from ..utils import close_names
from .output import BackboneOutput

__all__ = ["ViTExtractor", "FACETS", "UNEVEN_MODES", "is_vision_transformer"]

FACETS = ("token", "query", "key", "value")
UNEVEN_MODES = ("crop", "pad", "error")


def is_vision_transformer(model: nn.Module) -> bool:
    """Whether a timm model is a token-sequence transformer this wrapper serves (patch embedding, blocks, prefix
    tokens)."""
    return all(hasattr(model, name) for name in ("patch_embed", "blocks", "num_prefix_tokens"))


def _native(model: nn.Module) -> bool:
    """timm's plain ``VisionTransformer`` (ViT, DeiT, DINOv2), whose token preparation this module runs itself (per-
    image position embeddings and attention masks for padded batches, facets, no-grad frozen blocks); other
    transformers (EVA's rotary embeddings, distilled DeiT) go through timm's ``forward_intermediates``."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Attention, VisionTransformer
    return (type(model) is VisionTransformer and isinstance(model.patch_embed, PatchEmbed)
            and isinstance(model.patch_drop, nn.Identity)
            and all(isinstance(getattr(block, "attn", None), Attention) for block in model.blocks))


class ViTExtractor(BackboneBase):
    """A timm vision transformer truncated after block ``block``: images (B, 3, H, W) -> patch tokens as a map
    (B, C, H / p, W / p) (``out_channels`` = embed dim, ``stride`` = patch size p), with the class token (B, C)
    in :meth:`extract`. Later blocks are not run (they are removed). The prefix tokens (class token, registers,
    distillation token) are not patches and never appear in the map.

    ``facet``: ``"token"`` (the block's output), or ``"query"`` / ``"key"`` / ``"value"``: the block's attention
    projections of every token, ``qkv(norm1(x))`` split in three (AnyLoc's facets; the heads' split is not applied).
    ``norm``: apply the model's final LayerNorm to the tokens (DINOv2's ``x_norm_patchtokens``); default True for
    ``facet="token"``; facets are never normed.
    ``uneven``: an image whose side is not a multiple of p: ``"crop"`` (default) drops the last ``side % p`` pixel
    rows / columns (bottom, right), as a stride-p convolution does — ``floor(side / p)`` patches; ``"pad"`` pads the
    normalised image with zeros to the next multiple (``ceil``); ``"error"`` raises ``ValueError``.
    ``pos_interpolation``: how the position embeddings follow the patch grid (:mod:`aggnets.backbones.dinov2`).
    ``freeze``: True (all), a block (``"blocks.7"`` or 7: the patch embedding, prefix tokens, position embeddings
    and blocks 0..7; ``"patch_embed"``: the embedding only) or a list of module names. A frozen prefix runs under
    ``torch.no_grad()`` and in eval mode, so training the last blocks stores the activations of those blocks only;
    a list of names only turns off ``requires_grad``.

    Padded batches (``padded_batches`` True for timm's plain ``VisionTransformer``): ``extract(images, sizes)``
    with each image at the top-left corner of the canvas and ``sizes`` (B, 2) its (height, width) gives every image
    its own position embeddings (interpolated to its own grid) and an attention key mask over the other images'
    padding, so each image's tokens equal those of the image alone; the returned mask marks its patches.
    """

    has_token = True
    __jit_unused_properties__ = ["dynamic_onnx", "normalize_input"]

    def __init__(self, model: nn.Module, *, name: str, block: int, mean: Sequence[float], std: Sequence[float],
                 facet: str = "token", norm: Optional[bool] = None, uneven: str = "crop",
                 pos_interpolation: str = "timm", normalize_images: bool = True, freeze: FreezeSpec = False) -> None:
        super().__init__(name=name, mean=mean, std=std, normalize_images=normalize_images)
        if facet not in FACETS:
            raise ValueError(f"{name}: facet must be one of {FACETS}, got {facet!r}")
        if uneven not in UNEVEN_MODES:
            raise ValueError(f"{name}: uneven must be one of {UNEVEN_MODES}, got {uneven!r}")
        if pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"{name}: pos_interpolation must be one of {POS_INTERPOLATIONS}, got "
                             f"{pos_interpolation!r}")
        if norm is None:
            norm = facet == "token"
        if norm and facet != "token":
            raise ValueError(f"{name}: norm=True applies to the block's output tokens (facet='token'), not to the "
                             f"{facet} facet")
        depth = len(model.blocks)
        if not -depth <= block < depth:
            raise ValueError(f"{name}: block {block} out of range (the model has blocks 0..{depth - 1})")
        block %= depth
        self.native = _native(model)
        if facet != "token" and not self.native:
            raise ValueError(f"{name}: facets need timm's plain VisionTransformer ({type(model).__name__} is not)")
        patch = model.patch_embed.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if patch[0] != patch[1]:
            raise ValueError(f"{name}: non-square patches {patch} are not supported")
        self.layer = f"blocks.{block}"
        self.block_index = block
        self.facet = facet
        self.norm = bool(norm)
        self.uneven = uneven
        self.pos_interpolation = pos_interpolation
        self.out_channels = int(model.embed_dim)
        self.stride = int(patch[0])
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.has_token = getattr(model, "cls_token", None) is not None
        self.padded_batches = self.native
        _truncate(model, block, keep_norm=self.norm)
        self.body = model
        self._frozen_blocks = -1  # blocks 0..n-1 frozen (no grad, eval); 0: the embedding only; -1: none
        self.freeze(freeze)

    # ---- images ----------------------------------------------------------------------------------------------
    def _grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.stride
        if self.uneven == "pad":
            return -(-height // p), -(-width // p)
        if self.uneven == "error" and (height % p or width % p):
            raise ValueError(f"{self.name}: image size {height}x{width} is not a multiple of the patch size {p}; "
                             f"resize to a multiple (e.g. {max(p, height // p * p)}x{max(p, width // p * p)}) or "
                             "build the backbone with uneven='crop' (drop the last partial patch row / column) or "
                             "uneven='pad'")
        if height < p or width < p:
            raise ValueError(f"{self.name}: image size {height}x{width} is smaller than one {p}x{p} patch")
        return height // p, width // p

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The map size (H', W') for an input of ``height`` x ``width`` (``uneven`` rule)."""
        return self._grid(height, width)

    @property
    def dynamic_onnx(self) -> bool:
        """Whether an exported ONNX graph is right at every image size: timm's size-based position interpolation
        exports with symbolic sizes; the DINOv2 scale-factor rule is baked at the traced size by the exporter, and
        models served through ``forward_intermediates`` are not checked (both export at a fixed size)."""
        return self.native and (self.body.pos_embed is None or self.pos_interpolation == "timm")

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, out_channels, H', W') patch-token map."""
        return self.extract(images).map

    def extract(self, images: Tensor, sizes: Optional[Tensor] = None) -> BackboneOutput:
        """Map, class token (None for a model without one) and, with ``sizes`` (B, 2) (each image's (height,
        width) at the top-left of the canvas), the mask of each image's patches (see the class docstring)."""
        if sizes is not None and not self.padded_batches:
            raise ValueError(f"{self.name}: {type(self.body).__name__} cannot mask a padded batch (padded_batches "
                             "is False); batch images of equal size")
        images = self._prepare(images)
        height, width = images.shape[-2:]
        grid = self._grid(height, width)
        p = self.stride
        if self.uneven == "pad":
            images = F.pad(images, (0, grid[1] * p - width, 0, grid[0] * p - height))
        else:
            images = images[..., : grid[0] * p, : grid[1] * p]
        grids = None
        if sizes is not None:
            sizes = torch.as_tensor(sizes).to(torch.long).cpu()
            if sizes.shape != (images.shape[0], 2):
                raise ValueError(f"{self.name}: sizes must have shape ({images.shape[0]}, 2), got {tuple(sizes.shape)}")
            if bool((sizes[:, 0] > height).any() or (sizes[:, 1] > width).any() or (sizes <= 0).any()):
                raise ValueError(f"{self.name}: sizes {sizes.tolist()} must be positive and fit the {height}x{width} "
                                 "canvas")
            grids = [self._grid(int(h), int(w)) for h, w in sizes.tolist()]
            if all(g == grid for g in grids):
                grids = None
        if self.native:
            tokens = self._run_native(images, grid, grids)
        else:
            tokens = self._run_intermediates(images)
        prefix, patches = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens:]
        feature_map = patches.reshape(patches.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)
        token = prefix[:, 0] if self.has_token else None
        mask = None
        if grids is not None:
            rows = torch.tensor([g[0] for g in grids], device=images.device)
            cols = torch.tensor([g[1] for g in grids], device=images.device)
            mask = ((torch.arange(grid[0], device=images.device).view(1, -1, 1) < rows.view(-1, 1, 1))
                    & (torch.arange(grid[1], device=images.device).view(1, 1, -1) < cols.view(-1, 1, 1)))
        return BackboneOutput(feature_map, token, mask)

    def _frozen(self, frozen: bool) -> contextlib.AbstractContextManager:
        return torch.no_grad() if frozen else contextlib.nullcontext()

    def _run_native(self, images: Tensor, grid: tuple[int, int], grids: Optional[list]) -> Tensor:
        model = self.body
        with self._frozen(self._frozen_blocks >= 0):
            x = model.patch_embed(images).flatten(1, 2)  # (B, h * w, C), NHWC patch embedding
            x = self._add_positions(x, grid, grids)
            x = model.norm_pre(x)
        if self._frozen_blocks >= 0:
            x = x.detach()
        key_mask = None if grids is None else self._key_mask(grid, grids, x.device)
        last = self.block_index
        for index, block in enumerate(model.blocks):
            frozen = index < self._frozen_blocks
            with self._frozen(frozen):
                if index == last and self.facet != "token":
                    x = self._facet(block, x)
                else:
                    x = block(x, attn_mask=key_mask) if key_mask is not None else block(x)
            if frozen and index + 1 == self._frozen_blocks:
                x = x.detach()
        if self.norm:
            with self._frozen(self._frozen_blocks > len(model.blocks)):
                x = model.norm(x)
        return x

    def _add_positions(self, x: Tensor, grid: tuple[int, int], grids: Optional[list]) -> Tensor:
        """Prefix tokens and position embeddings (timm's layout: ``[class, registers, patches]``; the class (and
        register) positions are part of ``pos_embed`` unless ``no_embed_class``)."""
        model = self.body
        batch = x.shape[0]
        prefix = [t.expand(batch, -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
        pos = model.pos_embed
        if pos is None:
            return torch.cat([*prefix, x], dim=1)
        stored = tuple(model.patch_embed.grid_size)
        extra = 0 if model.no_embed_class else self.num_prefix_tokens
        prefix_pos, patch_pos = pos[:, :extra], pos[:, extra:]
        if grids is None:
            x = x + interpolate_pos_embed(patch_pos, stored, grid, self.pos_interpolation)
        else:  # each image its own grid, at the top-left of the canvas grid
            canvas = x.new_zeros(batch, grid[0], grid[1], x.shape[-1])
            cache: dict[tuple[int, int], Tensor] = {}
            for row, own in enumerate(grids):
                if own not in cache:
                    cache[own] = interpolate_pos_embed(patch_pos, stored, own, self.pos_interpolation).reshape(
                        own[0], own[1], -1)
                canvas[row, : own[0], : own[1]] = cache[own]
            x = x + canvas.flatten(1, 2)
        x = torch.cat([*prefix, x], dim=1)
        if extra:
            x = torch.cat([x[:, :extra] + prefix_pos, x[:, extra:]], dim=1)
        return model.pos_drop(x)

    def _key_mask(self, grid: tuple[int, int], grids: list, device: torch.device) -> Tensor:
        """(B, 1, 1, N) bool, True on the keys each image's queries may attend: its prefix tokens and patches."""
        rows = torch.tensor([g[0] for g in grids], device=device).view(-1, 1, 1)
        cols = torch.tensor([g[1] for g in grids], device=device).view(-1, 1, 1)
        patches = ((torch.arange(grid[0], device=device).view(1, -1, 1) < rows)
                   & (torch.arange(grid[1], device=device).view(1, 1, -1) < cols)).flatten(1)
        prefix = torch.ones(len(grids), self.num_prefix_tokens, dtype=torch.bool, device=device)
        return torch.cat([prefix, patches], dim=1)[:, None, None, :]

    def _facet(self, block: nn.Module, x: Tensor) -> Tensor:
        """The query / key / value projection ``qkv(norm1(x))`` of every token at ``block``."""
        qkv = block.attn.qkv(block.norm1(x))
        index = FACETS.index(self.facet) - 1
        return qkv.chunk(3, dim=-1)[index]

    def _run_intermediates(self, images: Tensor) -> Tensor:
        """timm's ``forward_intermediates`` (any timm ViT-like model): (B, prefix + patches, C)."""
        out = self.body.forward_intermediates(images, indices=[self.block_index], return_prefix_tokens=True,
                                              norm=self.norm, stop_early=True, output_fmt="NCHW",
                                              intermediates_only=True)
        spatial, prefix = out[0]
        patches = spatial.flatten(2).transpose(1, 2)
        if prefix is None:
            return patches
        return torch.cat([prefix, patches], dim=1)

    # ---- freezing --------------------------------------------------------------------------------------------
    def _embedding_parameters(self) -> Iterator[nn.Parameter]:
        model = self.body
        yield from model.patch_embed.parameters()
        yield from model.norm_pre.parameters()
        for name in ("cls_token", "reg_token", "pos_embed", "dist_token"):
            value = getattr(model, name, None)
            if isinstance(value, nn.Parameter):
                yield value

    def freeze(self, spec: FreezeSpec = True) -> "ViTExtractor":
        """Freeze all (``True``), the embedding and blocks up to one (``"blocks.7"`` / 7 / ``"patch_embed"``) or
        the listed modules (class docstring)."""
        if spec is None or spec is False:
            return self
        if spec is True or spec == "all":
            self.body.requires_grad_(False)
            self._frozen_blocks = len(self.body.blocks) + 1  # the final norm too
            self._frozen_modules = [""]
        elif isinstance(spec, (int, str)) and not isinstance(spec, bool):
            count = self._blocks_up_to(spec)
            for parameter in self._embedding_parameters():
                parameter.requires_grad_(False)
            for block in self.body.blocks[:count]:
                block.requires_grad_(False)
            self._frozen_blocks = max(self._frozen_blocks, count)
            self._frozen_modules = ["patch_embed", *[f"blocks.{i}" for i in range(count)]]
        else:
            modules = dict(self.body.named_modules())
            for module_name in spec:
                if module_name not in modules:
                    raise ValueError(f"{self.name}: cannot freeze unknown module {module_name!r}. "
                                     f"{close_names(str(module_name), modules)}")
                modules[module_name].requires_grad_(False)
            self._frozen_modules = sorted(set(self._frozen_modules) | set(spec))
        self.train(self.training)
        return self

    def _blocks_up_to(self, spec: Union[int, str]) -> int:
        """The number of blocks frozen by ``spec`` (``"patch_embed"``: 0)."""
        if spec == "patch_embed":
            return 0
        text = spec if isinstance(spec, int) else spec.removeprefix("blocks.")
        depth = len(self.body.blocks)
        try:
            index = int(text)
        except ValueError:
            raise ValueError(f"{self.name}: freeze must be True, 'patch_embed', 'blocks.N' (N < {depth}), an int or "
                             f"a list of module names, got {spec!r}") from None
        if not -depth <= index < depth:
            raise ValueError(f"{self.name}: cannot freeze up to block {index}: the backbone keeps blocks "
                             f"0..{depth - 1}")
        return index % depth + 1

    def unfreeze(self) -> "ViTExtractor":
        """Make every parameter trainable again."""
        self.body.requires_grad_(True)
        self._frozen_blocks = -1
        self._frozen_modules = []
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> "ViTExtractor":
        super().train(mode)
        if mode and self._frozen_blocks >= 0:
            model = self.body
            for module in (model.patch_embed, model.pos_drop, model.norm_pre, *model.blocks[: self._frozen_blocks]):
                module.eval()
            if self._frozen_blocks > len(model.blocks):
                model.norm.eval()
        return self

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, layer={self.layer!r}, facet={self.facet!r}, norm={self.norm}, "
                f"out_channels={self.out_channels}, stride={self.stride}, uneven={self.uneven!r}, "
                f"pos_interpolation={self.pos_interpolation!r}, padded_batches={self.padded_batches}, "
                f"frozen={self._frozen_modules or None}")


def _truncate(model: nn.Module, block: int, keep_norm: bool) -> None:
    """Drop the blocks after ``block`` and everything after the blocks (pooling, head; the final norm unless
    ``keep_norm``)."""
    model.blocks = model.blocks[: block + 1]
    for name in ("fc_norm", "head_drop", "head", "attn_pool"):
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, nn.Identity())
    if not keep_norm and isinstance(getattr(model, "norm", None), nn.Module):
        model.norm = nn.Identity()
