"""Dataset, losses, metrics, and a training run that resumes to the same weights."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from volttl.config import config_from_dict, config_to_yaml
from volttl.data import WindowDataset
from volttl.data.input_spec import InputSpec
from volttl.data.intensity import scale_intensity
from volttl.data.sampling import PECentredSampler, last_window_start
from volttl.inference import model_from_config
from volttl.preprocess.step import preprocess_step
from volttl.preprocess.store import Store
from volttl.train.losses import binary_focal_loss
from volttl.train.metrics import bootstrap_ci, summarise
from volttl.train.schedule import warmup_cosine
from volttl.train.step import train_run

from .conftest import small_config

SPEC = InputSpec(8, 32, (-100.0, 900.0), 0.15897)  # the test store's windows, cropped to 32


@pytest.fixture(scope="module")
def store(cohort, tmp_path_factory):
    path = tmp_path_factory.mktemp("trainstore") / "s.h5"
    assert not preprocess_step(small_config(cohort, path, size=40), progress=False).failed
    return path


def test_normalisation_is_penets():
    hu = np.array([-1000.0, -100.0, 400.0, 900.0, 3000.0])
    np.testing.assert_allclose(scale_intensity(hu, (-100, 900), 0.15897),
                               np.array([0, 0, 0.5, 1, 1]) - 0.15897)


def test_eval_windows_centre_crop_and_air_padding(store):
    ds = WindowDataset(str(store), "train", False, SPEC)
    assert len(ds) == len(ds.windows) and ds.window == 8
    x, y, study = ds[len(ds) - 1]
    assert x.shape == (1, 8, 32, 32) and x.dtype == torch.float32
    assert float(y) == float(ds.windows[-1]["label"])
    # a window that runs past the study's end: the slices beyond it are air, the rest the study's
    n = ds.num_slices[study]
    window = ds.read_window(study, n - 3)
    assert (window[3:] == -1000).all() and not (window[:3] == -1000).all()
    with Store(str(store)) as s:
        np.testing.assert_array_equal(window[:3], s.hu(ds.study_ids[study])[n - 3:])
    # evaluation windows are the same from a dataset opened anew (no random draw)
    again = WindowDataset(str(store), "train", False, SPEC)
    assert torch.equal(ds[0][0], again[0][0]) and torch.equal(ds[len(ds) - 1][0], again[len(ds) - 1][0])


def _model_input(ds: WindowDataset, index: int) -> torch.Tensor:
    hu, _, _, params = ds[index]
    assert hu.dtype == torch.int16 and hu.shape[-1] == ds.size  # workers only read
    return ds.model_input(hu[None], params[None], torch.device("cpu"))[0]


def test_training_augmentation_is_keyed_on_epoch_and_index(store):
    ds = WindowDataset(str(store), "train", True, SPEC, seed=5)
    a, b = _model_input(ds, 1), _model_input(ds, 1)
    assert torch.equal(a, b) and a.shape == (1, 8, 32, 32) and a.dtype == torch.float32
    ds.set_epoch(1)
    assert not torch.equal(_model_input(ds, 1), a)


def test_training_augmentation_is_the_configs(store, cohort):
    """augment.transforms and its settings reach the training items: with the crop alone a
    training window is exactly its drawn crop of the stored slices."""
    from volttl.config import config_from_dict

    cfg = config_from_dict({"data": {"store": str(store), "crop": 32},
                            "augment": {"transforms": ["crop"], "pe_prob": 0.0}})
    ds = WindowDataset.from_config(cfg, "train", train=True, seed=3)
    hu, _, study, params = ds[2]
    assert params.shape == (2,)  # the crop's offsets only
    y0, x0 = (int(v) for v in params)
    assert torch.equal(ds.model_input(hu[None], params[None], torch.device("cpu"))[0],
                       ds.spec.scale(hu[..., y0: y0 + 32, x0: x0 + 32].float()))
    assert ds.sampler.prob == 0.0
    assert WindowDataset.from_config(config_from_dict({"data": {"store": str(store), "crop": 32}}),
                                     "train", train=True)[2][3].shape == (4,)  # crop, flip, rotation


def test_pe_centred_sampling_hits_pe_windows(store):
    ds = WindowDataset(str(store), "train", True, SPEC, seed=0)
    if not ds.positive_studies:
        pytest.skip("no positive training study in this small cohort")
    ds.sampler = PECentredSampler(prob=1.0, jitter=0)
    expected = {}  # without jitter: the window centred on the middle of the PE slices
    for s in ds.positive_studies:
        pe = ds.pe_slices[s]
        start = max(0, (int(pe.min()) + int(pe.max())) // 2 - ds.window // 2)
        start = min(start, last_window_start(ds.num_slices[s], ds.window))
        expected[s] = int(((pe >= start) & (pe < start + ds.window)).sum() >= ds.min_pe)
    items = [ds[i] for i in range(len(ds))]
    assert {s for _, _, s, _ in items} <= set(ds.positive_studies)
    assert all(int(y) == expected[s] for _, y, s, _ in items)
    assert any(int(y) == 1 for _, y, _, _ in items)
    ds.sampler = PECentredSampler(prob=1.0, jitter=12)
    assert {ds[i][2] for i in range(len(ds))} <= set(ds.positive_studies)


def test_focal_loss_down_weights_easy_examples():
    logits = torch.tensor([4.0, -4.0, 0.0])
    y = torch.tensor([1.0, 0.0, 1.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    focal = torch.stack([binary_focal_loss(logits[i:i + 1], y[i:i + 1]) for i in range(3)])
    p_t = torch.sigmoid(torch.tensor([4.0, 4.0, 0.0]))
    assert torch.allclose(focal, (1 - p_t) ** 2 * bce)
    assert torch.isclose(binary_focal_loss(logits, y, gamma=0.0), bce.mean())


def test_study_metrics_use_the_max_window():
    probs = np.array([0.1, 0.9, 0.2, 0.3, 0.05])
    studies = np.array([0, 0, 1, 1, 2])
    out = summarise([0, 1, 0, 0, 0], probs, studies, np.array([1, 0, 0]), "max")
    assert out["study_auroc"] == 1.0 and out["studies"] == 3
    mean = summarise([0, 1, 0, 0, 0], probs, studies, np.array([1, 0, 0]), "mean")
    assert mean["study_auroc"] == 1.0
    lo, hi = bootstrap_ci(np.array([0, 1] * 20), np.linspace(0, 1, 40), n=200)["auroc"]
    assert 0 <= lo <= hi <= 1


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=10, warmup_steps=2)
    # step 7: progress 5/8 after warm-up, 0.5 * (1 + cos(5/8 pi)) = 0.309
    assert [round(f(s), 3) for s in (0, 1, 2, 7, 10)] == [0.5, 1.0, 1.0, 0.309, 0.0]


def run_cfg(store, out):
    return config_from_dict({
        "data": {"store": str(store), "crop": 32},
        "model": {"name": "resnext3d_50", "stem": "sum"},
        "transfer": {"strategy": "ttl", "cut": "layer1.0", "head": {"dropout": 0.2}},
        "train": {"epochs": 3, "batch_size": 4, "workers": 0, "lr_new": 0.02,
                  "lr_pretrained": 0.01, "warmup_epochs": 1, "seed": 7, "out_dir": str(out)},
        "eval": {"bootstrap": 0}})


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_run(store, tmp_path):
    straight = tmp_path / "straight"
    train_run(run_cfg(store, tmp_path), straight, progress=False)
    broken = tmp_path / "broken"
    train_run(run_cfg(store, tmp_path), broken, progress=False, stop_after_epoch=0)
    with pytest.raises(ValueError, match="a run is already there"):
        train_run(run_cfg(store, tmp_path), broken, progress=False)
    train_run(run_cfg(store, tmp_path), broken, resume=True, progress=False)
    a = torch.load(straight / "last.pt", weights_only=True)["model_state"]
    b = torch.load(broken / "last.pt", weights_only=True)["model_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
             for d in (straight, broken)]
    assert len(lines[0]) == len(lines[1]) == 3
    for x, y in zip(*lines, strict=True):
        assert x["train_loss"] == y["train_loss"] and x["lr"] == y["lr"]
        assert (x["val_study_auroc"] == y["val_study_auroc"]
                or (math.isnan(x["val_study_auroc"]) and math.isnan(y["val_study_auroc"])))
    assert (straight / "config.yaml").read_text() == (broken / "config.yaml").read_text()
    assert lines[0][0]["lr"][0] < lines[0][1]["lr"][0] or lines[0][2]["lr"][0] < lines[0][1]["lr"][0]


def test_evaluate_writes_metrics_table_and_curves(store, tmp_path):
    from volttl.evaluate.step import evaluate_run

    run = tmp_path / "run"
    train_run(run_cfg(store, tmp_path), run, progress=False)
    metrics = evaluate_run(run, "test", bootstrap=50)
    saved = json.loads((run / "metrics_test.json").read_text())
    assert saved["studies"] == metrics["studies"] > 0
    assert "| test |" in (run / "metrics_test.md").read_text()
    assert (run / "predictions_test.csv").read_text().count("\n") == metrics["studies"] + 1


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_two_process_ddp_on_cpu_ends_with_identical_weights(store, tmp_path, compiled):
    """torchrun, gloo backend: both replicas train on their shards and agree exactly; also
    with runtime.compile (compiled, then wrapped) and gradient accumulation (DDP's no_sync)."""
    cfg = run_cfg(store, tmp_path)
    cfg.train.epochs, cfg.runtime.device = 2, "cpu"
    if compiled:
        cfg.runtime.compile, cfg.train.grad_accum = True, 2
    (tmp_path / "ddp.yaml").write_text(config_to_yaml(cfg))
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(worker), str(tmp_path / "ddp.yaml"),
                           str(tmp_path / "run"), str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"w_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model_state"]
    assert all(torch.equal(a[k], saved[k]) for k in a)
    torch.manual_seed(cfg.train.seed)
    init = model_from_config(cfg).model.state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a if k.endswith("weight"))  # it trained
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone writes the run dir
    log_lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert sum("val study AUROC" in line for line in log_lines) == 2  # one per epoch, rank 0 only
    assert any("2 windows per micro-batch (train.batch_size 4 over 2 process(es))" in line
               for line in log_lines)
    # train.batch_size is the global batch: one process takes the same optimiser steps, with
    # the same examples per step and the same learning rates, as the two did
    train_run(cfg, tmp_path / "single", progress=False)
    single = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    double = [json.loads(x) for x in lines]
    for one, two in zip(single, double, strict=True):
        assert one["optimizer_steps"] == two["optimizer_steps"] > 0
        assert one["examples_per_step"] == two["examples_per_step"] == 4 * cfg.train.grad_accum
        assert one["lr"] == pytest.approx(two["lr"])


