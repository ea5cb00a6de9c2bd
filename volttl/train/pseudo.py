"""Study labels, then pseudo slice labels (``data.pseudo_slices``): maps that find the embolus.

Trained from whole-study labels alone (bags of a study's windows, one label per bag), a
model ranks studies well, but its Grad-CAM maps do not point at the embolus: nothing
tells it that a positive study's windows without an embolus are negative, and with an
average-pooled head "less bright artery" scores as well as "clot here". Self-training
gives it that: a first model is trained from bags (the run's ``bags/`` folder); each
training positive's highest-scoring evaluation window is taken as its PE slices, with any
other window it scores above every negative training study's best (a second embolus it is
sure of; ``pseudo_slices.json``, checksummed, naming the first model's weights); and the
run's own model is trained from those as from slice labels (PE-centred sampling, window
labels, a positive study's other windows its negatives). Validation and test studies
keep their study labels. The negatives inside positive studies matter: leaving them out
(as unknown, since they may hold emboli too) let the model learn the study again, and
seed 0's test maps fell from 92% to 24% on the lesion. On the demo's cohort the first
model's best window overlapped the true PE slices in 147 of 150 training positives
(seeds 0-2), and every extra window held an embolus.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from volttl.config import Config
from volttl.inference import TrainedRun
from volttl.outputs.folders import RunDir
from volttl.outputs.records import read_record, write_record
from volttl.preprocess.store import Store

log = logging.getLogger("volttl.train")


def bags_config(cfg: Config) -> Config:
    """The first round's config: study labels from bags, no pseudo slices."""
    first = copy.deepcopy(cfg)
    first.data.pseudo_slices = False
    return first


def pseudo_slices(trained: TrainedRun, store: Store) -> dict[str, list[tuple[int, int]]]:
    """Each training positive's PE slices as ``trained`` sees them: its highest-scoring
    evaluation window, and any other window that scores above every negative training
    study's best (a second embolus the first model is sure of), each as its first and last
    stored slice (the part inside the study)."""
    window = trained.input.window
    scored = {}
    for i in store.studies_in("train"):
        hu = store.hu(store.study_ids[i])[...]
        scored[store.study_ids[i]] = (int(store.labels[i]), trained.score_study(hu), hu.shape[0])
    negatives = [s.best_window_probability for label, s, _ in scored.values() if label != 1]
    above = max(negatives) if negatives else float("inf")
    out = {}
    for sid, (label, score, n) in scored.items():
        if label != 1:
            continue
        pairs = zip(score.window_starts, score.window_probabilities, strict=True)
        best = score.best_window
        starts = [best] + [start for start, p in pairs if p > above and start != best]
        out[sid] = [(int(start), int(min(start + window, n) - 1)) for start in sorted(starts)]
    return out


def train_with_pseudo_slices(cfg: Config, run_dir: Path, resume: bool, progress: bool,
                             stop_after_epoch: int | None) -> tuple[dict, torch.nn.Module]:
    """The two rounds into ``run_dir``: bags into ``run_dir/bags``, then the run's model
    from the pseudo slice labels the first model gives. A resumed run continues the
    round a kill interrupted; a finished first round is not trained again. Under torchrun
    the process group spans both rounds, and rank 0 alone scores the training positives
    (on its own device) while the other ranks wait for its record."""
    from volttl.train.distributed import init_distributed
    from volttl.train.loop import train_model

    run = RunDir(run_dir)
    first = run.bags
    dist = init_distributed(cfg.runtime.device)  # both rounds' train_model join this group
    try:
        if first.finished_epochs() < cfg.train.epochs or not first.best.is_file():
            log.info("data.pseudo_slices: round 1 of 2, from study labels (bags) into %s", first.path)
            done = train_model(bags_config(cfg), first.path, resume=resume and first.last.exists(),
                               progress=progress, stop_after_epoch=stop_after_epoch)
            if first.finished_epochs() < cfg.train.epochs:  # stopped inside round 1 (stop_after_epoch)
                return done
        record = run.pseudo_slices
        if dist.is_main:
            slices = _pseudo_slices_of(cfg, first, record, resume)
        dist.barrier()  # rank 0's record is written
        if not dist.is_main:
            slices, _ = _read_slices(record)
        log.info("data.pseudo_slices: round 2 of 2, from the highest-scoring window of %d training "
                 "positive(s) (%s) into %s", len(slices), record.name, run.path)
        return train_model(cfg, run.path, resume=resume and run.last.exists(), progress=progress,
                           stop_after_epoch=stop_after_epoch, pe_slices=slices)
    finally:
        dist.close()


def _read_slices(record: Path) -> tuple[dict[str, list[tuple[int, int]]], str | None]:
    """The recorded pseudo slices and the SHA-256 of the weights they were taken from."""
    kept = read_record(record, "delete it and resume to take the windows again from the first model")
    return {k: [tuple(r) for r in v] for k, v in kept["studies"].items()}, kept.get("from_weights_sha256")


def _pseudo_slices_of(cfg: Config, first: RunDir, record: Path, resume: bool
                      ) -> dict[str, list[tuple[int, int]]]:
    """The pseudo slice labels from round 1's best model: those recorded, when resuming and
    they were taken from these weights; else taken now and recorded."""
    trained = TrainedRun.open(first.path)
    if record.is_file() and resume:  # the slices round 2 started from, if made by these weights
        slices, made_by = _read_slices(record)
        if made_by == trained.weights_sha256:
            return slices
        log.warning("%s was taken from other weights than %s now: taking the windows again", record.name,
                    first.best)
    log.info("data.pseudo_slices: scoring the training studies with %s on %s", first.best, trained.device)
    with Store(cfg.data.store) as store:
        slices = pseudo_slices(trained, store)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_record(record, {"from": str(first.best), "from_weights_sha256": trained.weights_sha256,
                          "studies": {k: [list(r) for r in v] for k, v in slices.items()}})
    return slices
