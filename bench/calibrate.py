"""Calibrate a synthetic screen on the field's baseline, CellProfiler-grade features (never on a learned method).

    python bench/calibrate.py [preset=calibrated] [featuriser=cellprofiler] [key=value ...]
        (featuriser: a name from micon.eval.featurisers; other keys: micon.synth.SynthConfig)

Renders the screen in memory, computes the featuriser's well profiles exactly as ingest + embed + evaluate
would (micon.eval.calibration), and prints its levels beside the field's anchors. Used to choose the
`calibrated` presets' effects (micon.synth.CALIBRATION); docs/RESULTS.md records the chosen runs.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from micon.eval.calibration import ANCHORS, levels, simulate_baseline, within  # noqa: E402
from micon.eval.featurisers import DEFAULT, FEATURISERS  # noqa: E402
from micon.synth import resolve_config  # noqa: E402


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    featuriser = DEFAULT
    rest = []
    for a in argv:
        if a.startswith("featuriser="):
            featuriser = a.split("=", 1)[1]
        else:
            rest.append(a)
    if featuriser not in FEATURISERS:
        print(f"calibrate: no featuriser {featuriser!r}; featurisers: {', '.join(FEATURISERS)}", file=sys.stderr)
        return 2
    args = rest if any(a.startswith("preset=") for a in rest) else ["preset=calibrated", *rest]
    cfg = resolve_config(args)
    t0 = time.perf_counter()
    wells, raw, prof = simulate_baseline(cfg, featuriser=featuriser, progress=True)
    lv = levels(wells, raw, prof)
    print(f"calibrate: {cfg.preset} {' '.join(argv)}: {featuriser}, {raw.shape[1]} features, {len(wells)} wells in "
          f"{time.perf_counter() - t0:.0f} s")
    for k, v in lv.items():
        band = ANCHORS.get(k)
        mark = "" if band is None else ("  ok" if within(k, v) else f"  OUT of {band}")
        print(f"  {k:24s} {v:.3f}{mark}")
    return 0 if all(within(k, lv[k]) for k in ANCHORS) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
