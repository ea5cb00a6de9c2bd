"""`volttl preprocess`: every study of the manifest into the store, in parallel.

A failing study is reported with its reason and does not stop the others; studies
already stored with the same settings, from a source unchanged since (the sizes and
modification times of its files), are skipped; the index is rewritten after each
finished study so that a kill loses nothing that was finished.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from pathlib import Path

import numpy as np

from volttl.addresses import source_file, split_hdf5_address
from volttl.config import Config, config_to_yaml
from volttl.errors import VolttlError
from volttl.io.orientation import OrientationError, to_canonical
from volttl.io.studies import StudyReadError, read_study
from volttl.manifests.schema import ManifestError, StudyRow, format_slices, read_manifest
from volttl.preprocess.resample import resample_to_store
from volttl.preprocess.store import (
    Store,
    StudyMeta,
    StudyRecord,
    read_record,
    remove_stale_temps,
    settings_hash,
    write_index,
    write_study,
)
from volttl.preprocess.windows import pe_flags_on_stored_grid
from volttl.progress import progress_bar

log = logging.getLogger("volttl.preprocess")
INT16_MIN, INT16_MAX = -32768, 32767
# Workers only decode, resize and write (numpy, pydicom, OpenCV, h5py; never torch), so
# forking is safe where the platform offers it, and saves each worker its imports.
POOL_START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


@dataclass
class PreprocessSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    adjusted: dict[str, str] = field(default_factory=dict)  # by preprocess.penet_rules
    left_index: list[str] = field(default_factory=list)  # indexed before, not in the manifest now

    def line(self) -> str:
        return (f"{len(self.done)} preprocessed, {len(self.skipped)} already stored, "
                f"{len(self.failed)} failed")

    def adjusted_line(self) -> str:
        """One line naming every study that PENet's rules changed, and how ("" if none)."""
        if not self.adjusted:
            return ""
        what = "; ".join(f"{sid}: {how}" for sid, how in sorted(self.adjusted.items()))
        return f"{len(self.adjusted)} study(ies) stored by PENet's rules (preprocess.penet_rules): {what}"


def _hdf5_geometry(row: StudyRow) -> dict:
    if split_hdf5_address(row.path)[1] is None:
        return {}
    return {"slice_thickness": float(row.extras.get("slice_thickness") or 1.25),
            "pixel_spacing": float(row.extras.get("pixel_spacing") or 1.0)}


class ThrottledIndex:
    """Rewrites the index after a finished study, but no more often than every second and
    not before twenty times its own cost has passed (so it takes at most 5% of the time):
    the index grows with the store, so rewriting it after every study would make the
    per-study cost grow with the store. A kill between rewrites loses no study: its file is
    in place, and the next run finds it by its file and indexes it without recomputing."""

    def __init__(self, rewrite, min_interval_s: float = 1.0) -> None:
        self.rewrite, self.min_interval_s = rewrite, min_interval_s
        self.last_cost, self.last_end = 0.0, -math.inf

    def write(self) -> None:
        t0 = time.perf_counter()
        self.rewrite()
        self.last_end = time.perf_counter()
        self.last_cost = self.last_end - t0

    def study_finished(self) -> None:
        if time.perf_counter() - self.last_end >= max(self.min_interval_s, 20 * self.last_cost):
            self.write()


def _first(ids: list[str], n: int = 20) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _studies_leaving(store: str, manifest_ids: set[str]) -> list[str]:
    """Studies the store's index lists that the manifest no longer has: a rerun rewrites
    the index from the manifest, so they leave it (said, never silently)."""
    if not Path(store).is_file():
        return []
    try:
        with Store(store) as s:
            return [sid for sid in s.study_ids if sid not in manifest_ids]
    except VolttlError:  # not a volttl store (yet): nothing indexed to lose
        return []


def study_settings(row: StudyRow, thickness: float, size: int, penet_rules: bool = False) -> str:
    return settings_hash({
        "path": row.path, "series_uid": row.extras.get("series_uid", ""), "label": row.label,
        "split": row.split, "pe_slices": row.pe_slices, "thickness": thickness, "size": size,
        **_hdf5_geometry(row), **({"penet_rules": True} if penet_rules else {}),
    })


