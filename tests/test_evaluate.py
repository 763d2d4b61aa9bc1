"""Tests of popdask.evaluate: the evaluation protocol itself, on small synthetic inputs."""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest
import xarray as xr

from popdask import evaluate as ev
from popdask import regression, store
from popdask.grid import Grid
from popdask.predict import pixel_population, smooth, to_density

DENSITIES = np.array([0.0, 60.0, 900.0, 7000.0])  # persons in a full 1 km cell


def _perfect(ny: int = 20, nx: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spatially structured fractions (rows sum to 1) and census = fractions @ DENSITIES."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, ny), np.linspace(0, 1, nx), indexing="ij")
    w = np.stack(
        [
            1.0 + 2 * xx,
            0.2 + 2 * yy,
            0.1 + 3 * (1 - xx) * yy,
            0.05 + 4 * np.exp(-((xx - 0.3) ** 2 + (yy - 0.7) ** 2) / 0.03),
        ],
        axis=-1,
    )
    w *= rng.uniform(0.3, 1.7, size=w.shape)
    fr = w / w.sum(axis=-1, keepdims=True)
    return fr, fr @ DENSITIES


# --------------------------------------------------------------------------------------------
# Groups and folds
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bbox", [(0, 0, 20000, 20000), (0, 0, 13000, 7000)])
def test_block_groups_are_the_pipelines(bbox):
    from popdask.pipeline import cv_groups

    grid = Grid.from_bbox(bbox)
    g = ev.block_groups(grid.cell_shape, 5)
    np.testing.assert_array_equal(g, cv_groups(grid, 5000))
    # squares of 5 × 5 cells: 4 × 4 blocks over 20 km, and a block never straddles two
    assert len(np.unique(ev.block_groups((20, 20), 5))) == 16
    assert (g[:5, :5] == g[0, 0]).all() and g[0, 5] != g[0, 0] and g[5, 0] != g[0, 0]


def test_cv_folds_never_share_a_group_and_never_leak():
    fr, census = _perfect()
    groups = ev.block_groups(census.shape, 5).ravel()
    x, y = fr.reshape(-1, 4), census.ravel().copy()
    y[[3, 77]] = np.nan  # unknown cells are never in a fold
    res = ev.fit_cells(x, y, groups, n_splits=5, fit_options={"loss": "poisson"})
    fold = res["fold"]
    assert (fold[[3, 77]] == -1).all() and np.isnan(res["cv"][[3, 77]]).all()
    for g in np.unique(groups):
        f = np.unique(fold[(groups == g) & (fold >= 0)])
        assert len(f) == 1, f"group {g} split over folds {f}"
    assert set(np.unique(fold[fold >= 0])) == set(range(5))
    # Out of fold means the test cells' own census never enters their prediction.
    y2 = y.copy()
    test0 = fold == 0
    y2[test0] *= 25.0
    res2 = ev.fit_cells(x, y2, groups, n_splits=5, fit_options={"loss": "poisson"})
    np.testing.assert_array_equal(res2["fold"], fold)
    np.testing.assert_allclose(res2["cv"][test0], res["cv"][test0], rtol=1e-9)
    assert not np.allclose(res2["in_sample"][test0], res["in_sample"][test0], rtol=1e-3)


def test_coarse_cv_holds_out_whole_blocks():
    fr, census = _perfect()
    out = ev.coarse_to_fine(fr, census, 2, groups_per=2, n_splits=5)
    fold = out["maps"]["fold"]
    agg = ev.aggregate(fr, census, 2)
    for b in np.unique(agg.block):  # a 2 km block lies in one fold...
        assert len(np.unique(fold[agg.block == b])) == 1
    groups = ev.block_groups((20, 20), 4)  # ...and so does each group of 2 × 2 blocks
    for g in np.unique(groups):
        assert len(np.unique(fold[groups == g])) == 1
    assert set(np.unique(fold)) == set(range(5))
    # Changing the census of the test blocks of fold 0 leaves their predictions unchanged.
    test0 = fold == 0
    census2 = np.where(test0, census * 10.0, census)
    out2 = ev.coarse_to_fine(fr, census2, 2, groups_per=2, n_splits=5)
    np.testing.assert_array_equal(out2["maps"]["fold"], fold)
    np.testing.assert_allclose(out2["maps"]["cv"][test0], out["maps"]["cv"][test0], rtol=1e-9)


# --------------------------------------------------------------------------------------------
# Perfect data: the protocol must find the densities and score R² ≈ 1 everywhere
# --------------------------------------------------------------------------------------------


def test_perfect_fractions_recover_densities_and_score_one():
    fr, census = _perfect()
    report, maps = ev.evaluate_cells(fr, census, n_splits=5, cells_per_block=5)
    np.testing.assert_allclose(maps["densities"], DENSITIES, rtol=1e-3, atol=0.5)
    assert report["n_splits"] == 5 and report["cv_groups"] == 16
    for part in ("in_sample", "cv"):
        s = report["fit_1km"][part]
        assert s["r2"] > 0.9999 and s["mae"] < 1.0 and s["n"] == 400, (part, s)
        for b in report["bias_by_class"][part].values():
            assert b["n"] == 0 or abs(b["bias"]) < 1.0
    c2, c5 = report["coarse_to_fine"]["2x2"], report["coarse_to_fine"]["5x5"]
    assert c2["blocks"] == 100 and c5["blocks"] == 16
    for c in (c2, c5):
        assert c["block_in_sample"]["r2"] > 0.9999
        for part in ("in_sample", "cv"):
            for variant in ("model", "rescaled"):
                assert c[part][variant]["r2"] > 0.999, (c["factor"], part, variant)
        assert c["baseline_areal"]["r2"] < 0.99  # the baseline is not perfect: a real bar
    res5 = ev.coarse_to_fine(fr, census, 5, n_splits=5)
    np.testing.assert_allclose(res5["densities"], DENSITIES, rtol=1e-2, atol=5.0)


def test_noisy_data_scores_lower_out_of_fold():
    fr, census = _perfect(seed=1)
    noisy = np.random.default_rng(5).poisson(census * 1.0).astype(float)
    noisy *= np.random.default_rng(6).lognormal(0, 0.4, size=noisy.shape)
    report, _ = ev.evaluate_cells(fr, noisy, n_splits=5, cells_per_block=5)
    r_in, r_cv = report["fit_1km"]["in_sample"]["r2"], report["fit_1km"]["cv"]["r2"]
    assert r_cv < r_in < 0.99


# --------------------------------------------------------------------------------------------
# Density classes and bias
# --------------------------------------------------------------------------------------------


def test_density_classes_at_the_boundaries():
    counts = [0, 0.5, 1, 99, 99.99, 100, 999, 1000, 4999, 5000, 1e5, np.nan, -1]
    want = [0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4, -1, -1]
    assert ev.density_class(counts).tolist() == want
    # classes are densities: 25 persons in a quarter km² is 100 per km², suburban
    assert ev.density_class([24.9, 25.0, 1250.0], cell_km2=0.25).tolist() == [1, 2, 4]
    assert ev.CLASSES[2] == "suburban" and ev.CLASSES[4] == "dense_core"


def test_bias_by_class_hand_made():
    obs = np.array([0, 0, 50, 30, 150, 2000, 8000, np.nan])
    pred = np.array([1, 3, 40, 30, 150, 2500, 6000, 99])
    b = ev.bias_by_class(obs, pred)
    assert b["empty"]["n"] == 2 and b["empty"]["bias"] == 2.0
    assert b["empty"]["relative_bias"] is None
    assert b["rural"]["n"] == 2 and b["rural"]["bias"] == -5.0
    assert b["rural"]["relative_bias"] == pytest.approx(-10 / 80)
    assert b["suburban"]["bias"] == 0.0 and b["suburban"]["mae"] == 0.0
    assert b["urban"]["bias"] == 500.0 and b["urban"]["relative_bias"] == 0.25
    assert b["dense_core"]["bias"] == -2000.0 and b["dense_core"]["observed_mean"] == 8000
    assert sum(v["n"] for v in b.values()) == 7  # the unknown cell is left out


# --------------------------------------------------------------------------------------------
# Coarse aggregation
# --------------------------------------------------------------------------------------------


def test_aggregate_conserves_population_and_pixel_weighted_fractions():
    rng = np.random.default_rng(2)
    labels = rng.integers(-1, 6, size=(70, 90)).astype(np.int16)  # 7 × 9 cells of 10 px
    labels[:20, :30] = 3  # some structure
    fr = regression.cell_fractions(labels, 6, cell_px=10).astype(np.float64)
    census = rng.uniform(0, 500, size=fr.shape[:2]).round()
    census[5, 1] = np.nan  # makes block (2, 0) incomplete
    agg = ev.aggregate(fr, census, 2)
    assert agg.complete.shape == (4, 5)
    # the last row and column of blocks are cut by the region's edge; (2, 0) has an unknown
    want = np.ones((4, 5), bool)
    want[3, :] = want[:, 4] = False
    want[2, 0] = False
    np.testing.assert_array_equal(agg.complete, want)
    inside = agg.cells_in_complete()
    assert inside.sum() == 4 * agg.complete.sum()
    assert np.nansum(agg.census) == pytest.approx(census[inside].sum())
    assert np.isnan(agg.census[~agg.complete]).all()
    # fractions are the share of the block's pixels: as if counted on 20-px cells directly
    direct = regression.cell_fractions(labels[:60, :80], 6, cell_px=20)
    np.testing.assert_allclose(agg.fractions[:3, :4], direct, atol=1e-6)
    # the pixel-weighted mean over the complete blocks is kept
    np.testing.assert_allclose(
        agg.fractions[agg.complete].mean(axis=0), fr[inside].mean(axis=0), rtol=1e-12
    )


def test_coarse_rescaled_sums_to_block_counts_and_areal_is_uniform():
    fr, census = _perfect(seed=3)
    census = census * np.random.default_rng(0).uniform(0.5, 1.5, census.shape)
    out = ev.coarse_to_fine(fr, census, 5, n_splits=5)
    agg = ev.aggregate(fr, census, 5)
    for name in ("rescaled", "cv_rescaled", "areal"):
        m = out["maps"][name]
        sums = np.bincount(agg.block.ravel(), weights=m.ravel())
        np.testing.assert_allclose(sums, agg.census.ravel(), rtol=1e-9, err_msg=name)
    a = out["maps"]["areal"]
    assert np.allclose(a[:5, :5], a[0, 0])


def test_coarse_cv_skipped_with_few_blocks():
    fr, census = _perfect(ny=10, nx=10)
    out = ev.coarse_to_fine(fr, census, 5, n_splits=5)
    assert out["report"]["blocks"] == 4 and out["report"]["cv"] is None
    assert "group" in out["report"]["cv_skipped"]
    assert out["report"]["in_sample"]["model"]["r2"] > 0.99


# --------------------------------------------------------------------------------------------
# Against a truth
# --------------------------------------------------------------------------------------------


def test_truth_scores_perfect_and_known_errors():
    rng = np.random.default_rng(4)
    truth = rng.gamma(0.5, 2.0, size=(100, 150))
    s = ev.truth_scores({"same": truth.copy(), "double": 2 * truth}, truth)
    for scale in ("20m", "100m", "1000m"):
        assert s["same"][scale]["r2"] == 1.0 and s["same"][scale]["mae"] == 0.0
    assert s["same"]["total_error"] == 0.0
    assert s["same"]["20m"]["n"] == 15000 and s["same"]["100m"]["n"] == 600
    assert s["same"]["1000m"]["n"] == 6
    assert s["double"]["total_error"] == pytest.approx(1.0)
    assert s["double"]["20m"]["mae"] == pytest.approx(truth.mean())
    assert s["double"]["20m"]["r2"] < 1.0
    # a NaN pixel in one estimate removes it from all, and its 100 m / 1 km aggregates
    est = truth.copy()
    est[0, 0] = np.nan
    s = ev.truth_scores({"a": est, "b": truth}, truth)
    assert s["a"]["20m"]["n"] == s["b"]["20m"]["n"] == 14999
    assert s["b"]["100m"]["n"] == 599 and s["b"]["1000m"]["n"] == 5
    t2 = truth.copy()
    t2[99, 149] = np.nan  # and so does a pixel of unknown truth
    s = ev.truth_scores({"a": truth}, t2)
    assert s["a"]["20m"]["n"] == 14999 and s["a"]["20m"]["r2"] == 1.0


def test_uniform_population_sums_to_census():
    census = np.array([[2500.0, 0.0], [np.nan, 10.0]])
    u = ev.uniform_population(census, 50)
    assert u.shape == (100, 100) and np.isnan(u[50:, :50]).all()
    assert u[:50, :50].sum() == pytest.approx(2500.0) and (u[:50, :50] == 1.0).all()
    assert u[50:, 50:].sum() == pytest.approx(10.0)


# --------------------------------------------------------------------------------------------
# A small finished store, and the CLI
# --------------------------------------------------------------------------------------------


def test_term_columns_fit_at_1km_and_stay_out_of_the_coarse_protocol():
    """Columns after the cluster fractions are fitted like them at 1 km; the coarse-to-fine
    protocol fits only ``coarse_columns`` (the run's context term is painted with a 1 km fit)."""
    fr, census = _perfect()
    noisy = census * np.random.default_rng(1).lognormal(0, 0.3, census.shape)
    extra = fr * (noisy / noisy.max())[..., None]  # four weighted columns, one "term"
    design = np.concatenate([fr, extra], axis=-1)
    plain, _ = ev.evaluate_cells(fr, noisy, n_splits=5, cells_per_block=5)
    both, maps = ev.evaluate_cells(
        design, noisy, n_splits=5, cells_per_block=5, n_clusters=4, coarse_columns=range(4)
    )
    assert both["clusters"] == 4 and both["terms"] == 1 and maps["densities"].shape == (8,)
    assert both["cells"] == plain["cells"]  # the valid share counts the fractions only
    assert both["fit_1km"]["in_sample"]["r2"] > plain["fit_1km"]["in_sample"]["r2"]
    flat_both, flat_plain = _flatten(both["coarse_to_fine"]), _flatten(plain["coarse_to_fine"])
    assert flat_both.keys() == flat_plain.keys() and len(flat_both) > 20
    for key, value in flat_plain.items():  # equal up to the BLAS summation order
        assert flat_both[key] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), key


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory):
    """A 10 × 10 km store (4 tiles of 5 km) written as a finished run would, and its truth."""
    import rasterio

    tmp = tmp_path_factory.mktemp("evalstore")
    grid = Grid.from_bbox((4321000, 3210000, 4331000, 3220000), tile=5000)
    ny, nx = grid.shape
    rng = np.random.default_rng(7)
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    town = np.exp(-((yy - 200) ** 2 + (xx - 300) ** 2) / (2 * 90.0**2))
    u = rng.uniform(size=(ny, nx))
    labels = np.select([u < town * 0.5, u < town, u < 0.8], [3, 2, 1], 0).astype(np.int16)
    labels[:10, :10] = -1
    fr = regression.cell_fractions(labels, 4, cell_px=grid.cell_px).astype(np.float64)
    cen = np.round(rng.poisson(fr @ DENSITIES) * rng.lognormal(0, 0.2, fr.shape[:2]))
    cen[0, 9] = np.nan
    groups = ev.block_groups(grid.cell_shape, 5).ravel()
    dens = regression.fit_densities(fr.reshape(-1, 4), cen.ravel(), groups)
    # the truth: people on pixels of the built clusters, noisy; census = its cell sums
    truth = np.where(labels >= 2, rng.gamma(2.0, 1.0, (ny, nx)), 0.0)
    census = xr.DataArray(
        cen.astype(np.float32), dims=("y_cell", "x_cell"), coords=grid.cell_coords()
    )
    path = str(tmp / "run.zarr")
    store.create(
        path, grid, bands=["B02"], kinds=["reflectance"], census=census, attrs={"config": {}}
    )
    pop = pixel_population(labels, dens, grid.cell_px)
    pred = regression.predict_cells(fr, dens).astype(np.float32)
    den = to_density(smooth(pop, 3.0), grid.resolution)
    for t in grid.tiles():
        dask.compute(
            store.write_tile(
                path,
                t,
                {
                    "cluster": (("y", "x"), labels[t.ys, t.xs]),
                    "population": (("y", "x"), pop[t.ys, t.xs]),
                    "density": (("y", "x"), den[t.ys, t.xs]),
                    "predicted": (("y_cell", "x_cell"), pred[t.ys_cell, t.xs_cell]),
                },
            )
        )
    store.save_arrays(path, "regression", {"densities": dens}, {})
    store.set_status(path, grid.tiles(), store.COMPLETE)
    store.consolidate(path)
    tif = tmp / "truth.tif"
    with rasterio.open(
        tif,
        "w",
        driver="GTiff",
        width=nx,
        height=ny,
        count=1,
        dtype="float32",
        crs="EPSG:3035",
        transform=grid.transform,
    ) as dst:
        dst.write(truth.astype(np.float32), 1)
    return {"path": path, "tif": tif, "truth": truth, "pop": pop, "dens": dens, "grid": grid}


