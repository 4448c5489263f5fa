"""A synthetic Cell Painting screen: layout, compound phenotypes, technical effects, site rendering.

Pure functions of a seed: they return tables and arrays and never touch the disk (the job
`data_prep/synth.py` writes them in the cpg0016 layout). Phenotypes are a smooth function of a
compound's Morgan fingerprint, so similar molecules look alike and a molecule encoder can
generalise; technical effects (source, batch, plate, edge wells) are large enough that naive
features cluster by source before compound.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from scipy import ndimage

from micon import schema
from micon.config import ConfigError, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range

N_FACTORS = 10
# Morphological factors a compound can move (index -> meaning); effect = base * exp(scale * m * d).
FACTORS = (
    "nucleus_size", "dna_intensity", "cell_size", "er_intensity", "mito_intensity",
    "mito_puncta", "rna_intensity", "nucleoli", "agp_intensity", "cell_count",
)
FACTOR_SCALE = np.array([0.30, 0.45, 0.30, 0.55, 0.55, 0.60, 0.50, 0.60, 0.50, 0.45])

# The calibrated screens' effects (see SynthConfig): fitted on the field's baseline alone, CellProfiler-grade
# features (`python bench/calibrate.py`; refitted from well_noise 0.05, source_interaction 0.6, which had been
# fitted on whole-image statistics), before any method was compared on them (docs/RESULTS.md).
CALIBRATION = dict(active_fraction=0.4, strong_fraction=0.05, well_noise=0.08, source_interaction=0.8,
                   source_response=0.3, optics=0.15, stain_gamma=0.2, bleed=0.1, density_source=0.25,
                   density_plate=0.1)

PRESETS: dict[str, dict] = {
    # seconds; used by every test
    "tiny": dict(n_sources=2, batches_per_source=2, plates_per_batch=1, n_compounds=12, replicates=4,
                 dmso_wells=4, poscon_wells=2, sites_per_well=2, image_size=64, wells_per_plate=384),
    # the demo: a few minutes end to end on 2 cores
    "demo": dict(n_sources=3, batches_per_source=2, plates_per_batch=2, n_compounds=120, replicates=4,
                 dmso_wells=12, poscon_wells=3, sites_per_well=3, image_size=96, wells_per_plate=384),
    "small": dict(n_sources=4, batches_per_source=3, plates_per_batch=3, n_compounds=1500, replicates=4,
                  dmso_wells=32, poscon_wells=8, sites_per_well=4, image_size=256, wells_per_plate=384),
    # cpg0016's replicate structure at toy pixel size: one well per compound per plate, 5 wells per compound
    # spread over 8 sources, ~200 plates; minutes to write and ingest on 2 cores (data-path tests, benchmarks)
    "jumplike": dict(n_sources=8, batches_per_source=4, plates_per_batch=6, n_compounds=1536, replicates=5,
                     dmso_wells=8, poscon_wells=2, sites_per_well=2, image_size=32, wells_per_plate=96,
                     cells_per_site=5.0),
    # TARGET2-like (every compound once on every plate; 4 sources x 2 batches) with the effects that survive
    # normalisation, calibrated so that CellProfiler-grade features land at the field's levels (docs/RESULTS.md).
    # Its own fit: a query's rivals grow with the compounds, so the shared effects left 300 compounds below the
    # NSB and NSS bands; 200 compounds, a quarter of them at full strength, land in every band (seeds 0-2)
    "calibrated": dict(n_sources=4, batches_per_source=2, plates_per_batch=1, replicates=8,
                       dmso_wells=16, poscon_wells=4, sites_per_well=2, image_size=64, wells_per_plate=384,
                       **dict(CALIBRATION, strong_fraction=0.25), n_compounds=200),
    # the same effects on a screen the demo can afford
    "calibrated_small": dict(n_sources=3, batches_per_source=2, plates_per_batch=1, n_compounds=120, replicates=6,
                             dmso_wells=12, poscon_wells=3, sites_per_well=2, image_size=64, wells_per_plate=384,
                             **CALIBRATION),
    # JUMP-like plates (384-well, 9 sites, 1080 px) with nearly every molecule RDKit ships; hours
    "jump": dict(n_sources=8, batches_per_source=4, plates_per_batch=8, n_compounds=14000, replicates=5,
                 dmso_wells=28, poscon_wells=16, sites_per_well=9, image_size=1080, wells_per_plate=384),
}


Layout = Literal["random", "fixed"]


@dataclass
class SynthConfig:
    """What `./launch.sh synth OUT key=value ...` accepts."""

    preset: str = "tiny"           # one of PRESETS (synth --help lists them): sets the keys below; key=value win
    seed: NonNegativeInt = 0       # the same seed gives the same bytes
    n_sources: PositiveInt = 2     # imaging sites (Metadata_Source)
    batches_per_source: PositiveInt = 2  # batches per source
    plates_per_batch: PositiveInt = 1  # plates per batch
    n_compounds: PositiveInt = 12  # treated compounds (real molecules from RDKit's sets)
    replicates: PositiveInt = 4    # wells per compound across the screen
    dmso_wells: Annotated[int, Range(1, why="every plate needs DMSO controls")] = 4  # negative-control wells per plate
    poscon_wells: NonNegativeInt = 2  # positive-control wells per plate
    sites_per_well: PositiveInt = 2  # fields of view per well
    image_size: Annotated[int, Range(32)] = 64  # site size in pixels (square)
    wells_per_plate: int = 384     # plate format: 384 (16 x 24) or 96 (8 x 12)
    layout: Layout = "random"      # random (every plate its own well positions) | fixed (plates share n_layouts
                                   # maps, as cpg0016's Target-2 plates share one: a compound keeps its well
                                   # position on every plate of a map, so position effects confound replicates)
    n_layouts: PositiveInt = 1     # layout=fixed: how many shared maps (plate i uses map i % n_layouts)
    cells_per_site: PositiveFloat = 14.0  # mean cells per site (before density effects)
    active_fraction: Fraction = 0.3  # share of compounds with any phenotype
    strong_fraction: Fraction = 0.1  # share of compounds at full strength
    source_effect: NonNegativeFloat = 1.0  # multiplies every technical effect (0 = none)
    # Effects that survive per-image scaling and per-plate MAD + ZCA, as real ones do (0 = off; the
    # `calibrated` presets set them, chosen so that CellProfiler-grade features land at the field's levels):
    well_noise: NonNegativeFloat = 0.04  # sd of log morphology per well (biological well-to-well variation)
    source_interaction: Fraction = 0.0  # share of a compound's phenotype direction that is source-specific
    source_response: NonNegativeFloat = 0.0  # sd of log phenotype strength per (source, compound)
    optics: NonNegativeFloat = 0.0  # per-source pixel size (sd of log scale) and defocus (blur up to 3x this)
    stain_gamma: NonNegativeFloat = 0.0  # sd of log staining gamma per (source, channel): non-linear intensity
    bleed: NonNegativeFloat = 0.0  # largest channel bleed-through fraction per source
    density_source: NonNegativeFloat = 0.0  # sd of log cell density per source
    density_plate: NonNegativeFloat = 0.0  # sd of log cell density per plate
    workers: NonNegativeInt = 0    # processes; 0 = all cores
    write_parquet: bool = True     # also write load_data_with_illum.parquet
    write_illum: bool = True       # write illumination functions (.npy per channel per plate)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.wells_per_plate not in (96, 384):
            raise ConfigError(f"wells_per_plate={self.wells_per_plate}: JUMP plates have 96 or 384 wells")
        if self.strong_fraction > self.active_fraction:
            raise ConfigError("need strong_fraction <= active_fraction")
        n_plates = self.n_plates
        if self.replicates > n_plates:
            raise ConfigError(f"replicates={self.replicates} but only {n_plates} plates: each replicate "
                              f"needs its own plate; lower replicates or add plates")
        if self.layout == "fixed" and self.n_compounds + self.dmso_wells + self.poscon_wells > self.wells_per_plate:
            raise ConfigError(f"layout=fixed gives every compound its own well position in each map: "
                              f"{self.n_compounds} compounds + {self.dmso_wells} DMSO + {self.poscon_wells} positive "
                              f"controls do not fit {self.wells_per_plate} wells; lower n_compounds or use layout=random")
        per_plate = self.dmso_wells + self.poscon_wells + -(-self.n_compounds * self.replicates // n_plates)
        if per_plate > self.wells_per_plate:
            raise ConfigError(
                f"layout does not fit: {self.n_compounds} compounds x {self.replicates} replicates over "
                f"{n_plates} plates needs {per_plate} wells per plate (with {self.dmso_wells} DMSO and "
                f"{self.poscon_wells} positive-control wells) but a plate has {self.wells_per_plate}; "
                f"lower n_compounds or add plates")

    @property
    def n_plates(self) -> int:
        return self.n_sources * self.batches_per_source * self.plates_per_batch


def resolve_config(overrides: list[str]) -> SynthConfig:
    """Preset first, then explicit key=value overrides."""
    from micon.config import load_config, parse_overrides

    preset = parse_overrides(overrides).get("preset", "tiny")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return load_config(SynthConfig, overrides=overrides, defaults=dict(PRESETS[preset], preset=preset))


# --------------------------------------------------------------------------- compounds

def bundled_smiles() -> list[str]:
    """Real molecules shipped inside RDKit (NCI first 5K + WEHI PAINS test set), in file order."""
    from rdkit import RDConfig

    out = []
    with open(os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")) as fh:
        for line in fh:
            parts = line.split()
            if parts:
                out.append(parts[0])
    # wehi_mols.csv has no header: "SMILES","WEHI-id"
    wehi = pd.read_csv(os.path.join(RDConfig.RDDataDir, "Pains", "test_data", "wehi_mols.csv"), header=None)
    out.extend(wehi[0].astype(str))
    return out


POSCON_SMILES = {
    # name: SMILES (real structures of three JUMP compound positive controls)
    "dexamethasone": "C[C@@H]1C[C@H]2[C@@H]3CCC4=CC(=O)C=C[C@@]4([C@]3([C@H](C[C@@]2([C@]1(C(=O)CO)O)C)O)F)C",
    "quinidine": "COC1=CC2=C(C=CN=C2C=C1)[C@H]([C@@H]3C[C@@H]4CCN3C[C@@H]4C=C)O",
    "FK-866": "O=C(NCCCCC1CCN(CC1)C(=O)c1ccccc1)/C=C/c1cccnc1",
}


def _mol_record(smiles: str):
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumHeavyAtoms() < 3:
        return None
    inchi = Chem.MolToInchi(mol)
    if not inchi:
        return None
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fp = gen.GetFingerprintAsNumPy(mol).astype(np.float32)
    return Chem.MolToSmiles(mol), inchi, Chem.InchiToInchiKey(inchi), fp


def make_compounds(cfg: SynthConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """Sample treated compounds from RDKit's bundled molecules and add DMSO and positive controls.

    Returns the JUMP compound table (+ ground-truth columns) and the fingerprints [n, 2048].
    """
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    pool = bundled_smiles()
    order = rng.permutation(len(pool))
    rows, fps, seen = [], [], set()
    for i in order:
        rec = _mol_record(pool[i])
        if rec is None or rec[2] in seen:
            continue
        seen.add(rec[2])
        rows.append(rec)
        if len(rows) == cfg.n_compounds:
            break
    if len(rows) < cfg.n_compounds:
        raise ConfigError(f"n_compounds={cfg.n_compounds}: RDKit ships only {len(rows)} usable molecules")
    reserved = {schema.DMSO, schema.EMPTY_WELL, *schema.POSITIVE_CONTROLS.values()}
    ids = []
    for n in rng.choice(np.arange(1, 999_999), size=cfg.n_compounds * 2, replace=False):
        jcp = f"JCP2022_{n:06d}"
        if jcp not in reserved:
            ids.append(jcp)
    ids = sorted(ids[: cfg.n_compounds])
    table = [dict(Metadata_JCP2022=jcp, Metadata_InChIKey=key, Metadata_InChI=inchi, Metadata_SMILES=smi,
                  role=schema.TREATED) for jcp, (smi, inchi, key, _) in zip(ids, rows)]
    fps = [r[3] for r in rows]
    for name, smi in POSCON_SMILES.items():
        smi_c, inchi, key, fp = _mol_record(smi)
        table.append(dict(Metadata_JCP2022=schema.POSITIVE_CONTROLS[name], Metadata_InChIKey=key,
                          Metadata_InChI=inchi, Metadata_SMILES=smi_c, role=schema.POSCON))
        fps.append(fp)
    smi_c, inchi, key, fp = _mol_record("CS(C)=O")
    # DMSO has three heavy atoms, so it passes _mol_record; its phenotype is zero by definition.
    table.append(dict(Metadata_JCP2022=schema.DMSO, Metadata_InChIKey=key, Metadata_InChI=inchi,
                      Metadata_SMILES=smi_c, role=schema.NEGCON))
    fps.append(fp)
    return pd.DataFrame(table), np.stack(fps)


def phenotypes(fps: np.ndarray, roles: np.ndarray, cfg: SynthConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth structure -> phenotype map.

    direction d = tanh(W x) with x the L2-normalised fingerprint and W a fixed Gaussian matrix, so
    Tanimoto-similar compounds get similar directions. Activity magnitude m in [0, 1] is a ramp of
    another random projection of x between the (1 - active_fraction) and (1 - strong_fraction)
    quantiles of the treated compounds: most compounds are inactive (m = 0, indistinguishable from
    DMSO), a few are at full strength. Positive controls are always at full strength; DMSO is 0.
    """
    rng = np.random.default_rng([seed, 7])
    x = fps / np.maximum(np.linalg.norm(fps, axis=1, keepdims=True), 1e-6)
    w_dir = rng.normal(0, 3.0, size=(fps.shape[1], N_FACTORS)).astype(np.float32)
    w_act = rng.normal(0, 1.0, size=fps.shape[1]).astype(np.float32)
    direction = np.tanh(x @ w_dir)
    direction /= np.maximum(np.sqrt((direction ** 2).mean(axis=1, keepdims=True)), 1e-6)
    score = x @ w_act
    treated = roles == schema.TREATED
    lo = np.quantile(score[treated], 1 - cfg.active_fraction) if cfg.active_fraction > 0 else np.inf
    hi = np.quantile(score[treated], 1 - cfg.strong_fraction) if cfg.strong_fraction > 0 else np.inf
    magnitude = np.clip((score - lo) / max(hi - lo, 1e-6), 0.0, 1.0) if np.isfinite(lo) else np.zeros_like(score)
    if np.isfinite(lo) and not np.isfinite(hi):
        magnitude = np.where(score >= lo, 0.5, 0.0)
    magnitude[roles == schema.POSCON] = 1.0
    magnitude[roles == schema.NEGCON] = 0.0
    return direction.astype(np.float32), magnitude.astype(np.float32)


