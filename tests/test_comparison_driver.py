"""The comparison driver end to end (bench/science.py, what `./launch.sh compare` runs): a tiny screen, one seed,
a few steps, two methods, through training, embedding, scoring, the verdict, the plots and the docs writer, into
a temporary directory; then the same command again on the finished runs regenerates the same docs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, job_env, run_job

pytestmark = pytest.mark.slow


def science(*args, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "bench/science.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=job_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"science.py exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_comparison_runs_end_to_end_and_regenerates_the_same_docs(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    # the tiny preset with a third source, so that one source and two batches can be held out and plates remain
    run_job("data_prep.synth", out / "screen", "preset=tiny", "n_sources=3", "seed=0")
    args = ["--out", out, "--seeds", "0", "--steps", "3", "--methods", "paclr", "micon", "--parts", "comparison",
            "--data", "all", "--embed-args", "ray=false", "--docs", "--docs-dir", docs]
    science(*args)
    results = json.loads((out / "results.json").read_text())
    assert set(results["scores"]) == {"cellprofiler", "oracle", "paclr@0", "micon@0", "untrained@0"}
    for label, by_split in results["scores"].items():
        assert set(by_split) == {"heldout_batches", "heldout_compounds", "heldout_source"}, label
        assert all(0 <= s["nsb_top10"] <= 1 for s in by_split.values()), label
    assert "zs_well_top1pct" in results["scores"]["micon@0"]["heldout_compounds"]   # MICON predicts from molecules
    # the plots and the docs: comparison.png, RESULTS.md with a table per split and the verdict, results.json
    for png in (out / "comparison.png", docs / "results" / "comparison.png"):
        assert png.stat().st_size > 20_000
    text = (docs / "RESULTS.md").read_text()
    for split in ("heldout_batches", "heldout_compounds", "heldout_source"):
        assert f"### {split}\n\n| method | nsb_top1 |" in text
    assert "## Verdict (computed from the intervals above)" in text and "- **Does training pay?**" in text
    table = json.loads((docs / "results" / "results.json").read_text())
    assert set(table["heldout_source"]) == {"cellprofiler", "oracle", "paclr", "micon", "untrained"}
    assert set(table["heldout_source"]["micon"]["nsb_top10"]) == {"mean", "lo", "hi", "n"}
    # the same command on the finished runs trains, embeds and scores nothing, and writes the same docs
    first = {p: (docs / p).read_bytes() for p in ("RESULTS.md", "results/results.json", "results/summary.csv")}
    again = science(*args)
    assert "] trained " not in again.stdout and "held-out batches NSB top-10" not in again.stdout
    assert {p: (docs / p).read_bytes() for p in first} == first
    # --replot redraws comparison.png and results.json from the stored numbers alone
    science("--out", out, "--replot", "--docs", "--docs-dir", docs)
    assert json.loads((docs / "results" / "results.json").read_text()) == table
