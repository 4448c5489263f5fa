"""`predict` end to end on the tiny screen: a MICON and a CLIP checkpoint (2 in-process steps) predict
profiles for the screen's compounds plus an unreadable SMILES, which is listed with its reason and skipped;
the wells land in the same space and evaluate scores the predictions on the held-out compounds."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from micon import schema
from micon.distributed import free_port

pytestmark = pytest.mark.slow
BASE = ["steps=2", "micro_batch=4", "progress=false", "wandb.enabled=false", "resume=none", "data.augment.crop=16",
        "model.molecule_dim=16", "model.projection_dim=8", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def graph_store(tiny_screen, tmp_path_factory):
    """The tiny screen's compounds featurised in-process (no Ray)."""
    from micon.chem.compound_table import plan_items, read_compounds
    from micon.chem.compound import FeaturizeOptions, featurize_chunk
    from micon.chem.store import INDEX_COLUMNS, write_store

    items, _ = plan_items(read_compounds(tiny_screen / "metadata" / "compound.csv.gz"))
    columns, graphs = featurize_chunk(items, FeaturizeOptions())
    index = pd.DataFrame(columns).assign(n_atoms=np.diff(graphs.atom_offsets), n_bonds=np.diff(graphs.bond_offsets))
    out = tmp_path_factory.mktemp("graphs") / "store"
    out.mkdir()
    write_store(out, index[list(INDEX_COLUMNS)], graphs, radius=2, n_bits=2048)
    return out


@pytest.mark.parametrize("method", ["micon", "clip"])
def test_predict_end_to_end_with_an_invalid_smiles(method, tiny_screen, tiny_shards, graph_store, tmp_path,
                                                   monkeypatch):
    from evaluate import predict
    from evaluate.embed import EmbedConfig, run as embed
    from evaluate.run import main as evaluate_main
    from micon.config import load_config
    from train.config import TrainConfig
    from train.trainer import EXIT_OK, train

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    run_dir = tmp_path / "run"
    cfg = load_config(TrainConfig, None, [f"data.shards={tiny_shards}", f"data.graphs={graph_store}", f"out={run_dir}",
                                          f"method={method}", *BASE])
    assert train(cfg) == EXIT_OK
    compounds = pd.read_csv(tiny_screen / "metadata" / "compound.csv.gz")[[schema.JCP, schema.SMILES]]
    table = pd.concat([compounds, pd.DataFrame([{schema.JCP: "JCP2022_BROKEN", schema.SMILES: "C1CC(("}])])
    table.to_csv(tmp_path / "compounds.csv", index=False)
    embed(str(run_dir), tiny_shards, tmp_path / "emb", EmbedConfig(ray=False, batch_size=16))

    out = tmp_path / "pred"
    assert predict.main([str(run_dir), str(tmp_path / "compounds.csv"), str(out), f"shards={tiny_shards}",
                         f"embeddings={tmp_path / 'emb'}", "controls=8"]) == 0
    pred = pd.read_parquet(out / "predicted_profiles.parquet")
    invalid = pd.read_csv(out / "invalid_compounds.csv")
    assert invalid[schema.JCP].tolist() == ["JCP2022_BROKEN"] and "SMILES" in invalid["reason"].iloc[0]
    assert sorted(pred[schema.JCP]) == sorted(compounds[schema.JCP])      # nothing else lost
    feats = [c for c in pred.columns if not c.startswith("Metadata_")]
    assert feats and np.isfinite(pred[feats].to_numpy()).all()
    wells = pd.read_parquet(out / "well_profiles.parquet")
    assert [c for c in wells.columns if not c.startswith("Metadata_")] == feats
    info = json.loads((out / "predict.json").read_text())
    assert info["n_predicted"] == len(compounds) and info["n_invalid"] == 1

    assert evaluate_main([f"out={tmp_path / 'eval'}", f"shards={tiny_shards}", f"predictions.{method}={out}",
                          "ray=false", "wandb=false"]) == 0
    zs = json.loads((tmp_path / "eval" / "metrics.json").read_text())["zero_shot"][method]
    assert zs["n_queries"] >= 1 and 0 <= zs["zs_well_top1pct"] <= 1 and 0 <= zs["zs_compound_top1"] <= 1
    assert "Zero-shot retrieval" in (tmp_path / "eval" / "report.md").read_text()


def test_a_method_that_reads_no_molecules_is_refused_naming_those_that_can(tmp_path, capsys):
    from evaluate import predict
    from micon.checkpoint import InferenceRecord, save_model_file
    from micon.methods import get_method
    from micon.models.factory import ModelConfig

    cfg = ModelConfig(preset="tiny", projection_dim=8)
    model = get_method("simclr").build_model(cfg, 5)
    save_model_file(tmp_path / "model.pt", model.state_dict(),
                    InferenceRecord(method="simclr", model=vars(cfg), channels=list("ABCDE")), {}, {})
    pd.DataFrame({schema.JCP: ["x"], schema.SMILES: ["CCO"]}).to_csv(tmp_path / "c.csv", index=False)
    assert predict.main([str(tmp_path / "model.pt"), str(tmp_path / "c.csv"), str(tmp_path / "out")]) == 1
    assert "cannot predict profiles; use a checkpoint of micon, clip" in capsys.readouterr().err
