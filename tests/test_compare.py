"""The transfer comparison: rows, paired differences, learning checks, nested subsets."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from volttl.analysis.compare import Row, auroc, paired_difference, parse_row, prior_loss, table_markdown
from volttl.config import config_from_dict
from volttl.data.dataset import study_subset
from volttl.errors import VolttlError


def test_rows_name_a_strategy_and_a_declared_cut():
    assert parse_row("scratch", "resnext3d_101") == Row("scratch", "ftl", "", False)
    assert parse_row("FTL", "resnext3d_101") == Row("FTL", "ftl", "", True)
    assert parse_row("ttl@layer3.7", "resnext3d_101") == Row("TTL@layer3.7", "ttl", "layer3.7", True)
    with pytest.raises(VolttlError, match="use scratch, ftl"):
        parse_row("ttl", "resnext3d_101")
    with pytest.raises(Exception, match="layer9"):
        parse_row("tf@layer9", "resnext3d_101")


def test_auroc_counts_ties_half_as_sklearn_does():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    probs = np.round(rng.random(40), 1)  # many ties
    assert auroc(labels, probs) == pytest.approx(roc_auc_score(labels, probs))
    assert np.isnan(auroc(np.zeros(5, int), probs[:5]))


def _seeds(labels, probs_per_seed, studies=None):
    studies = studies or [f"s{i}" for i in range(len(labels))]
    return [{"studies": studies, "labels": labels, "probs": p} for p in probs_per_seed]


def test_paired_difference_is_the_mean_over_seeds_with_an_interval_over_studies():
    """Row a ranks every study right on both seeds, row b inverted on one and at random on the
    other: the point is the seeds' mean difference, its interval (over resampled studies)
    surrounds it and excludes 0; a row against itself is exactly 0 with a zero-width interval."""
    labels = np.array([0, 1] * 20)
    perfect = labels + 0.01 * np.arange(40)
    inverted = 1 - labels.astype(float)
    chance = np.random.default_rng(1).random(40)
    a = _seeds(labels, [perfect, perfect])
    b = _seeds(labels, [inverted, chance])
    d = paired_difference(a, b, resamples=300)
    assert d["mean"] == pytest.approx(np.mean([1.0 - 0.0, 1.0 - roc_auc_score(labels, chance)]))
    assert 0 < d["lo"] < d["mean"] <= d["hi"] and d["resamples"] == 300
    same = paired_difference(a, a, resamples=100)
    assert (same["mean"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    with pytest.raises(VolttlError, match="different studies"):
        paired_difference(a, _seeds(labels, [chance, chance], [f"x{i}" for i in range(40)]), resamples=10)


def test_a_row_that_did_not_learn_is_marked_in_the_table():
    cfg = config_from_dict({"train": {"loss": "bce"}})
    assert prior_loss(cfg, 0.5) == pytest.approx(np.log(2), rel=1e-6)
    share = 0.25  # BCE of the constant 0.25: the entropy of the share
    assert prior_loss(cfg, share) == pytest.approx(-(share * np.log(share) + (1 - share) * np.log(1 - share)),
                                                   rel=1e-4)
    focal = config_from_dict({"train": {"loss": "focal", "focal_gamma": 2.0}})
    assert prior_loss(focal, 0.5) == pytest.approx(0.25 * np.log(2), rel=1e-6)  # (1 - 0.5)^2 ln 2
    row = {"row": "TTL@layer2", "seeds": 3, "test_studies": 30, "test_auroc_mean": 0.45,
           "test_auroc_sd": 0.02,
           "last_loss_over_prior": 0.99, "min_best_val_auroc": 0.48, "learned": False, "params_m": 1.0,
           "macs_g": 0.5, "latency_ms": 3.0}
    assert "| TTL@layer2 (did not learn) |" in table_markdown([row], cfg)


def test_training_subsets_keep_the_share_of_positives_and_nest():
    labels = [1 if i % 3 == 0 else 0 for i in range(60)]
    members = list(range(60))
    small, large = study_subset(members, labels, 10, "s.h5"), study_subset(members, labels, 20, "s.h5")
    assert len(small) == 10 and len(large) == 20 and set(small) <= set(large)
    assert sum(labels[i] for i in large) == round(20 / 3)
    assert study_subset(members, labels, 10, "s.h5") == small  # whatever the run's seed
    with pytest.raises(VolttlError, match="s.h5: data.train_studies 61 is more than the 60"):
        study_subset(members, labels, 61, "s.h5")
