"""Running the real jobs: the screen, its shards and graphs, each method's training and embedding (train.run
under DeepSpeed, evaluate.embed under Ray), the baselines, zero-shot predictions and the activity-aware shards.
Every stage is skipped when its output exists, so a killed comparison resumes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd

from micon import schema

from .design import EMBED_ARGS, LR, RECIPE, ROOT, TRAIN_ARGS, log
from .scoring import profiles


_TIMES_LOCK = threading.Lock()


def sh(args: list[str], logfile: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for attempt in range(3):   # a loaded machine can miss Ray's fixed 30 s node start-up: start again
        with open(logfile, "w") as fh:
            rc = subprocess.run(args, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        if not rc or "timed out during startup" not in logfile.read_text()[-3000:]:
            break
        log(f"{logfile.stem}: Ray's node did not start in time (machine busy); try {attempt + 2} of 3")
    # each job's seconds, kept across resumed runs (OUT/stage_seconds.json): the compute the results cost
    times_path = logfile.parent.parent / "stage_seconds.json"
    with _TIMES_LOCK:       # --lanes: several stages finish at once
        times = json.loads(times_path.read_text()) if times_path.is_file() else {}
        times[logfile.stem] = round(time.perf_counter() - t0, 1)
        times_path.write_text(json.dumps(times, indent=1))
    if rc:
        raise RuntimeError(f"{' '.join(args[:4])} ... exited {rc}; see {logfile}:\n{logfile.read_text()[-1500:]}")


def prepare(out: Path, preset: str) -> None:
    py = sys.executable
    if not (out / "screen" / "ground_truth").is_dir():
        log(f"synthetic screen (preset={preset})")
        sh([py, "-m", "data_prep.synth", str(out / "screen"), f"preset={preset}"], out / "logs" / "synth.log")
    if not (out / "shards" / "manifest.json").is_file():
        log("ingest: shards, control bank, splits (1 held-out source, 2 held-out batches, 20% compounds)")
        sh([py, "-m", "data_prep.ingest", str(out / "screen"), str(out / "shards"), "shard_mb=2",
            "heldout_sources=1", "heldout_batches=2", "heldout_compound_fraction=0.2"], out / "logs" / "ingest.log")
    if not (out / "graphs").is_dir():
        log("compound graphs")
        sh([py, "-m", "data_prep.featurize", str(out / "screen" / "metadata" / "compound.csv.gz"), str(out / "graphs")],
           out / "logs" / "featurize.log")


def train_command(out: Path, ckpt: Path, method: str, seed: int, steps: int, shards: Path,
                  settings: list[str]) -> list[str]:
    """`train.run` as every run here starts it (32 examples per step, one loader worker), `settings` last."""
    # every method that pairs replicates reads the same pairs (replicate sets), whichever path data.stream=auto
    # would pick for its cost, so the comparison differs in the objective alone
    from micon.methods import get_method
    stream = "replicate_sets" if get_method(method).needs.pairs else "plates"
    return [sys.executable, "-m", "train.run", "-", f"method={method}", f"data.shards={shards}",
            f"data.graphs={out / 'graphs'}", f"out={ckpt}", f"steps={steps}", f"seed={seed}", "micro_batch=32",
            f"optim.lr={LR.get(method, 3e-3)}", "optim.warmup_steps=20", "data.num_workers=1",
            f"data.stream={stream}", "progress=false", *settings]


def train_and_embed(out: Path, name: str, method: str, seed: int, steps: int, extra: list[str],
                    shards: Path | None = None) -> Path:
    py = sys.executable
    shards = shards or out / "shards"
    emb = out / "embeddings" / name
    if (emb / "embed.json").is_file():
        return emb
    ckpt = out / "train" / name
    if not (ckpt / "final.json").is_file():
        t0 = time.perf_counter()
        sh(train_command(out, ckpt, method, seed, steps, shards, [f"ckpt_every={steps}", *RECIPE, *TRAIN_ARGS, *extra]),
           out / "logs" / f"train-{name}.log")
        log(f"trained {name} ({steps} steps) in {time.perf_counter() - t0:.0f} s")
    sh([py, "-m", "evaluate.embed", str(ckpt), str(out / "shards"), str(emb), *EMBED_ARGS],
       out / "logs" / f"embed-{name}.log")
    return emb


def embed_baseline(out: Path) -> Path:
    """The field's baseline, CellProfiler-grade features (the registered featuriser `cellprofiler`)."""
    emb = out / "embeddings" / "cellprofiler"
    if not (emb / "embed.json").is_file():
        log("CellProfiler-grade features")
        sh([sys.executable, "-m", "evaluate.embed", "cellprofiler", str(out / "shards"), str(emb), *EMBED_ARGS],
           out / "logs" / "embed-cellprofiler.log")
    return emb


def oracle_embedding(out: Path) -> Path:
    """The ceiling: each well's true phenotype from the screen's ground truth, embedded like a method."""
    return embed_in_process(out, f"truth:{out / 'screen'}", out / "embeddings" / "oracle", "oracle")


def zero_shot(out: Path, name: str, method: str, emb: Path) -> dict:
    """Molecule -> well retrieval on the held-out compounds for a method that predicts profiles from molecules
    (MICON's counterfactual generator from the molecule and DMSO controls, CLIP's molecule tower): the predict
    job on every compound, scored by evaluate's zero-shot scorer (top-1% of the wells, top-k compounds)."""
    from micon.methods import get_method

    if not get_method(method).predicts:
        return {}
    from evaluate.run import score_predictions

    pred = out / "predictions" / name
    if not (pred / "predict.json").is_file():
        sh([sys.executable, "-m", "evaluate.predict", str(out / "train" / name),
            str(out / "screen" / "metadata" / "compound.csv.gz"), str(pred), f"shards={out / 'shards'}",
            f"embeddings={emb}"], out / "logs" / f"predict-{name}.log")
    held = set(json.loads((out / "shards" / "manifest.json").read_text())["splits"]["heldout_compounds"])
    z = score_predictions(name, str(pred), held, 10)
    return {k: v for k, v in z.items() if k.startswith("zs_")}


