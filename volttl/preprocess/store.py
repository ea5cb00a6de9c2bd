"""The HDF5 store: layout, atomic writes, and reading it back.

Layout (``store.h5`` plus a folder ``store.h5.d/`` beside it; h5py alone reads it):

- ``store.h5`` attrs: ``format="volttl-store"``, ``version``, ``config`` (resolved YAML).
- ``store.h5/studies/<study_id>``: external link to ``store.h5.d/<study_id>.h5``, so
  ``f["studies/<id>/hu"]`` reads straight through. Each study group holds ``hu``, int16
  ``(slices, size, size)`` HU, chunked one window per chunk, LZF-compressed (the filter
  ships inside h5py; several times faster than gzip to write and to read); and attrs
  ``label``, ``split``, ``pe_slices`` (stored grid), ``pe_slices_original``, the original
  grid (``original_shape`` (k, j, i), ``original_spacing`` (i, j, k) mm,
  ``original_origin`` LPS, ``original_direction``, ``original_affine_ras``),
  ``stored_to_original`` (4x4, stored (c, r, s) index -> original (i, j, k) index),
  ``stored_affine_ras``, and ``adjusted`` (what ``preprocess.penet_rules`` changed, or "").
- ``store.h5/index/study_ids``, ``index/splits``, ``index/labels``: the studies in
  manifest order; ``index/windows_eval`` (every study, non-overlapping) and
  ``index/windows_train`` (train split, ``train_stride``): records
  ``(study, start, pe_slices, label)`` where ``study`` indexes ``index/study_ids``;
  ``label`` is 1, 0, or -1 (unknown: a positive study without pe_slices).

Why two files: HDF5 cannot survive a kill in the middle of a write. Each study is
written to a temporary file and renamed into place, and the small index file is
rewritten and renamed after every finished study, so a kill at any moment leaves a
store that opens and lists every study finished so far.

:class:`StudyMeta` is the only code that names a study's attributes (writing and
reading), and :class:`Store` the only reader of the index; nothing else in volttl names
a key of the store.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import h5py
import numpy as np

from volttl.errors import VolttlError
from volttl.io.geometry import Geometry
from volttl.outputs.folders import StoreFiles
from volttl.outputs.provenance import fingerprint
from volttl.preprocess.windows import WINDOW_DTYPE, study_windows

FORMAT = "volttl-store"
VERSION = 2  # 2: canonical LPS voxel order, float HU that are whole numbers stored via int16


def study_dir(store: str | Path) -> Path:
    return StoreFiles(store).studies


def study_file(store: str | Path, study_id: str) -> Path:
    return StoreFiles(store).study(study_id)


def settings_hash(payload: dict) -> str:
    """Hash of everything that determines a study's stored volume and labels."""
    return fingerprint({"version": VERSION, **payload})


CHECKSUM = "hu_chunks_crc32"


def chunk_checksum(dset: h5py.Dataset) -> int:
    """CRC32 over the stored (compressed) chunks of a dataset, read raw: it detects a
    corrupted or truncated chunk at the cost of reading the file's bytes, no decompression."""
    crc = 0
    n = dset.shape[0]
    step = dset.chunks[0]
    for start in range(0, n, step):
        _, raw = dset.id.read_direct_chunk((start, 0, 0))
        crc = zlib.crc32(raw, crc)
    return crc


def checksum_matches(f: h5py.File) -> bool:
    """Whether an open study file's HU chunks match the checksum written with them (files
    written before checksums were recorded are taken as whole)."""
    expected = f.attrs.get(CHECKSUM)
    return expected is None or chunk_checksum(f["hu"]) == int(expected)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(store: str | Path) -> list[Path]:
    """Delete temporary files left by killed writers (``.<name>.tmp<pid>`` whose process is
    gone) beside the index and in the study folder; a live writer's files are kept, so
    two runs on one store stay safe. Returns what was removed."""
    store = Path(store)
    removed = []
    for folder, prefix in ((store.parent, f".{store.name}.tmp"), (study_dir(store), ".")):
        if not folder.is_dir():
            continue
        for f in folder.glob(f"{prefix}*"):
            _, sep, pid = f.name.rpartition(".tmp")
            if sep and pid.isdigit() and f.name.startswith(prefix) and not _pid_alive(int(pid)):
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


