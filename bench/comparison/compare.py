"""The comparison itself: the baselines, every method x seed, the subject's ablations and its activity-aware run,
each trained, embedded and scored through the real jobs; then the summary, the plot, results.json and (with
--docs) docs/RESULTS.md."""
from __future__ import annotations

import json
import os
import platform
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from micon import atomic

from .design import ABLATIONS, RECIPE, TRAIN_ARGS, docs_dir, log, merged, overrides, variant
from .docs import screen_description, write_docs
from .plots import plot
from .runs import (activity_shards, embed_baseline, embed_in_process, oracle_embedding, prepare, train_and_embed,
                   training_shards, zero_shot)
from .scoring import profiles, score, summarise


def jobs(a: Namespace, out: Path) -> list[tuple[str, str, int, list[str]]]:
    """(label, method, seed, train overrides) of every training run the parts ask for, in the order they run."""
    out_ = []
    if "comparison" in a.parts:
        out_ += [(f"{m}@{s}", m, s, []) for s in a.seeds for m in a.methods]
    if "ablations" in a.parts:
        out_ += [(variant(a.subject, name), a.subject, a.seeds[0], overrides(name, out, a.seeds[0]))
                 for name in a.ablations]
    if "variants" in a.parts:       # ablations over every seed, labelled VARIANT@SEED like the comparison's methods
        out_ += [(f"{variant(a.subject, name)}@{s}", a.subject, s, overrides(name, out, s))
                 for s in a.seeds for name in a.variants]
    return out_


def compute_minutes(out: Path, a: Namespace) -> dict:
    """Minutes each part cost, from every job's seconds (OUT/stage_seconds.json, kept across resumed runs)."""
    times = json.loads((out / "stage_seconds.json").read_text())
    part = lambda keys: sum(v for k, v in times.items() if any(k.endswith(x) or x in k for x in keys)) / 60  # noqa: E731
    return dict(all=sum(times.values()) / 60,
                comparison=part([f"-{m}_seed" for m in a.methods]),
                ablations=part([variant(a.subject, n) for n in ABLATIONS]),
                activity=part([variant(a.subject, "activity"), "rsets-activity"]),
                prepare=part(["synth", "ingest", "featurize", "embed-cellprofiler"]))


def compare(a: Namespace, command: str) -> int:
    """Run the comparison `a` (science.py's options) into a.out; `command` is what docs/RESULTS.md says ran."""
    from micon.eval.calibration import levels

    TRAIN_ARGS[:] = a.train_args
    t0 = time.perf_counter()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare(out, a.preset)
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    scores_path = out / "scores.json"
    scores = json.loads(scores_path.read_text()) if scores_path.is_file() else {}

    def scored(label: str, emb: Path, profiles_=None, method: str = "") -> None:
        if label not in scores:
            scores[label] = score(*(profiles_ or profiles(emb)), splits)
            scores_path.write_text(json.dumps(scores, indent=1))
            s = scores[label]["heldout_batches"]
            log(f"{label}: held-out batches NSB top-10 {s['nsb_top10']:.3f}, NSS top-10 {s['nss_top10']:.3f}")
        held = scores[label].get("heldout_compounds", {})
        if method and "zs_well_top1pct" not in held and (z := zero_shot(out, label.replace("@", "_seed"), method, emb)):
            held.update(z)
            scores_path.write_text(json.dumps(scores, indent=1))
            log(f"{label}: zero-shot on held-out compounds, top-1% of wells {z['zs_well_top1pct']:.3f} (chance "
                f"{z['zs_well_top1pct_chance']:.3f}), compound top-1 {z['zs_compound_top1']:.3f}")

    hc = profiles(embed_baseline(out))
    scored("cellprofiler", out / "embeddings" / "cellprofiler", hc)
    calibration = levels(*hc)
    scored("oracle", oracle_embedding(out))
    train_shards, activity = training_shards(out, a.data, hc)     # --data: which compounds the replicate sets hold
    todo = jobs(a, out)

    def run(i: int, job: tuple) -> Path:
        label, method, seed, extra = job
        log(f"[{i + 1}/{len(todo)}] {label}")
        return train_and_embed(out, label.replace("@", "_seed"), method, seed, a.steps, extra, train_shards)

    # --lanes: that many trainings at once (one thread each: on a CPU machine, one lane per core); scored in order
    with ThreadPoolExecutor(max(1, a.lanes)) as pool:
        embedded = [pool.submit(run, i, job) for i, job in enumerate(todo)]
        for (label, method, seed, extra), fut in zip(todo, embedded):
            name = label.replace("@", "_seed")
            scored(label, fut.result(), method=method)
            first = f"{a.methods[0]}_seed{seed}"
            if name == first:      # the floor: the same network as initialised, never updated (per seed)
                scored(f"untrained@{seed}", embed_in_process(out, f"untrained:{out / 'train' / first}",
                                                             out / "embeddings" / f"untrained_seed{seed}",
                                                             f"untrained_seed{seed}"))
    if "activity" in a.parts:
        label = variant(a.subject, "activity")
        shards, activity = activity_shards(out, hc, a.inactive_weight, label)
        activity["inactive_weight"] = a.inactive_weight
        log(f"activity call: {activity}")
        scored(label, train_and_embed(out, label, a.subject, a.seeds[0], a.steps, [], shards))
    summary = summarise(scores)
    summary.to_csv(out / "summary.csv", index=False)
    plot(summary, out / "comparison.png", a.subject)
    results = dict(subject=a.subject, data=a.data, train_args=merged([*RECIPE, *TRAIN_ARGS]),
                   compute_min=compute_minutes(out, a), preset=a.preset, seeds=a.seeds, steps=a.steps,
                   calibration=calibration, activity=activity, scores=scores, date=time.strftime("%Y-%m-%d"),
                   wall_min=(time.perf_counter() - t0) / 60,
                   machine=f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), no GPU, "
                           f"Python {platform.python_version()}",
                   screen=screen_description(out))
    atomic.write_json(out / "results.json", results, default=float)   # strict: undefined values as null
    print(summary[summary.metric.isin(["nsb_top10", "nss_top10", "map_activity", "source_knn"])].to_string(index=False))
    if a.docs:
        log(f"wrote {write_docs(out, results, summary, command, docs_dir(a))}")
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0
