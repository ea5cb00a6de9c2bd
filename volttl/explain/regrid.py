"""Maps computed on the stored grid, taken back onto the original CT voxel grid.

Preprocessing records ``stored_to_original``: a 4x4 map from stored voxel ``(c, r, s)``
to original voxel ``(i, j, k)``: the reorientation to the canonical voxel order (a
permutation and flips of the axes) composed with the in-plane resize and the slice
resampling (a scale and offset per axis). Each original axis therefore reads one stored
axis; the map is transposed to the original axis order and read at the fractional
stored index of every original voxel by linear interpolation, one axis at a time (no
per-voxel Python, no 3-D index arrays), so a 512 x 512 x 300 grid costs a few passes.
"""

from __future__ import annotations

import numpy as np

from volttl.preprocess.resample import linear_along


def axis_map(stored_to_original: np.ndarray) -> list[tuple[int, float, float]]:
    """For each original axis (i, j, k): the stored axis it reads, the scale and offset of
    ``original = scale * stored + offset``. Raises when the map mixes axes."""
    m = np.asarray(stored_to_original, dtype=float)
    a = m[:3, :3]
    source = np.argmax(np.abs(a), axis=1)
    mask = np.zeros((3, 3), dtype=bool)
    mask[np.arange(3), source] = True
    if sorted(source.tolist()) != [0, 1, 2] or np.abs(a[~mask]).max(initial=0) > 1e-9:
        raise ValueError("stored_to_original mixes axes; this store needs a general resampler")
    return [(int(source[o]), float(a[o, source[o]]), float(m[o, 3])) for o in range(3)]


def to_original_grid(stored_map: np.ndarray, stored_to_original: np.ndarray,
                     original_shape: tuple[int, int, int]) -> np.ndarray:
    """``stored_map`` ``(s, r, c)`` -> float32 ``original_shape`` ``(k, j, i)``."""
    axes = axis_map(stored_to_original)
    # array axis 2 - o of the output holds original axis o, read from stored array axis 2 - source
    out = np.transpose(np.asarray(stored_map, dtype=np.float32), [2 - axes[2 - ax][0] for ax in range(3)])
    # a flipped axis: read the array backwards, so that every scale is positive
    flips = tuple(2 - o for o, (_, scale, _) in enumerate(axes) if scale < 0)
    if flips:
        out = np.flip(out, axis=flips)
    axes = [(src, abs(scale), offset + scale * (out.shape[2 - o] - 1) if scale < 0 else offset)
            for o, (src, scale, offset) in enumerate(axes)]
    # pixel centres aligned in-plane: one OpenCV resize per plane, done last, so that the
    # slice interpolation runs on the small stored planes (the axes are interpolated
    # separately, so the order does not change the result beyond float rounding)
    planes = all(abs(axes[o][2] - (0.5 * axes[o][1] - 0.5)) < 1e-9 for o in (0, 1))
    for o, (_, scale, offset) in enumerate(axes):
        length = int(original_shape[2 - o])
        coords = (np.arange(length) - offset) / scale
        identity = out.shape[2 - o] == length and np.allclose(coords, np.arange(length))
        if (planes and o in (0, 1)) or identity:
            continue  # left to the plane resize, or the identity (slices kept as they were)
        out = linear_along(out, 2 - o, coords)
    if planes:
        out = _resize_planes(out, (int(original_shape[1]), int(original_shape[2])))
    return np.ascontiguousarray(out, dtype=np.float32)


def _resize_planes(volume: np.ndarray, rows_cols: tuple[int, int]) -> np.ndarray:
    """Bilinear in-plane resize of every slice with pixel centres aligned (OpenCV's
    convention, the same rule as the stored grid's): one call per slice."""
    import cv2

    rows, cols = rows_cols
    out = np.empty((volume.shape[0], rows, cols), dtype=np.float32)
    for k in range(volume.shape[0]):
        cv2.resize(np.ascontiguousarray(volume[k]), (cols, rows), dst=out[k], interpolation=cv2.INTER_LINEAR)
    return out
