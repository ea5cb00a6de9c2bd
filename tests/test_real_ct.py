"""The real chest CT from ../shared: NRRD read, and the same CT as a shuffled DICOM series."""

import numpy as np
import SimpleITK as sitk

from volttl.io import Geometry, read_study
from volttl.synth.cohort import write_dicom_series

from .conftest import shared_path


def test_real_ct_through_dicom_with_shuffled_names(tmp_path):
    path = shared_path("data", "real_ct", "lung1_image.nrrd")
    vol = read_study(path)
    assert vol.hu.shape == (48, 512, 512)
    np.testing.assert_allclose(vol.geometry.spacing, (0.5703, 0.5703, 5.0), atol=1e-3)
    np.testing.assert_allclose(vol.geometry.origin, (-146, -325, -777.5), atol=1e-3)
    assert vol.hu.min() == -1024 and vol.hu.max() == 3071
    crop = vol.hu[10:22, 100:228, 150:278].astype(np.int16)  # keep the test small
    origin = vol.geometry.affine_lps() @ np.array([150, 100, 10, 1.0])
    geo = Geometry(crop.shape, vol.geometry.spacing, tuple(origin[:3]), vol.geometry.direction)
    write_dicom_series(crop, geo, tmp_path / "dcm", np.random.default_rng(1), 0, 0, False)
    back = read_study(tmp_path / "dcm")
    np.testing.assert_array_equal(back.hu, crop)
    np.testing.assert_allclose(back.geometry.affine_lps(), geo.affine_lps(), atol=1e-3)
    # and SimpleITK, reading the same files independently, agrees on the geometry
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dcm")))
    img = reader.Execute()
    np.testing.assert_allclose(img.GetOrigin(), geo.origin, atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), crop)
