"""Datasets read from local files (no download at run time), and the procedural Motifs dataset."""
from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, find_fashion_mnist, load_fashion_mnist, stratified_indices
from .decode import UnreadableImageError, open_rgb, to_rgb
from .folders import BadImageWarning, ImageFolderDataset, LandmarkDataset, image_transform
from .gsv_cities import GSV_CITIES_COLUMNS, GSVCitiesDataset, gsv_cities_transform
from .idx import read_idx
from .motifs import MOTIF_SHAPES, MotifDataset, motif_pairs

__all__ = ["FashionMNIST", "FASHION_MNIST_CLASSES", "find_fashion_mnist", "load_fashion_mnist", "read_idx",
           "stratified_indices", "ImageFolderDataset", "LandmarkDataset", "image_transform", "MotifDataset",
           "MOTIF_SHAPES", "motif_pairs", "BadImageWarning", "UnreadableImageError", "open_rgb", "to_rgb",
           "GSVCitiesDataset", "GSV_CITIES_COLUMNS", "gsv_cities_transform"]
