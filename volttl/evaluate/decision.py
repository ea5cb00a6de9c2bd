"""From a study probability to a decision: calibration and the operating point.

Both are fitted on the validation split by ``volttl evaluate`` and stored in the run
(``operating_point.json``, checksummed and tied to ``best.pt``'s weights), then applied
by evaluate, predict and cam alike through :class:`Decision`:

- **Calibration** (``eval.calibration: temperature``, opt-in): one temperature ``T``
  fitted by maximum likelihood on the validation studies, applied to the study
  probability as ``sigmoid(logit(p) / T)``. It is monotone, so AUROC, AUPRC and every
  ranking stay as they were; only the probabilities' meaning as frequencies changes.
- **Operating point** (``eval.operating_point``): the threshold on the (calibrated) study
  probability that reaches ``eval.target`` sensitivity on validation, the highest such
  threshold (PE is a finding not to miss); or the one that reaches ``eval.target``
  specificity, the lowest such; or Youden's J. A study is called positive when its
  probability is at or above the threshold.

Sensitivity, specificity, PPV and NPV at the threshold come with Wilson score
intervals; the expected calibration error (ECE) is over equal-width bins,
the bins of scikit-learn's ``calibration_curve``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, roc_curve

OPERATING_RULES = ("sensitivity", "youden", "specificity")
CALIBRATIONS = ("none", "temperature")
RATES = ("sensitivity", "specificity", "ppv", "npv")
_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    """``sigmoid(logit(p) / temperature)``."""
    return 1.0 / (1.0 + np.exp(-_logit(p) / temperature))


TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The temperature that minimises the binary cross-entropy of ``labels`` under the
    tempered ``probs`` (searched over :data:`TEMPERATURE_BOUNDS` on a log scale)."""
    from scipy.optimize import minimize_scalar

    y, z = np.asarray(labels, dtype=np.float64), _logit(probs)

    def nll(log_t: float) -> float:
        q = np.clip(1.0 / (1.0 + np.exp(-z / math.exp(log_t))), _EPS, 1 - _EPS)
        return float(-(y * np.log(q) + (1 - y) * np.log1p(-q)).mean())

    low, high = TEMPERATURE_BOUNDS
    result = minimize_scalar(nll, bounds=(math.log(low), math.log(high)), method="bounded")
    return float(math.exp(result.x))


def choose_threshold(labels: np.ndarray, probs: np.ndarray, rule: str, target: float) -> float:
    """The operating threshold on ``probs`` by ``rule`` (one of :data:`OPERATING_RULES`);
    needs both classes among ``labels``."""
    if rule not in OPERATING_RULES:
        raise ValueError(f"eval.operating_point '{rule}' is not one of {', '.join(OPERATING_RULES)}")
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    # thresholds fall from +inf (nothing positive); index 0 calls nothing positive, so skip it
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if rule == "sensitivity":  # the highest threshold that still reaches the sensitivity
        return float(thresholds[int(np.argmax(tpr >= target - 1e-12))])
    if rule == "specificity":  # the lowest threshold that still keeps the specificity
        ok = np.flatnonzero(1 - fpr >= target - 1e-12)
        return float(thresholds[ok[-1]] if len(ok) else thresholds[0])
    return float(thresholds[int(np.argmax(tpr - fpr))])


