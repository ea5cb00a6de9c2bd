"""Backbones and their registry. A new backbone is one new file plus one line here."""

from __future__ import annotations

from volttl.models.base import Backbone3D, CutPoint
from volttl.models.penet import PENet
from volttl.models.resnext3d import ResNeXt3D50, ResNeXt3D101, ResNeXt3D152

BACKBONES: dict[str, type[Backbone3D]] = {
    "resnext3d_50": ResNeXt3D50,
    "resnext3d_101": ResNeXt3D101,
    "resnext3d_152": ResNeXt3D152,
    "penet": PENet,
}


def get_backbone_spec(name: str) -> type[Backbone3D]:
    """The backbone class registered as ``name``; its cut points are ``.cut_points()``."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}' (valid: {', '.join(BACKBONES)})") from None


def build_backbone(name: str, num_outputs: int = 1, in_channels: int = 3) -> Backbone3D:
    return get_backbone_spec(name)(num_outputs=num_outputs, in_channels=in_channels)


__all__ = ["BACKBONES", "Backbone3D", "CutPoint", "build_backbone", "get_backbone_spec"]