def activity_class(m: float) -> str:
    return "inactive" if m <= 0 else ("strong" if m >= 0.999 else "weak")


# --------------------------------------------------------------------------- layout

def make_plates(cfg: SynthConfig) -> pd.DataFrame:
    rows = []
    for s in range(cfg.n_sources):
        for b in range(cfg.batches_per_source):
            batch = f"2026_{s + 1:02d}_{b + 1:02d}_Batch{b + 1}"
            for p in range(cfg.plates_per_batch):
                rows.append(dict(Metadata_Source=f"source_{s + 1}", Metadata_Batch=batch,
                                 Metadata_Plate=f"SYN{s + 1:02d}{b + 1:02d}{p + 1:03d}",
                                 Metadata_PlateType="COMPOUND"))
    return pd.DataFrame(rows)


def plate_shape(wells_per_plate: int) -> tuple[int, int]:
    return (16, 24) if wells_per_plate == 384 else (8, 12)


def make_layout(cfg: SynthConfig, plates: pd.DataFrame, compounds: pd.DataFrame,
                rng: np.random.Generator) -> pd.DataFrame:
    """Place DMSO, positive controls and compound replicates on plates (JUMP well.csv.gz rows).

    Replicates of a compound go to distinct plates, cycling through sources so that each compound
    is seen in as many sources (then batches) as its replicate count allows.
    """
    n_rows, n_cols = plate_shape(cfg.wells_per_plate)
    n_plates = len(plates)
    treated = compounds.loc[compounds.role == schema.TREATED, "Metadata_JCP2022"].tolist()
    poscons = compounds.loc[compounds.role == schema.POSCON, "Metadata_JCP2022"].tolist()
    plate_source = plates.Metadata_Source.to_numpy()
    sources = sorted(set(plate_source))
    by_source = {s: np.flatnonzero(plate_source == s) for s in sources}
    load = np.zeros(n_plates, int)
    assignment: list[list[str]] = [[] for _ in range(n_plates)]
    for c, jcp in enumerate(rng.permutation(treated)):
        used: set[int] = set()
        for r in range(cfg.replicates):
            src = sources[(c + r) % len(sources)]
            cands = [p for p in by_source[src] if p not in used] or [p for p in range(n_plates) if p not in used]
            cands = np.array(cands)
            least = cands[load[cands] == load[cands].min()]
            p = int(rng.choice(least))
            used.add(p)
            load[p] += 1
            assignment[p].append(jcp)
    rows = []
    all_positions = [(r, c) for r in range(n_rows) for c in range(n_cols)]
    if cfg.layout == "fixed":
        return _fixed_layout(cfg, plates, assignment, poscons, all_positions, rng)
    for p, plate in plates.iterrows():
        content = ([schema.DMSO] * cfg.dmso_wells
                   + [poscons[i % len(poscons)] for i in range(cfg.poscon_wells)] + assignment[p])
        if len(content) > len(all_positions):
            raise ConfigError(f"plate {plate.Metadata_Plate} needs {len(content)} wells, has {len(all_positions)}")
        pos = rng.choice(len(all_positions), size=len(content), replace=False)
        for jcp, k in zip(rng.permutation(np.array(content, dtype=object)), sorted(pos)):
            r, c = all_positions[k]
            rows.append(dict(Metadata_Source=plate.Metadata_Source, Metadata_Plate=plate.Metadata_Plate,
                             Metadata_Well=schema.well_name(r, c), Metadata_JCP2022=jcp))
    return pd.DataFrame(rows)


