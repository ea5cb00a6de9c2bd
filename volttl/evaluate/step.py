"""`volttl evaluate`: a run's best model on a split -> metrics, the operating point and
calibration, a table, ROC/PR and reliability plots.

The operating point (and, with ``eval.calibration: temperature``, the calibration) is
chosen on the validation split and stored in the run (:mod:`volttl.evaluate.decision`); evaluating
any split first makes sure the run has one for its current best weights and settings, so
a test split is always judged at a threshold chosen without it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from volttl.evaluate.decision import Decision, calibration, choose_decision, rates_with_ci
from volttl.inference import TrainedRun, require_finite, study_scores
from volttl.outputs.folders import RunDir
from volttl.outputs.records import write_record
from volttl.study_result import StudyResult, csv_columns, study_result
from volttl.train.loop import predict
from volttl.train.metrics import summarise
from volttl.train.repeats import AT_OPERATING_POINT, REPORTED, mean_std

log = logging.getLogger("volttl.evaluate.step")
VALIDATION = "val"


@dataclass
class SplitScores:
    """One split scored by a run: its windows' and its studies' probabilities."""

    split: str
    window_probs: np.ndarray
    window_labels: np.ndarray
    window_studies: np.ndarray
    study_index: np.ndarray  # store indices of the scored studies
    study_ids: list[str]
    study_labels: np.ndarray  # the scored studies' labels
    all_study_labels: np.ndarray  # indexed by store study index
    raw: np.ndarray  # aggregated study probabilities, before any calibration
    window_starts: np.ndarray  # the stored slice each window starts at


def study_results(trained: TrainedRun, scored: SplitScores, probs: np.ndarray) -> list[StudyResult]:
    """Each scored study's result (``probs``: its probabilities as the run reports them),
    with its windows and where its best one lies in the scan, as predict reports a study."""
    from volttl.inference import StudyScore
    from volttl.preprocess.store import Store

    decision, out = trained.decision, []
    with Store(trained.cfg.data.store) as store:
        for index, sid, label, p in zip(scored.study_index, scored.study_ids, scored.study_labels, probs,
                                        strict=True):
            mine = scored.window_studies == index
            order = np.argsort(scored.window_starts[mine], kind="stable")
            starts, window_probs = scored.window_starts[mine][order], scored.window_probs[mine][order]
            score = StudyScore(float(p), [int(v) for v in starts], [float(v) for v in window_probs],
                               decision.label(float(p)) if decision else None,
                               decision.threshold if decision else None)
            meta = store.meta(sid)
            slices = store.hu(sid).shape[0]
            out.append(study_result(trained, sid, meta.source, int(label), meta, score, slices))
    return out


def score_split(trained: TrainedRun, split: str, progress: bool = False) -> SplitScores:
    from volttl.data import WindowDataset

    cfg = trained.cfg
    ds = WindowDataset.from_config(cfg, split, train=False)
    probs, labels, studies = predict(trained.model, ds, trained.device, cfg.train.batch_size,
                                     cfg.runtime.workers, numerics=trained.numerics, progress=progress,
                                     desc=f"evaluate {split}")
    require_finite(probs, f"{trained.path} ({split} split)")
    index, raw = study_scores(probs, studies, cfg.eval.aggregate)
    return SplitScores(split, probs, labels, studies, index, [ds.study_ids[i] for i in index],
                       np.asarray(ds.study_labels)[index], np.asarray(ds.study_labels), raw,
                       np.asarray(ds.windows["start"], dtype=np.int64))


def ensure_decision(trained: TrainedRun, val: SplitScores | None = None, progress: bool = False) -> Decision:
    """The run's calibration and operating point for its current weights and ``eval``
    settings: the stored one, or one chosen now on the validation split (and stored)."""
    e = trained.cfg.eval
    stored = trained.decision
    if stored is not None and stored.matches(e.operating_point, e.target, e.calibration):
        return stored
    if val is None:
        log.info("choosing the operating point on the %s split (%s, target %s)", VALIDATION,
                 e.operating_point, e.target)
        val = score_split(trained, VALIDATION, progress)
    decision = choose_decision(val.study_labels, val.raw, e.operating_point, e.target, e.calibration,
                               trained.weights_sha256, VALIDATION)
    if decision.note:
        log.warning("%s: %s", trained.path, decision.note)
    write_record(RunDir(trained.path).operating_point, decision.to_dict())
    trained.decision = decision
    return decision


def _plot_curves(labels: np.ndarray, scores: np.ndarray, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    axes[0].plot(fpr, tpr)
    axes[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {title}")
    axes[1].plot(recall, precision)
    axes[1].axhline(labels.mean(), color="k", ls="--", lw=0.8)
    axes[1].set(xlabel="recall", ylabel="precision", title=f"PR, {title}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _plot_reliability(curve: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    ax.plot(curve["predicted"], curve["observed"], "o-", label=f"model (ECE {curve['ece']:.3f})")
    for x, y, n in zip(curve["predicted"], curve["observed"], curve["counts"], strict=True):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="fraction positive",
           title=f"Reliability, {title}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _ci(metrics: dict, key: str) -> str:
    lo, hi = metrics.get(f"{key}_ci", (float("nan"),) * 2)
    return f"{metrics[key]:.3f} ({lo:.3f}-{hi:.3f})"


def decision_table(split: str, point: dict, decision: Decision) -> str:
    """The operating point's rows of ``metrics_<split>.md``."""
    if point.get("threshold") is None:
        return f"\nNo operating point: {decision.note or 'none chosen'}.\n"
    target = "" if decision.rule == "youden" else f" {decision.target:g}"
    out = (f"\nOperating point chosen on {decision.chosen_on} ({decision.validation_studies} studies): "
           f"{decision.rule}{target}, threshold {point['threshold']:.4f}"
           + (f" on probabilities calibrated with temperature {decision.temperature:.3f}"
              if decision.temperature is not None else "") + ".\n\n"
           "| split | sensitivity (95% CI) | specificity (95% CI) | PPV (95% CI) | NPV (95% CI) "
           "| TP | FP | TN | FN |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
           f"| {split} | {_ci(point, 'sensitivity')} | {_ci(point, 'specificity')} | {_ci(point, 'ppv')} | "
           f"{_ci(point, 'npv')} | {point['tp']} | {point['fp']} | {point['tn']} | {point['fn']} |\n")
    return out


