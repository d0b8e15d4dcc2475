"""Exact mid-epoch resume: the training loader remembers where it is in the epoch and the random streams.

:class:`ResumableLoader` has a ``state_dict``: the epoch, the number of batches already handed out and the main
process's random number generator states (torch, CUDA, NumPy, ``random``). The data module puts it in every
checkpoint. On resume the loader skips those batches without loading them and restores the generators just before
its first batch, so the run continues with exactly the batches and random draws (augmentations with
``num_workers=0``, dropout, drop-path) that the uninterrupted run used. The orders come from samplers seeded by
``(seed, epoch)`` alone (:class:`EpochShuffleSampler`, :class:`ClassBalancedSampler`), never from global state.

Random augmentations are exact too when the dataset has ``seeded_items`` (aggnets' folder datasets): the samplers
then hand each item its own seed, drawn from ``(seed, epoch)``, so an item's augmentation depends neither on which
worker loads it nor on a resume. Other datasets augmenting in worker processes resume with the same order of images
but other random draws.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["ResumableLoader", "EpochShuffleSampler", "ClassBalancedSampler", "epoch_seed"]


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed derived from ``(seed, epoch, stream)`` alone (NumPy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)]).generate_state(2,
               np.uint64)[0] >> np.uint64(1))


class _EpochSampler(Sampler[int]):
    def __init__(self, seed: int) -> None:
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at the start of every epoch
        self.epoch = int(epoch)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))


class EpochShuffleSampler(_EpochSampler):
    """A random permutation of ``range(size)`` that depends only on ``(seed, epoch)``.

    ``item_seeds=True`` yields ``(index, item_seed)`` pairs instead, for datasets with ``seeded_items`` (their random
    augmentation of an item is then drawn from ``item_seed``, itself drawn from ``(seed, epoch)``).
    """

    def __init__(self, size: int, seed: int = 0, item_seeds: bool = False) -> None:
        super().__init__(seed)
        self.size, self.item_seeds = int(size), item_seeds

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Any]:
        generator = self._generator()
        order = torch.randperm(self.size, generator=generator).tolist()
        return _with_item_seeds(order, generator) if self.item_seeds else iter(order)


def _with_item_seeds(order: list[int], generator: torch.Generator) -> Iterator[tuple[int, int]]:
    seeds = torch.randint(0, 2**62, (len(order),), generator=generator).tolist()
    return zip(order, seeds)


class ClassBalancedSampler(_EpochSampler):
    """P x K batches: each run of ``batch_size`` indices holds ``batch_size / K`` distinct classes with K images
    each (the sampling of metric learning), about ``length`` indices per epoch, drawn from ``(seed, epoch)`` alone.

    Classes are drawn uniformly per batch; within a class the images are cycled through in a fresh random order, so
    every image is seen before any repeats. Classes with fewer than K images repeat images within the batch.
    ``each_class_once=True``: an epoch is one random permutation of the classes cut into batches of P (the last
    incomplete batch dropped), K images of each (``length`` ignored): GSV-Cities' epoch, every place once with K
    of its images. ``item_seeds`` as in :class:`EpochShuffleSampler`.
    """

    def __init__(self, labels: Sequence[int], samples_per_class: int, batch_size: int, length: Optional[int] = None,
                 seed: int = 0, item_seeds: bool = False, each_class_once: bool = False) -> None:
        super().__init__(seed)
        self.item_seeds = item_seeds
        labels = torch.as_tensor(labels).flatten()
        self.k = int(samples_per_class)
        if self.k < 1 or batch_size % self.k:
            raise ValueError(f"samples_per_class ({samples_per_class}) must divide batch_size ({batch_size})")
        self.classes_per_batch = batch_size // self.k
        self.members = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
        if self.classes_per_batch > len(self.members):
            raise ValueError(f"{self.classes_per_batch} classes per batch, but the labels hold {len(self.members)}")
        self.batch_size = int(batch_size)
        self.each_class_once = bool(each_class_once)
        if self.each_class_once:
            self.num_batches = len(self.members) // self.classes_per_batch
        else:
            self.num_batches = max(1, (len(labels) if length is None else int(length)) // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        generator = self._generator()
        orders = [m[torch.randperm(len(m), generator=generator)] for m in self.members]
        cursors = [0] * len(orders)
        indices: list[int] = []
        classes = torch.randperm(len(orders), generator=generator).tolist() if self.each_class_once else []
        for batch in range(self.num_batches):
            if self.each_class_once:
                chosen = classes[batch * self.classes_per_batch:(batch + 1) * self.classes_per_batch]
            else:
                chosen = torch.randperm(len(orders), generator=generator)[: self.classes_per_batch].tolist()
            for c in chosen:
                order = orders[c]
                for _ in range(self.k):
                    if cursors[c] == len(order):
                        order = orders[c] = order[torch.randperm(len(order), generator=generator)]
                        cursors[c] = 0
                    indices.append(int(order[cursors[c]]))
                    cursors[c] += 1
        return _with_item_seeds(indices, generator) if self.item_seeds else iter(indices)


def _rng_state() -> dict[str, Any]:
    """The main process's generator states as tensors and ints (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss),
             "python": (version, list(internal), gauss_next)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose ``state_dict`` lets a run resumed mid-epoch continue exactly where it stopped.

    Use it with an epoch-seeded sampler (an order that depends only on its seed and the epoch, set by Lightning's
    ``set_epoch``). The loader's own ``generator`` (the workers' base seeds) is re-seeded from ``(seed, epoch)`` at
    each epoch. Skipped batches are dropped from the index stream, before any worker loads them.
    """

    def __init__(self, *args: Any, seed: int = 0, generator: Optional[torch.Generator] = None,
                 **kwargs: Any) -> None:
        # ``generator`` is accepted (Lightning re-creates loaders from their attributes) and replaced by our own.
        super().__init__(*args, generator=torch.Generator(), **kwargs)
        self.seed = int(seed)
        self._epoch, self._handed_out, self._skip_batches = -1, 0, 0
        self._pending: Optional[dict[str, Any]] = None  # a state_dict to resume from, applied at the next pass

    def _sampler_epoch(self) -> int:
        for sampler in (getattr(self.batch_sampler, "sampler", None), self.sampler):
            if hasattr(sampler, "epoch"):
                return int(sampler.epoch)
        return 0

    @property
    def _index_sampler(self) -> Any:
        index_sampler = super()._index_sampler
        return _SkipFirst(index_sampler, self) if self._skip_batches else index_sampler

    def __iter__(self) -> Iterator[Any]:  # a generator: runs at the first next(), after Lightning's set_epoch
        epoch = self._sampler_epoch()
        self.generator.manual_seed(epoch_seed(self.seed, epoch, stream=1))
        pending, self._pending = self._pending, None
        skip = 0
        if pending is not None:
            _set_rng_state(pending["rng"])
            skip = int(pending["batches"]) if int(pending["epoch"]) == epoch else 0
        self._epoch, self._handed_out, self._skip_batches = epoch, skip, skip
        try:
            iterator = super().__iter__()
        finally:
            self._skip_batches = 0
        for batch in iterator:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._handed_out, "rng": _rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` at the next pass (which must be the epoch it was saved in, or the next one)."""
        self._pending = state


class _SkipFirst:
    """The loader's batch sampler, starting after ``loader._skip_batches`` batches (read at each pass: a DataLoader
    iterator with workers asks for its index stream twice when created, and again at each later epoch)."""

    def __init__(self, batch_sampler: Any, loader: ResumableLoader) -> None:
        self.batch_sampler, self.loader = batch_sampler, loader

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.batch_sampler)
        for _ in range(self.loader._skip_batches):
            next(iterator, None)
        return iterator