def _fixed_layout(cfg: SynthConfig, plates: pd.DataFrame, assignment: list[list[str]], poscons: list[str],
                  all_positions: list[tuple[int, int]], rng: np.random.Generator) -> pd.DataFrame:
    """layout=fixed: n_layouts maps drawn once; each gives DMSO and positive controls their wells and every
    treated compound one well of its own. Plate i uses map i % n_layouts and fills the wells of the compounds it
    holds (every compound, on a Target-2-like screen), leaving the others empty."""
    treated = sorted({c for plate in assignment for c in plate})
    kinds = [schema.DMSO] * cfg.dmso_wells + [poscons[i % len(poscons)] for i in range(cfg.poscon_wells)]
    maps = []
    for _ in range(cfg.n_layouts):
        pos = rng.permutation(len(all_positions))
        controls = list(zip(kinds, pos[:len(kinds)]))
        maps.append((controls, dict(zip(treated, pos[len(kinds):len(kinds) + len(treated)]))))
    rows = []
    for p, plate in plates.iterrows():
        controls, where = maps[p % cfg.n_layouts]
        content = controls + [(jcp, where[jcp]) for jcp in assignment[p]]
        for jcp, k in sorted(content, key=lambda t: t[1]):
            r, c = all_positions[k]
            rows.append(dict(Metadata_Source=plate.Metadata_Source, Metadata_Plate=plate.Metadata_Plate,
                             Metadata_Well=schema.well_name(r, c), Metadata_JCP2022=jcp))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- technical effects

