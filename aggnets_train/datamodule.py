"""One LightningDataModule for every dataset: the datasets arrive built from the config (any ``Dataset`` of
``(image, label)`` pairs); this module only makes the loaders — shuffled, or P classes x K images per batch for
metric learning — with orders drawn from ``(seed, epoch)`` so that a run resumed mid-epoch is exact
(:mod:`aggnets_train.resumable`)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from aggnets.retrieval import PlaceSet

from .resumable import ClassBalancedSampler, EpochShuffleSampler, ResumableLoader
from .vpr_sets import PlaceSetImages, build_place_set

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

    ``val_sets``: place-recognition sets validated on (names of ``conf/vpr/``, under ``val_root``; index files under
    ``val_index_root`` when elsewhere), each a loader of its database and query images resized to
    ``val_image_size`` (``val_resample``); the task logs ``val/<set>/R@N``. Without ``val`` and ``test`` sets they
    are also the test loaders (``test/<set>/R@N``).

    P x K batches come from :class:`~aggnets_train.resumable.ClassBalancedSampler` rather than
    pytorch-metric-learning's ``MPerClassSampler``: that one draws from NumPy's global generator when an epoch
    starts, so a resumed run would see other batches.
    """

    def __init__(self, train: Dataset, val: Optional[Dataset] = None, test: Optional[Dataset] = None, *,
                 num_classes: Optional[int] = None, batch_size: int = 64, eval_batch_size: Optional[int] = None,
                 num_workers: int = 0, samples_per_class: Optional[int] = None, pin_memory: bool = False,
                 drop_last: bool = True, seed: Optional[int] = None, each_class_once: bool = False,
                 val_sets: Optional[Sequence[str]] = None, val_root: Optional[str] = None,
                 val_index_root: Optional[str] = None, val_image_size: Sequence[int] = (320, 320),
                 val_resample: str = "bilinear") -> None:
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
        self.val_place_sets: list[PlaceSet] = []
        if val_sets:
            names = [val_sets] if isinstance(val_sets, str) else list(val_sets)
            self.val_place_sets = [build_place_set(str(n), val_root, val_index_root, key="data") for n in names]
        self.val_image_size, self.val_resample = tuple(int(v) for v in val_image_size), val_resample
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

    @property
    def val_kinds(self) -> list[tuple[str, Optional[PlaceSet]]]:
        """What each validation loader holds, in order: ``("labels", None)`` (the labelled ``val`` set: leave-one-out
        retrieval) and ``(name, place_set)`` per place-recognition set (database then queries, recall@N)."""
        kinds: list[tuple[str, Optional[PlaceSet]]] = [("labels", None)] if self.val_set is not None else []
        return kinds + [(p.name, p) for p in self.val_place_sets]

    def _place_loaders(self) -> list[DataLoader]:
        return [self._loader(PlaceSetImages(p, self.val_image_size, self.val_resample),
                             batch_size=self.eval_batch_size, shuffle=False) for p in self.val_place_sets]

    def val_dataloader(self) -> Any:
        loaders = [] if self.val_set is None else [self._loader(self.val_set, batch_size=self.eval_batch_size,
                                                                shuffle=False)]
        loaders += self._place_loaders()
        return loaders[0] if len(loaders) == 1 else loaders

    @property
    def test_kinds(self) -> list[tuple[str, Optional[PlaceSet]]]:
        """As :attr:`val_kinds` for the test loaders: the ``test`` set (else ``val``), else the place sets."""
        if self.test_set is not None or self.val_set is not None:
            return [("labels", None)]
        return [(p.name, p) for p in self.val_place_sets]

    def test_dataloader(self) -> Any:
        dataset = self.test_set if self.test_set is not None else self.val_set
        if dataset is None:
            loaders = self._place_loaders()
            return loaders[0] if len(loaders) == 1 else loaders
        return self._loader(dataset, batch_size=self.eval_batch_size, shuffle=False)

    def codebook_dataset(self) -> Dataset:
        """The images the codebook heads are initialised from (the training set)."""
        return self.train_set
