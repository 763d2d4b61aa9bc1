"""Covariate terms: ranges, additivity over pixels, and tile-by-tile equals whole-region."""

import numpy as np
import pytest

from popdask import terms
from popdask.predict import cell_sums, pixel_population
from popdask.regression import cell_fractions, predict_cells

CELL = 5


@pytest.fixture
def labels():
    rng = np.random.default_rng(3)
    lab = rng.integers(0, 4, (30, 40)).astype(np.int16)
    lab[:4, :7] = -1  # no data
    lab[10:20, 10:25] = 3  # a dense block
    return lab


@pytest.fixture
def bands(labels):
    rng = np.random.default_rng(4)
    lights = rng.uniform(0, 150, (1, *labels.shape)).astype(np.float32)
    radar = rng.uniform(-30, 8, (2, *labels.shape)).astype(np.float32)
    lights[0, 0, 0] = np.nan
    radar[1, 5, 5] = np.nan
    return lights, radar


def test_intensity_is_lights_times_radar_in_unit_range(bands):
    lights, radar = bands
    out = terms.intensity(lights, radar)
    assert out.shape == lights.shape[1:] and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert out[0, 0] == 0  # missing lights count as none
    # by hand for one pixel
    lf = min(np.log1p(lights[0, 3, 4]) / np.log1p(100.0), 1.0)
    rf = np.mean([np.clip((radar[b, 3, 4] + 25) / 30, 0, 1) for b in range(2)])
    assert out[3, 4] == pytest.approx(lf * rf, rel=1e-5)
    # radar alone and lights alone are the single factors
    assert terms.intensity(None, radar)[3, 4] == pytest.approx(rf, rel=1e-5)
    assert terms.intensity(lights, None)[3, 4] == pytest.approx(lf, rel=1e-5)
    with pytest.raises(ValueError, match="lights, radar"):
        terms.intensity(None, None)


def test_context_paints_and_smooths_the_pilot(labels):
    pilot = np.array([0.0, 100.0, 200.0, 400.0])
    painted = terms.context(labels, pilot, 0)
    np.testing.assert_allclose(painted[labels == 3], 1.0)
    # a quarter of the densest pilot density, through the saturating response
    a = terms.CONTEXT_SATURATION
    np.testing.assert_allclose(painted[labels == 1], np.log1p(0.25 * a) / np.log1p(a), rtol=1e-6)
    assert (painted[labels == 0] == 0).all() and (painted[labels == -1] == 0).all()
    smooth = terms.context(labels, pilot, 2.0)
    assert smooth.min() >= 0 and smooth.max() <= 1
    # inside the dense block the neighbourhood is dense; outside it is mixed
    assert smooth[15, 17] > 0.9 > smooth[25, 35]
    assert (terms.context(labels, np.zeros(4), 2.0) == 0).all()


def test_saturate_is_concave_and_keeps_the_unit_range():
    c = np.linspace(0, 1, 101, dtype=np.float32)
    s = terms.saturate(c)
    assert s[0] == 0 and s[-1] == pytest.approx(1.0)
    assert (np.diff(s) > 0).all() and (np.diff(s, 2) < 0).all()  # increasing, concave
    assert (s >= c).all()  # a sparse neighbourhood gets more than its linear share
    assert c[5] == np.float32(0.05)  # the input is not overwritten without out=


def test_weighted_fractions_with_unit_weights_are_the_fractions(labels):
    w = np.ones((1, *labels.shape), np.float32)
    np.testing.assert_allclose(
        terms.weighted_fractions(labels, w, 4, CELL), cell_fractions(labels, 4, cell_px=CELL)
    )
    with pytest.raises(ValueError, match="do not match"):
        terms.weighted_fractions(labels, w[:, :-1], 4, CELL)


