"""Checksums of stored objects: one helper for every artefact (shards, control-bank sites, graph arrays,
embeddings), written into the manifest beside each object when it is written, checked by its readers.

A checksum is a string `ALGORITHM:HEX`: xxHash's 64-bit XXH3 (22 GB/s on one core, 8x zlib's CRC-32, the
fastest of the standard library's; docs/BENCHMARKS.md "Shard checksums"). Older names (crc32, hashlib's)
are still read. It guards against damage, not against an attacker who can rewrite the manifest too.
"""
from __future__ import annotations

import hashlib
import io
import logging
import zlib
from pathlib import Path

import numpy as np

ALGORITHM = "xxh3_64"
log = logging.getLogger("micon.integrity")


class Checksum:
    """An incremental checksum: `update(bytes)` as the bytes pass, `hexdigest()` as `ALGORITHM:HEX`."""

    def __init__(self, algorithm: str = ALGORITHM):
        self.algorithm = algorithm
        if algorithm == "crc32":
            self._crc = 0
        elif algorithm == "xxh3_64":
            import xxhash
            self._h = xxhash.xxh3_64()
        elif algorithm in hashlib.algorithms_available:
            self._h = hashlib.new(algorithm)
        else:
            raise ValueError(f"unknown checksum algorithm {algorithm!r} (this code knows xxh3_64, crc32 and "
                             f"hashlib's)")

    def update(self, data) -> None:
        if self.algorithm == "crc32":
            self._crc = zlib.crc32(data, self._crc)
        else:
            self._h.update(data)

    def hexdigest(self) -> str:
        hexd = f"{self._crc:08x}" if self.algorithm == "crc32" else self._h.hexdigest()
        return f"{self.algorithm}:{hexd}"


def _algorithm(expected: str) -> str:
    return expected.split(":", 1)[0] if ":" in expected else "sha256"   # bare hex: embed.json's sha256 of old


def of_bytes(data, like: str | None = None) -> str:
    """Checksum of bytes (or any buffer); `like`: a recorded checksum whose algorithm to use."""
    h = Checksum(_algorithm(like) if like else ALGORITHM)
    h.update(data)
    return h.hexdigest() if like is None or ":" in like else h.hexdigest().split(":", 1)[1]


def of_array(arr: np.ndarray, like: str | None = None) -> str:
    """Checksum of an array's values in C order (its dtype and shape are the reader's to check)."""
    arr = np.ascontiguousarray(arr)
    # an empty array (a store with no graph) has no buffer to cast: its bytes are b""
    return of_bytes(memoryview(arr).cast("B") if arr.size else b"", like)


def of_file(path: str | Path, like: str | None = None, chunk: int = 1 << 22) -> str:
    h = Checksum(_algorithm(like) if like else ALGORITHM)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest() if like is None or ":" in like else h.hexdigest().split(":", 1)[1]


def matches(actual_of, expected: str | None) -> bool:
    """True when `expected` is None (nothing recorded) or equals `actual_of(expected)`, where `actual_of`
    computes the checksum in the recorded one's algorithm (e.g. `lambda like: of_file(p, like)`)."""
    return expected is None or actual_of(expected) == expected


class HashingWriter:
    """A binary file wrapper that checksums every byte written through it (tarfile writes through it)."""

    def __init__(self, fh):
        self.fh, self.checksum = fh, Checksum()

    def write(self, data) -> int:
        self.checksum.update(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.fh.tell()

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class HashingReader(io.RawIOBase):
    """A raw binary file that checksums every byte read through it. `open_hashed` puts a large buffer in
    front, so a reader that asks for 10 kB at a time (tarfile's stream mode) costs one update per MB."""

    def __init__(self, fh, like: str | None = None):
        super().__init__()
        self.fh, self.checksum = fh, Checksum(_algorithm(like) if like else ALGORITHM)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.fh.readinto(buffer)
        self.checksum.update(memoryview(buffer)[:n])
        return n

    def close(self) -> None:
        self.fh.close()
        super().close()


def open_hashed(path: str | Path, like: str | None = None, buffer: int = 1 << 20) -> tuple[io.BufferedReader,
                                                                                              HashingReader]:
    """(a buffered reader of `path`, its HashingReader): read through the first, then `drain` it and take
    the second's `checksum` (in `like`'s algorithm), which then covers the whole file."""
    raw = HashingReader(open(path, "rb", buffering=0), like)
    return io.BufferedReader(raw, buffer), raw


def drain(fh, chunk: int = 1 << 20) -> None:
    """Read what a reader left (a tar's end blocks), so that a HashingReader has seen the whole file."""
    while fh.read(chunk):
        pass


_warned: set[str] = set()


def warn_unrecorded(what: str, hint: str) -> None:
    """Once per process and `what`: an artefact written before checksums were recorded is read unverified."""
    if what not in _warned:
        _warned.add(what)
        log.warning("%s records no checksums (written before they were): read unverified; %s", what, hint)
