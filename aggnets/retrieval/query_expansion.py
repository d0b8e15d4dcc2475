"""Query expansion and database-side augmentation of global descriptors (re-ranking by descriptor averaging).

All functions take matrices of L2-normalised descriptors (rows), find neighbours by exact inner-product search
(:func:`aggnets.retrieval.search.knn`, torch engine) and return L2-normalised rows. With ``s_i = q . d_i`` the
similarity of the query ``q`` to its ``i``-th nearest database descriptor ``d_i``:

* **Average query expansion** (AQE; Chum, Philbin, Sivic, Isard & Zisserman, "Total recall", ICCV 2007, in the
  form used for CNN descriptors, e.g. Radenović et al. TPAMI 2018)::

      q' = L2( (q + sum_{i=1..k} d_i) / (k + 1) ) = L2( q + sum_{i=1..k} d_i )

* **alpha-weighted query expansion** (alpha-QE; Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no
  human annotation", TPAMI 2018)::

      q' = L2( q + sum_{i=1..k} w_i d_i ),      w_i = max(s_i, 0)^alpha

  the query itself has weight 1 (= s^alpha for its self-similarity 1). With ``alpha = 0`` every weight is 1
  (``0^0 = 1``: a neighbour with a non-positive similarity also gets weight 1), so alpha-QE with ``alpha = 0`` is
  exactly AQE with the same ``k``.

* **Database-side augmentation** (DBA; Turcot & Lowe 2009, Arandjelović & Zisserman, "Three things everyone should
  know to improve object retrieval", CVPR 2012; alpha-weighted as alpha-DBA in Radenović et al. TPAMI 2018): every
  database descriptor is replaced by its alpha-QE over the database, counting itself once (weight 1) plus its
  ``k`` nearest *other* database descriptors. Queries are then usually expanded against the augmented database.

The inputs are not re-normalised (pass L2-normalised rows, as the definitions assume); the outputs are computed
without gradient, in float64 for float64 input and float32 otherwise, and returned as torch tensors (on the
queries' device) when ``queries`` (``database`` for DBA) is a tensor, numpy arrays otherwise.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import functional as AF
from .search import knn

__all__ = ["average_query_expansion", "alpha_query_expansion", "database_side_augmentation"]

ArrayLike = np.ndarray | Tensor


def _as_descriptors(x: Any, name: str, device: torch.device | None = None) -> Tensor:
    """A finite, non-empty (N, D) float32/float64 tensor (detached)."""
    if isinstance(x, Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (num, dim) matrix, got shape {tuple(t.shape)}")
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32,
                                                                   torch.int64, torch.uint8)):
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.to(device=device if device is not None else t.device,
             dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _check_k(k: int, upper: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= upper:
        raise ValueError(f"k must be an integer in [0, {upper}] ({what}), got {k!r}")
    return int(k)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
            or not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return float(alpha)


def _check_chunk(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def _output(t: Tensor, like: Any) -> ArrayLike:
    return t if isinstance(like, Tensor) else t.cpu().numpy()


@torch.no_grad()
def _expand(q: Tensor, db: Tensor, scores: Tensor, indices: Tensor, alpha: float, chunk_size: int) -> Tensor:
    """``L2(q + sum_i max(s_i, 0)^alpha d_{idx_i})`` row by row, ``chunk_size`` rows at a time."""
    out = torch.empty_like(q)
    for start in range(0, q.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        w = scores[sl].clamp_min(0.0).pow(alpha)  # torch: 0^0 = 1, so alpha = 0 gives uniform weights
        out[sl] = q[sl] + torch.einsum("qk,qkd->qd", w, db[indices[sl]])
    return AF.l2_normalize(out, dim=-1)


def _query_expansion(queries: ArrayLike, database: ArrayLike, k: int, alpha: float, chunk_size: int) -> ArrayLike:
    q = _as_descriptors(queries, "queries")
    db = _as_descriptors(database, "database", device=q.device).to(q.dtype)
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"queries and database must have the same descriptor dimension: queries shape "
                         f"{tuple(q.shape)}, database shape {tuple(db.shape)}")
    k = _check_k(k, db.shape[0], "database size")
    alpha = _check_alpha(alpha)
    chunk_size = _check_chunk(chunk_size)
    if k == 0:
        return _output(AF.l2_normalize(q, dim=-1), queries)
    scores, indices = knn(q, db, k, metric="ip", engine="torch", chunk_size=chunk_size)
    return _output(_expand(q, db, scores, indices, alpha, chunk_size), queries)


def average_query_expansion(queries: ArrayLike, database: ArrayLike, k: int,
                            chunk_size: int = 1024) -> ArrayLike:
    """Average query expansion (Chum et al., ICCV 2007): ``q' = L2(q + sum_{i<=k} d_i)``, the L2-normalised mean
    of the query and its ``k`` nearest database descriptors (inner product).

    Args:
        queries: (Q, D) L2-normalised query descriptors.
        database: (N, D) L2-normalised database descriptors.
        k: number of neighbours averaged, ``0 <= k <= N`` (``k = 0``: the queries, L2-normalised).
        chunk_size: queries processed at a time (peak extra memory ``chunk_size * max(N, k * D)`` numbers).

    Returns:
        (Q, D) expanded queries, L2-normalised rows.

    Raises:
        ValueError: non-2-D, empty or non-finite inputs; different descriptor dimensions; ``k`` out of range.
    """
    return _query_expansion(queries, database, k, 0.0, chunk_size)


def alpha_query_expansion(queries: ArrayLike, database: ArrayLike, k: int, alpha: float = 3.0,
                          chunk_size: int = 1024) -> ArrayLike:
    """alpha-weighted query expansion (Radenović et al., TPAMI 2018): ``q' = L2(q + sum_{i<=k} max(s_i, 0)^alpha
    d_i)``, ``s_i = q . d_i``; ``alpha = 0`` is :func:`average_query_expansion`.

    Args:
        queries: as in :func:`average_query_expansion`.
        database: as in :func:`average_query_expansion`.
        k: as in :func:`average_query_expansion`.
        chunk_size: as in :func:`average_query_expansion`.
        alpha: weight exponent ``>= 0`` (3 in the paper): larger values trust only the most similar neighbours.

    Raises:
        ValueError: as :func:`average_query_expansion`, and ``alpha`` negative or not finite.
    """
    return _query_expansion(queries, database, k, alpha, chunk_size)


def database_side_augmentation(database: ArrayLike, k: int, alpha: float = 3.0,
                               chunk_size: int = 1024) -> ArrayLike:
    """Database-side augmentation: every database descriptor ``d`` becomes ``L2(d + sum_{i<=k} max(s_i, 0)^alpha
    n_i)`` over its ``k`` nearest *other* database descriptors ``n_i`` (itself counted once, weight 1).

    ``alpha = 0`` gives the plain averaging DBA (Arandjelović & Zisserman, CVPR 2012), ``alpha > 0`` alpha-DBA
    (Radenović et al., TPAMI 2018). The descriptor itself is excluded from its neighbours by index (not by rank),
    so exact duplicates in the database are still counted as neighbours.

    Args:
        database: (N, D) L2-normalised database descriptors.
        k: neighbours per descriptor besides itself, ``0 <= k <= N - 1`` (``k = 0``: the database, L2-normalised).
        alpha: as in :func:`alpha_query_expansion`.
        chunk_size: as in :func:`alpha_query_expansion`.

    Raises:
        ValueError: non-2-D, empty or non-finite ``database``; ``k`` out of range; bad ``alpha``.
    """
    db = _as_descriptors(database, "database")
    n = db.shape[0]
    k = _check_k(k, n - 1, "database size - 1: neighbours other than the descriptor itself")
    alpha = _check_alpha(alpha)
    chunk_size = _check_chunk(chunk_size)
    if k == 0:
        return _output(AF.l2_normalize(db, dim=-1), database)
    scores, indices = knn(db, db, k + 1, metric="ip", engine="torch", chunk_size=chunk_size)
    keep = indices != torch.arange(n, device=indices.device)[:, None]
    no_self = keep.all(dim=1)  # itself not among the k + 1 (ties with duplicates): drop the last instead
    keep[no_self, -1] = False
    scores, indices = scores[keep].view(n, k), indices[keep].view(n, k)
    return _output(_expand(db, db, scores, indices, alpha, chunk_size), database)
