"""Image datasets read from folders of image files, for training on one's own data.

``ImageFolderDataset`` is classification on an ImageFolder tree (``root/<class>/*.jpg``), pre-split
(``root/{train,val,test}/<class>/``) or split here, stratified by class. ``LandmarkDataset`` is retrieval / place
recognition: images grouped by landmark or place id (``root/<id>/*.jpg`` or a ``path,id`` CSV), split by id so that
validation and test hold only unseen landmarks, as metric learning is evaluated.

Both return ``(image (3, image_size, image_size) float32 in [0, 1], label)``: the image is read with PIL, converted
to RGB (any mode, 16-bit and transparency included: :mod:`aggnets.data.decode`), resized so its shorter side is
``image_size`` and centre-cropped (no distortion), or with ``augment=True`` randomly resized-cropped (scale 0.5..1)
and flipped. Backbones normalise the input themselves. Splits are deterministic given ``seed``.

A file that cannot be decoded (empty, truncated, corrupt, too large) never stops a run: with
``on_bad_image="skip"`` (the default) it is replaced by the next readable image of the dataset, and a
:class:`BadImageWarning` names it with the count so far (``dataset.bad_images`` lists them, per process);
``on_bad_image="raise"`` raises :class:`~aggnets.data.decode.UnreadableImageError` instead.
"""
from __future__ import annotations

import csv as csv_module
import os
import warnings
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .decode import BAD_IMAGE_POLICIES, UnreadableImageError, open_rgb

__all__ = ["ImageFolderDataset", "LandmarkDataset", "image_transform", "BadImageWarning"]

PathLike = Union[str, os.PathLike]
SPLITS = ("train", "val", "test")


def image_transform(image_size: int, augment: bool = False) -> Callable[[Image.Image], Tensor]:
    """PIL image → (3, image_size, image_size) float32 in [0, 1]: shorter side to ``image_size`` then centre crop,
    or (``augment``) a random resized crop of 50..100 % of the area and a horizontal flip."""
    from torchvision.transforms import v2  # torchvision is imported lazily, as elsewhere in aggnets
    if augment:
        geometry = [v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True)])


class BadImageWarning(UserWarning):
    """An unreadable image file was skipped."""


def _require_dir(root: PathLike) -> str:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} is not a directory")
    return root


def _check_split(split: Optional[str]) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, "
                         f"got {val_fraction} and {test_fraction}")


def _extensions(extensions: Optional[Sequence[str]]) -> tuple[str, ...]:
    if extensions is None:
        from torchvision.datasets.folder import IMG_EXTENSIONS
        return IMG_EXTENSIONS
    if isinstance(extensions, str):
        extensions = [extensions]
    return tuple("." + e.lower().lstrip(".") for e in extensions)


