"""Read a JUMP (cpg0016) layout: metadata tables, per-plate load_data, and their join into sites.

Pure table work plus the reading of small metadata files; no image I/O. Every problem becomes an
`IngestError` that names the plate, well, site and file and says what was expected. The screen's root
may be local or in object storage (micon.storage): image paths are then object URLs under it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import os

import pandas as pd

from micon import schema, storage


class IngestError(ValueError):
    """A problem with the input screen, worded for the person who has to fix it."""

    def __init__(self, message: str, plate: str = "", well: str = "", site: str = "", file: str = "",
                 kind: str = "error"):
        where = ", ".join(f"{k} {v}" for k, v in (("plate", plate), ("well", well), ("site", site),
                                                  ("file", file)) if v)
        super().__init__(f"{where}: {message}" if where else message)
        self.plate, self.well, self.site, self.file, self.kind = plate, well, site, file, kind
        self.reason = message

    def record(self) -> dict:
        return dict(plate=self.plate, well=self.well, site=self.site, file=self.file, kind=self.kind,
                    reason=self.reason)

    def __reduce__(self):   # keep every field through pickling (Ray hands task errors back pickled)
        return IngestError, (self.reason, self.plate, self.well, self.site, self.file, self.kind)


@dataclass
class Screen:
    """The metadata of a JUMP-layout screen on disk."""

    root: "Path | storage.ObjectPath"
    plates: pd.DataFrame     # Metadata_Source, Metadata_Batch, Metadata_Plate, Metadata_PlateType
    wells: pd.DataFrame      # Metadata_Source, Metadata_Plate, Metadata_Well, Metadata_JCP2022
    compounds: pd.DataFrame  # Metadata_JCP2022, Metadata_InChIKey, Metadata_InChI, Metadata_SMILES
    allow_outside_root: bool = False   # load_data may name images outside `root` (else refused)

    def subsets(self, plates: list[str]) -> dict[str, "Screen"]:
        """One small Screen per plate (its plate row, wells and their compounds), split in one pass, so
        that a per-plate task gets only its own rows instead of re-reading the screen's tables."""
        wells = self.wells[self.wells[schema.PLATE].isin(plates)]
        by_plate = dict(tuple(wells.groupby(schema.PLATE, sort=False)))
        cpd = self.compounds.set_index(schema.JCP, drop=False)
        out = {}
        for plate in plates:
            w = by_plate.get(plate, self.wells.iloc[:0])
            out[plate] = Screen(self.root, self.plates[self.plates[schema.PLATE] == plate].reset_index(drop=True),
                                w.reset_index(drop=True),
                                cpd[cpd.index.isin(w[schema.JCP].unique())].reset_index(drop=True),
                                self.allow_outside_root)
        return out


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise IngestError(f"missing metadata table; expected {path} with columns {', '.join(columns)}",
                          file=str(path)) from None
    df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False,
                     compression="gzip" if str(path).endswith(".gz") else None)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise IngestError(f"missing columns {', '.join(missing)} (has {', '.join(df.columns)})", file=str(path))
    return df


def _missing_values(values: pd.Series) -> pd.Series:
    """Empty or NaN-like cells of a table read with every column as a string (`keep_default_na=False`)."""
    return values.isna() | values.astype(str).str.strip().str.lower().isin(("", "nan", "none", "null", "na", "<na>"))


def check_keys(df: pd.DataFrame, keys: list[str], required: list[str], file: str, plate: str = "",
               first_row: int = 2) -> None:
    """Refuse a table whose key or required columns have missing values, or whose keys repeat, naming the
    rows (`first_row`: the line number of the first data row, 2 for a CSV with a header)."""
    for col in required:
        bad = _missing_values(df[col]).to_numpy()
        if bad.any():
            rows = (bad.nonzero()[0] + first_row).tolist()
            raise IngestError(f"{col} is missing (empty or NaN) in {int(bad.sum())} row(s): line(s) "
                              f"{', '.join(map(str, rows[:5]))}{' ...' if len(rows) > 5 else ''}; every row needs "
                              f"a {col}", plate=plate, file=file, kind="missing_key")
    dup = df.duplicated(keys, keep=False).to_numpy()
    if dup.any():
        rows = (dup.nonzero()[0] + first_row).tolist()
        first = df.loc[dup, keys].iloc[0].tolist()
        raise IngestError(f"{int(dup.sum())} rows share a key ({', '.join(keys)}), e.g. {first} at line(s) "
                          f"{', '.join(map(str, rows[:6]))}{' ...' if len(rows) > 6 else ''}: each key must appear "
                          f"once (a duplicated well would be ingested once per row)", plate=plate, file=file,
                          kind="duplicate_key")


