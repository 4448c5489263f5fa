"""Learning curves: retrieval against training step, each checkpoint embedded and scored while the run trains,
beside the CellProfiler-grade and oracle rows."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from micon import atomic

from .design import ROOT, TRAIN_ARGS, log
from .diagnosis import loss_curve, tail_ratio
from .plots import plot_learning_curves
from .runs import embed_baseline, embed_in_process, oracle_embedding, prepare, train_command, training_shards
from .scoring import profiles, score


def learning_curve(out: Path, name: str, method: str, seed: int, steps: int, every: int, extra: list[str],
                   shards: Path | None = None, n_boot: int = 200) -> dict:
    """Retrieval against training step: train `method` (checkpoints every `every` steps, all kept) and, while it
    trains, embed each checkpoint in-process and score it on the training split (fit) and the held-out splits
    (transfer); step 0 is the same network as initialised (`untrained:RUN`). Resumable: a finished step is
    never scored again, a killed training resumes from its latest checkpoint. Writes OUT/curves/NAME.json."""
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    ckpt = out / "train" / name
    path = out / "curves" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(path.read_text()) if path.is_file() else {}
    res.update(method=method, seed=seed, steps=steps, every=every, extra=[*TRAIN_ARGS, *extra],
               data=str(shards or out / "shards"))
    res.setdefault("scores", {})
    proc = None
    if not (ckpt / "final.json").is_file():
        args = train_command(out, ckpt, method, seed, steps, shards or out / "shards",
                             ["data.augment.crop=56", f"ckpt_every={every}", "keep_ckpts=0", "wandb.log_every=10",
                              *TRAIN_ARGS, *extra])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0"}
        (out / "logs").mkdir(parents=True, exist_ok=True)
        logf = open(out / "logs" / f"train-{name}.log", "a")
        proc = subprocess.Popen(args, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env=env)
        log(f"{name}: training {method} for {steps} steps (pid {proc.pid}), scoring every {every}")

    def score_step(label: str, source: str) -> None:
        emb = embed_in_process(out, source, out / "embeddings" / name / label, f"{name}-{label}")
        s = res["scores"][label.removeprefix("step").lstrip("0") or "0"] = score(
            *profiles(emb), splits, n_boot=n_boot, seed=seed, fit=True)
        atomic.write_json(path, res)
        log(f"{name} {label}: NSB top-10 " + ", ".join(f"{k} {v['nsb_top10']:.3f}" for k, v in s.items()))

    while True:
        finished = proc is None or proc.poll() is not None
        latest = ckpt / "checkpoints" / "latest"
        if latest.is_file():
            if "0" not in res["scores"]:      # the run's network as initialised (read from its first checkpoint)
                score_step("step0", f"untrained:{ckpt}")
            last = int(latest.read_text().strip().removeprefix("step"))
            for d in sorted((ckpt / "checkpoints").glob("step*")):
                n = int(d.name.removeprefix("step"))
                if n <= last and str(n) not in res["scores"]:
                    score_step(d.name, str(d))
        if finished:
            break
        time.sleep(20)
    if proc is not None and proc.returncode:
        raise RuntimeError(f"training {name} exited {proc.returncode}; see {out / 'logs' / f'train-{name}.log'}")
    c = loss_curve(ckpt)
    res.update(chance=float(c.chance.iloc[0]), tail_ratio=tail_ratio(c),
               curve=c[["step", "loss", "ratio"]].round(4).to_dict("list"))
    atomic.write_json(path, res)
    return res


def refs(out: Path) -> dict:
    """The reference rows of the learning curves (OUT/curves/refs.json): the CellProfiler-grade baseline and the
    ground-truth oracle, embedded once and scored like every checkpoint."""
    path = out / "curves" / "refs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(path.read_text()) if path.is_file() else {}
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    for label in ("cellprofiler", "oracle"):
        if label in res:
            continue
        emb = embed_baseline(out) if label == "cellprofiler" else oracle_embedding(out)
        res[label] = score(*profiles(emb), splits, n_boot=200, fit=True)
        atomic.write_json(path, res)
        log(f"{label}: NSB top-10 " + ", ".join(f"{k} {v['nsb_top10']:.3f}" for k, v in res[label].items()))
    return res


def run_curves(a) -> int:
    """--curve: each of --methods x --seeds trained for a.curve steps, every --every-th checkpoint scored; then
    OUT/learning_curves_LABEL.png."""
    TRAIN_ARGS[:] = a.train_args
    out = Path(a.out).resolve()
    prepare(out, a.preset)
    refs(out)
    shards, rec = training_shards(out, a.data)
    if rec:
        atomic.write_json(out / "curves" / "activity_call.json", rec)
    names = []
    for seed in a.seeds:
        for m in a.methods:
            name = "_".join(filter(None, [m, a.data if a.data != "all" else "", a.label, f"seed{seed}"]))
            learning_curve(out, name, m, seed, a.curve, a.every, [], shards)
            names.append(name)
    plot_learning_curves(out, names, out / f"learning_curves_{a.label or 'runs'}.png")
    return 0
