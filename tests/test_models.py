"""Backbones: published layouts, parameter counts, declared cut points, PENet's init."""

import math

import pytest
import torch

from volttl.models import build_backbone, get_backbone_spec
from volttl.models.penet import PENet, survival_prob
from volttl.models.resnext3d import ResNeXt3D50, ResNeXt3D152

from .published import shapes


@pytest.fixture(scope="module")
def resnext():
    return build_backbone("resnext3d_101", num_outputs=1, in_channels=3)


@pytest.fixture(scope="module")
def penet():
    return build_backbone("penet", num_outputs=1, in_channels=3)


@pytest.mark.parametrize("name,classes,manifest", [
    ("resnext3d_101", 400, "resnext101_kinetics400_state_dict_shapes.json"),
    ("penet", 600, "penet_kinetics600_state_dict_shapes.json"),
])
def test_state_dict_equals_published_layout(name, classes, manifest):
    model = build_backbone(name, num_outputs=classes)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}
    published = {k.removeprefix("module."): v for k, v in shapes(manifest).items()}
    assert ours == published
    expect = {"resnext3d_101": 48_340_816, "penet": 29_626_056}[name]
    assert sum(p.numel() for p in model.parameters()) == expect


def test_parameter_counts_of_the_paper(resnext, penet):
    assert sum(p.numel() for p in resnext.parameters()) == 47_523_265
    assert sum(p.numel() for p in penet.parameters()) == 28_398_705


def test_other_depths_build():
    assert len(ResNeXt3D50(1).layer3) == 6 and len(ResNeXt3D152(1).layer2) == 8
    assert ResNeXt3D50(1).eval()(torch.zeros(1, 3, 8, 32, 32)).shape == (1, 1)


@pytest.mark.parametrize("which", ["resnext", "penet"])
def test_every_cut_point_has_declared_channels_and_stride(which, request):
    model = request.getfixturevalue(which)
    model.eval()
    x = torch.zeros(1, 3, 32, 64, 64)
    with torch.no_grad():
        for cut in type(model).cut_points():
            f = model.forward_features(x, upto=cut.keep)
            assert f.shape[1] == cut.channels, cut.name
            expect = tuple(math.ceil(s / st) for s, st in zip(x.shape[2:], cut.stride, strict=True))
            assert tuple(f.shape[2:]) == expect, cut.name


def test_cut_points_listing():
    cuts = {c.name: c for c in get_backbone_spec("resnext3d_101").cut_points()}
    assert [n for n, c in cuts.items() if c.level == "block"] == ["stem", "layer1", "layer2",
                                                                   "layer3", "layer4"]
    assert cuts["layer3"].keep == cuts["layer3.22"].keep and cuts["layer3"].channels == 1024
    assert cuts["layer3.7"].stride == (8, 16, 16)
    penet_cuts = {c.name for c in PENet.cut_points()}
    assert {"encoders.0", "encoders.3", "encoders.2.penet_blocks.4"} <= penet_cuts
    assert len([c for c in PENet.cut_points() if c.level == "layer"]) == 16


def test_penet_initialisation(penet):
    assert torch.allclose(penet.classifier.fc.bias, torch.tensor([-math.log(99.0)]))
    for enc in penet.encoders:
        for block in enc.penet_blocks:
            assert torch.count_nonzero(block.norm3.weight) == 0
    assert survival_prob(16) == 0.5 and survival_prob(1) == pytest.approx(1 - 1 / 32)


def test_penet_stochastic_depth_only_in_training(penet):
    block = penet.encoders[3].penet_blocks[2]  # survives with probability 0.5
    torch.nn.init.normal_(block.norm3.weight)  # make the residual branch visible
    x = torch.randn(1, 2048, 2, 2, 2)
    block.train()
    torch.manual_seed(0)
    outs = {round(float(block(x).sum().detach()), 3) for _ in range(20)}
    assert len(outs) == 2  # skipped (shortcut) or run
    block.eval()
    with torch.no_grad():
        assert float(block(x).sum()) == pytest.approx(float(block(x).sum()))
    torch.nn.init.zeros_(block.norm3.weight)
