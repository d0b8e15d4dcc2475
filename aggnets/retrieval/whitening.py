"""Fitting a whitening of global descriptors from training descriptors: PCA whitening and learned whitening (Lw).

Both fits return an :class:`aggnets.heads.Whitening` module, ``y = L2(P (x - m))`` stored as an ``nn.Linear``
(``weight = P``, ``bias = -P m``), which can be appended to a network and fine-tuned, and saved / loaded with
:func:`save_whitening` / :func:`load_whitening` (a ``torch.load(weights_only=True)``-safe file).

**PCA whitening** (Jégou & Chum, "Negative evidences and co-occurrences in image retrieval", ECCV 2012; the
post-processing of NetVLAD, R-MAC, GeM ...). From descriptors ``x_1..x_N`` (rows of ``X``, (N, D))::

    m = (1/N) sum_n x_n,       C = (1/N) sum_n (x_n - m)(x_n - m)^T = U diag(lambda) U^T,
    lambda_1 >= ... >= lambda_D,
    P = diag(lambda_1 + r, ..., lambda_d + r)^{-1/2} U[:, :d]^T,      y = L2(P (x - m))

keeping the ``d = dim`` leading principal directions (dimensionality reduction). With ``r = 0`` the whitened
training descriptors have identity covariance: ``(1/N) sum_n P (x_n - m)(x_n - m)^T P^T = I_d``.

**Learned whitening Lw** (Radenović, Tolias & Chum, "CNN image retrieval learns from BoW: unsupervised fine-tuning
with hard examples", ECCV 2016, and "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018),
from matching pairs ``(i, j)`` in ``S``::

    m = mean of the distinct descriptors appearing in a pair,
    C_S = (1/|S|) sum_{(i,j) in S} (x_i - x_j)(x_i - x_j)^T,              P_w = (C_S + r I)^{-1/2},
    (1/N) sum_n P_w (x_n - m)(x_n - m)^T P_w^T = E diag(mu) E^T,          mu_1 >= ... >= mu_D,
    P = E[:, :d]^T P_w,                                                   y = L2(P (x - m))

The first step whitens the *intra-class* (matching pair) variability, the second is a PCA rotation of the
whitened training set whose leading ``d`` directions are kept; ``P C_S P^T = I_d`` for ``r = 0``. ``P`` does not
depend on which square root of ``C_S^{-1}`` is used (the Cholesky factor of cnnimageretrieval-pytorch's
``whitenlearn`` and the symmetric root used here give the same ``P`` up to the sign of each row), because two
whitening matrices differ by an orthogonal factor that the PCA rotation absorbs. Differences from ``whitenlearn``:
``m`` is the mean over the distinct descriptors of both sides of the pairs (``whitenlearn``: over the first
element of every pair, with repetitions), and the rotation covariance is normalised by ``N`` (no effect on ``E``).

**Regularisation** (both fits, argument ``eps``): the eigenvalues are shrunk towards their mean, i.e. the
covariance ``C`` (``C_S`` for Lw) is replaced by ``C + r I`` with ``r = eps * trace(C) / D`` (``eps`` times the
mean eigenvalue, so ``eps`` is scale-free). This bounds the gain ``(lambda_i + r)^{-1/2}`` of the weak (noisy)
directions; ``eps = 0`` gives the exact whitening and is refused when a kept eigenvalue is numerically zero.

Signs: every eigenvector is oriented so that its largest-magnitude component is positive (deterministic output).
All linear algebra is float64 (on the descriptors' device).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..heads.norm import Whitening

__all__ = ["pca_whitening_params", "learned_whitening_params", "fit_pca_whitening", "fit_learned_whitening",
           "save_whitening", "load_whitening", "WHITENING_FILE_FORMAT"]

WHITENING_FILE_FORMAT = "aggnets.whitening"
_FILE_VERSION = 1
_DEFAULT_EPS = 1e-6


# --- inputs -----------------------------------------------------------------------------------------------------

def _as_matrix64(x: Any, name: str) -> Tensor:
    """``x`` as a finite (N, D) float64 tensor (numpy arrays and sequences go to the CPU)."""
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            t = torch.from_numpy(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a numeric (N, D) array or tensor, got {type(x).__name__}") from err
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)) or not np.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_dim(dim: int | None, in_dim: int) -> int:
    if dim is None:
        return in_dim
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= in_dim:
        raise ValueError(f"dim must be None or an integer in [1, {in_dim}] (descriptor dimension), got {dim!r}")
    return int(dim)


def _check_pairs(pairs: Any, num: int) -> Tensor:
    """(M, 2) int64 tensor of pairs of distinct descriptor indices in ``[0, num)``."""
    p = pairs.detach().cpu() if isinstance(pairs, Tensor) else torch.from_numpy(np.asarray(pairs))
    if p.dim() != 2 or p.shape[1] != 2 or p.shape[0] == 0:
        raise ValueError(f"pairs must be a non-empty (M, 2) integer array of descriptor indices, got shape "
                         f"{tuple(p.shape)}")
    if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
        raise ValueError(f"pairs must hold integer descriptor indices, got dtype {p.dtype}")
    p = p.to(torch.int64)
    if int(p.min()) < 0 or int(p.max()) >= num:
        raise ValueError(f"pairs: indices must lie in [0, {num}) (number of descriptors), got values in "
                         f"[{int(p.min())}, {int(p.max())}]")
    same = (p[:, 0] == p[:, 1]).nonzero()
    if same.numel():
        r = int(same[0, 0])
        raise ValueError(f"pairs: row {r} pairs descriptor {int(p[r, 0])} with itself (a matching pair needs two "
                         f"different descriptors)")
    return p


def _out_dtype(dtype: torch.dtype | None, descriptors: Any) -> torch.dtype:
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        return dtype
    if isinstance(descriptors, Tensor) and descriptors.is_floating_point():
        return descriptors.dtype
    if isinstance(descriptors, np.ndarray) and descriptors.dtype == np.float64:
        return torch.float64
    return torch.float32


# --- linear algebra ---------------------------------------------------------------------------------------------

def _orient(vectors: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    idx = vectors.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(vectors.gather(0, idx))
    signs[signs == 0] = 1.0
    return vectors * signs


def _eigh_desc(sym: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, clamped at 0) and oriented eigenvectors (columns) of a symmetric PSD matrix."""
    vals, vecs = torch.linalg.eigh(0.5 * (sym + sym.T))
    vals, vecs = vals.flip(0).clamp_min(0.0), vecs.flip(1)
    return vals, _orient(vecs)


