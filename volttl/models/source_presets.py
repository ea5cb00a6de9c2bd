"""Source presets: the input scaling published video weights were trained on, by name.

``model.input_scale: source`` maps CT windows onto one of them. Which one a file needs
is a property of the file, not of the architecture: the same ResNeXt3D-101 layout was
trained on 0..255 frames minus the ActivityNet means by the 2018 3D-ResNets code, and on
0..1 frames with Kinetics means and stds by its 2020 rewrite. ``model.source_preset`` names
it; ``auto`` takes it from the file only where the file's layout identifies it, and
otherwise the run is refused rather than fed the wrong scale.
"""

from __future__ import annotations

from volttl.errors import VolttlError
from volttl.models.base import SourcePreset

PRESETS: dict[str, SourcePreset] = {
    # Hara et al.'s published Kinetics-400 files (resnext-101-kinetics.pth and its kin)
    "hara2018": SourcePreset(
        scale=255.0, channel_means=(114.7748, 107.7354, 99.4750), channel_stds=(1.0, 1.0, 1.0),
        origin="3D-ResNets-PyTorch 2018 (CVPR2018 branch) defaults: RGB 0..255 minus the "
               "ActivityNet channel means, no std division"),
    # files trained by the 2020 rewrite of 3D-ResNets-PyTorch (value_scale 1, Kinetics stats)
    "kinetics2020": SourcePreset(
        scale=1.0, channel_means=(0.4345, 0.4051, 0.3775), channel_stds=(0.2768, 0.2713, 0.2737),
        origin="3D-ResNets-PyTorch 2020 defaults: RGB 0..1, Kinetics channel means and stds"),
}
NAMES = ("auto", *PRESETS, "custom")
HARA2018_KEYS = {"epoch", "arch", "state_dict", "optimizer"}


def declared(model_cfg) -> SourcePreset | None:
    """The preset ``model.source_preset`` declares (None for ``auto``)."""
    name = model_cfg.source_preset
    if name == "auto":
        return None
    if name in PRESETS:
        return PRESETS[name]
    if name == "custom":
        return SourcePreset(scale=float(model_cfg.source_scale), channel_means=tuple(model_cfg.source_mean),
                           channel_stds=tuple(model_cfg.source_std), origin="declared in the config")
    raise VolttlError(f"model.source_preset '{name}' is not one of {', '.join(NAMES)}")


def known_for_file(kind: str, obj: dict) -> SourcePreset | None:
    """The preset a checkpoint's layout identifies, or None: only the 2018 3D-ResNets
    file (exactly ``epoch, arch, state_dict, optimizer``) says which code trained it; the
    2020 rewrite saves a scheduler too, and PENet's files say nothing of their input.
    (``volttl pretrain`` files add ``input_scale: ct``, refused when they are loaded.)"""
    if kind == "3d-resnets" and set(obj) - {"input_scale"} == HARA2018_KEYS:
        return PRESETS["hara2018"]
    return None