def test_evaluate_store_reproduces_the_run_and_scores_truth(finished_store, tmp_path):
    s = finished_store
    truth = ev.load_truth(s["tif"], s["grid"].bounds, 20)
    np.testing.assert_allclose(truth, s["truth"], rtol=1e-6)
    r = ev.evaluate(s["path"], truth=truth, json_path=tmp_path / "e.json")
    assert r["cells"] == {"total": 100, "census_known": 99, "used": 99, "min_valid": 0.5}
    # same groups and fit as the run: the refitted densities are the stored ones
    assert r["stored_model"]["densities_max_abs_diff"] < 1e-9
    assert r["stored_model"]["scores"]["r2"] == pytest.approx(r["fit_1km"]["in_sample"]["r2"])
    assert r["n_splits"] == 4 and r["fit_1km"]["cv"]["n"] == 99  # only four 5 km groups
    assert r["coarse_to_fine"]["5x5"]["cv"] is None  # four 5 km blocks are not enough
    assert r["coarse_to_fine"]["2x2"]["cv"] is not None
    t = r["truth"]
    assert set(t) == {"population", "density_smoothed", "model_unrescaled", "baseline_uniform"}
    # the stored population is the unrescaled model here: identical scores
    assert t["population"]["20m"]["r2"] == pytest.approx(t["model_unrescaled"]["20m"]["r2"])
    # all estimates on the same pixels: the unknown census cell (no uniform baseline) is out
    assert t["population"]["20m"]["n"] == 247_500 and t["population"]["100m"]["n"] == 9_900
    assert t["baseline_uniform"]["1000m"]["r2"] < 1.0  # truth sums differ from the census
    assert json.loads((tmp_path / "e.json").read_text())["fit_1km"] == r["fit_1km"]
    assert t["population"]["20m"]["r2"] < 0.9  # the model is not the truth
    # when the truth is the stored population: R² 1 and MAE 0 at every scale
    r1 = ev.evaluate(s["path"], truth=s["pop"])["truth"]["population"]
    for scale in ("20m", "100m", "1000m"):
        assert r1[scale]["r2"] == 1.0 and r1[scale]["mae"] == 0.0, scale
    assert r1["total_error"] == 0.0


