"""What every backbone declares, and the generic surgery the transfer strategies need.

A backbone is a stem followed by an ordered list of blocks, then pooling and a linear
head. It keeps the module names of its published checkpoint (``conv1``, ``layer3.7``,
``encoders.2.penet_blocks.4``), and declares once, in its own file:

- ``units``: the ordered feature units (the stem, then every block), each with the
  module paths it owns, its output channels and its cumulative stride;
- its cut points (a cut keeps every unit up to and including the named one);
- ``make_block``: how to build a block of a given unit at a given width.

Strategies only call ``truncate``, ``rebuild_after``, ``freeze_upto`` and ``replace_head``
here; no strategy knows a layer name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from volttl.errors import VolttlError


@dataclass(frozen=True)
class Unit:
    """A feature unit: the stem or one block."""

    name: str
    paths: tuple[str, ...]
    channels: int
    stride: tuple[int, int, int]


@dataclass(frozen=True)
class SourcePreset:
    """A source preset: the input scaling a backbone's published weights were trained on: each input
    channel is ``(scale * u - channel_means[c]) / channel_stds[c]``, where ``u`` is the
    frame (or, for CT, the HU range clipped and scaled) in [0, 1]. ``origin`` says where the figures
    come from."""

    scale: float
    channel_means: tuple[float, ...]
    origin: str
    channel_stds: tuple[float, ...] = (1.0, 1.0, 1.0)

    def gains_and_offsets(self, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel ``a_c, b_c`` such that the channel is ``a_c * x + b_c`` for the CT
        input ``x = u - shift``."""
        means = torch.tensor(self.channel_means, dtype=torch.float32)
        stds = torch.tensor(self.channel_stds, dtype=torch.float32)
        return self.scale / stds, (self.scale * shift - means) / stds


@dataclass(frozen=True)
class CutPoint:
    """Where a network can be cut: after ``units[:keep]``."""

    name: str
    level: str  # "block" (after the stem or a stage) or "layer" (after a block)
    keep: int
    channels: int
    stride: tuple[int, int, int]


def stage_units(stem: Unit, depths: Sequence[int], channels: Sequence[int], strides: Sequence[int],
                block_path: Callable[[int, int], str], stage_path: Callable[[int], str]
                ) -> tuple[list[Unit], dict[str, str]]:
    """The stem then every block of every stage as units, with cumulative strides; and
    each block's stage name (for :func:`cut_points_from_units`). ``block_path(s, b)`` and
    ``stage_path(s)`` give the module paths of block ``b`` of stage ``s`` and of the stage."""
    units, stage_of, stride = [stem], {}, stem.stride
    for s, (blocks, width, step) in enumerate(zip(depths, channels, strides, strict=True)):
        stride = tuple(v * step for v in stride)
        for b in range(blocks):
            name = block_path(s, b)
            units.append(Unit(name, (name,), width, stride))
            stage_of[name] = stage_path(s)
    return units, stage_of


def cut_points_from_units(units: list[Unit], stage_of: dict[str, str]) -> list[CutPoint]:
    """Block cuts after the stem and after each stage's last block; a layer cut after every
    block. ``stage_of`` maps a block unit's name to its stage's name."""
    cuts: list[CutPoint] = []
    for i, unit in enumerate(units):
        if i == 0:
            cuts.append(CutPoint(unit.name, "block", 1, unit.channels, unit.stride))
            continue
        cuts.append(CutPoint(unit.name, "layer", i + 1, unit.channels, unit.stride))
        stage = stage_of[unit.name]
        is_last = i + 1 == len(units) or stage_of.get(units[i + 1].name) != stage
        if is_last:
            cuts.append(CutPoint(stage, "block", i + 1, unit.channels, unit.stride))
    return cuts