class StoreWriteError(VolttlError):
    """A store file that could not be written (a full disk, a file-size limit, no permission)."""


@contextmanager
def _atomic_h5(path: Path):
    """An HDF5 file built in memory, then written to ``path`` in one step (a temporary
    file beside it, then a rename). HDF5 itself never writes to disk: when the disk is
    full or a file-size limit is reached, the C library can crash the process; Python's
    own write raises an error that names the file and the cause, and the temporary file is
    removed, so whatever the store already held stays whole."""
    buffer = BytesIO()
    with h5py.File(buffer, "w") as f:  # a Python file object: the whole image stays in memory
        yield f
    image = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(image)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreWriteError(f"{path}: not written ({exc.strerror or exc}); whatever the store held before "
                              "is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class StudyMeta:
    """What the store records of one study beside its HU volume."""

    study_id: str
    label: int
    split: str
    pe_slices: np.ndarray  # on the stored grid
    pe_slices_original: np.ndarray  # as the manifest gave them
    source: str
    source_kind: str
    series_uid: str
    settings: str
    slice_thickness: float
    size: int
    original: Geometry
    stored_to_original: np.ndarray  # 4x4: stored (c, r, s) index -> original (i, j, k) index
    source_stamp: str = ""  # the source's sizes and modification times when it was read
    adjusted: str = ""  # what preprocess.penet_rules changed in this study ("" when nothing)

    @property
    def stored_affine_ras(self) -> np.ndarray:
        """Stored voxel index -> RAS mm."""
        return self.original.affine_ras() @ self.stored_to_original

    def to_attrs(self) -> dict:
        return {
            "study_id": self.study_id, "label": self.label, "split": self.split,
            "pe_slices": np.asarray(self.pe_slices, dtype=np.int32),
            "pe_slices_original": np.asarray(self.pe_slices_original, dtype=np.int32),
            "source": self.source, "source_kind": self.source_kind, "settings": self.settings,
            "series_uid": self.series_uid, "slice_thickness": self.slice_thickness, "size": self.size,
            **self.original.as_attrs("original_"),
            "original_affine_ras": self.original.affine_ras(),
            "stored_to_original": np.asarray(self.stored_to_original, dtype=np.float64),
            "stored_affine_ras": self.stored_affine_ras,
            "source_stamp": self.source_stamp,
            "adjusted": self.adjusted,
        }

    @staticmethod
    def from_attrs(attrs) -> StudyMeta:
        return StudyMeta(
            study_id=str(attrs["study_id"]), label=int(attrs["label"]), split=str(attrs["split"]),
            pe_slices=np.asarray(attrs["pe_slices"], dtype=np.int64),
            pe_slices_original=np.asarray(attrs["pe_slices_original"], dtype=np.int64),
            source=str(attrs["source"]), source_kind=str(attrs["source_kind"]),
            series_uid=str(attrs.get("series_uid", "")), settings=str(attrs["settings"]),
            slice_thickness=float(attrs["slice_thickness"]), size=int(attrs["size"]),
            original=Geometry.from_attrs(attrs, "original_"),
            stored_to_original=np.asarray(attrs["stored_to_original"], dtype=np.float64),
            source_stamp=str(attrs.get("source_stamp", "")),
            adjusted=str(attrs.get("adjusted", "")),
        )


def content_hash(hu: np.ndarray) -> str:
    """A digest of a stored volume's voxels and shape: the same scan stored under two ids
    (a copied folder, a path spelt twice) has the same one."""
    digest = hashlib.blake2b(str(hu.shape).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(hu).tobytes())
    return digest.hexdigest()


def write_study(store: str | Path, hu: np.ndarray, meta: StudyMeta, window: int) -> str:
    """Write one study file atomically (temporary file, then rename); returns its
    :func:`content_hash`."""
    study_id = meta.study_id
    path = study_file(store, study_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_h5(path) as f:
        chunks = (min(window, hu.shape[0]), hu.shape[1], hu.shape[2])
        dset = f.create_dataset("hu", data=hu, chunks=chunks, compression="lzf", shuffle=True)
        for key, value in meta.to_attrs().items():
            f.attrs[key] = value
        digest = f.attrs["content_hash"] = content_hash(hu)
        f.flush()
        f.attrs[CHECKSUM] = chunk_checksum(dset)
    return digest


@dataclass
class StudyRecord:
    """What the index needs of a finished study (read from its file's attrs)."""

    study_id: str
    split: str
    label: int
    pe_flags: np.ndarray
    settings: str
    source_stamp: str = ""  # "" in files written before stamps were recorded
    adjusted: str = ""  # what preprocess.penet_rules changed ("" when nothing)
    content_hash: str = ""  # "" in files written before it was recorded


def read_record(store: str | Path, study_id: str, verify: bool = True) -> StudyRecord | None:
    """The record of a finished study file, or None when absent, unreadable or (with
    ``verify``) corrupted, so that preprocessing redoes it."""
    path = study_file(store, study_id)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if verify and not checksum_matches(f):
                return None
            n = f["hu"].shape[0]
            flags = np.zeros(n, dtype=bool)
            flags[np.asarray(f.attrs["pe_slices"], dtype=int)] = True
            return StudyRecord(study_id, str(f.attrs["split"]), int(f.attrs["label"]), flags,
                               str(f.attrs["settings"]), str(f.attrs.get("source_stamp", "")),
                               str(f.attrs.get("adjusted", "")), str(f.attrs.get("content_hash", "")))
    except (OSError, KeyError):
        return None


def write_index(store: str | Path, records: list[StudyRecord], window: int, train_stride: int,
                min_pe_slices: int, config_yaml: str) -> None:
    """Rewrite ``store.h5`` (links + window index) atomically."""
    store = Path(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_h5(store) as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["config"] = config_yaml
        f.attrs["window"] = window
        f.attrs["train_stride"] = train_stride
        f.attrs["min_pe_slices"] = min_pe_slices
        studies = f.create_group("studies")
        for r in records:  # relative, so that the store and its folder move together
            link = study_file(store, r.study_id).relative_to(Path(store).parent).as_posix()
            studies[r.study_id] = h5py.ExternalLink(link, "/")
        idx = f.create_group("index")
        strings = h5py.string_dtype()
        idx.create_dataset("study_ids", data=[r.study_id for r in records], dtype=strings)
        idx.create_dataset("splits", data=[r.split for r in records], dtype=strings)
        idx.create_dataset("labels", data=np.asarray([r.label for r in records], np.int8))
        idx.create_dataset("content_hashes", data=[r.content_hash for r in records], dtype=strings)
        ev = [study_windows(i, r.pe_flags, r.label, window, window, min_pe_slices)
              for i, r in enumerate(records)]
        tr = [study_windows(i, r.pe_flags, r.label, window, train_stride, min_pe_slices)
              for i, r in enumerate(records) if r.split == "train"]
        empty = np.zeros(0, dtype=WINDOW_DTYPE)
        idx.create_dataset("windows_eval", data=np.concatenate(ev) if ev else empty)
        idx.create_dataset("windows_train", data=np.concatenate(tr) if tr else empty)


def same_scans(hashes: list[str]) -> list[list[int]]:
    """Indices sharing a (recorded) content hash, in groups of two or more."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h:
            groups.setdefault(h, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def describe_same_scans(groups: list[list[int]], study_ids: list[str], splits: list[str]
                        ) -> tuple[list[str], list[str]]:
    """The groups that span splits (a test split holding training data) and those within
    one, each as ``"a (train) = b (test)"``."""
    across, within = [], []
    for g in groups:
        text = " = ".join(f"{study_ids[i]} ({splits[i]})" for i in g)
        (across if len({splits[i] for i in g}) > 1 else within).append(text)
    return across, within


class StoreError(VolttlError):
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


class Store:
    """A store opened for reading: the index, and each study's HU and metadata.

    Use as a context manager, or call :meth:`close`. A study whose file is missing or
    unreadable is a :class:`StoreError` naming the study, the file and the repair.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open_store(self.path)
        f = self._file
        try:
            self.window = int(f.attrs["window"])
            self.train_stride = int(f.attrs["train_stride"])
            self.min_pe_slices = int(f.attrs["min_pe_slices"])
            self.config_yaml = str(f.attrs["config"])
            self.study_ids: list[str] = [s.decode() for s in f["index/study_ids"][...]]
            self.splits: list[str] = [s.decode() for s in f["index/splits"][...]]
            self.labels = np.asarray(f["index/labels"][...], dtype=np.int64)
            hashes = f["index/content_hashes"][...] if "content_hashes" in f["index"] else []
            self.content_hashes: list[str] = [h.decode() for h in hashes] or [""] * len(self.study_ids)
        except KeyError as exc:
            f.close()
            raise StoreError(f"{self.path}: incomplete store index ({exc}); rerun `volttl preprocess`"
                             ) from None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def same_scans(self) -> list[list[int]]:
        """Groups of two or more studies (indices into :attr:`study_ids`) whose stored volumes
        are identical: one scan under several ids."""
        return same_scans(self.content_hashes)

    def studies_in(self, split: str) -> list[int]:
        """Indices (into :attr:`study_ids`) of the studies of ``split``."""
        return [i for i, s in enumerate(self.splits) if s == split]

    def windows(self, split: str, train: bool = False) -> np.ndarray:
        """The split's window records: the training table (``train_stride``) or the
        non-overlapping evaluation windows."""
        table = self._file["index/windows_train" if train else "index/windows_eval"][...]
        return table[np.isin(table["study"], self.studies_in(split))]

    def _group(self, study_id: str) -> h5py.Group:
        if study_id not in self.study_ids:
            raise StoreError(f"{self.path}: no study '{study_id}' in the store")
        try:
            return self._file[f"studies/{study_id}"]
        except (KeyError, OSError):
            raise StoreError(f"{self.path}: study '{study_id}': its file {study_file(self.path, study_id)} "
                             "is missing or unreadable; rerun `volttl preprocess` with the same config "
                             "to restore it") from None

    def read_slices(self, study_id: str, lo: int, hi: int, hu: h5py.Dataset | None = None) -> np.ndarray:
        """Stored slices ``lo:hi`` of a study (of ``hu``, its dataset, when the caller holds
        it already); a corrupted file is a named error."""
        try:
            return (self.hu(study_id) if hu is None else hu)[lo:hi]
        except OSError as exc:
            file = study_file(self.path, study_id)
            raise StoreError(f"{self.path}: study '{study_id}': cannot read {file} "
                             f"({str(exc).splitlines()[0][:120]}); rerun `volttl preprocess` with the same "
                             "config to redo it") from None

    def hu(self, study_id: str) -> h5py.Dataset:
        """The stored int16 HU volume ``(slices, size, size)``, read lazily."""
        try:
            return self._group(study_id)["hu"]
        except KeyError:
            raise StoreError(f"{self.path}: study '{study_id}' has no HU volume; rerun `volttl preprocess`"
                             ) from None

    def meta(self, study_id: str) -> StudyMeta:
        try:
            return StudyMeta.from_attrs(self._group(study_id).attrs)
        except KeyError as exc:
            raise StoreError(f"{self.path}: study '{study_id}' lacks attribute {exc}; rerun "
                             "`volttl preprocess`") from None

    def training_data(self) -> dict:
        """What a run learns from and is chosen on: the train and validation studies (ids,
        labels, window tables) and each one's stored volume (its checksum). A run records
        this when it starts, so that continuing or reusing it on a store whose training or
        validation data changed is refused; test studies may come and go."""
        splits = ("train", "val")
        studies = [(i, self.study_ids[i]) for i in range(len(self.study_ids)) if self.splits[i] in splits]
        digest = hashlib.sha256()
        tables = []  # each window table sorted by study once, with each study's row range
        for key in ("index/windows_train", "index/windows_eval"):
            table = self._file[key][...]
            table = table[np.argsort(table["study"], kind="stable")]
            bounds = np.searchsorted(table["study"], np.arange(len(self.study_ids) + 1))
            tables.append((table, bounds, [n for n in table.dtype.names if n != "study"]))
        for i, sid in sorted(studies, key=lambda s: s[1]):  # by id: indices shift as studies come
            attrs = self._group(sid).attrs
            stamp = attrs.get(CHECKSUM, attrs.get("settings", ""))
            digest.update(f"{sid}|{self.splits[i]}|{int(self.labels[i])}|{stamp}\n".encode())
            for table, bounds, names in tables:
                mine = table[bounds[i]: bounds[i + 1]]
                for name in names:  # field by field: a multi-field view would carry the index
                    digest.update(np.ascontiguousarray(mine[name]).tobytes())
        return {"store": str(self.path), "fingerprint": digest.hexdigest()[:16],
                **{split: sum(self.splits[i] == split for i, _ in studies) for split in splits}}
