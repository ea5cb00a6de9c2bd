"""`volttl predict`: new scans scored without a manifest or store, as `evaluate` scores them."""

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volttl.cli import main
from volttl.data.input_spec import InputSpec
from volttl.inference import window_location
from volttl.manifests.schema import StudyRow
from volttl.predict.step import find_studies
from volttl.preprocess.prepare import prepare_study

from .conftest import shared_path, train_tiny_run
from .test_scene import check_scene


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    return train_tiny_run(Path(cohort), tmp_path_factory.mktemp("predict"), cut="layer1")[1]


def test_find_studies_takes_files_series_and_folders_of_them(cohort, tmp_path):
    studies = Path(cohort).parent / "studies"
    found = find_studies([studies])
    names = {sid for sid, _ in found}
    assert {"synth000", "synth001", "synth002", "synth003", "synth004", "synth005"} <= names
    kinds = {sid: p.is_dir() for sid, p in found}
    assert kinds["synth000"] and not kinds["synth002"]  # a DICOM folder and a NIfTI file
    series = tmp_path / "series"
    shutil.copytree(studies / "synth000", series)
    shutil.copy(studies / "synth003.nii.gz", series / "beside.nii.gz")  # an image in a series folder
    assert {sid for sid, _ in find_studies([series])} == {"series", "beside"}
    shutil.copy(studies / "synth002.nii.gz", tmp_path / "synth002.nii.gz")
    twice = find_studies([studies / "synth002.nii.gz", tmp_path / "synth002.nii.gz"])
    assert [sid for sid, _ in twice] == ["synth002", "synth002_2"]


def test_predict_equals_evaluate_and_writes_overlays(cohort, trained, tmp_path, capsys):
    run = trained
    for split in ("train", "val", "test"):
        assert main(["evaluate", "--run", str(run), "--split", split]) == 0
    expected = {}
    for split in ("train", "val", "test"):
        with open(run / f"predictions_{split}.csv") as fh:
            expected.update({r["study_id"]: float(r["probability"]) for r in csv.DictReader(fh)})
    studies = Path(cohort).parent / "studies"
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    capsys.readouterr()
    rc = main(["predict", "--run", str(run), str(studies), str(bad), "--out", str(tmp_path / "p"), "--quiet"])
    out = capsys.readouterr()
    assert rc == 1  # one study failed ...
    failed = [line for line in out.err.splitlines() if line.startswith("volttl predict: failed")]
    assert len(failed) == 1 and "broken" in failed[0] and "unreadable NIfTI" in failed[0]
    records = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert {r["study_id"] for r in records} == set(expected)  # ... and the others completed
    for r in records:
        assert r["probability"] == pytest.approx(expected[r["study_id"]], abs=1e-5)
        assert r["model"] == "resnext3d_50" and r["cut"] == "layer1" and Path(r["source"]).exists()
        cam = nib.load(tmp_path / "p" / r["files"]["cam"])
        src = Path(r["source"])
        shape = nib.load(src).shape if src.is_file() else nib.load(tmp_path / "p" / r["files"]["ct"]).shape
        assert cam.shape == shape
        # one number per study everywhere: the overlay's record reports predict's probability
        # exactly, and a scan with no label gets none
        cam_record = json.loads((tmp_path / "p" / f"{r['study_id']}_cam.json").read_text())
        assert cam_record["probability"] == r["probability"] and cam_record["label"] is None
        assert cam_record["window_probabilities"] == r["window_probabilities"]
        # the Slicer scene opens this overlay over this study's CT (written beside it, or the source NIfTI)
        nodes = check_scene(tmp_path / "p" / r["files"]["scene"])
        files = {n.get("fileName") for n in nodes.values() if n.tag == "VolumeArchetypeStorage"}
        ct = r["files"].get("ct") or os.path.relpath(src, tmp_path / "p")
        assert files == {r["files"]["cam"], ct}
    with open(tmp_path / "p" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records) and {"best_window_first_source_slice", "probability"} <= set(rows[0])
    for row, r in zip(rows, records, strict=True):  # one value per cell
        centre = [float(row[f"best_window_centre_{axis}_mm"]) for axis in "ras"]
        assert centre == r["best_window_centre_ras_mm"] and " " not in "".join(row.values()).replace(
            str(r["source"]), "").replace(str(r["run"]), "")
        first, last = r["best_window_source_slices"] or ["", ""]
        assert (row["best_window_first_source_slice"], row["best_window_last_source_slice"]) == (str(first),
                                                                                             str(last))


