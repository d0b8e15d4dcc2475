"""Exact nearest-neighbour search and rankings, the first step of every retrieval evaluation.

``knn`` returns, for every query, the ``k`` database items with the largest inner product
``s(q, x) = q . x`` (``metric="ip"``; cosine similarity for L2-normalised descriptors, the usual case for the
global descriptors of NetVLAD (Arandjelovic et al., CVPR 2016), GeM (Radenovic et al., TPAMI 2019) or R-MAC
(Tolias et al., ICLR 2016)), or the smallest squared Euclidean distance ``||q - x||^2`` (``metric="l2"``).
The search is exhaustive (exact, no approximation), with either faiss (``IndexFlatIP`` / ``IndexFlatL2``, when the
optional package is installed) or torch (a chunked GEMM + ``topk``, on any device).

``as_ranking`` turns a (num_queries, num_db) score matrix (higher = more similar), or an already computed ranking,
into a validated ranking matrix: row ``q`` holds database indices, best first.
"""
from __future__ import annotations

import importlib
from typing import Literal, Optional

import numpy as np
import torch
from torch import Tensor

from ..utils import to_numpy as _to_numpy

__all__ = ["knn", "as_ranking", "resolve_kind", "ranking_from_scores", "KNN_ENGINES", "KNN_METRICS"]

KNN_ENGINES = ("auto", "faiss", "torch")
KNN_METRICS = ("ip", "l2")
ArrayLike = np.ndarray | Tensor


# --- inputs -----------------------------------------------------------------------------------------------------

def _check_matrix(x: ArrayLike, name: str) -> None:
    """``x`` must be a non-empty 2-D array/tensor."""
    if not isinstance(x, (np.ndarray, Tensor)):
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): need at least one row")


def _check_knn_args(queries: ArrayLike, database: ArrayLike, k: int, metric: str, engine: str) -> None:
    _check_matrix(queries, "queries")
    _check_matrix(database, "database")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries and database must have the same descriptor dimension: queries shape "
                         f"{tuple(queries.shape)}, database shape {tuple(database.shape)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= database.shape[0]:
        raise ValueError(f"k must be an integer in [1, {database.shape[0]}] (database size), got {k!r}")
    if metric not in KNN_METRICS:
        raise ValueError(f"metric must be one of {KNN_METRICS}, got {metric!r}")
    if engine not in KNN_ENGINES:
        raise ValueError(f"engine must be one of {KNN_ENGINES}, got {engine!r}")


# --- engines ----------------------------------------------------------------------------------------------------

def _faiss_available() -> bool:
    try:
        importlib.import_module("faiss")
    except ImportError:
        return False
    return True


