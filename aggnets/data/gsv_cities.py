"""GSV-Cities (Ali-bey et al., "GSV-Cities: toward appropriate supervised visual place recognition",
Neurocomputing 2022), the training set of MixVPR, BoQ and SALAD, read from its released layout:

    <root>/Dataframes/<City>.csv     columns place_id, year, month, northdeg, city_id, lat, lon, panoid
    <root>/Images/<city_id>/<city_id>_<place_id:07d>_<year:04d>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg

One item per image, labelled by its place; place ids are unique across cities (label = index of (city, place_id)).
Batches of P places x K images come from the training sampler (``aggnets_train``: ``data.samples_per_class``).
"""
from __future__ import annotations

import csv
import os
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from .decode import open_rgb
from .folders import PathLike, _FileImageDataset, _require_dir

__all__ = ["GSVCitiesDataset", "gsv_cities_transform", "GSV_CITIES_COLUMNS"]

GSV_CITIES_COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")
_AUGMENTS = (False, True, "randaugment")


def gsv_cities_transform(image_size: Union[int, Sequence[int]], augment: Union[bool, str] = False,
                         magnitude: int = 9):
    """The GSV-Cities recipes' transform: the image resized to ``image_size`` (an int: square; or (h, w)) without
    keeping its aspect ratio (bilinear, as the authors), then with ``augment="randaugment"`` torchvision's
    ``RandAugment(num_ops=3, magnitude)`` (9 in gsv-cities / MixVPR / SALAD, 15 in BoQ); ``augment=True`` a
    horizontal flip instead. (3, h, w) float32 in [0, 1]; backbones normalise the input themselves."""
    from torchvision.transforms import v2
    size = [int(image_size)] * 2 if isinstance(image_size, int) else [int(s) for s in image_size]
    steps = [v2.ToImage(), v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)]
    if augment == "randaugment":
        steps.append(v2.RandAugment(num_ops=3, magnitude=int(magnitude),
                                    interpolation=v2.InterpolationMode.BILINEAR))
    elif augment is True:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])


class GSVCitiesDataset(_FileImageDataset):
    """The GSV-Cities images of ``cities`` (CSV stems under ``Dataframes/``; None = every CSV there, sorted), of
    the places with at least ``min_images_per_place`` images (4, as the authors).

    ``targets`` are place labels 0..P-1 over the chosen cities (``places[label]`` = (city, place_id)), so a place id
    that recurs in two cities is two places. ``image_size`` (int or (h, w); 320 for the ResNet recipes, 224 for the
    DINOv2 ones) and ``augment`` (False; True: flips; ``"randaugment"``: the papers' RandAugment with
    ``randaugment_magnitude``): :func:`gsv_cities_transform`.

    Errors name the file: a missing ``Dataframes`` folder or city CSV (with the cities found), a CSV without the
    columns, a malformed row (line number), a listed image missing from disk (checked when built, with
    ``check_files``). An image that exists but cannot be decoded is skipped and counted (``on_bad_image``, as the
    folder datasets).
    """

    def __init__(self, root: PathLike, cities: Optional[Sequence[str]] = None, *, min_images_per_place: int = 4,
                 image_size: Union[int, Sequence[int]] = 320, augment: Union[bool, str] = False,
                 randaugment_magnitude: int = 9, on_bad_image: str = "skip", check_files: bool = True) -> None:
        root = _require_dir(root)
        if augment not in _AUGMENTS:
            raise ValueError(f"GSVCitiesDataset: augment must be one of {_AUGMENTS}, got {augment!r}")
        if int(min_images_per_place) < 1:
            raise ValueError(f"GSVCitiesDataset: min_images_per_place must be >= 1, got {min_images_per_place}")
        frames = os.path.join(root, "Dataframes")
        if not os.path.isdir(frames):
            raise FileNotFoundError(f"GSVCitiesDataset: {frames!r} not found: root must hold Dataframes/<City>.csv "
                                    "and Images/<City>/ (the GSV-Cities layout)")
        available = sorted(name[:-4] for name in os.listdir(frames) if name.endswith(".csv"))
        chosen = available if cities is None else [str(c) for c in cities]
        unknown = [c for c in chosen if c not in available]
        if unknown or not chosen:
            raise FileNotFoundError(f"GSVCitiesDataset: no Dataframes/<City>.csv for {unknown or 'any city'} in "
                                    f"{frames!r}; cities found: {available}")
        places: dict[tuple[str, int], list[str]] = {}
        for city in chosen:
            for place_id, path in _read_city(root, city):
                places.setdefault((city, place_id), []).append(path)
        keys = [key for key, paths in places.items() if len(paths) >= int(min_images_per_place)]
        if not keys:
            raise ValueError(f"GSVCitiesDataset: no place with at least {min_images_per_place} images in cities "
                             f"{chosen} of {root!r}")
        paths = [path for key in keys for path in places[key]]
        labels = [label for label, key in enumerate(keys) for _ in places[key]]
        if check_files:
            missing = [path for path in paths if not os.path.isfile(path)]
            if missing:
                raise FileNotFoundError(f"GSVCitiesDataset: {len(missing)} images listed in Dataframes/ are missing "
                                        f"from disk, e.g. {missing[0]!r}")
        size = max(image_size) if not isinstance(image_size, int) else image_size
        super().__init__(paths, labels, [f"{city}/{place_id}" for city, place_id in keys], size, bool(augment),
                         f"GSV-Cities {chosen} in {root!r}", on_bad_image)
        self.transform = gsv_cities_transform(image_size, augment, randaugment_magnitude)
        self.root, self.cities, self.places = root, chosen, keys

    def _load(self, index: int) -> Image.Image:
        return open_rgb(self.paths[index])  # whole: the resize does not keep the aspect ratio


def _read_city(root: str, city: str) -> list[tuple[int, str]]:
    """``(place_id, image path)`` of each row of ``Dataframes/<city>.csv``; errors name the file and line."""
    path = os.path.join(root, "Dataframes", f"{city}.csv")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [c for c in GSV_CITIES_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"GSVCitiesDataset: {path!r} lacks the column(s) {missing} (header: {header}; "
                             f"expected {list(GSV_CITIES_COLUMNS)})")
        rows = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            try:
                place_id, year, month, north = (int(row[c]) for c in ("place_id", "year", "month", "northdeg"))
                lat, lon = float(row["lat"]), float(row["lon"])
            except ValueError:
                raise ValueError(f"GSVCitiesDataset: {path!r} line {line}: place_id / year / month / northdeg must "
                                 f"be integers and lat / lon numbers, got {row}") from None
            city_id, panoid = row["city_id"], row["panoid"]
            if not city_id or not panoid:
                raise ValueError(f"GSVCitiesDataset: {path!r} line {line}: empty city_id or panoid: {row}")
            # lat / lon as Python prints the float (the authors' str() of pandas' float64)
            name = f"{city_id}_{place_id:07d}_{year:04d}_{month:02d}_{north:03d}_{lat}_{lon}_{panoid}.jpg"
            rows.append((place_id, os.path.join(root, "Images", city_id, name)))
    return rows
