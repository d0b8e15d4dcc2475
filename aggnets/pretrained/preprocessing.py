"""How a published model expects its images: the size it was evaluated at and the input normalisation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["Preprocessing", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """``size`` (h, w): every image resized to exactly that size (the place-recognition papers); or ``max_size``: the
    longer side (cnnimageretrieval); neither: full resolution (CosPlace, NetVLAD). ``resample``: ``"bilinear"`` or
    ``"bicubic"``. ``mean`` / ``std``: the input normalisation of the weights, which an aggnets backbone applies
    itself (``normalize_images``), so images go in as [0, 1] RGB. The arguments of
    :func:`aggnets.retrieval.extract_descriptors` are :meth:`extraction_kwargs`."""
    size: Optional[tuple[int, int]] = None
    max_size: Optional[int] = None
    resample: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def extraction_kwargs(self) -> dict[str, Any]:
        """``size`` / ``max_size`` / ``resample`` for :func:`aggnets.retrieval.extract_descriptors`."""
        return {"size": self.size, "max_size": self.max_size, "resample": self.resample}

    def transform(self):
        """A torchvision transform: PIL image (or uint8 tensor) -> (3, h, w) float32 in [0, 1] at the model's size."""
        from torchvision.transforms import v2
        interpolation = v2.InterpolationMode.BICUBIC if self.resample == "bicubic" else v2.InterpolationMode.BILINEAR
        steps: list = [v2.ToImage()]
        if self.size is not None:
            steps.append(v2.Resize(list(self.size), interpolation=interpolation, antialias=True))
        elif self.max_size is not None:
            steps.append(v2.Resize(None, max_size=int(self.max_size), interpolation=interpolation, antialias=True))
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])
