"""Zero-shot profiles: a virtual screen of compounds from their structure alone, with a trained checkpoint.

    ./launch.sh predict CKPT COMPOUNDS OUT [shards=SHARDS] [embeddings=DIR] [key=value ...]

COMPOUNDS: a CSV (or .csv.gz, .parquet) with Metadata_JCP2022 and Metadata_SMILES. The checkpoint's method
predicts (micon.methods: `predicts`): MICON with its counterfactual generator, from each molecule and the
DMSO control sites of SHARDS' control bank (embedded with the checkpoint's image encoder); CLIP with its
molecule tower. Writes OUT/predicted_profiles.parquet (one row per valid compound: Metadata_* columns, then
the features), OUT/invalid_compounds.csv (each compound that could not be read, and why; also logged) and
OUT/predict.json. With embeddings=DIR (this checkpoint's embed output), also OUT/well_profiles.parquet: the
screen's wells in the same space, which `./launch.sh evaluate predictions.NAME=OUT` scores against.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from micon import atomic, schema
from micon.config import ConfigError, NonNegativeInt, PositiveInt, load_config, save_config


@dataclass
class PredictConfig:
    shards: str = ""           # shard set whose control bank gives the DMSO controls (methods that read them)
    embeddings: str = ""       # this checkpoint's embed output: also write the wells in the prediction space
    controls: NonNegativeInt = 256  # DMSO sites drawn from the control bank (0 = all of them)
    batch_size: PositiveInt = 64    # compounds (and control sites) per forward pass
    seed: NonNegativeInt = 0        # which control sites are drawn
    molecule_table: str = ""        # model.molecule=table checkpoints: the vector table ("" = the one training read)


class PredictError(RuntimeError):
    pass


def _say(msg: str) -> None:
    print(f"predict: {msg}", flush=True)


def featurize_options(checkpoint):
    """The featuriser settings training read (the graph store's featurize.json when it is still there),
    with the fingerprint size the checkpoint records."""
    import json

    from micon.chem.compound import FeaturizeOptions

    marker = Path(str(checkpoint.config.get("data", {}).get("graphs", ""))) / "featurize.json"
    saved = json.loads(marker.read_text()).get("config", {}) if marker.is_file() else {}
    opts = FeaturizeOptions(**{k: saved[k] for k in ("radius", "n_bits", "tautomers", "max_atoms") if k in saved})
    if checkpoint.record.fingerprint_bits:
        opts = FeaturizeOptions(opts.radius, checkpoint.record.fingerprint_bits, opts.tautomers, opts.max_atoms)
    return opts


def read_molecules(path, opts, table: pd.DataFrame | None = None) -> tuple[pd.DataFrame, object, pd.DataFrame]:
    """The compound table (read from `path` unless given as `table`) -> (valid compounds' Metadata_* rows, their
    RaggedGraphs, invalid rows with a reason)."""
    from micon.chem.compound_table import plan_items, read_compounds
    from micon.chem.compound import featurize_chunk
    from micon.chem.store import OK

    table = read_compounds(path) if table is None else table
    items, problems = plan_items(table)
    columns, graphs = featurize_chunk(items, opts)
    status = pd.DataFrame({k: columns[k] for k in (schema.JCP, "status", "reason")})
    first = table.drop_duplicates(schema.JCP).set_index(schema.JCP)
    status[schema.SMILES] = first[schema.SMILES].reindex(status[schema.JCP]).to_numpy()
    status[schema.INCHIKEY] = first[schema.INCHIKEY].reindex(status[schema.JCP]).to_numpy()
    ok = (status["status"] == OK).to_numpy()
    invalid = status.loc[~ok, [schema.JCP, schema.SMILES, "reason"]]
    no_id = [{schema.JCP: "", schema.SMILES: "", "reason": p} for p in problems]
    invalid = pd.concat([invalid, pd.DataFrame(no_id, columns=invalid.columns)], ignore_index=True)
    valid = status.loc[ok, [schema.JCP, schema.INCHIKEY, schema.SMILES]].reset_index(drop=True)
    return valid, graphs.take(np.flatnonzero(ok)), invalid


def molecule_batch(graphs, rows: np.ndarray, needs, n_bits: int, vectors: np.ndarray | None = None):
    """Rows of a RaggedGraphs -> what the method's molecule encoder reads (a graph batch, fingerprint bits, or
    the rows of `vectors`, the compounds' frozen table vectors)."""
    import torch

    from micon.chem.featurizer import decode
    from micon.chem.graph import collate_graphs
    from micon.models.molecule import graphs_to_torch

    if needs.vectors:
        return torch.from_numpy(vectors[rows])
    if needs.fingerprints:
        bits = np.unpackbits(graphs.fingerprints[rows], axis=1, count=n_bits)
        return torch.from_numpy(bits).float()
    return graphs_to_torch(collate_graphs([decode(graphs.encoded(int(i))) for i in rows]))


def control_embeddings(model, checkpoint, shards: str, n: int, seed: int, batch_size: int):
    """Image-encoder embeddings [N, d] of up to `n` DMSO sites of SHARDS' control bank (drawn with `seed`),
    preprocessed exactly as in training."""
    import torch

    from micon.data.preprocess import SitePreprocessor
    from micon.data.shards import ControlBank, Manifest

    manifest = Manifest.load(shards)
    if list(manifest.channels) != list(checkpoint.record.channels):
        raise PredictError(f"the checkpoint was trained on channels {checkpoint.record.channels} but {shards} holds "
                           f"{manifest.channels}")
    bank = ControlBank(shards, cache_plates=4)
    table = bank.table
    if n and len(table) > n:
        table = table.iloc[np.sort(np.random.default_rng(seed).choice(len(table), n, replace=False))]
    prep = SitePreprocessor(manifest, checkpoint.preprocessing())
    sites = [(p, bank.get(p, int(r))) for p, r in zip(table[schema.PLATE], table["row"])]
    sites = [(p, s) for p, s in sites if s is not None]       # a damaged control site is never used
    if not sites:
        raise PredictError(f"no usable DMSO control site in {shards}'s control bank")
    out = []
    with torch.no_grad():
        for i in range(0, len(sites), batch_size):
            x = np.stack([prep(s, p) for p, s in sites[i:i + batch_size]])
            out.append(model.image_encoder(torch.from_numpy(x)).float())
    return torch.cat(out)


def well_profiles_in_prediction_space(method, model, checkpoint, embeddings: str, batch_size: int = 4096):
    """The embed output of this checkpoint -> its wells' mean profile in the prediction space, as a table
    (Metadata_* well columns, then the features)."""
    import torch

    from micon.embeddings import load_embeddings, sha256_file
    from micon.eval.profiles import WELL_KEYS

    import json
    info = json.loads((Path(embeddings) / "embed.json").read_text()) if (Path(embeddings) / "embed.json").is_file() \
        else {}
    made_by = info.get("identity", {}).get("model", {}).get("sha256")
    if made_by != sha256_file(checkpoint.path):
        raise PredictError(f"{embeddings} was not embedded with {checkpoint.path} (embed.json names "
                           f"{info.get('checkpoint', 'nothing')}); embed the shards with this checkpoint first")
    meta, emb = load_embeddings(embeddings)
    with torch.no_grad():
        mapped = torch.cat([method.match_images(model, torch.from_numpy(emb[i:i + batch_size]))
                            for i in range(0, len(emb), batch_size)]).numpy().astype(np.float64)
    keys = [*WELL_KEYS, schema.BATCH, schema.JCP, schema.ROLE]
    codes = meta.groupby(keys, sort=False, observed=True).ngroup().to_numpy()
    sums = np.zeros((codes.max() + 1 if len(codes) else 0, mapped.shape[1]))
    np.add.at(sums, codes, mapped)
    wells = meta[keys].drop_duplicates().reset_index(drop=True)
    return wells, sums / np.bincount(codes)[:, None]


def feature_table(meta: pd.DataFrame, feats: np.ndarray, prefix: str) -> pd.DataFrame:
    names = [f"{prefix}_{i:04d}" for i in range(feats.shape[1])]
    return pd.concat([meta.reset_index(drop=True), pd.DataFrame(feats.astype(np.float32), columns=names)], axis=1)


def run(ckpt: str, compounds, out: Path, cfg: PredictConfig) -> dict:
    import torch

    from micon.checkpoint import load_checkpoint, model_config
    from micon.chem.compound_table import read_compounds
    from micon.methods import METHODS, get_method

    t0 = time.perf_counter()
    table = read_compounds(compounds)       # a missing, empty or unreadable table is refused before any loading
    checkpoint = load_checkpoint(ckpt)
    method = get_method(checkpoint.record.method)
    if not method.predicts:
        able = ", ".join(m for m, meth in METHODS.items() if meth.predicts)
        raise PredictError(f"{checkpoint.path} is a {method.name} checkpoint, which reads no molecules and cannot "
                           f"predict profiles; use a checkpoint of {able}")
    needs = method.data_needs(model_config(checkpoint.record.model))
    if needs.controls and not cfg.shards:
        raise PredictError(f"method {method.name} predicts from DMSO controls: pass shards=SHARDS (the shard set "
                           f"whose control bank to use)")
    out.mkdir(parents=True, exist_ok=True)
    opts = featurize_options(checkpoint)
    valid, graphs, invalid = read_molecules(compounds, opts, table)
    vectors = None
    if needs.vectors:   # frozen per-compound vectors: a compound without a row cannot be predicted, and is named
        from micon.chem.table import MoleculeTable, TableError

        path = cfg.molecule_table or checkpoint.record.model.get("molecule_table", "")
        try:
            table = MoleculeTable(path)
        except TableError as e:
            raise PredictError(f"{e} (the checkpoint's molecule encoder reads this table; pass molecule_table=)") \
                from None
        if table.dim != checkpoint.record.table_dim:
            raise PredictError(f"molecule_table={path} has {table.dim} values per compound but {checkpoint.path} was "
                               f"trained on {checkpoint.record.table_dim}")
        absent = np.array([c not in table for c in valid[schema.JCP]], bool)
        invalid = pd.concat([invalid, valid.loc[absent, [schema.JCP, schema.SMILES]].assign(
            reason=f"no row in the molecule table {path}")], ignore_index=True)
        graphs, valid = graphs.take(np.flatnonzero(~absent)), valid.loc[~absent].reset_index(drop=True)
        vectors = table.get(list(valid[schema.JCP]))
    atomic.write_text(out / "invalid_compounds.csv", invalid.to_csv(index=False))
    for row in invalid.itertuples(index=False):
        print(f"predict: skipped {getattr(row, schema.JCP) or '(no id)'} ({getattr(row, schema.SMILES)!r}): "
              f"{row.reason}", file=sys.stderr)
    _say(f"{len(valid)} compounds read, {len(invalid)} invalid (listed in {out / 'invalid_compounds.csv'})")
    torch.manual_seed(cfg.seed)
    model = checkpoint.build_model()
    controls = (control_embeddings(model, checkpoint, cfg.shards, cfg.controls, cfg.seed, cfg.batch_size)
                if needs.controls else None)
    if controls is not None:
        _say(f"{len(controls)} DMSO control sites of {cfg.shards} embedded")
    preds = []
    with torch.no_grad():
        for i in range(0, len(valid), cfg.batch_size):
            rows = np.arange(i, min(i + cfg.batch_size, len(valid)))
            preds.append(method.predict_profiles(model, molecule_batch(graphs, rows, needs, opts.n_bits, vectors),
                                                 controls).float())
    pred = torch.cat(preds).numpy() if preds else np.zeros((0, 0), np.float32)
    if not np.isfinite(pred).all():
        raise PredictError(f"non-finite predictions from {checkpoint.path}: the checkpoint diverged")
    atomic.write_parquet(out / "predicted_profiles.parquet", feature_table(valid, pred, f"{method.name}_pred"))
    info = {"checkpoint": str(checkpoint.path), "method": method.name, "compounds": str(compounds),
            "n_predicted": int(len(valid)), "n_invalid": int(len(invalid)), "dim": int(pred.shape[1]) if pred.ndim == 2 else 0,
            "n_controls": int(len(controls)) if controls is not None else 0, "shards": cfg.shards}
    if cfg.embeddings:
        wells, feats = well_profiles_in_prediction_space(method, model, checkpoint, cfg.embeddings)
        atomic.write_parquet(out / "well_profiles.parquet", feature_table(wells, feats, f"{method.name}_pred"))
        info |= {"embeddings": cfg.embeddings, "n_wells": int(len(wells))}
        _say(f"{len(wells)} wells of {cfg.embeddings} in the prediction space -> {out / 'well_profiles.parquet'}")
    atomic.write_json(out / "predict.json", info)
    save_config(cfg, out / "predict_config.yaml")
    _say(f"{len(valid)} profiles x {info['dim']} features -> {out / 'predicted_profiles.parquet'} in "
         f"{time.perf_counter() - t0:.1f} s")
    return info


def main(argv: list[str]) -> int:
    from micon.config import help_or_usage

    if (rc := help_or_usage(argv, __doc__, PredictConfig, positional=3)) is not None:
        return rc
    ckpt, compounds, out = argv[0], argv[1], Path(argv[2])     # COMPOUNDS may be an object URL (s3://...)
    try:
        cfg = load_config(PredictConfig, overrides=argv[3:])
    except ConfigError as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    from micon.checkpoint import CheckpointError
    from micon.data.shards import ManifestError
    from micon.embeddings import EmbeddingError

    try:
        run(ckpt, compounds, out, cfg)
    except ConfigError as e:        # bad input: the compound table (missing, empty, unreadable, no such columns)
        print(f"predict: {e}", file=sys.stderr)
        return 2
    except (PredictError, CheckpointError, ManifestError, EmbeddingError, FileNotFoundError) as e:
        print(f"predict: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