def source_stamp(path: str) -> str:
    """The number, total size and latest modification time of a study's source files (a
    file, or every file under a series folder): a study exported again to the same path
    gets another stamp and is preprocessed again."""
    source = Path(source_file(path))
    files = [source] if source.is_file() else [f for f in source.rglob("*") if f.is_file()]
    stats = [f.stat() for f in files]
    return settings_hash({"files": len(stats), "bytes": sum(st.st_size for st in stats),
                          "mtime_ns": max((st.st_mtime_ns for st in stats), default=0)})


def scan_float_hu(hu: np.ndarray) -> tuple[int, bool]:
    """For float HU, one pass a slice at a time (no volume-sized temporaries): how many
    voxels lie outside int16, and whether every voxel is a whole number."""
    outside, whole = 0, True
    for plane in hu:
        outside += int(np.count_nonzero((plane < INT16_MIN) | (plane > INT16_MAX)))
        whole = whole and bool(np.all(plane == np.floor(plane)))
    return outside, whole


@dataclass
class PreparedStudy:
    """A study as the store holds it, built in memory."""

    hu: np.ndarray  # int16 (slices, size, size), canonical voxel order
    meta: StudyMeta
    pe_flags: np.ndarray  # per stored slice
    warnings: list[str]
    adjusted: str = ""  # what preprocess.penet_rules changed ("" when nothing)


def prepare_study(row: StudyRow, thickness: float, size: int, window: int, settings: str = "",
                  penet_rules: bool = False) -> PreparedStudy:
    """Read, check, reorient and resample one study in memory: what `volttl preprocess`
    stores and what `volttl predict` scores, by the same code. ``penet_rules``: a study
    shorter than one window is kept (read padded with air) and pe_slices past its end are
    dropped, as PENet does with its own dataset; otherwise both are refused."""
    vol = read_study(row.path, row.extras.get("series_uid") or None, **_hdf5_geometry(row))
    source, warnings, adjusted = vol.geometry, list(vol.notes), []
    pe_slices = list(row.pe_slices)
    outside = [p for p in pe_slices if p >= source.shape[0]]
    if outside and penet_rules:
        pe_slices = [p for p in pe_slices if p < source.shape[0]]
        adjusted.append(f"pe_slices {format_slices(outside)} past its {source.shape[0]} slices dropped "
                        f"({len(pe_slices)} kept)")
    elif outside:
        raise StudyReadError(f"{row.path}: pe_slices {format_slices(outside)} lie outside the study's "
                             f"{source.shape[0]} slices (0-{source.shape[0] - 1})")
    clipped, whole = scan_float_hu(vol.hu) if vol.hu.dtype.kind == "f" else (0, False)
    if clipped:
        warnings.append(f"{clipped} voxels outside the int16 range [{INT16_MIN}, {INT16_MAX}] HU "
                        "were clipped to it")
    try:
        vol, canonical_to_source = to_canonical(vol)
    except OrientationError as exc:
        raise StudyReadError(f"{row.path}: {exc}") from None
    if pe_slices and canonical_to_source[2, 2] == 0:
        raise StudyReadError(f"{row.path}: pe_slices count along the file's third voxel axis, which is not "
                             "the patient's head-foot axis here; give pe_slices for an axial volume")
    # whole-number float HU (most NIfTI and NRRD CT) go through int16 as DICOM pixels do, so
    # a study resizes identically whichever format it came in
    hu = vol.hu.astype(np.int16) if whole and not clipped else vol.hu
    geo = vol.geometry
    stored, grid = resample_to_store(hu, geo.spacing[2], thickness, size)
    if grid.num_slices < window and penet_rules:
        adjusted.append(f"{grid.num_slices} slice(s), shorter than one {window}-slice window: "
                        "padded with air")
    elif grid.num_slices < window:
        raise StudyReadError(f"{row.path}: {geo.shape[0]} slice(s) of {geo.spacing[2]:g} mm give "
                             f"{grid.num_slices} stored slice(s) of {thickness:g} mm; at least one window "
                             f"of real data ({window} slices, {window * thickness:g} mm) is needed")
    stored_to_source = canonical_to_source @ grid.stored_to_original()
    source_k = stored_to_source[2, 2] * np.arange(grid.num_slices) + stored_to_source[2, 3]
    flags = pe_flags_on_stored_grid(pe_slices, source.shape[0], source_k)
    meta = StudyMeta(
        study_id=row.study_id, label=row.label, split=row.split,
        pe_slices=np.flatnonzero(flags), pe_slices_original=np.asarray(pe_slices, dtype=np.int64),
        source=row.path, source_kind=vol.source_kind,
        series_uid=row.extras.get("series_uid") or vol.series_uid,
        settings=settings, slice_thickness=thickness, size=size, original=source,
        stored_to_original=stored_to_source, adjusted="; ".join(adjusted))
    return PreparedStudy(stored, meta, flags, warnings, meta.adjusted)


