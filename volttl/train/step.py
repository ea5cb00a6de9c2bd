"""The train step, as `volttl train` and a pipeline's ``train`` step both run it: the
checks before any work, then one run or a repeat group, resumed where a kill left it.

One function owns the pre-checks and the single-or-repeats choice, so the command line
and the pipelines cannot drift apart (they had: the pipeline skipped the pre-checks). This
module alone chooses between one run, a repeat group and the pseudo-slice rounds; the
rounds themselves are :mod:`volttl.train.loop` (one round) and :mod:`volttl.train.pseudo`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from volttl.config import Config
from volttl.errors import VolttlError
from volttl.models.checkpoints import read_checkpoint
from volttl.outputs.folders import RunDir
from volttl.outputs.resume import check_resumable
from volttl.train.loop import train_model
from volttl.train.pseudo import train_with_pseudo_slices
from volttl.train.repeats import REPORTED, mean_std, seed_configs

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
    from volttl.numerics import resolve_device
    from volttl.preprocess.store import open_store

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
    of :func:`volttl.outputs.resume.check_resumable`; without it (``volttl train --resume``) it is
    reopened, which records a changed runtime setting in its log."""
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


def train_rounds(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True,
                 stop_after_epoch: int | None = None) -> tuple[dict, torch.nn.Module]:
    """Train one run into ``run_dir``: one round, or with ``data.pseudo_slices`` two (bags,
    then pseudo slice labels). Returns the best validation metrics and the trained model
    (this process's replica)."""
    if cfg.data.pseudo_slices:
        return train_with_pseudo_slices(cfg, Path(run_dir), resume, progress, stop_after_epoch)
    return train_model(cfg, run_dir, resume, progress, stop_after_epoch)


def train_run(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True,
              stop_after_epoch: int | None = None) -> dict:
    """:func:`train_rounds`' best validation metrics."""
    return train_rounds(cfg, run_dir, resume, progress, stop_after_epoch)[0]


def train_repeats(cfg: Config, group_dir: str | Path, resume: bool = False,
                  progress: bool = True) -> dict:
    """Train every seed of the group; returns (and writes) the summary of best validation
    metrics per seed with their mean and std."""
    group = RunDir(group_dir)
    configs = seed_configs(cfg)
    runs = [group.seed(c.train.seed) for c in configs]
    log.info("train.repeats %d: training %d models, one per seed (%s), into %s; each takes as long as "
                "a single run", len(configs), len(configs), ", ".join(str(c.train.seed) for c in configs),
                group.path)
    if not resume and any(r.last.exists() for r in runs):
        raise VolttlError(f"{group_dir}: runs are already there (use --resume, or another run dir)")
    best = []
    for one, run in zip(configs, runs, strict=True):
        if run.finished_epochs() >= one.train.epochs:  # done before: its best is in last.pt
            check_resumable(run.path, one)  # reused only with these settings and data
            best.append(dict(read_checkpoint(run.last)[2]["best"]))
            continue
        best.append(train_run(one, run.path, resume=run.last.exists(), progress=progress))
    summary = {"seeds": [c.train.seed for c in configs], "runs": [r.path.name for r in runs],
               "best": best, **{f"val_{k}": mean_std([b.get(k, float("nan")) for b in best])
                                for k in REPORTED}}
    group.path.mkdir(parents=True, exist_ok=True)
    group.repeats.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
