"""Every enumerated choice of the training configuration trains and embeds. The choices come from the
typed configuration (train.config.option_choices: its Literal and bool fields), so a new choice is in the
matrix without anyone adding it here. Each case runs 2 in-process steps on the tiny screen, reloads the
checkpoint through micon.checkpoint (the whole model, molecule encoder included) and embeds a shard.

The matrix varies one key at a time around the defaults, plus the keys that interact: every method with
every stream and every molecule encoder. Impossible pairs are refused at start-up with one line naming
both keys; settings a run does not read are logged once.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import time

import numpy as np
import pandas as pd
import pytest
import torch

from micon import schema
from micon.checkpoint import load_checkpoint
from micon.config import ConfigError, load_config, to_dict
from micon.methods import METHODS, get_method
from micon.models.factory import MOLECULE_ENCODERS
from micon.models.image import resolve_input_norm
from train.config import TrainConfig, option_choices

# keys with enumerated choices that say nothing about what trains, and why they stay out of the matrix
OUTSIDE_THE_MATRIX = {
    "progress": "a progress bar on rank 0",
    "wandb.enabled": "logging only (every case runs without wandb)",
    # the training step's speed switches: each compared with today's step in tests/test_train_step.py
    "engine.channels_last": "memory layout only (tests/test_train_step.py)",
    "engine.compile": "inductor builds C++ for minutes on CPU (tests/test_train_step.py, aot_eager)",
    "optim.kernel": "AdamW's implementation only (tests/test_train_step.py)",
    "deterministic": "trained twice in tests/test_deterministic.py",
    "wandb.log_checkpoints": "logging only (tests/test_wandb_lineage.py)",
    # validation reads the run, never changes what trains: each choice scored in tests/test_validation.py
    "val.recipe": "validation's profile recipe (tests/test_validation.py)",
    "val.keep_best": "which checkpoint is kept (tests/test_validation.py)",
}
# a choice that is read only beside another key's non-default choice, varied with it
COMPANIONS = {("model.input_norm", "imagenet"): {"model.mode": "per_channel"}}
FINGERPRINT_BITS = 256   # not the featuriser's default 2048: the checkpoint must take the store's size
BASE = ["steps=2", "micro_batch=4", "progress=false", "wandb.enabled=false", "resume=none", "data.augment.crop=16",
        "model.molecule_dim=16", "model.projection_dim=8", "optim.warmup_steps=1"]

CHOICES = option_choices()
DEFAULTS = TrainConfig()


def _case_id(case: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(case.items())) or "defaults"


def _matrix() -> list[dict]:
    """One case per non-default choice of every key, the defaults, and every method x stream x molecule
    encoder that can run (one key of a pair at its default when the other varies)."""
    cases = [{}]
    for key, choices in CHOICES.items():
        if key in OUTSIDE_THE_MATRIX:
            continue
        for choice in choices:
            if choice == DEFAULTS.get(key):
                continue
            case = {key: choice, **COMPANIONS.get((key, choice), {})}
            if _read_by_the_plate_stream_only(case):
                case["data.stream"] = "plates"   # varied where it is read (the defaults read replicate sets)
            cases.append(case)
    for method, stream, molecule in itertools.product(CHOICES["method"], CHOICES["data.stream"], MOLECULE_ENCODERS):
        if molecule != DEFAULTS.model.molecule and stream != DEFAULTS.data.stream:
            continue
        case = {"method": method, "data.stream": stream, "model.molecule": molecule}
        try:
            _config(case)
        except ConfigError:   # refused at start-up: test_impossible_pairs_are_refused_naming_both_keys
            continue
        cases.append({k: v for k, v in case.items() if v != DEFAULTS.get(k)})
    unique = {_case_id(c): c for c in cases}
    return list(unique.values())


def _read_by_the_plate_stream_only(case: dict) -> bool:
    """A setting that replicate sets leave unused (the pairing buffer's)."""
    try:
        unused = _config(case, "data.stream=replicate_sets").unused()
    except ConfigError:
        return False
    return any(line.startswith(f"{key}=") for key in case for line in unused)


def _config(case: dict, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, ["data.shards=s", "data.graphs=g", "model.molecule_table=t", *extra,
                                           *_overrides(case)])


def _overrides(case: dict) -> list[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in case.items()]


MATRIX = _matrix()


@pytest.fixture(scope="module")
def fingerprint_store(tiny_screen, tmp_path_factory):
    """The tiny screen's compounds featurised in-process (no Ray) with FINGERPRINT_BITS-bit fingerprints."""
    from micon.chem.compound_table import plan_items, read_compounds
    from micon.chem.compound import FeaturizeOptions, featurize_chunk
    from micon.chem.store import INDEX_COLUMNS, write_store

    items, _ = plan_items(read_compounds(tiny_screen / "metadata" / "compound.csv.gz"))
    columns, graphs = featurize_chunk(items, FeaturizeOptions(n_bits=FINGERPRINT_BITS))
    index = pd.DataFrame(columns).assign(n_atoms=np.diff(graphs.atom_offsets), n_bonds=np.diff(graphs.bond_offsets))
    out = tmp_path_factory.mktemp("graphs") / "fp256"
    out.mkdir()
    write_store(out, index[list(INDEX_COLUMNS)], graphs, radius=2, n_bits=FINGERPRINT_BITS)
    return out


def test_the_matrix_covers_every_choice_of_every_key():
    assert {"method", "model.molecule", "model.mode", "loss.counterfactual_mode", "loss.dmso_positives",
            "data.stream"} <= set(CHOICES)
    for key, choices in CHOICES.items():
        if key in OUTSIDE_THE_MATRIX:
            continue
        for choice in choices:
            assert any(case.get(key, DEFAULTS.get(key)) == choice for case in MATRIX), (key, choice)
    for method, molecule in itertools.product(METHODS, MOLECULE_ENCODERS):
        assert any(c.get("method", DEFAULTS.method) == method and c.get("model.molecule", "dmpnn") == molecule
                   for c in MATRIX), (method, molecule)


@pytest.fixture(scope="module")
def vector_table(tiny_screen, tmp_path_factory):
    """Frozen per-compound vectors (model.molecule=table) for every compound of the tiny screen."""
    ids = pd.read_csv(tiny_screen / "metadata" / "compound.csv.gz")[schema.JCP]
    table = pd.DataFrame(np.random.default_rng(0).normal(size=(len(ids), 12)), columns=[f"v{i}" for i in range(12)])
    table.insert(0, schema.JCP, ids.to_numpy())
    path = tmp_path_factory.mktemp("table") / "vectors.parquet"
    table.to_parquet(path)
    return path


@pytest.mark.parametrize("case", MATRIX, ids=_case_id)
def test_every_choice_trains_and_embeds(case, tiny_shards, fingerprint_store, vector_table, tmp_path, one_rank,
                                        caplog):
    from evaluate.embed import SiteEncoder, embed_shard
    from micon.chem.store import GraphStore
    from micon.embeddings import part_path, read_part
    from micon.models.molecule import graphs_to_torch
    from train.trainer import EXIT_OK, train

    t0 = time.perf_counter()
    out = tmp_path / "run"
    cfg = load_config(TrainConfig, None, [f"data.shards={tiny_shards}", f"data.graphs={fingerprint_store}",
                                          f"out={out}", f"model.molecule_table={vector_table}", *BASE,
                                          *_overrides(case)])
    with caplog.at_level(logging.INFO, logger="micon.train"):
        assert train(cfg) == EXIT_OK
    for line in cfg.unused():         # a setting the run does not read is said once, not refused
        assert caplog.text.count(line) == 1, line
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss/loss"]) for r in steps)

    ck = load_checkpoint(out)     # the one loader embed (and predict) use: the whole model comes back
    resolved = resolve_input_norm(cfg.model.input_norm, cfg.model.mode, False)   # as the record holds it
    assert ck.record.method == cfg.method and ck.record.model == {**to_dict(cfg.model), "input_norm": resolved}
    needs = get_method(cfg.method).data_needs(cfg.model)
    assert ck.record.fingerprint_bits == (FINGERPRINT_BITS if needs.fingerprints else 0)
    model = ck.build_model()
    if needs.molecules:
        store = GraphStore(fingerprint_store)
        ids = store.ids[:3]
        molecules = (torch.from_numpy(store.fingerprints(ids)).float() if needs.fingerprints
                     else torch.from_numpy(pd.read_parquet(vector_table).set_index(schema.JCP).loc[ids].to_numpy(
                         np.float32)) if needs.vectors else graphs_to_torch(store.batch(ids)))
        with torch.no_grad():
            compound = model.molecule_encoder(molecules)
        assert compound.shape == (3, cfg.model.molecule_dim) and torch.isfinite(compound).all()

    encoder = SiteEncoder(str(out), str(tiny_shards))
    shard = str(encoder.manifest.shard_paths()[0])
    emb_dir = tmp_path / "emb"
    (emb_dir / "parts").mkdir(parents=True)
    done = embed_shard(encoder, shard, emb_dir, batch_size=16, channels=len(encoder.manifest.channels))
    emb, meta = read_part(part_path(emb_dir, shard), done["rows"])
    assert emb.shape == (done["rows"], model.image_encoder.out_dim) and np.isfinite(emb).all()
    assert meta[schema.PLATE].nunique() == 1
    print(f"{_case_id(case)}: {time.perf_counter() - t0:.1f} s")


def test_impossible_pairs_are_refused_naming_both_keys():
    """Every pair of enumerated choices either builds or is refused with one line naming both keys."""
    refused = []
    flat = [(k, c) for k, cs in CHOICES.items() for c in cs]
    for (k1, c1), (k2, c2) in itertools.combinations(flat, 2):
        if k1 == k2:
            continue
        try:
            _config({k1: c1, k2: c2})
        except ConfigError as e:
            msg = str(e)
            assert "\n" not in msg and f"{k1}=" in msg and f"{k2}=" in msg, msg
            refused.append((k1, c1, k2, c2))
    assert refused, "no impossible pair found: the check itself may be broken"
    simclr = next(m for m, meth in METHODS.items() if not meth.needs.pairs)
    assert ("method", simclr, "data.stream", "replicate_sets") in refused
    with pytest.raises(ConfigError, match=r"^model\.per_channel_dim=200 with model\.mode=multichannel: "):
        _config({"model.per_channel_dim": 200})
    with pytest.raises(ConfigError, match=r"^model\.img_size=64 with model\.preset=resnet18: "):
        _config({"model.preset": "resnet18", "model.img_size": 64})
    with pytest.raises(ConfigError, match=r"^model\.molecule='smiles': choose one of dmpnn, fingerprint"):
        _config({"model.molecule": "smiles"})


def test_settings_a_method_does_not_read_are_named():
    readers = [m for m, meth in METHODS.items() if meth.needs.molecules]
    others = [m for m in METHODS if m not in readers]
    for method in others:
        cfg = load_config(TrainConfig, None, ["data.shards=s", f"method={method}", "model.molecule=fingerprint"])
        assert f"model.molecule=fingerprint is unused: method={method} does not read it" in cfg.unused()
    for method in readers:
        cfg = load_config(TrainConfig, None, ["data.shards=s", "data.graphs=g", f"method={method}",
                                              "model.molecule=fingerprint"])
        assert not [line for line in cfg.unused() if line.startswith("model.molecule=")]
    assert load_config(TrainConfig, None, ["data.shards=s", "data.graphs=g"]).unused() == []
