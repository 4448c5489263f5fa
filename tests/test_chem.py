"""Unit tests of micon.chem: standardisation, the documented feature layout, graphs, fingerprints, store."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from rdkit import Chem, DataStructs, RDConfig, rdBase
from rdkit.Chem import AllChem

from micon.chem import featurizer as F
from micon.chem.compound import FeaturizeOptions, Structure, featurize_chunk, featurize_compound
from micon.chem.featurizer import (ATOM_DIM, BOND_DIM, decode, encode, feature_layout, featurize,
                                   morgan_fingerprint)
from micon.chem.graph import collate_graphs
from micon.chem.standardize import MoleculeError, parse_molecule, standardize, standardize_molecule
from micon.chem.store import GraphStore, MissingGraphError, RaggedGraphs, StoreError, write_store


def bundled_smiles() -> list[str]:
    """The ~15k real molecules shipped with RDKit (NCI first 5K + WEHI PAINS test set)."""
    with open(os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")) as fh:
        out = [line.split()[0] for line in fh if line.split()]
    wehi = pd.read_csv(os.path.join(RDConfig.RDDataDir, "Pains", "test_data", "wehi_mols.csv"), header=None)
    return out + wehi[0].astype(str).tolist()


@pytest.fixture(scope="module")
def bundled():
    """(smiles, standardised mol or MoleculeError) for every bundled molecule."""
    out = []
    for s in bundled_smiles():
        try:
            out.append((s, standardize_molecule(s)))
        except MoleculeError as e:
            out.append((s, e))
    return out


def one_hot_blocks(layout: dict) -> list[tuple[int, int]]:
    return [(a, b) for a, b in layout.values() if b - a > 1]


# --------------------------------------------------------------------------- layout

def test_layout_is_contiguous_and_matches_dims_and_docstring():
    layout = feature_layout()
    for kind, dim in (("atom", ATOM_DIM), ("bond", BOND_DIM)):
        ranges = list(layout[kind].values())
        assert ranges[0][0] == 0 and ranges[-1][1] == dim
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), f"{kind} layout has gaps"
    atom = layout["atom"]
    assert atom["atomic_num"] == (0, 22) and atom["mass"] == (ATOM_DIM - 1, ATOM_DIM)
    assert layout["bond"]["bond_type"] == (0, 5) and layout["bond"]["stereo"][1] == BOND_DIM
    # the table in the module docstring is the layout, not a stale copy of it
    assert F.ATOM_LAYOUT.table() in F.__doc__ and F.BOND_LAYOUT.table() in F.__doc__
    assert f"ATOM_DIM = {ATOM_DIM}" in F.__doc__ and f"BOND_DIM = {BOND_DIM}" in F.__doc__
    for f in F.ATOM_LAYOUT.fields + F.BOND_LAYOUT.fields:  # one-hots are vocabulary + "other"
        start, stop = layout["atom" if f in F.ATOM_LAYOUT.fields else "bond"][f.name]
        assert stop - start == (len(f.choices) + 1 if f.kind == F.ONEHOT else 1)


def _slot(graph_row: np.ndarray, field: str, kind="atom") -> int:
    a, b = feature_layout()[kind][field]
    hot = np.flatnonzero(graph_row[a:b])
    assert len(hot) == 1, f"{field} is not one-hot: {graph_row[a:b]}"
    return int(hot[0]), b - a - 1  # slot, index of the "other" slot


@pytest.mark.parametrize("smiles, atom, field", [
    ("[U]", 0, "atomic_num"),              # uranium is not in the element vocabulary
    ("[Fe+3]", 0, "formal_charge"),        # +3 is outside -2..2
    ("FS(F)(F)(F)(F)F", 1, "degree"),      # sulfur with six neighbours
])
def test_unusual_atoms_use_the_other_slot(smiles, atom, field):
    g = featurize(standardize_molecule(smiles))
    slot, other = _slot(g.atom_features[atom], field)
    assert slot == other


def test_common_atoms_and_bond_other_slot():
    g = featurize(standardize_molecule("C/C=C/c1ccccc1"))
    assert _slot(g.atom_features[0], "atomic_num")[0] == 1          # carbon is slot 1 (after B)
    assert g.atom_features[0, feature_layout()["atom"]["mass"][0]] == pytest.approx(0.12011, abs=1e-5)
    stereo = [_slot(row, "stereo", "bond")[0] for row in g.bond_features]
    assert 3 in stereo                                                # STEREOE
    dative = featurize(standardize_molecule("[NH3]->[Cu]"))           # a dative bond type
    slot, other = _slot(dative.bond_features[0], "bond_type", "bond")
    assert slot == other
    hyb = F.ATOM_LAYOUT.fields[5]
    assert hyb.code(int(Chem.HybridizationType.UNSPECIFIED)) == len(hyb.choices)


# --------------------------------------------------------------------------- standardisation

def test_standardize_salt_charge_inchi_tautomer_and_limits():
    acetate = standardize_molecule("CC(=O)[O-].[Na+]")
    assert Chem.MolToSmiles(acetate) == "CC(=O)O"
    ethanol_inchi = standardize_molecule("InChI=1S/C2H6O/c1-2-3/h3H,2H2,1H3")
    assert Chem.MolToSmiles(ethanol_inchi) == "CCO"
    a, b = "Oc1ccccn1", "O=c1cccc[nH]1"
    assert Chem.MolToSmiles(standardize_molecule(a)) != Chem.MolToSmiles(standardize_molecule(b))
    assert (Chem.MolToSmiles(standardize_molecule(a, tautomers=True))
            == Chem.MolToSmiles(standardize_molecule(b, tautomers=True)))
    assert standardize_molecule("C" * 30, max_atoms=30).GetNumHeavyAtoms() == 30
    with pytest.raises(MoleculeError, match="31 heavy atoms.*max_atoms=30"):
        standardize_molecule("C" * 31, max_atoms=30)
    with pytest.raises(MoleculeError, match="empty"):
        standardize_molecule("  ")
    with pytest.raises(MoleculeError, match="no heavy atoms"):
        standardize_molecule("[H][H]")
    with pytest.raises(MoleculeError, match="cannot parse the SMILES 'C1CC\\(': .*syntax error"):
        parse_molecule("C1CC(")
    with pytest.raises(MoleculeError, match="valence"):
        parse_molecule("C(C)(C)(C)(C)C")
    with pytest.raises(MoleculeError, match="not a valid InChI"):
        parse_molecule("InChI=1S/garbage")
    with pytest.raises(MoleculeError, match="no atoms"):
        standardize(Chem.Mol())


def test_rdkit_errors_are_not_printed(capfd):
    for bad in ("C1CC(", "c1cccc1", "InChI=1S/garbage"):
        with pytest.raises(MoleculeError):
            parse_molecule(bad)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --------------------------------------------------------------------------- graphs

def test_single_atom_and_isotopic_hydrogen():
    g = featurize(standardize_molecule("C"))
    assert (g.n_atoms, g.n_edges) == (1, 0)
    assert g.edge_index.shape == (2, 0) and g.bond_features.shape == (0, BOND_DIM)
    d = standardize_molecule("[2H]OC(=O)C")  # deuterium survives RemoveHs: heavy atoms only in the graph
    g = featurize(d)
    assert g.n_atoms == d.GetNumHeavyAtoms() == 4 and g.n_edges == 6
    hs = feature_layout()["atom"]["num_hs"][0]
    assert g.atom_features[:, hs:hs + 6].argmax(1).tolist() == [1, 0, 0, 3]  # O keeps its D as a hydrogen


def check_graph(g, mol):
    n_heavy_bonds = mol.GetNumBonds() if mol.GetNumAtoms() == mol.GetNumHeavyAtoms() else sum(
        1 for b in mol.GetBonds() if b.GetBeginAtom().GetAtomicNum() > 1 and b.GetEndAtom().GetAtomicNum() > 1)
    assert g.n_atoms == mol.GetNumHeavyAtoms()
    assert g.n_edges == 2 * n_heavy_bonds
    assert g.atom_features.shape == (g.n_atoms, ATOM_DIM) and g.bond_features.shape == (g.n_edges, BOND_DIM)
    assert g.atom_features.dtype == np.float32 and g.bond_features.dtype == np.float32


def test_every_bundled_molecule_featurises_or_says_why(bundled):
    graphs, failures = [], []
    for smiles, mol in bundled:
        if isinstance(mol, MoleculeError):
            assert mol.reason and len(mol.reason) > 10, smiles
            failures.append(mol.reason)
            continue
        g = featurize(mol)
        check_graph(g, mol)
        graphs.append(g)
    assert len(bundled) > 14_000 and len(failures) < 0.01 * len(bundled), failures[:5]
    batch = collate_graphs(graphs)
    # every one-hot block has exactly one hot slot per atom and per edge
    for feats, layout in ((batch.atom_features, feature_layout()["atom"]),
                          (batch.bond_features, feature_layout()["bond"])):
        for a, b in one_hot_blocks(layout):
            assert (feats[:, a:b].sum(1) == 1).all()
    # reverse pairing: edge e ^ 1 runs the other way with the same features
    e = np.arange(batch.edge_index.shape[1])
    np.testing.assert_array_equal(batch.edge_index[:, e ^ 1], batch.edge_index[::-1, e])
    np.testing.assert_array_equal(batch.bond_features[e ^ 1], batch.bond_features)
    assert (batch.batch[batch.edge_index[0]] == batch.batch[batch.edge_index[1]]).all()


def test_collate_offsets():
    mols = [standardize_molecule(s) for s in ("CCO", "C", "c1ccccc1N")]
    graphs = [featurize(m) for m in mols]
    b = collate_graphs(graphs)
    assert b.n_molecules == 3 and b.batch.tolist() == [0, 0, 0, 1] + [2] * 7
    np.testing.assert_array_equal(b.edge_index[:, :4], graphs[0].edge_index)
    np.testing.assert_array_equal(b.edge_index[:, 4:], graphs[2].edge_index + 4)
    assert b.atom_features.shape == (11, ATOM_DIM) and b.bond_features.shape == (4 + 14, BOND_DIM)


def test_morgan_fingerprint_matches_rdkit(bundled):
    rng = np.random.default_rng(0)
    mols = [m for _, m in bundled if not isinstance(m, MoleculeError)]
    for i in rng.choice(len(mols), 100, replace=False):
        for radius, n_bits in ((2, 2048), (3, 1024)):
            ours = morgan_fingerprint(mols[i], radius, n_bits)
            with rdBase.BlockLogs():  # the old API logs a deprecation warning
                bv = AllChem.GetMorganFingerprintAsBitVect(mols[i], radius, nBits=n_bits)
            ref = np.zeros(n_bits, np.uint8)
            DataStructs.ConvertToNumpyArray(bv, ref)
            assert ours.dtype == np.uint8 and ours.shape == (n_bits,)
            np.testing.assert_array_equal(ours, ref)


# --------------------------------------------------------------------------- compounds and store

def test_duplicate_rows_same_structure_ok_different_structure_error():
    opts = FeaturizeOptions()
    same = featurize_compound("JCP2022_000001", "K", [Structure(3, "CCO"), Structure(9, "OCC")], opts)
    assert same.status == "ok" and same.encoded.n_atoms == 3
    diff = featurize_compound("JCP2022_000001", "K", [Structure(3, "CCO"), Structure(9, "CCN")], opts)
    assert diff.status == "error" and "row 3" in diff.reason and "row 9" in diff.reason
    assert "different structures" in diff.reason
    fallback = featurize_compound("JCP2022_000002", "K", [Structure(4, "C1CC(", "InChI=1S/CH4/h1H4")], opts)
    assert fallback.status == "ok" and fallback.encoded.n_atoms == 1
    empty = featurize_compound("JCP2022_000003", "K", [Structure(5)], opts)
    assert empty.status == "error" and "both Metadata_SMILES and Metadata_InChI are empty" in empty.reason


def test_ragged_take_and_concat_roundtrip():
    smiles = ["CCO", "C", "c1ccccc1N", "CC(=O)O"]
    encs = [encode(standardize_molecule(s)) for s in smiles]
    fps = [morgan_fingerprint(standardize_molecule(s), 2, 64) for s in smiles]
    whole = RaggedGraphs.from_encoded(encs[:2] + [None] + encs[2:], fps[:2] + [None] + fps[2:], 64)
    parts = RaggedGraphs.concat([RaggedGraphs.from_encoded(encs[:2], fps[:2], 64),
                                 RaggedGraphs.from_encoded([None] + encs[2:], [None] + fps[2:], 64)])
    for k, v in whole.arrays().items():
        np.testing.assert_array_equal(v, getattr(parts, k), err_msg=k)
    rev = whole.take([4, 3, 2, 1, 0])
    for i, j in zip(range(5), [4, 3, 2, 1, 0]):
        a, b = rev.encoded(i), whole.encoded(j)
        for k in ("atom_codes", "atom_scalars", "bond_atoms", "bond_codes"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert whole.encoded(2).n_atoms == 0 and not whole.fingerprints[2].any()


def test_graph_store_reads_what_was_written(tmp_path):
    items = [("JCP2022_000002", "KEY2", [Structure(1, "c1ccccc1O")]),
             ("JCP2022_000001", "KEY1", [Structure(2, "C1CC(")]),
             ("JCP2022_000003", "KEY3", [Structure(3, "C")])]
    opts = FeaturizeOptions(n_bits=128)
    cols, graphs = featurize_chunk(items, opts)
    index = pd.DataFrame(cols).assign(n_atoms=np.diff(graphs.atom_offsets), n_bonds=np.diff(graphs.bond_offsets))
    write_store(tmp_path, index, graphs, radius=2, n_bits=128)
    store = GraphStore(tmp_path / "graphs.zarr")
    assert store.ids == ["JCP2022_000002", "JCP2022_000003"] and len(store) == 2
    assert "JCP2022_000002" in store and "JCP2022_000001" not in store and "nope" not in store
    mol = standardize_molecule("c1ccccc1O")
    ref = featurize(mol)
    got = store.get("JCP2022_000002")
    for k in ("atom_features", "bond_features", "edge_index"):
        np.testing.assert_array_equal(getattr(got, k), getattr(ref, k))
    np.testing.assert_array_equal(store.fingerprint("JCP2022_000002"), morgan_fingerprint(mol, 2, 128))
    assert store.fingerprints(["JCP2022_000003", "JCP2022_000002"]).shape == (2, 128)
    assert store.get("JCP2022_000003").n_edges == 0
    with pytest.raises(MissingGraphError, match="compound JCP2022_000001 has no graph in .*featurisation "
                                                "failed with RDKit cannot parse the SMILES"):
        store.get("JCP2022_000001")
    with pytest.raises(KeyError, match="JCP2022_999998 has no graph .*was not featurised.*launch.sh featurize"):
        store.fingerprint("JCP2022_999998")
    with pytest.raises(StoreError, match="launch.sh featurize"):
        GraphStore(tmp_path / "missing")
    assert decode(store.encoded("JCP2022_000003")).n_atoms == 1


def test_metal_complexes_are_kept_whole_and_flagged():
    from rdkit import Chem

    from micon.chem.standardize import standardize_molecule, structure_flags

    cisplatin = standardize_molecule("N.N.Cl[Pt]Cl")
    assert sorted(a.GetSymbol() for a in cisplatin.GetAtoms()) == ["Cl", "Cl", "N", "N", "Pt"]
    assert structure_flags(cisplatin) == ["metal", "inorganic"]
    gd = standardize_molecule("[Gd+3].[Cl-].[Cl-].[Cl-]")
    assert sorted(a.GetSymbol() for a in gd.GetAtoms()) == ["Cl", "Cl", "Cl", "Gd"]
    ferrocene_like = standardize_molecule("[Fe+2].c1cc[cH-]c1.c1cc[cH-]c1")
    assert "Fe" in {a.GetSymbol() for a in ferrocene_like.GetAtoms()} and structure_flags(ferrocene_like) == ["metal"]
    # counterion metals are still stripped like any salt, with no flag
    acetate = standardize_molecule("CC(=O)[O-].[Na+]")
    assert Chem.MolToSmiles(acetate) == "CC(=O)O" and structure_flags(acetate) == []


def test_layout_codes_are_rdkits_own_values():
    """The layout writes RDKit's integers out (graph readers need no RDKit); they must equal RDKit's."""
    from rdkit import Chem

    from micon.chem import featurizer as f

    pt = Chem.GetPeriodicTable()
    assert f.ELEMENTS == {e: pt.GetAtomicNumber(e) for e in f.ELEMENTS}
    for values, enum in ((f.CHIRAL, Chem.ChiralType), (f.HYBRID, Chem.HybridizationType),
                         (f.BOND_TYPES, Chem.BondType), (f.STEREO, Chem.BondStereo)):
        assert values == {k: int(enum.names[k]) for k in values}
