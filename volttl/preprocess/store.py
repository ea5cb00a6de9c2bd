"""The HDF5 window store: layout, atomic writes, and reading it back.

Layout (``store.h5`` plus a folder ``store.h5.d/`` beside it; h5py alone reads it):

- ``store.h5`` attrs: ``format="volttl-store"``, ``version``, ``config`` (resolved YAML).
- ``store.h5/studies/<study_id>``: external link to ``store.h5.d/<study_id>.h5``, so
  ``f["studies/<id>/hu"]`` reads straight through. Each study group holds ``hu``, int16
  ``(slices, size, size)`` HU, chunked one window per chunk, LZF-compressed (the filter
  ships inside h5py; several times faster than gzip to write and to read); and attrs
  ``label``, ``split``, ``pe_slices`` (stored grid), ``pe_slices_original``, the original
  grid (``original_shape`` (k, j, i), ``original_spacing`` (i, j, k) mm,
  ``original_origin`` LPS, ``original_direction``, ``original_affine_ras``),
  ``stored_to_original`` (4x4, stored (c, r, s) index -> original (i, j, k) index) and
  ``stored_affine_ras``.
- ``store.h5/index/study_ids``, ``index/splits``, ``index/labels``: the studies in
  manifest order; ``index/windows_eval`` (every study, non-overlapping) and
  ``index/windows_train`` (train split, ``train_stride``): records
  ``(study, start, pe_slices, label)`` where ``study`` indexes ``index/study_ids``.

Why two files: HDF5 cannot survive a kill in the middle of a write. Each study is
written to a temporary file and renamed into place, and the small index file is
rewritten and renamed after every finished study, so a kill at any moment leaves a
store that opens and lists every study finished so far.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from volttl.preprocess.windows import WINDOW_DTYPE, study_windows

FORMAT = "volttl-store"
VERSION = 1


def study_dir(store: str | Path) -> Path:
    return Path(f"{store}.d")


def study_file(store: str | Path, study_id: str) -> Path:
    return study_dir(store) / f"{study_id}.h5"


def settings_hash(payload: dict) -> str:
    """Hash of everything that determines a study's stored volume and labels."""
    text = json.dumps({"version": VERSION, **payload}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic_h5(path: Path):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    return tmp, h5py.File(tmp, "w")


def write_study(store: str | Path, study_id: str, hu: np.ndarray, attrs: dict, window: int
                ) -> None:
    """Write one study file atomically (temporary file, then rename)."""
    path = study_file(store, study_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, f = _atomic_h5(path)
    try:
        with f:
            chunks = (min(window, hu.shape[0]), hu.shape[1], hu.shape[2])
            f.create_dataset("hu", data=hu, chunks=chunks, compression="lzf", shuffle=True)
            for key, value in attrs.items():
                f.attrs[key] = value
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class StudyRecord:
    """What the index needs of a finished study (read from its file's attrs)."""

    study_id: str
    split: str
    label: int
    pe_flags: np.ndarray
    settings: str


def read_record(store: str | Path, study_id: str) -> StudyRecord | None:
    """The record of a finished study file, or None when absent or unreadable."""
    path = study_file(store, study_id)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            n = f["hu"].shape[0]
            flags = np.zeros(n, dtype=bool)
            flags[np.asarray(f.attrs["pe_slices"], dtype=int)] = True
            return StudyRecord(study_id, str(f.attrs["split"]), int(f.attrs["label"]), flags,
                               str(f.attrs["settings"]))
    except (OSError, KeyError):
        return None


def write_index(store: str | Path, records: list[StudyRecord], window: int, train_stride: int,
                min_pe_slices: int, config_yaml: str) -> None:
    """Rewrite ``store.h5`` (links + window index) atomically."""
    store = Path(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp, f = _atomic_h5(store)
    try:
        with f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["config"] = config_yaml
            f.attrs["window"] = window
            f.attrs["train_stride"] = train_stride
            f.attrs["min_pe_slices"] = min_pe_slices
            studies = f.create_group("studies")
            rel = study_dir(store).name
            for r in records:
                studies[r.study_id] = h5py.ExternalLink(f"{rel}/{r.study_id}.h5", "/")
            idx = f.create_group("index")
            strings = h5py.string_dtype()
            idx.create_dataset("study_ids", data=[r.study_id for r in records], dtype=strings)
            idx.create_dataset("splits", data=[r.split for r in records], dtype=strings)
            idx.create_dataset("labels", data=np.asarray([r.label for r in records], np.int8))
            ev = [study_windows(i, r.pe_flags, r.label, window, window, min_pe_slices)
                  for i, r in enumerate(records)]
            tr = [study_windows(i, r.pe_flags, r.label, window, train_stride, min_pe_slices)
                  for i, r in enumerate(records) if r.split == "train"]
            empty = np.zeros(0, dtype=WINDOW_DTYPE)
            idx.create_dataset("windows_eval", data=np.concatenate(ev) if ev else empty)
            idx.create_dataset("windows_train", data=np.concatenate(tr) if tr else empty)
        os.replace(tmp, store)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StoreError(ValueError):
    """A store that is missing or not a volttl store."""


def open_store(path: str | Path) -> h5py.File:
    """Open a store read-only, checking that it is one."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: store not found (run `volttl preprocess` first)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path}: not an HDF5 file ({exc})") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise StoreError(f"{path}: not a volttl store")
    return f
