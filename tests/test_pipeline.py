"""`volttl pipeline`: a tiny study from a YAML file, rerun with every step skipped."""

import json

import pytest
import yaml

from volttl.errors import VolttlError
from volttl.pipeline import PipelineError, run_pipeline
from volttl.pipeline.runner import load_pipeline


def _write(tmp_path, steps):
    base = {"data": {"crop": 32},
            "preprocess": {"slice_thickness": 2.0, "size": 40, "window": 8, "train_stride": 8,
                           "min_pe_slices": 2, "workers": 1},
            "model": {"name": "resnext3d_50"},
            "train": {"epochs": 1, "batch_size": 4, "workers": 0},
            "eval": {"bootstrap": 0},
            "profile": {"input_size": [8, 32, 32], "repeats": 1, "warmup": 0}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "tiny", "workdir": "work", "config": "configs/base.yaml",
            "set": ["data.manifest=synth/manifest.csv", "data.store=store/s.h5", "train.out_dir=runs",
                    "search.out_dir=search", "search.strategies=[ttl]", "search.block_cuts=[stem]",
                    "search.radius=1", "search.baselines=[ftl]"],
            "steps": steps}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_tiny_pipeline_runs_and_reruns_with_every_step_skipped(tmp_path):
    path = _write(tmp_path, [{"synth": {"studies": 8, "matrix": 48, "workers": 1}}, {"preprocess": {}},
                             {"search": {}}, {"svcca": {"row": "FTL", "windows": 8, "max_points": 800,
                                                        "cuts": ["stem"]}},
                             {"cam": {"row": "TTL-2"}}, {"report": {}}])
    report = run_pipeline(path, progress=False)
    work = tmp_path / "work"
    trials = sorted((work / "search").glob("*/trial.json"))
    written = {t: t.stat().st_mtime_ns for t in trials}
    assert report == work / "report.md"
    text = report.read_text()
    assert "| ResNeXt3D-50 | TTL-2 |" in text and "## SVCCA" in text and "## Grad-CAM" in text
    assert (work / "search" / "search_table.csv").is_file() and (work / "svcca" / "svcca.png").is_file()
    assert json.loads((work / "cam" / "cam_summary.json").read_text())  # overlays of the test split
    assert "CAM peak inside the lesion mask" in text  # synthetic masks give localisation figures
    steps_table = text[text.index("## Steps"):].splitlines()[2:]
    assert all(line.startswith("| ") and line.endswith(" |") for line in steps_table if line)  # one row each
    run_pipeline(path, progress=False)
    steps = json.loads((work / "report.json").read_text())["steps"]
    outcomes = {s["step"]: s["outcome"] for s in steps}
    assert outcomes["synth"].startswith("skipped") and outcomes["svcca"].startswith("skipped")
    assert outcomes["cam"].startswith("skipped") and outcomes["preprocess"].startswith("0 preprocessed")
    assert trials and {t: t.stat().st_mtime_ns for t in trials} == written  # every trial found done


def test_bad_pipeline_files_fail_with_the_file_named(tmp_path):
    path = _write(tmp_path, [{"fit": {}}])
    with pytest.raises(PipelineError, match="tiny.yaml: step .* is not one of"):
        load_pipeline(path)
    spec = yaml.safe_load(path.read_text())
    spec["stepz"] = spec.pop("steps")
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(PipelineError, match="tiny.yaml: unknown key"):
        load_pipeline(path)


@pytest.mark.parametrize("name", ["demo_table.yaml", "pe_table2.yaml"])
def test_shipped_pipelines_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "pipelines" / name
    spec, work, cfg = load_pipeline(path)
    assert cfg.data.store.startswith(str(work)) and cfg.search.out_dir == str(work / "search")
    steps = [next(iter(s)) for s in spec["steps"]]
    assert steps[-1] == "report" and "search" in steps and "svcca" in steps
    assert set(cfg.search.strategies) == {"tf", "lwft", "ttl"}


