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

from .conftest import train_tiny_run

IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate")


@pytest.fixture(scope="module")
def predicted(cohort, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom_objects")
    run = train_tiny_run(Path(cohort), folder, cut="layer1")[1]
    assert main(["evaluate", "--run", str(run), "--split", "val", "--quiet"]) == 0  # an operating point
    source = Path(cohort).parent / "studies" / "synth000"  # a DICOM series, with a scout beside it
    out = folder / "p"
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
        assert np.abs(frames[f].astype(int) - stored[k].astype(int)).max() <= 1  # within the quantisation
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == pytest.approx(1 / 255) and frames.max() > 0
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

    from volttl.explain.run import _dicom_objects

    meta = SimpleNamespace(source_kind="nifti", study_id="s1")
    assert _dicom_objects(meta, np.zeros((2, 2, 2)), None, None, None, {}, 8, 2) == {}
    assert "s1: no DICOM objects: the source is nifti, not DICOM" in caplog.text
