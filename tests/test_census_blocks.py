"""The census streamed into blocks: a batch of rows and a block of cells at a time, with the
same result as classifying the whole table on the whole region at once."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from popdask import census_blocks, store
from popdask.census import CensusError, classify_cells, coverage_from_shapes
from popdask.census_blocks import Block, blocks, stage, stage_from_config
from popdask.config import CensusConfig
from popdask.grid import Grid, cell_id


@pytest.fixture
def grid():
    """23 x 14 cells of 1 km in tiles of 1 km: blocks of 10 x 10 cells, 3 x 2 of them, the
    last column and row cut short."""
    return Grid.from_bbox((4300000, 3200000, 4323000, 3214000), tile=1000)


@pytest.fixture
def rows(grid):
    """A GISCO-like table in random order: values, empty and negative ones, flagged rows, a
    cell listed twice, rows outside the region."""
    rng = np.random.default_rng(3)
    xmin, ymin, xmax, ymax = grid.bounds
    xs = rng.integers(xmin // 1000 - 2, xmax // 1000 + 2, 300) * 1000
    ys = rng.integers(ymin // 1000 - 2, ymax // 1000 + 2, 300) * 1000
    values = rng.gamma(1.0, 300.0, 300).round()
    values[::17] = np.nan
    values[5::23] = -9999
    flag = np.zeros(300, int)
    flag[7::19] = 1
    return pd.DataFrame(
        {
            "GRD_ID": [cell_id(x, y) for x, y in zip(xs, ys, strict=True)],
            "T": values,
            "CONFIDENTIALSTATUS": flag,
            "x": xs,
            "y": ys,
        }
    )


def whole(rows, grid, **kw):
    """The reference: the pure classification of the whole table on the whole region."""
    flagged = rows["CONFIDENTIALSTATUS"].to_numpy() != 0
    return classify_cells(rows.x, rows.y, rows["T"], grid, flagged=flagged, **kw)


def test_blocks_tile_the_region(grid):
    bs = blocks(grid)
    assert len(bs) == 6
    assert [b.shape for b in bs] == [(10, 10), (10, 10), (10, 3), (4, 10), (4, 10), (4, 3)]
    seen = np.zeros(grid.cell_shape, int)
    for b in bs:
        seen[b.ys, b.xs] += 1
        # the block's own grid is the window of the region's cells it covers
        assert b.grid.cell_shape == b.shape
        np.testing.assert_array_equal(
            b.grid.cell_coords()["x_cell"], grid.cell_coords()["x_cell"][b.xs]
        )
    assert (seen == 1).all()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "gpkg"])
def test_staged_census_equals_the_whole_table_classified_at_once(tmp_path, grid, rows, fmt):
    from test_census import write_gpkg

    path = tmp_path / f"census.{fmt}"
    table = rows.drop(columns=["x", "y"])
    if fmt == "csv":
        table.to_csv(path, index=False)
    elif fmt == "parquet":
        table.to_parquet(path)
    else:
        write_gpkg(path, table.assign(X_LLC=0, Y_LLC=0), srs=3035)
    want, state = whole(rows, grid)
    with stage(path, grid, column="T", batch_rows=7) as staged:  # 43 batches
        got = staged.to_dataarray()
        assert staged.finite_cells == int(np.isfinite(want).sum())
        # signed block after block (the region's raster is never whole on the client)
        sha = hashlib.sha256()
        for b in blocks(grid):
            sha.update(np.ascontiguousarray(want[b.ys, b.xs], np.float32).tobytes())
        assert staged.sha256 == sha.hexdigest()
        folder = staged.folder
        assert not list(folder.glob("*.rows"))  # the spilled rows are gone once classified
    np.testing.assert_array_equal(got.values, want)
    assert got.attrs["cells_known"] == int((state == 0).sum()) > 50
    assert got.attrs["cells_absent_zero"] == int((state == 1).sum())
    assert got.attrs["flag_column"] == "CONFIDENTIALSTATUS"
    assert not folder.exists()  # the scratch folder goes with the context


def test_the_signature_follows_the_values_not_the_file(tmp_path, grid, rows):
    a, b = tmp_path / "a.csv", tmp_path / "b.parquet"
    rows.drop(columns=["x", "y"]).to_csv(a, index=False)
    # another format, another row order (no cell is listed twice in what is kept)
    once = rows.drop_duplicates("GRD_ID", keep=False)
    once.drop(columns=["x", "y"]).to_csv(a, index=False)
    once.drop(columns=["x", "y"]).sample(frac=1, random_state=1).to_parquet(b)
    with stage(a, grid, column="T", batch_rows=11) as sa, stage(b, grid, column="T") as sb:
        assert sa.sha256 == sb.sha256
    changed = once.assign(T=once["T"].where(once.index != once["T"].idxmax(), 1.0))
    changed.drop(columns=["x", "y"]).to_csv(a, index=False)
    with stage(a, grid, column="T") as sc:
        assert sc.sha256 != sb.sha256


def test_coverage_is_read_per_block(tmp_path, grid, rows):
    """Polygons crossing blocks, and one far away: the blocks' windows of the coverage make
    the same census as the whole region's coverage."""
    x0, _, _, y1 = grid.bounds
    triangle = [[x0, y1], [x0 + 15500, y1], [x0, y1 - 12500], [x0, y1]]
    shapes = [
        {"type": "Polygon", "coordinates": [triangle]},
        {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]},
    ]
    doc = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "EPSG:3035"}},
        "features": [{"type": "Feature", "properties": {}, "geometry": g} for g in shapes],
    }
    cov = tmp_path / "cov.geojson"
    cov.write_text(json.dumps(doc))
    path = tmp_path / "census.csv"
    rows.drop(columns=["x", "y"]).to_csv(path, index=False)
    covered = coverage_from_shapes(shapes, grid)
    want, _ = whole(rows, grid, covered=covered)
    cfg = CensusConfig(path=str(path), column="T", coverage=str(cov))
    with stage_from_config(cfg, grid) as staged:
        got = staged.to_dataarray()
        assert staged.attrs["cells_covered"] == int(covered.sum())
    np.testing.assert_array_equal(got.values, want)
    assert np.isnan(got.values[~covered]).sum() > 100 and got.attrs["coverage"] == "cov.geojson"


