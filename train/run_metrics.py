"""The Trainer's metrics component (torchtitan's MetricsProcessor shape): where a run's numbers go.

At the start it opens the wandb run (offline unless told otherwise; a resumed run continues the same wandb
run) and the progress bar; at each logging step it adds the data counters, writes one row to wandb and to
metrics.jsonl (its plain-text twin), and warns once per new loss of samples to damaged shards; at the end it
closes both. (A resumed run's rows past its checkpoint are dropped on resume: train.run_checkpoints.) The run is
named, grouped and tagged (job_type train) and says so in OUT/wandb_run.json for embed and evaluate to join;
with wandb.log_checkpoints each checkpoint's model.pt becomes a `model` artifact by reference (micon.wandb_runs).

wandb never stops a run: online without a key or a reachable server falls back to offline with one warning
within seconds (wandb.mode=online demanded in the config exits 2 instead), and a wandb that fails later (its
service killed by a signal meant for the ranks) is dropped with one warning while metrics.jsonl goes on. The
API key is never printed.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from micon import atomic, wandb_runs
from micon.config import ConfigError, to_dict

log = logging.getLogger("micon.train")


WANDB_INIT_TIMEOUT_S = 20.0     # wandb's own default is 90 s of silence
WANDB_REACH_TIMEOUT_S = 5.0


def online_problem() -> str | None:
    """Why online wandb cannot work from here (no API key; the server unreachable within a few seconds), or None.
    Names the server, never the key."""
    import netrc
    import socket
    from urllib.parse import urlparse

    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    url = urlparse(base if "://" in base else f"https://{base}")
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    if not os.environ.get("WANDB_API_KEY"):
        try:
            known = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            known = False
        if not known:
            return f"no API key (WANDB_API_KEY unset and no wandb login for {host})"
    try:
        socket.create_connection((host, port), timeout=WANDB_REACH_TIMEOUT_S).close()
    except OSError as e:
        return f"the wandb server {host}:{port} cannot be reached ({e.strerror or type(e).__name__})"
    return None


class RunMetrics:
    def __init__(self, trainer):
        self.trainer = trainer
        self.run = None             # the wandb run (rank 0, wandb.enabled)
        self.bar = None             # the progress bar (rank 0, progress=true)
        self.counts_by_worker: dict[int, dict] = {}   # each loader worker's latest counters
        self.counts_at_start: dict[str, int] = {}     # the counters the resumed checkpoint holds
        self.reported_lost = 0
        self.logged_checkpoints: set[tuple[str, tuple[str, ...]]] = set()   # (tag, aliases) logged as artifacts

    @property
    def path(self) -> Path:
        return self.trainer.out / "metrics.jsonl"

    def start(self) -> None:
        """Open wandb and the progress bar; on a resumed run first trim metrics.jsonl to the resumed step."""
        t, cfg = self.trainer, self.trainer.cfg
        if t.rank != 0:
            return
        if cfg.wandb.enabled:
            self.run = self.open_wandb()
        if cfg.progress:
            from micon.progress import bar as progress_bar
            self.bar = progress_bar(total=cfg.steps, initial=t.state.step, desc=f"train {t.method.name}",
                                    unit="step", dynamic_ncols=True)

    def open_wandb(self):
        """The wandb run: online where asked and possible, else offline (a resumed run continues its run id)."""
        import wandb

        t, cfg = self.trainer, self.trainer.cfg
        os.environ.setdefault("WANDB_MODE", "offline")
        mode = cfg.wandb.mode or os.environ.get("WANDB_MODE", "offline")
        demanded = cfg.wandb.mode == "online"
        run_id_file = t.out / "wandb_run_id"
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
        if mode == "online" and (problem := online_problem()):
            mode = self._offline_instead(problem, demanded)

        def init(mode: str):
            return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity or None, dir=str(t.out), mode=mode,
                              config=to_dict(cfg), name=cfg.wandb.name or wandb_runs.default_name(t.out),
                              group=cfg.wandb.group or wandb_runs.default_group(t.out), job_type="train",
                              tags=wandb_runs.tags_of(cfg.wandb.tags, t.method.name), id=run_id,
                              resume="allow" if run_id else None,
                              settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S))
        try:
            run = init(mode)
        except Exception as e:     # wandb's CommError, UsageError, a timeout: never the run's end
            if mode != "online":
                raise
            cause = f"wandb.init failed ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})"
            run = init(self._offline_instead(cause, demanded))
        run_id_file.write_text(run.id)
        wandb_runs.write_run_file(t.out, run, "train")
        return run

    def _offline_instead(self, problem: str, demanded: bool) -> str:
        if demanded:
            raise ConfigError(f"wandb.mode=online but {problem}; set WANDB_API_KEY (or wandb login) and check that "
                              f"the server is reachable from this node, or drop wandb.mode to log offline")
        log.warning("WANDB_MODE=online but %s: logging offline instead; upload the run later with `wandb sync "
                    "%s/wandb/offline-run-*`", problem, self.trainer.out)
        os.environ["WANDB_MODE"] = "offline"
        return "offline"

    def note_batch(self, batch: dict) -> None:
        self.counts_by_worker[batch["worker"]] = batch["counts"]

    def data_counts(self) -> dict[str, int]:
        """The rank's data counters, summed over its loader workers, cumulative over the run (resumes too)."""
        counts: dict[str, int] = dict(self.counts_at_start)
        for c in self.counts_by_worker.values():
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
        return counts

    def report(self, metrics: dict) -> None:
        """One logging step's row: to wandb and metrics.jsonl (rank 0), the bar's postfix; every rank warns
        when it has lost more samples to damaged shards since it last said so."""
        t = self.trainer
        counts = self.data_counts()
        lost = counts.get("samples_lost", 0)
        if lost > self.reported_lost:
            self.reported_lost = lost
            logging.getLogger("micon.data").warning(
                "rank %d: %d samples lost to unreadable, truncated or damaged shards so far (%d shard passes damaged)",
                t.rank, lost, counts.get("shards_damaged", 0))
        if t.rank != 0:
            return
        metrics = metrics | {f"data/{k}": v for k, v in counts.items()}
        self.log_new_checkpoints()    # those saved after the last report
        if self.run is not None:
            try:
                self.run.log(metrics, step=t.state.step)
            except Exception as e:       # its service gone (killed by a signal meant for the ranks, a full disk)
                self._drop_wandb(e)
        with open(self.path, "a") as fh:
            fh.write(atomic.dumps({"step": t.state.step, **metrics}) + "\n")   # NaN as null
        if self.bar is not None and "data_wait_share" in metrics:
            self.bar.set_postfix(loss=f"{t.last_losses.get('loss', float('nan')):.4f}",
                                 data=f"{metrics['data_wait_share']:.0%}")

    def log_checkpoint(self, path: Path, step: int, aliases: tuple[str, ...] = ()) -> None:
        """With wandb.log_checkpoints: the checkpoint in `path` (a step directory) as a `model` artifact by
        reference, aliased latest, step-N and `aliases` (e.g. ("best",)). Once per checkpoint and aliases; a
        failure is a warning."""
        t = self.trainer
        if self.run is None or not t.cfg.wandb.log_checkpoints:
            return
        key = (Path(path).name, tuple(sorted(aliases)))
        if key in self.logged_checkpoints or not (Path(path) / "model.pt").is_file():
            return
        self.logged_checkpoints.add(key)
        try:
            artifact = wandb_runs.checkpoint_artifact(Path(path) / "model.pt", run_id=self.run.id)
            self.run.log_artifact(artifact, aliases=wandb_runs.checkpoint_aliases(step, "latest", *aliases))
        except Exception as e:       # a checkpoint rotated away meanwhile, wandb gone: never the run's end
            log.warning("%s", wandb_runs.warning(f"checkpoint {path}", e))

    def log_new_checkpoints(self) -> None:
        """The checkpoints written since the last call (the rotation's survivors), oldest first, the one
        checkpoints/best names also as `best`: how checkpoints reach wandb without a call at each save."""
        t = self.trainer
        if self.run is None or not t.cfg.wandb.log_checkpoints or not t.ckpt_root.is_dir():
            return
        best = t.ckpt_root / "best"
        best_tag = best.read_text().strip() if best.is_file() else ""
        tags = sorted(p.name for p in t.ckpt_root.glob("step*")
                      if wandb_runs.step_of(p.name) is not None and (p / "model.pt").is_file())
        logged = {tag for tag, _ in self.logged_checkpoints}
        for tag in tags:
            # the best is the newest when marked: aliasing an older one again would move `latest` back to it
            if tag not in logged or (tag == best_tag == tags[-1]):
                self.log_checkpoint(t.ckpt_root / tag, wandb_runs.step_of(tag), ("best",) if tag == best_tag else ())

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, exit_code: int) -> None:
        self.close_bar()
        self.log_new_checkpoints()
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as e:
                self._drop_wandb(e)
            self.run = None

    def _drop_wandb(self, e: Exception) -> None:
        log.warning("wandb stopped working (%s: %s); continuing without it, metrics.jsonl keeps every row",
                    type(e).__name__, (str(e).strip().splitlines() or [""])[0][:200])
        self.run = None

