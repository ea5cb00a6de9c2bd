"""One search trial: a (model, strategy, cut) setting trained over ``train.repeats`` seeds,
evaluated on the test split, and profiled (parameters, MACs, latency).

A trial lives in its own folder (a repeat group, see :mod:`volttl.train.repeats`) and
ends by writing ``trial.json``; a trial whose ``trial.json`` holds the same config is
skipped, so a killed search resumes where it stopped (unless the store's training or
validation data changed since it was trained: then it stops with one line). ``run_trial`` takes and returns
plain data so that any backend (this process, a subprocess per GPU, a Ray task) can run
it: ``python -m volttl.search.trials CONFIG.json TRIAL_DIR`` runs one from a shell.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from volttl.config import Config, config_from_dict, config_to_dict
from volttl.outputs.folders import TrialDir
from volttl.outputs.provenance import fingerprint
from volttl.outputs.records import read_record, write_record


@dataclass(frozen=True)
class Trial:
    model: str
    strategy: str
    cut: str  # "" for FTL
    stage: str  # "baseline", "1" or "2"

    @property
    def name(self) -> str:
        return f"{self.model}_{self.strategy}_{self.cut or 'full'}"


def trial_config(base: Config, trial: Trial, penet_pretrained: str = "") -> Config:
    cfg = copy.deepcopy(base)
    if trial.model != cfg.model.name:  # the PENet baseline
        cfg.model.name = trial.model
        cfg.model.pretrained = penet_pretrained
    cfg.transfer.strategy = trial.strategy
    cfg.transfer.cut = trial.cut or cfg.transfer.cut
    return cfg


def _fingerprint(cfg_dict: dict) -> str:
    """What a trial's result depends on: its config without the runtime section (a trial
    finished on one device is not trained again on another)."""
    return fingerprint({k: v for k, v in cfg_dict.items() if k != "runtime"})


def check_trained_on(cfg: Config, trial_dir: Path) -> None:
    """Each seed of a finished trial must have been trained on the store's present
    training and validation data (a one-line :class:`RunError` otherwise)."""
    from volttl.outputs.folders import RunDir
    from volttl.outputs.resume import check_resumable
    from volttl.train.repeats import seed_configs

    for one in seed_configs(cfg):
        run = RunDir(trial_dir).seed(one.train.seed)
        if run.last.exists():
            check_resumable(run.path, one)


def run_trial(cfg_dict: dict, trial_dir: str, progress: bool = False) -> dict:
    """Train, evaluate and profile one trial (or return its finished result)."""
    from volttl.analysis.complexity import profile_config
    from volttl.evaluate.step import evaluate_repeats
    from volttl.train.step import train_repeats

    trial_dir_path = Path(trial_dir)
    done = TrialDir(trial_dir_path).result
    fingerprint = _fingerprint(cfg_dict)
    cfg = config_from_dict(cfg_dict)
    if done.is_file():
        previous = read_trial(done)
        if previous.get("fingerprint") == fingerprint:
            check_trained_on(cfg, trial_dir_path)  # the same config, but is it the same data?
            return previous
    val = train_repeats(cfg, trial_dir_path, resume=True, progress=progress)
    test = evaluate_repeats(trial_dir_path, cfg.search.test_split)
    result = {"fingerprint": fingerprint, "model": cfg.model.name, "strategy": cfg.transfer.strategy,
              "cut": cfg.transfer.cut if cfg.transfer.strategy != "ftl" else "",
              "dir": str(trial_dir_path), "seeds": val["seeds"],
              "val_study_auroc": val["val_study_auroc"], "val_study_auprc": val["val_study_auprc"],
              "test_split": cfg.search.test_split, "test_study_auroc": test["study_auroc"],
              "test_study_auprc": test["study_auprc"], **profile_config(cfg)}
    return write_record(done, result)


def read_trial(path: str | Path) -> dict:
    """A finished trial's result, its checksum verified (a row of the search table)."""
    return read_record(path, f"delete it and rerun the search to redo the trial in {Path(path).parent}")


def trial_job(base: Config, trial: Trial, out_dir: Path) -> tuple[dict, str]:
    """The plain (config, folder) pair a backend needs for one trial."""
    cfg = trial_config(base, trial, base.search.penet_pretrained)
    return config_to_dict(cfg), str(out_dir / trial.name)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m volttl.search.trials CONFIG.json TRIAL_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_trial(json.loads(Path(argv[0]).read_text(encoding="utf-8")), argv[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
