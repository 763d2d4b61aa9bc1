import numpy as np
import pytest

from popdask.predict import (
    cell_sums,
    halo_px,
    pixel_population,
    predict_window,
    rescale,
    smooth,
    to_density,
)

CPX = 5


@pytest.fixture
def labels():
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 4, (20, 30)).astype(np.int16)
    lab[:5, :5] = -1  # a cell with no data
    lab[5:10, 0:5] = 3  # a cell entirely of an empty cluster
    return lab


DENS = np.array([100.0, 250.0, 1000.0, 0.0])


def test_pixel_population_is_density_over_cell(labels):
    pop = pixel_population(labels, DENS, CPX)
    assert pop.dtype == np.float32
    assert pop[labels == 2][0] == pytest.approx(1000 / 25)
    assert (pop[labels == -1] == 0).all()
    # a cell fully covered by cluster k holds densities[k] persons
    full = np.full((CPX, CPX), 1, np.int16)
    assert cell_sums(pixel_population(full, DENS, CPX), CPX)[0, 0] == pytest.approx(250)


def test_rescale_matches_census_and_loses_nobody(labels):
    pop = pixel_population(labels, DENS, CPX)
    census = np.full((4, 6), 500.0)
    census[0, 0] = 80.0  # no-data cell: estimate 0, census > 0
    census[1, 0] = 60.0  # cell of an empty cluster: estimate 0, census > 0
    census[2, 2] = np.nan  # unknown: keeps the model value
    census[3, 3] = 0.0
    out = rescale(pop, census, CPX)
    sums = cell_sums(out, CPX)
    known = np.isfinite(census)
    np.testing.assert_allclose(sums[known], census[known], rtol=1e-5)
    assert sums[2, 2] == pytest.approx(cell_sums(pop, CPX)[2, 2], rel=1e-6)
    np.testing.assert_allclose(out[:5, :5], 80.0 / 25)  # spread evenly
    assert (out >= 0).all()
    assert out.sum() == pytest.approx(np.nansum(census) + cell_sums(pop, CPX)[2, 2], rel=1e-5)


def test_smooth_conserves_people_and_spreads():
    pop = np.zeros((60, 60), np.float32)
    pop[30, 30] = 100.0
    pop[25:28, 20:23] = 3.0
    out = smooth(pop, 3.0)
    assert out.sum() == pytest.approx(pop.sum(), rel=1e-5)
    assert out[30, 30] < 10 and out[30, 33] > 0


def test_density_units():
    assert to_density(np.array([4.0]), 20)[0] == pytest.approx(10000.0)  # 4 per 400 m²


def test_tile_with_halo_equals_whole_region():
    """Predicting tile by tile with a halo gives exactly the whole-region result."""
    rng = np.random.default_rng(0)
    lab = rng.integers(-1, 4, (40, 60)).astype(np.int16)
    census = rng.uniform(0, 900, (8, 12))
    sigma = 1.5
    whole = predict_window(
        lab,
        census,
        DENS,
        cell_px=CPX,
        resolution=20,
        sigma=sigma,
        inner=(slice(0, 40), slice(0, 60)),
    )
    h = halo_px(sigma, CPX)
    assert h % CPX == 0 and h >= 4 * sigma
    ys, xs = slice(10, 25), slice(20, 40)  # an inner tile
    wy, wx = slice(ys.start - h, ys.stop + h), slice(xs.start - h, xs.stop + h)
    part = predict_window(
        lab[wy, wx],
        census[wy.start // CPX : wy.stop // CPX, wx.start // CPX : wx.stop // CPX],
        DENS,
        cell_px=CPX,
        resolution=20,
        sigma=sigma,
        inner=(slice(h, h + 15), slice(h, h + 20)),
    )
    np.testing.assert_allclose(part["density"], whole["density"][ys, xs], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(part["population"], whole["population"][ys, xs])
    np.testing.assert_allclose(part["predicted"], whole["predicted"][2:5, 4:8])
