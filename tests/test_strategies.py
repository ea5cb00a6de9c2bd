"""FTL, TF, LWFT and TTL: parameter counts, groups, frozen parts, kept weights, inits."""

import pytest
import torch
from torch import nn

from volttl.models.base import Backbone3D, CutPoint, Unit, cut_points_from_units, stage_units
from volttl.models.checkpoints import load_pretrained
from volttl.models.surgery import recalibrate_frozen_norms
from volttl.transfer import apply_strategy, build_transfer_model

from .published import penet_kinetics, resnext101_kinetics


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def resnext_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "resnext-101-kinetics.pth"
    return path, resnext101_kinetics(path, seed=2)


@pytest.mark.parametrize("stem,counts", [
    ("repeat", {"ftl": 47_523_265, "tf": 36_080_065, "ttl": 31_207_873, "lwft": 47_523_265}),
    ("sum", {"ftl": 47_479_361, "tf": 36_036_161, "ttl": 31_163_969, "lwft": 47_479_361}),
])
def test_resnext_counts_of_the_paper(stem, counts):
    for strategy, expect in counts.items():
        setup = build_transfer_model("resnext3d_101", strategy, "layer3", stem=stem)
        assert n_params(setup.model) == expect, strategy


def test_tf_at_full_width_is_weight_transfusion():
    setup = build_transfer_model("resnext3d_101", "tf", "layer3", width=1.0, stem="repeat")
    assert n_params(setup.model) == 47_523_265
    assert any(n.startswith("layer4.") for n in setup.new)


def test_tf_layer_cut_rebuilds_rest_of_stage(resnext_ckpt):
    path, source = resnext_ckpt
    setup = build_transfer_model("resnext3d_101", "tf", "layer3.10", stem="repeat",
                                 pretrained=str(path))
    m = setup.model
    assert m.layer3[10].conv3.out_channels == 1024 and torch.equal(
        m.layer3[10].conv3.weight, source["layer3.10.conv3.weight"])
    first = m.layer3[11]
    assert first.conv1.in_channels == 1024 and first.conv3.out_channels == 512
    assert first.downsample is not None  # projection from full to half width
    assert first.conv2.groups == 32 and m.layer4[0].conv3.out_channels == 1024
    assert m.fc.in_features == 1024
    assert "layer3.11.conv1.weight" in setup.new and "layer3.10.conv1.weight" in setup.pretrained
    with torch.no_grad():
        assert m.eval()(torch.zeros(1, 1, 16, 64, 64)).shape == (1, 1)


def test_groups_and_learning_rates(resnext_ckpt):
    path, _ = resnext_ckpt
    ftl = build_transfer_model("resnext3d_101", "ftl", "", pretrained=str(path))
    groups = {g["name"]: g for g in ftl.param_groups(0.01, 0.1)}
    assert groups["pretrained"]["lr"] == 0.01 and groups["new"]["lr"] == 0.1
    assert ftl.new == ["fc.weight", "fc.bias"] and not ftl.frozen
    assert len(groups["pretrained"]["params"]) == len(list(ftl.model.parameters())) - 2

    lwft = build_transfer_model("resnext3d_101", "lwft", "layer3", pretrained=str(path))
    groups = {g["name"]: g for g in lwft.param_groups(0.01, 0.1)}
    assert all(n.startswith("layer4.") for n in lwft.pretrained)
    assert all(not n.startswith("layer4.") and not n.startswith("fc.") for n in lwft.frozen)
    assert {id(p) for p in groups["pretrained"]["params"]} == {
        id(p) for n, p in lwft.model.named_parameters() if n.startswith("layer4.")}
    assert all(not p.requires_grad for n, p in lwft.model.named_parameters() if n in lwft.frozen)
    assert all(p.requires_grad for n, p in lwft.model.named_parameters() if n not in lwft.frozen)


def test_pretrained_weights_below_the_cut_are_kept(resnext_ckpt):
    path, source = resnext_ckpt
    for strategy in ("tf", "ttl", "lwft"):
        m = build_transfer_model("resnext3d_101", strategy, "layer2", stem="repeat",
                                 pretrained=str(path)).model
        state = m.state_dict()
        for key in ("conv1.weight", "layer1.2.conv2.weight", "layer2.3.bn3.running_mean"):
            assert torch.equal(state[key], source[key]), (strategy, key)
        if strategy == "ttl":
            assert not any(k.startswith(("layer3", "layer4")) for k in state)
            assert not hasattr(m, "layer3") and not hasattr(m, "layer4")
            assert m.fc.in_features == 512


