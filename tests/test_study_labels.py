"""Study-level labels: bags of a study's windows, pooled into the study logit the loss sees."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from volttl.config import config_to_yaml
from volttl.data.sampling import StudyBagSampler, pool_bags
from volttl.manifests import ManifestError
from volttl.preprocess.step import preprocess_step

from .conftest import small_config


def test_bags_hold_whole_studies_and_are_keyed_on_the_epoch():
    studies = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4])
    bags = StudyBagSampler(studies, bag=3, studies_per_batch=2, seed=5)
    batches = list(bags)
    assert len(batches) == len(bags) == 3
    drawn = [b[i:i + 3] for b in batches for i in range(0, len(b), 3)]
    assert sorted({int(studies[w[0]]) for w in drawn}) == [0, 1, 2, 3, 4]  # every study, once
    for bag in drawn:
        assert len({int(studies[w]) for w in bag}) == 1  # one study per bag
        if studies[bag[0]] in (0, 3):
            assert len(set(bag)) == 3  # without replacement when the study has enough windows
    assert [list(b) for b in bags] == batches  # same epoch, same bags
    bags.set_epoch(1)
    assert list(bags) != batches
    ranks = [StudyBagSampler(studies, 3, 2, seed=5, rank=r, world=2) for r in (0, 1)]
    seen = {int(studies[b[i]]) for s in ranks for b in s for i in range(0, len(b), 3)}
    assert seen == {0, 1, 2, 3, 4}


def test_pooling_is_max_or_log_mean_exp():
    logits = torch.tensor([0.0, 2.0, -1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(pool_bags(logits, 3, "max"), [2.0, 1.0])
    lse = pool_bags(logits, 3, "lse")
    assert lse[1] == pytest.approx(1.0)  # equal windows: the window's own logit
    assert 1 / 3 < lse[0] < 2.0 and lse[0] == pytest.approx(math.log((1 + math.e ** 2 + math.e ** -1) / 3))
    # the sharpness r moves the pool from the mean (small r) to the max (large r)
    sharp = [float(pool_bags(logits, 3, "lse", r)[0]) for r in (1e-4, 1.0, 5.0, 1e3)]
    assert sharp[0] == pytest.approx(1 / 3, abs=1e-3) and sharp[-1] == pytest.approx(2.0, abs=2e-3)
    assert sharp == sorted(sharp)
    assert sharp[2] == pytest.approx(math.log((1 + math.e ** 10 + math.e ** -5) / 3) / 5)
    assert float(pool_bags(logits, 3, "lse", 5.0)[1]) == pytest.approx(1.0)  # equal windows: unchanged


def _study_label_manifest(cohort: Path, tmp_path: Path, keep_slices: set[str] = frozenset()) -> Path:
    """The cohort's manifest with absolute paths and no pe_slices, but those of the studies
    in ``keep_slices``."""
    with open(cohort) as fh:
        rows = list(csv.DictReader(fh))
    out = tmp_path / "m.csv"
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, "path": str(cohort.parent / r["path"]), "mask": str(cohort.parent / r["mask"]),
                        "pe_slices": r["pe_slices"] if r["study_id"] in keep_slices else ""})
    return out


def test_slice_labels_refuse_positives_without_pe_slices(cohort, tmp_path):
    manifest = _study_label_manifest(Path(cohort), tmp_path)
    cfg = small_config(manifest, tmp_path / "s.h5")
    # only training positives need slices: synth003 (not training) is scored at study level
    with pytest.raises(ManifestError, match=r"1 training positive study\(ies\) without pe_slices "
                                            r"\(synth001\)"):
        preprocess_step(cfg, progress=False)
    assert not (tmp_path / "s.h5").exists()


def _study_label_config(cohort, tmp_path):
    """A tiny study-label training setup on the small cohort, preprocessed."""
    manifest = _study_label_manifest(Path(cohort), tmp_path)
    cfg = small_config(manifest, tmp_path / "s.h5")
    cfg.data.labels, cfg.data.bag_windows, cfg.data.crop = "study", 2, 32
    cfg.model.name, cfg.transfer.strategy, cfg.transfer.cut = "resnext3d_50", "ttl", "stem"
    cfg.train.epochs, cfg.train.batch_size, cfg.runtime.workers, cfg.eval.bootstrap = 1, 4, 0, 0
    assert not preprocess_step(cfg, progress=False).failed
    return cfg


@pytest.mark.slow
def test_training_from_study_labels_sees_one_pooled_logit_per_study(cohort, tmp_path, monkeypatch):
    cfg = _study_label_config(cohort, tmp_path)
    import volttl.train.loop as loop
    from volttl.train.step import train_run

    seen = []
    real = loop.make_loss

    def spy(name, gamma):
        fn = real(name, gamma)

        def loss(logits, y):
            seen.append((tuple(logits.shape), y.detach().clone()))
            return fn(logits, y)
        return loss

    monkeypatch.setattr(loop, "make_loss", spy)
    (tmp_path / "c.yaml").write_text(config_to_yaml(cfg))
    best = train_run(cfg, tmp_path / "run", progress=False)
    assert seen and all(shape == (2,) for shape, _ in seen)  # 4 windows per batch -> 2 studies
    assert "study_auroc" in best


def test_pseudo_slices_are_each_training_positives_best_windows(cohort, tmp_path):
    """The windows taken as a study's PE slices: the one the first model scores highest,
    and any other it scores above every negative training study's best; for training
    positives only. The training dataset then samples and labels windows from them, as
    with slice labels, the study's other windows its negatives."""
    from volttl.data import WindowDataset
    from volttl.data.input_spec import InputSpec
    from volttl.inference import StudyScore
    from volttl.preprocess.store import Store
    from volttl.train.pseudo import pseudo_slices

    cfg = _study_label_config(cohort, tmp_path)
    window = cfg.preprocess.window
    with Store(cfg.data.store) as store:
        order = [(store.study_ids[i], int(store.labels[i])) for i in store.studies_in("train")]
        n = {sid: store.hu(sid).shape[0] for sid, _ in order}

        class Scorer:  # positives: the last window 0.9, the first 0.8; negatives: 0.5 everywhere
            def __init__(self):
                self.cfg, self.calls = cfg, iter(order)
                self.input = InputSpec.of(cfg)

            def score_study(self, hu):
                sid, label = next(self.calls)
                starts = list(range(0, hu.shape[0], window))
                probs = [0.5] * len(starts) if label != 1 else [0.8] + [0.1] * (len(starts) - 2) + [0.9]
                return StudyScore(max(probs), starts, probs[-len(starts):])

        slices = pseudo_slices(Scorer(), store)
    positives = [sid for sid, label in order if label == 1]
    assert sorted(slices) == sorted(positives)
    for sid, ranges in slices.items():
        last_start = (n[sid] - 1) // window * window
        want = [(last_start, n[sid] - 1)] if last_start == 0 else [(0, window - 1), (last_start, n[sid] - 1)]
        assert ranges == want  # the best window, and the first: above every negative's 0.5
    ds = WindowDataset.from_config(cfg, "train", train=True, pe_slices=slices)
    assert not ds.study_labels_only and ds.sampler is not None  # slice-label training
    i = ds.study_ids.index(positives[0])
    expected = np.concatenate([np.arange(a, b + 1) for a, b in slices[positives[0]]])
    np.testing.assert_array_equal(ds.pe_slices[i], expected)
    first, last = slices[positives[0]][-1]
    assert ds.window_label(i, first) == 1 and i in ds.positive_studies
    # the study's other windows are its negatives, as with slice labels: the contrast
    # within a positive study is what makes the maps point at the embolus
    between = [int(r["start"]) for r in ds.windows
               if int(r["study"]) == i and window <= int(r["start"]) < first - window]
    assert all(ds.window_label(i, start) == 0 for start in between)
    assert WindowDataset.from_config(cfg, "train", train=True).study_labels_only  # without: bags


