"""From 16-bit TIFFs to the 8-bit site stored in shards: read, illumination-correct, scale, resize.

The scaling rule (documented in docs/DATA.md, "Preparing shards"): per image and channel, after dividing by the
illumination function (multiplying by its precomputed inverse), intensities are clipped to the [p_low, p_high] percentiles of that image
(default 0.1 and 99.9, as common JUMP downloaders do) and mapped linearly to 0..255.
"""
from __future__ import annotations

import functools

import numpy as np

from micon.data.jump import IngestError


def read_channel(path: str, plate: str, well: str, site: str, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """One 16-bit TIFF as stored (uint16), with errors that name the file and what was expected."""
    import tifffile

    try:
        img = tifffile.imread(path)
    except FileNotFoundError:
        raise IngestError("image file is missing (expected a 16-bit TIFF)", plate, well, site, path,
                          kind="missing_tiff") from None
    except Exception as e:  # tifffile raises several types for corrupt files
        raise IngestError(f"image file is unreadable ({type(e).__name__}: {e}); expected a 16-bit TIFF",
                          plate, well, site, path, kind="unreadable_tiff") from None
    if img.dtype != np.uint16:
        raise IngestError(f"image has dtype {img.dtype}; expected uint16 (16-bit)", plate, well, site, path,
                          kind="wrong_dtype")
    if img.ndim != 2 or (expected_shape is not None and img.shape != tuple(expected_shape)):
        want = f"{expected_shape[0]}x{expected_shape[1]}" if expected_shape else "a 2-D image"
        raise IngestError(f"image has shape {'x'.join(map(str, img.shape))}; expected {want} like the "
                          f"plate's other images", plate, well, site, path, kind="wrong_shape")
    return img


def majority_shape(paths: list[str], max_images: int = 25) -> tuple[int, int] | None:
    """The image shape most of the first `max_images` readable TIFFs share (headers only), so that one
    odd image is blamed, not the plate's good ones; None when none can be read."""
    import collections

    import tifffile

    shapes = collections.Counter()
    for path in paths[:max_images]:
        try:
            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.pages[0].shape)
        except Exception:   # missing or unreadable: reported when the site itself is read
            continue
        if len(shape) == 2:
            shapes[shape] += 1
    return shapes.most_common(1)[0][0] if shapes else None


def _percentiles_by_partition(flat: np.ndarray, pos: list[float]) -> list[float]:
    """np.percentile's linear interpolation at positions `pos` from one partial sort of a copy of `flat`."""
    flat = np.array(flat, copy=True)
    n = flat.size
    ranks = sorted({int(np.floor(p)) for p in pos} | {min(int(np.floor(p)) + 1, n - 1) for p in pos})
    flat.partition(ranks)
    out = []
    for p in pos:
        lo = int(np.floor(p))
        a, b = float(flat[lo]), float(flat[min(lo + 1, n - 1)])
        out.append(a + (b - a) * (p - lo))
    return out


HISTOGRAM_BINS = 4096


