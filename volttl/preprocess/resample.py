"""Resampling along the slice axis and in-plane resizing, done once at preprocessing.

OpenCV for the in-plane step (PENet's own interpolation: int16 in, int16 out; four
planes per call) and for the slice axis (one weighted sum per output slice), so worker
processes stay light (no torch import) and no volume-sized float copy is made. In-plane
shrinking is exact area averaging; enlarging and slice resampling are linear. Every
step maps output pixel centres to input coordinates by an affine rule, which is
recorded so that maps computed on the stored grid can be taken back to the original
one.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def linear_along(a: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``a`` at fractional ``coords`` along ``axis`` (clamped)."""
    n = a.shape[axis]
    coords = np.clip(coords, 0.0, n - 1)
    i0 = np.floor(coords).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (coords - i0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    return np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i1, axis=axis) * w


PLANES_PER_CALL = 4  # OpenCV resizes up to 4 channels in one pass: ~2x faster per plane


def resize_inplane(hu: np.ndarray, size: int) -> np.ndarray:
    """Resize every slice to ``size`` x ``size``: area averaging when shrinking (exact
    fractional footprints, PENet's cv2 INTER_AREA), linear when enlarging; pixel centres
    aligned in both cases. int16 HU stay int16 (rounded by OpenCV, as PENet's int16
    pipeline); anything else comes back float32."""
    n, rows, cols = hu.shape
    dtype = np.int16 if hu.dtype == np.int16 else np.float32
    if (rows, cols) == (size, size):
        return hu.astype(dtype, copy=False)
    mode = cv2.INTER_AREA if size < min(rows, cols) else cv2.INTER_LINEAR
    out = np.empty((n, size, size), dtype=dtype)
    for k in range(0, n, PLANES_PER_CALL):
        planes = [np.asarray(p, dtype=dtype) for p in hu[k:k + PLANES_PER_CALL]]
        stacked = cv2.merge(planes) if len(planes) > 1 else planes[0]
        resized = cv2.resize(stacked, (size, size), interpolation=mode)
        out[k:k + len(planes)] = np.moveaxis(resized.reshape(size, size, -1), -1, 0)
    return out


@dataclass(frozen=True)
class StoredGrid:
    """How the stored grid relates to the original one, in voxel index space.

    Original index ``(i, j, k)`` of stored voxel ``(c, r, s)``:
    ``i = (c + 0.5) * scale_i - 0.5``, ``j = (r + 0.5) * scale_j - 0.5``, and along the
    slices ``k = s * scale_k + offset_k``: when thinning (``scale_k > 1``) a stored slice
    is the area average of the source slices it covers, edge-aligned like the in-plane
    shrink (``offset_k = (scale_k - 1) / 2``: 0.625 -> 1.25 mm averages slice pairs); when
    keeping or refining the spacing, slice centres are aligned at the first slice
    (``offset_k = 0``) and values are linear.
    """

    num_slices: int
    scale_i: float
    scale_j: float
    scale_k: float

    @property
    def thinning(self) -> bool:
        return self.scale_k > 1.0 + 1e-9

    @property
    def offset_k(self) -> float:
        return 0.5 * self.scale_k - 0.5 if self.thinning else 0.0

    def stored_to_original(self) -> np.ndarray:
        """4x4 matrix from stored ``(c, r, s, 1)`` to original ``(i, j, k, 1)``."""
        m = np.eye(4)
        m[0, 0], m[0, 3] = self.scale_i, 0.5 * self.scale_i - 0.5
        m[1, 1], m[1, 3] = self.scale_j, 0.5 * self.scale_j - 0.5
        m[2, 2], m[2, 3] = self.scale_k, self.offset_k
        return m

    def original_slice_of(self, stored_slices: np.ndarray) -> np.ndarray:
        return np.asarray(stored_slices) * self.scale_k + self.offset_k


def stored_grid(shape: tuple[int, int, int], slice_spacing: float, thickness: float, size: int
                ) -> StoredGrid:
    """The grid a volume of ``shape`` (k, j, i) is stored on."""
    n, rows, cols = shape
    scale_k = thickness / slice_spacing
    if scale_k > 1.0 + 1e-9:  # thinning: whole footprints of scale_k source slices
        num = max(1, int(np.floor(n / scale_k + 1e-6)))
    else:
        num = int(np.floor((n - 1) / scale_k + 1e-6)) + 1 if n > 1 else 1
    return StoredGrid(num, cols / size, rows / size, scale_k)


def resample_to_store(hu: np.ndarray, slice_spacing: float, thickness: float, size: int
                      ) -> tuple[np.ndarray, StoredGrid]:
    """HU ``(k, j, i)`` -> int16 HU ``(slices, size, size)`` at ``thickness`` mm slices."""
    grid = stored_grid(hu.shape, slice_spacing, thickness, size)
    planes = resize_inplane(hu, size)
    if grid.thinning:
        return slices_area_int16(planes, grid.scale_k, grid.num_slices), grid
    coords = grid.original_slice_of(np.arange(grid.num_slices))
    return slices_to_int16(planes, coords), grid


def area_weights(scale: float, num: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For stored slice ``s``: the source slices it covers and their weights, the overlap
    of source slice ``[i, i + 1)`` with ``[s * scale, (s + 1) * scale)``, normalised."""
    out = []
    for s in range(num):
        lo, hi = s * scale, min((s + 1) * scale, n)
        idx = np.arange(int(np.floor(lo + 1e-9)), int(np.ceil(hi - 1e-9)))
        w = np.minimum(idx + 1, hi) - np.maximum(idx, lo)
        out.append((idx, w / w.sum()))
    return out


def slices_area_int16(planes: np.ndarray, scale: float, num: int) -> np.ndarray:
    """Area averaging along the slices (thinning), rounded and saturated to int16."""
    out = np.empty((num, *planes.shape[1:]), dtype=np.int16)
    acc = np.empty(planes.shape[1:], dtype=np.float32)
    for s, (idx, w) in enumerate(area_weights(scale, num, planes.shape[0])):
        acc[...] = 0.0
        for i, wi in zip(idx, w, strict=True):
            acc += np.float32(wi) * planes[i]
        np.clip(np.rint(acc), -32768, 32767, out=acc)
        out[s] = acc
    return out


def slices_to_int16(planes: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation at fractional slice ``coords`` (clamped), rounded and saturated
    to int16; one OpenCV call per output slice, no volume-sized temporaries."""
    n = planes.shape[0]
    out = np.empty((len(coords), *planes.shape[1:]), dtype=np.int16)
    for s, c in enumerate(np.clip(coords, 0.0, n - 1)):
        i0 = int(np.floor(c))
        i1, w = min(i0 + 1, n - 1), float(c - i0)
        cv2.addWeighted(planes[i0], 1.0 - w, planes[i1], w, 0.0, dst=out[s], dtype=cv2.CV_16S)
    return out
