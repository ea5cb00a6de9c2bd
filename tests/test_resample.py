import numpy as np

from volttl.preprocess.resample import (
    resample_to_store,
    resize_inplane,
    slices_to_int16,
    stored_grid,
)


def area_weights(old: int, new: int) -> np.ndarray:
    """Reference: (new, old) matrix of exact fractional overlaps / footprint width."""
    w = np.zeros((new, old))
    scale = old / new
    for o in range(new):
        lo, hi = o * scale, (o + 1) * scale
        for i in range(int(np.floor(lo)), min(int(np.ceil(hi)), old)):
            w[o, i] = (min(hi, i + 1) - max(lo, i)) / scale
    return w


def test_inplane_shrink_is_exact_area_average():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 512, 400)).astype(np.float32)
    out = resize_inplane(a, 208)
    expect = area_weights(512, 208) @ a.astype(np.float64) @ area_weights(400, 208).T
    np.testing.assert_allclose(out, expect, atol=1e-4)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), a.mean(axis=(1, 2)), atol=1e-3)


def test_inplane_shrink_of_int16_is_the_rounded_area_average():
    """Several planes go through OpenCV at once; each must come out as if resized alone."""
    rng = np.random.default_rng(1)
    a = rng.integers(-1024, 3000, size=(7, 512, 400)).astype(np.int16)
    out = resize_inplane(a, 208)
    assert out.dtype == np.int16
    expect = area_weights(512, 208) @ a.astype(np.float64) @ area_weights(400, 208).T
    assert np.abs(out - expect).max() <= 0.5 + 1e-3


def test_slice_interpolation_rounds_and_saturates():
    planes = np.stack([np.full((3, 3), v, np.float32) for v in (0.0, 10.0, 40000.0)])
    out = slices_to_int16(planes, np.array([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 7.0]))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out[:, 1, 1], [0, 2, 5, 10, 20005, 32767, 32767])


def test_inplane_enlarge_is_linear_with_centres_aligned():
    a = np.tile(np.array([0.0, 10.0], dtype=np.float32), (1, 2, 1))
    np.testing.assert_allclose(resize_inplane(a, 4)[0, 0], [0.0, 2.5, 7.5, 10.0])


def test_slice_thinning_averages_the_slices_each_stored_slice_covers():
    # 11 slices of 1 mm -> 2.5 mm: whole footprints [0, 2.5), [2.5, 5), ... -> 4 slices, each
    # the overlap-weighted mean of the source slices (value 10 * i) it covers
    hu = np.broadcast_to(np.arange(11, dtype=np.float32)[:, None, None] * 10, (11, 4, 4)).copy()
    out, grid = resample_to_store(hu, slice_spacing=1.0, thickness=2.5, size=4)
    assert out.dtype == np.int16 and out.shape == (4, 4, 4) and grid.num_slices == 4
    expected = [(0 + 10 + 0.5 * 20) / 2.5, (0.5 * 20 + 30 + 40) / 2.5, (50 + 60 + 0.5 * 70) / 2.5,
                (0.5 * 70 + 80 + 90) / 2.5]
    np.testing.assert_array_equal(out[:, 0, 0], np.rint(expected))
    # the recorded map puts each stored slice at the centre of its footprint
    np.testing.assert_allclose(grid.original_slice_of(np.arange(4)), [0.75, 3.25, 5.75, 8.25])


def test_thinning_0625_to_125_mm_is_the_mean_of_slice_pairs():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, (40, 8, 8)).astype(np.int16)
    out, grid = resample_to_store(hu, slice_spacing=0.625, thickness=1.25, size=8)
    pairs = (hu[0::2].astype(np.float64) + hu[1::2]) / 2
    np.testing.assert_array_equal(out, np.rint(pairs).astype(np.int16))
    assert grid.stored_to_original()[2, 3] == 0.5  # stored slice s sits between slices 2s and 2s+1


def test_refining_the_slices_stays_linear():
    hu = np.broadcast_to(np.arange(5, dtype=np.float32)[:, None, None] * 10, (5, 4, 4)).copy()
    out, grid = resample_to_store(hu, slice_spacing=2.5, thickness=1.25, size=4)
    np.testing.assert_array_equal(out[:, 0, 0], [0, 5, 10, 15, 20, 25, 30, 35, 40])


def test_stored_to_original_maps_pixel_centres():
    # a ramp whose value is the original column index survives resizing at mapped coords
    cols = 100
    hu = np.broadcast_to(np.arange(cols, dtype=np.float32), (3, 60, cols)).copy() * 10
    out, grid = resample_to_store(hu, 1.0, 1.0, 40)
    m = grid.stored_to_original()
    for c in (0, 7, 20, 39):
        i = (m @ np.array([c, 0, 0, 1.0]))[0]
        assert abs(out[1, 5, c] / 10 - i) < 0.06


def test_single_slice_study():
    grid = stored_grid((1, 10, 10), 1.25, 1.25, 8)
    assert grid.num_slices == 1
