"""Initialise the codebook heads from sampled local descriptors (k-means for NetVLAD / NetBoF / VLAD / BoF, a
diagonal GMM for NetFV / FisherVector) — the step that makes a NetVLAD layer start as VLAD instead of noise."""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["init_head_from_descriptors", "auto_alpha", "fit_head_codebook"]

_TOP_RATIO = 0.01  # NOTES.md: alpha makes the second-best assignment ~1 % of the best on average


def auto_alpha(descriptors: Tensor, centroids: Tensor, scheme: str = "distance", chunk_size: int = 65536,
               distributed: Optional[bool] = None) -> float:
    """``alpha = -log(0.01) / mean_n(s1_n - s2_n)``: the sharpness at which, on average, the second-closest
    centroid gets 1 % of the closest one's assignment. ``scheme="cosine"``: ``s`` = dot products with the unit
    centroids (the pytorch-NetVlad init, NOTES.md); ``"distance"``: ``s = -||x - c||^2``, so that
    ``softmax_k(-alpha ||x - c_k||^2)`` has the same top-1 / top-2 ratio. Under ``torch.distributed`` the mean is
    over every rank's descriptors."""
    from .distributed import all_reduce_sum, resolve_distributed
    if len(centroids) < 2:
        return 1.0
    gaps = []
    centroids = centroids.to(descriptors.device, torch.float32)
    unit = nn.functional.normalize(centroids, dim=1)
    for chunk in descriptors.split(chunk_size):
        chunk = chunk.float()
        if scheme == "cosine":
            scores = chunk @ unit.T
        else:
            scores = 2 * chunk @ centroids.T - centroids.pow(2).sum(1) - chunk.pow(2).sum(1, keepdim=True)
        top = scores.topk(2, dim=1).values
        gaps.append((top[:, 0] - top[:, 1]).double())
    gaps = torch.cat(gaps)
    totals = all_reduce_sum(torch.stack([gaps.sum(), torch.tensor(float(len(gaps)), device=gaps.device,
                                                                  dtype=torch.float64)]), resolve_distributed(distributed))
    gap = float(totals[0] / totals[1])
    if not gap > 0:
        raise ValueError("cannot choose alpha: every descriptor is equally close to its two nearest centroids")
    return -math.log(_TOP_RATIO) / gap


