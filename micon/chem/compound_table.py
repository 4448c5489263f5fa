"""The JUMP compound table as the compound jobs read it (featurize, predict): every column a string, one
work item per compound id with its distinct structures. `path` may be local or an object URL, a CSV
(.gz), a parquet, or a shard manifest.json (its `compounds` list)."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd

from micon import atomic, schema, storage
from micon.chem.compound import Structure
from micon.config import ConfigError


def read_compounds(path) -> pd.DataFrame:
    """The compound table as strings ('' for missing), columns named as in JUMP; a `row` column
    holds each compound's 1-based data row so errors can point at it. `path` may be an object URL."""
    path = storage.path(path)
    if not path.is_file():
        raise ConfigError(f"compound table {path} does not exist (expected metadata/compound.csv.gz "
                          f"or a shard manifest.json)")
    if path.suffix == ".json":
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        compounds = manifest.get("compounds") if isinstance(manifest, dict) else None
        if not isinstance(compounds, list) or not all(isinstance(c, dict) for c in compounds):
            raise ConfigError(f"{path}: a shard manifest needs a 'compounds' list of objects with "
                              f"{schema.JCP} and {schema.SMILES} (or {schema.INCHI}); this one has "
                              f"{'none' if compounds is None else type(compounds).__name__}. Pass the JUMP "
                              f"compound table metadata/compound.csv.gz instead")
        table = pd.DataFrame(compounds)
    else:
        table = _read_table(path)
    if schema.JCP not in table.columns or not ({schema.SMILES, schema.INCHI} & set(table.columns)):
        raise ConfigError(f"{path}: needs columns {schema.JCP} and {schema.SMILES} and/or {schema.INCHI}; "
                          f"found {', '.join(map(str, table.columns)) or 'no columns'}")
    if not len(table):
        raise ConfigError(f"compound table {path} holds no compounds (its columns, no rows): give a table with at "
                          f"least one row of {schema.JCP} and {schema.SMILES}")
    table = table.reindex(columns=[schema.JCP, schema.INCHIKEY, schema.SMILES, schema.INCHI])
    table = table.astype(object).where(table.notna(), "").astype(str).apply(lambda col: col.str.strip())
    table.insert(0, "row", np.arange(1, len(table) + 1))
    return table


def _read_table(path) -> pd.DataFrame:
    """A CSV (.gz) or parquet compound table; ConfigError in one line for an empty or unreadable file."""
    data = storage.read_bytes(path)
    kind = "parquet" if path.suffix == ".parquet" else "CSV"
    expected = (f"expected a {kind} table with columns {schema.JCP} and {schema.SMILES} (or {schema.INCHI}): was "
                f"it cut short by a failed download or copy? Write it again, or point at another table")
    if not data:
        raise ConfigError(f"compound table {path} is empty (0 bytes); {expected}")
    try:
        if kind == "parquet":
            return pd.read_parquet(io.BytesIO(data))
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False,
                           compression=atomic.COMPRESSION.get(path.suffix))
    except pd.errors.EmptyDataError:     # a compressed file holding nothing, or only blank lines
        raise ConfigError(f"compound table {path} holds no text (no header row); {expected}") from None
    except Exception as e:      # noqa: BLE001 - a damaged gzip, a parquet that is not one, bad bytes: say which
        raise ConfigError(f"cannot read compound table {path} as {kind} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'}); {expected}") from None


def plan_items(table: pd.DataFrame) -> tuple[list[tuple[str, str, list[Structure]]], list[str]]:
    """One work item per compound id, sorted by id, with its distinct structures (usually one);
    plus problems with rows that cannot be items at all (no compound id)."""
    problems = [f"row {r}: empty {schema.JCP}; skipped" for r in table.loc[table[schema.JCP] == "", "row"]]
    table = table[table[schema.JCP] != ""]
    first_key = dict(zip(table[schema.JCP][::-1], table[schema.INCHIKEY][::-1]))  # first row's key wins
    distinct = table.drop_duplicates([schema.JCP, schema.SMILES, schema.INCHI]).sort_values([schema.JCP, "row"])
    items: list[tuple[str, str, list[Structure]]] = []
    for cid, row, smiles, inchi in zip(distinct[schema.JCP], distinct["row"], distinct[schema.SMILES],
                                       distinct[schema.INCHI]):
        if items and items[-1][0] == cid:
            items[-1][2].append(Structure(int(row), smiles, inchi))
        else:
            items.append((cid, first_key[cid], [Structure(int(row), smiles, inchi)]))
    return items, problems
