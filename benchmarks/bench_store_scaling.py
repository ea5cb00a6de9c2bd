"""The store's per-study cost must not grow with the store: 2,000 tiny studies preprocessed
in one process, and the time of the last 200 against the first 200 (target: <= 1.2x).

    python benchmarks/bench_store_scaling.py [--studies 2000]

Tiny studies (16 slices of 16 x 16) make the per-study fixed costs, the index rewrite
among them, dominate, which is where a cost that grows with the store would show.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import volttl.preprocess.step as step
from volttl.config import config_from_dict
from volttl.manifests.schema import StudyRow, write_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        rows = []
        for i in range(args.studies):
            path = tmp / f"s{i:05d}.nii.gz"
            nib.save(nib.Nifti1Image(rng.integers(-1000, 500, (16, 16, 16)).astype(np.int16),
                                     np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
            rows.append(StudyRow(f"s{i:05d}", str(path), i % 2, ("train", "val", "test")[i % 3],
                                 [4, 5, 6] if i % 2 else []))
        write_manifest(rows, tmp / "m.csv")
        cfg = config_from_dict({"data": {"manifest": str(tmp / "m.csv"), "store": str(tmp / "s.h5")},
                                "preprocess": {"slice_thickness": 2.0, "size": 16, "window": 8,
                                               "train_stride": 8, "min_pe_slices": 1, "workers": 1}})
        starts: list[float] = []
        one, index_write = step.run_one, step.ThrottledIndex.write
        writes: list[float] = []

        def timed(a):  # each study's start: the gap to the next includes its index update
            starts.append(time.perf_counter())
            return one(a)

        def timed_write(self):
            t = time.perf_counter()
            index_write(self)
            writes.append(time.perf_counter() - t)

        step.run_one, step.ThrottledIndex.write = timed, timed_write
        t0 = time.perf_counter()
        summary = step.preprocess_step(cfg, progress=False)
        total = time.perf_counter() - t0
        assert not summary.failed, summary.failed
        # the last study's gap ends before the closing index write, which is reported apart
        starts.append(time.perf_counter() - writes[-1])
        gaps = np.diff(starts)
        first, last = gaps[:200].sum(), gaps[-200:].sum()
        print(f"{args.studies} tiny studies in {total:.1f} s ({args.studies / total:.0f} studies/s); "
              f"{len(writes)} index writes, the last (closing) {writes[-1] * 1000:.0f} ms")
        print(f"first 200: {first:.2f} s, last 200: {last:.2f} s -> last / first = {last / first:.2f} "
              "(target <= 1.2)")


if __name__ == "__main__":
    main()
