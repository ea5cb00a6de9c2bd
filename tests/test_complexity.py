"""MACs and parameters against the published figures and an independent counter."""

import pytest
import torch
from ptflops import get_model_complexity_info

from volttl.analysis.complexity import count_macs, count_parameters, measure_latency
from volttl.config import config_from_dict
from volttl.models.resnext3d import ResNeXt3D50, ResNeXt3D101


def test_resnext101_macs_match_the_published_figure():
    model = ResNeXt3D101(num_outputs=1, in_channels=3)
    assert count_parameters(model) == 47_523_265
    macs = count_macs(model, (1, 3, 16, 112, 112))
    assert macs == pytest.approx(9.57e9, rel=0.005)
    # the stem conv alone, as FACTS.md tabulates (3.30 G), and a third of it with `stem: sum`
    stem = ResNeXt3D101(1, 3).conv1
    x = torch.zeros(1, 3, 16, 112, 112)
    assert count_macs(torch.nn.Sequential(stem), x.shape) == pytest.approx(3.30e9, rel=0.005)
    summed = ResNeXt3D101(1, 1).conv1
    assert count_macs(torch.nn.Sequential(summed), (1, 1, 16, 112, 112)) * 3 == count_macs(
        torch.nn.Sequential(stem), x.shape)


def test_macs_agree_with_ptflops():
    model = ResNeXt3D50(num_outputs=1, in_channels=3)
    ours = count_macs(model, (1, 3, 8, 64, 64))
    theirs, params = get_model_complexity_info(model, (3, 8, 64, 64), as_strings=False,
                                               print_per_layer_stat=False, backend="aten")
    assert params == count_parameters(model)
    assert ours == pytest.approx(theirs, rel=1e-6)  # ptflops adds the fc bias: 1 MAC


@pytest.mark.parametrize("name", ["resnext3d_50", "penet"])
def test_the_ptflops_rule_equals_ptflops_module_hooks(name):
    """The reported rule against ptflops itself, module hooks only (its later counting of
    torch.nn.functional calls switched off): BatchNorm and GroupNorm, ReLU and LeakyReLU,
    max and adaptive pooling, convolutions and linear layers with their biases (PENet's
    squeeze-excitation) all count the same, and the rule adds to the conv-only count."""
    from volttl.models import get_backbone_spec

    model = get_backbone_spec(name)(num_outputs=1, in_channels=3).eval()
    ours = count_macs(model, (1, 3, 8, 48, 48), rule="ptflops")
    theirs, _ = get_model_complexity_info(model, (3, 8, 48, 48), as_strings=False,
                                          print_per_layer_stat=False, backend="pytorch",
                                          backend_specific_config={"count_functional": False})
    assert ours == theirs
    assert ours > count_macs(model, (1, 3, 8, 48, 48), rule="conv") * 1.005
    with pytest.raises(ValueError, match="not one of"):
        count_macs(model, (1, 3, 8, 48, 48), rule="flops")


def test_latency_is_the_median_forward_time_after_warmup(monkeypatch):
    """On a fake clock that each forward pass advances by a known time: the warm-up passes
    are left out and the median of the rest is returned, in milliseconds."""
    import volttl.analysis.complexity as complexity

    now = [0.0]
    costs = iter([5.0, 0.004, 0.001, 0.003])  # seconds: one warm-up pass, then three timed ones

    class Clocked(torch.nn.Module):
        def forward(self, x):
            now[0] += next(costs)
            return x

    monkeypatch.setattr(complexity.time, "perf_counter", lambda: now[0])
    assert measure_latency(Clocked(), (1, 1, 2, 2, 2), repeats=3, warmup=1) == pytest.approx(3.0)


def test_profile_writes_tables(tmp_path):
    from volttl.analysis.complexity import profile_variants

    cfg = config_from_dict({"model": {"name": "resnext3d_50"}, "profile": {
        "strategies": ["ttl", "tf"], "cuts": ["layer2"], "input_size": [8, 32, 32],
        "repeats": 1, "warmup": 0, "out_dir": str(tmp_path)}})
    table = profile_variants(cfg)
    lines = (tmp_path / "profile.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[1].startswith("resnext3d_50,FTL,-,")
    ftl, ttl = (float(line.split(",")[3]) for line in lines[1:3])
    assert ttl < ftl and "| TTL | layer2 |" in table


@pytest.mark.parametrize("count_stem,tf_params", [("rgb", 36_080_065), ("model", 36_080_065 - 2 * 21_952)])
def test_cost_columns_follow_the_papers_stem_convention_by_default(count_stem, tf_params):
    """The paper's TF-1 P(M) is 36.1 with the 3-channel stem; the summed 1-channel stem
    has two thirds of conv1's 65,856 weights fewer (36.0). The default counts as the paper."""
    from volttl.analysis.complexity import convention, profile_config

    cfg = config_from_dict({"model": {"name": "resnext3d_101", "stem": "sum"},
                            "transfer": {"strategy": "tf", "cut": "layer3"},
                            "profile": {"input_size": [4, 32, 32], "repeats": 1, "warmup": 0,
                                        "count_stem": count_stem}})
    row = profile_config(cfg)
    assert row["params_m"] * 1e6 == pytest.approx(tf_params, abs=0.5)
    assert row["input"] == [1, 4, 32, 32]  # latency is timed on the model as trained
    assert ("3-channel (RGB) stem" in convention(cfg)) == (count_stem == "rgb")
    assert config_from_dict({}).profile.count_stem == "rgb"
