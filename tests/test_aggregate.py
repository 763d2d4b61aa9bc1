"""People per polygon (``popdask aggregate``), checked against pixel-polygon intersection
areas computed with shapely: every pixel's value times the area of its square inside the
polygon, on a store of 3 × 3 tiles with holes in its data and two census variables."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import xarray as xr
from distributed import Client

from popdask import aggregate, cli, store
from popdask.chunkio import ChunkArray
from popdask.grid import Grid
from popdask.zonal import clip_to_tile, polygon_sums, tile_pairs

X0, Y0 = 4321000, 3210000
GRID = Grid.from_bbox((X0, Y0, X0 + 6000, Y0 + 6000), tile=2000)  # 300 × 300 px, 3 × 3 tiles
VARIABLES = ["Y_LT15", "Y_GE65"]


# --------------------------------------------------------------------------------------
# A store with known pixels, and polygons across its tiles
# --------------------------------------------------------------------------------------
def make_store(path: str, grid: Grid, *, variables=(), seed: int = 0) -> None:
    """A finished store of random people per pixel with NaN (no data) patches, and
    ``population_by`` ``(variable, y, x)`` when ``variables`` are given."""
    census = xr.DataArray(
        np.full(grid.cell_shape, np.nan, np.float32),
        dims=("y_cell", "x_cell"),
        coords=grid.cell_coords(),
    )
    store.create(path, grid, bands=["B02"], kinds=["reflectance"], census=census, attrs={})
    rng = np.random.default_rng(seed)
    ny, nx = grid.shape
    pop = rng.gamma(0.8, 2.5, (ny, nx)).astype(np.float32)
    pop[40:90, 120:170] = np.nan  # no data across the edge of two tiles
    pop[250:, :30] = np.nan
    layers = [pop]
    if variables:
        shares = rng.uniform(0.05, 0.4, (len(variables), ny, nx)).astype(np.float32)
        by = (pop * shares).astype(np.float32)
        by[1, 200:230, 200:260] = np.nan  # a hole only in one variable
        # laid out as store.ensure_terms lays out ``terms``: (variable, y, x), a chunk per
        # tile and layer, the names as the ``variable`` coordinate
        root = store.open_group(path)
        arr = root.create_array(
            "population_by",
            shape=by.shape,
            chunks=(1, grid.tile_px, grid.tile_px),
            dtype="float32",
            fill_value=np.nan,
            compressors=[store.FAST_CODEC],
        )
        arr.attrs.update(
            {"_ARRAY_DIMENSIONS": ["variable", "y", "x"], "coordinates": "spatial_ref"}
        )
        coord = root.create_array("variable", shape=(len(variables),), dtype=str)
        coord[...] = np.array(variables, dtype=object)
        coord.attrs["_ARRAY_DIMENSIONS"] = ["variable"]
        layers += list(by)
    for tile in grid.tiles():
        store.write_arrays(path, tile, {"population": pop[tile.ys, tile.xs]})
        if variables:
            ChunkArray(path, "population_by").write(
                (slice(None), tile.ys, tile.xs), by[:, tile.ys, tile.xs]
            )
    store.set_status(path, grid.tiles(), store.COMPLETE)


def zones_3035() -> gpd.GeoDataFrame:
    """Polygons cut across tile edges and corners (EPSG:3035), with holes, a multipolygon,
    one smaller than a pixel, one half outside the grid and one outside it."""
    star = shapely.Polygon(
        [
            (X0 + 2000 + 1700 * np.cos(a) * (0.6 + 0.4 * (i % 2)), Y0 + 2000 + 1500 * np.sin(a))
            for i, a in enumerate(np.linspace(0, 2 * np.pi, 23, endpoint=False) + 0.1)
        ],
        holes=[shapely.box(X0 + 1790.3, Y0 + 1830.7, X0 + 2310.9, Y0 + 2275.1).exterior.coords],
    )
    multi = shapely.MultiPolygon(
        [
            shapely.Polygon(
                [(X0 + 3950.5, Y0 + 500.2), (X0 + 4800.1, Y0 + 700), (X0 + 4100, Y0 + 1800.9)]
            ),
            shapely.box(X0 + 600.7, Y0 + 4400.3, X0 + 1300.1, Y0 + 5100.8),
        ]
    )
    big = shapely.box(X0 - 777.7, Y0 - 333.3, X0 + 6444.4, Y0 + 6111.1).difference(
        shapely.Point(X0 + 3000, Y0 + 3000).buffer(900, 64)
    )
    geoms = [
        star,
        multi,
        shapely.box(X0 + 1003.3, Y0 + 4507.1, X0 + 1011.9, Y0 + 4515.5),  # inside one pixel
        shapely.Point(X0 + 2890.4, Y0 + 4710.6).buffer(520, 32),  # over a hole in the data
        shapely.box(X0 - 500.5, Y0 + 3100.2, X0 + 700.3, Y0 + 3900.7),  # half outside
        shapely.box(X0 - 5000, Y0, X0 - 4000, Y0 + 1000),  # outside the grid
        shapely.box(X0 + 2000, Y0 + 2000, X0 + 4000, Y0 + 4000),  # exactly the centre tile
        big,
        shapely.Point(X0 + 4600.1, Y0 + 2380.3).buffer(700, 16),  # over the variable's hole
    ]
    names = ["star", "multi", "tiny", "nodata", "edge", "outside", "tile", "big", "by-hole"]
    return gpd.GeoDataFrame(
        {"name": names, "code": np.arange(len(names)) * 10}, geometry=geoms, crs=3035
    )


def expected(layers: np.ndarray, grid: Grid, geom) -> tuple[np.ndarray, float]:
    """Independently of exactextract: each pixel's square intersected with ``geom``
    (shapely), its values weighted by the area inside; and the share of ``geom``'s area on
    pixels where the first layer has data."""
    r = grid.resolution
    xmin, _, _, ymax = grid.bounds
    ny, nx = grid.shape
    gx0, gy0, gx1, gy1 = geom.bounds
    c0, c1 = max(int((gx0 - xmin) // r), 0), min(int(np.ceil((gx1 - xmin) / r)), nx)
    r0, r1 = max(int((ymax - gy1) // r), 0), min(int(np.ceil((ymax - gy0) / r)), ny)
    if c1 <= c0 or r1 <= r0:
        return np.zeros(len(layers)), 0.0
    cols, rows = np.meshgrid(np.arange(c0, c1), np.arange(r0, r1))
    boxes = shapely.box(
        xmin + cols * r, ymax - (rows + 1) * r, xmin + (cols + 1) * r, ymax - rows * r
    )
    # squares the boundary crosses: the area of their intersection; the others are wholly
    # inside or outside, as their centre
    boundary = geom.boundary
    shapely.prepare(boundary)
    shapely.prepare(geom)
    edge = shapely.intersects(boxes, boundary)
    inside = np.where(shapely.contains(geom, shapely.centroid(boxes)), float(r * r), 0.0)
    inside[edge] = shapely.area(shapely.intersection(boxes[edge], geom))
    values = layers[:, r0:r1, c0:c1]
    sums = (np.where(np.isfinite(values), values, 0.0) * inside / r**2).sum(axis=(1, 2))
    covered = float((inside * np.isfinite(values[0])).sum() / geom.area)
    return sums, covered


def relative(a, b) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-9)


@pytest.fixture(scope="module")
def by_store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("agg") / "by.zarr")
    make_store(path, GRID, variables=VARIABLES)
    return path


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("agg") / "plain.zarr")
    make_store(path, GRID, seed=1)
    return path


@pytest.fixture(scope="module")
def client(dask_cluster):
    with Client(dask_cluster) as c:
        yield c


def stored_layers(path: str) -> np.ndarray:
    """The store's layers read back through xarray (not popdask's chunk reader)."""
    ds = store.open_store(path)
    layers = [ds["population"].values]
    if "population_by" in ds:
        layers += list(ds["population_by"].values)
    return np.asarray(layers, np.float64)


# --------------------------------------------------------------------------------------
# The kernel, pure
# --------------------------------------------------------------------------------------
def test_tile_pieces_add_up_to_pixel_areas():
    """polygon_sums on each tile's window, the polygons cut per tile as the tasks get them,
    adds up to the shapely pixel-area sums of the whole polygons."""
    rng = np.random.default_rng(5)
    ny, nx = GRID.shape
    layers = rng.gamma(1.0, 1.0, (2, ny, nx))
    layers[:, 10:30, 200:260] = np.nan
    zones = zones_3035()
    geoms = np.asarray(zones.geometry.values, dtype=object)
    tiles, groups = tile_pairs(GRID, geoms)
    assert len(tiles) == 9  # the big polygon is in every tile
    assert all(5 not in g for g in groups)  # the outside one in none
    assert [t.id for t, g in zip(tiles, groups, strict=True) if 6 in g] == ["N3212E4323"]
    got = np.zeros((len(geoms), 3))
    for tile, index in zip(tiles, groups, strict=True):
        clipped = clip_to_tile(geoms[index], tile.bounds, GRID.resolution)
        got[index] += polygon_sums(layers[:, tile.ys, tile.xs], tile.bounds, clipped)
    for i, g in enumerate(geoms):
        want, covered = expected(layers, GRID, g)
        np.testing.assert_allclose(got[i, :2], want, rtol=1e-7, atol=1e-9, err_msg=zones.name[i])
        share = got[i, 2] * GRID.resolution**2 / g.area
        assert share == pytest.approx(covered, rel=1e-7, abs=1e-12), zones.name[i]


# --------------------------------------------------------------------------------------
# aggregate on a store, through the cluster
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("crs", ["EPSG:3035", "EPSG:4326", "EPSG:32632"])
def test_aggregate_matches_pixels_inside_polygons(by_store, client, crs):
    zones = zones_3035().to_crs(crs)
    with pytest.warns(UserWarning, match=r"1 of 9 zones \(first at row 5\) have no pixel"):
        table = aggregate(by_store, zones, client=client)
    assert list(table.columns) == [
        "name",
        "code",
        "population",
        *VARIABLES,
        "covered_fraction",
        "geometry",
    ]
    assert table.crs == zones.crs and table.geometry.geom_equals_exact(zones.geometry, 0).all()
    assert list(table["name"]) == list(zones["name"])
    layers = stored_layers(by_store)
    geoms = zones.geometry.to_crs(3035)  # what aggregate sums over, reprojected the same way
    pairs = [expected(layers, GRID, g) for g in geoms]
    want, covered = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    got = table[["population", *VARIABLES]].to_numpy()
    assert relative(got, want).max() < 1e-6, relative(got, want).max(axis=1)
    np.testing.assert_allclose(table["covered_fraction"], covered, rtol=1e-6, atol=1e-9)
    row = table.set_index("name")
    assert row.loc["outside", "population"] == 0 and row.loc["outside", "covered_fraction"] == 0
    assert row.loc["edge", "covered_fraction"] == pytest.approx(700.3 / 1200.8, rel=1e-6)
    assert 0 < row.loc["nodata", "covered_fraction"] < 0.9
    assert row.loc["by-hole", "covered_fraction"] == pytest.approx(1.0, rel=1e-9)
    if crs == "EPSG:3035":  # pixel-aligned: exactly the stored pixels of the tile
        tile = layers[0][100:200, 100:200]
        assert row.loc["tile", "population"] == pytest.approx(np.nansum(tile), rel=1e-12)
        assert row.loc["tiny", "population"] == pytest.approx(
            layers[0][74, 50] * 8.6 * 8.4 / 400, rel=1e-7
        )


def test_outputs_by_extension(plain_store, client, tmp_path):
    zones = zones_3035().to_crs(4326).iloc[[0, 1, 3, 6]]
    csv, parquet, gpkg = (tmp_path / f"people.{e}" for e in ("csv", "parquet", "gpkg"))
    table = aggregate(plain_store, zones, csv, client=client)
    aggregate(plain_store, zones, parquet, client=client)
    aggregate(plain_store, zones, gpkg, client=client)
    cols = ["name", "code", "population", "covered_fraction"]
    want = pd.DataFrame(table[cols])
    pd.testing.assert_frame_equal(pd.read_csv(csv), want.reset_index(drop=True))
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), want.reset_index(drop=True))
    back = gpd.read_file(gpkg)
    assert back.crs.to_epsg() == 4326
    assert list(back.columns) == [*cols, "geometry"]
    np.testing.assert_allclose(back["population"], table["population"], rtol=1e-12)
    # the polygons as given (GeoPackage layers are of one type: polygons become multipolygons)
    assert shapely.equals(back.geometry.values, zones.geometry.values).all()
    zones.to_parquet(tmp_path / "zones.parquet")  # GeoParquet zones, and the current client
    from_parquet = aggregate(plain_store, str(tmp_path / "zones.parquet"))
    np.testing.assert_array_equal(from_parquet["population"], table["population"])
    with pytest.raises(ValueError, match=r"\.csv \(CSV\), \.parquet \(Parquet\), \.gpkg"):
        aggregate("no-such-store.zarr", zones, tmp_path / "people.xlsx", client=client)


def test_zones_errors_and_repairs(plain_store, client):
    zones = zones_3035().iloc[[0, 3]]
    bare = gpd.GeoDataFrame(zones.drop(columns="geometry"), geometry=list(zones.geometry))
    with pytest.raises(ValueError, match=r"no CRS.*crs='EPSG"):
        aggregate(plain_store, bare, client=client)
    by_crs = aggregate(plain_store, bare, crs="EPSG:3035", client=client)
    clash = zones.assign(population=1)
    with pytest.raises(ValueError, match=r"already have the output column\(s\) \['population'\]"):
        aggregate(plain_store, clash, client=client)
    kept = aggregate(plain_store, clash, columns=["code"], client=client)
    assert list(kept.columns) == ["code", "population", "covered_fraction", "geometry"]
    np.testing.assert_array_equal(kept["population"], by_crs["population"])
    points = gpd.GeoDataFrame({"a": [1]}, geometry=[shapely.Point(X0 + 10, Y0 + 10)], crs=3035)
    with pytest.raises(ValueError, match=r"1 zones are not polygons.*Point"):
        aggregate(plain_store, points, client=client)
    bowtie = shapely.Polygon(
        [(X0 + 100, Y0 + 100), (X0 + 900, Y0 + 900), (X0 + 900, Y0 + 100), (X0 + 100, Y0 + 900)]
    )
    twisted = gpd.GeoDataFrame({"a": [1]}, geometry=[bowtie], crs=3035)
    with pytest.warns(UserWarning, match="1 zones have invalid polygons"):
        fixed = aggregate(plain_store, twisted, client=client)
    want, _ = expected(stored_layers(plain_store), GRID, shapely.make_valid(bowtie))
    assert fixed["population"].iloc[0] == pytest.approx(want[0], rel=1e-9)
    assert want[0] > 0


def test_cli_aggregate_and_unfinished_tiles(plain_store, client, tmp_path, capsys):
    zones = zones_3035().to_crs(32632)
    path = tmp_path / "zones.gpkg"
    zones.to_file(path, layer="municipalities", engine="pyogrio")
    out = tmp_path / "people.csv"
    argv = ["aggregate", plain_store, str(path), str(out), "--scheduler", client.scheduler.address]
    with pytest.warns(UserWarning, match="have no pixel with data"):
        assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "9 zones" in printed and str(out) in printed
    table = pd.read_csv(out)
    assert list(table.columns) == ["name", "code", "population", "covered_fraction"]
    layers = stored_layers(plain_store)
    want = [expected(layers, GRID, g)[0][0] for g in zones.geometry.to_crs(3035)]
    assert relative(table["population"], want).max() < 1e-6
    # a tile not finished: its pixels read as no data, and the user is told
    tile = GRID.tiles()[4]
    store.set_status(plain_store, [tile], store.LABELLED)
    try:
        with pytest.warns(UserWarning, match=r"1 of the 1 tiles under the zones are not complete"):
            aggregate(plain_store, zones_3035().iloc[[6]], client=client)
    finally:
        store.set_status(plain_store, [tile], store.COMPLETE)


def test_aggregate_on_the_demo_store(clean_run, client):
    """On the store of a real run (the session's demo, 6 km in four 3 km tiles): polygons
    across its tile edges, given in EPSG:4326."""
    path = str(clean_run.parent / "out.zarr")
    grid = Grid.from_bbox((X0, Y0, X0 + 6000, Y0 + 6000), tile=3000)
    zones = zones_3035().iloc[[0, 1, 3, 4, 7]].to_crs(4326)
    table = aggregate(path, zones, client=client)
    layers = stored_layers(path)
    want = [expected(layers, grid, g)[0][0] for g in zones.geometry.to_crs(3035)]
    assert relative(table["population"], want).max() < 1e-6
    assert table["population"].sum() > 1000
