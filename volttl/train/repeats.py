"""``train.repeats: N``: the same setting trained with N seeds, reported as mean +- std.

The TTL paper reports every table entry as the mean and standard deviation of three
runs. A repeat group is a folder with one run dir per seed (``seed<S>/``, seeds
``train.seed`` .. ``train.seed + N - 1``) and ``repeats.json``. Finished seeds are
skipped and an interrupted one is resumed, so a killed group continues where it stopped.
The standard deviation is the sample one (ddof 1).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import numpy as np

from volttl.config import Config
from volttl.errors import VolttlError
from volttl.models.checkpoints import read_checkpoint
from volttl.runs import RunDir, check_resumable

log = logging.getLogger("volttl.train")
REPORTED = ("study_auroc", "study_auprc", "window_auroc", "window_auprc")
AT_OPERATING_POINT = ("sensitivity", "specificity")


def seed_configs(cfg: Config) -> list[Config]:
    """One single-run config per seed."""
    out = []
    for i in range(cfg.train.repeats):
        one = copy.deepcopy(cfg)
        one.train.seed, one.train.repeats = cfg.train.seed + i, 1
        out.append(one)
    return out


def mean_std(values: list[float]) -> dict:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def train_repeats(cfg: Config, group_dir: str | Path, resume: bool = False,
                  progress: bool = True) -> dict:
    """Train every seed of the group; returns (and writes) the summary of best validation
    metrics per seed with their mean and std."""
    from volttl.train.loop import train_run

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


def evaluate_repeats(group_dir: str | Path, split: str = "test", progress: bool = False,
                     overrides: list[str] | None = None) -> dict:
    """Evaluate each seed's best model; write the group's ``metrics_<split>.json`` and a
    markdown table with one row per seed and the mean +- std."""
    from volttl.evaluate import evaluate_run

    group = RunDir(group_dir)
    runs = json.loads(group.repeats.read_text(encoding="utf-8"))["runs"]
    per_run = {name: evaluate_run(group.path / name, split, overrides=overrides, progress=progress)
               for name in runs}
    at_point = lambda m, k: m["operating_point"].get(k, float("nan"))  # noqa: E731
    summary = {"split": split, "runs": per_run,
               **{k: mean_std([m[k] for m in per_run.values()]) for k in REPORTED},
               **{k: mean_std([at_point(m, k) for m in per_run.values()]) for k in AT_OPERATING_POINT}}
    group.metrics_json(split).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    lines = ["| run | studies | study AUROC | study AUPRC | window AUROC | sensitivity | specificity |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in per_run.items():
        lines.append(f"| {name} | {m['studies']} | {m['study_auroc']:.3f} | {m['study_auprc']:.3f} "
                     f"| {m['window_auroc']:.3f} | {at_point(m, 'sensitivity'):.3f} "
                     f"| {at_point(m, 'specificity'):.3f} |")
    fmt = lambda k: f"{summary[k]['mean']:.3f} +- {summary[k]['std']:.3f}"  # noqa: E731
    lines.append(f"| mean +- std | | {fmt('study_auroc')} | {fmt('study_auprc')} | {fmt('window_auroc')} "
                 f"| {fmt('sensitivity')} | {fmt('specificity')} |")
    lines.append("\nSensitivity and specificity at each run's operating point, chosen on its val split.")
    group.metrics_md(split).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary
