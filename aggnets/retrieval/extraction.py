"""Global descriptors of image collections for retrieval: size-sorted batching with padding and masks, per-layer
re-masking, multi-scale extraction. Image reading is in :mod:`aggnets.retrieval.images`, the canvas and masks in
:mod:`aggnets.retrieval.batching`, the hooks in :mod:`aggnets.retrieval.remasking`, descriptor files in
:mod:`aggnets.retrieval.descriptor_files` (all re-exported here).

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

import math
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.extractor import probe_forward
from ..utils import progress_bar
from .batching import feature_mask, pad_batch
from .descriptor_files import DESCRIPTORS_FILE_FORMAT, LoadedDescriptors, load_descriptors, save_descriptors
from .images import (RESAMPLE_METHODS, check_file, check_max_size, check_resample, check_size, crop_box,
                     image_size, load_image)
from .remasking import LayerMasking, Untrackable, feature_part, masking_problem, masks_itself

__all__ = ["load_image", "pad_batch", "feature_mask", "extract_descriptors", "masking_problem", "save_descriptors",
           "load_descriptors", "LoadedDescriptors", "BATCHING_MODES", "DESCRIPTORS_FILE_FORMAT", "RESAMPLE_METHODS"]

PathLike = Union[str, os.PathLike]
BBox = Sequence[float]
BATCHING_MODES = ("auto", "masked", "same_size", "padded")
_PROBE_WIDTH = 64


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
            x1, y1, x2, y2 = crop_box(bbox, item.shape[2], item.shape[1], f"image {index}")
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
    backbone = feature_part(model)
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
    check_max_size(max_size)
    size = check_size(size)
    check_resample(resample)
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
            box = crop_box(bboxes[index], item.shape[2], item.shape[1], f"image {index}")
            base_sizes.append(size or ((box[3] - box[1], box[2] - box[0]) if box else tuple(item.shape[1:])))
        elif isinstance(item, (str, os.PathLike)):
            items[index] = check_file(item)
            base_sizes.append(image_size(items[index], bboxes[index], max_size, upscale, size))
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
            masking = LayerMasking(model)
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


def _extract_batch(model: nn.Module, images: list[Tensor], mode: str, masking: LayerMasking, probe: _ThinProbe,
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
    if mode != "padded" and masks_itself(model):  # the backbone masks the padding itself (e.g. a ViT)
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
        except Untrackable as error:
            if mode == "auto":
                return None
            raise ValueError(f"extract_descriptors: batching='masked' cannot follow this backbone: {error}; use "
                             "batching='same_size' (exact) or 'padded' (approximate)") from None
    mask = feature_mask(image_mask, tuple(features.shape[-2:]), sizes=feature_sizes.to(features.device))
    return _describe(model, features, None if bool(mask.all()) else mask, token)
