"""Training checkpoints: saved on every rank, never half-written, newest found and broadcast, old ones pruned.

Layout under OUT/checkpoints: `step00000050/` (DeepSpeed's per-rank files for resuming + `model.pt`,
the self-describing inference file of micon.checkpoint), and `latest` (the newest complete tag). A tag
is written under `.staging/` and renamed into place by rank 0 only after every rank finished.

Each tag lists its files with their sizes and checksums (`files.json`, written last): a resume checks them
and passes over a damaged newest tag (a deleted or truncated file) to the newest whole one, saying so. A
save that fails (a full disk) leaves the tags before it as they were and names the cause.

Resuming goes through DeepSpeed's loader, which unpickles its own files: only resume from an `out=`
directory you (or your team) wrote. `./launch.sh embed` reads `model.pt` alone, safely.
"""
from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from micon import atomic, distributed, integrity
from micon.checkpoint import InferenceRecord, find_latest, save_model_file, tag_of
from train.state import TrainingStopped

__all__ = ["CheckpointWriteError", "damage", "export", "find_latest", "resolve_resume", "save", "tag_of"]
FILES = "files.json"
log = logging.getLogger("micon.train")


class CheckpointWriteError(TrainingStopped):
    """A checkpoint could not be written (disk full, a read-only directory): the earlier ones are intact."""


def _free_mb(path: Path) -> float:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free / 2**20
    except OSError:
        return float("nan")


def write_problem(e: OSError, root: Path, step: int) -> str:
    """One line for a failed checkpoint write: the cause (ENOSPC said as such), the path, the free space, what
    is intact and what to do."""
    where = Path(e.filename) if getattr(e, "filename", None) else root
    kept = find_latest(root)
    intact = f"the previous checkpoint {root / kept} is intact" if kept else "no earlier checkpoint exists"
    if e.errno == errno.ENOSPC:
        cause = f"no space left on device writing {where} ({_free_mb(root):.0f} MB free on {root})"
        fix = "free space there (or set keep_ckpts lower, or write to another out=) and rerun the same command"
    else:
        cause = f"{e.strerror or e} writing {where}"
        fix = "make the directory writable and rerun the same command"
    return (f"checkpoint step {step} could not be written: {cause}; {intact}; {fix}"
            + (" to resume from it" if kept else ""))


def _file_table(directory: Path) -> dict:
    """DeepSpeed's files of a tag (what a resume loads) with their sizes and checksums. model.pt is left out: it
    describes itself and its reader names it when it is damaged (micon.checkpoint.load_checkpoint)."""
    return {p.name: {"size": p.stat().st_size, "checksum": integrity.of_file(p)}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name not in (FILES, "model.pt")}


def damage(root: Path, tag: str) -> str | None:
    """What is wrong with checkpoint `tag` (a file deleted, truncated or changed), or None when it is whole.
    Tags written before files.json: their DeepSpeed model file must be there and not empty."""
    d = root / tag
    listed = d / FILES
    if listed.is_file():
        try:
            table = json.loads(listed.read_text())
        except (OSError, ValueError) as e:
            return f"{listed} is unreadable ({e})"
        for name, want in table.items():
            p = d / name
            if not p.is_file():
                return f"{p} is missing"
            if (size := p.stat().st_size) != want["size"]:
                return f"{p} is truncated or changed ({size:,} bytes, {want['size']:,} written)"
            if not integrity.matches(lambda like: integrity.of_file(p, like), want.get("checksum")):
                return f"{p} is damaged (its checksum differs from the one written)"
        return None
    model_states = sorted(d.glob("mp_rank_*_model_states.pt"))
    if not model_states:
        return f"{d / 'mp_rank_00_model_states.pt'} is missing"
    empty = [p for p in model_states + sorted(d.glob("*optim_states.pt")) if p.stat().st_size == 0]
    return f"{empty[0]} is empty" if empty else None