def test_evaluate_refuses_an_unfinished_store(tmp_path):
    grid = Grid.from_bbox((4321000, 3210000, 4323000, 3212000), tile=1000)
    census = xr.DataArray(np.ones((2, 2), np.float32), dims=("y_cell", "x_cell"))
    path = str(tmp_path / "x.zarr")
    store.create(path, grid, bands=["B02"], kinds=["reflectance"], census=census, attrs={})
    with pytest.raises(ValueError, match="not complete"):
        ev.evaluate(path)


def test_cli_writes_json_and_png(finished_store, tmp_path, capsys):
    from matplotlib.image import imread

    from popdask.cli import main

    out = tmp_path / "report"
    rc = main(
        [
            "evaluate",
            finished_store["path"],
            "--truth",
            str(finished_store["tif"]),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1 km fit, CV" in printed and "dense_core" in printed and "truth 100m" in printed
    r = json.loads((out / "evaluation.json").read_text())
    assert 0.0 < r["fit_1km"]["cv"]["r2"] <= r["fit_1km"]["in_sample"]["r2"] <= 1.0
    assert "20m" in r["truth"]["population"]
    img = imread(out / "evaluation.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 900
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not blank
    assert len(np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0)) > 100
    # the diverging residual map shows both reds and blues
    r_, g_, b_ = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    assert ((r_ > 0.6) & (b_ < 0.4) & (g_ < 0.5)).sum() > 50
    assert ((b_ > 0.6) & (r_ < 0.4)).sum() > 50


def test_a_region_larger_than_max_cells_is_scored_on_whole_tile_windows(finished_store):
    """Past ``max_cells`` the protocol runs on a mosaic of windows of whole tiles, apart by
    unknown cells: the cells scored are the windows' own, and no more than asked."""
    from popdask import evalsample

    s = finished_store
    grid = s["grid"]  # 10 × 10 cells in four tiles of 5 × 5
    windows = evalsample.choose_windows(s["path"], grid, max_cells=60, side=5)
    assert len(windows) == 2 and all(w.shape == (5, 5) for w in windows)
    assert all(w.r0 % 5 == 0 and w.c0 % 5 == 0 for w in windows)
    assert len({(w.r0, w.c0) for w in windows}) == 2
    assert evalsample.choose_windows(s["path"], grid, max_cells=60, side=5) == windows
    r = ev.evaluate(s["path"], max_cells=60, window=5)
    assert r["protocol"]["windows"] == {"whole_region": False, "count": 2, "cells": 50}
    census = np.concatenate(
        [evalsample.window_cells(s["path"], "census", w).ravel() for w in windows]
    )
    assert r["cells"]["census_known"] == np.isfinite(census).sum()
    assert r["cells"]["total"] == 5 * (5 + 5 + evalsample.GAP)  # the mosaic, gap included
    whole = ev.evaluate(s["path"])
    assert whole["protocol"]["windows"] == {"whole_region": True, "count": 1, "cells": 100}
    with pytest.raises(ValueError, match="whole region"):
        ev.evaluate(s["path"], truth=s["truth"], max_cells=60, window=5)


def test_window_design_is_the_runs_cell_fractions(finished_store):
    from popdask import evalsample

    s = finished_store
    grid = s["grid"]
    labels = np.concatenate(
        [
            np.concatenate([store.read_window(s["path"], "cluster", t.ys, t.xs) for t in row], 1)
            for row in (grid.tiles()[:2], grid.tiles()[2:])
        ]
    )
    want = regression.cell_fractions(labels, 4, cell_px=grid.cell_px)
    w = evalsample.Window(0, 10, 0, 10)
    np.testing.assert_allclose(evalsample.window_design(s["path"], grid, w, k=4), want)
    part = evalsample.Window(5, 10, 0, 5)
    np.testing.assert_allclose(
        evalsample.window_design(s["path"], grid, part, k=4), want[5:10, 0:5]
    )
    both = evalsample.mosaic([want[:5, :5], want[5:, 5:]], gap=3)
    assert both.shape == (5, 13, 4) and np.isnan(both[:, 5:8]).all()
