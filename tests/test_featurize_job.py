"""End-to-end runs of the Ray featurisation job (data_prep/featurize.py) on a real local Ray cluster:
planted bad rows, store contents, idempotent rerun, and resume after SIGKILL."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rdkit import RDConfig

from micon.chem.featurizer import featurize, morgan_fingerprint
from micon.chem.standardize import standardize_molecule
from micon.chem.store import GraphStore, MissingGraphError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_featurize(*args, env_extra=None, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "data_prep.featurize", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"featurize exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def compound_rows() -> list[dict]:
    with open(os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")) as fh:
        smiles = [line.split()[0] for line in fh if line.split()][:200]
    rows = [dict(Metadata_JCP2022=f"JCP2022_{i:06d}", Metadata_InChIKey=f"KEY{i}", Metadata_InChI="",
                 Metadata_SMILES=s) for i, s in enumerate(smiles)]
    rows += [
        dict(Metadata_JCP2022="JCP2022_900001", Metadata_InChIKey="", Metadata_InChI="", Metadata_SMILES="C1CC(N"),
        dict(Metadata_JCP2022="JCP2022_900002", Metadata_InChIKey="", Metadata_InChI="", Metadata_SMILES=""),
        dict(Metadata_JCP2022="JCP2022_900003", Metadata_InChIKey="", Metadata_InChI="", Metadata_SMILES="C" * 250),
        # JCP2022_000005 again with another structure: a conflicting duplicate
        dict(Metadata_JCP2022="JCP2022_000005", Metadata_InChIKey="", Metadata_InChI="", Metadata_SMILES="CCO"),
        # InChI only (ethanol); and JCP2022_000010 repeated verbatim, which is not a conflict
        dict(Metadata_JCP2022="JCP2022_900004", Metadata_InChIKey="", Metadata_SMILES="",
             Metadata_InChI="InChI=1S/C2H6O/c1-2-3/h3H,2H2,1H3"),
        dict(Metadata_JCP2022="JCP2022_000010", **{k: v for k, v in rows[10].items() if k != "Metadata_JCP2022"}),
        # coordination compounds: kept whole (not ammonia, not a bare ion) and flagged in the index
        dict(Metadata_JCP2022="JCP2022_900005", Metadata_InChIKey="", Metadata_InChI="", Metadata_SMILES="N.N.Cl[Pt]Cl"),
        dict(Metadata_JCP2022="JCP2022_900006", Metadata_InChIKey="", Metadata_InChI="",
             Metadata_SMILES="[Gd+3].[Cl-].[Cl-].[Cl-]"),
    ]
    return rows


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("featurize")
    table = root / "compound.csv.gz"
    pd.DataFrame(compound_rows()).to_csv(table, index=False)
    out = root / "out"
    proc = run_featurize(table, out, "num_workers=2", "chunk_size=40")
    return dict(table=table, out=out, proc=proc, root=root)


def tree_digest(out: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file of the published store."""
    files = [out / "index.parquet", out / "featurize.json", *sorted((out / "graphs.zarr").rglob("*"))]
    return {str(p.relative_to(out)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in files if p.is_file()}


def assert_same_store(a: Path, b: Path):
    sa, sb = GraphStore(a), GraphStore(b)
    pd.testing.assert_frame_equal(sa.index, sb.index)
    for k, v in sa.graphs.arrays().items():
        np.testing.assert_array_equal(v, getattr(sb.graphs, k), err_msg=k)


def test_index_reports_every_planted_failure(job):
    index = pd.read_parquet(job["out"] / "index.parquet")
    assert list(index.columns) == ["Metadata_JCP2022", "Metadata_InChIKey", "status", "reason", "flags", "n_atoms",
                                   "n_bonds"]
    assert index.Metadata_JCP2022.is_unique and index.Metadata_JCP2022.is_monotonic_increasing
    assert len(index) == 206
    reason = dict(zip(index.Metadata_JCP2022, index.reason))
    status = dict(zip(index.Metadata_JCP2022, index.status))
    assert "cannot parse the SMILES 'C1CC(N'" in reason["JCP2022_900001"]
    assert "both Metadata_SMILES and Metadata_InChI are empty" in reason["JCP2022_900002"]
    assert "250 heavy atoms" in reason["JCP2022_900003"] and "max_atoms=200" in reason["JCP2022_900003"]
    dup = reason["JCP2022_000005"]
    assert "different structures" in dup and "row 6 " in dup and "row 204 " in dup and "'CCO'" in dup
    assert status["JCP2022_900004"] == "ok" and status["JCP2022_000010"] == "ok"
    assert dict(zip(index.Metadata_JCP2022, index.Metadata_InChIKey))["JCP2022_000010"] == "KEY10"
    row = index.set_index("Metadata_JCP2022")
    assert (row.loc["JCP2022_900005", ["status", "flags", "n_atoms"]].tolist() == ["ok", "metal,inorganic", 5])
    assert (row.loc["JCP2022_900006", ["status", "flags", "n_atoms"]].tolist() == ["ok", "metal,inorganic", 4])
    assert (index["flags"] == "").mean() > 0.9        # ordinary organic compounds carry no flag
    failed = index[index.status == "error"]
    assert (failed.n_atoms == 0).all() and (failed.reason.str.len() > 10).all()
    assert ((index.status == "ok") == (index.reason == "")).all()
    # the job's last line says how many failed; a few examples are printed above it
    lines = job["proc"].stdout.strip().splitlines()
    n_failed = len(failed)
    assert lines[-1].startswith(f"featurize: 206 compounds -> {206 - n_failed} graphs, {n_failed} failed")
    assert f"{n_failed} of 206 compounds have no graph" in job["proc"].stdout
    assert "JCP2022_900001: RDKit cannot parse" in job["proc"].stdout


def test_store_graphs_equal_direct_featurisation(job):
    store = GraphStore(job["out"])
    rows = {r["Metadata_JCP2022"]: r for r in reversed(compound_rows())}  # first row of an id wins
    checked = 0
    for cid in store.ids:
        text = rows[cid]["Metadata_SMILES"] or rows[cid]["Metadata_InChI"]
        mol = standardize_molecule(text)
        ref, got = featurize(mol), store.get(cid)
        for k in ("atom_features", "bond_features", "edge_index"):
            np.testing.assert_array_equal(getattr(got, k), getattr(ref, k), err_msg=f"{cid} {k}")
        np.testing.assert_array_equal(store.fingerprint(cid), morgan_fingerprint(mol))
        checked += 1
    assert checked == len(store) >= 195
    index = store.index.set_index("Metadata_JCP2022")
    assert (index.loc[store.ids, "n_atoms"].to_numpy() == [store.get(c).n_atoms for c in store.ids]).all()


def test_failed_compound_has_a_clear_error(job):
    store = GraphStore(job["out"])
    assert "JCP2022_900003" not in store
    with pytest.raises(MissingGraphError) as err:
        store.get("JCP2022_900003")
    assert str(err.value).startswith(f"compound JCP2022_900003 has no graph in {job['out']}: featurisation "
                                     f"failed with too large: 250 heavy atoms")
    with pytest.raises(KeyError, match="was not featurised.*launch.sh featurize"):
        store.get("JCP2022_123456")


def test_rerun_does_nothing_and_changes_nothing(job):
    out = job["out"]
    before = tree_digest(out)
    proc = run_featurize(job["table"], out, "workers=2", "chunk_size=40")
    assert "up to date, nothing to do" in proc.stdout
    assert "Ray" not in proc.stderr  # Ray was not even started
    assert tree_digest(out) == before
    # with the completion marker gone the store is rebuilt from the parts alone: no chunk is redone
    (out / "featurize.json").unlink()
    proc = run_featurize(job["table"], out, "workers=2", "chunk_size=40")
    assert "0 of 6 chunks featurised, 6 reused" in proc.stdout
    after = tree_digest(out)
    assert after.keys() == before.keys()
    for name in after.keys() - {"featurize.json"}:  # the marker records how many chunks this run did
        assert after[name][0] == before[name][0], f"{name} differs after rebuilding from the parts"


def _kill_session(pid: int) -> None:
    """SIGKILL the job's process group, then anything else left in its session (Ray workers
    run in their own process groups): what a scheduler's kill does to the whole job."""
    os.killpg(pid, signal.SIGKILL)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == pid:  # field 6 of /proc/PID/stat: session id
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_killed_job_resumes_and_matches_a_clean_run(job):
    out = job["root"] / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", MICON_FEATURIZE_TEST_DELAY_S="0.3")
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.featurize", str(job["table"]), str(out),
                             "workers=2", "chunk_size=10"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while len(list((out / "parts").glob("part-*.npz"))) < 3:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.time() < deadline, "no parts appeared within 120 s"
            time.sleep(0.05)
    finally:
        _kill_session(proc.pid)
        proc.wait(timeout=30)
    survivors = len(list((out / "parts").glob("part-*.npz")))
    assert 3 <= survivors < 21 and not (out / "featurize.json").exists()
    resumed = run_featurize(job["table"], out, "workers=2", "chunk_size=10")
    reused = int(resumed.stdout.rsplit(" reused", 1)[0].rsplit(", ", 1)[1])
    assert reused >= survivors and f"{21 - reused} of 21 chunks featurised" in resumed.stdout
    assert not list((out / "parts").glob(".*tmp*"))
    assert_same_store(out, job["out"])  # chunking differs (10 vs 40), the store must not


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    from data_prep.featurize import main

    def run(*args) -> str:
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("featurize: ")
        return err

    assert "does not exist" in run(tmp_path / "nope.csv.gz", tmp_path / "out")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"shards": []}))
    assert "'compounds' list" in run(manifest, tmp_path / "out")
    assert "did you mean chunk_size" in run(manifest, tmp_path / "out", "chunk_sise=3")
    table = tmp_path / "compound.csv"
    table.write_text("Metadata_JCP2022,smiles\nJCP2022_000001,CCO\n")
    assert "needs columns Metadata_JCP2022 and Metadata_SMILES" in run(table, tmp_path / "out")


