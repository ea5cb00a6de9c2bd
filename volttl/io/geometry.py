"""Voxel grids in patient space.

Arrays are indexed ``(k, j, i)`` = (slice, row, column), as numpy and h5py like them.
The geometry maps the index ``(i, j, k)`` to LPS millimetres, the DICOM/ITK convention:
``world = origin + direction @ (spacing * (i, j, k))``; ``direction`` holds the unit
i, j and k axes as columns. NIfTI affines are RAS, i.e. the same with x and y negated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Shape ``(slices, rows, cols)``, spacing ``(sx, sy, sz)`` mm, LPS origin, direction."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]

    def affine_lps(self) -> np.ndarray:
        """4x4 matrix from voxel ``(i, j, k, 1)`` to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = np.asarray(self.direction, dtype=float) @ np.diag(self.spacing)
        a[:3, 3] = self.origin
        return a

    def affine_ras(self) -> np.ndarray:
        """4x4 matrix from voxel ``(i, j, k, 1)`` to RAS mm (what NIfTI stores)."""
        return LPS_TO_RAS @ self.affine_lps()

    @staticmethod
    def from_affine_lps(affine: np.ndarray, shape: tuple[int, int, int]) -> Geometry:
        m = np.asarray(affine, dtype=float)[:3, :3]
        spacing = np.linalg.norm(m, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):  # zero spacing: caught by the reader
            direction = m / spacing
        return Geometry(
            shape=tuple(int(s) for s in shape),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(v) for v in np.asarray(affine, dtype=float)[:3, 3]),
            direction=tuple(tuple(float(v) for v in row) for row in direction),
        )

    @staticmethod
    def from_affine_ras(affine: np.ndarray, shape: tuple[int, int, int]) -> Geometry:
        return Geometry.from_affine_lps(LPS_TO_RAS @ np.asarray(affine, dtype=float), shape)

    def as_attrs(self, prefix: str = "") -> dict:
        """Flat attributes for HDF5 / JSON, keys ``<prefix>shape`` ... ``<prefix>direction``."""
        return {
            f"{prefix}shape": np.asarray(self.shape, dtype=np.int64),
            f"{prefix}spacing": np.asarray(self.spacing, dtype=np.float64),
            f"{prefix}origin": np.asarray(self.origin, dtype=np.float64),
            f"{prefix}direction": np.asarray(self.direction, dtype=np.float64),
        }

    @staticmethod
    def from_attrs(attrs, prefix: str = "") -> Geometry:
        """Inverse of :meth:`as_attrs`."""
        return Geometry(
            shape=tuple(int(v) for v in attrs[f"{prefix}shape"]),
            spacing=tuple(float(v) for v in attrs[f"{prefix}spacing"]),
            origin=tuple(float(v) for v in attrs[f"{prefix}origin"]),
            direction=tuple(tuple(float(v) for v in row)
                            for row in np.asarray(attrs[f"{prefix}direction"])),
        )


@dataclass
class Volume:
    """An HU volume ``(slices, rows, cols)`` (int16 or float32) and the grid it lies on."""

    hu: np.ndarray
    geometry: Geometry
    source_kind: str  # "dicom", "nifti" or "hdf5"
    notes: list[str] = field(default_factory=list)  # how the reader read it, for the user
    series_uid: str = ""  # DICOM: the series read
