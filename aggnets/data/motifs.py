"""Motifs: a procedural image-classification dataset on which orderless pooling matters (no download, no files).

What an image holds
    An RGB image of ``image_size``² pixels: a random textured background with ``n`` small motifs drawn on top,
    ``n`` uniform in ``motifs_per_image`` (default 3..6). The six motif shapes (``MOTIF_SHAPES``) are a disk, a
    square, an equilateral triangle, a plus, a ring and a 2.7:1 bar, drawn as anti-aliased signed-distance shapes
    (1-pixel coverage ramp) with equal areas, 0.57 of the motif's nominal disk, so size does not tell them apart
    (the disk's radius is 0.757 of the nominal radius; triangle and bar tips reach 1.18 of it).

Class rule
    A class is an unordered pair of distinct shapes (``classes`` names such as ``"disk+ring"``): its images hold
    only motifs of those two shapes, each at least once, the rest drawn 50/50, in random order. The 15 pairs of six
    shapes are ordered as the rounds of a round-robin (a 1-factorisation: each round of 3 pairs uses every shape
    once) and ``num_classes`` (2..15, default 10) takes the first ones, so the first ``3k`` classes use each shape
    ``k`` times. Labels are ``index % num_classes``: balanced, fixed by the index alone.

Randomisation (independent of the class)
    Every motif has its own scale (nominal diameter as a fraction of the image side, uniform in ``scale``),
    rotation (uniform), position (centre uniform at least one nominal radius from the border, so motifs lie
    inside the image but for triangle and bar tips; up to 32 draws to keep centres 0.85 × (r_i + r_j) apart from
    earlier motifs) and vivid colour (random hue, saturation 0.7..1). The background is a low-saturation base
    colour plus three oriented sinusoidal gratings (1..6 cycles per image, random colours, amplitude about 0.05
    each) and smooth noise (a bilinearly upsampled 5×5 field, σ 0.04); it is dark (HSV value 0.1..0.35) with
    bright motifs (value 0.8..1) or light (0.65..0.9) with dark motifs (0.2..0.45), by a fair coin. Gaussian pixel
    noise of σ ``noise`` (default 0.02) is added last and the image is quantised to 8 bits. Position, layout,
    colours and counts carry no class information, nor do global colour statistics: only which local shapes occur
    does, which a bag-of-local-features (orderless) head captures.

Sizes, determinism, speed
    ``split`` is "train", "val" or "test" with 4000 / 1000 / 1000 images by default (``size`` overrides). Item
    ``i`` depends only on ``(seed, split, i)``: its generator is NumPy's ``default_rng`` seeded with the
    SeedSequence of ``(stream tag, seed, split code, i)``, so the three splits draw from disjoint streams, the same
    arguments give bit-identical tensors in every process (same machine and torch build), and the access order,
    DataLoader workers or DDP ranks change nothing. Rendering is vectorised with torch over the pixel grid (about
    0.7 ms per 64-pixel image on one core; no op at that size starts threads, so a loaded machine does not stall
    it); with ``cache=True`` each image is kept as uint8 after its first access, so later epochs only convert it.
    Each DataLoader worker fills its own copy of the cache: use ``persistent_workers=True``, or call
    ``materialize()`` before the workers start.
"""
from __future__ import annotations

import colorsys
import math
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

__all__ = ["MotifDataset", "MOTIF_SHAPES", "motif_pairs"]

MOTIF_SHAPES = ("disk", "square", "triangle", "plus", "ring", "bar")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 4000, "val": 1000, "test": 1000}
_STREAM_TAG = 0x6D6F7469  # "moti": keeps these seeds apart from other users of the same integers
_SQRT3_2 = math.sqrt(3.0) / 2.0


# Signed distances in motif units (the motif's bounding radius is 1; negative inside), on rotated local coordinates.
# Parameters give every shape the area 1.8 (the disk's radius is 0.757).

def _box(abs_u: Tensor, abs_v: Tensor, half_u: float, half_v: float) -> Tensor:
    qu, qv = abs_u - half_u, abs_v - half_v
    return torch.hypot(qu.clamp(min=0), qv.clamp(min=0)) + torch.maximum(qu, qv).clamp(max=0)


