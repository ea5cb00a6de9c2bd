"""What the model takes, as one object built from the config in one place.

A model input is ``window`` consecutive stored slices, the centre ``crop`` x ``crop`` of
each (a random crop in training), HU clipped to ``hu_clip``, scaled to [0, 1], less
``intensity_shift``. The dataset, the inference path, Grad-CAM and pretraining take an
:class:`InputSpec` made by :meth:`InputSpec.of`, so none of them keeps its own copy of these
settings or their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from volttl.data.intensity import ArrayT, scale_intensity

if TYPE_CHECKING:
    from volttl.config import Config


@dataclass(frozen=True)
class InputSpec:
    window: int  # slices (preprocess.window)
    crop: int  # in-plane pixels (data.crop)
    hu_clip: tuple[float, float]  # data.hu_clip
    intensity_shift: float  # data.intensity_shift

    @classmethod
    def of(cls, cfg: Config) -> InputSpec:
        d = cfg.data
        return cls(cfg.preprocess.window, d.crop, (float(d.hu_clip[0]), float(d.hu_clip[1])),
                   float(d.intensity_shift))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The model's input shape (slices, rows, columns)."""
        return self.window, self.crop, self.crop

    def crop_start(self, size: int) -> int:
        """The first row (and column) of the centre crop of a ``size`` x ``size`` slice."""
        return (size - self.crop) // 2

    def scale(self, hu: ArrayT) -> ArrayT:
        """HU as the model takes them (:func:`volttl.data.intensity.scale_intensity`)."""
        return scale_intensity(hu, self.hu_clip, self.intensity_shift)