def process_study(row: StudyRow, store: str, thickness: float, size: int, window: int,
                  settings: str, stamp: str = "", penet_rules: bool = False
                  ) -> tuple[StudyRecord, list[str]]:
    """Prepare one study and write it to the store (in a worker process); returns its
    index record and warnings for the user. ``stamp``: :func:`source_stamp`, taken before
    reading, so a source changed while it was read is read again next time."""
    study = prepare_study(row, thickness, size, window, settings, penet_rules)
    study.meta.source_stamp = stamp
    write_study(store, study.hu, study.meta, window)
    record = StudyRecord(row.study_id, row.split, row.label, study.pe_flags, settings, stamp,
                         study.adjusted)
    return record, study.warnings


Outcome = tuple[str, StudyRecord | None, str | None, list[str]]


def _run_one(args) -> Outcome:
    """One study, never raising: (id, record or None, error or None, warnings)."""
    row = args[0]
    try:
        rec, warnings = process_study(*args)
        return row.study_id, rec, None, warnings
    except StudyReadError as exc:
        return row.study_id, None, str(exc), []
    except MemoryError:
        return row.study_id, None, f"{row.path}: out of memory", []
    except Exception as exc:  # keep the other studies going; report this one
        return row.study_id, None, f"{row.path}: {type(exc).__name__}: {exc}", []


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the process that started it dies, so a
    killed `volttl preprocess` leaves no orphaned workers behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker(conn, args) -> None:
    _die_with_parent()
    # Ctrl-C goes to the whole process group: the main process stops the run with one line,
    # and its workers die with it (above); none prints a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker()
    if os.environ.get("VOLTTL_FAULT_KILL_WORKER") == args[0].study_id:  # crash tests: an OOM kill
        os.kill(os.getpid(), signal.SIGKILL)
    conn.send(_run_one(args))
    conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (likely out of memory)" if -exitcode == signal.SIGKILL else ""
        return f"its worker process was killed by {name}{hint}"
    return f"its worker process exited with code {exitcode} before reporting"


def run_isolated(jobs: list, workers: int, finish) -> None:
    """Each study in its own worker process, ``workers`` at a time. A worker that dies
    (out-of-memory kill, crash in a native library) fails only its own study, named with
    the cause; the other studies go on."""
    ctx = multiprocessing.get_context(POOL_START_METHOD)
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < workers:
            args = pending.pop(0)
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(send, args), daemon=True)
            proc.start()
            send.close()
            running[receive] = (proc, args)
        for receive in mp_connection.wait(list(running)):
            proc, args = running.pop(receive)
            try:
                outcome = receive.recv()
            except EOFError:  # the worker died without a word
                proc.join()
                row = args[0]
                outcome = (row.study_id, None, f"{row.path}: {_death(proc.exitcode)}", [])
            receive.close()
            proc.join()
            finish(*outcome)


def _fault_point(where: str, finished: int) -> None:
    """Crash tests: ``VOLTTL_FAULT_KILL=<where>:<n>`` kills this process with SIGKILL at
    ``where`` once ``n`` studies have finished; ``VOLTTL_FAULT_INTERRUPT=<where>:<n>``
    sends SIGINT to its whole process group there, as a terminal's Ctrl-C does, with
    workers still running. A test then stops it at a known point, whatever the timing."""
    if os.environ.get("VOLTTL_FAULT_KILL") == f"{where}:{finished}":
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("VOLTTL_FAULT_INTERRUPT") == f"{where}:{finished}":
        os.killpg(os.getpgrp(), signal.SIGINT)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one study per process: no oversubscription
    logging.getLogger().setLevel(logging.WARNING)


