"""Reading DICOM series: order from positions, rescaling, geometry, and each named error."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless

from volttl.io import Geometry, StudyReadError, read_study
from volttl.io.dicom import DEFER_BYTES, decoder_available
from volttl.synth.cohort import write_dicom_series

ROTATED = Geometry(
    shape=(6, 12, 10), spacing=(0.7, 0.65, 2.0), origin=(-40.0, 12.5, -300.0),
    direction=((np.cos(0.3), -np.sin(0.3), 0.0), (np.sin(0.3), np.cos(0.3), 0.0), (0.0, 0.0, 1.0)),
)


def make_series(folder: Path, geo: Geometry = ROTATED) -> np.ndarray:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=geo.shape).astype(np.int16)
    write_dicom_series(hu, geo, folder, rng, index=7, seed=1, with_scout=False)
    return hu


def files_by_position(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.dcm"))
    return sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))


def test_reads_values_and_geometry(tmp_path):
    hu = make_series(tmp_path / "s")
    vol = read_study(tmp_path / "s")
    np.testing.assert_array_equal(vol.hu, hu)
    g = vol.geometry
    assert g.shape == ROTATED.shape
    np.testing.assert_allclose(g.spacing, ROTATED.spacing, atol=1e-4)
    np.testing.assert_allclose(g.origin, ROTATED.origin, atol=1e-4)
    np.testing.assert_allclose(g.direction, ROTATED.direction, atol=1e-5)


LARGE = Geometry(shape=(4, 64, 48), spacing=(0.7, 0.7, 1.5), origin=(3.0, -7.0, 20.0),
                 direction=((1, 0, 0), (0, 1, 0), (0, 0, 1)))


def test_large_images_are_read_from_their_offset_on_disk(tmp_path):
    assert 64 * 48 * 2 > DEFER_BYTES  # the pixel data stays on disk until read
    hu = make_series(tmp_path / "s", LARGE)
    np.testing.assert_array_equal(read_study(tmp_path / "s").hu, hu)


def test_implicit_vr_series(tmp_path):
    """Header values parsed from raw bytes must not depend on the files' VR encoding."""
    hu = make_series(tmp_path / "s", LARGE)
    for f in (tmp_path / "s").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.save_as(f, enforce_file_format=True)
    written = pydicom.dcmread(next((tmp_path / "s").glob("*.dcm")))
    assert written.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    vol = read_study(tmp_path / "s")
    np.testing.assert_array_equal(vol.hu, hu)
    np.testing.assert_allclose(vol.geometry.spacing, LARGE.spacing, atol=1e-4)
    np.testing.assert_allclose(vol.geometry.origin, LARGE.origin, atol=1e-4)


def test_compressed_series_with_a_decoder(tmp_path):
    """Compressed pixel data left on disk at parse time goes through pydicom's decoder."""
    hu = make_series(tmp_path / "s", LARGE)
    for f in (tmp_path / "s").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(f)
    np.testing.assert_array_equal(read_study(tmp_path / "s").hu, hu)


def test_order_comes_from_position_not_instance_number(tmp_path):
    hu = make_series(tmp_path / "s")
    # make InstanceNumber and file names both agree with the *reverse* order
    for i, f in enumerate(files_by_position(tmp_path / "s")):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = i + 1 if i % 2 else 100 - i
        ds.save_as(tmp_path / "s" / f"{99 - i:03d}.dcm")
        f.unlink()
    np.testing.assert_array_equal(read_study(tmp_path / "s").hu, hu)


def test_feet_first_series_sorted_along_normal(tmp_path):
    flipped = Geometry(shape=(5, 8, 8), spacing=(0.7, 0.7, 1.5), origin=(0.0, 0.0, 50.0),
                       direction=((1, 0, 0), (0, -1, 0), (0, 0, -1)))
    hu = make_series(tmp_path / "s", flipped)
    vol = read_study(tmp_path / "s")
    np.testing.assert_array_equal(vol.hu, hu)
    np.testing.assert_allclose(vol.geometry.affine_lps(), flipped.affine_lps(), atol=1e-4)


def test_rescale_slope_and_intercept_per_slice(tmp_path):
    make_series(tmp_path / "s")
    files = files_by_position(tmp_path / "s")
    ds = pydicom.dcmread(files[2])
    raw = ds.pixel_array.astype(np.float32)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -2048
    ds.save_as(files[2])
    np.testing.assert_array_equal(read_study(tmp_path / "s").hu[2], raw * 2 - 2048)


