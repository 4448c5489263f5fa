"""deterministic=true: two MICON runs with one seed give bit-identical weights on CPU, weights that training
moved from the seed's initial ones. MICON because its molecule encoder sums messages with index_add, which
on CPU threads is not bit-reproducible otherwise (two default runs measured 1e-7 apart by step 4).
In-process, one rank, 3 steps each (the data stream is a pure function of the seed, rank and worker
layout: tests/test_pipeline.py)."""
from __future__ import annotations

import pytest
import torch

from micon.checkpoint import load_checkpoint
from micon.config import load_config
from micon.methods import get_method
from micon.models.factory import ModelConfig
from train.config import TrainConfig
from train.trainer import EXIT_OK, train

pytestmark = pytest.mark.slow   # two trainer runs (about 10 s on 2 idle cores)


def _weights(shards, graphs, out, seed: int) -> dict:
    cfg = load_config(TrainConfig, None, [f"data.shards={shards}", f"data.graphs={graphs}", f"out={out}",
                                          "method=micon", "micro_batch=4", "model.molecule_dim=16",
                                          "steps=3", f"seed={seed}", "deterministic=true",
                                          "progress=false", "wandb.enabled=false", "data.augment.crop=16",
                                          "model.projection_dim=8", "optim.warmup_steps=1"])
    assert train(cfg) == EXIT_OK
    assert not torch.are_deterministic_algorithms_enabled()   # the process's setting is restored at the end
    ck = load_checkpoint(out)
    assert ck.state["step"] == 3
    return ck


def test_one_seed_reproduces_bit_for_bit(tiny_shards, tiny_graphs, tmp_path, one_rank):
    first = _weights(tiny_shards, tiny_graphs, tmp_path / "a", seed=3)
    second = _weights(tiny_shards, tiny_graphs, tmp_path / "b", seed=3).weights
    assert first.weights.keys() == second.keys()
    different = [k for k in second if not torch.equal(first.weights[k], second[k])]
    assert not different, different[:5]
    torch.manual_seed(3)     # what the trainer builds before its first step
    r = first.record
    start = get_method("micon").build_model(ModelConfig(**r.model), len(r.channels), r.atom_dim, r.bond_dim,
                                            r.fingerprint_bits).state_dict()
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], second[k])]
    assert "image_encoder.backbone.conv1.0.weight" in moved    # the runs trained: equal weights are not the seed's
