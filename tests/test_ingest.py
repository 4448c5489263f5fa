"""Ingest: JUMP layout -> shards, control bank, stats, splits; restartability and bad input."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import tifffile
import webdataset as wds

from data_prep.ingest import IngestConfig, ingest_plate
from micon import schema
from micon.data.codecs import decode
from micon.data.jump import IngestError
from micon.data.shards import ControlBank, Manifest, assign_splits, read_tar_samples
from tests.conftest import REPO, job_env, run_job
from tests.synth_features import load_data_frames


@pytest.fixture(scope="module")
def prepped(tiny_screen, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "shards"
    proc = run_job("data_prep.ingest", tiny_screen, out, "workers=2", "shard_mb=0.2", "heldout_sources=0",
                   "heldout_batches=1")
    (out.parent / "prep.err").write_text(proc.stderr)
    return out


def test_progress_in_a_log_is_plain_lines_and_the_sites_bar_has_its_total(prepped):
    """stderr is a pipe here, as in a Slurm .out: plain progress lines, no carriage returns or cursor codes,
    and the sites line knows the total (the started plates' sites, extrapolated to the rest)."""
    import re

    err = (prepped.parent / "prep.err").read_text()
    assert "\r" not in err and "\x1b" not in err
    n_sites = Manifest.load(prepped).data["n_sites"] if "n_sites" in Manifest.load(prepped).data else None
    sites = re.findall(r"prep sites: ([\d,]+)/([\d,]+) sites \((\d+)%\)", err)
    assert sites, err[-2000:]
    done, total, pct = sites[-1]
    assert done == total and pct == "100"
    if n_sites is not None:
        assert int(total.replace(",", "")) == n_sites
    assert re.search(r"prep plates: (\d+)/\1 plates \(100%\), [\d.]+ plates/s", err)


def all_samples(out):
    m = Manifest.load(out)
    return [s for path in m.shard_paths() for s in read_tar_samples(path)]


def test_every_site_exactly_once_and_metadata_joined(tiny_screen, prepped):
    samples = all_samples(prepped)
    keys = [k for k, _, _ in samples]
    assert len(keys) == len(set(keys))
    ld = load_data_frames(tiny_screen)
    expected = {f"{p}_{w}_{s}" for p, w, s in zip(ld.Metadata_Plate, ld.Metadata_Well, ld.Metadata_Site)}
    assert set(keys) == expected
    wells = pd.read_csv(tiny_screen / "metadata" / "well.csv.gz")
    cpds = pd.read_csv(tiny_screen / "metadata" / "compound.csv.gz").set_index(schema.JCP)
    jcp = {(p, w): c for p, w, c in zip(wells.Metadata_Plate, wells.Metadata_Well, wells.Metadata_JCP2022)}
    plates = pd.read_csv(tiny_screen / "metadata" / "plate.csv.gz").set_index(schema.PLATE)
    for _, img, meta in samples:
        c = jcp[(meta[schema.PLATE], meta[schema.WELL])]
        assert meta[schema.JCP] == c
        assert meta[schema.SMILES] == cpds.loc[c, schema.SMILES]
        assert meta[schema.INCHIKEY] == cpds.loc[c, schema.INCHIKEY]
        assert meta[schema.BATCH] == plates.loc[meta[schema.PLATE], schema.BATCH]
        assert meta[schema.ROLE] == (schema.NEGCON if c == schema.DMSO else
                                     schema.POSCON if c in schema.POSITIVE_CONTROLS.values() else schema.TREATED)
        assert img.shape == (5, 64, 64) and img.dtype == np.uint8
    # shards never mix plates
    m = Manifest.load(prepped)
    for s in m.data["shards"]:
        plates_in = {meta[schema.PLATE] for _, _, meta in read_tar_samples(prepped / "shards" / s["name"])}
        assert plates_in == {s["plate"]}


def test_channel_order_and_scaling_match_source_tiffs(tiny_screen, prepped):
    """Recompute the documented rule directly: TIFF / illumination, clip to the 0.1/99.9 percentiles
    of that image, map linearly to 0..255, round."""
    ld = pd.concat([pd.read_parquet(p) for p in tiny_screen.glob("*/workspace/load_data_csv/*/*/*.parquet")])
    ld = ld.set_index(["Metadata_Plate", "Metadata_Well", "Metadata_Site"])
    for key, img, meta in all_samples(prepped)[::7]:
        row = ld.loc[(meta[schema.PLATE], meta[schema.WELL], meta[schema.SITE])]
        for c, ch in enumerate(["DNA", "RNA", "ER", "AGP", "Mito"]):
            raw = tifffile.imread(tiny_screen / row[f"PathName_Orig{ch}"] / row[f"FileName_Orig{ch}"]).astype(np.float64)
            ill = np.load(tiny_screen / row[f"PathName_Illum{ch}"] / row[f"FileName_Illum{ch}"]).astype(np.float64)
            x = raw / ill
            lo, hi = np.percentile(x, 0.1), np.percentile(x, 99.9)
            ref = np.rint((np.clip(x, lo, hi) - lo) / (hi - lo) * 255)
            assert np.abs(img[c].astype(int) - ref).max() <= 1, (key, ch)


def test_webdataset_streams_the_shards(prepped):
    m = Manifest.load(prepped)
    ds = wds.WebDataset(m.shard_paths(), shardshuffle=False, empty_check=False)
    n = 0
    for sample in ds:
        img = decode(sample[f"image.{m.codec}"], m.codec)
        meta = json.loads(sample["json"])
        assert img.shape == (5, 64, 64) and sample["__key__"].startswith(meta[schema.PLATE])
        n += 1
    assert n == m.data["n_sites"] == sum(s["n_samples"] for s in m.data["shards"])


def test_control_bank_holds_exactly_the_dmso_sites_and_stats_match(prepped):
    samples = all_samples(prepped)
    dmso = {(m[schema.PLATE], m[schema.WELL], m[schema.SITE]): img for _, img, m in samples
            if m[schema.JCP] == schema.DMSO}
    bank = ControlBank(prepped)
    table = bank.table
    assert set(zip(table.Metadata_Plate, table.Metadata_Well, table.Metadata_Site)) == set(dmso)
    for r in table.itertuples():
        assert np.array_equal(bank.get(r.Metadata_Plate, r.row), dmso[(r.Metadata_Plate, r.Metadata_Well, r.Metadata_Site)])
    m = Manifest.load(prepped)
    for plate in m.data["plates"]:
        stack = np.stack([img for (p, _, _), img in dmso.items() if p == plate]).astype(np.float64)
        mean, std = m.plate_stats(plate)
        np.testing.assert_allclose(mean, stack.mean(axis=(0, 2, 3)), atol=1e-5)
        np.testing.assert_allclose(std, stack.std(axis=(0, 2, 3)), atol=1e-5)
    rng = np.random.default_rng(0)
    p = table.Metadata_Plate.iloc[0]
    _, level = bank.draw(p, table.Metadata_Batch.iloc[0], table.Metadata_Source.iloc[0], rng)
    assert level == "plate"
    _, level = bank.draw("NOPLATE", table.Metadata_Batch.iloc[0], table.Metadata_Source.iloc[0], rng)
    assert level == "batch"


def test_splits_are_disjoint_and_reproducible(prepped):
    m = Manifest.load(prepped)
    sp = m.data["splits"]
    assert len(sp["heldout_batches"]) == 1 and sp["heldout_sources"] == []
    treated = sorted(c[schema.JCP] for c in m.data["compounds"] if c["Metadata_Role"] == schema.TREATED)
    assert len(sp["heldout_compounds"]) == round(0.2 * len(treated))
    again = assign_splits(treated, ["source_1", "source_2"], {"source_1": ["a", "b"], "source_2": ["c", "d"]},
                          0, 0.2, 1, 1)
    assert again == assign_splits(treated, ["source_1", "source_2"],
                                  {"source_1": ["a", "b"], "source_2": ["c", "d"]}, 0, 0.2, 1, 1)
    assert again["heldout_compounds"] == sp["heldout_compounds"]
    assert not set(again["heldout_batches"]) & {b for s in again["heldout_sources"]
                                                for b in {"source_1": ["a", "b"], "source_2": ["c", "d"]}[s]}
    other = assign_splits(treated, ["s1", "s2"], {"s1": ["a"], "s2": ["b"]}, 1, 0.2, 0, 0)
    assert other["heldout_compounds"] != sp["heldout_compounds"] or len(treated) < 3
    splits = {m.split_of(meta) for _, _, meta in all_samples(prepped)}
    assert splits == {"train", "heldout_batch", "heldout_compound"}


def digest(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def test_killed_ingest_resumes_to_identical_shards(tiny_screen, prepped, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "data_prep.ingest", str(tiny_screen), str(out), "workers=1", "shard_mb=0.2",
            "heldout_batches=1"]
    proc = subprocess.Popen(args, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "plates").glob("*.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((out / "plates").glob("*.json")), "the kill should land mid-run"
    # a Ray worker already inside a plate may still finish it (that work is kept too): wait until the
    # output stops changing, then check that no half shard looks whole
    files, quiet_since = None, time.time()
    while time.time() - quiet_since < 3 and time.time() < deadline + 60:
        now = sorted((p.name, p.stat().st_size) for p in out.rglob("*") if p.is_file())
        if now != files:
            files, quiet_since = now, time.time()
        time.sleep(0.2)
    done = list((out / "plates").glob("*.json"))
    assert 1 <= len(done) < 4, "the kill should land mid-run"
    assert not (out / "manifest.json").exists()
    finished = {json.loads(p.read_text())["plate"] for p in done}
    assert {p.name.rsplit("-", 1)[0] for p in (out / "shards").glob("*.tar")} <= finished
    before = digest(out)
    rerun = run_job("data_prep.ingest", tiny_screen, out, "workers=1", "shard_mb=0.2", "heldout_batches=1")
    assert f"{len(done)} already done" in rerun.stdout
    after = digest(out)
    assert after == digest(prepped)
    assert all(after[k] == v for k, v in before.items())
    assert json.loads((out / "manifest.json").read_text())["shards"] == json.loads(
        (prepped / "manifest.json").read_text())["shards"]


# ----------------------------------------------------------------------------- bad input

def _first_site(screen, plate):
    ld = pd.read_csv(next(screen.glob(f"*/workspace/load_data_csv/*/{plate}/load_data.csv")), dtype=str)
    return ld.iloc[0]


def _break(screen, kind, plate):
    """Damage one site (or table) of `plate` in a copy of the screen; return (well, site, file)."""
    r = _first_site(screen, plate)
    tiff = screen / r.PathName_OrigER / r.FileName_OrigER
    if kind == "missing_tiff":
        tiff.unlink()
    elif kind == "unreadable_tiff":
        tiff.write_bytes(b"not a tiff at all")
    elif kind == "wrong_shape":
        tifffile.imwrite(tiff, np.zeros((32, 48), np.uint16))
    elif kind == "wrong_dtype":
        tifffile.imwrite(tiff, np.zeros((64, 64), np.float32))
    elif kind == "no_compound":
        wells = pd.read_csv(screen / "metadata" / "well.csv.gz")
        wells = wells[~((wells.Metadata_Plate == plate) & (wells.Metadata_Well == r.Metadata_Well))]
        wells.to_csv(screen / "metadata" / "well.csv.gz", index=False)
        return r.Metadata_Well, r.Metadata_Site, ""
    elif kind == "no_smiles":
        wells = pd.read_csv(screen / "metadata" / "well.csv.gz")
        jcp = wells[(wells.Metadata_Plate == plate) & (wells.Metadata_Well == r.Metadata_Well)].Metadata_JCP2022.iloc[0]
        cpd = pd.read_csv(screen / "metadata" / "compound.csv.gz")
        cpd.loc[cpd.Metadata_JCP2022 == jcp, "Metadata_SMILES"] = ""
        cpd.to_csv(screen / "metadata" / "compound.csv.gz", index=False)
        return r.Metadata_Well, r.Metadata_Site, jcp
    elif kind == "unknown_compound":
        wells = pd.read_csv(screen / "metadata" / "well.csv.gz")
        jcp = wells[(wells.Metadata_Plate == plate) & (wells.Metadata_Well == r.Metadata_Well)].Metadata_JCP2022.iloc[0]
        cpd = pd.read_csv(screen / "metadata" / "compound.csv.gz")
        cpd[cpd.Metadata_JCP2022 != jcp].to_csv(screen / "metadata" / "compound.csv.gz", index=False)
        return r.Metadata_Well, r.Metadata_Site, jcp
    elif kind == "missing_channel":
        for p in screen.glob(f"*/workspace/load_data_csv/*/{plate}/*"):
            df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p, dtype=str)
            df = df.drop(columns=["FileName_OrigMito", "PathName_OrigMito"])
            df.to_parquet(p) if p.suffix == ".parquet" else df.to_csv(p, index=False)
        return "", "", "Mito"
    return r.Metadata_Well, r.Metadata_Site, str(tiff)


EXPECTED = {
    "missing_tiff": "image file is missing (expected a 16-bit TIFF)",
    "unreadable_tiff": "image file is unreadable",
    "wrong_shape": "image has shape 32x48; expected 64x64",
    "wrong_dtype": "image has dtype float32; expected uint16",
    "no_compound": "well has no compound in metadata/well.csv.gz",
    "no_smiles": "has no SMILES in metadata/compound.csv.gz",
    "unknown_compound": "is not in metadata/compound.csv.gz",
    "missing_channel": "load_data is missing channel(s) Mito",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_input_names_the_site_and_loses_nothing(tiny_screen, tmp_path, kind):
    screen = tmp_path / "screen"
    shutil.copytree(tiny_screen, screen)
    plate = "SYN0102001"
    well, site, what = _break(screen, kind, plate)
    out = tmp_path / "out"
    for d in ("shards", "plates", "control_bank.zarr"):
        (out / d).mkdir(parents=True)
    cfg = IngestConfig(shard_mb=0.2)
    with pytest.raises(IngestError) as err:
        ingest_plate(str(screen), str(out), plate, cfg)
    msg = str(err.value)
    assert EXPECTED[kind] in msg and f"plate {plate}" in msg
    if well:
        assert f"well {well}" in msg and f"site {site}" in msg
    if kind in ("missing_tiff", "unreadable_tiff", "wrong_shape", "wrong_dtype"):
        assert f"file {what}" in msg
    if kind in ("no_smiles", "unknown_compound", "missing_channel"):
        assert what in msg
    # the default stops before writing anything for that plate
    assert list((out / "shards").iterdir()) == [] and list((out / "plates").iterdir()) == []
    assert not (out / "control_bank.zarr" / plate).exists()
    if kind == "missing_channel":
        return  # a plate without a channel cannot be skipped site by site
    rec = ingest_plate(str(screen), str(out), plate, IngestConfig(shard_mb=0.2, on_error="skip"))
    assert len(rec["problems"]) >= 1 and rec["problems"][0]["kind"] == kind
    assert rec["n_sites"] == 36 - len(rec["problems"])


def test_job_reports_failed_plate_keeps_others_and_rerun_finishes(tiny_screen, tmp_path):
    screen = tmp_path / "screen"
    shutil.copytree(tiny_screen, screen)
    r = _first_site(screen, "SYN0201001")
    tiff = screen / r.PathName_OrigDNA / r.FileName_OrigDNA
    good = tiff.read_bytes()
    tiff.unlink()
    out = tmp_path / "out"
    proc = run_job("data_prep.ingest", screen, out, "workers=2", check=False)
    assert proc.returncode == 1
    assert (f"prep: plate SYN0201001 failed, nothing written for it: plate SYN0201001, well {r.Metadata_Well}, "
            f"site {r.Metadata_Site}, file {tiff}: image file is missing (expected a 16-bit TIFF)") in proc.stderr
    assert "3 of 4 plates are done and kept" in proc.stderr
    kept = digest(out)
    assert len(kept) == 3 and not any(k.startswith("SYN0201001") for k in kept)
    skip = run_job("data_prep.ingest", screen, tmp_path / "skipped", "workers=2", "on_error=skip")
    assert "1 sites skipped" in skip.stdout
    report = pd.read_csv(tmp_path / "skipped" / "ingest_report.csv")
    assert report.iloc[0].to_dict() | {} == dict(plate="SYN0201001", well=r.Metadata_Well, site=int(r.Metadata_Site),
                                                file=str(tiff), kind="missing_tiff",
                                                reason="image file is missing (expected a 16-bit TIFF)")
    tiff.write_bytes(good)
    rerun = run_job("data_prep.ingest", screen, out, "workers=2")
    assert "3 already done, 1 to ingest" in rerun.stdout
    assert {k: v for k, v in digest(out).items() if k in kept} == kept
    assert Manifest.load(out).data["n_sites"] == 144


def test_a_wrong_first_site_is_blamed_not_the_plate(tiny_screen, tmp_path):
    """Every channel of the plate's first site has another shape: that site is the odd one out."""
    screen = tmp_path / "screen"
    shutil.copytree(tiny_screen, screen)
    plate = "SYN0102001"
    r = _first_site(screen, plate)
    for ch in schema.CHANNELS:
        tifffile.imwrite(screen / getattr(r, f"PathName_Orig{ch}") / getattr(r, f"FileName_Orig{ch}"),
                         np.full((48, 48), 1000, np.uint16))
    out = tmp_path / "out"
    for d in ("shards", "plates", "control_bank.zarr"):
        (out / d).mkdir(parents=True)
    rec = ingest_plate(str(screen), str(out), plate, IngestConfig(shard_mb=0.2, on_error="skip", illum=False))
    assert [(p["well"], str(p["site"]), p["kind"]) for p in rec["problems"]] == [
        (r.Metadata_Well, str(r.Metadata_Site), "wrong_shape")]
    assert rec["n_sites"] == 35 and "expected 64x64" in rec["problems"][0]["reason"]


@pytest.mark.slow
def test_rerun_with_other_options_refuses_to_mix_plates(tiny_screen, tmp_path):
    out = tmp_path / "out"
    run_job("data_prep.ingest", tiny_screen, out, "workers=2", "plates=[SYN0101001,SYN0102001]",
            "replicate_sets=false")
    proc = run_job("data_prep.ingest", tiny_screen, out, "workers=2", "codec=png", "image_size=32",
                   "replicate_sets=false", check=False)
    assert proc.returncode == 2
    assert "already holds 2 plate(s) made with other options" in proc.stderr
    assert "codec=dzstd (now png)" in proc.stderr and "image_size=0 (now 32)" in proc.stderr
    assert not (out / "manifest.json").exists() or Manifest.load(out).codec == "dzstd"
    proc = run_job("data_prep.ingest", tiny_screen, out, "workers=2", "codec=png", "image_size=32",
                   "replicate_sets=false", "rebuild=true")
    assert "redoing 2 plate(s) made with other options" in proc.stderr
    shapes = {img.shape for _, img, _ in all_samples(out)}
    assert shapes == {(5, 32, 32)} and Manifest.load(out).codec == "png"


@pytest.mark.slow
def test_a_whole_plate_problem_is_not_offered_on_error_skip(tiny_screen, tmp_path):
    screen = tmp_path / "screen"
    shutil.copytree(tiny_screen, screen)
    _break(screen, "missing_channel", "SYN0102001")
    proc = run_job("data_prep.ingest", screen, tmp_path / "out", "workers=2", "on_error=skip", check=False)
    assert proc.returncode == 1 and "load_data is missing channel(s) Mito" in proc.stderr
    assert "whole-plate problem that on_error=skip cannot skip" in proc.stderr
    assert "pass on_error=skip" not in proc.stderr
