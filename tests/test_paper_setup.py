"""The TTL paper's PE experiment as configs/pe.yaml ships it: PENet's own label file through
preprocess, the parameter groups of a from-scratch run, the global batch, PENet's slice
jitter and its stem."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from volttl.config import config_from_dict, load_config
from volttl.data.input_spec import InputSpec
from volttl.data.sampling import PECentredSampler, last_window_start
from volttl.manifests import write_manifest
from volttl.manifests.penet import load_series_list, penet_filter, penet_rows
from volttl.preprocess.step import preprocess_step
from volttl.preprocess.store import Store
from volttl.preprocess.windows import UNKNOWN
from volttl.train.loop import per_process_batch
from volttl.train.metrics import summarise
from volttl.train.schedule import lr_factors
from volttl.transfer.strategies import build_transfer_model

from .conftest import shared_path

PE_YAML = Path(__file__).resolve().parents[1] / "configs" / "pe.yaml"
# PENet's four outliers under its own rules: short studies padded, annotations cut to the study
ADJUSTED = {"1122", "922", "1257", "167"}


def _penet_stand_in(tmp_path: Path, keep=None) -> Path:
    """PENet's real label file over tiny stand-in volumes (each study's real slice count,
    8 x 8 pixels, one voxel holding the study's number so that no two are the same scan) in
    a data.hdf5 of PENet's layout; returns the manifest."""
    series = penet_filter(load_series_list(shared_path("reference", "penet_series_list.pkl")))
    if keep is not None:
        series = [s for s in series if str(s.study_num) in keep]
    data = tmp_path / "data.hdf5"
    with h5py.File(data, "w") as f:
        for s in series:
            volume = f.create_dataset(str(s.study_num), shape=(s.num_slices, 8, 8), dtype=np.int16,
                                      fillvalue=40, chunks=(min(64, s.num_slices), 8, 8), compression="gzip")
            volume[0, 0, 0] = 100 + int(s.study_num)
    write_manifest(penet_rows(series, data), tmp_path / "penet.csv")
    return tmp_path / "penet.csv"


def _pe_yaml(manifest: Path, store: Path, *overrides: str):
    return load_config(PE_YAML, [f"data.manifest={manifest}", f"data.store={store}",
                                 "preprocess.size=8", "preprocess.workers=1", *overrides])


def test_penet_label_file_preprocesses_whole_with_pe_yaml(tmp_path):
    """The whole real manifest: the validation and test positives without slices are kept
    (study level), PENet's four outliers are stored its way and listed, and the study,
    window and positive-window counts per split are PENet's."""
    manifest = _penet_stand_in(tmp_path)
    summary = preprocess_step(_pe_yaml(manifest, tmp_path / "s.h5"), progress=False)
    assert not summary.failed and len(summary.done) == 1755
    assert set(summary.adjusted) == ADJUSTED
    assert "padded with air" in summary.adjusted["1122"] and "past its 228 slices" in summary.adjusted["1257"]
    assert all(sid in summary.adjusted_line() for sid in ADJUSTED)
    # (studies, positives, windows, positive windows); PENet counts 2030
    # train positives: one window has 3 distinct PE slices, one of them listed twice in pe_idxs
    expect = {"train": (1429, 483, 24128, 2029), "val": (164, 79, 2743, 147),
              "test": (162, 82, 2716, 153)}
    with Store(tmp_path / "s.h5") as store:
        for split, (n, pos, windows, positive) in expect.items():
            members = store.studies_in(split)
            w = store.windows(split)
            assert (len(members), int(store.labels[members].sum())) == (n, pos)
            assert (len(w), int((w["label"] == 1).sum())) == (windows, positive)
            study_level = {store.study_ids[i] for i in members
                           if store.labels[i] == 1 and not len(store.meta(store.study_ids[i]).pe_slices)}
            assert len(study_level) == {"train": 0, "val": 51, "test": 54}[split]
            # their windows are of unknown label, never negatives
            unknown_windows = w[w["label"] == UNKNOWN]
            assert {store.study_ids[i] for i in np.unique(unknown_windows["study"])} == study_level
        assert len(store.windows("train", train=True)) == 24128
        assert "padded" in store.meta("1122").adjusted and store.meta("1122").original.shape[0] == 1
        kept = store.meta("1257").pe_slices_original
        assert len(kept) and kept.min() == 213 and kept.max() <= 227


def test_without_penet_rules_the_outliers_are_refused_by_name(tmp_path):
    manifest = _penet_stand_in(tmp_path, keep=ADJUSTED)
    summary = preprocess_step(_pe_yaml(manifest, tmp_path / "s.h5", "preprocess.penet_rules=false"),
                         progress=False)
    assert set(summary.failed) == ADJUSTED and not summary.adjusted
    assert "at least one window" in summary.failed["1122"]
    assert "lie outside the study's 228 slices" in summary.failed["1257"]


