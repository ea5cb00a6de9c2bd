"""The predict step (`volttl predict --run RUN PATH... --out DIR`): score new scans, no
manifest or store.

Each study (a DICOM series folder, a NIfTI or NRRD file, or every such study found in a
folder) is prepared in memory by the same code `volttl preprocess` stores with, using the
run's own settings, then scored as `volttl evaluate` scores a stored study: its
non-overlapping windows, centre crop, the run's aggregation (max or mean) of the window
probabilities. Unless ``cam=False`` the Grad-CAM overlays of `volttl cam` are written
beside. One failing study is named and the others complete.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

from volttl.config import check_reading_overrides
from volttl.errors import VolttlError
from volttl.inference import TrainedRun
from volttl.io.studies import ITK_SUFFIXES
from volttl.manifests.schema import StudyRow
from volttl.outputs.folders import PredictDir, RunDir
from volttl.outputs.records import write_text_atomically, writing_alone
from volttl.preprocess.prepare import PreparedStudy, prepare_study
from volttl.progress import progress_bar
from volttl.study_result import StudyResult, csv_columns, study_result

log = logging.getLogger("volttl.predict.step")
IMAGE_SUFFIXES = (".nii", ".nii.gz", *ITK_SUFFIXES)
NOT_DICOM = {".txt", ".json", ".xml", ".csv", ".md", ".png", ".jpg", ".jpeg", ".pdf", ".zip"}


class PredictError(VolttlError):
    """Nothing to predict: no study found at the given paths."""


def _is_image(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def _holds_dicom(folder: Path) -> bool:
    """A folder with files at its top level that are not images or known non-DICOM files."""
    return any(f.is_file() and not f.name.startswith(".") and not _is_image(f)
               and f.suffix.lower() not in NOT_DICOM for f in folder.iterdir())


def find_studies(paths: list[str | Path]) -> list[tuple[str, Path]]:
    """``(study id, path)`` for every study at ``paths``: image files as they are, a folder
    with DICOM files as one series, any other folder searched for studies inside. Ids are
    the file or folder names, made unique with a suffix where two collide."""
    found: list[Path] = []
    visited: set[Path] = set()  # real paths: a symlink loop or a second link is scored once

    def visit(path: Path) -> None:
        real = path.resolve()
        if real in visited:
            return
        visited.add(real)
        if path.is_file():
            if _is_image(path):
                found.append(path)
        elif path.is_dir():
            if _holds_dicom(path):  # a series (the reader walks its subfolders), and any image
                found.append(path)  # file beside its slices, so that none is skipped quietly
                for f in sorted(path.iterdir()):
                    if f.is_file() and _is_image(f) and f.resolve() not in visited:
                        visited.add(f.resolve())
                        found.append(f)
            else:
                for child in sorted(path.iterdir()):
                    if not child.name.startswith("."):
                        visit(child)

    for p in paths:
        p = Path(p)
        if not p.exists():
            raise PredictError(f"{p}: no such file or folder")
        visit(p)
    if not found:
        raise PredictError(f"no DICOM series, NIfTI or NRRD file found in {', '.join(map(str, paths))}")
    out, seen = [], {}
    for path in found:
        name = readable(path.name)  # undecodable bytes of a file name: as \xNN text
        for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}_{seen[name]}", path))
    return out


def readable(name: str | Path) -> str:
    """A file name as text that UTF-8 files, JSON and plots take: bytes that are not UTF-8
    (a name from another locale, read by Python as surrogates) become ``_xNN``."""
    raw = os.fsencode(str(name))
    return raw.decode("utf-8", "backslashreplace").replace("\\x", "_x")


def predict_step(source: str | Path, paths: list[str | Path], out: str | Path, package: bool = False,
                 cam: bool = True, dicom: bool = False, overrides: list[str] | None = None,
                 progress: bool = True, seed: int | None = None) -> tuple[list[dict], dict[str, str]]:
    """`volttl predict`: score every study at ``paths`` with a run's best model (``source``
    a run folder; ``seed`` picks a repeat group's run) or an exported model (``package``,
    every file checked against its checksum first); writes predictions.csv and
    predictions.json (and overlays unless ``cam`` is false, and with ``dicom`` their DICOM
    objects) to ``out``. Returns the records and the failures (study id -> one-line reason)."""
    if dicom and not cam:
        raise PredictError("--dicom writes the Grad-CAM as DICOM objects: drop --no-cam")
    if package and seed is not None:
        raise PredictError(f"{source}: --seed picks one run of a repeat group; a model package holds one "
                           "model")
    if package:
        from volttl.export.package import verify_package

        verify_package(source)  # every file as exported, before anything is scored
        run_dir = Path(source)
    else:
        run_dir = RunDir(source).one_run(seed).path
    overrides = [*(overrides or []), *(["cam.dicom=true"] if dicom else [])]
    check_reading_overrides(overrides, str(run_dir))  # refused before the output folder is made
    folder = PredictDir(out)
    with writing_alone(folder.path, folder.lock.name, "volttl predict"):
        return _score_scans(run_dir, paths, folder.path, cam, overrides, progress)


def _score_scans(run_dir: Path, paths: list[str | Path], out: Path, cam: bool, overrides: list[str] | None,
                 progress: bool) -> tuple[list[dict], dict[str, str]]:
    """Score (and with ``cam`` explain) every study at ``paths`` with the run at ``run_dir``."""
    from volttl.explain.gradcam import WindowGradCAM
    from volttl.explain.step import EMPTY_MAP, cam_study, score_and_map, windows_per_study

    run = TrainedRun.open(run_dir, overrides)
    cfg = run.cfg
    run.note_missing_decision(log)
    run.note_synthetic_training(log)
    studies = find_studies(paths)
    out.mkdir(parents=True, exist_ok=True)
    grad_cam = None
    if cam:
        grad_cam = WindowGradCAM(run.model, cfg.cam.target_layer, run.device, cfg.cam.method, run.numerics)
    p = cfg.preprocess
    records, results, failed = [], [], {}
    for sid, path in progress_bar(studies, desc="predict", unit="study", disable=not progress):
        try:
            study: PreparedStudy = prepare_study(StudyRow(sid, str(path), 0, "test", []), p.slice_thickness,
                                                 p.size, p.window)
        except VolttlError as exc:
            failed[sid] = str(exc)
            continue
        with progress_bar(total=windows_per_study(study.hu.shape[0], cfg, cam), desc=f"  {sid}",
                          unit="window", leave=False, disable=not progress) as bar:
            if grad_cam is not None:  # one pass scores the windows and maps them (cam.stride 0)
                score, stitched = score_and_map(run, grad_cam, study.hu, bar.update)
            else:
                score = run.score_study(study.hu, on_batch=bar.update)
            result = study_result(run, sid, readable(path), None, study.meta, score, study.hu.shape[0])
            record = result.to_json()
            for w in study.warnings:
                log.warning("%s: %s", sid, w)
            if grad_cam is not None:
                try:
                    overlay = cam_study(study.meta, study.hu, stitched, grad_cam, cfg, out, score, result)
                except OSError as exc:  # a full disk or a read-only file: the prediction still stands
                    record["files"], record["peak_ras_mm"] = {}, None
                    record["overlay_error"] = f"{exc.filename or out}: {exc.strerror or exc}"
                    log.warning("%s: overlay not written (%s); its prediction is kept", sid,
                                record["overlay_error"])
                else:
                    record["files"] = overlay["files"]
                    record["peak_ras_mm"] = overlay["peak_ras_mm"]
                    if overlay["peak_ras_mm"] is None:
                        log.warning("%s: %s", sid, EMPTY_MAP)
        records.append(record)
        results.append(result)
        _write(results, records, out)  # after every study: a later failure keeps the predictions made so far
    _write(results, records, out)  # also when nothing was scored: the files say so
    return records, failed


def _write(results: list[StudyResult], records: list[dict], out: Path) -> None:
    """predictions.json (``records``: each study's result with its overlay files) and
    predictions.csv (one value per cell, :meth:`StudyResult.csv_row`), each replaced whole,
    so an interrupted write never leaves a file cut short."""
    folder = PredictDir(out)
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=csv_columns())  # a key outside the columns is an error
    w.writeheader()
    w.writerows(r.csv_row() for r in results)
    try:
        write_text_atomically(folder.json, json.dumps(records, indent=2))
        write_text_atomically(folder.csv, table.getvalue())
    except OSError as exc:
        reason = exc.strerror or exc
        raise PredictError(f"{exc.filename or out}: predictions not written ({reason})") from None
