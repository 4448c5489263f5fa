"""The compound graph store: ragged graph arrays in zarr v3 plus an index table (parquet).

    OUT/graphs.zarr   atom_codes [A, 7] uint8, atom_scalars [A, 1] float32, bond_atoms [B, 2] int32
                      (local atom indices), bond_codes [B, 4] uint8, atom_offsets / bond_offsets [n+1]
                      int64, fingerprints [n, n_bits/8] uint8 (np.packbits); attrs: layout, radius, n_bits
    OUT/index.parquet Metadata_JCP2022, Metadata_InChIKey, status ("ok"/"error"), reason, flags ("metal",
                      "inorganic"), n_atoms, n_bonds
Row i of the index is molecule i of every array (a failed compound has empty ranges and a zero
fingerprint). Features are stored as codes (see featurizer.py) and expanded on read. `GraphStore` is
the reader training uses; building a store (RDKit, Ray) is data_prep/featurize.py's job, not this module's.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from micon import integrity, storage
from micon.chem.featurizer import (N_ATOM_CODES, N_BOND_CODES, EncodedMol, decode, feature_layout)
from micon.chem.graph import BatchedGraph, MolGraph, collate_graphs

STORE_FORMAT = 1
ZARR_NAME = "graphs.zarr"
INDEX_NAME = "index.parquet"
INDEX_COLUMNS = ("Metadata_JCP2022", "Metadata_InChIKey", "status", "reason", "flags", "n_atoms", "n_bonds")
OK, ERROR = "ok", "error"
_ARRAYS = ("atom_codes", "atom_scalars", "bond_atoms", "bond_codes", "atom_offsets", "bond_offsets", "fingerprints")


class StoreError(RuntimeError):
    """A graph store that is missing, incomplete or built by an incompatible featuriser."""


class MissingGraphError(KeyError):
    """A compound without a graph; the message says whether featurisation failed or never ran."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class RaggedGraphs:
    """Many encoded molecules as concatenated arrays; molecule i owns atoms
    atom_offsets[i]:atom_offsets[i+1] and bonds bond_offsets[i]:bond_offsets[i+1]."""

    atom_codes: np.ndarray
    atom_scalars: np.ndarray
    bond_atoms: np.ndarray
    bond_codes: np.ndarray
    atom_offsets: np.ndarray
    bond_offsets: np.ndarray
    fingerprints: np.ndarray  # packed bits [n, ceil(n_bits / 8)] uint8

    def __len__(self) -> int:
        return len(self.atom_offsets) - 1

    @classmethod
    def from_encoded(cls, mols: list[EncodedMol | None], fingerprints: list[np.ndarray | None],
                     n_bits: int) -> "RaggedGraphs":
        """None marks a failed molecule: no atoms, no bonds, a zero fingerprint."""
        empty = EncodedMol(np.zeros((0, N_ATOM_CODES), np.uint8), np.zeros((0, 1), np.float32),
                           np.zeros((0, 2), np.int32), np.zeros((0, N_BOND_CODES), np.uint8))
        mols = [m if m is not None else empty for m in mols]
        zero = np.zeros(n_bits, np.uint8)
        fps = (np.stack([f if f is not None else zero for f in fingerprints]) if len(mols)
               else np.zeros((0, n_bits), np.uint8))
        return cls(
            atom_codes=np.concatenate([m.atom_codes for m in mols] or [empty.atom_codes]),
            atom_scalars=np.concatenate([m.atom_scalars for m in mols] or [empty.atom_scalars]),
            bond_atoms=np.concatenate([m.bond_atoms for m in mols] or [empty.bond_atoms]),
            bond_codes=np.concatenate([m.bond_codes for m in mols] or [empty.bond_codes]),
            atom_offsets=np.cumsum([0] + [m.n_atoms for m in mols]).astype(np.int64),
            bond_offsets=np.cumsum([0] + [m.n_bonds for m in mols]).astype(np.int64),
            fingerprints=np.packbits(fps.reshape(len(mols), n_bits), axis=1),
        )

    @classmethod
    def concat(cls, parts: list["RaggedGraphs"]) -> "RaggedGraphs":
        def offsets(name):
            out, base = [np.zeros(1, np.int64)], 0
            for p in parts:
                o = getattr(p, name)
                out.append(o[1:] + base)
                base += int(o[-1])
            return np.concatenate(out)
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in
                      ("atom_codes", "atom_scalars", "bond_atoms", "bond_codes", "fingerprints")},
                   atom_offsets=offsets("atom_offsets"), bond_offsets=offsets("bond_offsets"))

    def take(self, rows) -> "RaggedGraphs":
        """A new RaggedGraphs with molecules `rows` in that order."""
        rows = np.asarray(rows, np.int64)

        def gather(offsets):
            starts, lens = offsets[rows], offsets[rows + 1] - offsets[rows]
            new = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            idx = np.repeat(starts - new[:-1], lens) + np.arange(new[-1])
            return idx, new
        a_idx, a_off = gather(self.atom_offsets)
        b_idx, b_off = gather(self.bond_offsets)
        return RaggedGraphs(self.atom_codes[a_idx], self.atom_scalars[a_idx], self.bond_atoms[b_idx],
                            self.bond_codes[b_idx], a_off, b_off, self.fingerprints[rows])

    def encoded(self, i: int) -> EncodedMol:
        a0, a1 = self.atom_offsets[i], self.atom_offsets[i + 1]
        b0, b1 = self.bond_offsets[i], self.bond_offsets[i + 1]
        return EncodedMol(self.atom_codes[a0:a1], self.atom_scalars[a0:a1],
                          self.bond_atoms[b0:b1], self.bond_codes[b0:b1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in _ARRAYS}


def write_store(out_dir: str | Path, index: pd.DataFrame, graphs: RaggedGraphs, *, radius: int, n_bits: int,
                extra_attrs: dict | None = None) -> None:
    """Write graphs.zarr + index.parquet into `out_dir` (a fresh directory: the caller publishes it)."""
    import zarr

    out_dir = Path(out_dir)
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing or len(index) != len(graphs):
        raise ValueError(f"index needs columns {INDEX_COLUMNS} (missing {missing}) and one row per molecule "
                         f"({len(index)} rows, {len(graphs)} molecules)")
    group = zarr.open_group(out_dir / ZARR_NAME, mode="w")
    checksums = {}     # of each array's values and of the index file, checked by GraphStore as it loads them
    for name, arr in graphs.arrays().items():
        chunk_rows = max(1, min(len(arr), 1 << 18))
        group.create_array(name, data=np.ascontiguousarray(arr), chunks=(chunk_rows, *arr.shape[1:]))
        checksums[name] = integrity.of_array(arr)
    index.reset_index(drop=True).to_parquet(out_dir / INDEX_NAME, index=False)
    checksums[INDEX_NAME] = integrity.of_file(out_dir / INDEX_NAME)
    group.attrs.update({"format": STORE_FORMAT, "radius": int(radius), "n_bits": int(n_bits),
                        "layout": feature_layout(), "checksums": checksums, **(extra_attrs or {})})


def _as_json_layout(layout: dict) -> dict:
    return {kind: {k: list(v) for k, v in fields.items()} for kind, fields in layout.items()}


class GraphStore:
    """Read-only view of a featurised compound set; all arrays are loaded into memory on first use
    (about 40 MB for JUMP's 116k compounds), after which `get` is a slice plus a one-hot expansion.
    `path` may be in object storage (s3://bucket/graphs, any fsspec URL)."""

    def __init__(self, path):
        path = storage.path(path)
        self.root = path.parent if path.name == ZARR_NAME else path
        self.zarr_path = self.root / ZARR_NAME
        index_path = self.root / INDEX_NAME
        if not self.zarr_path.is_dir() or not index_path.is_file():
            raise StoreError(f"no complete graph store at {self.root} (expected {ZARR_NAME} and {INDEX_NAME}); "
                             f"build it with ./launch.sh featurize COMPOUNDS {self.root}")
        import zarr

        self._group = zarr.open_group(storage.zarr_store(self.zarr_path, read_only=True), mode="r")
        attrs = dict(self._group.attrs)
        if attrs.get("format") != STORE_FORMAT or attrs.get("layout") != _as_json_layout(feature_layout()):
            raise StoreError(f"graph store {self.root} was written by another featuriser version (format "
                             f"{attrs.get('format')}, layout differs from micon.chem.featurizer); rebuild it "
                             f"with ./launch.sh featurize COMPOUNDS {self.root}")
        self.radius, self.n_bits = int(attrs["radius"]), int(attrs["n_bits"])
        self.checksums = attrs.get("checksums")
        if self.checksums is None:
            integrity.warn_unrecorded(f"graph store {self.root}",
                                      f"rebuild it with ./launch.sh featurize COMPOUNDS {self.root}")
        index_bytes = storage.read_bytes(index_path)
        self._check(INDEX_NAME, lambda like: integrity.of_bytes(index_bytes, like))
        self.index = pd.read_parquet(io.BytesIO(index_bytes))
        self._row = {cid: i for i, cid in enumerate(self.index["Metadata_JCP2022"])}
        self._ok = (self.index["status"] == OK).to_numpy()
        self._graphs: RaggedGraphs | None = None
        self._fingerprints: np.ndarray | None = None

    def _check(self, name: str, actual_of) -> None:
        if not integrity.matches(actual_of, (self.checksums or {}).get(name)):
            raise StoreError(f"graph store {self.root}: {name} does not match the checksum recorded when it was "
                             f"written (damaged); rebuild it with ./launch.sh featurize COMPOUNDS {self.root}")

    def _load(self, name: str) -> np.ndarray:
        try:
            arr = self._group[name][:]
        except Exception as e:       # a damaged compressed chunk fails in its decoder
            raise StoreError(f"graph store {self.root}: {name} is unreadable ({type(e).__name__}: {str(e)[:100]}); "
                             f"rebuild it with ./launch.sh featurize COMPOUNDS {self.root}") from None
        self._check(name, lambda like: integrity.of_array(arr, like))
        return arr

    @property
    def graphs(self) -> RaggedGraphs:
        if self._graphs is None:
            self._graphs = RaggedGraphs(**{k: self._load(k) for k in _ARRAYS})
        return self._graphs

    @property
    def packed_fingerprints(self) -> np.ndarray:
        """[n, n_bits / 8] uint8; a reader of fingerprints alone never loads the graph arrays."""
        if self._graphs is not None:
            return self._graphs.fingerprints
        if self._fingerprints is None:
            self._fingerprints = self._load("fingerprints")
        return self._fingerprints

    @property
    def ids(self) -> list[str]:
        """Compound ids that have a graph, in store order (sorted by Metadata_JCP2022)."""
        return self.index["Metadata_JCP2022"][self._ok].tolist()

    def __len__(self) -> int:
        return int(self._ok.sum())

    def __contains__(self, compound_id: str) -> bool:
        row = self._row.get(compound_id)
        return row is not None and bool(self._ok[row])

    def _ok_row(self, compound_id: str) -> int:
        row = self._row.get(compound_id)
        if row is None:
            raise MissingGraphError(f"compound {compound_id} has no graph in {self.root}: it was not featurised "
                                    f"(not in the compound table the store was built from); run "
                                    f"./launch.sh featurize COMPOUNDS {self.root} with a table that lists it")
        if not self._ok[row]:
            reason = self.index["reason"].iat[row]
            raise MissingGraphError(f"compound {compound_id} has no graph in {self.root}: featurisation failed "
                                    f"with {reason}")
        return row

    def encoded(self, compound_id: str) -> EncodedMol:
        return self.graphs.encoded(self._ok_row(compound_id))

    def get(self, compound_id: str) -> MolGraph:
        """The compound's graph (float32 features, directed edges, reverse of e is e ^ 1)."""
        return decode(self.encoded(compound_id))

    def batch(self, compound_ids: list[str]) -> BatchedGraph:
        return collate_graphs([self.get(c) for c in compound_ids])

    def fingerprint(self, compound_id: str) -> np.ndarray:
        """Morgan bits uint8 [n_bits]."""
        packed = self.packed_fingerprints[self._ok_row(compound_id)]
        return np.unpackbits(packed, count=self.n_bits)

    def fingerprints(self, compound_ids: list[str]) -> np.ndarray:
        """Morgan bits uint8 [len(compound_ids), n_bits], what the fingerprint encoder reads."""
        rows = [self._ok_row(c) for c in compound_ids]
        return np.unpackbits(self.packed_fingerprints[rows], axis=1, count=self.n_bits)

    def __repr__(self) -> str:
        return f"GraphStore({str(self.root)!r}: {len(self)} graphs, {len(self.index) - len(self)} failed)"
