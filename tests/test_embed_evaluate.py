"""The embedding job (Ray Data actors) and the evaluation job, end to end on the tiny screen."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from evaluate.embed import SiteEncoder
from micon.embeddings import load_embeddings, part_path
from evaluate.run import EvalConfig, evaluate_method
from micon import schema
from micon.data.shards import Manifest, read_tar_samples
from micon.eval.handcrafted import blob_eccentricity, feature_names, site_features
from tests.conftest import run_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "simclr"
    run_job("train.run", "-", f"data.shards={tiny_shards}", f"out={out}", "method=simclr", "steps=3",
            "micro_batch=4", "progress=false", "wandb.enabled=false")
    return out


@pytest.fixture(scope="module")
def embedded(checkpoint, tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "simclr"
    proc = run_job("evaluate.embed", checkpoint, tiny_shards, out, "workers=2", "batch_size=16")
    assert "embedded 144 sites from 12 shards" in proc.stdout
    return out


def test_embeddings_match_the_encoder_and_carry_jump_metadata(embedded, checkpoint, tiny_shards):
    meta, emb = load_embeddings(embedded)
    m = Manifest.load(tiny_shards)
    assert len(meta) == len(emb) == m.data["n_sites"]
    for col in (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.SITE, schema.JCP, schema.ROLE):
        assert col in meta.columns
    assert not meta.duplicated([schema.PLATE, schema.WELL, schema.SITE]).any()
    # recompute one shard in-process with the checkpoint's image encoder
    enc = SiteEncoder(str(checkpoint), str(tiny_shards))
    shard = m.shard_paths()[3]
    samples = list(read_tar_samples(shard))
    direct = enc(np.stack([img for _, img, _ in samples]), [mt[schema.PLATE] for _, _, mt in samples])
    keys = meta[schema.PLATE] + "_" + meta[schema.WELL] + "_" + meta[schema.SITE]
    rows = [int(np.flatnonzero(keys == k)[0]) for k, _, _ in samples]
    np.testing.assert_allclose(emb[rows], direct, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ckpt", ["model", "image_stats"])
def test_decoding_in_threads_gives_the_same_embeddings(embedded, checkpoint, tiny_shards, tmp_path, ckpt):
    """Decoding the next batches in threads while the model embeds (threads= on a GPU) changes nothing:
    the same part, byte for byte, as one thread; and for the model, the encoder's own output."""
    from evaluate.embed import SiteEncoder, embed_shard
    from micon.embeddings import part_path, read_part

    enc = SiteEncoder(str(checkpoint) if ckpt == "model" else ckpt, str(tiny_shards))
    shard = Manifest.load(tiny_shards).shard_paths()[0]
    n = len(list(read_tar_samples(shard)))
    for threads in (1, 3):
        (tmp_path / f"t{threads}" / "parts").mkdir(parents=True)
        embed_shard(enc, shard, tmp_path / f"t{threads}", 2, 5, "k", threads=threads)
    (e1, m1), (e3, m3) = (read_part(part_path(tmp_path / f"t{t}", shard), n, "k") for t in (1, 3))
    np.testing.assert_array_equal(e1, e3)
    pd.testing.assert_frame_equal(m1, m3)
    if ckpt == "model":
        images = np.stack([img for _, img, _ in read_tar_samples(shard)])
        plates = [m[schema.PLATE] for _, _, m in read_tar_samples(shard)]
        np.testing.assert_allclose(e1, enc(images, plates), rtol=1e-5, atol=1e-6)