def _disk(u: Tensor, v: Tensor) -> Tensor:
    return torch.hypot(u, v) - 0.757


def _square(u: Tensor, v: Tensor) -> Tensor:
    return _box(u.abs(), v.abs(), 0.671, 0.671)


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    """Equilateral, inradius 0.589, apex up; the max of three half-planes (exact inside and along the edges)."""
    return torch.maximum(torch.maximum(v, -_SQRT3_2 * u - 0.5 * v), _SQRT3_2 * u - 0.5 * v) - 0.589


def _plus(u: Tensor, v: Tensor) -> Tensor:
    abs_u, abs_v = u.abs(), v.abs()
    return torch.minimum(_box(abs_u, abs_v, 0.95, 0.277), _box(abs_u, abs_v, 0.277, 0.95))


def _ring(u: Tensor, v: Tensor) -> Tensor:
    return (torch.hypot(u, v) - 0.827).abs() - 0.173


def _bar(u: Tensor, v: Tensor) -> Tensor:
    return _box(u.abs(), v.abs(), 1.1, 0.409)


_SDF: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "disk": _disk, "square": _square, "triangle": _triangle, "plus": _plus, "ring": _ring, "bar": _bar}


def motif_pairs(num_shapes: int = len(MOTIF_SHAPES)) -> list[tuple[int, int]]:
    """All unordered pairs of ``num_shapes`` (even) shapes, in round-robin order: each run of ``num_shapes // 2``
    consecutive pairs uses every shape once (the circle method)."""
    if num_shapes < 2 or num_shapes % 2:
        raise ValueError(f"num_shapes must be even and >= 2, got {num_shapes}")
    fixed, n = num_shapes - 1, num_shapes - 1
    pairs = []
    for r in range(n):
        pairs.append((r, fixed))
        pairs += [((r + k) % n, (r - k) % n) for k in range(1, num_shapes // 2)]
    return [tuple(sorted(p)) for p in pairs]


def _hsv(h: float, s: float, v: float) -> list[float]:
    return list(colorsys.hsv_to_rgb(h, s, v))


class _Scene(NamedTuple):
    """The random draws of one image (NumPy arrays), kept apart from drawing so that ``layout`` can report them."""
    base: np.ndarray  # (3,) background RGB
    grating: np.ndarray  # (3, 3): per grating, x and y frequency (radians per pixel) and phase
    amplitude: np.ndarray  # (3, 3): per grating, RGB amplitude
    smooth: np.ndarray  # (3, 5, 5) low-resolution noise field
    shape: np.ndarray  # (count,) indices into MOTIF_SHAPES, bottom to top
    centre: np.ndarray  # (count, 2) x, y in pixels
    radius: np.ndarray  # (count,) nominal radius in pixels
    angle: np.ndarray  # (count,) radians
    colour: np.ndarray  # (count, 3) RGB
    noise: Optional[np.ndarray]  # (3, S, S) standard normal, or None


class MotifDataset(Dataset):
    """Procedural motif images as ``(image (3, image_size, image_size) float32 in [0, 1], label)`` pairs; see the
    module docstring for the rule. ``targets`` (int64), ``classes`` and ``num_classes`` as for the file datasets;
    ``layout(i)`` lists the motifs of item ``i``; ``noise`` is the σ of the pixel noise (0: none)."""

    def __init__(self, split: str = "train", size: Optional[int] = None, *, image_size: int = 64,
                 num_classes: int = 10, seed: int = 0, motifs_per_image: tuple[int, int] = (3, 6),
                 scale: tuple[float, float] = (0.14, 0.26), cache: bool = True, noise: float = 0.02):
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
        pairs = motif_pairs(len(MOTIF_SHAPES))
        if not 2 <= num_classes <= len(pairs):
            raise ValueError(f"num_classes must be in [2, {len(pairs)}] (pairs of {len(MOTIF_SHAPES)} motif shapes), "
                             f"got {num_classes}")
        size = DEFAULT_SIZES[split] if size is None else int(size)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        lo, hi = motifs_per_image
        if not 2 <= lo <= hi:
            raise ValueError(f"motifs_per_image must be (lo, hi) with 2 <= lo <= hi (both shapes appear), "
                             f"got {motifs_per_image}")
        if not 0 < scale[0] <= scale[1] <= 0.5:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 0.5 (fractions of the side), got {scale}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.split, self.image_size, self.seed = split, int(image_size), int(seed)
        self.motifs_per_image, self.scale, self.noise, self.cache = (lo, hi), tuple(scale), float(noise), cache
        self.pairs = pairs[:num_classes]
        self.classes = [f"{MOTIF_SHAPES[a]}+{MOTIF_SHAPES[b]}" for a, b in self.pairs]
        self.targets = torch.arange(size, dtype=torch.int64) % num_classes
        coords = torch.arange(self.image_size, dtype=torch.float32) + 0.5  # pixel centres
        self._x, self._y = coords.view(1, 1, -1), coords.view(1, -1, 1)
        self._store: Optional[Tensor] = None  # (size, 3, S, S) uint8, allocated on first cached access
        self._filled: Optional[Tensor] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index = int(index) % n
        return self.image_uint8(index).float().div_(255.0), int(self.targets[index])

    def image_uint8(self, index: int) -> Tensor:
        """Item ``index`` as a (3, S, S) uint8 tensor, rendered or from the cache (a view: do not modify it)."""
        if not self.cache:
            return self._render(index)
        if self._store is None:
            size = self.image_size
            self._store = torch.empty((len(self), 3, size, size), dtype=torch.uint8)
            self._filled = torch.zeros(len(self), dtype=torch.bool)
        if not self._filled[index]:
            self._store[index] = self._render(index)
            self._filled[index] = True
        return self._store[index]

    def materialize(self) -> "MotifDataset":
        """Render every image into the cache now (e.g. before DataLoader workers fork); returns ``self``."""
        if not self.cache:
            raise ValueError("materialize() needs cache=True")
        for index in range(len(self)):
            self.image_uint8(index)
        return self

    def layout(self, index: int) -> list[dict]:
        """The motifs of item ``index``, bottom to top: ``shape`` (name), centre ``x``, ``y`` and nominal ``radius``
        in pixels, ``angle`` (radians) and ``colour`` (RGB in [0, 1])."""
        scene = self._sample(index)
        return [{"shape": MOTIF_SHAPES[k], "x": float(x), "y": float(y), "radius": float(r), "angle": float(a),
                 "colour": tuple(float(c) for c in rgb)}
                for k, (x, y), r, a, rgb in zip(scene.shape, scene.centre, scene.radius, scene.angle, scene.colour)]

    def _sample(self, index: int) -> _Scene:
        """Every random draw of item ``index``, from its own generator."""
        rng = np.random.default_rng([_STREAM_TAG, self.seed, SPLIT_CODES[self.split], index])
        size = self.image_size
        dark = rng.random() < 0.5
        base = _hsv(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.1, 0.35) if dark else rng.uniform(0.65, 0.9))
        frequency = rng.uniform(1.0, 6.0, size=3) * 2 * math.pi / size  # radians per pixel
        orientation = rng.uniform(0, math.pi, size=3)
        grating = np.stack([frequency * np.cos(orientation), frequency * np.sin(orientation),
                            rng.uniform(0, 2 * math.pi, size=3)], 1)
        amplitude = rng.normal(0.0, 0.05, size=(3, 3))
        smooth = rng.normal(0.0, 0.04, size=(3, 5, 5))

        count = int(rng.integers(self.motifs_per_image[0], self.motifs_per_image[1] + 1))
        first = np.concatenate([[True, False], rng.random(count - 2) < 0.5])  # both shapes at least once
        rng.shuffle(first)
        shape_a, shape_b = self.pairs[int(self.targets[index])]
        radius = rng.uniform(*self.scale, size=count) * size / 2
        angle = rng.uniform(0, 2 * math.pi, size=count)
        centre = self._place(rng, radius)
        value = (0.8, 1.0) if dark else (0.2, 0.45)
        colour = np.array([_hsv(rng.random(), rng.uniform(0.7, 1.0), rng.uniform(*value)) for _ in range(count)])
        noise = rng.standard_normal((3, size, size), dtype=np.float32) if self.noise > 0 else None
        return _Scene(np.array(base), grating, amplitude, smooth, np.where(first, shape_a, shape_b), centre, radius,
                      angle, colour, noise)

    def _render(self, index: int) -> Tensor:
        """Item ``index`` drawn on the pixel grid, (3, S, S) uint8."""
        scene = self._sample(index)
        image = self._background(scene)
        count = len(scene.shape)
        params = torch.tensor(np.stack([scene.centre[:, 0], scene.centre[:, 1], scene.radius, np.cos(scene.angle),
                                        np.sin(scene.angle)], 1), dtype=torch.float32).view(count, 5, 1, 1)
        cx, cy, r, cos, sin = params.unbind(1)
        dx, dy = self._x - cx, self._y - cy  # (count, 1, S), (count, S, 1)
        u, v = (dx * cos + dy * sin) / r, (dy * cos - dx * sin) / r  # local motif coordinates, nominal radius 1
        shapes = torch.from_numpy(scene.shape).view(count, 1, 1)
        distance = None
        for k in np.unique(scene.shape):
            d = _SDF[MOTIF_SHAPES[k]](u, v)
            distance = d if distance is None else torch.where(shapes == int(k), d, distance)
        alpha = (0.5 - distance * r).clamp_(0.0, 1.0)  # coverage of each pixel, 1-pixel anti-aliasing ramp
        colours = torch.tensor(scene.colour, dtype=torch.float32).view(count, 3, 1, 1)
        for colour, coverage in zip(colours, alpha):  # "over" compositing, later motifs on top
            image = torch.lerp(image, colour, coverage)
        if scene.noise is not None:
            image = image + self.noise * torch.from_numpy(scene.noise)
        return image.clamp_(0.0, 1.0).mul_(255.0).add_(0.5).to(torch.uint8)  # rounds: the cast truncates

    def _background(self, scene: _Scene) -> Tensor:
        """Base colour + three oriented sinusoidal gratings with random colours + smooth noise, (3, S, S)."""
        # sin(fx x + fy y + phase) = sin(fx x) cos(fy y + phase) + cos(fx x) sin(fy y + phase): NumPy for the 1-D
        # sines and cosines, torch for the grid (torch's sin goes through MKL's vector math, which starts threads).
        coords = self._x.view(1, -1).double().numpy()  # (1, S)
        along_x, along_y = scene.grating[:, :1] * coords, scene.grating[:, 1:2] * coords + scene.grating[:, 2:]
        sin_x, cos_x, sin_y, cos_y = (torch.tensor(f(a), dtype=torch.float32)
                                      for a in (along_x, along_y) for f in (np.sin, np.cos))
        size = self.image_size
        waves = sin_x.view(3, 1, size) * cos_y.view(3, size, 1) + cos_x.view(3, 1, size) * sin_y.view(3, size, 1)
        smooth = torch.tensor(scene.smooth, dtype=torch.float32).unsqueeze(0)
        image = F.interpolate(smooth, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)[0]
        image = image + torch.tensor(scene.base, dtype=torch.float32).view(3, 1, 1)
        for amplitude, wave in zip(torch.tensor(scene.amplitude, dtype=torch.float32).view(3, 3, 1, 1), waves):
            image = torch.addcmul(image, amplitude, wave)  # amplitude: the grating's RGB colour
        return image

    def _place(self, rng: np.random.Generator, radius: np.ndarray) -> np.ndarray:
        """Centres (count, 2) in pixels, at least a nominal radius from the border; up to 32 draws per motif to keep
        centres at least 0.85 * (r_i + r_j) apart, the last draw kept when none fits."""
        size, tries = self.image_size, 32
        centres = np.zeros((len(radius), 2))
        for m, r in enumerate(radius):
            candidates = rng.uniform(r, size - r, size=(tries, 2))
            if m:
                gap = np.linalg.norm(candidates[:, None] - centres[None, :m], axis=-1) - 0.85 * (r + radius[:m])
                fits = np.flatnonzero((gap >= 0).all(1))
                candidates = candidates[fits[:1]] if len(fits) else candidates[-1:]
            centres[m] = candidates[0]
        return centres

    def __repr__(self) -> str:
        return (f"MotifDataset(split={self.split!r}, size={len(self)}, image_size={self.image_size}, "
                f"num_classes={self.num_classes}, seed={self.seed})")
