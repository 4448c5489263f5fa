"""wandb runs that link into one lineage: training run -> checkpoint -> embeddings -> evaluate run.

Each job's run has a name, a group (one per experiment), a job_type (train | embed | evaluate) and tags, and
leaves them beside its output (wandb_run.json) so that the next job joins the same group by default. Checkpoints
and embeddings are artifacts *by reference* (file:// or s3:// URIs; only small files are hashed, nothing is
uploaded), named from what is on disk, so that the run that logs one and the runs that read it meet on the
same artifact version when synced. Must not decide whether wandb is on, nor stop a job: callers catch and warn.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
from pathlib import Path

from micon import atomic, storage

RUN_FILE = "wandb_run.json"      # beside a job's output: its wandb run's id, name, group, project, job_type
MODEL, EMBEDDINGS = "model", "embeddings"       # the artifact types


def safe_name(text: str) -> str:
    """`text` as an artifact name may spell it (letters, digits, - _ .)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-.")[:100] or "run"


def tags_of(text: str, *extra: str) -> list[str]:
    """Comma-separated tags plus `extra`, without blanks or repeats (wandb allows 64 characters a tag)."""
    tags = [t.strip()[:64] for t in (text or "").split(",")] + [e[:64] for e in extra if e]
    return list(dict.fromkeys(t for t in tags if t))


def _names(out) -> tuple[str, str]:
    """(the output directory's name, its parent folder's name)."""
    out = storage.path(out)
    if isinstance(out, Path):
        out = out.resolve()
        return out.name, out.parent.name
    return out.name, posixpath.basename(posixpath.dirname(out.key))


def default_name(out) -> str:
    """A run's name when none is given: its output directory's name (runs/exp1/train -> train)."""
    return _names(out)[0] or "run"


def default_group(out) -> str:
    """A run's group when none is given and no upstream run names one: its output directory's parent folder
    (runs/exp1/train -> exp1), so that the jobs of an experiment written side by side share a group."""
    return _names(out)[1] or "micon"


def read_run_file(directory) -> dict:
    """What RUN_FILE in `directory` says ({} when there is none); a training run from before it existed gives
    its id from wandb_run_id."""
    if directory is None:
        return {}
    directory = storage.path(directory)
    for name in (RUN_FILE, "wandb_run_id"):
        try:
            text = (directory / name).read_text()
        except (OSError, ValueError):
            continue
        try:
            return json.loads(text) if name == RUN_FILE else {"id": text.strip()}
        except ValueError:
            continue
    return {}


def write_run_file(directory, run, job_type: str) -> None:
    atomic.write_json(storage.path(directory) / RUN_FILE,
                      {"id": run.id, "name": run.name, "group": run.group, "project": run.project,
                       "job_type": job_type})


def mode() -> str:
    """offline unless WANDB_MODE says otherwise (the jobs never upload unless asked)."""
    return os.environ.get("WANDB_MODE", "offline")


def local_dir() -> Path:
    """Where a job whose output is in object storage keeps its wandb files: $WANDB_DIR, else the working
    directory (named explicitly: wandb would otherwise reuse the first run's directory in this process)."""
    return Path(os.environ.get("WANDB_DIR") or Path.cwd())


def open_run(job_type: str, out, *, project: str, name: str = "", group: str = "", tags: str = "",
             upstream=(), config: dict | None = None, wandb_dir=None):
    """A wandb run for embed or evaluate: named after `out` unless `name`; in `group`, else the group of the
    first upstream directory's run (a training run for a checkpoint, embed's for embeddings), else
    default_group(out)."""
    import wandb

    if not group:
        group = next((g for d in upstream if (g := read_run_file(d).get("group"))), "") or default_group(out)
    return wandb.init(project=project, dir=str(wandb_dir) if wandb_dir else None, job_type=job_type,
                      name=name or default_name(out), group=group, tags=tags_of(tags, job_type), config=config,
                      mode=mode())


def _add(artifact, p, name: str, hashed: bool) -> None:
    """A reference to file or directory `p`: local files hashed (md5) when `hashed`, else named by their path;
    object storage always by its URL (no request is made)."""
    p = storage.path(p)
    if isinstance(p, Path):
        artifact.add_reference(p.resolve().as_uri(), name=name, checksum=hashed)
    else:
        artifact.add_reference(str(p), name=name, checksum=False)


def _abs(p) -> str:
    p = storage.path(p)
    return str(p.resolve()) if isinstance(p, Path) else str(p)


def _step_and_run_dir(model_file) -> tuple:
    """(the step directory, the training run directory or None) of a checkpoint's model.pt."""
    model_file = storage.path(model_file)
    step_dir = model_file.parent
    root = step_dir.parent
    return step_dir, (root.parent if root.name == "checkpoints" else None)