def test_rerun_repairs_missing_and_corrupt_parts(embedded, checkpoint, tiny_shards, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(embedded, out)
    names = [s["name"] for s in Manifest.load(tiny_shards).data["shards"]]
    part_path(out, names[0]).unlink()
    part_path(out, names[1]).write_bytes(b"\x00garbage")
    shutil.rmtree(out / "embeddings.zarr")
    with pytest.raises(Exception, match=r"embeddings.zarr is missing or corrupt .*rerun ./launch.sh embed"):
        load_embeddings(out)
    proc = run_job("evaluate.embed", checkpoint, tiny_shards, out, "workers=1")
    assert f"embedding part {part_path(out, names[1])} is corrupt" in proc.stderr
    assert "10 already embedded, 2 to do" in proc.stdout
    m1, e1 = load_embeddings(out)
    m0, e0 = load_embeddings(embedded)
    pd.testing.assert_frame_equal(m1, m0)
    np.testing.assert_allclose(e1, e0, rtol=1e-5, atol=1e-6)


def test_image_statistics():
    rng = np.random.default_rng(0)
    site = rng.integers(0, 30, (5, 64, 64)).astype(np.uint8)
    site[0, 10:20, 10:20] = 200   # one bright nucleus
    site[0, 40:50, 30:44] = 180   # and another, elongated
    f = site_features(site)
    names = feature_names(["DNA", "RNA", "ER", "AGP", "Mito"])
    assert f.shape == (len(names),) and np.isfinite(f).all()
    named = dict(zip(names, f))
    assert named["DNA_blob_count"] == 2
    assert named["DNA_blob_area_mean"] == pytest.approx((100 + 140) / 2)
    assert named["RNA_mean"] == pytest.approx(site[1].mean(), rel=1e-6)
    assert named["ER_p50"] == pytest.approx(np.percentile(site[2], 50))
    x = site[3].astype(np.float64)
    assert named["AGP_sqdiff_1px"] == pytest.approx(((np.diff(x, axis=1) ** 2).mean() + (np.diff(x, axis=0) ** 2).mean()) / 2,
                                                   rel=1e-5)


def test_blob_eccentricity_matches_scikit_image_on_random_blobs():
    from scipy import ndimage
    from skimage.measure import regionprops

    rng = np.random.default_rng(1)
    for _ in range(5):
        labels, n = ndimage.label(ndimage.binary_opening(rng.random((48, 48)) < 0.45))
        expected = [p.eccentricity for p in regionprops(labels)]
        np.testing.assert_allclose(blob_eccentricity(labels, n), expected, atol=1e-5)


def test_evaluate_job_writes_metrics_report_and_ray_equals_single_process(embedded, tmp_path):
    out = tmp_path / "eval"
    proc = run_job("evaluate.run", f"out={out}", f"embeddings.simclr={embedded}", "null_size=500")
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["methods"]) == {"simclr"}
    # progress inside the stages, as plain lines in a log (blocks done / total, rate, elapsed)
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    assert "Token authentication is enabled" not in proc.stderr      # Ray's default, not a fault to report
    assert re.search(r"top-k query blocks: (\d+)/\1 blocks \(100%\), [\d.]+ blocks/s", proc.stderr), proc.stderr
    assert re.search(r"average precision blocks: (\d+)/\1 blocks \(100%\)", proc.stderr)
    m = doc["methods"]["simclr"]
    for key in ("nsb_top1", "nsb_top10", "nss_top1", "nss_top10", "map_activity", "fraction_retrieved"):
        assert 0 <= m[key] <= 1
    assert m["nsb_top1"] <= m["nsb_top10"] and m["nss_top1"] <= m["nss_top10"]
    # every stringency, each with its chance level: NR (no restriction) admits the most candidates
    for mode in ("nr", "nsb", "nss", "nsp", "nsl"):
        assert 0 <= m[f"{mode}_top1"] <= m[f"{mode}_top10"] <= 1 and 0 <= m[f"{mode}_top1_chance"] <= 1
        assert m[f"n_queries_{mode}"] <= m["n_queries_nr"]
    for png in ("topk_curves.png", "map_fraction_retrieved.png", "profiles_pca_simclr.png"):
        assert (out / png).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| simclr |" in report and "](topk_curves.png)" in report
    assert list((out / "wandb").glob("offline-run-*"))
    single = evaluate_method("simclr", str(embedded), EvalConfig(embeddings={"simclr": str(embedded)}, ray=False,
                                                                   null_size=500), None)["metrics"]
    for key in ("nsb_top1", "nsb_top10", "nss_top1", "nss_top10", "nsp_top1", "nr_top1", "nsl_top10", "map_activity"):
        assert single[key] == pytest.approx(m[key]), key


