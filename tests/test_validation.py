"""Validation during training (val.every, val.keep_best, val.patience; train.validation, micon.eval.validation):
the numbers it logs equal embed + evaluate on the same wells with that step's checkpoint; the best checkpoint
outlives the rotation and `embed RUN/best` reads it; patience stops the run; 2 gloo ranks give the 1-rank
numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, job_env, run_job
from micon import schema

VAL = ("nsb_top1", "nsb_top10", "nss_top1", "nss_top10", "map_activity")


@pytest.fixture(scope="module")
def held_shards(tiny_screen, tmp_path_factory):
    """The tiny screen with a quarter of its compounds held out (the validation split)."""
    out = tmp_path_factory.mktemp("val") / "shards"
    run_job("data_prep.ingest", tiny_screen, out, "workers=1", "shard_mb=0.2", "heldout_compound_fraction=0.25")
    return out


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_validation_logs_what_embed_and_evaluate_give_and_keeps_the_best(held_shards, tiny_graphs, tmp_path):
    run = tmp_path / "run"
    proc = run_job("train.run", "-", f"data.shards={held_shards}", f"data.graphs={tiny_graphs}", f"out={run}",
                   "steps=6", "micro_batch=4", "ckpt_every=2", "keep_ckpts=1", "progress=false", "wandb.enabled=false",
                   "val.every=2", "val.keep_best=map_activity", "val.recipe=morphohelm", "optim.lr=3e-3")
    logged = {r["step"]: r for r in rows(run) if "val/nsb_top10" in r}
    assert sorted(logged) == [2, 4, 6]
    assert all(set(f"val/{m}" for m in VAL) <= set(r) for r in logged.values())
    assert "validation (val.split=heldout_compounds)" in proc.stderr
    # the best step outlives keep_ckpts=1; final.json names it; checkpoints/best points at it
    final = json.loads((run / "final.json").read_text())
    best = final["best"]
    assert best["metric"] == "val/map_activity"
    assert best["value"] == max(r["val/map_activity"] for r in logged.values())
    tag = f"step{best['step']:08d}"
    assert (run / "checkpoints" / "best").read_text() == tag
    kept = sorted(p.name for p in (run / "checkpoints").glob("step*"))
    assert kept == sorted({tag, "step00000006"})
    # embed RUN/best: its sites' embeddings are validation's, to float tolerance; and evaluate on validation's
    # embeddings of that checkpoint gives the numbers validation logged at that step
    emb = tmp_path / "emb"
    run_job("evaluate.embed", run / "best", held_shards, emb, "ray=false")
    assert json.loads((emb / "embed.json").read_text())["identity"]["model"]["step"] == best["step"]
    import torch

    from micon.checkpoint import load_checkpoint
    from micon.data.shards import Manifest
    from micon.embeddings import load_embeddings, write_consolidated
    from train.config import ValConfig
    from train.validation import Validator

    model = load_checkpoint(run / "best").build_model()
    trainer = SimpleNamespace(cfg=SimpleNamespace(val=ValConfig(every=2, recipe="morphohelm"), micro_batch=4,
                                                  data=SimpleNamespace(normalize="plate")),
                              manifest=Manifest.load(held_shards), rank=0, world=1, out=tmp_path / "again",
                              device=torch.device("cpu"), dtype=torch.float32, engine=SimpleNamespace(module=model),
                              state=SimpleNamespace(validation={}))
    v = Validator(trainer)
    again = v.run(best["step"])
    val_emb = v.embed()
    meta, x = load_embeddings(emb)
    at = pd.MultiIndex.from_frame(meta[[schema.PLATE, schema.WELL, schema.SITE]])
    order = at.get_indexer(pd.MultiIndex.from_frame(v.rows[[schema.PLATE, schema.WELL, schema.SITE]]))
    assert (order >= 0).all()
    np.testing.assert_allclose(val_emb, x[order], rtol=1e-4, atol=1e-5)
    assert pd.read_csv(tmp_path / "again" / "val" / "wells.csv").equals(pd.read_csv(run / "val" / "wells.csv"))
    sub = tmp_path / "emb_val"
    write_consolidated(sub, val_emb, v.rows.drop(columns=["shard", "position"]),
                       {k: v_ for k, v_ in json.loads((emb / "embed.json").read_text()).items()
                        if k not in ("n_sites", "dim", "checksum", "checksums")})
    run_job("evaluate.run", f"embeddings.micon_best={sub}", f"out={tmp_path / 'eval'}", "ray=false", "bootstrap=2",
            "activity_null=false", "well_consistency=false", "wandb=false", "recipe=morphohelm")
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())["methods"]["micon_best"]
    for metric in VAL:
        assert again[f"val/{metric}"] == pytest.approx(logged[best["step"]][f"val/{metric}"], abs=1e-6), metric
        assert logged[best["step"]][f"val/{metric}"] == pytest.approx(m[metric], abs=1e-6), metric


def test_patience_stops_the_run_and_a_rerun_does_nothing(held_shards, tiny_graphs, tmp_path):
    run = tmp_path / "run"
    args = ("train.run", "-", f"data.shards={held_shards}", f"data.graphs={tiny_graphs}", f"out={run}", "steps=40",
            "micro_batch=4", "ckpt_every=20", "progress=false", "wandb.enabled=false", "val.every=2",
            "val.patience=1", "val.keep_best=nsb_top10", "val.max_wells=40")
    proc = run_job(*args)
    final = json.loads((run / "final.json").read_text())
    assert final["step"] < 40 and final["stopped_early"].startswith("val.patience=1")
    assert "val.patience=1: no better val/nsb_top10 in 1 validations" in proc.stderr
    again = run_job(*args)
    assert "this run stopped early" in again.stderr
    assert json.loads((run / "final.json").read_text())["step"] == final["step"]


def test_validation_settings_are_checked(held_shards, tmp_path):
    from train.config import TrainConfig, ValConfig

    unused = TrainConfig(data=TrainConfig().data, val=ValConfig(keep_best="nsb_top10")).unused()
    assert "val.keep_best=nsb_top10 is unused with val.every=0: set val.every=N" in " ".join(unused)
    proc = run_job("train.run", "-", f"data.shards={held_shards}", f"out={tmp_path}", "method=simclr", "val.every=2",
                   "val.split=plates:nowhere", "steps=2", "progress=false", "wandb.enabled=false", check=False)
    assert proc.returncode == 2 and "val.split=plates:nowhere: no plate nowhere in the shard set" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()      # refused before the first step


def test_two_ranks_give_the_one_rank_numbers(held_shards, tmp_path):
    """The same network validated by 1 and by 2 gloo ranks (torchrun; each rank embeds its share, one gather)."""
    got = {}
    for world in (1, 2):
        out = tmp_path / str(world)
        proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={world}",
                               str(Path(__file__).parent / "validate_ranks.py"), str(held_shards), str(out)],
                              cwd=REPO, env=job_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[world] = (json.loads((out / "scores.json").read_text()), np.load(out / "embeddings.npy"))
    (s1, e1), (s2, e2) = got[1], got[2]
    np.testing.assert_allclose(e2, e1, rtol=1e-5, atol=1e-6)
    for metric in VAL:
        assert s2[f"val/{metric}"] == pytest.approx(s1[f"val/{metric}"], abs=1e-6), metric