def test_predict_on_the_real_ct(trained, tmp_path):
    path = shared_path("data", "real_ct", "lung1_image.nrrd")
    assert main(["predict", "--run", str(trained), str(path), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    (record,) = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert record["study_id"] == "lung1_image" and 0.0 <= record["probability"] <= 1.0
    cam = nib.load(tmp_path / "p" / record["files"]["cam"])
    img = sitk.ReadImage(str(path))
    assert cam.shape == sitk.GetArrayFromImage(img).T.shape == (512, 512, 48)
    assert np.allclose(cam.affine[:3, 3], [146.0, 325.0, -777.5], atol=1e-3)  # the NRRD's origin in RAS
    assert main(["predict", "--run", str(trained), str(path), "--out", str(tmp_path / "q"), "--no-cam",
                 "--quiet"]) == 0
    assert not list((tmp_path / "q").glob("*_cam.nii.gz"))


def test_predict_with_nothing_to_score_is_one_line(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["predict", "--run", str(trained), str(tmp_path / "empty"), "--out", str(tmp_path / "p")])
    assert rc == 1
    assert "no DICOM series, NIfTI or NRRD file found" in capsys.readouterr().err


def test_best_window_is_located_in_the_scan_given_whatever_its_slice_order(tmp_path):
    """The same CT written head-first and feet-first: the best window's centre in RAS is
    the same, and the source slices it covers are numbered as each file numbers them."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 400, size=(32, 32, 40)).astype(np.int16)  # (i, j, k), 2.5 mm slices
    forward = np.diag([1.0, 1.0, 2.5, 1.0])
    backward = forward.copy()
    backward[2, 2], backward[2, 3] = -2.5, 39 * 2.5  # k reversed: slice 0 is the top one
    where = {}
    for name, data, affine in (("up", hu, forward), ("down", hu[:, :, ::-1], backward)):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
        study = prepare_study(StudyRow(name, str(path), 0, "test", []), 1.25, 32, 8)
        spec = InputSpec(8, 24, (-100.0, 900.0), 0.15897)
        where[name] = window_location(study.meta, 16, spec, study.hu.shape[0])
        lo, hi = where[name]["best_window_source_slices"]
        z = [(affine @ [0, 0, k, 1])[2] for k in (lo, hi)]
        centre_z = where[name]["best_window_centre_ras_mm"][2]
        assert min(z) - 1.25 <= centre_z <= max(z) + 1.25  # the slices hold the window's centre
        assert hi - lo in (3, 4)  # a slab of 8 x 1.25 mm holds 4 centres of 2.5 mm slices (5 on its edges)
    up, down = (where[k]["best_window_centre_ras_mm"] for k in ("up", "down"))
    assert up == pytest.approx(down)
    lo, hi = where["up"]["best_window_source_slices"]
    assert where["down"]["best_window_source_slices"] == [39 - hi, 39 - lo]
    assert where["up"]["best_window_stored_slices"] == [16, 23] and where["up"]["best_window_padding"] == 0
    # the last window runs into air padding: its location is that of the part inside the scan
    study = prepare_study(StudyRow("up", str(tmp_path / "up.nii.gz"), 0, "test", []), 1.25, 32, 8)
    n = study.hu.shape[0]  # 80 stored slices of 1.25 mm
    tail = window_location(study.meta, n - 2, InputSpec(8, 24, (-100.0, 900.0), 0.15897), n)
    assert tail["best_window_stored_slices"] == [n - 2, n - 1] and tail["best_window_padding"] == 0.75
    top = (forward @ [0, 0, 39, 1])[2]  # the scan's last slice centre
    assert tail["best_window_centre_ras_mm"][2] <= top + 1e-6  # inside the scan, not in the padding


def test_an_overlay_that_cannot_be_written_keeps_the_prediction(cohort, trained, tmp_path, caplog):
    from volttl.predict.step import predict_step

    source = Path(cohort).parent / "studies" / "synth002.nii.gz"
    out = tmp_path / "p"
    (out / "synth002_cam.nii.gz").mkdir(parents=True)  # the overlay's path is taken by a folder
    records, failed = predict_step(trained, [source], out, progress=False)
    assert not failed and records[0]["files"] == {} and "synth002_cam.nii.gz" in records[0]["overlay_error"]
    assert "overlay not written" in caplog.text and "its prediction is kept" in caplog.text
    with open(out / "predictions.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["probability"]) == records[0]["probability"]
    assert not list(out.glob(".*.tmp"))


def test_predict_shows_progress_within_a_study_as_plain_lines(cohort, trained, tmp_path, capfd):
    source = Path(cohort).parent / "studies" / "synth003.nii.gz"
    assert main(["predict", "--run", str(trained), str(source), "--out", str(tmp_path / "p")]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err  # not a terminal: whole lines, no carriage-return frames
    window_lines = [line for line in err.splitlines() if "synth003" in line and "window" in line]
    assert window_lines and window_lines[-1].split("|")[0].strip().endswith("100%")


def test_a_model_that_gives_nan_calls_nothing_and_writes_valid_json(cohort, trained, tmp_path, capsys):
    """Weights that give NaN (a checkpoint saved with its digest, so it passes the checks):
    predict stops with one line naming the run and the NaN, calls nothing and writes no NaN
    into predictions.json (before: "p(PE) nan", called negative, exit 0); evaluate stops the
    same way."""
    import torch

    from volttl.models.checkpoints import read_checkpoint, save_checkpoint

    run = tmp_path / "nan_run"
    shutil.copytree(trained, run)
    state, _, ckpt = read_checkpoint(run / "best.pt")
    state = {k: v.clone() for k, v in state.items()}
    head = next(k for k in state if k.endswith("fc.weight"))
    state[head].fill_(float("nan"))
    holder = torch.nn.Module()
    holder.state_dict = lambda: state  # save_checkpoint reads the state through state_dict()
    kept = {k: v for k, v in ckpt.items() if k not in ("format", "version", "model_state", "state_sha256")}
    save_checkpoint(run / "best.pt", holder, **kept)
    study = Path(cohort).parent / "studies" / "synth002.nii.gz"
    capsys.readouterr()
    rc = main(["predict", "--run", str(run), str(study), "--out", str(tmp_path / "p"), "--no-cam", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{run}: the model gave 7 of 7 window probabilities that are not finite" in err
    assert len(err.strip().splitlines()) == 1
    written = tmp_path / "p" / "predictions.json"
    assert not written.exists() or "NaN" not in written.read_text()
    assert main(["evaluate", "--run", str(run), "--split", "test"]) == 1
    assert "not finite" in capsys.readouterr().err


@pytest.mark.parametrize("command,override", [("predict", "eval.aggregate=mean"), ("predict", "data.crop=16"),
                                              ("cam", "preprocess.slice_thickness=1.0")])
def test_set_cannot_change_a_trained_models_input_or_decision(cohort, trained, tmp_path, capsys, command,
                                                               override):
    """--set on predict and cam may change how and where a run computes and writes,
    never what its model sees or how it decides (eval.aggregate=mean flipped calls while the
    operating point chosen under max was still applied): one line naming the key."""
    study = Path(cohort).parent / "studies" / "synth002.nii.gz"
    args = {"predict": ["predict", "--run", str(trained), str(study), "--out", str(tmp_path / "p"),
                        "--no-cam"],
            "cam": ["cam", "--run", str(trained), "--out", str(tmp_path / "c")]}[command]
    capsys.readouterr()
    assert main([*args, "--set", override, "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    key = override.partition("=")[0]
    assert f"--set {key}: {trained} was trained and calibrated with its own {key}" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "p").exists() and not (tmp_path / "c").exists()


def test_set_may_change_how_a_run_computes_and_writes(cohort, trained, tmp_path):
    study = Path(cohort).parent / "studies" / "synth002.nii.gz"
    assert main(["predict", "--run", str(trained), str(study), "--out", str(tmp_path / "p"), "--no-cam",
                 "--quiet", "--set", "runtime.device=cpu", "--set", "cam.batch_size=2"]) == 0


def test_the_preview_picture_carries_no_study_id(cohort, trained, tmp_path, monkeypatch):
    """The preview's pixels become the Secondary Capture of --dicom, and a study id is often
    a folder named after the patient: the burned-in title is the probability alone."""
    import volttl.explain.step as cam_step

    titles = []
    drawn = cam_step.write_preview
    monkeypatch.setattr(cam_step, "write_preview", lambda *a: (titles.append(a[-1]), drawn(*a)))
    folder = tmp_path / "DOE_JANE"
    shutil.copytree(Path(cohort).parent / "studies" / "synth000", folder)
    assert main(["predict", "--run", str(trained), str(folder), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert len(titles) == 1 and titles[0].startswith("p(PE) = ") and "DOE" not in titles[0]


def test_a_file_name_that_is_not_utf8_is_scored_and_written(cohort, trained, tmp_path):
    """A NIfTI named in another locale's bytes (Latin-1 e-acute): scored with its overlay,
    its id readable (_xe9), and predictions.csv and .json agree (before: a TypeError in the
    plot, or a UnicodeEncodeError in the CSV after the JSON was written)."""
    folder = tmp_path / "in"
    folder.mkdir()
    name = os.fsdecode(b"ren\xe9.nii.gz")
    shutil.copy(Path(cohort).parent / "studies" / "synth002.nii.gz", folder / name)
    assert main(["predict", "--run", str(trained), str(folder), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    records = json.loads((tmp_path / "p" / "predictions.json").read_text(encoding="utf-8"))
    with (tmp_path / "p" / "predictions.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["study_id"] for r in records] == [r["study_id"] for r in rows] == ["ren_xe9"]
    assert rows[0]["source"].endswith("ren_xe9.nii.gz") and (tmp_path / "p" / "ren_xe9_cam.nii.gz").is_file()


def test_a_second_predict_into_the_same_folder_meanwhile_is_refused(cohort, trained, tmp_path, capsys):
    """While one predict writes into --out (its lock held), another into the same folder
    stops in one line and writes nothing there (before: they shared one temporary file, and
    one lost its table or silently replaced the other's)."""
    from volttl.outputs.folders import PredictDir
    from volttl.outputs.records import writing_alone

    out = PredictDir(tmp_path / "p")
    study = Path(cohort).parent / "studies" / "synth002.nii.gz"
    with writing_alone(out.path, out.lock.name, "volttl predict"):
        capsys.readouterr()
        assert main(["predict", "--run", str(trained), str(study), "--out", str(out.path), "--no-cam"]) == 1
        assert "another volttl predict is writing into this folder now" in capsys.readouterr().err
        assert not out.json.exists()
    assert main(["predict", "--run", str(trained), str(study), "--out", str(out.path), "--no-cam",
                 "--quiet"]) == 0 and out.json.exists()


def test_a_new_field_of_the_study_result_reaches_every_file(cohort, trained, tmp_path, monkeypatch):
    """One per-study record: a field added to StudyResult (here by a subclass with a
    default) appears in predict's CSV and JSON, in cam's JSON and in evaluate's per-split
    CSV, with no other edit; and the fields those files share have the same values."""
    import dataclasses

    import volttl.study_result as results

    extended = dataclasses.make_dataclass(
        "ExtendedResult", [("reviewer_note", str, dataclasses.field(default="seen by a reader"))],
        bases=(results.StudyResult,))
    monkeypatch.setattr(results, "StudyResult", extended)
    scan = Path(cohort).parent / "studies" / "synth003.nii.gz"  # a test-split study, label 1
    assert main(["predict", "--run", str(trained), str(scan), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    (record,) = json.loads((tmp_path / "p" / "predictions.json").read_text())
    with open(tmp_path / "p" / "predictions.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    cam_record = json.loads((tmp_path / "p" / "synth003_cam.json").read_text())
    note = "seen by a reader"
    assert record["reviewer_note"] == row["reviewer_note"] == cam_record["reviewer_note"] == note
    assert main(["evaluate", "--run", str(trained), "--split", "test", "--quiet"]) == 0
    with open(trained / "predictions_test.csv") as fh:
        evaluated = {r["study_id"]: r for r in csv.DictReader(fh)}
    assert all(r["reviewer_note"] == note for r in evaluated.values())
    assert set(row) == set(evaluated["synth003"])  # the same columns, by the same names
    # the same study scored by both: the same numbers under the same names
    for key in ("probability", "best_window_first_stored_slice", "best_window_centre_r_mm",
                "best_window_first_source_slice"):
        assert float(evaluated["synth003"][key]) == pytest.approx(float(row[key]), abs=1e-5), key
    assert (evaluated["synth003"]["label"], row["label"]) == ("1", "")  # predict's scan has no label

