"""synth -> preprocess -> read the store back with h5py alone."""

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from volttl.config import config_to_yaml
from volttl.manifests import read_manifest
from volttl.preprocess.step import preprocess_step

from .conftest import small_config

PATIENT_TAG_VALUES = [b"Synthetic^Patient", b"SYNPID", b"SYNOTHER", b"19600101",
                      b"Synthetic General Hospital"]


@pytest.fixture(scope="module")
def store(cohort, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "store.h5"
    summary = preprocess_step(small_config(cohort, path), progress=False)
    assert not summary.failed and len(summary.done) == 6
    return path


def test_store_layout_with_h5py_alone(store, cohort):
    rows = read_manifest(cohort)
    with h5py.File(store, "r") as f:
        assert f.attrs["format"] == "volttl-store"
        ids = [s.decode() for s in f["index/study_ids"][...]]
        assert ids == [r.study_id for r in rows]
        for r in rows:
            g = f[f"studies/{r.study_id}"]
            hu = g["hu"]
            assert hu.dtype == np.int16 and hu.shape[1:] == (48, 48)
            assert hu.chunks == (min(8, hu.shape[0]), 48, 48)
            assert hu.compression == "lzf"
            assert int(g.attrs["label"]) == r.label and g.attrs["split"] == r.split
        assert "data:" in f.attrs["config"]


def test_geometry_and_values_against_nibabel(store, cohort):
    rows = {r.study_id: r for r in read_manifest(cohort)}
    nifti = [r for r in rows.values() if r.path.endswith(".nii.gz")]
    assert nifti
    for r in nifti:
        img = nib.load(r.path)
        data = np.asarray(img.dataobj, dtype=np.float32)  # (i, j, k)
        with h5py.File(store, "r") as f:
            g = f[f"studies/{r.study_id}"]
            np.testing.assert_allclose(g.attrs["original_affine_ras"], img.affine, atol=1e-4)
            assert tuple(g.attrs["original_shape"]) == data.shape[::-1]
            stored = g["hu"][...].astype(np.float32)
            s2o = g.attrs["stored_to_original"]
            # the stored grid's affine is the original affine after the index transform
            np.testing.assert_allclose(g.attrs["stored_affine_ras"], img.affine @ s2o, atol=1e-6)
        # area resizing keeps slice means; thinning averages the slices a stored slice covers
        # (overlap-weighted), refining is linear in k
        means = data.mean(axis=(0, 1))
        scale = s2o[2, 2]
        for s in range(stored.shape[0]):
            if scale > 1:
                lo, hi = s * scale, (s + 1) * scale
                overlap = np.clip(np.minimum(np.arange(1, len(means) + 1), hi)
                                  - np.maximum(np.arange(len(means)), lo), 0, None)
                expect = float((overlap * means).sum() / overlap.sum())
                assert s2o[2, 3] == (scale - 1) / 2  # the footprint's centre, in source slices
            else:
                k = s * scale
                k0 = min(int(math.floor(k)), len(means) - 1)
                k1 = min(k0 + 1, len(means) - 1)
                expect = means[k0] * (1 - (k - k0)) + means[k1] * (k - k0)
            assert abs(stored[s].mean() - expect) < 1.0


def test_windows_and_labels(store, cohort):
    rows = read_manifest(cohort)
    with h5py.File(store, "r") as f:
        ev = f["index/windows_eval"][...]
        tr = f["index/windows_train"][...]
        positives = 0
        for i, r in enumerate(rows):
            g = f[f"studies/{r.study_id}"]
            n = g["hu"].shape[0]
            mine = ev[ev["study"] == i]
            assert len(mine) == math.ceil(n / 8)
            assert list(mine["start"]) == list(range(0, n, 8))[: len(mine)]
            pe = set(int(p) for p in g.attrs["pe_slices"])
            s2o = g.attrs["stored_to_original"]
            assert all(round(s * s2o[2, 2] + s2o[2, 3]) in set(r.pe_slices) for s in pe)
            assert bool(pe) == bool(r.pe_slices)
            for w in mine:
                count = len([s for s in pe if w["start"] <= s < w["start"] + 8])
                assert w["pe_slices"] == count
                assert w["label"] == int(r.label == 1 and count >= 2)
            positives += int(mine["label"].sum())
            if r.split == "train":
                starts = tr[tr["study"] == i]["start"]
                assert starts[0] == 0 and starts[-1] == max(0, n - 8)
            else:
                assert not (tr["study"] == i).any()
        assert positives > 0


def test_no_patient_identifying_tags_anywhere(store):
    blobs = [store.read_bytes()] + [p.read_bytes() for p in Path(f"{store}.d").glob("*.h5")]
    # study files are compressed: check the attributes, which are not
    for blob in blobs:
        for value in PATIENT_TAG_VALUES:
            assert value not in blob
    with h5py.File(store, "r") as f:
        for sid in f["studies"]:
            text = repr(dict(f[f"studies/{sid}"].attrs))
            assert "Synthetic^Patient" not in text and "SYNPID" not in text


def test_failed_study_does_not_stop_others_and_rerun_skips(cohort, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    with open(cohort) as src, open(manifest, "w", newline="") as dst:
        rows = list(csv.reader(src))
        rows = [rows[0]] + [[r[0], str(Path(cohort).parent / r[1]), *r[2:]] for r in rows[1:3]]
        rows.append(["broken", str(tmp_path / "nowhere"), "0", "test", "", ""])
        csv.writer(dst).writerows(rows)
    from volttl.cli import main

    code = main(["preprocess", "--config", str(write_cfg(tmp_path, manifest)), "--quiet"])
    out = capsys.readouterr()
    assert code == 1
    assert "failed broken:" in out.err and "nowhere: no such file or folder" in out.err
    assert "2 preprocessed, 0 already stored, 1 failed" in out.out
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert sorted(f["studies"]) == sorted(r[0] for r in rows[1:3])
    main(["preprocess", "--config", str(write_cfg(tmp_path, manifest)), "--quiet"])
    assert "0 preprocessed, 2 already stored, 1 failed" in capsys.readouterr().out


def test_a_study_exported_again_to_the_same_path_is_preprocessed_again(cohort, tmp_path):
    """Same path, same settings, new content: the store must not keep the old volume."""
    import shutil

    with open(cohort) as fh:
        rows = list(csv.reader(fh))
    nifti = [r for r in rows[1:] if r[1].endswith(".nii.gz")][:2]
    shutil.copytree(Path(cohort).parent / "studies", tmp_path / "studies",
                    ignore=lambda d, names: [n for n in names if n not in {Path(r[1]).name for r in nifti}])
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0]] + [[r[0], str(tmp_path / r[1]), *r[2:]] for r in nifti])
    cfg = small_config(manifest, tmp_path / "s.h5")
    assert len(preprocess_step(cfg, progress=False).done) == 2

    def stored_mean():
        with h5py.File(tmp_path / "s.h5", "r") as f:
            return f["studies"][nifti[0][0]]["hu"][...].mean()

    before = stored_mean()
    again = tmp_path / nifti[0][1]
    img = nib.load(again)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 500, img.affine, img.header), again)
    old_stat = os.stat(again)
    os.utime(again, ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns + 10**9))  # a later export
    summary = preprocess_step(cfg, progress=False)
    assert summary.done == [nifti[0][0]] and summary.skipped == [nifti[1][0]]
    assert stored_mean() - before == pytest.approx(500, abs=5)  # the new content, not the old