def evaluate_run(run_dir: str | Path, split: str = "test", bootstrap: int | None = None,
                 overrides: list[str] | None = None, progress: bool = False) -> dict:
    """Study- and window-level metrics of ``best.pt`` on ``split``, the operating point's
    sensitivity, specificity, PPV and NPV and the calibration, written into the run dir."""
    run = RunDir(run_dir)
    trained = TrainedRun.open(run.path, overrides, rechoose=True)  # in the run's numerics, on its device
    cfg = trained.cfg
    scored = score_split(trained, split, progress)
    decision = ensure_decision(trained, scored if split == VALIDATION else None, progress)
    n_boot = cfg.eval.bootstrap if bootstrap is None else bootstrap
    # AUROC and AUPRC depend on the ranking only, which calibration keeps
    metrics = summarise(scored.window_labels, scored.window_probs, scored.window_studies,
                        scored.all_study_labels, cfg.eval.aggregate, n_boot)
    metrics.update(split=split, aggregate=cfg.eval.aggregate)
    probs = np.asarray(decision.calibrate(scored.raw), dtype=np.float64)
    labels = scored.study_labels
    point: dict = {"threshold": decision.threshold}
    if decision.threshold is not None and len(labels):
        point.update(rates_with_ci(labels, probs, decision.threshold))
    metrics["operating_point"] = {**point, "rule": decision.rule, "target": decision.target,
                                  "chosen_on": decision.chosen_on}
    curve = calibration(labels, probs, cfg.eval.calibration_bins) if len(labels) else {}
    metrics["calibration"] = {"method": decision.calibration, "temperature": decision.temperature, **curve}
    run.metrics_json(split).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    with run.predictions_csv(split).open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=csv_columns())
        w.writeheader()
        w.writerows(r.csv_row() for r in study_results(trained, scored, probs))
    table = _table(split, metrics, decision, run.reliability_png(split).name)
    run.metrics_md(split).write_text(table, encoding="utf-8")
    if len(np.unique(labels)) == 2:
        _plot_curves(labels, probs, run.curves_png(split), f"{split} studies")
    if len(labels):
        _plot_reliability(metrics["calibration"], run.reliability_png(split), f"{split} studies")
    torch.cuda.empty_cache() if trained.device.type == "cuda" else None
    return metrics


def _table(split: str, metrics: dict, decision: Decision, plot: str) -> str:
    ci = metrics.get("study_auroc_ci", (float("nan"),) * 2)
    ci_p = metrics.get("study_auprc_ci", (float("nan"),) * 2)
    table = ("| split | studies | study AUROC (95% CI) | study AUPRC (95% CI) | window AUROC |\n"
             "| --- | --- | --- | --- | --- |\n"
             f"| {split} | {metrics['studies']} | {metrics['study_auroc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) "
             f"| {metrics['study_auprc']:.3f} ({ci_p[0]:.3f}-{ci_p[1]:.3f}) | "
             f"{metrics['window_auroc']:.3f} |\n")
    table += decision_table(split, metrics["operating_point"], decision)
    cal = metrics["calibration"]
    if "ece" in cal:
        how = (f"after temperature scaling (T = {cal['temperature']:.3f}, fitted on {decision.chosen_on})"
               if cal["temperature"] is not None else "uncalibrated (eval.calibration: none)")
        table += (f"\nCalibration {how}: expected calibration error {cal['ece']:.3f} over "
                  f"{cal['bins']} equal-width bins ({plot}).\n")
    for warning in metrics["warnings"]:
        table += f"\nWarning: {warning}.\n"
    if metrics["window_metrics_studies_left_out"]:
        table += (f"\nWindow AUROC leaves out {metrics['window_metrics_studies_left_out']} positive "
                  "study(ies) without pe_slices (their windows' labels are unknown); study metrics use "
                  "every study.\n")
    return table


def fmt_rate(point: dict, key: str) -> str:
    """``0.900 (0.750-1.000)``; the value alone without an interval; ``n/a`` when there is
    no value (no operating point, or a rate with no cases)."""
    value = point.get(key)
    if value is None or math.isnan(value):
        return "n/a"
    return _ci(point, key) if point.get(f"{key}_ci") else f"{value:.3f}"


def evaluate_step(run_dir: str | Path, split: str = "test", overrides: list[str] | None = None,
                  progress: bool = False) -> dict:
    """The evaluate step, as `volttl evaluate` and a pipeline's ``evaluate`` step both run
    it: a repeat group seed by seed (with its mean +- std), or one run."""
    if RunDir(run_dir).is_repeat_group():
        return evaluate_repeats(run_dir, split, progress=progress, overrides=overrides)
    return evaluate_run(run_dir, split, overrides=overrides, progress=progress)


def evaluate_repeats(group_dir: str | Path, split: str = "test", progress: bool = False,
                     overrides: list[str] | None = None) -> dict:
    """Evaluate each seed's best model; write the group's ``metrics_<split>.json`` and a
    markdown table with one row per seed and the mean +- std."""
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
