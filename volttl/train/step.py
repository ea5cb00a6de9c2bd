"""The train step, as `volttl train` and a pipeline's ``train`` step both run it: the
checks before any work, then one run or a repeat group, resumed where a kill left it.

One function owns the pre-checks and the single-or-repeats choice, so the command line
and the pipelines cannot drift apart (they had: the pipeline skipped the pre-checks).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from volttl.config import Config
from volttl.errors import VolttlError

log = logging.getLogger("volttl.train")


class TrainStepError(VolttlError):
    """Training cannot start: a missing store or checkpoint, a device that is not there."""


@dataclass
class TrainOutcome:
    """What a train step did: the run (or group) folder and its best validation AUROC
    (the mean over seeds for a group, with its std and count)."""

    run_dir: Path
    study_auroc: float
    std: float | None = None  # a repeat group only
    seeds: int = 1
    epoch: int | None = None  # the best epoch of a single run
    skipped: bool = False  # a finished run reused as it was

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.run_dir} has finished its epochs"
        if not math.isfinite(self.study_auroc):
            return ("no validation study AUROC (the validation split holds one class): best.pt is the "
                    "last epoch's weights")
        if self.std is not None:
            return (f"best validation study AUROC {self.study_auroc:.3f} +- {self.std:.3f} over "
                    f"{self.seeds} seeds")
        at = f" at epoch {self.epoch + 1}" if self.epoch is not None else ""
        return f"best validation study AUROC {self.study_auroc:.3f}{at}"


def check_before_training(cfg: Config, run_dir: Path, resume: bool) -> None:
    """Everything that would stop training, checked before any work is done or written."""
    from volttl.data import WindowDataset
    from volttl.preprocess.store import open_store
    from volttl.runs import resolve_device

    open_store(cfg.data.store).close()  # a missing or foreign store
    WindowDataset.from_config(cfg, "train")  # a crop larger than the stored slices
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise TrainStepError(f"{cfg.model.pretrained}: pretrained checkpoint not found")
    resolve_device(cfg.runtime.device)  # a device that is not there
    if resume and not run_dir.is_dir():
        raise TrainStepError(f"{run_dir}: no run to resume (drop --resume to start one)")


def _note_unused_slices(cfg: Config) -> None:
    """With study labels the manifest's pe_slices are not used for training: said when
    training positives have them, so that a cohort with slices for some studies does not
    lose them unnoticed."""
    import numpy as np

    from volttl.preprocess.store import Store

    with Store(cfg.data.store) as store:
        table = store.windows("train", train=True)
        with_slices = np.unique(table["study"][table["pe_slices"] > 0])
        positives = sum(int(store.labels[i] == 1) for i in store.studies_in("train"))
    if len(with_slices):
        log.warning("data.labels: study: the pe_slices of %d of the %d training positive(s) are not used; "
                    "training learns from study labels%s (data.labels: slices uses them, and needs them "
                    "for every training positive)", len(with_slices), positives,
                    " and pseudo slice labels" if cfg.data.pseudo_slices else "")


def train_step(cfg: Config, run_dir: str | Path, resume: bool, progress: bool = True,
               reuse_finished: bool = False) -> TrainOutcome:
    """Check, then train ``train.repeats`` seeds into ``run_dir`` (a group of
    ``seed<S>/`` runs) or one run; with ``resume`` an interrupted run continues. With
    ``reuse_finished`` (pipelines) a finished single run is reused as it is after the checks
    of :func:`volttl.runs.check_resumable`; without it (``volttl train --resume``) it is
    reopened, which records a changed runtime setting in its log."""
    from volttl.runs import RunDir, check_resumable
    from volttl.train.loop import train_run
    from volttl.train.repeats import train_repeats

    run = RunDir(run_dir)
    check_before_training(cfg, run.path, resume)
    if cfg.data.labels == "study":
        _note_unused_slices(cfg)
    if cfg.data.labels == "study" and not cfg.data.pseudo_slices:
        log.warning("data.labels: study: the Grad-CAM maps of a model trained from bags alone do not point "
                    "at the embolus; data.pseudo_slices: true trains a second round from each training "
                    "positive's best window that does (twice the training time)")
    if cfg.train.repeats > 1:
        summary = train_repeats(cfg, run.path, resume=resume, progress=progress)
        auroc = summary["val_study_auroc"]
        return TrainOutcome(run.path, auroc["mean"], auroc["std"], auroc["n"])
    if reuse_finished and run.finished_epochs() >= cfg.train.epochs:  # only with these settings and data
        check_resumable(run.path, cfg)
        return TrainOutcome(run.path, float("nan"), skipped=True)
    best = train_run(cfg, run.path, resume=resume and run.last.exists(), progress=progress)
    return TrainOutcome(run.path, best.get("study_auroc", float("nan")), epoch=best.get("epoch"))