def technical_effects(cfg: SynthConfig, plates: pd.DataFrame, seed: int) -> dict:
    """Per-source microscope (gain/offset per channel, blur, noise, pixel scale, channel numbering),
    per-batch gain drift, per-plate illumination field and gain. Returned as plain data."""
    rng = np.random.default_rng([seed, 11])
    k = cfg.source_effect
    sources, batches = {}, {}
    n_ch = len(schema.CHANNELS)
    for s in sorted(plates.Metadata_Source.unique()):
        perm = rng.permutation(n_ch)
        while np.all(perm == np.arange(n_ch)):
            perm = rng.permutation(n_ch)
        sources[s] = dict(
            gain=np.exp(rng.normal(0, 0.35 * k, n_ch)).round(4).tolist(),
            offset=(rng.uniform(80, 400, n_ch) * (k > 0)).round(1).tolist(),
            blur=float(round(rng.uniform(0.0, 1.2) * k, 3)),
            noise=float(round(rng.uniform(0.01, 0.04) * (0.3 + k), 4)),
            pixel_scale=float(round(np.exp(rng.normal(0, 0.12 * k)), 4)),
            # file channel number (1-based) of each canonical channel, like source_4 (ch1 = Mito...)
            channel_number={ch: int(perm[i]) + 1 for i, ch in enumerate(schema.CHANNELS)},
        )
        # the calibrated effects; drawn from their own stream so that older presets keep their numbers
        srng = np.random.default_rng([seed, 13, int(s.rsplit("_", 1)[-1]) if s.rsplit("_", 1)[-1].isdigit() else 0])
        bleed = np.eye(n_ch)
        for c in range(n_ch):   # each channel picks up a little of its spectral neighbours
            for nb in (c - 1, c + 1):
                if 0 <= nb < n_ch:
                    bleed[c, nb] = srng.uniform(0, cfg.bleed)
        sources[s].update(
            pixel_scale=float(round(sources[s]["pixel_scale"] * np.exp(srng.normal(0, cfg.optics)), 4)),
            blur=float(round(sources[s]["blur"] + srng.uniform(0, 3 * cfg.optics), 3)),
            gamma=np.exp(srng.normal(0, cfg.stain_gamma, n_ch)).round(4).tolist(),
            bleed=bleed.round(4).tolist(),
            density=float(round(np.exp(srng.normal(0, cfg.density_source)), 4)),
        )
    for b in sorted(plates.Metadata_Batch.unique()):
        batches[b] = dict(gain=np.exp(rng.normal(0, 0.10 * k, n_ch)).round(4).tolist())
    plate_fx = {}
    for plate in plates.Metadata_Plate:
        angle = rng.uniform(0, 2 * np.pi)
        plate_fx[plate] = dict(
            gain=np.exp(rng.normal(0, 0.04 * k, n_ch)).round(4).tolist(),
            illum_tilt=float(round(rng.uniform(0.1, 0.35) * k, 4)),
            illum_angle=float(round(angle, 4)),
            illum_vignette=float(round(rng.uniform(0.05, 0.25) * k, 4)),
            edge_intensity=float(round(1 + rng.uniform(0.05, 0.15) * k, 4)),
            edge_density=float(round(1 - rng.uniform(0.1, 0.25) * k, 4)),
        )
    prng = np.random.default_rng([seed, 17])
    for plate in plate_fx:
        plate_fx[plate]["density"] = float(round(np.exp(prng.normal(0, cfg.density_plate)), 4))
    return dict(sources=sources, batches=batches, plates=plate_fx)


