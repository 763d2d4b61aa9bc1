"""End to end: a hand-written config → `popdask run` → real STAC API → dask cluster → Zarr.

The configuration below is what a user would write for any STAC API: the URL, the
collection names and asset keys are given explicitly; nothing tells popdask it is a demo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from popdask import catalog, cli, store
from popdask.config import load_config
from popdask.model import PixelModel
from popdask.pipeline import PipelineError, active_terms, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished(clean_run):
    """The config path of a finished `popdask run my.yaml` (see conftest.clean_run)."""
    return clean_run


def test_store_follows_the_contract(finished):
    ds = xr.open_zarr(finished.parent / "out.zarr")
    assert ds.sizes == {
        "y": 300,
        "x": 300,
        "y_cell": 6,
        "x_cell": 6,
        "band": 14,
        "tile_row": 2,
        "tile_col": 2,
        "term": 2,
        "count": len(store.COUNT_NAMES),
    }
    for v, dims, dtype in [
        ("population", ("y", "x"), np.float32),
        ("density", ("y", "x"), np.float32),
        ("cluster", ("y", "x"), np.int16),
        ("composite", ("band", "y", "x"), np.float32),
        ("census", ("y_cell", "x_cell"), np.float32),
        ("predicted", ("y_cell", "x_cell"), np.float32),
        ("terms", ("term", "y", "x"), np.float32),
    ]:
        assert ds[v].dims == dims and ds[v].dtype == dtype, v
        assert ds[v].rio.crs.to_epsg() == 3035, v
    assert list(ds.band.values[-3:]) == ["vv", "vh", "avg_rad"]
    assert ds.terms.attrs["terms"] == ["intensity", "context"]
    assert np.isfinite(ds.terms.values).all() and (ds.terms.values >= 0).all()
    assert ds.y.values[0] == 3216000 - 10 and ds.x.values[0] == 4321000 + 10
    counts = store.tile_counts(str(finished.parent / "out.zarr"))
    assert (counts["items_used"] == ds.tile_scenes.values).all()
    assert (counts["items_found"] >= counts["items_used"]).all()
    assert (counts["reads_filled"] == 0).all() and (counts["offsets_corrected"] == 0).all()
    assert (counts["valid_permille"] > 900).all()
    for t in load_config(finished).make_grid().tiles():  # each tile's own items, recorded
        rec = catalog.load_tile_items(str(finished.parent / "out.zarr"), "sentinel2", t.id)
        assert rec.kept > 0 and ds.tile_scenes.sel(tile_row=t.row, tile_col=t.col) == rec.kept
    assert ds.attrs["config"]["model"]["clusters"] == 20
    assert {"r2_1km_in_sample", "r2_1km_cv", "mae_1km_cv"} <= set(ds.attrs["metrics"])
    assert (ds.tile_status.values == store.COMPLETE).all()
    lab = ds.cluster.values
    assert lab.min() >= -1 and lab.max() < 20 and (lab >= 0).mean() > 0.95


def test_population_sums_to_census_and_metrics(finished):
    ds = xr.open_zarr(finished.parent / "out.zarr")
    pop = ds.population.values.astype(np.float64)
    assert (pop >= 0).all()
    cells = pop.reshape(6, 50, 6, 50).sum(axis=(1, 3))
    census = ds.census.values
    known = np.isfinite(census)
    np.testing.assert_allclose(cells[known], census[known], rtol=1e-4, atol=1e-3)
    assert np.isfinite(ds.predicted.values).all() and (ds.predicted.values >= 0).all()
    # density is smoothed persons per km²: same people, spread out
    dens = ds.density.values.astype(np.float64)
    assert dens.sum() * 0.0004 == pytest.approx(pop.sum(), rel=0.02)
    assert dens.std() < (pop * 2500).std()
    metrics = json.loads((finished.parent / "metrics.json").read_text())
    # 36 cells of a 6 km region: a plumbing check; the demo test checks accuracy
    assert metrics["r2_1km_in_sample"] > 0.5
    assert abs(metrics["total_error_known_cells"]) < 1e-4
    assert (finished.parent / "quicklook.png").stat().st_size > 10_000


def test_terms_are_kept_only_when_they_help_and_stay_additive(finished):
    """The covariate terms pass the grouped CV or are dropped; a cell's pixels sum to the
    design matrix times the densities either way (the model is additive over pixels)."""
    path = str(finished.parent / "out.zarr")
    arrays, attrs = store.load_arrays(path, "regression")
    k = attrs["n_clusters"]
    assert k == 20
    names = attrs["terms"]
    assert set(names) <= {"intensity", "context"}
    assert arrays["densities"].shape == ((1 + len(names)) * k,)
    assert (arrays["densities"] >= 0).all()
    cells = arrays["cells"]  # the design's rows: every known cell of a region this small
    known = np.flatnonzero(np.isfinite(xr.open_zarr(path).census.values.ravel()))
    np.testing.assert_array_equal(cells, known)
    assert attrs["cell_share"] == 1.0
    assert arrays["design"].shape == (len(known), (1 + len(names)) * k)
    metrics = json.loads((finished.parent / "metrics.json").read_text())
    assert metrics["terms"] == names
    if names:  # kept: not worse out of fold than the fractions alone
        assert metrics["mae_1km_cv"] <= metrics["mae_1km_cv_without_terms"]
    else:
        assert metrics["mae_1km_cv"] == attrs["cv_without_terms"]["mae"]
    ds = xr.open_zarr(path)
    predicted = ds.predicted.values.astype(np.float64).ravel()[cells]
    np.testing.assert_allclose(
        predicted, arrays["design"].astype(np.float64) @ arrays["densities"], rtol=1e-4, atol=1e-3
    )


def test_model_is_plain_arrays_and_reproduces_labels(finished):
    path = str(finished.parent / "out.zarr")
    arrays, attrs = store.load_arrays(path, "model")
    assert all(a.dtype.kind == "f" for a in arrays.values())
    # the fit read the sample the composite tasks drew, not the composites again
    sample = store.read_sample(path, {"sample_pixels": 40000, "seed": 0})
    assert sample is not None and len(sample) == attrs["sample_pixels"] >= 39_000
    assert sample.shape[1] == 14 and np.isfinite(sample[:, :11]).all()  # every reflectance
    model = PixelModel.from_arrays(arrays, attrs)
    ds = xr.open_zarr(path)
    comp = ds.composite.values[:, :150, :150]
    np.testing.assert_array_equal(model.labels(comp), ds.cluster.values[:150, :150])


def test_rerun_resumes_without_recomputing(finished, dask_cluster, capsys):
    from distributed import Client

    cfg = load_config(finished)
    before = xr.open_zarr(cfg.output.path).population.values
    with Client(dask_cluster) as client:
        result = run(cfg, client=client, progress=False)
    assert result.computed_tiles == {"composite": [], "label": [], "predict": []}
    np.testing.assert_array_equal(xr.open_zarr(cfg.output.path).population.values, before)
    assert cli.main(["status", cfg.output.path]) == 0
    assert "4 complete" in capsys.readouterr().out


def test_bad_config_is_one_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("region: {bbox: [0, 0, 1000, 1000]}\nsources: {}\n")
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sources.sentinel2: Field required" in err and "census: Field required" in err


def test_fit_without_a_stored_sample_draws_the_same_one(finished, dask_cluster, tmp_path):
    """A store composited before the composite tasks drew the sample (or with other sample
    settings) is sampled from its stored composites: the same pixels, the same model."""
    import shutil

    import zarr
    from distributed import Client

    from popdask.pipeline import fit_pass

    cfg = load_config(finished, overrides=[f"output.path={tmp_path / 'copy.zarr'}"])
    shutil.copytree(load_config(finished).output.path, cfg.output.path)
    root = zarr.open_group(cfg.output.path, mode="r+")
    stored = PixelModel.from_arrays(*store.load_arrays(cfg.output.path, "model"))
    del root["model"], root["sample"]
    with Client(dask_cluster) as client:
        model = fit_pass(client, cfg, cfg.make_grid())
    np.testing.assert_allclose(model.centroids, stored.centroids, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.components, stored.components, rtol=1e-5, atol=1e-6)
    refit = store.load_arrays(cfg.output.path, "model")[1]
    first = store.load_arrays(load_config(finished).output.path, "model")[1]
    assert refit["sample_pixels"] == first["sample_pixels"]


def test_density_fit_from_stored_labels_matches_the_label_pass(finished, dask_cluster, tmp_path):
    """A resumed run's tiles labelled earlier give their cells' fractions from the store:
    the fit is the one the label pass's own results gave."""
    import shutil

    from distributed import Client

    from popdask.pipeline import density_fit

    cfg = load_config(finished, overrides=[f"output.path={tmp_path / 'copy.zarr'}"])
    shutil.copytree(load_config(finished).output.path, cfg.output.path)
    first, attrs = store.load_arrays(cfg.output.path, "regression")
    model = PixelModel.from_arrays(*store.load_arrays(cfg.output.path, "model"))
    with Client(dask_cluster) as client:
        fit = density_fit(client, cfg, cfg.make_grid(), model, cells={})
    assert fit["terms"] == attrs["terms"]
    again = store.load_arrays(cfg.output.path, "regression")[0]
    np.testing.assert_allclose(again["design"], first["design"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fit["densities"], first["densities"], rtol=1e-6, atol=1e-6)


def test_label_task_and_stored_labels_give_the_same_cells(finished, tmp_path):
    """What the label task returns (the picked cells' fractions and intensity-weighted
    fractions, from the composite in memory) is what a resumed run reads back for a tile
    labelled earlier; a share below 1 picks fewer of the same cells in both."""
    import shutil

    from popdask.tasks import CellPick, label_tile, stored_cells

    cfg = load_config(finished, overrides=[f"output.path={tmp_path / 'copy.zarr'}"])
    shutil.copytree(load_config(finished).output.path, cfg.output.path)
    model = PixelModel.from_arrays(*store.load_arrays(cfg.output.path, "model"))
    grid, path, k = cfg.make_grid(), cfg.output.path, model.n_clusters
    store.ensure_terms(path, ["context", "intensity"])  # intensity is layer 1
    kinds = list(model.kinds)
    census = store.read_census(path)
    every, half = CellPick(1.0, 0, grid.cell_shape[1]), CellPick(0.5, 0, grid.cell_shape[1])
    picked = 0
    for t in grid.tiles():
        rows = label_tile(path, {}, t, model, 1, grid.cell_px, every)
        written = store.read_window(path, store.TERMS, t.ys, t.xs)
        again = stored_cells(path, {}, t, kinds, k, 1, grid.cell_px, every)
        np.testing.assert_array_equal(rows.index, again.index)
        for name in ("fractions", "intensity"):
            np.testing.assert_array_equal(rows.columns[name], again.columns[name])
        top = rows.tops["intensity"]
        assert top == again.tops["intensity"] > 0
        own = census[t.ys_cell, t.xs_cell]
        assert len(rows) == np.isfinite(own).sum()  # every known cell of the tile, only those
        np.testing.assert_array_equal(rows.census, own[np.isfinite(own)])
        fr, wint = rows.columns["fractions"], rows.columns["intensity"]
        assert fr.shape == wint.shape == (len(rows), k)
        assert (wint <= fr + 1e-6).all()  # intensity ≤ 1: weighted ≤ plain fraction
        assert np.isnan(written[0]).all()  # the context layer is not the label pass's
        assert np.nanmax(written[1]) == top and (written[1] >= 0).all()
        assert (
            "intensity"
            not in stored_cells(path, {}, t, kinds, k, None, grid.cell_px, every).columns
        )
        some = stored_cells(path, {}, t, kinds, k, 1, grid.cell_px, half)
        assert set(some.index) <= set(rows.index)
        picked += len(some)
    assert 0.25 * np.isfinite(census).sum() < picked < 0.75 * np.isfinite(census).sum()


def test_predict_pass_settles_after_its_tiles_and_a_failed_save_is_raised(
    finished, dask_cluster, tmp_path
):
    """`run` writes the fit while the workers predict: the pass calls ``settle`` once, when
    every tile is written and marked, and what ``settle`` raises reaches the caller."""
    import shutil

    from distributed import Client

    from popdask.pipeline import density_fit, predict_pass

    cfg = load_config(finished, overrides=[f"output.path={tmp_path / 'copy.zarr'}"])
    shutil.copytree(load_config(finished).output.path, cfg.output.path)
    grid = cfg.make_grid()
    model = PixelModel.from_arrays(*store.load_arrays(cfg.output.path, "model"))
    seen = []

    def settle():
        seen.append(store.tile_status(cfg.output.path).copy())

    with Client(dask_cluster) as client:
        fit = density_fit(client, cfg, grid, model, cells={}, save=False)
        store.set_status(cfg.output.path, grid.tiles(), store.LABELLED)
        done, totals = predict_pass(client, cfg, grid, fit, progress=False, settle=settle)
        assert len(done) == len(grid.tiles()) and len(seen) == 1
        ds = xr.open_zarr(cfg.output.path)
        assert totals.population == pytest.approx(float(ds.population.sum()), rel=1e-5)
        assert totals.cells_known == int(np.isfinite(ds.census.values).sum())
        assert (seen[0] == store.COMPLETE).all()

        def broken():
            raise OSError("disk full")

        store.set_status(cfg.output.path, grid.tiles()[:1], store.LABELLED)
        with pytest.raises(OSError, match="disk full"):
            predict_pass(client, cfg, grid, fit, progress=False, settle=broken)
    assert (store.tile_status(cfg.output.path) == store.COMPLETE).all()


def test_more_tiles_than_the_window_run_through_every_pass(finished, dask_cluster, tmp_path):
    """3 × 3 tiles of 2 km on 2 worker threads (a window of 4 tiles): every pass runs
    every tile, and the totals summed per tile are the store's."""
    from distributed import Client

    out = tmp_path / "nine.zarr"
    cfg = load_config(finished, overrides=["grid.tile=2000", f"output.path={out}"])
    grid = cfg.make_grid()
    assert grid.tile_shape == (3, 3)
    with Client(dask_cluster) as client:
        result = run(cfg, client=client, progress=False, report_dir=tmp_path)
    ids = sorted(t.id for t in grid.tiles())
    for name in ("composite", "label", "predict"):
        assert sorted(result.computed_tiles[name]) == ids, name
    ds = xr.open_zarr(out)
    assert (ds.tile_status.values == store.COMPLETE).all()
    pop = ds.population.values.astype(np.float64)
    census = ds.census.values.astype(np.float64)
    known = np.isfinite(census)
    cells = pop.reshape(6, 50, 6, 50).sum(axis=(1, 3))
    np.testing.assert_allclose(cells[known], census[known], rtol=1e-4, atol=1e-3)
    m = result.metrics
    assert m["population_total"] == pytest.approx(pop.sum(), rel=1e-6)
    assert m["census_total_known"] == pytest.approx(census[known].sum(), rel=1e-6)
    assert m["cells_used"] <= known.sum() and "r2_1km_cv" in m


def test_a_tile_without_a_usable_scene_is_recorded_and_gets_the_census(
    demo_region, dask_cluster, tmp_path, caplog, capsys
):
    """Sentinel-2 items whose footprints cover only the region's western tiles: the eastern
    tiles are recorded with 0 scenes (not as done with NaNs), named in a warning and by
    ``popdask status``, and their people are their cells' census spread evenly."""
    import logging

    from conftest import write_config
    from distributed import Client
    from pyproj import Transformer

    from popdask.stac_server import StacServer

    west = Transformer.from_crs(3035, 4326, always_xy=True).transform_bounds(
        4321000, 3210000, 4323000, 3216000
    )
    ring = [[west[0], west[1]], [west[2], west[1]], [west[2], west[3]], [west[0], west[3]]]
    items = []
    for line in demo_region.items["sentinel-2-l2a"].read_text().splitlines():
        it = json.loads(line)
        it["bbox"], it["geometry"] = (
            list(west),
            {"type": "Polygon", "coordinates": [ring + ring[:1]]},
        )
        items.append(json.dumps(it))
    s2 = tmp_path / "s2-west.ndjson"
    s2.write_text("\n".join(items) + "\n")
    served = {**demo_region.items, "sentinel-2-l2a": s2}
    with StacServer(
        list(demo_region.collections.values()), list(served.values()), cwd=demo_region.root
    ) as api:
        cfg_path = write_config(
            tmp_path, url=api.url, census=demo_region.census, address=dask_cluster
        )
        cfg = load_config(cfg_path)
        with Client(dask_cluster) as client, caplog.at_level(logging.WARNING, "popdask"):
            run(cfg, client=client, progress=False, report_dir=tmp_path)
    grid = cfg.make_grid()
    ds = xr.open_zarr(cfg.output.path)
    east = [t for t in grid.tiles() if t.bounds[0] >= 4324000]
    assert east and len(east) < len(grid.tiles())
    for t in grid.tiles():
        n = int(ds.tile_scenes.values[t.row, t.col])
        assert (n == 0) == (t in east), (t.id, n)
        assert (t.id in caplog.text) == (t in east)
    assert (ds.tile_status.values == store.COMPLETE).all()
    for t in east:
        assert np.isnan(ds.composite.values[:, t.ys, t.xs]).all()
        assert (ds.cluster.values[t.ys, t.xs] == -1).all()
        pop = ds.population.values[t.ys, t.xs].astype(np.float64)
        census = ds.census.values[t.ys_cell, t.xs_cell].astype(np.float64)
        cells = pop.reshape(census.shape[0], 50, census.shape[1], 50)
        known = np.isfinite(census)
        np.testing.assert_allclose(cells.sum(axis=(1, 3))[known], census[known], rtol=1e-5)
        spread = cells.max(axis=(1, 3)) - cells.min(axis=(1, 3))
        assert (spread[known] < 1e-5).all()  # evenly over each cell's pixels
    assert cli.main(["status", cfg.output.path]) == 0
    out = capsys.readouterr().out
    assert f"{len(east)} tiles without a usable scene" in out
    assert all(t.id in out for t in east)
    assert "valid pixels per composited tile: min 0.0 %" in out


def test_the_terms_cross_validation_never_sees_its_held_out_cells(finished, dask_cluster, tmp_path):
    """The context term paints a pilot fit's densities; each fold of the cross-validation
    that decides whether the terms are kept gets its context from the pilot fitted without
    that fold. So changing the census of one fold's held-out cells changes no out-of-fold
    count of that fold (and does change the other folds', which train on them)."""
    import shutil

    import zarr
    from distributed import Client

    from popdask.pipeline import density_fit

    cfg = load_config(finished, overrides=[f"output.path={tmp_path / 'copy.zarr'}"])
    shutil.copytree(load_config(finished).output.path, cfg.output.path)
    grid, path = cfg.make_grid(), cfg.output.path
    model = PixelModel.from_arrays(*store.load_arrays(path, "model"))
    with Client(dask_cluster) as client:
        first = density_fit(client, cfg, grid, model, cells={}, save=False)
        oof = first["out_of_fold"]
        assert oof["terms"] is not None and "context" in active_terms(cfg, model.kinds)
        held = oof["fold"] == 0
        assert 0 < held.sum() < len(held)
        census = zarr.open_array(f"{path}/census", mode="r+")
        values = census[...]
        values.ravel()[first["group"]["arrays"]["cells"][held]] *= 3.0
        census[...] = values
        second = density_fit(client, cfg, grid, model, cells={}, save=False)
    again = second["out_of_fold"]
    np.testing.assert_array_equal(again["fold"], oof["fold"])
    np.testing.assert_allclose(again["terms"][held], oof["terms"][held], rtol=1e-9)
    np.testing.assert_allclose(again["plain"][held], oof["plain"][held], rtol=1e-9)
    assert not np.allclose(again["terms"][~held], oof["terms"][~held], rtol=1e-3)


def test_a_rerun_with_another_configuration_is_refused(finished, dask_cluster, tmp_path):
    """The store records what determines its content; a rerun that differs (here the number
    of clusters, or one census count) is refused with the keys named, before anything
    runs, while settings that change nothing written (the cluster, the output) resume."""
    import shutil

    from distributed import Client

    copy = tmp_path / "copy.zarr"
    shutil.copytree(load_config(finished).output.path, copy)
    before = store.tile_status(str(copy)).copy()
    with Client(dask_cluster) as client:
        cfg = load_config(finished, overrides=[f"output.path={copy}", "model.clusters=25"])
        with pytest.raises(store.StoreError, match=r"model\.clusters: 20 -> 25.*new output\.path"):
            run(cfg, client=client, progress=False, report_dir=tmp_path)
        census = tmp_path / "census.csv"
        rows = [r.split(",") for r in Path(load_config(finished).census.path).read_text().split()]
        i = next(i for i, r in enumerate(rows) if i and r[1] and r[2] in ("", "0"))  # a known one
        rows[i][1] = str(int(float(rows[i][1])) + 7)
        census.write_text("\n".join(",".join(r) for r in rows) + "\n")
        cfg = load_config(finished, overrides=[f"output.path={copy}", f"census.path={census}"])
        with pytest.raises(store.StoreError, match="census_sha256"):
            run(cfg, client=client, progress=False, report_dir=tmp_path)
        cfg = load_config(finished, overrides=[f"output.path={copy}", "cluster.tiles_per_thread=3"])
        result = run(cfg, client=client, progress=False, report_dir=tmp_path)
    assert result.computed_tiles == {"composite": [], "label": [], "predict": []}
    np.testing.assert_array_equal(store.tile_status(str(copy)), before)


def test_a_run_with_no_usable_scene_anywhere_fails_in_one_line(finished, dask_cluster, tmp_path):
    """Every Sentinel-2 item filtered out (the months asked for have none): the composite
    pass records each tile without a scene, then the run stops before fitting on nothing."""
    from distributed import Client

    out = tmp_path / "none.zarr"
    cfg = load_config(finished, overrides=[f"output.path={out}", "sources.sentinel2.months=[1]"])
    with Client(dask_cluster) as client, pytest.raises(PipelineError) as e:
        run(cfg, client=client, progress=False, report_dir=tmp_path)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "sources.sentinel2: no tile of the region has a usable scene" in msg
    assert "months" in msg and "found" in msg
    assert (store.tile_scenes(str(out)) == 0).all()
    assert not (out / "model").exists()  # nothing fitted


def test_a_failed_label_keeps_its_composite_and_a_rerun_resumes_from_the_label(
    finished, dask_cluster, tmp_path, capsys
):
    """A tile whose label task fails is marked failed *in the label pass*: its composite
    stays done, and the next run labels it without searching or reading the catalog."""
    import shutil

    from distributed import Client

    copy = tmp_path / "copy.zarr"
    shutil.copytree(load_config(finished).output.path, copy)
    cfg = load_config(finished, overrides=[f"output.path={copy}"])
    grid = cfg.make_grid()
    store.set_status(str(copy), grid.tiles(), store.COMPOSITED)  # label and predict again
    bad = grid.tiles()[0]
    chunk = copy / "composite" / f"0.{bad.row}.{bad.col}"
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a blosc chunk" * 10)
    with Client(dask_cluster) as client:
        with pytest.raises(PipelineError, match="label pass"):
            run(cfg, client=client, progress=False, report_dir=tmp_path)
        status = store.tile_status(str(copy))
        assert status[bad.row, bad.col] == store.failed_code(store.LABELLED) == -2
        others = [t for t in grid.tiles() if t.id != bad.id]
        assert all(status[t.row, t.col] == store.LABELLED for t in others)
        assert cli.main(["status", str(copy)]) == 3
        assert "1 failed label" in capsys.readouterr().out
        chunk.write_bytes(good)
        result = run(cfg, client=client, progress=False, report_dir=tmp_path)
    assert result.computed_tiles["composite"] == []
    assert result.computed_tiles["label"] == [bad.id]
    assert sorted(result.computed_tiles["predict"]) == sorted(t.id for t in grid.tiles())
    assert (store.tile_status(str(copy)) == store.COMPLETE).all()
    clean = xr.open_zarr(load_config(finished).output.path)
    np.testing.assert_allclose(
        xr.open_zarr(copy).population.values, clean.population.values, rtol=1e-5, atol=1e-6
    )
