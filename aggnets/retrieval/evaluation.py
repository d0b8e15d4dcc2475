"""Evaluation protocols of image retrieval and visual place recognition, as plain functions.

* Revisited Oxford / Paris (Radenovic, Iscen, Tolias, Avrithis, Chum, "Revisiting Oxford and Paris: Large-Scale
  Image Retrieval Benchmarking", CVPR 2018): mAP and mean precision at k (mP@k) in the Easy / Medium / Hard
  settings, reproducing the official ``revisitop`` code (``compute_map`` / ``compute_ap``).
* Place recognition (Pittsburgh, Tokyo 24/7, MSLS, ... as in NetVLAD, Arandjelovic et al., CVPR 2016): recall@N,
  a query being found at N when one of its N first database images lies within ``threshold`` metres of it.

Metrics are returned in percent by default (as papers print them; ``percent=False`` gives fractions). The ground
truth they read (the revisited pickles, UTM positions from names or a CSV) is :mod:`aggnets.retrieval.ground_truth`.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import numpy as np

from ..utils import check_ks as _check_ks
from ..utils import to_numpy as _to_numpy
from .ground_truth import (REVISITED_SETTINGS, RefusedGlobalError, RevisitedGroundTruth, _check_gnd_entry,
                           load_revisited_gnd, load_utm_csv, parse_utm_from_filename, positions_from_filenames,
                           revisited_split)
from .search import ArrayLike, as_ranking, resolve_kind

__all__ = [
    "REVISITED_SETTINGS", "AP_VARIANTS", "RevisitedGroundTruth", "RefusedGlobalError", "load_revisited_gnd",
    "revisited_split",
    "average_precision", "precision_at_k", "positive_positions", "revisited_per_query", "evaluate_revisited",
    "recall_at_n", "parse_utm_from_filename", "positions_from_filenames", "load_utm_csv",
]

AP_VARIANTS = ("revisitop", "standard")


# --- per-query metrics ------------------------------------------------------------------------------------------

def _as_positions(positions_or_flags: Any, num_positives: int) -> np.ndarray:
    """Sorted 0-based positions of the retrieved positives, from positions or from boolean flags."""
    if isinstance(num_positives, bool) or not isinstance(num_positives, (int, np.integer)) or num_positives < 1:
        raise ValueError(f"num_positives must be a positive integer (queries without positives have no AP), "
                         f"got {num_positives!r}")
    a = _to_numpy(positions_or_flags, "positions_or_flags").reshape(-1)
    if a.dtype == np.bool_:
        a = np.flatnonzero(a)
    elif a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"positions_or_flags must be boolean flags or integer 0-based positions, got dtype "
                         f"{a.dtype}")
    a = np.sort(a.astype(np.int64))
    if a.size and (a[0] < 0 or (a[1:] == a[:-1]).any()):
        raise ValueError("positions_or_flags: positions must be distinct and >= 0")
    if a.size > num_positives:
        raise ValueError(f"{a.size} retrieved positives but num_positives={num_positives}")
    return a


def _check_variant(variant: str) -> None:
    if variant not in AP_VARIANTS:
        raise ValueError(f"variant must be one of {AP_VARIANTS}, got {variant!r}")


def average_precision(positions_or_flags: Any, num_positives: int,
                      variant: Literal["revisitop", "standard"] = "revisitop") -> float:
    """Average precision (a fraction in [0, 1]) of one ranked list.

    ``positions_or_flags``: the 0-based ranks ``r_0 < r_1 < ...`` of the retrieved positives in the ranking with
    the ignored (junk) items already removed, or a boolean flag per ranked item (True = positive).
    ``num_positives``: all positives of the query, ``n``; positives never retrieved contribute 0.

    ``variant="revisitop"`` (``compute_ap`` of the official revisitop code, Radenovic et al., CVPR 2018; what
    papers report): trapezoidal rule on the precision-recall curve,
    ``AP = sum_i (p0_i + p1_i) / (2 n)`` with ``p0_i = i / r_i`` (``1`` when ``r_i = 0``), ``p1_i = (i+1)/(r_i+1)``.
    ``variant="standard"``: non-interpolated AP, ``AP = sum_i (i+1)/(r_i+1) / n`` (precision at every positive).
    """
    _check_variant(variant)
    r = _as_positions(positions_or_flags, num_positives).astype(np.float64)
    i = np.arange(r.size, dtype=np.float64)
    p1 = (i + 1.0) / (r + 1.0)
    if variant == "standard":
        return float(p1.sum() / num_positives)
    p0 = np.divide(i, r, out=np.ones_like(r), where=r > 0)
    return float((p0 + p1).sum() / (2.0 * num_positives))


def precision_at_k(positions_or_flags: Any, k: int, num_positives: int,
                   variant: Literal["revisitop", "standard"] = "revisitop") -> float:
    """Precision (a fraction) of the first ``k`` items of a ranking with the ignored items removed.

    ``variant="standard"``: ``P@k = |{i : r_i < k}| / k``. ``variant="revisitop"`` (official ``compute_map``):
    ``P@k = |{i : r_i < k_q}| / k_q`` with ``k_q = min(k, L)``, ``L`` the 1-based rank of the last positive, so a
    query whose positives are all within the first k is not penalised for having fewer than k of them. When not
    every positive is ranked (partial ranking), ``L`` is unknown (beyond the list) and ``k_q = k``.
    """
    _check_variant(variant)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    r = _as_positions(positions_or_flags, num_positives)
    kq = k
    if variant == "revisitop" and r.size == num_positives:
        kq = min(k, int(r[-1]) + 1)
    return float((r < kq).sum() / kq)


def positive_positions(ranking: np.ndarray, positives: np.ndarray, ignored: np.ndarray, num_db: int) -> np.ndarray:
    """0-based positions of the positives in one ranking row after the ignored items are removed.

    An index that is both positive and ignored counts as positive. ``ranking`` is a row of distinct indices.
    """
    label = np.zeros(num_db, dtype=np.int8)
    label[ignored] = -1
    label[positives] = 1
    ranked = label[ranking]
    kept = ranked >= 0
    new_pos = np.cumsum(kept) - 1
    return new_pos[ranked == 1]


def revisited_per_query(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], setting: str, num_db: int,
                        ks: Sequence[int] = (1, 5, 10),
                        variant: Literal["revisitop", "standard"] = "revisitop") -> tuple[np.ndarray, np.ndarray]:
    """Per-query AP (Q,) and P@k (Q, len(ks)), as fractions, NaN for queries without positives in ``setting``.

    ``ranks``: validated (Q, L) ranking, rows are queries (see :func:`aggnets.retrieval.search.as_ranking`).
    """
    aps = np.full(len(gnd), np.nan)
    prs = np.full((len(gnd), len(ks)), np.nan)
    for q, entry in enumerate(gnd):
        pos, ign = revisited_split(entry, setting)
        pos = np.unique(pos)
        if pos.size == 0:
            continue  # no positive in this setting: skipped, as the reference code does
        found = positive_positions(ranks[q], pos, ign, num_db)
        aps[q] = average_precision(found, pos.size, variant)
        prs[q] = [precision_at_k(found, k, pos.size, variant) for k in ks]
    return aps, prs


def _gnd_and_num_db(gnd: RevisitedGroundTruth | Sequence[Mapping[str, Any]]
                    ) -> tuple[list[dict[str, Any]], int | None]:
    """Checked per-query entries and the database size (None when only a list of entries is given)."""
    if isinstance(gnd, RevisitedGroundTruth):
        return [_check_gnd_entry(e, i, gnd.num_db) for i, e in enumerate(gnd.gnd)], gnd.num_db
    if isinstance(gnd, (str, bytes, Mapping)) or not isinstance(gnd, Sequence):
        raise ValueError(f"gnd must be a RevisitedGroundTruth or a list of per-query dicts, got "
                         f"{type(gnd).__name__}")
    return [_check_gnd_entry(e, i, None) for i, e in enumerate(gnd)], None


def evaluate_revisited(scores_or_ranks: ArrayLike, gnd: RevisitedGroundTruth | Sequence[Mapping[str, Any]],
                       ks: Sequence[int] = (1, 5, 10), kind: Literal["auto", "scores", "ranks"] = "auto",
                       variant: Literal["revisitop", "standard"] = "revisitop",
                       percent: bool = True) -> dict[str, dict[str, float]]:
    """mAP and mP@k of the Easy, Medium and Hard settings of revisited Oxford / Paris (Radenovic et al., 2018).

    Per query and setting (see :func:`revisited_split`), the ignored images are removed from the ranking, then AP
    (:func:`average_precision`) and P@k (:func:`precision_at_k`) are computed; mAP / mP@k average over the queries
    that have at least one positive in the setting (the others are skipped, as in the reference code; their count
    is returned as ``"skipped"``). With the default ``variant="revisitop"`` the numbers match the official
    ``compute_map``.

    Args:
        scores_or_ranks: (Q, N) similarities (higher = more similar), or a (Q, L) ranking of database indices,
            best first (``L <= N``; positives beyond a partial ranking count as not retrieved). Rows are
            queries: transpose the (N, Q) ``ranks`` of the revisitop code.
        gnd: a :class:`RevisitedGroundTruth` (its ``imlist`` fixes N) or the raw list of per-query dicts.
        ks: the k of mP@k.
        kind: ``"scores"``, ``"ranks"`` or ``"auto"`` (float = scores, integer = ranks).
        variant: ``"revisitop"`` (official trapezoidal AP and P@k) or ``"standard"``.
        percent: metrics in percent (as papers print them) instead of fractions.

    Returns:
        ``{"easy": {"mAP": .., "mP@1": .., ..., "skipped": n}, "medium": {...}, "hard": {...}}``; a setting in
        which every query is skipped has NaN metrics.
    """
    _check_variant(variant)
    ks = _check_ks(ks)
    entries, num_db = _gnd_and_num_db(gnd)
    matrix = _to_numpy(scores_or_ranks, "scores_or_ranks")
    if matrix.ndim == 2 and matrix.shape[0] != len(entries):
        hint = " (revisitop's ranks are (num_db, num_queries): pass ranks.T)" if matrix.shape[1] == len(entries) else ""
        raise ValueError(f"scores_or_ranks has {matrix.shape[0]} rows but gnd has {len(entries)} queries{hint}")
    if num_db is None and matrix.ndim == 2 and resolve_kind(matrix, kind) == "scores":
        num_db = matrix.shape[1]  # a list of entries: the score matrix fixes the database size
        entries = [_check_gnd_entry(e, i, num_db) for i, e in enumerate(entries)]
    ranks = as_ranking(matrix, num_db=num_db, kind=kind)
    num_db = num_db if num_db is not None else _infer_num_db(ranks, entries)
    scale = 100.0 if percent else 1.0
    results: dict[str, dict[str, float]] = {}
    for setting in REVISITED_SETTINGS:
        aps, prs = revisited_per_query(ranks, entries, setting, num_db, ks, variant)
        results[setting] = _summarise(aps, prs, ks, scale)
    return results


def _infer_num_db(ranks: np.ndarray, entries: list[dict[str, Any]]) -> int:
    """Database size when only a list of entries is known: every index seen in the ranking or the ground truth."""
    top = int(ranks.max())
    for e in entries:
        for key in ("easy", "hard", "junk"):
            if e[key].size:
                top = max(top, int(e[key].max()))
    return top + 1


def _summarise(aps: np.ndarray, prs: np.ndarray, ks: Sequence[int], scale: float) -> dict[str, float]:
    valid = ~np.isnan(aps)
    out: dict[str, float] = {"mAP": float(aps[valid].mean() * scale) if valid.any() else float("nan")}
    for j, k in enumerate(ks):
        out[f"mP@{k}"] = float(prs[valid, j].mean() * scale) if valid.any() else float("nan")
    out["skipped"] = int((~valid).sum())
    return out


# --- place recognition ------------------------------------------------------------------------------------------

def _check_positions(p: Any, name: str) -> np.ndarray:
    a = _to_numpy(p, name)
    if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (num, 2) array of (utm_east, utm_north) metres, got shape "
                         f"{a.shape}")
    if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a.astype(np.float64)).all():
        raise ValueError(f"{name} must hold finite numbers")
    return a.astype(np.float64)


def _nearest_db_distance(queries: np.ndarray, db: np.ndarray, chunk_pairs: int = 1 << 22) -> np.ndarray:
    """Distance from every query to its nearest database position, chunked over queries."""
    out = np.empty(queries.shape[0])
    step = max(1, chunk_pairs // db.shape[0])
    for start in range(0, queries.shape[0], step):
        diff = queries[start:start + step, None, :] - db[None, :, :]
        out[start:start + step] = np.sqrt(np.einsum("qdc,qdc->qd", diff, diff).min(axis=1))
    return out


def recall_at_n(scores_or_ranks: ArrayLike, query_positions: Any, db_positions: Any,
                ns: Sequence[int] = (1, 5, 10, 20), threshold: float = 25.0,
                kind: Literal["auto", "scores", "ranks"] = "auto", percent: bool = True) -> dict[str, float]:
    """Recall@N of visual place recognition (as in NetVLAD, Arandjelovic et al., CVPR 2016).

    A query is found at N when at least one of its N first database images lies within ``threshold`` metres of
    it: ``min_{j < N} ||p_q - p_{rank_q(j)}||_2 <= threshold`` (Euclidean distance on UTM easting/northing, so
    positions must be metres, not lat/lon degrees). ``R@N`` = found queries / evaluated queries. Queries with no
    database image within ``threshold`` at all cannot be found and are skipped (as the benchmarks' loaders drop
    them); their number is returned as ``"skipped"`` and the evaluated number as ``"queries"``.

    Args:
        scores_or_ranks: (Q, N_db) similarities (higher = more similar) or a (Q, L) ranking with
            ``L >= max(ns)`` (e.g. the ``indices`` of :func:`aggnets.retrieval.knn`).
        query_positions: (Q, 2) UTM (east, north) of the queries; db_positions: (N_db, 2).
        ns: the N of R@N; threshold: metres (25 m for Pittsburgh / Tokyo 24/7 / MSLS).
        kind: ``"scores"``, ``"ranks"`` or ``"auto"`` (float = scores, integer = ranks).
        percent: percent (as papers print) instead of fractions.

    Returns:
        ``{"R@1": .., "R@5": .., ..., "queries": evaluated, "skipped": skipped}``.

    Raises:
        ValueError: bad shapes (named), ``ns`` larger than the ranking, ``threshold <= 0``, or every query
            skipped (usually positions in degrees or the wrong threshold).
    """
    ns = _check_ks(ns, "ns")
    q_pos = _check_positions(query_positions, "query_positions")
    db_pos = _check_positions(db_positions, "db_positions")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) or not threshold > 0:
        raise ValueError(f"threshold must be a positive distance in metres, got {threshold!r}")
    shape = tuple(getattr(scores_or_ranks, "shape", ()))
    if len(shape) == 2 and shape[0] != q_pos.shape[0]:
        raise ValueError(f"scores_or_ranks has {shape[0]} rows but query_positions has {q_pos.shape[0]} queries")
    if max(ns) > db_pos.shape[0]:
        raise ValueError(f"ns={ns} asks for more than the {db_pos.shape[0]} database images")
    ranks = as_ranking(scores_or_ranks, num_db=db_pos.shape[0], kind=kind, k=max(ns))
    if ranks.shape[1] < max(ns):
        raise ValueError(f"the ranking has {ranks.shape[1]} columns, fewer than max(ns)={max(ns)}")
    return _recall_from_ranks(ranks[:, :max(ns)], q_pos, db_pos, ns, float(threshold), 100.0 if percent else 1.0)


def _recall_from_ranks(ranks: np.ndarray, q_pos: np.ndarray, db_pos: np.ndarray, ns: tuple[int, ...],
                       threshold: float, scale: float) -> dict[str, float]:
    has_positive = _nearest_db_distance(q_pos, db_pos) <= threshold
    if not has_positive.any():
        raise ValueError(f"no query has a database image within threshold={threshold} m: check that both "
                         f"query_positions and db_positions are UTM metres of the same zone, and the threshold")
    dist = np.linalg.norm(db_pos[ranks] - q_pos[:, None, :], axis=2)  # (Q, max(ns))
    hit = dist <= threshold
    first_hit = np.where(hit.any(axis=1), hit.argmax(axis=1), np.iinfo(np.int64).max)[has_positive]
    out: dict[str, float] = {f"R@{n}": float((first_hit < n).mean() * scale) for n in ns}
    out["queries"] = int(has_positive.sum())
    out["skipped"] = int((~has_positive).sum())
    return out
