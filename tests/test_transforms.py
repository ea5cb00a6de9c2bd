"""Window transforms: parameters drawn apart from their deterministic application, and
the batched on-device augmentation against the per-window MONAI transforms it replaced."""

import numpy as np
import pytest
import torch
from monai.transforms import Flip, Rotate

from volttl.data.intensity import AIR_HU
from volttl.data.transforms import (
    TRAINING_TRANSFORMS,
    CentreCrop,
    Compose,
    RandomCrop,
    RandomFlip,
    RandomRotation,
    WindowTransform,
    augment_batch,
    training_transform,
)


def _monai_window(hu: torch.Tensor, y0: int, x0: int, flip: bool, angle: float, crop: int) -> torch.Tensor:
    """One window augmented as training did before the batched path: crop, MONAI's Flip on
    the last axis, MONAI's bilinear Rotate of HU + 1000 with zero padding."""
    x = hu.float()[..., y0: y0 + crop, x0: x0 + crop]
    if flip:
        x = torch.as_tensor(Flip(spatial_axis=2)(x))
    return torch.as_tensor(Rotate(angle=(angle, 0.0, 0.0), padding_mode="zeros")(x - AIR_HU)) + AIR_HU


def test_batched_augmentation_matches_the_per_window_monai_transforms():
    """Fixed parameters, a whole batch at once, int16 in: the per-window MONAI output within
    interpolation tolerance (a thousandth of a HU on a 1000 HU scale)."""
    g = torch.Generator().manual_seed(0)
    hu = (torch.rand(6, 1, 4, 40, 40, generator=g) * 1400 - 1000).round().to(torch.int16)
    rows = [(0, 0, 0, 0.0), (8, 3, 1, 0.0), (2, 7, 0, np.deg2rad(14.5)), (5, 5, 1, np.deg2rad(-15.0)),
            (8, 8, 1, np.deg2rad(3.0)), (1, 6, 0, np.deg2rad(-7.25))]
    params = torch.tensor(rows, dtype=torch.float32)
    got = augment_batch(hu, params, training_transform(32))
    assert got.shape == (6, 1, 4, 32, 32) and got.dtype == torch.float32
    for i, (y0, x0, flip, angle) in enumerate(rows):
        want = _monai_window(hu[i], y0, x0, bool(flip), float(np.float32(angle)), 32)
        assert float((got[i] - want).abs().max()) < 0.05, i
    assert torch.equal(got[0], hu[0, :, :, :32, :32].float())  # no flip, no angle: the crop itself


def test_batched_augmentation_keeps_the_drawn_distribution():
    """The parameters the training path applies are the keyed draws of training_transform:
    every crop offset, half the windows flipped, angles over +-15 degrees; and the batched
    rotation fills exactly with air where the window left the plane."""
    t = training_transform(32, flip_prob=0.5, max_rotation_deg=15)
    rng = np.random.default_rng(7)
    params = torch.tensor([t.encode(t.sample(rng, (1, 4, 40, 40))) for _ in range(4000)])
    assert params[:, :2].min() == 0 and params[:, :2].max() == 8
    assert abs(float(params[:, 2].mean()) - 0.5) < 0.03
    degrees = np.rad2deg(params[:, 3].numpy().astype(np.float64))
    whole = np.rint(degrees)
    assert np.allclose(degrees, whole, atol=1e-4)  # whole degrees, as PENet draws them
    counts = np.bincount((whole + 15).astype(int), minlength=31)
    assert len(counts) == 31 and counts.min() > 0.6 * counts.mean()  # every angle in -15..15, uniform
    flat = torch.full((len(params[:64]), 1, 2, 40, 40), 40, dtype=torch.int16)
    out = augment_batch(flat, params[:64], t)
    tilted = params[:64, 3].abs() > np.deg2rad(5)
    corners = out[:, 0, :, 0, 0]
    assert torch.all(corners[tilted] == AIR_HU)
    assert torch.allclose(out[:, 0, :, 16, 16], torch.tensor(40.0), atol=1e-3)
    assert out.min() >= AIR_HU and out.max() <= 40 + 1e-3


def test_parameters_are_drawn_in_order_and_applied_deterministically():
    t = training_transform(8, flip_prob=0.5, max_rotation_deg=15)
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
    angles = np.rint(np.rad2deg([RandomRotation(15).sample(rng, ()) for _ in range(4000)]))
    assert set(angles.astype(int)) == set(range(-15, 16))
    assert CentreCrop(8).sample(rng, (1, 2, 12, 12)) == (2, 2)


def test_rotation_fills_the_corners_with_air_and_flip_mirrors():
    x = torch.full((1, 2, 16, 16), 40.0)
    rotated = RandomRotation(15).apply(x, np.deg2rad(15.0))
    assert torch.isclose(rotated[0, 0, 0, 0], torch.tensor(AIR_HU))  # a corner left the image
    assert torch.isclose(rotated[0, 0, 8, 8], torch.tensor(40.0))  # the centre stays
    ramp = torch.arange(16.0).expand(1, 2, 16, 16)
    assert torch.equal(RandomFlip().apply(ramp, True), ramp.flip(-1))
    assert RandomFlip().apply(ramp, False) is ramp


class _Negate(WindowTransform):
    """A fourth transform for the test: negates the window's HU with probability 1/2."""

    width = 1

    def sample(self, rng, shape):
        return bool(rng.random() < 0.5)

    def apply(self, x, params):
        return -x if params else x

    def encode(self, params):
        return [float(params)]

    def apply_batch(self, x, host, device):
        return torch.where(device[:, 0].bool().view(-1, 1, 1, 1, 1), -x.float(), x.float())


def test_a_new_transform_is_one_class_and_the_batch_path_follows_the_window_path():
    """Any composition, a fourth transform included: the batched path applies exactly what
    the per-window path applies to each window with the same draws."""
    t = Compose((RandomCrop(24), RandomFlip(0.5), _Negate(), RandomRotation(10)))
    assert t.width == 5
    rng = np.random.default_rng(1)
    hu = (torch.rand(8, 1, 3, 30, 30, generator=torch.Generator().manual_seed(1)) * 1400 - 1000)
    draws = [t.sample(rng, (1, 3, 30, 30)) for _ in range(8)]
    params = torch.tensor([t.encode(d) for d in draws])
    got = augment_batch(hu.round().to(torch.int16), params, t)
    for i, d in enumerate(draws):
        want = t.apply(hu[i].round(), d)
        assert float((got[i] - want).abs().max()) < 0.05, i
    assert {bool(d[2]) for d in draws} == {True, False}  # both branches of the new transform ran


def test_config_chooses_the_training_transforms(tmp_path):
    from volttl.config import ConfigError, config_from_dict

    cfg = config_from_dict({"augment": {"transforms": ["crop", "rotation"], "max_rotation_deg": 5}})
    t = training_transform(16, tuple(cfg.augment.transforms), max_rotation_deg=cfg.augment.max_rotation_deg)
    assert [type(x) for x in t.transforms] == [RandomCrop, RandomRotation] and t.width == 3
    assert t.transforms[1].max_rotation_deg == 5
    assert set(config_from_dict({}).augment.transforms) == set(TRAINING_TRANSFORMS)
    for bad, message in ((["flip", "crop"], "crop first"), (["crop", "flip", "flip"], "each transform once"),
                         (["crop", "elastic"], "'elastic' is not one of crop, flip, rotation")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"augment": {"transforms": bad}})
    with pytest.raises(ConfigError, match=r"augment.flip_prob must be in \[0, 1\]"):
        config_from_dict({"augment": {"flip_prob": 1.5}})
