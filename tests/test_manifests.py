import csv
import pickle

import h5py
import numpy as np
import pydicom
import pytest

from volttl.manifests import ManifestError, read_manifest, write_manifest
from volttl.manifests.penet import CTPE, load_series_list, penet_filter, penet_rows
from volttl.manifests.rsna import rsna_rows
from volttl.manifests.schema import format_slices, parse_slices
from volttl.preprocess.step import preprocess_step
from volttl.preprocess.windows import study_windows

from .conftest import shared_path, small_config
from .test_dicom import ROTATED, make_series


def test_slice_lists_round_trip():
    assert parse_slices("12-14;20") == [12, 13, 14, 20]
    assert format_slices([3, 1, 2, 9]) == "1-3;9"
    with pytest.raises(ValueError):
        parse_slices("5-2")


def test_manifest_errors_name_file_and_line(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("study_id,path,label,split\na,x.nii.gz,1,train\nb,y.nii.gz,2,train\n")
    with pytest.raises(ManifestError, match=r"m\.csv: 1 problem\(s\): line 3: label must be 0 or 1"):
        read_manifest(p, check_paths=False)
    with pytest.raises(ManifestError, match=r"line 2: path x.nii.gz does not exist; line 3: label"):
        read_manifest(p)
    p.write_text("study_id,path,label\na,x,1\n")
    with pytest.raises(ManifestError, match="missing column.*split"):
        read_manifest(p)


def test_extra_columns_are_kept(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("study_id,path,label,split,pe_slices,site\na,x.nii.gz,1,val,3-4,north\n")
    rows = read_manifest(p, check_paths=False)
    assert rows[0].extras == {"site": "north"} and rows[0].pe_slices == [3, 4]
    assert rows[0].path == str(tmp_path / "x.nii.gz")
    write_manifest(rows, tmp_path / "again.csv")
    assert read_manifest(tmp_path / "again.csv", check_paths=False)[0].extras == {"site": "north"}


def test_penet_real_series_list_counts():
    series = load_series_list(shared_path("reference", "penet_series_list.pkl"))
    assert len(series) == 1837
    kept = penet_filter(series)
    rows = penet_rows(kept, "/data/data.hdf5")
    # (studies, positive, windows, positive windows by PENet's list count, by distinct slices)
    expect = {"train": (1429, 483, 24128, 2030, 2029), "val": (164, 79, 2743, 147, 147),
              "test": (162, 82, 2716, 153, 153)}
    for split, (n, pos, windows, penet_pos, distinct_pos) in expect.items():
        mine = [r for r in rows if r.split == split]
        assert (len(mine), sum(r.label for r in mine)) == (n, pos)
        counts = []
        for r in mine:  # 1.25 mm source = 1.25 mm store, so the slice grids coincide
            flags = np.zeros(int(r.extras["num_slices"]), dtype=bool)
            flags[[p for p in r.pe_slices if p < len(flags)]] = True
            counts.append(study_windows(0, flags, r.label, 24, 24, 4))
        w = np.concatenate(counts)
        assert (len(w), int((w["label"] == 1).sum())) == (windows, distinct_pos)
        # PENet's _is_abnormal counts list entries: 15 studies repeat indices in pe_idxs,
        # which turns one train window positive that has only 3 distinct PE slices
        penet = sum(
            1 for c in kept if c.phase == split for start in range(0, c.num_slices, 24)
            if c.is_positive and len([i for i in c.pe_idxs if start <= i < start + 24]) >= 4)
        assert penet == penet_pos
    odd = {r.study_id: r for r in rows}
    assert odd["1122"].extras["num_slices"] == "1" and odd["1795"].extras["type"] == ""


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps([print]))
    with pytest.raises(ManifestError, match="refusing to load global builtins.print"):
        load_series_list(p)


def test_penet_import_then_preprocess(tmp_path):
    data = tmp_path / "data.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(data, "w") as f:
        f["7"] = rng.integers(-1000, 1000, (30, 64, 64)).astype(np.int16)
        f["9"] = rng.integers(-1000, 1000, (8, 64, 64)).astype(np.int16)
    series = [CTPE(7, 1.25, 1, 30, [10, 11, 12], "train", "central"),
              CTPE(9, 1.25, 0, 8, [], "test", "")]
    write_manifest(penet_rows(series, data), tmp_path / "m.csv")
    cfg = small_config(tmp_path / "m.csv", tmp_path / "s.h5", slice_thickness=1.25, size=32)
    assert not preprocess_step(cfg, progress=False).failed
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["studies/7/hu"].shape == (30, 32, 32) and f["studies/9/hu"].shape == (8, 32, 32)
        assert list(f["studies/7"].attrs["pe_slices"]) == [10, 11, 12]


def test_rsna_replica(tmp_path):
    root = tmp_path / "rsna"
    study, labels = "1.2.3.4", {}
    hu = make_series(tmp_path / "tmp")
    series = str(pydicom.dcmread(next((tmp_path / "tmp").glob("*.dcm"))).SeriesInstanceUID)
    folder = root / "train" / study / series
    folder.mkdir(parents=True)
    for f in (tmp_path / "tmp").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        z = float(ds.ImagePositionPatient[2])
        labels[str(ds.SOPInstanceUID)] = int(z in (ROTATED.origin[2] + 2.0, ROTATED.origin[2] + 4.0))
        f.rename(folder / f"{ds.SOPInstanceUID}.dcm")
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "pe_present_on_image", "negative_exam_for_pe", "rv_lv_ratio_gte_1"])
        for sop, pe in labels.items():
            w.writerow([study, series, sop, pe, 0, 0])
    rows = rsna_rows(root, progress=False)
    assert len(rows) == 1 and rows[0].label == 1
    assert rows[0].pe_slices == [1, 2]  # slices 1 and 2 in position order
    assert rows[0].extras["series_uid"] == series and hu.shape[0] == 6