def rates(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV (NaN where a denominator is zero) and the counts."""
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, predicted, labels=[0, 1]).ravel())
    div = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"sensitivity": div(tp, tp + fn), "specificity": div(tn, tn + fp), "ppv": div(tp, tp + fp),
            "npv": div(tn, tn + fn), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def rates_with_ci(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """:func:`rates` at ``threshold``, each rate with its Wilson score 95% interval
    (``<rate>_ci``; NaN where the rate is undefined). A bootstrap interval collapses to a
    point at a rate of 0 or 1 (no false positive among 25 negatives gives "1.000-1.000");
    Wilson's does not (0.867-1.000)."""
    from scipy.stats import binomtest

    labels, probs = np.asarray(labels), np.asarray(probs)
    out: dict = rates(labels, (probs >= threshold).astype(int))
    tp, fp, tn, fn = out["tp"], out["fp"], out["tn"], out["fn"]
    for key, hits, total in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                             ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        if total:
            ci = binomtest(hits, total).proportion_ci(confidence_level=0.95, method="wilson")
            out[f"{key}_ci"] = (float(ci.low), float(ci.high))
        else:
            out[f"{key}_ci"] = (float("nan"), float("nan"))
    return out


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict:
    """The reliability curve (mean predicted probability and observed frequency of each
    non-empty equal-width bin, with its count) and the expected calibration error: the
    count-weighted mean gap between the two."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    observed, predicted = calibration_curve(labels, probs, n_bins=bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], probs), minlength=bins)
    counts = counts[counts > 0]  # calibration_curve keeps only the non-empty bins, in order
    ece = float(np.sum(counts / len(probs) * np.abs(observed - predicted)))
    return {"ece": ece, "bins": bins, "predicted": [float(v) for v in predicted],
            "observed": [float(v) for v in observed], "counts": [int(v) for v in counts]}


@dataclass
class Decision:
    """What a run does with a study probability: its calibration and operating point."""

    rule: str
    target: float
    calibration: str
    temperature: float | None  # None: not calibrated
    threshold: float | None  # None: validation could not set one (one class only)
    chosen_on: str
    validation_studies: int
    best_sha256: str | None  # the weights it was chosen for
    note: str = ""

    def calibrate(self, probs):
        """Study probabilities as the run reports them (tempered when calibrated)."""
        if self.temperature is None:
            return probs
        out = apply_temperature(np.asarray(probs), self.temperature)
        return float(out) if np.ndim(probs) == 0 else out

    def label(self, probability: float) -> int | None:
        """1 at or above the threshold, 0 below; None without an operating point."""
        return None if self.threshold is None else int(probability >= self.threshold)

    def matches(self, rule: str, target: float, calibration_kind: str) -> bool:
        """Chosen with these settings (the target matters except for Youden's J)."""
        return (self.rule == rule and self.calibration == calibration_kind
                and (rule == "youden" or math.isclose(self.target, target)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Decision:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def choose_decision(labels: np.ndarray, raw_probs: np.ndarray, rule: str, target: float,
                    calibration_kind: str, best_sha256: str | None, split: str = "val") -> Decision:
    """Fit the calibration (when asked) and then the threshold on one split's study
    labels and uncalibrated study probabilities."""
    labels, raw_probs = np.asarray(labels), np.asarray(raw_probs, dtype=np.float64)
    if calibration_kind not in CALIBRATIONS:
        raise ValueError(f"eval.calibration '{calibration_kind}' is not one of {', '.join(CALIBRATIONS)}")
    n, classes = len(labels), len(np.unique(labels))
    if classes < 2:
        return Decision(rule, target, calibration_kind, None, None, split, n, best_sha256,
                        note=f"the {split} split has only one class among its {n} studies: no operating "
                             "point or calibration can be chosen on it")
    temperature = fit_temperature(labels, raw_probs) if calibration_kind == "temperature" else None
    probs = apply_temperature(raw_probs, temperature) if temperature is not None else raw_probs
    threshold = choose_threshold(labels, probs, rule, target)
    note = ""
    low, high = TEMPERATURE_BOUNDS
    if temperature is not None and not low * 1.01 < temperature < high / 1.01:
        note = (f"the temperature search stopped at its bound ({temperature:.3g}, searched "
                f"{low}-{high}): no temperature fits the {split} "
                "probabilities, so this calibration is a limit, not a fit (the model may separate the "
                f"{n} {split} studies perfectly, or not at all)")
    return Decision(rule, target, calibration_kind, temperature, threshold, split, n, best_sha256, note=note)


def read_decision(path, weights_sha256: str | None) -> Decision | None:
    """The decision stored at ``path`` for these weights; None (logged) when there is none
    or it was chosen for other weights (the run trained on after it was chosen). A
    damaged file is refused by name."""
    import logging
    from pathlib import Path

    from volttl.outputs.records import read_record

    path = Path(path)
    if not path.is_file():
        return None
    decision = Decision.from_dict(read_record(path, "run `volttl evaluate --split val` to choose it again"))
    if decision.best_sha256 != weights_sha256:
        logging.getLogger("volttl.evaluate.decision").warning(
            "%s: chosen for other weights than the run's best.pt now; not used (run `volttl evaluate "
            "--split val` to choose it again)", path)
        return None
    return decision