def test_series_rule_skips_scout_and_override(tmp_path):
    make_series(tmp_path / "s")
    other = tmp_path / "other"
    small = Geometry((3, 12, 10), (0.7, 0.65, 2.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    rng = np.random.default_rng(5)
    write_dicom_series(np.zeros(small.shape, np.int16), small, other, rng, index=8, seed=1,
                       with_scout=True)
    for f in other.glob("*.dcm"):
        f.rename(tmp_path / "s" / f"x{f.name}")
    uid = str(pydicom.dcmread(next((tmp_path / "s").glob("xscout.dcm"))).SeriesInstanceUID)
    small_uid = {str(pydicom.dcmread(f).SeriesInstanceUID) for f in (tmp_path / "s").glob("x*.dcm")}
    small_uid.discard(uid)
    small_uid = small_uid.pop()
    big_uid = str(pydicom.dcmread(next((tmp_path / "s").glob("[!x]*.dcm"))).SeriesInstanceUID)
    # two axial CT series (the scout aside): never one chosen silently; each listed, by UID
    message = expect_error(tmp_path / "s", r"2 CT series, none chosen: .*give the one to read in the "
                                           r"manifest's series_uid column")
    assert f"{big_uid} (number" in message and "6 slices" in message and small_uid in message
    assert uid not in message  # the localizer is no candidate
    vol = read_study(tmp_path / "s", series_uid=small_uid)
    assert vol.hu.shape == (3, 12, 10) and vol.series_uid == small_uid
    assert read_study(tmp_path / "s", series_uid=big_uid).hu.shape == (6, 12, 10)
    for f in (tmp_path / "s").glob("x*.dcm"):  # the other series gone, the scout kept: read, and said
        if f.name != "xscout.dcm":
            f.unlink()
    vol = read_study(tmp_path / "s")
    assert vol.hu.shape == (6, 12, 10) and vol.series_uid == big_uid
    assert any("left out 1 other series" in n and uid in n for n in vol.notes)


def expect_error(folder: Path, pattern: str) -> str:
    with pytest.raises(StudyReadError, match=pattern) as info:
        read_study(folder)
    message = str(info.value)
    assert "\n" not in message
    assert "Synthetic^Patient" not in message and "SYNPID" not in message
    return message


def test_missing_slice(tmp_path):
    make_series(tmp_path / "s")
    files_by_position(tmp_path / "s")[3].unlink()
    expect_error(tmp_path / "s", r"missing slices, gap of 4\.00 mm")


def test_duplicate_position(tmp_path):
    make_series(tmp_path / "s")
    files = files_by_position(tmp_path / "s")
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    ds.save_as(files[2])
    expect_error(tmp_path / "s", "duplicate slice position")


@pytest.mark.parametrize("field,value,pattern", [
    ("PixelSpacing", ["0.9", "0.9"], "mixed pixel spacing"),
    ("ImageOrientationPatient", ["1", "0", "0", "0", "0.8", "0.6"], "mixed orientation"),
])
def test_mixed_geometry(tmp_path, field, value, pattern):
    make_series(tmp_path / "s")
    f = files_by_position(tmp_path / "s")[1]
    ds = pydicom.dcmread(f)
    setattr(ds, field, value)
    ds.save_as(f)
    expect_error(tmp_path / "s", pattern)


def test_missing_pixel_spacing_is_named(tmp_path):
    make_series(tmp_path / "s")
    f = files_by_position(tmp_path / "s")[1]
    ds = pydicom.dcmread(f)
    del ds.PixelSpacing
    ds.save_as(f)
    message = expect_error(tmp_path / "s", "PixelSpacing missing")
    assert f.name in message


def test_malformed_position_is_named(tmp_path):
    make_series(tmp_path / "s")
    f = files_by_position(tmp_path / "s")[1]
    raw = f.read_bytes()
    ds = pydicom.dcmread(f)
    text = "\\".join(str(v) for v in ds.ImagePositionPatient).encode()
    assert raw.count(text) == 1
    f.write_bytes(raw.replace(text, b"x" * len(text)))  # same length: a damaged value
    message = expect_error(tmp_path / "s", "malformed geometry or rescale tags")
    assert f.name in message


def test_mixed_matrix_size(tmp_path):
    make_series(tmp_path / "s")
    f = files_by_position(tmp_path / "s")[1]
    ds = pydicom.dcmread(f)
    ds.Rows, ds.Columns = 6, 20
    ds.PixelData = np.zeros((6, 20), np.uint16).tobytes()
    ds.save_as(f)
    expect_error(tmp_path / "s", r"mixed matrix size .*6x20")


def test_non_ct_modality(tmp_path):
    make_series(tmp_path / "s")
    for f in (tmp_path / "s").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    expect_error(tmp_path / "s", "no CT series .*modality MR")


def test_unreadable_file_is_named(tmp_path):
    make_series(tmp_path / "s")
    (tmp_path / "s" / "junk.dcm").write_bytes(b"this is not dicom at all" * 10)
    expect_error(tmp_path / "s", r"junk\.dcm: unreadable")


def test_truncated_file_is_named(tmp_path):
    make_series(tmp_path / "s")
    f = files_by_position(tmp_path / "s")[2]
    f.write_bytes(f.read_bytes()[:-100])
    message = expect_error(tmp_path / "s", "truncated")
    assert f.name in message


def test_truncated_pixel_data_on_disk_is_named(tmp_path):
    make_series(tmp_path / "s", LARGE)
    f = files_by_position(tmp_path / "s")[1]
    f.write_bytes(f.read_bytes()[:-1000])
    message = expect_error(tmp_path / "s", r"truncated pixel data \(5144 of 6144 bytes\)")
    assert f.name in message


def test_compressed_without_decoder(tmp_path):
    if decoder_available(JPEGLSLossless):
        pytest.skip("a JPEG-LS decoder is installed here")
    make_series(tmp_path / "s")
    f = files_by_position(tmp_path / "s")[0]
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(f, enforce_file_format=True)
    expect_error(tmp_path / "s", "compressed transfer syntax 'JPEG-LS Lossless.*no decoder installed")


def _shift_positions(folder: Path, shift) -> None:
    """Move each slice's ImagePositionPatient by ``shift(index_along_z)`` (a 3-vector)."""
    for k, f in enumerate(files_by_position(folder)):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(ds.ImagePositionPatient, float) + shift(k)]
        ds.save_as(f)


def test_uneven_slices_are_resampled_at_their_true_positions(tmp_path):
    hu = make_series(tmp_path / "s")
    # positions 0, 2, 4, 6.6, 8.6, 10.6 mm along z: under the gap rule, but 0.6 mm off a uniform grid
    _shift_positions(tmp_path / "s", lambda k: np.array([0.0, 0.0, 0.6 if k >= 3 else 0.0]))
    vol = read_study(tmp_path / "s")
    assert vol.hu.shape[0] == 6 and vol.geometry.spacing[2] == pytest.approx(2.0)
    w = 2.0 / 2.6  # the uniform slice at 6 mm lies between the true slices at 4 and 6.6 mm
    np.testing.assert_allclose(vol.hu[3], hu[2] * (1 - w) + hu[3] * w, atol=1e-3)
    np.testing.assert_allclose(vol.hu[:3], hu[:3])
    w5 = (10.0 - 8.6) / 2.0
    np.testing.assert_allclose(vol.hu[5], hu[4] * (1 - w5) + hu[5] * w5, atol=1e-3)


def test_small_position_rounding_keeps_the_slices_as_they_are(tmp_path):
    hu = make_series(tmp_path / "s")
    _shift_positions(tmp_path / "s", lambda k: np.array([0.0, 0.0, 0.01 * (k % 2)]))
    vol = read_study(tmp_path / "s")
    np.testing.assert_array_equal(vol.hu, hu)


def test_gantry_tilt_is_refused_by_name(tmp_path):
    make_series(tmp_path / "s")
    shear = np.tan(np.radians(20.0)) * 2.0  # 20 degrees over 2 mm slices, along the rows
    _shift_positions(tmp_path / "s", lambda k: np.array([0.0, k * shear, 0.0]))
    with pytest.raises(StudyReadError, match=r"gantry tilt of 20\.0 degrees .* does not correct tilt"):
        read_study(tmp_path / "s")


def test_a_series_description_never_reaches_a_note_or_an_error(tmp_path):
    """SeriesDescription is free text and can hold a patient's name: the series are named
    by UID, number and size only, in the refusal and in the note alike."""
    make_series(tmp_path / "s")
    other = tmp_path / "other"
    small = Geometry((3, 12, 10), (0.7, 0.65, 2.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    write_dicom_series(np.zeros(small.shape, np.int16), small, other, np.random.default_rng(5), index=8,
                       seed=1, with_scout=True)
    for f in [*other.glob("*.dcm"), *(tmp_path / "s").glob("*.dcm")]:
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = "CTPA DOE^JANE 1970"
        ds.save_as(f)
    for f in other.glob("*.dcm"):
        f.rename(tmp_path / "s" / f"x{f.name}")
    message = expect_error(tmp_path / "s", r"2 CT series, none chosen")
    assert "DOE" not in message and "(number" in message
    for f in (tmp_path / "s").glob("x*.dcm"):
        if f.name != "xscout.dcm":
            f.unlink()
    notes = read_study(tmp_path / "s").notes
    assert notes and not any("DOE" in n for n in notes)
