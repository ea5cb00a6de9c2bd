"""Grad-CAM's map upsampling (feature cells onto the window's voxels): one axis at a time
(now) against the four-operand einsum of the previous version, which torch contracts left
to right when opt_einsum is absent, through a (D, d, H, h, W, w) outer product. At
pe.yaml's window (24 x 192 x 192) and the TTL@layer3 map (3 x 12 x 12), a batch of 4.

    python benchmarks/bench_upsample.py [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from volttl.explain.gradcam import interpolation_matrix, upsample_to_window

WINDOW, CELLS, STRIDE = (24, 192, 192), (3, 12, 12), (8, 16, 16)


def previous(maps: torch.Tensor) -> torch.Tensor:
    mz, my, mx = (interpolation_matrix(n, c, s, 0.0) for n, c, s in zip(WINDOW, CELLS, STRIDE, strict=True))
    return torch.einsum("zd,yh,xw,ndhw->nzyx", mz, my, mx, maps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    maps = torch.rand(args.batch, *CELLS, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"previous": [], "now": []}
    for _ in range(args.repeats):  # alternated, so that the machine's drift falls on both
        for name, fn in (("previous", previous), ("now", lambda m: upsample_to_window(m, WINDOW, STRIDE))):
            t = time.perf_counter()
            out = fn(maps)
            times[name].append(time.perf_counter() - t)
    gap = float((previous(maps) - out).abs().max())
    before, now = statistics.median(times["previous"]), statistics.median(times["now"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, opt_einsum "
          f"{'available' if torch.backends.opt_einsum.is_available() else 'absent'}; batch {args.batch}")
    print(f"upsampling: previous {before * 1000:.1f} ms, now {now * 1000:.2f} ms ({before / now:.0f}x); "
          f"largest difference {gap:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
