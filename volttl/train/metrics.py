"""Window- and study-level AUROC and AUPRC, with bootstrap 95% confidence intervals."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from volttl.inference import study_scores


def auroc_auprc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    if len(np.unique(labels)) < 2:
        return float("nan"), float("nan")
    return float(roc_auc_score(labels, scores)), float(average_precision_score(labels, scores))


def bootstrap_ci(labels: np.ndarray, scores: np.ndarray, n: int = 1000, seed: int = 0
                 ) -> dict[str, tuple[float, float]]:
    """Percentile 95% intervals over resamples of the cases (resamples of one class skipped)."""
    rng = np.random.default_rng(seed)
    roc, prc = [], []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[idx])) < 2:
            continue
        a, p = auroc_auprc(labels[idx], scores[idx])
        roc.append(a)
        prc.append(p)
    if not roc:
        return {"auroc": (float("nan"),) * 2, "auprc": (float("nan"),) * 2}
    q = lambda v: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))  # noqa: E731
    return {"auroc": q(roc), "auprc": q(prc)}


def summarise(window_labels, window_probs, window_studies, study_labels, how="max",
              bootstrap: int = 0, seed: int = 0) -> dict:
    """Everything a run reports about one split. Window-level metrics leave out the windows
    of unknown label (negative label values: positive studies without slice labels) and
    say how many studies that left out; study-level metrics use every study."""
    window_labels, window_probs = np.asarray(window_labels), np.asarray(window_probs)
    window_studies = np.asarray(window_studies)
    studies, scores = study_scores(window_probs, window_studies, how)
    labels = np.asarray(study_labels)[studies]
    known = window_labels >= 0
    w_roc, w_prc = auroc_auprc(window_labels[known], window_probs[known])
    s_roc, s_prc = auroc_auprc(labels, scores)
    out = {"window_auroc": w_roc, "window_auprc": w_prc, "study_auroc": s_roc,
           "study_auprc": s_prc, "studies": int(len(studies)), "windows": int(len(window_probs)),
           "window_metrics_studies_left_out": int(len(np.unique(window_studies[~known])))}
    if bootstrap:
        ci = bootstrap_ci(labels, scores, bootstrap, seed)
        out["study_auroc_ci"], out["study_auprc_ci"] = ci["auroc"], ci["auprc"]
    out["warnings"] = metric_warnings(labels, scores, out.get("study_auroc_ci"))
    return out


MIN_STUDIES = 20  # below this a study-level AUROC moves by 0.05 or more with one study
FLAT_SPREAD = 1e-3  # probabilities within this of each other: the model ranks nothing


def metric_warnings(labels: np.ndarray, scores: np.ndarray, auroc_ci=None) -> list[str]:
    """Why a split's study metrics may mean little, each in a line: too few studies, one
    class only, probabilities that barely differ (a flat model can still rank "perfectly"
    by noise), a bootstrap interval that collapsed to a point."""
    out = []
    n, classes = len(labels), len(np.unique(labels))
    if classes < 2:
        out.append(f"only one class among the {n} studies: AUROC and AUPRC are undefined")
    elif n < MIN_STUDIES:
        out.append(f"only {n} studies: one study moves the AUROC by {1 / max(1, n // 2):.2f} or more")
    if n and float(np.ptp(scores)) < FLAT_SPREAD:
        out.append(f"the study probabilities span only {float(np.ptp(scores)):.2g} "
                   f"({float(scores.min()):.6f}-{float(scores.max()):.6f}): the model is nearly constant, "
                   "and any ranking comes from noise")
    if auroc_ci is not None and np.isfinite(auroc_ci[0]) and auroc_ci[0] == auroc_ci[1]:
        out.append(f"the bootstrap interval collapsed to {auroc_ci[0]:.3f}: too few or too uniform studies "
                   "for an interval")
    return out
