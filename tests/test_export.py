"""`volttl export` and `volttl predict --model`: a package that runs without its run folder."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from volttl.cli import main

from .conftest import train_tiny_run


@pytest.fixture(scope="module")
def evaluated(cohort, tmp_path_factory):
    run = train_tiny_run(Path(cohort), tmp_path_factory.mktemp("export"), cut="layer1")[1]
    assert main(["evaluate", "--run", str(run), "--split", "test", "--quiet"]) == 0
    return run


def _predictions(folder: Path) -> dict[str, dict]:
    with (folder / "predictions.csv").open() as fh:
        return {r["study_id"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_a_package_predicts_as_its_run_did_without_the_run_folder(evaluated, cohort, tmp_path, caplog):
    studies = Path(cohort).parent / "studies"
    synthetic = "learnt from volttl's synthetic cohort (volttl synth, 6 studies), not from patients' CT"
    assert main(["predict", "--run", str(evaluated), str(studies), "--out", str(tmp_path / "by_run"),
                 "--no-cam", "--quiet"]) == 0
    assert synthetic in caplog.text
    caplog.clear()
    assert main(["export", "--run", str(evaluated), "--out", str(tmp_path / "model")]) == 0
    moved = tmp_path / "elsewhere" / "model"  # the package alone: no run folder, no store
    shutil.copytree(tmp_path / "model", moved)
    hidden = evaluated.with_name("hidden")
    evaluated.rename(hidden)
    try:
        assert main(["predict", "--model", str(moved), str(studies), "--out", str(tmp_path / "by_model"),
                     "--no-cam", "--quiet"]) == 0
    finally:
        hidden.rename(evaluated)
    assert synthetic in caplog.text  # the package says it too
    by_run, by_model = _predictions(tmp_path / "by_run"), _predictions(tmp_path / "by_model")
    assert by_run.keys() == by_model.keys() and len(by_run) == 6
    for sid, row in by_run.items():
        assert float(by_model[sid]["probability"]) == pytest.approx(float(row["probability"]), abs=1e-5)
        assert by_model[sid]["predicted_label"] == row["predicted_label"] != ""
        assert by_model[sid]["threshold"] == row["threshold"]


@pytest.mark.slow
def test_the_package_holds_a_card_a_trace_and_checksums(evaluated, tmp_path, capsys):
    from volttl.data.intensity import scale_intensity
    from volttl.inference import TrainedRun

    assert main(["export", "--run", str(evaluated), "--out", str(tmp_path / "model")]) == 0
    model = tmp_path / "model"
    names = {p.name for p in model.iterdir()}
    assert names == {"config.yaml", "best.pt", "operating_point.json", "model.torchscript.pt", "model.pt2",
                     "model_card.md", "model_card.json", "package.json", "training_data.json"}
    card = json.loads((model / "model_card.json").read_text())
    assert card["training_data"]["synthetic_cohort"]["made_by"] == "volttl synth"  # the fixture's cohort
    assert card["limitations"][0].startswith("Trained on volttl's synthetic cohort")
    assert card["training_data"]["studies"] == {"train": 2, "val": 2, "test": 2}
    assert card["training_data"]["positives"] == {"train": 1, "val": 1, "test": 1}
    assert card["metrics"]["test"]["studies"] == 2 and card["operating_point"]["chosen_on"] == "val"
    assert card["install"]["trained_with"]["torch"] == torch.__version__
    text = (model / "model_card.md").read_text()
    for heading in ("## Training data", "## Metrics", "## Operating point", "## Limitations", "## Install"):
        assert heading in text
    # the trace gives the model's window probabilities, for tools outside volttl
    run = TrainedRun.open(evaluated)
    cfg = run.cfg
    hu = np.random.default_rng(0).integers(-1000, 1000, (cfg.preprocess.window, cfg.data.crop, cfg.data.crop))
    x = scale_intensity(hu.astype(np.float32), tuple(cfg.data.hu_clip), cfg.data.intensity_shift)[None, None]
    expected = run.score_windows(x.astype(np.float32))
    with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.load(str(model / "model.torchscript.pt"))
    exported = torch.export.load(str(model / "model.pt2")).module()
    for network in (traced, exported):
        with torch.no_grad():
            p = torch.sigmoid(network(torch.from_numpy(x).float())[:, 0]).numpy()
        np.testing.assert_allclose(p, expected, atol=1e-5)
    # a file changed after export, a file missing, a folder that is no package: refused by name
    original = (model / "config.yaml").read_text()
    (model / "config.yaml").write_text(original.replace("crop: 32", "crop: 31"))
    capsys.readouterr()
    assert main(["predict", "--model", str(model), str(tmp_path), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "config.yaml: damaged: it changed after the package was exported" in err and err.count("\n") == 1
    (model / "config.yaml").write_text(original)
    (model / "best.pt").unlink()
    assert main(["predict", "--model", str(model), str(tmp_path), "--out", str(tmp_path / "p")]) == 1
    assert "best.pt: missing from the package" in capsys.readouterr().err
    assert main(["predict", "--model", str(evaluated), str(tmp_path), "--out", str(tmp_path / "p")]) == 1
    assert "not a model package (no package.json" in capsys.readouterr().err
    assert main(["export", "--run", str(evaluated), "--out", str(model)]) == 1  # never over a folder
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.update(files={}), "best.pt, config.yaml, operating_point.json, training_data.json not"),
    (lambda r: r["files"].pop("training_data.json"), "training_data.json not among the package's checked"),
    (lambda r: r.update(version=99), "a package of another layout (version 99)"),
    (lambda r: r.update(runtime="anything"), "unknown keys runtime"),
])
def test_a_package_lists_every_file_it_is_read_from_in_a_known_layout(evaluated, tmp_path, capsys, edit,
                                                                      message):
    """package.json edited and its checksum recomputed, as a hand-made package would be: an
    empty file list (another run's weights would load unverified), the training record left
    out (it silenced the synthetic-cohort warning), a future version, unknown keys: refused."""
    from volttl.outputs.records import read_record, write_record

    model = tmp_path / "model"
    assert main(["export", "--run", str(evaluated), "--out", str(model)]) == 0
    record = read_record(model / "package.json", "")
    edit(record)
    write_record(model / "package.json", record)
    capsys.readouterr()
    assert main(["predict", "--model", str(model), str(tmp_path), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.slow
def test_a_monai_bundle_runs_under_monai_as_predict_does(evaluated, cohort, tmp_path):
    """`volttl export --format monai-bundle`: `python -m monai.bundle run` on the synthetic
    studies (NIfTI files and DICOM series) writes the probabilities `volttl predict` gives,
    and MONAI's own `verify_net_in_out` accepts the network its metadata describes."""
    import subprocess
    import sys

    studies = Path(cohort).parent / "studies"
    bundle = tmp_path / "bundle"
    assert main(["export", "--run", str(evaluated), "--out", str(bundle), "--format", "monai-bundle"]) == 0
    assert main(["predict", "--run", str(evaluated), str(studies), "--out", str(tmp_path / "by_run"),
                 "--no-cam", "--quiet"]) == 0
    inference, metadata = bundle / "configs" / "inference.json", bundle / "configs" / "metadata.json"
    monai_run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(inference),
         "--bundle_root", str(bundle), "--input", str(studies), "--output_dir", str(tmp_path / "by_bundle")],
        capture_output=True, text=True, cwd=tmp_path)
    assert monai_run.returncode == 0, monai_run.stderr[-2000:]
    by_run, by_bundle = _predictions(tmp_path / "by_run"), _predictions(tmp_path / "by_bundle")
    assert by_run.keys() == by_bundle.keys() and len(by_run) == 6
    for sid, row in by_run.items():
        assert float(by_bundle[sid]["probability"]) == pytest.approx(float(row["probability"]), abs=1e-4)
        assert by_bundle[sid]["predicted_label"] == row["predicted_label"] != ""

    verify = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
         str(metadata), "--config_file", str(inference), "--bundle_root", str(bundle), "--device", "cpu"],
        capture_output=True, text=True, cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr[-2000:]
    assert "verified with no error" in verify.stdout + verify.stderr

    meta = json.loads(metadata.read_text())
    package = bundle / "models" / "package"
    cfg = yaml.safe_load((package / "config.yaml").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == [cfg["preprocess"]["window"], cfg["data"]["crop"], cfg["data"]["crop"]]
    assert image["num_channels"] == 1 and meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 1
    point = json.loads((package / "operating_point.json").read_text())
    assert meta["operating_point"]["threshold"] == point["threshold"]
    assert "Research use only" in " ".join(meta["limitations"]) and meta["intended_use"]
    assert (bundle / "docs" / "README.md").read_text().startswith("# Model card")
