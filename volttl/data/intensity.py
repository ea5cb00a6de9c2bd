"""CT intensities as the network sees them: PENet's normalisation, in one place.

Training, evaluation, Grad-CAM and prediction all call :func:`normalise`, so a window
means the same numbers everywhere. Air (-1000 HU) fills whatever lies outside a study.
"""

from __future__ import annotations

from typing import TypeVar

AIR_HU = -1000.0
ArrayT = TypeVar("ArrayT")


def normalise(hu: ArrayT, hu_clip: tuple[float, float], shift: float) -> ArrayT:
    """PENet: clip HU to ``hu_clip``, scale to [0, 1], subtract the dataset mean ``shift``.
    A numpy array or a torch tensor (on any device), returned as the same kind."""
    lo, hi = hu_clip
    return (hu.clip(lo, hi) - lo) / (hi - lo) - shift
