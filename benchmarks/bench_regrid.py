"""Mapping a stored-grid map back onto a 300 x 512 x 512 CT grid (`volttl cam`'s overlay):
the slice interpolation on the stored planes, then the in-plane resize (now), against the
previous order (the in-plane resize first, then the slice interpolation on the full
planes). From the 240 x 208 x 208 stored grid of 1.25 mm slices, as pe.yaml stores it.

    python benchmarks/bench_regrid.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from volttl.explain.regrid import _resize_planes, axis_map, to_original_grid
from volttl.preprocess.resample import linear_along

STORED, ORIGINAL = (240, 208, 208), (300, 512, 512)


def previous(stored: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The previous order, for this grid (no axis flips or permutations)."""
    out = _resize_planes(stored.astype(np.float32), ORIGINAL[1:])
    _, scale, offset = axis_map(m)[2]
    return linear_along(out, 0, (np.arange(ORIGINAL[0]) - offset) / scale)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    stored = np.zeros(STORED, np.float32)
    stored[100:140, 80:120, 90:130] = 0.7
    stored += rng.random(STORED, dtype=np.float32) * 0.1
    m = np.diag([512 / 208, 512 / 208, 1.25, 1.0])
    m[0, 3] = m[1, 3] = 0.5 * 512 / 208 - 0.5
    m[2, 3] = 0.3
    times: dict[str, list[float]] = {"previous": [], "now": []}
    for _ in range(args.repeats):  # alternated, so that the machine's drift falls on both
        for name, fn in (("previous", lambda: previous(stored, m)),
                         ("now", lambda: to_original_grid(stored, m, ORIGINAL))):
            t = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t)
    before = previous(stored, m)
    steps = int((np.rint(before * 255) != np.rint(out * 255)).sum())
    b, n = statistics.median(times["previous"]), statistics.median(times["now"])
    print(f"map back {STORED} -> {ORIGINAL}: previous {b:.2f} s, now {n:.2f} s ({b / n:.1f}x); largest "
          f"difference {float(np.abs(before - out).max()):.1e}, {steps} of {out.size} voxels one uint8 "
          "step apart")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
