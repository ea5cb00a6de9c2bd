"""CT intensities as the network sees them: PENet's intensity scaling, in one place.

Training, evaluation, Grad-CAM and prediction all call :func:`scale_intensity` (through
:class:`volttl.data.input_spec.InputSpec`), so a window means the same numbers everywhere.
Air (-1000 HU) fills whatever lies outside a study.
"""

from __future__ import annotations

from typing import TypeVar

AIR_HU = -1000.0
ArrayT = TypeVar("ArrayT")


def scale_intensity(hu: ArrayT, hu_clip: tuple[float, float], intensity_shift: float) -> ArrayT:
    """PENet: clip HU to ``hu_clip``, scale to [0, 1], subtract the dataset mean
    ``intensity_shift``. A numpy array or a torch tensor (on any device), returned as the
    same kind."""
    lo, hi = hu_clip
    return (hu.clip(lo, hi) - lo) / (hi - lo) - intensity_shift
