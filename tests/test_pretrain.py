"""`volttl pretrain`: a synthetic source task, and a checkpoint in the 3D-ResNets layout."""

import numpy as np
import torch

from volttl.cli import main
from volttl.models.checkpoints import load_pretrained
from volttl.models.resnext3d import ResNeXt3D50
from volttl.pretrain.source_task import CLASSES, source_sample, source_window


def test_source_windows_are_deterministic_and_the_classes_differ():
    """The same key gives the same window; class 0 holds no shape, the others one, drawn
    bright (contrast) or dark (20-60 HU) inside a contrast pool, both kinds occurring; and
    contrast-filled vessels cross windows of every class, so brightness names no class."""
    rng = lambda i: np.random.default_rng([0, 0, i])  # noqa: E731
    a, la = source_window(rng(3), (8, 24, 24))
    b, lb = source_window(rng(3), (8, 24, 24))
    assert la == lb and np.array_equal(a, b)
    kinds, bright_none = set(), []
    for i in range(200):
        hu, label, inside = source_sample(rng(i), (8, 24, 24))
        if label == 0:
            assert not inside.any()
            bright_none.append(float((hu > 200).mean()))
            continue
        assert inside.any()
        mean = float(hu[inside].mean())
        assert mean > 150 or 0 < mean < 90, mean
        kinds.add((label, "bright" if mean > 150 else "dark"))
    assert {k for k, _ in kinds} == {1, 2, 3} and {p for _, p in kinds} == {"bright", "dark"}
    assert max(bright_none) > 0.01  # vessels in windows of class 0 too


def test_pretrain_writes_a_3d_resnets_checkpoint_that_loads(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"model: {{name: resnext3d_50}}\ntrain: {{workers: 0}}\n"
                   f"pretrain: {{out: {tmp_path / 'src.pth'}, depth: layer1, window: [8, 24, 24], "
                   "windows: 16, epochs: 1, batch_size: 8}\n")
    assert main(["pretrain", "--config", str(cfg), "--quiet"]) == 0
    assert "checkpoint" in capsys.readouterr().out
    obj = torch.load(tmp_path / "src.pth", weights_only=True)
    # the published layout, plus a note of the scale these weights saw
    assert set(obj) == {"epoch", "arch", "state_dict", "optimizer", "input_scale"}
    assert obj["input_scale"] == "ct"
    state = obj["state_dict"]
    assert all(k.startswith("module.") for k in state) and not any("num_batches" in k for k in state)
    assert state["module.fc.weight"].shape == (len(CLASSES), 2048)
    torch.manual_seed(0)  # the seed pretraining built its model with: deeper units keep that init
    fresh = ResNeXt3D50(num_outputs=len(CLASSES), in_channels=3).state_dict()
    assert torch.equal(state["module.layer3.0.conv1.weight"], fresh["layer3.0.conv1.weight"])
    assert not torch.equal(state["module.layer1.0.conv1.weight"], fresh["layer1.0.conv1.weight"])
    model = ResNeXt3D50(num_outputs=1, in_channels=1)
    report = load_pretrained(model, tmp_path / "src.pth")
    assert report.source_format == "3d-resnets" and not report.missing
