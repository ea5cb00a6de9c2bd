"""One study's result, as every file that reports one writes it: predict's predictions.csv
and predictions.json, cam's ``<study>_cam.json`` and evaluate's ``predictions_<split>.csv``
are all written from :class:`StudyResult`, so a field has one name everywhere, and a new
field is one edit here that every one of them picks up.

The CSV has one value per cell: a field holding a list (the best window's slices, its
centre) is spread over columns of its own (:data:`SPREAD`), and the per-window lists stay
in the JSON files only (:data:`JSON_ONLY`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from volttl.inference import StudyScore, TrainedRun
    from volttl.preprocess.store import StudyMeta

SPREAD = {  # a list field -> the CSV columns its values go to
    "best_window_source_slices": ("best_window_first_source_slice", "best_window_last_source_slice"),
    "best_window_centre_ras_mm": ("best_window_centre_r_mm", "best_window_centre_a_mm",
                                  "best_window_centre_s_mm"),
    "best_window_stored_slices": ("best_window_first_stored_slice", "best_window_last_stored_slice"),
}
JSON_ONLY = ("window_starts", "window_probabilities")


@dataclass
class StudyResult:
    """A study scored by a trained model: where it came from, its label when known, the
    run's probability and call, its best window (where it lies in the scan), every
    window's probability, and the model that scored it."""

    study_id: str
    source: str
    label: int | None  # None for a scan with no label (predict)
    probability: float  # the run's aggregate of its window probabilities, calibrated when the run is
    predicted_label: int | None  # None while the run has no operating point
    threshold: float | None
    calibration_temperature: float | None
    aggregate: str
    best_window_stored_slices: list[int]
    best_window_centre_ras_mm: list[float]
    best_window_source_slices: list[int] | None  # None where no slice range describes the window
    best_window_padding: float
    window_starts: list[int]  # stored slices where the evaluation windows start
    window_probabilities: list[float]  # the model's own, before calibration
    model: str
    strategy: str
    cut: str
    run: str

    def to_json(self) -> dict:
        """The record for a JSON file: every field, probabilities to 6 decimals."""
        out = dataclasses.asdict(self)
        out["probability"] = round(float(self.probability), 6)
        out["window_probabilities"] = [round(float(p), 6) for p in self.window_probabilities]
        return out

    def csv_row(self) -> dict:
        """One value per cell under :func:`csv_columns`; empty where there is no value."""
        row = {}
        for key, value in self.to_json().items():
            if key in JSON_ONLY:
                continue
            if key in SPREAD:
                row.update(zip(SPREAD[key], value or [None] * len(SPREAD[key]), strict=True))
            else:
                row[key] = value
        return {k: "" if v is None else v for k, v in row.items()}


def csv_columns() -> list[str]:
    """The CSV header of :class:`StudyResult`: its fields in order, list fields spread,
    per-window lists left out."""
    out = []
    for f in dataclasses.fields(StudyResult):
        if f.name not in JSON_ONLY:
            out.extend(SPREAD.get(f.name, (f.name,)))
    return out


def study_result(run: TrainedRun, study_id: str, source: str | Path, label: int | None, meta: StudyMeta,
                 score: StudyScore, stored_slices: int) -> StudyResult:
    """The result of ``score`` (a study scored by ``run``, :meth:`TrainedRun.score_study`),
    with where its best window lies in the scan (:func:`volttl.inference.window_location`)."""
    from volttl.inference import window_location

    cfg = run.cfg
    t = cfg.transfer
    where = window_location(meta, score.best_window, run.input, stored_slices)
    return StudyResult(
        study_id=study_id, source=str(source), label=None if label is None else int(label),
        probability=float(score.probability), predicted_label=score.predicted_label,
        threshold=score.threshold,
        calibration_temperature=run.decision.temperature if run.decision else None,
        aggregate=cfg.eval.aggregate, **where,
        window_starts=[int(s) for s in score.window_starts],
        window_probabilities=[float(p) for p in score.window_probabilities],
        model=cfg.model.name, strategy=t.strategy, cut=t.cut if t.strategy != "ftl" else "",
        run=str(run.path))
