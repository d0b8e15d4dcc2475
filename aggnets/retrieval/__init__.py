"""Retrieval: descriptor extraction (native aspect, padded + masked batches, multi-scale), whitening fitted from
descriptors (PCA, learned Lw), query expansion, exact k-NN search, and the evaluation protocols (revisited
Oxford / Paris mAP and mP@k, place-recognition recall@N on the field's sets in their folder and index layouts, and a folder of
own images with a CSV of query/positive pairs: mAP and recall@k). Plain numpy / torch (faiss optional)."""
from .evaluation import (AP_VARIANTS, REVISITED_SETTINGS, RefusedGlobalError, RevisitedGroundTruth,
                         average_precision, evaluate_revisited, load_revisited_gnd, load_utm_csv,
                         parse_utm_from_filename, positions_from_filenames, positive_positions, precision_at_k,
                         recall_at_n, revisited_per_query, revisited_split)
from .extraction import (BATCHING_MODES, DESCRIPTORS_FILE_FORMAT, LoadedDescriptors, extract_descriptors,
                         feature_mask, load_descriptors, load_image, masking_problem, pad_batch, save_descriptors)
from .pairs import (IMAGE_EXTENSIONS, PairsGroundTruth, chance_level, evaluate_pairs, load_pairs_csv,
                    pairs_per_query, scan_images)
from .place_sets import PlaceSet, folder_place_set, index_place_set, radius_positives, recall_at_n_positives
from .query_expansion import alpha_query_expansion, average_query_expansion, database_side_augmentation
from .search import KNN_ENGINES, KNN_METRICS, approximate_knn, as_ranking, knn, ranking_from_scores, resolve_kind
from .whitening import (fit_learned_whitening, fit_pca_whitening, learned_whitening_params, load_whitening,
                        pca_whitening_params, save_whitening)

__all__ = [
    # extraction
    "BATCHING_MODES", "DESCRIPTORS_FILE_FORMAT", "LoadedDescriptors", "extract_descriptors", "feature_mask",
    "load_descriptors", "load_image", "masking_problem", "pad_batch", "save_descriptors",
    # post-processing
    "fit_learned_whitening", "fit_pca_whitening", "learned_whitening_params", "load_whitening",
    "pca_whitening_params", "save_whitening", "alpha_query_expansion", "average_query_expansion",
    "database_side_augmentation",
    # search and evaluation
    "KNN_ENGINES", "KNN_METRICS", "approximate_knn", "as_ranking", "knn", "ranking_from_scores", "resolve_kind", "AP_VARIANTS",
    "REVISITED_SETTINGS", "RefusedGlobalError", "RevisitedGroundTruth", "average_precision", "evaluate_revisited",
    "load_revisited_gnd", "load_utm_csv", "parse_utm_from_filename", "positions_from_filenames",
    "positive_positions", "precision_at_k", "recall_at_n", "revisited_per_query", "revisited_split",
    # place-recognition sets in the folder and index layouts
    "PlaceSet", "folder_place_set", "index_place_set", "radius_positives", "recall_at_n_positives",
    # own images + CSV of pairs
    "IMAGE_EXTENSIONS", "PairsGroundTruth", "chance_level", "evaluate_pairs", "load_pairs_csv", "pairs_per_query", "scan_images",
]
