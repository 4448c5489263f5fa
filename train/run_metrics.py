"""The Trainer's metrics component (torchtitan's MetricsProcessor shape): where a run's numbers go.

At the start it opens the wandb run (offline unless told otherwise; a resumed run continues the same wandb
run) and the progress bar; at each logging step it adds the data counters, writes one row to wandb and to
metrics.jsonl (its plain-text twin), and warns once per new loss of samples to damaged shards; at the end it
closes both. (A resumed run's rows past its checkpoint are dropped on resume: train.run_checkpoints.)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from micon import atomic
from micon.config import to_dict

log = logging.getLogger("micon.train")


class RunMetrics:
    def __init__(self, trainer):
        self.trainer = trainer
        self.run = None             # the wandb run (rank 0, wandb.enabled)
        self.bar = None             # the progress bar (rank 0, progress=true)
        self.counts_by_worker: dict[int, dict] = {}   # each loader worker's latest counters
        self.counts_at_start: dict[str, int] = {}     # the counters the resumed checkpoint holds
        self.reported_lost = 0

    @property
    def path(self) -> Path:
        return self.trainer.out / "metrics.jsonl"

    def start(self) -> None:
        """Open wandb and the progress bar; on a resumed run first trim metrics.jsonl to the resumed step."""
        t, cfg = self.trainer, self.trainer.cfg
        if t.rank != 0:
            return
        if cfg.wandb.enabled:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            run_id_file = t.out / "wandb_run_id"
            run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
            self.run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity or None, dir=str(t.out),
                                  mode=cfg.wandb.mode or os.environ.get("WANDB_MODE", "offline"), config=to_dict(cfg),
                                  name=cfg.wandb.name or None, id=run_id, resume="allow" if run_id else None)
            run_id_file.write_text(self.run.id)
        if cfg.progress:
            from micon.progress import bar as progress_bar
            self.bar = progress_bar(total=cfg.steps, initial=t.state.step, desc=f"train {t.method.name}",
                                    unit="step", dynamic_ncols=True)

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
        if self.run is not None:
            self.run.log(metrics, step=t.state.step)
        with open(self.path, "a") as fh:
            fh.write(atomic.dumps({"step": t.state.step, **metrics}) + "\n")   # NaN as null
        if self.bar is not None and "data_wait_share" in metrics:
            self.bar.set_postfix(loss=f"{t.last_losses.get('loss', float('nan')):.4f}",
                                 data=f"{metrics['data_wait_share']:.0%}")

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, exit_code: int) -> None:
        self.close_bar()
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

