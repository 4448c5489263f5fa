"""From 16-bit TIFFs to the 8-bit site stored in shards: read, illumination-correct, scale, resize.

The scaling rule (documented in the README): per image and channel, after dividing by the
illumination function, intensities are clipped to the [p_low, p_high] percentiles of that image
(default 0.1 and 99.9, as common JUMP downloaders do) and mapped linearly to 0..255.
"""
from __future__ import annotations

import numpy as np

from micon.data.jump import IngestError


def read_channel(path: str, plate: str, well: str, site: str, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """One 16-bit TIFF as float32, with errors that name the file and what was expected."""
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
    return img.astype(np.float32)


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


def scale_to_uint8(img: np.ndarray, p_low: float = 0.1, p_high: float = 99.9) -> np.ndarray:
    """Per-image percentile scaling of one channel to uint8 (see module docstring)."""
    lo, hi = np.percentile(img, [p_low, p_high])
    if hi <= lo:
        return np.zeros(img.shape, np.uint8)
    out = (np.clip(img, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(out).astype(np.uint8)


def fit_size(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize (area-averaging when shrinking) or centre-crop one float channel to size x size."""
    h, w = img.shape
    if size <= 0 or (h == size and w == size):
        return img
    if mode == "crop":
        if h < size or w < size:
            raise ValueError(f"cannot crop a {h}x{w} image to {size}x{size}; use resize=area")
        y, x = (h - size) // 2, (w - size) // 2
        return img[y:y + size, x:x + size]
    from PIL import Image

    # BOX filter = exact area averaging when shrinking by an integer factor, smooth otherwise
    return np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.Resampling.BOX
                                                            if size < min(h, w) else Image.Resampling.BILINEAR))


def process_site(paths: list[str], illum: list[np.ndarray | None], plate: str, well: str, site: str,
                 size: int, resize: str, p_low: float, p_high: float,
                 expected_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """All channels of one site -> ([C, size, size] uint8 in the order of `paths`, the source image shape)."""
    out = []
    for path, ill in zip(paths, illum):
        img = read_channel(path, plate, well, site, expected_shape)
        if expected_shape is None:
            expected_shape = img.shape
        if ill is not None:
            if ill.shape != img.shape:
                raise IngestError(f"illumination function has shape {ill.shape}; expected {img.shape}",
                                  plate, well, site, path, kind="wrong_shape")
            img = img / np.maximum(ill, 1e-6)
        out.append(scale_to_uint8(fit_size(img, size, resize), p_low, p_high))
    return np.stack(out), tuple(expected_shape)
