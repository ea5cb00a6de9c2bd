"""The transfer comparison (a pipeline's ``compare`` step): named rows trained over the
same seeds, tested on the same studies, and compared pairwise.

A row is ``scratch`` (the backbone, no weights loaded), ``ftl`` (every weight from
``model.pretrained``) or ``<strategy>@<cut>`` (``tf@layer3``, ``lwft@layer2``,
``ttl@layer1``). Each is a search trial (:mod:`volttl.search.trials`): ``train.repeats``
seeds, each seed's best model on the test split, P(M), MACs(G) and T(ms). The table
adds what makes it a finding rather than a list of numbers:

- whether every seed learned: the last epoch's training loss against the loss of the best
  constant guess at the training windows' share of positives (ln 2 only for balanced
  classes), and the best validation AUROC above 0.5; a row that did not is marked and
  named, never silently tabulated;
- each row's test AUROC minus FTL's and minus from-scratch's, paired: the same test
  studies and the same seeds, with a 95% bootstrap interval that resamples studies (one
  resample for every seed and both rows) and averages the per-seed differences.

With ``train_studies`` (a list) the same rows are trained on nested subsets of the training
split (``data.train_studies``) and the step draws test AUROC against the number of
training studies, mean and the seeds' range.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volttl.analysis.complexity import convention, profiled_input
from volttl.config import Config, config_to_dict
from volttl.errors import VolttlError
from volttl.models import get_backbone_spec
from volttl.outputs.folders import CompareDir, RunDir, TrialDir

log = logging.getLogger("volttl.compare")
STRATEGIES = ("tf", "lwft", "ttl")
LEARNED_LOSS = 0.8  # a seed learned when its last training loss is below this share of the prior's


@dataclass(frozen=True)
class Row:
    """One row of the comparison: a strategy and cut, from the source weights or not."""

    label: str
    strategy: str
    cut: str
    pretrained: bool

    @property
    def slug(self) -> str:
        return self.label.lower().replace("@", "_").replace(".", "-")


def parse_row(text: str, model: str) -> Row:
    """``scratch``, ``ftl`` or ``<tf|lwft|ttl>@<cut>`` (a cut the backbone declares)."""
    name = str(text).strip().lower()
    if name == "scratch":
        return Row("scratch", "ftl", "", False)
    if name == "ftl":
        return Row("FTL", "ftl", "", True)
    strategy, _, cut = name.partition("@")
    if strategy not in STRATEGIES or not cut:
        raise VolttlError(f"compare row '{text}': use scratch, ftl or <tf|lwft|ttl>@<cut>")
    get_backbone_spec(model).cut_point(cut)  # a clear error for a cut the backbone lacks
    return Row(f"{strategy.upper()}@{cut}", strategy, cut, True)


def row_config(base: Config, row: Row, train_studies: int | None = None) -> Config:
    """The row's config; ``train_studies`` (a learning-curve point) replaces ``data.train_studies``."""
    cfg = copy.deepcopy(base)
    cfg.transfer.strategy = row.strategy
    cfg.transfer.cut = row.cut or cfg.transfer.cut
    if not row.pretrained:
        cfg.model.pretrained = ""
    if train_studies is not None:
        cfg.data.train_studies = train_studies
    return cfg


def prior_loss(cfg: Config, positive_share: float) -> float:
    """The training loss of the best constant guess, for windows of which ``positive_share``
    are drawn positive: what a row that learned must get well below (ln 2 only for balanced
    classes; the synthetic cohort's windows are about a quarter positive)."""
    q = np.linspace(1e-4, 1 - 1e-4, 9999)
    gamma = cfg.train.focal_gamma if cfg.train.loss == "focal" else 0.0
    loss = (positive_share * (1 - q) ** gamma * -np.log(q)
            + (1 - positive_share) * q ** gamma * -np.log(1 - q))
    return float(loss.min())


def training_positive_share(cfg: Config) -> float:
    """The share of positive windows training draws: PE-centred draws (``augment.pe_prob``)
    are positive, the rest follow the training split's window labels."""
    from volttl.data import WindowDataset

    labels = WindowDataset.from_config(cfg, "train", train=True).labels()
    share = float(labels.mean()) if len(labels) else 0.0
    return cfg.augment.pe_prob + (1 - cfg.augment.pe_prob) * share


