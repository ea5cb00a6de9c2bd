"""`volttl preprocess`: every study of the manifest into the store, in parallel.

A failing study is reported with its reason and does not stop the others; studies
already stored with the same settings are skipped; the index is rewritten after each
finished study so that a kill loses nothing that was finished.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from volttl.config import Config, config_to_yaml
from volttl.io.studies import StudyReadError, read_study
from volttl.manifests.schema import StudyRow, read_manifest
from volttl.preprocess.resample import resample_to_store
from volttl.preprocess.store import (
    StudyMeta,
    StudyRecord,
    read_record,
    settings_hash,
    write_index,
    write_study,
)
from volttl.preprocess.windows import pe_flags_on_stored_grid

log = logging.getLogger("volttl.preprocess")
# Workers only decode, resize and write (numpy, pydicom, OpenCV, h5py; never torch), so
# forking is safe where the platform offers it, and saves each worker its imports.
POOL_START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


@dataclass
class PreprocessSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        return (f"{len(self.done)} preprocessed, {len(self.skipped)} already stored, "
                f"{len(self.failed)} failed")


def _hdf5_geometry(row: StudyRow) -> dict:
    if "#" not in row.path:
        return {}
    return {"slice_thickness": float(row.extras.get("slice_thickness") or 1.25),
            "pixel_spacing": float(row.extras.get("pixel_spacing") or 1.0)}


def study_settings(row: StudyRow, thickness: float, size: int) -> str:
    return settings_hash({
        "path": row.path, "series_uid": row.extras.get("series_uid", ""), "label": row.label,
        "split": row.split, "pe_slices": row.pe_slices, "thickness": thickness, "size": size,
        **_hdf5_geometry(row),
    })


def process_study(row: StudyRow, store: str, thickness: float, size: int, window: int,
                  settings: str) -> StudyRecord:
    """Read, resample and store one study; runs in a worker process."""
    vol = read_study(row.path, row.extras.get("series_uid") or None, **_hdf5_geometry(row))
    geo = vol.geometry
    hu, grid = resample_to_store(vol.hu, geo.spacing[2], thickness, size)
    flags = pe_flags_on_stored_grid(row.pe_slices, geo.shape[0],
                                    grid.original_slice_of(np.arange(grid.num_slices)))
    meta = StudyMeta(
        study_id=row.study_id, label=row.label, split=row.split,
        pe_slices=np.flatnonzero(flags), pe_slices_original=np.asarray(row.pe_slices, dtype=np.int64),
        source=row.path, source_kind=vol.source_kind, series_uid=row.extras.get("series_uid") or "",
        settings=settings, slice_thickness=thickness, size=size, original=geo,
        stored_to_original=grid.stored_to_original())
    write_study(store, hu, meta, window)
    return StudyRecord(row.study_id, row.split, row.label, flags, settings)


def _run_one(args) -> tuple[str, StudyRecord | None, str | None]:
    row = args[0]
    try:
        return row.study_id, process_study(*args), None
    except StudyReadError as exc:
        return row.study_id, None, str(exc)
    except MemoryError:
        return row.study_id, None, f"{row.path}: out of memory"
    except Exception as exc:  # keep the other studies going; report this one
        return row.study_id, None, f"{row.path}: {type(exc).__name__}: {exc}"


def _fault_point(where: str, finished: int) -> None:
    """Crash tests: ``VOLTTL_FAULT_KILL=<where>:<n>`` kills this process with SIGKILL at
    ``where`` once ``n`` studies have finished, so a test kills at a known point."""
    if os.environ.get("VOLTTL_FAULT_KILL") == f"{where}:{finished}":
        os.kill(os.getpid(), signal.SIGKILL)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one study per process: no oversubscription
    logging.getLogger().setLevel(logging.WARNING)


def preprocess(cfg: Config, progress: bool = True) -> PreprocessSummary:
    """Preprocess every study of ``cfg.data.manifest`` into ``cfg.data.store``."""
    p = cfg.preprocess
    rows = read_manifest(cfg.data.manifest)
    store = cfg.data.store
    Path(store).parent.mkdir(parents=True, exist_ok=True)
    summary = PreprocessSummary()
    records: dict[str, StudyRecord] = {}
    todo = []
    for row in rows:
        settings = study_settings(row, p.slice_thickness, p.size)
        rec = read_record(store, row.study_id)
        if rec is not None and rec.settings == settings:
            records[row.study_id] = rec
            summary.skipped.append(row.study_id)
        else:
            todo.append((row, store, p.slice_thickness, p.size, p.window, settings))
    config_yaml = config_to_yaml(cfg)

    def reindex() -> None:
        done = [records[r.study_id] for r in rows if r.study_id in records]
        write_index(store, done, p.window, p.train_stride, p.min_pe_slices, config_yaml)

    reindex()
    bar = tqdm(total=len(todo), desc="preprocess", unit="study", disable=not progress)

    def finish(sid: str, rec: StudyRecord | None, err: str | None) -> None:
        if rec is not None:
            records[sid] = rec
            summary.done.append(sid)
            _fault_point("before-index", len(summary.done))
            reindex()
            _fault_point("after-index", len(summary.done))
        else:
            summary.failed[sid] = err or "unknown error"
            tqdm.write(f"FAILED {sid}: {err}")
        bar.update(1)

    if p.workers <= 1 or len(todo) <= 1:
        for args in todo:
            finish(*_run_one(args))
    else:
        ctx = multiprocessing.get_context(POOL_START_METHOD)
        with ProcessPoolExecutor(max_workers=p.workers, mp_context=ctx,
                                 initializer=_init_worker) as pool:
            futures = {pool.submit(_run_one, a): a[0].study_id for a in todo}
            for fut in as_completed(futures):
                try:
                    finish(*fut.result())
                except Exception as exc:  # a worker died (killed, out of memory)
                    finish(futures[fut], None, f"worker failed: {type(exc).__name__}")
    bar.close()
    return summary
