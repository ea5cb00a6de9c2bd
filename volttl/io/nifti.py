"""NIfTI through nibabel, and other ITK formats (NRRD, MHA) through SimpleITK."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from volttl.errors import VolttlError
from volttl.io.geometry import Geometry, Volume


class ImageFileError(VolttlError):
    """An image file that cannot become one 3D HU volume."""


def read_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI; array ``(i, j, k)`` becomes ``(k, j, i)``, the RAS affine LPS."""
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise ImageFileError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageFileError(f"{path}: expected a 3D image, got shape {data.shape}")
    header = img.header
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        pixdim = tuple(float(v) for v in header["pixdim"][1:4])
        if any(not np.isfinite(v) or v <= 0 for v in pixdim):  # nibabel would quietly take 1 mm
            raise ImageFileError(f"{path}: no sform or qform, and pixdim {pixdim} has a zero spacing")
    hu = np.ascontiguousarray(data.transpose(2, 1, 0))
    geometry = Geometry.from_affine_ras(img.affine, hu.shape)
    return Volume(hu=hu, geometry=geometry, source_kind="nifti")


def read_itk_image(path: str | Path) -> Volume:
    """Read NRRD/MHA/MHD with SimpleITK (LPS already, array already ``(k, j, i)``)."""
    import SimpleITK as sitk  # imported here: slow to import, rarely needed

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise ImageFileError(f"{path}: unreadable image ({str(exc).strip().splitlines()[-1]})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageFileError(f"{path}: expected a 3D single-channel image")
    hu = sitk.GetArrayFromImage(img).astype(np.float32)
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    geometry = Geometry(
        shape=tuple(int(v) for v in hu.shape),
        spacing=tuple(float(v) for v in img.GetSpacing()),
        origin=tuple(float(v) for v in img.GetOrigin()),
        direction=tuple(tuple(float(v) for v in row) for row in direction),
    )
    return Volume(hu=hu, geometry=geometry, source_kind="itk")


def write_nifti(array_kji: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a ``(k, j, i)`` array on ``geometry`` as NIfTI with its exact RAS affine."""
    img = nib.Nifti1Image(np.ascontiguousarray(array_kji.transpose(2, 1, 0)), geometry.affine_ras())
    img.set_qform(geometry.affine_ras(), code=1)
    img.set_sform(geometry.affine_ras(), code=1)
    nib.save(img, str(path))
