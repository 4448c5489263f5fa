"""The CellProfiler-grade featuriser: segmentation counts, CellProfiler's column names, values against
independent computations (scikit-image, NumPy) on random sites, no NaN, and the registry through the embed job."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from micon.eval.cellprofiler import (CELLPROFILER, COMPARTMENTS, FULL, CellProfilerFeaturiser, Segmentation,
                                     cellprofiler_name, segment, site_features)
from micon.eval.featurisers import FEATURISERS, get_featuriser

CHANNELS = ["DNA", "RNA", "ER", "AGP", "Mito"]
NAME = re.compile(r"^(Nuclei|Cells|Cytoplasm)_(AreaShape|Intensity|Texture|Granularity|RadialDistribution|"
                  r"Correlation|Neighbors)_[A-Za-z0-9]+(_[A-Za-z0-9]+)*$")


def disk_site(centres, rng, size=64, r_nuc=4.5, r_cell=9.0, noise=3.0) -> np.ndarray:
    """A [5, size, size] uint8 site: bright DNA disks, a cell stain (AGP/RNA) filling a larger disk around
    each, ER and Mito textured inside cells, plus noise."""
    yy, xx = np.mgrid[:size, :size]
    site = np.zeros((5, size, size), np.float32)
    for cy, cx in centres:
        d = np.hypot(yy - cy, xx - cx)
        site[0] = np.maximum(site[0], 200 * (d < r_nuc))
        cell = d < r_cell
        site[1] += 60 * cell
        site[3] += 80 * cell
        site[2] += cell * rng.uniform(40, 120, (size, size))
        site[4] += cell * rng.uniform(0, 200, (size, size)) * (rng.random((size, size)) < 0.2)
    site += rng.normal(0, noise, site.shape)
    return np.clip(site, 0, 255).astype(np.uint8)


def random_site(rng, n=None, size=64) -> tuple[np.ndarray, list]:
    """Random well-separated cells (so that the true count is known)."""
    n = rng.integers(3, 9) if n is None else n
    centres = []
    while len(centres) < n:
        c = rng.uniform(6, size - 6, 2)
        if all(np.hypot(*(c - o)) > 11 for o in centres):
            centres.append(c)
    return disk_site(centres, rng, size), centres


def test_segmentation_counts_hand_drawn_nuclei_and_splits_touching_pairs():
    rng = np.random.default_rng(0)
    for trial in range(5):
        site, centres = random_site(rng)
        nuclei, cells, cyto = segment(site, CHANNELS)
        assert nuclei.max() == len(centres), trial
        assert set(np.unique(cells)) == set(range(len(centres) + 1))
        # nucleus i lies in cell i; cytoplasm = cell without its nucleus
        inside = nuclei > 0
        np.testing.assert_array_equal(cells[inside], nuclei[inside])
        np.testing.assert_array_equal(cyto, np.where(inside, 0, cells))
    # two touching nuclei (centres 8 px apart, radius 4.5) are two objects, not one
    touching = disk_site([(32, 28), (32, 36)], rng)
    assert segment(touching, CHANNELS)[0].max() == 2


def test_segmentation_counts_rendered_synthetic_cells():
    """micon.synth's cells (elliptical nuclei, overlapping at random): the count is close to the truth."""
    from micon.data.imaging import scale_to_uint8
    from micon.synth import N_FACTORS, render_site

    found, true = [], []
    for k in range(12):
        img = render_site(np.random.default_rng(k), 96, np.ones(N_FACTORS, np.float32), 6.0)
        true.append(np.random.default_rng(k).poisson(6.0))      # render_site's first draw is the cell count
        found.append(segment(np.stack([scale_to_uint8(c) for c in img]), CHANNELS)[0].max())
    found, true = np.array(found), np.array(true)
    assert np.abs(found - true).mean() <= 1.0, (found, true)
    assert abs(found.sum() - true.sum()) <= 0.1 * true.sum()


