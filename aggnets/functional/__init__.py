"""Pure functions behind :mod:`aggnets.heads`: usable on any (B, C, H, W) feature map without building a module."""
from .checks import check_feature_map
from .codebook import (assign, assignment_statistics, fisher_vector, gmm_assignment, gmm_log_posteriors, netbof,
                       netfv, netvlad)
from .masking import flatten_positions, map_valid_boxes, valid_boxes, zero_masked
from .norm import accumulation_dtype, intra_normalize, l2_normalize, signed_power
from .pooling import crow, gem, mac, spoc
from .regions import region_max, region_sums, rmac, rmac_regions
from .pyramid import pyramid_cells
from .crn import context_pool, crn, crn_context
from .convap import convap, convap_cell_weights
from .cosplace import cosplace
from .mixvpr import feature_mix, mixvpr
from .precision import flush_tiny, linear_full_range
from .dropout import dropout_keep, relu_dropout
from .salad import salad, salad_plan, salad_scores_and_features, sinkhorn_dustbin
from .boq import attention_weights, multi_head_attention

__all__ = [
    "accumulation_dtype", "assign", "assignment_statistics", "gmm_assignment", "check_feature_map", "crow", "fisher_vector", "flatten_positions", "gem",
    "gmm_log_posteriors", "intra_normalize", "l2_normalize", "mac", "map_valid_boxes", "netbof", "netfv", "netvlad",
    "pyramid_cells", "region_max", "region_sums", "rmac", "rmac_regions", "signed_power", "spoc", "valid_boxes", "zero_masked",
]
__all__ += ["convap", "convap_cell_weights", "linear_full_range", "cosplace", "feature_mix", "mixvpr"]
__all__ += ["crn", "crn_context", "context_pool", "flush_tiny"]
__all__ += ["dropout_keep", "relu_dropout", "salad", "salad_plan", "salad_scores_and_features", "sinkhorn_dustbin", "attention_weights", "multi_head_attention"]