@pytest.mark.parametrize("name", ["demo_transfer.yaml", "demo_transfer_curve.yaml"])
def test_the_transfer_pipelines_load_and_share_their_inputs(name):
    """Both compare scratch and FTL from a source checkpoint in their work folder, with the
    same settings, so the curve reuses the table's data, checkpoint and trials."""
    from pathlib import Path

    from volttl.config import config_to_dict

    folder = Path(__file__).resolve().parents[1] / "pipelines"
    spec, work, cfg = load_pipeline(folder / name)
    _, table_work, table_cfg = load_pipeline(folder / "demo_transfer.yaml")
    assert work == table_work and cfg.model.pretrained.startswith(str(work))
    assert config_to_dict(cfg) == config_to_dict(table_cfg)
    compare = next(s["compare"] for s in spec["steps"] if "compare" in s)
    assert {"scratch", "ftl"} <= set(compare["rows"]) and spec["steps"][-1] == {"report": {}}


@pytest.mark.slow
def test_a_rerun_with_other_inputs_remakes_or_stops_never_reuses(tmp_path):
    """Outputs are reused only when made from the same inputs: a changed cam method makes
    the overlays again with it; a changed synth seed stops (the store holds the old
    studies); a changed learning rate stops at the train step."""
    steps = [{"synth": {"studies": 8, "matrix": 48, "workers": 1}}, {"preprocess": {}},
             {"train": {"run": "runs/r"}}, {"cam": {}}, {"report": {}}]
    path = _write(tmp_path, steps)
    run_pipeline(path, progress=False)
    work = tmp_path / "work"

    def outcomes():
        return {s["step"]: s["outcome"] for s in json.loads((work / "report.json").read_text())["steps"]}

    def methods():
        return {r["method"] for r in json.loads((work / "cam" / "cam_summary.json").read_text())}

    assert methods() == {"gradcam"}
    run_pipeline(path, progress=False)
    assert all(outcomes()[k].startswith("skipped") for k in ("synth", "train", "cam"))
    spec = yaml.safe_load(path.read_text())
    spec["set"].append("cam.method=hirescam")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_pipeline(path, progress=False)
    assert not outcomes()["cam"].startswith("skipped") and methods() == {"hirescam"}
    # an operating point chosen since: the overlays' records must carry its calls
    from volttl.evaluate.step import evaluate_step

    evaluate_step(work / "runs" / "r", "val", progress=False)
    run_pipeline(path, progress=False)
    assert not outcomes()["cam"].startswith("skipped")
    records = json.loads((work / "cam" / "cam_summary.json").read_text())
    assert all(r["threshold"] is not None for r in records)
    spec["set"].append("train.lr_new=0.5")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(VolttlError, match="trained with other settings .*train.lr_new 0.1 -> 0.5"):
        run_pipeline(path, progress=False)
    spec["set"].pop()
    spec["steps"][0]["synth"]["seed"] = 1
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(PipelineError, match=r"manifest.csv: made by the synth step with other options "
                                            r"\(seed 0 -> 1\)"):
        run_pipeline(path, progress=False)


def test_a_pretrained_checkpoint_from_other_settings_stops_the_pipeline(tmp_path):
    """Runs were built on the checkpoint: one made with other pretrain settings is neither
    reused nor silently remade under them."""
    steps = [{"pretrain": {}}]
    path = _write(tmp_path, steps)
    spec = yaml.safe_load(path.read_text())
    spec["set"] += ["pretrain.out=weights/src.pth", "pretrain.depth=stem", "pretrain.input_size=[8, 24, 24]",
                    "pretrain.windows=16", "pretrain.epochs=1", "pretrain.batch_size=8"]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_pipeline(path, progress=False)
    run_pipeline(path, progress=False)
    outcome = json.loads((tmp_path / "work" / "report.json").read_text())["steps"][0]["outcome"]
    assert outcome.startswith("skipped")
    spec["set"].append("pretrain.epochs=2")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(PipelineError, match=r"src.pth: made by the pretrain step with other options "
                                            r"\(epochs 1 -> 2\)"):
        run_pipeline(path, progress=False)