def save(engine, root: Path, step: int, state: dict, config: dict, record: InferenceRecord, keep: int,
         rank: int) -> Path:
    """Collective: every rank must call it at the same step."""
    tag = tag_of(step)
    staging = root / ".staging"
    if rank == 0:
        staging.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging / tag, ignore_errors=True)
    distributed.barrier()
    problem = None
    try:
        engine.save_checkpoint(str(staging), tag=tag, client_state=state, save_latest=False)
        if rank == 0:
            record.step = step
            save_model_file(staging / tag / "model.pt", engine.module.state_dict(), record, config, state)
    except OSError as e:       # a full disk or a read-only directory: every rank learns it, the tags before stay
        problem = write_problem(e, root, step)
    failed = distributed.max_vote(rank + 1 if problem else 0)
    if failed:
        problem = distributed.broadcast_object(problem, src=int(failed) - 1)
        if rank == 0:
            shutil.rmtree(staging / tag, ignore_errors=True)
        raise CheckpointWriteError(problem)
    distributed.barrier()
    if rank == 0:
        atomic.write_json(staging / tag / FILES, _file_table(staging / tag))   # last: lists whole files only
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        atomic.commit(staging / tag, final)
        atomic.write_text(root / "latest", tag)
        best = (root / "best").read_text().strip() if (root / "best").is_file() else None   # val.keep_best
        for old in sorted(p for p in root.glob("step*") if p.is_dir())[:-keep] if keep > 0 else []:
            if old.name != best:
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


def partitioned_world(root: Path, tag: str) -> int:
    """The number of ranks whose ZeRO optimizer partitions `tag` holds (0: none, the state is not partitioned)."""
    return len(list((root / tag).glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")))


def to_universal(root: Path, tag: str) -> Path:
    """Rank 0: DeepSpeed's universal form of `tag` (weights and optimizer state per parameter, loadable on any
    number of ranks; DeepSpeed's ds_to_universal) under checkpoints/.staging/universal/; returns that root. A
    conversion already there is reused; one cut short is redone."""
    dest_root = root / ".staging" / "universal"
    dest = dest_root / tag
    if (dest / "zero").is_dir():
        return dest_root
    tmp = dest_root / f".{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dest_root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(root / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
                           "--num_merge_workers", "1", "--inject_missing_state"], capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1][:300]
        raise TrainingStopped(f"{root / tag} was saved by {partitioned_world(root, tag)} ranks and could not be "
                              f"converted for another number of ranks ({last}); resume it on that many ranks, or "
                              f"pass resume=none to start over")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest_root


def complete_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step*") if (p / "model.pt").is_file())


def _pick(root: Path, resume: str) -> tuple[str | None, str | None]:
    """(tag, problem). latest/force: the newest whole tag, passing over damaged newer ones with a warning; a named
    tag: that one, or a problem naming what is damaged and the newest whole tag before it."""
    tags = complete_tags(root)
    if resume in ("latest", "force"):
        newest = find_latest(root)
        damaged = []
        for tag in [t for t in reversed(tags) if newest is None or t <= newest]:
            if (why := damage(root, tag)) is None:
                for bad, what in damaged:
                    log.warning("checkpoint %s is damaged (%s): resuming from %s, the newest whole one, instead; "
                                "the steps after it are trained again", bad, what, tag)
                return tag, None
            damaged.append((tag, why))
        if damaged:
            return None, (f"every checkpoint in {root} is damaged ({'; '.join(f'{t}: {w}' for t, w in damaged)}); "
                          f"pass resume=none to start over in it, or write to another out=")
        return None, None
    if resume not in tags:
        return None, f"checkpoint {root / resume} is missing or incomplete; complete ones: {tags}"
    if (why := damage(root, resume)) is None:
        return resume, None
    earlier = [t for t in reversed(tags) if t < resume and damage(root, t) is None]
    advice = (f"pass resume={earlier[0]} to resume from the newest whole one before it" if earlier
              else "no whole checkpoint precedes it: pass resume=none to start over")
    return None, f"checkpoint {root / resume} is damaged: {why}; {advice}"


def resolve_resume(root: Path, resume: str, rank: int) -> str | None:
    """Rank 0 decides which tag to load; every rank gets the same answer, or the same error (no rank is
    left waiting in a collective for one that stopped)."""
    tag, problem = None, None
    if rank == 0 and resume != "none":
        tag, problem = _pick(root, resume)
    tag, problem = distributed.broadcast_object((tag, problem), src=0)
    if problem:
        raise FileNotFoundError(problem)
    return tag
