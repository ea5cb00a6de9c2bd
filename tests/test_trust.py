"""Nothing volttl wrote is read back on trust: a checkpoint whose bytes changed, a run
config edited by hand."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from volttl.inference import load_run
from volttl.models.checkpoints import CheckpointError, read_checkpoint, save_checkpoint, state_digest
from volttl.models.resnext3d import ResNeXt3D50
from volttl.outputs.folders import RunError

from .conftest import train_tiny_run


def _flip_a_byte_inside(path: Path, entry_suffix: str) -> None:
    """Flip one byte in the middle of the largest stored tensor of a torch zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if entry_suffix in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_checkpoint_whose_bytes_changed_is_refused_by_name(tmp_path):
    model = ResNeXt3D50(num_outputs=1, in_channels=1)
    save_checkpoint(tmp_path / "best.pt", model, epoch=0)
    state, kind, obj = read_checkpoint(tmp_path / "best.pt")
    assert kind == "volttl" and obj["state_sha256"] == state_digest(model.state_dict())
    _flip_a_byte_inside(tmp_path / "best.pt", "/data/")
    torch.load(tmp_path / "best.pt", weights_only=True)  # torch itself loads the damaged file
    with pytest.raises(CheckpointError, match=r"best\.pt: damaged: its weights do not match the checksum"):
        read_checkpoint(tmp_path / "best.pt")


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    model = ResNeXt3D50(num_outputs=1, in_channels=1)
    torch.save({"format": "volttl-checkpoint", "version": 1, "model_state": model.state_dict()},
               tmp_path / "old.pt")
    state, kind, _ = read_checkpoint(tmp_path / "old.pt")
    assert kind == "volttl" and torch.equal(state["fc.weight"], model.fc.weight)


@pytest.fixture(scope="module")
def tiny_run(cohort, tmp_path_factory):
    return train_tiny_run(Path(cohort), tmp_path_factory.mktemp("trust"))[1]