def illumination_field(size: int, tilt: float, angle: float, vignette: float) -> np.ndarray:
    """Smooth multiplicative illumination field (mean ~1): a tilt plus a radial fall-off."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    field_ = 1 + tilt * (x * np.cos(angle) + y * np.sin(angle)) - vignette * (x ** 2 + y ** 2) * 2
    return (field_ / field_.mean()).astype(np.float32)


# --------------------------------------------------------------------------- rendering

@dataclass
class WellBiology:
    """Per-well morphology after the compound's effect (canonical channel order in intensities)."""

    factors: np.ndarray  # multiplicative, [N_FACTORS]; 1 = DMSO


def well_factors(direction: np.ndarray, magnitude: float, rng: np.random.Generator,
                 well_noise: float = 0.04) -> np.ndarray:
    """exp(scale * m * d) plus biological well-to-well variability."""
    return np.exp(FACTOR_SCALE * magnitude * direction + rng.normal(0, well_noise, N_FACTORS)).astype(np.float32)


def source_phenotype(cfg: SynthConfig, direction: np.ndarray, magnitude: float, source: str,
                     jcp: str) -> tuple[np.ndarray, float]:
    """The compound's phenotype as expressed in one source (cell line passage, protocol, dose accuracy):
    direction sqrt(1 - rho^2) d + rho u with u a per-(source, compound) draw (rho = source_interaction),
    strength m * exp(N(0, source_response)). The identity when both are 0."""
    if cfg.source_interaction == 0 and cfg.source_response == 0:
        return direction, magnitude
    rng = np.random.default_rng([cfg.seed, 19, _hash64(f"{source}/{jcp}")])
    u = rng.normal(0, 1, N_FACTORS)
    rho = cfg.source_interaction
    d = np.sqrt(1 - rho ** 2) * direction + rho * u
    return d.astype(np.float32), float(magnitude * np.exp(rng.normal(0, cfg.source_response)))


