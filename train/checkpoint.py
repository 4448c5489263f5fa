"""Training checkpoints: saved on every rank, never half-written, newest found and broadcast, old ones pruned.

Layout under OUT/checkpoints: `step00000050/` (DeepSpeed's per-rank files for resuming + `model.pt`,
the self-describing inference file of micon.checkpoint), and `latest` (the newest complete tag). A tag
is written under `.staging/` and renamed into place by rank 0 only after every rank finished.

Resuming goes through DeepSpeed's loader, which unpickles its own files: only resume from an `out=`
directory you (or your team) wrote. `./launch.sh embed` reads `model.pt` alone, safely.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from micon import atomic, distributed
from micon.checkpoint import InferenceRecord, find_latest, save_model_file, tag_of

__all__ = ["export", "find_latest", "resolve_resume", "save", "tag_of"]


def save(engine, root: Path, step: int, state: dict, config: dict, record: InferenceRecord, keep: int,
         rank: int) -> Path:
    """Collective: every rank must call it at the same step."""
    tag = tag_of(step)
    staging = root / ".staging"
    if rank == 0:
        staging.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging / tag, ignore_errors=True)
    distributed.barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state=state, save_latest=False)
    if rank == 0:
        record.step = step
        save_model_file(staging / tag / "model.pt", engine.module.state_dict(), record, config, state)
    distributed.barrier()
    if rank == 0:
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        atomic.commit(staging / tag, final)
        atomic.write_text(root / "latest", tag)
        for old in sorted(p for p in root.glob("step*") if p.is_dir())[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return root / tag


def export(model_file: Path, final: dict, dest: str) -> str:
    """Copy a finished run's model.pt to `dest` (a directory or an object prefix such as s3://bucket/models/run)
    whole, then its final.json: last, so a final.json there means the model.pt beside it is complete. Returns
    where model.pt went."""
    from micon import storage

    dest = storage.path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "final.json").unlink(missing_ok=True)
    with atomic.atomic_path(dest / "model.pt") as tmp:
        shutil.copyfile(model_file, tmp)
    atomic.write_json(dest / "final.json", final)
    return str(dest / "model.pt")


def resolve_resume(root: Path, resume: str, rank: int) -> str | None:
    """Rank 0 decides which tag to load; every rank gets the same answer, or the same error (no rank is
    left waiting in a collective for one that stopped)."""
    tag, problem = None, None
    if rank == 0 and resume != "none":
        tag = find_latest(root) if resume in ("latest", "force") else resume
        if tag is not None and not (root / tag / "model.pt").is_file():
            problem = (f"checkpoint {root / tag} is missing or incomplete; complete ones: "
                       f"{sorted(p.name for p in root.glob('step*') if (p / 'model.pt').is_file())}")
    tag, problem = distributed.broadcast_object((tag, problem), src=0)
    if problem:
        raise FileNotFoundError(problem)
    return tag
