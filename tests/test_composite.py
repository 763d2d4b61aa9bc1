import functools
import warnings

import numpy as np
import pytest

from popdask.composite import (
    MEDIAN_BLOCK,
    median_composite,
    median_network,
    mosaic_by_group,
    mosaic_scaled,
    nanmedian_sort,
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


# --------------------------------------------------------------------------------------
# The fast kernels against the plain NumPy reference
# --------------------------------------------------------------------------------------
def _reference_optical(stack, groups, scale, offset, mask_band, mask_values):
    """optical_composite as it was: scaled float copy, np.delete, broadcast mask."""
    data = stack.astype(np.float32, copy=True)
    data *= np.asarray(scale, np.float32)[:, :, None, None]
    data += np.asarray(offset, np.float32)[:, :, None, None]
    if mask_band is not None:
        scl = stack[:, mask_band]
        bad = np.isnan(scl) | np.isin(scl, np.asarray(mask_values, np.float32))
        data = np.delete(data, mask_band, axis=1)
        data[np.broadcast_to(bad[:, None], data.shape)] = np.nan
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        return np.nanmedian(mosaic_by_group(data, groups), axis=0).astype(np.float32)


def _random_stack(rng, t, b, ny, nx, nan_frac=0.3):
    x = rng.uniform(-1, 1, (t, b, ny, nx)).astype(np.float32)
    x[rng.uniform(size=x.shape) < nan_frac] = np.nan
    x[:, :, 0, 0] = np.nan  # an all-NaN pixel
    return x


@pytest.mark.parametrize("t", [1, 2, 3, 4, 7, 8, 11])
def test_nanmedian_time_equals_numpy(t):
    rng = np.random.default_rng(t)
    x = _random_stack(rng, t, 3, 17, 13)
    x[:, 1, 2, 3] = np.nan
    x[: t // 2, 2, 4, 5] = np.nan  # a pixel with fewer valid values
    x[:, 0, 1, 1] = np.arange(t, dtype=np.float32)[::-1]  # no NaN, even or odd count
    with pytest.warns(RuntimeWarning):
        ref = np.nanmedian(x, axis=0)
    out = nanmedian_time(x)
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)  # identical, NaN where all NaN
    assert np.isnan(out[:, 0, 0]).all()


@pytest.mark.parametrize("n", [*range(1, 34), 48, 64, 100])
def test_median_network_sorts(n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 4, (n, 500)).astype(np.float32)  # ties included
    for a, b in median_network(n):
        assert 0 <= a < b < n
        x[a], x[b] = np.minimum(x[a], x[b]), np.maximum(x[a], x[b])
    assert (np.diff(x, axis=0) >= 0).all()


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 13, 16, 17, 24, 40])
def test_nanmedian_time_equals_the_sort_kernel(t):
    """The sorting network gives the previous kernel's values bit for bit (blocks of
    pixels, a partial last block, NaN, ±inf, huge values, all-NaN pixels)."""
    rng = np.random.default_rng(t)
    x = _random_stack(rng, t, 3, 37, MEDIAN_BLOCK // 37 + 5, nan_frac=0.4)
    x[:, 1, 2, 3] = np.inf
    x[t // 2 :, 1, 2, 4] = -np.inf
    x[:, 2, 5, 5] = np.float32(3e38)
    out = nanmedian_time(x)
    assert out.dtype == np.float32 and out.shape == x.shape[1:]
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, nanmedian_sort(x))
    np.testing.assert_array_equal(nanmedian_time(x[:, 0]), out[0])  # non-contiguous input


def test_nanmedian_time_even_and_odd_counts_and_input_untouched():
    x = np.array([[1, 1, 5], [2, nan, 6], [4, nan, nan], [nan, nan, nan]], np.float32)
    keep = x.copy()
    out = nanmedian_time(x[:, :, None])[:, 0]
    np.testing.assert_array_equal(out, [2.0, 1.0, 5.5])  # odd → middle, even → mean of two
    np.testing.assert_array_equal(x, keep)
    assert nanmedian_time(np.empty((0, 2), np.float32)).shape == (2,)


def test_nanmedian_time_keeps_huge_values_and_infinities():
    big = np.float32(3e38)
    x = np.array([[big], [big], [np.inf], [-np.inf]], np.float32)
    with np.errstate(over="ignore"):
        ref = np.nanmedian(x, axis=0)
    np.testing.assert_array_equal(nanmedian_time(x), ref)  # even count: (big + big) / 2
    # odd count: the middle value itself (np.nanmedian's masked path computes
    # (big + big) / 2 here too and overflows to inf)
    np.testing.assert_array_equal(nanmedian_time(x[:3]), [big])
    np.testing.assert_array_equal(nanmedian_time(x[1:]), [big])


@pytest.mark.parametrize("groups", [[0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 1, 2], [3, 3, 1, 0, 1, 2]])
def test_optical_composite_equals_reference(groups):
    rng = np.random.default_rng(len(set(groups)))
    t = len(groups)
    dn = rng.integers(1, 10000, (t, 4, 9, 11)).astype(np.float32)
    dn[rng.uniform(size=dn.shape) < 0.2] = np.nan
    dn[:, :, 0, 0] = np.nan
    dn[:, 3] = rng.choice([4, 5, 6, 8, 9, 3, nan], size=(t, 9, 11))  # SCL
    dn[:, 3, 1, 1] = 9  # cloudy every day
    scale = np.full((t, 4), 1e-4)
    offset = np.where(np.arange(t)[:, None] % 2, -0.1, 0.0) * np.ones((1, 4))
    groups = np.array(groups)
    kw = {"mask_band": 3, "mask_values": (0, 1, 3, 8, 9, 10, 11)}
    keep = dn.copy()
    out = optical_composite(dn, groups=groups, scale=scale, offset=offset, **kw)
    ref = _reference_optical(dn, groups, scale, offset, kw["mask_band"], kw["mask_values"])
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(dn, keep, strict=True)  # the input is not modified
    assert np.isnan(out[:, 0, 0]).all() and np.isnan(out[:, 1, 1]).all()
    # without a mask band every band is kept
    out = optical_composite(dn[:, :3], groups=groups, scale=scale[:, :3], offset=offset[:, :3])
    ref = _reference_optical(dn[:, :3], groups, scale[:, :3], offset[:, :3], None, ())
    np.testing.assert_array_equal(out, ref)


def test_radar_and_median_composite_scale_inside_equal_scaling_first():
    rng = np.random.default_rng(5)
    x = np.abs(_random_stack(rng, 6, 2, 7, 5))
    groups = np.array([0, 0, 1, 2, 2, 3])
    scale = rng.uniform(0.5, 2, (6, 2))
    offset = rng.uniform(0, 0.1, (6, 2))
    pre = x * np.asarray(scale, np.float32)[:, :, None, None]
    pre += np.asarray(offset, np.float32)[:, :, None, None]
    for kernel in (radar_composite, median_composite):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            np.testing.assert_array_equal(
                kernel(x, groups=groups, scale=scale, offset=offset), kernel(pre, groups=groups)
            )
    with pytest.warns(RuntimeWarning):
        ref = np.nanmedian(mosaic_by_group(pre, groups), axis=0)
    out = median_composite(x, groups=groups, scale=scale, offset=offset)
    np.testing.assert_array_equal(out, ref)


def test_mosaic_scaled_equals_mosaic_of_masked_scaled_stack():
    rng = np.random.default_rng(7)
    x = _random_stack(rng, 5, 3, 6, 4)
    groups = np.array([2, 2, 0, 1, 0])
    valid = rng.uniform(size=(5, 6, 4)) < 0.7
    scale, offset = rng.uniform(0.5, 2, (5, 3)), rng.uniform(-1, 1, (5, 3))
    data = x * scale.astype(np.float32)[:, :, None, None]
    data += offset.astype(np.float32)[:, :, None, None]
    data[np.broadcast_to(~valid[:, None], data.shape)] = np.nan
    out = mosaic_scaled(x, groups, bands=[0, 2], scale=scale, offset=offset, valid=valid)
    np.testing.assert_array_equal(out, mosaic_by_group(data[:, [0, 2]], groups))
    np.testing.assert_array_equal(mosaic_scaled(x, groups), mosaic_by_group(x, groups))
    with pytest.raises(ValueError, match="groups has shape"):
        mosaic_scaled(x, groups[:2])


# --------------------------------------------------------------------------------------
# The offset check from the pixels (pure)
# --------------------------------------------------------------------------------------
def _land(n: int = 10_000, seed: int = 0) -> np.ndarray:
    """Blue reflectance of a land tile: 5 % water, 40 % forest, 40 % fields, 15 % town."""
    rng = np.random.default_rng(seed)
    parts = [(0.05, 0.01, 0.03), (0.40, 0.015, 0.035), (0.40, 0.03, 0.07), (0.15, 0.06, 0.13)]
    return np.concatenate([rng.uniform(lo, hi, int(n * share)) for share, lo, hi in parts])


@pytest.mark.parametrize(
    ("shift", "offset", "expected"),
    [
        (0.0, 0.0, (0.0, "ok")),  # harmonised DNs, offset 0: right
        (0.0, -0.1, (0.0, "ok")),  # raw DNs, offset −0.1: right (the same reflectance)
        (+0.1, 0.0, (-0.1, "offset_missing")),  # raw DNs flagged harmonised
        (-0.1, -0.1, (0.1, "offset_doubled")),  # harmonised DNs given −0.1 again
        (+0.1, -0.1, (0.0, "implausible")),  # too bright, yet already at −0.1: not a flip
        (-0.1, 0.0, (0.0, "implausible")),  # too dark at offset 0: no flip explains it
    ],
)
def test_judge_offset_on_a_land_tile(shift, offset, expected):
    from popdask.composite import judge_offset, offset_evidence

    evidence = offset_evidence(_land() + shift, 0.1)
    delta, reason = judge_offset(*evidence, offset=offset, step=0.1)
    assert (round(delta, 6), reason) == expected


def test_judge_offset_thresholds_and_too_few_pixels():
    from popdask.composite import (
        OFFSET_BRIGHT,
        OFFSET_MIN_PIXELS,
        OFFSET_NEGATIVE_SHARE,
        judge_offset,
        offset_evidence,
    )

    # a very bright tile (darkest 1 % just under the bound) is left alone
    bright = np.full(10_000, OFFSET_BRIGHT - 0.005)
    assert judge_offset(*offset_evidence(bright, 0.1), offset=0.0, step=0.1) == (0.0, "ok")
    # dark water a little below 0 on a correct item: a few % negative, left alone
    water = np.concatenate([_land(), np.full(300, -0.01)])
    n, dark, negative, after = offset_evidence(water, 0.1)
    assert negative < OFFSET_NEGATIVE_SHARE
    assert judge_offset(n, dark, negative, after, offset=-0.1, step=0.1) == (0.0, "ok")
    # too few clear pixels: not judged, whatever they say
    few = _land(OFFSET_MIN_PIXELS - 100) + 0.1
    assert judge_offset(*offset_evidence(few, 0.1), offset=0.0, step=0.1)[1] == "too_few_pixels"
    # a doubled offset that leaves many pixels negative once given back: something else
    garbage = _land() - 0.3
    assert judge_offset(*offset_evidence(garbage, 0.1), offset=-0.1, step=0.1)[1] == ("implausible")
    assert offset_evidence(np.full(5, np.nan), 0.1)[0] == 0


def test_offset_checks_use_clear_pixels_and_correct_the_composite():
    from popdask.composite import (
        OFFSET_COLUMNS,
        OFFSET_REASONS,
        checked_optical_composite,
        offset_checks,
    )

    truth = _land(2500 * 4).reshape(100, 100).astype(np.float32)
    dn_raw = np.round(truth * 10000 + 1000)  # baseline ≥ 04.00 DNs
    scl = np.full((100, 100), 4, np.float32)
    scl[:50] = 9  # clouds over half of the tile...
    cloudy = dn_raw.copy()
    cloudy[:50] = 12000  # ...bright: they must not count as evidence
    stack = np.stack(
        [
            np.stack([dn_raw, scl]),  # honest: raw, offset −0.1
            np.stack([dn_raw, scl]),  # raw DNs but offset 0 (flag says harmonised)
            np.stack([dn_raw - 1000, np.full_like(scl, 4)]),  # harmonised given −0.1
            np.stack([cloudy, scl]),  # honest, half cloudy
        ]
    ).astype(np.float32)
    scale = np.full((4, 2), 1e-4)
    offset = np.array([[-0.1, 0], [0.0, 0], [-0.1, 0], [-0.1, 0]])
    rows = offset_checks(stack, scale=scale, offset=offset, band=0, mask_band=1)
    col = {c: i for i, c in enumerate(OFFSET_COLUMNS)}
    reasons = [OFFSET_REASONS[int(r)] for r in rows[:, col["reason"]]]
    assert reasons == ["ok", "offset_missing", "offset_doubled", "ok"]
    np.testing.assert_allclose(rows[:, col["delta"]], [0, -0.1, 0.1, 0])
    assert rows[:, col["pixels"]].tolist() == [5000, 5000, 10000, 5000]
    for t in range(4):  # each item alone composites to the truth once corrected
        out = checked_optical_composite(
            stack[t : t + 1],
            rows[t : t + 1],
            groups=np.zeros(1, np.int64),
            scale=scale[t : t + 1],
            offset=offset[t : t + 1],
            mask_band=1,
        )[0]
        clear = scl != 9 if t != 2 else np.ones_like(scl, bool)
        np.testing.assert_allclose(out[clear], truth[clear], atol=1e-4)


# --------------------------------------------------------------------------------------
# The kernels in the tile's graph
# --------------------------------------------------------------------------------------
def test_kernels_get_the_tiles_stack_itself_not_a_copy():
    """A kernel reducing the stack's time and band axes gets the one block as it is (dask's
    ``concatenate=True`` copied it first), and the composite is the kernel's."""
    import dask
    import dask.array as da

    from popdask.sources import _one_block

    rng = np.random.default_rng(3)
    stack = _random_stack(rng, 6, 2, 8, 9)
    seen = []

    def kernel(x, *, groups):
        seen.append(x)
        return median_composite(x, groups=groups)

    groups = np.array([0, 0, 1, 2, 3, 3])
    lazy = da.blockwise(
        functools.partial(_one_block, kernel),
        "cyx",
        da.from_delayed(dask.delayed(lambda: stack)(), stack.shape, np.float32),  # as a read
        "tbyx",
        new_axes={"c": 2},
        concatenate=False,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
        groups=groups,
    )
    (out,) = dask.compute(lazy, scheduler="synchronous")
    assert np.shares_memory(seen[0], stack)
    np.testing.assert_array_equal(out, median_composite(stack, groups=groups))
    with pytest.raises(ValueError, match="one chunk per tile"):
        _one_block(kernel, [[stack, stack]], groups=groups)
