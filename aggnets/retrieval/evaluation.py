"""Evaluation protocols of image retrieval and visual place recognition, as plain functions.

* Revisited Oxford / Paris (Radenovic, Iscen, Tolias, Avrithis, Chum, "Revisiting Oxford and Paris: Large-Scale
  Image Retrieval Benchmarking", CVPR 2018): mAP and mean precision at k (mP@k) in the Easy / Medium / Hard
  settings, reproducing the official ``revisitop`` code (``compute_map`` / ``compute_ap``).
* Place recognition (Pittsburgh, Tokyo 24/7, MSLS, ... as in NetVLAD, Arandjelovic et al., CVPR 2016): recall@N,
  a query being found at N when one of its N first database images lies within ``threshold`` metres of it.

Metrics are returned in percent by default (as papers print them; ``percent=False`` gives fractions).
"""
from __future__ import annotations

import csv
import functools
import io
import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from ..utils import check_ks as _check_ks
from ..utils import to_numpy as _to_numpy
from .search import ArrayLike, as_ranking, resolve_kind

__all__ = [
    "REVISITED_SETTINGS", "AP_VARIANTS", "RevisitedGroundTruth", "RefusedGlobalError", "load_revisited_gnd",
    "revisited_split",
    "average_precision", "precision_at_k", "positive_positions", "revisited_per_query", "evaluate_revisited",
    "recall_at_n", "parse_utm_from_filename", "positions_from_filenames", "load_utm_csv",
]

REVISITED_SETTINGS = ("easy", "medium", "hard")
AP_VARIANTS = ("revisitop", "standard")
_GND_HINT = ("download it from http://cmp.felk.cvut.cz/revisitop/ (gnd_roxford5k.pkl / gnd_rparis6k.pkl, "
             "next to the jpg/ folder of the dataset)")


# --- ground truth -----------------------------------------------------------------------------------------------

@dataclass
class RevisitedGroundTruth:
    """Ground truth of a revisited benchmark.

    ``imlist``: database image names (N); ``qimlist``: query image names (Q); ``gnd``: one dict per query with
    ``bbx`` (query box x1, y1, x2, y2, when present) and the index lists ``easy``, ``hard``, ``junk`` into
    ``imlist``; ``name``: the dataset (e.g. ``"roxford5k"``).
    """
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]
    name: str = ""

    @property
    def num_queries(self) -> int:
        return len(self.qimlist)

    @property
    def num_db(self) -> int:
        return len(self.imlist)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], name: str = "") -> "RevisitedGroundTruth":
        """Build from the dict stored in the official pickle; ``ValueError`` names what is missing or wrong."""
        if not isinstance(cfg, Mapping):
            raise ValueError(f"ground truth {name!r}: expected a dict, got {type(cfg).__name__}")
        missing = [key for key in ("imlist", "qimlist", "gnd") if key not in cfg]
        if missing:
            raise ValueError(f"ground truth {name!r}: missing key(s) {missing}; found {sorted(map(str, cfg))}")
        imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
        if len(gnd) != len(qimlist):
            raise ValueError(f"ground truth {name!r}: 'gnd' has {len(gnd)} entries but 'qimlist' has "
                             f"{len(qimlist)} queries")
        entries = [_check_gnd_entry(entry, i, len(imlist)) for i, entry in enumerate(gnd)]
        return cls(imlist=[str(s) for s in imlist], qimlist=[str(s) for s in qimlist], gnd=entries, name=name)


def _check_gnd_entry(entry: Any, i: int, num_db: int | None) -> dict[str, Any]:
    """A copy of one query's entry with ``easy``/``hard``/``junk`` as int64 arrays checked against ``num_db``."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"gnd[{i}] must be a dict with 'easy', 'hard', 'junk', got {type(entry).__name__}")
    missing = [key for key in ("easy", "hard", "junk") if key not in entry]
    if missing:
        raise ValueError(f"gnd[{i}] is missing key(s) {missing}; found {sorted(map(str, entry))}")
    out = dict(entry)
    for key in ("easy", "hard", "junk"):
        idx = np.asarray(entry[key]).reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"gnd[{i}][{key!r}] must hold integer database indices, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or (num_db is not None and idx.max() >= num_db)):
            raise ValueError(f"gnd[{i}][{key!r}] holds indices in [{idx.min()}, {idx.max()}], outside the "
                             f"database [0, {num_db})")
        out[key] = idx
    return out


def _numpy_core(submodule: str) -> Any:
    """``numpy._core.<submodule>`` (numpy >= 2) or ``numpy.core.<submodule>`` (numpy 1.x)."""
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a ground-truth pickle may name: containers/scalars and numpy array reconstruction."""
    allowed: dict[tuple[str, str], Any] = {
        ("builtins", name): getattr(__import__("builtins"), name)
        for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                     "complex", "bool")
    }
    allowed[("_codecs", "encode")] = __import__("codecs").encode  # protocol-2 pickles of bytes
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _numpy_core("multiarray")._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _numpy_core("multiarray").scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _numpy_core("numeric")._frombuffer
    return allowed


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list of :class:`_RestrictedUnpickler`."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :func:`_allowed_globals`: no import, no call of anything else.

    A pickle naming any other global (``os.system``, ``builtins.eval``, ``copyreg._reconstructor`` for arbitrary
    classes, ...) raises :class:`RefusedGlobalError` before that global is even looked up.
    """

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol < 3 (Python 2 names)
        try:
            return _allowed_globals()[(module, name)]
        except KeyError:
            raise RefusedGlobalError(f"refusing to load global {module}.{name}: a ground-truth pickle holds "
                                     f"only dicts, lists and numpy arrays") from None


def _safe_load(data: bytes) -> Any:
    return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()  # latin1: Python 2 numpy pickles


def load_revisited_gnd(path: str | os.PathLike, name: str | None = None) -> RevisitedGroundTruth:
    """Load ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (Radenovic et al., CVPR 2018) without executing code.

    The file is a pickle of a dict ``{"imlist": [...], "qimlist": [...], "gnd": [{"bbx", "easy", "hard",
    "junk"}, ...]}``. It is read with a restricted unpickler that resolves only builtin containers and numpy
    array reconstruction (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``, ...); any
    other global (e.g. ``os.system`` behind a ``__reduce__``) is refused with :class:`RefusedGlobalError`.

    ``name`` defaults to the file stem without the ``gnd_`` prefix (``"roxford5k"``).

    Raises:
        FileNotFoundError: no file at ``path`` (with a hint where to download it).
        ValueError: not a pickle, or a malformed dict (missing keys, index lists out of range).
        RefusedGlobalError: (a ``pickle.UnpicklingError``) the pickle names a global that is not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"revisited ground truth not found: {str(path)!r}; {_GND_HINT}")
    if name is None:
        name = path.stem[4:] if path.stem.startswith("gnd_") else path.stem
    try:
        cfg = _safe_load(path.read_bytes())
    except RefusedGlobalError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"{str(path)!r} is not a readable ground-truth pickle: {err}") from err
    return RevisitedGroundTruth.from_dict(cfg, name=name)


