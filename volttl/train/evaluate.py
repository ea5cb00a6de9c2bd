"""`volttl evaluate`: a run's best model on a split -> metrics.json, a table, ROC and PR plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from volttl.inference import TrainedRun
from volttl.runs import RunDir
from volttl.train.loop import predict
from volttl.train.metrics import study_scores, summarise


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


def evaluate_run(run_dir: str | Path, split: str = "test", bootstrap: int | None = None,
                 overrides: list[str] | None = None) -> dict:
    """Study- and window-level metrics of ``best.pt`` on ``split``, written into the run dir."""
    from volttl.data import WindowDataset

    run = RunDir(run_dir)
    trained = TrainedRun.open(run.path, overrides)  # the model in the run's numerics, on its device
    cfg, device = trained.cfg, trained.device
    ds = WindowDataset.from_config(cfg, split, train=False)
    probs, labels, studies = predict(trained.model, ds, device, cfg.train.batch_size, cfg.train.workers,
                                     numerics=trained.numerics)
    n_boot = cfg.eval.bootstrap if bootstrap is None else bootstrap
    metrics = summarise(labels, probs, studies, ds.study_labels, cfg.eval.aggregate, n_boot)
    metrics.update(split=split, aggregate=cfg.eval.aggregate)
    run.metrics_json(split).write_text(json.dumps(metrics, indent=2))
    ids, scores = study_scores(probs, studies, cfg.eval.aggregate)
    with run.predictions_csv(split).open("w") as fh:
        fh.write("study_id,label,probability\n")
        for i, score in zip(ids, scores, strict=True):
            fh.write(f"{ds.study_ids[i]},{ds.study_labels[i]},{score:.6f}\n")
    ci = metrics.get("study_auroc_ci", (float("nan"),) * 2)
    ci_p = metrics.get("study_auprc_ci", (float("nan"),) * 2)
    table = ("| split | studies | study AUROC (95% CI) | study AUPRC (95% CI) | window AUROC |\n"
             "| --- | --- | --- | --- | --- |\n"
             f"| {split} | {metrics['studies']} | {metrics['study_auroc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) "
             f"| {metrics['study_auprc']:.3f} ({ci_p[0]:.3f}-{ci_p[1]:.3f}) | "
             f"{metrics['window_auroc']:.3f} |\n")
    for warning in metrics["warnings"]:
        table += f"\nWarning: {warning}.\n"
    if metrics["window_metrics_studies_left_out"]:
        table += (f"\nWindow AUROC leaves out {metrics['window_metrics_studies_left_out']} positive "
                  "study(ies) without pe_slices (their windows' labels are unknown); study metrics use "
                  "every study.\n")
    run.metrics_md(split).write_text(table)
    study_labels = ds.study_labels[ids]
    if len(np.unique(study_labels)) == 2:
        _plot_curves(study_labels, scores, run.curves_png(split), f"{split} studies")
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return metrics
