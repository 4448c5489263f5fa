"""Named featurisers: encoders that are not trained networks, registered beside the learned checkpoints.

    ./launch.sh embed cellprofiler SHARDS OUT      (a name from FEATURISERS instead of a checkpoint)

Each has `name`, `description`, `feature_names(channels)`, `settings()` (what decides its numbers) and
`embed(sites, channels)`: uint8 sites [N, C, H, W] -> [N, D] float32, columns in feature-name order.
"""
from __future__ import annotations

from micon.eval.cellprofiler import CELLPROFILER, FULL, CellProfilerFeaturiser
from micon.eval.handcrafted import ImageStatistics

FEATURISERS = {
    "cellprofiler": lambda: CellProfilerFeaturiser(CELLPROFILER),     # the baseline every comparison uses
    "cellprofiler_full": lambda: CellProfilerFeaturiser(FULL),        # everything, at CellProfiler's defaults
    "image_stats": ImageStatistics,                                   # whole-image statistics, no objects
}
DEFAULT = "cellprofiler"


def get_featuriser(name: str):
    if name not in FEATURISERS:
        raise KeyError(f"no featuriser {name!r}; featurisers: {', '.join(FEATURISERS)} (or give a checkpoint path)")
    return FEATURISERS[name]()
