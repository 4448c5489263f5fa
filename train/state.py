"""What a run carries from step to step and across a resume: `TrainState` (saved with every checkpoint), the
loss window between log lines, the stop signals, and the exceptions that end a run with a message."""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

import torch


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0                    # optimizer steps taken (a skipped batch is not a step)
    samples_seen: int = 0            # examples that went into optimizer steps, all ranks
    seed: int = 0                    # model initialisation seed
    data_seed: int = 0               # the stream's shuffle seed (changes when the layout changes on resume)
    data_position: int = 0           # batches consumed by this rank's loader, skipped ones included
    data_workers: int = 0
    world_size: int = 1
    skipped_nonfinite: int = 0       # batches dropped for a non-finite loss
    data_counts: dict = field(default_factory=dict)   # the stream's counters up to this checkpoint
    validation: dict = field(default_factory=dict)    # val.keep_best / val.patience: the best step, its value,
                                                      # validations since it


class LossWindow:
    """The steps since metrics were last logged, kept on the device: loss parts summed, and the first step whose
    loss was not finite. Reading them (`read`) is the only device sync of a step, once per wandb.log_every."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_steps = self.steps = 0
        self.first_bad: torch.Tensor | None = None   # -1, or the first step with a non-finite loss
        self.bad_loss: torch.Tensor | None = None
        self.data_time = 0.0
        self.t0 = time.perf_counter()

    def add(self, parts: dict, step: int) -> None:
        for k, v in parts.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.micro_steps += 1
        loss = parts["loss"].detach().float()
        bad = ~torch.isfinite(loss)
        if self.first_bad is None:
            self.first_bad, self.bad_loss = torch.full_like(loss, -1.0), torch.zeros_like(loss)
        new = bad & (self.first_bad < 0)
        self.first_bad = torch.where(new, torch.full_like(loss, float(step)), self.first_bad)
        self.bad_loss = torch.where(new, loss, self.bad_loss)

    def read(self) -> tuple[dict[str, float], int, float]:
        """(mean of each loss part over the window, first non-finite step or -1, that loss); waits for the device."""
        keys = list(self.sums)
        if not keys:
            return {}, -1, float("nan")
        values = torch.stack([self.sums[k] for k in keys] + [self.first_bad, self.bad_loss]).tolist()
        means = {k: v / self.micro_steps for k, v in zip(keys, values)}
        return means, int(values[-2]), values[-1]


class TrainingStopped(RuntimeError):
    """A run that must stop with a message for a person (exit code 1)."""


class DataStopped(TrainingStopped):
    """A rank's data stream cannot go on; every rank stops with that rank's message."""


class SignalFlag:
    """SIGTERM / SIGUSR1 (Slurm's warning before the time limit or preemption) ask for a checkpoint."""

    def __init__(self):
        from train import signals

        self._previous = {s: signal.signal(s, self._handle) for s in signals.STOP_SIGNALS}
        self.signum = signals.take_early()    # one received during start-up (train.run installs that handler)

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
