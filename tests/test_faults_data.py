"""Issue 32, the data side: each fault a user meets gets one clear message naming the cause and the fix, the
jobs' exit code (2 = bad configuration or input), no traceback, and finished work left intact. Two runs in
one output (micon.locks), duplicated or tabbed YAML, a collapsed encoder, an empty CSV, `verify s3://`, a
deleted shard counted at once, a stalled upload.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, job_env
from tests import s3server

s3 = s3server.s3       # the local S3 server fixture (moto)

HOLD = ("import sys, time\nfrom micon.locks import run_lock\n"
        "with run_lock(sys.argv[1], job=sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(120)\n")


def hold_lock(out: Path, job: str = "prep") -> subprocess.Popen:
    """Another process holding the lock on `out` (until it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), job], cwd=REPO, env=job_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# ----------------------------------------------------------------------------------------- 6: one writer per OUT

def test_a_second_run_is_refused_naming_the_holder_and_the_lock_is_freed_after(tmp_path):
    from micon.locks import LOCK_NAME, LockHeld, holder, run_lock

    out = tmp_path / "out"
    proc = hold_lock(out)
    try:
        assert holder(out).pid == proc.pid
        with pytest.raises(LockHeld) as e:
            with run_lock(out, job="prep"):
                pass
        msg = str(e.value)
        assert f"prep: {out} is in use by another prep run (pid {proc.pid} on host " in msg
        assert "started 20" in msg and "Wait for it to finish, stop it, or write to another output" in msg
        assert str(out / LOCK_NAME) in msg and e.value.holder.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # the kernel freed the dead holder's lock: taken over, with a notice naming the dead run
    notices = []
    with run_lock(out, job="prep", notice=notices.append) as me:
        assert me.pid == os.getpid() and holder(out).pid == os.getpid()
        with run_lock(out, job="prep"):     # re-entrant within one process
            pass
        assert (out / LOCK_NAME).is_file()
    assert len(notices) == 1 and f"left by a prep run (pid {proc.pid} on host" in notices[0]
    assert "no longer running" in notices[0]
    assert not (out / LOCK_NAME).exists() and holder(out) is None
    with run_lock(out, job="prep", notice=notices.append):      # a clean release leaves nothing to take over
        pass
    assert len(notices) == 1


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    from micon.locks import LOCK_NAME, run_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    (tmp_path / LOCK_NAME).write_text(json.dumps({"job": "prep", "host": socket.gethostname(), "pid": dead.pid,
                                                  "start": time.time() - 3600}))
    notices = []
    with run_lock(tmp_path, job="prep", notice=notices.append):
        pass
    assert notices and f"pid {dead.pid}" in notices[0] and "60 min ago), no longer running" in notices[0]


def test_prep_into_an_out_another_prep_holds_exits_2_and_touches_nothing(tmp_path, capsys):
    from data_prep.ingest import main

    src, out = tmp_path / "screen", tmp_path / "shards"
    (src / "metadata").mkdir(parents=True)
    (out / "plates").mkdir(parents=True)
    (out / "plates" / "P1.json").write_text('{"finished": true}')
    (out / "manifest.json").write_text('{"n_sites": 3}')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = hold_lock(out)
    try:
        assert main([str(src), str(out), "workers=1"]) == 2
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err
    no_traceback(err)
    assert f"prep: {out} is in use by another prep run (pid {proc.pid}" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".micon-lock.json"} == before


def test_a_lock_object_in_a_bucket_refuses_a_live_holder_and_takes_over_a_dead_one(s3, tmp_path):
    from micon import storage
    from micon.locks import LOCK_NAME, LockHeld, run_lock

    url = f"s3://{s3.bucket('locks')}/shards"
    proc = hold_lock(url)
    try:
        with pytest.raises(LockHeld, match=rf"prep: {url} is in use by another prep run \(pid {proc.pid}"):
            with run_lock(url, job="prep"):
                pass
    finally:
        proc.kill()
        proc.wait()
    notices = []
    with run_lock(url, job="prep", notice=notices.append):
        assert storage.path(f"{url}/{LOCK_NAME}").is_file()
    assert notices and f"pid {proc.pid}" in notices[0]
    assert not storage.path(f"{url}/{LOCK_NAME}").exists()




# ----------------------------------------------------------------------------------------- 1: YAML configs

