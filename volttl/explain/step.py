"""The cam step (`volttl cam`): a run's best model -> Grad-CAM overlays on each study's original CT grid.

Per study: ``<study>_cam.nii.gz`` (values in [0, 1], stored as uint8 with scl_slope 1/255
unless ``cam.dtype: float32``; the original CT's exact shape and affine, mm units,
cal_min/cal_max 0 and 1), ``<study>_ct.nii.gz`` (by default when the source was not
NIfTI: DICOM, NRRD, HDF5; ``cam.write_ct: always`` for every source), a PNG
preview through the map's peak, a 3D Slicer scene ``<study>_scene.mrml`` that opens the
overlay over its CT (the peak as ``<study>_peak.mrk.json``), and ``<study>_cam.json``
with the study probability and the peak in world (RAS) millimetres; ``cam_summary.json`` for all of them, and
``localisation.json`` when the manifest has lesion masks (the synthetic cohort). Only the
store's geometry and the source path are used; no DICOM tag is read beyond what the
reader needs for pixels and geometry.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volttl.config import config_to_dict, with_overrides
from volttl.data.input_spec import InputSpec
from volttl.errors import VolttlError
from volttl.explain.gradcam import StudyCAM, WindowGradCAM, cam_window_starts, stitch_study
from volttl.explain.localisation import write_localisation
from volttl.explain.preview import write_preview
from volttl.explain.regrid import to_original_grid
from volttl.explain.scene import write_scene
from volttl.inference import StudyScore, TrainedRun, evaluation_starts
from volttl.io.addresses import split_hdf5_address
from volttl.io.geometry import Geometry
from volttl.io.nifti import write_nifti, write_unit_map
from volttl.io.studies import StudyReadError, read_study
from volttl.outputs.folders import CamDir, RunDir
from volttl.outputs.provenance import content_stamp, file_stamp, forget_inputs, made_from, record_inputs
from volttl.preprocess.store import Store, StudyMeta
from volttl.progress import progress_bar
from volttl.study_result import StudyResult, study_result

log = logging.getLogger("volttl.cam")


EMPTY_MAP = ("all-zero map: no window's positive logit rose with the target layer's features (an "
             "untrained or nearly constant model, or one that sees no PE evidence here); check the run's "
             "validation AUROC, or try an earlier cam.target_layer")


def overlay_on_original(stored_map: np.ndarray, meta: StudyMeta) -> tuple[np.ndarray, Geometry]:
    """A map on the stored grid -> the same map on the original CT grid, in [0, 1]."""
    geo = meta.original
    return np.clip(to_original_grid(stored_map, meta.stored_to_original, geo.shape), 0, 1), geo


def _read_source_ct(meta: StudyMeta) -> np.ndarray | None:
    """The original HU volume, or None (with a warning) when the source is gone."""
    geo = meta.original
    is_hdf5 = split_hdf5_address(meta.source)[1] is not None
    hdf5 = {"slice_thickness": geo.spacing[2], "pixel_spacing": geo.spacing[0]} if is_hdf5 else {}
    try:
        vol = read_study(meta.source, meta.series_uid or None, **hdf5)
    except StudyReadError as exc:
        log.warning("%s: CT not written, preview drawn from the store (%s)", meta.study_id, exc)
        return None
    if tuple(vol.hu.shape) != geo.shape:
        raise VolttlError(f"{meta.source}: the study now has shape {vol.hu.shape}, the store recorded "
                          f"{geo.shape}; preprocess it again")
    return vol.hu


def windows_per_study(slices: int, cfg, cam: bool = True) -> int:
    """The windows a study of ``slices`` stored slices goes through (the total of the
    per-study progress bar: a 300-slice study on a CPU takes minutes): the evaluation
    windows it is scored on, which also give the map at the default ``cam.stride`` 0; with
    ``cam`` at another stride, Grad-CAM's sliding windows as well."""
    window = cfg.preprocess.window
    n = len(evaluation_starts(slices, window))
    return n + (len(cam_window_starts(slices, window, cfg.cam.stride)) if cam and cfg.cam.stride else 0)


def score_and_map(run: TrainedRun, cam: WindowGradCAM, hu: np.ndarray, on_batch=None
                  ) -> tuple[StudyScore, StudyCAM]:
    """A study's score and its stitched map. At the default ``cam.stride`` 0 the map's
    windows are the scoring windows, batched as scoring batches them, so one pass gives
    both (the probabilities are the ones :meth:`TrainedRun.score_study` gives); at another
    stride the study is scored on its own windows first."""
    cfg = run.cfg
    score = None if cfg.cam.stride == 0 else run.score_study(hu, on_batch=on_batch)
    stitched = stitch_study(hu, cam, run.input, cfg.cam.stride, cfg.cam.batch_size, cfg.cam.stitch,
                            cfg.cam.blend, on_batch)
    if score is None:
        score = run.study_score(stitched.starts, stitched.window_probs)
    return score, stitched


