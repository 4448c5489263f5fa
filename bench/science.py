"""Does MICON help? The comparison on the calibrated screen, with seeds, intervals and three splits.

    python bench/science.py [--out runs/science] [--seeds 0 1 2] [--steps 500] [--lanes 2] [--data called_active]
                            [--parts comparison ablations activity]
    python bench/science.py --curve 3000 --every 250 --methods paclr --data truth_active --label ws48 \
                            --train-args data.pair_within_source=true ...    # retrieval against step
    python bench/science.py --replot [--docs]      # redraw comparison.png (and results.json) from the stored numbers
    python bench/science.py --ladder 60 [--train-args micro_batch=16]   # diagnosis: the learnability ladder
    python bench/science.py --diagnose 300 [--preset calibrated]       # diagnosis: fit vs transfer, truth-active runs
    (on a shared CPU machine set OMP_NUM_THREADS=1: torch's threads spin on busy cores, 4-5x slower)
    ./launch.sh compare [same options]

The driver's parts live in bench/comparison/ (one concept per module: design, runs, scoring, verdict, plots,
docs, diagnosis, curves, compare); this file is its command line.

One synthetic screen (preset `calibrated`, fixed before any method ran: micon.synth.CALIBRATION), ingested
with one held-out source, two held-out batches and 20% held-out compounds. Then, through the real jobs
(train.run under DeepSpeed, evaluate.embed under Ray), for every method and seed: train, embed; the
hand-crafted features are embedded once. Every embedding becomes well profiles exactly as `evaluate` makes
them (mean over sites, per-plate MAD against DMSO, ZCA-cor on DMSO) and is scored on three query sets:

  heldout_batches    wells of training compounds in the two held-out batches (plates never trained on)
  heldout_compounds  every well of the held-out compounds (molecules never trained on)
  heldout_source     every well in the held-out source (a microscope and lab never trained on)

against the gallery of all wells: NSB/NSS top-1 and top-10, mAP of phenotypic activity (vs same-plate
DMSO) and of replicate consistency (same compound vs other compounds; copairs' recipes, APs of the query
wells), fraction retrieved, and source kNN accuracy of the profiles (lower = less batch effect).
Intervals: 95% t-interval over seeds and a bootstrap over compounds (1,000 resamples) of the first seed.

Parts: `comparison` (micon, paclr, clip, simclr x seeds), `ablations` (MICON variants, first seed),
`activity` (a first-pass activity call on hand-crafted profiles, then MICON trained with inactive compounds
undersampled). Every stage is skipped when its output exists: a killed run resumes. Writes
OUT/results.json, OUT/*.png and, with --docs, docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.comparison.compare import compare  # noqa: E402
from bench.comparison.curves import run_curves  # noqa: E402
from bench.comparison.design import ABLATIONS, DOCS, EMBED_ARGS, METHODS, NEEDS_RUNS, SUBJECT, docs_dir, log  # noqa: E402
from bench.comparison.diagnosis import run_diagnose, run_ladder  # noqa: E402
from bench.comparison.docs import replot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/science")
    ap.add_argument("--preset", default="calibrated")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--subject", default=SUBJECT, choices=METHODS,
                    help="the method the comparison asks about: its ablations, its activity-aware run, the verdict")
    ap.add_argument("--parts", nargs="+", default=["comparison", "ablations"],
                    help="comparison, ablations (the subject's variants, first seed), variants (the --variants "
                         "ablations over every seed), activity (the subject on all compounds with the uncalled ones "
                         "in --inactive-weight of their samples)")
    ap.add_argument("--variants", nargs="+", default=[], choices=list(ABLATIONS),
                    help="ablations run over every --seeds (part `variants`), e.g. simclr_init")
    ap.add_argument("--ablations", nargs="+", default=[n for n in ABLATIONS if n not in NEEDS_RUNS],
                    choices=list(ABLATIONS), help="which of the subject's variants the ablations part runs (first "
                                                  f"seed); {', '.join(NEEDS_RUNS)} only when named")
    ap.add_argument("--inactive-weight", type=float, default=0.25)
    ap.add_argument("--train-args", nargs="*", default=[],
                    help="key=value for every training run, e.g. on a GPU: model.preset=resnet50 micro_batch=256 "
                         "data.augment.crop=224 data.num_workers=8 (with --preset small --steps 20000)")
    ap.add_argument("--embed-args", nargs="*", default=[],
                    help="key=value for every evaluate.embed run, e.g. ray=false (a small screen: no Ray start-up)")
    ap.add_argument("--docs", action="store_true", help="write docs/RESULTS.md and docs/results/*.png")
    ap.add_argument("--docs-dir", default=str(DOCS), help="--docs: the docs directory to write (default: the repository's)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw comparison.png from stored numbers (OUT/summary.csv, else docs/results/summary.csv, "
                         "else docs/RESULTS.md's tables); with --docs into docs/results/")
    ap.add_argument("--ladder", type=int, metavar="STEPS", default=0,
                    help="only the learnability ladder (diagnosis): a PaCLR run of STEPS steps per rung, its loss "
                         "against chance (OUT/ladder.json, ladder.png; with --docs docs/results/ladder.png)")
    ap.add_argument("--diagnose", type=int, metavar="STEPS", default=0,
                    help="only the diagnosis on --preset: PaCLR (STEPS steps) on every compound and on the truly "
                         "active ones, and the untrained network, scored on the training split beside the held-out "
                         "ones (OUT/diagnosis.json, diagnosis_*.png)")
    ap.add_argument("--lanes", type=int, default=1,
                    help="trainings at once, each with cores / lanes threads unless OMP_NUM_THREADS says (on a CPU "
                         "machine one lane per core: torch's threads spin-wait on busy cores)")
    ap.add_argument("--curve", type=int, metavar="STEPS", default=0,
                    help="only learning curves on --preset: each of --methods x --seeds trained for STEPS steps, every "
                         "--every-th checkpoint scored on the training and held-out splits (OUT/curves/*.json, "
                         "learning_curves.png)")
    ap.add_argument("--every", type=int, default=250, help="--curve: score a checkpoint every this many steps")
    ap.add_argument("--label", default="", help="--curve: a suffix naming the runs (their settings)")
    ap.add_argument("--data", choices=["all", "truth_active", "called_active"], default="called_active",
                    help="the training compounds of the pairing methods (comparison and --curve): replicate sets of "
                         "every compound, of the ground-truth-active ones only, or of "
                         "those the first-pass activity call (CellProfiler-grade profiles) finds")
    a = ap.parse_args(argv)
    EMBED_ARGS[:] = a.embed_args
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, a.lanes))))
    if a.curve:
        return run_curves(a)
    if a.ladder:
        return run_ladder(a)
    if a.diagnose:
        return run_diagnose(a)
    if a.replot:
        log(f"wrote {replot(Path(a.out).resolve(), docs_dir(a), a.subject)}")
        return 0
    return compare(a, "python bench/science.py " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
