"""Image preprocessing written once: stored uint8 site -> float32 model input, for training and embedding.

`plate` normalisation standardises each channel with the DMSO mean and standard deviation of the
site's plate (`Manifest.plate_stats`, which falls back to the screen-wide DMSO average for a plate
without DMSO); `none` maps 0..255 to 0..1. Augmentation is not preprocessing and stays in the stream.
Must not read shards or know about methods: it turns arrays into arrays.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from micon.data.codecs import decode
from micon.data.shards import Manifest

NORMALIZATIONS = ("plate", "none")
MIN_STD = 1e-3   # a channel with (almost) constant DMSO intensity is not blown up


@dataclass(frozen=True)
class Preprocessing:
    """What a model was trained with, written into its checkpoint and applied again at embedding time."""

    normalize: str = "plate"     # plate | none

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r}: choose one of {', '.join(NORMALIZATIONS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class SitePreprocessor:
    """Decodes and normalises sites of one shard set; plate statistics are looked up once per plate."""

    def __init__(self, manifest: Manifest, preprocessing: Preprocessing):
        self.manifest, self.preprocessing = manifest, preprocessing
        self._stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def stats(self, plate: str) -> tuple[np.ndarray, np.ndarray]:
        if plate not in self._stats:
            mean, std = self.manifest.plate_stats(plate)
            self._stats[plate] = (mean.astype(np.float32), np.maximum(std, MIN_STD).astype(np.float32))
        return self._stats[plate]

    def __call__(self, image: np.ndarray, plate: str) -> np.ndarray:
        """[C, H, W] uint8 site of `plate` -> [C, H, W] float32 model input."""
        return self.into(image, plate, np.empty(image.shape, np.float32))

    def into(self, image: np.ndarray, plate: str, out: np.ndarray) -> np.ndarray:
        """The same, written into `out` (float32 [C, H, W], e.g. a row of a reused batch buffer: a fresh
        array per site costs more in page faults than the arithmetic). float32(x) - mean, then / std."""
        if self.preprocessing.normalize == "plate":
            mean, std = self.stats(plate)
            np.subtract(image, mean[:, None, None], out=out, dtype=np.float32)
            return np.divide(out, std[:, None, None], out=out)
        return np.divide(image, np.float32(255.0), out=out, dtype=np.float32)

    def batch(self, images: np.ndarray, plates: list[str]) -> np.ndarray:
        """[N, C, H, W] uint8 sites with their plates -> [N, C, H, W] float32."""
        return np.stack([self(img, p) for img, p in zip(images, plates)]) if len(images) else \
            images.astype(np.float32)

    def decode(self, blob: bytes, codec: str, plate: str) -> np.ndarray:
        """A shard member's bytes -> [C, H, W] float32 model input."""
        return self(decode(blob, codec, len(self.manifest.channels)), plate)
