"""One LightningDataModule for every dataset: the datasets arrive built from the config (any ``Dataset`` of
``(image, label)`` pairs); this module only makes the loaders — shuffled, or P classes x K images per batch for
metric learning (pytorch-metric-learning's ``MPerClassSampler``)."""
from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

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
    images each (``batch_size`` must be a multiple of K). Under DDP, Lightning shards every loader per rank.
    """

    def __init__(self, train: Dataset, val: Optional[Dataset] = None, test: Optional[Dataset] = None, *,
                 num_classes: Optional[int] = None, batch_size: int = 64, eval_batch_size: Optional[int] = None,
                 num_workers: int = 0, samples_per_class: Optional[int] = None, pin_memory: bool = False,
                 drop_last: bool = True) -> None:
        super().__init__()
        if samples_per_class is not None and (samples_per_class < 2 or batch_size % samples_per_class):
            raise ValueError(f"data.samples_per_class must be >= 2 and divide data.batch_size ({batch_size}), "
                             f"got {samples_per_class}")
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
        self.pin_memory = pin_memory
        self.drop_last = drop_last

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        drop_last = self.drop_last and len(self.train_set) > self.batch_size
        if self.samples_per_class is None:
            return self._loader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=drop_last)
        from pytorch_metric_learning.samplers import MPerClassSampler
        sampler = MPerClassSampler(dataset_targets(self.train_set), m=self.samples_per_class,
                                   batch_size=self.batch_size, length_before_new_iter=len(self.train_set))
        return self._loader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last)

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
