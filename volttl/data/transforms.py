"""Window transforms, torchio-style: each draws its random parameters in ``sample`` and
applies them deterministically in ``apply``.

Separating the draw from the application keeps the keyed RNG exact (the parameters of
a window depend only on its key, never on workers or batch order), lets a test fix the
parameters, and lets the same parameters be applied elsewhere (a batch on the training
device) without drawing again. Windows are tensors ``(1, D, H, W)`` in HU; the
rotation fills with air.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import Flip, Rotate

from volttl.data.intensity import AIR_HU


class WindowTransform:
    """Base class: ``sample`` draws what ``apply`` needs (nothing, by default)."""

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> Any:
        return None

    def apply(self, x: torch.Tensor, params: Any) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(rng, tuple(x.shape)))


@dataclass(frozen=True)
class CentreCrop(WindowTransform):
    """The central ``size`` x ``size`` of every slice (evaluation)."""

    size: int

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[-2] - self.size) // 2, (shape[-1] - self.size) // 2

    def apply(self, x: torch.Tensor, params: tuple[int, int]) -> torch.Tensor:
        y0, x0 = params
        return x[..., y0: y0 + self.size, x0: x0 + self.size].contiguous()


@dataclass(frozen=True)
class RandomCrop(CentreCrop):
    """A ``size`` x ``size`` crop at a uniformly drawn in-plane offset (training)."""

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[int, int]:
        y0, x0 = (int(v) for v in rng.integers(0, shape[-1] - self.size + 1, size=2))
        return y0, x0


@dataclass(frozen=True)
class RandomFlip(WindowTransform):
    """Left-right flip (the last axis) with probability ``prob``."""

    prob: float = 0.5

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> bool:
        return bool(rng.random() < self.prob)

    def apply(self, x: torch.Tensor, params: bool) -> torch.Tensor:
        return torch.as_tensor(Flip(spatial_axis=2)(x)) if params else x


@dataclass(frozen=True)
class RandomRotation(WindowTransform):
    """In-plane rotation by an angle drawn uniformly in +-``max_degrees``; air fills the
    corners (MONAI's bilinear rotation on HU + 1000 with zero padding)."""

    max_degrees: float = 15.0

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> float:
        return float(np.deg2rad(rng.uniform(-self.max_degrees, self.max_degrees)))

    def apply(self, x: torch.Tensor, params: float) -> torch.Tensor:
        return torch.as_tensor(Rotate(angle=(params, 0.0, 0.0), padding_mode="zeros")(x - AIR_HU) + AIR_HU)


@dataclass(frozen=True)
class Compose(WindowTransform):
    """Transforms in order; their parameters are drawn in that order."""

    transforms: tuple[WindowTransform, ...]

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> list:
        params = []
        for t in self.transforms:
            p = t.sample(rng, shape)
            params.append(p)
            if isinstance(t, CentreCrop):  # later transforms see the cropped window
                shape = (*shape[:-2], t.size, t.size)
        return params

    def apply(self, x: torch.Tensor, params: list) -> torch.Tensor:
        for t, p in zip(self.transforms, params, strict=True):
            x = t.apply(x, p)
        return x


def training_transform(crop: int, flip_prob: float = 0.5, max_degrees: float = 15.0) -> Compose:
    """PENet's training augmentation: random crop, left-right flip, in-plane rotation."""
    return Compose((RandomCrop(crop), RandomFlip(flip_prob), RandomRotation(max_degrees)))


def evaluation_transform(crop: int) -> Compose:
    return Compose((CentreCrop(crop),))