def test_training_positives_without_slices_are_still_refused(tmp_path):
    from volttl.manifests import ManifestError
    from volttl.manifests.schema import read_manifest

    manifest = _penet_stand_in(tmp_path, keep={"1257", "1122"})
    rows = read_manifest(manifest)
    for r in rows:
        r.pe_slices = []  # 1257 is a training positive
    write_manifest(rows, manifest)
    with pytest.raises(ManifestError, match=r"1 training positive study\(ies\) without pe_slices \(1257\)"):
        preprocess_step(_pe_yaml(manifest, tmp_path / "s.h5"), progress=False)


def test_window_metrics_leave_out_unknown_windows_and_say_so():
    # study 2 is positive without slices: its windows (high scores) are not negatives
    labels = np.array([0, 1, 0, 0, UNKNOWN, UNKNOWN])
    probs = np.array([0.1, 0.8, 0.2, 0.3, 0.9, 0.95])
    studies = np.array([0, 0, 1, 1, 2, 2])
    out = summarise(labels, probs, studies, np.array([1, 0, 1]))
    assert out["window_auroc"] == 1.0 and out["window_metrics_studies_left_out"] == 1
    assert out["study_auroc"] == 1.0 and out["studies"] == 3


def test_from_scratch_has_no_pretrained_group():
    """Nothing loaded: every parameter is new, so PENet's schedule delays none of them."""
    cfg = config_from_dict({"train": {"schedule": "penet", "lr_new": 0.1, "lr_pretrained": 0.01}})
    setup = build_transfer_model("resnext3d_50", "ttl", "layer2")
    assert not setup.pretrained and len(setup.new) == len(list(setup.model.parameters()))
    groups = setup.param_groups(0.01, 0.1)
    assert [g["name"] for g in groups] == ["new"]
    (factor,) = lr_factors(cfg, ["new"], steps_per_epoch=100, examples_per_step=8)
    assert factor(100) > 0.07  # 800 examples in: warming up, not held at 0 until 10k


def test_loaded_parameters_are_the_pretrained_group(tmp_path):
    donor = build_transfer_model("resnext3d_50", "ftl", "", stem="repeat").model.state_dict()
    torch.save({"epoch": 1, "arch": "resnext-50", "optimizer": {},
                "state_dict": {f"module.{k}": v for k, v in donor.items()
                               if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}},
               tmp_path / "w.pth")
    setup = build_transfer_model("resnext3d_50", "tf", "layer2", pretrained=str(tmp_path / "w.pth"))
    assert "conv1.weight" in setup.pretrained and "layer2.0.conv1.weight" in setup.pretrained
    assert all(n.startswith(("layer3.", "layer4.", "fc.")) for n in setup.new)
    cfg = config_from_dict({"train": {"schedule": "penet"}})
    pretrained_rule, new_rule = lr_factors(cfg, ["pretrained", "new"], 100, 8)
    assert pretrained_rule(100) == 0.0 and new_rule(100) > 0  # the delay is for loaded weights only


