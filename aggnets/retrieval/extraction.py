"""Global descriptors of image collections for retrieval: native-aspect loading, size-sorted batching with padding
and masks, multi-scale extraction, and descriptor files.

>>> descriptors = extract_descriptors(model, paths, max_size=1024, scales=(1, 2 ** -0.5, 0.5))
>>> save_descriptors("db.npy", descriptors, names=paths, config={"max_size": 1024})

**Batching images of different sizes.** Retrieval images keep their aspect ratio, so a batch mixes sizes. A batch is
a zero canvas with every image at its top-left corner (:func:`pad_batch`), and the head gets a feature-map mask
that keeps, for each image, the top-left ``h'_i x w'_i`` block, where ``h'_i x w'_i`` is the size of the feature
map the image would give alone (:func:`feature_mask`).

Masking only the *final* feature map is not enough for the descriptor to equal the one of the image extracted
alone: at every convolution / pooling layer, the positions just outside an image's valid block hold activations
computed from the image (not the zeros of the lone image's padding), and every layer propagates that difference
one receptive-field radius further inside. Measured on ResNet-18 (layer3, stride 16, BatchNorm statistics and
affine parameters randomised to look trained, images 64-128 px): batched feature maps differ by up to ~10 (on
values of order 10) from the lone ones, at *every* position of such small maps, and the L2-normalised GeM / MAC /
R-MAC / NetVLAD descriptors by 5e-2 to 7e-2 per entry, whether the canvas is padded with zeros or with the
normalisation mean (zero in normalised space: it only makes the *first* convolution exact); on 341-512 px images
still 2.3e-2 per entry (cosine to the lone descriptor down to 0.9989).

So :func:`extract_descriptors` re-masks at every layer (``batching="masked"``): forward pre-hooks on each
``Conv2d`` / ``MaxPool2d`` / ``AvgPool2d`` of the backbone set the positions outside each image's valid block of
that layer's input to the layer's own padding value (0, or -inf for max pooling), and forward hooks compute the valid block of the output with the layer's size formula (checked against the canvas
output, so dynamic "same" padding is detected). Every other layer of such networks (BatchNorm in eval, activations,
residual additions, 1x1 convolutions, channel LayerNorm) is per-position, so each valid position is computed from
exactly the values the lone image would give: batched == alone up to floating-point reduction order (measured
max |diff| of descriptors <= 2e-7 in float32, <= 1e-15 in float64, for GeM, MAC, R-MAC and NetVLAD on ResNet-18
and GeM on VGG-11; see ``tests/test_extraction.py``).

Networks that re-masking cannot make exact: anything pooling over the whole map inside the backbone
(squeeze-excitation, global context, adaptive pooling), GroupNorm / InstanceNorm (statistics over space),
non-zero padding modes, AvgPool with ``ceil_mode`` or ``count_include_pad=False``, and TensorFlow-style dynamic
"same" padding (timm ``tf_*`` models, the offline EfficientNet-Lite0: the top padding depends on the parity of the
input size, so the lone image's grid is not the canvas' grid). ``batching="auto"`` (default) uses ``"masked"``
when the backbone passes a static check and falls back to ``"same_size"`` otherwise (or when the hooks find at
run time a layer they cannot follow): only images of identical size share a batch — no padding, exact for any
network, but fewer images per batch on collections of many sizes. ``"padded"`` is the plain approach (pad with
the normalisation mean, mask only the final map): fastest, approximate near each image's bottom/right border.

**Vision transformers** mask a padded batch by themselves (``backbone.padded_batches``, timm's plain
``VisionTransformer``: ViT, DeiT, DINOv2): ``backbone.extract(canvas, sizes)`` interpolates each image's position
embeddings to its own patch grid and masks the other images' padding out of every attention (a key mask), so the
class token and the patch tokens of each image are those of the image alone; ``"auto"`` and ``"masked"`` use it.
Transformers served through timm's ``forward_intermediates`` (EVA, distilled DeiT) fall back to ``"same_size"``.

**Which feature positions belong to an image** (:func:`feature_mask`). With top-left placement, the valid block
is the lone image's feature size; :func:`extract_descriptors` takes it from the layer formulas (``"masked"``) or
from a forward on a thin zero image per distinct height / width (``"padded"``), never from a rounding guess.
Stride rules are offered for callers without the backbone: ``rule="ceil"`` keeps position ``i`` when pixel
``i * stride`` is valid (``ceil(h / stride)`` positions: ResNet-style "same" padded convolutions and pooling, where
pixel ``i * stride`` is the receptive-field centre of cell ``i``); ``rule="floor"`` keeps it when the whole cell
``i * stride .. i * stride + stride - 1`` is valid (``floor(h / stride)``: VGG-style unpadded 2x2 pooling).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.extractor import probe_forward
from ..utils import progress_bar

__all__ = ["load_image", "pad_batch", "feature_mask", "extract_descriptors", "masking_problem", "save_descriptors",
           "load_descriptors", "LoadedDescriptors", "BATCHING_MODES", "DESCRIPTORS_FILE_FORMAT"]

PathLike = Union[str, os.PathLike]
BBox = Sequence[float]
BATCHING_MODES = ("auto", "masked", "same_size", "padded")
DESCRIPTORS_FILE_FORMAT = "aggnets.descriptors"
_FILE_VERSION = 1
_PROBE_WIDTH = 64


# ---- image loading ---------------------------------------------------------------------------------------------

def _check_max_size(max_size: Optional[int]) -> None:
    if max_size is not None and (not isinstance(max_size, int) or isinstance(max_size, bool) or max_size <= 0):
        raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")


def _crop_box(bbox: Optional[BBox], width: int, height: int, what: str) -> Optional[tuple[int, int, int, int]]:
    """``bbox`` (x1, y1, x2, y2) in pixels, rounded to ints (as PIL's crop does) and checked to lie in the image."""
    if bbox is None:
        return None
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: bbox must be 4 numbers (x1, y1, x2, y2), got {bbox!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: bbox must be 4 finite numbers (x1, y1, x2, y2), got {bbox!r}")
    x1, y1, x2, y2 = (int(round(v)) for v in values)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"{what}: bbox {tuple(bbox)} (x1, y1, x2, y2) does not lie inside the {width}x{height} "
                         f"(width x height) image, or is empty: need 0 <= x1 < x2 <= {width} and "
                         f"0 <= y1 < y2 <= {height} after rounding")
    return x1, y1, x2, y2


def _resized(height: int, width: int, max_size: Optional[int], upscale: bool) -> tuple[int, int]:
    """(height, width) with the longer side ``max_size`` and the aspect ratio kept."""
    longer = max(height, width)
    if max_size is None or longer == max_size or (longer < max_size and not upscale):
        return height, width
    factor = max_size / longer
    return max(1, round(height * factor)), max(1, round(width * factor))


RESAMPLE_METHODS = ("bicubic", "bilinear")


def _check_size(size: Any) -> Optional[tuple[int, int]]:
    if size is None:
        return None
    values = list(size) if isinstance(size, (list, tuple)) or hasattr(size, "__len__") else None
    if values is None or len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                      for v in values):
        raise ValueError(f"size must be None or (height, width), two positive ints, got {size!r}")
    return int(values[0]), int(values[1])


