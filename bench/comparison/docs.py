"""docs/RESULTS.md and docs/results/ from a comparison's numbers, and redrawing them from stored numbers alone."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from micon import atomic

from .design import DOCS, METRICS, SPLITS, log, variant
from .plots import plot
from .scoring import design_chance, results_json, summary_from_results_md
from .verdict import verdict


def replot(out: Path, docs: Path | None, subject: str, docs_from: Path = DOCS) -> Path:
    """Redraw comparison.png from stored numbers, running nothing: OUT/summary.csv when the run is at hand
    (exact: bootstrap intervals and chance levels included), else docs/results/summary.csv, else the tables
    of docs/RESULTS.md (chance levels recomputed from the screen's design; one-seed rows have no interval)."""
    results_md = docs_from / "RESULTS.md"
    for source in (out / "summary.csv", docs_from / "results" / "summary.csv"):
        if source.is_file():
            summary = pd.read_csv(source)
            break
    else:
        source = results_md
        text = results_md.read_text()
        summary = summary_from_results_md(text)
        chance = design_chance(text)
        summary["chance"] = [chance.get((sp, m), np.nan) for sp, m in zip(summary.split, summary.metric)]
    log(f"replot from {source} ({len(summary)} rows)")
    path = (docs / "results" if docs else out) / "comparison.png"
    plot(summary, path, subject)
    atomic.write_json(path.parent / "results.json", results_json(summary))
    return path


DATA_WORDS = {"all": "every training compound",
              "truth_active": "the training compounds the screen's ground truth calls active (an upper bound)",
              "called_active": "the training compounds the first-pass activity call finds (section 3; the others "
                               "left out of the replicate sets)"}


def write_docs(out: Path, results: dict, summary: pd.DataFrame, command: str, docs: Path = DOCS) -> Path:
    """docs/RESULTS.md (the calibration, a table per split, the activity call, the verdict, with the hand-kept
    CALIBRATION.md, DIAGNOSIS.md and NOTES.md of docs/results/ in their places) and docs/results/'s
    comparison.png, summary.csv and results.json; `docs` is the docs directory."""
    from micon.eval.calibration import ANCHORS, ANCHOR_SOURCE
    from micon.synth import CALIBRATION, PRESETS

    effects = {k: PRESETS[results["preset"]].get(k, v) for k, v in CALIBRATION.items()}   # the preset's own values
    cal = results["calibration"]
    fmt = lambda r: f"{r['mean']:.3f} [{r.ci_lo:.3f}, {r.ci_hi:.3f}]" if r.seeds > 1 else f"{r['mean']:.3f}"  # noqa: E731
    lines = [
        "# Results: does MICON help on a calibrated synthetic screen?", "",
        f"Command: `{command}`  ",
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}; compute {results['compute_min']['all']:.0f} min in all jobs (comparison "
        f"{results['compute_min']['comparison']:.0f}, ablations {results['compute_min']['ablations']:.0f}, activity "
        f"{results['compute_min']['activity']:.0f}, data preparation {results['compute_min']['prepare']:.0f}), plus "
        f"scoring", "",
        "## 1. Calibration (the CellProfiler-grade baseline only, fixed before any method ran)", "",
        f"Preset `{results['preset']}`: {results['screen']}. Effects (micon.synth.PRESETS): "
        + ", ".join(f"{k}={v}" for k, v in effects.items()) + ".", "",
        f"Anchors: {ANCHOR_SOURCE}.", "",
        "| measure | anchor band | this screen (real jobs, all wells) |", "|---|---|---|",
        *[f"| {k} | {lo if lo is not None else ''} - {hi if hi is not None else ''} | {cal[k]:.3f} |"
          for k, (lo, hi) in ANCHORS.items()],
        f"| nsb_top1 / nss_top1 | 0.085 / 0.012 | {cal['nsb_top1']:.3f} / {cal['nss_top1']:.3f} |",
        f"| source_knn_normalised (after MAD + ZCA) | - | {cal['source_knn_normalised']:.3f} |", "",
        *calibration_record(docs),
        "## 2. Comparison", "",
        f"Each learned method: {results['steps']} steps, 32 examples per step, seeds {results['seeds']}, from "
        f"scratch (`resnet10t`), trained on {DATA_WORDS[results.get('data', 'all')]}; settings "
        f"`{' '.join(results.get('train_args', []))}`. Mean over seeds with its 95% t-interval in brackets "
        "(bootstrap-over-compounds intervals of the first seed are in results.json). `untrained`: the first "
        "method's network of each seed as initialised; `oracle`: each well's true phenotype (the ceiling; "
        "one value, no seeds). Zero-shot columns (`zs_*`, held-out compounds only): molecule -> well retrieval "
        "from the profile a method predicts from the structure alone. Query sets: see bench/science.py.", "",
    ]
    for split in SPLITS:
        cols = [m for m in METRICS if ((summary.split == split) & (summary.metric == m)).any()]
        lines += [f"### {split}", "", "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for method in dict.fromkeys(summary.method):
            sub = summary[(summary.method == method) & (summary.split == split)].set_index("metric")
            if len(sub):
                lines.append(f"| {method} | " + " | ".join(fmt(sub.loc[m]) if m in sub.index else "" for m in cols)
                             + " |")
        lines.append("")
    lines += ["![comparison](results/comparison.png)", ""]
    if results.get("activity"):
        a = results["activity"]
        lines += ["## 3. Activity-aware training", "",
                  f"First pass: phenotypic-activity mAP of CellProfiler-grade profiles vs same-plate DMSO (copairs' "
                  f"recipe). The BH rule (corrected p < 0.05) called {a['bh']['called']} of {a['n_compounds']} "
                  f"treated compounds (precision {a['bh']['precision']:.2f}, recall {a['bh']['recall']:.2f}); "
                  f"the call used: {a['rule']}, {a['called']} compounds, precision {a['precision']:.2f}, recall "
                  f"{a['recall']:.2f} against the screen's truth ({a['true_active']} compounds with magnitude > 0). "
                  + ("Every pairing method (MICON, PaCLR, CLIP) trains on the called compounds alone: the others "
                     "get weight 0 in the replicate sets (`./launch.sh rsets SHARDS weights=activity_weights.csv`); "
                     "SimCLR reads every site of the training plates, DMSO included."
                     if results.get("data") == "called_active" else
                     f"Inactive compounds are then used in {a['inactive_weight']:.0%} of their replicate-set samples "
                     f"(`./launch.sh rsets SHARDS weights=activity_weights.csv`). Rows "
                     f"`{variant(results['subject'], 'activity')}` in the tables (first seed)."), ""]
    diagnosis = docs / "results" / "DIAGNOSIS.md"     # the diagnosis (--ladder, --diagnose), hand-kept
    if diagnosis.is_file():
        lines += [diagnosis.read_text().rstrip(), ""]
    lines += ["## Verdict (computed from the intervals above)", "", *verdict(summary, results["subject"]), ""]
    notes = docs / "results" / "NOTES.md"      # the hand-written reading, kept across regenerations
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    path = docs / "RESULTS.md"
    (docs / "results").mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    shutil.copy(out / "comparison.png", docs / "results" / "comparison.png")
    summary.to_csv(docs / "results" / "summary.csv", index=False)   # what --replot redraws from
    atomic.write_json(docs / "results" / "results.json", results_json(summary))
    return path


def calibration_record(docs: Path = DOCS) -> list[str]:
    """The calibration runs of bench/calibrate.py (docs/results/CALIBRATION.md, hand-kept), as lines."""
    path = docs / "results" / "CALIBRATION.md"
    return [path.read_text().rstrip(), ""] if path.is_file() else []


def screen_description(out: Path) -> str:
    import yaml
    cfg = yaml.safe_load((out / "screen" / "ground_truth" / "config.yaml").read_text())
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    return (f"{cfg['n_compounds']} compounds from RDKit's bundled sets, {cfg['replicates']} wells each (one per plate), "
            f"{cfg['n_sources']} sources x {cfg['batches_per_source']} batches x {cfg['plates_per_batch']} plate, "
            f"{cfg['dmso_wells']} DMSO wells per plate, {cfg['sites_per_well']} sites per well at "
            f"{cfg['image_size']} px; held out from training: source {', '.join(splits['heldout_sources'])}, "
            f"batches {', '.join(splits['heldout_batches'])}, {len(splits['heldout_compounds'])} compounds")
