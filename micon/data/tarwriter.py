"""The one writer of shard tars (plate shards and replicate-set shards): WebDataset samples, byte-for-byte
reproducible, checksummed as they are written (`checksum` after close, micon.integrity). Writing only;
readers use tarfile or webdataset, and nothing here knows what a sample holds."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

from micon.integrity import HashingWriter


class SampleTar:
    """One tar of WebDataset samples whose headers carry no time or owner (mode 0444, USTAR), so the same
    samples give the same bytes. `write({"__key__": key, ext: bytes, ...})` adds `{key}.{ext}` members
    in sorted order: the API and the bytes of `webdataset.TarWriter(fh, user="", group="", mtime=0,
    encoder=False)`, without its per-member overhead (bench/bench_tar.py, docs/BENCHMARKS.md)."""

    def __init__(self, path: str | Path):
        self._file = HashingWriter(open(path, "wb"))
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.checksum: str | None = None     # of every byte of the file, set by close()

    def write(self, sample: dict) -> int:
        key, size = sample["__key__"], 0
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            size += len(data)
        return size

    def close(self) -> None:
        if self.checksum is None:
            self._tar.close()
            self._file.close()
            self.checksum = self._file.checksum.hexdigest()

    def __enter__(self) -> "SampleTar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
