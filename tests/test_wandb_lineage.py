"""Issue 33, part 3: runs linked in wandb. On the tiny screen a short training (wandb offline, log_checkpoints),
then embed and evaluate with wandb: their offline records name, group and type each run, log each checkpoint
as a `model` artifact by reference, and record embed's and evaluate's use of it (tests/wandb_records.py).
Issue 32's leftover: featurize, embed and rsets refuse a second writer of their output (exit 2, naming it).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from micon.config import load_config
from tests import s3server
from tests.conftest import REPO, job_env
from tests.wandb_records import artifacts, offline_runs, run_info
from train.config import TrainConfig
from train.trainer import EXIT_OK, train


s3 = s3server.s3       # the local S3 server fixture (moto)

HOLD = ("import sys, time\nfrom micon.locks import run_lock\n"
        "with run_lock(sys.argv[1], job=sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(120)\n")


def hold_lock(out, job: str) -> subprocess.Popen:
    """Another process holding the lock on `out` (until it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), job], cwd=REPO, env=job_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_train_embed_evaluate_are_one_lineage_in_wandb(tiny_shards, tmp_path, one_rank, offline, capsys):
    from evaluate import embed, run as evaluate

    exp = tmp_path / "exp7"
    out = exp / "train"
    cfg = load_config(TrainConfig, None, [
        f"data.shards={tiny_shards}", f"out={out}", "method=simclr", "micro_batch=4", "steps=4", "ckpt_every=2",
        "progress=false", "optim.warmup_steps=1", "data.augment.crop=16", "model.projection_dim=8",
        "wandb.log_checkpoints=true", "wandb.tags=tiny,lineage"])
    assert train(cfg) == EXIT_OK
    [train_log] = offline_runs(out)
    info = run_info(train_log)
    assert info["name"] == "train" and info["group"] == "exp7" and info["job_type"] == "train"
    assert set(info["tags"]) == {"tiny", "lineage", "simclr"}
    assert json.loads((out / "wandb_run.json").read_text())["group"] == "exp7"
    logged = artifacts(train_log)
    model = f"model-{info['id']}"
    assert [(a["name"], a["type"], a["used"]) for a in logged] == [(model, "model", False)] * 2
    assert ["step-2" in a["aliases"] for a in logged] == [True, False] and "step-4" in logged[1]["aliases"]
    assert "latest" in logged[1]["aliases"]
    for a, tag in zip(logged, ("step00000002", "step00000004")):
        assert a["refs"] == {"model.pt": (out / "checkpoints" / tag / "model.pt").resolve().as_uri()}   # no upload
        assert a["metadata"]["step"] == int(tag[4:])
    assert not list(out.rglob("wandb/**/artifacts/*"))

    emb = exp / "emb"
    assert embed.main([str(out), str(tiny_shards), str(emb), "ray=false", "wandb=true"]) == 0
    [embed_log] = offline_runs(emb)
    info = run_info(embed_log)
    assert (info["name"], info["group"], info["job_type"]) == ("emb", "exp7", "embed")
    used, made = artifacts(embed_log)
    # the same artifact version training logged: same name, same file digest (wandb sync links the two)
    assert (used["name"], used["used"], used["digest"]) == (model, True, logged[1]["digest"])
    assert made["type"] == "embeddings" and not made["used"] and made["name"].startswith("embeddings-emb-")
    assert {"embed.json", "embeddings.zarr/zarr.json", "sites.parquet"} <= set(made["refs"])
    assert all(ref.startswith(emb.resolve().as_uri() + "/") for ref in made["refs"].values())   # by reference

    ev = exp / "eval"
    assert evaluate.main([f"out={ev}", f"embeddings.simclr={emb}", "ray=false", "wandb=true", "null_size=50",
                          "bootstrap=20", "wandb_tags=nightly"]) == 0
    capsys.readouterr()
    [eval_log] = offline_runs(ev)
    info = run_info(eval_log)
    assert (info["name"], info["group"], info["job_type"]) == ("eval", "exp7", "evaluate")
    assert set(info["tags"]) == {"nightly", "evaluate"}
    uses = {a["name"]: a for a in artifacts(eval_log) if a["used"]}     # (its metrics table is an artifact too)
    assert set(uses) == {made["name"], model}
    assert uses[made["name"]]["digest"] == made["digest"] and uses[model]["digest"] == logged[1]["digest"]


