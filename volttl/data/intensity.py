"""CT intensities as the network sees them: PENet's normalisation, in one place.

Training, evaluation, Grad-CAM and prediction all call :func:`normalise`, so a window
means the same numbers everywhere. Air (-1000 HU) fills whatever lies outside a study.
"""

from __future__ import annotations

import numpy as np

AIR_HU = -1000.0


def normalise(hu: np.ndarray, hu_clip: tuple[float, float], shift: float) -> np.ndarray:
    """PENet: clip HU to ``hu_clip``, scale to [0, 1], subtract the dataset mean ``shift``."""
    lo, hi = hu_clip
    return (np.clip(hu, lo, hi) - lo) / (hi - lo) - shift
