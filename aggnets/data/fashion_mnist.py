"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from local IDX files: Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``), torchvision's raw layout (``<root>/FashionMNIST/raw``, what
``torchvision.datasets.FashionMNIST(download=True)`` writes), or any folder holding the four files."""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from .idx import read_idx

__all__ = ["FashionMNIST", "find_fashion_mnist", "load_fashion_mnist", "stratified_indices", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _candidate_dirs(root: Optional[str]) -> list[str]:
    dirs = []
    if root:
        dirs += [root, os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "raw")]
    env = os.environ.get("FASHION_MNIST_DIR")
    if env:
        dirs.append(env)
    dirs += [DEBIAN_DIR, os.path.expanduser("~/.cache/aggnets/FashionMNIST/raw")]
    return dirs


def find_fashion_mnist(root: Optional[str] = None) -> dict[str, tuple[str, str]]:
    """Paths of the (images, labels) files per split, searching ``root`` (and its torchvision ``FashionMNIST/raw``
    subfolder), ``$FASHION_MNIST_DIR``, then Debian's folder. ``.gz`` or uncompressed."""
    for folder in _candidate_dirs(root):
        found = {}
        for split, names in _FILES.items():
            paths = []
            for name in names:
                hits = [p for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz")) if os.path.isfile(p)]
                paths.append(hits[0] if hits else None)
            if all(paths):
                found[split] = tuple(paths)
        if len(found) == 2:
            return found
    raise FileNotFoundError(
        "Fashion-MNIST not found (looked in: " + ", ".join(_candidate_dirs(root)) + "). Install Debian's "
        "'dataset-fashion-mnist' package, set FASHION_MNIST_DIR, or download it with "
        "torchvision.datasets.FashionMNIST(root, download=True) and pass that root.")


def load_fashion_mnist(split: str = "train", root: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of ``split`` in {"train", "test"}."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_path, label_path = find_fashion_mnist(root)[split]
    images, labels = read_idx(image_path), read_idx(label_path).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels


class FashionMNIST(Dataset):
    """Fashion-MNIST as ``(image (channels, size, size) float in [0, 1], label)`` pairs.

    ``split``: "train", "test", or "val" — ``val_size`` images held out of the 60k training images (stratified,
    fixed by ``val_seed``), which "train" then excludes; with ``val_size=0`` (default) "train" is all 60k.
    ``image_size`` resizes (bilinear, antialiased) so that a CNN's deeper layers still have a spatial map;
    ``channels=3`` repeats the grey channel for RGB backbones; ``indices`` selects a subset (e.g. a stratified
    sample); ``transform`` is applied to the float tensor last.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", root: Optional[str] = None, *, image_size: int = 28, channels: int = 3,
                 indices: Optional[Sequence[int]] = None, transform: Optional[Callable[[Tensor], Tensor]] = None,
                 val_size: int = 0, val_seed: int = 0):
        if split == "val" and val_size <= 0:
            raise ValueError("FashionMNIST: split='val' needs val_size > 0 (images held out of the training set)")
        images, labels = load_fashion_mnist("test" if split == "test" else "train", root)
        if split != "test" and val_size > 0:
            held_out = stratified_indices(labels, per_class=-(-val_size // 10), seed=val_seed)[:val_size]
            keep = held_out if split == "val" else np.setdiff1d(np.arange(len(labels)), held_out)
            images, labels = images[keep], labels[keep]
        if indices is not None:
            indices = np.asarray(indices, dtype=np.int64)
            images, labels = images[indices], labels[indices]
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.targets = torch.from_numpy(labels)
        self.image_size = int(image_size)
        self.channels = channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index].float().div_(255.0)[None, None]
        if self.image_size != image.shape[-1]:
            image = F.interpolate(image, size=(self.image_size, self.image_size), mode="bilinear",
                                  align_corners=False, antialias=True).clamp_(0.0, 1.0)
        image = image[0].expand(self.channels, -1, -1).contiguous()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def stratified_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """``per_class`` random indices of each label (sorted), for balanced subsets."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=min(per_class, int((labels == c).sum())), replace=False)
              for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))
