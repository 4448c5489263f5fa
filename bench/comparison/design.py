"""The comparison's design: the methods, the subject, the ablations, the query sets, the metrics, and the
training settings every run shares. Every other module of the driver reads these."""
from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"                     # where --docs writes RESULTS.md and results/ (--docs-dir)


METHODS = ("micon", "paclr", "clip", "simclr")


SUBJECT = "micon"                        # the method the comparison asks about (--subject)


LR = {"clip": 1e-3}                      # CLIP's learnable temperature collapses at 3e-3 (seen in the comparison runs)


ABLATIONS = {                            # variant -> train overrides of the subject (first seed), run as SUBJECT_variant
    # pairs across sources first, as the replicate sets were built (the recipe pairs within a source first)
    "cross_source": ["data.pair_within_source=false"],
    "cf0": ["loss.counterfactual_weight=0"],
    "grad": ["model.detach_control=false", "model.detach_target=false"],
    "official_dmso": ["loss.dmso_positives=true"],
    "t1": ["loss.temperature=1.0"],
    # the image encoder starts from the same seed's SimCLR run (pretrained on every site, DMSO included, no labels)
    "simclr_init": ["model.init={out}/train/simclr_seed{seed}"],
}


NEEDS_RUNS = ("simclr_init",)       # ablations that start from the comparison's own runs (run those first)


STARTS_FROM = {"simclr_init": "simclr"}     # ... and the method whose run of the same seed they start from


def overrides(name: str, out: Path, seed: int) -> list[str]:
    """An ablation's train overrides for one run; `{out}` and `{seed}` in them name this comparison's OUT
    and the run's seed (e.g. the same seed's SimCLR run as the starting point), which must have finished."""
    out_ = [o.format(out=out, seed=seed) for o in ABLATIONS[name]]
    for o in out_:
        if o.startswith("model.init=") and not (Path(o.split("=", 1)[1]) / "final.json").is_file():
            raise SystemExit(f"science: {name} (seed {seed}) starts from {o.split('=', 1)[1]}, which has not "
                             f"finished: run the comparison for that seed first")
    return out_


def variant(subject: str, name: str) -> str:
    """The label of a run of the subject method with other settings (an ablation, activity-aware data)."""
    return f"{subject}_{name}"


def of_subject(label: str, subject: str) -> bool:
    return label == subject or label.startswith(variant(subject, ""))


SPLITS = ("heldout_batches", "heldout_compounds", "heldout_source")


METRICS = ("nsb_top1", "nsb_top10", "nss_top1", "nss_top10", "map_activity", "map_consistency",
           "fraction_retrieved", "source_knn", "zs_well_top1pct", "zs_compound_top1", "zs_compound_top10")


def log(msg: str) -> None:
    print(f"[science {time.strftime('%H:%M:%S')}] {msg}", flush=True)


TRAIN_ARGS: list[str] = []              # --train-args: appended to every training run (later keys win)
EMBED_ARGS: list[str] = []              # --embed-args: appended to every evaluate.embed run (e.g. ray=false)


# every comparison run's settings (docs/RESULTS.md, section 4, says why): a replicate set's wells paired within
# their source first, 48 px crops of the 64 px sites, channels_last inputs (1.5x on CPU), bit-reproducible
RECIPE = ["data.pair_within_source=true", "data.augment.crop=48", "engine.channels_last=on", "deterministic=true",
          "wandb.log_every=10"]


def merged(settings: list[str]) -> list[str]:
    """`key=value` settings with each key once, where it first appears, holding its last value (as train reads them)."""
    last = {}
    for x in settings:
        last[x.split("=", 1)[0]] = x        # a dict keeps each key where it was first set
    return list(last.values())


REFERENCES = ("untrained", "oracle")     # the floor and the ceiling: rows of every table, rivals of no method


def docs_dir(a) -> Path | None:
    """Where the driver's options (--docs, --docs-dir) say the docs go; None: nowhere."""
    return Path(a.docs_dir).resolve() if a.docs else None
