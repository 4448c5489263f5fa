"""Evaluation library: well profiles, normalisation, replicate retrieval (NSB/NSS/NSP top-k) and mAP.

Pure functions over a metadata frame plus a feature matrix; the evaluation job does the I/O. Plots
live in `micon.eval.plots` (imported on demand, it pulls in matplotlib).
"""
from micon.eval.map import (average_precision, benjamini_hochberg, fraction_retrieved, mean_average_precision,
                            phenotypic_activity, phenotypic_consistency)
from micon.eval.profiles import aggregate_wells, fit_spherize, mad_robustize, negcon_mask, spherize
from micon.eval.retrieval import topk_hit_rate, topk_hit_rate_ray, topk_neighbours

__all__ = [
    "aggregate_wells", "mad_robustize", "fit_spherize", "spherize", "negcon_mask",
    "topk_hit_rate", "topk_hit_rate_ray", "topk_neighbours",
    "average_precision", "mean_average_precision", "benjamini_hochberg", "fraction_retrieved",
    "phenotypic_activity", "phenotypic_consistency",
]
