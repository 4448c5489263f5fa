"""The profiles `evaluate` writes are read by the field's own tools with no renaming: pycytominer infers
the CellProfiler-named features and the JUMP metadata, normalises against `Metadata_pert_type == 'negcon'`
and selects features; copairs scores the normalised file to metrics.json's mAP; and our raw -> normalised
step equals pycytominer's (per-plate mad_robustize, then ZCA-cor fitted on DMSO) on random data."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from micon import schema
from micon.embeddings import EmbeddingError, read_feature_names, write_consolidated

pycytominer = pytest.importorskip("pycytominer")
copairs_map = pytest.importorskip("copairs.map")
from pycytominer.cyto_utils import infer_cp_features  # noqa: E402

PERT = "Metadata_pert_type"
NAMES = [f"{compartment}_{measure}" for compartment in ("Nuclei", "Cells", "Cytoplasm")
         for measure in ("AreaShape_Area", "AreaShape_Eccentricity", "Intensity_MeanIntensity_DNA",
                         "Intensity_MeanIntensity_AGP", "Texture_Contrast_ER_3_00_256", "Granularity_1_Mito",
                         "RadialDistribution_FracAtD_RNA_1of4", "Correlation_Correlation_DNA_ER")]
CONSTANT = {"Cells_AreaShape_Eccentricity", "Cytoplasm_Granularity_1_Mito"}    # dropped by feature selection


def cp_embedding(path, seed=0, n_cpd=16, dmso=8, sites=2, names=NAMES):
    """A CellProfiler-style site table: 2 sources x 2 batches x 1 plate, every compound once per plate,
    half the compounds shifted, per-plate offsets and scales (what MAD removes), `feature_names` in embed.json."""
    rng = np.random.default_rng(seed)
    d = len(names)
    dirs = rng.normal(size=(n_cpd, d))
    rows, feats = [], []
    for p in range(4):
        src, batch, plate = f"source_{p // 2 + 1}", f"batch_{p}", f"PLATE{p}"
        offset, scale = rng.normal(size=d) * 3, rng.uniform(0.5, 2.0, d)
        wells = [schema.DMSO] * dmso + [schema.POSITIVE_CONTROLS["quinidine"]] * 2 + [f"JCP2022_{c:06d}" for c in range(n_cpd)]
        for w, jcp in enumerate(wells):
            c = int(jcp[-6:]) if jcp.startswith("JCP2022_0000") else -1
            shift = 2.0 * dirs[c] / np.linalg.norm(dirs[c]) if 0 <= c < n_cpd // 2 else 0.0
            for s in range(sites):
                rows.append({schema.SOURCE: src, schema.BATCH: batch, schema.PLATE: plate,
                             schema.WELL: schema.well_name(w // 24, w % 24), schema.SITE: str(s + 1), schema.JCP: jcp,
                             schema.INCHIKEY: f"KEY{jcp[-6:]}", schema.SMILES: "C" * (1 + abs(c)),
                             schema.ROLE: schema.role_of(jcp)})
                feats.append((rng.normal(size=d) + shift) * scale + offset)
    x = np.array(feats, np.float32)
    for name in CONSTANT & set(names):
        x[:, names.index(name)] = 7.0
    path.mkdir(parents=True)
    write_consolidated(path, x, pd.DataFrame(rows), {"featuriser": "cellprofiler_test", "feature_names": names})
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from evaluate.run import main

    root = tmp_path_factory.mktemp("formats")
    emb = cp_embedding(root / "emb")
    common = [f"embeddings.cellprofiler={emb}", "ray=false", "wandb=false", "null_size=200", "bootstrap=100"]
    assert main([f"out={root / 'eval'}", *common]) == 0
    assert main([f"out={root / 'mad'}", *common, "spherize=false"]) == 0
    return root


def test_read_feature_names(tmp_path):
    emb = cp_embedding(tmp_path / "emb")
    assert read_feature_names(emb) == NAMES
    info = json.loads((emb / "embed.json").read_text())
    (emb / "embed.json").write_text(json.dumps(dict(info, feature_names=NAMES[:-1])))
    with pytest.raises(EmbeddingError, match="23 feature_names for 24"):
        read_feature_names(emb)
    (emb / "embed.json").write_text(json.dumps(dict(info, feature_names=["Metadata_Plate", *NAMES[1:]])))
    with pytest.raises(EmbeddingError, match="none starting with Metadata_"):
        read_feature_names(emb)
    (emb / "embed.json").write_text(json.dumps({k: v for k, v in info.items() if k != "feature_names"}))
    assert read_feature_names(emb) is None


def test_pycytominer_reads_the_profiles_without_renaming(evaluated):
    raw = pd.read_parquet(evaluated / "eval" / "profiles_cellprofiler_raw.parquet")
    prof = pd.read_parquet(evaluated / "eval" / "profiles_cellprofiler.parquet")
    assert infer_cp_features(raw) == NAMES
    assert infer_cp_features(prof) == [n for n in NAMES if n not in CONSTANT]
    meta = infer_cp_features(raw, metadata=True)
    assert meta[:8] == [schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.JCP, schema.INCHIKEY,
                        schema.SMILES, PERT]
    assert schema.ROLE not in raw.columns and set(raw[PERT]) == {"trt", "negcon", "poscon"}
    assert len(raw) == len(prof) == 4 * 26 and (raw[meta].to_numpy() == prof[meta].to_numpy()).all()

    normalised = pycytominer.normalize(raw, features="infer", samples=f"{PERT} == 'negcon'", method="mad_robustize")
    assert list(normalised.columns) == list(raw.columns)
    selected = pycytominer.feature_select(raw, features="infer", operation=["variance_threshold", "drop_na_columns"])
    kept = infer_cp_features(selected)
    assert not CONSTANT & set(kept) and set(kept) <= set(NAMES) and len(kept) >= len(NAMES) - len(CONSTANT) - 2


def test_our_normalisation_equals_pycytominer_per_plate(evaluated):
    """Raw file -> pycytominer mad_robustize per plate (-> ZCA-cor fitted on DMSO) equals our normalised file."""
    raw = pd.read_parquet(evaluated / "eval" / "profiles_cellprofiler_raw.parquet")
    mad_only = pd.read_parquet(evaluated / "mad" / "profiles_cellprofiler.parquet")
    ours = pd.read_parquet(evaluated / "eval" / "profiles_cellprofiler.parquet")
    kept = infer_cp_features(ours)
    meta = infer_cp_features(raw, metadata=True)
    per_plate = pd.concat([pycytominer.normalize(group, features=kept, meta_features=meta,
                                                 samples=f"{PERT} == 'negcon'", method="mad_robustize")
                           for _, group in raw.groupby(schema.PLATE, sort=False)]).loc[raw.index]
    np.testing.assert_allclose(mad_only[kept].to_numpy(), per_plate[kept].to_numpy(), rtol=1e-4, atol=1e-4)
    whitened = pycytominer.normalize(per_plate, features=kept, meta_features=meta, samples=f"{PERT} == 'negcon'",
                                     method="spherize", spherize_method="ZCA-cor", spherize_epsilon=1e-6)
    np.testing.assert_allclose(ours[kept].to_numpy(), whitened[kept].to_numpy(), rtol=1e-3, atol=1e-3)
    # a whitened column stays correlated with the input feature whose name it keeps, far more than with others
    n = len(kept)
    corr = np.abs(np.corrcoef(ours[kept].to_numpy().T, mad_only[kept].to_numpy().T)[:n, n:])
    assert (np.diag(corr) > 0.3).all() and np.diag(corr).mean() > 4 * corr[~np.eye(n, dtype=bool)].mean()


def test_copairs_scores_the_normalised_file_to_our_map(evaluated, tmp_path):
    from copairs.matching import assign_reference_index

    table = pd.read_parquet(evaluated / "eval" / "profiles_cellprofiler.parquet")
    meta = table[infer_cp_features(table, metadata=True)]
    feats = table[infer_cp_features(table)].to_numpy()
    ref = assign_reference_index(meta, f"{PERT} == 'negcon'", reference_col="Metadata_Reference_Index")
    ap = copairs_map.average_precision(ref, feats, pos_sameby=[schema.JCP, "Metadata_Reference_Index"], pos_diffby=[],
                                       neg_sameby=[schema.PLATE], neg_diffby=[schema.JCP, "Metadata_Reference_Index"],
                                       progress_bar=False)
    maps = copairs_map.mean_average_precision(ap, [schema.JCP], null_size=200, threshold=0.05, seed=0,
                                              progress_bar=False, cache_dir=tmp_path / "cache")
    doc = json.loads((evaluated / "eval" / "metrics.json").read_text())
    mine = doc["methods"]["cellprofiler"]
    assert maps["mean_average_precision"].mean() == pytest.approx(mine["map_activity"], abs=1e-4)
    assert 0 <= mine["map_activity_lo"] <= mine["map_activity"] <= mine["map_activity_hi"] <= 1
    assert mine["map_activity"] > mine["map_activity_chance"]          # half the compounds are shifted


def test_metrics_are_strict_json_and_learned_embeddings_keep_indexed_names(tmp_path):
    """One source: NSS is undefined and written as null; a featuriser without names gets {label}_{i:04d}."""
    from evaluate.run import main

    emb = cp_embedding(tmp_path / "emb", seed=1)
    sites = pd.read_parquet(emb / "sites.parquet").assign(**{schema.SOURCE: "source_1"})
    info = json.loads((emb / "embed.json").read_text())
    import zarr
    x = np.asarray(zarr.open_array(str(emb / "embeddings.zarr"), mode="r")[:])
    learned = tmp_path / "learned"
    learned.mkdir()
    write_consolidated(learned, x, sites, {k: v for k, v in info.items() if k not in ("feature_names", "sha256")})
    assert main([f"out={tmp_path / 'eval'}", f"embeddings.simclr={learned}", "ray=false", "wandb=false",
                 "null_size=100", "bootstrap=50"]) == 0
    text = (tmp_path / "eval" / "metrics.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))
    assert doc["methods"]["simclr"]["nss_top1"] is None and doc["methods"]["simclr"]["nsb_top1"] is not None
    raw = pd.read_parquet(tmp_path / "eval" / "profiles_simclr_raw.parquet")
    assert [c for c in raw.columns if not c.startswith("Metadata_")] == [f"simclr_{i:04d}" for i in range(len(NAMES))]
    assert "n/a" in (tmp_path / "eval" / "report.md").read_text()


def test_every_json_the_project_writes_is_strict(tmp_path):
    """NaN and inf (Python's and NumPy's) become null: jq, JavaScript and Java reject a bare NaN."""
    import json

    import numpy as np

    from micon import atomic

    doc = {"nss_top1": float("nan"), "nested": [np.float32("inf"), np.float64(0.5), np.int64(3), {"x": -np.inf}],
           "ok": 1.0, "flag": np.bool_(True)}
    atomic.write_json(tmp_path / "m.json", doc)
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"nss_top1": None, "nested": [None, 0.5, 3, {"x": None}], "ok": 1.0, "flag": True}
    json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))   # strict parse


def test_dmso_null_equals_pycytominer_and_copairs_on_the_relabelled_raw_file(evaluated, tmp_path):
    """metrics.json's map_activity_null and map_activity_over_null, recomputed from the raw file alone:
    the same halvings of each plate's DMSO (micon's pseudo_compounds), pycytominer's per-plate
    mad_robustize and ZCA-cor fitted on the remaining DMSO, copairs' mAP of activity."""
    from copairs.matching import assign_reference_index

    from evaluate.run import NULL_REPEATS
    from micon.eval.activity import NULL_PREFIX, pseudo_compounds

    raw = pd.read_parquet(evaluated / "eval" / "profiles_cellprofiler_raw.parquet")
    mine = json.loads((evaluated / "eval" / "metrics.json").read_text())["methods"]["cellprofiler"]
    roles = {"trt": schema.TREATED, "negcon": schema.NEGCON, "poscon": schema.POSCON}
    kept = [n for n in NAMES if n not in CONSTANT]
    nulls, compounds = [], []
    for r in range(NULL_REPEATS):
        w = pseudo_compounds(raw[[schema.PLATE, schema.JCP]].assign(**{schema.ROLE: raw[PERT].map(roles)}), seed=r)
        table = raw.assign(**{schema.JCP: w[schema.JCP].to_numpy(),
                              PERT: np.where(w[schema.ROLE] == schema.NEGCON, "negcon",
                                             np.where(w[schema.ROLE] == schema.POSCON, "poscon", "trt"))})
        meta = infer_cp_features(table, metadata=True)
        norm = pd.concat([pycytominer.normalize(g, features=kept, meta_features=meta, samples=f"{PERT} == 'negcon'",
                                                method="mad_robustize")
                          for _, g in table.groupby(schema.PLATE, sort=False)]).loc[table.index]
        norm = pycytominer.normalize(norm, features=kept, meta_features=meta, samples=f"{PERT} == 'negcon'",
                                     method="spherize", spherize_method="ZCA-cor", spherize_epsilon=1e-6)
        norm = norm[norm[PERT].isin(["trt", "negcon"])].reset_index(drop=True)
        ref = assign_reference_index(norm[meta], f"{PERT} == 'negcon'", reference_col="Metadata_Reference_Index")
        ap = copairs_map.average_precision(ref, norm[kept].to_numpy(),
                                           pos_sameby=[schema.JCP, "Metadata_Reference_Index"], pos_diffby=[],
                                           neg_sameby=[schema.PLATE],
                                           neg_diffby=[schema.JCP, "Metadata_Reference_Index"], progress_bar=False)
        maps = copairs_map.mean_average_precision(ap, [schema.JCP], null_size=100, threshold=0.05, seed=0,
                                                  progress_bar=False, cache_dir=tmp_path / "cache")
        maps = maps[maps[schema.JCP] != schema.DMSO]
        is_null = maps[schema.JCP].str.startswith(NULL_PREFIX)
        nulls.append(maps[is_null]["mean_average_precision"])
        compounds.append(maps[~is_null].set_index(schema.JCP)["mean_average_precision"])
    level = pd.concat(nulls).mean()
    assert mine["map_activity_null"] == pytest.approx(level, abs=2e-3)
    over = pd.concat(compounds, axis=1).mean(axis=1).mean() - level
    assert mine["map_activity_over_null"] == pytest.approx(over, abs=2e-3)
    assert mine["map_activity_over_null_lo"] <= mine["map_activity_over_null"] <= mine["map_activity_over_null_hi"]
    assert mine["map_activity_over_null"] > 0.05             # half the compounds are shifted
    assert mine["n_null_compounds"] == 4 and mine["n_negcon_wells"] == 32
    report = (evaluated / "eval" / "report.md").read_text()
    assert "map_activity_over_null" in report and "(few)" in report    # 32 DMSO wells for 22 features


