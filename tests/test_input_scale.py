"""`model.input_scale`: CT windows mapped onto the scale the published weights were trained
on, exactly, for both stems; refused where there is nothing to map to."""

import logging

import pytest
import torch

from volttl.errors import VolttlError
from volttl.models.checkpoints import CheckpointError
from volttl.models.resnext3d import KINETICS_INPUT, ResNeXt3D50, ResNeXt3D101
from volttl.transfer import build_transfer_model

SHIFT = 0.15897


def _published(model: torch.nn.Module, path, **extra) -> None:
    state = {f"module.{k}": v for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save({"epoch": 1, "arch": "resnext", "state_dict": state, "optimizer": {}, **extra}, path)


def _video(n: int, shape, generator) -> torch.Tensor:
    """RGB clips as the 3D-ResNets code fed them: 0..255 minus the channel means."""
    means = torch.tensor(KINETICS_INPUT.channel_means).view(1, 3, 1, 1, 1)
    return torch.rand(n, 3, *shape, generator=generator) * 255 - means


def _source_view(x: torch.Tensor) -> torch.Tensor:
    """What the published weights would be given for the CT window ``x`` (= u - shift)."""
    means = torch.tensor(KINETICS_INPUT.channel_means).view(1, 3, 1, 1, 1)
    return (x + SHIFT).expand(-1, 3, *x.shape[2:]) * KINETICS_INPUT.scale - means


@pytest.fixture(scope="module")
def video_resnext50(tmp_path_factory):
    """A 3-channel ResNeXt3D-50 whose BatchNorm statistics were gathered on video frames,
    saved in the published layout."""
    torch.manual_seed(3)
    model = ResNeXt3D50(num_outputs=4, in_channels=3)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = None
            torch.nn.init.normal_(m.weight, 1.0, 0.1)
            torch.nn.init.normal_(m.bias, 0.0, 0.1)
    with torch.no_grad():
        for _ in range(2):
            model(_video(4, (8, 32, 32), g))
    model.eval()
    path = tmp_path_factory.mktemp("video") / "resnext-50-kinetics.pth"
    _published(model, path)
    return path, model


@pytest.mark.parametrize("stem", ["repeat", "sum"])
def test_source_scale_gives_the_published_network_its_own_input(video_resnext50, stem):
    path, reference = video_resnext50
    model = build_transfer_model("resnext3d_50", "ftl", "", stem=stem, pretrained=str(path),
                                 input_scale="source", intensity_shift=SHIFT).model.eval()
    x = torch.rand(2, 1, 8, 32, 32, generator=torch.Generator().manual_seed(5)) - SHIFT
    with torch.no_grad():
        want = reference.forward_features(_source_view(x))
        got = model.forward_features(x)
        # border voxels too: the summed stem's offset kernel covers the zero padding
        want_stem = reference.unit_outputs(_source_view(x))[0]
        got_stem = model.unit_outputs(x)[0]
    assert torch.allclose(got_stem, want_stem, rtol=1e-4, atol=1e-4 * float(want_stem.abs().max()))
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    # the ct scale feeds the same weights another input altogether
    ct = build_transfer_model("resnext3d_50", "ftl", "", stem=stem, pretrained=str(path)).model.eval()
    with torch.no_grad():
        assert not torch.allclose(ct.forward_features(x), want, rtol=0.1, atol=0.1)


def test_source_scale_survives_a_run_checkpoint(video_resnext50):
    """A trained run reloads its mapping (buffers in the state_dict) into a model built
    without weights, as evaluation, cam and predict build it."""
    path, _ = video_resnext50
    trained = build_transfer_model("resnext3d_50", "ttl", "layer2", pretrained=str(path),
                                   input_scale="source", intensity_shift=SHIFT).model.eval()
    fresh = build_transfer_model("resnext3d_50", "ttl", "layer2", weights=False,
                                 input_scale="source", intensity_shift=SHIFT).model.eval()
    fresh.load_state_dict(trained.state_dict())
    x = torch.rand(1, 1, 8, 32, 32) - SHIFT
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
    plain = build_transfer_model("resnext3d_50", "ttl", "layer2", weights=False).model
    with pytest.raises(RuntimeError, match="stem_offset_kernel"):
        plain.load_state_dict(trained.state_dict())


def test_frozen_eval_statistics_see_ct_on_their_own_scale(tmp_path, caplog):
    """LWFT with the pretrained statistics fixed (frozen_bn eval): on the ct scale two
    different windows collapse to nearly the same features (and a warning says so); mapped
    onto the source scale they stay apart."""
    torch.manual_seed(4)
    source = ResNeXt3D101(num_outputs=4, in_channels=3)
    for m in source.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = None
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            source(_video(4, (8, 32, 32), g))
    _published(source, tmp_path / "video.pth")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 8, 32, 32, generator=g) - SHIFT
    cosines = {}
    for scale in ("ct", "source"):
        with caplog.at_level(logging.WARNING, logger="volttl.transfer"):
            caplog.clear()
            m = build_transfer_model("resnext3d_101", "lwft", "layer2",
                                     pretrained=str(tmp_path / "video.pth"), frozen_bn="eval",
                                     input_scale=scale, intensity_shift=SHIFT).model
        assert ("squash" in caplog.text) == (scale == "ct")
        m.train()
        with torch.no_grad():
            feats = m.unit_outputs(x)[type(m).cut_point("layer2").keep - 1]
        a, b = feats[0].flatten(), feats[1].flatten()
        cosines[scale] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert cosines["ct"] > 0.999, cosines
    assert cosines["source"] < 0.99, cosines


