"""The bad-input catalogue: every case builds its input, runs the CLI, and checks the exit
code, the study or key named, the message, and that good studies are still stored."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml

from volttl.cli import main
from volttl.config import config_to_yaml
from volttl.data.input_spec import InputSpec

from .conftest import small_config, train_tiny_run

GOOD = 2  # good studies copied from the synthetic cohort into every manifest here


def _nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 2.0)) -> str:
    if all(zooms):
        img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    else:  # a degenerate grid: an sform with a zero column (a qform cannot hold it)
        img = nib.Nifti1Image(data, None)
        img.set_sform(np.diag([*zooms, 1.0]), code=1)
    nib.save(img, str(path))
    return str(path)


def _series_by_position(folder: Path) -> list[Path]:
    """The axial slices of a synthetic series (its scout left out), by position along z."""
    headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in folder.iterdir()}
    axial = [f for f, ds in headers.items() if "AXIAL" in list(ds.ImageType)]
    return sorted(axial, key=lambda f: float(headers[f].ImagePositionPatient[2]))


def _good_rows(cohort: Path) -> list[list[str]]:
    with open(cohort) as fh:
        rows = list(csv.DictReader(fh))
    return [[r["study_id"], str(cohort.parent / r["path"]), r["label"], r["split"], r["pe_slices"]]
            for r in rows[:GOOD]]


def _manifest(tmp_path: Path, rows: list[list[str]], name: str = "m.csv", bom: bool = False) -> Path:
    path = tmp_path / name
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["study_id", "path", "label", "split", "pe_slices"])
        w.writerows(rows)
    return path


def _config(tmp_path: Path, manifest: Path, **preprocess) -> Path:
    cfg = small_config(manifest, tmp_path / "s.h5", **preprocess)
    path = tmp_path / "c.yaml"
    path.write_text(config_to_yaml(cfg))
    return path


def _stored(tmp_path: Path) -> set[str]:
    with h5py.File(tmp_path / "s.h5", "r") as f:
        return set(f["studies"])


@pytest.fixture(scope="module")
def bad_volumes(cohort, tmp_path_factory):
    """One preprocess run over good studies and every kind of bad volume."""
    tmp = tmp_path_factory.mktemp("badvol")
    ramp = np.linspace(-1000, 400, 48 * 48 * 40, dtype=np.float32).reshape(48, 48, 40)
    nan = ramp.copy()
    nan[3, 4, 5] = np.nan
    inf = ramp.copy()
    inf[0, 0, :3] = np.inf
    big = ramp.copy()
    big[:2, :2, :2] = 40000.0
    dicom = tmp / "truncated_dicom"
    shutil.copytree(Path(cohort).parent / "studies" / "synth001", dicom)
    first = sorted(dicom.iterdir())[0]
    first.write_bytes(first.read_bytes()[:300])
    series = _series_by_position(Path(cohort).parent / "studies" / "synth001")
    gap, dup, mixed, mr = (tmp / name for name in ("gap_dicom", "dup_dicom", "mixed_dicom", "mr_dicom"))
    for folder in (gap, dup, mixed, mr):
        shutil.copytree(Path(cohort).parent / "studies" / "synth001", folder)
    (gap / series[10].name).unlink()  # a slice missing in the middle
    ds = pydicom.dcmread(dup / series[5].name)
    ds.ImagePositionPatient = pydicom.dcmread(dup / series[4].name).ImagePositionPatient
    ds.save_as(dup / series[5].name)
    ds = pydicom.dcmread(mixed / series[3].name)
    ds.Rows, ds.Columns = 6, 20
    ds.PixelData = np.zeros((6, 20), np.uint16).tobytes()
    ds.save_as(mixed / series[3].name)
    for f in mr.iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    rows = _good_rows(Path(cohort)) + [
        ["nan", _nifti(tmp / "nan.nii.gz", nan), "0", "train", ""],
        ["allnan", _nifti(tmp / "allnan.nii.gz", np.full_like(ramp, np.nan)), "0", "train", ""],
        ["inf", _nifti(tmp / "inf.nii.gz", inf), "0", "train", ""],
        ["big", _nifti(tmp / "big.nii.gz", big), "0", "train", ""],
        ["oneslice", _nifti(tmp / "one.nii.gz", ramp[..., :1]), "0", "train", ""],
        ["zerospacing", _nifti(tmp / "zero.nii.gz", ramp, zooms=(1.0, 1.0, 0.0)), "0", "train", ""],
        ["flat2d", _nifti(tmp / "flat.nii.gz", ramp[..., 0]), "0", "train", ""],
        ["pe_outside", _nifti(tmp / "pe.nii.gz", ramp), "1", "train", "200-300"],
        ["truncdcm", str(dicom), "0", "val", ""],
        ["gap", str(gap), "0", "val", ""],
        ["dup", str(dup), "0", "val", ""],
        ["mixed", str(mixed), "0", "val", ""],
        ["mr", str(mr), "0", "val", ""],
        ["fourd", _nifti(tmp / "fourd.nii.gz", np.stack([ramp, ramp], axis=-1)), "0", "train", ""],
        ["missing", str(tmp / "nowhere"), "0", "test", ""],
    ]
    cfg = _config(tmp, _manifest(tmp, rows), workers=2)
    proc = subprocess.run([sys.executable, "-m", "volttl", "preprocess", "--config", str(cfg), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    return tmp, proc, rows


@pytest.mark.parametrize("sid,message", [
    ("nan", "1 of 92160 voxels are NaN or infinite"),
    ("allnan", "92160 of 92160 voxels are NaN or infinite"),
    ("inf", "3 of 92160 voxels are NaN or infinite"),
    ("oneslice", "at least one window of real data (8 slices, 16 mm) is needed"),
    ("zerospacing", "voxel spacing (1.0, 1.0, 0.0) mm is not positive and finite"),
    ("flat2d", "expected a 3D image"),
    ("pe_outside", "pe_slices 200-300 lie outside the study's 40 slices"),
    ("truncdcm", "truncated or incomplete CT image file (300 bytes)"),
    ("missing", "nowhere: no such file or folder"),
    ("gap", "missing slices, gap of"),
    ("dup", "duplicate slice position"),
    ("mixed", "mixed matrix size"),
    ("mr", "no CT series"),
    ("fourd", "expected a 3D image"),
])
def test_bad_volumes_fail_alone_with_a_named_reason(bad_volumes, sid, message):
    tmp, proc, rows = bad_volumes
    assert proc.returncode == 1
    prefix = f"volttl preprocess: failed {sid}:"
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert f"failed {sid}" not in proc.stdout  # failures go to stderr only, once
    assert "Traceback" not in proc.stderr


def test_bad_volumes_leave_good_studies_stored_and_clipping_is_reported(bad_volumes):
    tmp, proc, rows = bad_volumes
    good = {r[0] for r in rows[:GOOD]}
    assert _stored(tmp) == good | {"big"}
    assert f"{GOOD + 1} preprocessed, 0 already stored, 14 failed" in proc.stdout
    assert "warning: big: 8 voxels outside the int16 range" in proc.stderr
    with h5py.File(tmp / "s.h5", "r") as f:
        assert int(f["studies/big/hu"][...].max()) == 32767  # clipped, not wrapped


def test_manifest_problems_are_all_listed_in_one_line(cohort, tmp_path, capsys):
    good = _good_rows(Path(cohort))
    rows = good + [[".", good[0][1], "0", "train", ""], [".hidden", good[0][1], "0", "train", ""],
                   ["x1", good[0][1], "0", "train", "-3-5"], ["x2", good[0][1], "2", "train", ""],
                   ["x3", good[0][1], "0", "holdout", ""], ["x3", good[0][1], "0", "train", ""]]
    manifest = _manifest(tmp_path, rows, bom=True)
    assert main(["manifest", "csv", str(manifest), "--out", str(tmp_path / "o.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "6 problem(s)" in err
    for text in ("line 4: study_id '.'", "line 5: study_id '.hidden'", "line 6: bad pe_slices (negative",
                 "line 7: label must be 0 or 1", "line 8: split must be one of",
                 "line 9: duplicate study_id x3"):
        assert text in err
    ok = _manifest(tmp_path, good + [["gone", str(tmp_path / "gone.nii.gz"), "0", "test", ""]], "n.csv")
    assert main(["manifest", "csv", str(ok), "--out", str(tmp_path / "o.csv")]) == 1
    assert "line 4: path" in capsys.readouterr().err and not (tmp_path / "o.csv").exists()


def test_an_excel_bom_manifest_reads(cohort, tmp_path, capsys):
    manifest = _manifest(tmp_path, _good_rows(Path(cohort)), bom=True)
    assert main(["manifest", "csv", str(manifest), "--out", str(tmp_path / "o.csv")]) == 0


@pytest.mark.parametrize("override,message", [
    ("runtime.device=gpu", "runtime.device must be auto, cpu, cuda or cuda:N"),
    ("train.batch_size=0", "train.batch_size must be > 0"),
    ("train.grad_accum=0", "train.grad_accum must be > 0"),
    ("train.epochs=0", "train.epochs must be > 0"),
    ("model.num_outputs=0", "model.num_outputs must be > 0"),
    ("data.hu_clip=[900, -100]", "data.hu_clip must be [low, high] with low < high"),
    ("data.hu_clip=[100, 100]", "data.hu_clip must be [low, high] with low < high"),
    ("train.lr_new=.inf", "train.lr_new must be > 0"),
    ("preprocess.train_stride=0", "preprocess.train_stride must be > 0"),
    ("train.batch_size=[8", "the value is not valid YAML"),
    ("train.seed=!!python/object/apply:os.system ['true']", "the value is not valid YAML"),
])
def test_config_ranges_fail_in_one_line_before_any_work(cohort, tmp_path, capsys, override, message):
    cfg = _config(tmp_path, Path(cohort))
    assert main(["train", "--config", str(cfg), "--set", override]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "runs").exists()


def test_a_crop_larger_than_the_stored_slices_is_named(cohort, tmp_path, capsys):
    cfg = _config(tmp_path, Path(cohort))
    assert main(["preprocess", "--config", str(cfg), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--set", "data.crop=300"]) == 1
    err = capsys.readouterr().err.strip()
    assert "data.crop 300 is larger than the stored 48 x 48 slices" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_a_cuda_device_on_a_machine_without_one_is_named(cohort, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    store_cfg = _config(tmp_path, Path(cohort))
    assert main(["preprocess", "--config", str(store_cfg), "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["train", "--config", str(store_cfg), "--set", "runtime.device=cuda", "--set", "data.crop=32"])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert "runtime.device 'cuda': no CUDA GPU is available" in err and "\n" not in err


def test_a_pipeline_with_a_python_tag_is_refused(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("workdir: w\nconfig: c.yaml\nsteps: !!python/object/apply:os.system ['true']\n")
    assert main(["pipeline", str(path)]) == 1
    assert "p.yaml: not a valid pipeline file" in capsys.readouterr().err


def test_synth_out_pointing_at_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["synth", "--out", str(target), "--studies", "2"]) == 1
    assert "file.txt" in capsys.readouterr().err and target.read_text() == "x"


@pytest.fixture
def trained(cohort, tmp_path):
    return train_tiny_run(Path(cohort), tmp_path)


def test_resume_with_another_model_leaves_the_run_as_it_was(trained, capsys):
    cfg, run = trained
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    rc = main(["train", "--config", str(cfg), "--run-dir", str(run), "--resume",
               "--set", "transfer.cut=layer1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "--resume with a different model (transfer.cut 'stem' -> 'layer1')" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert main(["evaluate", "--run", str(run)]) == 0  # still usable


def test_resume_with_other_training_settings_is_refused_and_runtime_ones_are_not(trained, capsys):
    """A resumed run whose learning rate (or batch, epochs, schedule...) changed would match
    neither config; the device, workers and precision may change."""
    cfg, run = trained
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    rc = main(["train", "--config", str(cfg), "--run-dir", str(run), "--resume", "--set", "train.lr_new=0.5"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "trained with other settings (train.lr_new 0.1 -> 0.5)" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    runtime = ["--set", "train.workers=0", "--set", "train.precision=bf16", "--set", "runtime.device=cpu"]
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--resume", "--quiet", *runtime]) == 0
    assert "resumed with runtime.precision 'bf16' (was 'tf32')" in (run / "train.log").read_text()


def test_a_pipeline_does_not_reuse_a_run_trained_with_other_settings(trained):
    from volttl.config import load_config
    from volttl.outputs.folders import RunError
    from volttl.outputs.resume import check_resumable
    from volttl.train.step import train_repeats

    cfg_path, run = trained
    cfg = load_config(cfg_path)
    check_resumable(run, cfg)  # the run's own settings: reusable
    cfg.train.epochs = 3  # a longer cosine schedule is another run, not a continuation
    with pytest.raises(RunError, match="train.epochs 1 -> 3"):
        check_resumable(run, cfg)
    group = run.parent / "group"
    cfg.train.epochs, cfg.train.repeats = 1, 2
    for seed_run in (group / "seed0", group / "seed1"):
        shutil.copytree(run, seed_run)
    cfg.train.lr_new = 0.5
    with pytest.raises(RunError, match="train.lr_new 0.1 -> 0.5"):
        train_repeats(cfg, group, resume=True, progress=False)


def test_a_run_is_not_continued_on_other_training_data(trained, tmp_path):
    """Test studies may come and go; a changed training or validation study (here a pe_slices
    correction) makes the store another dataset, and the run is not continued on it."""
    from volttl.config import config_to_yaml, load_config
    from volttl.outputs.folders import RunError
    from volttl.outputs.resume import check_resumable

    cfg_path, run = trained
    cfg = load_config(cfg_path)
    with open(cfg.data.manifest) as fh:
        rows = list(csv.reader(fh))
    base = Path(cfg.data.manifest).parent

    def preprocess_with(changed_rows):
        manifest = tmp_path / f"m{len(list(tmp_path.glob('m*.csv')))}.csv"
        with open(manifest, "w", newline="") as fh:
            csv.writer(fh).writerows([rows[0]] + [[r[0], str(base / r[1]), *r[2:]] for r in changed_rows])
        cfg.data.manifest = str(manifest)
        cfg_path.write_text(config_to_yaml(cfg))
        assert main(["preprocess", "--config", str(cfg_path), "--quiet"]) == 0

    preprocess_with([r for r in rows[1:] if r[0] != "synth003"])  # one test study fewer
    check_resumable(run, cfg)
    corrected = [r if r[0] != "synth001" else [*r[:4], "27-33", *r[5:]] for r in rows[1:]]
    preprocess_with(corrected)  # a training study's PE slices corrected
    with pytest.raises(RunError, match="training or validation data changed since the run was trained "
                                       r"\(the same study counts; its studies, volumes, labels or "
                                       r"windows differ\)"):
        check_resumable(run, cfg)
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(run), "--resume"]) == 1


def test_resume_on_a_missing_run_is_an_error(trained, tmp_path, capsys):
    cfg, _ = trained
    assert main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "nope"), "--resume"]) == 1
    assert "no run to resume" in capsys.readouterr().err and not (tmp_path / "nope").exists()


def test_a_missing_or_corrupted_study_file_is_named_and_a_rerun_repairs_it(trained, capsys):
    cfg, run = trained
    store = Path(yaml.safe_load(cfg.read_text())["data"]["store"])
    from volttl.preprocess.store import Store

    with Store(store) as opened:
        victim = opened.study_ids[opened.studies_in("train")[0]]
    study = Path(f"{store}.d") / f"{victim}.h5"
    saved = study.read_bytes()
    study.unlink()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--split", "train", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"study '{victim}'" in err and f"{victim}.h5" in err and "rerun `volttl preprocess`" in err
    # corrupt one chunk's bytes in place: the rerun notices (checksum) and redoes the study
    data = bytearray(saved)
    study.write_bytes(saved)
    with h5py.File(study, "r") as f:
        offset = f["hu"].id.get_chunk_info(0).byte_offset
    data[offset + 50: offset + 60] = b"\xff" * 10
    study.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--split", "train", "--quiet"]) == 1  # read mid-run: named
    err = capsys.readouterr().err.strip()
    assert f"study '{victim}': cannot read" in err and "rerun `volttl preprocess`" in err and "\n" not in err
    assert main(["preprocess", "--config", str(cfg), "--quiet"]) == 0
    assert "1 preprocessed" in capsys.readouterr().out
    assert study.read_bytes() != bytes(data)


def test_stale_temp_files_of_a_killed_run_are_removed(trained, capsys):
    cfg, _ = trained
    store = Path(yaml.safe_load(cfg.read_text())["data"]["store"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [store.parent / f".{store.name}.tmp{dead.pid}",
             Path(f"{store}.d") / f".synth000.h5.tmp{dead.pid}"]
    live = Path(f"{store}.d") / f".synth001.h5.tmp{os.getpid()}"
    for p in [*stale, live]:
        p.write_bytes(b"partial")
    assert main(["preprocess", "--config", str(cfg), "--quiet"]) == 0
    assert not any(p.exists() for p in stale) and live.exists()  # a live writer's file is kept
    live.unlink()


@pytest.mark.slow
def test_a_killed_worker_fails_only_its_study(cohort, tmp_path):
    rows = _good_rows(Path(cohort))
    with open(cohort) as fh:
        extra = list(csv.DictReader(fh))[GOOD:GOOD + 2]
    rows += [[r["study_id"], str(Path(cohort).parent / r["path"]), r["label"], r["split"], r["pe_slices"]]
             for r in extra]
    cfg = _config(tmp_path, _manifest(tmp_path, rows), workers=2)
    victim = rows[1][0]
    env = {**os.environ, "VOLTTL_FAULT_KILL_WORKER": victim}
    proc = subprocess.run([sys.executable, "-m", "volttl", "preprocess", "--config", str(cfg), "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1
    assert f"failed {victim}:" in proc.stderr and "killed by SIGKILL (likely out of memory)" in proc.stderr
    assert proc.stderr.count("failed ") == 1
    assert _stored(tmp_path) == {r[0] for r in rows} - {victim}


@pytest.mark.slow
def test_killing_the_main_process_takes_its_workers_with_it(cohort, tmp_path):
    cfg = _config(tmp_path, Path(cohort), workers=2)
    env = {**os.environ, "VOLTTL_FAULT_KILL": "before-index:1"}
    proc = subprocess.run([sys.executable, "-m", "volttl", "preprocess", "--config", str(cfg), "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL
    # the kernel kills the workers with their parent (PR_SET_PDEATHSIG); the wait is only a
    # bound for a loaded machine, not a timing claim
    deadline = time.time() + 120
    while time.time() < deadline and _processes_with(str(cfg)):
        time.sleep(0.1)
    assert _processes_with(str(cfg)) == []


def _processes_with(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_store_pair_moved_together_still_reads(trained, tmp_path):
    from volttl.data import WindowDataset

    cfg, _ = trained
    store = Path(yaml.safe_load(cfg.read_text())["data"]["store"])
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(store), moved / store.name)
    shutil.move(f"{store}.d", moved / f"{store.name}.d")
    ds = WindowDataset(str(moved / store.name), "train", False, InputSpec(8, 32, (-100.0, 900.0), 0.15897))
    assert ds[0][0].shape[-1] == 32


def test_preprocess_without_manifest_or_store_names_the_key(tmp_path):
    """The same check from the command and from a pipeline's preprocess step (both run
    volttl.preprocess.step.preprocess_step): an unset path is named before anything is read."""
    from volttl.config import config_from_dict
    from volttl.manifests.schema import ManifestError
    from volttl.preprocess.step import preprocess_step

    with pytest.raises(ManifestError, match="data.store is not set"):
        preprocess_step(config_from_dict({"data": {"manifest": str(tmp_path / "m.csv")}}), progress=False)
    with pytest.raises(ManifestError, match="data.manifest is not set"):
        preprocess_step(config_from_dict({"data": {"store": str(tmp_path / "s.h5")}}), progress=False)
    assert not (tmp_path / "s.h5").exists()