def seed_record(run_dir: Path, split: str) -> dict:
    """A seed's learning (last training loss, best validation AUROC) and its test scores."""
    run = RunDir(run_dir)
    epochs = [json.loads(line) for line in run.metrics.read_text(encoding="utf-8").splitlines() if line]
    if not epochs:
        raise VolttlError(f"{run.metrics}: no finished epoch")
    val = [e["val_study_auroc"] for e in epochs if e["val_study_auroc"] is not None
           and not math.isnan(e["val_study_auroc"])]
    with run.predictions_csv(split).open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {"last_train_loss": epochs[-1]["train_loss"], "best_val_auroc": max(val) if val else float("nan"),
            "studies": [r["study_id"] for r in rows], "labels": np.array([int(r["label"]) for r in rows]),
            "probs": np.array([float(r["probability"]) for r in rows])}


def auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Rank AUROC with ties counted half (Mann-Whitney); nan without both classes."""
    pos, neg = probs[labels == 1], probs[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def paired_difference(a: list[dict], b: list[dict], resamples: int, seed: int = 0) -> dict:
    """Mean over seeds of AUROC(a) - AUROC(b) on the same test studies, with a 95% interval
    from resampling the studies (the same resample for every seed and both rows)."""
    if [s["studies"] for s in a] != [s["studies"] for s in b]:
        raise VolttlError("compare: two rows were tested on different studies; rerun the comparison")
    labels = a[0]["labels"]

    def difference(idx: np.ndarray) -> float:
        return float(np.mean([auroc(labels[idx], x["probs"][idx]) - auroc(labels[idx], y["probs"][idx])
                              for x, y in zip(a, b, strict=True)]))

    point = difference(np.arange(len(labels)))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() != labels[idx].max():  # a resample needs both classes
            draws.append(difference(idx))
    lo, hi = (np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan")))
    return {"mean": point, "lo": float(lo), "hi": float(hi), "resamples": len(draws)}


def _trial(cfg: Config, row: Row, out: Path, progress: bool) -> dict:
    from volttl.search.trials import run_trial

    folder = out / row.slug
    result = run_trial(config_to_dict(cfg), str(folder), progress=progress)
    seeds = [seed_record(RunDir(folder).seed(k).path, cfg.search.test_split) for k in result["seeds"]]
    return {"row": row, "trial": result, "seeds": seeds}


def _learned(done: dict, prior: float) -> tuple[bool, str]:
    losses = [s["last_train_loss"] for s in done["seeds"]]
    vals = [s["best_val_auroc"] for s in done["seeds"]]
    bad = [f"seed {i}: loss {lo:.3f}, best val AUROC {v:.3f}"
           for i, (lo, v) in enumerate(zip(losses, vals, strict=True))
           if not (lo < LEARNED_LOSS * prior and v > 0.5)]
    return not bad, "; ".join(bad)


def compare_rows(cfg: Config, rows: list[str], out: str | Path, train_studies: int | None = None,
                 resamples: int = 2000, progress: bool = True) -> list[dict]:
    """Train (or reuse) every row over ``train.repeats`` seeds and return the table rows."""
    if not cfg.model.pretrained and any(parse_row(r, cfg.model.name).pretrained for r in rows):
        raise VolttlError("compare: model.pretrained is empty, so only the scratch row can be trained")
    out = Path(out)
    parsed = [parse_row(r, cfg.model.name) for r in rows]
    done = {row.label: _trial(row_config(cfg, row, train_studies), row, out, progress) for row in parsed}
    prior = prior_loss(cfg, training_positive_share(row_config(cfg, parsed[0], train_studies)))
    table = []
    for row in parsed:
        d, r = done[row.label], done[row.label]["trial"]
        tests = [auroc(s["labels"], s["probs"]) for s in d["seeds"]]
        learned, why = _learned(d, prior)
        entry = {"row": row.label, "strategy": row.strategy, "cut": row.cut or "-",
                 "pretrained": row.pretrained, "seeds": len(tests), "test_auroc_mean": float(np.mean(tests)),
                 "test_auroc_sd": float(np.std(tests, ddof=1)) if len(tests) > 1 else 0.0,
                 "test_studies": len(d["seeds"][0]["labels"]),
                 "last_loss_over_prior": float(np.mean([s["last_train_loss"] for s in d["seeds"]]) / prior),
                 "min_best_val_auroc": float(min(s["best_val_auroc"] for s in d["seeds"])),
                 "learned": learned, "not_learned": why, "params_m": r["params_m"], "macs_g": r["macs_g"],
                 "latency_ms": r["latency_ms"], "dir": r["dir"]}
        for ref in ("FTL", "scratch"):
            if ref in done and ref != row.label:
                entry[f"vs_{ref}"] = paired_difference(d["seeds"], done[ref]["seeds"], resamples)
        if not learned:
            log.warning("compare: %s did not learn on every seed (%s); its numbers say nothing",
                        row.label, why)
        table.append(entry)
    return table


def _interval(d: dict | None) -> str:
    return "-" if d is None else f"{d['mean']:+.3f} ({d['lo']:+.3f} to {d['hi']:+.3f})"


def table_markdown(table: list[dict], cfg: Config) -> str:
    n, studies = table[0]["seeds"], table[0]["test_studies"]
    lines = [f"Test study AUROC over {n} seeds (mean +- sd) on the same {studies} test studies; "
             "differences are paired (same studies, same seeds) with 95% bootstrap intervals over "
             f"studies. Loss / prior: the last epoch's training loss over a constant guess's. "
             f"P(M), MACs(G) and T(ms) at input (C x D x H x W) {profiled_input(cfg)}, batch 1, on "
             f"{cfg.profile.device}; {convention(cfg)}.", "",
             "| row | test AUROC | vs FTL | vs scratch | loss / prior | min best val AUROC | P(M) | MACs(G) "
             "| T(ms) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in table:
        flag = "" if t["learned"] else " (did not learn)"
        lines.append(f"| {t['row']}{flag} | {t['test_auroc_mean']:.3f} +- {t['test_auroc_sd']:.3f} | "
                     f"{_interval(t.get('vs_FTL'))} | {_interval(t.get('vs_scratch'))} | "
                     f"{t['last_loss_over_prior']:.2f} | {t['min_best_val_auroc']:.3f} | "
                     f"{t['params_m']:.1f} | {t['macs_g']:.2f} | {t['latency_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_curve(points: dict[str, list[tuple[int, list[float]]]], path: Path, title: str) -> None:
    """Test AUROC against training studies: each row's mean over seeds and their range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, series in points.items():
        xs = [n for n, _ in series]
        means = [float(np.mean(v)) for _, v in series]
        ax.plot(xs, means, marker="o", label=label)
        ax.fill_between(xs, [min(v) for _, v in series], [max(v) for _, v in series], alpha=0.2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({n for s in points.values() for n, _ in s}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("training studies")
    ax.set_ylabel("test study AUROC")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class CompareOutcome:
    """What the compare step wrote: the table (and the learning curve, when asked for)."""

    folder: Path
    table: list[dict]
    curve: dict | None

    def summary(self) -> str:
        learned = sum(t["learned"] for t in self.table)
        line = (f"{len(self.table)} rows ({learned} learned on every seed) in "
                f"{CompareDir(self.folder).table_md}")
        if self.curve is not None:
            line += f"; learning curve in {CompareDir(self.folder).curve_png}"
        return line


def compare_step(cfg: Config, rows: list[str], out: str | Path, curve_rows: list[str] | None = None,
                 train_studies: list[int] | None = None, resamples: int = 2000,
                 progress: bool = True) -> CompareOutcome:
    """A pipeline's ``compare`` step: the table of ``rows`` on the whole training split and,
    with ``train_studies``, the learning curve of ``curve_rows`` (default: every row) on
    nested subsets. Trials already trained with the same settings are reused."""
    folder = CompareDir(out)
    folder.path.mkdir(parents=True, exist_ok=True)
    table = compare_rows(cfg, rows, folder.path, resamples=resamples, progress=progress)
    folder.table_md.write_text(table_markdown(table, cfg), encoding="utf-8")
    folder.table_json.write_text(json.dumps(table, indent=2), encoding="utf-8")
    curve = None
    if train_studies:
        points: dict[str, list[tuple[int, list[float]]]] = {}
        table_size = cfg.data.train_studies or _training_studies(cfg)
        for n in sorted(int(v) for v in train_studies):
            # the table's own size is the table's trials, reused as they are
            same = n == table_size
            part = compare_rows(cfg, curve_rows or rows, folder.path if same else folder.path / f"train{n}",
                                train_studies=None if same else n, resamples=0, progress=progress)
            for t in part:
                tests = [auroc(s["labels"], s["probs"]) for s in _seed_records(t["dir"], cfg)]
                points.setdefault(t["row"], []).append((n, tests))
        curve = {label: [{"train_studies": n, "test_auroc": v} for n, v in series]
                 for label, series in points.items()}
        folder.curve_json.write_text(json.dumps(curve, indent=2), encoding="utf-8")
        plot_curve(points, folder.curve_png, f"{table[0]['test_studies']} test studies, "
                                             f"{table[0]['seeds']} seeds (mean and range)")
    return CompareOutcome(folder.path, table, curve)


def _training_studies(cfg: Config) -> int:
    from volttl.preprocess.store import Store

    with Store(cfg.data.store) as store:
        return len(store.studies_in("train"))


def _seed_records(trial_dir: str, cfg: Config) -> list[dict]:
    from volttl.search.trials import read_trial

    trial = read_trial(TrialDir(trial_dir).result)
    return [seed_record(RunDir(trial_dir).seed(k).path, cfg.search.test_split) for k in trial["seeds"]]