def embed_in_process(out: Path, source: str, emb: Path, label: str) -> Path:
    """`evaluate.embed SOURCE OUT/shards EMB ray=false` unless EMB is finished: a checkpoint, `untrained:RUN` or
    `truth:SCREEN`, small enough that a Ray start-up would cost more than the embedding."""
    if not (emb / "embed.json").is_file():
        sh([sys.executable, "-m", "evaluate.embed", source, str(out / "shards"), str(emb), "ray=false"],
           out / "logs" / f"embed-{label}.log")
    return emb


def training_shards(out: Path, data: str, baseline_profiles=None) -> tuple[Path | None, dict | None]:
    """--data: the shards whose replicate sets the pairing methods read (None: every compound's), and the
    activity call's record where one was made (the called compounds kept, the others left out)."""
    if data == "truth_active":
        return truth_active_shards(out), None
    if data == "called_active":
        shards, rec = activity_shards(out, baseline_profiles or profiles(embed_baseline(out)), 0.0, "called_active")
        log(f"activity call: {rec}")
        return shards, dict(rec, inactive_weight=0.0)
    return None, None


def activity_shards(out: Path, handcrafted_profiles, inactive_weight: float, label: str, min_share: float = 0.2,
                    top_share: float = 0.3) -> tuple[Path, dict]:
    """First-pass activity call on the baseline's profiles (mAP vs same-plate DMSO, BH-corrected; where that
    calls under `min_share` of the compounds, too few to learn a phenotype space from, the top `top_share` by
    mAP: on `calibrated` BH calls 12 of 200, precision 1.0, recall 0.15), a weights table (active 1,
    inactive `inactive_weight`), and a copy of the shards whose replicate sets use it."""
    import hashlib

    from micon.eval.activity import activity_call, weights_table

    wells, _, prof = handcrafted_profiles
    call = bh = activity_call(wells, prof)
    if bh.active.mean() < min_share:
        call = activity_call(wells, prof, top_share=top_share)
    weights = out / "activity_weights.csv"
    weights_table(call, inactive_weight).merge(call, on=schema.JCP).to_csv(weights, index=False)
    truth = pd.read_csv(out / "screen" / "ground_truth" / "compounds.csv")
    truth = truth[truth.role == schema.TREATED].set_index("Metadata_JCP2022")
    true = set(truth.index[truth.magnitude > 0])

    def recovery(c: pd.DataFrame) -> dict:
        called = set(c.loc[c.active, schema.JCP])
        return dict(called=len(called), precision=len(called & true) / max(len(called), 1),
                    recall=len(called & true) / max(len(true), 1))

    rec = dict(rule=str(call["rule"].iloc[0]), **recovery(call), bh=recovery(bh), true_active=len(true),
               n_compounds=int(len(truth)))
    dst = out / "shards_activity"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    stamp = dst / "weights.sha256"
    if not stamp.is_file() or stamp.read_text() != digest:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(out / "shards", dst, copy_function=os.link, ignore=shutil.ignore_patterns("replicate_sets"))
        sh([sys.executable, "-m", "data_prep.replicate_sets", str(dst), f"weights={weights}"],
           out / "logs" / "rsets-activity.log")
        stamp.write_text(digest)
        shutil.rmtree(out / "train" / label, ignore_errors=True)     # trained on other weights
        shutil.rmtree(out / "embeddings" / label, ignore_errors=True)
    return dst, rec


def train_only(out: Path, name: str, method: str, seed: int, steps: int, shards: Path, extra: list[str]) -> Path:
    """A training run without embedding (its loss curve is the result), skipped when finished."""
    ckpt = out / "train" / name
    if not (ckpt / "final.json").is_file():
        t0 = time.perf_counter()
        sh([sys.executable, "-m", "train.run", "-", f"method={method}", f"data.shards={shards}", f"out={ckpt}",
            f"steps={steps}", f"seed={seed}", "micro_batch=32", f"optim.lr={LR.get(method, 3e-3)}",
            "optim.warmup_steps=20", "data.augment.crop=56", "data.num_workers=1", f"ckpt_every={steps}",
            "data.stream=replicate_sets", "progress=false", "wandb.enabled=false", *TRAIN_ARGS, *extra],
           out / "logs" / f"train-{name}.log")
        log(f"trained {name} ({steps} steps) in {time.perf_counter() - t0:.0f} s")
    return ckpt


def truth_active_shards(out: Path) -> Path:
    """A copy of the shards whose replicate sets hold only the compounds the screen's ground truth calls active
    (magnitude > 0; weight 0 leaves the others out): an upper bound for any activity call."""
    truth = pd.read_csv(out / "screen" / "ground_truth" / "compounds.csv")
    truth = truth[truth.role == schema.TREATED]
    weights = out / "truth_active_weights.csv"
    pd.DataFrame({schema.JCP: truth.Metadata_JCP2022, "weight": (truth.magnitude > 0).astype(float)}).to_csv(
        weights, index=False)
    dst = out / "shards_truth_active"
    if not (dst / "rsets.done").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(out / "shards", dst, copy_function=os.link, ignore=shutil.ignore_patterns("replicate_sets"))
        sh([sys.executable, "-m", "data_prep.replicate_sets", str(dst), f"weights={weights}"],
           out / "logs" / "rsets-truth-active.log")
        (dst / "rsets.done").write_text("")
    return dst