def revisited_split(entry: Mapping[str, Any], setting: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, ignored) database indices of one query in a setting (Radenovic et al., CVPR 2018, Sec. 4).

    Easy: positives = easy, ignored = junk + hard. Medium: positives = easy + hard, ignored = junk.
    Hard: positives = hard, ignored = junk + easy.
    """
    parts = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
             "hard": (("hard",), ("junk", "easy"))}
    if setting not in parts:
        raise ValueError(f"setting must be one of {REVISITED_SETTINGS}, got {setting!r}")
    pos_keys, ign_keys = parts[setting]
    pos = np.concatenate([np.asarray(entry[key], dtype=np.int64).reshape(-1) for key in pos_keys])
    ign = np.concatenate([np.asarray(entry[key], dtype=np.int64).reshape(-1) for key in ign_keys])
    return pos, ign


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


def parse_utm_from_filename(name: str | os.PathLike) -> tuple[float, float]:
    """(utm_east, utm_north) from a VPR benchmark file name ``@utm_east@utm_north@zone_number@zone_letter@...``.

    The convention of the Pittsburgh / Tokyo 24/7 / SF-XL / MSLS files as reformatted by the VPR benchmarks
    (Berton et al., "Deep Visual Geo-localization Benchmark", CVPR 2022), e.g.
    ``@0543256.96@4178906.53@10@S@037.75683@-122.50737@...jpg`` -> ``(543256.96, 4178906.53)``.
    Only the base name is parsed, so a full path is accepted.
    """
    base = os.path.basename(os.fspath(name))
    fields = base.split("@")
    if len(fields) < 3:
        raise ValueError(f"name {base!r} does not follow the '@utm_east@utm_north@...' convention")
    try:
        return float(fields[1]), float(fields[2])
    except ValueError:
        raise ValueError(f"name {base!r}: cannot read utm_east={fields[1]!r}, utm_north={fields[2]!r} as "
                         f"numbers ('@utm_east@utm_north@...' convention)") from None


def positions_from_filenames(names: Sequence[str | os.PathLike]) -> np.ndarray:
    """(len(names), 2) float64 UTM positions parsed with :func:`parse_utm_from_filename`."""
    if len(names) == 0:
        raise ValueError("names is empty")
    return np.array([parse_utm_from_filename(n) for n in names], dtype=np.float64)


def load_utm_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a CSV with a header and columns ``name,utm_east,utm_north`` (others are ignored).

    Returns ``(names, positions)`` with positions (N, 2) float64 metres. Latitude/longitude columns are refused:
    recall@N thresholds are metres on a planar (UTM) projection, convert first (e.g. with the ``utm`` package).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"positions CSV not found: {str(path)!r}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        rows = list(reader)
    _check_csv_columns(fields, path)
    names, positions = [], []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): v for k, v in row.items()}
        try:
            positions.append((float(row["utm_east"]), float(row["utm_north"])))
        except (TypeError, ValueError):
            raise ValueError(f"{str(path)!r} line {line}: utm_east/utm_north are not numbers: {row}") from None
        names.append(row["name"])
    if not names:
        raise ValueError(f"{str(path)!r} has a header but no rows")
    return names, np.asarray(positions, dtype=np.float64)


def _check_csv_columns(fields: list[str], path: Path) -> None:
    if {"utm_east", "utm_north", "name"} <= set(fields):
        return
    if {"lat", "lon"} <= set(fields) or {"latitude", "longitude"} <= set(fields):
        raise ValueError(f"{str(path)!r} has latitude/longitude columns; recall@N needs metres: convert to UTM "
                         f"(columns name,utm_east,utm_north), e.g. with the 'utm' or 'pyproj' package")
    raise ValueError(f"{str(path)!r} must have the columns name,utm_east,utm_north; found {fields}")