def _check_resample(resample: str) -> str:
    if resample not in RESAMPLE_METHODS:
        raise ValueError(f"resample must be one of {RESAMPLE_METHODS}, got {resample!r}")
    return resample


def _check_file(path: PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    return path


def load_image(path: PathLike, max_size: Optional[int] = 1024, bbox: Optional[BBox] = None, *,
               upscale: bool = True, size: Optional[Sequence[int]] = None, resample: str = "bicubic") -> Tensor:
    """An image file as a float32 (3, h, w) tensor in [0, 1], at its native aspect ratio.

    Any PIL mode is converted to RGB by :func:`aggnets.data.decode.to_rgb` (16-bit scaled to 8 bits, transparency
    composited onto white); a file that cannot be decoded raises :class:`~aggnets.data.decode.UnreadableImageError`.
    ``bbox`` = (x1, y1, x2, y2) in the original pixel coordinates (rounded to ints, as PIL does) crops the image
    *before* resizing (the revisited Oxford/Paris protocol crops the queries). The image (or crop) is then resized,
    antialiased (PIL, ``resample`` "bicubic" or "bilinear"), so that its longer side is ``max_size`` (``None``: no
    resizing; ``upscale=False``: smaller images keep their size); or, with ``size`` = (h, w), to exactly that size
    whatever its aspect ratio (the place-recognition papers' evaluation: 320 x 320, 322 x 322; ``max_size`` ignored).
    EXIF orientation tags are ignored (as the retrieval benchmarks do).
    """
    from PIL import Image

    from ..data.decode import open_rgb

    _check_max_size(max_size)
    size = _check_size(size)
    method = _check_resample(resample)
    path = _check_file(path)
    image = open_rgb(path)  # any mode to RGB (16-bit scaled, alpha on white); UnreadableImageError names the file
    box = _crop_box(bbox, image.width, image.height, path)
    if box is not None:
        image = image.crop(box)
    height, width = size or _resized(image.height, image.width, max_size, upscale)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), getattr(Image.Resampling, method.upper()))
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def _image_size(path: str, bbox: Optional[BBox], max_size: Optional[int], upscale: bool,
                size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """The (h, w) that :func:`load_image` will return, read from the file header (no decoding)."""
    from PIL import Image

    if size is not None:
        return size
    with Image.open(path) as image:
        width, height = image.size
    box = _crop_box(bbox, width, height, path)
    if box is not None:
        width, height = box[2] - box[0], box[3] - box[1]
    return _resized(height, width, max_size, upscale)


# ---- batching with padding and masks ---------------------------------------------------------------------------

def pad_batch(images: Sequence[Tensor], multiple: int = 1,
              value: Union[float, Sequence[float], Tensor] = 0.0) -> tuple[Tensor, Tensor]:
    """Stack (C, h_i, w_i) images into a (B, C, H, W) canvas, each at the top-left corner.

    ``H``, ``W`` are the largest height and width rounded up to a multiple of ``multiple``; the rest is filled with
    ``value`` (a number, or one value per channel, e.g. the normalisation mean so that the padding is 0 after
    normalisation). Returns ``(batch, image_mask)``, ``image_mask`` (B, H, W) bool, True on image pixels.
    """
    if isinstance(images, Tensor):
        images = list(images)
    if len(images) == 0:
        raise ValueError("pad_batch: no images")
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple <= 0:
        raise ValueError(f"pad_batch: multiple must be a positive int, got {multiple!r}")
    first = images[0]
    for index, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3:
            raise ValueError(f"pad_batch: image {index} must be a (C, h, w) tensor, got "
                             f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
        if image.shape[0] != first.shape[0] or image.dtype != first.dtype or image.device != first.device:
            raise ValueError(f"pad_batch: image {index} has {image.shape[0]} channels, {image.dtype} on "
                             f"{image.device}; image 0 has {first.shape[0]} channels, {first.dtype} on {first.device}")
    channels = first.shape[0]
    height = -(-max(image.shape[1] for image in images) // multiple) * multiple
    width = -(-max(image.shape[2] for image in images) // multiple) * multiple
    fill = torch.as_tensor(value, dtype=first.dtype, device=first.device).flatten()
    if fill.numel() not in (1, channels):
        raise ValueError(f"pad_batch: value must be a number or {channels} per-channel values, got {fill.numel()}")
    batch = fill.view(1, -1, 1, 1).expand(len(images), channels, height, width).clone()
    mask = torch.zeros(len(images), height, width, dtype=torch.bool, device=first.device)
    for index, image in enumerate(images):
        batch[index, :, :image.shape[1], :image.shape[2]] = image
        mask[index, :image.shape[1], :image.shape[2]] = True
    return batch, mask


def _block_mask(sizes: Tensor, height: int, width: int) -> Tensor:
    """(B, height, width) bool, True on the top-left ``sizes[b]`` = (h_b, w_b) block of each map."""
    sizes = sizes.to(torch.long)
    rows = torch.arange(height, device=sizes.device).view(1, -1, 1) < sizes[:, 0].view(-1, 1, 1)
    cols = torch.arange(width, device=sizes.device).view(1, 1, -1) < sizes[:, 1].view(-1, 1, 1)
    return rows & cols


def _pair(value: Any, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"feature_mask: {name} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def feature_mask(image_mask: Tensor, feature_size: Sequence[int], *, sizes: Optional[Any] = None,
                 stride: Union[int, Sequence[int], None] = None, rule: str = "ceil") -> Tensor:
    """The (B, H', W') bool mask of the feature positions that belong to each image of a padded batch.

    ``image_mask`` (B, H, W): True on image pixels (:func:`pad_batch`); ``feature_size`` = (H', W') of the batch's
    feature map. Two ways to decide:

    * ``sizes`` (B, 2): the feature-map size ``(h'_i, w'_i)`` each image gives when extracted alone (exact for
      images placed at the top-left corner): the top-left ``h'_i x w'_i`` block is valid.
    * ``stride`` (int or (sh, sw)) and ``rule``: ``"ceil"`` keeps position (i, j) when pixel (i*sh, j*sw) is valid
      — the receptive-field centre of cell (i, j) for padded ("same") convolutions and pooling, as in ResNet,
      giving ``ceil(h / stride)`` positions; ``"floor"`` keeps it when all pixels of its cell
      ``[i*sh, (i+1)*sh) x [j*sw, (j+1)*sw)`` are valid (``floor(h / stride)``: unpadded pooling, as in VGG).
      Works for any mask shape, not only top-left rectangles.
    """
    if not isinstance(image_mask, Tensor) or image_mask.dim() != 3 or image_mask.dtype != torch.bool:
        raise ValueError("feature_mask: image_mask must be a (B, H, W) bool tensor")
    feature_height, feature_width = _pair(tuple(feature_size), "feature_size")
    batch = image_mask.shape[0]
    if sizes is not None:
        if stride is not None:
            raise ValueError("feature_mask: give sizes or stride, not both")
        sizes = torch.as_tensor(sizes, device=image_mask.device)
        if sizes.shape != (batch, 2):
            raise ValueError(f"feature_mask: sizes must have shape ({batch}, 2), got {tuple(sizes.shape)}")
        if bool((sizes[:, 0] > feature_height).any() | (sizes[:, 1] > feature_width).any() | (sizes <= 0).any()):
            raise ValueError(f"feature_mask: sizes {sizes.tolist()} must be positive and fit in the "
                             f"{feature_height}x{feature_width} feature map")
        return _block_mask(sizes, feature_height, feature_width)
    if stride is None:
        raise ValueError("feature_mask: give sizes (per-image feature sizes) or stride")
    step_h, step_w = _pair(stride, "stride")
    height, width = image_mask.shape[1:]
    if rule == "ceil":
        sampled = image_mask[:, ::step_h, ::step_w][:, :feature_height, :feature_width]
    elif rule == "floor":
        cells_h, cells_w = min(feature_height, height // step_h), min(feature_width, width // step_w)
        crop = image_mask[:, :cells_h * step_h, :cells_w * step_w]
        sampled = crop.reshape(batch, cells_h, step_h, cells_w, step_w).all(dim=4).all(dim=2)
    else:
        raise ValueError(f"feature_mask: rule must be 'ceil' or 'floor', got {rule!r}")
    out = torch.zeros(batch, feature_height, feature_width, dtype=torch.bool, device=image_mask.device)
    out[:, :sampled.shape[1], :sampled.shape[2]] = sampled
    return out


# ---- per-layer re-masking --------------------------------------------------------------------------------------

class _Untrackable(RuntimeError):
    """The hooks met a layer whose valid region they cannot follow."""


_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
_GLOBAL_CONTEXT = re.compile(r"squeeze|excit|SEModule|SELayer|SEBlock|EcaModule|CecaModule|Cbam|GatherExcite|"
                             r"GlobalContext|NonLocal|SelectiveKernel|Attention|SplitAttn", re.IGNORECASE)
_DYNAMIC_PADDING = re.compile(r"Conv2dSame|Pool2dSame|PadSame|MixedConv", re.IGNORECASE)
_UNSUPPORTED = (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.Upsample,
                nn.MultiheadAttention, nn.ConvTranspose2d, nn.Unfold, nn.Fold)


def _feature_part(model: nn.Module) -> nn.Module:
    """The module whose layers compute ``model.features`` (the backbone)."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model


def _feature_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    part = _feature_part(model)
    skip = [] if part is not model else [m for m in (getattr(model, "head", None), getattr(model, "projection", None))
                                         if isinstance(m, nn.Module)]
    skipped = {id(sub) for m in skip for sub in m.modules()}
    return [(name, module) for name, module in part.named_modules() if id(module) not in skipped]


def _masks_itself(model: nn.Module) -> bool:
    """Whether the backbone computes padded batches exactly by itself (``padded_batches``: ``extract(images, sizes)``,
    e.g. a vision transformer with per-image position embeddings and an attention key mask)."""
    return bool(getattr(_feature_part(model), "padded_batches", False))


def masking_problem(model: nn.Module) -> Optional[str]:
    """Why batched extraction cannot be exact for ``model``'s backbone, by itself (``padded_batches``) or by
    per-layer re-masking (None: it can)."""
    if _masks_itself(model):
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


class _LayerMasking:
    """Forward hooks that re-mask every Conv2d / MaxPool2d / AvgPool2d input of the backbone to each image's valid
    block (value 0, -inf for max pooling: the lone image's padding) and follow the valid block through the layer.

    Valid blocks are keyed by the canvas' spatial size: every tensor of one canvas size shares the per-image
    blocks (true for CNN stages); a contradiction or an unknown size raises :class:`_Untrackable`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [(name, m) for name, m in _feature_modules(model) if isinstance(m, _SPATIAL)]
        self.blocks: dict[tuple[int, int], Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> "_LayerMasking":
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
            raise _Untrackable(f"the feature map's size {key} was not produced by a layer the hooks follow")
        return out, self.blocks[key]

    def _lookup(self, name: str, x: Tensor) -> Tensor:
        key = tuple(x.shape[-2:])
        if key not in self.blocks:
            raise _Untrackable(f"layer {name!r}: input of spatial size {key} comes from a layer the hooks do not "
                               "follow")
        return self.blocks[key]

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> Optional[tuple]:
            x = args[0]
            sizes = self._lookup(name, x)
            height, width = x.shape[-2:]
            if bool((sizes[:, 0] == height).all() and (sizes[:, 1] == width).all()):
                return None
            keep = _block_mask(sizes.to(x.device), height, width).unsqueeze(1)
            fill = float("-inf") if isinstance(module, nn.MaxPool2d) else 0.0
            return (torch.where(keep, x, torch.full((), fill, dtype=x.dtype, device=x.device)), *args[1:])
        return hook

    def _post_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0]
            canvas = torch.tensor([list(x.shape[-2:])])
            if tuple(_out_sizes(module, canvas)[0].tolist()) != tuple(output.shape[-2:]):
                raise _Untrackable(f"layer {name!r} ({type(module).__name__}) does not follow its static size "
                                   "formula (dynamic padding?)")
            sizes = _out_sizes(module, self._lookup(name, x))
            if bool((sizes <= 0).any()):
                raise ValueError(f"an image is too small for the backbone: layer {name!r} would output an empty "
                                 f"map (input sizes {self._lookup(name, x).tolist()})")
            key = tuple(output.shape[-2:])
            known = self.blocks.get(key)
            if known is not None and not torch.equal(known, sizes):
                raise _Untrackable(f"layer {name!r}: two different valid blocks for feature maps of size {key}")
            self.blocks[key] = sizes
        return hook


# ---- extraction ------------------------------------------------------------------------------------------------

class _Images(torch.utils.data.Dataset):
    """Item i: the (3, h, w) base image i (loaded from its path, or the given tensor cropped to its bbox)."""

    def __init__(self, items: list, bboxes: list, max_size: Optional[int], upscale: bool,
                 size: Optional[tuple[int, int]] = None, resample: str = "bicubic") -> None:
        self.items, self.bboxes, self.max_size, self.upscale = items, bboxes, max_size, upscale
        self.size, self.resample = size, resample

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tensor:
        item, bbox = self.items[index], self.bboxes[index]
        if not isinstance(item, Tensor):
            return load_image(item, self.max_size, bbox, upscale=self.upscale, size=self.size,
                              resample=self.resample)
        if bbox is not None:
            x1, y1, x2, y2 = _crop_box(bbox, item.shape[2], item.shape[1], f"image {index}")
            item = item[:, y1:y2, x1:x2]
        if self.size is not None and tuple(item.shape[1:]) != self.size:
            item = torch.nn.functional.interpolate(item[None], size=self.size, mode=self.resample,
                                                   antialias=True, align_corners=False)[0].clamp_(0.0, 1.0)
        return item


def _as_image_tensor(image: Tensor, index: int) -> Tensor:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image {index}: a tensor image must have shape (3, h, w), got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float().div(255.0)
    if not image.is_floating_point():
        raise ValueError(f"image {index}: a tensor image must be floating point in [0, 1] or uint8, got {image.dtype}")
    return image


def _collate(items: list) -> list:
    return items


def _scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return (size[0], size[1]) if scale == 1 else (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def _rescale(image: Tensor, scale: float) -> Tensor:
    if scale == 1:
        return image
    height, width = _scaled(tuple(image.shape[-2:]), scale)
    out = F.interpolate(image.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False,
                        antialias=True)
    return out[0].clamp_(0.0, 1.0)


def _batches(sizes: list[tuple[int, int]], batch_size: int, same_size: bool) -> list[list[int]]:
    """Indices sorted by (h, w) and cut into batches; with ``same_size`` a batch never mixes two sizes."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    batches: list[list[int]] = []
    for index in order:
        if batches and len(batches[-1]) < batch_size and (not same_size or sizes[batches[-1][0]] == sizes[index]):
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


class _ThinProbe:
    """Feature size along each dimension, measured with a forward on a zero image that is thin along the other
    one (output height depends on the input height only, in a CNN); cached per distinct value."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.heights: dict[int, int] = {}
        self.widths: dict[int, int] = {}

    def __call__(self, height: int, width: int) -> tuple[int, int]:
        if height not in self.heights:
            self.heights[height] = self._run(height, min(width, _PROBE_WIDTH))[0]
        if width not in self.widths:
            self.widths[width] = self._run(min(height, _PROBE_WIDTH), width)[1]
        return self.heights[height], self.widths[width]

    def _run(self, height: int, width: int) -> tuple[int, int]:
        out = probe_forward(self.model, height, width, self.model.features, dtype=self.dtype)
        return int(out.shape[-2]), int(out.shape[-1])


def _input_mean(model: nn.Module) -> Union[float, Tensor]:
    """The value that the backbone's input normalisation maps to 0 (0 when it does not normalise)."""
    backbone = _feature_part(model)
    mean = getattr(backbone, "mean", None)
    if isinstance(mean, Tensor) and getattr(backbone, "normalize_images", False) and mean.numel() == 3:
        return mean.detach().flatten()
    return 0.0


def _describe(model: nn.Module, features: Tensor, mask: Optional[Tensor], token: Optional[Tensor] = None) -> Tensor:
    """The model's own path after the backbone (:meth:`aggnets.Embedder.describe`: head, projection, whitening, L2)
    on ``features`` with masked positions zeroed."""
    if mask is not None:
        features = torch.where(mask.unsqueeze(1), features, torch.zeros((), dtype=features.dtype,
                                                                         device=features.device))
    return model.describe(features, mask, token)


def _combine(per_scale: list[Tensor], how: str, p: float) -> Tensor:
    """L2 each, combine (mean, or signed power mean ``sign(m)|m|^(1/p)``, ``m = mean(sign(v)|v|^p)``), L2."""
    stacked = torch.stack([F.normalize(d, dim=-1) for d in per_scale])
    if len(per_scale) == 1:
        return stacked[0]
    if how == "mean":
        combined = stacked.mean(dim=0)
    else:
        powered = (stacked.sign() * stacked.abs().pow(p)).mean(dim=0)
        combined = powered.sign() * powered.abs().pow(1.0 / p)
    return F.normalize(combined, dim=-1)


def extract_descriptors(model: nn.Module, images_or_paths: Union[Sequence[Union[PathLike, Tensor]], Tensor], *,
                        batch_size: int = 16, max_size: Optional[int] = 1024, scales: Sequence[float] = (1.0,),
                        multiscale: str = "mean", gem_p: float = 3.0, bboxes: Optional[Sequence[Optional[BBox]]] = None,
                        device: Union[str, torch.device, None] = None, progress: bool = True,
                        batching: str = "auto", upscale: bool = True, num_workers: int = 0,
                        size: Optional[Sequence[int]] = None, resample: str = "bicubic") -> Tensor:
    """(N, D) L2-normalised global descriptors of N images, in input order.

    ``model``: an :class:`aggnets.Embedder` (or a module with its ``features``, ``backbone_output`` and
    ``describe``): descriptors are the model's own ``describe`` (head with the global token when it uses one,
    projection, whitening, L2) of each image's map, i.e. equal to ``model(image)`` image by image.
    ``images_or_paths``: image files (loaded by :func:`load_image` with ``max_size`` / ``upscale``), (3, h, w)
    tensors in [0, 1] (used at their own size), or a (N, 3, H, W) tensor. ``bboxes``: one (x1, y1, x2, y2) or None
    per image, in the file's (or tensor's) pixel coordinates, cropped before resizing. ``size`` = (h, w): every
    image (file or tensor) resized to exactly that size (``resample`` "bicubic" or "bilinear", antialiased), as the
    place-recognition papers evaluate (``max_size`` then ignored).

    ``scales``: each image is also resized by ``s`` (bilinear, antialiased: longer side ``max_size * s``), each
    scale's descriptor is L2-normalised, then combined by ``multiscale="mean"`` or ``"gem"`` (power mean with
    ``gem_p``, signed so that negative entries are allowed) and L2-normalised again, e.g.
    ``scales=(1, 2 ** -0.5, 0.5)``. ``batching``: how images of different sizes share a batch (module docstring):
    ``"auto"`` (exact: per-layer masking when the backbone allows it, else same-size batches), ``"masked"``,
    ``"same_size"``, ``"padded"`` (approximate). Images are sorted by size into batches of ``batch_size`` to
    minimise padding. Runs under ``torch.no_grad()`` in eval mode (each module's mode is restored afterwards), on
    ``device`` (default: the model's; the model is moved there and back). Returns a CPU tensor.
    """
    if batching not in BATCHING_MODES:
        raise ValueError(f"extract_descriptors: batching must be one of {BATCHING_MODES}, got {batching!r}")
    if not all(callable(getattr(model, name, None)) for name in ("features", "backbone_output", "describe")):
        raise TypeError(f"extract_descriptors: model must expose features(images), backbone_output(images, sizes) "
                        f"and describe(x, mask, token) (aggnets.Embedder does); got {type(model).__name__}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"extract_descriptors: batch_size must be a positive int, got {batch_size!r}")
    _check_max_size(max_size)
    size = _check_size(size)
    _check_resample(resample)
    scales = [scales] if isinstance(scales, (int, float)) else list(scales)
    if not scales or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
                             for s in scales):
        raise ValueError(f"extract_descriptors: scales must be a non-empty sequence of positive numbers, "
                         f"got {scales!r}")
    if multiscale not in ("mean", "gem"):
        raise ValueError(f"extract_descriptors: multiscale must be 'mean' or 'gem', got {multiscale!r}")
    if not (isinstance(gem_p, (int, float)) and math.isfinite(gem_p) and gem_p > 0):
        raise ValueError(f"extract_descriptors: gem_p must be a positive number, got {gem_p!r}")

    items = list(images_or_paths)
    if not items:
        raise ValueError("extract_descriptors: no images given (empty list)")
    if bboxes is None:
        bboxes = [None] * len(items)
    elif len(bboxes) != len(items):
        raise ValueError(f"extract_descriptors: {len(bboxes)} bboxes for {len(items)} images")
    bboxes = list(bboxes)
    base_sizes: list[tuple[int, int]] = []
    for index, item in enumerate(items):
        if isinstance(item, Tensor):
            item = items[index] = _as_image_tensor(item, index)
            box = _crop_box(bboxes[index], item.shape[2], item.shape[1], f"image {index}")
            base_sizes.append(size or ((box[3] - box[1], box[2] - box[0]) if box else tuple(item.shape[1:])))
        elif isinstance(item, (str, os.PathLike)):
            items[index] = _check_file(item)
            base_sizes.append(_image_size(items[index], bboxes[index], max_size, upscale, size))
        else:
            raise TypeError(f"extract_descriptors: image {index} must be a path or a (3, h, w) tensor, "
                            f"got {type(item).__name__}")

    parameter = next(model.parameters(), None)
    original_device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else original_device
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    modes = {module: module.training for module in model.modules()}
    mode = batching
    if mode in ("auto", "masked"):
        problem = masking_problem(model)
        if problem is not None:
            if mode == "masked":
                raise ValueError(f"extract_descriptors: batching='masked' cannot be exact for this backbone: "
                                 f"{problem}; use batching='same_size' (exact) or 'padded' (approximate)")
            mode = "same_size"
    batches = _batches(base_sizes, batch_size, same_size=mode == "same_size")
    loader = torch.utils.data.DataLoader(_Images(items, bboxes, max_size, upscale, size, resample), batch_sampler=batches,
                                         collate_fn=_collate, num_workers=num_workers)
    results: list[Optional[Tensor]] = [None] * len(items)
    bar = progress_bar(total=len(items), enabled=progress, desc="extracting descriptors", unit="img")
    model.to(device)
    model.eval()
    try:
        with torch.no_grad():
            probe = _ThinProbe(model, device, dtype)
            pad_value = _input_mean(model)
            masking = _LayerMasking(model)
            for indices, images in zip(batches, loader):
                images = [image.to(device=device, dtype=dtype) for image in images]
                per_scale = []
                for scale in scales:
                    scaled = [_rescale(image, scale) for image in images]
                    per_scale.append(_extract_batch(model, scaled, mode, masking, probe, pad_value))
                    if mode == "auto" and per_scale[-1] is None:  # the hooks lost track: same-size from now on
                        mode = "same_size"
                        per_scale[-1] = _extract_batch(model, scaled, mode, masking, probe, pad_value)
                combined = _combine(per_scale, multiscale, float(gem_p)).cpu()
                for row, index in enumerate(indices):
                    results[index] = combined[row]
                bar.update(len(indices))
    finally:
        bar.close()
        model.to(original_device)
        for module, training in modes.items():
            module.training = training
    return torch.stack(results)  # type: ignore[arg-type]


def _extract_batch(model: nn.Module, images: list[Tensor], mode: str, masking: _LayerMasking, probe: _ThinProbe,
                   pad_value: Union[float, Tensor]) -> Optional[Tensor]:
    """Descriptors (B, D) of one batch; None when ``mode="auto"`` and the per-layer hooks cannot follow the net."""
    sizes = [tuple(image.shape[-2:]) for image in images]
    if len(set(sizes)) == 1:
        out = model.backbone_output(torch.stack(images))
        return _describe(model, out.map, None, out.token)
    if mode == "same_size":  # a batch that mixes sizes after a fallback: one forward per size
        groups: dict[tuple, list[int]] = {}
        for row, size in enumerate(sizes):
            groups.setdefault(size, []).append(row)
        rows_out: list[Optional[Tensor]] = [None] * len(images)
        for rows in groups.values():
            out = model.backbone_output(torch.stack([images[r] for r in rows]))
            for row, descriptor in zip(rows, _describe(model, out.map, None, out.token)):
                rows_out[row] = descriptor
        return torch.stack(rows_out)  # type: ignore[arg-type]
    value = pad_value.to(images[0]) if isinstance(pad_value, Tensor) else pad_value
    batch, image_mask = pad_batch(images, value=value)
    token = None
    if mode != "padded" and _masks_itself(model):  # the backbone masks the padding itself (e.g. a ViT)
        out = model.backbone_output(batch, torch.tensor(sizes))
        mask = out.mask
        return _describe(model, out.map, None if mask is None or bool(mask.all()) else mask, out.token)
    if mode == "padded":
        out = model.backbone_output(batch)
        features, token = out.map, out.token
        feature_sizes = torch.tensor([probe(*size) for size in sizes])
    else:
        try:
            with masking:
                features, feature_sizes = masking.run(model.features, batch, torch.tensor(sizes))
        except _Untrackable as error:
            if mode == "auto":
                return None
            raise ValueError(f"extract_descriptors: batching='masked' cannot follow this backbone: {error}; use "
                             "batching='same_size' (exact) or 'padded' (approximate)") from None
    mask = feature_mask(image_mask, tuple(features.shape[-2:]), sizes=feature_sizes.to(features.device))
    return _describe(model, features, None if bool(mask.all()) else mask, token)


# ---- descriptor files ------------------------------------------------------------------------------------------

class LoadedDescriptors(NamedTuple):
    descriptors: Tensor
    names: list
    config: dict


def _format_of(path: str) -> str:
    lowered = path.lower()
    if lowered.endswith(".npy"):
        return "npy"
    if lowered.endswith((".pt", ".pth")):
        return "pt"
    raise ValueError(f"descriptor file {path!r}: the extension must be .npy (array + {os.path.basename(path)}.json "
                     "sidecar) or .pt / .pth (one torch file)")


def _sidecar(path: str) -> str:
    return path + ".json"


def save_descriptors(path: PathLike, descriptors: Union[Tensor, np.ndarray], names: Sequence[str],
                     config: Optional[dict] = None) -> None:
    """Save (N, D) descriptors with their N image names and the extraction ``config`` (JSON-serialisable).

    ``.npy``: the array (``np.load``-able on its own) plus a ``<path>.json`` sidecar with the names and config;
    ``.pt`` / ``.pth``: one file of plain tensors / strings / numbers, loadable with ``torch.load(weights_only=True)``.
    """
    path = os.fspath(path)
    kind = _format_of(path)
    array = descriptors.detach().cpu() if isinstance(descriptors, Tensor) else torch.from_numpy(np.asarray(descriptors))
    if array.dim() != 2:
        raise ValueError(f"save_descriptors: descriptors must be 2-D (N, D), got shape {tuple(array.shape)}")
    if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
        raise ValueError("save_descriptors: names must be a sequence of strings (one per descriptor)")
    names = list(names)
    if len(names) != array.shape[0]:
        raise ValueError(f"save_descriptors: {len(names)} names for {array.shape[0]} descriptors")
    try:
        config = json.loads(json.dumps({} if config is None else config, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"save_descriptors: config must be JSON-serialisable: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"save_descriptors: config must be a dict, got {type(config).__name__}")
    meta = {"format": DESCRIPTORS_FILE_FORMAT, "version": _FILE_VERSION, "count": len(names),
            "dim": int(array.shape[1]), "names": names, "config": config}
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if kind == "npy":
        np.save(path, array.numpy(), allow_pickle=False)
        with open(_sidecar(path), "w", encoding="utf-8") as handle:
            json.dump(meta, handle)
    else:
        torch.save({**meta, "descriptors": array.contiguous().clone()}, path)


def load_descriptors(path: PathLike) -> LoadedDescriptors:
    """``(descriptors (N, D) tensor, names, config)`` from a file written by :func:`save_descriptors`."""
    path = os.fspath(path)
    kind = _format_of(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"descriptor file not found: {path}")
    if kind == "npy":
        if not os.path.isfile(_sidecar(path)):
            raise FileNotFoundError(f"{path}: its sidecar {_sidecar(path)} (names and config) is missing")
        array = torch.from_numpy(np.load(path, allow_pickle=False))
        with open(_sidecar(path), encoding="utf-8") as handle:
            try:
                meta = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{_sidecar(path)} is not valid JSON: {error}") from None
        where = _sidecar(path)
    else:
        meta = torch.load(path, map_location="cpu", weights_only=True)
        array = meta.get("descriptors") if isinstance(meta, dict) else None
        where = path
    if not isinstance(meta, dict) or meta.get("format") != DESCRIPTORS_FILE_FORMAT:
        raise ValueError(f"{where} is not an aggnets descriptor file (format {DESCRIPTORS_FILE_FORMAT!r})")
    if meta.get("version") != _FILE_VERSION:
        raise ValueError(f"{where}: unsupported descriptor file version {meta.get('version')!r}")
    names, config = meta.get("names"), meta.get("config")
    if not isinstance(array, Tensor) or array.dim() != 2:
        raise ValueError(f"{path}: the descriptors are not a 2-D array")
    if not isinstance(names, list) or not isinstance(config, dict):
        raise ValueError(f"{where}: names (list) or config (dict) missing")
    if len(names) != array.shape[0]:
        raise ValueError(f"{where}: {len(names)} names for {array.shape[0]} descriptors in {path} (files out of "
                         "sync?)")
    return LoadedDescriptors(array, names, config)
