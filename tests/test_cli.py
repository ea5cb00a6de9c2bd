import subprocess
import sys
from pathlib import Path

import pytest

from volttl.cli import build_parser, main

COMMANDS = ["synth", "preprocess", "train", "evaluate", "cam", "profile", "search", "svcca",
            "demo", "cuts", "manifest", "pipeline"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: volttl " + command in capsys.readouterr().out


def test_parser_lists_all_commands():
    text = build_parser().format_help()
    assert all(c in text for c in COMMANDS)


def test_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preprocess: {sise: 3}\n")
    out = subprocess.run([sys.executable, "-m", "volttl", "preprocess", "--config", str(cfg)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert "unknown key 'preprocess.sise' (did you mean 'size'?)" in out.stderr


@pytest.mark.parametrize("name", ["demo.yaml", "pe.yaml", "rsna_pe.yaml"])
def test_shipped_configs_load_under_the_schema(name):
    from volttl.config import load_config

    root = Path(__file__).resolve().parents[1]  # the demo's config ships inside the package only
    path = root / "volttl" / "resources" / name if name == "demo.yaml" else root / "configs" / name
    cfg = load_config(path)
    assert Path(cfg.data.store).is_absolute()  # paths resolved against the config's folder
    if name != "demo.yaml":
        assert (cfg.model.name, cfg.transfer.strategy, cfg.transfer.cut) == ("resnext3d_101", "ttl", "layer3")
        assert cfg.train.repeats == 3 and cfg.preprocess.window == 24 and cfg.data.crop == 192


def test_train_fails_before_any_work_on_missing_files(tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"data: {{store: {tmp_path / 'none.h5'}}}\ntrain: {{out_dir: {tmp_path / 'runs'}}}\n")
    assert main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert "none.h5" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()  # no run dir started


def test_train_fails_on_a_missing_pretrained_checkpoint(cohort, tmp_path, capsys):
    from volttl.preprocess.step import preprocess_step

    from .conftest import small_config

    store = tmp_path / "s.h5"
    assert not preprocess_step(small_config(cohort, store), progress=False).failed
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"data: {{store: {store}, crop: 32}}\nmodel: {{pretrained: {tmp_path / 'r101.pth'}}}\n"
                   f"train: {{out_dir: {tmp_path / 'runs'}}}\n")
    assert main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert "r101.pth: pretrained checkpoint not found" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_demo_runs_the_whole_chain_on_a_tiny_cohort(tmp_path, capsys):
    """`volttl demo` end to end at toy size: every stage's output exists and the figures
    it prints are the ones it wrote."""
    import json

    work = tmp_path / "demo"
    rc = main(["demo", "--workdir", str(work), "--studies", "10", "--matrix", "64",
               "--set", "train.epochs=1", "--set", "eval.bootstrap=0", "--set", "preprocess.workers=1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "== cam" in out and "demo finished" in out
    run = work / "runs" / "demo"
    assert (run / "best.pt").is_file() and (run / "metrics_test.json").is_file()
    summary = json.loads((work / "cam" / "cam_summary.json").read_text())
    assert summary and all((work / "cam" / r["files"]["cam"]).is_file() for r in summary)
    found = json.loads((work / "cam" / "localisation.json").read_text())
    assert found["summary"] in out
    positives = [r for r in summary if r["label"] == 1]
    assert found["studies"] == len(positives) == len(found["per_study"])


def test_help_and_version_import_nothing_heavy():
    """`volttl --help` and `--version` build the parser without torch or the models (they
    answer at once; benchmarks/bench_cli.py times them), and the help still names every
    built-in backbone."""
    code = ("import sys; from volttl.cli import build_parser; p = build_parser(); "
            "print(sorted(m for m in ('torch', 'volttl.models', 'monai', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    version = subprocess.run([sys.executable, "-m", "volttl", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("volttl 0.")
    from volttl.models import BACKBONES

    cuts_help = subprocess.run([sys.executable, "-m", "volttl", "cuts", "--help"], capture_output=True,
                               text=True).stdout
    assert all(name in cuts_help for name in BACKBONES if not name.endswith("_test"))


@pytest.mark.slow
def test_device_flag_on_the_commands_that_run_a_model(cohort, tmp_path, capsys):
    """`--device` as nnU-Net and TotalSegmentator have it: on evaluate, cam and predict of a
    run, and on train; a device the machine lacks is one line."""
    import torch

    from .conftest import train_tiny_run

    _, run = train_tiny_run(Path(cohort), tmp_path)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--device", "cpu"]) == 0
    capsys.readouterr()  # its progress lines
    missing = "cuda:7" if torch.cuda.is_available() else "cuda"
    for command in (["evaluate", "--run", str(run)],
                    ["cam", "--run", str(run), "--out", str(tmp_path / "c"), "--quiet"]):
        assert main([*command, "--device", missing]) == 1
        err = capsys.readouterr().err.strip()
        assert f"runtime.device '{missing}'" in err and "\n" not in err
    for name in ("train", "predict", "demo", "profile", "search", "pretrain"):
        assert "--device" in subprocess.run([sys.executable, "-m", "volttl", name, "--help"],
                                            capture_output=True, text=True).stdout


def test_progress_into_a_pipe_is_plain_lines(tmp_path):
    """A bar's carriage-return frames would fill a piped log; into a pipe, progress is
    plain lines (`volttl predict ... | cat` gives a clean log)."""
    out = subprocess.run([sys.executable, "-m", "volttl", "synth", "--out", str(tmp_path / "c"),
                          "--studies", "3", "--matrix", "32", "--workers", "1"],
                         capture_output=True, text=True, check=True)
    assert "\r" not in out.stderr and "synth: 100%" in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.startswith("synth:")]) <= 3


def test_a_run_path_that_does_not_exist_says_so(tmp_path, capsys):
    for command in (["evaluate"], ["cam", "--out", str(tmp_path / "c")], ["predict", str(tmp_path), "--out",
                                                                          str(tmp_path / "p")]):
        assert main([command[0], "--run", str(tmp_path / "nope"), *command[1:]]) == 1
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"{tmp_path / 'nope'}: no such run folder") and "\n" not in err
