"""Compound featurisation speed on the ~15,000 real molecules shipped with RDKit: molecules/s/core
for a plain RDKit loop, our featuriser in one process, and the Ray job with 1 and 2 workers.

    python bench/bench_featurize.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from rdkit import Chem, RDConfig, rdBase  # noqa: E402
from rdkit.Chem import rdFingerprintGenerator  # noqa: E402

from bench._report import markdown_table, write_section  # noqa: E402
from micon.chem.compound import FeaturizeOptions, Structure, featurize_chunk  # noqa: E402


def bundled_smiles() -> list[str]:
    with open(os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")) as fh:
        out = [line.split()[0] for line in fh if line.split()]
    wehi = pd.read_csv(os.path.join(RDConfig.RDDataDir, "Pains", "test_data", "wehi_mols.csv"), header=None)
    return out + wehi[0].astype(str).tolist()


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0


def plain_rdkit_loop(smiles: list[str]) -> None:
    """The floor: parse, read a handful of per-atom and per-bond properties, Morgan bits."""
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    with rdBase.BlockLogs():
        for s in smiles:
            mol = Chem.MolFromSmiles(s)
            if mol is None:
                continue
            atoms = np.array([(a.GetAtomicNum(), a.GetDegree(), a.GetFormalCharge(), a.GetTotalNumHs(),
                               int(a.GetHybridization()), a.GetIsAromatic(), a.GetMass()) for a in mol.GetAtoms()])
            bonds = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx(), int(b.GetBondType()))
                              for b in mol.GetBonds()])
            fp = gen.GetFingerprintAsNumPy(mol)
            del atoms, bonds, fp


def our_featuriser(smiles: list[str]) -> None:
    """What one Ray task does per compound: parse, standardise, encode, fingerprint."""
    items = [(f"JCP2022_{i:06d}", "", [Structure(i + 1, s)]) for i, s in enumerate(smiles)]
    featurize_chunk(items, FeaturizeOptions())


def ray_job(table: Path, workers: int, chunk_size: int) -> dict[str, float]:
    """End-to-end job in a fresh output directory; returns its wall time and its own phase timings."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "data_prep.featurize", str(table), tmp,
                               f"num_workers={workers}", f"chunk_size={chunk_size}"],
                              cwd=REPO, env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
    last = proc.stdout.strip().splitlines()[-1]
    phases = {k.replace(" ", "_"): float(v) for k, v in
              re.findall(r"(ray start|chunks|chunk cpu|ray stop|consolidate) ([\d.]+) s", last)}
    return {"wall": wall, **phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2,000 molecules instead of all ~15,000")
    args = ap.parse_args()
    smiles = bundled_smiles()[: 2000 if args.quick else None]
    n = len(smiles)
    load = os.getloadavg()[0]
    rows = []

    def row(what, workers, wall, cpu, base=None, note=""):
        """molecules/s/core from wall time (what a person waits for) and from CPU time (what it costs,
        insensitive to other processes sharing the cores)."""
        per_cpu = n / cpu
        rows.append({"what": what, "workers": workers, "wall s": f"{wall:.1f}", "molecules/s": f"{n / wall:.0f}",
                     "molecules/s/core (wall)": f"{n / wall / workers:.0f}", "CPU s": f"{cpu:.1f}",
                     "molecules/CPU-s": f"{per_cpu:.0f}", "CPU share": f"{cpu / (wall * workers):.0%}",
                     "cost vs plain loop": f"{base / per_cpu:.2f}x" if base else "1.00x", "note": note})
        print(rows[-1], flush=True)
        return per_cpu

    base = row("plain RDKit loop (parse, atom/bond loop, Morgan)", 1, *timed(plain_rdkit_loop, smiles))
    row("our featuriser, one process (parse, standardise, encode, Morgan)", 1, *timed(our_featuriser, smiles), base)

    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "compound.csv.gz"
        pd.DataFrame({"Metadata_JCP2022": [f"JCP2022_{i:06d}" for i in range(n)], "Metadata_InChIKey": "",
                      "Metadata_InChI": "", "Metadata_SMILES": smiles}).to_csv(table, index=False)
        chunk = max(100, n // 30)
        ray_rates = {}
        for workers in (1, 2):
            t = ray_job(table, workers, chunk)
            row(f"Ray job, featurisation phase (chunk_size={chunk})", workers, t["chunks"], t["chunk_cpu"], base,
                f"end to end {t['wall']:.1f} s (Ray start {t['ray_start']:.1f} s, consolidation "
                f"{t['consolidate']:.1f} s, Ray stop {t['ray_stop']:.1f} s)")
            ray_rates[workers] = n / t["chunks"]
    speedup = ray_rates[2] / ray_rates[1]
    load_end = os.getloadavg()[0]
    table_md = markdown_table(rows)
    print(table_md)
    print(f"speed-up 1 -> 2 workers (featurisation phase): {speedup:.2f}x")
    body = (f"{n:,} molecules (RDKit's NCI first_5K.smi + PAINS wehi_mols.csv). Load average "
            f"{load:.1f} at the start and {load_end:.1f} at the end: the cores were shared with other work, so "
            f"wall-clock rates are noisy. The CPU columns are steadier (contention still inflates them a little): molecules per CPU-second (summed over the Ray "
            f"tasks) is the cost, and CPU share = CPU s / (wall s x workers) is how much of its cores a run "
            f"actually got.\n\n{table_md}\n\n"
            f"Speed-up from 1 to 2 Ray workers in the featurisation phase (wall): **{speedup:.2f}x**; "
            f"the per-molecule CPU cost is the same with 1 and 2 workers, so on 2 free cores the phase "
            f"scales with the CPU share the workers get.\n\n"
            "Our featuriser costs more per molecule than the plain loop because it also standardises (largest "
            "fragment, uncharge, RemoveHs) and reads every documented feature; Ray adds a fixed start-up and "
            "shutdown cost, then scales with cores because chunks are independent. At JUMP scale (116k "
            "compounds) the featurisation phase dominates: 116,000 / (molecules/CPU-s x cores) seconds.")
    write_section("Compound featurisation", body)


if __name__ == "__main__":
    main()