def read_screen(root: str | Path, allow_outside_root: bool = False, metadata: str | Path = "") -> Screen:
    """The three metadata tables, checked before any work: required columns present and filled, keys unique.
    `root`: a local path or an object-storage URL (s3://bucket/prefix, any fsspec URL); `metadata`: where the
    tables are when not in `root`/metadata (the public bucket holds images only)."""
    root = storage.path(root)
    meta = storage.path(metadata) if metadata else root / "metadata"
    plates = _read_table(meta / "plate.csv.gz", [schema.SOURCE, schema.BATCH, schema.PLATE, schema.PLATE_TYPE])
    check_keys(plates, [schema.PLATE], [schema.SOURCE, schema.BATCH, schema.PLATE], str(meta / "plate.csv.gz"))
    wells = _read_table(meta / "well.csv.gz", [schema.SOURCE, schema.PLATE, schema.WELL, schema.JCP])
    check_keys(wells, [schema.SOURCE, schema.PLATE, schema.WELL], [schema.SOURCE, schema.PLATE, schema.WELL],
               str(meta / "well.csv.gz"))
    compounds = _read_table(meta / "compound.csv.gz", [schema.JCP, schema.INCHIKEY, schema.INCHI, schema.SMILES])
    check_keys(compounds, [schema.JCP], [schema.JCP], str(meta / "compound.csv.gz"))
    return Screen(root=root, plates=plates, wells=wells, compounds=compounds, allow_outside_root=allow_outside_root)


def load_data_path(root: Path, source: str, batch: str, plate: str) -> Path | None:
    """cpg0016 keeps `load_data_with_illum.parquet` (preferred) and/or `load_data.csv(.gz)` per plate."""
    d = root / source / "workspace" / "load_data_csv" / batch / plate
    if isinstance(d, storage.ObjectPath):     # one listing instead of a request per candidate name
        present = {p.name for p in d.glob("load_data*")}
        return next((d / n for n in ("load_data_with_illum.parquet", "load_data.parquet", "load_data_with_illum.csv",
                                     "load_data.csv", "load_data.csv.gz") if n in present), None)
    for name in ("load_data_with_illum.parquet", "load_data.parquet", "load_data_with_illum.csv",
                 "load_data.csv", "load_data.csv.gz"):
        if (d / name).is_file():
            return d / name
    return None


def read_load_data(path: Path, plate: str, channels=schema.CHANNELS) -> pd.DataFrame:
    """One plate's load_data, all columns as strings, checked for every channel's columns."""
    raw = io.BytesIO(storage.read_bytes(path))
    if path.suffix == ".parquet":
        df = pd.read_parquet(raw).astype(str)
    else:
        df = pd.read_csv(raw, dtype=str, keep_default_na=False, compression="gzip" if path.suffix == ".gz" else None)
    need = [schema.WELL, schema.SITE] + [schema.channel_column(ch, k) for ch in channels
                                         for k in ("FileName", "PathName")]
    missing = [c for c in need if c not in df.columns]
    if missing:
        chans = sorted({c.replace("FileName_Orig", "").replace("PathName_Orig", "") for c in missing
                        if "Orig" in c})
        what = f"channel(s) {', '.join(chans)}" if chans else "columns"
        raise IngestError(f"load_data is missing {what}: expected columns {', '.join(missing)}",
                          plate=plate, file=str(path), kind="missing_channel")
    if schema.PLATE in df.columns:
        other = sorted(set(df[schema.PLATE]) - {plate})
        if other:
            raise IngestError(f"load_data names other plate(s) {', '.join(other[:3])}: a plate's load_data must "
                              f"describe that plate only", plate=plate, file=str(path), kind="wrong_plate")
    check_keys(df, [schema.WELL, schema.SITE], [schema.WELL, schema.SITE], str(path), plate=plate)
    return df


