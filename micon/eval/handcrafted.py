"""Hand-crafted per-site features, a CellProfiler-like baseline: intensity statistics, texture and
simple object measures per channel, computed from the same 8-bit sites the networks see.

Pure NumPy/SciPy on arrays; the embedding job runs it in place of an image encoder.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

INTENSITY = ("mean", "std", "p05", "p25", "p50", "p75", "p95", "skew")
TEXTURE = ("gradient_mean", "laplacian_var", "glcm_contrast_1", "glcm_contrast_4", "fraction_bright")
OBJECTS = ("nuclei_count", "nuclei_area_mean", "nuclei_area_std", "nuclei_intensity_mean", "nuclei_eccentricity")


def feature_names(channels) -> list[str]:
    names = [f"{ch}_{f}" for ch in channels for f in INTENSITY + TEXTURE]
    return names + [f"DNA_{f}" for f in OBJECTS]


def _otsu(img: np.ndarray) -> float:
    hist = np.bincount(img.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    return float(np.argmax(between))


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
        contrast = [float(((x[:, d:] - x[:, :-d]) ** 2).mean() + ((x[d:] - x[:-d]) ** 2).mean()) / 2 for d in (1, 4)]
        out += [m, s, *q, skew, float(np.hypot(gx, gy).mean()), float(lap.var()), *contrast,
                float((x > q[3] + 1.5 * (q[3] - q[1] + 1)).mean())]
    dna = site[dna_channel]
    mask = dna > max(_otsu(dna), 1)
    labels, n = ndimage.label(mask)
    if n:
        idx = np.arange(1, n + 1)
        areas = ndimage.sum(mask, labels, idx)
        inten = ndimage.mean(dna.astype(np.float32), labels, idx)
        ecc = []
        for sl in ndimage.find_objects(labels):
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            ecc.append(1 - min(h, w) / max(h, w))
        out += [float(n), float(areas.mean()), float(areas.std()), float(inten.mean()), float(np.mean(ecc))]
    else:
        out += [0.0] * len(OBJECTS)
    return np.asarray(out, np.float32)
