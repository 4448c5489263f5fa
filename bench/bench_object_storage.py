"""Object storage vs local disk: prep's sites per second per core reading TIFFs from a local S3 server
(moto, in its own process) vs from disk, and the training stream's examples per second per loader worker
from a bucket vs from disk; then the arithmetic for cpg0016 straight from the public bucket.

    python bench/bench_object_storage.py [--image-size 256] [--batches 40] [--no-write]

A local server measures this code's overhead per object (requests, copies, retries machinery), not the
latency of real S3: on S3 each GET costs tens of milliseconds, which prep hides by fetching the TIFFs of
several sites at once (data_prep/ingest.py SiteImages) and Ray running one task per core or more.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from bench._report import markdown_table, write_section  # noqa: E402
from micon import storage  # noqa: E402

GALLERY = "s3://cellpainting-gallery/cpg0016-jump/"
KEY, SECRET = "AKIABENCHKEY", "bench-secret"


def start_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (so that its CPU is not the measured process's)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET,
                      AWS_DEFAULT_REGION="us-east-1")
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, endpoint


def upload_tree(local: Path, url: str, rewrite_load_data: bool = False) -> None:
    fs, key = storage.filesystem(url)
    fs.mkdir(key.split("/", 1)[0])
    objects = {}
    for f in sorted(local.rglob("*")):
        rel = f.relative_to(local).as_posix()
        if not f.is_file():
            continue
        data = f.read_bytes()
        if rewrite_load_data and f.name.startswith("load_data"):
            if f.suffix != ".parquet":
                continue
            t = pd.read_parquet(f)
            for c in [c for c in t.columns if c.startswith("PathName_")]:
                t[c] = GALLERY + t[c]
            buf = io.BytesIO()
            t.to_parquet(buf, index=False)
            data = buf.getvalue()
        objects[f"{key}/{rel}"] = data
    fs.pipe(objects)


def prep_rate(src, out: Path) -> tuple[float, float, int]:
    """(sites/s wall, CPU s per site, sites) of ingest_plate over every plate, in this one process."""
    from data_prep.ingest import IngestConfig, ingest_plate
    from micon.data.jump import read_screen

    screen = read_screen(src)
    plates = screen.plates["Metadata_Plate"].tolist()
    for d in ("shards", "plates", "control_bank.zarr"):
        (out / d).mkdir(parents=True, exist_ok=True)
    subsets = screen.subsets(plates)
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for p in plates:
        n += ingest_plate(subsets[p], str(out), p, IngestConfig())["n_sites"]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, cpu / n, n


def stream_rate(shards, batches: int) -> tuple[float, int]:
    """Examples/s of one loader worker's stream (SimCLR's: single sites from plate shards, decoded and
    augmented), after a warm-up batch."""
    from micon.data.needs import DataNeeds
    from micon.data.pipeline import ExampleStream, StreamConfig

    cfg = StreamConfig(needs=DataNeeds(pairs=False, negcon_sites=True), batch_size=16, shuffle_buffer=64)
    it = iter(ExampleStream(str(shards), cfg, rank=0, world=1, num_workers=1))
    first = next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        b = next(it)
        n += len(b["keys"])
    return n / (time.perf_counter() - t0), int(first["counts"].get("read_retries", 0))


def cpg0016(cpu_disk: float, cpu_s3: float) -> str:
    """The arithmetic for reading cpg0016's compound plates straight from the public bucket."""
    sites, per_well, tiff_mb = 5.9e6, 9, 2.3
    gets = sites * 5
    tb = gets * tiff_mb / 1e6
    extra = max(cpu_s3 - cpu_disk, 0.0)
    inflight = 20e9 / (tiff_mb * 1e6) * 0.05
    rows = [
        ["sites (COMPOUND plates)", f"{sites / 1e6:.1f} M ({per_well} per well, 5 channels)"],
        ["GET requests (one per TIFF)", f"{gets / 1e6:.1f} M"],
        ["bytes read", f"{tb:.0f} TB (5 x {tiff_mb} MB per site)"],
        ["prep CPU, processing (README: 0.043-0.053 s per site)", f"{sites * 0.048 / 3600:,.0f} core-hours"],
        ["prep CPU, object reads (measured here: +{:.1f} ms per site over disk)".format(extra * 1e3),
         f"{sites * extra / 3600:,.0f} core-hours"],
        ["request cost at $0.0004 per 1,000 GET (S3 Standard list price; check current prices)",
         f"${gets / 1000 * 0.0004:,.0f}"],
        ["egress, compute in us-east-1 (the bucket's region)", "none: in-region transfer is not charged"],
        ["egress, compute outside AWS at ~$0.09/GB (internet list price): what a private mirror's owner pays; the "
         "Cell Painting Gallery is in AWS's Registry of Open Data, read anonymously at no charge to the reader",
         f"${tb * 1000 * 0.09:,.0f}"],
        ["time at 20 GB/s aggregate reads", f"{tb * 1e12 / 20e9 / 3600:.1f} h"],
        ["GETs in flight for 20 GB/s at ~50 ms per 2.3 MB object", f"~{inflight:,.0f} (prep fetches 40 at once per "
         f"Ray task, 8 sites ahead: ~{inflight / 40:.0f} tasks keep it busy)"],
    ]
    return markdown_table([{"cpg0016 straight from s3://cellpainting-gallery": k, "value": v} for k, v in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()
    server, _ = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
            subprocess.run([sys.executable, "-m", "data_prep.synth", str(tmp / "screen"), "preset=tiny",
                            f"image_size={args.image_size}", "seed=0"], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            src = "s3://bench-src/cpg0016-jump"
            upload_tree(tmp / "screen", src, rewrite_load_data=True)
            rows = []
            disk_rate, disk_cpu, n = prep_rate(tmp / "screen", tmp / "out-disk")
            s3_rate, s3_cpu, _ = prep_rate(src, tmp / "out-s3")
            tiff_kb = sum(f.stat().st_size for f in (tmp / "screen").rglob("*.tiff")) / (n * 5) / 1e3
            print(f"prep: disk {disk_rate:.1f} sites/s ({disk_cpu * 1e3:.1f} CPU ms/site), S3 {s3_rate:.1f} sites/s "
                  f"({s3_cpu * 1e3:.1f} CPU ms/site), {n} sites", flush=True)
            rows.append(["prep: sites/s, 1 core (ingest_plate, every plate)", f"{disk_rate:.1f}", f"{s3_rate:.1f}",
                         f"{n} sites of {args.image_size} px, {tiff_kb:.0f} kB per TIFF"])
            rows.append(["prep: CPU ms per site", f"{disk_cpu * 1e3:.1f}", f"{s3_cpu * 1e3:.1f}",
                         "the S3 column's extra is the client's work per object"])
            # the training stream: shards from the disk prep (same bytes either way), uploaded
            from data_prep.ingest import IngestConfig, finalize
            from micon.data.jump import read_screen
            plates = read_screen(tmp / "screen").plates["Metadata_Plate"].tolist()
            finalize(tmp / "screen", tmp / "out-disk", IngestConfig(), plates)
            upload_tree(tmp / "out-disk", "s3://bench-shards/shards")
            d_rate, _ = stream_rate(tmp / "out-disk", args.batches)
            s_rate, retries = stream_rate("s3://bench-shards/shards", args.batches)
            rows.append(["training stream: examples/s, 1 loader worker (decode + augment)", f"{d_rate:.0f}",
                         f"{s_rate:.0f}", f"{args.batches} batches of 16, SimCLR's plate-shard stream; "
                         f"{retries} retries"])
            table = markdown_table([dict(zip(["", "local disk", "local S3 server (moto)", "note"], r)) for r in rows])
            load = os.getloadavg()[0]
            body = (table + f"\n\nLoad average when it ran: {load:.1f} (the machine is shared). "
                    "The S3 server is moto in a process of its own on the same 2 cores, so its "
                    "CPU competes with the measured process: the S3 column is a lower bound of this code's "
                    "speed against a real store, and real S3 adds tens of milliseconds per request (hidden by "
                    "concurrency, not by cores).\n\n" + cpg0016(disk_cpu, s3_cpu))
            print(body)
            if not args.no_write:
                write_section("Object storage: local disk vs an S3 server", body)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