@pytest.mark.parametrize("frozen_bn", ["eval", "train"])
def test_lwft_frozen_weights_do_not_move_and_batchnorm_runs_as_declared(resnext_ckpt, frozen_bn):
    path, source = resnext_ckpt
    setup = build_transfer_model("resnext3d_101", "lwft", "layer3", stem="repeat",
                                 pretrained=str(path), frozen_bn=frozen_bn)
    m = setup.model.train()
    opt = torch.optim.SGD(setup.param_groups(0.1, 0.1), momentum=0.9)
    x = torch.randn(2, 1, 16, 64, 64) * 3
    loss = m(x).sum()
    loss.backward()
    opt.step()
    state = m.state_dict()
    fixed = frozen_bn == "eval"
    assert torch.equal(state["layer2.0.bn1.running_mean"], source["layer2.0.bn1.running_mean"]) == fixed
    assert torch.equal(state["layer3.22.bn3.running_var"], source["layer3.22.bn3.running_var"]) == fixed
    assert torch.equal(state["layer3.22.conv3.weight"], source["layer3.22.conv3.weight"])  # frozen
    assert torch.equal(state["layer3.22.bn3.weight"], source["layer3.22.bn3.weight"])  # frozen too
    assert not torch.equal(state["layer4.0.bn1.running_mean"], source["layer4.0.bn1.running_mean"])
    assert not torch.equal(state["layer4.0.conv1.weight"], source["layer4.0.conv1.weight"])
    assert m.layer3[5].bn1.training == (not fixed)
    assert m.layer4[0].training and m.layer4[0].bn1.training


def _video_scale_checkpoint(path, source_path):
    """The published layout with BatchNorm statistics gathered on video frames (0-255 minus
    channel means): means and variances hundreds of times what CT windows produce."""
    obj = torch.load(source_path, weights_only=True)
    g = torch.Generator().manual_seed(1)
    for key, value in obj["state_dict"].items():
        if key.endswith("running_mean"):
            obj["state_dict"][key] = torch.randn(value.shape, generator=g) * 200.0
        elif key.endswith("running_var"):
            obj["state_dict"][key] = torch.rand(value.shape, generator=g) * 4e4 + 1e4
    torch.save(obj, path)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_lwft_features_of_different_windows_stay_different_by_default(resnext_ckpt, tmp_path):
    """With video-scale BatchNorm statistics frozen in eval mode, two different CT windows
    give nearly the same features after the frozen layers (the statistics squash them);
    with the default (train) and with recalibration they stay apart."""
    path, _ = resnext_ckpt
    _video_scale_checkpoint(tmp_path / "video.pth", path)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 1, 16, 64, 64, generator=g) - 0.16  # PENet-normalised range
    x = torch.cat([a, b])
    cosines = {}
    for mode in ("eval", "train", "recalibrate"):
        torch.manual_seed(0)
        m = build_transfer_model("resnext3d_101", "lwft", "layer2", pretrained=str(tmp_path / "video.pth"),
                                 frozen_bn=mode).model.train()
        if mode == "recalibrate":
            assert recalibrate_frozen_norms(m, [torch.rand(4, 1, 16, 64, 64, generator=g) - 0.16
                                               for _ in range(2)]) == 8
            assert m.frozen_norm == "eval" and not m.layer1[0].bn1.training
        keep = type(m).cut_point("layer2").keep
        with torch.no_grad():
            feats = m.unit_outputs(x)[keep - 1]
        cosines[mode] = _cosine(feats[0], feats[1])
    assert cosines["eval"] > 0.999  # the collapse the default avoids
    assert cosines["train"] < 0.99 and cosines["recalibrate"] < 0.99


def test_meanvar_init_matches_pretrained_moments(resnext_ckpt):
    path, source = resnext_ckpt
    setup = build_transfer_model("resnext3d_101", "tf", "layer3", init="meanvar", stem="repeat",
                                 pretrained=str(path))
    state = setup.model.state_dict()
    for key in ("layer4.0.conv1.weight", "layer4.1.conv2.weight", "layer4.2.conv3.weight"):
        new, ref = state[key], source[key]
        assert new.shape != ref.shape  # half width: drawn, not copied
        n = new.numel()
        assert abs(float(new.mean() - ref.mean())) < 5 * float(ref.std()) / n ** 0.5
        assert abs(float(new.std() / ref.std()) - 1) < 0.05


def test_meanvar_needs_pretrained_and_cut_must_be_declared():
    with pytest.raises(ValueError, match="meanvar needs pretrained"):
        build_transfer_model("resnext3d_101", "tf", "layer3", init="meanvar")
    with pytest.raises(ValueError, match=r"cut 'layer5' is not a cut point .*valid: stem, layer1\.0"):
        build_transfer_model("resnext3d_101", "ttl", "layer5")


def test_unpooled_head_flattens_the_map():
    setup = build_transfer_model("resnext3d_101", "ttl", "layer2", pool="flatten", dropout=0.2,
                                 input_size=(16, 64, 64))
    assert setup.model.fc.in_features == 512 * 4 * 8 * 8
    assert isinstance(setup.model.head_dropout, nn.Dropout)
    with torch.no_grad():
        assert setup.model.eval()(torch.zeros(2, 1, 16, 64, 64)).shape == (2, 1)