def _edit(run: Path, section: str, key: str, value) -> str:
    text = (run / "config.yaml").read_text()
    raw = yaml.safe_load(text)
    raw[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return text


def test_a_run_config_edited_by_hand_is_refused_with_the_keys_named(tiny_run):
    original = _edit(tiny_run, "preprocess", "slice_thickness", 1.0)
    try:
        with pytest.raises(RunError, match=r"config\.yaml: edited after training "
                                           r"\(preprocess\.slice_thickness 2\.0 -> 1\.0\)"):
            load_run(tiny_run)
        _edit(tiny_run, "train", "lr_new", 0.5)
        with pytest.raises(RunError, match=r"train\.lr_new 0\.1 -> 0\.5"):
            load_run(tiny_run)
    finally:
        (tiny_run / "config.yaml").write_text(original)
    load_run(tiny_run)


def test_runtime_keys_edited_by_hand_are_accepted_and_logged(tiny_run, caplog):
    original = _edit(tiny_run, "train", "workers", 3)
    try:
        with caplog.at_level("INFO", logger="volttl.outputs.resume"):
            cfg, _ = load_run(tiny_run)
        assert cfg.runtime.workers == 3 and "runtime.workers 3 (the run trained with 0)" in caplog.text
    finally:
        (tiny_run / "config.yaml").write_text(original)


def test_a_repeat_group_given_as_one_run_names_its_seeds(tiny_run, tmp_path, capsys):
    """pe.yaml trains 3 seeds into one folder; cam, predict and export take one model and
    say which folders hold one, instead of "no config.yaml"."""
    import json
    import shutil

    from volttl.inference import load_run
    from volttl.outputs.folders import RunError

    group = tmp_path / "group"
    for seed in ("seed0", "seed1"):
        shutil.copytree(tiny_run, group / seed)
    with pytest.raises(RunError, match=r"a repeat group of 2 runs \(seed0, seed1\), not one run: give one "
                                       r"seed's folder, e.g. .*seed0"):
        load_run(group)
    load_run(group / "seed1")
    # the one-model steps pick a seed's run by --seed (pipelines: train.seed), or refuse by name
    from volttl.explain.step import cam_step
    from volttl.outputs.folders import RunDir

    assert RunDir(group).one_run(1).path == group / "seed1" and RunDir(group / "seed0").one_run(5).path == \
        group / "seed0"
    with pytest.raises(RunError, match=r"a repeat group without a seed 2 run \(it has seed0, seed1\)"):
        RunDir(group).one_run(2)
    with pytest.raises(RunError, match=r"a repeat group of 2 runs \(seed0, seed1\)"):
        cam_step(group, tmp_path / "cam", progress=False)
    assert not (tmp_path / "cam").exists()  # refused before anything was written
    from volttl.cli import main

    for command in (["cam"], ["svcca"], ["export"], ["predict", str(tmp_path)]):
        assert main([*command, "--run", str(group), "--out", str(tmp_path / "x")]) == 1
        assert f"a repeat group of 2 runs (seed0, seed1), not one run: give one seed's folder, e.g. " \
               f"{group / 'seed0'}, or --seed 0" in capsys.readouterr().err, command
        assert main([*command, "--run", str(group), "--seed", "7", "--out", str(tmp_path / "x")]) == 1
        assert "a repeat group without a seed 7 run (it has seed0, seed1)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    package = ["predict", "--model", str(group), "--seed", "0", str(tmp_path), "--out", str(tmp_path / "x")]
    assert main(package) == 1
    assert "--seed picks one run of a repeat group; a model package holds one" in capsys.readouterr().err
    # and with --seed the group's run is used: export names the folder it came from
    assert main(["export", "--run", str(group), "--seed", "1", "--out", str(tmp_path / "pkg")]) == 0
    assert json.loads((tmp_path / "pkg" / "package.json").read_text())["exported_from"] == "seed1"
    shutil.copytree(tiny_run, group / "seed10")
    assert RunDir(group).seed_runs() == ["seed0", "seed1", "seed10"]


def test_a_run_config_that_is_a_yaml_list_is_one_line(tiny_run):
    original = (tiny_run / "config.yaml").read_text()
    (tiny_run / "config.yaml").write_text("- a\n- b\n")
    try:
        with pytest.raises(RunError, match=r"config\.yaml: unreadable run config \(the top level must be a "
                                           r"mapping of sections, not a list\)"):
            load_run(tiny_run)
    finally:
        (tiny_run / "config.yaml").write_text(original)


def _series(tmp_path: Path):
    from .test_dicom import make_series

    hu = make_series(tmp_path / "s")
    return hu, sorted((tmp_path / "s").glob("*.dcm"))


def test_dicom_without_rescale_tags_is_read_as_itk_reads_it_and_said(tmp_path):
    import pydicom

    from volttl.manifests.schema import StudyRow
    from volttl.preprocess.prepare import prepare_study

    hu, files = _series(tmp_path)
    stored = {}
    for f in files:
        ds = pydicom.dcmread(f)
        stored[float(ds.ImagePositionPatient[2])] = ds.pixel_array.astype(float) * float(ds.RescaleSlope)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(f)
    study = prepare_study(StudyRow("s", str(tmp_path / "s"), 0, "test", []), 2.0, 16, 2)
    assert any("no RescaleSlope/RescaleIntercept" in w and "dcm2niix and ITK" in w for w in study.warnings)
    from volttl.io import read_study

    vol = read_study(tmp_path / "s")
    assert vol.notes and float(vol.hu.min()) >= min(v.min() for v in stored.values())  # stored values, as HU


@pytest.mark.parametrize("edit,says", [
    (lambda ds: setattr(ds, "RescaleSlope", "0"), r"RescaleSlope 0 is not a positive number"),
    (lambda ds: setattr(ds, "RescaleSlope", "-1"), r"RescaleSlope -1 is not a positive number"),
    (lambda ds: setattr(ds, "RescaleSlope", "nan"), r"RescaleSlope nan is not a positive number"),
    (lambda ds: delattr(ds, "RescaleIntercept"), r"RescaleSlope without its pair"),
])
def test_an_invalid_rescale_is_refused_by_file(tmp_path, edit, says):
    import pydicom

    from volttl.io import read_study
    from volttl.io.studies import StudyReadError

    _, files = _series(tmp_path)
    ds = pydicom.dcmread(files[1])
    edit(ds)
    ds.save_as(files[1])
    with pytest.raises(StudyReadError, match=rf"{files[1].name}: {says}"):
        read_study(tmp_path / "s")


def test_a_localizer_inside_an_axial_series_is_left_out_with_a_note(tmp_path):
    import pydicom

    from volttl.io import read_study

    hu, files = _series(tmp_path)
    ds = pydicom.dcmread(files[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a lateral scout, same series
    ds.save_as(tmp_path / "s" / "scout_in_series.dcm")
    vol = read_study(tmp_path / "s")
    assert vol.hu.shape == hu.shape and any("1 localizer image(s) inside series" in n for n in vol.notes)


def _nifti(path: Path, data, affine, codes: int = 1):
    import nibabel as nib

    img = nib.Nifti1Image(data, affine if codes else None)  # no affine: nibabel keeps both codes 0
    if codes:
        img.header.set_qform(affine, code=codes)
        img.header.set_sform(affine, code=codes)
    else:
        img.header.set_zooms([float(affine[i, i]) for i in range(3)])
    nib.save(img, path)
    assert int(nib.load(path).header["sform_code"]) == codes


def test_nifti_without_orientation_is_placed_as_itk_places_it(tmp_path):
    """qform_code = sform_code = 0: volttl's grid is ITK's (3D Slicer's), not nibabel's guess,
    which differs front-to-back; the overlay lands on the viewer's grid, and it is said."""
    import numpy as np
    import SimpleITK as sitk

    from volttl.io import read_study

    data = np.random.default_rng(0).integers(-1000, 500, size=(12, 10, 6)).astype(np.int16)
    _nifti(tmp_path / "bare.nii.gz", data, np.diag([0.8, 0.7, 2.0, 1.0]), codes=0)
    vol = read_study(tmp_path / "bare.nii.gz")
    itk = sitk.ReadImage(str(tmp_path / "bare.nii.gz"))
    np.testing.assert_allclose(np.asarray(vol.geometry.direction).ravel(), itk.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(vol.geometry.origin, itk.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(vol.geometry.spacing, itk.GetSpacing(), atol=1e-6)
    np.testing.assert_array_equal(vol.hu, sitk.GetArrayFromImage(itk))
    assert any("no qform or sform" in n for n in vol.notes)


def test_a_sheared_nifti_is_refused(tmp_path):
    import numpy as np

    from volttl.io import read_study
    from volttl.io.studies import StudyReadError

    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[0, 2] = 0.5  # slices sheared along x
    _nifti(tmp_path / "shear.nii.gz", np.zeros((8, 8, 4), np.int16) - 1000, affine)
    with pytest.raises(StudyReadError, match=r"shear\.nii\.gz: sheared affine \(voxel axes 14\.04 degrees"):
        read_study(tmp_path / "shear.nii.gz")


@pytest.mark.parametrize("dtype,values,says", [("uint8", (0, 255), "8-bit values cannot hold HU"),
                                                ("int16", (0, 2000), "no value below 0")])
def test_nifti_values_that_cannot_be_hu_are_warned_of(tmp_path, dtype, values, says):
    import numpy as np

    from volttl.io import read_study

    data = np.linspace(*values, 8 * 8 * 4).reshape(8, 8, 4).astype(dtype)
    _nifti(tmp_path / "v.nii.gz", data, np.diag([0.8, 0.8, 2.0, 1.0]))
    assert any(says in n for n in read_study(tmp_path / "v.nii.gz").notes)


ALIAS_BOMB = """data:
  hu_clip: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]
train:
  lr_new: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  seed: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  epochs: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  repeats: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  workers: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  batch_size: [*f, *f, *f, *f, *f, *f, *f, *f, *f]
"""


@pytest.mark.parametrize("text,says", [
    (ALIAS_BOMB, "YAML aliases (*a) are not allowed"),
    ("train:\n  lr_new: " + "[" * 20000 + "]" * 20000 + "\n", "nested too deeply"),
])
def test_hostile_config_yaml_is_one_bounded_line(tmp_path, text, says):
    from volttl.config import ConfigError, load_config

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    message = str(info.value)
    assert says in message and "\n" not in message and len(message) < 400


def test_a_huge_value_is_shown_bounded_in_the_message(tmp_path):
    from volttl.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as info:
        config_from_dict({"train": {"epochs": [[list(range(1000))] * 1000] * 1000}})
    assert "train.epochs: expected an integer" in str(info.value) and len(str(info.value)) < 300


def test_a_hash_in_a_real_path_is_a_path(tmp_path, cohort):
    """`CT Chest #2` is a folder name; PENet's file#dataset applies only after an HDF5 file."""
    import shutil

    from volttl.io.addresses import split_hdf5_address
    from volttl.manifests.schema import read_manifest, write_manifest
    from volttl.preprocess.step import preprocess_step

    from .conftest import small_config

    assert split_hdf5_address("/d/data.hdf5#1257") == ("/d/data.hdf5", "1257")
    assert split_hdf5_address("/d/CT Chest #2/a.nii.gz") == ("/d/CT Chest #2/a.nii.gz", None)
    assert split_hdf5_address("/d/CT #2/data.h5#7") == ("/d/CT #2/data.h5", "7")
    rows = read_manifest(cohort)[:2]
    for r in rows:
        target = tmp_path / f"CT Chest #{r.study_id}" / Path(r.path).name
        target.parent.mkdir()
        (shutil.copytree if Path(r.path).is_dir() else shutil.copy)(r.path, target)
        r.path, r.split = str(target), "train"
    write_manifest(rows, tmp_path / "m.csv")
    assert [Path(r.path) for r in read_manifest(tmp_path / "m.csv")] == [Path(r.path) for r in rows]
    summary = preprocess_step(small_config(tmp_path / "m.csv", tmp_path / "s.h5"), progress=False)
    assert not summary.failed and len(summary.done) == 2


def test_enhanced_ct_is_named_as_unsupported(tmp_path):
    import pydicom

    from volttl.io import read_study
    from volttl.io.studies import StudyReadError

    _, files = _series(tmp_path)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(f)
    with pytest.raises(StudyReadError, match="Enhanced CT .* is not supported"):
        read_study(tmp_path / "s")


def test_a_nifti_header_claiming_huge_dimensions_names_the_size(tmp_path, monkeypatch):
    import nibabel as nib
    import numpy as np

    from volttl.io import read_study
    from volttl.io.studies import StudyReadError

    _nifti(tmp_path / "big.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))
    real = np.asarray

    def no_memory(obj, *a, **k):
        if isinstance(obj, nib.arrayproxy.ArrayProxy):
            raise MemoryError
        return real(obj, *a, **k)

    monkeypatch.setattr(np, "asarray", no_memory)
    with pytest.raises(StudyReadError, match=r"big\.nii\.gz: its header claims 4 x 4 x 4 voxels"):
        read_study(tmp_path / "big.nii.gz")


def test_a_symlink_loop_in_predict_input_is_scored_once(tmp_path):
    import numpy as np

    from volttl.predict.step import find_studies

    (tmp_path / "in" / "a").mkdir(parents=True)
    _nifti(tmp_path / "in" / "a" / "ct.nii.gz", np.zeros((4, 4, 4), np.int16) - 1000, np.eye(4))
    (tmp_path / "in" / "a" / "loop").symlink_to(tmp_path / "in")
    (tmp_path / "in" / "same.nii.gz").symlink_to(tmp_path / "in" / "a" / "ct.nii.gz")
    assert [p.name for _, p in find_studies([tmp_path / "in"])] == ["ct.nii.gz"]


def test_an_unwritable_output_folder_is_one_line(tmp_path, cohort, capsys):
    import os

    from volttl.cli import main

    if os.geteuid() == 0:  # root writes anywhere: make the output a file where a folder goes
        (tmp_path / "out").write_text("a file")
        out = tmp_path / "out" / "sub"
    else:
        (tmp_path / "out").mkdir(mode=0o500)
        out = tmp_path / "out" / "sub"
    rc = main(["synth", "--out", str(out), "--studies", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("volttl synth: error: cannot write") and "\n" not in err


def test_a_rerun_with_studies_dropped_from_the_manifest_says_which_left(tmp_path, cohort):
    from volttl.manifests.schema import read_manifest, write_manifest
    from volttl.preprocess.step import preprocess_step

    from .conftest import small_config

    rows = read_manifest(cohort)[:3]
    write_manifest(rows, tmp_path / "m.csv")
    cfg = small_config(tmp_path / "m.csv", tmp_path / "s.h5")
    assert not preprocess_step(cfg, progress=False).left_index
    write_manifest(rows[:1], tmp_path / "m.csv")
    summary = preprocess_step(cfg, progress=False)
    assert summary.left_index == [r.study_id for r in rows[1:]]


def test_a_flat_model_on_four_studies_is_warned_of():
    """0.474214-0.474255 over 4 studies gave 'AUROC 1.000 (CI 1.000-1.000)' with no word."""
    import numpy as np

    from volttl.train.metrics import summarise

    probs = np.array([0.474214, 0.474230, 0.474241, 0.474255])
    out = summarise([0, 0, 1, 1], probs, np.arange(4), np.array([0, 0, 1, 1]), bootstrap=200)
    assert out["study_auroc"] == 1.0
    text = " ".join(out["warnings"])
    assert "only 4 studies" in text and "nearly constant" in text and "collapsed to 1.000" in text
    healthy = summarise([0, 1] * 20, np.linspace(0.1, 0.9, 40), np.arange(40), np.array([0, 1] * 20),
                        bootstrap=200)
    assert healthy["warnings"] == []


def _limited(args: list[str], max_bytes: int, cwd: Path):
    """``python -m volttl ARGS`` with files capped at ``max_bytes`` (as a full disk would
    cut a write short): what a user meets when the space runs out."""
    import resource
    import subprocess
    import sys

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run([sys.executable, "-m", "volttl", *args], cwd=cwd, preexec_fn=cap,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs POSIX resource limits")
def test_a_write_cut_short_names_the_file_and_leaves_no_temp_files(cohort, tmp_path):
    from volttl.config import config_to_yaml

    from .conftest import small_config

    cfg = small_config(Path(cohort), tmp_path / "s.h5")
    cfg.data.crop = 32
    cfg.model.name, cfg.transfer.cut = "resnext3d_50", "layer1"
    cfg.train.epochs, cfg.train.batch_size, cfg.runtime.workers, cfg.eval.bootstrap = 1, 4, 0, 0
    path = tmp_path / "c.yaml"
    path.write_text(config_to_yaml(cfg))
    done = _limited(["preprocess", "--config", str(path), "--quiet"], 30_000, tmp_path)
    assert done.returncode == 1 and "Segmentation" not in done.stderr and "Traceback" not in done.stderr
    failed = [line for line in done.stderr.splitlines() if line.startswith("volttl preprocess: failed")]
    assert len(failed) == 6 and all("not written (File too large)" in line for line in failed)
    assert not [f for f in tmp_path.rglob("*") if ".tmp" in f.name]
    # with room, the same command stores everything; then a cut-short checkpoint in training
    assert _limited(["preprocess", "--config", str(path), "--quiet"], 2**40, tmp_path).returncode == 0
    done = _limited(["train", "--config", str(path), "--run-dir", str(tmp_path / "run"), "--quiet"],
                    200_000, tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "best.pt: not written (the write failed: a full disk or a file-size limit?" in done.stderr
    assert not [f for f in tmp_path.rglob("*") if ".tmp" in f.name]
    assert len(list((tmp_path / "s.h5.d").glob("*.h5"))) == 6  # what was already written stays


def test_trial_and_pipeline_records_edited_after_writing_are_refused(tmp_path):
    import json

    from volttl.outputs.provenance import made_from, record_inputs
    from volttl.outputs.records import RecordError, write_record
    from volttl.search.trials import read_trial

    trial = tmp_path / "ttl_layer1" / "trial.json"
    trial.parent.mkdir()
    write_record(trial, {"fingerprint": "f", "test_study_auroc": {"mean": 0.7}})
    assert read_trial(trial)["test_study_auroc"]["mean"] == 0.7
    trial.write_text(trial.read_text().replace("0.7", "0.9"))  # a better-looking row, by hand
    with pytest.raises(RecordError, match=r"trial\.json: damaged: .*rerun the search"):
        read_trial(trial)
    output = tmp_path / "svcca.json"
    output.write_text("{}")
    record_inputs(output, {"run": "a", "cuts": ["layer1"]})
    assert made_from(output, {"run": "a", "cuts": ["layer1"]}) is True
    assert made_from(output, {"run": "b", "cuts": ["layer1"]}) is False
    record = tmp_path / ".svcca.json.inputs.json"
    edited = json.loads(record.read_text())
    edited["inputs"]["run"] = "b"
    record.write_text(json.dumps(edited))
    with pytest.raises(RecordError, match=r"inputs\.json: damaged"):
        made_from(output, {"run": "b", "cuts": ["layer1"]})
    record.write_text(json.dumps({"run": "a", "cuts": ["layer1"]}))  # written before checksums
    assert made_from(output, {"run": "a", "cuts": ["layer1"]}) is True


@pytest.mark.slow
def test_ctrl_c_during_preprocess_is_one_line_and_a_rerun_completes(tmp_path):
    """Ctrl-C reaches the whole process group, workers included: one line, exit 130, no
    worker traceback, no temporary file; finished studies stay and the rerun skips them."""
    import os
    import signal
    import subprocess
    import sys

    from volttl.config import config_to_yaml
    from volttl.synth.cohort import synth_cohort

    from .conftest import small_config

    manifest = synth_cohort(tmp_path / "syn", studies=12, seed=1, matrix=128, progress=False)
    cfg = small_config(manifest, tmp_path / "s.h5", slice_thickness=1.0, size=96, workers=2)
    path = tmp_path / "c.yaml"
    path.write_text(config_to_yaml(cfg))
    # Ctrl-C reaches the process group once the first study is stored, a worker still running
    env = {**os.environ, "VOLTTL_FAULT_INTERRUPT": "after-index:1"}
    # as from a terminal: SIGINT at its default (an earlier test in this process may have left
    # it ignored, and an ignored signal stays ignored across exec)
    proc = subprocess.Popen([sys.executable, "-m", "volttl", "preprocess", "--config", str(path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    studies = tmp_path / "s.h5.d"
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if "left out" not in line]  # the synthetic scout's note
    assert lines == ["volttl preprocess: interrupted"] and "Traceback" not in err
    assert not [f for f in tmp_path.rglob("*") if ".tmp" in f.name]
    kept = len(list(studies.glob("*.h5")))
    assert 1 <= kept < 12
    done = subprocess.run([sys.executable, "-m", "volttl", "preprocess", "--config", str(path), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"{kept} already stored" in done.stdout


def test_a_run_takes_the_stores_preprocess_settings_and_says_so(cohort, tmp_path, caplog):
    """A config whose preprocess keys differ from the store's (another store given with
    --set, an edited key) would record windows the run never saw: the store's win."""
    from volttl.outputs.resume import with_store_preprocessing
    from volttl.preprocess.step import preprocess_step

    from .conftest import small_config

    cfg = small_config(Path(cohort), tmp_path / "s.h5", size=40)
    assert not preprocess_step(cfg, progress=False).failed
    edited = small_config(Path(cohort), tmp_path / "s.h5", size=40, window=16, slice_thickness=1.0)
    used = with_store_preprocessing(edited)
    assert used.preprocess.window == 8 and used.preprocess.slice_thickness == 2.0
    assert "made with preprocess.window 8, not 16: the run records and uses the store's" in caplog.text
    assert "preprocess.slice_thickness 2.0, not 1.0" in caplog.text
