"""The comparison's arithmetic (bench/comparison, the driver behind bench/science.py) and the first-pass
activity call (micon.eval.activity)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.comparison import design, diagnosis, plots, scoring, verdict  # noqa: E402
from micon import schema  # noqa: E402
from micon.eval.activity import activity_call, weights_table  # noqa: E402
from micon.eval.retrieval import topk_hit_rate  # noqa: E402


def screen_profiles(seed=0, n_plates=6, n_cpd=30, n_active=8, dmso=8, shift=3.0, dim=12):
    """Random well profiles: 3 sources x 2 batches, every compound once per plate; the first `n_active`
    compounds carry a fixed shift, the rest are DMSO-like noise."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    dirs = rng.normal(size=(n_cpd, dim))
    for p in range(n_plates):
        src, batch = f"s{p // 2}", f"b{p}"
        for w in range(dmso):
            rows.append((src, batch, f"P{p}", f"D{w:02d}", schema.DMSO, schema.NEGCON))
            feats.append(rng.normal(size=dim))
        for c in range(n_cpd):
            rows.append((src, batch, f"P{p}", f"C{c:02d}", f"JCP{c:03d}", schema.TREATED))
            feats.append(rng.normal(size=dim) + (shift * dirs[c] / np.linalg.norm(dirs[c]) if c < n_active else 0))
    meta = pd.DataFrame(rows, columns=[schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.JCP,
                                       schema.ROLE])
    return meta, np.array(feats, np.float32)


def test_activity_call_finds_the_shifted_compounds_and_controls_false_calls():
    # copairs' null is conservative (a compound's wells share one null stream): the recipe needs JUMP-like
    # numbers of same-plate DMSO wells (16-32) to call anything
    meta, x = screen_profiles(dmso=24, shift=4.0)
    call = activity_call(meta, x, null_size=2000)
    assert len(call) == 30 and schema.DMSO not in set(call[schema.JCP])
    active = set(call.loc[call.active, schema.JCP])
    truth = {f"JCP{c:03d}" for c in range(8)}
    assert len(active & truth) >= 7                # strong shifts are found
    assert len(active - truth) <= 2                # BH at 5%: few false calls among 22 inactive compounds
    w = weights_table(call, 0.25).set_index(schema.JCP)["weight"]
    assert set(w.unique()) <= {1.0, 0.25} and (w[list(active)] == 1.0).all()


def test_score_top_k_agrees_with_the_retrieval_module_and_has_intervals():
    meta, x = screen_profiles(seed=1)
    splits = {"heldout_compounds": [f"JCP{c:03d}" for c in range(0, 30, 3)], "heldout_sources": ["s2"],
              "heldout_batches": ["b1", "b3"]}
    raw = x
    out = scoring.score(meta, raw, x, splits, n_boot=200)
    assert set(out) == set(design.SPLITS)
    # held-out compounds: the same numbers as topk_hit_rate over those queries against every well
    q = meta[schema.JCP].isin(splits["heldout_compounds"]).to_numpy()
    ref = topk_hit_rate(meta[q].reset_index(drop=True), x[q], meta, x, ks=(1, 10), modes=("nsb", "nss"))
    ref = ref.set_index("k")
    r = out["heldout_compounds"]
    assert r["nsb_top10"] == pytest.approx(ref.loc[10, "nsb"]) and r["nss_top1"] == pytest.approx(ref.loc[1, "nss"])
    lo, hi = r["nsb_top10_boot"]
    assert lo <= r["nsb_top10"] <= hi
    assert out["heldout_source"]["n_queries"] == 2 * 30


def test_summary_interval_is_the_t_interval_over_seeds():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    runs = {}
    for s in range(3):
        runs[f"micon@{s}"] = {split: {m: float(rng.uniform()) for m in design.METRICS} for split in design.SPLITS}
    summ = scoring.summarise(runs).set_index(["split", "metric"])
    vals = [runs[f"micon@{s}"]["heldout_source"]["map_activity"] for s in range(3)]
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(vals), scale=stats.sem(vals))
    row = summ.loc[("heldout_source", "map_activity")]
    assert row["mean"] == pytest.approx(np.mean(vals))
    assert row.ci_lo == pytest.approx(lo, abs=2e-3) and row.ci_hi == pytest.approx(hi, abs=2e-3)