def test_pixels_sum_to_the_cell_estimate(labels, bands):
    """The model stays additive: a cell's pixels sum to fractions·d + weighted·d_terms."""
    lights, radar = bands
    pilot = np.array([5.0, 50.0, 500.0, 2000.0])
    names = ["intensity", "context"]
    layers = terms.pixel_terms(
        names, labels=labels, lights=lights, radar=radar, pilot=pilot, sigma_px=1.5
    )
    assert layers.shape == (2, *labels.shape)
    design = np.concatenate(
        [
            cell_fractions(labels, 4, cell_px=CELL),
            terms.weighted_fractions(labels, layers, 4, CELL),
        ],
        axis=-1,
    )
    dens = np.array([10, 20, 300, 900, 1, 2, 3, 4, 0, 50, 0, 700], float)
    pixels = pixel_population(labels, dens, CELL, layers)
    assert (pixels >= 0).all()
    np.testing.assert_allclose(cell_sums(pixels, CELL), predict_cells(design, dens), rtol=1e-5)
    with pytest.raises(ValueError, match="blocks of clusters"):
        pixel_population(labels, dens[:10], CELL, layers)


def test_scale_divides_each_term(labels, bands):
    lights, radar = bands
    kw = dict(labels=labels, lights=lights, radar=radar, pilot=np.arange(4.0), sigma_px=1.0)
    raw = terms.pixel_terms(["intensity", "context"], **kw)
    scaled = terms.pixel_terms(["intensity", "context"], scale=[0.5, 2.0], **kw)
    np.testing.assert_allclose(scaled[0], raw[0] / 0.5, rtol=1e-6)
    np.testing.assert_allclose(scaled[1], raw[1] / 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown term"):
        terms.pixel_terms(["height"], **kw)
    with pytest.raises(ValueError, match="pilot"):
        terms.pixel_terms(["context"], **{**kw, "pilot": None})


def test_context_tile_by_tile_with_its_halo_equals_whole_region(labels):
    pilot = np.array([0.0, 10.0, 30.0, 100.0])
    sigma = 1.2
    halo = terms.context_halo(sigma)
    assert halo == 5 >= terms.TRUNCATE * sigma  # the kernel radius, not whole cells
    whole = terms.context(labels, pilot, sigma)
    ny, nx = labels.shape
    for y0 in range(0, ny, 10):
        for x0 in range(0, nx, 20):
            ys = slice(max(y0 - halo, 0), min(y0 + 10 + halo, ny))
            xs = slice(max(x0 - halo, 0), min(x0 + 20 + halo, nx))
            win = terms.context(labels[ys, xs], pilot, sigma)
            inner = win[y0 - ys.start : y0 - ys.start + 10, x0 - xs.start : x0 - xs.start + 20]
            np.testing.assert_allclose(inner, whole[y0 : y0 + 10, x0 : x0 + 20], atol=1e-6)


def test_fit_on_weighted_fractions_recovers_a_covariate_effect():
    """Census made by a model with a context effect: the terms recover it, and the grouped
    cross-validation (the pipeline's rule for keeping them) prefers them."""
    from popdask.regression import block_groups, cross_validate, fit_densities

    rng = np.random.default_rng(0)
    cell, ny, nx = 10, 20, 20  # 400 cells of 10 × 10 px
    field = gaussian_blobs(rng, (ny * cell, nx * cell))
    lab = np.digitize(field + rng.normal(0, 0.15, field.shape), [0.3, 0.6, 0.8]).astype(np.int16)
    pilot = np.array([0.0, 50.0, 400.0, 2000.0])
    ctx = terms.context(lab, pilot, 3.0)
    base, extra = np.array([0.0, 40.0, 300.0, 1200.0]), np.array([0.0, 0.0, 500.0, 3000.0])
    design = np.concatenate(
        [cell_fractions(lab, 4, cell_px=cell), terms.weighted_fractions(lab, ctx[None], 4, cell)],
        axis=-1,
    ).reshape(-1, 8)
    truth = design @ np.concatenate([base, extra])
    census = rng.poisson(truth).astype(float)
    groups = block_groups((ny, nx), 5).ravel()
    with_terms = cross_validate(design, census, groups).scores
    without = cross_validate(design[:, :4], census, groups).scores
    assert with_terms["mae"] < 0.8 * without["mae"]
    dens = fit_densities(design, census, groups)
    assert (dens >= 0).all()
    assert dens[7] == pytest.approx(extra[3], rel=0.25)  # the densest cluster's context effect


def gaussian_blobs(rng, shape):
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape), 8)
    return (f - f.min()) / (f.max() - f.min())
