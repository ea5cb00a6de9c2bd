from pathlib import Path

import pytest

from volttl.config import ConfigError, config_to_yaml, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_follow_penet(tmp_path):
    cfg = load_config(write(tmp_path, "{}"))
    assert cfg.preprocess.slice_thickness == 1.25
    assert cfg.preprocess.size == 208 and cfg.preprocess.window == 24
    assert cfg.data.hu_clip == (-100.0, 900.0) and cfg.data.crop == 192


def test_unknown_key_suggests_spelling(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'preprocess.slice_thicknes'.*'slice_thickness'"):
        load_config(write(tmp_path, "preprocess: {slice_thicknes: 2.0}\n"))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'tarin'.*'train'"):
        load_config(write(tmp_path, "tarin: {epochs: 3}\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer"):
        load_config(write(tmp_path, "train: {epochs: three}\n"))
    with pytest.raises(ConfigError, match=r"transfer.strategy: 'xyz' is not one of"):
        load_config(write(tmp_path, "transfer: {strategy: xyz}\n"))


def test_set_overrides_and_paths_resolve(tmp_path):
    p = write(tmp_path, "data: {manifest: m.csv, store: out/s.h5}\n")
    cfg = load_config(p, ["train.epochs=5", "transfer.head.dropout=0.25", "data.crop=64"])
    assert cfg.train.epochs == 5 and cfg.transfer.head.dropout == 0.25 and cfg.data.crop == 64
    assert cfg.data.manifest == str(tmp_path / "m.csv")
    assert cfg.data.store == str(tmp_path / "out" / "s.h5")
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(p, ["train.epoch=5"])


def test_resolved_config_round_trips(tmp_path):
    p = write(tmp_path, "train: {epochs: 7}\n")
    cfg = load_config(p)
    again = load_config(write(tmp_path, config_to_yaml(cfg)))
    assert again == cfg


def test_runtime_keys_have_their_own_section_and_the_older_spelling_still_reads():
    """device, workers, precision, channels_last, cudnn_benchmark and compile live under
    `runtime`; `train.<key>` (run folders and configs from before, `--set` on a saved
    config) is read as `runtime.<key>` and wins over the section's value."""
    from volttl.config import RUNTIME_KEYS, apply_overrides, config_from_dict, config_to_dict

    assert set(RUNTIME_KEYS) == {"device", "workers", "precision", "channels_last", "cudnn_benchmark",
                                 "compile"}
    d = config_to_dict(config_from_dict({}))
    assert not set(RUNTIME_KEYS) & set(d["train"]) and set(d["runtime"]) == set(RUNTIME_KEYS)
    old = config_from_dict({"train": {"device": "cpu", "workers": 0, "precision": "bf16", "epochs": 3}})
    r = old.runtime
    assert (r.device, r.workers, r.precision, old.train.epochs) == ("cpu", 0, "bf16", 3)
    saved = config_to_dict(config_from_dict({"runtime": {"device": "cpu"}}))
    again = config_from_dict(apply_overrides(saved, ["train.device=auto", "runtime.workers=1"]))
    assert again.runtime.device == "auto" and again.runtime.workers == 1
    with pytest.raises(ConfigError, match="train.epoch.*did you mean 'epochs'"):
        config_from_dict({"train": {"epoch": 3, "device": "cpu"}})  # other train keys still checked


def test_a_config_with_non_ascii_text_loads_under_any_locale(tmp_path):
    """Configs and run files are UTF-8 whatever the locale says (a C locale, Windows)."""
    import os
    import subprocess
    import sys

    path = tmp_path / "my.yaml"
    path.write_text("# Lungenembolie: Studien von Zürich\ndata:\n  manifest: /daten/zürich.csv\n",
                    encoding="utf-8")
    code = ("import sys, locale; from volttl.config import load_config\n"
            "print(locale.getpreferredencoding(False)); print(load_config(sys.argv[1]).data.manifest)")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         encoding="utf-8", env=env)
    assert out.returncode == 0, out.stderr
    encoding, manifest = out.stdout.split("\n")[:2]
    assert encoding.lower() not in ("utf-8", "utf8")  # the check runs where the default is not UTF-8
    assert manifest == "/daten/zürich.csv"


def test_renamed_keys_still_read_with_one_deprecation_message(tmp_path, caplog):
    """pretrain.window (the source task's input shape) is now pretrain.input_size, and
    model.source_norm (the video weights' input scaling) model.source_preset: a config, a
    run folder or a --set with the old name reads as the new one and says so; both given
    is refused rather than one silently winning."""
    from volttl import config as config_module

    config_module._said_renamed.clear()
    path = tmp_path / "old.yaml"
    path.write_text("pretrain:\n  window: [8, 24, 24]\nmodel:\n  source_norm: hara2018\n")
    with caplog.at_level("WARNING", logger="volttl.config"):
        cfg = load_config(path)
    assert cfg.pretrain.input_size == (8, 24, 24) and cfg.model.source_preset == "hara2018"
    said = [r.getMessage() for r in caplog.records]
    assert any("pretrain.window is deprecated: it is now pretrain.input_size" in m for m in said)
    assert any("model.source_norm is deprecated: it is now model.source_preset" in m for m in said)
    # an old key in --set over a config with the new one, and the old key in the file under a new --set
    new = tmp_path / "new.yaml"
    new.write_text("pretrain:\n  input_size: [8, 24, 24]\n")
    assert load_config(new, ["pretrain.window=[4, 16, 16]"]).pretrain.input_size == (4, 16, 16)
    assert load_config(path, ["pretrain.input_size=[4, 16, 16]"]).pretrain.input_size == (4, 16, 16)
    both = tmp_path / "both.yaml"
    both.write_text("pretrain:\n  window: [8, 24, 24]\n  input_size: [8, 24, 24]\n")
    with pytest.raises(ConfigError, match=r"both\.yaml: pretrain\.window and pretrain\.input_size are both"):
        load_config(both)


def test_the_input_settings_are_read_from_the_config_in_one_place():
    """data.hu_clip, data.intensity_shift and data.crop reach the code through InputSpec.of
    alone: no other module reads them off the config (each such read kept its own default
    or its own centre-crop arithmetic before)."""
    import ast

    package = Path(__file__).resolve().parents[1] / "volttl"
    reads = []
    for path in package.rglob("*.py"):
        if path.name in ("config.py", "input_spec.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("hu_clip", "intensity_shift", "crop") \
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "data":
                reads.append(f"{path.relative_to(package)}:{node.lineno} data.{node.attr}")
    assert not reads, reads
