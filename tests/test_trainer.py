"""The Trainer in-process with one rank: a skipped non-finite batch is not a step (the engine, the
learning-rate schedule, the step counter and the data position stay consistent), endless non-finite
losses stop the run with a message, and the state saved with a checkpoint is the trainer's state."""
from __future__ import annotations

import json
import math

import pytest

from micon.checkpoint import CheckpointError, load_checkpoint
from micon.config import load_config
from train.config import TrainConfig
from train.trainer import EXIT_OK, Trainer, TrainingStopped, lr_lambda, train

pytestmark = pytest.mark.slow


def _cfg(shards, out, *extra):
    return load_config(TrainConfig, None, [f"data.shards={shards}", f"out={out}", "method=simclr", "micro_batch=4",
                                           "progress=false", "wandb.enabled=false", "optim.lr=1e-3",
                                           "optim.warmup_steps=2", *extra])


def _nan_on(trainer, monkeypatch, calls_to_poison):
    real = trainer.method.loss
    calls = {"n": 0}

    def loss(model, batch, cfg):
        parts = real(model, batch, cfg)
        calls["n"] += 1
        if calls["n"] in calls_to_poison or "all" in calls_to_poison:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(trainer.method, "loss", loss)   # the registry's instance; restored after the test


def test_skipped_nonfinite_batch_is_not_a_step(tiny_shards, tmp_path, one_rank, monkeypatch):
    steps = 6
    cfg = _cfg(tiny_shards, tmp_path / "skip", f"steps={steps}", "on_nonfinite=skip", "ckpt_every=100")
    trainer = Trainer(cfg).setup()
    _nan_on(trainer, monkeypatch, {3})
    code = trainer.fit()
    trainer.finish(code)
    assert code == EXIT_OK
    s = trainer.state
    assert (s.step, s.skipped_nonfinite, s.data_position, s.samples_seen) == (steps, 1, steps + 1, steps * 4)
    assert trainer.engine.global_steps == steps           # DeepSpeed took exactly one update per step
    assert trainer.scheduler.last_epoch == steps           # and the schedule moved once per step
    logged = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    f = lr_lambda(cfg.optim.warmup_steps, steps, cfg.optim.min_lr_ratio)
    for r in logged:   # the learning rate after step k is the schedule's value at k: no step was lost
        assert r["lr"] == pytest.approx(cfg.optim.lr * f(r["step"]))
        assert math.isfinite(r["loss/loss"])
    assert logged[-1]["skipped_nonfinite"] == 1
    saved = load_checkpoint(tmp_path / "skip").state     # the state object travels with the checkpoint
    assert saved["step"] == steps and saved["data_position"] == steps + 1 and saved["skipped_nonfinite"] == 1
    final = json.loads((tmp_path / "skip" / "final.json").read_text())
    assert final["skipped_nonfinite"] == 1 and final["step"] == steps


def test_endless_nonfinite_losses_stop_the_run(tiny_shards, tmp_path, one_rank, monkeypatch, capsys):
    cfg = _cfg(tiny_shards, tmp_path / "diverged", "steps=5", "on_nonfinite=skip", "max_skips_in_a_row=3")
    trainer = Trainer(cfg).setup()
    _nan_on(trainer, monkeypatch, {"all"})
    with pytest.raises(TrainingStopped, match="3 batches in a row had a non-finite loss at step 0"):
        trainer.fit()
    trainer.finish(1)
    assert trainer.state.step == 0 and trainer.engine.global_steps == 0 and trainer.state.data_position == 3


def test_stop_mode_names_the_step_and_the_fix(tiny_shards, tmp_path, one_rank, monkeypatch, capsys):
    from micon.methods import get_method

    real = get_method("simclr").loss
    monkeypatch.setattr(get_method("simclr"), "loss", lambda m, b, c: {"loss": real(m, b, c)["loss"] * float("inf")})
    assert train(_cfg(tiny_shards, tmp_path / "stop", "steps=3")) == 1
    err = capsys.readouterr().err
    assert "train: non-finite loss at step 0 (simclr" in err and "set on_nonfinite=skip" in err


def test_every_data_counter_is_logged_from_the_first_step(tiny_shards, tmp_path, one_rank):
    from micon.data.pipeline import Counts

    assert train(_cfg(tiny_shards, tmp_path / "c", "steps=2")) == EXIT_OK
    first = json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[0])
    assert {f"data/{k}" for k in Counts.REPORTED} <= set(first), sorted(first)
    assert first["data/controls_source"] == 0 and first["data/examples"] == 4   # simclr: single sites


def test_resuming_a_checkpoint_without_a_record_continues_and_writes_one(tiny_shards, tmp_path, one_rank, caplog):
    import torch

    out = tmp_path / "old"
    assert train(_cfg(tiny_shards, out, "steps=2")) == EXIT_OK
    model_file = out / "checkpoints" / "step00000002" / "model.pt"
    ck = torch.load(model_file, weights_only=True)
    del ck["record"]                                    # what a checkpoint of an older version holds
    torch.save(ck, model_file)
    with pytest.raises(CheckpointError, match="written before checkpoints described themselves"):
        load_checkpoint(out)
    assert train(_cfg(tiny_shards, out, "steps=3")) == EXIT_OK   # the message's advice works
    assert "written before checkpoints described themselves" in caplog.text
    assert load_checkpoint(out).record.step == 3


def test_a_missing_checkpoint_to_resume_is_named(tiny_shards, tmp_path, one_rank, capsys):
    assert train(_cfg(tiny_shards, tmp_path / "r", "steps=2", "resume=step00000007")) == 1
    assert "step00000007 is missing or incomplete" in capsys.readouterr().err