class Backbone3D(nn.Module):
    """Base class: generic forward over the declared units (the surgery on them, as
    functions, is :mod:`volttl.models.surgery`).

    Set by :func:`volttl.models.registry.register_backbone`: ``registry_name``,
    ``display_name`` and, where a published checkpoint names modules differently,
    ``checkpoint_key``."""

    head_path: str = "fc"
    registry_name: str = ""
    display_name: str = ""
    in_channels: int = 3  # 3 for the Kinetics (RGB) stem; 1 with the summed `stem: sum`
    # the input scale of the published weights (`model.input_scale: source` maps CT onto
    # it); None where the weights were trained on CT under PENet's intensity scaling or it is unpublished
    published_preset: SourcePreset | None = None

    def __init__(self) -> None:
        super().__init__()
        self.units: list[Unit] = []
        self.frozen_units = 0
        self.frozen_norm = "train"  # how the norm layers of frozen units run: train | eval
        self.head_pool: nn.Module = nn.AdaptiveAvgPool3d(1)
        self.head_norm: nn.Module = nn.Identity()
        self.head_dropout: nn.Module = nn.Identity()

    # ---- declared by each backbone -------------------------------------------------
    def stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def make_block(self, unit_name: str, in_channels: int, width: float) -> tuple[nn.Module, int]:
        """A fresh block for ``unit_name`` taking ``in_channels``, at ``width`` x the stage's
        planes; returns it and its output channels."""
        raise NotImplementedError

    def residual_branch_norms(self) -> list[nn.Module]:
        """The last norm layer of each residual branch: training from scratch may start them
        at zero scale, so that every block starts as the identity (Goyal et al. 2017)."""
        return []

    @classmethod
    def cut_points(cls) -> list[CutPoint]:
        raise NotImplementedError

    def init_head_bias(self, head: nn.Linear) -> None:
        """The bias a new head starts with; zero unless the backbone starts at a prior."""
        nn.init.zeros_(head.bias)

    @staticmethod
    def checkpoint_key(key: str) -> str:
        """A published checkpoint's key (``module.`` removed) as this class names it."""
        return key

    # ---- generic ---------------------------------------------------------------------
    def stem_conv_path(self) -> str:
        """The module path of the stem's first convolution (the one that meets the input)."""
        for path in self.units[0].paths:
            for name, m in self.get_submodule(path).named_modules():
                if isinstance(m, nn.Conv3d):
                    return f"{path}.{name}" if name else path
        raise VolttlError(f"{type(self).__name__} declares no stem convolution")

    def map_input_to_source(self, shift: float, source: SourcePreset | None = None) -> None:
        """Feed the stem what the published weights saw: the CT window ``x = u - shift``
        (``u`` in [0, 1], see :func:`volttl.data.intensity.scale_intensity`) becomes
        ``a_c * x + b_c`` in each channel c (``source``, by default the backbone's declared
        :attr:`published_preset`). With the 3-channel stem this is exact as it stands. With the
        summed 1-channel stem the grey value is ``mean(a) * x + mean(b)``, the summed kernel
        weighs each channel by ``r_c = a_c / mean(a)`` (:meth:`stem_channel_weights`), and
        the stem convolution adds the fixed rest, ``conv(sum_c (b_c - r_c mean(b)) W_c, 1)``
        over the volume (zero padding included): the same output as the 3-channel stem.
        That kernel comes from the 3-channel weights when they are loaded
        (:meth:`set_stem_offset_kernel`)."""
        source = source or type(self).published_preset
        if source is None:
            return
        gains, offsets = source.gains_and_offsets(shift)
        gain = gains.mean()
        self.register_buffer("input_gain", gain)
        self.register_buffer("input_offset", offsets)
        if not torch.allclose(gains, gain.expand_as(gains)):  # per-channel std: channels weigh apart
            self.register_buffer("input_channel_gain", gains / gain)
        if self.in_channels == 1:
            conv = self.get_submodule(self.stem_conv_path())
            self.register_buffer("stem_offset_kernel", torch.zeros_like(conv.weight))
            conv.register_forward_hook(self._add_stem_offset)

    def stem_channel_weights(self) -> torch.Tensor:
        """``r_c``: how much each RGB kernel counts when the stem is summed into one channel
        (ones unless the mapped preset divides the channels by different stds)."""
        if hasattr(self, "input_channel_gain"):
            return self.input_channel_gain
        return torch.ones(3)

    def set_stem_offset_kernel(self, rgb_weight: torch.Tensor) -> None:
        """From the 3-channel stem weights ``(out, 3, k, k, k)``: the kernel that carries the
        channels' offsets once the weights are summed into one channel."""
        if not hasattr(self, "stem_offset_kernel"):
            return
        offset = self.input_offset.to(rgb_weight.dtype)
        ratio = self.stem_channel_weights().to(rgb_weight.dtype)
        spread = (offset - ratio * offset.mean()).view(1, -1, 1, 1, 1)
        with torch.no_grad():
            self.stem_offset_kernel.copy_((rgb_weight * spread).sum(dim=1, keepdim=True))

    def _add_stem_offset(self, conv: nn.Conv3d, inputs: tuple[torch.Tensor], out: torch.Tensor
                         ) -> torch.Tensor:
        x = inputs[0]
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=out.dtype, device=x.device)
        kernel = self.stem_offset_kernel.to(out.dtype)
        return out + nn.functional.conv3d(ones, kernel, stride=conv.stride, padding=conv.padding)

    def _stem_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.in_channels == 3:  # `stem: repeat`: CT copied to RGB
            x = x.expand(-1, 3, *x.shape[2:])
        if hasattr(self, "input_gain"):  # `model.input_scale: source`
            offset = self.input_offset if x.shape[1] == 3 else self.input_offset.mean(0, keepdim=True)
            gain = self.input_gain
            if x.shape[1] == 3 and hasattr(self, "input_channel_gain"):
                gain = (gain * self.input_channel_gain).view(1, -1, 1, 1, 1).to(x.dtype)
            x = x * gain + offset.view(1, -1, 1, 1, 1).to(x.dtype)
        return x

    @classmethod
    def cut_point(cls, name: str) -> CutPoint:
        for cut in cls.cut_points():
            if cut.name == name:
                return cut
        valid = ", ".join(c.name for c in cls.cut_points())
        raise VolttlError(f"cut '{name}' is not a cut point of {cls.__name__} (valid: {valid})")

    def forward_features(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        x = self.stem_forward(self._stem_input(x))
        for unit in self.units[1:upto]:
            x = self.get_submodule(unit.paths[0])(x)
        return x

    def unit_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after every unit (the stem, then each block), in order: the
        features at cut point ``c`` are ``unit_outputs(x)[c.keep - 1]``."""
        outputs = [self.stem_forward(self._stem_input(x))]
        for unit in self.units[1:]:
            outputs.append(self.get_submodule(unit.paths[0])(outputs[-1]))
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.head_norm(torch.flatten(self.head_pool(x), 1))
        return self.get_submodule(self.head_path)(self.head_dropout(x))

    def feature_channels(self) -> int:
        return self.units[-1].channels

    def frozen_modules(self) -> list[nn.Module]:
        return [self.get_submodule(p) for u in self.units[: self.frozen_units] for p in u.paths]

    def frozen_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.frozen_modules() for p in m.parameters()]

    def train(self, mode: bool = True) -> Backbone3D:
        super().train(mode)
        if self.frozen_norm != "train":
            for m in self.frozen_modules():
                m.eval()  # keeps BatchNorm running statistics of frozen units fixed
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.get_submodule(self.head_path).parameters())
