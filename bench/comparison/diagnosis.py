"""Diagnosis: the learnability ladder (the calibrated effects switched on one at a time, each rung's loss against
chance) and fit against transfer (every compound vs the truly active ones, scored on the training split beside
the held-out ones)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd

from micon import atomic

from .design import TRAIN_ARGS, docs_dir, log
from .plots import plot_curves, plot_fit_transfer
from .runs import prepare, sh, train_and_embed, train_only, truth_active_shards
from .scoring import profiles, score


def _ladder_rungs() -> list[tuple[str, dict]]:
    """From an easy screen (calibrated_small's layout, every compound active at full strength, none of the
    calibrated effects; the ordinary microscope effects stay) to calibrated_small itself, switching the
    calibrated effects on one at a time, cumulatively (each rung's synth overrides)."""
    from micon.synth import CALIBRATION as C

    off = dict(active_fraction=1.0, strong_fraction=1.0, well_noise=0.04, source_interaction=0.0,
               source_response=0.0, optics=0.0, stain_gamma=0.0, bleed=0.0, density_source=0.0, density_plate=0.0)
    steps = [("easy", {}),
             ("inactive share", dict(active_fraction=C["active_fraction"], strong_fraction=C["strong_fraction"])),
             ("well noise, source interaction", dict(well_noise=C["well_noise"],
                                                     source_interaction=C["source_interaction"],
                                                     source_response=C["source_response"])),
             ("optics, gamma/bleed, density", dict(optics=C["optics"], stain_gamma=C["stain_gamma"], bleed=C["bleed"],
                                                   density_source=C["density_source"],
                                                   density_plate=C["density_plate"]))]
    rungs, cur = [], dict(off)
    for name, extra in steps:
        cur = {**cur, **extra}
        rungs.append((name, dict(cur)))
    return rungs


def loss_curve(run: Path) -> pd.DataFrame:
    """step, loss, chance (and loss / chance) from a training run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    df = pd.DataFrame([{"step": r["step"], "loss": r["loss/loss"], "chance": r["loss/chance"]} for r in rows])
    return df.assign(ratio=df.loss / df.chance)


def tail_ratio(curve: pd.DataFrame, share: float = 0.2) -> float:
    """Mean loss / chance over the last `share` of the steps (1 = the loss of an encoder that tells nothing apart)."""
    n = max(1, int(len(curve) * share))
    return float(curve.ratio.iloc[-n:].mean())


def ladder(out: Path, steps: int, method: str = "paclr", seed: int = 0, docs: Path | None = None) -> dict:
    """The learnability ladder: for each rung (_ladder_rungs) a screen, its shards and a short training run of
    `method`; the result is each rung's loss against its chance level. Writes OUT/ladder.json and ladder.png."""
    py = sys.executable
    result = {}
    for i, (name, synth) in enumerate(_ladder_rungs()):
        rung = out / "ladder" / f"{i}_{''.join(ch if ch.isalnum() else '_' for ch in name)}"
        if not (rung / "screen" / "ground_truth").is_dir():
            log(f"ladder rung {i} ({name}): screen")
            sh([py, "-m", "data_prep.synth", str(rung / "screen"), "preset=calibrated_small", f"seed={seed}",
                *[f"{k}={v}" for k, v in synth.items()]], rung / "logs" / "synth.log")
        if not (rung / "shards" / "manifest.json").is_file():
            sh([py, "-m", "data_prep.ingest", str(rung / "screen"), str(rung / "shards"), "shard_mb=2",
                "heldout_compound_fraction=0"], rung / "logs" / "ingest.log")
        curve = loss_curve(train_only(rung, method, method, seed, steps, rung / "shards", []))
        result[name] = dict(synth=synth, tail_ratio=tail_ratio(curve), first_ratio=float(curve.ratio.iloc[:10].mean()),
                            chance=float(curve.chance.iloc[0]), steps=steps, method=method,
                            curve=curve[["step", "loss", "ratio"]].round(4).to_dict("list"))
        log(f"ladder rung {i} ({name}): loss / chance over the last 20% of {steps} steps {result[name]['tail_ratio']:.3f}")
        atomic.write_json(out / "ladder.json", result)
    plot_curves({k: pd.DataFrame(v["curve"]) for k, v in result.items()}, out / "ladder.png",
                f"Learnability ladder ({method}, calibrated_small layout, effects switched on cumulatively)")
    if docs:
        (docs / "results").mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "ladder.png", docs / "results" / "ladder.png")
    return result


