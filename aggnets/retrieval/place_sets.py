"""Place-recognition evaluation sets in the field's two layouts, and recall@N against their ground truth.

Folder layout (gmberton/VPR-datasets-downloader; CosPlace, EigenPlaces, the deep-visual-geo-localization
benchmark): ``<folder>/database/**/*.jpg`` and ``<folder>/queries/**/*.jpg``, each name ``@utm_east@utm_north@...``;
the positives of a query are the database images within ``threshold`` metres (25 m).

Index layout (gsv-cities, MixVPR, SALAD, BoQ): ``<prefix>_dbImages.npy`` and ``<prefix>_qImages.npy`` (image paths
relative to the images' root) and ``<prefix>_<gt>.npy``, per query the array of its positive database indices
(``gt``: ``gt``, or ``pIdx`` for MSLS-val, whose queries are ``qImages[qIdx]`` with ``query_index="qIdx"``;
BoQ's copies name it ``gt_25m``).

recall@N as the authors compute it: a query is found at N when one of its N nearest database images is one of its
positives; every query counts (one without positives is never found)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .ground_truth import positions_from_filenames

__all__ = ["PlaceSet", "folder_place_set", "index_place_set", "recall_at_n_positives", "radius_positives"]

PathLike = Union[str, os.PathLike]
_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class PlaceSet:
    """One evaluation set: image paths (absolute) of the database and the queries, and each query's positive
    database indices (``positives[q]``, int64 arrays)."""
    name: str
    database: list[str]
    queries: list[str]
    positives: list[np.ndarray]

    def __post_init__(self) -> None:
        if len(self.positives) != len(self.queries):
            raise ValueError(f"{self.name}: {len(self.positives)} ground-truth rows for {len(self.queries)} queries")
        for q, row in enumerate(self.positives):
            if row.size and (row.min() < 0 or row.max() >= len(self.database)):
                raise ValueError(f"{self.name}: query {q}'s positives {row.tolist()[:5]} fall outside the "
                                 f"{len(self.database)} database images")

    def __repr__(self) -> str:
        return (f"PlaceSet({self.name!r}: {len(self.database)} database images, {len(self.queries)} queries, "
                f"{sum(1 for p in self.positives if p.size == 0)} without positives)")


def _images_below(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in _EXTENSIONS and p.is_file())


def radius_positives(query_positions: np.ndarray, db_positions: np.ndarray, threshold: float,
                     chunk_pairs: int = 1 << 22) -> list[np.ndarray]:
    """Per query, the sorted indices of the database positions within ``threshold`` (Euclidean, metres; the rule of
    the benchmarks' ``NearestNeighbors.radius_neighbors``), computed in chunks of about ``chunk_pairs`` distances."""
    if not threshold > 0:
        raise ValueError(f"threshold must be a positive distance in metres, got {threshold!r}")
    queries = np.asarray(query_positions, dtype=np.float64)
    database = np.asarray(db_positions, dtype=np.float64)
    step = max(1, int(chunk_pairs) // max(1, len(database)))
    limit = float(threshold) ** 2
    found: list[np.ndarray] = []
    for start in range(0, len(queries), step):
        diff = queries[start:start + step, None, :] - database[None, :, :]
        squared = np.einsum("qdc,qdc->qd", diff, diff)
        found += [np.flatnonzero(row <= limit).astype(np.int64) for row in squared]
    return found


def folder_place_set(folder: PathLike, name: Optional[str] = None, *, threshold: float = 25.0,
                     database: str = "database", queries: str = "queries") -> PlaceSet:
    """A folder-layout set: every image below ``folder/database`` and ``folder/queries`` (sorted paths), positions
    from the ``@utm_east@utm_north@`` names, positives within ``threshold`` metres."""
    folder = Path(folder)
    name = name or folder.name
    lists = []
    for part in (database, queries):
        sub = folder / part
        if not sub.is_dir():
            raise FileNotFoundError(f"{name}: {str(sub)!r} not found: a folder-layout set holds {database}/ and "
                                    f"{queries}/ with '@utm_east@utm_north@...' image names")
        images = _images_below(sub)
        if not images:
            raise FileNotFoundError(f"{name}: no image ({', '.join(_EXTENSIONS)}) below {str(sub)!r}")
        lists.append(images)
    db_positions = positions_from_filenames(lists[0])
    q_positions = positions_from_filenames(lists[1])
    return PlaceSet(name, lists[0], lists[1], radius_positives(q_positions, db_positions, threshold))


def _load_npy(path: Path, name: str, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {what} {str(path)!r} not found")
    try:
        return np.load(path, allow_pickle=True)  # the ground truth is a pickled object array of index arrays
    except (ValueError, OSError) as error:
        raise ValueError(f"{name}: cannot read {str(path)!r} as a NumPy array ({error})") from None


def _ground_truth(raw: np.ndarray, path: Path, name: str) -> list[np.ndarray]:
    rows = list(raw) if raw.dtype == object or raw.ndim == 2 else None
    if rows is None:
        raise ValueError(f"{name}: {str(path)!r} must hold one array of database indices per query (an object "
                         f"array or a 2-D int array), found {raw.dtype} {raw.shape}")
    out = []
    for q, row in enumerate(rows):
        row = np.asarray(row).reshape(-1)
        if row.size and not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"{name}: {str(path)!r} row {q} holds {row.dtype}, not database indices")
        out.append(row.astype(np.int64))
    return out


def index_place_set(images_root: PathLike, index_dir: PathLike, prefix: str, name: Optional[str] = None, *,
                    gt: str = "gt", query_index: Optional[str] = None, check_files: bool = True) -> PlaceSet:
    """An index-layout set: ``index_dir/<prefix>_dbImages.npy``, ``_qImages.npy`` and ``_<gt>.npy`` (and with
    ``query_index``, ``_<query_index>.npy`` choosing the queries, MSLS-val's ``qIdx``); the image paths in them are
    joined to ``images_root``. ``check_files``: every image must exist (the first missing one is named)."""
    images_root, index_dir = Path(images_root), Path(index_dir)
    name = name or prefix
    files = {part: index_dir / f"{prefix}_{part}.npy" for part in ("dbImages", "qImages", gt)}
    database = [str(p) for p in _load_npy(files["dbImages"], name, "database list")]
    queries = [str(p) for p in _load_npy(files["qImages"], name, "query list")]
    if query_index:
        chosen = _load_npy(index_dir / f"{prefix}_{query_index}.npy", name, "query index")
        queries = [queries[int(i)] for i in chosen]
    positives = _ground_truth(_load_npy(files[gt], name, "ground truth"), files[gt], name)
    database = [str(images_root / p) for p in database]
    queries = [str(images_root / p) for p in queries]
    if check_files:
        missing = next((p for p in database + queries if not os.path.isfile(p)), None)
        if missing is not None:
            count = sum(not os.path.isfile(p) for p in database + queries)
            raise FileNotFoundError(f"{name}: {count} images listed in {str(index_dir)!r} are missing under "
                                    f"{str(images_root)!r}, e.g. {missing!r}")
    return PlaceSet(name, database, queries, positives)


def recall_at_n_positives(ranks: Any, positives: Sequence[np.ndarray], ns: Sequence[int] = (1, 5, 10),
                          percent: bool = True) -> dict[str, float]:
    """recall@N: the share of queries with a positive among their first N database indices (``ranks`` (Q, >= max N),
    best first). Every query counts. ``{"R@1": .., "R@5": .., ..., "queries": Q, "without_positives": ..}``."""
    ranks = np.asarray(ranks)
    ns = tuple(int(n) for n in ns)
    if ranks.ndim != 2 or ranks.shape[0] != len(positives):
        raise ValueError(f"ranks must be (queries, k) with {len(positives)} rows, got {ranks.shape}")
    if not ns or min(ns) < 1 or max(ns) > ranks.shape[1]:
        raise ValueError(f"ns={ns} must be positive and at most the ranking's {ranks.shape[1]} columns")
    first = np.full(len(positives), np.iinfo(np.int64).max)
    for q, row in enumerate(positives):
        hits = np.flatnonzero(np.isin(ranks[q, :max(ns)], row))
        if hits.size:
            first[q] = hits[0]
    scale = 100.0 if percent else 1.0
    out = {f"R@{n}": float((first < n).mean() * scale) for n in ns}
    out["queries"] = len(positives)
    out["without_positives"] = int(sum(1 for row in positives if np.asarray(row).size == 0))
    return out