def test_evaluate_names_a_corrupt_embedding_file(embedded, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(embedded, out)
    (out / "sites.parquet").write_bytes(b"not parquet")
    proc = run_job("evaluate.run", f"out={tmp_path / 'eval'}", f"embeddings.simclr={out}", check=False)
    assert proc.returncode == 1
    assert f"evaluate: simclr: {out / 'sites.parquet'} is missing or corrupt" in proc.stderr
    assert "rerun ./launch.sh embed" in proc.stderr


def _without_dmso(tiny_shards, dst, plate=None):
    """A copy of the shard set whose plate `plate` (default: the first) has no DMSO statistics."""
    shutil.copytree(tiny_shards, dst)
    doc = json.loads((dst / "manifest.json").read_text())
    plate = plate or sorted(doc["plates"])[0]
    doc["plates"][plate]["stats"] = dict(mean=None, std=None, n_sites=0)
    (dst / "manifest.json").write_text(json.dumps(doc))
    return plate, doc


def test_training_and_embedding_preprocess_a_site_identically(checkpoint, tiny_shards, tmp_path):
    import torch

    from micon.data.pipeline import Augment, ExampleStream, StreamConfig
    from micon.data.preprocess import Preprocessing
    from micon.methods import get_method

    shards = tmp_path / "shards"
    plate, doc = _without_dmso(tiny_shards, shards)
    enc = SiteEncoder(str(checkpoint), str(shards))
    # the training stream with augmentation off: its views are the preprocessed sites themselves
    cfg = StreamConfig(needs=get_method("simclr").needs, batch_size=8, shuffle_buffer=4,
                       preprocessing=Preprocessing(normalize="plate"),
                       augment=Augment(crop=0, flip=False, rot90=False, intensity_jitter=0.0))
    stream = iter(ExampleStream(str(shards), cfg, 0, 1, 0))
    sites = {k: (img, m) for path in Manifest.load(shards).shard_paths() for k, img, m in read_tar_samples(path)}
    seen_plates = set()
    for _ in range(len(sites) // 8):
        batch = next(stream)
        for key, view in zip(batch["keys"], batch["views"][:, 0]):
            img, meta = sites[key]
            embed_input = enc.preprocess(img[None], [meta[schema.PLATE]])[0]
            assert embed_input.dtype == np.float32 and np.isfinite(embed_input).all()
            torch.testing.assert_close(view, torch.from_numpy(embed_input), rtol=0, atol=0)
            seen_plates.add(meta[schema.PLATE])
    assert plate in seen_plates
    # the plate without DMSO is normalised with the screen-wide average of the other plates' DMSO stats
    others = [p["stats"] for name, p in doc["plates"].items() if name != plate]
    mean, std = np.mean([s["mean"] for s in others], axis=0), np.mean([s["std"] for s in others], axis=0)
    img = next(img for img, m in sites.values() if m[schema.PLATE] == plate)
    expected = (img.astype(np.float32) - mean.astype(np.float32)[:, None, None]) / \
        np.maximum(std, 1e-3).astype(np.float32)[:, None, None]
    np.testing.assert_allclose(enc.preprocess(img[None], [plate])[0], expected, rtol=1e-6, atol=1e-6)


def test_embed_job_handles_a_plate_without_dmso(checkpoint, tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    plate, _ = _without_dmso(tiny_shards, shards)
    out = tmp_path / "emb"
    proc = run_job("evaluate.embed", checkpoint, shards, out, "workers=1")
    assert f"embed: plate {plate} has no DMSO sites" in proc.stderr
    meta, emb = load_embeddings(out)
    assert np.isfinite(emb).all() and (meta[schema.PLATE] == plate).any()


def test_topk_columns_are_named_by_their_k(embedded):
    m = evaluate_method("simclr", str(embedded), EvalConfig(embeddings={"simclr": str(embedded)}, ray=False,
                                                            null_size=100, max_k=5), None)["metrics"]
    assert {"nsb_top1", "nsb_top5", "nss_top5", "nsp_top5"} <= set(m) and "nsb_top10" not in m


def test_evaluate_fails_on_non_finite_profiles(embedded, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(embedded, out)
    from micon.embeddings import write_consolidated

    meta, emb = load_embeddings(out)
    emb[0, :] = np.nan         # a diverged model's output, written consistently (checksum and all)
    write_consolidated(out, emb, meta, json.loads((out / "embed.json").read_text()))
    proc = run_job("evaluate.run", f"out={tmp_path / 'eval'}", f"embeddings.simclr={out}", "ray=false",
                   "wandb=false", check=False)
    assert proc.returncode == 1
    assert "evaluate: simclr: 1 of 144 site embeddings are not finite as embedded (plates: " in proc.stderr
    assert meta[schema.PLATE].iloc[0] in proc.stderr


def test_embedding_another_model_into_the_same_directory_is_refused(embedded, checkpoint, tiny_shards, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(embedded, out)
    other = tmp_path / "other"
    run_job("train.run", "-", f"data.shards={tiny_shards}", f"out={other}", "method=simclr", "steps=2",
            "micro_batch=4", "progress=false", "wandb.enabled=false", "seed=7")
    proc = run_job("evaluate.embed", other, tiny_shards, out, "workers=1", check=False)
    assert proc.returncode == 1
    assert f"embed: {out} holds embeddings of simclr checkpoint" in proc.stderr
    assert "(another model). Use another output directory, or pass overwrite=true" in proc.stderr
    np.testing.assert_array_equal(load_embeddings(out)[1], load_embeddings(embedded)[1])   # nothing touched
    proc = run_job("evaluate.embed", other, tiny_shards, out, "workers=1", "overwrite=true")
    assert "0 already embedded, 12 to do" in proc.stdout
    info = json.loads((out / "embed.json").read_text())
    assert info["identity"]["model"]["path"].startswith(str(other))
    assert not np.allclose(load_embeddings(out)[1], load_embeddings(embedded)[1])
    # another shard set is another identity too
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    doc = json.loads((shards / "manifest.json").read_text())
    doc["splits"]["seed"] = 99
    (shards / "manifest.json").write_text(json.dumps(doc))
    proc = run_job("evaluate.embed", other, shards, out, "workers=1", check=False)
    assert proc.returncode == 1 and "(another shard set)" in proc.stderr


def test_a_lost_zarr_chunk_is_detected(embedded, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(embedded, out)
    chunks = [p for p in (out / "embeddings.zarr").rglob("*") if p.is_file() and "zarr.json" not in p.name]
    assert chunks
    chunks[0].unlink()
    with pytest.raises(Exception, match="does not match the checksum recorded in embed.json"):
        load_embeddings(out)


def test_evaluate_refuses_a_misspelt_label_and_a_missing_directory(embedded, tmp_path):
    proc = run_job("evaluate.run", f"out={tmp_path / 'eval'}", f"embeddings.simcrl={embedded}", "ray=false",
                   "wandb=false", check=False)
    assert proc.returncode == 1
    assert "label 'simcrl' does not name the method that made" in proc.stderr and "embeddings.simclr=" in proc.stderr
    m = evaluate_method("simclr_seed1", str(embedded), EvalConfig(embeddings={"x": "y"}, ray=False, null_size=50),
                        None)
    assert m["metrics"]["n_wells"] > 0
    proc = run_job("evaluate.run", f"out={tmp_path / 'eval'}", f"embeddings.simclr={tmp_path / 'nope'}", "ray=false",
                   "wandb=false", check=False)
    assert proc.returncode == 1 and "does not exist: embed first" in proc.stderr


def test_evaluate_plates_without_dmso(embedded, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(embedded, out)
    meta, emb = load_embeddings(out)
    plate = sorted(meta[schema.PLATE].unique())[0]
    keep = ~((meta[schema.PLATE] == plate) & (meta[schema.ROLE] == schema.NEGCON)).to_numpy()
    meta, emb = meta[keep].reset_index(drop=True), emb[keep]
    from micon.embeddings import write_consolidated
    write_consolidated(out, emb, meta, json.loads((out / "embed.json").read_text()))
    common = (f"embeddings.simclr={out}", "ray=false", "wandb=false", "null_size=100")
    proc = run_job("evaluate.run", f"out={tmp_path / 'e1'}", *common, check=False)
    assert proc.returncode == 1
    assert f"1 plate(s) have no DMSO well to normalise against: {plate}. Pass plates_without_dmso=drop" in proc.stderr
    drop = run_job("evaluate.run", f"out={tmp_path / 'e2'}", *common, "plates_without_dmso=drop")
    assert f"of 1 plate(s) without DMSO: {plate}" in drop.stderr
    batch = run_job("evaluate.run", f"out={tmp_path / 'e3'}", *common, "plates_without_dmso=batch")
    assert "normalised against their batch's (else source's) DMSO" in batch.stderr
    n2 = json.loads((tmp_path / "e2" / "metrics.json").read_text())["methods"]["simclr"]["n_wells"]
    n3 = json.loads((tmp_path / "e3" / "metrics.json").read_text())["methods"]["simclr"]["n_wells"]
    assert n3 > n2


def test_profiles_parquet_gives_copairs_the_same_map(embedded, tmp_path):
    """The written well profiles, read as a user would and scored by copairs itself, give metrics.json's mAP."""
    from copairs import map as copairs_map
    from copairs.matching import assign_reference_index

    out = tmp_path / "eval"
    run_job("evaluate.run", f"out={out}", f"embeddings.simclr={embedded}", "ray=false", "wandb=false",
            "null_size=200")
    table = pd.read_parquet(out / "profiles_simclr.parquet")
    meta_cols = [c for c in table.columns if c.startswith("Metadata_")]
    feats = table[[c for c in table.columns if not c.startswith("Metadata_")]].to_numpy()
    assert meta_cols[:3] == [schema.SOURCE, schema.BATCH, schema.PLATE] and feats.dtype == np.float32
    assert schema.ROLE not in table.columns and set(table["Metadata_pert_type"]) <= {"trt", "negcon", "poscon"}
    keep = table["Metadata_pert_type"].isin(["trt", "poscon", "negcon"]).to_numpy()
    meta = table.loc[keep, meta_cols].reset_index(drop=True)
    ref = assign_reference_index(meta, f"{schema.JCP} == '{schema.DMSO}'", reference_col="Metadata_Reference_Index")
    ap = copairs_map.average_precision(ref, feats[keep], pos_sameby=[schema.JCP, "Metadata_Reference_Index"],
                                       pos_diffby=[], neg_sameby=[schema.PLATE],
                                       neg_diffby=[schema.JCP, "Metadata_Reference_Index"], progress_bar=False)
    maps = copairs_map.mean_average_precision(ap, [schema.JCP], null_size=200, threshold=0.05, seed=0,
                                              progress_bar=False, cache_dir=tmp_path / "cache")
    mine = json.loads((out / "metrics.json").read_text())["methods"]["simclr"]
    assert maps["mean_average_precision"].mean() == pytest.approx(mine["map_activity"], abs=1e-4)