def test_the_null_warns_when_the_dmso_wells_are_few_per_feature_and_says_why_it_is_missing():
    from evaluate.run import EvalConfig, activity_null

    rng = np.random.default_rng(0)
    rows = [(f"P{p}", f"W{i}", schema.DMSO if i < 8 else f"JCP2022_{i:06d}", schema.NEGCON if i < 8 else schema.TREATED)
            for p in range(4) for i in range(20)]
    wells = pd.DataFrame(rows, columns=[schema.PLATE, schema.WELL, schema.JCP, schema.ROLE])
    cfg = EvalConfig(embeddings={"x": "unused"}, null_size=50, bootstrap=50)
    for d, warned in ((4, False), (16, True)):
        said = []
        out = activity_null("x", wells, rng.normal(size=(len(wells), d)), cfg, d, said.append)
        assert np.isfinite(out["map_activity_null"]) and out["n_null_compounds"] == 4
        assert any("warning: ZCA is fitted on 32 DMSO wells" in s for s in said) is warned, said
    one = wells[(wells[schema.ROLE] != schema.NEGCON) | (wells[schema.WELL] == "W0")].reset_index(drop=True)
    said = []
    out = activity_null("x", one, rng.normal(size=(len(one), 4)), cfg, 4, said.append)
    assert np.isnan(out["map_activity_null"]) and "too few DMSO wells for one pseudo-compound" in said[0]
    assert "too few DMSO wells for one pseudo-compound" in out["null_reason"]     # the report names the cause


