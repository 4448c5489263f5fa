"""A run's checkpoints and identity, for the Trainer: where a run continues from (`resume`: the run's
identity, the saved model settings, DeepSpeed's state and the TrainState), the run record (OUT/run.json,
earlier configs kept), and saving. The Trainer's loop calls `resume` once and `save` at each checkpoint."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict
from pathlib import Path

from micon import atomic, distributed
from micon.config import ConfigError, dump, save_config, to_dict
from train.state import TrainingStopped, TrainState

log = logging.getLogger("micon.train")


def model_settings(model: dict) -> dict:
    """The model settings that make a run what it is: model.init says where its weights started, which a
    resumed run's checkpoint replaces, so it is neither part of the identity nor compared on resume."""
    return {k: v for k, v in model.items() if k != "init"}


def _probe_writable(directory) -> None:
    """Create and remove a file in `directory` where it exists (os.access trusts the permission bits, which do not
    stop root, nor tell a read-only mount); raises the OSError a write would meet."""
    if not directory.is_dir():
        return
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as e:
        e.filename = e.filename or str(directory)
        raise
    probe.unlink()


def _row_step(line: str) -> int | None:
    """A metrics.jsonl row's step; None for a row cut short by a kill."""
    import json

    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _comparable(key: str, value):
    return model_settings(value) if key == "model" else value