def test_manifest_compounds_are_read(tmp_path):
    from micon.chem.compound_table import plan_items, read_compounds

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"compounds": [
        {"Metadata_JCP2022": "JCP2022_000002", "Metadata_SMILES": "CCO"},
        {"Metadata_JCP2022": "JCP2022_000001", "Metadata_SMILES": "c1ccccc1", "Metadata_InChIKey": "K"},
        {"Metadata_JCP2022": "", "Metadata_SMILES": "C"}]}))
    items, problems = plan_items(read_compounds(manifest))
    assert [(c, k, [s.smiles for s in ss]) for c, k, ss in items] == [
        ("JCP2022_000001", "K", ["c1ccccc1"]), ("JCP2022_000002", "", ["CCO"])]
    assert problems == ["row 3: empty Metadata_JCP2022; skipped"]


def test_a_store_with_no_graph_exits_non_zero(tmp_path):
    """Every compound unparseable: the job says so and exits 1 (it used to exit 0); the index keeps the reasons."""
    table = tmp_path / "compound.csv"
    pd.DataFrame(dict(Metadata_JCP2022=["JCP2022_000001", "JCP2022_000002"], Metadata_InChIKey=["", ""],
                      Metadata_InChI=["", ""], Metadata_SMILES=["not a smiles", "C1CC"])).to_csv(table, index=False)
    proc = run_featurize(table, tmp_path / "out", "workers=1", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "featurize: no compound of" in proc.stderr and "could be featurised (2 failed" in proc.stderr
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert (index.status != "ok").all() and index.reason.str.len().gt(0).all()


def test_the_old_worker_key_still_works_with_a_notice(job):
    """featurize's worker count is workers=, as prep's and embed's; num_workers= (the fixture's run) is read
    as it with one notice, and passing both is refused."""
    assert "notice: num_workers= is now workers= (one key for worker counts across jobs)" in job["proc"].stderr
    from data_prep.featurize import FeaturizeConfig
    from micon.config import ConfigError, load_config

    assert load_config(FeaturizeConfig, overrides=["num_workers=3"]).workers == 3
    with pytest.raises(ConfigError, match="name the same setting"):
        load_config(FeaturizeConfig, overrides=["num_workers=3", "workers=2"])