def plate_sites(screen: Screen, plate: str, channels=schema.CHANNELS,
                on_error: str = "stop") -> tuple[pd.DataFrame, list[dict]]:
    """Every site of `plate` with its well's compound, role and one file path per channel.

    Returns (sites, problems). Metadata problems (a well with no compound, a compound with no
    SMILES) raise with on_error="stop" and drop the well's sites with on_error="skip".
    """
    prow = screen.plates[screen.plates[schema.PLATE] == plate]
    if prow.empty:
        raise IngestError("plate is not in metadata/plate.csv.gz", plate=plate)
    source, batch = prow.iloc[0][schema.SOURCE], prow.iloc[0][schema.BATCH]
    path = load_data_path(screen.root, source, batch, plate)
    if path is None:
        raise IngestError(f"no load_data file under {screen.root / source / 'workspace' / 'load_data_csv' / batch / plate}",
                          plate=plate, kind="missing_load_data")
    ld = read_load_data(path, plate, channels)
    ld = ld.assign(**{schema.SOURCE: source, schema.BATCH: batch, schema.PLATE: plate})
    wells = screen.wells[screen.wells[schema.PLATE] == plate][[schema.WELL, schema.JCP]]
    sites = ld.merge(wells, on=schema.WELL, how="left")
    sites = sites.merge(screen.compounds[[schema.JCP, schema.INCHIKEY, schema.SMILES]], on=schema.JCP, how="left",
                        indicator="_in_compounds")
    problems: list[dict] = []
    bad = pd.Series(False, index=sites.index)
    for i, r in sites.iterrows():
        err = None
        if pd.isna(r[schema.JCP]) or r[schema.JCP] == "":
            err = IngestError("well has no compound in metadata/well.csv.gz (expected a Metadata_JCP2022)",
                              plate, r[schema.WELL], r[schema.SITE], kind="no_compound")
        elif r[schema.JCP] != schema.EMPTY_WELL and r["_in_compounds"] == "left_only":
            err = IngestError(f"compound {r[schema.JCP]} is not in metadata/compound.csv.gz (the well table names "
                              f"it; add its row with a SMILES, or fix the id in metadata/well.csv.gz)",
                              plate, r[schema.WELL], r[schema.SITE], kind="unknown_compound")
        elif r[schema.JCP] != schema.EMPTY_WELL and (pd.isna(r[schema.SMILES]) or r[schema.SMILES] == ""):
            err = IngestError(f"compound {r[schema.JCP]} has no SMILES in metadata/compound.csv.gz",
                              plate, r[schema.WELL], r[schema.SITE], kind="no_smiles")
        if err is not None:
            if on_error == "stop":
                raise err
            problems.append(err.record())
            bad[i] = True
    sites = sites[~bad].drop(columns="_in_compounds")
    sites = sites[sites[schema.JCP] != schema.EMPTY_WELL].copy()
    sites[schema.ROLE] = sites[schema.JCP].map(schema.role_of)
    for ch in channels:
        sites[f"path_{ch}"] = [local_path(screen.root, p, f) for p, f in
                               zip(sites[schema.channel_column(ch, "PathName")], sites[schema.channel_column(ch, "FileName")])]
        fn, pn = f"FileName_Illum{ch}", f"PathName_Illum{ch}"
        sites[f"illum_{ch}"] = ([local_path(screen.root, p, f) for p, f in zip(sites[pn], sites[fn])]
                                if fn in sites and pn in sites else "")
    if not screen.allow_outside_root:
        check_inside_root(sites, screen.root, plate, [f"{k}_{ch}" for ch in channels for k in ("path", "illum")])
    sites = sites.sort_values([schema.WELL, schema.SITE], key=lambda s: s.map(_natural_key)).reset_index(drop=True)
    return sites, problems


MIRROR_MARKER = "cpg0016-jump/"


def local_path(root, path_name: str, file_name: str) -> str:
    """A load_data PathName/FileName pair as a path or URL under the screen root (SRC, local or in object
    storage): relative names are under it, and `s3://cellpainting-gallery/cpg0016-jump/...` URIs (the files
    as published) are rebased onto it, so a local mirror and a private bucket both read them as they are."""
    if "://" in path_name:
        if MIRROR_MARKER not in path_name:
            raise IngestError(f"cannot map {path_name} to the mirror at {root}: expected a path containing "
                              f"{MIRROR_MARKER!r} or one relative to {root}", file=path_name + file_name)
        path_name = path_name.split(MIRROR_MARKER, 1)[1]
    return str(root / path_name / file_name)


def check_inside_root(sites: pd.DataFrame, root: Path, plate: str, columns: list[str]) -> None:
    """Refuse load_data rows whose files resolve outside the screen root (`../`, absolute paths): a load_data
    file must not make prep read, and copy into shards, files the user did not point it at."""
    if isinstance(root, storage.ObjectPath):    # keys were normalised when joined: compare prefixes
        top = str(root)
        outside = lambda p: not (p == top or p.startswith(top.rstrip("/") + "/"))   # noqa: E731
    else:
        top = os.path.abspath(root)
        outside = lambda p: os.path.commonpath([top, os.path.abspath(p)]) != top   # noqa: E731
    for col in columns:
        if col not in sites.columns:
            continue
        for i, p in enumerate(sites[col]):
            if p and outside(p):
                r = sites.iloc[i]
                raise IngestError(f"load_data names {p}, outside the screen root {top} ({col.split('_', 1)[1]} "
                                  f"channel); refusing to read it. If the mirror really spans several roots, pass "
                                  f"allow_outside_root=true", plate=plate, well=str(r[schema.WELL]),
                                  site=str(r[schema.SITE]), file=p, kind="outside_root")


def _natural_key(v):
    return (len(v), v) if isinstance(v, str) and v.isdigit() else v
