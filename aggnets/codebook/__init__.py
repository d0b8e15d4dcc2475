"""Codebook fitting for the codebook heads: k-means (NetVLAD / NetBoF / VLAD / BoF) and diagonal GMMs (NetFV /
Fisher vectors), chunked, on any device, data-parallel under ``torch.distributed``; faiss / scikit-learn engines
(optional dependencies, imported lazily) return the same result types for comparison."""
from .gmm import GMM_ENGINES, GMMResult, fit_gmm, gmm_log_likelihood
from .kmeans import KMEANS_ENGINES, KMEANS_METRICS, KMeansResult, assign_nearest, fit_kmeans, kmeans_inertia

from .init import auto_alpha, fit_head_codebook, init_head_from_descriptors
from .sampling import DescriptorReservoir, sample_descriptors

__all__ = ["KMeansResult", "fit_kmeans", "kmeans_inertia", "assign_nearest", "KMEANS_ENGINES", "KMEANS_METRICS",
           "GMMResult", "fit_gmm", "gmm_log_likelihood", "GMM_ENGINES", "DescriptorReservoir",
           "sample_descriptors", "init_head_from_descriptors", "fit_head_codebook", "auto_alpha"]
