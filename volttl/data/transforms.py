"""Window transforms, torchio-style: each draws its random parameters in ``sample`` and
applies them deterministically in ``apply``.

Separating the draw from the application keeps the keyed RNG exact (the parameters of
a window depend only on its key, never on workers or batch order), lets a test fix the
parameters, and lets the same parameters be applied elsewhere without drawing again.
Training does exactly that: loader workers only read int16 windows and draw their
parameters, and :func:`augment_batch` crops, flips and rotates the whole batch with
tensor operations on the training device (GPU or CPU: the same code). Windows are
tensors ``(1, D, H, W)`` in HU; the rotation fills with air.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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
        return x.flip(-1) if params else x


@dataclass(frozen=True)
class RandomRotation(WindowTransform):
    """In-plane rotation by a whole number of degrees drawn uniformly in +-``max_degrees``
    (PENet: ``random.randint(-15, 15)``), returned in radians; air fills the corners
    (:func:`rotate_inplane`)."""

    max_degrees: float = 15.0

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> float:
        bound = int(self.max_degrees)
        return float(np.deg2rad(rng.integers(-bound, bound + 1)))

    def apply(self, x: torch.Tensor, params: float) -> torch.Tensor:
        return rotate_inplane(x[None], torch.tensor([params]))[0]


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


def rotate_inplane(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Windows ``(N, 1, D, H, W)`` in HU, each rotated in-plane by its angle (radians)
    about the slice centre: bilinear, air where the rotated window leaves the original
    (MONAI's ``Rotate`` on HU + 1000 with zero padding gives the same, per window)."""
    n, _, d, h, w = x.shape
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, sin
    theta[:, 1, 0], theta[:, 1, 1] = -sin, cos
    grid = F.affine_grid(theta, [n, d, h, w], align_corners=False)
    shifted = (x - AIR_HU).reshape(n, d, h, w)  # the slices as channels: one grid per window
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(n, 1, d, h, w) + AIR_HU


def augment_batch(hu: torch.Tensor, params: torch.Tensor, crop: int) -> torch.Tensor:
    """The training augmentation of a whole batch at once, on whatever device ``hu`` is:
    windows ``(N, 1, D, S, S)`` (int16 or float HU) and each window's drawn parameters
    ``(N, 4)`` = crop offsets y0, x0, flip (0/1), angle (radians), as
    :func:`training_params` lays them out; returns float32 HU ``(N, 1, D, crop, crop)``."""
    # the host copy of the parameters decides shapes and branches; the device copy is
    # sent without blocking: a blocking copy would wait for every step queued before it
    on_device = params.to(hu.device, non_blocking=True)
    offsets = params[:, :2].long().tolist()
    x = torch.stack([hu[i, :, :, y0: y0 + crop, x0: x0 + crop] for i, (y0, x0) in enumerate(offsets)])
    x = x.float()  # after the crop: fewer voxels converted
    flip = on_device[:, 2].bool().view(-1, 1, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    if not bool((params[:, 3] != 0).any()):
        return x
    return rotate_inplane(x, on_device[:, 3])


def training_params(drawn: list) -> torch.Tensor:
    """``training_transform``'s drawn parameters as the row :func:`augment_batch` reads."""
    (y0, x0), flip, angle = drawn
    return torch.tensor([y0, x0, float(flip), angle], dtype=torch.float32)


def training_transform(crop: int, flip_prob: float = 0.5, max_degrees: float = 15.0) -> Compose:
    """PENet's training augmentation: random crop, left-right flip, in-plane rotation."""
    return Compose((RandomCrop(crop), RandomFlip(flip_prob), RandomRotation(max_degrees)))