def test_source_scale_refusals(video_resnext50, tmp_path):
    path, reference = video_resnext50
    with pytest.raises(VolttlError, match="no model.pretrained"):
        build_transfer_model("resnext3d_50", "ttl", "layer2", input_scale="source", intensity_shift=0.15897)
    with pytest.raises(VolttlError, match="input_scale 'video' is not one of ct, source"):
        build_transfer_model("resnext3d_50", "ttl", "layer2", input_scale="video")
    # weights that saw CT (volttl pretrain marks its files) are not rescaled
    _published(reference, tmp_path / "ct.pth", input_scale="ct")
    with pytest.raises(CheckpointError, match=r"ct\.pth: these weights were trained on CT windows"):
        build_transfer_model("resnext3d_50", "ttl", "layer2", pretrained=str(tmp_path / "ct.pth"),
                             input_scale="source", intensity_shift=0.15897)
    # a 1-channel file lacks what the summed stem needs to be exact
    one = ResNeXt3D50(num_outputs=4, in_channels=1)
    _published(one, tmp_path / "one.pth")
    with pytest.raises(CheckpointError, match=r"one\.pth: .*needs the 3-channel stem weights"):
        build_transfer_model("resnext3d_50", "ttl", "layer2", pretrained=str(tmp_path / "one.pth"),
                             input_scale="source", intensity_shift=0.15897)


def test_source_needs_a_known_or_declared_normalisation(tmp_path):
    """PENet's Kinetics file and a 2020-code file do not say what input they were trained
    on: input_scale source is refused by name until the normalisation is declared."""
    from volttl.config import config_from_dict
    from volttl.models.source_presets import declared

    from .published import penet_kinetics

    penet_kinetics(tmp_path / "penet.pth")
    with pytest.raises(VolttlError, match=r"penet\.pth: model.input_scale is source, but the input "
                                          r"scaling .* not known from the file; declare it"):
        build_transfer_model("penet", "ttl", "encoders.1", pretrained=str(tmp_path / "penet.pth"),
                             input_scale="source", intensity_shift=0.15897)
    cfg = config_from_dict({"model": {"source_preset": "custom", "source_scale": 1.0,
                                      "source_mean": [0.4, 0.4, 0.4], "source_std": [0.2, 0.25, 0.3]}})
    x = torch.rand(1, 1, 8, 32, 32) - SHIFT
    out = {}
    for scale in ("ct", "source"):
        torch.manual_seed(0)
        m = build_transfer_model("penet", "ttl", "encoders.1", pretrained=str(tmp_path / "penet.pth"),
                                 input_scale=scale, source_preset=declared(cfg.model),
                                 intensity_shift=0.15897).model.eval()
        assert hasattr(m, "input_gain") == (scale == "source")
        with torch.no_grad():
            out[scale] = m(x)
    assert not torch.equal(out["ct"], out["source"])
    model = ResNeXt3D50(num_outputs=4, in_channels=3)
    torch.save({"epoch": 1, "arch": "resnext-50", "state_dict": model.state_dict(), "optimizer": {},
                "scheduler": {}}, tmp_path / "k600_2020.pth")  # the 2020 code's layout
    with pytest.raises(VolttlError, match=r"k600_2020\.pth: .*declare it with model.source_preset"):
        build_transfer_model("resnext3d_50", "ttl", "layer2", pretrained=str(tmp_path / "k600_2020.pth"),
                             input_scale="source", intensity_shift=0.15897)
    with pytest.raises(ValueError, match=r"model.source_std must be 3 positive numbers"):
        config_from_dict({"model": {"source_preset": "custom", "source_mean": [0, 0, 0],
                                    "source_std": [1, 0]}})


@pytest.mark.parametrize("stem", ["repeat", "sum"])
def test_declared_kinetics2020_normalisation_is_exact_for_both_stems(video_resnext50, stem):
    """0..1 frames with per-channel means and stds (the 2020 code): the summed stem weighs
    each RGB kernel by its channel's gain, and matches the 3-channel network exactly."""
    from volttl.models.source_presets import PRESETS

    path, reference = video_resnext50
    norm = PRESETS["kinetics2020"]
    model = build_transfer_model("resnext3d_50", "ftl", "", stem=stem, pretrained=str(path),
                                 input_scale="source", intensity_shift=SHIFT, source_preset=norm).model.eval()
    x = torch.rand(2, 1, 8, 32, 32, generator=torch.Generator().manual_seed(6)) - SHIFT
    means = torch.tensor(norm.channel_means).view(1, 3, 1, 1, 1)
    stds = torch.tensor(norm.channel_stds).view(1, 3, 1, 1, 1)
    view = ((x + SHIFT).expand(-1, 3, *x.shape[2:]) * norm.scale - means) / stds
    with torch.no_grad():
        want_stem, got_stem = reference.unit_outputs(view)[0], model.unit_outputs(x)[0]
        want, got = reference.forward_features(view), model.forward_features(x)
    assert torch.allclose(got_stem, want_stem, rtol=1e-4, atol=1e-4 * float(want_stem.abs().max()))
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    hara = build_transfer_model("resnext3d_50", "ftl", "", stem=stem, pretrained=str(path),
                                input_scale="source", intensity_shift=SHIFT).model.eval()
    with torch.no_grad():  # the file's own (hara2018) scale is another input altogether
        assert not torch.allclose(hara.forward_features(x), want, rtol=0.1, atol=0.1)
