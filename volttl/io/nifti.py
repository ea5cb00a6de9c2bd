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
    except MemoryError:
        shape = tuple(int(v) for v in img.header.get_data_shape())
        gib = float(np.prod(shape, dtype=np.float64)) * 4 / 2**30
        claimed = " x ".join(map(str, shape))
        raise ImageFileError(f"{path}: its header claims {claimed} voxels ({gib:,.0f} GiB as float32), "
                             "more than this machine's memory; a damaged header?") from None
    except Exception as exc:
        raise ImageFileError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageFileError(f"{path}: expected a 3D image, got shape {data.shape}")
    header = img.header
    hu = np.ascontiguousarray(data.transpose(2, 1, 0))
    notes = _hu_doubts(header.get_data_dtype(), hu)
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        pixdim = tuple(float(v) for v in header["pixdim"][1:4])
        if any(not np.isfinite(v) or v <= 0 for v in pixdim):  # nibabel would quietly take 1 mm
            raise ImageFileError(f"{path}: no sform or qform, and pixdim {pixdim} has a zero spacing")
        # no orientation in the file: nibabel and ITK (so 3D Slicer) guess differently (they
        # disagree front-to-back); the overlay must land where the viewer puts the CT
        geometry = _itk_geometry(path, hu.shape)
        note = ("no qform or sform: oriented as ITK and 3D Slicer read the file (identity direction in "
                "LPS); check left-right and front-back on the overlay")
        return Volume(hu=hu, geometry=geometry, source_kind="nifti", notes=[note, *notes])
    _refuse_shear(path, img.affine)
    geometry = Geometry.from_affine_ras(img.affine, hu.shape)
    return Volume(hu=hu, geometry=geometry, source_kind="nifti", notes=notes)


def _hu_doubts(dtype: np.dtype, hu: np.ndarray) -> list[str]:
    """Why the values may not be HU (a NIfTI says nothing of its units): a byte type, or no
    value below zero (CT in HU has air at -1000 and fat near -100)."""
    if np.dtype(dtype).itemsize == 1:
        return [f"stored as {np.dtype(dtype).name}: 8-bit values cannot hold HU (-1000 air to 3000 bone); "
                "an exported screenshot-range image, not HU, is likely"]
    lo = float(hu.min()) if hu.size else 0.0
    if lo >= 0:
        return [f"no value below 0 (lowest {lo:g}), unlike CT in HU (air -1000): check that the file holds "
                "HU (a rescale not applied, or another modality)"]
    return []


def _itk_geometry(path: Path, shape: tuple[int, int, int]) -> Geometry:
    """The grid ITK reads from a file's header (no pixels read)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return Geometry(shape=shape, spacing=tuple(float(v) for v in reader.GetSpacing()[:3]),
                    origin=tuple(float(v) for v in reader.GetOrigin()[:3]),
                    direction=tuple(tuple(float(v) for v in row)
                                    for row in np.asarray(reader.GetDirection(), dtype=float).reshape(3, 3)))


def _refuse_shear(path: Path, affine: np.ndarray) -> None:
    """A sheared affine (voxel axes not at right angles) has no grid of spacing and
    direction: refused, as a gantry tilt is, rather than written back unsheared."""
    axes = np.asarray(affine, dtype=float)[:3, :3]
    unit = axes / np.linalg.norm(axes, axis=0)
    cosines = np.abs(unit.T @ unit - np.eye(3))
    if cosines.max() > 1e-4:
        angle = float(np.degrees(np.arcsin(min(1.0, cosines.max()))))
        raise ImageFileError(f"{path}: sheared affine (voxel axes {angle:.2f} degrees off a right angle); "
                             "volttl does not resample shear: resample the image onto an orthogonal grid "
                             "first (e.g. with 3D Slicer or SimpleITK)")


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


def _image(array_kji: np.ndarray, geometry: Geometry) -> nib.Nifti1Image:
    # (k, j, i) in C order is (i, j, k) in Fortran order, the order NIfTI stores: no copy
    img = nib.Nifti1Image(np.ascontiguousarray(array_kji).transpose(2, 1, 0), geometry.affine_ras())
    img.set_qform(geometry.affine_ras(), code=1)
    img.set_sform(geometry.affine_ras(), code=1)
    img.header.set_xyzt_units("mm")
    return img


def write_nifti(array_kji: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a ``(k, j, i)`` array on ``geometry`` as NIfTI with its exact RAS affine."""
    nib.save(_image(array_kji, geometry), str(path))


def write_unit_map(map_kji: np.ndarray, geometry: Geometry, path: str | Path, dtype: str = "uint8") -> None:
    """A map in [0, 1] as NIfTI for viewers: ``uint8`` stores ``round(255 * value)`` with
    ``scl_slope = 1/255`` (a viewer shows the value; at most 1/510 off, and a tenth of the
    float32 file, much faster to compress), ``float32`` stores the values as they are.
    ``cal_min``/``cal_max`` are 0 and 1, so a viewer's window starts at the full range."""
    if dtype not in ("uint8", "float32"):
        raise ValueError(f"cam.dtype '{dtype}' is not one of uint8, float32")
    values = np.asarray(map_kji, dtype=np.float32)
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        values = np.clip(values, 0.0, 1.0)
    if dtype == "uint8":
        import cv2  # one multi-threaded pass: round(255 * value), saturated

        flat = np.ascontiguousarray(values).reshape(-1, values.shape[-1])
        quantised = cv2.convertScaleAbs(flat, alpha=255.0).reshape(values.shape)
        img = _image(quantised, geometry)
        img.header.set_slope_inter(1.0 / 255.0, 0.0)
    else:
        img = _image(values, geometry)
        img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, 1.0
    nib.save(img, str(path))