@pytest.mark.slow
def test_pseudo_slices_train_bags_then_the_run_from_their_windows(cohort, tmp_path):
    """data.pseudo_slices: round 1 from bags in <run>/bags, the windows it chose recorded
    (checksummed, naming its weights), round 2 the run's own model; a resumed finished run
    trains neither round again."""
    import json

    from volttl.models.checkpoints import read_checkpoint
    from volttl.outputs.folders import PSEUDO_SLICES
    from volttl.train.step import train_run

    cfg = _study_label_config(cohort, tmp_path)
    cfg.data.pseudo_slices = True
    run = tmp_path / "run"
    best = train_run(cfg, run, progress=False)
    assert "study_auroc" in best
    for folder in (run, run / "bags"):
        assert (folder / "best.pt").is_file() and (folder / "metrics.jsonl").is_file()
    record = json.loads((run / PSEUDO_SLICES).read_text())
    assert record["from_weights_sha256"] == read_checkpoint(run / "bags" / "best.pt")[2]["state_sha256"]
    assert record["studies"] and all(r and all(a <= b for a, b in r) for r in record["studies"].values())
    assert "pseudo_slices: true" in (run / "config.yaml").read_text()
    assert "pseudo_slices: false" in (run / "bags" / "config.yaml").read_text()
    stamp = (run / "bags" / "best.pt").stat().st_mtime_ns, (run / "best.pt").stat().st_mtime_ns
    train_run(cfg, run, resume=True, progress=False)  # finished: round 1 is not trained again
    assert (run / "bags" / "best.pt").stat().st_mtime_ns == stamp[0]