@pytest.mark.parametrize("text, expected", [
    ("steps: 5\nmicro_batch: 4\nsteps: 500\n",
     "key steps is given twice (line 1 and line 3); YAML would keep only the last and drop the first silently. "
     "Keep one steps: line"),
    ("optim:\n  lr: 0.01\nsteps: 5\noptim:\n  warmup_steps: 3\n",
     "key optim is given twice (line 1 and line 4); YAML would keep only the last and drop the first silently. "
     "Merge the two optim: blocks into one"),
    ("optim:\n  lr: 0.01\n  lr: 0.02\n", "key optim.lr is given twice (line 2 and line 3)"),
    ("steps: 5\noptim:\n\tlr: 0.01\n",
     "is not valid YAML at line 3, column 1: found character '\\t' that cannot start any token; YAML indents with "
     "spaces only: replace the tab with spaces"),
], ids=["scalar", "block", "nested", "tab"])
def test_a_duplicated_key_or_a_tab_in_a_training_config_exits_2_in_one_line(tmp_path, capsys, text, expected):
    from train.run import main

    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main([str(config), f"out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert expected in err and err.startswith(f"train: config file {config}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()       # nothing started


def test_a_config_without_duplicates_still_loads_with_yaml_merge_keys(tmp_path):
    from micon.config import read_yaml

    (tmp_path / "c.yaml").write_text("base: &b {lr: 0.1, warmup_steps: 2}\noptim:\n  <<: *b\n  lr: 0.5\n")
    assert read_yaml(tmp_path / "c.yaml")["optim"] == {"lr": 0.5, "warmup_steps": 2}


# ----------------------------------------------------------------------------------------- 2: a collapsed encoder

def screen_wells(n_sources: int = 2, plates: int = 2, wells: int = 16, sites: int = 2):
    """Site metadata of a small screen: every plate with 6 DMSO wells and the same 10 compounds."""
    import pandas as pd

    from micon import schema
    rows = []
    for s in range(n_sources):
        for p in range(plates):
            for w in range(wells):
                for site in range(1, sites + 1):
                    rows.append({schema.SOURCE: f"source_{s}", schema.BATCH: f"b{s}_{p}", schema.PLATE: f"P{s}{p}",
                                 schema.WELL: f"A{w + 1:02d}", schema.SITE: str(site),
                                 schema.JCP: schema.DMSO if w < 6 else f"JCP2022_{w:06d}"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("recipe", ["micon", "jump", "morphohelm"])
def test_evaluate_on_collapsed_embeddings_says_so_in_one_line_and_keeps_earlier_results(tmp_path, capsys, recipe):
    import numpy as np

    from evaluate.run import main
    from micon.embeddings import write_consolidated

    meta = screen_wells()
    emb_dir, out = tmp_path / "emb", tmp_path / "eval"
    emb_dir.mkdir()
    write_consolidated(emb_dir, np.ones((len(meta), 8), np.float32), meta, {"method": "micon"})
    out.mkdir()
    (out / "metrics.json").write_text('{"methods": {"earlier": {}}}')
    embedded = {p: p.read_bytes() for p in emb_dir.rglob("*") if p.is_file()}
    rc = main([f"out={out}", f"embeddings.micon={emb_dir}", "ray=false", f"recipe={recipe}", "wandb=false"])
    err = capsys.readouterr().err
    no_traceback(err)
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith("evaluate: micon: all 8 features are constant over all 64 wells (every value is 1): the "
                          "embeddings carry no information, as a collapsed encoder's do"), err
    assert "Check the run that made them (its loss, its learning rate, the checkpoint given to embed)" in err
    assert (out / "metrics.json").read_text() == '{"methods": {"earlier": {}}}'
    assert {p: p.read_bytes() for p in emb_dir.rglob("*") if p.is_file()} == embedded


def test_the_group_median_of_no_features_is_empty_and_dmso_without_variance_is_named():
    import numpy as np

    from micon.eval.profiles import ProfileError, _group_median, aggregate_wells, normalise_wells

    assert _group_median(np.ones((6, 0)), np.array([0, 0, 1, 1, 2, 2]), 3).shape == (3, 0)
    wells, raw = aggregate_wells(screen_wells(), np.ones((128, 4), np.float32))
    raw[:, 0] = np.arange(len(raw))
    from micon import schema
    raw[(wells[schema.JCP] == schema.DMSO).to_numpy(), 0] = 5.0     # varies, but never across DMSO
    with pytest.raises(ProfileError, match="none of the 4 features varies across the 24 DMSO wells, so recipe=micon"):
        normalise_wells(wells, raw)


# ----------------------------------------------------------------------------------------- 3: an empty compound CSV

def test_predict_with_a_zero_byte_csv_exits_2_naming_it_and_keeps_an_earlier_prediction(tmp_path, capsys):
    from evaluate import predict

    (tmp_path / "model.pt").write_bytes(b"not read: the table is checked before the checkpoint is loaded")
    out = tmp_path / "out"
    out.mkdir()
    (out / "predict.json").write_text('{"n_predicted": 7}')
    (tmp_path / "c.csv").write_bytes(b"")
    assert predict.main([str(tmp_path / "model.pt"), str(tmp_path / "c.csv"), str(out)]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert err == (f"predict: compound table {tmp_path / 'c.csv'} is empty (0 bytes); expected a CSV table with "
                   f"columns Metadata_JCP2022 and Metadata_SMILES (or Metadata_InChI): was it cut short by a failed "
                   f"download or copy? Write it again, or point at another table\n")
    assert sorted(p.name for p in out.iterdir()) == ["predict.json"]
    assert (out / "predict.json").read_text() == '{"n_predicted": 7}'


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty (0 bytes)"),
    (b"\n\n", "holds no text (no header row)"),
    (b"Metadata_JCP2022,Metadata_SMILES\n", "holds no compounds (its columns, no rows)"),
    (b"\x1f\x8b\x08garbage", "cannot read compound table"),
], ids=["zero-bytes", "blank", "header-only", "damaged-gzip"])
def test_featurize_refuses_an_empty_or_damaged_compound_table_with_exit_2(tmp_path, capsys, content, expected):
    from data_prep.featurize import main

    table = tmp_path / ("c.csv.gz" if content.startswith(b"\x1f") else "c.csv")
    table.write_bytes(content)
    assert main([str(table), str(tmp_path / "graphs"), "workers=1"]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert err.startswith("featurize: ") and expected in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------------------- 4: verify s3://

def small_artefacts(root: Path) -> None:
    """A shard set (two shards, the control table), a graph store and an embedding directory under `root`,
    each with the checksums its writer records: what verify reads, without running prep."""
    import numpy as np
    import pandas as pd

    from micon import integrity
    from micon.chem.featurizer import N_ATOM_CODES, N_BOND_CODES, EncodedMol
    from micon.chem.store import INDEX_COLUMNS, RaggedGraphs, write_store
    from micon.embeddings import part_path, write_consolidated, write_part

    shards = root / "shards"
    (shards / "shards").mkdir(parents=True)
    entries = []
    for i in range(2):
        f = shards / "shards" / f"P1-{i:06d}.tar"
        f.write_bytes(bytes(range(256)) * (20 + i))
        entries.append({"name": f.name, "bytes": f.stat().st_size, "checksum": integrity.of_file(f)})
    pd.DataFrame({"Metadata_Plate": pd.Series([], dtype=str), "row": pd.Series([], dtype=int),
                  "checksum": pd.Series([], dtype=str)}).to_parquet(shards / "controls.parquet")
    (shards / "manifest.json").write_text(json.dumps({"shards": entries, "checksums": {
        "controls.parquet": integrity.of_file(shards / "controls.parquet")}}))
    rng = np.random.default_rng(0)
    mols = [EncodedMol(rng.integers(0, 3, (3, N_ATOM_CODES), dtype=np.uint8), rng.random((3, 1), np.float32),
                       np.array([[0, 1], [1, 2]], np.int32), rng.integers(0, 3, (2, N_BOND_CODES), dtype=np.uint8))
            for _ in range(2)]
    graphs = RaggedGraphs.from_encoded(mols, [rng.integers(0, 2, 64, dtype=np.uint8) for _ in range(2)], 64)
    index = pd.DataFrame({"Metadata_JCP2022": ["JCP2022_000001", "JCP2022_000002"], "Metadata_InChIKey": ["A", "B"],
                          "status": ["ok", "ok"], "reason": ["", ""], "flags": ["", ""], "n_atoms": [3, 3],
                          "n_bonds": [2, 2]})
    write_store(root / "graphs", index[list(INDEX_COLUMNS)], graphs, radius=2, n_bits=64)
    emb = rng.normal(size=(6, 4)).astype(np.float32)
    rows = [{"Metadata_Plate": "P1", "Metadata_Well": f"A{i:02d}"} for i in range(6)]
    (root / "emb" / "parts").mkdir(parents=True)
    write_part(part_path(root / "emb", "P1-000000.tar"), emb, rows, "k")
    write_consolidated(root / "emb", emb, pd.DataFrame(rows), {"identity": "k"})


def test_verify_takes_an_s3_url_and_names_a_damaged_object_by_its_url(s3, tmp_path, capsys):
    from data_prep.verify import main
    from micon import storage

    small_artefacts(tmp_path / "outb")
    url = f"s3://{s3.bucket('verify-outb')}/outb"
    storage.put_tree(tmp_path / "outb", storage.path(url))

    def verify(path: str) -> tuple[int, str, str]:
        rc = main([path])
        cap = capsys.readouterr()
        no_traceback(cap.out + cap.err)
        return rc, cap.out, cap.err

    rc, out, err = verify(f"{url}/shards")
    assert rc == 0 and f"verify: 3 objects in 1 artefacts under {url}/shards: shard set {url}/shards" in out, out + err
    assert "verify: all 3 checked objects whole" in out and "s3:/verify" not in out + err
    rc, out, err = verify(url)
    assert rc == 0 and f"shard set {url}/shards" in out and f"graph store {url}/graphs" in out
    assert f"embeddings {url}/emb" in out, out + err
    # a damaged object is named by its URL, with what to rerun; every other object is still whole
    fs, key = storage.filesystem(f"{url}/shards/shards/P1-000001.tar")
    data = bytearray(fs.cat_file(key))
    data[100] ^= 0x10
    fs.pipe_file(key, bytes(data))
    rc, out, err = verify(url)
    assert rc == 1, out + err
    damaged = [line for line in err.splitlines() if line.startswith("  ")]
    assert damaged == [f"  plate shard {url}/shards/shards/P1-000001.tar: checksum mismatch (recorded "
                       + damaged[0].split("(recorded ", 1)[1]] and "rerun prep for its plate" in damaged[0]
    rc, out, err = verify("s3://verify-outb/nothing")
    assert rc == 2 and err.startswith("verify: s3://verify-outb/nothing holds no shard set"), err


def test_verify_names_a_graph_store_whose_attributes_cannot_be_read(tmp_path, capsys):
    from data_prep.verify import main

    (tmp_path / "graphs" / "graphs.zarr").mkdir(parents=True)
    (tmp_path / "graphs" / "graphs.zarr" / "zarr.json").write_text("{not json")
    assert main([str(tmp_path / "graphs")]) == 1
    err = capsys.readouterr().err
    no_traceback(err)
    assert f"  graph store {tmp_path / 'graphs' / 'graphs.zarr'}: unreadable (" in err, err


# ----------------------------------------------------------------------------------------- 7: a deleted shard

def test_a_deleted_shard_is_counted_lost_when_the_stream_reaches_it_not_at_the_epochs_end(tmp_path, caplog):
    import logging

    import numpy as np

    from micon.data.pipeline import Counts, ExampleStream, StreamConfig, shard_slot
    from micon.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path, "P1", "npy", 9_000)
    for i in range(12):
        writer.write(f"P1_A{i:02d}_1", rng.integers(0, 255, (5, 32, 32), dtype=np.uint8), {"i": i})
    written = writer.close()
    assert len(written) == 6 and all(s["n_samples"] == 2 for s in written)
    urls = [str(tmp_path / s["name"]) for s in written]
    expected = {s["name"]: s["n_samples"] for s in written}
    first = shard_slot(urls, 0, 0, 0, 1, False)[0]
    Path(first).unlink()                  # listed in the manifest, gone from storage
    stream = ExampleStream(str(tmp_path), StreamConfig(shuffle_buffer=1), rank=0, world=1, num_workers=1)
    counts = Counts()
    gen = stream._epochs(urls, expected, 0, counts, ExampleStream._parse_site, lambda s: True,
                         checksums={s["name"]: s["checksum"] for s in written})
    with caplog.at_level(logging.WARNING, logger="micon.data"):
        sample = next(gen)                # from the next shard: the epoch is far from its end
    assert sample["key"].startswith("P1_") and counts["images_read"] < sum(expected.values()) - expected[Path(first).name]
    assert counts["samples_lost"] == expected[Path(first).name] and counts["shards_missing"] == 1
    assert counts["shards_damaged"] == 1
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"shard {Path(first).name} is listed in the manifest but missing: its {expected[Path(first).name]} "
               f"samples are lost" in line for line in lines), lines
    # the rest of the epoch counts it once, not again at the epoch's end
    rest = sum(expected.values()) - expected[Path(first).name]
    for _ in range(rest - 1):
        next(gen)
    next(gen)                             # the next epoch's first sample (its first shard's two): epoch 0 settled
    again = shard_slot(urls, 1, 0, 0, 1, False)[0] == first      # epoch 1 starts with the missing shard
    assert counts["samples_lost"] == (2 if again else 1) * expected[Path(first).name]


# ----------------------------------------------------------------------------------------- 5: a frozen S3 server

MOTO = ("import sys, time\nfrom moto.server import ThreadedMotoServer\n"
        "ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False).start()\n"
        "print('ready', flush=True)\ntime.sleep(600)\n")


@pytest.fixture
def frozen_s3(monkeypatch):
    """A local S3 server in its own process (so that it can be stopped with SIGSTOP, as a hung server or a
    partition looks from here), with a bucket; this process's storage points at it with a 1 s deadline
    and 2 attempts. Yields (endpoint, freeze): freeze() stops the server until the test ends."""
    import signal

    import boto3

    from micon import storage
    from tests.s3server import ACCESS_KEY, SECRET_KEY, free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", MOTO, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        endpoint = f"http://127.0.0.1:{port}"
        for k, v in dict(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                         AWS_DEFAULT_REGION="us-east-1", MICON_STORAGE_BACKOFF_S="0.05", MICON_STORAGE_RETRIES="2",
                         MICON_STORAGE_TIMEOUT_S="1").items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                     region_name="us-east-1").create_bucket(Bucket="frozen")
        storage._filesystems.clear()
        yield endpoint, lambda: os.kill(proc.pid, signal.SIGSTOP)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
        storage._filesystems.clear()


def test_an_upload_to_a_frozen_server_ends_in_seconds_naming_the_endpoint(frozen_s3, tmp_path):
    from micon import atomic, storage

    endpoint, freeze = frozen_s3
    (tmp_path / "shard.tar").write_bytes(os.urandom(200_000))
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a.json").write_text("{}")
    storage.put_file(tmp_path / "shard.tar", storage.path("s3://frozen/shards/before.tar"))     # it answers
    freeze()
    uploads = {"put_file": lambda: storage.put_file(tmp_path / "shard.tar", storage.path("s3://frozen/shards/x.tar")),
               "write_bytes": lambda: atomic.write_json("s3://frozen/shards/manifest.json", {"n": 1}),
               "put_tree": lambda: storage.put_tree(tmp_path / "tree", storage.path("s3://frozen/tree"))}
    for name, upload in uploads.items():
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            upload()
        seconds = time.monotonic() - t0
        assert seconds < 10, (name, seconds)        # 2 attempts of about 1 s (fsspec counts whole seconds)
        assert f"the storage endpoint {endpoint} did not answer (FSTimeoutError; 2 attempts of 1 s each" in str(e.value)
        assert str(e.value).endswith("is the server up and reachable? (A slow link may need a longer deadline: "
                                     "MICON_STORAGE_TIMEOUT_S=SECONDS)"), name


def test_prep_into_a_bucket_of_a_frozen_server_exits_in_one_line_naming_the_endpoint(frozen_s3, tmp_path, capsys):
    from data_prep.ingest import main

    endpoint, freeze = frozen_s3
    (tmp_path / "screen" / "metadata").mkdir(parents=True)
    freeze()
    t0 = time.monotonic()
    rc = main([str(tmp_path / "screen"), "s3://frozen/shards", "workers=1"])
    err = capsys.readouterr().err
    no_traceback(err)
    assert rc == 1 and time.monotonic() - t0 < 20, err
    assert err.startswith("prep: s3://frozen/shards/.micon-lock.json: the storage endpoint "
                          f"{endpoint} did not answer (") and err.count("\n") == 1, err
    assert err.endswith("MICON_STORAGE_TIMEOUT_S=SECONDS); finished plates are kept: rerun the same command to "
                        "finish the rest once it answers\n")


def test_the_storage_deadline_is_a_prep_option_and_its_environment_variable(monkeypatch):
    from micon import storage

    monkeypatch.delenv(storage.TIMEOUT_ENV, raising=False)
    assert storage.timeout_s() == 60 and storage.upload_deadline(30_000_000) == 90
    storage.configure(timeout_s=5)
    assert os.environ[storage.TIMEOUT_ENV] == "5" and storage.timeout_s() == 5
    monkeypatch.setenv(storage.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="MICON_STORAGE_TIMEOUT_S='soon': give seconds"):
        storage.timeout_s()


@pytest.mark.slow
def test_two_preps_into_one_out_the_second_is_refused_and_a_killed_ones_lock_is_taken_over(tiny_screen, tmp_path):
    """The issue's case end to end: prep A runs; prep B into the same OUT 1 s later is refused (exit 2) naming A;
    A is killed mid-run; the rerun takes A's lock over with a notice, keeps A's finished plates, and the
    shard set verifies whole."""
    from tests.conftest import run_job

    out = tmp_path / "shards"
    args = [str(tiny_screen), str(out), "workers=1", "shard_mb=0.2"]
    a = subprocess.Popen([sys.executable, "-m", "data_prep.ingest", *args], cwd=REPO,
                         env=job_env(MICON_INGEST_TEST_DELAY_S="2"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(1)
        b = run_job("data_prep.ingest", *args, check=False)
        assert b.returncode == 2, b.stderr[-2000:]
        no_traceback(b.stderr)
        assert f"prep: {out} is in use by another prep run (pid {a.pid} on host " in b.stderr
        deadline = time.time() + 180
        while time.time() < deadline and not list((out / "plates").glob("*.json")):
            time.sleep(0.1)
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    done = len(list((out / "plates").glob("*.json")))
    assert 1 <= done < 4 and (out / ".micon-lock.json").is_file()
    rerun = run_job("data_prep.ingest", *args)
    assert f"prep: taking over the lock {out / '.micon-lock.json'} left by a prep run (pid {a.pid} on host" \
        in rerun.stderr and "no longer running" in rerun.stderr, rerun.stderr[-2000:]
    assert f"{done} already done" in rerun.stdout or f"{done + 1} already done" in rerun.stdout
    assert not (out / ".micon-lock.json").exists()
    assert run_job("data_prep.verify", out).returncode == 0


# ----------------------------------------------------------------------------------------- a storage endpoint down

def test_a_stream_whose_storage_endpoint_is_down_names_it_and_says_the_shards_are_intact(monkeypatch):
    """Shards in a bucket whose server is gone: the stream stops naming the endpoint and saying to rerun the
    same command once it answers, not to rewrite the shards with prep."""
    import botocore.exceptions

    from micon.data.pipeline import Counts, DataStreamError, ExampleStream, StreamConfig, unreachable_cause
    from tests.s3server import ACCESS_KEY, SECRET_KEY, free_port

    endpoint = f"http://127.0.0.1:{free_port()}"          # nothing listens there
    for k, v in dict(AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                     MICON_STORAGE_RETRIES="1", MICON_STORAGE_TIMEOUT_S="3").items():
        monkeypatch.setenv(k, v)
    # the chain as storage.call leaves it: its OSError raised `from None`, the connection error its context
    try:
        try:
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=endpoint)
        except Exception:
            raise OSError(5, "s3://b/x.tar: gave up after 5 attempts") from None
    except OSError as e:
        assert isinstance(unreachable_cause(e), botocore.exceptions.EndpointConnectionError)
    assert unreachable_cause(OSError(5, "truncated")) is None

    stream = ExampleStream("s3://bucket/shards", StreamConfig(), rank=0, world=1, num_workers=1)
    urls = ["s3://bucket/shards/a-000000.tar", "s3://bucket/shards/a-000001.tar"]
    t0 = time.monotonic()
    with pytest.raises(DataStreamError) as e:
        next(stream._epochs(urls, {"a-000000.tar": 4, "a-000001.tar": 4}, 0, Counts(), lambda s, c: s,
                            lambda s: True))
    msg = str(e.value)
    assert f"the storage endpoint {endpoint} cannot be reached" in msg, msg
    assert "The shards are probably intact: rerun the same command once the endpoint answers" in msg
    assert "training resumes from its last checkpoint" in msg and "Rerun prep" not in msg
    assert time.monotonic() - t0 < 30
