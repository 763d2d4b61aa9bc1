import sqlite3

import numpy as np
import pandas as pd
import pytest

from popdask.census import CensusError, cells_to_raster, parse_grd_id, read_census
from popdask.grid import Grid, cell_id


@pytest.fixture
def grid():
    return Grid.from_bbox((4321000, 3210000, 4324000, 3212000))  # 3 × 2 cells


@pytest.fixture
def table(grid):
    xs = [4321000, 4322000, 4323000]
    ys = [3210000, 3211000]
    rows = [
        (cell_id(x, y), x, y, 10.0 * i) for i, (y, x) in enumerate((y, x) for y in ys for x in xs)
    ]
    df = pd.DataFrame(rows, columns=["GRD_ID", "X_LLC", "Y_LLC", "TOT_P_2021"])
    df.loc[1, "TOT_P_2021"] = np.nan  # confidential
    df.loc[2, "TOT_P_2021"] = -9999  # flagged unknown
    df = df.drop(index=5)  # missing cell
    df.loc[len(df)] = [cell_id(4400000, 3000000), 4400000, 3000000, 99]  # outside region
    return df


def expected():
    # rows are north → south: cells with y_llc 3211000 first
    return np.array([[30.0, 40.0, np.nan], [0.0, np.nan, np.nan]], np.float32)


def test_parse_grd_id():
    p = parse_grd_id(["CRS3035RES1000mN2684000E4334000"])
    assert p.iloc[0].tolist() == [3035, 1000, 4334000, 2684000]
    with pytest.raises(CensusError, match="not GISCO grid ids"):
        parse_grd_id(["1kmN2684E4334"])


def test_cells_to_raster_unknown_stays_nan(grid):
    r = cells_to_raster(
        np.array([4321000, 4323000]), np.array([3211000, 3210000]), np.array([5.0, -1.0]), grid
    )
    assert r.shape == (2, 3)
    assert r[0, 0] == 5 and np.isnan(r[1, 2]) and np.isnan(r).sum() == 5


@pytest.mark.parametrize("fmt", ["csv", "parquet", "gpkg", "llc"])
def test_read_census_formats(tmp_path, grid, table, fmt):
    if fmt == "csv":
        path = tmp_path / "grid.csv"
        table.drop(columns=["X_LLC", "Y_LLC"]).to_csv(path, index=False)
    elif fmt == "parquet":
        path = tmp_path / "grid.parquet"
        table.drop(columns=["X_LLC", "Y_LLC"]).to_parquet(path)
    elif fmt == "llc":
        path = tmp_path / "grid.csv"
        table.drop(columns=["GRD_ID"]).to_csv(path, index=False)
    else:
        path = tmp_path / "grid.gpkg"
        write_gpkg(path, table, srs=3035)
    da = read_census(path, grid, column="TOT_P_2021")
    assert da.dims == ("y_cell", "x_cell")
    np.testing.assert_array_equal(da.values, expected())
    assert da.y_cell.values[0] > da.y_cell.values[1]


def write_gpkg(path, df, srs):
    """A minimal GeoPackage (SQLite) with the GISCO attributes and a geometry column."""
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE gpkg_contents (table_name TEXT, data_type TEXT)")
        con.execute("CREATE TABLE gpkg_geometry_columns (table_name TEXT, srs_id INTEGER)")
        con.execute("INSERT INTO gpkg_contents VALUES ('grid', 'features')")
        con.execute("INSERT INTO gpkg_geometry_columns VALUES ('grid', ?)", (srs,))
        out = df.drop(columns=["X_LLC", "Y_LLC"]).assign(geom=b"")
        out.to_sql("grid", con, index=False)


def test_errors_name_the_problem(tmp_path, grid, table):
    path = tmp_path / "grid.csv"
    table.to_csv(path, index=False)
    with pytest.raises(CensusError, match=r"grid.csv: no population column 'TOT_P_2018'"):
        read_census(path, grid, column="TOT_P_2018")
    other = Grid.from_bbox((0, 0, 5000, 5000))
    with pytest.raises(CensusError, match="does not cover the region"):
        read_census(path, other)
    with pytest.raises(CensusError, match="not found"):
        read_census(tmp_path / "nope.csv", grid)
    bad = table.assign(GRD_ID=table.GRD_ID.str.replace("CRS3035", "CRS4326"))
    bad.to_csv(path, index=False)
    with pytest.raises(CensusError, match="not EPSG:3035"):
        read_census(path, grid)
    gpkg = tmp_path / "g.gpkg"
    write_gpkg(gpkg, table, srs=4326)
    with pytest.raises(CensusError, match="EPSG:4326"):
        read_census(gpkg, grid)


def test_read_census_from_a_url(tmp_path, grid, table):
    """Any fsspec URL works (s3://, https://, ...); file:// goes through the same fetch."""
    path = tmp_path / "grid.gpkg"
    write_gpkg(path, table, srs=3035)
    da = read_census(f"file://{path}", grid, storage_options={})
    np.testing.assert_array_equal(da.values, expected())
    with pytest.raises(CensusError, match=r"file://.*nope\.csv: census file not found"):
        read_census(f"file://{tmp_path}/nope.csv", grid)
    with pytest.raises(CensusError, match=r"^file://.*grid\.gpkg: no population column"):
        read_census(f"file://{path}", grid, column="TOT_P_2018")
