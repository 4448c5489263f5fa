"""The training step's speed options leave the loss unchanged: a few in-process steps with today's settings
(NCHW, AdamW's per-tensor loop, metrics read every step) and with channels_last, foreach and fused AdamW,
a compiled image encoder and metrics read every few steps, on the same data; losses and weights agree
within float rounding. A non-finite loss still stops the run at its step when metrics are read rarely.
One trainer run per case (about 5 s on 2 idle cores), so the module is marked slow."""
from __future__ import annotations

import json

import pytest
import torch

from micon.checkpoint import load_checkpoint
from micon.config import load_config
from micon.distributed import free_port
from train.config import TrainConfig
from train.trainer import EXIT_OK, train

pytestmark = pytest.mark.slow
STEPS = 4
TODAY = ["engine.channels_last=off", "optim.kernel=for_loop", "wandb.log_every=1"]


def _run(shards, out, *extra) -> tuple[list[dict], dict]:
    cfg = load_config(TrainConfig, None, [f"data.shards={shards}", f"out={out}", "method=paclr", "micro_batch=4",
                                          f"steps={STEPS}", "progress=false", "wandb.enabled=false", "resume=none",
                                          "data.augment.crop=16", "model.projection_dim=8", "optim.warmup_steps=1",
                                          "optim.lr=1e-3", f"ckpt_every={STEPS}", *extra])
    assert train(cfg) == EXIT_OK
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, load_checkpoint(out).weights


@pytest.fixture(scope="module")
def today(tiny_shards, tmp_path_factory):
    """Today's step: its per-step metrics and final weights, the reference of every other case."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(free_port())).items():
            mp.setenv(k, v)
        return _run(tiny_shards, tmp_path_factory.mktemp("today") / "run", *TODAY)


def _close(weights, reference, tol):
    """All weights as one vector: |w - w_ref| <= tol |w_ref|. Adam turns rounding noise in a near-zero gradient
    into an update of about lr, so single elements may differ by that much; the whole must not."""
    assert weights.keys() == reference.keys()
    diff = sum(float(((weights[k].double() - reference[k].double()) ** 2).sum()) for k in reference) ** 0.5
    norm = sum(float((reference[k].double() ** 2).sum()) for k in reference) ** 0.5
    assert diff <= tol * norm, (diff / norm, tol)


# measured: NHWC convolutions sum in another order (weights 1.8e-3 apart after 4 steps, first loss 2e-7);
# foreach is bit-identical to the loop under ZeRO (one flat tensor per group); fused 2e-7
@pytest.mark.parametrize("option, loss_tol, weight_tol", [("engine.channels_last=on", 3e-3, 5e-3),
                                                          ("optim.kernel=foreach", 1e-6, 1e-6),
                                                          ("optim.kernel=fused", 1e-5, 1e-5)])
def test_speed_options_keep_the_loss(option, loss_tol, weight_tol, today, tiny_shards, tmp_path, one_rank):
    rows, weights = _run(tiny_shards, tmp_path / "run", *TODAY, option)
    ref_rows, ref_weights = today
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[0]["loss/loss"] == pytest.approx(ref_rows[0]["loss/loss"], rel=1e-5)   # before any update
    assert [r["loss/loss"] for r in rows] == pytest.approx([r["loss/loss"] for r in ref_rows], rel=loss_tol)
    _close(weights, ref_weights, weight_tol)


def test_metrics_read_every_few_steps_are_the_means_of_the_steps(today, tiny_shards, tmp_path, one_rank):
    rows, weights = _run(tiny_shards, tmp_path / "run", *TODAY[:-1], "wandb.log_every=3")
    ref_rows, ref_weights = today
    assert [r["step"] for r in rows] == [3, 4]       # every 3 steps, and the last one (the checkpoint's)
    losses = [r["loss/loss"] for r in ref_rows]
    assert rows[0]["loss/loss"] == pytest.approx(sum(losses[:3]) / 3, rel=1e-6)
    assert rows[1]["loss/loss"] == pytest.approx(losses[3], rel=1e-6)
    assert rows[1]["samples_seen"] == ref_rows[-1]["samples_seen"] and rows[1]["lr"] == ref_rows[-1]["lr"]
    _close(weights, ref_weights, 0.0)       # the same computation, only read less often


def test_a_compiled_image_encoder_keeps_the_loss_and_the_checkpoint_keys(today, tiny_shards, tmp_path, one_rank,
                                                                          monkeypatch):
    # inductor builds C++ on CPU (minutes); aot_eager traces the same graph through torch.compile without it
    compiled = []
    real = torch.nn.Module.compile

    def compile_(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return real(self, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_)
    rows, weights = _run(tiny_shards, tmp_path / "run", *TODAY, "engine.compile=true")
    assert compiled == ["ImageEncoder"]
    assert [r["loss/loss"] for r in rows] == pytest.approx([r["loss/loss"] for r in today[0]], rel=3e-3)
    _close(weights, today[1], 5e-3)    # and the same keys: no "_orig_mod." in the checkpoint embed reads


def test_a_nonfinite_loss_read_late_stops_at_its_step_before_a_checkpoint(tiny_shards, tmp_path, one_rank,
                                                                          monkeypatch, capsys):
    from micon.methods import get_method

    real, calls = get_method("paclr").loss, {"n": 0}

    def loss(model, batch, cfg):
        calls["n"] += 1
        parts = real(model, batch, cfg)
        return {"loss": parts["loss"] * float("nan")} if calls["n"] == 2 else parts

    monkeypatch.setattr(get_method("paclr"), "loss", loss)
    cfg = load_config(TrainConfig, None, [f"data.shards={tiny_shards}", f"out={tmp_path / 'run'}", "method=paclr",
                                          "micro_batch=4", "steps=4", "progress=false", "wandb.enabled=false",
                                          "data.augment.crop=16", "wandb.log_every=3", "ckpt_every=3"])
    assert train(cfg) == 1
    err = capsys.readouterr().err
    assert "train: non-finite loss at step 1 (paclr, loss nan on rank 0)" in err and "on_nonfinite=skip" in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").glob("step*"))
