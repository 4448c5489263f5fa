"""The calibrated synthetic screen behaves like real data for the field's baseline (CellProfiler-grade
features): replicates are harder to find across sources than across batches, and raw profiles give their
source away."""
from __future__ import annotations

import numpy as np
import pytest

from micon.eval.calibration import knn_accuracy, levels, simulate_baseline
from micon.synth import CALIBRATION, resolve_config


def test_knn_accuracy_matches_scikit_learn_on_random_profiles():
    neighbors = pytest.importorskip("sklearn.neighbors")
    model_selection = pytest.importorskip("sklearn.model_selection")
    rng = np.random.default_rng(0)
    for trial in range(3):
        labels = rng.integers(0, 3, 120)
        x = rng.normal(size=(120, 6)) + labels[:, None] * rng.uniform(0.2, 1.0)
        z = (x - x.mean(0)) / x.std(0)
        pred = model_selection.cross_val_predict(neighbors.KNeighborsClassifier(5), z, labels,
                                                 cv=model_selection.LeaveOneOut())
        # sklearn breaks vote ties by the lowest label, ours by the nearest neighbour: allow the rare tie
        assert abs(knn_accuracy(x, labels) - (pred == labels).mean()) <= 0.03


@pytest.mark.slow
def test_calibrated_screen_is_harder_across_sources_and_raw_profiles_separate_by_source():
    cfg = resolve_config(["preset=calibrated_small"])
    wells, raw, prof = simulate_baseline(cfg)          # the CellProfiler-grade baseline, 1,620 sites
    lv = levels(wells, raw, prof)
    assert lv["nss_top10"] < lv["nsb_top10"]
    assert lv["source_knn_raw"] >= 0.9
    assert 0.08 <= lv["nsb_top10"] <= 0.3          # hard, yet far above chance (~0.06 at 810 wells)


def test_without_the_calibrated_effects_sources_are_as_easy_as_batches():
    """The control: switch the effects off and across-source retrieval is no harder (the old screen)."""
    off = {k: 0.0 for k in CALIBRATION if k not in ("active_fraction", "strong_fraction", "well_noise")}
    cfg = resolve_config(["preset=calibrated_small", *(f"{k}={v}" for k, v in off.items())])
    lv = levels(*simulate_baseline(cfg, featuriser="image_stats"))   # cheap features suffice for the control
    assert lv["nss_top10"] >= lv["nsb_top10"] - 0.03
