"""Window transforms: parameters drawn apart from their deterministic application."""

import numpy as np
import torch

from volttl.data.intensity import AIR_HU
from volttl.data.transforms import CentreCrop, RandomCrop, RandomFlip, RandomRotation, training_transform


def test_parameters_are_drawn_in_order_and_applied_deterministically():
    t = training_transform(8, flip_prob=0.5, max_degrees=15)
    x = torch.arange(2 * 12 * 12, dtype=torch.float32).reshape(1, 2, 12, 12)
    params = t.sample(np.random.default_rng(3), tuple(x.shape))
    assert params == t.sample(np.random.default_rng(3), tuple(x.shape))
    assert torch.equal(t.apply(x, params), t(x, np.random.default_rng(3)))
    (y0, x0), flip, _ = params
    expected = x[..., y0: y0 + 8, x0: x0 + 8]
    if flip:
        expected = expected.flip(-1)
    # the same drawn crop and flip with no rotation: exactly the cropped (mirrored) window
    assert torch.allclose(t.apply(x, [(y0, x0), flip, 0.0]), expected, atol=1e-4)
    assert not torch.allclose(t.apply(x, params), expected, atol=1e-4)  # the drawn angle rotates


def test_crop_flip_and_rotation_ranges_and_rates():
    rng = np.random.default_rng(0)
    crops = np.array([RandomCrop(8).sample(rng, (1, 2, 12, 12)) for _ in range(2000)])
    assert crops.min() == 0 and crops.max() == 4  # every offset 0..size-crop
    flips = np.mean([RandomFlip(0.5).sample(rng, ()) for _ in range(4000)])
    assert abs(flips - 0.5) < 0.03
    angles = np.rad2deg([RandomRotation(15).sample(rng, ()) for _ in range(4000)])
    assert -15 <= angles.min() < -14.5 and 14.5 < angles.max() <= 15
    assert CentreCrop(8).sample(rng, (1, 2, 12, 12)) == (2, 2)


def test_rotation_fills_the_corners_with_air_and_flip_mirrors():
    x = torch.full((1, 2, 16, 16), 40.0)
    rotated = RandomRotation(15).apply(x, np.deg2rad(15.0))
    assert torch.isclose(rotated[0, 0, 0, 0], torch.tensor(AIR_HU))  # a corner left the image
    assert torch.isclose(rotated[0, 0, 8, 8], torch.tensor(40.0))  # the centre stays
    ramp = torch.arange(16.0).expand(1, 2, 16, 16)
    assert torch.equal(RandomFlip().apply(ramp, True), ramp.flip(-1))
    assert RandomFlip().apply(ramp, False) is ramp