def test_feature_names_are_cellprofilers_and_pycytominer_finds_them():
    from pycytominer.cyto_utils import infer_cp_features
    import pandas as pd

    names = CellProfilerFeaturiser(CELLPROFILER).feature_names(CHANNELS)
    assert len(names) == len(set(names)) >= 100
    assert all(NAME.match(n) for n in names), [n for n in names if not NAME.match(n)][:5]
    assert set(n.split("_")[0] for n in names) == set(COMPARTMENTS)
    groups = Counter(n.split("_")[1] for n in names)
    assert len(groups) >= 4 and {"AreaShape", "Intensity", "Texture", "Granularity"} <= set(groups)
    for n in ("Nuclei_AreaShape_Area", "Cells_Intensity_MeanIntensity_DNA", "Cytoplasm_Texture_Contrast_ER_3_00_16",
              "Cells_Correlation_Correlation_DNA_RNA", "Cells_Granularity_1_Mito",
              "Cells_RadialDistribution_FracAtD_ER_1of4"):
        assert n in names
    frame = pd.DataFrame(np.zeros((2, len(names))), columns=names).assign(Metadata_Plate=["p", "p"])
    assert infer_cp_features(frame) == names
    full = CellProfilerFeaturiser(FULL).feature_names(CHANNELS)
    assert len(full) == len(set(full)) > 1000 and all(NAME.match(n) for n in full)
    assert {"Cytoplasm_Texture_Contrast_ER_3_00_256", "Nuclei_Correlation_K_RNA_DNA",
            "Cells_Correlation_Costes_Mito_AGP", "Nuclei_Neighbors_NumberOfNeighbors_Adjacent"} <= set(full)
    assert not any("Center" in n or "Location" in n or "SpatialMoment" in n for n in full)   # positions


def test_cellprofiler_names_of_cp_measure_keys():
    assert cellprofiler_name("Nuclei", "AreaShape", "Area") == "Nuclei_AreaShape_Area"
    assert cellprofiler_name("Nuclei", "AreaShape", "Zernike_2_0") == "Nuclei_AreaShape_Zernike_2_0"
    assert cellprofiler_name("Cells", "Intensity", "Intensity_MeanIntensity", "DNA") == "Cells_Intensity_MeanIntensity_DNA"
    assert (cellprofiler_name("Cytoplasm", "Texture", "Contrast_3_00_256", "ER")
            == "Cytoplasm_Texture_Contrast_ER_3_00_256")
    assert cellprofiler_name("Cells", "Granularity", "Granularity_3", "Mito") == "Cells_Granularity_3_Mito"
    assert (cellprofiler_name("Cells", "RadialDistribution", "RadialDistribution_FracAtD_1of4", "RNA")
            == "Cells_RadialDistribution_FracAtD_RNA_1of4")
    assert (cellprofiler_name("Cells", "Correlation", "Correlation_Pearson", pair=("DNA", "RNA"))
            == "Cells_Correlation_Correlation_DNA_RNA")
    assert cellprofiler_name("Cells", "Correlation", "Correlation_K_2", pair=("DNA", "RNA")) == "Cells_Correlation_K_RNA_DNA"


def test_values_match_scikit_image_and_numpy_on_random_sites():
    from skimage.measure import regionprops

    rng = np.random.default_rng(1)
    for trial in range(4):
        site, _ = random_site(rng)
        site = np.clip(site.astype(int) + rng.integers(0, 40, site.shape), 0, 255).astype(np.uint8)
        feats = site_features(site, CHANNELS, CELLPROFILER)
        nuclei, cells, cyto = segment(site, CHANNELS)
        x = site.astype(np.float64) / 255
        areas = [p.area for p in regionprops(nuclei)]
        assert feats["Nuclei_AreaShape_Area"] == pytest.approx(np.median(areas))
        ecc = [p.eccentricity for p in regionprops(cells)]
        assert feats["Cells_AreaShape_Eccentricity"] == pytest.approx(np.median(ecc), abs=1e-6)
        for comp, lab in (("Cells", cells), ("Cytoplasm", cyto), ("Nuclei", nuclei)):
            ids = [i for i in np.unique(lab) if i]
            ch = "RNA"
            means = [x[CHANNELS.index(ch)][lab == i].mean() for i in ids]
            assert feats[f"{comp}_Intensity_MeanIntensity_{ch}"] == pytest.approx(np.median(means)), comp
            integ = [x[CHANNELS.index(ch)][lab == i].sum() for i in ids]
            assert feats[f"{comp}_Intensity_IntegratedIntensity_{ch}"] == pytest.approx(np.median(integ)), comp
        corr = [np.corrcoef(x[0][cells == i], x[1][cells == i])[0, 1] for i in np.unique(cells) if i]
        assert feats["Cells_Correlation_Correlation_DNA_RNA"] == pytest.approx(np.median(corr), abs=1e-9)


