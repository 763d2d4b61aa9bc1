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
    """Predicting tile by tile, each with a halo of the kernel radius that cuts cells, gives
    the whole-region result (the cut cells are rescaled with the fit's model counts)."""
    rng = np.random.default_rng(0)
    lab = rng.integers(-1, 4, (40, 60)).astype(np.int16)
    census = rng.uniform(0, 900, (8, 12))
    census[3, 5] = np.nan  # unknown: keeps the model's values
    census[2, 2] = 0.0
    sigma = 1.5
    kw = dict(cell_px=CPX, resolution=20, sigma=sigma)
    whole = predict_window(lab, census, DENS, inner=(slice(0, 40), slice(0, 60)), **kw)
    counts = whole["predicted"].astype(np.float64)
    h = halo_px(sigma)
    assert h == 6 and h % CPX  # the halo cuts cells
    for y0 in range(0, 40, 10):
        for x0 in range(0, 60, 15):
            wy = slice(max(y0 - h, 0), min(y0 + 10 + h, 40))
            wx = slice(max(x0 - h, 0), min(x0 + 15 + h, 60))
            cy = slice(wy.start // CPX, -(-wy.stop // CPX))
            cx = slice(wx.start // CPX, -(-wx.stop // CPX))
            part = predict_window(
                lab[wy, wx],
                census[cy, cx],
                DENS,
                inner=(
                    slice(y0 - wy.start, y0 - wy.start + 10),
                    slice(x0 - wx.start, x0 - wx.start + 15),
                ),
                offset=(wy.start % CPX, wx.start % CPX),
                counts=counts[cy, cx],
                **kw,
            )
            ys, xs = slice(y0, y0 + 10), slice(x0, x0 + 15)
            np.testing.assert_allclose(
                part["density"], whole["density"][ys, xs], rtol=1e-5, atol=1e-4
            )
            np.testing.assert_array_equal(part["population"], whole["population"][ys, xs])
            np.testing.assert_allclose(
                part["predicted"],
                whole["predicted"][y0 // CPX : (y0 + 10) // CPX, x0 // CPX : (x0 + 15) // CPX],
            )
    sums = cell_sums(whole["population"], CPX)
    known = np.isfinite(census)
    np.testing.assert_allclose(sums[known], census[known], rtol=1e-5, atol=1e-3)


def test_a_window_that_cuts_cells_needs_their_counts():
    lab = np.zeros((12, 12), np.int16)  # from pixel 3 of its first cell: 3 cells a side
    kw = dict(cell_px=CPX, resolution=20, sigma=1.0, inner=(slice(2, 7), slice(2, 7)))
    with pytest.raises(ValueError, match="counts="):
        predict_window(lab, np.full((3, 3), 10.0), DENS, offset=(3, 3), **kw)
    with pytest.raises(ValueError, match="does not match"):
        predict_window(
            lab, np.full((4, 4), 10.0), DENS, offset=(3, 3), counts=np.ones((4, 4)), **kw
        )
