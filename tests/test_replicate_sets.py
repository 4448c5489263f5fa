"""Replicate-set shards: the planner against a direct pandas computation on a JUMP-like index, the
pairing, restartable building with identical bytes, the report of compounds left out, weights, and a
stream with nothing readable stopping with the shards' names."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from micon import schema
from micon.data.replicate_sets import (PAIR_LEVELS, ReplicateSetConfig, pair_score, pair_wells,
                                       plan_replicate_sets)
from tests.conftest import run_job


def jump_like_index(n_compounds=40, n_sources=4, batches=2, plates=3, replicates=5, sites=3, dmso=2, seed=0):
    """A site index with cpg0016's structure: one well per compound per plate, replicates over sources."""
    rng = np.random.default_rng(seed)
    plate_ids = [(f"s{s}", f"s{s}b{b}", f"s{s}b{b}p{p}") for s in range(n_sources) for b in range(batches)
                 for p in range(plates)]
    rows, k = [], 0

    def add(src, bat, pl, well, jcp, role):
        nonlocal k
        for site in range(1, sites + 1):
            rows.append({"key": f"{pl}_{well}_{site}", "shard": f"{pl}-0000.tar", "offset": 512 * k, "size": 100 + k % 7,
                         "codec": "dzstd", schema.SOURCE: src, schema.BATCH: bat, schema.PLATE: pl, schema.WELL: well,
                         schema.SITE: str(site), schema.JCP: jcp, schema.INCHIKEY: "", schema.SMILES: "",
                         schema.ROLE: role})
            k += 1

    for c in range(n_compounds):
        for i, p in enumerate(rng.choice(len(plate_ids), size=replicates, replace=False)):
            add(*plate_ids[p], f"C{c:02d}r{i}", f"JCP2022_{c:06d}", schema.TREATED)
    for src, bat, pl in plate_ids:
        for d in range(dmso):
            add(src, bat, pl, f"D{d:02d}", schema.DMSO, schema.NEGCON)
    return pd.DataFrame(rows)


NO_SPLITS = {"heldout_sources": [], "heldout_batches": [], "heldout_compounds": []}


def test_planner_matches_a_direct_computation():
    index = jump_like_index()
    # take away wells so that one compound keeps a single well; hold one compound and one batch out
    lone = "JCP2022_000003"
    keep = index[(index[schema.JCP] == lone) & (index[schema.BATCH] != "s3b1")][schema.WELL].iloc[0]
    index = index[~((index[schema.JCP] == lone) & (index[schema.WELL] != keep))]
    splits = {"heldout_sources": [], "heldout_batches": ["s3b1"], "heldout_compounds": ["JCP2022_000007"]}
    samples, report = plan_replicate_sets(index, splits, ReplicateSetConfig(seed=1))
    idx = index.reset_index(drop=True)

    train = idx[(idx[schema.ROLE] == schema.TREATED) & (idx[schema.BATCH] != "s3b1")
                & (idx[schema.JCP] != "JCP2022_000007")]
    wells = train.groupby(schema.JCP).apply(lambda g: g[[schema.PLATE, schema.WELL]].drop_duplicates().shape[0])
    expected = {c: n for c, n in wells.items() if n >= 2}
    assert {s["compound"] for s in samples} == set(expected)
    assert set(report[schema.JCP]) == {c for c, n in wells.items() if n < 2} and lone in set(report[schema.JCP])
    assert report.set_index(schema.JCP).loc[lone, "reason"] == "1 usable well (needs 2)"
    sites = train.groupby(schema.JCP)[schema.SITE].nunique()
    for s in samples:
        t, c = idx.loc[s["t"]], idx.loc[s["c"]]
        assert len(t) == expected[s["compound"]] and (t[schema.JCP] == s["compound"]).all()
        assert t[[schema.PLATE, schema.WELL]].drop_duplicates().shape[0] == len(t)       # one site per well
        assert (c[schema.ROLE] == schema.NEGCON).all() and s["level"] == ["plate"] * len(t)
        assert list(c[schema.PLATE]) == list(t[schema.PLATE])                          # the well's own plate
    slots = pd.Series([s["compound"] for s in samples]).value_counts()
    assert (slots == sites[slots.index]).all()                                          # one sample per site slot
    # every training site appears in some sample
    used = {r for s in samples for r in s["t"]}
    assert set(train.index[train[schema.JCP].isin(expected)]) == used


def test_plate_without_dmso_falls_back_to_its_batch_and_big_compounds_are_split():
    index = jump_like_index(n_compounds=6, replicates=20, plates=6, sites=1)
    index = index[~((index[schema.PLATE] == "s0b0p0") & (index[schema.ROLE] == schema.NEGCON))]
    samples, _ = plan_replicate_sets(index, NO_SPLITS, ReplicateSetConfig(max_wells_per_set=8))
    idx = index.reset_index(drop=True)
    assert max(len(s["t"]) for s in samples) <= 8
    per_compound = pd.Series([s["compound"] for s in samples]).value_counts()
    assert (per_compound == 3).all()          # 20 wells -> 3 sets of 6-7 wells
    for s in samples:
        for t, c, level in zip(s["t"], s["c"], s["level"]):
            if idx.loc[t, schema.PLATE] == "s0b0p0":
                assert level == "batch" and idx.loc[c, schema.BATCH] == idx.loc[t, schema.BATCH]
            else:
                assert level == "plate"


