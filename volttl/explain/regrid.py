"""Maps computed on the stored grid, taken back onto the original CT voxel grid.

Preprocessing records ``stored_to_original``: a diagonal 4x4 map from stored voxel
``(c, r, s)`` to original voxel ``(i, j, k)`` (in-plane resize, slice resampling). Its
inverse gives, for every original voxel, a fractional stored index; the map is read
there by linear interpolation, one axis at a time (no per-voxel Python, no 3-D index
arrays), so a 512 x 512 x 300 grid costs a few array passes.
"""

from __future__ import annotations

import numpy as np

from volttl.preprocess.resample import linear_along


def to_original_grid(stored_map: np.ndarray, stored_to_original: np.ndarray,
                     original_shape: tuple[int, int, int]) -> np.ndarray:
    """``stored_map`` ``(s, r, c)`` -> float32 ``original_shape`` ``(k, j, i)``."""
    m = np.asarray(stored_to_original, dtype=float)
    if np.abs(m[:3, :3] - np.diag(np.diag(m[:3, :3]))).max() > 1e-9:
        raise ValueError("stored_to_original is not axis-aligned; this store needs a general resampler")
    inv = np.linalg.inv(m)
    n, rows, cols = (int(v) for v in original_shape)
    c = inv[0, 0] * np.arange(cols) + inv[0, 3]
    r = inv[1, 1] * np.arange(rows) + inv[1, 3]
    s = inv[2, 2] * np.arange(n) + inv[2, 3]
    out = linear_along(np.asarray(stored_map, dtype=np.float32), 2, c)
    out = linear_along(out, 1, r)
    return linear_along(out, 0, s).astype(np.float32, copy=False)