def test_a_pipeline_without_a_report_step_ends_cleanly(tmp_path, capsys):
    """It does its work and says where the outcomes are: no failing read of a report.md it
    never wrote, and no stale report.md left by an earlier pipeline printed as its own."""
    from volttl.cli import main

    path = _write(tmp_path, [{"synth": {"studies": 4, "matrix": 48, "workers": 1}}, {"preprocess": {}}])
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "report.md").write_text("STALE REPORT of another pipeline\n")
    assert run_pipeline(path, progress=False) is None
    capsys.readouterr()
    assert main(["pipeline", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "STALE" not in out and "no report step" in out and "report.json" in out
    steps = json.loads((tmp_path / "work" / "report.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["synth", "preprocess"]


def test_a_pipeline_train_step_makes_the_checks_volttl_train_makes(tmp_path, capsys):
    """One train step for the CLI and pipelines: a missing pretrained file stops the
    pipeline's train step before anything is written, as it stops `volttl train`."""
    from volttl.cli import main

    path = _write(tmp_path, [{"synth": {"studies": 4, "matrix": 48, "workers": 1}}, {"preprocess": {}},
                             {"train": {"run": "runs/r"}}])
    spec = yaml.safe_load(path.read_text())
    spec["set"].append("model.pretrained=missing.pth")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(VolttlError, match=r"missing\.pth: pretrained checkpoint not found"):
        run_pipeline(path, progress=False)
    assert not (tmp_path / "work" / "runs" / "r").exists()
    work = tmp_path / "work"
    capsys.readouterr()
    base = tmp_path / "configs" / "base.yaml"
    assert main(["train", "--config", str(base), "--run-dir", str(tmp_path / "cli_run"),
                 "--set", f"data.manifest={work / 'synth' / 'manifest.csv'}",
                 "--set", f"data.store={work / 'store' / 's.h5'}",
                 "--set", "model.pretrained=missing.pth", "--quiet"]) == 1
    assert "missing.pth: pretrained checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "cli_run").exists()


@pytest.mark.slow
def test_the_compare_step_tables_paired_rows_and_a_curve_that_reuses_them(tmp_path):
    """A source checkpoint, then scratch, FTL and TTL over 2 seeds on the same test studies:
    the table has one row each with paired differences against FTL and scratch (none against
    itself), P(M) and MACs; the learning curve at 2 and 4 training studies reuses the 4-study
    trials (no new folder for them) and draws its figure; a rerun trains nothing."""
    steps = [{"synth": {"studies": 12, "matrix": 48, "workers": 1}}, {"preprocess": {}}, {"pretrain": {}},
             {"compare": {"rows": ["scratch", "ftl", "ttl@stem"], "train_studies": [2, 4],
                          "curve_rows": ["scratch", "ftl"], "resamples": 50}},
             {"report": {}}]
    path = _write(tmp_path, steps)
    spec = yaml.safe_load(path.read_text())
    spec["set"] += ["pretrain.out=weights/src.pth", "pretrain.input_size=[8, 24, 24]", "pretrain.windows=16",
                    "pretrain.epochs=1", "pretrain.batch_size=8", "model.pretrained=weights/src.pth",
                    "train.repeats=2", "data.train_studies=4"]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_pipeline(path, progress=False)
    work = tmp_path / "work"
    table = json.loads((work / "compare" / "compare_table.json").read_text())
    assert [t["row"] for t in table] == ["scratch", "FTL", "TTL@stem"]
    from volttl.preprocess.store import Store

    with Store(work / "store" / "s.h5") as store:
        tested = len(store.studies_in("test"))
    assert all(t["seeds"] == 2 and t["test_studies"] == tested for t in table)
    assert "vs_scratch" not in table[0] and "vs_FTL" not in table[1] and "vs_FTL" in table[2]
    assert table[1]["vs_scratch"]["lo"] <= table[1]["vs_scratch"]["mean"] <= table[1]["vs_scratch"]["hi"]
    assert table[2]["params_m"] < table[1]["params_m"]
    curve = json.loads((work / "compare" / "learning_curve.json").read_text())
    assert [p["train_studies"] for p in curve["FTL"]] == [2, 4] and len(curve["FTL"][0]["test_auroc"]) == 2
    assert (work / "compare" / "learning_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (work / "compare").iterdir() if p.is_dir()) == ["ftl", "scratch", "train2",
                                                                                  "ttl_stem"]
    assert "## Transfer comparison" in (work / "report.md").read_text()
    trained = (work / "compare" / "ftl" / "seed0" / "last.pt").stat().st_mtime_ns
    run_pipeline(path, progress=False)
    assert (work / "compare" / "ftl" / "seed0" / "last.pt").stat().st_mtime_ns == trained
