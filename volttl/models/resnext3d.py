"""ResNeXt3D as defined by Hara et al.'s 3D-ResNets-PyTorch (2018, "CVPR2018" branch).

Module names and shapes match ``resnext-101-kinetics.pth`` exactly (without the
``module.`` prefix), so the published Kinetics weights load unchanged. Differences from
the 2018 code: adaptive average pooling (any window size works), any number of outputs,
and a configurable number of input channels (1 for CT with the summed stem).
"""

from __future__ import annotations

import torch
from torch import nn

from volttl.models.base import (
    Backbone3D,
    CutPoint,
    SourcePreset,
    Unit,
    cut_points_from_units,
    stage_units,
)
from volttl.models.registry import register_backbone

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
PLANES = (128, 256, 512, 1024)
STRIDES = (1, 2, 2, 2)
CARDINALITY = 32
EXPANSION = 2
# What the published Kinetics weights were trained on: the 2018 code's defaults read frames
# as 0..255 (`--norm_value 1`) and subtract the ActivityNet channel means
# (`--mean_dataset activitynet`), with no division by a standard deviation.
KINETICS_INPUT = SourcePreset(scale=255.0, channel_means=(114.7748, 107.7354, 99.4750),
                             origin="3D-ResNets-PyTorch 2018 defaults: RGB 0..255 minus the "
                                    "ActivityNet channel means, no std division")


class ResNeXtBottleneck(nn.Module):
    """1x1x1 -> grouped 3x3x3 -> 1x1x1 (x2 channels), type-B projection shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, cardinality: int = CARDINALITY):
        super().__init__()
        mid = cardinality * int(planes / cardinality)
        out = planes * EXPANSION
        self.conv1 = nn.Conv3d(inplanes, mid, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.conv2 = nn.Conv3d(mid, mid, kernel_size=3, stride=stride, padding=1,
                               groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm3d(mid)
        self.conv3 = nn.Conv3d(mid, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv3d(inplanes, out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(out),
            )
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


def _units(depth: int) -> tuple[list[Unit], dict[str, str]]:
    return stage_units(Unit("stem", ("conv1", "bn1", "relu", "maxpool"), 64, (2, 4, 4)), DEPTHS[depth],
                       [p * EXPANSION for p in PLANES], STRIDES,
                       block_path=lambda s, b: f"layer{s + 1}.{b}", stage_path=lambda s: f"layer{s + 1}")


class ResNeXt3D(Backbone3D):
    """ResNeXt3D-50/101/152, cardinality 32, Kinetics layout."""

    head_path = "fc"
    depth = 101
    published_preset = KINETICS_INPUT

    def __init__(self, num_outputs: int = 1, in_channels: int = 3):
        super().__init__()
        depth = type(self).depth
        self.in_channels = in_channels
        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=7, stride=(1, 2, 2), padding=(3, 3, 3),
                               bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for s, (blocks, planes, step) in enumerate(zip(DEPTHS[depth], PLANES, STRIDES, strict=True)):
            layers = []
            for b in range(blocks):
                layers.append(ResNeXtBottleneck(inplanes, planes, step if b == 0 else 1))
                inplanes = planes * EXPANSION
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(inplanes, num_outputs)
        self.units, _ = _units(depth)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def residual_branch_norms(self) -> list[nn.Module]:
        return [m.bn3 for m in self.modules() if isinstance(m, ResNeXtBottleneck)]

    def make_block(self, unit_name: str, in_channels: int, width: float) -> tuple[nn.Module, int]:
        stage, index = unit_name.removeprefix("layer").split(".")
        s, b = int(stage) - 1, int(index)
        planes = max(CARDINALITY, int(round(PLANES[s] * width)))
        block = ResNeXtBottleneck(in_channels, planes, STRIDES[s] if b == 0 else 1)
        return block, block.out_channels

    @classmethod
    def cut_points(cls) -> list[CutPoint]:
        return cut_points_from_units(*_units(cls.depth))


@register_backbone("resnext3d_50", display="ResNeXt3D-50")
class ResNeXt3D50(ResNeXt3D):
    depth = 50


@register_backbone("resnext3d_101", display="ResNeXt3D-101")
class ResNeXt3D101(ResNeXt3D):
    depth = 101


@register_backbone("resnext3d_152", display="ResNeXt3D-152")
class ResNeXt3D152(ResNeXt3D):
    depth = 152
