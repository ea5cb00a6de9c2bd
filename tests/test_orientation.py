"""One stored orientation: the same CT as LPS NRRD, RAS NIfTI, LAS NIfTI (dcm2niix's
order) and a DICOM series is stored bit-identically, and overlays land on each file."""

import csv

import nibabel as nib
import numpy as np
import pytest

from volttl.explain.regrid import to_original_grid
from volttl.explain.step import overlay_on_original
from volttl.io import Geometry, Volume, read_study
from volttl.io.nifti import write_nifti
from volttl.io.orientation import OrientationError, canonical_map, to_canonical
from volttl.preprocess.step import preprocess_step
from volttl.preprocess.store import Store
from volttl.synth.cohort import write_dicom_series

from .conftest import shared_path, small_config


def flipped(hu: np.ndarray, geo: Geometry, flip_i: bool, flip_j: bool) -> tuple[np.ndarray, Geometry]:
    """The same voxels in another voxel order: axes i and/or j reversed, geometry to match."""
    f = np.eye(4)
    n, rows, cols = hu.shape
    if flip_i:
        f[0, 0], f[0, 3] = -1, cols - 1
        hu = hu[:, :, ::-1]
    if flip_j:
        f[1, 1], f[1, 3] = -1, rows - 1
        hu = hu[:, ::-1, :]
    return np.ascontiguousarray(hu), Geometry.from_affine_lps(geo.affine_lps() @ f, hu.shape)


def test_every_voxel_order_becomes_lps_with_the_same_world_grid():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    geo = Geometry((5, 6, 7), (0.7, 0.8, 2.5), (10.0, -20.0, 30.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    for fi in (False, True):
        for fj in (False, True):
            arr, g = flipped(hu, geo, fi, fj)
            canon, m = to_canonical(Volume(arr, g, "nifti"))
            np.testing.assert_array_equal(canon.hu, hu)
            np.testing.assert_allclose(canon.geometry.affine_lps(), geo.affine_lps(), atol=1e-9)
            # the map sends canonical voxels to the source voxels holding the same value
            k, j, i = 4, 1, 5
            si, sj, sk, _ = (m @ np.array([i, j, k, 1.0])).astype(int)
            assert arr[sk, sj, si] == hu[k, j, i]
    # a sagittal grid (source k runs left-right) is permuted into LPS
    sag = Geometry((7, 5, 6), (0.8, 2.5, 0.7), (0.0, 0.0, 0.0), ((0, 0, 1), (1, 0, 0), (0, 1, 0)))
    canon, m = to_canonical(Volume(np.zeros((7, 5, 6), np.int16), sag, "nifti"))
    assert canon.hu.shape == (5, 6, 7) and np.allclose(canon.geometry.direction, np.eye(3))
    oblique = Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0),
                       ((0.7071, 0.7071, 0), (0.7071, -0.7071, 0), (0, 0, 1)))
    with pytest.raises(OrientationError, match="too oblique"):
        canonical_map(oblique)


def test_regrid_follows_flips_and_permutations():
    m = np.array([[0, 2.0, 0, 1.0], [-1.0, 0, 0, 4.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])  # (c,r,s)->(i,j,k)
    stored = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32)  # (s, r, c)
    out = to_original_grid(stored, m, (3, 5, 7))  # original (k, j, i)
    for s in range(3):
        for r in range(4):
            for c in range(5):
                i, j, k = int(2 * r + 1), int(4 - c), s
                if i < 7:
                    assert out[k, j, i] == pytest.approx(stored[s, r, c], abs=1e-6)


def write_four_voxel_orders(tmp_path) -> dict:
    """A crop of the real CT as an LPS NRRD, an RAS NIfTI, an LAS NIfTI and a DICOM series."""
    import SimpleITK as sitk

    ct = read_study(shared_path("data", "real_ct", "lung1_image.nrrd"))
    hu = ct.hu[:, 96:416, 64:448].astype(np.int16)  # a non-square crop: a transpose would show
    origin = ct.geometry.affine_lps() @ np.array([64, 96, 0, 1.0])
    geo = Geometry(hu.shape, ct.geometry.spacing, tuple(origin[:3]), ct.geometry.direction)
    files = {}
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(geo.spacing)
    img.SetOrigin(geo.origin)
    img.SetDirection(np.asarray(geo.direction).ravel().tolist())
    sitk.WriteImage(img, str(tmp_path / "lps.nrrd"))
    files["lps_nrrd"] = tmp_path / "lps.nrrd"
    for name, fi, fj in (("ras_nifti", True, True), ("las_nifti", False, True)):
        arr, g = flipped(hu, geo, fi, fj)
        write_nifti(arr, g, tmp_path / f"{name}.nii.gz")
        files[name] = tmp_path / f"{name}.nii.gz"
    write_dicom_series(hu, geo, tmp_path / "dicom", np.random.default_rng(2), 0, 0, False)
    files["dicom"] = tmp_path / "dicom"
    return files


def test_real_ct_in_four_voxel_orders_is_stored_identically(tmp_path):
    files = write_four_voxel_orders(tmp_path)
    ras = nib.load(files["ras_nifti"]).affine
    assert ras[0, 0] > 0 and ras[1, 1] > 0  # really RAS on disk
    las = nib.load(files["las_nifti"]).affine
    assert las[0, 0] < 0 and las[1, 1] > 0  # and LAS
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_id", "path", "label", "split", "pe_slices"])
        for name, path in files.items():
            w.writerow([name, str(path), 0, "train", "20-24"])
    cfg = small_config(manifest, tmp_path / "s.h5", slice_thickness=2.5, size=64)
    assert not preprocess_step(cfg, progress=False).failed
    with Store(tmp_path / "s.h5") as store:
        volumes = {name: store.hu(name)[...] for name in files}
        metas = {name: store.meta(name) for name in files}
    reference = volumes["dicom"]
    for name in files:
        np.testing.assert_array_equal(volumes[name], reference, err_msg=name)
        np.testing.assert_allclose(metas[name].stored_affine_ras, metas["dicom"].stored_affine_ras, atol=1e-3)
        np.testing.assert_array_equal(metas[name].pe_slices, metas["dicom"].pe_slices)
    # a hot box on the stored grid lands on the same world point in every source's own grid
    hot = np.zeros_like(reference, dtype=np.float32)
    hot[40:44, 20:24, 10:13] = 1.0
    centres = {}
    for name in files:
        cam, g = overlay_on_original(hot, metas[name])
        write_nifti(cam, g, tmp_path / f"{name}_cam.nii.gz")
        img = nib.load(tmp_path / f"{name}_cam.nii.gz")
        src_shape = nib.load(files[name]).shape if name.endswith("nifti") else None
        if src_shape is not None:
            assert img.shape == src_shape and np.allclose(img.affine, nib.load(files[name]).affine, atol=1e-4)
        data = np.asarray(img.dataobj)
        idx = np.argwhere(data > 0.5).mean(axis=0)
        centres[name] = (img.affine @ np.append(idx, 1.0))[:3]
    for name in files:
        np.testing.assert_allclose(centres[name], centres["dicom"], atol=0.6, err_msg=name)
