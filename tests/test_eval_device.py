"""The torch device path of retrieval and mAP (device="cuda" on a GPU) run here on the CPU
(device="torch:cpu"): the same top-k neighbours, hit rates, per-query frames, APs and mAPs as the NumPy
CPU path, on random profiles with planted ties, two tables, short galleries and every tie rule."""
from __future__ import annotations

import numpy as np
import pytest

from micon import schema
from micon.eval import map as mapm
from micon.eval.retrieval import resolve_device, topk_hit_rate, topk_neighbours
from tests.test_eval_retrieval import random_wells


def profiles(n: int, d: int, rng: np.random.Generator, ties: bool) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    if ties:
        x = np.round(x, 0)                  # many equal similarities
        x[10:40] = x[3]                     # exact duplicates
    return x


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_topk_on_a_device_equals_the_cpu_path(seed, ties):
    rng = np.random.default_rng(seed)
    meta = random_wells(300, rng)
    x = profiles(300, 8, rng, ties)
    kw = dict(ks=range(1, 8), per_query=True, gallery_negcon=bool(seed % 2))
    want = topk_hit_rate(meta, x, block_size=64, gallery_chunk=97, device="cpu", **kw)
    got = topk_hit_rate(meta, x, block_size=50, gallery_chunk=97, device="torch:cpu", **kw)
    assert want[0].equals(got[0]) and want[1].equals(got[1])
    v0, r0, q0 = topk_neighbours(meta, x, k=6, gallery_chunk=128, device="cpu")
    v1, r1, q1 = topk_neighbours(meta, x, k=6, gallery_chunk=128, device="torch:cpu")
    assert np.array_equal(q0, q1)
    for mode in r0:
        np.testing.assert_array_equal(r0[mode], r1[mode])
        np.testing.assert_array_equal(v0[mode], v1[mode])


def test_topk_on_a_device_two_tables_and_short_gallery():
    rng = np.random.default_rng(5)
    qm, gm = random_wells(120, rng), random_wells(9, rng)      # fewer gallery wells than k
    qx, gx = profiles(120, 6, rng, True), profiles(9, 6, rng, True)
    for chunk in (4, 1000):
        want = topk_hit_rate(qm, qx, gm, gx, ks=range(1, 12), gallery_chunk=chunk, device="cpu", per_query=True)
        got = topk_hit_rate(qm, qx, gm, gx, ks=range(1, 12), gallery_chunk=chunk, device="torch:cpu", per_query=True)
        assert want[0].equals(got[0]) and want[1].equals(got[1])


@pytest.mark.parametrize("ties", ["expected", "positives_first", "negatives_first"])
def test_map_on_a_device_equals_the_cpu_path(ties):
    rng = np.random.default_rng(11)
    meta = random_wells(250, rng, n_compounds=40)
    x = profiles(250, 6, rng, True)
    for fn in (mapm.phenotypic_activity, mapm.phenotypic_consistency):
        ap0, map0 = fn(meta, x, null_size=100, ties=ties, device="cpu")
        ap1, map1 = fn(meta, x, null_size=100, ties=ties, device="torch:cpu")
        assert ap0.equals(ap1) and map0.equals(map1)
    # diffby on both rules, and a pair that meets both rules (counted twice, as copairs does)
    rules = ([schema.JCP], [schema.PLATE], [], [schema.SOURCE])
    ap0 = mapm.average_precision(meta, x, *rules, ties=ties, device="cpu")
    ap1 = mapm.average_precision(meta, x, *rules, ties=ties, device="torch:cpu")
    assert ap0.equals(ap1)


def test_map_on_a_device_blocks_do_not_matter(monkeypatch):
    rng = np.random.default_rng(3)
    meta = random_wells(200, rng)
    x = profiles(200, 5, rng, False)
    want = mapm.average_precision(meta, x, [schema.JCP], [], [], [schema.JCP], device="cpu")
    monkeypatch.setattr(mapm, "DEVICE_BLOCK_SIMS", 200 * 7)    # 7 queries per block
    got = mapm.average_precision(meta, x, [schema.JCP], [], [], [schema.JCP], device="torch:cpu")
    assert want.equals(got)


def test_resolve_device():
    import torch

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("torch:cpu") == "torch:cpu" and resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == "cuda:0"
    else:
        with pytest.raises(ValueError, match="torch sees no GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="choose auto, cpu"):
        resolve_device("gpu")