def stain(img: np.ndarray, bleed: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """Channel bleed-through (a channel mixing matrix) then a per-channel staining non-linearity."""
    out = np.tensordot(bleed, img, axes=1) if not np.allclose(bleed, np.eye(len(bleed))) else img
    if np.allclose(gamma, 1):
        return out
    return np.power(np.maximum(out, 0), gamma[:, None, None]).astype(np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def render_site(rng: np.random.Generator, size: int, factors: np.ndarray, cells_per_site: float,
                pixel_scale: float = 1.0, density: float = 1.0) -> np.ndarray:
    """Render one field of view, [5, size, size] float32 in canonical order (DNA, RNA, ER, AGP, Mito),
    intensities ~[0, 1.5]. Cells: an elliptical nucleus with nucleoli, a cytoplasm with ER decaying
    from the nucleus, an actin/membrane rim (AGP) and mitochondrial puncta."""
    f = dict(zip(FACTORS, factors))
    n_cells = rng.poisson(cells_per_site * f["cell_count"] * density)
    img = np.zeros((5, size, size), np.float32)
    mito_pts = np.zeros((size, size), np.float32)
    nucleoli_pts = np.zeros((size, size), np.float32)
    base_r = size / 15.0 * pixel_scale
    for _ in range(n_cells):
        cy, cx = rng.uniform(0, size, 2)
        r_n = base_r * f["nucleus_size"] * np.exp(rng.normal(0, 0.12))
        elong = np.exp(rng.normal(0, 0.15))
        theta = rng.uniform(0, np.pi)
        r_c = r_n * 2.0 * f["cell_size"] * np.exp(rng.normal(0, 0.1))
        half = int(np.ceil(r_c * 1.3)) + 2
        y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, size)
        x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, size)
        if y1 <= y0 or x1 <= x0:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / (r_n * elong)
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / (r_n / elong)
        dn = np.sqrt(u ** 2 + v ** 2)
        nuc = _sigmoid(8 * (1 - dn))
        dc = np.sqrt(dx ** 2 + dy ** 2) / r_c
        cyt = _sigmoid(7 * (1 - dc))
        cell_int = np.exp(rng.normal(0, 0.1, 5))
        win = (slice(y0, y1), slice(x0, x1))
        np.maximum(img[0][win], nuc * 0.9 * f["dna_intensity"] * cell_int[0], out=img[0][win])
        img[1][win] += 0.12 * cyt * f["rna_intensity"] * cell_int[1]
        img[2][win] += cyt * (1 - 0.7 * nuc) * np.exp(-1.6 * dc) * 0.9 * f["er_intensity"] * cell_int[2]
        img[3][win] += (4 * cyt * (1 - cyt) * 0.8 + 0.15 * cyt) * f["agp_intensity"] * cell_int[3]
        # puncta: mitochondria in the cytoplasm, nucleoli inside the nucleus
        n_mito = rng.poisson(10 * f["mito_puncta"])
        rad = r_n + (r_c - r_n) * rng.uniform(0.1, 0.9, n_mito)
        ang = rng.uniform(0, 2 * np.pi, n_mito)
        my = np.clip((cy + rad * np.sin(ang)).astype(int), 0, size - 1)
        mx = np.clip((cx + rad * np.cos(ang)).astype(int), 0, size - 1)
        np.add.at(mito_pts, (my, mx), 1.4 * f["mito_intensity"] * cell_int[4])
        n_nl = 1 + rng.poisson(1.5 * f["nucleoli"])
        rad = r_n * 0.5 * np.sqrt(rng.uniform(0, 1, n_nl))
        ang = rng.uniform(0, 2 * np.pi, n_nl)
        ny = np.clip((cy + rad * np.sin(ang)).astype(int), 0, size - 1)
        nx = np.clip((cx + rad * np.cos(ang)).astype(int), 0, size - 1)
        np.add.at(nucleoli_pts, (ny, nx), 2.0 * f["rna_intensity"] * cell_int[1])
    sigma = max(0.6, base_r / 6)
    img[4] += ndimage.gaussian_filter(mito_pts, sigma) * (2 * np.pi * sigma ** 2) * 0.5
    img[1] += ndimage.gaussian_filter(nucleoli_pts, sigma * 1.3) * (2 * np.pi * (sigma * 1.3) ** 2) * 0.35
    return img


