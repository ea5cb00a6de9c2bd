"""A fourth backbone, declared in this one file, shows up everywhere backbones are listed:
`volttl cuts`, `volttl profile` and the search table."""

import json

import pytest
import yaml
from torch import nn

from volttl.cli import main
from volttl.models import BACKBONES, Backbone3D, get_backbone_spec, register_backbone
from volttl.models.base import Unit, cut_points_from_units, stage_units

from .test_strategies import TinyBlock


@pytest.fixture(autouse=True)
def plain3d():
    register_backbone("plain3d_test", display="Plain3D (test)",
                      checkpoint_key=lambda k: k.replace(".old_body.", ".body."))(Plain3D)
    yield Plain3D
    BACKBONES.pop("plain3d_test", None)


def _units():
    return stage_units(Unit("stem", ("stem",), 4, (1, 1, 1)), (1, 2), (8, 16), (2, 2),
                       block_path=lambda s, b: f"body.{s}.{b}", stage_path=lambda s: f"body.{s}")


class Plain3D(Backbone3D):
    """Registered by the ``plain3d`` fixture for each test of this file only, so what other
    test files see of the registry does not depend on the order tests run in."""

    head_path = "head"

    def __init__(self, num_outputs: int = 1, in_channels: int = 3):
        super().__init__()
        self.in_channels = in_channels
        self.stem = nn.Conv3d(in_channels, 4, 3, padding=1)
        self.body = nn.ModuleList([nn.Sequential(TinyBlock(4, 8, 2)),
                                   nn.Sequential(TinyBlock(8, 16, 2), TinyBlock(16, 16, 1))])
        self.head = nn.Linear(16, num_outputs)
        self.units, _ = _units()

    def stem_forward(self, x):
        return self.stem(x)

    def make_block(self, unit_name, in_channels, width):
        _, s, b = unit_name.split(".")
        out = max(1, int((8, 16)[int(s)] * width))
        return TinyBlock(in_channels, out, 2 if b == "0" else 1), out

    @classmethod
    def cut_points(cls):
        return cut_points_from_units(*_units())


def test_registration_declares_name_display_and_checkpoint_keys():
    assert BACKBONES["plain3d_test"] is Plain3D and get_backbone_spec("plain3d_test") is Plain3D
    assert Plain3D.display_name == "Plain3D (test)"
    assert Plain3D.checkpoint_key("x.old_body.1") == "x.body.1"
    assert Backbone3D.checkpoint_key("x.old_body.1") == "x.old_body.1"  # other backbones untouched
    assert [c.name for c in Plain3D.cut_points()] == ["stem", "body.0.0", "body.0", "body.1.0", "body.1.1",
                                                      "body.1"]


def test_a_new_backbone_appears_in_cuts_and_profile(tmp_path, capsys):
    assert main(["cuts", "--model", "plain3d_test"]) == 0
    out = capsys.readouterr().out
    assert "body.1.1" in out and "layer" in out
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": "plain3d_test"}, "transfer": {"head": {"norm": True}},
        "profile": {"strategies": ["ftl", "ttl"], "cuts": ["body.0"], "input_size": [8, 16, 16],
                    "repeats": 1, "warmup": 0, "out_dir": str(tmp_path / "prof")}}))
    assert main(["profile", "--config", str(cfg)]) == 0
    table = capsys.readouterr().out
    assert "| plain3d_test | TTL | body.0 |" in table
    # the head's BatchNorm is counted (one builder for training and profiling)
    from volttl.analysis.complexity import count_parameters
    from volttl.config import load_config
    from volttl.inference import model_from_config

    c = load_config(cfg)
    c.transfer.strategy, c.transfer.cut = "ttl", "body.0"
    expected = count_parameters(model_from_config(c, weights=False).model) / 1e6
    assert f"| {expected:.2f} |" in table.split("| TTL | body.0 |")[1]


def test_the_search_table_names_a_new_backbone_by_its_display_name(tmp_path, monkeypatch):
    """The table's rows come from the registry's display name (training is stubbed out:
    only the table is under test here)."""
    import volttl.search.step as stages

    def fake_jobs(jobs, *args):
        out = []
        for cfg, folder in jobs:
            cut = cfg["transfer"]["cut"] if cfg["transfer"]["strategy"] != "ftl" else ""
            stat = {"mean": 0.5 + 0.01 * len(cut), "std": 0.0, "n": 1}
            out.append({"cut": cut, "dir": folder, "seeds": [0], "val_study_auroc": stat,
                        "test_study_auroc": stat, "test_study_auprc": stat, "params_m": 1.0, "macs_g": 0.1,
                        "latency_ms": 1.0})
        return out

    monkeypatch.setattr(stages, "run_jobs", fake_jobs)
    from volttl.config import config_from_dict

    cfg = config_from_dict({"model": {"name": "plain3d_test"},
                            "search": {"strategies": ["ttl"], "baselines": ["ftl"], "radius": 1,
                                       "out_dir": str(tmp_path / "search")}})
    rows = stages.search_step(cfg, progress=False)
    assert {r["model"] for r in rows} == {"Plain3D (test)"}
    table = (tmp_path / "search" / "search_table.md").read_text()
    assert "| Plain3D (test) | TTL-2 |" in table
    assert json.loads((tmp_path / "search" / "search_table.json").read_text())[0]["model"] == "Plain3D (test)"
