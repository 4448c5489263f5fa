"""Ingest's site path against the code it replaced (bench/bench_ingest.py keeps it verbatim): the same
images within one grey level, on random and rendered sites, with and without illumination functions,
resized, cropped or kept; the partial-sort percentiles equal np.percentile."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from bench.bench_ingest import make_sites, process_site_before
from micon.data.imaging import illumination_gain, percentiles, process_site


@pytest.mark.parametrize("seed", range(5))
def test_percentiles_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    x = rng.normal(size=n).astype(np.float32) if seed % 2 else rng.integers(0, 7, n).astype(np.float32)  # ties
    qs = (0.0, 0.1, float(rng.uniform(0, 100)), 99.9, 100.0)
    np.testing.assert_allclose(percentiles(x.reshape(1, -1), qs), np.percentile(x, qs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size,stored,resize,with_illum", [(200, 64, "area", True), (200, 64, "area", False),
                                                             (150, 150, "area", True), (150, 0, "area", True),
                                                             (200, 96, "crop", True), (97, 40, "area", True)])
def test_sites_equal_the_replaced_code_within_one_grey_level(tmp_path, size, stored, resize, with_illum):
    sites, illum = make_sites(tmp_path, 3, size, seed=size + stored)
    if not with_illum:
        illum = [None] * 5
    gains = [None if i is None else illumination_gain(i) for i in illum]
    for paths in sites:
        before = process_site_before(paths, illum, stored, resize)
        now, shape = process_site(paths, gains, "p", "w", "1", stored, resize, 0.1, 99.9)
        assert now.dtype == np.uint8 and now.shape == before.shape and shape == (size, size)
        diff = np.abs(now.astype(int) - before.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01


def test_rendered_sites_equal_the_replaced_code_within_one_grey_level(tmp_path):
    from micon.synth import design_screen, render_well_sites, resolve_config

    cfg = resolve_config(["preset=tiny", "image_size=160"])
    screen = design_screen(cfg)
    w = screen.wells.iloc[3]
    raw = next(iter(render_well_sites(screen, w.Metadata_Plate, w.Metadata_Well, w.Metadata_JCP2022, range(1, 2))))
    paths = []
    for c, channel in enumerate(raw):
        paths.append(str(tmp_path / f"c{c}.tiff"))
        tifffile.imwrite(paths[-1], channel.astype(np.uint16))
    rng = np.random.default_rng(0)
    illum = [(0.8 + 0.4 * rng.random((160, 160))).astype(np.float32) for _ in paths]   # rough, not smooth
    before = process_site_before(paths, illum, 64)
    now, _ = process_site(paths, [illumination_gain(i) for i in illum], "p", "w", "1", 64, "area", 0.1, 99.9)
    assert np.abs(now.astype(int) - before.astype(int)).max() <= 1