class RunCheckpoints:
    """The Trainer's checkpoint component; reads the trainer's configuration, engine, state and record."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.held = contextlib.ExitStack()     # the run lock on out= (rank 0)

    def lock(self) -> None:
        """Before anything is written: rank 0 holds the lock on out= for the whole run (micon.locks: a second live
        run into it is refused naming the first; a dead run's lock is taken over) and checks that out= and its
        checkpoints can be written. Every rank stops alike (exit 2), none waits in a collective."""
        from micon.locks import LockHeld, run_lock

        problem = None
        if self.rank == 0:
            try:
                self.held.enter_context(run_lock(self.out, job="train"))
                for d in (self.out, self.ckpt_root, self.out / "configs"):
                    _probe_writable(d)
            except LockHeld as e:
                problem = str(e).removeprefix("train: ")
            except OSError as e:
                where = e.filename or self.out
                problem = (f"out={self.out} cannot be written ({where}: {e.strerror or e}); nothing was changed in it. "
                           f"Make it writable (a read-only mount, a full disk or missing permissions), or write to "
                           f"another out= (a resume needs its checkpoints there: copy them)")
                self.unlock()
        problem = distributed.broadcast_object(problem, src=0)
        if problem:
            raise ConfigError(problem)

    def unlock(self) -> None:
        self.held.close()

    def __getattr__(self, name):        # the trainer's attributes (cfg, engine, out, ckpt_root, rank, ...)
        return getattr(self.trainer, name)

    def resume(self) -> None:
        from train import checkpoint

        cfg = self.cfg
        tag = checkpoint.resolve_resume(self.ckpt_root, cfg.resume, self.rank)
        # rank 0 compares the run's identity; every rank gets its verdict (none waits for one that stopped)
        problem = self.check_identity(tag) if self.rank == 0 else None
        problem = distributed.broadcast_object(problem, src=0)
        if problem:
            raise TrainingStopped(problem)
        if tag is None:
            self.write_run_record(None, 0)
            self.trim_metrics(0)
            return
        if cfg.resume != "force":
            self.check_same_model(tag)
        client = self.load(tag)
        saved = TrainState(**{k: v for k, v in client.items() if k in TrainState.__dataclass_fields__})
        if saved.data_workers != cfg.data.num_workers or saved.world_size != self.world:
            log.warning("resuming with %d workers x %d ranks (saved with %d x %d): the data stream continues "
                        "from a new order, not exactly where it stopped", cfg.data.num_workers, self.world,
                        saved.data_workers, saved.world_size)
            saved.data_position, saved.data_workers, saved.world_size = 0, cfg.data.num_workers, self.world
            saved.data_seed = cfg.seed + saved.step
        self.trainer.state = saved
        self.trainer.counts_at_start = dict(saved.data_counts)
        self.write_run_record(tag, saved.step)
        self.trim_metrics(saved.step)
        log.info("resumed from %s at step %d (%d samples seen)", self.ckpt_root / tag, saved.step,
                 saved.samples_seen)

    def load(self, tag: str) -> dict:
        """DeepSpeed's state of `tag` into the engine; returns the client state saved with it."""
        from train import checkpoint

        try:
            saved_world = checkpoint.partitioned_world(self.ckpt_root, tag)
            if saved_world and saved_world != self.world:
                return self.load_resharded(tag, saved_world)
            _, client = self.engine.load_checkpoint(str(self.ckpt_root), tag=tag)
            return client
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0].split(". ")[0][:300]
            if "state_dict" in str(e) or "size mismatch" in str(e):   # resume=force into a model the weights do not fit
                raise TrainingStopped(f"{self.ckpt_root / tag} cannot be loaded into this model ({first}); "
                                      f"resume=force continues a run with other data or settings only where the "
                                      f"saved weights fit") from None
            cause = f"{type(e).__name__}: {first}"
        except (AssertionError, OSError, EOFError, ValueError) as e:   # a file missing or cut short
            cause = f"{type(e).__name__}: {str(e).strip()[:300] or 'a file is missing'}"
        earlier = [t for t in reversed(checkpoint.complete_tags(self.ckpt_root)) if t < tag
                   and checkpoint.damage(self.ckpt_root, t) is None]
        advice = (f"pass resume={earlier[0]} to resume from the newest whole one before it" if earlier
                  else "pass resume=none to start over")
        raise TrainingStopped(f"checkpoint {self.ckpt_root / tag} could not be read ({cause}); it is damaged: "
                              f"{advice}") from None

    def load_resharded(self, tag: str, saved_world: int) -> dict:
        """A checkpoint whose ZeRO optimizer state is split over another number of ranks: rank 0 converts it to
        DeepSpeed's universal form (per parameter), every rank loads its own partition from there (weights, AdamW
        moments, step counts and schedule exactly as saved); the module's buffers (batch-norm statistics, which
        the universal form leaves out) come from the tag's model.pt. The conversion is removed afterwards."""
        from micon.checkpoint import load_checkpoint
        from train import checkpoint

        if self.rank == 0:
            log.warning("%s was saved by %d ranks, this run has %d: converting it to DeepSpeed's universal "
                        "checkpoint form and resharding the optimizer state (weights and AdamW state continue "
                        "exactly; the data order restarts, below)", self.ckpt_root / tag, saved_world, self.world)
        problem, universal = None, None
        if self.rank == 0:
            try:
                universal = checkpoint.to_universal(self.ckpt_root, tag)
            except TrainingStopped as e:
                problem = str(e)
        problem, universal = distributed.broadcast_object((problem, universal), src=0)
        if problem:
            raise TrainingStopped(problem)
        config = self.engine._config
        config.load_universal_checkpoint = True
        try:
            _, client = self.engine.load_checkpoint(str(universal), tag=tag)
        finally:
            config.load_universal_checkpoint = False
        self.engine.module.load_state_dict(load_checkpoint(self.ckpt_root / tag).weights)
        distributed.barrier()
        if self.rank == 0:
            import shutil
            shutil.rmtree(universal / tag, ignore_errors=True)
        return client

    def trim_metrics(self, step: int) -> None:
        """Rank 0: the rows of OUT/metrics.jsonl past `step` (logged after the checkpoint a rerun resumes from, or
        by a run that left none) are dropped, so the file holds each step once; rewritten whole (atomically)."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
        if len(kept) != len(lines):
            atomic.write_text(path, "".join(line + "\n" for line in kept))
            log.info("metrics.jsonl: dropped %d row(s) logged after step %d, the checkpoint this run resumes "
                     "from (those steps run again)", len(lines) - len(kept), step)

    def identity(self) -> dict:
        """This run's identity: its shard set's fingerprint, its method and its model settings."""
        from train import identity

        return identity.identity(self.method.name, model_settings(to_dict(self.cfg.model)),
                                 identity.data_fingerprint(self.manifest.data, self.manifest.replicate_sets))

    def check_identity(self, tag: str | None) -> str | None:
        """Rank 0, before anything is loaded or written: why this run may not continue the one in out= (its
        identity differs and resume is not force), or None."""
        from train import identity

        record = identity.load(self.out)
        if tag is None or record is None or self.cfg.resume == "force":
            return None
        diff = identity.differences(record["identity"], self.identity())
        if not diff:
            return None
        return (f"{self.out} is a run of other data or settings: its identity is {record['short']} (shards "
                f"{record.get('shards')}), this one's is {identity.short(self.identity())} (shards "
                f"{self.cfg.data.shards}); {'; '.join(diff)}. Resume with the same data and settings, write to "
                f"another out=, pass resume=force to continue this run with the change (logged in "
                f"{self.out / identity.RECORD}), or pass resume=none to start over in it")

    def write_run_record(self, tag: str | None, step: int) -> None:
        """Rank 0, once resuming succeeded (or a fresh run starts): the run record (OUT/run.json) holds the
        identity and any forced change, earlier configs are kept under OUT/configs/, config.yaml is this one."""
        from train import identity

        if self.rank != 0:
            return
        ident, shards = self.identity(), self.cfg.data.shards
        record = identity.load(self.out) if tag is not None else None
        if tag is None:
            record = identity.start(self.out, ident, shards)
        elif record is None:
            log.warning("%s has no run record (written before runs had one): its data cannot be compared with "
                        "this run's; recording this run's identity from step %d on", self.out, step)
            record = identity.start(self.out, ident, shards, step, note="recorded on a resume; earlier steps unknown")
        elif diff := identity.differences(record["identity"], ident):   # only resume=force gets here with one
            log.warning("resume=force: continuing %s at step %d with %s", self.out, step, "; ".join(diff))
            record = identity.record_change(self.out, record, ident, shards, step, diff)
        if tag is not None and (kept := identity.keep_config(self.out, record, dump(self.cfg), step)):
            log.info("config changed on resume: the one used up to step %d is kept as %s", step, self.out / kept)
        save_config(self.cfg, self.out / identity.CONFIG)

    def check_same_model(self, tag: str) -> None:
        """Resuming continues a run; a checkpoint of another method, model or channel order is refused
        (every rank reads the record; the options that may change between resumes, such as steps or the
        learning rate, are not compared)."""
        from micon.checkpoint import NoRecordError, load_checkpoint

        try:
            saved = load_checkpoint(self.ckpt_root / tag).record
        except NoRecordError:
            log.warning("%s was written before checkpoints described themselves: its model settings cannot be "
                        "compared with this run's; resuming, and the next checkpoint writes the record",
                        self.ckpt_root / tag)
            return
        diff = [f"{k}: {getattr(saved, k)!r} there, {getattr(self.record, k)!r} now"
                for k in ("method", "model", "channels", "atom_dim", "bond_dim", "fingerprint_bits", "preprocessing")
                if _comparable(k, getattr(saved, k)) != _comparable(k, getattr(self.record, k))]
        if diff:
            raise TrainingStopped(f"{self.ckpt_root / tag} was trained with other model settings ({'; '.join(diff)}). "
                                  f"Resume with the same settings, write to another out=, or pass resume=none to "
                                  f"start over in this one")

    def save(self) -> Path:
        from train import checkpoint

        self.state.data_counts = self.data_counts()
        return checkpoint.save(self.engine, self.ckpt_root, self.state.step, asdict(self.state), to_dict(self.cfg),
                               self.record, self.cfg.keep_ckpts, self.rank)