def acquire(img: np.ndarray, rng: np.random.Generator, gain: np.ndarray, offset: np.ndarray, blur: float,
            noise: float, illum: np.ndarray) -> np.ndarray:
    """Microscope: illumination x gain, optics blur, shot + read noise, 16-bit camera counts."""
    out = np.empty(img.shape, np.uint16)
    for c in range(img.shape[0]):
        x = img[c] * illum
        if blur > 0:
            x = ndimage.gaussian_filter(x, blur)
        x = x * gain[c] * 12000.0 + 600.0 * illum
        x = x + rng.normal(0, 1, x.shape) * np.sqrt(np.maximum(x, 0) * noise * 40 + 25.0)
        out[c] = np.clip(x + offset[c], 0, 65535).astype(np.uint16)
    return out


def _hash64(text: str) -> int:
    """A stable 64-bit integer of `text` (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def site_seed(seed: int, plate: str, well: str, site: int) -> np.random.Generator:
    """Each site's randomness depends only on (seed, plate, well, site): any order, any worker count."""
    return np.random.default_rng([seed, _hash64(f"{plate}/{well}/{site}")])


def is_edge_well(well: str, wells_per_plate: int) -> bool:
    n_rows, n_cols = plate_shape(wells_per_plate)
    r, c = schema.parse_well(well)
    return r in (0, n_rows - 1) or c in (0, n_cols - 1)


