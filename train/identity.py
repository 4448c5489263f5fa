"""A training run's identity (its data, method and model settings), fixed at its first step and kept in
OUT/run.json with the history of its configs; a resume compares the two identities and names what differs.

The data's part is a fingerprint of the shard set's contents (the plate-shard manifest, and the replicate-set
manifest where one was built), not of its path: moved shards are the same data, rebuilt ones are not.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from micon import atomic

RECORD = "run.json"
CONFIG = "config.yaml"
HISTORY = "configs"
# what of a plate-shard manifest is its data (its `source` path and its bookkeeping are not)
MANIFEST_KEYS = ("format_version", "channels", "codec", "image_shape", "scaling", "shards", "splits", "compounds")


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(manifest_data: dict, replicate_sets: dict | None) -> dict:
    """{"shards": digest of the plate-shard manifest's contents, "replicate_sets": the replicate sets'
    recorded fingerprint (or a digest of their manifest), None when not built}."""
    rsets = None
    if replicate_sets is not None:
        rsets = replicate_sets.get("fingerprint") or digest(replicate_sets.get("shards"))
    return {"shards": digest({k: manifest_data.get(k) for k in MANIFEST_KEYS}), "replicate_sets": rsets}


def identity(method: str, model: dict, data: dict) -> dict:
    """What a run is: trained on `data` (data_fingerprint) with `method` and the model settings `model`."""
    return {"method": method, "data": data, "model": model}


def short(ident: dict) -> str:
    """One-line form: method=simclr data=3f2a...[+rsets 9c1d...] model=ab12..."""
    rs = ident["data"].get("replicate_sets")
    return (f"method={ident['method']} data={ident['data']['shards']}" + (f"+rsets {rs}" if rs else "")
            + f" model={digest(ident['model'])}")


def differences(there: dict, now: dict) -> list[str]:
    """What differs between two identities, one `key: A there, B now` each (model settings key by key)."""
    out = []
    if there["method"] != now["method"]:
        out.append(f"method: {there['method']} there, {now['method']} now")
    for k in ("shards", "replicate_sets"):
        a, b = there["data"].get(k), now["data"].get(k)
        if a != b:
            out.append(f"data ({'plate shards' if k == 'shards' else 'replicate sets'}): {a} there, {b} now")
    for k in sorted(set(there["model"]) | set(now["model"])):
        a, b = there["model"].get(k), now["model"].get(k)
        if a != b:
            out.append(f"model.{k}: {a!r} there, {b!r} now")
    return out


def load(out: Path) -> dict | None:
    p = Path(out) / RECORD
    return json.loads(p.read_text()) if p.is_file() else None


def start(out: Path, ident: dict, shards: str, step: int = 0, note: str = "") -> dict:
    """A new run record (a fresh run, or a run from before run records at its resumed `step`)."""
    record = {"identity": ident, "short": short(ident), "shards": str(shards), "since_step": step,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "changes": [], "config_history": []}
    if note:
        record["note"] = note
    atomic.write_json(Path(out) / RECORD, record)
    return record


def record_change(out: Path, record: dict, ident: dict, shards: str, step: int, diff: list[str]) -> dict:
    """resume=force with another identity: the run takes the new one and the change is logged."""
    record["changes"].append({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "resume": "force", "differences": diff, "from": record["identity"],
                              "from_shards": record.get("shards"), "to": ident, "to_shards": str(shards)})
    record.update(identity=ident, short=short(ident), shards=str(shards))
    atomic.write_json(Path(out) / RECORD, record)
    return record


def keep_config(out: Path, record: dict | None, new_text: str, step: int) -> str | None:
    """Before `config.yaml` becomes `new_text` at a resume from `step`: an earlier, different config moves to
    configs/config-<step>.yaml (the config that trained up to that step), listed in the run record. Returns
    the archived path (relative to out) or None when there was nothing to keep."""
    out = Path(out)
    current = out / CONFIG
    if not current.is_file() or current.read_text() == new_text:
        return None
    (out / HISTORY).mkdir(parents=True, exist_ok=True)
    name, n = f"config-{step:08d}.yaml", 1
    while (out / HISTORY / name).exists():   # resumed at the same step more than once
        n += 1
        name = f"config-{step:08d}-{n}.yaml"
    atomic.write_text(out / HISTORY / name, current.read_text())
    rel = f"{HISTORY}/{name}"
    if record is not None:
        record.setdefault("config_history", []).append({"until_step": step, "config": rel})
        atomic.write_json(out / RECORD, record)
    return rel
