"""Ingest's site path against the original code (bench/bench_ingest.py keeps it verbatim) and against the
scaling rule written directly in NumPy: the same images within one grey level, on random and rendered sites,
with and without illumination functions, resized, cropped or kept; the histogram percentiles equal
np.percentile; the sparse BOX shrink equals PIL's BOX resize."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from bench.bench_ingest import make_sites, process_site_before
from micon.data.imaging import box_shrink, illumination_gain, percentiles, process_site


@pytest.mark.parametrize("seed", range(5))
def test_percentiles_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    x = rng.normal(size=n).astype(np.float32) if seed % 2 else rng.integers(0, 7, n).astype(np.float32)  # ties
    qs = (0.0, 0.1, float(rng.uniform(0, 100)), 99.9, 100.0)
    np.testing.assert_allclose(percentiles(x.reshape(1, -1), qs), np.percentile(x, qs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_histogram_percentiles_equal_numpy_on_hard_inputs(seed):
    """Exactly np.percentile's numbers whatever the dtype, with heavy ties, with nearly every value in one
    histogram bin (a far outlier), with a constant image and with two values."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 70_000))
    kind = seed % 6
    if kind == 0:
        x = rng.gamma(2.0, 120.0, n).astype(np.float32)
    elif kind == 1:
        x = rng.gamma(2.0, 120.0, n)                                      # float64
    elif kind == 2:
        x = rng.integers(0, 65536, n).astype(np.uint16)
    elif kind == 3:
        x = rng.normal(size=n).astype(np.float32)
        x[rng.integers(0, n)] = 1e9                                       # the rest share one bin
    elif kind == 4:
        x = np.full(n, 3.25, np.float32)
    else:
        x = rng.choice(np.array([-1.5, 7.0], np.float32), n)
    qs = (0.0, 0.1, float(rng.uniform(0, 100)), 50.0, 99.9, 100.0)
    np.testing.assert_allclose(percentiles(x.reshape(-1, 1), qs), np.percentile(x, qs), rtol=1e-6, atol=0)


@pytest.mark.parametrize("h,w,size", [(1080, 1080, 256), (1080, 1080, 224), (970, 1000, 224), (97, 97, 40),
                                     (64, 80, 63), (31, 29, 1), (256, 256, 64)])
def test_box_shrink_equals_pil_box(h, w, size):
    from PIL import Image

    rng = np.random.default_rng(h * w + size)
    raw = rng.integers(0, 65536, (h, w)).astype(np.uint16)
    x = raw.astype(np.float32) * (0.7 + 0.6 * rng.random((h, w))).astype(np.float32)
    for img in (x, raw):
        pil = np.array(Image.fromarray(img.astype(np.float32)).resize((size, size), Image.Resampling.BOX))
        ours = box_shrink(img, size)
        assert ours.dtype == np.float32 and ours.shape == (size, size)
        np.testing.assert_allclose(ours, pil, rtol=2e-6, atol=1e-6 * float(np.abs(pil).max()))


def scaled_site_numpy(channels: list[np.ndarray], illum: list[np.ndarray], factor: int) -> np.ndarray:
    """The scaling rule of the module docstring written out in float64 NumPy: divide by the illumination
    function, average factor x factor blocks (area averaging), clip to the 0.1/99.9 percentiles, map to 0..255."""
    out = []
    for c, ill in zip(channels, illum):
        x = c.astype(np.float64) / np.maximum(ill.astype(np.float64), 1e-6)
        h, w = x.shape
        x = x.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
        lo, hi = np.percentile(x, [0.1, 99.9])
        out.append(np.rint((np.clip(x, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize("source", ["random", "rendered"])
def test_sites_equal_the_rule_in_numpy_within_one_grey_level(tmp_path, source):
    rng = np.random.default_rng(7)
    if source == "random":
        channels = [rng.integers(0, 65536, (256, 256)).astype(np.uint16) if c % 2 else
                    rng.gamma(2.0, 300.0, (256, 256)).astype(np.uint16) for c in range(5)]
    else:
        from micon.synth import render_site

        field = render_site(rng, 256, np.ones(16), cells_per_site=30)
        channels = [np.clip(c * 20_000 + rng.normal(300, 30, c.shape), 0, 65535).astype(np.uint16) for c in field]
    illum = [(0.6 + 0.8 * rng.random((256, 256))).astype(np.float32) for _ in channels]
    paths = []
    for c, channel in enumerate(channels):
        paths.append(str(tmp_path / f"c{c}.tiff"))
        tifffile.imwrite(paths[-1], channel)
    want = scaled_site_numpy(channels, illum, 4)
    now, _ = process_site(paths, [illumination_gain(i) for i in illum], "p", "w", "1", 64, "area", 0.1, 99.9)
    diff = np.abs(now.astype(int) - want.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


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
