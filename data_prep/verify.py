"""Check a whole output against the checksums recorded when it was written, and list what is damaged.

    ./launch.sh verify PATH      (micon verify PATH)

PATH is a prep output (plate shards, control bank, replicate sets), a replicate-set directory, a graph
store, an embedding directory, or any directory holding some of them (a demo's OUT); local, or an object
storage URL (s3://bucket/prefix, the endpoint and credentials as for the other jobs: micon.storage). Exit status 0 when
everything is whole, 1 when anything is damaged or missing (each named, with what to rerun), 2 when PATH
holds none of them. Objects written before checksums were recorded are counted as unverified, not damaged.
"""
from __future__ import annotations

import sys
import time

from micon import storage
from micon.verify import Report, artefact_roots, checks_under

REPAIR = {"plate shard": "rerun prep for its plate (delete OUT/plates/PLATE.json, then the same prep command)",
          "control bank plate": "rerun prep for that plate (delete OUT/plates/PLATE.json, then the same prep command)",
          "control table": "rerun the same prep command",
          "replicate-set shard": "delete it and rerun ./launch.sh rsets SHARDS",
          "graph index": "rebuild the store with ./launch.sh featurize COMPOUNDS OUT",
          "graph array": "rebuild the store with ./launch.sh featurize COMPOUNDS OUT",
          "embeddings": "delete embed.json and rerun the same embed command (finished parts are kept)",
          "embedding sites": "delete embed.json and rerun the same embed command (finished parts are kept)",
          "embedding part": "delete the part and rerun the same embed command"}


def unreachable(path: str, e: OSError) -> int:
    print(f"verify: cannot read {storage.redact(path)}: {storage.redact(str(e))}; check that the path exists, the "
          f"endpoint ({storage.redact(storage._endpoint() or 'AWS')}) answers and your credentials, then rerun",
          file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or len(argv) > 1:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from micon.progress import bar as progress_bar

    try:
        path = storage.path(argv[0])        # an s3:// URL stays a URL (a Path would fold it to s3:/...)
        roots = artefact_roots(path) if path.is_dir() else []
    except ValueError as e:                 # credentials in the URL
        print(f"verify: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:                    # the object store cannot be reached (after the retries)
        return unreachable(argv[0], e)
    if not roots:
        print(f"verify: {path} holds no shard set, replicate sets, graph store or embeddings (looked for "
              f"manifest.json, graphs.zarr and embed.json at and under it)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        checks = checks_under(path)
    except OSError as e:
        return unreachable(argv[0], e)
    print(f"verify: {len(checks)} objects in {len(roots)} artefacts under {path}: "
          + ", ".join(f"{kind} {root}" for kind, root in roots), flush=True)
    report = Report()
    with progress_bar(total=sum(c.nbytes for c in checks), unit="B", unit_scale=True, desc="verify") as bar:
        for c in checks:
            try:
                problem = c.run()
            except OSError as e:        # an object that cannot be read (after the retries): named as damaged
                problem = f"unreadable ({storage.redact(str(e))[:200]})"
            report.checked.append((c, problem))
            bar.update(c.nbytes)
            if problem not in (None, "unverified"):
                bar.write(f"DAMAGED {c.kind} {c.path}: {problem}")
    seconds = time.perf_counter() - t0
    mb = sum(c.nbytes for c, _ in report.checked) / 1e6
    if report.unverified:
        kinds = sorted({c.kind for c in report.unverified})
        print(f"verify: {len(report.unverified)} objects ({', '.join(kinds)}) were written before checksums were "
              f"recorded and could not be checked; rewrite them to protect them", file=sys.stderr)
    if report.damaged:
        print(f"verify: {len(report.damaged)} of {len(checks)} objects damaged ({mb:.1f} MB read in "
              f"{seconds:.1f} s):", file=sys.stderr)
        for c, problem in report.damaged:
            print(f"  {c.kind} {c.path}: {problem}; {REPAIR.get(c.kind, 'rewrite it')}", file=sys.stderr)
        return 1
    print(f"verify: all {len(checks) - len(report.unverified)} checked objects whole ({mb:.1f} MB read in "
          f"{seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
