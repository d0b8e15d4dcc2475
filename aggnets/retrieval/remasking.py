"""Per-layer re-masking of a padded batch inside a CNN backbone: forward hooks that reset, at every convolution and
pooling, the positions outside each image's valid block to the layer's padding value, so each image's features equal
those of the image alone (the method is described in :mod:`aggnets.retrieval.extraction`)."""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from .batching import block_mask

__all__ = ["masking_problem"]


class Untrackable(RuntimeError):
    """The hooks met a layer whose valid region they cannot follow."""


_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
_GLOBAL_CONTEXT = re.compile(r"squeeze|excit|SEModule|SELayer|SEBlock|EcaModule|CecaModule|Cbam|GatherExcite|"
                             r"GlobalContext|NonLocal|SelectiveKernel|Attention|SplitAttn", re.IGNORECASE)
_DYNAMIC_PADDING = re.compile(r"Conv2dSame|Pool2dSame|PadSame|MixedConv", re.IGNORECASE)
_UNSUPPORTED = (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.Upsample,
                nn.MultiheadAttention, nn.ConvTranspose2d, nn.Unfold, nn.Fold)


def feature_part(model: nn.Module) -> nn.Module:
    """The module whose layers compute ``model.features`` (the backbone)."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model


def _feature_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    part = feature_part(model)
    skip = [] if part is not model else [m for m in (getattr(model, "head", None), getattr(model, "projection", None))
                                         if isinstance(m, nn.Module)]
    skipped = {id(sub) for m in skip for sub in m.modules()}
    return [(name, module) for name, module in part.named_modules() if id(module) not in skipped]


def masks_itself(model: nn.Module) -> bool:
    """Whether the backbone computes padded batches exactly by itself (``padded_batches``: ``extract(images, sizes)``,
    e.g. a vision transformer with per-image position embeddings and an attention key mask)."""
    return bool(getattr(feature_part(model), "padded_batches", False))


def masking_problem(model: nn.Module) -> Optional[str]:
    """Why batched extraction cannot be exact for ``model``'s backbone, by itself (``padded_batches``) or by
    per-layer re-masking (None: it can)."""
    if masks_itself(model):
        return None
    for name, module in _feature_modules(model):
        label = f"{name or '<root>'} ({type(module).__name__})"
        if _DYNAMIC_PADDING.search(type(module).__name__):
            return f"{label} pads dynamically (TensorFlow-style 'same' padding depends on the input size)"
        if isinstance(module, _UNSUPPORTED) or _GLOBAL_CONTEXT.search(type(module).__name__):
            return f"{label} mixes positions over the whole map (or resamples it)"
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) > 1:
            return f"{label} normalises over more than the channel dimension"
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            return f"{label} uses padding_mode={module.padding_mode!r}"
        if isinstance(module, nn.AvgPool2d) and (module.ceil_mode or (
                not module.count_include_pad and _pair_any(module.padding) != (0, 0))):
            return f"{label}: AvgPool2d with ceil_mode or count_include_pad=False"
        if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool3d)):
            return f"{label} is not a 2-D layer"
    return None


def _pair_any(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _out_sizes(module: nn.Module, sizes: Tensor) -> Tensor:
    """Output sizes (B, 2) of a Conv2d / MaxPool2d / AvgPool2d for input sizes (B, 2), by PyTorch's formulas."""
    kernel, stride = _pair_any(module.kernel_size), _pair_any(module.stride or module.kernel_size)
    dilation = _pair_any(getattr(module, "dilation", 1))
    padding = module.padding
    if isinstance(padding, str):
        if padding == "same":
            return sizes.clone()
        padding = 0
    padding = _pair_any(padding)
    ceil_mode = bool(getattr(module, "ceil_mode", False))
    out = []
    for dim in range(2):
        size = sizes[:, dim]
        span = size + 2 * padding[dim] - dilation[dim] * (kernel[dim] - 1) - 1
        if ceil_mode:
            length = -torch.div(-span, stride[dim], rounding_mode="floor") + 1
            length = torch.where((length - 1) * stride[dim] >= size + padding[dim], length - 1, length)
        else:
            length = torch.div(span, stride[dim], rounding_mode="floor") + 1
        out.append(length)
    return torch.stack(out, dim=1)


class LayerMasking:
    """Forward hooks that re-mask every Conv2d / MaxPool2d / AvgPool2d input of the backbone to each image's valid
    block (value 0, -inf for max pooling: the lone image's padding) and follow the valid block through the layer.

    Valid blocks are keyed by the canvas' spatial size: every tensor of one canvas size shares the per-image
    blocks (true for CNN stages); a contradiction or an unknown size raises :class:`Untrackable`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [(name, m) for name, m in _feature_modules(model) if isinstance(m, _SPATIAL)]
        self.blocks: dict[tuple[int, int], Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> "LayerMasking":
        for name, module in self.layers:
            self.handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self.handles.append(module.register_forward_hook(self._post_hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def run(self, features: Callable[[Tensor], Tensor], batch: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
        self.blocks = {tuple(batch.shape[-2:]): sizes.to(torch.long).cpu()}
        out = features(batch)
        key = tuple(out.shape[-2:])
        if key not in self.blocks:
            raise Untrackable(f"the feature map's size {key} was not produced by a layer the hooks follow")
        return out, self.blocks[key]

    def _lookup(self, name: str, x: Tensor) -> Tensor:
        key = tuple(x.shape[-2:])
        if key not in self.blocks:
            raise Untrackable(f"layer {name!r}: input of spatial size {key} comes from a layer the hooks do not "
                               "follow")
        return self.blocks[key]

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> Optional[tuple]:
            x = args[0]
            sizes = self._lookup(name, x)
            height, width = x.shape[-2:]
            if bool((sizes[:, 0] == height).all() and (sizes[:, 1] == width).all()):
                return None
            keep = block_mask(sizes.to(x.device), height, width).unsqueeze(1)
            fill = float("-inf") if isinstance(module, nn.MaxPool2d) else 0.0
            return (torch.where(keep, x, torch.full((), fill, dtype=x.dtype, device=x.device)), *args[1:])
        return hook

    def _post_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0]
            canvas = torch.tensor([list(x.shape[-2:])])
            if tuple(_out_sizes(module, canvas)[0].tolist()) != tuple(output.shape[-2:]):
                raise Untrackable(f"layer {name!r} ({type(module).__name__}) does not follow its static size "
                                   "formula (dynamic padding?)")
            sizes = _out_sizes(module, self._lookup(name, x))
            if bool((sizes <= 0).any()):
                raise ValueError(f"an image is too small for the backbone: layer {name!r} would output an empty "
                                 f"map (input sizes {self._lookup(name, x).tolist()})")
            key = tuple(output.shape[-2:])
            known = self.blocks.get(key)
            if known is not None and not torch.equal(known, sizes):
                raise Untrackable(f"layer {name!r}: two different valid blocks for feature maps of size {key}")
            self.blocks[key] = sizes
        return hook
