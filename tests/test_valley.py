"""The second generator (`popdask.valley`) and the protocol's pure functions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import rasterio

from popdask import protocol, valley
from popdask.catalog import footprint_key
from popdask.config import config_from_dict
from popdask.synthetic import LANDCOVER_CLASSES


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    x0, y0 = valley.VALLEY_BBOX[:2]
    return valley.make_valley_region(
        tmp_path_factory.mktemp("valley"),
        bbox=(x0, y0, x0 + 4000, y0 + 4000),
        seed=2,
        n_s2_dates=2,
        n_s1_dates=1,
        n_viirs_dates=1,
    )


def test_valley_landscape_has_its_own_ground_and_people():
    land = valley.make_valley_landscape((400, 400), rng=np.random.default_rng(0))
    assert np.allclose(land.fractions.sum(axis=0), 1.0, atol=1e-5)
    classes = set(np.unique(land.landcover).tolist())
    assert {12, 13}.issubset(classes)  # conifer slopes and water (river, lake)
    assert classes.issubset(LANDCOVER_CLASSES)
    assert land.population.sum() > 0 and (land.population >= 0).all()
    # people live where there are residential floors, nowhere else
    assert (land.population[land.residential_floor_area <= 0] == 0).all()
    # terrain shading: slopes facing away from the sun are darker than the flat floor
    assert land.texture.min() < 0.8 < 1.0 < land.texture.max()


def test_valley_region_census_truth_and_earth_search_items(region):
    with rasterio.open(region.truth) as src:
        truth = src.read(1).astype(np.float64)
        assert src.crs.to_epsg() == 3035 and truth.shape == (200, 200)
    cells = truth.reshape(4, 50, 4, 50).sum(axis=(1, 3))
    census = pd.read_csv(region.census)
    assert census["TOT_P_2021"].sum() == pytest.approx(np.rint(cells).sum(), abs=2)
    items = [json.loads(line) for line in region.items["sentinel-2-l2a"].read_text().splitlines()]
    assert len({it["id"] for it in items}) == len(items) == 4  # two granules, two orbits
    assert len({footprint_key(it) for it in items}) == 2
    for it in items:
        assert it["properties"]["proj:code"].startswith("EPSG:326")  # a UTM zone ...
        assert it["properties"]["proj:code"] != "EPSG:32632"  # ... not the demo's
        assert set(valley.ES_S2_ASSETS.values()) | {"scl"} == set(it["assets"])
        band = it["assets"]["red"]["raster:bands"][0]
        new = it["properties"]["s2:processing_baseline"] >= "04.00"
        assert band["scale"] == 0.0001 and band["offset"] == (-0.1 if new else 0.0)
    assert set(region.items) == {"sentinel-2-l2a", valley.S1_COLLECTION, valley.VIIRS_COLLECTION}


def test_valley_config_reads_sentinel2_through_the_earth_search_preset(region):
    cfg = config_from_dict(valley.valley_config(region, "http://127.0.0.1:1", region.root / "o"))
    s2 = cfg.sources.sentinel2
    assert s2.mask_asset == "scl" and "swir16" in s2.assets
    assert s2.bands[:2] == ["B01", "B02"]  # renamed to the canonical band names


def test_repeated_group_folds_never_split_a_group_and_differ_by_seed():
    groups = np.repeat(np.arange(30), np.arange(1, 31))
    folds = protocol.repeated_group_folds(groups, 5, 4, seed=0)
    assert folds.shape == (4, len(groups))
    for fold in folds:
        for g in np.unique(groups):
            assert len(np.unique(fold[groups == g])) == 1
        sizes = np.bincount(fold)
        assert len(sizes) == 5 and sizes.max() - sizes.min() <= 30
    assert not (folds[0] == folds[1]).all()
    with pytest.raises(ValueError, match="n_splits"):
        protocol.group_folds(np.zeros(5), 5)


def test_cross_predict_fits_only_on_the_training_rows():
    y = np.arange(12, dtype=float)
    folds = protocol.repeated_group_folds(np.arange(12) // 3, 2, 3)

    def method(train):  # predicts the training mean: never sees the test rows
        return np.full(len(y), y[train].mean())

    pred = protocol.cross_predict(method, folds)
    for r, fold in enumerate(folds):
        for f in (0, 1):
            assert np.allclose(pred[r, fold == f], y[fold != f].mean())


def test_coarse_to_fine_keeps_group_totals_and_the_areal_baseline():
    y = np.array([10.0, 0.0, 30.0, 5.0, 5.0])
    g = np.array([0, 0, 0, 1, 1])
    spread, areal = protocol.coarse_to_fine(np.array([[1.0, 1.0, 2.0, 0.0, 0.0]]), y, g)
    assert np.allclose(spread, [[10.0, 10.0, 20.0, 5.0, 5.0]])  # group 1: areal fallback
    assert np.allclose(areal, [40 / 3, 40 / 3, 40 / 3, 5.0, 5.0])


def test_adopt_needs_a_gain_larger_than_the_spread():
    simple = {"a": [0.80, 0.82, 0.81], "b": [0.70, 0.72, 0.71]}
    small = {"a": [0.805, 0.825, 0.815], "b": [0.705, 0.725, 0.715]}
    large = {"a": [0.85, 0.87, 0.86], "b": [0.75, 0.77, 0.76]}
    mixed = {"a": [0.95, 0.97, 0.96], "b": [0.60, 0.62, 0.61]}
    assert not protocol.adopt(simple, small)[0]
    assert protocol.adopt(simple, large)[0]
    assert not protocol.adopt(simple, mixed)[0]  # one region loses by more than its spread
    # a large gain on one region whose spread is tiny does not decide alone
    tiny = {"a": [0.5, 0.5001, 0.5002], "b": [0.70, 0.80, 0.75]}
    jump = {"a": [0.52, 0.5201, 0.5202], "b": [0.70, 0.80, 0.75]}
    assert protocol.adopt(tiny, jump)[1]["a"] > 100 and not protocol.adopt(tiny, jump)[0]
    assert protocol.adopt({"a": [600.0, 620.0]}, {"a": [500.0, 520.0]}, higher_is_better=False)[0]


def test_nnls_densities_recovers_non_negative_densities():
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(6), 300)
    w = np.array([0.0, 100.0, 2000.0, 0.0, 50.0, 500.0])
    assert np.allclose(protocol.nnls_densities(x, x @ w), w, atol=1e-6)


def test_evaluate_reports_the_spread_of_repeated_splits():
    from popdask.evaluate import repeated_cv

    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(5), 200)
    y = rng.poisson(x @ np.array([0.0, 50.0, 500.0, 20.0, 5.0])).astype(float)
    res = repeated_cv(x, y, np.arange(200) // 10, 5, 4)
    assert res["repeats"] == 4 and res["r2_sd"] > 0 and 0.5 < res["r2_mean"] <= 1


def test_valley_assets_composite_through_the_earth_search_preset(region, tmp_path):
    """A tile's composite from the loopback STAC API, as a run's composite task makes it:
    every band present, reflectances physical (the Earth Search offsets and the harmonised
    items applied alike), both orbits' granules kept."""
    from popdask import catalog
    from popdask.stac_server import StacServer

    with StacServer(list(region.collections.values()), list(region.items.values())) as server:
        out = tmp_path / "o.zarr"
        cfg = config_from_dict(valley.valley_config(region, server.url, out))
        tile = cfg.make_grid().tiles()[0]
        data, summary = catalog.composite_tile(
            catalog.sources_of(cfg), tile.bounds, tile_id=tile.id, resolution=20, path=str(out)
        )
    assert data.shape == (14, 200, 200) and np.isfinite(data).mean() > 0.95
    assert summary["sources"]["sentinel2"]["kept"] == 4
    assert len(summary["sources"]["sentinel2"]["groups"]) == 2  # two orbits
    red, nir = np.nanmedian(data[3]), np.nanmedian(data[7])
    assert 0.01 < red < 0.2 and 0.15 < nir < 0.6  # reflectance, not DN or offset DN
