"""SVCCA on cases whose answer is known."""

import json

import numpy as np
import pytest

from volttl.analysis.svcca import feature_points, overlap, random_baseline, suggest_cut, svcca


def _features(n=2000, d=24, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, d))
    return latent @ rng.standard_normal((d, d))  # correlated features, full rank


def test_identical_features_give_coefficients_near_one():
    x = _features()
    c = svcca(x, x)
    assert len(c) > 10 and c.min() > 0.999


def test_an_invertible_linear_map_gives_coefficients_near_one():
    x = _features()
    mix = np.random.default_rng(1).standard_normal((24, 24)) + 3 * np.eye(24)
    y = x @ mix + 5.0  # a linear map and a shift
    assert svcca(x, y, keep=1.0).min() > 0.999  # CCA itself is invariant to it
    c = svcca(x, y)  # the 99% PCA step keeps slightly different subspaces of x and y
    assert np.median(c) > 0.999 and c.mean() > 0.95


def test_independent_features_match_the_random_baseline():
    x, y = _features(seed=2), _features(seed=3)
    c = svcca(x, y)
    base = random_baseline(len(x), (len(c), len(c)))
    assert c.mean() < 0.2  # nothing shared ...
    assert abs(c.mean() - base.mean()) < 0.03 and overlap(c, base) > 0.6  # ... like random features
    assert overlap(svcca(x, x), base) < 0.05


def test_pca_step_drops_low_variance_noise_directions():
    rng = np.random.default_rng(4)
    signal = rng.standard_normal((3000, 5))
    x = np.hstack([signal * 10, rng.standard_normal((3000, 20)) * 0.01])  # 5 real directions
    rotation = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    y = np.hstack([signal @ rotation * 10, rng.standard_normal((3000, 20)) * 0.01])
    c = svcca(x, y)
    assert len(c) == 5 and c.min() > 0.999


def test_suggested_cut_is_where_reuse_stops():
    """Cut points 1-3 keep a fading share of the pretrained features, 4 and 5 keep none."""
    rng = np.random.default_rng(5)
    n, d = 2000, 16
    before = [rng.standard_normal((n, d)) for _ in range(5)]
    after, overlaps = [], []
    for i, (b, shared) in enumerate(zip(before, [1.0, 0.8, 0.5, 0.0, 0.0], strict=True)):
        fresh = rng.standard_normal((n, d))
        a = shared * b + np.sqrt(1 - shared ** 2) * fresh if shared < 1 else b
        after.append(a)
        c = svcca(b, a)
        overlaps.append(overlap(c, random_baseline(n, (d, d), seed=i)))
    names = ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert suggest_cut(names, overlaps) == "layer3"
    assert suggest_cut(names[:3], overlaps[:3]) is None


def test_feature_points_puts_channels_last():
    fmap = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(float)  # N=2, C=3, 4 positions
    pts = feature_points(fmap)
    assert pts.shape == (8, 3)
    np.testing.assert_array_equal(pts[1], fmap[0, :, 1])
    np.testing.assert_array_equal(pts[5], fmap[1, :, 1])
    with pytest.raises(ValueError, match="same points"):
        svcca(pts, pts[:4])


@pytest.fixture(scope="module")
def untouched_run(cohort, tmp_path_factory):
    """A run dir whose best.pt is the model exactly as training builds it (no step taken)."""
    import torch
    import yaml

    from volttl.config import config_from_dict, config_to_dict
    from volttl.inference import model_from_config
    from volttl.models.checkpoints import save_checkpoint
    from volttl.preprocess.step import preprocess_step

    from .conftest import small_config

    root = tmp_path_factory.mktemp("svccarun")
    store = root / "s.h5"
    assert not preprocess_step(small_config(cohort, store, size=40), progress=False).failed
    cfg = config_from_dict({"data": {"store": str(store), "crop": 32},
                            "model": {"name": "resnext3d_50", "stem": "sum"},
                            "transfer": {"strategy": "ftl"}, "train": {"seed": 11}})
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    torch.manual_seed(11)
    save_checkpoint(run / "best.pt", model_from_config(cfg).model, config=config_to_dict(cfg), epoch=0)
    return run


def test_svcca_step_before_equals_after_when_nothing_was_learned(untouched_run, tmp_path):
    from volttl.analysis.step import svcca_step

    # 8 x 32 x 32 windows: deeper cuts have too few positions for their channels
    rec = svcca_step(untouched_run, tmp_path, split="train", windows=8, max_points=1600,
                     cuts=["stem", "layer1"], progress=False).record
    assert [r["cut"] for r in rec["cuts"]] == ["stem", "layer1"]
    for r in rec["cuts"]:
        assert min(r["coefficients"]) > 0.99, r["cut"]  # the run's initial model, rebuilt exactly
        assert r["overlap"] < 0.1 and r["random_mean"] < 0.9
    assert rec["suggested_cut"] is None
    assert (tmp_path / "svcca.png").stat().st_size > 5000
    saved = json.loads((tmp_path / "svcca.json").read_text())
    assert saved["windows"] == 8 and saved["cuts"][0]["points"] == 1600  # 200 positions of 8 windows
    # a pipeline's rerun keeps a record made from the same inputs, and remakes one made from others
    again = svcca_step(untouched_run, tmp_path, split="train", windows=8, max_points=1600,
                       cuts=["stem", "layer1"], progress=False, reuse=True)
    assert again.skipped and again.record == saved
    other = svcca_step(untouched_run, tmp_path, split="train", windows=4, max_points=1600,
                       cuts=["stem"], progress=False, reuse=True)
    assert not other.skipped and json.loads((tmp_path / "svcca.json").read_text())["windows"] == 4


def test_svcca_runs_where_it_is_told(untouched_run, tmp_path, capsys):
    """--device puts both models there (here: a CUDA device that is missing is named)."""
    import torch

    from volttl.cli import main

    if torch.cuda.is_available():
        pytest.skip("this check needs a machine without CUDA")
    assert main(["svcca", "--run", str(untouched_run), "--out", str(tmp_path), "--device", "cuda",
                 "--cut", "stem", "--windows", "2", "--quiet"]) == 1
    assert "no CUDA GPU is available" in capsys.readouterr().err
    assert main(["svcca", "--run", str(untouched_run), "--out", str(tmp_path), "--device", "cpu",
                 "--cut", "stem", "--windows", "2", "--split", "train", "--quiet"]) == 0
