"""The synthetic source task: 3D windows of noisy lung or soft-tissue texture (HU), crossed
by contrast-filled tubes, holding one shape (a ball, a tube along a random direction or a
plate, bright or dark inside contrast) or nothing; the network names which (4 classes).
Windows are drawn on the fly from a generator keyed on (seed, epoch, index).
"""

from __future__ import annotations

import numpy as np
import torch

from volttl.config import Config
from volttl.data.input_spec import InputSpec

CLASSES = ("none", "ball", "tube", "plate")


def _shape_mask(rng: np.random.Generator, shape: tuple[int, int, int], kind: str, size: float,
                centre: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Voxels of a ball, a tube along ``axis`` or a plate across it, of half-size ``size``."""
    d, h, w = shape
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    offset = np.stack([z - centre[0], y - centre[1], x - centre[2]], axis=-1)
    along = offset @ axis
    if kind == "ball":
        return np.linalg.norm(offset, axis=-1) < size
    if kind == "tube":  # distance from the axis line
        return np.linalg.norm(offset - along[..., None] * axis, axis=-1) < size * 0.6
    return np.abs(along) < size * 0.35  # plate: distance from the plane through the centre


def source_window(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    """One source-task window in HU ``(D, H, W)`` and its class index (:func:`source_sample`)."""
    hu, label, _ = source_sample(rng, shape)
    return hu, label


def source_sample(rng: np.random.Generator, shape: tuple[int, int, int]
                  ) -> tuple[np.ndarray, int, np.ndarray]:
    """One source-task window in HU ``(D, H, W)``, its class index (which shape it holds) and
    the shape's voxels (none for class 0).

    The background is lung (-850 HU) or soft tissue (40 HU) with noise, crossed by up to
    two contrast-filled tubes (250-400 HU) in every class. The shape is either bright
    (contrast on the background) or dark (20-60 HU) inside a contrast-filled pool around
    it: the edges, blobs and tubes of both polarities that CT shows, with no class
    defined by anything PE-like (a dark object inside contrast counts as its shape)."""
    d, h, w = shape
    lung = rng.random() < 0.5
    hu = rng.normal(-850.0 if lung else 40.0, 30.0 if lung else 25.0, size=shape).astype(np.float32)
    hu += np.linspace(-30, 30, w, dtype=np.float32)[None, None, :] * rng.uniform(-1, 1)  # a gradient

    def somewhere() -> np.ndarray:
        return np.array([rng.uniform(0.3, 0.7) * d, rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w])

    def direction() -> np.ndarray:
        v = rng.normal(size=3)
        return v / np.linalg.norm(v)

    for _ in range(int(rng.integers(0, 3))):  # vessels: in every class, so no class cue
        vessel = _shape_mask(rng, shape, "tube", rng.uniform(2.0, 4.0), somewhere(), direction())
        hu[vessel] = rng.uniform(250.0, 400.0)
    label = int(rng.integers(0, len(CLASSES)))
    if label == 0:
        return hu, label, np.zeros(shape, dtype=bool)
    centre, axis, size = somewhere(), direction(), rng.uniform(2.5, 5.0)
    inside = _shape_mask(rng, shape, CLASSES[label], size, centre, axis)
    if rng.random() < 0.5:  # bright shape
        hu[inside] = rng.uniform(200.0, 400.0) + rng.normal(0, 15, size=int(inside.sum()))
    else:  # dark shape inside a contrast-filled pool
        pool = _shape_mask(rng, shape, CLASSES[label], size + 2.5, centre, axis)
        hu[pool] = rng.uniform(250.0, 400.0)
        hu[inside] = rng.uniform(20.0, 60.0) + rng.normal(0, 10, size=int(inside.sum()))
    return hu, label, inside


class SourceTask(torch.utils.data.Dataset):
    """``count`` source-task windows per epoch, intensity-scaled as CT windows are."""

    def __init__(self, cfg: Config, count: int, seed: int) -> None:
        self.shape = tuple(cfg.pretrain.input_size)
        self.count, self.seed, self.epoch = count, seed, 0
        self.spec = InputSpec.of(cfg)  # the source task's windows are scaled as CT windows are

    def __len__(self) -> int:
        return self.count

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        hu, label = source_window(np.random.default_rng([self.seed, self.epoch, index]), self.shape)
        x = self.spec.scale(hu).astype(np.float32)
        return torch.from_numpy(x)[None], label