def test_jump_and_morphohelm_recipes_run_end_to_end_and_record_themselves(tmp_path):
    """recipe=jump and recipe=morphohelm through the whole job: every stringency's metrics, the recipe's
    account in metrics.json and in the profiles' parquet metadata, its fitted arrays beside them, and 64
    principal components from a 96-feature embedding."""
    import pyarrow.parquet as pq

    from evaluate.run import main

    wide = [f"Cells_Feature_{j:03d}" for j in range(96)]
    emb = cp_embedding(tmp_path / "emb", names=wide, n_cpd=40, dmso=16)
    for recipe in ("jump", "morphohelm"):
        out = tmp_path / recipe
        assert main([f"out={out}", f"embeddings.cellprofiler={emb}", f"recipe={recipe}", "ray=false",
                     "wandb=false", "null_size=200", "bootstrap=100"]) == 0
        doc = json.loads((out / "metrics.json").read_text())
        m = doc["methods"]["cellprofiler"]
        assert doc["recipe"] == recipe and {f"{s}_top1" for s in ("nr", "nsb", "nss", "nsp", "nsl")} <= set(m)
        account = doc["recipes"]["cellprofiler"]
        assert account["recipe"] == recipe and account["fitted"] == "recipe_cellprofiler.npz"
        table = pq.read_table(out / "profiles_cellprofiler.parquet")
        assert json.loads(table.schema.metadata[b"micon.recipe"]) == {k: v for k, v in account.items() if k != "fitted"}
        report = (out / "report.md").read_text()
        assert f"recipe={recipe}" in report and "| every method |" in report    # one chance row: shared wells
        assert "NSP equals NSB on this screen for every method: every batch holds one plate" in report
        fitted = np.load(out / "recipe_cellprofiler.npz")
        assert {"mad_median", "mad_mad", "features_out"} <= set(fitted.files)
        feats = [c for c in table.column_names if not c.startswith("Metadata_")]
        assert list(fitted["features_out"]) == feats == [c for c in table.column_names if c in feats]
        if recipe == "morphohelm":
            assert len(feats) == m["n_features_kept"] == 64 and feats[0] == "PC01"
            assert fitted["pca_components"].shape == (64, 96)
            assert [s["step"] for s in account["steps"]][-1].startswith("per-plate MAD against DMSO")
        else:
            assert [s["step"] for s in account["steps"]][-1] == "Harmony"
            assert account["steps"][-1]["key"] == schema.SOURCE and account["steps"][-1]["batches"] == 2