def write_cfg(tmp_path: Path, manifest: Path) -> Path:
    cfg = small_config(manifest, tmp_path / "s.h5")
    path = tmp_path / "c.yaml"
    path.write_text(config_to_yaml(cfg))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before-index", "after-index"])
def test_kill_minus_nine_then_rerun_completes(cohort, tmp_path, point):
    """SIGKILL at a recorded point (the third study's file renamed into place, before or
    after the index may be rewritten): the store opens, lists only whole studies, and a
    rerun keeps every finished one and completes the rest."""
    cfg = small_config(cohort, tmp_path / "s.h5")
    cfg.preprocess.workers = 1
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(config_to_yaml(cfg))
    study_dir = Path(f"{tmp_path / 's.h5'}.d")
    cmd = [sys.executable, "-m", "volttl", "preprocess", "--config", str(cfg_path), "--quiet"]
    env = {**os.environ, "VOLTTL_FAULT_KILL": f"{point}:3"}
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL
    finished = {p.stem for p in study_dir.glob("*.h5")}
    assert len(finished) == 3 and not list(study_dir.glob(".*tmp*"))
    with h5py.File(tmp_path / "s.h5", "r") as f:  # the store opens
        listed = set(f["studies"])
        for sid in listed:
            assert f[f"studies/{sid}/hu"].shape[0] > 0
    # the index lists whole studies only; one finished after its last rewrite is in its file
    assert listed <= finished and len(listed) <= (3 if point == "after-index" else 2)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "3 already stored" in done.stdout  # the unindexed third study is found by its file
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert len(f["studies"]) == 6


def test_synth_is_the_same_with_two_processes(tmp_path):
    from volttl.synth.cohort import synth_cohort

    a = synth_cohort(tmp_path / "one", studies=4, seed=5, matrix=32, progress=False, workers=1)
    b = synth_cohort(tmp_path / "two", studies=4, seed=5, matrix=32, progress=False, workers=2)
    assert a.read_text() == b.read_text()
    for name in ("masks/synth001_lesion.nii.gz", "studies/synth003.nii.gz"):
        x, y = (np.asarray(nib.load(root.parent / name).dataobj) for root in (a, b))
        assert np.array_equal(x, y) and x.any()


def test_synth_file_format_says_nothing_of_the_label(cohort):
    """Both labels come as DICOM and as NIfTI, so a model cannot learn the format."""
    rows = read_manifest(cohort)
    kinds = {(r.path.endswith(".nii.gz"), r.label) for r in rows}
    assert kinds == {(False, 0), (False, 1), (True, 0), (True, 1)}
