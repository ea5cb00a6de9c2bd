"""The backbone registry: ``@register_backbone`` on a class in its own file is all a new
backbone needs. Every module in ``volttl.models`` is imported by the package, so its
registration runs; the CLI's help, ``volttl cuts``, profiling and the search table read
names and display names from here.
"""

from __future__ import annotations

from collections.abc import Callable

from volttl.errors import VolttlError
from volttl.models.base import Backbone3D

BACKBONES: dict[str, type[Backbone3D]] = {}


def register_backbone(name: str, display: str, checkpoint_key: Callable[[str], str] | None = None):
    """Class decorator: register ``cls`` as ``name`` (config and CLI), shown as ``display``
    in tables; ``checkpoint_key`` renames a published checkpoint's keys (after the
    ``module.`` prefix is removed) to the class's module names."""

    def decorate(cls: type[Backbone3D]) -> type[Backbone3D]:
        if name in BACKBONES and BACKBONES[name] is not cls:
            raise ValueError(f"backbone '{name}' is registered twice")
        cls.registry_name = name
        cls.display_name = display
        if checkpoint_key is not None:
            cls.checkpoint_key = staticmethod(checkpoint_key)
        BACKBONES[name] = cls
        return cls

    return decorate


def get_backbone_spec(name: str) -> type[Backbone3D]:
    """The backbone class registered as ``name``; its cut points are ``.cut_points()``."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise VolttlError(f"unknown model '{name}' (valid: {', '.join(BACKBONES)})") from None


def display_name(name: str) -> str:
    """How tables name a registered backbone (the name itself when unknown)."""
    cls = BACKBONES.get(name)
    return cls.display_name if cls is not None else name


def build_backbone(name: str, num_outputs: int = 1, in_channels: int = 3) -> Backbone3D:
    return get_backbone_spec(name)(num_outputs=num_outputs, in_channels=in_channels)