def init_head_from_descriptors(head: nn.Module, descriptors: Any, *, scheme: Optional[str] = None,
                               alpha: Union[float, str, None] = "auto", engine: str = "torch", iters: Optional[int] = None,
                               seed: int = 0, progress: bool = False, **fit_kwargs: Any) -> dict:
    """Fit ``head``'s codebook to ``descriptors`` (N, C) and load it; returns a summary dict (alpha, inertia /
    log-likelihood, engine, seconds).

    NetVLAD / NetBoF (and VLAD / BoF): k-means centroids (of the L2-normalised descriptors when the head normalises
    its input). ``scheme="distance"`` (default): ``w_k = 2 alpha c_k``, ``b_k = -alpha ||c_k||^2``;
    ``scheme="cosine"``: ``w_k = alpha c_k/||c_k||``, ``b = 0`` (pytorch-NetVlad). ``alpha="auto"`` picks it from the
    data (:func:`auto_alpha`), a number sets it, None keeps the head's ``default_alpha``; the classical heads stay
    hard (alpha = inf). NetFV / FisherVector: a diagonal GMM fitted by EM from a k-means start.
    Ghost clusters (NetVLAD ``ghost_clusters=G``): k-means with K + G centroids; the first K set the clusters (and
    the ``centroids`` of a residual NetVLAD), the last G the ghosts' assignment rows (as the GhostVLAD / SuperVLAD
    code does); ``alpha="auto"`` looks at all K + G. A head without an assignment bias defaults to
    ``scheme="cosine"`` (``"distance"`` needs the bias).
    Under ``torch.distributed`` pass each rank's own descriptors; all ranks end with the same parameters.
    """
    from .gmm import fit_gmm
    from .kmeans import fit_kmeans

    kind = getattr(getattr(head, "capabilities", None), "codebook", "none")
    if kind == "none":
        raise TypeError(f"{type(head).__name__} has no codebook to initialise (its capabilities.codebook is 'none'; "
                        "codebook heads: NetVLAD, NetBoF, NetFV, VLAD, BoF, FisherVector)")
    descriptors = torch.as_tensor(descriptors)
    in_channels = getattr(head, "in_channels", None)
    if descriptors.dim() != 2 or descriptors.shape[1] != in_channels:
        raise ValueError(f"{type(head).__name__}: descriptors must have shape (N, {in_channels}), "
                         f"got {tuple(descriptors.shape)}")
    k = head.num_clusters
    ghosts = int(getattr(head, "ghost_clusters", 0))
    iteration_kwargs = {} if iters is None else {"iters": iters}
    if kind == "gmm":
        from .gmm import GMM_ENGINES
        start = None
        if engine not in GMM_ENGINES:  # a k-means-only engine (faiss): it gives the start, EM runs in torch
            start = fit_kmeans(descriptors, k, engine=engine, seed=seed)
        gmm = fit_gmm(descriptors, k, engine=engine if start is None else "torch", init=start, seed=seed,
                      progress=progress, **iteration_kwargs, **fit_kwargs)
        head.load_gmm(gmm.weights, gmm.means, gmm.variances)
        return {"engine": gmm.engine, "log_likelihood": gmm.log_likelihood, "n_iter": gmm.n_iter,
                "seconds": gmm.seconds}
    if head.normalize_input:
        descriptors = nn.functional.normalize(descriptors.float(), dim=1)
    metric = getattr(head, "metric", "euclidean")  # VLAD(metric="cosine"): AnyLoc's cosine k-means
    if metric != "euclidean":
        fit_kwargs.setdefault("metric", metric)
    result = fit_kmeans(descriptors, k + ghosts, engine=engine, seed=seed, progress=progress, **iteration_kwargs,
                        **fit_kwargs)
    centroids = result.centroids
    if head.frozen:
        chosen_alpha, scheme = float("inf"), "cosine" if metric == "cosine" else "distance"
    else:
        has_bias = getattr(getattr(head, "assign", None), "bias", None) is not None
        scheme = scheme or ("distance" if has_bias else "cosine")
        if alpha == "auto":
            chosen_alpha = auto_alpha(descriptors, centroids, scheme)
        elif alpha is None:
            chosen_alpha = float(head.default_alpha)
        else:
            chosen_alpha = float(alpha)
    device = next(head.parameters()).device
    centroids = centroids.to(device, torch.float64)
    if ghosts > 0:
        head.load_centroids(centroids[:k], chosen_alpha, scheme, ghost_centroids=centroids[k:])
    else:
        head.load_centroids(centroids, chosen_alpha, scheme)
    return {"engine": result.engine, "inertia": result.inertia, "n_iter": result.n_iter, "alpha": chosen_alpha,
            "scheme": scheme, "seconds": result.seconds}


def fit_head_codebook(head: nn.Module, backbone: nn.Module, loader: Iterable, *, per_image: Optional[int] = 200,
                      max_descriptors: Optional[int] = 1_000_000, device: Any = None, progress: bool = True,
                      seed: int = 0, **init_kwargs: Any) -> dict:
    """One call: sample descriptors of ``loader`` through ``backbone`` (:func:`sample_descriptors`) and
    :func:`init_head_from_descriptors`. The descriptors stay on ``device`` (the backbone's) for the fit."""
    from .sampling import sample_descriptors
    if device is None:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    descriptors = sample_descriptors(backbone, loader, per_image=per_image, max_descriptors=max_descriptors,
                                     device=device, seed=seed, progress=progress, store_device=device)
    init = getattr(head, "init_from_descriptors", None)  # a spatial pyramid hands the fit to its wrapped head
    if callable(init):
        summary = init(descriptors, seed=seed, progress=progress, **init_kwargs)
    else:
        summary = init_head_from_descriptors(head, descriptors, seed=seed, progress=progress, **init_kwargs)
    summary["descriptors"] = len(descriptors)
    return summary