def test_no_known_cell_is_an_error_before_anything_is_written(tmp_path, grid, rows):
    far = rows.assign(GRD_ID=[cell_id(100000 + 1000 * i, 100000) for i in range(len(rows))])
    path = tmp_path / "far.csv"
    far.drop(columns=["x", "y"]).to_csv(path, index=False)
    with pytest.raises(CensusError, match="no known T value inside the region"):
        with stage(path, grid, column="T"):
            pass


def test_store_census_written_block_by_block_and_after_an_interruption(
    tmp_path, grid, rows, monkeypatch
):
    path = tmp_path / "census.csv"
    rows.drop(columns=["x", "y"]).to_csv(path, index=False)
    want, _ = whole(rows, grid)
    out = str(tmp_path / "s.zarr")
    kw = dict(bands=["B02"], kinds=["reflectance"], attrs={})
    written: list[int] = []
    real = census_blocks.Staged.block

    def failing(self, b: Block):
        if len(written) == 2:
            raise OSError("connection reset")  # the client dies during the census write
        written.append(b.index)
        return real(self, b)

    with stage(path, grid, column="T") as staged:
        monkeypatch.setattr(census_blocks.Staged, "block", failing)
        with pytest.raises(OSError, match="connection reset"):
            store.create(out, grid, census=staged, **kw)
        attrs = store.root_attrs(out)["popdask"]
        assert attrs[store.CENSUS_WRITTEN] is False
        monkeypatch.setattr(census_blocks.Staged, "block", real)
        assert not store.create(out, grid, census=staged, **kw)  # resumed: written again
    assert store.root_attrs(out)["popdask"][store.CENSUS_WRITTEN] is True
    np.testing.assert_array_equal(store.read_census(out), want)
    arr = store.open_array(out, "census", mode="r")
    assert arr.chunks == (10, 10)


def test_the_fit_never_reads_the_region_census_on_the_client(tmp_path, grid, rows):
    """How many cells the fit may sample comes from the count run() records at creation;
    a store without it is refused rather than its whole census read on the client."""
    from popdask.config import config_from_dict
    from popdask.pipeline import PipelineError, cell_pick

    path = tmp_path / "census.csv"
    rows.drop(columns=["x", "y"]).to_csv(path, index=False)
    out = str(tmp_path / "s.zarr")
    cfg = config_from_dict(
        {
            "region": {"bbox": list(grid.bounds)},
            "grid": {"tile": 1000},
            "stac": {"url": "http://127.0.0.1:1"},
            "sources": {"sentinel2": {"collection": "s2", "datetime": "2021", "assets": ["B04"]}},
            "census": {"path": str(path), "column": "T"},
            "output": {"path": out},
            "regression": {"fit_cells": 100},
        }
    )
    with stage(path, grid, column="T") as staged:
        store.create(out, grid, bands=["B02"], kinds=["reflectance"], census=staged, attrs={})
        known = staged.finite_cells
    with pytest.raises(PipelineError, match="census_known_cells"):
        cell_pick(cfg, grid)
    store.update_attrs(out, {"census_known_cells": known})
    assert cell_pick(cfg, grid).share == pytest.approx(100 / known)
