"""The two-stage cut-point search: which cuts each stage trains, the table, resuming,
and the Ray backend on a local cluster."""

import json

import pytest

from volttl.config import config_from_dict
from volttl.preprocess.step import preprocess_step
from volttl.search.stages import stage1_cuts, stage2_cuts
from volttl.search.step import search_step

from .conftest import small_config


def test_stage_cuts_follow_the_declared_cut_points():
    assert stage1_cuts("resnext3d_101", []) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert stage1_cuts("penet", []) == ["stem", "encoders.0", "encoders.1", "encoders.2", "encoders.3"]
    # +-3 bottlenecks around layer3 (= layer3.22); layer3.22 and layer4.2 equal trained block cuts
    assert stage2_cuts("resnext3d_101", "layer3", 3, ["layer3", "layer4"]) == [
        "layer3.19", "layer3.20", "layer3.21", "layer4.0", "layer4.1"]
    with pytest.raises(ValueError, match="not a cut point"):
        stage1_cuts("resnext3d_101", ["layer9"])


@pytest.fixture(scope="module")
def store(cohort, tmp_path_factory):
    path = tmp_path_factory.mktemp("searchstore") / "s.h5"
    assert not preprocess_step(small_config(cohort, path, size=40), progress=False).failed
    return path


def search_cfg(store, out, backend="sequential"):
    return config_from_dict({
        "data": {"store": str(store), "crop": 32},
        "model": {"name": "resnext3d_50"},
        "transfer": {"head": {"pool": "max", "norm": True}},
        "train": {"epochs": 1, "batch_size": 4, "workers": 0, "repeats": 2, "lr_new": 0.01,
                  "out_dir": str(out / "runs")},
        "eval": {"bootstrap": 0},
        "profile": {"input_size": [8, 32, 32], "repeats": 1, "warmup": 0},
        "search": {"strategies": ["ttl", "lwft"], "block_cuts": ["stem", "layer1"], "radius": 1,
                   "baselines": ["ftl"], "backend": backend, "out_dir": str(out / "search")}})


@pytest.mark.slow
def test_tiny_search_writes_the_table_and_resumes(store, tmp_path):
    cfg = search_cfg(store, tmp_path)
    rows = search_step(cfg, progress=False)
    assert [r["strategy"] for r in rows] == ["FTL", "TTL-1", "TTL-2", "LWFT-1", "LWFT-2"]
    out = tmp_path / "search"
    trials = {json.loads(p.read_text())["dir"].rsplit("/", 1)[-1]: json.loads(p.read_text())
              for p in out.glob("*/trial.json")}
    # stage 1: each strategy at both block cuts; stage 2: the layer cut next to each winner
    for st in ("ttl", "lwft"):
        first = {c: trials[f"resnext3d_50_{st}_{c}"] for c in ("stem", "layer1")}
        winner = max(first, key=lambda c: first[c]["val_study_auroc"]["mean"])
        row = next(r for r in rows if r["strategy"] == f"{st.upper()}-1")
        assert row["cut"] == winner
        # radius 1 around stem: layer1.0; around layer1 (= layer1.2): layer1.1 and layer2.0
        near = {"stem": {"layer1.0"}, "layer1": {"layer1.1", "layer2.0"}}[winner]
        second = {name.split(f"_{st}_")[1] for name in trials if f"_{st}_" in name} - {"stem", "layer1"}
        assert second == near
        stage2 = next(r for r in rows if r["strategy"] == f"{st.upper()}-2")
        pool = {c: trials[f"resnext3d_50_{st}_{c}"]["val_study_auroc"]["mean"] for c in near | {winner}}
        assert pool[stage2["cut"]] == max(pool.values())
    ftl = rows[0]
    assert ftl["repeats"] == 2 and ftl["auroc_std"] >= 0 and ftl["params_m"] > rows[1]["params_m"]
    table = (out / "search_table.md").read_text()
    assert "| ResNeXt3D-50 | TTL-2 |" in table and "+-" in table
    assert (out / "search_table.csv").read_text().count("\n") == 6
    # resume: every trial is found and skipped
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/trial.json")}
    assert search_step(cfg, progress=False) == rows
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/trial.json")} == stamps


@pytest.mark.slow
def test_ray_backend_runs_trials_as_tasks(store, tmp_path):
    pytest.importorskip("ray")
    cfg = search_cfg(store, tmp_path, backend="ray")
    cfg.search.strategies, cfg.search.block_cuts, cfg.search.baselines = ["ttl"], ["stem"], []
    cfg.train.repeats = 1
    rows = search_step(cfg, progress=False)
    assert [r["strategy"] for r in rows] == ["TTL-1", "TTL-2"]
    assert (tmp_path / "search/resnext3d_50_ttl_layer1.0/trial.json").is_file()  # stage 2 ran too
    assert (tmp_path / "search/resnext3d_50_ttl_stem/seed0/best.pt").is_file()


def test_a_finished_trial_is_not_reused_on_other_training_data(cohort, tmp_path):
    import csv
    from pathlib import Path

    from volttl.config import config_to_dict
    from volttl.outputs.folders import RunError
    from volttl.search.trials import run_trial

    store = tmp_path / "s.h5"
    prep = small_config(cohort, store, size=40)
    assert not preprocess_step(prep, progress=False).failed
    cfg = search_cfg(store, tmp_path)
    cfg.train.repeats, cfg.transfer.strategy, cfg.transfer.cut = 1, "ttl", "stem"
    first = run_trial(config_to_dict(cfg), str(tmp_path / "trial"))
    assert run_trial(config_to_dict(cfg), str(tmp_path / "trial")) == first  # unchanged: reused
    with open(cohort) as fh:
        rows = list(csv.reader(fh))
    base = Path(cohort).parent
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:  # a training study's PE slices corrected
        csv.writer(fh).writerows([rows[0]] + [[r[0], str(base / r[1]), *r[2:4],
                                               "27-33" if r[0] == "synth001" else r[4], *r[5:]]
                                              for r in rows[1:]])
    prep.data.manifest = str(manifest)
    assert not preprocess_step(prep, progress=False).failed
    with pytest.raises(RunError, match="training or validation data changed"):
        run_trial(config_to_dict(cfg), str(tmp_path / "trial"))
