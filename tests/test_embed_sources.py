"""The embedding job's data path and its reference sources: CPU decode tasks feeding the actors give the
bytes of the in-process reference (embed_shard), the device normalisation is the CPU's to the bit, and the
`oracle` (truth:SCREEN) and `untrained` (untrained:CKPT) rows are what they claim to be."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from evaluate.embed import EmbedConfig, ShardEmbedder, SiteEncoder, chunk_ranges, embed_shard, run
from micon import schema
from micon.checkpoint import InferenceRecord, load_checkpoint, save_model_file
from micon.data.shards import Manifest
from micon.embeddings import load_embeddings, part_path, read_part
from micon.methods import get_method
from micon.models.factory import ModelConfig


@pytest.fixture(scope="module")
def checkpoint(tiny_shards, tmp_path_factory):
    """A simclr model.pt for the tiny screen's channels (weights as initialised with seed 3, then nudged,
    so that `untrained` must rebuild rather than copy them)."""
    manifest = Manifest.load(tiny_shards)
    cfg = ModelConfig(preset="tiny", projection_dim=8)
    torch.manual_seed(3)
    model = get_method("simclr").build_model(cfg, len(manifest.channels))
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    record = InferenceRecord(method="simclr", model=vars(cfg), channels=list(manifest.channels),
                             preprocessing={"normalize": "plate"}, step=5)
    out = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model_file(out, weights, record, {"method": "simclr", "seed": 3}, {"step": 5})
    return out


def test_chunks_keep_the_forward_pass_batches():
    for n, chunk, bs in [(147, 256, 64), (147, 64, 64), (147, 100, 16), (5, 1, 4), (0, 8, 4)]:
        ranges = chunk_ranges(n, chunk, bs)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and all(lo % bs == 0 for lo, _ in ranges)


@pytest.mark.parametrize("normalize", ["plate", "none"])
def test_device_normalisation_is_the_cpu_preprocessing_to_the_bit(tiny_shards, normalize):
    """The actor's formula on the GPU ((float32(x) - mean) / std, tensor by tensor) run here with torch on
    the CPU: the same bits as SitePreprocessor's NumPy."""
    from micon.data.preprocess import Preprocessing, SitePreprocessor

    manifest = Manifest.load(tiny_shards)
    prep = SitePreprocessor(manifest, Preprocessing(normalize))
    rng = np.random.default_rng(0)
    plates = list(manifest.data["plates"])
    sites = rng.integers(0, 256, (6, len(manifest.channels), 16, 16), dtype=np.uint8)
    which = [plates[i % len(plates)] for i in range(6)]
    stats = [prep.stats(p) if normalize == "plate" else (np.zeros(5, np.float32), np.full(5, 255.0, np.float32))
             for p in which]
    offset = torch.from_numpy(np.stack([s[0] for s in stats]))[:, :, None, None]
    scale = torch.from_numpy(np.stack([s[1] for s in stats]))[:, :, None, None]
    device = (torch.from_numpy(sites).to(torch.float32) - offset) / scale
    assert device.numpy().tobytes() == prep.batch(sites, which).tobytes()


def test_the_jobs_decode_tasks_and_actor_give_the_reference_bytes(checkpoint, tiny_shards, tmp_path):
    """Chunks smaller than a shard, each decoded on its own, then embedded by the actor's code: every part
    byte-identical to embed_shard's (today's in-process path); and the in-process job (ray=false) too."""
    from evaluate.embed import decode_chunk

    manifest = Manifest.load(tiny_shards)
    reference, actor = SiteEncoder(str(checkpoint), str(tiny_shards)), ShardEmbedder(
        str(checkpoint), str(tiny_shards), str(tmp_path / "new"), 2, 1, "k")
    (tmp_path / "ref" / "parts").mkdir(parents=True)
    (tmp_path / "new" / "parts").mkdir(parents=True)
    for s in manifest.data["shards"][:3]:
        shard = str(manifest.root / "shards" / s["name"])
        embed_shard(reference, shard, tmp_path / "ref", 2, 5, "k")
        chunks = [decode_chunk(shard, lo, hi, 5, manifest.shard_checksums().get(s["name"]))
                  for lo, hi in chunk_ranges(s["n_samples"], 1, 2)]
        assert len(chunks) > 1
        actor.embed_shard(shard, chunks)
        (e0, m0), (e1, m1) = read_part(part_path(tmp_path / "ref", shard)), read_part(part_path(tmp_path / "new", shard))
        assert e0.tobytes() == e1.tobytes() and m0.equals(m1)
    info = run(str(checkpoint), tiny_shards, tmp_path / "job", EmbedConfig(ray=False, batch_size=2, chunk=3))
    meta, emb = load_embeddings(tmp_path / "job")
    first = read_part(part_path(tmp_path / "ref", manifest.data["shards"][0]["name"]))[0]
    assert emb[:len(first)].tobytes() == first.tobytes() and info["n_sites"] == manifest.data["n_sites"]


