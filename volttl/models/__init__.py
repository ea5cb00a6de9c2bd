"""Backbones and their registry. A new backbone is one new file in this package, its
class decorated with :func:`register_backbone`; importing the package registers it."""

from __future__ import annotations

import importlib
import pkgutil

from volttl.models.base import Backbone3D, CutPoint
from volttl.models.registry import (
    BACKBONES,
    build_backbone,
    display_name,
    get_backbone_spec,
    register_backbone,
)

_INFRASTRUCTURE = {"base", "registry", "checkpoints", "legacy_pickle"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BACKBONES", "Backbone3D", "CutPoint", "build_backbone", "display_name", "get_backbone_spec",
           "register_backbone"]
