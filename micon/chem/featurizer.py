"""Standardised RDKit molecule -> MolGraph (heavy atoms, directed bonds) and Morgan fingerprints.

Chemprop-v2-like featurisers with a fixed, documented layout (below; `feature_layout()` returns
the same offsets). Every one-hot ends with an "other" slot, so unusual elements, charges or
stereo tags still get a feature. Pure functions: no I/O, no standardisation (see standardize.py).

A molecule is first *encoded* as small integer codes (one per one-hot or flag field) plus
float scalars; `decode` expands codes to the float32 feature matrices. The graph store keeps
the codes (about 12 bytes per atom instead of 220), so the whole JUMP compound set fits in memory.

Atom features (ATOM_DIM = 55):

| offset | width | feature | values (last slot = other) |
|---|---|---|---|
| 0 | 22 | atomic_num | B C N O F Si P S Cl As Se Br Sn Te I Fe Co Cu Zn Pt Hg other |
| 22 | 7 | degree | 0 1 2 3 4 5 other |
| 29 | 6 | formal_charge | -2 -1 0 1 2 other |
| 35 | 4 | chiral_tag | CHI_UNSPECIFIED CHI_TETRAHEDRAL_CW CHI_TETRAHEDRAL_CCW other |
| 39 | 6 | num_hs | 0 1 2 3 4 other |
| 45 | 8 | hybridization | S SP SP2 SP2D SP3 SP3D SP3D2 other |
| 53 | 1 | aromatic | 0/1 |
| 54 | 1 | mass | atomic mass / 100 |

Bond features (BOND_DIM = 14):

| offset | width | feature | values (last slot = other) |
|---|---|---|---|
| 0 | 5 | bond_type | SINGLE DOUBLE TRIPLE AROMATIC other |
| 5 | 1 | conjugated | 0/1 |
| 6 | 1 | in_ring | 0/1 |
| 7 | 7 | stereo | STEREONONE STEREOANY STEREOZ STEREOE STEREOCIS STEREOTRANS other |

`degree` counts heavy-atom neighbours (the graph's own degree); `num_hs` counts all hydrogens,
implicit and explicit. Bond i of the molecule becomes edges 2i (begin -> end) and 2i+1 (end -> begin),
both with the bond's features, so the reverse of edge e is e ^ 1.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from micon.chem.graph import MolGraph

if TYPE_CHECKING:
    from rdkit import Chem

ONEHOT, FLAG, SCALAR = "onehot", "flag", "scalar"


@dataclass(frozen=True)
class Field:
    """One block of the feature vector. A one-hot of k choices is k + 1 wide (the last is "other")."""

    name: str
    kind: str
    choices: tuple = ()
    labels: tuple = ()

    @property
    def width(self) -> int:
        return len(self.choices) + 1 if self.kind == ONEHOT else 1

    @functools.cached_property
    def lookup(self) -> dict:
        return {c: i for i, c in enumerate(self.choices)}

    def code(self, value) -> int:
        """Slot of `value` inside this one-hot (the "other" slot when not in the vocabulary)."""
        return self.lookup.get(value, len(self.choices))

    def describe(self) -> str:
        if self.kind == ONEHOT:
            return " ".join(map(str, self.labels or self.choices)) + " other"
        return "0/1" if self.kind == FLAG else (self.labels[0] if self.labels else "float")


class Layout:
    """An ordered list of fields: offsets, total width, and the codes -> features expansion."""

    def __init__(self, fields: tuple[Field, ...]):
        self.fields = fields
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for f in fields:
            self.offsets[f.name] = (start, start + f.width)
            start += f.width
        self.dim = start
        self.coded = tuple(f for f in fields if f.kind in (ONEHOT, FLAG))
        self.scalars = tuple(f for f in fields if f.kind == SCALAR)
        self._onehot_cols = np.array([self.offsets[f.name][0] for f in self.coded if f.kind == ONEHOT], np.int64)
        self._onehot_idx = np.array([j for j, f in enumerate(self.coded) if f.kind == ONEHOT], np.int64)
        self._flag_cols = np.array([self.offsets[f.name][0] for f in self.coded if f.kind == FLAG], np.int64)
        self._flag_idx = np.array([j for j, f in enumerate(self.coded) if f.kind == FLAG], np.int64)
        self._scalar_cols = np.array([self.offsets[f.name][0] for f in self.scalars], np.int64)

    def expand(self, codes: np.ndarray, scalars: np.ndarray | None = None) -> np.ndarray:
        """codes [n, len(coded)] (slot index per one-hot, 0/1 per flag), scalars [n, len(scalars)]
        -> float32 features [n, dim]."""
        n = codes.shape[0]
        out = np.zeros((n, self.dim), np.float32)
        if n == 0:
            return out
        codes = np.asarray(codes, np.int64)
        rows = np.arange(n)[:, None]
        out[rows, codes[:, self._onehot_idx] + self._onehot_cols] = 1.0
        out[:, self._flag_cols] = codes[:, self._flag_idx]
        if len(self.scalars):
            out[:, self._scalar_cols] = scalars
        return out

    def table(self) -> str:
        """The markdown table of this layout (the module docstring carries a copy of it)."""
        lines = ["| offset | width | feature | values (last slot = other) |", "|---|---|---|---|"]
        for f in self.fields:
            lines.append(f"| {self.offsets[f.name][0]} | {f.width} | {f.name} | {f.describe()} |")
        return "\n".join(lines)


# RDKit's own integer values (atomic numbers; the ChiralType, HybridizationType, BondType and BondStereo
# enums), written out so that reading graphs (training, embedding) does not need RDKit;
# tests/test_chem.py checks each against RDKit.
ELEMENTS = {"B": 5, "C": 6, "N": 7, "O": 8, "F": 9, "Si": 14, "P": 15, "S": 16, "Cl": 17, "As": 33, "Se": 34,
            "Br": 35, "Sn": 50, "Te": 52, "I": 53, "Fe": 26, "Co": 27, "Cu": 29, "Zn": 30, "Pt": 78, "Hg": 80}
CHIRAL = {"CHI_UNSPECIFIED": 0, "CHI_TETRAHEDRAL_CW": 1, "CHI_TETRAHEDRAL_CCW": 2}
HYBRID = {"S": 1, "SP": 2, "SP2": 3, "SP2D": 5, "SP3": 4, "SP3D": 6, "SP3D2": 7}
BOND_TYPES = {"SINGLE": 1, "DOUBLE": 2, "TRIPLE": 3, "AROMATIC": 12}
STEREO = {"STEREONONE": 0, "STEREOANY": 1, "STEREOZ": 2, "STEREOE": 3, "STEREOCIS": 4, "STEREOTRANS": 5}


def _onehot(name: str, values: dict) -> Field:
    return Field(name, ONEHOT, tuple(values.values()), tuple(values))


ATOM_LAYOUT = Layout((
    _onehot("atomic_num", ELEMENTS),
    Field("degree", ONEHOT, (0, 1, 2, 3, 4, 5)),
    Field("formal_charge", ONEHOT, (-2, -1, 0, 1, 2)),
    _onehot("chiral_tag", CHIRAL),
    Field("num_hs", ONEHOT, (0, 1, 2, 3, 4)),
    _onehot("hybridization", HYBRID),
    Field("aromatic", FLAG),
    Field("mass", SCALAR, labels=("atomic mass / 100",)),
))
BOND_LAYOUT = Layout((
    _onehot("bond_type", BOND_TYPES),
    Field("conjugated", FLAG),
    Field("in_ring", FLAG),
    _onehot("stereo", STEREO),
))
ATOM_DIM = ATOM_LAYOUT.dim
BOND_DIM = BOND_LAYOUT.dim
N_ATOM_CODES = len(ATOM_LAYOUT.coded)
N_BOND_CODES = len(BOND_LAYOUT.coded)


def feature_layout() -> dict[str, dict[str, tuple[int, int]]]:
    """{"atom": {feature: (start, stop)}, "bond": {...}}: column ranges in the feature matrices."""
    return {"atom": dict(ATOM_LAYOUT.offsets), "bond": dict(BOND_LAYOUT.offsets)}


@dataclass
class EncodedMol:
    """Compact form of a MolGraph: per-atom codes + mass, one row per (undirected) bond."""

    atom_codes: np.ndarray    # [n_atoms, N_ATOM_CODES] uint8
    atom_scalars: np.ndarray  # [n_atoms, 1] float32 (mass / 100)
    bond_atoms: np.ndarray    # [n_bonds, 2] int32, local heavy-atom indices (begin, end)
    bond_codes: np.ndarray    # [n_bonds, N_BOND_CODES] uint8

    @property
    def n_atoms(self) -> int:
        return int(self.atom_codes.shape[0])

    @property
    def n_bonds(self) -> int:
        return int(self.bond_atoms.shape[0])


def _getters(fields: tuple[Field, ...]) -> list:
    """(dict.get, other slot) per one-hot field: the hot loop calls these directly (no method lookup)."""
    return [(f.lookup.get, len(f.choices)) for f in fields if f.kind == ONEHOT]


_ATOM_GETTERS = _getters(ATOM_LAYOUT.fields)
_BOND_GETTERS = _getters(BOND_LAYOUT.fields)


def encode(mol: Chem.Mol) -> EncodedMol:
    """Heavy atoms and the bonds between them as codes (hydrogens only count in num_hs)."""
    get_atom = mol.GetAtomWithIdx  # indexed access is ~1.5x faster than iterating mol.GetAtoms()
    atoms = [get_atom(i) for i in range(mol.GetNumAtoms())]
    local = None
    if len(atoms) != mol.GetNumHeavyAtoms():  # explicit H survived standardisation (isotopes, H2)
        heavy = [a.GetIdx() for a in atoms if a.GetAtomicNum() > 1]
        local = {idx: i for i, idx in enumerate(heavy)}
        atoms = [atoms[i] for i in heavy]
        degree = [sum(1 for nb in a.GetNeighbors() if nb.GetAtomicNum() > 1) for a in atoms]
    else:
        degree = [a.GetDegree() for a in atoms]
    (num, num_o), (deg, deg_o), (chg, chg_o), (chi, chi_o), (nhs, nhs_o), (hyb, hyb_o) = _ATOM_GETTERS
    codes = [(num(a.GetAtomicNum(), num_o), deg(d, deg_o), chg(a.GetFormalCharge(), chg_o),
              chi(int(a.GetChiralTag()), chi_o), nhs(a.GetTotalNumHs(includeNeighbors=True), nhs_o),
              hyb(int(a.GetHybridization()), hyb_o), a.GetIsAromatic())
             for a, d in zip(atoms, degree)]
    mass = [a.GetMass() for a in atoms]

    (btype, btype_o), (stereo, stereo_o) = _BOND_GETTERS
    pairs, bcodes = [], []
    for b in mol.GetBonds():
        u, v = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        if local is not None:
            if u not in local or v not in local:
                continue
            u, v = local[u], local[v]
        pairs.append((u, v))
        bcodes.append((btype(int(b.GetBondType()), btype_o), b.GetIsConjugated(), b.IsInRing(),
                       stereo(int(b.GetStereo()), stereo_o)))
    return EncodedMol(
        atom_codes=np.array(codes, np.uint8).reshape(-1, N_ATOM_CODES),
        atom_scalars=(np.array(mass, np.float64) / 100.0).astype(np.float32).reshape(-1, 1),
        bond_atoms=np.array(pairs, np.int32).reshape(-1, 2),
        bond_codes=np.array(bcodes, np.uint8).reshape(-1, N_BOND_CODES),
    )


def decode(enc: EncodedMol) -> MolGraph:
    """Codes -> float32 MolGraph; bond i -> edges 2i (u->v) and 2i+1 (v->u)."""
    bond_feats = BOND_LAYOUT.expand(enc.bond_codes)
    edge_index = np.empty((2, 2 * enc.n_bonds), np.int64)
    edge_index[0, 0::2] = enc.bond_atoms[:, 0]
    edge_index[1, 0::2] = enc.bond_atoms[:, 1]
    edge_index[0, 1::2] = enc.bond_atoms[:, 1]
    edge_index[1, 1::2] = enc.bond_atoms[:, 0]
    return MolGraph(atom_features=ATOM_LAYOUT.expand(enc.atom_codes, enc.atom_scalars),
                    bond_features=np.repeat(bond_feats, 2, axis=0),
                    edge_index=edge_index)


def featurize(mol: Chem.Mol) -> MolGraph:
    """Standardised molecule -> MolGraph with n_atoms == mol.GetNumHeavyAtoms(), 2 edges per bond."""
    return decode(encode(mol))


@functools.lru_cache(maxsize=8)
def _morgan_generator(radius: int, n_bits: int):
    from rdkit.Chem import rdFingerprintGenerator
    return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)


def morgan_fingerprint(mol: Chem.Mol, radius: int = 2, n_bits: int = 2048) -> np.ndarray:
    """Morgan (ECFP-like, radius 2 = ECFP4) bit vector as uint8 [n_bits] of 0/1."""
    return _morgan_generator(radius, n_bits).GetFingerprintAsNumPy(mol).astype(np.uint8, copy=False)