def test_no_nan_for_an_empty_flat_or_one_cell_site_and_the_batch_does_not_change_a_site():
    f = get_featuriser("cellprofiler")
    names = f.feature_names(CHANNELS)
    empty = np.zeros((5, 64, 64), np.uint8)
    flat = np.full((5, 64, 64), 37, np.uint8)
    rng = np.random.default_rng(2)
    one, two = random_site(rng, n=1)[0], random_site(rng, n=2)[0]
    sites = np.stack([empty, flat, one, two, random_site(rng)[0]])
    x = f.embed(sites, CHANNELS)
    assert x.shape == (5, len(names)) and x.dtype == np.float32 and np.isfinite(x).all()
    assert (x[0] == 0).all() and (x[1] == 0).all()       # no objects: 0 for every feature
    named = dict(zip(names, x[2]))
    assert named["Cells_Neighbors_NumberOfNeighbors_Adjacent"] == 0 and named["Nuclei_AreaShape_Area"] > 0
    np.testing.assert_array_equal(f.embed(sites[4:5], CHANNELS)[0], x[4])
    full = get_featuriser("cellprofiler_full")         # every measurement copes with 0 and 1 objects
    assert np.isfinite(full.embed(np.stack([empty, one]), CHANNELS)).all()


def test_every_registered_featuriser_embeds_sites():
    rng = np.random.default_rng(3)
    sites = np.stack([random_site(rng, size=48)[0] for _ in range(2)])
    for name in FEATURISERS:
        if name == "cellprofiler_full":
            continue            # seconds per site: measured in bench/bench_featurisers.py
        f = get_featuriser(name)
        x = f.embed(sites, CHANNELS)
        assert f.name == name and x.shape == (2, len(f.feature_names(CHANNELS))) and np.isfinite(x).all()
    with pytest.raises(KeyError, match="featurisers: cellprofiler"):
        get_featuriser("handcrafted_v0")


def test_segmentation_names_a_missing_channel():
    with pytest.raises(ValueError, match="needs channel 'AGP'"):
        segment(np.zeros((2, 32, 32), np.uint8), ["DNA", "RNA"], Segmentation())
    with pytest.raises(ValueError, match="measures channels"):
        CellProfilerFeaturiser(CELLPROFILER).feature_names(["DNA", "RNA", "AGP"])


def test_the_featuriser_embeds_through_the_embed_code(tiny_shards, tmp_path):
    """`evaluate.embed` with a registered name: the actor's code (SiteEncoder + embed_shard, decoding in
    threads) writes the featuriser's own numbers; the identity and embed.json name the featuriser and its features."""
    from evaluate.embed import SiteEncoder, embed_shard, embedding_identity
    from micon.data.shards import read_tar_samples
    from micon.embeddings import identity_key, part_path, read_part

    enc = SiteEncoder("cellprofiler", str(tiny_shards))
    manifest = enc.manifest
    identity = embedding_identity(enc.encoder, manifest)
    assert identity["model"]["featuriser"] == identity["model"]["method"] == "cellprofiler"
    assert enc.encoder.embed_info() == {"feature_names": get_featuriser("cellprofiler").feature_names(manifest.channels)}
    key = identity_key(identity)
    (tmp_path / "parts").mkdir()
    shard = manifest.shard_paths()[0]
    embed_shard(enc, str(shard), tmp_path, 5, len(manifest.channels), key, threads=2)
    samples = list(read_tar_samples(shard))
    emb, meta = read_part(part_path(tmp_path, shard), len(samples), key)
    direct = get_featuriser("cellprofiler").embed(np.stack([img for _, img, _ in samples]), manifest.channels)
    np.testing.assert_array_equal(emb, direct)
    assert len(meta) == len(samples) and np.isfinite(emb).all()


@pytest.mark.slow
def test_embed_job_with_a_featuriser_name(tiny_shards, tmp_path):
    from tests.conftest import run_job

    out = tmp_path / "cp"
    proc = run_job("evaluate.embed", "cellprofiler", tiny_shards, out, "workers=2")
    assert "embed: cellprofiler features" in proc.stdout
    doc = json.loads((out / "embed.json").read_text())
    assert doc["method"] == "cellprofiler" and len(doc["feature_names"]) == doc["dim"] >= 100
    ident = json.loads((out / "embed_identity.json").read_text())
    assert ident["model"]["featuriser"] == "cellprofiler" and "sha256" not in ident["model"]