def test_pseudo_slices_need_study_labels():
    from volttl.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="data.pseudo_slices must be false unless data.labels is study"):
        config_from_dict({"data": {"pseudo_slices": True}})
    assert config_from_dict({"data": {"labels": "study", "pseudo_slices": True}}).data.pseudo_slices


def test_study_labels_without_pseudo_slices_warn_that_maps_will_not_localise(cohort, tmp_path, caplog,
                                                                              monkeypatch):
    import volttl.train.step as step
    from volttl.train.step import train_step

    cfg = _study_label_config(cohort, tmp_path)
    monkeypatch.setattr(step, "train_run", lambda *a, **k: {"study_auroc": 0.5, "epoch": 0})
    for pseudo in (False, True):
        caplog.clear()
        cfg.data.pseudo_slices = pseudo
        with caplog.at_level("WARNING", logger="volttl.train"):
            train_step(cfg, tmp_path / f"run{pseudo}", resume=False, progress=False)
        assert ("do not point at the embolus" in caplog.text) is not pseudo


def test_study_labels_say_when_training_positives_have_pe_slices_they_do_not_use(cohort, tmp_path, caplog,
                                                                                 monkeypatch):
    """A cohort with slices for some studies trained with study labels: the slices are not
    used, and the log says how many."""
    import volttl.train.step as step
    from volttl.train.step import train_step

    with open(cohort) as fh:
        rows = list(csv.DictReader(fh))
    first = next(r["study_id"] for r in rows
                 if r["split"] == "train" and r["label"] == "1" and r["pe_slices"])
    manifest = _study_label_manifest(Path(cohort), tmp_path, keep_slices={first})  # one study's slices
    cfg = small_config(manifest, tmp_path / "s.h5")
    cfg.data.labels, cfg.data.crop = "study", 32
    assert not preprocess_step(cfg, progress=False).failed
    positives = sum(r["split"] == "train" and r["label"] == "1" for r in rows)
    monkeypatch.setattr(step, "train_run", lambda *a, **k: {"study_auroc": 0.5, "epoch": 0})
    with caplog.at_level("WARNING", logger="volttl.train"):
        train_step(cfg, tmp_path / "run", resume=False, progress=False)
    assert f"the pe_slices of 1 of the {positives} training positive(s) are not used" in caplog.text
    caplog.clear()
    cfg.data.labels = "slices"  # every positive would need slices: only this check is of interest here
    monkeypatch.setattr("volttl.train.step.check_before_training", lambda *a: None)
    with caplog.at_level("WARNING", logger="volttl.train"):
        train_step(cfg, tmp_path / "run2", resume=False, progress=False)
    assert "are not used" not in caplog.text


@pytest.mark.slow
def test_pseudo_slices_under_two_processes_are_scored_once_and_trained_alike(cohort, tmp_path):
    """torchrun, gloo: rank 0 alone scores the training positives between the rounds, the
    other rank takes its record, and both replicas end with the same weights."""
    import os
    import subprocess
    import sys

    import torch

    from volttl.config import config_to_yaml

    cfg = _study_label_config(cohort, tmp_path)
    cfg.data.pseudo_slices, cfg.runtime.device = True, "cpu"
    (tmp_path / "ddp.yaml").write_text(config_to_yaml(cfg))
    worker = Path(__file__).with_name("ddp_worker.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "2", str(worker), str(tmp_path / "ddp.yaml"), str(tmp_path / "run"),
                           str(tmp_path / "w")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    scored = [line for line in done.stderr.splitlines() if "scoring the training studies" in line]
    assert len(scored) == 1 and scored[0].startswith("rank0: "), scored
    assert sum("round 2 of 2" in line for line in done.stderr.splitlines()) == 2  # both ranks train it
    a, b = (torch.load(tmp_path / f"w_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "run" / "pseudo_slices.json").is_file()
    assert (tmp_path / "run" / "bags" / "best.pt").is_file()
