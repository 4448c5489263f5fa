"""Read an offline wandb run's transaction log (`run-*.wandb`) into protobuf Records.

The file is wandb's LevelDB-style log: a 7-byte header (b":W&B", magic, version), then 32 KiB blocks of
chunks [crc32 u32, length u16, type u8] with types FULL=1, FIRST=2, MIDDLE=3, LAST=4. The records are
wandb's own `wandb_internal_pb2.Record` messages.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768


def read_records(path: str | Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:          # trailer too small for a chunk header: skip to next block
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos:pos + length], pos + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            yield rec


def history_and_config(path: str | Path) -> tuple[list[dict], dict]:
    history, config = [], {}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return history, config


def run_info(path: str | Path) -> dict:
    """The run's identity as its `run` record gives it: id, name, group, job_type, tags, project."""
    info: dict = {}
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "run":
            r = rec.run
            info = dict(id=r.run_id, name=r.display_name, group=r.run_group, job_type=r.job_type,
                        tags=list(r.tags), project=r.project)
    return info


def artifacts(path: str | Path) -> list[dict]:
    """The artifacts the run logged or used, in order: name, type, aliases, used (True: an input, recorded
    with use_after_commit; False: an output), digest, metadata, and each entry's path -> reference URI."""
    out = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "artifact":
            a = rec.artifact
            out.append(dict(name=a.name, type=a.type, aliases=sorted(a.aliases), used=a.use_after_commit,
                            digest=a.digest, metadata=json.loads(a.metadata or "{}"),
                            refs={e.path: e.ref for e in a.manifest.contents}))
    return out


def finished(path: str | Path) -> bool:
    """Whether the log holds its run's exit record yet (wandb's service may still be writing it after
    `run.finish()` has returned)."""
    try:
        return any(rec.WhichOneof("record_type") == "exit" for rec in read_records(path))
    except Exception:        # a chunk half written
        return False


def offline_runs(directory: str | Path, timeout_s: float = 30.0) -> list[Path]:
    """The transaction logs of the offline runs under `directory`/wandb, oldest first, once each is whole."""
    import time

    paths = sorted(Path(directory).glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout_s
    while not all(map(finished, paths)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return paths