def percentiles(img: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """np.percentile(img, qs) (its default, linear interpolation), the same numbers for a fraction of the cost:
    a histogram of the values in HISTOGRAM_BINS equal bins between min and max (one pass and a `bincount`)
    says which bin holds each needed rank, and only that bin's values are sorted to read the exact value."""
    flat = np.asarray(img).ravel()
    n = flat.size
    pos = [q / 100.0 * (n - 1) for q in qs]
    lo_v, hi_v = float(flat.min()), float(flat.max())
    scale = HISTOGRAM_BINS / (hi_v - lo_v) * (1 - 1e-6) if hi_v > lo_v else 0.0
    if flat.dtype.kind not in "uif" or not 0.0 < scale < 1e30:   # NaN, one value, or a range too small
        return _percentiles_by_partition(flat, pos)
    # (x - min) * scale is non-decreasing in x, so every value in a lower bin is <= every value in a higher one
    ftype = np.float64 if flat.dtype == np.float64 else np.float32
    bins = ((flat - ftype(lo_v)) * ftype(scale)).astype(np.int32)
    below = np.concatenate([[0], np.cumsum(np.bincount(bins, minlength=HISTOGRAM_BINS + 1))])
    sorted_bin: dict[int, np.ndarray] = {}

    def value_at(rank: int) -> float:
        k = int(np.searchsorted(below, rank, side="right")) - 1   # below[k] <= rank < below[k + 1]
        if k not in sorted_bin:
            sorted_bin[k] = np.sort(flat[bins == k])
        return float(sorted_bin[k][rank - below[k]])

    out = []
    for p in pos:
        lo = int(np.floor(p))
        a, b = value_at(lo), value_at(min(lo + 1, n - 1))
        out.append(a + (b - a) * (p - lo))
    return out


def scale_to_uint8(img: np.ndarray, p_low: float = 0.1, p_high: float = 99.9, inplace: bool = False) -> np.ndarray:
    """Per-image percentile scaling of one channel to uint8 (see module docstring). `inplace=True` lets it
    use a float32 `img` as its work buffer (the caller's array is then overwritten)."""
    lo, hi = percentiles(img, (p_low, p_high))
    if hi <= lo:
        return np.zeros(img.shape, np.uint8)
    x = img if inplace and img.dtype == np.float32 and img.flags.writeable else img.astype(np.float32)
    np.clip(x, lo, hi, out=x)
    x -= np.float32(lo)
    x *= np.float32(255.0 / (hi - lo))
    np.rint(x, out=x)
    return x.astype(np.uint8)


def illumination_gain(illum: np.ndarray) -> np.ndarray:
    """1 / illumination function (floored at 1e-6), computed once per plate and channel: correcting a site
    is then one multiplication fused with the uint16 -> float32 conversion."""
    return (1.0 / np.maximum(np.asarray(illum, np.float32), np.float32(1e-6))).astype(np.float32)


@functools.lru_cache(maxsize=32)
def box_weights(n_in: int, n_out: int):
    """[n_out, n_in] sparse matrix of PIL's BOX filter when shrinking (Resample.c's precompute_coeffs, same
    double arithmetic): output pixel i is the plain mean of the input pixels whose centres lie in its box."""
    import scipy.sparse

    scale = n_in / n_out
    support = 0.5 * scale
    rows, cols = [], []
    for i in range(n_out):
        center = (i + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        x = np.arange(xmin, xmax)
        t = (x - center + 0.5) * (1.0 / scale)
        x = x[(t > -0.5) & (t <= 0.5)]
        rows.append(np.full(x.size, i))
        cols.append(x)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    counts = np.bincount(rows, minlength=n_out)
    return scipy.sparse.csr_matrix(((1.0 / counts[rows]).astype(np.float32), (rows, cols)), shape=(n_out, n_in))


def box_shrink(img: np.ndarray, size: int) -> np.ndarray:
    """PIL's BOX resize to size x size of an image larger than `size` both ways, as two sparse products
    (rows, then columns): the same numbers to float32 rounding, at about half PIL's cost with no PIL copies."""
    h, w = img.shape
    rows = box_weights(h, size) @ img                     # [size, w], float32 for a uint16 or float32 image
    return np.ascontiguousarray((box_weights(w, size) @ rows.T).T, dtype=np.float32)


def fit_size(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize (area-averaging when shrinking) or centre-crop one channel to size x size (float32 when resized)."""
    h, w = img.shape
    if size <= 0 or (h == size and w == size):
        return img
    if mode == "crop":
        if h < size or w < size:
            raise ValueError(f"cannot crop a {h}x{w} image to {size}x{size}; use resize=area")
        y, x = (h - size) // 2, (w - size) // 2
        return img[y:y + size, x:x + size]
    if size < min(h, w):
        return box_shrink(img, size)   # exact area averaging for integer factors
    from PIL import Image

    return np.array(Image.fromarray(np.asarray(img, np.float32)).resize((size, size), Image.Resampling.BILINEAR))


def process_site(paths: list[str], gains: list[np.ndarray | None], plate: str, well: str, site: str,
                 size: int, resize: str, p_low: float, p_high: float,
                 expected_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """All channels of one site -> ([C, size, size] uint8 in the order of `paths`, the source image shape).
    `gains`: per channel `illumination_gain` of the illumination function, or None."""
    out, work = [], None
    for path, gain in zip(paths, gains):
        img = read_channel(path, plate, well, site, expected_shape)
        if expected_shape is None:
            expected_shape = img.shape
        if gain is not None and gain.shape != img.shape:
            raise IngestError(f"illumination function has shape {gain.shape}; expected {img.shape}",
                              plate, well, site, path, kind="wrong_shape")
        if gain is None and resize == "area" and 0 < size < min(img.shape):
            x = img                     # the shrink reads uint16 itself: no float copy of the full field
        else:
            # one float32 work buffer per site, reused by every channel (a fresh one costs page faults); a plain
            # cast then an in-place product: the same float32 numbers as np.multiply(img, gain, dtype=float32)
            if work is None or work.shape != img.shape:
                work = np.empty(img.shape, np.float32)
            x = work
            np.copyto(x, img, casting="unsafe")
            if gain is not None:
                np.multiply(x, gain, out=x)
        x = fit_size(x, size, resize)   # a new float32 array, or `x` or a crop of it: ours to overwrite either way
        out.append(scale_to_uint8(x, p_low, p_high, inplace=True))   # a new uint8 array: `work` is free again
    return np.stack(out), tuple(expected_shape)
