"""Checkpoints: saved on every rank, never half-written, newest found and broadcast, old ones pruned.

Layout under OUT/checkpoints: `step00000050/` (DeepSpeed's per-rank files + `model.pt`, a plain
state dict with the config for `./launch.sh embed`), and `latest` (the newest complete tag). A tag is
written under `.staging/` and renamed into place by rank 0 only after every rank finished.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save(engine, root: Path, step: int, state: dict, config: dict, keep: int, rank: int) -> Path:
    """Collective: every rank must call it at the same step."""
    tag = tag_of(step)
    staging = root / ".staging"
    if rank == 0:
        staging.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging / tag, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state=state, save_latest=False)
    if rank == 0:
        module = engine.module
        torch.save({"model": {k: v.detach().float().cpu() for k, v in module.state_dict().items()},
                    "config": config, "state": state}, staging / tag / "model.pt.tmp")
        os.replace(staging / tag / "model.pt.tmp", staging / tag / "model.pt")
    _barrier()
    if rank == 0:
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging / tag, final)
        tmp = root / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
        for old in sorted(p for p in root.glob("step*") if p.is_dir())[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return root / tag


def find_latest(root: Path) -> str | None:
    """The newest complete tag: the `latest` pointer, else the newest step dir holding model.pt."""
    pointer = root / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / "model.pt").is_file():
            return tag
    done = sorted(p.name for p in root.glob("step*") if (p / "model.pt").is_file())
    return done[-1] if done else None


def resolve_resume(root: Path, resume: str, rank: int) -> str | None:
    """Rank 0 decides which tag to load; every rank gets the same answer."""
    tag = None
    if rank == 0 and resume != "none":
        tag = find_latest(root) if resume == "latest" else resume
        if tag is not None and not (root / tag / "model.pt").is_file():
            raise FileNotFoundError(f"checkpoint {root / tag} is missing or incomplete; "
                                    f"complete ones: {[p.name for p in root.glob('step*')]}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [tag]
        dist.broadcast_object_list(box, src=0)
        tag = box[0]
    return tag


def load_model_weights(path: str | Path) -> dict:
    """A checkpoint's plain `model.pt` (a tag directory or the file): {"model", "config", "state"}."""
    p = Path(path)
    if (p / "checkpoints").is_dir():   # a training output directory
        p = p / "checkpoints"
    if p.is_dir():
        latest = find_latest(p) if not (p / "model.pt").is_file() else None
        p = (p / latest / "model.pt") if latest else p / "model.pt"
    if not p.is_file():
        raise FileNotFoundError(f"no model.pt at {path}: pass a training output's checkpoints/ directory, "
                                f"one of its step directories, or a model.pt")
    return torch.load(p, map_location="cpu", weights_only=False)
