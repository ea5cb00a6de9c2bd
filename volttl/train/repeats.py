"""``train.repeats: N``: the same setting trained with N seeds, reported as mean +- std.

The TTL paper reports every table entry as the mean and standard deviation of three
runs. A repeat group is a folder with one run dir per seed (``seed<S>/``, seeds
``train.seed`` .. ``train.seed + N - 1``) and ``repeats.json``. Finished seeds are
skipped and an interrupted one is resumed, so a killed group continues where it stopped
(:func:`volttl.train.step.train_repeats`; :func:`volttl.evaluate.step.evaluate_repeats` tests
every seed). The standard deviation is the sample one (ddof 1).
"""

from __future__ import annotations

import copy
import math

import numpy as np

from volttl.config import Config

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