def _partition(count: int, val_fraction: float, test_fraction: float,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random partition of ``range(count)`` into sorted train / val / test indices of the given fractions
    (rounded; test first, then val, train keeps the rest)."""
    order = rng.permutation(count)
    n_test = min(int(round(count * test_fraction)), count)
    n_val = min(int(round(count * val_fraction)), count - n_test)
    return {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test:n_test + n_val]),
            "train": np.sort(order[n_test + n_val:])}


def _stratified(labels: Sequence[int], split: str, val_fraction: float, test_fraction: float,
                seed: int) -> np.ndarray:
    """Sorted indices of ``split`` when each class is partitioned by ``_partition`` (classes in label order)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep.append(members[_partition(len(members), val_fraction, test_fraction, rng)[split]])
    return np.sort(np.concatenate(keep))


def _find_classes(folder: str) -> list[str]:
    from torchvision.datasets.folder import find_classes
    try:
        return find_classes(folder)[0]
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no class folder in {folder!r} (expected {folder}/<class>/<image>)") from error


def _list_images(folder: str, class_to_idx: dict[str, int], extensions: tuple[str, ...]) -> list[tuple[str, int]]:
    """``(path, class index)`` of the images under ``folder/<class>/`` (torchvision's ImageFolder discovery)."""
    from torchvision.datasets.folder import make_dataset
    return make_dataset(folder, class_to_idx, extensions, allow_empty=True)


class _FileImageDataset(Dataset):
    """Shared part: a list of image paths with int labels, loaded and transformed on access."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str], image_size: int,
                 augment: bool, what: str, on_bad_image: str = "skip"):
        if not paths:
            raise ValueError(f"{what} holds no image")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        self.paths = list(paths)
        self.targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.classes = list(classes)
        self.image_size, self.augment = int(image_size), augment
        self.transform = image_transform(self.image_size, augment)
        self.on_bad_image = on_bad_image
        self.bad_images: dict[str, str] = {}  # path -> reason, in this process

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> Image.Image:
        # random crops keep at least half the area: decode at twice the size they need, at least
        return open_rgb(self.paths[index], min_size=self.image_size * (2 if self.augment else 1))

    #: ``dataset[(index, seed)]`` draws the random augmentation of that item from ``seed`` alone (the training
    #: samplers of ``aggnets_train`` pass one per item, so augmentations do not depend on workers or on a resume)
    seeded_items = True

    def __getitem__(self, index: Union[int, tuple[int, int]]) -> tuple[Tensor, int]:
        if isinstance(index, tuple):
            index, seed = index
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                return self._item(int(index))
        return self._item(index)

    def _item(self, index: int) -> tuple[Tensor, int]:
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            if self.paths[candidate] in self.bad_images:
                continue
            try:
                image = self._load(candidate)
            except UnreadableImageError as error:
                if self.on_bad_image == "raise":
                    raise
                self._skipped(candidate, error)
                continue
            return self.transform(image), int(self.targets[candidate])
        raise UnreadableImageError(f"{type(self).__name__}: none of the {len(self.paths)} images can be read")

    def _skipped(self, index: int, error: UnreadableImageError) -> None:
        self.bad_images[self.paths[index]] = str(error)
        warnings.warn(f"{type(self).__name__}: skipped item {index}: {error}; {len(self.bad_images)} unreadable "
                      "image(s) so far in this process, each replaced by the next readable one "
                      "(on_bad_image='raise' stops instead)", BadImageWarning, stacklevel=3)


def _split_folders(root: str) -> list[str]:
    """The split folders of ``root`` that hold class folders ([] for a plain ImageFolder tree, whose folders hold
    images; so a class that happens to be called "train" is not mistaken for a split)."""
    found = []
    for split in SPLITS:
        folder = os.path.join(root, split)
        if os.path.isdir(folder) and any(entry.is_dir() for entry in os.scandir(folder)):
            found.append(split)
    return found


class ImageFolderDataset(_FileImageDataset):
    """Classification on ``root/<class>/*.jpg`` (torchvision's ImageFolder layout; classes sorted by name).

    If ``root`` has ``train/``, ``val/``, ``test/`` folders of class folders, ``split`` picks one of them (None: all
    of them), with class indices over the union of their classes. Otherwise ``split`` takes a stratified random
    split (per class, ``val_fraction`` and ``test_fraction`` of the images, rounded, by ``seed``); None keeps all.
    ``extensions`` (e.g. ``("jpg", "png")``) defaults to torchvision's image extensions.
    """

    def __init__(self, root: PathLike, split: Optional[str] = None, *, image_size: int = 224, augment: bool = False,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                 extensions: Optional[Sequence[str]] = None, on_bad_image: str = "skip"):
        root = _require_dir(root)
        _check_split(split)
        _check_fractions(val_fraction, test_fraction)
        extensions = _extensions(extensions)
        split_dirs = _split_folders(root)
        if split_dirs:
            if split is not None and split not in split_dirs:
                raise ValueError(f"{root!r} is pre-split into {split_dirs}: it has no {split!r} folder")
            classes = sorted(set().union(*(_find_classes(os.path.join(root, s)) for s in split_dirs)))
            class_to_idx = {name: i for i, name in enumerate(classes)}
            samples = [sample for s in ([split] if split else split_dirs)
                       for sample in _list_images(os.path.join(root, s), class_to_idx, extensions)]
        else:
            classes = _find_classes(root)
            class_to_idx = {name: i for i, name in enumerate(classes)}
            samples = _list_images(root, class_to_idx, extensions)
            if not samples:
                raise ValueError(f"no image with extensions {extensions} under {root!r}")
            if split is not None:
                keep = _stratified([label for _, label in samples], split, val_fraction, test_fraction, seed)
                samples = [samples[i] for i in keep]
        what = f"split {split!r} of {root!r}" if split else repr(root)
        super().__init__([p for p, _ in samples], [label for _, label in samples], classes, image_size, augment,
                         f"{what} (extensions {extensions})", on_bad_image)
        self.root, self.split = root, split


class LandmarkDataset(_FileImageDataset):
    """Retrieval / place recognition: images grouped by landmark (or place) id, split by id.

    Images come from ``root/<id>/*`` or, with ``csv``, from a CSV file with a header and columns ``path`` (relative
    to ``root``, or absolute) and ``id``. Ids with fewer than ``min_images_per_id`` images are dropped (a query
    needs a positive). The remaining ids (sorted as strings) are shuffled by ``seed`` and split into disjoint train
    / val / test ids by ``val_fraction`` / ``test_fraction`` (rounded); ``split=None`` keeps every id. Labels are
    re-indexed 0..n_ids-1 within the split, in id order; ``ids[label]`` (also ``classes``) is the original id.
    """

    def __init__(self, root: PathLike, split: Optional[str] = None, *, csv: Optional[PathLike] = None,
                 image_size: int = 224, augment: bool = False, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 seed: int = 0, min_images_per_id: int = 2, on_bad_image: str = "skip"):
        root = _require_dir(root)
        _check_split(split)
        _check_fractions(val_fraction, test_fraction)
        if min_images_per_id < 1:
            raise ValueError(f"min_images_per_id must be >= 1, got {min_images_per_id}")
        pairs = _read_csv(csv, root) if csv is not None else _read_folders(root)
        groups: dict[str, list[str]] = {}
        for path, image_id in pairs:
            groups.setdefault(image_id, []).append(path)
        source = repr(os.fspath(csv)) if csv is not None else repr(root)
        ids = sorted(i for i, paths in groups.items() if len(paths) >= min_images_per_id)
        if not ids:
            raise ValueError(f"no id with at least {min_images_per_id} images in {source} "
                             f"({len(pairs)} images, {len(groups)} ids)")
        if split is not None:
            chosen = _partition(len(ids), val_fraction, test_fraction, np.random.default_rng(seed))[split]
            ids = [ids[j] for j in chosen]
        paths = [path for image_id in ids for path in groups[image_id]]
        labels = [label for label, image_id in enumerate(ids) for _ in groups[image_id]]
        super().__init__(paths, labels, ids, image_size, augment,
                         f"split {split!r} of {source} ({len(ids)} ids)" if split else source, on_bad_image)
        self.root, self.split, self.ids = root, split, list(ids)


def _read_folders(root: str) -> list[tuple[str, str]]:
    classes = _find_classes(root)
    images = _list_images(root, {name: i for i, name in enumerate(classes)}, _extensions(None))
    return [(path, classes[label]) for path, label in images]


def _read_csv(csv_path: PathLike, root: str) -> list[tuple[str, str]]:
    """``(path joined to root, id)`` rows of a CSV with ``path`` and ``id`` columns (others ignored)."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"csv {os.fspath(csv_path)!r} not found")
    with open(csv_path, newline="") as handle:
        reader = csv_module.DictReader(handle)
        missing = {"path", "id"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"csv {os.fspath(csv_path)!r} lacks column(s) {sorted(missing)} "
                             f"(header: {reader.fieldnames})")
        return [(os.path.join(root, row["path"].strip()), row["id"].strip()) for row in reader]
