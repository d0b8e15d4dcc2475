"""Datasets read from local files (no download at run time)."""
from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, find_fashion_mnist, load_fashion_mnist, stratified_indices
from .idx import read_idx

__all__ = ["FashionMNIST", "FASHION_MNIST_CLASSES", "find_fashion_mnist", "load_fashion_mnist", "read_idx",
           "stratified_indices"]
