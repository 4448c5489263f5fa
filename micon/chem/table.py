"""Precomputed per-compound vectors (for example Uni-Mol `cls_repr`, computed once elsewhere) as a frozen molecule
input: a parquet table of `Metadata_JCP2022` plus N numeric columns, local or in object storage.

The table is read once per process into one float32 array ([compounds, N]: 116k x 512 is 238 MB); rows are
looked up by compound id. Reads only; computing the vectors is not this module's business.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from micon import schema, storage


class TableError(ValueError):
    """A vector table that cannot be read or lacks what training or prediction needs."""


class MoleculeTable:
    """Compound id -> its row of frozen vectors."""

    def __init__(self, path: str):
        self.path = str(path)
        if not self.path:
            raise TableError("model.molecule=table needs model.molecule_table: a parquet of Metadata_JCP2022 and "
                             "numeric columns")
        try:
            p = storage.path(self.path)
            frame = pd.read_parquet(io.BytesIO(storage.read_bytes(p)) if storage.is_url(self.path) else p)
        except FileNotFoundError:
            raise TableError(f"model.molecule_table={self.path}: no such file") from None
        except Exception as e:
            raise TableError(f"model.molecule_table={self.path}: not a readable parquet table "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if schema.JCP not in frame.columns:
            raise TableError(f"model.molecule_table={self.path}: no {schema.JCP} column (columns: "
                             f"{', '.join(map(str, frame.columns[:6]))}{' ...' if len(frame.columns) > 6 else ''})")
        values = frame.drop(columns=[c for c in frame.columns if str(c).startswith("Metadata_")])
        bad = [str(c) for c in values.columns if not pd.api.types.is_numeric_dtype(values[c])]
        if bad or values.shape[1] == 0:
            raise TableError(f"model.molecule_table={self.path}: needs numeric vector columns besides Metadata_*; "
                             + (f"column {bad[0]} is {values[bad[0]].dtype}" if bad else "found none"))
        ids = frame[schema.JCP].astype(str)
        if ids.duplicated().any():
            raise TableError(f"model.molecule_table={self.path}: compound {ids[ids.duplicated()].iloc[0]} has "
                             f"more than one row")
        self.vectors = values.to_numpy(np.float32)
        if not np.isfinite(self.vectors).all():
            row = int(np.argwhere(~np.isfinite(self.vectors))[0, 0])
            raise TableError(f"model.molecule_table={self.path}: compound {ids.iloc[row]} has a non-finite value")
        self.columns = [str(c) for c in values.columns]
        self.row = {c: i for i, c in enumerate(ids)}

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.row)

    def __contains__(self, compound_id: str) -> bool:
        return compound_id in self.row

    def missing(self, compound_ids) -> list[str]:
        """The given compounds without a row, in the given order."""
        return [c for c in compound_ids if c not in self.row]

    def get(self, compound_ids: list[str]) -> np.ndarray:
        """[len(compound_ids), dim] float32; a compound without a row is named."""
        if missing := self.missing(compound_ids):
            raise TableError(f"compound {missing[0]} has no row in model.molecule_table={self.path}"
                             + (f" ({len(missing)} missing in this batch)" if len(missing) > 1 else ""))
        return self.vectors[[self.row[c] for c in compound_ids]]


def write_missing(out_dir: str | Path, missing: list[str]) -> Path:
    """List every missing compound, one per line, for the message that names the first few."""
    from micon import atomic

    path = Path(out_dir) / "missing_from_molecule_table.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, "\n".join(missing) + "\n")
    return path