def select_studies(store: Store, studies: list[str] | None, split: str) -> list[str]:
    if studies:
        unknown = [s for s in studies if s not in store.study_ids]
        if unknown:
            raise VolttlError(f"{store.path}: no study {', '.join(unknown)} in the store")
        return list(studies)
    return [store.study_ids[i] for i in store.studies_in(split)]


def cam_study(meta: StudyMeta, hu: np.ndarray, result: StudyCAM, cam: WindowGradCAM, cfg, out: Path,
              score: StudyScore, study: StudyResult) -> dict:
    """Everything `volttl cam` writes for one study (its stored HU ``hu``, metadata and
    stitched map, :func:`score_and_map`); returns its JSON record: the study's result
    (``study``, as predict reports it, from ``score``) and the map's own fields."""
    sid = meta.study_id
    cam_map, geo = overlay_on_original(result.stored_map, meta)
    if cam_map.max() > 0:  # interpolation onto the original grid can shave the peak
        cam_map /= cam_map.max()
    folder = CamDir(out)
    write_unit_map(cam_map, geo, folder.cam(sid), cfg.cam.dtype)
    files = {"cam": folder.cam_name(sid)}
    wanted = cfg.cam.write_ct == "always" or (cfg.cam.write_ct == "auto" and meta.source_kind != "nifti")
    ct = _read_source_ct(meta) if wanted else None
    if ct is not None:
        write_nifti(np.clip(np.rint(ct), -32768, 32767).astype(np.int16), geo, folder.ct(sid))
        files["ct"] = folder.ct_name(sid)
    k, j, i = (int(v) for v in np.unravel_index(int(np.argmax(cam_map)), cam_map.shape))
    peak_ras = (geo.affine_ras() @ np.array([i, j, k, 1.0]))[:3]
    has_peak = bool(cam_map.max() > 0)  # an all-zero map: nothing raised the positive logit
    probability = score.probability
    if cfg.cam.preview:  # drawn on the stored grid (canonical LPS): no need to read the CT again
        stored_peak = tuple(int(v) for v in np.unravel_index(int(np.argmax(result.stored_map)),
                                                             result.stored_map.shape))
        spacing = tuple(float(v) for v in np.linalg.norm(meta.stored_affine_ras[:3, :3], axis=0))
        # no study id in the picture: folders are often named after patients, and the
        # Secondary Capture of --dicom carries this picture's pixels
        write_preview(hu, result.stored_map, stored_peak, spacing, folder.preview(sid),
                      f"p(PE) = {probability:.3f}")
        files["preview"] = folder.preview_name(sid)
    source = Path(meta.source) if meta.source_kind == "nifti" else None  # the CT the overlay sits on
    ct_path = folder.ct(sid) if "ct" in files else source
    scene = write_scene(out, sid, files["cam"], ct_path if ct_path and ct_path.is_file() else None,
                        [float(v) for v in peak_ras] if has_peak else None, probability)
    files["scene"] = scene.name
    if has_peak:
        files["peak"] = folder.peak(sid).name
    dicom_error = None
    if cfg.cam.dicom:
        dicom = _dicom_objects(meta, cam_map, score, cfg, folder, files, hu.shape[0])
        dicom_error = dicom.pop("dicom_error", None)
        files.update(dicom)
    record = {
        **study.to_json(),
        "peak_ras_mm": [round(float(v), 3) for v in peak_ras] if has_peak else None,
        "peak_voxel_ijk": [i, j, k] if has_peak else None,
        "target_layer": cam.target_layer, "method": cam.method,
        # 0: the scoring windows, one pass; else the slices between sliding windows
        "stride": cfg.cam.stride, "stitch": cfg.cam.stitch,
        "blend": cfg.cam.blend,
        "files": files,
        **({"dicom_error": dicom_error} if dicom_error else {}),
    }
    folder.record(sid).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def _dicom_objects(meta: StudyMeta, cam_map: np.ndarray, score: StudyScore, cfg, folder, files: dict,
                   stored_slices: int) -> dict:
    """The DICOM objects of ``cam.dicom`` for a DICOM source; for any other source, a
    note that there are none."""
    from volttl.explain.dicom_objects import DicomOutputError, write_dicom_objects
    from volttl.inference import window_location

    if meta.source_kind != "dicom":
        kind = {"nifti": "NIfTI", "itk": "an ITK image (NRRD, MHA)"}.get(meta.source_kind, meta.source_kind)
        log.warning("%s: no DICOM objects: the source is %s, not DICOM", meta.study_id, kind)
        return {}
    t = cfg.transfer
    where = window_location(meta, score.best_window, InputSpec.of(cfg), stored_slices)
    cut = f" cut after {t.cut}" if t.strategy != "ftl" else ""
    model = f"{cfg.model.name} {t.strategy.upper()}{cut}"
    record = {"probability": score.probability, "predicted_label": score.predicted_label,
              "threshold": score.threshold, "model_text": model}
    preview = folder.path / files["preview"] if "preview" in files else None
    centre = where["best_window_centre_ras_mm"]
    try:
        return write_dicom_objects(meta, cam_map, record, folder.path, preview, centre,
                                   cfg.cam.dicom_compression)
    except DicomOutputError as exc:  # this study's objects only: its overlay and score stand
        log.warning("%s: DICOM objects not written: %s", meta.study_id, exc)
        return {"dicom_error": str(exc)}


