"""The synthetic screen: JUMP layout, determinism, and that its biology and batch effects are real."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import tifffile
from rdkit import Chem

from micon import schema
from micon.config import ConfigError
from micon.synth import PRESETS, bundled_smiles, resolve_config
from tests.conftest import run_job
from tests.synth_features import load_data_frames, well_features


def tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_metadata_tables_follow_cpg0016(tiny_screen):
    plate = pd.read_csv(tiny_screen / "metadata" / "plate.csv.gz")
    well = pd.read_csv(tiny_screen / "metadata" / "well.csv.gz")
    compound = pd.read_csv(tiny_screen / "metadata" / "compound.csv.gz")
    assert list(plate.columns) == [schema.SOURCE, schema.BATCH, schema.PLATE, schema.PLATE_TYPE]
    assert list(well.columns) == [schema.SOURCE, schema.PLATE, schema.WELL, schema.JCP]
    assert list(compound.columns) == [schema.JCP, schema.INCHIKEY, schema.INCHI, schema.SMILES]
    cfg = PRESETS["tiny"]
    assert len(plate) == cfg["n_sources"] * cfg["batches_per_source"] * cfg["plates_per_batch"]
    # 384-well names, unique per plate
    rows_cols = well.Metadata_Well.map(schema.parse_well)
    assert rows_cols.map(lambda rc: 0 <= rc[0] < 16 and 0 <= rc[1] < 24).all()
    assert not well.duplicated([schema.PLATE, schema.WELL]).any()
    # DMSO on every plate, positive controls present, every treated compound replicated across sources
    assert (well[well.Metadata_JCP2022 == schema.DMSO].groupby(schema.PLATE).size() == cfg["dmso_wells"]).all()
    assert well.Metadata_JCP2022.isin(schema.POSITIVE_CONTROLS.values()).any()
    treated = well[~well.Metadata_JCP2022.isin([schema.DMSO, *schema.POSITIVE_CONTROLS.values()])]
    assert (treated.groupby(schema.JCP).size() == cfg["replicates"]).all()
    assert (treated.groupby(schema.JCP)[schema.SOURCE].nunique() == cfg["n_sources"]).all()
    # real molecules from RDKit's bundled sets, with consistent InChI / InChIKey
    bundled = {Chem.CanonSmiles(s) for s in bundled_smiles() if Chem.MolFromSmiles(s) is not None}
    for _, r in compound.iterrows():
        mol = Chem.MolFromSmiles(r.Metadata_SMILES)
        assert Chem.MolToInchiKey(mol) == r.Metadata_InChIKey
        if r.Metadata_JCP2022.startswith("JCP2022_") and r.Metadata_JCP2022 not in (
                schema.DMSO, *schema.POSITIVE_CONTROLS.values()):
            assert Chem.CanonSmiles(r.Metadata_SMILES) in bundled
    assert compound.set_index(schema.JCP).loc[schema.DMSO, schema.SMILES] == "CS(C)=O"


def test_load_data_and_tiffs(tiny_screen):
    ld = load_data_frames(tiny_screen)
    well = pd.read_csv(tiny_screen / "metadata" / "well.csv.gz")
    assert len(ld) == len(well) * PRESETS["tiny"]["sites_per_well"]
    for ch in schema.CHANNELS:
        assert f"FileName_Orig{ch}" in ld and f"PathName_Orig{ch}" in ld
    r = ld.iloc[0]
    im = tifffile.imread(tiny_screen / r.PathName_OrigDNA / r.FileName_OrigDNA)
    assert im.dtype == np.uint16 and im.shape == (64, 64)
    # Phenix names; the channel numbering is not the canonical order in any source
    assert r.FileName_OrigDNA.startswith("r") and r.FileName_OrigDNA.endswith("sk1fk1fl1.tiff")
    for _, g in ld.groupby(schema.SOURCE):
        numbers = [int(g.iloc[0][f"FileName_Orig{ch}"].split("-ch")[1][0]) for ch in schema.CHANNELS]
        assert sorted(numbers) == [1, 2, 3, 4, 5] and numbers != [1, 2, 3, 4, 5]
    # the parquet twin is all strings (as in cpg0016) and names the illumination functions
    pq = sorted(tiny_screen.glob("*/workspace/load_data_csv/*/*/load_data_with_illum.parquet"))
    assert len(pq) == 4
    df = pd.read_parquet(pq[0])
    assert all(pd.api.types.is_string_dtype(df[c]) or df[c].dtype == object for c in df.columns)
    assert df.Metadata_Site.iloc[0] == "1"
    illum = np.load(tiny_screen / df.PathName_IllumDNA.iloc[0] / df.FileName_IllumDNA.iloc[0])
    assert illum.shape == (64, 64) and abs(illum.mean() - 1) < 1e-3
    # every referenced file exists
    for ch in schema.CHANNELS:
        assert all((tiny_screen / p / f).is_file() for p, f in zip(ld[f"PathName_Orig{ch}"], ld[f"FileName_Orig{ch}"]))


def test_same_seed_same_bytes_any_worker_count(tiny_screen, tmp_path):
    run_job("data_prep.synth", tmp_path / "again", "preset=tiny", "seed=0", "workers=1")
    assert tree_digest(tmp_path / "again") == tree_digest(tiny_screen)
    run_job("data_prep.synth", tmp_path / "other", "preset=tiny", "seed=1", "workers=1")
    assert tree_digest(tmp_path / "other") != tree_digest(tiny_screen)


def _plate_normalised(meta, x):
    """Centre each plate on its DMSO median, scale by the DMSO spread (naive per-plate correction)."""
    neg = (meta.Metadata_JCP2022 == schema.DMSO).to_numpy()
    z = x.copy()
    for plate in meta.Metadata_Plate.unique():
        m = (meta.Metadata_Plate == plate).to_numpy()
        z[m] -= np.median(x[m & neg], axis=0)
    return z / z[neg].std(axis=0), neg


def test_active_compounds_replicate_and_inactive_do_not(tiny_screen):
    """Replicate wells of an active compound (on different plates) are closer to each other than to
    the DMSO wells of their own plates; for inactive compounds the two distances are alike."""
    meta, x = well_features(tiny_screen)
    truth = pd.read_csv(tiny_screen / "ground_truth" / "compounds.csv")
    meta = meta.merge(truth[[schema.JCP, "activity", "role"]], on=schema.JCP)
    z, neg = _plate_normalised(meta, x)

    def ratio(idx):
        rep = np.mean([np.linalg.norm(z[i] - z[j]) for i in idx for j in idx if i < j])
        to_dmso = np.mean([np.linalg.norm(z[neg & (meta.Metadata_Plate == meta.Metadata_Plate[i]).to_numpy()] - z[i],
                                          axis=1).mean() for i in idx])
        return rep / to_dmso

    ratios = {jcp: (g.activity.iloc[0], ratio(g.index.to_numpy()))
              for jcp, g in meta[meta.role != schema.NEGCON].groupby(schema.JCP)}
    strong = [r for a, r in ratios.values() if a == "strong"]
    inactive = [r for a, r in ratios.values() if a == "inactive"]
    assert len(strong) >= 2 and len(inactive) >= 3
    assert max(strong) < 0.6, ratios
    assert min(inactive) > 0.7 and np.mean(inactive) > 0.9, ratios


def test_wells_cluster_by_source_before_correction(tiny_screen):
    meta, x = well_features(tiny_screen)
    treated = (meta.Metadata_JCP2022 != schema.DMSO).to_numpy()
    src, cpd = meta.Metadata_Source.to_numpy(), meta.Metadata_JCP2022.to_numpy()
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    i, j = np.triu_indices(len(x), 1)
    keep = treated[i] & treated[j]
    same_source_other_cpd = d[i, j][keep & (src[i] == src[j]) & (cpd[i] != cpd[j])]
    same_cpd_other_source = d[i, j][keep & (src[i] != src[j]) & (cpd[i] == cpd[j])]
    assert same_source_other_cpd.mean() < 0.8 * same_cpd_other_source.mean()


@pytest.mark.parametrize("args, message", [
    (["preset=huge"], "unknown preset 'huge'; choose one of tiny, demo, small, jump"),
    (["n_compund=3"], "unknown key n_compund (did you mean n_compounds?)"),
    (["n_compounds=5000"], "layout does not fit"),
    (["replicates=9"], "replicates=9 but only 4 plates"),
    (["seed=abc"], "seed='abc': expected int"),
    (["image_size"], "is not key=value"),
])
def test_bad_arguments_give_one_clear_line(tmp_path, args, message):
    proc = run_job("data_prep.synth", tmp_path / "x", *args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


def test_presets_resolve_and_fit():
    for name in PRESETS:
        cfg = resolve_config([f"preset={name}"])
        assert cfg.preset == name and cfg.n_plates >= cfg.replicates
    with pytest.raises(ConfigError):
        resolve_config(["preset=tiny", "wells_per_plate=100"])


def test_fixed_layouts_keep_each_compound_at_one_position_per_map():
    """layout=fixed: plates share n_layouts maps (Target-2 plates share one): within a map every compound and the
    controls sit at the same wells on every plate, the maps differ, and the metadata still follows cpg0016."""
    from micon.synth import make_compounds, make_layout, make_plates

    cfg = resolve_config(["preset=calibrated_small", "layout=fixed", "n_layouts=2"])
    rng = np.random.default_rng(0)
    compounds, _ = make_compounds(cfg, rng)
    plates = make_plates(cfg)
    wells = make_layout(cfg, plates, compounds, rng)
    assert not wells.duplicated([schema.PLATE, schema.WELL]).any()
    plate_map = {p: i % 2 for i, p in enumerate(plates[schema.PLATE])}
    wells["map"] = wells[schema.PLATE].map(plate_map)
    treated = wells[~wells[schema.JCP].isin([schema.DMSO, *schema.POSITIVE_CONTROLS.values()])]
    per_map = treated.groupby(["map", schema.JCP])[schema.WELL].nunique()
    assert (per_map == 1).all()                                      # one position per compound per map
    positions = treated.groupby(["map", schema.JCP])[schema.WELL].first().unstack(0)
    assert (positions[0] != positions[1]).mean() > 0.9              # the maps differ
    dmso = wells[wells[schema.JCP] == schema.DMSO].groupby("map")[schema.WELL].apply(frozenset)
    assert wells[wells[schema.JCP] == schema.DMSO].groupby(schema.PLATE)[schema.WELL].apply(frozenset).map(
        lambda s: s in set(dmso)).all()
    # every plate of the random layout has its own positions (the default is unchanged)
    rand = make_layout(resolve_config(["preset=calibrated_small"]), plates, compounds, np.random.default_rng(0))
    assert (rand[~rand[schema.JCP].isin([schema.DMSO])].groupby(schema.JCP)[schema.WELL].nunique() > 1).mean() > 0.9
    with pytest.raises(ConfigError, match="layout=fixed gives every compound its own well position"):
        resolve_config(["preset=calibrated_small", "layout=fixed", "n_compounds=380"])