@pytest.mark.parametrize("world,per", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_global_batch_splits_across_processes(world, per):
    cfg = config_from_dict({"train": {"batch_size": 8}})
    assert per_process_batch(cfg, world) == per


def test_global_batch_that_does_not_divide_is_refused():
    cfg = config_from_dict({"train": {"batch_size": 8}})
    with pytest.raises(ValueError, match="train.batch_size 8 does not divide over 3 processes"):
        per_process_batch(cfg, 3)
    bags = config_from_dict({"train": {"batch_size": 8}, "data": {"labels": "study", "bag_windows": 4}})
    assert per_process_batch(bags, 2) == 4
    with pytest.raises(ValueError, match="less than one bag"):
        per_process_batch(bags, 4)


def test_every_training_window_is_jittered_as_penet_does():
    """PENet's draw: indexed windows shift by up to half a window too, a forced positive
    draw keeps an indexed positive study, and starts stay within the evaluation windows'
    starts (0 to the last, air-padded, window's)."""
    pe = {0: np.array([], dtype=int), 1: np.array([40, 41, 42, 43, 44, 45])}
    slices = {0: 100, 1: 60}
    sampler = PECentredSampler(prob=0.0, jitter=12)
    starts = {sampler.draw(np.random.default_rng(i), 0, 48, 24, [1], pe, slices)[1] for i in range(300)}
    assert starts == set(range(36, 61))  # 48 +- 12, every shift drawn
    assert last_window_start(100, 24) == 96 and last_window_start(96, 24) == 72
    edge = {sampler.draw(np.random.default_rng(i), 0, 96, 24, [1], pe, slices)[1] for i in range(300)}
    assert max(edge) == 96 and min(edge) == 84  # the last evaluation window's start bounds it
    low = {sampler.draw(np.random.default_rng(i), 0, 0, 24, [1], pe, slices)[1] for i in range(300)}
    assert min(low) == 0 and max(low) == 12
    forced = PECentredSampler(prob=1.0, jitter=0)
    assert forced.draw(np.random.default_rng(0), 1, 0, 24, [1], pe, slices) == (1, 30)
    assert forced.draw(np.random.default_rng(0), 0, 0, 24, [1], pe, slices) == (1, 30)
    # the indexed positive study is kept even when other positives exist
    pe[2] = np.array([5, 6, 7, 8])
    slices[2] = 50
    drawn = {forced.draw(np.random.default_rng(i), 2, 0, 24, [1, 2], pe, slices)[0] for i in range(50)}
    assert drawn == {2}


def test_training_jitter_is_half_the_window(tmp_path):
    """PENet jitters by num_slices // 2: 12 for its 24-slice windows, 4 for 8-slice ones."""
    from volttl.data.dataset import WindowDataset
    from volttl.synth.cohort import synth_cohort

    from .conftest import small_config

    manifest = synth_cohort(tmp_path / "c", studies=4, seed=1, matrix=48, progress=False)
    assert not preprocess_step(small_config(manifest, tmp_path / "s.h5", size=32), progress=False).failed
    ds = WindowDataset(str(tmp_path / "s.h5"), "train", True, InputSpec(8, 32, (-100.0, 900.0), 0.15897))
    assert ds.window == 8 and ds.sampler.jitter == 4 and ds.sampler.prob == 0.3


def test_cost_columns_reproduce_the_papers_macs_at_its_input():
    """At pe.yaml's profiled input (3 x 32 x 208 x 208), under ptflops' module rule (the
    counter the paper cites), FTL and TF@layer3 give the paper's 66.3 G and 64.9 G to the
    digit. Its TTL-1 60.17 G matches no cut under that rule: MACs grow with the cut, and
    60.17 lies strictly between the cuts after layer3.17 and layer3.18."""
    from volttl.analysis.complexity import count_macs, profiled_input
    from volttl.inference import model_from_config

    cfg = load_config(PE_YAML)
    assert profiled_input(cfg) == "3 x 32 x 208 x 208" and cfg.profile.macs_rule == "ptflops"

    def macs(strategy: str, cut: str) -> float:
        cfg.transfer.strategy, cfg.transfer.cut = strategy, cut
        model = model_from_config(cfg, weights=False).model.eval()
        return count_macs(model, (1, 3, *cfg.profile.input_size), cfg.profile.macs_rule) / 1e9

    assert round(macs("ftl", "layer3"), 1) == 66.3
    assert round(macs("tf", "layer3"), 1) == 64.9
    assert round(macs("ttl", "layer3"), 1) == 64.1  # the paper's text puts TTL-1 here
    assert macs("ttl", "layer3.17") < 60.17 - 0.05 < 60.17 + 0.05 < macs("ttl", "layer3.18")


def test_pe_yaml_is_the_papers_setting():
    """PENet's released train.sh (master 79b32dd): --learning_rate=1e-2 and
    --fine_tuning_lr=1e-2 (two groups, the pretrained one delayed by the warm-up), batch 8,
    cosine_warmup over 10k warm-up and 600k decay examples; epochs: as many as reach the
    schedule's end on PENet's 24,128 training windows, none at learning rate 0."""
    import math

    from volttl.train.schedule import schedule_end_epoch

    cfg = load_config(PE_YAML)
    assert cfg.model.stem == "repeat" and cfg.preprocess.penet_rules
    assert (cfg.train.lr_new, cfg.train.lr_pretrained) == (0.01, 0.01)
    assert cfg.train.batch_size == 8 and cfg.train.schedule == "penet"
    assert (cfg.train.warmup_examples, cfg.train.pretrained_delay_examples, cfg.train.cosine_examples) == (
        10_000, 10_000, 600_000)
    steps = math.ceil(24_128 / cfg.train.batch_size)
    end = schedule_end_epoch(cfg, ["pretrained", "new"], steps, cfg.train.batch_size)
    assert cfg.train.epochs == end == 26
    text = PE_YAML.read_text(encoding="utf-8")
    assert "--fine_tuning_lr=1e-2 (line 17)" in text and "--learning_rate=1e-2 (line 22)" in text
    setup = build_transfer_model("resnext3d_101", "ftl", "", stem=cfg.model.stem)
    assert sum(p.numel() for p in setup.model.parameters()) == 47_523_265  # the paper's 47.5 M
