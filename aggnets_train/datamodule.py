"""One LightningDataModule for every dataset: the datasets arrive built from the config (any ``Dataset`` of
``(image, label)`` pairs); this module only makes the loaders — shuffled, or P classes x K images per batch for
metric learning — with orders drawn from ``(seed, epoch)`` so that a run resumed mid-epoch is exact
(:mod:`aggnets_train.resumable`)."""
from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .resumable import ClassBalancedSampler, EpochShuffleSampler, ResumableLoader

__all__ = ["ImageDataModule"]


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """The labels of a dataset as a 1-D tensor (its ``targets`` attribute, or read item by item)."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor(targets).flatten()


class ImageDataModule(L.LightningDataModule):
    """Loaders for ``train`` / ``val`` / ``test`` datasets (``val`` and ``test`` optional; without ``test`` the test
    stage uses ``val``).

    ``samples_per_class`` (K) switches the training loader to P x K batches: ``batch_size / K`` classes with K
    images each (``batch_size`` must be a multiple of K); ``each_class_once``: an epoch visits every class once
    (GSV-Cities' epoch: every place, K of its images), else an epoch is about as many images as the set holds. Under DDP, Lightning shards every loader per rank.
    The training order depends only on ``seed`` and the epoch (``seed=None``: the run's seed, ``train.py`` sets it).

    P x K batches come from :class:`~aggnets_train.resumable.ClassBalancedSampler` rather than
    pytorch-metric-learning's ``MPerClassSampler``: that one draws from NumPy's global generator when an epoch
    starts, so a resumed run would see other batches.
    """

    def __init__(self, train: Dataset, val: Optional[Dataset] = None, test: Optional[Dataset] = None, *,
                 num_classes: Optional[int] = None, batch_size: int = 64, eval_batch_size: Optional[int] = None,
                 num_workers: int = 0, samples_per_class: Optional[int] = None, pin_memory: bool = False,
                 drop_last: bool = True, seed: Optional[int] = None, each_class_once: bool = False) -> None:
        super().__init__()
        if samples_per_class is not None and (samples_per_class < 2 or batch_size % samples_per_class):
            raise ValueError(f"data.samples_per_class must be >= 2 and divide data.batch_size ({batch_size}), "
                             f"got {samples_per_class}")
        if each_class_once and samples_per_class is None:
            raise ValueError("data.each_class_once needs P x K batches: set data.samples_per_class (K)")
        if samples_per_class is not None:
            classes = len(torch.unique(dataset_targets(train)))
            if batch_size // samples_per_class > classes:
                raise ValueError(f"data.batch_size / data.samples_per_class = {batch_size // samples_per_class} "
                                 f"classes per batch, but the training set has only {classes}")
        self.train_set, self.val_set, self.test_set = train, val, test
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.samples_per_class = samples_per_class
        self.each_class_once = each_class_once
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.seed = seed
        self._train_loader: Optional[ResumableLoader] = None
        self._resume_state: Optional[dict[str, Any]] = None

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        # its own generator: evaluation never draws from (and so never shifts) the global random streams
        return DataLoader(dataset, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(0),
                          **kwargs)

    def train_dataloader(self) -> DataLoader:
        drop_last = self.drop_last and len(self.train_set) > self.batch_size
        seed = self.seed if self.seed is not None else torch.initial_seed() % 2**32
        item_seeds = bool(getattr(self.train_set, "seeded_items", False))  # dataset[(index, seed)]: exact augmentations
        if self.samples_per_class is None:
            sampler = EpochShuffleSampler(len(self.train_set), seed=seed, item_seeds=item_seeds)
        else:
            sampler = ClassBalancedSampler(dataset_targets(self.train_set), self.samples_per_class, self.batch_size,
                                           length=len(self.train_set), seed=seed, item_seeds=item_seeds,
                                           each_class_once=self.each_class_once)
        self._train_loader = ResumableLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                                             drop_last=drop_last, seed=seed, num_workers=self.num_workers,
                                             pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
        if self._resume_state is not None:
            self._train_loader.load_state_dict(self._resume_state)
            self._resume_state = None
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: where the training loader is in its epoch, and the random generators."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """On resume (before or after the training loader exists): continue the epoch where it stopped."""
        self._resume_state = state.get("train_loader")
        if self._train_loader is not None and self._resume_state is not None:
            self._train_loader.load_state_dict(self._resume_state)
            self._resume_state = None

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, batch_size=self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        dataset = self.test_set if self.test_set is not None else self.val_set
        if dataset is None:
            return []
        return self._loader(dataset, batch_size=self.eval_batch_size, shuffle=False)

    def codebook_dataset(self) -> Dataset:
        """The images the codebook heads are initialised from (the training set)."""
        return self.train_set
