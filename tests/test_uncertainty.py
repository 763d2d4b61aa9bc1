"""Intervals: the block bootstrap of the densities, the 1 km error, their coverage."""

import numpy as np
import pytest
import rasterio
from conftest import write_config

from popdask import cli, store
from popdask.regression import fit_densities
from popdask.uncertainty import (
    bootstrap_densities,
    bounds,
    coverage,
    log_error_bounds,
    truth_coverage,
)


@pytest.fixture
def cells():
    """600 cells in 30 blocks of 20, 4 clusters, Poisson counts around X @ d."""
    rng = np.random.default_rng(1)
    X = rng.dirichlet(np.ones(4) * 0.7, 600)
    d = np.array([50.0, 400.0, 1500.0, 0.0])
    return X, rng.poisson(X @ d).astype(float), np.repeat(np.arange(30), 20), d


def test_the_bootstrap_resamples_blocks_and_brackets_the_densities(cells):
    X, y, groups, d = cells
    seen = []

    def fit(x, pop, g):
        seen.append(g)
        return fit_densities(x, pop, g, loss="squared")

    boot = bootstrap_densities(X, y, groups, fit, n=40, seed=0)
    assert boot.shape == (40, 4) and (boot >= 0).all()
    # each replicate draws 30 blocks of 20 cells, relabelled as 30 groups
    assert all(len(g) == 600 and len(np.unique(g)) == 30 for g in seen)
    assert len({tuple(np.round(b, 6)) for b in boot}) == 40  # every replicate its own
    lo, hi = np.quantile(boot, [0.05, 0.95], axis=0)
    assert ((lo[:3] <= d[:3] * 1.02) & (hi[:3] >= d[:3] * 0.98)).all()
    again = bootstrap_densities(X, y, groups, lambda *a: fit_densities(*a, loss="squared"), n=40)
    np.testing.assert_allclose(again, boot)  # seeded: a rerun gives the same intervals


def test_log_error_bounds_and_bounds():
    rng = np.random.default_rng(0)
    pred = rng.uniform(100, 1000, 20_000)
    obs = (pred + 1) * np.exp(rng.normal(0, 0.2, pred.size)) - 1
    lo, hi = log_error_bounds(obs, pred)
    assert lo == pytest.approx(-1.645 * 0.2, abs=0.01) and hi == pytest.approx(0.329, abs=0.01)
    reps = np.array([[0.5, 10.0], [1.0, 20.0], [1.5, 30.0]])  # 3 replicates of 2 places
    lower, upper = bounds(reps, (np.log(0.5), np.log(2.0)), level=1.0)  # the extremes
    np.testing.assert_allclose(lower, [0.25, 5.0])  # the lowest replicate times 0.5
    np.testing.assert_allclose(upper, [3.0, 60.0])  # the highest times 2
    # an error that never goes one way does not narrow the replicates' own range
    lower, upper = bounds(reps, (np.log(1.2), np.log(2.0)), level=1.0)
    np.testing.assert_allclose(lower, [0.5, 10.0])


def test_coverage_counts_the_places_inside():
    lo, hi = np.array([0.0, 1.0, 5.0, 0.0]), np.array([1.0, 2.0, 6.0, 0.0])
    truth = np.array([0.5, 3.0, 5.5, 0.2])
    c = coverage(lo, hi, truth)
    assert c["coverage"] == 0.5 and c["coverage_populated"] == 0.5 and c["places"] == 4
    t = truth_coverage(
        np.full((10, 10), 0.1), np.full((10, 10), 0.3), np.array([[5.0]]), np.array([[40.0]]),
        np.full((10, 10), 0.2), cell_px=10,
    )  # fmt: skip
    assert t["interval_coverage_100m"] == 1.0 and t["interval_coverage_1km"] == 1.0


@pytest.fixture(scope="module")
def run_intervals(tmp_path_factory, demo_region, stac_api, dask_cluster):
    d = tmp_path_factory.mktemp("intervals")
    cfg = write_config(d, url=stac_api, census=demo_region.census, address=dask_cluster)
    argv = ["run", str(cfg), "--report-dir", str(d), "--set", "regression.bootstrap=12"]
    assert cli.main(argv) == 0
    return str(d / "out.zarr")


def test_a_run_writes_interval_layers_that_cover_the_truth(run_intervals, demo_region):
    ds = store.open_store(run_intervals)
    lo, hi, pop = (ds[v].values for v in ("population_lower", "population_upper", "population"))
    assert np.isfinite(lo).all() and (lo <= hi).all() and (lo >= 0).all()
    inside = (pop >= lo - 1e-6) & (pop <= hi + 1e-6)
    assert inside.mean() > 0.9  # the estimate itself lies (almost always) in its interval
    assert (hi - lo).max() > 0  # and the intervals are not points
    c_lo, c_hi = ds.cell_lower.values, ds.cell_upper.values
    assert (c_lo <= c_hi).all() and (c_hi > c_lo).any()
    boot, attrs = store.load_arrays(run_intervals, "regression")
    assert boot["bootstrap"].shape[0] == 12 and len(attrs["log_error_bounds"]) == 2
    with rasterio.open(demo_region.truth) as src:
        truth = src.read(1).astype(np.float64)
    cov = truth_coverage(lo, hi, c_lo, c_hi, truth, cell_px=50)
    assert 0 < cov["interval_coverage_100m_populated"] <= 1
    assert 0 < cov["interval_coverage_1km_populated"] <= 1
