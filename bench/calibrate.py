"""Calibrate a synthetic screen on the hand-crafted baseline (never on a learned method).

    python bench/calibrate.py [preset=calibrated] [key=value ...]     (micon.synth.SynthConfig keys)

Renders the screen in memory, computes hand-crafted well profiles exactly as ingest + embed + evaluate
would (micon.eval.calibration), and prints its levels beside the field's anchors. Used to choose the
`calibrated` presets' effects (micon.synth.CALIBRATION); docs/RESULTS.md records the chosen run.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from micon.eval.calibration import ANCHORS, levels, simulate_handcrafted, within  # noqa: E402
from micon.synth import resolve_config  # noqa: E402


def main(argv: list[str]) -> int:
    args = argv if any(a.startswith("preset=") for a in argv) else ["preset=calibrated", *argv]
    cfg = resolve_config(args)
    t0 = time.perf_counter()
    wells, raw, prof = simulate_handcrafted(cfg)
    lv = levels(wells, raw, prof)
    print(f"calibrate: {cfg.preset} {' '.join(argv)}: {len(wells)} wells in {time.perf_counter() - t0:.0f} s")
    for k, v in lv.items():
        band = ANCHORS.get(k)
        mark = "" if band is None else ("  ok" if within(k, v) else f"  OUT of {band}")
        print(f"  {k:24s} {v:.3f}{mark}")
    return 0 if all(within(k, lv[k]) for k in ANCHORS) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
