"""`--dicom`: a Parametric Map, a Secondary Capture and a Structured Report derived from a
DICOM study, read back with pydicom and highdicom."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from volttl.cli import main
from volttl.io.dicom import series_headers

from .conftest import shared_path, train_tiny_run

IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate")


@pytest.fixture(scope="module")
def tiny_run(cohort, tmp_path_factory):
    run = train_tiny_run(Path(cohort), tmp_path_factory.mktemp("dicom_objects"), cut="layer1")[1]
    assert main(["evaluate", "--run", str(run), "--split", "val", "--quiet"]) == 0  # an operating point
    return run


@pytest.fixture(scope="module")
def predicted(cohort, tiny_run):
    run = tiny_run
    source = Path(cohort).parent / "studies" / "synth000"  # a DICOM series, with a scout beside it
    out = run.parent / "p"
    assert main(["predict", "--run", str(run), str(source), "--out", str(out), "--dicom", "--quiet"]) == 0
    return source, out


@pytest.mark.slow
def test_the_parametric_map_sits_on_the_source_grid_and_references_it(predicted):
    source, out = predicted
    headers = series_headers(source)
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(out / "synth000_cam_pm.dcm"))
    assert pm.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    assert pm.StudyInstanceUID == headers[0].StudyInstanceUID
    referenced = {i.ReferencedSOPInstanceUID for s in pm.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    assert referenced == {h.SOPInstanceUID for h in headers}  # every slice of the series read, no scout
    # each frame lies on a source slice (1e-3 mm) and holds the NIfTI overlay's values there
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    overlay = nib.load(out / "synth000_cam.nii.gz")
    stored = overlay.dataobj.get_unscaled().transpose(2, 1, 0)  # uint8 (slice, row, column), as frames
    frames = pm.pixel_array
    assert frames.shape == stored.shape
    for f, group in enumerate(pm.PerFrameFunctionalGroupsSequence):
        where = np.array([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
        k = int(np.argmin(np.linalg.norm(positions - where, axis=1)))
        assert np.linalg.norm(positions[k] - where) < 1e-3
        # 16-bit frames against the uint8 overlay: the same map within the overlay's step
        assert np.abs(frames[f] / 65535 - stored[k] / 255).max() <= 1 / 255 + 1e-6
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == pytest.approx(1 / 65535) and frames.max() > 0
    assert (pm.BitsAllocated, pm.BitsStored, pm.HighBit) == (16, 16, 15)
    assert [float(v) for v in pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == \
        pytest.approx([float(v) for v in headers[0].PixelSpacing])


@pytest.mark.slow
def test_the_report_holds_the_result_and_the_capture_the_preview(predicted):
    source, out = predicted
    record = json.loads((out / "predictions.json").read_text())[0]
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(out / "synth000_sr.dcm"))
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
    probability = items["Probability of pulmonary embolism"].MeasuredValueSequence[0].NumericValue
    assert float(probability) == pytest.approx(record["probability"], abs=1e-6)
    call = items["Call at the operating point"].TextValue
    assert call.startswith("positive" if record["predicted_label"] else "negative")
    point = [float(v) for v in items["Centre of the highest-scoring window"].GraphicData]
    r, a, s = record["best_window_centre_ras_mm"]
    assert point == pytest.approx([-r, -a, s], abs=0.01)  # LPS, the DICOM patient system
    assert "resnext3d_50 TTL cut after layer1" in items["Model"].TextValue
    sc = pydicom.dcmread(out / "synth000_cam_sc.dcm")
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[-1] == 3
    assert sc.StudyInstanceUID == series_headers(source)[0].StudyInstanceUID
    assert sc.BurnedInAnnotation == "NO"  # its text: letters, view names, p(PE); no study id


@pytest.mark.slow
def test_only_the_required_identifiers_travel_and_only_into_the_dicom_objects(predicted):
    source, out = predicted
    first = next(p for p in sorted(source.iterdir()) if p.is_file())
    header = pydicom.dcmread(first, stop_before_pixels=True)
    for name in ("synth000_cam_pm.dcm", "synth000_cam_sc.dcm", "synth000_sr.dcm"):
        ds = pydicom.dcmread(out / name)
        for key in IDENTIFIERS:  # filed with the study: the identifiers the standard requires
            assert str(ds.data_element(key).value) == str(header.data_element(key).value)
        text = str(ds)
        assert "Synthetic General Hospital" not in text and "SYNOTHER" not in text  # nothing else
        assert "InstitutionName" not in ds and "OtherPatientIDs" not in ds
    for path in out.iterdir():  # every other output stays free of them
        if path.suffix != ".dcm" and path.suffix not in (".gz", ".png"):
            text = path.read_text()
            assert "Synthetic^Patient" not in text and "SYNPID" not in text, path.name


def test_a_source_that_is_not_dicom_gets_no_dicom_objects(tmp_path, caplog):
    from types import SimpleNamespace

    from volttl.explain.step import _dicom_objects

    meta = SimpleNamespace(source_kind="nifti", study_id="s1")
    assert _dicom_objects(meta, np.zeros((2, 2, 2)), None, None, None, {}, 2) == {}
    assert "s1: no DICOM objects: the source is NIfTI, not DICOM" in caplog.text


def _as_dicom_series(path: Path, out: Path) -> Path:
    """The real CT written as a CT series by SimpleITK, as many exporters write one:
    no SliceThickness (a Type 2 attribute left out)."""
    import SimpleITK as sitk

    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkInt16)
    out.mkdir()
    d = image.GetDirection()
    uid = "1.2.826.0.1.3680043.8.498.1"
    tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0020|000d": f"{uid}.1",
            "0020|000e": f"{uid}.2", "0020|0052": f"{uid}.3", "0010|0010": "Real^Lung1", "0010|0020": "LUNG1",
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|1052": "0", "0028|1053": "1"}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0008|0018", f"{uid}.4.{k + 1}")
        writer.SetFileName(str(out / f"{k:03d}.dcm"))
        writer.Execute(plane)
    return out


@pytest.mark.slow
def test_a_real_ct_series_gets_its_objects_on_its_own_grid(tiny_run, tmp_path):
    series = _as_dicom_series(shared_path("data", "real_ct", "lung1_image.nrrd"), tmp_path / "lung1")
    out = tmp_path / "p"
    command = ["predict", "--run", str(tiny_run), str(series), "--out", str(out), "--dicom", "--quiet"]
    assert main(command) == 0
    headers = series_headers(series)
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(out / "lung1_cam_pm.dcm"))
    assert pm.pixel_array.shape == (48, 512, 512) and len(headers) == 48
    positions = {tuple(round(float(v), 3) for v in h.ImagePositionPatient) for h in headers}
    frames = {tuple(round(float(v), 3) for v in g.PlanePositionSequence[0].ImagePositionPatient)
              for g in pm.PerFrameFunctionalGroupsSequence}
    assert frames == positions
    referenced = {i.ReferencedSOPInstanceUID for s in pm.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    assert referenced == {h.SOPInstanceUID for h in headers}
    assert hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(out / "lung1_sr.dcm")).PatientID == "LUNG1"
    assert (out / "lung1_cam_sc.dcm").is_file()
    # cam.dicom_compression: rle: the same frames, RLE Lossless, in a smaller file
    rle = tmp_path / "rle"
    assert main([*command[:-3], str(rle), "--dicom", "--quiet", "--set", "cam.dicom_compression=rle"]) == 0
    packed = pydicom.dcmread(rle / "lung1_cam_pm.dcm")
    assert packed.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    np.testing.assert_array_equal(packed.pixel_array, pm.pixel_array)
    assert (rle / "lung1_cam_pm.dcm").stat().st_size < (out / "lung1_cam_pm.dcm").stat().st_size / 2


def _dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for one object (dicom3tools, the standard's own validator)."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools; .ci/run installs it)")
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_the_field_s_validators_accept_every_object(cohort, tiny_run, tmp_path, source):
    """dciodvfy finds no error in the Parametric Map (16-bit, with its real-world value
    mapping), the Secondary Capture or the SR, derived from a synthetic DICOM series and from
    the real CT written as a series; dsrdump reads the SR and dcm2pnm renders the capture."""
    import shutil
    import subprocess

    if source == "real":
        series = _as_dicom_series(shared_path("data", "real_ct", "lung1_image.nrrd"), tmp_path / "lung1")
        sid = "lung1"
    else:
        series, sid = Path(cohort).parent / "studies" / "synth000", "synth000"
    out = tmp_path / "p"
    command = ["predict", "--run", str(tiny_run), str(series), "--out", str(out), "--dicom", "--quiet"]
    assert main(command) == 0
    for name in (f"{sid}_cam_pm.dcm", f"{sid}_cam_sc.dcm", f"{sid}_sr.dcm"):
        assert _dciodvfy_errors(out / name) == [], name
    if shutil.which("dsrdump") and shutil.which("dcm2pnm"):  # dcmtk
        text = subprocess.run(["dsrdump", str(out / f"{sid}_sr.dcm")], capture_output=True, text=True).stdout
        assert "Probability of pulmonary embolism" in text
        rendered = subprocess.run(["dcm2pnm", "--write-png", str(out / f"{sid}_cam_sc.dcm"),
                                   str(tmp_path / "sc.png")], capture_output=True)
        assert rendered.returncode == 0 and (tmp_path / "sc.png").stat().st_size > 1000