def test_untrained_is_the_runs_network_as_initialised(checkpoint, tiny_shards, tmp_path):
    ck = load_checkpoint(checkpoint)
    fresh = ck.untrained()
    torch.manual_seed(3)      # the run's seed, as the trainer seeds before building the model
    expected = get_method("simclr").build_model(ModelConfig(**ck.record.model), 5).state_dict()
    assert fresh.record.step == 0 and set(fresh.weights) == set(ck.weights)
    for k, v in expected.items():
        assert torch.equal(fresh.weights[k], v.float()), k
    assert any(not torch.equal(fresh.weights[k], ck.weights[k]) for k in ck.weights)
    info = run(f"untrained:{checkpoint}", tiny_shards, tmp_path / "u", EmbedConfig(ray=False, batch_size=16))
    assert info["method"] == "untrained" and info["identity"]["model"]["initialised_as"] == "simclr"


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def test_oracle_rows_equal_a_direct_computation_from_the_ground_truth(tiny_screen, tiny_shards, tmp_path):
    """truth:SCREEN through embed and evaluate's well profiles, against log(factors) computed here from
    ground_truth/compounds.csv and config.yaml: scale * m_s * d_s + the well's noise, with the source terms
    switched on (d_s = sqrt(1 - rho^2) d + rho u, m_s = m exp(N(0, sr)), drawn per source and compound)."""
    from evaluate.run import EvalConfig, evaluate_method
    from micon.eval.profiles import well_profiles
    from micon.synth import FACTOR_SCALE, FACTORS

    screen = tmp_path / "screen"
    shutil.copytree(tiny_screen / "ground_truth", screen / "ground_truth")
    cfg = yaml.safe_load((screen / "ground_truth" / "config.yaml").read_text())
    cfg.update(source_interaction=0.6, source_response=0.3, well_noise=0.07)
    (screen / "ground_truth" / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "oracle"
    run(f"truth:{screen}", tiny_shards, out, EmbedConfig())
    truth = pd.read_csv(screen / "ground_truth" / "compounds.csv").set_index(schema.JCP)
    rho, sr = cfg["source_interaction"], cfg["source_response"]

    def direct(source, plate, well, jcp):
        d = truth.loc[jcp, [f"phenotype_{f}" for f in FACTORS]].to_numpy(float)
        rng = np.random.default_rng([cfg["seed"], 19, _hash64(f"{source}/{jcp}")])
        u = rng.normal(0, 1, len(FACTORS))
        d_s = (np.sqrt(1 - rho ** 2) * d + rho * u).astype(np.float32)
        m_s = truth.loc[jcp, "magnitude"] * np.exp(rng.normal(0, sr))
        noise = np.random.default_rng([cfg["seed"], _hash64(f"{plate}/{well}/0")]).normal(0, cfg["well_noise"],
                                                                                           len(FACTORS))
        return FACTOR_SCALE * m_s * d_s + noise

    meta, emb = load_embeddings(out)
    expected = np.stack([direct(*r) for r in meta[[schema.SOURCE, schema.PLATE, schema.WELL, schema.JCP]].itertuples(
        index=False)])
    np.testing.assert_allclose(emb, expected, rtol=1e-6, atol=1e-6)
    result = evaluate_method("oracle", str(out), EvalConfig(embeddings={"oracle": str(out)}, ray=False,
                                                            bootstrap=2, null_size=100), None, say=lambda m: None)
    keys = [schema.SOURCE, schema.PLATE, schema.WELL]
    sites = meta.assign(_i=np.arange(len(meta)))
    first = sites.groupby(keys, sort=False).first().reset_index()
    direct_wells = np.stack([direct(*r) for r in first[[*keys, schema.JCP]].itertuples(index=False)])
    order = result["wells"][keys].merge(first[keys].assign(_j=np.arange(len(first))), on=keys)["_j"].to_numpy()
    np.testing.assert_allclose(result["raw"], direct_wells[order], rtol=1e-5, atol=1e-6)
    _, _, prof = well_profiles(result["wells"], direct_wells[order].astype(np.float32))
    np.testing.assert_allclose(result["prof"], prof, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_ray_job_gives_the_in_process_bytes(checkpoint, tiny_shards, tmp_path):
    """Ray CPU tasks (several chunks per shard) feeding 2 actors: embeddings.zarr the same bytes."""
    from tests.conftest import run_job

    run(str(checkpoint), tiny_shards, tmp_path / "local", EmbedConfig(ray=False, batch_size=2))
    proc = run_job("evaluate.embed", checkpoint, tiny_shards, tmp_path / "ray", "workers=2", "batch_size=2", "chunk=1")
    assert "embedded 144 sites from 12 shards" in proc.stdout
    (m0, e0), (m1, e1) = load_embeddings(tmp_path / "local"), load_embeddings(tmp_path / "ray")
    assert e0.tobytes() == e1.tobytes() and m0.equals(m1)


def test_a_damaged_shard_stops_the_job_naming_it(checkpoint, tiny_shards, tmp_path):
    from micon.raycluster import JobError

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    name = Manifest.load(shards).data["shards"][1]["name"]
    blob = bytearray((shards / "shards" / name).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (shards / "shards" / name).write_bytes(bytes(blob))
    with pytest.raises(JobError, match=rf"embed: shard {name} failed: .*does not match the checksum"):
        run(str(checkpoint), shards, tmp_path / "out", EmbedConfig(ray=False, batch_size=16))
