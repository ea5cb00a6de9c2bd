"""Localisation scores of CAM overlays against lesion masks, on constructed cases."""

import numpy as np
import pytest

from volttl.explain.localisation import dilate_mm, study_localisation


def test_dilation_is_in_millimetres_on_anisotropic_voxels():
    mask = np.zeros((21, 21, 21), dtype=bool)
    mask[10, 10, 10] = True
    grown = dilate_mm(mask, (1.0, 1.0, 2.5), 5.0)
    assert grown[15, 10, 10] and not grown[16, 10, 10]  # 5 voxels of 1 mm
    assert grown[10, 10, 12] and not grown[10, 10, 13]  # 2 voxels of 2.5 mm (7.5 mm is out)


def test_peak_and_ratio():
    ct = np.full((30, 30, 30), 40.0)
    ct[:, :, :3] = -1000.0  # air beside the body does not count as outside
    mask = np.zeros(ct.shape, dtype=bool)
    mask[10:14, 10:14, 10:14] = True
    cam = np.full(ct.shape, 0.1, dtype=np.float32)
    cam[11, 12, 12] = 1.0
    score = study_localisation(cam, mask, ct, (1.0, 1.0, 1.0))
    assert score["hit"]
    assert score["outside_mean"] == pytest.approx(0.1)
    assert score["ratio"] > 1
    cam[25, 25, 25] = 2.0  # the peak moves 10+ mm away from the lesion
    assert not study_localisation(cam, mask, ct, (1.0, 1.0, 1.0))["hit"]
    cam[:] = 0.0  # an all-zero map has no peak to count
    assert not study_localisation(cam, mask, ct, (1.0, 1.0, 1.0))["hit"]
