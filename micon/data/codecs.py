"""Lossless encodings of one site ([C, H, W] uint8) as the bytes of one WebDataset member.

The member's extension names the codec (`image.zstd`, `image.png`...), so a reader needs no
other information. Decoders never unpickle: every format is plain array bytes.
"""
from __future__ import annotations

import io
import zlib

import numpy as np

CODECS = ("npy", "zlib", "zstd", "blosc", "png", "dzstd")
# dzstd: PNG's "Sub" prediction (each pixel minus its left neighbour, mod 256) then Zstd.
# Microscopy rows are smooth, so residuals are small: PNG-sized files at Zstd's decode speed.
DEFAULT_CODEC = "dzstd"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _from_npy(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def _zstd():
    from numcodecs import Zstd

    return Zstd(level=3)


def _blosc():
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)


def encode(arr: np.ndarray, codec: str = DEFAULT_CODEC) -> bytes:
    """[C, H, W] uint8 -> bytes."""
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise ValueError(f"encode expects a [C, H, W] uint8 site, got {arr.dtype} {arr.shape}")
    if codec == "npy":
        return _npy_bytes(arr)
    if codec == "zlib":
        return zlib.compress(_npy_bytes(arr), 1)
    if codec == "zstd":
        return bytes(_zstd().encode(_npy_bytes(arr)))
    if codec == "blosc":
        return bytes(_blosc().encode(_npy_bytes(arr)))
    if codec == "dzstd":
        residual = np.empty_like(arr)
        residual[..., 0] = arr[..., 0]
        np.subtract(arr[..., 1:], arr[..., :-1], out=residual[..., 1:])  # uint8 arithmetic wraps mod 256
        return bytes(_zstd().encode(_npy_bytes(residual)))
    if codec == "png":
        from PIL import Image

        c, h, w = arr.shape
        buf = io.BytesIO()
        # channels stacked vertically in one grayscale PNG: one member, lossless, standard decoder
        Image.fromarray(arr.reshape(c * h, w), mode="L").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def decode(blob: bytes, codec: str, channels: int = 5) -> np.ndarray:
    """bytes -> [C, H, W] uint8 (`channels` is needed only for png)."""
    if codec == "npy":
        return _from_npy(blob)
    if codec == "zlib":
        return _from_npy(zlib.decompress(blob))
    if codec == "zstd":
        return _from_npy(bytes(_zstd().decode(blob)))
    if codec == "blosc":
        return _from_npy(bytes(_blosc().decode(blob)))
    if codec == "dzstd":
        return np.cumsum(_from_npy(bytes(_zstd().decode(blob))), axis=-1, dtype=np.uint8)
    if codec == "png":
        from PIL import Image

        img = np.asarray(Image.open(io.BytesIO(blob)))
        return img.reshape(channels, img.shape[0] // channels, img.shape[1])
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
