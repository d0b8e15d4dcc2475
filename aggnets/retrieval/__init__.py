"""Retrieval evaluation: exact k-NN search, revisited Oxford/Paris mAP and mP@k, place-recognition recall@N.

All functions are plain numpy/torch (faiss optional), independent of any training framework.
"""
from .evaluation import (AP_VARIANTS, REVISITED_SETTINGS, RefusedGlobalError, RevisitedGroundTruth,
                         average_precision, evaluate_revisited, load_revisited_gnd, load_utm_csv,
                         parse_utm_from_filename, positions_from_filenames, positive_positions, precision_at_k,
                         recall_at_n, revisited_per_query, revisited_split)
from .search import KNN_ENGINES, KNN_METRICS, as_ranking, knn, ranking_from_scores, resolve_kind
from .query_expansion import alpha_query_expansion, average_query_expansion, database_side_augmentation
from .whitening import (fit_learned_whitening, fit_pca_whitening, learned_whitening_params, load_whitening,
                        pca_whitening_params, save_whitening)

__all__ = [
    "AP_VARIANTS", "REVISITED_SETTINGS", "KNN_ENGINES", "KNN_METRICS", "RefusedGlobalError", "RevisitedGroundTruth",
    "average_precision", "evaluate_revisited", "load_revisited_gnd", "load_utm_csv", "parse_utm_from_filename",
    "positions_from_filenames", "positive_positions", "precision_at_k", "recall_at_n", "revisited_per_query",
    "revisited_split", "as_ranking", "knn", "ranking_from_scores", "resolve_kind",
]

# post-processing: whitening fitted from descriptors, query expansion / database-side augmentation
__all__ += [
    "alpha_query_expansion", "average_query_expansion", "database_side_augmentation", "fit_learned_whitening",
    "fit_pca_whitening", "learned_whitening_params", "load_whitening", "pca_whitening_params", "save_whitening",
]

# descriptor extraction: native-aspect loading, padded + masked batching, multi-scale, descriptor files
from .extraction import (BATCHING_MODES, DESCRIPTORS_FILE_FORMAT, LoadedDescriptors, extract_descriptors,
                         feature_mask, load_descriptors, load_image, masking_problem, pad_batch, save_descriptors)

__all__ += [
    "BATCHING_MODES", "DESCRIPTORS_FILE_FORMAT", "LoadedDescriptors", "extract_descriptors", "feature_mask",
    "load_descriptors", "load_image", "masking_problem", "pad_batch", "save_descriptors",
]