def run_dir_of(model_file):
    """The training run directory a checkpoint's model.pt lies in (None for a model.pt elsewhere)."""
    return _step_and_run_dir(model_file)[1]


def step_of(tag: str) -> int | None:
    m = re.fullmatch(r"step(\d+)", tag)
    return int(m.group(1)) if m else None


def checkpoint_artifact(model_file, run_id: str = ""):
    """The `model` artifact of one checkpoint: its model.pt (what embed reads) by reference, hashed. Named
    model-<training run id> (from the run's RUN_FILE, else model-<run directory name>), so that training's log
    and a later job's use of the same file are one artifact version. The DeepSpeed state beside it is not in
    the artifact (resume only)."""
    import wandb

    step_dir, run_dir = _step_and_run_dir(model_file)
    run_id = run_id or read_run_file(run_dir).get("id", "")
    name = f"model-{safe_name(run_id)}" if run_id else f"model-{safe_name(default_name(run_dir or step_dir))}"
    metadata = {"checkpoint": _abs(step_dir), "step": step_of(step_dir.name),
                "run_dir": _abs(run_dir) if run_dir else None}
    artifact = wandb.Artifact(name, type=MODEL, metadata=metadata)
    _add(artifact, model_file, "model.pt", hashed=True)
    return artifact


def checkpoint_aliases(step: int | None, *extra: str) -> list[str]:
    return list(dict.fromkeys(([f"step-{step}"] if step is not None else []) + [e for e in extra if e]))


def embeddings_artifact(out):
    """The `embeddings` artifact of an embed output: embed.json hashed (it names the model and the shard set by
    their hashes), embeddings.zarr and sites.parquet by path. Named embeddings-<directory name>-<identity>, the
    identity being the model's and shard set's (so two models' embeddings in like-named directories differ)."""
    import wandb

    out = storage.path(out)
    info = json.loads((out / "embed.json").read_text())
    key = str(info.get("identity_key", ""))[:8]
    name = safe_name(f"embeddings-{default_name(out)}" + (f"-{key}" if key else ""))
    artifact = wandb.Artifact(name, type=EMBEDDINGS, metadata={
        "path": _abs(out), "checkpoint": info.get("checkpoint"), "method": info.get("method"),
        "n_sites": info.get("n_sites"), "dim": info.get("dim")})
    _add(artifact, out / "embed.json", "embed.json", hashed=True)
    for part in ("embeddings.zarr", "sites.parquet"):
        _add(artifact, out / part, part, hashed=False)
    return artifact


def checkpoint_read_by(embeddings_dir) -> Path | None:
    """The model.pt an embed output was made with (its embed.json identity), when it was a trained (or
    fine-tuned) checkpoint that still exists; None for featurisers, references and untrained networks."""
    try:
        info = json.loads((storage.path(embeddings_dir) / "embed.json").read_text())
    except (OSError, ValueError):
        return None
    return trained_checkpoint(info.get("identity", {}).get("model", {}))


def trained_checkpoint(model_identity: dict):
    """The checkpoint file an encoder identity (micon.encoders) names, if trained weights and still there."""
    path = model_identity.get("path")
    if not path or model_identity.get("method") == "untrained" or "featuriser" in model_identity:
        return None
    p = storage.path(path)
    return p if p.is_file() else None


def use(run, artifact, aliases: list[str] | None = None) -> None:
    """Record that `run` read `artifact` (a reference artifact built here). Online, wandb's use_artifact; offline
    (where wandb's use_artifact refuses) the same record it writes for a new artifact: logged with
    use_after_commit, so that `wandb sync` creates or finds that version and marks it used by this run."""
    if run.settings._offline:
        run._log_artifact(artifact, aliases=aliases, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact, aliases=aliases)


def warning(what: str, e: Exception) -> str:
    return (f"wandb: {what} not recorded ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}); "
            f"the job's own outputs are complete")


def upstream_of(embeddings_dirs) -> list:
    """The directories whose runs a job reading these embed outputs follows: the embed outputs themselves, then
    the training runs of their checkpoints (for the group)."""
    dirs = [storage.path(d) for d in embeddings_dirs]
    return dirs + [run_dir_of(m) for d in dirs if (m := checkpoint_read_by(d)) is not None]


def use_embeddings(run, embeddings_dirs) -> None:
    """Record that `run` read these embed outputs and, through them, their checkpoints (each once). A directory
    without embed.json (a profile table, say) is skipped."""
    seen = set()
    for d in map(storage.path, embeddings_dirs):
        if not (d / "embed.json").is_file():
            continue
        use(run, embeddings_artifact(d))
        if (model_file := checkpoint_read_by(d)) is not None and str(model_file) not in seen:
            seen.add(str(model_file))
            use(run, checkpoint_artifact(model_file))