@pytest.mark.parametrize("seed", range(5))
def test_pairing_covers_every_well_and_prefers_other_sources(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    metas = [{schema.SOURCE: f"s{rng.integers(3)}", schema.BATCH: f"b{rng.integers(2)}",
              schema.PLATE: f"p{i}", schema.WELL: "A01"} for i in range(n)]
    pairs = pair_wells(metas, np.random.default_rng(seed))
    assert len(pairs) == -(-n // 2)
    assert {i for p in pairs for i in p[:2]} == set(range(n))
    for i, j, level in pairs:
        assert i != j and level == PAIR_LEVELS[len(PAIR_LEVELS) - pair_score(metas[i], metas[j])]
    # at least as many cross-source pairs as a greedy pairing can guarantee: every pair whose first well
    # had a partner from another source left takes one
    by_source = pd.Series([m[schema.SOURCE] for m in metas]).value_counts()
    if by_source.max() <= n // 2:
        assert sum(level == "source" for *_, level in pairs[: n // 2]) >= 1


def _tars(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


@pytest.mark.slow
def test_building_is_restartable_with_identical_bytes_and_reports(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    rs = shards / "replicate_sets"
    first = _tars(rs)
    doc = json.loads((rs / "manifest.json").read_text())
    assert len(first) >= 4 and doc["n_samples"] == sum(s["n_samples"] for s in doc["shards"])
    assert set(doc["controls_by_level"]) == {"plate"}
    # a kill half-way: the finished manifest never written, half the shards missing, one half-written
    names = sorted(first)
    (rs / "manifest.json").unlink()
    (rs / "plan.json").write_text(json.dumps({"fingerprint": doc["fingerprint"], "shards": names}))
    for n in names[::2]:
        (rs / n).unlink()
    (rs / (names[0] + ".tmp")).write_bytes(b"half a tar")
    proc = run_job("data_prep.replicate_sets", shards)
    assert f"{len(names) - len(names[::2])} already written, {len(names[::2])} to write" in proc.stdout
    assert _tars(rs) == first and not list(rs.glob("*.tmp"))
    # weights: one compound down to zero, one absent from the table: both left out, with the reason
    compounds = sorted(doc["compounds"])
    table = pd.DataFrame({schema.JCP: compounds[1:], "weight": [0.0] + [1.0] * (len(compounds) - 2)})
    table.to_csv(tmp_path / "weights.csv", index=False)
    proc = run_job("data_prep.replicate_sets", shards, f"weights={tmp_path / 'weights.csv'}")
    assert "were made from other plate shards or options; rebuilding" in proc.stderr or "rebuilding" in proc.stderr
    doc2 = json.loads((rs / "manifest.json").read_text())
    assert doc2["left_out"] == {compounds[0]: "not in the weights table", compounds[1]: "weight 0"}
    assert set(doc2["compounds"]) == set(compounds[2:])
    report = pd.read_csv(shards / "replicate_sets_report.csv")
    assert set(report[schema.JCP]) == {compounds[0], compounds[1]}


@pytest.mark.slow
def test_a_stream_with_nothing_readable_stops_naming_its_shards(tiny_shards, tmp_path):
    from micon.data.pipeline import DataStreamError, ExampleStream, StreamConfig
    from micon.methods import get_method

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    for p in (shards / "replicate_sets").glob("*.tar"):
        p.write_bytes(p.read_bytes()[:300])
    cfg = StreamConfig(needs=get_method("micon").needs, batch_size=2, replicate_sets=True)
    with pytest.raises(DataStreamError, match=r"read no usable sample from its \d+ shards \(rset-0000"):
        next(iter(ExampleStream(str(shards), cfg, 0, 1, 0)))


@pytest.mark.slow
def test_end_to_end_on_a_jump_structured_screen(tmp_path):
    """synth (cpg0016's replicate structure: one well per compound per plate, 5 wells over 4 sources,
    24 plates) -> prep (plate shards + replicate sets) -> featurize -> train MICON a few steps."""
    screen, shards, graphs, out = (tmp_path / n for n in ("screen", "shards", "graphs", "train"))
    run_job("data_prep.synth", screen, "preset=jumplike", "n_sources=4", "batches_per_source=2", "plates_per_batch=3",
            "n_compounds=96", "seed=3")
    wells = pd.read_csv(screen / "metadata" / "well.csv.gz")
    treated = wells[wells[schema.JCP].str.startswith("JCP2022_") & (wells[schema.JCP] != schema.DMSO)]
    assert treated.groupby([schema.JCP, schema.PLATE]).size().max() <= 3      # poscons aside, one well per plate
    # two sources and a batch held out: some compounds keep a single training well (the report lists them)
    proc = run_job("data_prep.ingest", screen, shards, "shard_mb=0.3", "workers=2", "heldout_sources=2",
                   "heldout_batches=1")
    assert "rsets: wrote" in proc.stdout
    # the report beside the shards lists every treated compound with fewer than two training wells
    from micon.data.shards import Manifest
    manifest, index = Manifest.load(shards), pd.read_parquet(shards / "site_index.parquet")
    index = index[index[schema.ROLE] == schema.TREATED]
    train = index[[manifest.split_of(r) == "train" for r in index.to_dict("records")]]
    n_wells = train.drop_duplicates([schema.JCP, schema.PLATE, schema.WELL]).groupby(schema.JCP).size()
    lone = set(n_wells[n_wells < 2].index)
    report = pd.read_csv(shards / "replicate_sets_report.csv")
    assert lone and set(report[schema.JCP]) == lone, (sorted(lone), report)
    assert report["reason"].str.fullmatch(r"1 usable well \(needs 2\)").all()
    run_job("data_prep.featurize", screen / "metadata" / "compound.csv.gz", graphs, "workers=1")
    proc = run_job("train.run", "-", "method=micon", f"data.shards={shards}", f"data.graphs={graphs}", f"out={out}",
                   "steps=6", "micro_batch=8", "progress=false", "wandb.enabled=false", "data.num_workers=2",
                   "data.shuffle_buffer=8")
    assert "data: replicate-set shards" in proc.stderr
    counts = json.loads((out / "final.json").read_text())["counts"]
    assert counts["examples"] >= 6 * 8
    assert counts["pairs_across_source"] >= 0.85 * counts["examples"]
    assert counts["controls_plate"] == 2 * counts["examples"] and counts["controls_batch"] == 0
    rs = json.loads((shards / "replicate_sets" / "manifest.json").read_text())
    assert rs["n_samples"] > 0 and set(rs["controls_by_level"]) == {"plate"}


def test_a_method_without_controls_reads_whichever_path_is_cheaper():
    """CLIP pairs replicates but uses no controls: on a TARGET2-like screen (every compound on every
    plate, few loader streams) the plate shards waste less than replicate sets' controls; at cpg0016's
    structure (5 wells on 5 plates, 80 streams) a stream rarely holds two wells of a compound."""
    from micon.data.replicate_sets import stream_estimates
    from micon.data.shards import Manifest

    def manifest(n_sites, n_compounds, wells, sites_per_well):
        treated = n_compounds * wells * sites_per_well
        m = Manifest(Path("."), {"n_sites": n_sites})
        m.__dict__["replicate_sets"] = {"n_images": 2 * treated, "controls_by_level": {"plate": treated},
                                        "compounds": {f"c{i}": {"n_wells": wells} for i in range(n_compounds)}}
        return m

    target2 = manifest(n_sites=1620, n_compounds=120, wells=6, sites_per_well=2)
    est = stream_estimates(target2, n_slots=2, pair_buffer=4096)
    assert est["replicate_sets"] == pytest.approx(0.5)
    assert est["plates"] == pytest.approx(1440 / 1620 * (1 - 0.5 ** 5))
    assert est["plates"] > est["replicate_sets"]
    jump = manifest(n_sites=5_900_000, n_compounds=112_000, wells=5, sites_per_well=9)
    est = stream_estimates(jump, n_slots=80, pair_buffer=50_000)
    assert est["plates"] < 0.05 < est["replicate_sets"]


@pytest.mark.parametrize("seed", range(5))
def test_pairing_within_source_first_takes_another_batch_of_the_same_source(seed):
    """within_source: a well is paired with another batch of its own source whenever one is left, else with
    another source; a direct count over random layouts (the greedy order is the same as the default's)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 12))
    metas = [{schema.SOURCE: f"s{rng.integers(3)}", schema.BATCH: f"b{rng.integers(3)}",
              schema.PLATE: f"p{i}", schema.WELL: "A01"} for i in range(n)]
    pairs = pair_wells(metas, np.random.default_rng(seed), within_source=True)
    assert len(pairs) == -(-n // 2) and {i for p in pairs for i in p[:2]} == set(range(n))
    left = set(range(n))
    for i, j, level in pairs[: n // 2]:
        left.discard(i)
        same_source_other_batch = [k for k in left if metas[k][schema.SOURCE] == metas[i][schema.SOURCE]
                                   and metas[k][schema.BATCH] != metas[i][schema.BATCH]]
        assert (level == "batch") == bool(same_source_other_batch), (i, j, level, same_source_other_batch)
        left.discard(j)
    # the default keeps preferring another source
    default = pair_wells(metas, np.random.default_rng(seed))
    assert default == pair_wells(metas, np.random.default_rng(seed), within_source=False)
