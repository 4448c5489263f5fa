"""A run's identity (its shard set's fingerprint, its method, its model settings) is fixed at its first step:
resuming under the same out= with other data or settings is refused naming both identities, unless
resume=force, which logs the change in OUT/run.json and keeps the earlier config under OUT/configs/."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from micon.config import load_config
from train import identity
from train.config import TrainConfig
from train.trainer import EXIT_OK, EXIT_STOPPED, train


def test_the_data_fingerprint_is_of_the_contents_not_the_path():
    manifest = {"format_version": 3, "channels": ["DNA"], "source": "/screens/a", "image_shape": [5, 64, 64],
                "shards": [{"name": "P1-000000.tar", "plate": "P1", "checksum": "ab"}], "splits": {}}
    fp = identity.data_fingerprint(manifest, None)
    assert fp == identity.data_fingerprint(dict(manifest, source="/moved/elsewhere"), None)   # moved: same data
    other = dict(manifest, shards=[{"name": "P1-000000.tar", "plate": "P1", "checksum": "cd"}])
    assert identity.data_fingerprint(other, None)["shards"] != fp["shards"]                    # rewritten shard
    assert identity.data_fingerprint(manifest, {"fingerprint": "f00d"}) == {"shards": fp["shards"],
                                                                            "replicate_sets": "f00d"}
    a = identity.identity("simclr", {"preset": "tiny", "projection_dim": 128}, fp)
    b = identity.identity("clip", {"preset": "tiny", "projection_dim": 64},
                          identity.data_fingerprint(other, {"fingerprint": "f00d"}))
    assert identity.differences(a, a) == []
    assert identity.differences(a, b) == [
        "method: simclr there, clip now",
        f"data (plate shards): {fp['shards']} there, {identity.data_fingerprint(other, None)['shards']} now",
        "data (replicate sets): None there, f00d now",
        "model.projection_dim: 128 there, 64 now"]


def test_configs_are_kept_when_they_change_on_a_resume(tmp_path):
    (tmp_path / "config.yaml").write_text("steps: 3\n")
    record = identity.start(tmp_path, identity.identity("simclr", {}, {"shards": "a", "replicate_sets": None}), "s")
    assert identity.keep_config(tmp_path, record, "steps: 3\n", 3) is None          # unchanged: nothing to keep
    assert identity.keep_config(tmp_path, record, "steps: 9\n", 3) == "configs/config-00000003.yaml"
    assert identity.keep_config(tmp_path, record, "steps: 9\n", 3) == "configs/config-00000003-2.yaml"
    assert (tmp_path / "configs" / "config-00000003.yaml").read_text() == "steps: 3\n"
    assert [h["config"] for h in identity.load(tmp_path)["config_history"]] == [
        "configs/config-00000003.yaml", "configs/config-00000003-2.yaml"]


def _cfg(shards, out, *extra):
    return load_config(TrainConfig, None, [f"data.shards={shards}", f"out={out}", "method=simclr", "micro_batch=4",
                                           "progress=false", "wandb.enabled=false", "ckpt_every=100", *extra])


def _other_data(tiny_shards, tmp_path):
    """A copy of the tiny shard set without its last plate: other data that trains just the same."""
    other = tmp_path / "other_shards"
    shutil.copytree(tiny_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    last = sorted(manifest["plates"])[-1]
    manifest["shards"] = [s for s in manifest["shards"] if s["plate"] != last]
    del manifest["plates"][last]
    (other / "manifest.json").write_text(json.dumps(manifest))
    return other


@pytest.mark.slow
def test_resume_with_other_data_is_refused_and_resume_force_records_the_change(tiny_shards, tmp_path, one_rank,
                                                                               capsys):
    out = tmp_path / "run"
    assert train(_cfg(tiny_shards, out, "steps=2")) == EXIT_OK
    first = identity.load(out)
    assert first["identity"]["method"] == "simclr" and first["since_step"] == 0 and first["changes"] == []

    moved = tmp_path / "moved_shards"      # the same shard set elsewhere is the same data: resumes
    shutil.copytree(tiny_shards, moved)
    assert train(_cfg(moved, out, "steps=3")) == EXIT_OK
    assert json.loads((out / "final.json").read_text())["step"] == 3
    assert identity.load(out)["identity"] == first["identity"]
    assert (out / "configs" / "config-00000002.yaml").is_file()   # steps and shards path changed: kept

    other = _other_data(tiny_shards, tmp_path)
    capsys.readouterr()
    assert train(_cfg(other, out, "steps=4")) == EXIT_STOPPED
    err = capsys.readouterr().err.strip()
    now = identity.data_fingerprint(json.loads((other / "manifest.json").read_text()),
                                    json.loads((other / "replicate_sets" / "manifest.json").read_text())
                                    if (other / "replicate_sets" / "manifest.json").is_file() else None)
    assert len(err.splitlines()) == 1 and err.startswith(f"train: {out} is a run of other data or settings"), err
    assert first["short"] in err and f"data={now['shards']}" in err                       # both identities
    assert f"data (plate shards): {first['identity']['data']['shards']} there, {now['shards']} now" in err
    assert "resume=force" in err
    assert json.loads((out / "final.json").read_text())["step"] == 3                        # nothing trained
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["shards"] == str(moved)   # nor recorded

    assert train(_cfg(other, out, "steps=4", "resume=force")) == EXIT_OK
    assert json.loads((out / "final.json").read_text())["step"] == 4
    record = identity.load(out)
    (change,) = record["changes"]
    assert change["step"] == 3 and change["from"] == first["identity"] and change["to_shards"] == str(other)
    assert change["differences"] == [f"data (plate shards): {first['identity']['data']['shards']} there, "
                                     f"{now['shards']} now"]
    assert record["identity"]["data"] == now                     # the run continues as one of the new data
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["shards"] == str(other)
    kept = [yaml.safe_load((out / h["config"]).read_text()) for h in record["config_history"]]
    assert [(k["data"]["shards"], k["steps"]) for k in kept] == [(str(tiny_shards), 2), (str(moved), 3)]
    assert [h["until_step"] for h in record["config_history"]] == [2, 3]


@pytest.mark.slow
def test_resume_with_other_model_settings_is_refused_naming_them(tiny_shards, tmp_path, one_rank, capsys, caplog):
    out = tmp_path / "run"
    assert train(_cfg(tiny_shards, out, "steps=1")) == EXIT_OK
    capsys.readouterr()
    assert train(_cfg(tiny_shards, out, "steps=2", "model.projection_dim=64")) == EXIT_STOPPED
    err = capsys.readouterr().err
    assert "model.projection_dim: 128 there, 64 now" in err and "Traceback" not in err
    # force cannot put weights into a model they do not fit: said in one line, nothing overwritten
    assert train(_cfg(tiny_shards, out, "steps=2", "model.projection_dim=64", "resume=force")) == EXIT_STOPPED
    err = capsys.readouterr().err
    assert "cannot be loaded into this model" in err and "Traceback" not in err
    assert identity.load(out)["changes"] == [] and json.loads((out / "final.json").read_text())["step"] == 1
    # a run from before run records resumes, with a warning, and gets one from the resumed step on
    (out / identity.RECORD).unlink()
    assert train(_cfg(tiny_shards, out, "steps=2")) == EXIT_OK
    assert "has no run record" in caplog.text
    assert identity.load(out)["since_step"] == 1 and identity.load(out)["identity"]["model"]["projection_dim"] == 128


@pytest.mark.slow
def test_every_rank_stops_on_a_resume_with_other_data(tiny_shards, tmp_path, one_rank, monkeypatch):
    """Rank 0 compares the identities and every rank gets its verdict: none waits in a collective (the
    distributed timeout is far longer than the test allows)."""
    import time

    from tests.test_train import run_torchrun

    out = tmp_path / "run"
    assert train(_cfg(tiny_shards, out, "steps=1")) == EXIT_OK
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k)
    t0 = time.time()
    proc = run_torchrun("-", f"data.shards={_other_data(tiny_shards, tmp_path)}", f"out={out}", "method=simclr",
                        "steps=2", "micro_batch=4", "progress=false", "wandb.enabled=false",
                        "engine.dist_timeout_s=600", check=False, timeout=300)
    assert proc.returncode != 0 and time.time() - t0 < 200
    assert proc.stderr.count(f"train: {out} is a run of other data or settings") == 1, proc.stderr[-3000:]
    assert "train/trainer.py" not in proc.stderr
    assert json.loads((out / "final.json").read_text())["step"] == 1
