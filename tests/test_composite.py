import numpy as np
import pytest

from popdask.composite import (
    median_composite,
    mosaic_by_group,
    nanmedian_time,
    optical_composite,
    radar_composite,
)

nan = np.nan


def test_mosaic_first_valid_wins_within_a_day():
    # items 0 and 1 are two granules of day A, item 2 is day B
    stack = np.array([[1.0, nan, nan], [5.0, 2.0, nan], [7.0, 8.0, 9.0]], np.float32)
    out = mosaic_by_group(stack, np.array([0, 0, 1]))
    np.testing.assert_array_equal(out, [[1, 2, nan], [7, 8, 9]])


def test_overlap_counts_once_in_the_median():
    # two granules of one day overlap a pixel; a second day differs
    stack = np.array([[10.0], [10.0], [20.0]], np.float32)[:, None, :, None]  # (t, b, y, x)
    med = median_composite(stack, groups=np.array([0, 0, 1]))
    assert med.shape == (1, 1, 1)
    assert med[0, 0, 0] == 15.0  # a naive median over items would give 10


def test_nanmedian_all_nan_is_nan_without_warning():
    with np.errstate(all="raise"):
        out = nanmedian_time(np.full((3, 2), nan, np.float32))
    assert np.isnan(out).all()


def test_optical_masks_clouds_and_applies_offsets():
    t, ny, nx = 4, 2, 2
    refl = np.full((t, 2, ny, nx), 0.0, np.float32)
    dn = np.empty((t, 3, ny, nx), np.float32)
    truth = np.array([0.05, 0.30])  # two bands
    for i in range(t):
        refl[i] = truth[:, None, None]
    dn[:, :2] = refl[:, :2] * 10000
    dn[2:, :2] += 1000  # baseline >= 04.00 items
    dn[:, 2] = 4  # SCL vegetation
    dn[0, :2, 0, 0] = 9000  # a cloud, flagged
    dn[0, 2, 0, 0] = 9
    dn[1, :2, 1, 1] = 100  # a shadow, flagged
    dn[1, 2, 1, 1] = 3
    scale = np.full((t, 3), 1e-4)
    offset = np.zeros((t, 3))
    offset[2:, :] = -0.1
    out = optical_composite(dn, groups=np.arange(t), scale=scale, offset=offset, mask_band=2)
    assert out.shape == (2, ny, nx)
    np.testing.assert_allclose(out, np.broadcast_to(truth[:, None, None], out.shape), atol=1e-6)
    # without the mask the cloud leaks into the median
    bad = optical_composite(dn[:2], groups=np.arange(2), scale=scale[:2], offset=offset[:2])
    assert bad[0, 0, 0] > 0.2


def test_optical_pixel_cloudy_everywhere_is_nan():
    dn = np.full((2, 2, 1, 1), 500, np.float32)
    dn[:, 1] = 8
    out = optical_composite(
        dn, groups=np.arange(2), scale=np.full((2, 2), 1e-4), offset=np.zeros((2, 2)), mask_band=1
    )
    assert np.isnan(out).all()


def test_radar_db():
    stack = np.array([0.1, 0.01, 1.0], np.float32).reshape(3, 1, 1, 1)
    out = radar_composite(stack, groups=np.arange(3))
    assert out[0, 0, 0] == pytest.approx(-10.0)
