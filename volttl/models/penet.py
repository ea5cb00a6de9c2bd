"""PENet (Huang et al. 2020), the handcrafted 3D baseline for CTPA.

Module names and shapes match PENet's Kinetics-600 checkpoint (``module.`` prefix
removed, ``xnet_blocks`` renamed ``penet_blocks``). GroupNorm everywhere, LeakyReLU,
squeeze-excitation in every bottleneck, stochastic depth in training, and PENet's
initialisation: the output bias at the focal-loss prior and zero gamma on each block's
last GroupNorm, so every block starts as its shortcut.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from volttl.models.base import Backbone3D, CutPoint, Unit, cut_points_from_units, stage_units
from volttl.models.registry import register_backbone

DEPTH = (3, 4, 6, 3)
PLANES = (128, 256, 512, 1024)
STRIDES = (1, 2, 2, 2)
CARDINALITY = 32
EXPANSION = 2
SE_REDUCTION = 16
FOCAL_PRIOR = 0.01
TOTAL_BLOCKS = sum(DEPTH)


class SEBlock(nn.Module):
    """Squeeze-excitation: channel weights from a global average."""

    def __init__(self, channels: int):
        super().__init__()
        self.squeeze = nn.AdaptiveAvgPool3d(1)
        self.excite = nn.Sequential(
            nn.Linear(channels, channels // SE_REDUCTION), nn.LeakyReLU(inplace=True),
            nn.Linear(channels // SE_REDUCTION, channels), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.excite(torch.flatten(self.squeeze(x), 1))
        return x * w.view(*w.shape, 1, 1, 1)


class PENetBottleneck(nn.Module):
    """Grouped bottleneck with GroupNorm, SE and stochastic depth."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, survival_prob: float = 1.0):
        super().__init__()
        mid, out = planes, planes * EXPANSION
        self.down_sample = None
        if stride != 1 or inplanes != out:
            self.down_sample = nn.Sequential(
                nn.Conv3d(inplanes, out, kernel_size=1, stride=stride, bias=False),
                nn.GroupNorm(out // 16, out),
            )
        self.conv1 = nn.Conv3d(inplanes, mid, kernel_size=1, bias=False)
        self.norm1 = nn.GroupNorm(mid // 16, mid)
        self.conv2 = nn.Conv3d(mid, mid, kernel_size=3, stride=stride, padding=1,
                               groups=CARDINALITY, bias=False)
        self.norm2 = nn.GroupNorm(mid // 16, mid)
        self.conv3 = nn.Conv3d(mid, out, kernel_size=1, bias=False)
        self.norm3 = nn.GroupNorm(out // 16, out)
        self.norm3.is_last_norm = True
        self.se_block = SEBlock(out)
        self.relu = nn.LeakyReLU(inplace=True)
        self.survival_prob = survival_prob
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.down_sample is None else self.down_sample(x)
        if self.training and self.survival_prob < 1.0 and torch.rand(()) > self.survival_prob:
            return shortcut
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        y = self.se_block(self.norm3(self.conv3(y)))
        return self.relu(y + shortcut)


class PENetEncoder(nn.Module):
    def __init__(self, blocks: list[PENetBottleneck]):
        super().__init__()
        self.penet_blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.penet_blocks:
            x = block(x)
        return x


class PENetClassifier(nn.Module):
    """Holds ``fc`` so that the head's name matches the checkpoint (``classifier.fc``)."""

    def __init__(self, in_features: int, num_outputs: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def survival_prob(global_index: int) -> float:
    """Block k (1-based) of 16 survives with probability 1 - k/16 * 0.5."""
    return 1.0 - global_index / TOTAL_BLOCKS * 0.5


def _units() -> tuple[list[Unit], dict[str, str]]:
    return stage_units(Unit("stem", ("in_conv", "max_pool"), 64, (2, 4, 4)), DEPTH,
                       [p * EXPANSION for p in PLANES], STRIDES,
                       block_path=lambda e, b: f"encoders.{e}.penet_blocks.{b}",
                       stage_path=lambda e: f"encoders.{e}")


def checkpoint_key(key: str) -> str:
    """Older PENet files call the block list ``xnet_blocks``."""
    return key.replace(".xnet_blocks.", ".penet_blocks.")


@register_backbone("penet", display="PENet", checkpoint_key=checkpoint_key)
class PENet(Backbone3D):
    """PENet. Its Kinetics-600 pretraining pipeline is not published; its released CT
    finetuning feeds those weights CT under PENet's intensity scaling as they are, and GroupNorm after
    every convolution makes the network insensitive to the input's overall scale, so it
    declares no other source scale (``model.input_scale: source`` is ``ct`` here)."""

    head_path = "classifier.fc"

    def __init__(self, num_outputs: int = 1, in_channels: int = 3):
        super().__init__()
        self.in_channels = in_channels
        self.in_conv = nn.Sequential(
            nn.Conv3d(in_channels, 64, kernel_size=7, stride=(1, 2, 2), padding=3, bias=False),
            nn.GroupNorm(4, 64),
            nn.LeakyReLU(inplace=True),
        )
        self.max_pool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        inplanes, k, encoders = 64, 0, []
        for blocks, planes, step in zip(DEPTH, PLANES, STRIDES, strict=True):
            layer = []
            for b in range(blocks):
                k += 1
                layer.append(PENetBottleneck(inplanes, planes, step if b == 0 else 1, survival_prob(k)))
                inplanes = planes * EXPANSION
            encoders.append(PENetEncoder(layer))
        self.encoders = nn.ModuleList(encoders)
        self.classifier = PENetClassifier(inplanes, num_outputs)
        self.units, _ = _units()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.constant_(m.weight, 0.0 if getattr(m, "is_last_norm", False) else 1.0)
                nn.init.zeros_(m.bias)
        init_focal_bias(self.classifier.fc)

    def stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.max_pool(self.in_conv(x))

    def init_head_bias(self, head: nn.Linear) -> None:
        init_focal_bias(head)

    def make_block(self, unit_name: str, in_channels: int, width: float) -> tuple[nn.Module, int]:
        _, e, _, b = unit_name.split(".")
        e, b = int(e), int(b)
        planes = max(CARDINALITY, CARDINALITY * round(PLANES[e] * width / CARDINALITY))
        k = sum(DEPTH[:e]) + b + 1
        block = PENetBottleneck(in_channels, planes, STRIDES[e] if b == 0 else 1, survival_prob(k))
        nn.init.zeros_(block.norm3.weight)
        return block, block.out_channels

    @classmethod
    def cut_points(cls) -> list[CutPoint]:
        return cut_points_from_units(*_units())


def init_focal_bias(linear: nn.Linear, prior: float = FOCAL_PRIOR) -> None:
    """Output bias at -log((1 - p) / p): the network starts predicting the prior p."""
    nn.init.constant_(linear.bias, -math.log((1 - prior) / prior))