def preprocess(cfg: Config, progress: bool = True) -> PreprocessSummary:
    """Preprocess every study of ``cfg.data.manifest`` into ``cfg.data.store``: the step
    `volttl preprocess` and a pipeline's ``preprocess`` step both run."""
    for key, what in (("manifest", "the manifest CSV to read"), ("store", "the HDF5 store to write")):
        if not getattr(cfg.data, key):
            raise ManifestError(f"data.{key} is not set: give {what} in the config or with --set")
    p = cfg.preprocess
    rows = read_manifest(cfg.data.manifest, check_paths=False)  # a missing study fails alone
    # window labels are learnt from the training positives' slices only; validation and test
    # positives without slices are scored at study level (their windows' labels are unknown)
    unlabelled = [r.study_id for r in rows if r.label == 1 and not r.pe_slices and r.split == "train"]
    if unlabelled and cfg.data.labels == "slices":
        raise ManifestError(f"{cfg.data.manifest}: {len(unlabelled)} training positive study(ies) "
                            f"without pe_slices ({_first(unlabelled)}); with data.labels: slices every "
                            "window of them would be labelled negative. Give their pe_slices, or set "
                            "data.labels: study to learn from study labels alone")
    study_level = [r for r in rows if r.label == 1 and not r.pe_slices and r.split != "train"]
    if study_level:
        log.info("%d validation/test positive study(ies) without pe_slices: scored at study level; "
                 "window-level metrics leave them out", len(study_level))
    store = cfg.data.store
    Path(store).parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(store):
        log.info("removed %s, left by a killed run", stale.name)
    summary = PreprocessSummary()
    summary.left_index = _studies_leaving(store, {r.study_id for r in rows})
    if summary.left_index:
        log.warning("%d study(ies) in %s are not in the manifest and leave its index (their files stay): %s",
                    len(summary.left_index), store, _first(summary.left_index))
    records: dict[str, StudyRecord] = {}
    todo = []
    for row in rows:
        if not Path(source_file(row.path)).exists():  # named before any work, the rest go on
            summary.failed[row.study_id] = f"{row.path}: no such file or folder"
            continue
        settings = study_settings(row, p.slice_thickness, p.size, p.penet_rules)
        stamp = source_stamp(row.path)
        rec = read_record(store, row.study_id)
        changed = rec is not None and rec.source_stamp not in ("", stamp)  # "": stored before stamps
        if changed:
            log.info("%s: %s changed since it was stored; preprocessing it again", row.study_id, row.path)
        if rec is not None and rec.settings == settings and not changed:
            records[row.study_id] = rec
            summary.skipped.append(row.study_id)
            if rec.adjusted:
                summary.adjusted[row.study_id] = rec.adjusted
        else:
            todo.append((row, store, p.slice_thickness, p.size, p.window, settings, stamp, p.penet_rules))
    config_yaml = config_to_yaml(cfg)

    def reindex() -> None:
        done = [records[r.study_id] for r in rows if r.study_id in records]
        write_index(store, done, p.window, p.train_stride, p.min_pe_slices, config_yaml)

    index = ThrottledIndex(reindex)
    index.write()
    bar = progress_bar(total=len(todo), desc="preprocess", unit="study", disable=not progress)

    def finish(sid: str, rec: StudyRecord | None, err: str | None, warnings: list[str]) -> None:
        for w in warnings:
            summary.warnings.append(f"{sid}: {w}")
        if rec is not None:
            records[sid] = rec
            summary.done.append(sid)
            if rec.adjusted:
                summary.adjusted[sid] = rec.adjusted
            _fault_point("before-index", len(summary.done))
            index.study_finished()
            _fault_point("after-index", len(summary.done))
        else:
            summary.failed[sid] = err or "unknown error"
        bar.update(1)

    if p.workers <= 1 or len(todo) <= 1:
        for args in todo:
            finish(*_run_one(args))
    else:
        run_isolated(todo, p.workers, finish)
    index.write()
    bar.close()
    return summary