def test_evaluate_scores_a_table_pycytominer_normalised_and_feature_selected(evaluated, tmp_path):
    """profiles.NAME=FILE: a well-level table from pycytominer (normalize per plate, feature_select) is
    scored like an embedding; the raw well table read back this way gives exactly the embedding's metrics;
    a table without the batch is refused by name."""
    from evaluate.run import main

    raw = pd.read_parquet(evaluated / "eval" / "profiles_cellprofiler_raw.parquet")
    feats = infer_cp_features(raw)
    meta = infer_cp_features(raw, metadata=True)
    normalised = pd.concat([pycytominer.normalize(g, features=feats, meta_features=meta,
                                                  samples=f"{PERT} == 'negcon'", method="mad_robustize")
                            for _, g in raw.groupby(schema.PLATE, sort=False)])
    selected = pycytominer.feature_select(normalised, features=feats,
                                          operation=["variance_threshold", "correlation_threshold"])
    kept = infer_cp_features(selected)
    assert 0 < len(kept) < len(feats)
    selected.to_csv(tmp_path / "pycytominer.csv.gz", index=False)
    raw.to_parquet(tmp_path / "raw.parquet")
    common = ["ray=false", "wandb=false", "null_size=200", "bootstrap=100"]
    assert main([f"out={tmp_path / 'eval'}", f"profiles.cp={tmp_path / 'pycytominer.csv.gz'}",
                 f"profiles.again={tmp_path / 'raw.parquet'}", *common]) == 0
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    cp = doc["methods"]["cp"]
    assert cp["dim"] == len(kept) and cp["n_wells"] == len(raw) and 0 <= cp["nr_top1"] <= 1
    reference = json.loads((evaluated / "eval" / "metrics.json").read_text())["methods"]["cellprofiler"]
    again = doc["methods"]["again"]
    for key in ("nr_top1", "nsb_top1", "nss_top1", "nsl_top1", "map_activity", "map_consistency"):
        assert again[key] == pytest.approx(reference[key], abs=1e-6), key
    # features by glob
    assert main([f"out={tmp_path / 'nuclei'}", f"profiles.cp={tmp_path / 'raw.parquet'}",
                 "features.cp=Nuclei_*", *common]) == 0
    nuclei = json.loads((tmp_path / "nuclei" / "metrics.json").read_text())["methods"]["cp"]
    assert nuclei["dim"] == sum(n.startswith("Nuclei_") for n in feats)
    raw.drop(columns=[schema.BATCH]).to_parquet(tmp_path / "nobatch.parquet")
    assert main([f"out={tmp_path / 'bad'}", f"profiles.cp={tmp_path / 'nobatch.parquet'}", *common]) == 1