def test_penet_strategies_with_its_checkpoint(tmp_path):
    path = tmp_path / "penet.pth.tar"
    source = penet_kinetics(path, seed=4)
    for strategy in ("ftl", "tf", "lwft", "ttl"):
        setup = build_transfer_model("penet", strategy, "encoders.2", stem="repeat",
                                     pretrained=str(path))
        m = setup.model.eval()
        assert torch.equal(m.state_dict()["encoders.1.penet_blocks.3.conv2.weight"],
                           source["encoders.1.penet_blocks.3.conv2.weight"])
        assert float(m.classifier.fc.bias[0].detach()) == pytest.approx(-4.59512, abs=1e-4)
        with torch.no_grad():
            assert m(torch.zeros(1, 1, 24, 64, 64)).shape == (1, 1)


# ---- a third backbone, defined only here: the strategies must work on it unchanged ----

class TinyBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        self.norm = nn.BatchNorm3d(cout)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


WIDTHS, STRIDES = (8, 16), (1, 2)


def tiny_units():
    return stage_units(Unit("stem", ("stem",), 4, (1, 1, 1)), (2, 2), WIDTHS, STRIDES,
                       block_path=lambda s, b: f"stages.{s}.{b}", stage_path=lambda s: f"stages.{s}")


class TinyNet(Backbone3D):
    head_path = "out"

    def __init__(self, num_outputs: int = 1, in_channels: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.stem = nn.Conv3d(in_channels, 4, 3, padding=1)
        cin, stages = 4, []
        for w, st in zip(WIDTHS, STRIDES, strict=True):
            stages.append(nn.Sequential(TinyBlock(cin, w, st), TinyBlock(w, w, 1)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.out = nn.Linear(cin, num_outputs)
        self.units, _ = tiny_units()

    def stem_forward(self, x):
        return self.stem(x)

    def make_block(self, unit_name, in_channels, width):
        _, s, b = unit_name.split(".")
        out = max(1, int(WIDTHS[int(s)] * width))
        return TinyBlock(in_channels, out, STRIDES[int(s)] if b == "0" else 1), out

    @classmethod
    def cut_points(cls) -> list[CutPoint]:
        return cut_points_from_units(*tiny_units())


@pytest.mark.parametrize("strategy", ["ftl", "tf", "lwft", "ttl"])
def test_strategies_apply_unchanged_to_a_new_backbone(strategy, tmp_path):
    donor = TinyNet(num_outputs=5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items()}},
               tmp_path / "tiny.pth")
    model = TinyNet(num_outputs=1)
    load_pretrained(model, tmp_path / "tiny.pth")
    setup = apply_strategy(model, strategy, "stages.0", num_outputs=2,
                           pretrained_state=model.state_dict())
    m = setup.model
    assert torch.equal(m.stages[0][1].conv.weight, donor.stages[0][1].conv.weight)
    out = m.eval()(torch.zeros(3, 1, 8, 8, 8))
    assert out.shape == (3, 2)
    expected_head_in = {"ftl": 16, "lwft": 16, "ttl": 8, "tf": 8}[strategy]
    assert m.out.in_features == expected_head_in
    if strategy == "ttl":
        assert len(m.stages) == 1
    if strategy == "tf":
        assert m.stages[1][0].conv.out_channels == 8 and "stages.1.0.conv.weight" in setup.new
    if strategy == "lwft":
        assert set(setup.frozen) == {n for n, _ in m.named_parameters()
                                     if n.startswith(("stem.", "stages.0."))}


def test_tiny_cut_points_are_derived_from_units():
    names = [(c.name, c.level) for c in TinyNet.cut_points()]
    assert names[:4] == [("stem", "block"), ("stages.0.0", "layer"), ("stages.0.1", "layer"),
                         ("stages.0", "block")]


def test_normalised_head_moves_the_logit_alike_at_any_width():
    """One SGD step on a BatchNorm1d + linear head moves the logit by about the learning
    rate, at layer1's 256 features as at layer4's 2048 (unscaled, 8x more at 2048: the
    transfer demo's deep rows diverged)."""
    moves = {}
    for strategy, cut in (("ttl", "layer1"), ("ftl", "")):
        model = build_transfer_model("resnext3d_50", strategy, cut or "layer1", head_norm=True).model.train()
        width = model.head_norm.num_features
        assert torch.allclose(model.head_norm.weight, torch.full((width,), width ** -0.5))
        features = torch.randn(8, width, generator=torch.Generator().manual_seed(0)) * 3 + 1
        params = [*model.head_norm.parameters(), *model.fc.parameters()]
        opt = torch.optim.SGD(params, lr=0.01)
        before = model.fc(model.head_norm(features))[:, 0]
        torch.nn.functional.binary_cross_entropy_with_logits(before, torch.ones(8)).backward()
        opt.step()
        after = model.fc(model.head_norm(features))[:, 0]
        moves[width] = float((after - before).abs().mean())
    assert set(moves) == {256, 2048}
    assert 0.5 < moves[2048] / moves[256] < 2 and 0.001 < moves[256] < 0.05, moves
