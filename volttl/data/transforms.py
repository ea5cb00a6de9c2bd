"""Window transforms, torchio-style: each draws its random parameters in ``sample`` and
applies them deterministically in ``apply``.

Separating the draw from the application keeps the keyed RNG exact (the parameters of
a window depend only on its key, never on workers or batch order), lets a test fix the
parameters, and lets the same parameters be applied elsewhere without drawing again.
Training does exactly that: loader workers only read int16 windows, draw their
parameters and lay them out as one row of numbers (``encode``); :func:`augment_batch`
then applies each transform to the whole batch with tensor operations on the training
device (``apply_batch``, GPU or CPU: the same code). A new transform is one class with
``sample``, ``apply``, ``encode`` and ``apply_batch``, and a name in
:data:`TRAINING_TRANSFORMS` for the config's ``augment.transforms``. Windows are tensors
``(1, D, H, W)`` in HU; the rotation fills with air.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from volttl.data.intensity import AIR_HU


class WindowTransform:
    """Base class: ``sample`` draws what ``apply`` needs (nothing, by default); ``encode``
    lays the draw out as ``width`` numbers, the window's columns of the batch's parameter
    rows, which ``apply_batch`` reads for windows ``(N, 1, D, H, W)``."""

    width = 0

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> Any:
        return None

    def apply(self, x: torch.Tensor, params: Any) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, params: Any) -> list[float]:
        return []

    def apply_batch(self, x: torch.Tensor, host: torch.Tensor, device: torch.Tensor) -> torch.Tensor:
        """The batch ``x`` with each window's encoded parameters applied: ``host`` holds
        them on the CPU (for shapes and branches), ``device`` on ``x``'s device."""
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a window of ``shape`` after this transform."""
        return shape

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(rng, tuple(x.shape)))


@dataclass(frozen=True)
class CentreCrop(WindowTransform):
    """The central ``size`` x ``size`` of every slice (evaluation)."""

    size: int

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[-2] - self.size) // 2, (shape[-1] - self.size) // 2

    width = 2

    def apply(self, x: torch.Tensor, params: tuple[int, int]) -> torch.Tensor:
        y0, x0 = params
        return x[..., y0: y0 + self.size, x0: x0 + self.size].contiguous()

    def encode(self, params: tuple[int, int]) -> list[float]:
        return [float(params[0]), float(params[1])]

    def apply_batch(self, x: torch.Tensor, host: torch.Tensor, device: torch.Tensor) -> torch.Tensor:
        size = self.size
        return torch.stack([x[i, ..., y0: y0 + size, x0: x0 + size]
                            for i, (y0, x0) in enumerate(host.long().tolist())])

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-2], self.size, self.size)


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

    width = 1

    def apply(self, x: torch.Tensor, params: bool) -> torch.Tensor:
        return x.flip(-1) if params else x

    def encode(self, params: bool) -> list[float]:
        return [float(params)]

    def apply_batch(self, x: torch.Tensor, host: torch.Tensor, device: torch.Tensor) -> torch.Tensor:
        return torch.where(device[:, 0].bool().view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)


@dataclass(frozen=True)
class RandomRotation(WindowTransform):
    """In-plane rotation by a whole number of degrees drawn uniformly in +-``max_rotation_deg``
    (PENet: ``random.randint(-15, 15)``), returned in radians; air fills the corners
    (:func:`rotate_inplane`)."""

    max_rotation_deg: float = 15.0

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> float:
        bound = int(self.max_rotation_deg)
        return float(np.deg2rad(rng.integers(-bound, bound + 1)))

    width = 1

    def apply(self, x: torch.Tensor, params: float) -> torch.Tensor:
        return rotate_inplane(x[None], torch.tensor([params]))[0]

    def encode(self, params: float) -> list[float]:
        return [float(params)]

    def apply_batch(self, x: torch.Tensor, host: torch.Tensor, device: torch.Tensor) -> torch.Tensor:
        if not bool((host[:, 0] != 0).any()):  # no window turns: nothing to interpolate
            return x
        return rotate_inplane(x.float(), device[:, 0])


@dataclass(frozen=True)
class Compose(WindowTransform):
    """Transforms in order; their parameters are drawn in that order, and a window's
    encoded row is theirs side by side."""

    transforms: tuple[WindowTransform, ...]

    @property
    def width(self) -> int:  # type: ignore[override]
        return sum(t.width for t in self.transforms)

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> list:
        params = []
        for t in self.transforms:
            params.append(t.sample(rng, shape))
            shape = t.output_shape(shape)  # later transforms see the cropped window
        return params

    def apply(self, x: torch.Tensor, params: list) -> torch.Tensor:
        for t, p in zip(self.transforms, params, strict=True):
            x = t.apply(x, p)
        return x

    def encode(self, params: list) -> list[float]:
        return [v for t, p in zip(self.transforms, params, strict=True) for v in t.encode(p)]

    def apply_batch(self, x: torch.Tensor, host: torch.Tensor, device: torch.Tensor) -> torch.Tensor:
        column = 0
        for t in self.transforms:
            span = slice(column, column + t.width)
            x = t.apply_batch(x, host[:, span], device[:, span])
            column += t.width
        return x

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for t in self.transforms:
            shape = t.output_shape(shape)
        return shape


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


def augment_batch(hu: torch.Tensor, params: torch.Tensor, transform: Compose) -> torch.Tensor:
    """The training augmentation of a whole batch at once, on whatever device ``hu`` is:
    windows ``(N, 1, D, S, S)`` (int16 or float HU) and each window's encoded parameters
    ``(N, transform.width)`` (:func:`Compose.encode` of its draw); returns float32 HU."""
    # the host copy of the parameters decides shapes and branches; the device copy is
    # sent without blocking: a blocking copy would wait for every step queued before it
    on_device = params.to(hu.device, non_blocking=True)
    return transform.apply_batch(hu, params, on_device).float()  # the crop first: fewer voxels converted


TRAINING_TRANSFORMS = ("crop", "flip", "rotation")  # the names augment.transforms may use


def training_transform(crop: int, names: tuple[str, ...] = TRAINING_TRANSFORMS, flip_prob: float = 0.5,
                       max_rotation_deg: float = 15.0) -> Compose:
    """The training augmentation the config names (``augment.transforms``), in its order;
    by default PENet's: random crop, left-right flip, in-plane rotation."""
    makers = {"crop": lambda: RandomCrop(crop), "flip": lambda: RandomFlip(flip_prob),
              "rotation": lambda: RandomRotation(max_rotation_deg)}
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"augment.transforms: {', '.join(unknown)} is not one of {', '.join(makers)}")
    return Compose(tuple(makers[n]() for n in names))