@dataclass
class Screen:
    """Everything about a synthetic screen except its pixels."""

    config: SynthConfig
    plates: pd.DataFrame
    wells: pd.DataFrame
    compounds: pd.DataFrame       # JUMP columns + role, activity, magnitude, phenotype direction
    direction: np.ndarray         # [n_compounds, N_FACTORS]
    magnitude: np.ndarray         # [n_compounds]
    tech: dict = field(default_factory=dict)


def design_screen(cfg: SynthConfig) -> Screen:
    rng = np.random.default_rng([cfg.seed, 1])
    compounds, fps = make_compounds(cfg, rng)
    direction, magnitude = phenotypes(fps, compounds.role.to_numpy(), cfg, cfg.seed)
    compounds = compounds.assign(magnitude=magnitude.round(4),
                                 activity=[activity_class(m) for m in magnitude])
    plates = make_plates(cfg)
    wells = make_layout(cfg, plates, compounds, rng)
    return Screen(cfg, plates, wells, compounds, direction, magnitude, technical_effects(cfg, plates, cfg.seed))


def render_well_sites(screen: Screen, plate: str, well: str, jcp: str, sites: range) -> list[np.ndarray]:
    """uint16 [5, S, S] per site in canonical channel order, with every technical effect applied."""
    cfg = screen.config
    prow = screen.plates.set_index("Metadata_Plate").loc[plate]
    src_fx = screen.tech["sources"][prow.Metadata_Source]
    gain = (np.array(src_fx["gain"]) * np.array(screen.tech["batches"][prow.Metadata_Batch]["gain"])
            * np.array(screen.tech["plates"][plate]["gain"]))
    pfx = screen.tech["plates"][plate]
    illum = illumination_field(cfg.image_size, pfx["illum_tilt"], pfx["illum_angle"], pfx["illum_vignette"])
    ci = int(np.flatnonzero(screen.compounds.Metadata_JCP2022.to_numpy() == jcp)[0])
    edge = is_edge_well(well, cfg.wells_per_plate)
    wrng = site_seed(cfg.seed, plate, well, 0)
    direction, magnitude = source_phenotype(cfg, screen.direction[ci], float(screen.magnitude[ci]),
                                            prow.Metadata_Source, jcp)
    factors = well_factors(direction, magnitude, wrng, cfg.well_noise)
    density = (pfx["edge_density"] if edge else 1.0) * src_fx["density"] * pfx["density"]
    bleed, gamma = np.array(src_fx["bleed"]), np.array(src_fx["gamma"])
    out = []
    for s in sites:
        rng = site_seed(cfg.seed, plate, well, s)
        img = render_site(rng, cfg.image_size, factors, cfg.cells_per_site, src_fx["pixel_scale"], density)
        if edge:
            img *= pfx["edge_intensity"]
        img = stain(img, bleed, gamma)
        out.append(acquire(img, rng, gain, np.array(src_fx["offset"]), src_fx["blur"], src_fx["noise"], illum))
    return out


def config_dict(cfg: SynthConfig) -> dict:
    return dataclasses.asdict(cfg)
