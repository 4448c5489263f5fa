"""Parse a compound (SMILES or InChI) and standardise it into the molecule we featurise.

Standardisation: largest (organic) fragment, charges neutralised where possible, explicit
hydrogens removed, optional tautomer canonicalisation. Failures raise `MoleculeError` with
RDKit's own reason; nothing is ever printed to stderr. No file or process I/O here.
"""
from __future__ import annotations

import functools
import re

from rdkit import Chem, rdBase
from rdkit.Chem.MolStandardize import rdMolStandardize

DEFAULT_MAX_ATOMS = 200

_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\]\s*")


class MoleculeError(ValueError):
    """A compound that cannot become a graph; `reason` says why in words a chemist can act on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _log_reason(messages: str, fallback: str, text: str = "", limit: int = 300) -> str:
    """RDKit's captured log as one line: timestamps, echoes of the input, caret drawings,
    RDKit's "Failed parsing" summary and repeats dropped."""
    lines = []
    for raw in messages.splitlines():
        line = _TIMESTAMP.sub("", raw).strip().rstrip(":")
        if (not line or set(line) <= {"~", "^", " "} or line == "ERROR" or line == text or line in lines
                or line.startswith("SMILES Parse Error: Failed parsing SMILES")):
            continue
        if lines and line.startswith("SMILES Parse Error: "):
            line = line[len("SMILES Parse Error: "):]
        lines.append(line)
    reason = "; ".join(lines) or fallback
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def parse_molecule(text: str) -> Chem.Mol:
    """SMILES, or InChI when the text starts with "InChI=", -> sanitised RDKit molecule."""
    text = (text or "").strip()
    if not text:
        raise MoleculeError("no structure: the SMILES/InChI text is empty")
    is_inchi = text.startswith("InChI=")
    with rdBase.BlockLogs(), rdBase.CaptureErrorLog() as log:
        mol = Chem.MolFromInchi(text) if is_inchi else Chem.MolFromSmiles(text)
    if mol is None:
        kind = "InChI" if is_inchi else "SMILES"
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise MoleculeError(f"RDKit cannot parse the {kind} {shown!r}: "
                            + _log_reason(log.messages, f"not a valid {kind}", text))
    return mol


@functools.lru_cache(maxsize=None)
def _standardisers():
    # Built once per process: constructing them parses RDKit's default rule sets.
    return rdMolStandardize.LargestFragmentChooser(preferOrganic=True), rdMolStandardize.Uncharger()


@functools.lru_cache(maxsize=None)
def _tautomer_enumerator():
    return rdMolStandardize.TautomerEnumerator()


# Counterion metals (alkali and alkaline earth) are stripped like any salt; any other metal makes the
# structure a coordination compound or an inorganic salt that is kept whole (cisplatin written as
# "N.N.Cl[Pt]Cl" is one compound, not ammonia; "[Gd+3].[Cl-].[Cl-].[Cl-]" is not gadolinium alone).
COUNTERION_METALS = {3, 4, 11, 12, 19, 20, 37, 38, 55, 56}
_NON_METALS = {1, 2, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17, 18, 33, 34, 35, 36, 52, 53, 54, 85, 86}


def metal_atoms(mol: Chem.Mol) -> set[str]:
    """Symbols of the metals in `mol` other than counterion metals."""
    return {a.GetSymbol() for a in mol.GetAtoms()
            if a.GetAtomicNum() not in _NON_METALS and a.GetAtomicNum() not in COUNTERION_METALS}


def structure_flags(mol: Chem.Mol) -> list[str]:
    """Flags a user may want to filter on: "metal" (a non-counterion metal), "inorganic" (no carbon)."""
    flags = []
    if metal_atoms(mol):
        flags.append("metal")
    if not any(a.GetAtomicNum() == 6 for a in mol.GetAtoms()):
        flags.append("inorganic")
    return flags


def standardize(mol: Chem.Mol, *, tautomers: bool = False, max_atoms: int = DEFAULT_MAX_ATOMS) -> Chem.Mol:
    """Largest fragment (all fragments of a structure with a non-counterion metal) -> neutralised ->
    (canonical tautomer) -> explicit Hs removed.

    Raises MoleculeError when nothing with a heavy atom is left or it has more than
    `max_atoms` heavy atoms (polymers, peptides: too large for the molecule encoder's budget).
    """
    if mol is None or mol.GetNumAtoms() == 0:
        raise MoleculeError("empty molecule: the structure has no atoms")
    chooser, uncharger = _standardisers()
    with rdBase.BlockLogs(), rdBase.CaptureErrorLog() as log:
        try:
            # The chooser and RemoveHs copy the molecule; skipping them when they would change
            # nothing saves ~25% of the per-molecule cost.
            keep_whole = bool(metal_atoms(mol))
            out = chooser.choose(mol) if len(Chem.GetMolFrags(mol)) > 1 and not keep_whole else mol
            out = uncharger.uncharge(out)
            if tautomers:
                out = _tautomer_enumerator().Canonicalize(out)
            if out.GetNumAtoms() != out.GetNumHeavyAtoms():
                out = Chem.RemoveHs(out)
        except Exception as e:  # RDKit raises its own exception types (e.g. AtomValenceException)
            raise MoleculeError("standardisation failed: " + _log_reason(log.messages, str(e) or type(e).__name__)) from None
    n_heavy = out.GetNumHeavyAtoms()
    if n_heavy == 0:
        raise MoleculeError("empty molecule: no heavy atoms left after standardisation")
    if n_heavy > max_atoms:
        raise MoleculeError(f"too large: {n_heavy} heavy atoms in the kept fragment(s), more than "
                            f"max_atoms={max_atoms} (raise max_atoms to keep it)")
    return out


def standardize_molecule(text: str, *, tautomers: bool = False, max_atoms: int = DEFAULT_MAX_ATOMS) -> Chem.Mol:
    """`parse_molecule` then `standardize`."""
    return standardize(parse_molecule(text), tautomers=tautomers, max_atoms=max_atoms)


def standard_inchikey(mol: Chem.Mol) -> str:
    """InChIKey of a (standardised) molecule, used to tell whether two rows are the same compound."""
    with rdBase.BlockLogs(), rdBase.CaptureErrorLog():
        key = Chem.MolToInchiKey(mol)
    # InChI cannot represent a few exotic structures; fall back to canonical SMILES so the
    # comparison still means "same structure".
    return key or "SMILES:" + Chem.MolToSmiles(mol)