def _knn_faiss(queries: ArrayLike, database: ArrayLike, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive faiss search (float32): ``IndexFlatIP`` or ``IndexFlatL2`` (squared distances)."""
    try:
        faiss = importlib.import_module("faiss")
    except ImportError as err:
        raise ImportError("engine='faiss' needs the optional package 'faiss-cpu': pip install faiss-cpu") from err
    q = np.ascontiguousarray(_to_numpy(queries, "queries"), dtype=np.float32)
    x = np.ascontiguousarray(_to_numpy(database, "database"), dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    scores, indices = index.search(q, k)
    return scores, indices.astype(np.int64, copy=False)


def _as_float_tensor(x: ArrayLike, device: torch.device | None = None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    dtype = t.dtype if t.dtype == torch.float64 else torch.float32
    return t.detach().to(device=device if device is not None else t.device, dtype=dtype)


def _knn_torch(queries: ArrayLike, database: ArrayLike, k: int, metric: str,
               chunk_size: int) -> tuple[Tensor, Tensor]:
    """Chunked exhaustive search: at most ``chunk_size x num_db`` scores are held at a time.

    ``ip``: ``s = Q X^T``; ``l2``: ``d = ||q||^2 - 2 q.x + ||x||^2`` clamped at 0 (as faiss' BLAS path)."""
    q = _as_float_tensor(queries)
    x = _as_float_tensor(database, device=q.device).to(q.dtype)
    x_sq = (x * x).sum(dim=1) if metric == "l2" else None
    out_s = torch.empty(q.shape[0], k, dtype=q.dtype, device=q.device)
    out_i = torch.empty(q.shape[0], k, dtype=torch.long, device=q.device)
    for start in range(0, q.shape[0], chunk_size):
        qc = q[start:start + chunk_size]
        s = qc @ x.t()
        if x_sq is not None:
            s = ((qc * qc).sum(dim=1, keepdim=True) - 2.0 * s + x_sq).clamp_min_(0.0)
        top = torch.topk(s, k, dim=1, largest=metric == "ip", sorted=True)
        out_s[start:start + chunk_size], out_i[start:start + chunk_size] = top.values, top.indices
    return out_s, out_i


def knn(queries: ArrayLike, database: ArrayLike, k: int, metric: Literal["ip", "l2"] = "ip",
        engine: Literal["auto", "faiss", "torch"] = "auto",
        chunk_size: int = 1024) -> tuple[ArrayLike, ArrayLike]:
    """Exact k nearest neighbours of every query in ``database``, best first.

    Args:
        queries: (Q, D) descriptors, numpy array or torch tensor (any device for the torch engine).
        database: (N, D) descriptors. The whole database must fit in memory (RAM, or device memory for the
            torch engine on a GPU); only the queries are processed in chunks.
        k: neighbours per query, ``1 <= k <= N``.
        metric: ``"ip"``: largest inner product ``q . x`` first (cosine similarity for L2-normalised
            descriptors); ``"l2"``: smallest *squared* Euclidean distance ``||q - x||^2`` first (as faiss reports).
        engine: ``"faiss"`` (``IndexFlatIP`` / ``IndexFlatL2``, float32, CPU), ``"torch"`` (chunked GEMM +
            ``topk``, float32, or float64 for float64 input) or ``"auto"``: faiss when it is installed and the
            queries are not a CUDA tensor, else torch.
        chunk_size: queries per chunk of the torch engine; peak extra memory is ``chunk_size * N`` scores.

    Returns:
        ``(scores, indices)``, both (Q, k): scores (inner products or squared distances) sorted best first and
        the matching database indices (int64). Torch tensors (on the queries' device) when ``queries`` is a
        tensor, numpy arrays otherwise. Ties are broken arbitrarily (engine dependent).

    Raises:
        ValueError: non-2-D or empty inputs, different descriptor dimensions (both shapes are named), ``k`` out
            of range, unknown ``metric``/``engine``, ``chunk_size < 1``.
    """
    _check_knn_args(queries, database, k, metric, engine)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    on_cuda = isinstance(queries, Tensor) and queries.is_cuda
    if engine == "auto":
        engine = "faiss" if _faiss_available() and not on_cuda else "torch"
    if engine == "faiss":
        scores, indices = _knn_faiss(queries, database, int(k), metric)
        if isinstance(queries, Tensor):
            return torch.from_numpy(scores).to(queries.device), torch.from_numpy(indices).to(queries.device)
        return scores, indices
    scores_t, indices_t = _knn_torch(queries, database, int(k), metric, int(chunk_size))
    if isinstance(queries, Tensor):
        return scores_t, indices_t
    return scores_t.cpu().numpy(), indices_t.cpu().numpy()


# --- rankings ---------------------------------------------------------------------------------------------------

def ranking_from_scores(scores: ArrayLike, k: int | None = None, chunk_size: int = 1024) -> np.ndarray:
    """Database indices sorted by decreasing score, per row: ``argsort(-scores)`` (higher = more similar).

    ``k=None`` gives the full ranking (Q, N), ties broken by the lower database index (stable sort); an integer
    ``k`` gives only the first ``k`` columns (argpartition, then a stable sort of those; ties at the k-th place are
    broken arbitrarily). Rows are processed ``chunk_size`` at a time.
    """
    s = _to_numpy(scores, "scores")
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty 2-D (num_queries, num_db) matrix, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    if np.issubdtype(s.dtype, np.floating) and not np.isfinite(s).all():
        raise ValueError("scores contains NaN or infinite values")
    n = s.shape[1]
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n):
        raise ValueError(f"k must be None or an integer in [1, {n}] (database size), got {k!r}")
    out = np.empty((s.shape[0], n if k is None else int(k)), dtype=np.int64)
    for start in range(0, s.shape[0], chunk_size):
        out[start:start + chunk_size] = _rank_rows(s[start:start + chunk_size], k)
    return out


def _rank_rows(s: np.ndarray, k: int | None) -> np.ndarray:
    neg = -s.astype(np.float64, copy=False) if not np.issubdtype(s.dtype, np.floating) else -s
    if k is None or k == s.shape[1]:
        return np.argsort(neg, axis=1, kind="stable")
    part = np.argpartition(neg, k - 1, axis=1)[:, :k]
    part.sort(axis=1)  # lower index first among equal scores
    order = np.argsort(np.take_along_axis(neg, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _check_ranking(r: np.ndarray, num_db: int | None, name: str) -> None:
    """Rows of distinct integer database indices in ``[0, num_db)``."""
    if r.shape[1] == 0:
        raise ValueError(f"{name} has no columns (shape {r.shape})")
    if r.min() < 0 or (num_db is not None and r.max() >= num_db):
        raise ValueError(f"{name}: a ranking holds database indices in [0, {num_db}), got values in "
                         f"[{r.min()}, {r.max()}]; pass kind='scores' if this is an integer score matrix")
    if num_db is not None and r.shape[1] > num_db:
        raise ValueError(f"{name} ranks {r.shape[1]} items but the database has only {num_db}")
    srt = np.sort(r, axis=1)
    if (srt[:, 1:] == srt[:, :-1]).any():
        raise ValueError(f"{name}: a ranking row repeats a database index; pass kind='scores' if this is an "
                         f"integer score matrix")


def resolve_kind(a: np.ndarray, kind: str, name: str = "scores_or_ranks") -> Literal["scores", "ranks"]:
    """``kind`` itself, or for ``"auto"``: ``"scores"`` for floating-point input, ``"ranks"`` for integers."""
    if kind not in ("auto", "scores", "ranks"):
        raise ValueError(f"kind must be 'auto', 'scores' or 'ranks', got {kind!r}")
    if kind != "auto":
        return kind  # type: ignore[return-value]
    if np.issubdtype(a.dtype, np.floating):
        return "scores"
    if np.issubdtype(a.dtype, np.integer):
        return "ranks"
    raise ValueError(f"{name}: cannot tell scores from ranks for dtype {a.dtype}; pass kind='scores' or 'ranks'")


def as_ranking(scores_or_ranks: ArrayLike, num_db: int | None = None,
               kind: Literal["auto", "scores", "ranks"] = "auto", k: int | None = None,
               name: str = "scores_or_ranks") -> np.ndarray:
    """A validated (Q, L) int64 ranking: row ``q`` lists database indices, best first.

    ``kind="scores"``: a (Q, num_db) similarity matrix (higher = more similar), ranked with
    :func:`ranking_from_scores` (first ``k`` columns only when ``k`` is given). ``kind="ranks"``: a (Q, L) matrix of
    distinct database indices per row, ``L <= num_db`` (a partial ranking, e.g. the ``indices`` of :func:`knn`, is
    allowed). ``kind="auto"``: floating-point input is scores, integer input is a ranking (pass ``kind="scores"``
    for integer scores). Rows are queries: the (num_db, num_queries) ``ranks`` of the revisitop code must be
    transposed.
    """
    a = _to_numpy(scores_or_ranks, name)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (num_queries, num_db) matrix, got shape {a.shape}")
    if resolve_kind(a, kind, name) == "scores":
        if num_db is not None and a.shape[1] != num_db:
            raise ValueError(f"{name} is a score matrix of shape {a.shape} but the database has {num_db} items "
                             f"(expected {num_db} columns)")
        return ranking_from_scores(a, k=k)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: a ranking must hold integer database indices, got dtype {a.dtype}")
    _check_ranking(a, num_db, name)
    return a.astype(np.int64, copy=False)


def approximate_knn(queries: ArrayLike, database: ArrayLike, k: int, *, index: str = "IVF256,PQ16",
                    nprobe: int = 16, train_size: Optional[int] = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Approximate inner-product k-NN with a faiss index built by ``faiss.index_factory`` (e.g. ``"IVF4096,PQ64"``:
    inverted lists + product quantisation, for databases too large for exact search), probing ``nprobe`` lists.

    The index is trained on ``train_size`` database vectors (all by default; faiss wants ~40 per list), then the
    whole database is added: memory is the compressed codes (e.g. 64 bytes per vector for PQ64), not N x D floats.
    Returns ``(scores, indices)`` (Q, k) numpy arrays, best first; indices are -1 where fewer than k were found.
    """
    _check_knn_args(queries, database, k, "ip", "faiss")
    try:
        import faiss
    except ImportError as error:
        raise ImportError("approximate_knn needs faiss: pip install faiss-cpu (or aggnets[faiss])") from error
    q = np.ascontiguousarray(_to_numpy(queries, "queries"), dtype=np.float32)
    x = np.ascontiguousarray(_to_numpy(database, "database"), dtype=np.float32)
    built = faiss.index_factory(x.shape[1], index, faiss.METRIC_INNER_PRODUCT)
    if not built.is_trained:
        rng = np.random.default_rng(seed)
        sample = x if train_size is None or train_size >= len(x) else x[rng.choice(len(x), train_size, replace=False)]
        built.train(sample)
    built.add(x)
    if hasattr(built, "nprobe"):
        built.nprobe = int(nprobe)
    else:
        faiss.ParameterSpace().set_index_parameter(built, "nprobe", int(nprobe))
    scores, indices = built.search(q, int(k))
    return scores, indices.astype(np.int64)
