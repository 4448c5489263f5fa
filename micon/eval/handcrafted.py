"""Whole-image statistics of a site (featuriser `image_stats`): per channel intensity percentiles, gradient,
Laplacian and mean squared pixel differences, plus DNA blobs above Otsu's threshold. No cells or
compartments: this is not CellProfiler (that is micon.eval.cellprofiler); it is kept as the cheapest
baseline (~8 ms per site) and as the features the first calibration was fitted on. Pure NumPy/SciPy.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

INTENSITY = ("mean", "std", "p05", "p25", "p50", "p75", "p95", "skew")
TEXTURE = ("gradient_mean", "laplacian_var", "sqdiff_1px", "sqdiff_4px", "fraction_bright")
BLOBS = ("blob_count", "blob_area_mean", "blob_area_std", "blob_intensity_mean", "blob_eccentricity")


def feature_names(channels) -> list[str]:
    names = [f"{ch}_{f}" for ch in channels for f in INTENSITY + TEXTURE]
    return names + [f"DNA_{f}" for f in BLOBS]


def _otsu(img: np.ndarray) -> float:
    hist = np.bincount(img.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    return float(np.argmax(between))


def blob_eccentricity(labels: np.ndarray, n: int) -> np.ndarray:
    """Eccentricity of each labelled blob, sqrt(1 - minor^2 / major^2) of the ellipse with the same second
    central moments (scikit-image's and CellProfiler's definition): 0 for a disk, -> 1 for a line."""
    idx = np.arange(1, n + 1)
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    area = ndimage.sum(np.ones(labels.shape), labels, idx)
    cy, cx = ndimage.sum(yy, labels, idx) / area, ndimage.sum(xx, labels, idx) / area
    myy = ndimage.sum(yy ** 2, labels, idx) / area - cy ** 2
    mxx = ndimage.sum(xx ** 2, labels, idx) / area - cx ** 2
    mxy = ndimage.sum(xx * yy, labels, idx) / area - cx * cy
    half_diff = np.sqrt(((myy - mxx) / 2) ** 2 + mxy ** 2)
    big, small = (myy + mxx) / 2 + half_diff, (myy + mxx) / 2 - half_diff
    return np.sqrt(np.clip(1 - np.maximum(small, 0) / np.where(big > 0, big, 1), 0, 1)) * (big > 0)


def site_features(site: np.ndarray, dna_channel: int = 0) -> np.ndarray:
    """[C, H, W] uint8 -> 1-D float32 features (order of `feature_names`)."""
    out = []
    for img in site:
        x = img.astype(np.float32)
        m, s = x.mean(), x.std()
        q = np.percentile(x, [5, 25, 50, 75, 95])
        skew = float(((x - m) ** 3).mean() / max(s ** 3, 1e-6))
        gy, gx = np.gradient(x)
        lap = ndimage.laplace(x)
        # mean squared difference of pixels d apart (horizontal and vertical), not a Haralick contrast
        sqdiff = [float(((x[:, d:] - x[:, :-d]) ** 2).mean() + ((x[d:] - x[:-d]) ** 2).mean()) / 2 for d in (1, 4)]
        out += [m, s, *q, skew, float(np.hypot(gx, gy).mean()), float(lap.var()), *sqdiff,
                float((x > q[3] + 1.5 * (q[3] - q[1] + 1)).mean())]
    dna = site[dna_channel]
    mask = dna > max(_otsu(dna), 1)
    labels, n = ndimage.label(mask)
    if n:
        idx = np.arange(1, n + 1)
        areas = ndimage.sum(mask, labels, idx)
        inten = ndimage.mean(dna.astype(np.float32), labels, idx)
        out += [float(n), float(areas.mean()), float(areas.std()), float(inten.mean()),
                float(blob_eccentricity(labels, n).mean())]
    else:
        out += [0.0] * len(BLOBS)
    return np.asarray(out, np.float32)


class ImageStatistics:
    """The `image_stats` featuriser: uint8 sites [N, C, H, W] -> [N, D] float32."""

    name = "image_stats"
    description = "whole-image intensity and texture statistics per channel plus DNA blobs (no segmentation)"

    def feature_names(self, channels) -> list[str]:
        return feature_names(channels)

    def settings(self) -> dict:
        return {"name": self.name}

    def embed(self, sites: np.ndarray, channels) -> np.ndarray:
        dna = list(channels).index("DNA")
        return np.stack([site_features(s, dna) for s in sites]) if len(sites) else np.zeros((0, len(
            feature_names(channels))), np.float32)
