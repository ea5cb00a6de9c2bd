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
