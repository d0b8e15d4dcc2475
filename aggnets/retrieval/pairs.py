"""Retrieval on your own images: a folder of images plus a CSV of matching (query, positive) pairs.

Format::

    my_set/
        pairs.csv            # header "query,positive", one row per matching pair
        a/img1.jpg
        a/img2.jpg
        other.png            # images named in no pair are distractors
        ...

Paths in the CSV are relative to the root (default: the CSV's folder). A query may have many rows (one per
positive); a pair is *not* made symmetric: write both directions when both images should be queries. The database
is every image file under the root (recursive; ``.jpg .jpeg .png .bmp .tif .tiff .webp``, any case), or the list
given as ``database``. Every query is also a database image and is excluded from its own ranking.

>>> gt = load_pairs_csv("my_set/pairs.csv")
>>> descriptors = extract_descriptors(model, [gt.path(i) for i in range(len(gt.names))])
>>> scores = descriptors[gt.queries] @ descriptors.T
>>> evaluate_pairs(scores, gt)       # {"mAP": .., "R@1": .., "R@5": .., "R@10": .., "queries": Q, "db": N}
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, Optional, Sequence

import numpy as np

from ..utils import check_ks as _check_ks
from .evaluation import average_precision
from .search import ArrayLike, _to_numpy, as_ranking, resolve_kind

__all__ = ["IMAGE_EXTENSIONS", "PairsGroundTruth", "scan_images", "load_pairs_csv", "evaluate_pairs", "pairs_per_query",
           "chance_level"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_SHOWN = 5  # missing files named in an error message


@dataclass
class PairsGroundTruth:
    """Ground truth of a pairs set.

    ``root``: folder the names are relative to; ``names``: database images (N, sorted, POSIX-style relative
    paths); ``queries``: (Q,) indices into ``names``; ``positives``: one int64 array of indices into ``names`` per
    query (never the query itself).
    """
    root: str
    names: list[str]
    queries: np.ndarray
    positives: list[np.ndarray] = field(default_factory=list)

    @property
    def num_queries(self) -> int:
        return int(len(self.queries))

    @property
    def num_db(self) -> int:
        return len(self.names)

    def path(self, index: int) -> str:
        """The file path of database image ``index``."""
        return os.path.join(self.root, *PurePosixPath(self.names[index]).parts)

    @property
    def paths(self) -> list[str]:
        """File paths of all database images, in ``names`` order."""
        return [self.path(i) for i in range(len(self.names))]


def _normalise_name(name: str) -> str:
    """A CSV path as a POSIX relative path (``./a\\b.jpg`` -> ``a/b.jpg``)."""
    name = name.strip().replace("\\", "/")
    return str(PurePosixPath(*[part for part in PurePosixPath(name).parts if part not in (".", "")]))


def scan_images(root: str | os.PathLike) -> list[str]:
    """Sorted POSIX paths, relative to ``root``, of every image file below it (:data:`IMAGE_EXTENSIONS`)."""
    root = Path(root)
    names = []
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            if filename.lower().endswith(IMAGE_EXTENSIONS):
                names.append(Path(dirpath, filename).relative_to(root).as_posix())
    return sorted(names)


def load_pairs_csv(csv_path: str | os.PathLike, root: str | os.PathLike | None = None,
                   database: Optional[Sequence[str]] = None) -> PairsGroundTruth:
    """Read a ``query,positive`` CSV (module docstring) into a :class:`PairsGroundTruth`.

    Queries are ordered by first appearance in the CSV; each query's positives are sorted and deduplicated.

    Raises:
        FileNotFoundError: the CSV or the root does not exist; images named in the CSV (or in ``database``) are
            missing from disk (the first few are listed).
        ValueError: the header lacks ``query`` / ``positive``; a row with an empty field; a query paired with
            itself; a query with no positive; no pairs at all; a CSV image outside the database; an empty database.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"pairs CSV not found: {csv_path}")
    root_path = Path(root) if root is not None else csv_path.parent
    if not root_path.is_dir():
        raise FileNotFoundError(f"image root folder not found: {root_path}")

    pairs: dict[str, list[str]] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [col for col in ("query", "positive") if col not in header]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing} in the header; expected 'query,positive', "
                             f"found {header}")
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            query, positive = (row.get("query") or "").strip(), (row.get("positive") or "").strip()
            if not query and not positive:
                continue  # blank line
            if not query:
                raise ValueError(f"{csv_path}:{line}: empty query for positive {positive!r}")
            query = _normalise_name(query)
            positives = pairs.setdefault(query, [])
            if not positive:
                continue  # a query listed without positive: reported below
            positive = _normalise_name(positive)
            if positive == query:
                raise ValueError(f"{csv_path}:{line}: query {query!r} is paired with itself (a query is excluded "
                                 f"from its own ranking, so it cannot be its own positive)")
            positives.append(positive)
    if not pairs:
        raise ValueError(f"{csv_path}: no query (the CSV has a header but no pairs)")
    lonely = [q for q, p in pairs.items() if not p]
    if lonely:
        raise ValueError(f"{csv_path}: {len(lonely)} query(ies) with no positive, e.g. {lonely[:_SHOWN]}")

    named = list(dict.fromkeys([q for q in pairs] + [p for ps in pairs.values() for p in ps]))
    absent = [name for name in named if not (root_path / name).is_file()]
    if absent:
        raise FileNotFoundError(f"{csv_path}: {len(absent)} image(s) named in the CSV are missing under "
                                f"{root_path}: {absent[:_SHOWN]}{' ...' if len(absent) > _SHOWN else ''}")
    if database is None:
        names = scan_images(root_path)
    else:
        names = sorted(dict.fromkeys(_normalise_name(str(name)) for name in database))
        absent = [name for name in names if not (root_path / name).is_file()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} database image(s) missing under {root_path}: "
                                    f"{absent[:_SHOWN]}{' ...' if len(absent) > _SHOWN else ''}")
    if not names:
        raise ValueError(f"empty database: no image file under {root_path}")
    index = {name: i for i, name in enumerate(names)}
    outside = [name for name in named if name not in index]
    if outside:
        raise ValueError(f"{csv_path}: {len(outside)} image(s) of the CSV are not in the database (not image "
                         f"files, or left out of `database`): {outside[:_SHOWN]}")
    queries = np.array([index[q] for q in pairs], dtype=np.int64)
    positives = [np.unique(np.array([index[p] for p in ps], dtype=np.int64)) for ps in pairs.values()]
    return PairsGroundTruth(root=str(root_path), names=names, queries=queries, positives=positives)