def test_checkpoints_reach_wandb_once_each_aliased_latest_step_and_best(tmp_path):
    """RunMetrics logs the checkpoints written since its last look (at each logging step and the end), the
    one checkpoints/best names also as `best`, each once; the Trainer's own call after a save adds nothing twice."""
    from types import SimpleNamespace

    from micon.checkpoint import tag_of
    from train.run_metrics import RunMetrics

    root = tmp_path / "run" / "checkpoints"

    def write(step):
        (root / tag_of(step)).mkdir(parents=True)
        (root / tag_of(step) / "model.pt").write_bytes(bytes([step]) * 64)

    logged = []

    class Run:
        id = "r1"

        def log_artifact(self, artifact, aliases):
            logged.append((artifact.name, artifact.metadata["step"], sorted(aliases)))

    trainer = SimpleNamespace(cfg=SimpleNamespace(wandb=SimpleNamespace(log_checkpoints=True)), ckpt_root=root,
                              out=root.parent, rank=0)
    metrics = RunMetrics(trainer)
    metrics.run = Run()
    write(2), write(4)
    (root / "best").write_text(tag_of(4))
    (root / "step00000006.tmp").mkdir()      # a checkpoint being written: not one yet
    metrics.log_new_checkpoints()
    assert logged == [("model-r1", 2, ["latest", "step-2"]), ("model-r1", 4, ["best", "latest", "step-4"])]
    metrics.log_new_checkpoints()
    assert len(logged) == 2
    write(6)
    metrics.log_checkpoint(root / tag_of(6), 6)                      # the Trainer, after the save
    (root / "best").write_text(tag_of(6))
    metrics.log_new_checkpoints()                                    # marked best after it: aliased best now
    metrics.log_checkpoint(root / tag_of(6), 6, ("best",))           # the Trainer, after mark_best: once only
    assert logged[2:] == [("model-r1", 6, ["latest", "step-6"]), ("model-r1", 6, ["best", "latest", "step-6"])]


def test_groups_and_names_can_be_set_and_wandb_never_fails_embed(tiny_shards, tmp_path, offline, monkeypatch,
                                                                   capsys):
    """A group and name given win over the inherited ones; a featuriser reads no checkpoint; a wandb that fails
    is a warning, the embeddings complete."""
    from evaluate import embed
    from micon import wandb_runs

    emb = tmp_path / "a" / "stats"
    assert embed.main(["image_stats", str(tiny_shards), str(emb), "ray=false", "wandb=true", "wandb_group=g1",
                       "wandb_name=n1"]) == 0
    [log] = offline_runs(emb)
    assert (run_info(log)["name"], run_info(log)["group"]) == ("n1", "g1")
    assert [a["type"] for a in artifacts(log)] == ["embeddings"]

    def broken(*a, **k):
        raise RuntimeError("wandb service gone")
    monkeypatch.setattr(wandb_runs, "open_run", broken)
    shutil.rmtree(emb)
    assert embed.main(["image_stats", str(tiny_shards), str(emb), "ray=false", "wandb=true"]) == 0
    err = capsys.readouterr().err
    assert "embed: wandb: the run not recorded (RuntimeError: wandb service gone)" in err
    assert (emb / "embed.json").is_file()


# ----------------------------------------------------------------------------------------- issue 32: one writer

@pytest.mark.parametrize("job", ["featurize", "embed", "rsets"])
def test_a_second_featurize_embed_or_rsets_is_refused_naming_the_first(job, tiny_screen, tiny_shards, tmp_path,
                                                                       capsys):
    if job == "featurize":
        from data_prep.featurize import main
        out = tmp_path / "graphs"
        argv = [str(tiny_screen / "metadata" / "compound.csv.gz"), str(out), "workers=1"]
    elif job == "embed":
        from evaluate.embed import main
        out = tmp_path / "emb"
        argv = ["image_stats", str(tiny_shards), str(out), "ray=false"]
    else:
        from data_prep.replicate_sets import main
        out = tmp_path / "shards"
        shutil.copytree(tiny_shards, out)
        argv = [str(out)]
    proc = hold_lock(out, job="prep")
    try:
        assert main(argv) == 2
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err
    assert err.startswith(f"{job}: {out} is in use by another prep run (pid {proc.pid} on host "), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_embeddings_in_a_bucket_are_referenced_by_url(s3, tiny_shards, tmp_path, offline, monkeypatch, capsys):
    """embed into object storage: its run's files go to ./wandb (the bucket holds wandb_run.json), its artifact
    references the objects by URL (nothing downloaded or uploaded), and evaluate's use of it is the same version."""
    from evaluate import embed, run as evaluate
    from micon import storage

    monkeypatch.chdir(tmp_path)
    url = f"s3://{s3.bucket('lineage')}/exp3/emb"
    assert embed.main(["image_stats", str(tiny_shards), url, "ray=false", "wandb=true"]) == 0
    [embed_log] = offline_runs(tmp_path)
    assert (run_info(embed_log)["name"], run_info(embed_log)["group"]) == ("emb", "exp3")
    [made] = artifacts(embed_log)
    assert made["refs"] == {"embed.json": f"{url}/embed.json", "embeddings.zarr": f"{url}/embeddings.zarr",
                            "sites.parquet": f"{url}/sites.parquet"}
    assert json.loads(storage.read_bytes(f"{url}/wandb_run.json"))["job_type"] == "embed"
    ev = tmp_path / "eval"
    assert evaluate.main([f"out={ev}", f"embeddings.image_stats={url}", "ray=false", "null_size=50",
                          "bootstrap=20"]) == 0
    capsys.readouterr()
    [eval_log] = offline_runs(ev)
    assert run_info(eval_log)["group"] == "exp3"        # embed's group, read from the bucket
    [used] = [a for a in artifacts(eval_log) if a["used"]]      # (its metrics table is an artifact too)
    assert (used["name"], used["used"], used["digest"]) == (made["name"], True, made["digest"])