def _singular_tol(vals: Tensor, size: int) -> float:
    """Numerical-rank threshold on eigenvalues (as ``numpy.linalg.matrix_rank``)."""
    return float(vals.max()) * size * float(torch.finfo(torch.float64).eps)


def _pca(centred: Tensor, dim: int) -> tuple[Tensor, Tensor, float]:
    """Leading ``dim`` eigenpairs of ``C = centred^T centred / N`` and ``trace(C)``.

    For ``N < D`` the N x N Gram matrix ``G = centred centred^T / N`` is decomposed instead (same nonzero
    eigenvalues; eigenvectors ``u = centred^T v / sqrt(N lambda)``): cheap for high-dimensional descriptors
    (e.g. NetVLAD, D = 32768) fitted on a few thousand images.
    """
    n, d = centred.shape
    trace = float((centred * centred).sum()) / n
    if n >= d:
        vals, vecs = _eigh_desc(centred.T @ centred / n)
        return vals[:dim], vecs[:, :dim], trace
    gvals, gvecs = _eigh_desc(centred @ centred.T / n)
    gvals, gvecs = gvals[:dim], gvecs[:, :dim]
    vecs = centred.T @ gvecs / torch.sqrt(n * gvals).clamp_min(torch.finfo(torch.float64).tiny)
    vecs = vecs / torch.linalg.vector_norm(vecs, dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return gvals, _orient(vecs), trace


def pca_whitening_params(descriptors: Any, dim: int | None = None,
                         eps: float = _DEFAULT_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """Mean ``m`` (D,), projection ``P`` (dim, D) and eigenvalues ``lambda`` (dim,) of PCA whitening (float64).

    ``P = diag(lambda_i + r)^{-1/2} U^T`` for the ``dim`` leading principal directions ``U`` of the (1/N)
    covariance of ``descriptors`` (N, D), with ``r = eps * trace(C) / D`` (see the module docstring).

    Raises:
        ValueError: non-2-D / empty / non-finite ``descriptors``; ``dim`` out of ``[1, D]``; fewer than ``dim + 1``
            descriptors (a centred set of N points spans at most N - 1 directions); ``eps < 0``; ``eps = 0`` with a
            numerically zero kept eigenvalue.
    """
    x = _as_matrix64(descriptors, "descriptors")
    n, d = x.shape
    dim = _check_dim(dim, d)
    eps = _check_eps(eps)
    if n < dim + 1:
        raise ValueError(f"descriptors: PCA whitening to dim={dim} needs at least {dim + 1} descriptors (N centred "
                         f"points span at most N - 1 directions), got N={n}; lower dim or add descriptors")
    mean = x.mean(dim=0)
    vals, vecs, trace = _pca(x - mean, dim)
    if trace <= 0:
        raise ValueError("descriptors: all descriptors are identical (zero covariance), nothing to whiten")
    shift = eps * trace / d
    if eps == 0 and float(vals[-1]) <= _singular_tol(vals, d):
        raise ValueError(f"descriptors: the covariance is singular within the kept dim={dim} directions "
                         f"(eigenvalue {float(vals[-1]):.3g}); pass eps > 0 or a smaller dim")
    projection = vecs.T / torch.sqrt(vals + shift)[:, None]
    return mean, projection, vals


def learned_whitening_params(descriptors: Any, pairs: Any, dim: int | None = None,
                             eps: float = _DEFAULT_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """Mean ``m`` (D,), projection ``P`` (dim, D) and rotation eigenvalues ``mu`` (dim,) of learned whitening Lw.

    Radenović, Tolias & Chum (ECCV 2016, TPAMI 2018): ``P = E^T (C_S + r I)^{-1/2}`` (see the module docstring),
    ``descriptors`` (N, D) being the whole training set and ``pairs`` (M, 2) the indices of matching pairs.

    Raises:
        ValueError: bad ``descriptors``; ``pairs`` not (M, 2) integers, out of ``[0, N)`` or pairing a descriptor
            with itself; ``dim`` out of ``[1, D]``; fewer than ``dim`` descriptors; ``eps < 0``; ``eps = 0`` with
            a singular pair-difference covariance ``C_S`` (fewer than D independent pair differences).
    """
    x = _as_matrix64(descriptors, "descriptors")
    n, d = x.shape
    p = _check_pairs(pairs, n).to(x.device)
    dim = _check_dim(dim, d)
    eps = _check_eps(eps)
    if n < dim:
        raise ValueError(f"descriptors: learned whitening to dim={dim} needs at least {dim} descriptors for the "
                         f"PCA rotation, got N={n}; lower dim or add descriptors")
    mean = x[torch.unique(p)].mean(dim=0)
    diff = x[p[:, 0]] - x[p[:, 1]]
    cov_s = diff.T @ diff / p.shape[0]
    svals, svecs = _eigh_desc(cov_s)
    trace = float(svals.sum())
    if trace <= 0:
        raise ValueError("pairs: every pair joins identical descriptors (zero pair-difference covariance)")
    if eps == 0 and float(svals[-1]) <= _singular_tol(svals, d):
        raise ValueError(f"pairs: the covariance of the {p.shape[0]} pair differences is singular in D={d} "
                         f"dimensions (needs at least D independent differences); pass eps > 0 or more pairs")
    p_w = (svecs / torch.sqrt(svals + eps * trace / d)) @ svecs.T  # symmetric (C_S + r I)^{-1/2}
    z = (x - mean) @ p_w.T
    rvals, rvecs = _eigh_desc(z.T @ z / n)
    projection = rvecs[:, :dim].T @ p_w
    return mean, projection, rvals[:dim]


# --- modules ----------------------------------------------------------------------------------------------------

def _module(mean: Tensor, projection: Tensor, normalize: bool, dtype: torch.dtype,
            kind: str) -> Whitening:
    layer = Whitening(projection.shape[1], projection.shape[0], normalize=normalize)
    layer = layer.to(device=projection.device, dtype=dtype)
    layer.load_mean_projection(mean, projection)  # bias = -P m computed in float64, then rounded once
    layer.whitening_kind = kind
    return layer


def fit_pca_whitening(descriptors: Any, dim: int | None = None, eps: float = _DEFAULT_EPS,
                      normalize: bool = True, dtype: torch.dtype | None = None) -> Whitening:
    """PCA whitening ``y = L2(diag(lambda + r)^{-1/2} U^T (x - m))`` fitted on ``descriptors`` (N, D).

    Args:
        descriptors: (N, D) training descriptors (numpy array or torch tensor, any device).
        dim: number of leading principal components kept (output dimension); ``None``: D.
        eps: relative eigenvalue shrinkage ``r = eps * mean eigenvalue`` (0: exact whitening).
        normalize: final L2 normalisation in the module.
        dtype: parameter dtype of the module; ``None``: the descriptors' floating dtype (float32 otherwise).

    Returns:
        A :class:`~aggnets.heads.Whitening` (``weight = P``, ``bias = -P m``) on the descriptors' device, with the
        attribute ``whitening_kind = "pca"``.
    """
    mean, projection, _ = pca_whitening_params(descriptors, dim, eps)
    return _module(mean, projection, normalize, _out_dtype(dtype, descriptors), "pca")


def fit_learned_whitening(descriptors: Any, pairs: Any, dim: int | None = None, eps: float = _DEFAULT_EPS,
                          normalize: bool = True, dtype: torch.dtype | None = None) -> Whitening:
    """Learned whitening Lw (Radenović, Tolias & Chum) ``y = L2(E^T C_S^{-1/2} (x - m))`` from matching pairs.

    Args:
        descriptors: (N, D) training descriptors.
        pairs: (M, 2) integer indices into ``descriptors`` of matching (positive) pairs.
        dim: number of leading rotation directions kept; ``None``: D.
        eps: relative shrinkage of ``C_S``: ``C_S + eps * (trace(C_S) / D) I`` (0: exact).
        normalize: as in :func:`fit_pca_whitening`.
        dtype: as in :func:`fit_pca_whitening`.

    Returns:
        A :class:`~aggnets.heads.Whitening` with ``whitening_kind = "learned"``.
    """
    mean, projection, _ = learned_whitening_params(descriptors, pairs, dim, eps)
    return _module(mean, projection, normalize, _out_dtype(dtype, descriptors), "learned")


# --- files ------------------------------------------------------------------------------------------------------

def save_whitening(module: Whitening, path: str | os.PathLike, kind: str | None = None) -> None:
    """Save a :class:`~aggnets.heads.Whitening` to ``path`` with ``torch.save``, loadable with ``weights_only=True``.

    The file holds ``{"format": "aggnets.whitening", "version": 1, "state_dict": {"weight", "bias"},
    "meta": {"kind", "dim", "in_dim", "normalize"}}`` (tensors, strings, ints and bools only). ``kind``: defaults to
    the module's ``whitening_kind`` attribute (set by the fit functions), else ``"custom"``.
    """
    if not isinstance(module, Whitening):
        raise ValueError(f"module must be an aggnets.heads.Whitening, got {type(module).__name__}")
    kind = getattr(module, "whitening_kind", "custom") if kind is None else kind
    if not isinstance(kind, str):
        raise ValueError(f"kind must be a string, got {kind!r}")
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    payload = {
        "format": WHITENING_FILE_FORMAT, "version": _FILE_VERSION, "state_dict": state,
        "meta": {"kind": kind, "dim": int(module.out_features), "in_dim": int(module.in_features),
                 "normalize": bool(module.normalize)},
    }
    torch.save(payload, os.fspath(path))


def load_whitening(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Whitening:
    """Load a :class:`~aggnets.heads.Whitening` saved by :func:`save_whitening` (``torch.load(weights_only=True)``).

    The parameters keep their saved dtype, so outputs are bit-identical to the saved module's.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a whitening file, wrong/missing keys (named), or tensor shapes that contradict the
            metadata.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no whitening file at {path!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling / zip errors: not a (safe) torch file
        raise ValueError(f"path: {path!r} is not a readable weights-only torch file: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != WHITENING_FILE_FORMAT:
        raise ValueError(f"path: {path!r} is not an aggnets whitening file (format key "
                         f"{payload.get('format') if isinstance(payload, dict) else None!r})")
    if payload.get("version") != _FILE_VERSION:
        raise ValueError(f"path: unsupported whitening file version {payload.get('version')!r}")
    state, meta = payload.get("state_dict"), payload.get("meta")
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise ValueError(f"path: {path!r} lacks the 'state_dict' or 'meta' entry")
    _check_keys(set(state), {"weight", "bias"}, "state_dict")
    _check_keys(set(meta), {"kind", "dim", "in_dim", "normalize"}, "meta")
    weight, bias = state["weight"], state["bias"]
    dim, in_dim = meta["dim"], meta["in_dim"]
    if not (isinstance(weight, Tensor) and isinstance(bias, Tensor)) or tuple(weight.shape) != (dim, in_dim) \
            or tuple(bias.shape) != (dim,):
        raise ValueError(f"path: tensor shapes weight {tuple(getattr(weight, 'shape', ()))}, bias "
                         f"{tuple(getattr(bias, 'shape', ()))} do not match meta dim={dim}, in_dim={in_dim}")
    layer = Whitening(int(in_dim), int(dim), normalize=bool(meta["normalize"]))
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    layer.load_state_dict(state)
    layer.whitening_kind = str(meta["kind"])
    return layer


def _check_keys(found: set, expected: set, what: str) -> None:
    if found != expected:
        raise ValueError(f"{what}: mismatched keys: missing {sorted(expected - found)}, unexpected "
                         f"{sorted(found - expected)}")

