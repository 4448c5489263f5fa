"""One compound of a JUMP compound table -> encoded graph + fingerprint, or a reason it has none.

Holds the rules the featurisation job applies per compound: SMILES first, InChI when the SMILES is
missing or unparseable; rows sharing a Metadata_JCP2022 must standardise to one structure
(same standardised InChIKey). Pure: takes strings, returns arrays; the job does the I/O and Ray.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from micon.chem.featurizer import EncodedMol, encode, morgan_fingerprint
from micon.chem.standardize import (DEFAULT_MAX_ATOMS, MoleculeError, parse_molecule, standard_inchikey,
                                    standardize, structure_flags)
from micon.chem.store import ERROR, OK, RaggedGraphs


@dataclass(frozen=True)
class FeaturizeOptions:
    radius: int = 2
    n_bits: int = 2048
    tautomers: bool = False
    max_atoms: int = DEFAULT_MAX_ATOMS

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Structure:
    """One input row's structure: `row` is its 1-based data row in the compound table."""

    row: int
    smiles: str = ""
    inchi: str = ""

    def describe(self) -> str:
        text = f"SMILES {self.smiles!r}" if self.smiles else f"InChI {self.inchi!r}" if self.inchi else "no structure"
        return f"row {self.row} ({text[:90]})"


@dataclass
class CompoundResult:
    compound_id: str
    inchikey: str
    status: str
    reason: str
    encoded: EncodedMol | None = None
    fingerprint: np.ndarray | None = None
    flags: str = ""            # "metal", "inorganic" (comma-separated): featurised, but worth a look


def standardized_mol(structure: Structure, opts: FeaturizeOptions):
    """The standardised RDKit molecule of a row; raises MoleculeError with the reason."""
    smiles, inchi = structure.smiles.strip(), structure.inchi.strip()
    if not smiles and not inchi:
        raise MoleculeError("no structure: both Metadata_SMILES and Metadata_InChI are empty")
    try:
        mol = parse_molecule(smiles or inchi)
    except MoleculeError as first:
        if not (smiles and inchi):
            raise
        try:  # the SMILES is broken but the row also has an InChI: use it
            mol = parse_molecule(inchi)
        except MoleculeError as second:
            raise MoleculeError(f"{first.reason}; the InChI fails too: {second.reason}") from None
    return standardize(mol, tautomers=opts.tautomers, max_atoms=opts.max_atoms)


def featurize_compound(compound_id: str, inchikey: str, structures: list[Structure],
                       opts: FeaturizeOptions) -> CompoundResult:
    """Featurise a compound from its distinct input structures (usually one)."""
    outcomes = []
    for s in structures:
        try:
            outcomes.append((s, standardized_mol(s, opts), None))
        except MoleculeError as e:
            outcomes.append((s, None, e.reason))
        except Exception as e:  # an RDKit bug on one molecule must not take the whole chunk down
            outcomes.append((s, None, f"unexpected RDKit error {type(e).__name__}: {e}"))
    if len(outcomes) > 1:
        keys = [standard_inchikey(m) if m is not None else None for _, m, _ in outcomes]
        if None in keys or len(set(keys)) > 1:
            rows = "; ".join(f"{s.describe()} -> " + (f"InChIKey {k}" if k else f"failed: {r}")
                             for (s, _, r), k in zip(outcomes, keys))
            return CompoundResult(compound_id, inchikey, ERROR,
                                  f"duplicate Metadata_JCP2022 with different structures: {rows}; "
                                  f"fix the compound table so each id has one structure")
    _, mol, reason = outcomes[0]
    if mol is None:
        return CompoundResult(compound_id, inchikey, ERROR, reason)
    return CompoundResult(compound_id, inchikey, OK, "", encode(mol),
                          morgan_fingerprint(mol, opts.radius, opts.n_bits), ",".join(structure_flags(mol)))


def featurize_chunk(items: list[tuple[str, str, list[Structure]]], opts: FeaturizeOptions
                    ) -> tuple[dict[str, np.ndarray], RaggedGraphs]:
    """(compound_id, inchikey, structures) items -> index columns and their graphs, in item order."""
    results = [featurize_compound(cid, key, structs, opts) for cid, key, structs in items]
    columns = {
        "Metadata_JCP2022": np.array([r.compound_id for r in results], dtype=str),
        "Metadata_InChIKey": np.array([r.inchikey for r in results], dtype=str),
        "status": np.array([r.status for r in results], dtype=str),
        "reason": np.array([r.reason for r in results], dtype=str),
        "flags": np.array([r.flags for r in results], dtype=str),
    }
    graphs = RaggedGraphs.from_encoded([r.encoded for r in results], [r.fingerprint for r in results], opts.n_bits)
    return columns, graphs
