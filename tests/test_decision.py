"""From a probability to a decision: operating points, calibration, and their use by
evaluate, predict and cam."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from volttl.evaluate.decision import (
    Decision,
    apply_temperature,
    calibration,
    choose_decision,
    choose_threshold,
    fit_temperature,
    rates,
    rates_with_ci,
    read_decision,
)
from volttl.outputs.records import RecordError, read_record, write_record

from .conftest import train_tiny_run

RNG = np.random.default_rng(7)
LABELS = np.array([0] * 30 + [1] * 20)
SCORES = np.concatenate([RNG.beta(2, 5, 30), RNG.beta(5, 2, 20)])


def _sens_spec(threshold: float) -> tuple[float, float]:
    called = SCORES >= threshold
    return called[LABELS == 1].mean(), (~called[LABELS == 0]).mean()


def test_the_sensitivity_point_is_the_highest_threshold_reaching_the_target():
    t = choose_threshold(LABELS, SCORES, "sensitivity", 0.9)
    assert t in SCORES and _sens_spec(t)[0] >= 0.9
    higher = SCORES[SCORES > t]
    assert _sens_spec(higher.min())[0] < 0.9  # the next threshold up misses the target


def test_the_specificity_point_is_the_lowest_threshold_keeping_the_target():
    t = choose_threshold(LABELS, SCORES, "specificity", 0.9)
    assert _sens_spec(t)[1] >= 0.9
    assert _sens_spec(SCORES[SCORES < t].max())[1] < 0.9


def test_youden_maximises_sensitivity_plus_specificity():
    t = choose_threshold(LABELS, SCORES, "youden", 0.0)
    best = max(sum(_sens_spec(s)) for s in SCORES)
    assert sum(_sens_spec(t)) == pytest.approx(best)


def test_rates_and_their_intervals():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.2, 0.1, 0.1, 0.05])
    r = rates(labels, (probs >= 0.5).astype(int))
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (3, 1, 1, 5)
    assert r["sensitivity"] == 0.75 and r["specificity"] == pytest.approx(5 / 6)
    assert r["ppv"] == 0.75 and r["npv"] == pytest.approx(5 / 6)
    ci = rates_with_ci(labels, probs, 0.5)
    for k in ("sensitivity", "specificity", "ppv", "npv"):
        lo, hi = ci[f"{k}_ci"]
        assert 0 <= lo <= ci[k] <= hi <= 1 and lo < hi
    assert ci["sensitivity_ci"] == pytest.approx((0.3006, 0.9544), abs=1e-4)  # Wilson, 3 of 4
    perfect = rates_with_ci(np.array([0] * 25 + [1]), np.array([0.1] * 25 + [0.9]), 0.5)
    assert perfect["specificity"] == 1.0 and perfect["specificity_ci"][0] == pytest.approx(0.8668, abs=1e-4)
    assert np.isnan(rates(np.array([0, 0]), np.array([0, 0]))["sensitivity"])  # no positives


def test_ece_matches_its_definition():
    probs = np.array([0.05, 0.15, 0.12, 0.55, 0.58, 0.95, 0.91, 0.99])
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 1])
    out = calibration(labels, probs, bins=10)
    expected = 0.0
    for lo in np.arange(10) / 10:
        inside = (probs >= lo) & (probs < lo + 0.1)
        if inside.any():
            expected += inside.mean() * abs(probs[inside].mean() - labels[inside].mean())
    assert out["ece"] == pytest.approx(expected)
    assert sum(out["counts"]) == len(probs) and len(out["counts"]) == len(out["observed"]) == 4


def test_temperature_scaling_recovers_an_overconfident_models_temperature():
    z = np.random.default_rng(0).normal(0, 3, 20000)
    labels = (np.random.default_rng(1).random(len(z)) < 1 / (1 + np.exp(-z / 2.5))).astype(int)
    probs = 1 / (1 + np.exp(-z))  # the model is 2.5x too sure of itself
    assert fit_temperature(labels, probs) == pytest.approx(2.5, rel=0.05)
    tempered = apply_temperature(probs, 2.5)
    assert calibration(labels, tempered)["ece"] < calibration(labels, probs)["ece"] / 3
    assert np.array_equal(np.argsort(tempered, kind="stable"), np.argsort(probs, kind="stable"))


def test_one_class_on_validation_gives_no_operating_point_and_says_why():
    d = choose_decision(np.zeros(5, int), np.linspace(0, 1, 5), "sensitivity", 0.9, "temperature", None)
    assert d.threshold is None and d.temperature is None and d.label(0.99) is None
    assert "only one class" in d.note


def test_records_refuse_an_edit_and_a_stale_decision_is_not_used(tmp_path, caplog):
    path = tmp_path / "operating_point.json"
    d = Decision("sensitivity", 0.9, "none", None, 0.4, "val", 10, "abc")
    write_record(path, d.to_dict())
    assert read_decision(path, "abc") == d
    assert read_decision(path, "other weights") is None
    assert "chosen for other weights" in caplog.text
    record = json.loads(path.read_text())
    record["threshold"] = 0.01  # a hand edit
    path.write_text(json.dumps(record))
    with pytest.raises(RecordError, match=r"operating_point\.json: damaged: .* evaluate --split val"):
        read_decision(path, "abc")
    path.write_text('{"rule": ')  # cut short
    with pytest.raises(RecordError, match="not readable JSON"):
        read_record(path, "repair")
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.fixture(scope="module")
def tiny_run(cohort, tmp_path_factory):
    return train_tiny_run(Path(cohort), tmp_path_factory.mktemp("decision"))[1]


def _csv(path: Path) -> dict[str, dict]:
    with path.open() as fh:
        return {r["study_id"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_evaluate_chooses_on_val_and_predict_and_cam_apply_the_same_call(tiny_run, cohort, tmp_path):
    from volttl.evaluate.step import evaluate_run
    from volttl.explain.step import cam_step
    from volttl.models.checkpoints import read_checkpoint
    from volttl.predict.step import predict_step

    metrics = evaluate_run(tiny_run, "test", bootstrap=20,
                           overrides=["eval.calibration=temperature", "eval.target=1.0"])
    stored = read_record(tiny_run / "operating_point.json", "")
    assert stored["chosen_on"] == "val" and stored["calibration"] == "temperature"
    assert stored["best_sha256"] == read_checkpoint(tiny_run / "best.pt")[2]["state_sha256"]
    t, temperature = stored["threshold"], stored["temperature"]
    assert t is not None and temperature is not None
    assert metrics["operating_point"]["threshold"] == t and "sensitivity_ci" in metrics["operating_point"]
    assert "ece" in metrics["calibration"] and (tiny_run / "reliability_test.png").stat().st_size > 1000
    assert "Operating point chosen on val" in (tiny_run / "metrics_test.md").read_text()
    evaluated = _csv(tiny_run / "predictions_test.csv")
    for row in evaluated.values():
        assert int(row["predicted_label"]) == int(float(row["probability"]) >= t)
        assert float(row["threshold"]) == pytest.approx(t, abs=1e-6)
    # predict and cam read the stored decision: the same calibrated probability and call
    manifest = {r["study_id"]: r for r in csv.DictReader(open(cohort))}
    sources = [Path(cohort).parent / manifest[s]["path"] for s in evaluated]
    records, failed = predict_step(tiny_run, sources, tmp_path / "pred", cam=False, progress=False)
    assert not failed
    predicted = _csv(tmp_path / "pred" / "predictions.csv")
    cams = cam_step(tiny_run, tmp_path / "cam", split="test", progress=False).records
    cams = {r["study_id"]: r for r in cams}
    for sid, row in evaluated.items():
        name = Path(manifest[sid]["path"]).name.removesuffix(".nii.gz")
        assert float(predicted[name]["probability"]) == pytest.approx(float(row["probability"]), abs=2e-6)
        assert predicted[name]["predicted_label"] == row["predicted_label"]
        assert cams[sid]["probability"] == pytest.approx(float(row["probability"]), abs=2e-6)
        assert cams[sid]["predicted_label"] == int(row["predicted_label"])
        raw = max(cams[sid]["window_probabilities"])  # the model's own, before calibration
        assert cams[sid]["probability"] == pytest.approx(float(apply_temperature(raw, temperature)), abs=2e-6)
    # evaluating with the run's own settings chooses again (uncalibrated) and says so in the file
    evaluate_run(tiny_run, "val", bootstrap=0)
    assert read_record(tiny_run / "operating_point.json", "")["temperature"] is None


def test_a_temperature_at_the_searchs_bound_is_said_to_be_no_fit():
    """Validation probabilities whose ranking is inverted: the likelihood keeps improving
    towards the largest temperature, so the search ends at its bound, and the decision says
    the calibration is a limit, not a fit (it was reported as fitted); a real fit says nothing."""
    labels = np.array([0, 1] * 10)
    inverted = np.where(labels == 1, 0.2, 0.8)
    d = choose_decision(labels, inverted, "sensitivity", 0.9, "temperature", None)
    assert d.temperature == pytest.approx(20.0, rel=0.01) and "stopped at its bound" in d.note
    z = np.random.default_rng(0).normal(0, 3, 400)
    fair = (np.random.default_rng(1).random(len(z)) < 1 / (1 + np.exp(-z / 2.5))).astype(int)
    assert choose_decision(fair, 1 / (1 + np.exp(-z)), "sensitivity", 0.9, "temperature", None).note == ""
