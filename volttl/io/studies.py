"""One entry point to read a study, whatever its format.

``path`` is a DICOM folder, a NIfTI file (.nii, .nii.gz), an ITK image (.nrrd, .mha,
.mhd), or ``file.hdf5#name`` for one raw-HU dataset in an HDF5 file (PENet's
data.hdf5; its slice thickness and pixel spacing come from the manifest).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from volttl.errors import VolttlError
from volttl.io.addresses import split_hdf5_address
from volttl.io.dicom import DicomSeriesError, read_dicom_series
from volttl.io.geometry import Geometry, Volume
from volttl.io.nifti import ImageFileError, read_itk_image, read_nifti

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


class StudyReadError(VolttlError):
    """Any failure to read a study; the message names the file and the problem."""


def read_hdf5_dataset(spec: str, slice_thickness: float = 1.25, pixel_spacing: float = 1.0
                      ) -> Volume:
    """Read ``file.hdf5#name``: (slices, rows, cols) raw HU on a nominal axial grid."""
    file, name = split_hdf5_address(spec)
    if name is None:
        raise StudyReadError(f"{spec}: not an HDF5 address (file.hdf5#dataset)")
    try:
        with h5py.File(file, "r") as f:
            if name not in f:
                raise StudyReadError(f"{file}: no dataset '{name}'")
            hu = np.asarray(f[name][...], dtype=np.float32)
    except OSError as exc:
        raise StudyReadError(f"{file}: unreadable HDF5 file ({exc})") from None
    if hu.ndim != 3:
        raise StudyReadError(f"{file}#{name}: expected (slices, rows, cols), got {hu.shape}")
    geometry = Geometry(
        shape=tuple(int(v) for v in hu.shape),
        spacing=(pixel_spacing, pixel_spacing, slice_thickness),
        origin=(0.0, 0.0, 0.0),
        direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    )
    return Volume(hu=hu, geometry=geometry, source_kind="hdf5")


def check_volume(vol: Volume, where: str) -> Volume:
    """Refuse what would be stored wrong: non-finite voxels (they would become -32768 HU or
    flip sign in int16) and a grid without a positive, finite spacing."""
    spacing = np.asarray(vol.geometry.spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise StudyReadError(f"{where}: voxel spacing {tuple(round(float(v), 4) for v in spacing)} mm "
                             "is not positive and finite")
    if not np.all(np.isfinite(np.asarray(vol.geometry.direction, dtype=float))):
        raise StudyReadError(f"{where}: the orientation (direction cosines) is not finite")
    if vol.hu.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(vol.hu)))
        if bad:
            raise StudyReadError(f"{where}: {bad} of {vol.hu.size} voxels are NaN or infinite "
                                 "(fix or mask them before preprocessing)")
    return vol


def read_study(path: str | Path, series_uid: str | None = None, **hdf5_geometry) -> Volume:
    """Read a study as float32 HU ``(slices, rows, cols)`` with its full geometry; the
    voxels and spacing are checked (:func:`check_volume`)."""
    return check_volume(_read(path, series_uid, **hdf5_geometry), str(path))


def _read(path: str | Path, series_uid: str | None = None, **hdf5_geometry) -> Volume:
    text = str(path)
    try:
        if split_hdf5_address(text)[1] is not None:
            return read_hdf5_dataset(text, **hdf5_geometry)
        p = Path(text)
        if p.is_dir():
            return read_dicom_series(p, series_uid)
        if not p.exists():
            raise StudyReadError(f"{p}: no such file or folder")
        name = p.name.lower()
        if name.endswith((".nii", ".nii.gz")):
            return read_nifti(p)
        if name.endswith(ITK_SUFFIXES):
            return read_itk_image(p)
        raise StudyReadError(f"{p}: unknown study format (expected a DICOM folder, NIfTI, NRRD)")
    except (DicomSeriesError, ImageFileError) as exc:
        raise StudyReadError(str(exc)) from None
