"""Atomic writes: a file (or directory) is built under a temporary name beside its final path, flushed to
disk, then renamed onto it with `os.replace`, so a reader or a killed writer never sees half a file.

Temporary names are `.NAME.PID-RANDOM.tmp` in the same directory: the same file system, so the rename
is atomic; unique, so two writers never share one; hidden and ending in .tmp, so no `*.tar` or `*.npz`
listing ever takes one for a finished file. `remove_leftovers` clears those a killed run left.
Object storage (micon.storage.ObjectPath) has no rename: there the temporary file is staged on local disk
and uploaded whole when it is finished (a multipart upload completes or nothing appears).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

TMP_GLOB = ".*.tmp"
# what a temporary name hides from writers that choose a format by suffix
COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zip": "zip", ".xz": "xz", ".zst": "zstd"}


def _remote(path) -> bool:
    from micon.storage import ObjectPath
    return isinstance(path, ObjectPath)


def temp_path(path) -> Path:
    """A temporary name beside `path`; for an object, a local staging file (uploaded by `commit`)."""
    if _remote(path):
        import tempfile
        staging = Path(tempfile.gettempdir()) / f"micon-staging-{os.getuid()}"
        staging.mkdir(parents=True, exist_ok=True)
        return staging / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def commit(tmp: str | Path, path, *, fsync: bool = True) -> None:
    """Flush a finished temporary file to disk (directories are renamed as they are) and rename it onto
    `path`: for writers that keep several temporary files open before committing them together."""
    tmp = Path(tmp)
    if _remote(path):      # upload whole (a file as one object, a directory object by object), then drop it
        from micon import storage
        (storage.put_file if tmp.is_file() else storage.put_tree)(tmp, path)
        _remove(tmp)
        return
    if fsync and tmp.is_file():
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file or build a directory at; on success it
    is fsynced (a file) and renamed onto `path`, on an error removed. A directory can only replace a
    missing or empty one (os.replace's rule): move an old one aside first. `path` may be an ObjectPath
    (or an fsspec URL): the temporary path is then local and its content is uploaded whole."""
    from micon import storage
    path = storage.path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path, fsync=fsync)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path, data: bytes, *, fsync: bool = True) -> None:
    from micon import storage
    path = storage.path(path)
    if _remote(path):        # one PUT of the complete bytes
        fs, key = storage.filesystem(str(path))
        storage.call(lambda: fs.pipe_file(key, bytes(data)), str(path))
        return
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    write_bytes(path, text.encode(), fsync=fsync)


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf, NumPy's too) as None, so that json.dumps writes `null`:
    strict JSON readers (jq, JavaScript, Java) reject the bare `NaN` Python writes by default."""
    import math

    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, float) or type(obj).__name__.startswith("float"):
        value = float(obj)
        return value if math.isfinite(value) else None
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):      # NumPy ints and bools
        return obj.item()
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON text of `obj` (see `strict`)."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1, sort_keys: bool = False, **kwargs) -> None:
    """Strict JSON (undefined values as null), written atomically."""
    kwargs.pop("allow_nan", None)
    write_text(path, dumps(obj, indent=indent, sort_keys=sort_keys, **kwargs))


def write_parquet(path: str | Path, table, **to_parquet) -> None:
    """A pandas DataFrame (index=False unless given) as parquet."""
    to_parquet.setdefault("index", False)
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, **to_parquet)


def write_csv(path: str | Path, table, **to_csv) -> None:
    """A pandas DataFrame (index=False unless given) as CSV, compressed as the name says (x.csv.gz)."""
    to_csv.setdefault("index", False)
    to_csv.setdefault("compression", COMPRESSION.get(Path(str(path)).suffix))
    with atomic_path(path) as tmp:
        table.to_csv(tmp, **to_csv)


def remove_leftovers(directory: str | Path, final: str = ".+") -> list[Path]:
    """Remove the temporary files and directories a killed writer left in `directory` for final names
    matching the regular expression `final` (default: all of them); returns what it removed."""
    if _remote(directory):   # nothing is staged in object storage: objects appear whole or not at all
        return []
    pattern = re.compile(rf"\.({final})\.\d+-[0-9a-f]{{8}}\.tmp")
    found = sorted(p for p in Path(directory).glob(TMP_GLOB) if pattern.fullmatch(p.name)) \
        if Path(directory).is_dir() else []
    for p in found:
        _remove(p)
    return found