def diagnose(out: Path, steps: int, preset: str, method: str = "paclr", seed: int = 0, docs: Path | None = None) -> dict:
    """Does `method` fit, and does what it fits transfer? On `preset`: the untrained network (lr 0), the method
    on every compound and on the ground-truth-active compounds only; their loss against chance and NSB/NSS on
    the training compounds in training plates (`training`) beside the three held-out splits.
    Writes OUT/diagnosis.json, diagnosis_loss.png and diagnosis_retrieval.png (with --docs into docs/results/)."""
    prepare(out, preset)
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    runs = {"untrained": (f"{method}_untrained", 1, ["optim.lr=0"], None),
            method: (method, steps, [], None),
            f"{method}_truth_active": (f"{method}_truth_active", steps, [], truth_active_shards(out))}
    path = out / "diagnosis.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    for label, (name, n, extra, shards) in runs.items():
        emb = train_and_embed(out, name, method, seed, n, extra, shards)
        if label not in res:
            res[label] = dict(scores=score(*profiles(emb), splits, n_boot=500, seed=seed, fit=True), steps=n)
            if n > 1:
                c = loss_curve(out / "train" / name)
                res[label].update(tail_ratio=tail_ratio(c), first_ratio=float(c.ratio.iloc[:10].mean()),
                                  chance=float(c.chance.iloc[0]),
                                  curve=c[["step", "loss", "ratio"]].round(4).to_dict("list"))
            atomic.write_json(path, res)
        s = res[label]["scores"]
        log(f"{label}: NSB top-10 " + ", ".join(f"{k} {v['nsb_top10']:.3f}" for k, v in s.items()))
    plot_curves({k: pd.DataFrame(v["curve"]) for k, v in res.items() if "curve" in v}, out / "diagnosis_loss.png",
                f"{method} on `{preset}`: all compounds vs ground-truth-active compounds only")
    plot_fit_transfer(res, out / "diagnosis_retrieval.png", f"{method} on `{preset}`, seed {seed}")
    if docs:
        (docs / "results").mkdir(parents=True, exist_ok=True)
        for f in ("diagnosis_loss.png", "diagnosis_retrieval.png"):
            shutil.copy(out / f, docs / "results" / f)
    return res


def run_ladder(a) -> int:
    """--ladder: the ladder with a.ladder steps per rung; each rung's loss against chance printed."""
    TRAIN_ARGS[:] = a.train_args
    for name, r in ladder(Path(a.out).resolve(), a.ladder, seed=a.seeds[0], docs=docs_dir(a)).items():
        print(f"{name:20s} loss/chance first 10 steps {r['first_ratio']:.3f}  last 20% {r['tail_ratio']:.3f}")
    return 0


def run_diagnose(a) -> int:
    """--diagnose: fit against transfer on a.preset, a.diagnose steps; each run's NSB top-10 per split printed."""
    TRAIN_ARGS[:] = a.train_args
    for label, r in diagnose(Path(a.out).resolve(), a.diagnose, a.preset, seed=a.seeds[0], docs=docs_dir(a)).items():
        print(label, {k: round(v.get("nsb_top10", float("nan")), 3) for k, v in r["scores"].items()},
              f"loss/chance {r.get('tail_ratio', float('nan')):.3f}")
    return 0