@dataclass
class CamOutcome:
    """What the cam step did: the run whose maps these are, the output folder, one record
    per study, and whether an earlier result made from the same inputs was kept."""

    run: Path
    out: Path
    records: list[dict]
    skipped: bool = False

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {CamDir(self.out).summary.name} exists"
        return f"{len(self.records)} overlays in {self.out}"


def cam_inputs(run: RunDir, studies: list[str] | None, split: str, overrides: list[str] | None) -> dict:
    """What a cam folder is made from: the run and its best.pt (size and time), the
    operating point that makes the calls (its content), the studies and the cam settings."""
    cfg = run.read_config()
    cam = config_to_dict(with_overrides(cfg, overrides))["cam"]
    return {"run": str(run.path), "checkpoint": file_stamp(run.best), "operating_point":
            content_stamp(run.operating_point), "studies": studies or None, "split": split, "cam": cam}


def cam_step(run_dir: str | Path, out: str | Path, studies: list[str] | None = None, split: str = "test",
             overrides: list[str] | None = None, progress: bool = True, seed: int | None = None,
             reuse: bool = False) -> CamOutcome:
    """`volttl cam` and a pipeline's ``cam`` step: Grad-CAM overlays for the chosen studies
    (default: the split's) of one run's store. ``seed`` picks a repeat group's run (a group
    without one is refused naming its seeds); with ``reuse`` (pipelines) a folder made from
    the same inputs (:func:`cam_inputs`) is kept as it is."""
    run = RunDir(run_dir).one_run(seed)
    folder = CamDir(out)
    inputs = cam_inputs(run, studies, split, overrides)
    if reuse and made_from(folder.summary, inputs):
        records = json.loads(folder.summary.read_text(encoding="utf-8"))
        return CamOutcome(run.path, folder.path, records, skipped=True)
    forget_inputs(folder.summary)
    records = write_overlays(run.path, folder.path, studies, split, overrides, progress)
    record_inputs(folder.summary, inputs)
    return CamOutcome(run.path, folder.path, records)


def write_overlays(run_dir: Path, out: Path, studies: list[str] | None, split: str,
                   overrides: list[str] | None, progress: bool) -> list[dict]:
    """Grad-CAM overlays for the chosen studies (default: the split's) of a run's store."""
    run = TrainedRun.open(run_dir, overrides)
    cfg = run.cfg
    records = []
    run.note_missing_decision(log)
    with Store(cfg.data.store) as store:
        ids = select_studies(store, studies, split)
        out.mkdir(parents=True, exist_ok=True)
        cam = WindowGradCAM(run.model, cfg.cam.target_layer, run.device, cfg.cam.method, run.numerics)
        for sid in progress_bar(ids, desc="cam", unit="study", disable=not progress):
            meta, hu = store.meta(sid), store.hu(sid)[...]
            with progress_bar(total=windows_per_study(hu.shape[0], cfg), desc=f"  {sid}", unit="window",
                              leave=False, disable=not progress) as bar:
                score, stitched = score_and_map(run, cam, hu, bar.update)
                study = study_result(run, sid, meta.source, meta.label, meta, score, hu.shape[0])
                records.append(cam_study(meta, hu, stitched, cam, cfg, out, score, study))
    CamDir(out).summary.write_text(json.dumps(records, indent=2), encoding="utf-8")
    if Path(cfg.data.manifest).is_file():  # lesion masks in the manifest: localisation.json
        write_localisation(out, cfg.data.manifest, records)
    return records
