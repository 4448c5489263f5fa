"""CellProfiler-grade features of Cell Painting sites: nuclei segmented on DNA, cells grown from them on
the cell stains, cytoplasm = cells - nuclei; each compartment measured with cp-measure (CellProfiler's own
measurement code) and the objects' median taken per site, under CellProfiler's column names
(`Nuclei_AreaShape_Area`, `Cells_Intensity_MeanIntensity_DNA`, `Cytoplasm_Texture_Contrast_ER_3_00_256`,
`Cells_Correlation_Correlation_DNA_RNA`), so pycytominer finds them. Pure functions on arrays, no I/O.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import combinations

import numpy as np
from scipy import ndimage

COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")
GROUPS = ("AreaShape", "Intensity", "Texture", "Granularity", "RadialDistribution", "Correlation", "Neighbors")
# cp-measure keys that are positions in the field, not morphology (CellProfiler's Location_*, pycytominer's
# recipe drops them): never features
POSITION_KEYS = ("Center_", "BoundingBoxMinimum_", "BoundingBoxMaximum_", "SpatialMoment_", "Location_",
                 "ObjectNumber")


@dataclass(frozen=True)
class Segmentation:
    """How objects are found (scikit-image; CellProfiler's IdentifyPrimaryObjects / IdentifySecondaryObjects
    in spirit): Otsu on the smoothed DNA image; touching nuclei split by a watershed of the distance transform
    from its peaks, at least half a typical nucleus radius apart (the median over DNA blobs of their largest
    inner distance: the rule adapts to pixel size); cells grown from the nuclei by a watershed of the cell
    stains' gradient inside their foreground (a fraction of Otsu's threshold, so dim cytoplasm edges count)."""

    nucleus_channel: str = "DNA"
    cell_channels: tuple[str, ...] = ("AGP", "RNA")
    smoothing: float = 1.0            # Gaussian sigma (px) before thresholding
    nucleus_min_area: int = 6         # px; smaller DNA blobs are debris
    declump: float = 0.5              # peaks closer than this x the typical nucleus radius seed one nucleus
    cell_threshold: float = 0.5       # x Otsu's threshold of the (mean) cell stain


@dataclass(frozen=True)
class Measure:
    """One cp-measure function on some compartments (and channels, or channel pairs for Correlation).

    `keys` keeps those result keys (cp-measure's names, e.g. "Area", "Intensity_MeanIntensity",
    "Contrast_3_00_256"); None keeps every key except positions. `params` are the function's keyword
    arguments."""

    function: str                                  # a key of _functions(): sizeshape, intensity, texture, ...
    compartments: tuple[str, ...] = COMPARTMENTS
    channels: tuple[str, ...] | None = None        # None: every channel of the site (per-channel functions)
    keys: tuple[str, ...] | None = None
    params: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class FeatureSet:
    name: str
    description: str
    measures: tuple[Measure, ...]
    segmentation: Segmentation = field(default_factory=Segmentation)

    def settings(self) -> dict:
        """Everything that decides the numbers (the embedding identity holds it)."""
        return {"name": self.name, "segmentation": asdict(self.segmentation),
                "measures": [asdict(m) for m in self.measures]}


# ---------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------

def _otsu(x: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(x)) if x.max() > x.min() else float("inf")


def segment(site: np.ndarray, channels, seg: Segmentation = Segmentation()) -> tuple[np.ndarray, ...]:
    """[C, H, W] site -> (nuclei, cells, cytoplasm) int32 label images. Nucleus i lies inside cell i and
    cytoplasm i is cell i without its nucleus (empty when the cell is its nucleus); 0 is background."""
    from skimage.feature import peak_local_max
    from skimage.filters import sobel
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    channels = list(channels)
    for ch in (seg.nucleus_channel, *seg.cell_channels):
        if ch not in channels:
            raise ValueError(f"segmentation needs channel {ch!r}; the site has {channels}")
    dna = ndimage.gaussian_filter(site[channels.index(seg.nucleus_channel)].astype(np.float32), seg.smoothing)
    fg = ndimage.binary_fill_holes(dna > _otsu(dna))
    fg = remove_small_objects(fg, max_size=seg.nucleus_min_area - 1) if fg.any() else fg
    nuclei = np.zeros(dna.shape, np.int32)
    if fg.any():
        blobs, n_blobs = ndimage.label(fg)
        dist = ndimage.distance_transform_edt(fg)
        radius = float(np.median(ndimage.maximum(dist, blobs, np.arange(1, n_blobs + 1))))
        peaks = peak_local_max(dist, min_distance=max(1, int(round(seg.declump * radius))), labels=blobs,
                               exclude_border=False)
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        nuclei = watershed(-dist, markers, mask=fg).astype(np.int32)
        # every foreground component gets a nucleus, even one where no peak was found
        comp, n = ndimage.label(fg & (nuclei == 0))
        if n:
            nuclei[comp > 0] = comp[comp > 0] + nuclei.max()
        nuclei = _relabel(nuclei)
    stain = np.mean([site[channels.index(c)].astype(np.float32) for c in seg.cell_channels], axis=0)
    stain = ndimage.gaussian_filter(stain, seg.smoothing)
    cell_fg = (stain > seg.cell_threshold * _otsu(stain)) | (nuclei > 0)
    cells = watershed(sobel(stain), nuclei, mask=cell_fg).astype(np.int32) if nuclei.any() else nuclei.copy()
    cytoplasm = np.where(nuclei > 0, 0, cells).astype(np.int32)
    return nuclei, cells, cytoplasm


def _relabel(labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels)[0].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# measurement: cp-measure functions, CellProfiler names
# ---------------------------------------------------------------------------------------------

def _functions() -> dict:
    from cp_measure.core import (measurecolocalization as col, measuregranularity as gran,
                                 measureobjectintensity as inten, measureobjectintensitydistribution as rad,
                                 measureobjectsizeshape as shape, measuretexture as tex)
    from cp_measure.multimask.measureobjectneighbors import measureobjectneighbors

    return {
        # name: (function, CellProfiler category, kind)  kind: shape | channel | pair | neighbors
        "sizeshape": (shape.get_sizeshape, "AreaShape", "shape"),
        "zernike": (shape.get_zernike, "AreaShape", "shape"),
        "feret": (shape.get_feret, "AreaShape", "shape"),
        "intensity": (inten.get_intensity, "Intensity", "channel"),
        "texture": (tex.get_texture, "Texture", "channel"),
        "granularity": (gran.get_granularity, "Granularity", "channel"),
        "radial_distribution": (rad.get_radial_distribution, "RadialDistribution", "channel"),
        "pearson": (col.get_correlation_pearson, "Correlation", "pair"),
        "overlap": (col.get_correlation_overlap, "Correlation", "pair"),
        "manders_fold": (col.get_correlation_manders_fold, "Correlation", "pair"),
        "rwc": (col.get_correlation_rwc, "Correlation", "pair"),
        "costes": (col.get_correlation_costes, "Correlation", "pair"),
        "neighbors": (lambda labels, **kw: measureobjectneighbors(labels, labels, **kw), "Neighbors", "neighbors"),
    }


# CellProfiler's names of cp-measure's correlation keys: "_1" is first channel vs second, "_2" the reverse
_PAIR_NAMES = {"Correlation_Pearson": "Correlation", "Correlation_Slope": "Slope", "Correlation_Overlap": "Overlap",
               "Correlation_K": "K", "Correlation_Manders": "Manders", "Correlation_RWC": "RWC",
               "Correlation_Costes": "Costes"}


def cellprofiler_name(compartment: str, category: str, key: str, channel: str | None = None,
                      pair: tuple[str, str] | None = None) -> str:
    """cp-measure's result key -> CellProfiler's column: {Compartment}_{Category}_{Feature}[_{Image}][_{params}].

    `Area` -> Nuclei_AreaShape_Area; `Intensity_MeanIntensity` + DNA -> Cells_Intensity_MeanIntensity_DNA;
    `Contrast_3_00_256` + ER -> Cytoplasm_Texture_Contrast_ER_3_00_256; `Granularity_3` + Mito ->
    Cells_Granularity_3_Mito; `RadialDistribution_FracAtD_1of4` + RNA -> Cells_RadialDistribution_FracAtD_RNA_1of4;
    `Correlation_Pearson` + (DNA, RNA) -> Cells_Correlation_Correlation_DNA_RNA; `Correlation_K_2` + (DNA, RNA)
    -> Cells_Correlation_K_RNA_DNA."""
    if pair is not None:
        base, _, order = key.rpartition("_")
        if order in ("1", "2") and base in _PAIR_NAMES:
            a, b = pair if order == "1" else pair[::-1]
            return f"{compartment}_Correlation_{_PAIR_NAMES[base]}_{a}_{b}"
        return f"{compartment}_Correlation_{_PAIR_NAMES[key]}_{pair[0]}_{pair[1]}"
    tokens = key.split("_")
    if tokens[0] != category:
        tokens = [category, *tokens]
    if channel is not None:
        tokens = [*tokens[:2], channel, *tokens[2:]]
    return "_".join([compartment, *tokens])


def _kept(key: str, m: Measure) -> bool:
    if m.keys is not None:
        return key in m.keys
    return not any(p in key for p in POSITION_KEYS)


def measure_objects(site: np.ndarray, channels, labels: dict[str, np.ndarray],
                    fs: FeatureSet) -> dict[str, dict[str, np.ndarray]]:
    """Per-object values: {compartment: {CellProfiler name: [n_objects]}} (compartments without objects
    hold empty arrays). `site` is uint8 [C, H, W]; cp-measure sees intensities in [0, 1] as CellProfiler does."""
    fns = _functions()
    channels = list(channels)
    pixels = site.astype(np.float64) / 255.0
    out: dict[str, dict[str, np.ndarray]] = {c: {} for c in COMPARTMENTS}
    for m in fs.measures:
        fn, category, kind = fns[m.function]
        params = dict(m.params)
        chans = list(m.channels) if m.channels is not None else channels
        for comp in m.compartments:
            lab = labels[comp]
            n = int(lab.max())
            if kind == "shape":
                calls = [(None, None, lambda: fn(lab, None, **params))]
            elif kind == "neighbors":
                calls = [(None, None, lambda: fn(lab, **params) if n > 1 else _lone_object(m))]
            elif kind == "channel":
                calls = [(ch, None, lambda ch=ch: fn(lab, pixels[channels.index(ch)], **params)) for ch in chans]
            else:
                calls = [(None, (a, b), lambda a=a, b=b: fn(pixels[channels.index(a)], pixels[channels.index(b)],
                                                             lab, **params)) for a, b in combinations(chans, 2)]
            for ch, pair, call in calls:
                if n == 0:
                    res = {k: np.zeros(0) for k in _probe(m.function, m.params)}
                else:
                    with warnings.catch_warnings():   # NaN for undefined objects is expected; the median skips it
                        warnings.simplefilter("ignore")
                        res = call()
                for key, values in res.items():
                    if _kept(key, m):
                        out[comp][cellprofiler_name(comp, category, key, ch, pair)] = np.asarray(values, np.float64)
    return out


def _lone_object(m: Measure) -> dict[str, np.ndarray]:
    """Neighbours of the only object of a site (cp-measure 0.3 fails on it): none, nothing touching, and
    distances and angles undefined (NaN; the site's median then gives 0)."""
    return {k: np.array([0.0 if ("NumberOfNeighbors" in k or "PercentTouching" in k) else np.nan])
            for k in _probe(m.function, m.params)}


@lru_cache(maxsize=None)
def _probe(function: str, params: tuple) -> tuple[str, ...]:
    """The keys cp-measure's `function` returns with `params`, from a fixed two-object probe image."""
    fn, _, kind = _functions()[function]
    rng = np.random.default_rng(0)
    lab = np.zeros((32, 32), np.int32)
    yy, xx = np.mgrid[:32, :32]
    lab[(yy - 10) ** 2 + (xx - 10) ** 2 < 36] = 1
    lab[(yy - 21) ** 2 + (xx - 21) ** 2 < 49] = 2
    a, b = rng.uniform(0.1, 0.9, (2, 32, 32))
    p = dict(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = (fn(lab, None, **p) if kind == "shape" else fn(lab, **p) if kind == "neighbors"
               else fn(lab, a, **p) if kind == "channel" else fn(a, b, lab, **p))
    return tuple(res)


def site_features(site: np.ndarray, channels, fs: FeatureSet) -> dict[str, float]:
    """One site -> {CellProfiler name: median over the compartment's objects}. NaN-safe: objects where a
    measurement is undefined are skipped; a compartment without objects (or a feature undefined for all
    of them) gives 0, so no NaN ever reaches a profile."""
    nuclei, cells, cytoplasm = segment(site, channels, fs.segmentation)
    labels = {"Nuclei": nuclei, "Cells": cells, "Cytoplasm": _relabel(cytoplasm)}
    per_object = measure_objects(site, channels, labels, fs)
    out = {}
    for comp in COMPARTMENTS:
        for name, values in per_object[comp].items():
            finite = values[np.isfinite(values)]
            out[name] = float(np.median(finite)) if finite.size else 0.0
    return out


class CellProfilerFeaturiser:
    """A named featuriser: uint8 sites [N, C, H, W] -> [N, D] float32 in the order of `feature_names`."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs
        self.name = fs.name
        self.description = fs.description

    def feature_names(self, channels) -> list[str]:
        return list(_names(self.fs, tuple(channels)))

    def settings(self) -> dict:
        return self.fs.settings()

    def embed(self, sites: np.ndarray, channels) -> np.ndarray:
        names = self.feature_names(channels)
        out = np.empty((len(sites), len(names)), np.float32)
        for i, site in enumerate(sites):
            feats = site_features(site, channels, self.fs)
            if len(feats) != len(names):
                missing = sorted(set(names) - set(feats))[:5]
                raise RuntimeError(f"featuriser {self.name}: site {i} gave {len(feats)} features, expected "
                                   f"{len(names)} (missing {missing}); cp-measure's keys changed?")
            out[i] = [feats[n] for n in names]
        return out


@lru_cache(maxsize=None)
def _names(fs: FeatureSet, channels: tuple[str, ...]) -> tuple[str, ...]:
    """Feature names in their fixed order: measures in the set's order, then compartments, channels
    (or pairs), cp-measure's key order. Taken from a probe site so they are cp-measure's own keys."""
    fns = _functions()
    names = []
    for m in fs.measures:
        _, category, kind = fns[m.function]
        keys = [k for k in _probe(m.function, m.params) if _kept(k, m)]
        if m.keys is not None and len(keys) != len(m.keys):
            raise ValueError(f"feature set {fs.name}: {m.function} has no keys {sorted(set(m.keys) - set(keys))}")
        chans = list(m.channels) if m.channels is not None else list(channels)
        missing = [c for c in chans if c not in channels]
        if missing:
            raise ValueError(f"feature set {fs.name} measures channels {missing}; the shards hold {list(channels)}")
        for comp in m.compartments:
            if kind in ("shape", "neighbors"):
                names += [cellprofiler_name(comp, category, k) for k in keys]
            elif kind == "channel":
                names += [cellprofiler_name(comp, category, k, ch) for ch in chans for k in keys]
            else:
                names += [cellprofiler_name(comp, category, k, pair=p) for p in combinations(chans, 2) for k in keys]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise ValueError(f"feature set {fs.name} names some features twice: {dup}")
    return tuple(names)


# ---------------------------------------------------------------------------------------------
# the two feature sets
# ---------------------------------------------------------------------------------------------

_HARALICK = ("AngularSecondMoment", "Contrast", "Correlation", "Variance", "InverseDifferenceMoment", "SumAverage",
             "SumVariance", "SumEntropy", "Entropy", "DifferenceVariance", "DifferenceEntropy", "InfoMeas1",
             "InfoMeas2")
_INTENSITY = tuple(f"Intensity_{k}" for k in ("IntegratedIntensity", "MeanIntensity", "StdIntensity",
                                               "MedianIntensity", "UpperQuartileIntensity", "MassDisplacement",
                                               "MeanIntensityEdge"))
_SHAPE = ("Area", "Perimeter", "FormFactor", "Eccentricity", "Solidity", "Extent", "Compactness",
          "MajorAxisLength", "MinorAxisLength", "MeanRadius", "MaximumRadius")

# What CellProfiler's Cell Painting pipeline measures (JUMP's compartments and modules at their defaults;
# Haralick at 256 grey levels, scale 3, four directions): seconds per site on one core (docs/BENCHMARKS.md).
FULL = FeatureSet(
    name="cellprofiler_full",
    description="every CellProfiler measurement cp-measure has, on nuclei, cells and cytoplasm, at CellProfiler's "
                "defaults (Haralick at 256 levels): the field's full profile, seconds per site",
    measures=(
        Measure("sizeshape"), Measure("zernike"), Measure("feret"),
        Measure("intensity"),
        Measure("texture", params=(("scale", 3), ("gray_levels", 256))),
        Measure("granularity"),
        Measure("radial_distribution"),
        Measure("pearson"), Measure("overlap"), Measure("manders_fold"), Measure("rwc"),
        Measure("costes", params=(("scale_max", 255),)),
        Measure("neighbors", compartments=("Nuclei", "Cells"), params=(("distance_method", "Adjacent"),),
                keys=tuple(f"Neighbors_{k}_Adjacent" for k in ("NumberOfNeighbors", "PercentTouching",
                                                                "FirstClosestDistance", "SecondClosestDistance",
                                                                "AngleBetweenNeighbors"))),
    ))

# The baseline every comparison uses: the same measurements on fewer compartment x channel pairs, Haralick at
# 16 grey levels and granularity at small-site settings, at ~1/100 of the full set's cost (docs/BENCHMARKS.md).
CELLPROFILER = FeatureSet(
    name="cellprofiler",
    description="CellProfiler's measurements (cp-measure) on nuclei, cells and cytoplasm, a subset chosen for "
                "cost: the baseline of the demo and the comparison",
    measures=(
        Measure("sizeshape", compartments=("Nuclei", "Cells"), keys=_SHAPE,
                params=(("calculate_advanced", False),)),
        Measure("intensity", compartments=("Nuclei",), channels=("DNA", "RNA"), keys=_INTENSITY),
        Measure("intensity", compartments=("Cells",), keys=_INTENSITY),
        Measure("intensity", compartments=("Cytoplasm",), channels=("RNA", "ER", "AGP", "Mito"), keys=_INTENSITY),
        Measure("texture", compartments=("Nuclei",), channels=("DNA", "RNA"),
                params=(("scale", 3), ("gray_levels", 16)),
                keys=tuple(f"{k}_3_00_16" for k in ("AngularSecondMoment", "Contrast", "Correlation", "Entropy",
                                                     "InverseDifferenceMoment", "SumAverage"))),
        Measure("texture", compartments=("Cytoplasm",), channels=("ER", "AGP", "Mito"),
                params=(("scale", 3), ("gray_levels", 16)),
                keys=tuple(f"{k}_3_00_16" for k in ("AngularSecondMoment", "Contrast", "Correlation", "Entropy",
                                                     "InverseDifferenceMoment", "SumAverage"))),
        Measure("granularity", compartments=("Cells",), channels=("Mito", "RNA"),
                params=(("subsample_size", 0.5), ("image_sample_size", 0.5), ("element_size", 5),
                        ("granular_spectrum_length", 8))),
        Measure("radial_distribution", compartments=("Cells",), channels=("ER",),
                keys=tuple(f"RadialDistribution_{k}_{i}of4" for k in ("FracAtD", "MeanFrac") for i in range(1, 5))),
        Measure("pearson", compartments=("Cells",), keys=("Correlation_Pearson",)),
        Measure("neighbors", compartments=("Cells",), params=(("distance_method", "Adjacent"),),
                keys=("Neighbors_NumberOfNeighbors_Adjacent", "Neighbors_PercentTouching_Adjacent")),
    ))

FEATURE_SETS = {fs.name: fs for fs in (CELLPROFILER, FULL)}
