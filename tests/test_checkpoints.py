"""Foreign checkpoints in their published formats load into the right parameters."""

import pickle

import pytest
import torch

from volttl.models.checkpoints import CheckpointError, load_pretrained, save_checkpoint
from volttl.models.penet import PENet
from volttl.models.resnext3d import ResNeXt3D101

from .published import penet_kinetics, resnext101_kinetics


@pytest.fixture(scope="module")
def resnext_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "resnext-101-kinetics.pth"
    return path, resnext101_kinetics(path)


def test_3d_resnets_file_lands_in_the_right_parameters(resnext_file):
    path, source = resnext_file
    model = ResNeXt3D101(num_outputs=1, in_channels=3)
    head_before = model.fc.weight.clone()
    report = load_pretrained(model, path)
    assert report.source_format == "3d-resnets"
    assert sorted(report.dropped_head) == ["fc.bias", "fc.weight"]
    for key in ("conv1.weight", "layer3.22.conv2.weight", "layer1.0.downsample.0.weight",
                "layer4.2.bn3.running_var", "bn1.bias"):
        assert torch.equal(model.state_dict()[key], source[key]), key
    assert torch.equal(model.fc.weight, head_before)  # the 400-way classifier is not used
    assert len(report.loaded) == 520 and not report.missing and not report.unexpected


def test_stem_sum_equals_repeat(resnext_file):
    path, source = resnext_file
    rep, summed = ResNeXt3D101(1, in_channels=3), ResNeXt3D101(1, in_channels=1)
    load_pretrained(rep, path)
    load_pretrained(summed, path)
    assert torch.allclose(summed.conv1.weight, source["conv1.weight"].sum(1, keepdim=True))
    summed.fc.load_state_dict(rep.fc.state_dict())
    x = torch.randn(2, 1, 8, 48, 48)
    with torch.no_grad():
        a = rep.eval()(x)  # repeats the CT to three channels inside
        b = summed.eval()(x)
        c = rep(x.repeat(1, 3, 1, 1, 1))
    assert torch.allclose(a, c)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("old_names", [False, True])
def test_penet_file(tmp_path, old_names):
    path = tmp_path / "penet.pth.tar"
    source = penet_kinetics(path, seed=1, old_names=old_names)
    model = PENet(num_outputs=1, in_channels=3)
    report = load_pretrained(model, path)
    assert report.source_format == "penet"
    assert sorted(report.dropped_head) == ["classifier.fc.bias", "classifier.fc.weight"]
    for key in ("in_conv.0.weight", "encoders.2.penet_blocks.4.conv2.weight",
                "encoders.3.penet_blocks.0.down_sample.1.weight",
                "encoders.1.penet_blocks.0.se_block.excite.2.bias"):
        assert torch.equal(model.state_dict()[key], source[key]), key


def test_bare_state_dict_and_own_format(tmp_path, resnext_file):
    _, source = resnext_file
    bare = tmp_path / "bare.pt"
    torch.save(source, bare)
    model = ResNeXt3D101(1, 3)
    assert load_pretrained(model, bare).source_format == "state_dict"
    torch.nn.init.constant_(model.fc.bias, 0.25)
    save_checkpoint(tmp_path / "own.pt", model, config={"model": {"name": "resnext3d_101"}})
    again = ResNeXt3D101(1, 3)
    report = load_pretrained(again, tmp_path / "own.pt")
    assert report.source_format == "volttl" and not report.dropped_head
    assert float(again.fc.bias.detach()) == 0.25  # volttl's own checkpoints keep their head


def test_missing_and_mismatched_keys_are_named(tmp_path, resnext_file):
    _, source = resnext_file
    broken = dict(source)
    del broken["layer2.1.conv2.weight"]
    torch.save({"state_dict": broken}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth: 1 backbone weight.*missing layer2\.1\.conv2"):
        load_pretrained(ResNeXt3D101(1, 3), tmp_path / "missing.pth")
    broken = dict(source)
    broken["layer4.0.bn1.weight"] = torch.zeros(7)
    torch.save({"state_dict": broken}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"layer4\.0\.bn1\.weight \(7,\) vs \(1024,\)"):
        load_pretrained(ResNeXt3D101(1, 3), tmp_path / "shape.pth")
    extra = dict(source)
    extra["aux.weight"] = torch.zeros(3)
    torch.save({"state_dict": extra}, tmp_path / "extra.pth")
    assert load_pretrained(ResNeXt3D101(1, 3), tmp_path / "extra.pth").unexpected == ["aux.weight"]


class Payload:
    """Unpickling this would mean importing and calling arbitrary code."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_a_checkpoint_cannot_run_code(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pth: refused: .* could run code"):
        load_pretrained(ResNeXt3D101(1, 3), path)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("zipped", [False, True])
def test_legacy_files_with_schedulers_and_numpy_scalars_load_their_weights(tmp_path, zipped):
    """PENet-era files pickle functools.partial, numpy scalars and optimiser state beside
    the weights: the weights load, everything else stays inert, nothing is called."""
    import functools
    import math

    import numpy as np

    path = tmp_path / "penet_legacy.pth"
    source = penet_kinetics(path, old_names=True, legacy=not zipped)
    if zipped:  # the new format with the same extras
        obj = torch.load(path, weights_only=False)
        obj["lr_scheduler"] = {"lr_lambdas": [functools.partial(math.cos, 0.5)]}
        obj["ckpt_info"] = {"epoch": np.int64(10)}
        torch.save(obj, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # plain loading
        torch.load(path, weights_only=True)
    model = PENet(num_outputs=1, in_channels=3)
    report = load_pretrained(model, path)
    assert report.source_format == "penet" and not report.missing
    for key in ("in_conv.0.weight", "encoders.2.penet_blocks.4.conv2.weight"):
        assert torch.equal(model.state_dict()[key], source[key]), key


class ShellPayload:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned_by_checkpoint",))


@pytest.mark.parametrize("zipped", [False, True])
def test_a_legacy_file_that_would_run_a_command_loads_and_runs_nothing(tmp_path, monkeypatch, zipped):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil_legacy.pth"
    torch.save({"model_state": {"x": torch.zeros(1)}, "lr_scheduler": ShellPayload()}, path,
               _use_new_zipfile_serialization=zipped)
    model = PENet(num_outputs=1, in_channels=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refused = r"refused: it pickles (os|posix)\.system, which could run code; nothing was loaded"
    with pytest.raises(CheckpointError, match=refused):
        load_pretrained(model, path)
    assert not (tmp_path / "pwned_by_checkpoint").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_kinetics600_resnext_file_loads_with_its_600_way_head_dropped(tmp_path):
    """The TTL paper pretrains ResNeXt3D-101 on Kinetics-600: same layout as Hara's
    Kinetics-400 file but a 600-way fc, which finetuning drops."""
    from .published import random_state

    state = random_state("resnext101_kinetics400_state_dict_shapes.json", seed=3)
    state["module.fc.weight"], state["module.fc.bias"] = torch.randn(600, 2048), torch.randn(600)
    torch.save({"epoch": 1, "arch": "resnext-101", "state_dict": state, "optimizer": {}},
               tmp_path / "k600.pth")
    model = ResNeXt3D101(num_outputs=1, in_channels=1)
    report = load_pretrained(model, tmp_path / "k600.pth")
    assert sorted(report.dropped_head) == ["fc.bias", "fc.weight"] and not report.missing
    assert torch.equal(model.layer4[2].conv3.weight, state["module.layer4.2.conv3.weight"])
    assert model.fc.weight.shape == (1, 2048)
