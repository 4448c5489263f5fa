"""Metadata is checked before any work: duplicate keys, missing key values and load_data paths outside
the screen root are refused with the rows named, and nothing is written for the plate."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest

from data_prep.ingest import IngestConfig, ingest_plate
from micon import schema
from micon.data.jump import IngestError, read_screen
from tests.conftest import run_job

PLATE = "SYN0102001"


@pytest.fixture()
def screen(tiny_screen, tmp_path):
    out = tmp_path / "screen"
    shutil.copytree(tiny_screen, out)
    return out


def _table(screen, name):
    return screen / "metadata" / f"{name}.csv.gz"


def _edit_table(screen, name, fn):
    df = pd.read_csv(_table(screen, name), dtype=str, keep_default_na=False)
    fn(df).to_csv(_table(screen, name), index=False)


def _load_data(screen, plate=PLATE):
    return next(screen.glob(f"*/workspace/load_data_csv/*/{plate}"))


def _edit_load_data(screen, fn, plate=PLATE):
    """Apply `fn` to the plate's load_data (CSV and parquet alike: the parquet is what prep reads)."""
    d = _load_data(screen, plate)
    df = fn(pd.read_csv(d / "load_data.csv", dtype=str, keep_default_na=False))
    df.to_csv(d / "load_data.csv", index=False)
    if (d / "load_data_with_illum.parquet").exists():
        full = pd.read_parquet(d / "load_data_with_illum.parquet")
        fn(full).to_parquet(d / "load_data_with_illum.parquet", index=False)
    return df


def test_duplicate_wells_are_refused_by_the_job_before_any_work(screen, tmp_path):
    """Two rows for one (plate, well) with different compounds used to ingest each site twice, exit 0."""
    def dup(df):
        row = df[df[schema.PLATE] == PLATE].iloc[[5]].copy()
        row[schema.JCP] = df[schema.JCP].iloc[0]
        return pd.concat([df, row], ignore_index=True)
    _edit_table(screen, "well", dup)
    proc = run_job("data_prep.ingest", screen, tmp_path / "out", "workers=1", check=False)
    assert proc.returncode != 0
    assert "rows share a key (Metadata_Source, Metadata_Plate, Metadata_Well)" in proc.stderr
    assert "well.csv.gz" in proc.stderr and "line(s)" in proc.stderr
    assert not (tmp_path / "out" / "shards").exists() or not any((tmp_path / "out" / "shards").iterdir())


@pytest.mark.parametrize("table,column,key", [("plate", schema.SOURCE, None), ("plate", schema.PLATE, None),
                                              ("well", schema.WELL, None), ("compound", schema.JCP, None)])
def test_a_missing_key_value_is_named_as_such(screen, table, column, key):
    def blank(df):
        df.loc[1, column] = "NaN" if column == schema.SOURCE else ""
        return df
    _edit_table(screen, table, blank)
    with pytest.raises(IngestError) as err:
        read_screen(screen)
    msg = str(err.value)
    assert f"{column} is missing (empty or NaN) in 1 row(s): line(s) 3" in msg and f"{table}.csv.gz" in msg
    assert "load_data" not in msg      # the NaN source used to be blamed on a missing load_data file


def test_duplicate_compounds_and_plates_are_refused(screen):
    _edit_table(screen, "compound", lambda df: pd.concat([df, df.iloc[[2]]], ignore_index=True))
    with pytest.raises(IngestError, match=r"rows share a key \(Metadata_JCP2022\)"):
        read_screen(screen)


def test_duplicate_sites_in_load_data_are_refused(screen, tmp_path):
    _edit_load_data(screen, lambda df: pd.concat([df, df.iloc[[3]]], ignore_index=True))
    with pytest.raises(IngestError) as err:
        ingest_plate(str(screen), str(tmp_path / "out"), PLATE, IngestConfig(shard_mb=0.2))
    assert "rows share a key (Metadata_Well, Metadata_Site)" in str(err.value) and f"plate {PLATE}" in str(err.value)


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_paths_outside_the_screen_root_are_refused_unless_allowed(screen, tmp_path, how):
    outside = tmp_path / "elsewhere"
    first = {}

    def move(df):
        r = df.iloc[0]
        src = screen / r["PathName_OrigDNA"] / r["FileName_OrigDNA"]
        outside.mkdir(exist_ok=True)
        shutil.copy(src, outside / r["FileName_OrigDNA"])
        rel = "../elsewhere" if how == "dotdot" else str(outside)
        df.loc[0, "PathName_OrigDNA"] = rel
        first.update(well=r[schema.WELL], site=r[schema.SITE])
        return df
    _edit_load_data(screen, move)
    out = tmp_path / "out"
    for d in ("shards", "plates", "control_bank.zarr"):
        (out / d).mkdir(parents=True)
    with pytest.raises(IngestError) as err:
        ingest_plate(str(screen), str(out), PLATE, IngestConfig(shard_mb=0.2))
    msg = str(err.value)
    assert "outside the screen root" in msg and "allow_outside_root=true" in msg
    assert f"well {first['well']}" in msg and f"site {first['site']}" in msg
    assert list((out / "shards").iterdir()) == []
    rec = ingest_plate(str(screen), str(out), PLATE, IngestConfig(shard_mb=0.2, allow_outside_root=True))
    assert rec["n_sites"] == 36