def test_results_json_holds_the_tables_numbers_with_clipped_intervals_and_seed_counts():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    runs = {f"paclr@{s}": {split: {m: float(rng.uniform(0, 0.05)) for m in design.METRICS} for split in design.SPLITS}
            for s in range(3)}
    runs["untrained"] = {split: {m: 0.5 for m in design.METRICS} | {"nsb_top10_boot": (0.4, 0.6)}
                         for split in design.SPLITS}
    out = scoring.results_json(scoring.summarise(runs))
    vals = [runs[f"paclr@{s}"]["heldout_compounds"]["nsb_top10"] for s in range(3)]
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(vals), scale=stats.sem(vals))
    r = out["heldout_compounds"]["paclr"]["nsb_top10"]
    assert r["n"] == 3 and r["mean"] == pytest.approx(np.mean(vals))
    assert r["lo"] == pytest.approx(max(lo, 0.0), abs=2e-3) and r["hi"] == pytest.approx(min(hi, 1.0), abs=2e-3)
    assert 0.0 <= r["lo"] <= r["mean"] <= r["hi"] <= 1.0
    one = out["heldout_source"]["untrained"]
    assert one["nsb_top10"] == {"mean": 0.5, "lo": 0.4, "hi": 0.6, "n": 1} and one["nss_top1"]["lo"] is None