def _check_gt(gt: PairsGroundTruth) -> None:
    queries = np.asarray(gt.queries)
    if queries.ndim != 1 or queries.size == 0:
        raise ValueError(f"ground truth: queries must be a non-empty 1-D index array, got shape {queries.shape}")
    if len(gt.positives) != queries.size:
        raise ValueError(f"ground truth: {queries.size} queries but {len(gt.positives)} positive lists")
    n = gt.num_db
    if queries.min() < 0 or queries.max() >= n:
        raise ValueError(f"ground truth: query indices must lie in [0, {n}), got [{queries.min()}, {queries.max()}]")
    for i, (q, pos) in enumerate(zip(queries, gt.positives)):
        pos = np.asarray(pos)
        if pos.size == 0:
            raise ValueError(f"ground truth: query {i} ({gt.names[q]}) has no positive")
        if pos.min() < 0 or pos.max() >= n:
            raise ValueError(f"ground truth: positives of query {i} must lie in [0, {n})")
        if (pos == q).any():
            raise ValueError(f"ground truth: query {i} ({gt.names[q]}) lists itself as a positive")


def pairs_per_query(scores_or_ranks: ArrayLike, gt: PairsGroundTruth, ks: Sequence[int] = (1, 5, 10),
                    kind: Literal["auto", "scores", "ranks"] = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Per-query standard AP (Q,) and hit@k (Q, len(ks)) as fractions; see :func:`evaluate_pairs`."""
    ks = _check_ks(ks)
    _check_gt(gt)
    matrix = _to_numpy(scores_or_ranks, "scores_or_ranks")
    num_q, num_db = gt.num_queries, gt.num_db
    if matrix.ndim != 2:
        raise ValueError(f"scores_or_ranks must be 2-D (num_queries, num_db), got shape {matrix.shape}")
    if matrix.shape[0] != num_q:
        hint = " (transposed?)" if matrix.shape[1] == num_q else ""
        raise ValueError(f"scores_or_ranks has shape {matrix.shape} ({matrix.shape[0]} rows) but the ground truth "
                         f"has {num_q} queries and {num_db} database images{hint}")
    if resolve_kind(matrix, kind) == "scores" and matrix.shape[1] != num_db:
        raise ValueError(f"scores have shape {matrix.shape} ({matrix.shape[1]} columns) but the ground truth has "
                         f"{num_q} queries and {num_db} database images (expected shape ({num_q}, {num_db}))")
    ranks = as_ranking(matrix, num_db=num_db, kind=kind)
    aps = np.empty(num_q, dtype=np.float64)
    hits = np.zeros((num_q, len(ks)), dtype=np.float64)
    for i, (query, positives) in enumerate(zip(np.asarray(gt.queries), gt.positives)):
        row = ranks[i][ranks[i] != query]  # the query's own image is not a result
        is_positive = np.zeros(num_db, dtype=bool)
        is_positive[np.asarray(positives)] = True
        positions = np.flatnonzero(is_positive[row])
        aps[i] = average_precision(positions, int(is_positive.sum()), variant="standard")
        first = positions[0] if positions.size else np.inf
        hits[i] = [first < k for k in ks]
    return aps, hits


def evaluate_pairs(scores_or_ranks: ArrayLike, gt: PairsGroundTruth, ks: Sequence[int] = (1, 5, 10),
                   percent: bool = True, kind: Literal["auto", "scores", "ranks"] = "auto") -> dict[str, float]:
    """mAP and recall@k of a pairs set.

    Per query, the database is ranked by decreasing score with the query's own image removed; AP is the standard
    non-interpolated AP (:func:`average_precision` with ``variant="standard"``: mean over the query's positives of
    the precision at each positive; positives beyond a partial ranking count as not retrieved). Recall@k is the
    fraction of queries with at least one positive among their first k results.

    Args:
        scores_or_ranks: (Q, N) similarities, rows in ``gt.queries`` order and columns in ``gt.names`` order, or a
            (Q, L) ranking of database indices, best first (it may or may not contain the query itself).
        gt: the :class:`PairsGroundTruth` (:func:`load_pairs_csv`).
        ks: the k of recall@k.
        percent: metrics in percent instead of fractions.
        kind: ``"scores"``, ``"ranks"`` or ``"auto"`` (float = scores, integer = ranks).

    Returns:
        ``{"mAP": .., "R@1": .., "R@5": .., "R@10": .., "queries": Q, "db": N}``.
    """
    ks = _check_ks(ks)
    aps, hits = pairs_per_query(scores_or_ranks, gt, ks, kind)
    scale = 100.0 if percent else 1.0
    out: dict[str, float] = {"mAP": float(aps.mean() * scale)}
    for j, k in enumerate(ks):
        out[f"R@{k}"] = float(hits[:, j].mean() * scale)
    out["queries"] = gt.num_queries
    out["db"] = gt.num_db
    return out


def chance_level(gt: PairsGroundTruth, ks: Sequence[int] = (1, 5, 10), percent: bool = True) -> dict[str, float]:
    """The expected :func:`evaluate_pairs` metrics of a uniformly random ranking (the floor to beat).

    A query with ``n`` positives among ``M = N - 1`` candidates (itself excluded) has expected standard AP
    ``(H_M + (n - 1) / (M - 1) * (M - H_M)) / M`` (``H_M`` the harmonic number; ``H_M / M`` for one positive) and
    hits its first k with probability ``1 - C(M - n, k) / C(M, k)``.
    """
    from math import comb

    ks = _check_ks(ks)
    _check_gt(gt)
    m = gt.num_db - 1
    harmonic = float(np.sum(1.0 / np.arange(1, m + 1)))
    aps, hits = [], []
    for positives in gt.positives:
        n = int(np.unique(np.asarray(positives)).size)
        slope = (n - 1) / (m - 1) if m > 1 else 0.0
        aps.append((harmonic + slope * (m - harmonic)) / m)
        hits.append([1.0 - comb(m - n, min(k, m)) / comb(m, min(k, m)) for k in ks])
    scale = 100.0 if percent else 1.0
    out: dict[str, float] = {"mAP": float(np.mean(aps) * scale)}
    for j, k in enumerate(ks):
        out[f"R@{k}"] = float(np.mean([h[j] for h in hits]) * scale)
    out["queries"] = gt.num_queries
    out["db"] = gt.num_db
    return out
