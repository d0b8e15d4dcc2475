"""Stream images through a backbone and keep a bounded, uniform random sample of local descriptors.

The seed guide's step 3: every feature-map position is a C-dim descriptor; ``per_image`` positions are drawn at
random from each image, and a reservoir keeps a uniform sample of at most ``max_descriptors`` of them, so memory is
bounded whatever the dataset size.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from ..utils import progress_bar

__all__ = ["DescriptorReservoir", "sample_descriptors", "split_batch"]


class DescriptorReservoir:
    """Uniform sample without replacement of at most ``capacity`` rows from a stream (reservoir sampling by random
    priorities: every row gets a uniform key and the ``capacity`` smallest keys are kept; Efraimidis & Spirakis 2006).
    ``capacity=None`` keeps every row. Storage is allocated once, on ``device``."""

    def __init__(self, capacity: Optional[int], dim: int, *, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:
        if capacity is not None and (not isinstance(capacity, int) or capacity <= 0):
            raise ValueError(f"max_descriptors must be a positive int or None, got {capacity!r}")
        self.capacity, self.dim = capacity, dim
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._rows: list[Tensor] = []
        self._data = torch.empty(0 if capacity is None else capacity, dim, device=device, dtype=dtype)
        self._keys = torch.full((0 if capacity is None else capacity,), math.inf, dtype=torch.float64)
        self.size = 0
        self.seen = 0

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().reshape(-1, self.dim)
        self.seen += len(rows)
        if self.capacity is None:
            self._rows.append(rows.to(self._data.device, self._data.dtype))
            self.size += len(rows)
            return
        keys = torch.rand(len(rows), generator=self.generator, dtype=torch.float64)
        free = self.capacity - self.size
        if free > 0:
            take = min(free, len(rows))
            self._data[self.size:self.size + take] = rows[:take].to(self._data.device, self._data.dtype)
            self._keys[self.size:self.size + take] = keys[:take]
            self.size += take
            rows, keys = rows[take:], keys[take:]
        if len(rows) == 0:
            return
        worst = float(self._keys.max())
        entering = keys < worst
        if not bool(entering.any()):
            return
        rows, keys = rows[entering.to(rows.device)], keys[entering]
        slots = torch.topk(self._keys, min(len(keys), self.capacity)).indices  # the current largest keys
        pooled_keys = torch.cat([self._keys[slots], keys])
        keep = torch.topk(pooled_keys, len(slots), largest=False).indices
        device = self._data.device
        pooled_rows = torch.cat([self._data[slots.to(device)], rows.to(device, self._data.dtype)])
        self._data[slots.to(device)] = pooled_rows[keep.to(device)]
        self._keys[slots] = pooled_keys[keep]

    def tensor(self) -> Tensor:
        """The sampled descriptors, (size, dim)."""
        if self.capacity is None:
            return torch.cat(self._rows) if self._rows else self._data[:0]
        return self._data[: self.size]


def split_batch(batch: Any) -> Tensor:
    """The image tensor of a DataLoader batch: a tensor, the first item of a tuple/list, or ``batch["image"]``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "img", "x"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise TypeError(f"cannot find the images in a batch of type {type(batch).__name__}: yield a tensor, a "
                    "(images, ...) tuple or a dict with an 'image' key")


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _is_sharded(loader: Iterable) -> bool:
    sampler = getattr(loader, "sampler", None)
    return isinstance(sampler, torch.utils.data.distributed.DistributedSampler)


@torch.no_grad()
def sample_descriptors(backbone: nn.Module, loader: Iterable, *, per_image: Optional[int] = 200,
                       max_descriptors: Optional[int] = 1_000_000, device: Any = None, seed: int = 0,
                       l2_normalize: bool = False, progress: bool = True, max_images: Optional[int] = None,
                       store_device: Any = "cpu") -> Tensor:
    """Random local descriptors (N, C) of the images of ``loader`` at the output of ``backbone``.

    ``per_image`` positions are drawn uniformly without replacement from each image's feature map (all positions
    when None or when the map is smaller); the reservoir keeps at most ``max_descriptors`` (None = all, in RAM).
    The backbone runs in eval mode on ``device`` (default: the backbone's device), under no_grad.
    Under ``torch.distributed``, each rank takes its own shard (its DistributedSampler's, or every world-size-th
    batch) and returns its own sample of at most ``max_descriptors / world_size`` rows; the fitting functions then
    all-reduce their statistics.
    """
    rank, world = _distributed()
    shard_batches = world > 1 and not _is_sharded(loader)
    if device is None:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    capacity = None if max_descriptors is None else max(1, math.ceil(max_descriptors / world))
    was_training = backbone.training
    backbone.eval()
    generator = torch.Generator(device="cpu").manual_seed(seed * 7919 + rank)
    reservoir: Optional[DescriptorReservoir] = None
    images_seen = 0
    bar = progress_bar(loader, enabled=progress and rank == 0, desc="sampling descriptors", unit="batch")
    try:
        for index, batch in enumerate(bar):
            if shard_batches and index % world != rank:
                continue
            images = split_batch(batch)
            if max_images is not None:
                images = images[: max(0, max_images - images_seen)]
                if len(images) == 0:
                    break
            features = backbone(images.to(device, non_blocking=True))
            if features.dim() != 4:
                raise ValueError(f"the backbone must return (B, C, H, W) feature maps, got {tuple(features.shape)}")
            descriptors = _draw(features, per_image, generator)
            if l2_normalize:
                descriptors = nn.functional.normalize(descriptors.float(), dim=1)
            if reservoir is None:
                reservoir = DescriptorReservoir(capacity, features.shape[1], device=store_device, seed=seed + rank)
            reservoir.add(descriptors)
            images_seen += len(images)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(images=images_seen, kept=reservoir.size)
    finally:
        backbone.train(was_training)
    if reservoir is None or reservoir.size == 0:
        raise ValueError("the DataLoader yielded no images: cannot sample descriptors from an empty dataset")
    return reservoir.tensor()


def _draw(features: Tensor, per_image: Optional[int], generator: torch.Generator) -> Tensor:
    batch, channels, height, width = features.shape
    flat = features.flatten(2).transpose(1, 2)  # (B, N, C)
    positions = height * width
    if per_image is None or per_image >= positions:
        return flat.reshape(-1, channels)
    if per_image <= 0:
        raise ValueError(f"per_image must be positive or None, got {per_image}")
    chosen = torch.rand(batch, positions, generator=generator).argsort(dim=1)[:, :per_image].to(features.device)
    return flat.gather(1, chosen[..., None].expand(-1, -1, channels)).reshape(-1, channels)