def test_consistency_on_consensus_profiles_from_an_annotation_table(evaluated, tmp_path):
    """annotations=FILE annotation=COLUMN: consistency mAP on consensus profiles of the normalised wells
    equals target_consistency run on the written profiles; well_consistency=false leaves the wells^2 one out."""
    from evaluate.run import main
    from micon.eval.consistency import target_consistency

    raw = pd.read_parquet(evaluated / "eval" / "profiles_cellprofiler_raw.parquet")
    compounds = sorted(set(raw[schema.JCP]) - {schema.DMSO})
    table = pd.DataFrame({schema.JCP: compounds, "Metadata_Target": [f"T{i % 4}" for i in range(len(compounds))]})
    table.to_csv(tmp_path / "targets.csv", index=False)
    assert main([f"out={tmp_path / 'eval'}", f"embeddings.cellprofiler={evaluated / 'emb'}", "ray=false",
                 "wandb=false", "null_size=200", "bootstrap=100", f"annotations={tmp_path / 'targets.csv'}",
                 "annotation=Metadata_Target", "well_consistency=false"]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())["methods"]["cellprofiler"]
    assert m["map_consistency"] is None and m["n_annotations"] == 4
    prof = pd.read_parquet(tmp_path / "eval" / "profiles_cellprofiler.parquet")
    prof = prof[prof[PERT].isin(["trt", "poscon", "negcon"])].merge(table, on=schema.JCP, how="left")
    prof[schema.ROLE] = prof[PERT].map({"trt": schema.TREATED, "poscon": schema.POSCON, "negcon": schema.NEGCON})
    _, ref = target_consistency(prof, prof[infer_cp_features(prof)].to_numpy(), "Metadata_Target", null_size=200)
    assert m["map_target_consistency"] == pytest.approx(ref["mean_average_precision"].mean(), abs=1e-6)
