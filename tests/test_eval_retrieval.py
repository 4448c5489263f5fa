"""NR / NSB / NSS / NSP / NSL top-k hit rate: blockwise vs brute force, planted structure, a fixed layout's position
confound, Ray == single process."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from micon import schema
from micon.eval.retrieval import MODES, topk_hit_rate, topk_hit_rate_ray, topk_neighbours

KS = range(1, 11)


def random_wells(n: int, rng: np.random.Generator, n_compounds: int = 40, dmso_frac: float = 0.15,
                 n_sources: int = 3, batches_per_source: int = 2, plates_per_batch: int = 2) -> pd.DataFrame:
    """Random well metadata: sources/batches/plates assigned at random, compounds with replicates, DMSO."""
    source = rng.integers(0, n_sources, n)
    batch = rng.integers(0, batches_per_source, n)
    plate = rng.integers(0, plates_per_batch, n)
    compound = np.array([f"JCP2022_{i:06d}" for i in rng.integers(1, n_compounds + 1, n)], dtype=object)
    compound[rng.random(n) < dmso_frac] = schema.DMSO
    meta = pd.DataFrame({
        schema.SOURCE: [f"source_{s}" for s in source],
        # batch names are reused across sources on purpose: keys must include the source
        schema.BATCH: [f"batch_{b}" for b in batch],
        schema.PLATE: [f"plate_{s}_{b}_{p}" for s, b, p in zip(source, batch, plate)],
        schema.WELL: [f"W{i:05d}" for i in range(n)],
        schema.JCP: compound,
    })
    meta[schema.ROLE] = [schema.role_of(j) for j in meta[schema.JCP]]
    return meta


def brute_force(qm, qx, gm, gx, ks, gallery_negcon=False):
    """Full similarity matrix and explicit loops: the definition, written the obvious way."""
    qn = qx / np.linalg.norm(qx, axis=1, keepdims=True)
    gn = gx / np.linalg.norm(gx, axis=1, keepdims=True)
    sims = qn.astype(np.float64) @ gn.astype(np.float64).T
    q_cpd, g_cpd = qm[schema.JCP].tolist(), gm[schema.JCP].tolist()
    q_role, g_role = qm[schema.ROLE].tolist(), gm[schema.ROLE].tolist()
    out = {}
    for mode, cols in MODES.items():
        q_key = list(zip(*(qm[c] for c in cols)))
        g_key = list(zip(*(gm[c] for c in cols)))
        hits = np.zeros(len(ks))
        n_eligible = 0
        for i in range(len(qm)):
            if q_role[i] == schema.NEGCON:
                continue
            cands = [j for j in range(len(gm))
                     if (gallery_negcon or g_role[j] != schema.NEGCON) and g_key[j] != q_key[i]]
            if not any(g_cpd[j] == q_cpd[i] for j in cands):
                continue
            n_eligible += 1
            ranked = sorted(cands, key=lambda j: (-sims[i, j], j))
            for t, k in enumerate(ks):
                hits[t] += any(g_cpd[j] == q_cpd[i] for j in ranked[:k])
        out[mode] = hits / n_eligible
        out[f"n_{mode}"] = n_eligible
    return out


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(7)
    qm = random_wells(300, rng)
    qx = rng.normal(size=(300, 16)).astype(np.float32)
    gm = random_wells(260, rng)
    gx = rng.normal(size=(260, 16)).astype(np.float32)
    return qm, qx, gm, gx


@pytest.mark.parametrize("two_tables", [False, True])
def test_matches_brute_force(tables, two_tables):
    qm, qx, gm, gx = tables
    if not two_tables:
        gm, gx = qm, qx
    ref = brute_force(qm, qx, gm, gx, list(KS))
    # small blocks and chunks so the two-stage merge and the block loop are exercised
    got = topk_hit_rate(qm, qx, gm if two_tables else None, gx if two_tables else None, modes=tuple(MODES),
                        block_size=37, gallery_chunk=23, dtype=np.float64)
    for mode in MODES:
        np.testing.assert_allclose(got[mode].to_numpy(), ref[mode], rtol=0, atol=1e-12)
        assert got[f"n_queries_{mode}"].iloc[0] == ref[f"n_{mode}"]
    assert (got["nss"] <= 1).all() and got["k"].tolist() == list(KS)


def test_gallery_negcon_option(tables):
    qm, qx, gm, gx = tables
    ref = brute_force(qm, qx, gm, gx, [1, 5], gallery_negcon=True)
    got = topk_hit_rate(qm, qx, gm, gx, ks=[1, 5], gallery_negcon=True, block_size=64, gallery_chunk=50,
                        dtype=np.float64, modes=tuple(MODES))
    for mode in MODES:
        np.testing.assert_allclose(got[mode].to_numpy(), ref[mode], atol=1e-12)


def test_chunking_does_not_change_results(tables):
    qm, qx, _, _ = tables
    a, pa = topk_hit_rate(qm, qx, per_query=True, block_size=1000, gallery_chunk=100000)
    b, pb = topk_hit_rate(qm, qx, per_query=True, block_size=16, gallery_chunk=7)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pa, pb)


def test_masks_come_from_gallery_metadata():
    """The official bug: a query-table mask applied to gallery indices. Here the gallery is the query
    table reversed, so any such mix-up would pick excluded wells; every neighbour must be eligible."""
    rng = np.random.default_rng(3)
    qm = random_wells(200, rng, n_compounds=15)
    qx = rng.normal(size=(200, 8)).astype(np.float32)
    gm, gx = qm.iloc[::-1].reset_index(drop=True), qx[::-1].copy()
    _, rows, query_rows = topk_neighbours(qm, qx, gm, gx, k=5, block_size=32, gallery_chunk=29, modes=tuple(MODES))
    for mode, cols in MODES.items():
        qkeys = qm.iloc[query_rows][list(cols)].astype(str).agg("|".join, axis=1).to_numpy()
        gkeys = gm[list(cols)].astype(str).agg("|".join, axis=1).to_numpy()
        r = rows[mode]
        assert (r >= 0).all()
        assert (gkeys[r] != qkeys[:, None]).all(), mode
        assert (gm[schema.ROLE].to_numpy()[r] != schema.NEGCON).all()
    # and reversing the gallery changes nothing but row numbers
    pd.testing.assert_frame_equal(topk_hit_rate(qm, qx, gm, gx, dtype=np.float64),
                                  topk_hit_rate(qm, qx, dtype=np.float64))


def test_planted_structure_exact_rates():
    """Compounds 0..9 have one identical vector in every source (retrievable across sources);
    compounds 10..29 give each well its own orthogonal vector (cosine 0 to every other well), so they
    are found only through ties, which the gallery index order resolves. One well per compound per
    source (3 sources): top-1 NSS = 10/30 plus the noise queries whose first eligible row by index is
    a replicate; the expected rate at every k is computed from that rule."""
    n_sources, n_compounds, n_structured = 3, 30, 10
    d = n_structured + (n_compounds - n_structured) * n_sources
    basis = np.eye(d, dtype=np.float32)
    rows, feats = [], []
    for c in range(n_compounds):
        for s in range(n_sources):
            rows.append({schema.SOURCE: f"s{s}", schema.BATCH: f"b{s}", schema.PLATE: f"p{s}",
                         schema.WELL: f"c{c}s{s}", schema.JCP: f"JCP2022_{c:06d}", schema.ROLE: schema.TREATED})
            feats.append(basis[c] if c < n_structured else basis[n_structured + (c - n_structured) * n_sources + s])
    meta, x = pd.DataFrame(rows), np.stack(feats)
    frame, per_query = topk_hit_rate(meta, x, per_query=True, block_size=17, gallery_chunk=13)

    structured = (np.arange(len(meta)) // n_sources) < n_structured
    assert (per_query.loc[structured, "nss_first_hit"] == 1).all()
    source, compound = meta[schema.SOURCE].tolist(), meta[schema.JCP].tolist()
    for k in KS:
        hits = structured.sum()
        for i in np.flatnonzero(~structured):
            eligible = [j for j in range(len(meta)) if source[j] != source[i]]  # all at cosine 0: index order
            hits += any(compound[j] == compound[i] for j in eligible[:k])
        assert frame.loc[frame["k"] == k, "nss"].item() == pytest.approx(hits / len(meta))
    assert frame["nss"].iloc[0] == pytest.approx(n_structured / n_compounds)
    # one batch and one plate per source: NSB and NSP equal NSS
    np.testing.assert_allclose(frame["nsb"], frame["nss"])
    np.testing.assert_allclose(frame["nsp"], frame["nss"])


def test_ineligible_queries_are_counted_not_scored():
    """A compound seen in one source only cannot be retrieved across sources: it leaves the NSS
    denominator (and is counted) but stays in NSP when it has replicates on other plates."""
    rows = []
    for c, sources in enumerate([["s0", "s1"], ["s0"], ["s1"]]):
        for s in sources:
            for p in range(2):
                rows.append({schema.SOURCE: s, schema.BATCH: "b", schema.PLATE: f"{s}p{p}", schema.WELL: f"{c}{s}{p}",
                             schema.JCP: f"JCP2022_{c:06d}", schema.ROLE: schema.TREATED})
    rows.append({schema.SOURCE: "s0", schema.BATCH: "b", schema.PLATE: "s0p0", schema.WELL: "dmso",
                 schema.JCP: schema.DMSO, schema.ROLE: schema.NEGCON})
    meta = pd.DataFrame(rows)
    x = np.random.default_rng(0).normal(size=(len(meta), 5)).astype(np.float32)
    frame = topk_hit_rate(meta, x, ks=[1, 10])
    assert frame["n_queries_nss"].iloc[0] == 4 and frame["n_ineligible_nss"].iloc[0] == 4
    assert frame["n_queries_nsp"].iloc[0] == 8
    assert frame["nsp"].iloc[1] == 1.0 and frame["nss"].iloc[1] == 1.0


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_equals_single_process(ray_session, tables):
    qm, qx, gm, gx = tables
    single, sq = topk_hit_rate(qm, qx, gm, gx, block_size=64, gallery_chunk=40, per_query=True)
    for shards in (1, 3):
        dist, dq = topk_hit_rate_ray(qm, qx, gm, gx, block_size=64, gallery_chunk=40, gallery_shards=shards,
                                     per_query=True)
        pd.testing.assert_frame_equal(single, dist)
        pd.testing.assert_frame_equal(sq, dq)


def test_topk_selection_is_exact_under_heavy_ties():
    """torch.topk picks arbitrary members of a tie; the selection must still be (value desc, index asc)."""
    torch = pytest.importorskip("torch")
    from micon.eval.retrieval import _chunk_topk

    rng = np.random.default_rng(9)
    sims = rng.integers(0, 4, size=(64, 300)).astype(np.float32)
    sims[rng.random(sims.shape) < 0.3] = -np.inf
    sims[:3, 5:] = -np.inf  # rows with fewer than k eligible columns
    vals, idx = _chunk_topk(torch.from_numpy(sims.copy()), 1000, 10)
    order = np.lexsort((np.broadcast_to(np.arange(300), sims.shape), -sims), axis=-1)[:, :10]
    expected = np.take_along_axis(sims, order, 1)
    np.testing.assert_array_equal(vals, expected)
    finite = expected > -np.inf
    np.testing.assert_array_equal(idx[finite], (order + 1000)[finite])


def fixed_layout_screen(rng: np.random.Generator, n_compounds: int = 30, n_layouts: int = 2, plates: int = 12,
                        position_effect: float = 1.5, dim: int = 24):
    """Plates that share a few layouts (as Target-2 plates do): a compound sits at its layout's well on every
    plate of that layout, and every well position carries its own offset (the position effect), so a replicate at
    the same position is easier to find than one elsewhere."""
    wells = [f"{r}{c:02d}" for r in "ABCDEFGHIJKLMNOP" for c in range(1, 25)]
    layouts = [rng.permutation(len(wells))[:n_compounds] for _ in range(n_layouts)]
    phenotype = rng.normal(size=(n_compounds, dim))
    offset = {w: rng.normal(size=dim) * position_effect for w in wells}
    rows, feats = [], []
    for p in range(plates):
        layout = layouts[p % n_layouts]
        source, batch = p % 3, (p // 3) % 2
        for c in range(n_compounds):
            well = wells[layout[c]]
            rows.append({schema.SOURCE: f"source_{source}", schema.BATCH: f"batch_{batch}",
                         schema.PLATE: f"plate_{p:02d}", schema.WELL: well, schema.JCP: f"JCP2022_{c + 1:06d}"})
            feats.append(0.6 * phenotype[c] + offset[well] + rng.normal(size=dim) * 1.5)
    meta = pd.DataFrame(rows)
    meta[schema.ROLE] = schema.TREATED
    return meta, np.asarray(feats, np.float32)


def test_nr_and_nsl_top1_equal_a_direct_numpy_computation_and_nsl_sees_the_position_confound():
    rng = np.random.default_rng(11)
    meta, x = fixed_layout_screen(rng)
    got = topk_hit_rate(meta, x, ks=[1], modes=("nr", "nsl", "nsb"), block_size=50, gallery_chunk=61,
                        dtype=np.float64).iloc[0]
    # directly: cosine similarity, self removed (NR) or every well at the query's position removed (NSL)
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    sims = xn @ xn.T
    cpd, well = meta[schema.JCP].to_numpy(), meta[schema.WELL].to_numpy()
    for mode, excluded in (("nr", np.eye(len(meta), dtype=bool)), ("nsl", well[:, None] == well[None, :])):
        s = np.where(excluded, -np.inf, sims)
        eligible = ((cpd[:, None] == cpd[None, :]) & ~excluded).any(axis=1)
        top1 = s.argmax(axis=1)
        expected = (cpd[top1] == cpd)[eligible].mean()
        assert got[mode] == pytest.approx(expected, abs=1e-12), mode
        assert got[f"n_queries_{mode}"] == eligible.sum()
    assert got["nsl"] < got["nr"] - 0.2, got      # the position confound: same-position replicates are easy


def test_every_stringency_on_the_device_path_equals_the_numpy_path():
    """The torch blocks (what runs on a GPU) restart NSL's mask from the unmasked block as the NumPy ones do."""
    meta, x = fixed_layout_screen(np.random.default_rng(5))
    kw = dict(ks=range(1, 11), modes=tuple(MODES), block_size=40, gallery_chunk=53, per_query=True)
    a, pa = topk_hit_rate(meta, x, device="cpu", **kw)
    b, pb = topk_hit_rate(meta, x, device="torch:cpu", **kw)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pa, pb)