@pytest.mark.slow
def test_repeats_train_each_seed_and_report_mean_and_std(store, tmp_path, caplog):
    from volttl.evaluate.step import evaluate_repeats
    from volttl.train.step import train_repeats

    cfg = run_cfg(store, tmp_path)
    cfg.train.epochs, cfg.train.repeats = 1, 2
    with caplog.at_level("INFO", logger="volttl.train"):
        summary = train_repeats(cfg, tmp_path / "group", progress=False)
    first = next(r.getMessage() for r in caplog.records if r.name == "volttl.train")
    assert first.startswith("train.repeats 2: training 2 models, one per seed (7, 8)")  # said up front
    assert summary["seeds"] == [7, 8] and summary["runs"] == ["seed7", "seed8"]
    a = torch.load(tmp_path / "group/seed7/last.pt", weights_only=True)["model_state"]
    b = torch.load(tmp_path / "group/seed8/last.pt", weights_only=True)["model_state"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # different seeds, different runs
    values = [x["study_auroc"] for x in summary["best"] if not math.isnan(x["study_auroc"])]
    if len(values) == 2:
        assert summary["val_study_auroc"]["mean"] == pytest.approx(np.mean(values))
        assert summary["val_study_auroc"]["std"] == pytest.approx(np.std(values, ddof=1))
    before = (tmp_path / "group/seed7/last.pt").stat().st_mtime_ns
    with pytest.raises(ValueError, match="already there"):
        train_repeats(cfg, tmp_path / "group", progress=False)
    again = train_repeats(cfg, tmp_path / "group", resume=True, progress=False)
    assert (tmp_path / "group/seed7/last.pt").stat().st_mtime_ns == before  # finished: skipped
    assert again["best"] == summary["best"]
    test = evaluate_repeats(tmp_path / "group", "test")
    table = (tmp_path / "group/metrics_test.md").read_text()
    assert "| seed7 |" in table and "| mean +- std |" in table and "| sensitivity | specificity |" in table
    assert test["study_auroc"]["n"] <= 2 and set(test["runs"]) == {"seed7", "seed8"}


def test_penet_schedule_per_group_at_chosen_example_counts():
    """PENet's schedule in examples, as its util/optim_util.py linear_warmup_then_cosine
    computes it: warm-up over 10k, pretrained weights 10k later, then
    (1 + cos(pi * (e - 10k) / 600k)) / 2 with e counted from each group's start, 0 from 600k
    on (610k for the delayed group); hand-computed rates, lr 0.01 both groups, batch 8."""
    import math

    import torch

    from volttl.config import config_from_dict
    from volttl.train.schedule import lr_factors

    cfg = config_from_dict({"train": {"schedule": "penet", "lr_pretrained": 0.01, "lr_new": 0.01,
                                      "dampening": 0.9, "batch_size": 8}})
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"name": "pretrained", "params": [params[0]], "lr": 0.01},
                           {"name": "new", "params": [params[1]], "lr": 0.01}], lr=0.01, momentum=0.9,
                          dampening=cfg.train.dampening)
    factors = lr_factors(cfg, ["pretrained", "new"], steps_per_epoch=100, examples_per_step=8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
    expected = {  # step: (pretrained lr, new lr); examples = 8 * step
        0: (0.0, 0.0),
        625: (0.0, 0.01 * 5000 / 10000),          # 5k examples: new half-way through warm-up
        1250: (0.0, 0.01),                        # 10k: new warm, pretrained starts
        1875: (0.01 * 5000 / 10000, 0.01 * 0.5 * (1 + math.cos(math.pi * 5000 / 600000))),
        2500: (0.01, 0.01 * 0.5 * (1 + math.cos(math.pi * 10000 / 600000))),
        37500: (0.01 * 0.5 * (1 + math.cos(math.pi * 280000 / 600000)),
                0.01 * 0.5 * (1 + math.cos(math.pi * 290000 / 600000))),
        75625: (0.01 * 0.5 * (1 + math.cos(math.pi * 585000 / 600000)), 0.0),  # 605k: new done
        80000: (0.0, 0.0),                        # 640k examples: past both ends
    }
    step = 0
    for target in sorted(expected):
        while step < target:
            opt.step()
            sched.step()
            step += 1
        got = tuple(g["lr"] for g in opt.param_groups)
        assert got == pytest.approx(expected[target], abs=1e-12), target
    assert opt.param_groups[0]["dampening"] == 0.9
    from volttl.train.schedule import schedule_end_epoch

    # 610k examples at 24,128 windows an epoch (PENet's training split): 26 epochs
    assert schedule_end_epoch(cfg, ["pretrained", "new"], steps_per_epoch=3016, examples_per_step=8) == 26
    assert schedule_end_epoch(cfg, ["new"], steps_per_epoch=3016, examples_per_step=8) == 25


def test_more_workers_than_cores_is_said_once_and_capped(caplog):
    from volttl.train.loop import available_cores, usable_workers

    usable_workers.cache_clear()
    many = available_cores() + 3
    assert usable_workers(many) == available_cores() and usable_workers(many) == available_cores()
    said = [r for r in caplog.records if "runtime.workers" in r.getMessage()]
    assert len(said) == 1 and f"runtime.workers {many} is more than" in said[0].getMessage()
    assert usable_workers(0) == 0


def test_epochs_past_the_penet_schedules_end_are_said_at_start(store, tmp_path, caplog):
    """A penet schedule that ends (every group at learning rate 0) inside epoch 1 of 3: the
    start of training says that epochs 2-3 will not change the weights, and they do not."""
    cfg = run_cfg(store, tmp_path)
    cfg.train.schedule, cfg.train.warmup_examples, cfg.train.cosine_examples = "penet", 0, 4
    cfg.train.epochs = 3
    with caplog.at_level("WARNING"):
        train_run(cfg, tmp_path / "run", progress=False, stop_after_epoch=1)
    said = [r.getMessage() for r in caplog.records if "will not change the weights" in r.getMessage()]
    assert len(said) == 1 and "epochs 2-3 of train.epochs 3" in said[0]
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["lr"] == [0.0]  # epoch 2 ran at learning rate 0


def _relabelled_store(cohort, tmp_path, relabel) -> Path:
    """The six-study cohort with ``relabel(row)`` applied to each manifest row, preprocessed."""
    from volttl.manifests.schema import read_manifest, write_manifest

    rows = read_manifest(cohort)
    for row in rows:
        relabel(row)
        row.path = str((Path(cohort).parent / row.path).resolve())
    manifest = tmp_path / "m.csv"
    write_manifest(rows, manifest)
    store = tmp_path / "s.h5"
    assert not preprocess_step(small_config(manifest, store, size=40), progress=False).failed
    return store


def test_a_training_split_without_positives_is_refused(cohort, tmp_path):
    """Every training study negative: training stops before its first epoch with one line
    naming the store (it trained and reported best val AUROC 1.000)."""
    from volttl.errors import VolttlError

    def negative_train(row):
        if row.split == "train":
            row.label, row.pe_slices = 0, []

    store = _relabelled_store(cohort, tmp_path, negative_train)
    with pytest.raises(VolttlError, match=f"{store}: the training split's .* hold no positive study"):
        train_run(run_cfg(store, tmp_path), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_validation_split_of_one_class_is_named(cohort, tmp_path, caplog):
    def negative_val(row):
        if row.split == "val":
            row.label, row.pe_slices = 0, []

    store = _relabelled_store(cohort, tmp_path, negative_val)
    cfg = run_cfg(store, tmp_path)
    cfg.train.epochs = 1
    with caplog.at_level("WARNING"):
        train_run(cfg, tmp_path / "run", progress=False)
    said = [m for m in (r.getMessage() for r in caplog.records) if "split holds only negative" in m]
    assert len(said) == 1 and "best.pt will be the last epoch's weights" in said[0]


def test_one_scan_under_two_ids_is_refused_across_splits_and_said_within_one(cohort, tmp_path, caplog):
    """The same DICOM folder under a second id (spelt with a trailing slash) in the test split:
    preprocess stores everything, then refuses in one line naming both ids; training on that
    store refuses too. In the same split it is only said."""
    from volttl.errors import VolttlError
    from volttl.manifests.schema import StudyRow, read_manifest, write_manifest

    rows = read_manifest(cohort)
    for row in rows:
        row.path = str((Path(cohort).parent / row.path).resolve())
    source = next(r for r in rows if r.split == "train" and r.label == 1)
    copy = StudyRow("copy_of_it", source.path + "/", source.label, "test", list(source.pe_slices))
    manifest, store = tmp_path / "m.csv", tmp_path / "s.h5"
    write_manifest([*rows, copy], manifest)
    with pytest.raises(VolttlError, match=rf"{store}: 1 scan\(s\) stored under ids in different splits.*"
                                          rf"{source.study_id} \(train\) = copy_of_it \(test\)"):
        preprocess_step(small_config(manifest, store, size=40), progress=False)
    assert (tmp_path / "s" / "copy_of_it.h5").is_file() or any(tmp_path.rglob("copy_of_it.h5"))
    with pytest.raises(VolttlError, match="evaluation would see training data"):
        train_run(run_cfg(store, tmp_path), tmp_path / "run", progress=False)
    copy.split = "train"
    write_manifest([*rows, copy], manifest)
    with caplog.at_level("WARNING"):
        assert not preprocess_step(small_config(manifest, store, size=40), progress=False).failed
    assert any("stored under more than one id within a split" in r.getMessage() for r in caplog.records)