def test_loss_curve_reads_metrics_jsonl_and_the_tail_ratio_is_against_chance(tmp_path):
    import json

    lines = [{"step": i + 1, "loss/loss": 4.0 - 0.02 * i, "loss/chance": 4.0} for i in range(50)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    c = diagnosis.loss_curve(tmp_path)
    assert list(c.step) == list(range(1, 51)) and c.ratio.iloc[0] == pytest.approx(1.0)
    assert diagnosis.tail_ratio(c) == pytest.approx(np.mean([(4.0 - 0.02 * i) / 4.0 for i in range(40, 50)]))


def test_learning_curves_plot_every_split_with_the_reference_rows(tmp_path):
    """plot_learning_curves draws a PNG from OUT/curves/NAME.json (scores per step, step 0 untrained) and the
    reference rows; a run without a finished loss curve (still training) is drawn too."""
    import json

    (tmp_path / "curves").mkdir()
    split_scores = lambda v: {s: {"nsb_top10": v, "nsb_top10_boot": [v - 0.02, v + 0.02], "nsb_top10_chance": 0.05}  # noqa: E731
                              for s in ("training", *design.SPLITS)}
    run = {"scores": {str(s): split_scores(0.1 + s / 1e4) for s in (0, 250, 500)},
           "curve": {"step": [1, 2, 3], "loss": [4.0, 3.9, 3.8], "ratio": [1.0, 0.97, 0.95]}}
    (tmp_path / "curves" / "a.json").write_text(json.dumps(run))
    (tmp_path / "curves" / "b.json").write_text(json.dumps({"scores": {"0": split_scores(0.1)}}))
    (tmp_path / "curves" / "refs.json").write_text(json.dumps({"oracle": split_scores(0.4),
                                                             "cellprofiler": split_scores(0.15)}))
    png = tmp_path / "curves.png"
    plots.plot_learning_curves(tmp_path, ["a", "b"], png)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdict_names_the_methods_whose_interval_clears_the_untrained_network():
    """The verdict's last line: learned methods with 3+ seeds whose held-out-compounds NSB top-10 t-interval
    lies wholly above the untrained network's; the oracle and untrained rows are no method's rivals."""
    runs = {}
    for s, (hi_m, lo_m, u) in enumerate([(0.30, 0.16, 0.10), (0.31, 0.19, 0.11), (0.29, 0.13, 0.12)]):
        for name, v in (("paclr", hi_m), ("clip", lo_m), ("untrained", u)):
            runs[f"{name}@{s}"] = {split: {m: v for m in design.METRICS} for split in design.SPLITS}
    runs["oracle"] = {split: {m: 0.9 for m in design.METRICS} | {"nsb_top10_boot": (0.85, 0.95)}
                      for split in design.SPLITS}
    lines = verdict.verdict(scoring.summarise(runs), subject="clip")
    clears, paired = lines[-2:]
    assert "paclr (0.300" in clears and "clip (" not in clears, clears
    assert all("vs paclr" in ln and "ceiling 0.900" in ln for ln in lines[:-2]), lines
    # paired by seed: the gains 0.20, 0.20, 0.17 (paclr) and 0.06, 0.08, 0.01 (clip) against a direct t-interval
    stats = pytest.importorskip("scipy.stats")
    for method, d in (("paclr", [0.20, 0.20, 0.17]), ("clip", [0.06, 0.08, 0.01])):
        lo, hi = stats.t.interval(0.95, 2, loc=np.mean(d), scale=stats.sem(d))
        assert f"{method} (3 seeds): batches {np.mean(d):+.3f} [{lo:+.3f}, {hi:+.3f}]" in paired, paired


def test_summary_keeps_metrics_only_some_methods_have():
    """Zero-shot scores exist only for the methods that predict from molecules: the summary has them for those
    methods and skips them for the others instead of failing."""
    runs = {f"{m}@{s}": {split: {"nsb_top10": 0.1 + s / 100} for split in design.SPLITS}
            for m in ("clip", "simclr") for s in range(3)}
    for s in range(3):
        runs[f"clip@{s}"]["heldout_compounds"]["zs_well_top1pct"] = 0.2
    summ = scoring.summarise(runs)
    zs = summ[summ.metric == "zs_well_top1pct"]
    assert list(zs.method) == ["clip"] and int(zs.seeds.iloc[0]) == 3


def test_the_recorded_settings_resolve_to_what_train_reads():
    from micon.config import parse_overrides
    rng = np.random.default_rng(0)
    keys = ["data.pair_within_source", "data.augment.crop", "deterministic", "wandb.log_every", "model.name"]
    for _ in range(50):
        settings = [f"{keys[i]}={rng.integers(0, 5)}" for i in rng.integers(0, len(keys), size=rng.integers(1, 12))]
        once = design.merged(settings)
        assert parse_overrides(once) == parse_overrides(settings)          # the same configuration
        assert len({x.split("=")[0] for x in once}) == len(once)           # each key once
    assert design.merged([*design.RECIPE, *design.RECIPE]) == design.RECIPE


def test_an_ablation_that_starts_from_another_run_names_it_per_seed_and_refuses_an_unfinished_one(tmp_path):
    """`{out}` and `{seed}` in an ablation's overrides name this comparison's runs; a run that has not
    finished stops the comparison with its name instead of training from scratch."""
    run = tmp_path / "train" / "simclr_seed3"
    run.mkdir(parents=True)
    with pytest.raises(SystemExit, match="simclr_seed3, which has not finished"):
        design.overrides("simclr_init", tmp_path, 3)
    (run / "final.json").write_text("{}")
    assert design.overrides("simclr_init", tmp_path, 3) == [f"model.init={run}"]
    assert design.overrides("cf0", tmp_path, 3) == ["loss.counterfactual_weight=0"]
    assert "simclr_init" in design.NEEDS_RUNS       # left out of the default ablations: it needs the comparison's runs


def test_a_variant_that_starts_from_another_run_is_paired_with_that_run_not_the_untrained_network():
    rng = np.random.default_rng(1)
    runs = {}
    for s in range(4):
        for m in ("micon", "simclr", "untrained", "micon_simclr_init"):
            runs[f"{m}@{s}"] = {split: {"nsb_top10": float(rng.uniform())} for split in design.SPLITS}
    summary = scoring.summarise(runs)
    lines = {line.split(" (")[0]: line for line in verdict.paired_gains(summary)}
    assert "against simclr" in lines["micon_simclr_init"] and "against" not in lines["micon"]
    d = [runs[f"micon_simclr_init@{s}"]["heldout_source"]["nsb_top10"] - runs[f"simclr@{s}"]["heldout_source"]["nsb_top10"]
         for s in range(4)]
    assert f"source {np.mean(d):+.3f}" in lines["micon_simclr_init"]
    assert verdict.starting_point("micon") == "untrained" and verdict.starting_point("micon_simclr_init") == "simclr"


def test_the_comparison_plot_draws_with_the_untrained_and_oracle_rows(tmp_path):
    """plot() on a summary holding the reference rows (the floor and the ceiling get their legend patches):
    it used to index the module-level function `refs` as if it were a dict of colours and crash."""
    rng = np.random.default_rng(2)
    runs = {f"{m}@{s}": {split: {k: float(rng.uniform(0, 0.3)) for k in design.METRICS} for split in design.SPLITS}
            for m in ("micon", "paclr") for s in range(2)}
    for ref in ("untrained", "oracle", "cellprofiler"):
        runs[ref] = {split: {k: float(rng.uniform(0, 0.3)) for k in design.METRICS} for split in design.SPLITS}
    png = tmp_path / "comparison.png"
    plots.plot(scoring.summarise(runs), png)
    assert png.stat().st_size > 10_000
