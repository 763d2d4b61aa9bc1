import json
import sqlite3

import numpy as np
import pandas as pd
import pytest

from popdask.census import (
    ABSENT_ZERO,
    KNOWN,
    UNKNOWN,
    CensusError,
    cells_to_raster,
    census_from_config,
    classify_cells,
    count_cells,
    flag_values,
    parse_grd_id,
    read_census,
    read_coverage,
)
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
    # rows are north → south: cells with y_llc 3211000 first. The cell the file does not list
    # (4323000, 3211000) is uninhabited: 0; the empty and the negative rows are unknown.
    return np.array([[30.0, 40.0, 0.0], [0.0, np.nan, np.nan]], np.float32)


def test_parse_grd_id():
    p = parse_grd_id(["CRS3035RES1000mN2684000E4334000"])
    assert p.iloc[0].tolist() == [3035, 1000, 4334000, 2684000]
    with pytest.raises(CensusError, match="not GISCO grid ids"):
        parse_grd_id(["1kmN2684E4334"])


def test_cells_to_raster_absent_is_zero_unknown_is_nan(grid):
    xs, ys = np.array([4321000, 4323000]), np.array([3211000, 3210000])
    r = cells_to_raster(xs, ys, np.array([5.0, -1.0]), grid)
    assert r.shape == (2, 3)
    # the negative row is unknown; the 4 cells no row lists are uninhabited
    assert r[0, 0] == 5 and np.isnan(r[1, 2]) and np.isnan(r).sum() == 1
    assert (r[np.isfinite(r)] == 0).sum() == 4
    # absent="unknown": the old behaviour, for files partial on purpose
    r = cells_to_raster(xs, ys, np.array([5.0, -1.0]), grid, absent="unknown")
    assert r[0, 0] == 5 and np.isnan(r).sum() == 5


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


def write_gpkg(path, df, srs, layer="grid"):
    """A minimal GeoPackage (SQLite) with the GISCO attributes and a geometry column."""
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE gpkg_contents (table_name TEXT, data_type TEXT)")
        con.execute("CREATE TABLE gpkg_geometry_columns (table_name TEXT, srs_id INTEGER)")
        con.execute("INSERT INTO gpkg_contents VALUES (?, 'features')", (layer,))
        con.execute("INSERT INTO gpkg_geometry_columns VALUES (?, ?)", (layer, srs))
        out = df.drop(columns=["X_LLC", "Y_LLC"]).assign(geom=b"")
        out.to_sql(layer, con, index=False)


def test_a_geopackage_layer_named_like_sql_is_read_as_a_name(tmp_path, grid, table):
    """The layer name is the file's: quotes in it are data, not SQL."""
    path = tmp_path / "odd.gpkg"
    layer = 'grid" WHERE 0; --'
    write_gpkg(path, table, srs=3035, layer=layer)
    got = read_census(path, grid, column="TOT_P_2021")
    write_gpkg(tmp_path / "plain.gpkg", table, srs=3035)
    want = read_census(tmp_path / "plain.gpkg", grid, column="TOT_P_2021")
    assert np.isfinite(got.values).any()
    np.testing.assert_array_equal(got.values, want.values)


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


# ---- absent cells, flags, coverage, counts (issue 19) ---------------------------------------
def test_classify_cells_states_and_counts(grid):
    xs = np.array([4321000, 4322000, 4323000, 4321000])
    ys = np.array([3211000, 3211000, 3211000, 3210000])
    values = np.array([12.0, np.nan, 7.0, 3.0])
    flagged = np.array([False, False, True, False])
    covered = np.array([[True, True, True], [True, True, False]])
    raster, state = classify_cells(xs, ys, values, grid, covered=covered, flagged=flagged)
    np.testing.assert_array_equal(raster, [[12, np.nan, np.nan], [3, 0, np.nan]])
    assert state.tolist() == [[KNOWN, UNKNOWN, UNKNOWN], [KNOWN, ABSENT_ZERO, UNKNOWN]]
    assert count_cells(state) == {"cells_known": 2, "cells_absent_zero": 1, "cells_unknown": 3}
    # a listed cell outside the coverage keeps its value: the coverage only says what an
    # absence means
    r = cells_to_raster([4323000], [3210000], [9.0], grid, covered=covered)
    assert r[1, 2] == 9
    with pytest.raises(CensusError, match="absent must be"):
        cells_to_raster(xs, ys, values, grid, absent="nan")


def test_flag_values():
    got = flag_values([0, 1, None, np.nan, "C", "false", "", " 0 ", 2.0, "TRUE", "N"])
    assert got.tolist() == [False, True, False, False, True, False, False, False, True, True, False]


@pytest.fixture
def census2021(grid):
    """A table shaped like the Census 2021 grid: populated cells only, perturbed (M + F != T),
    CONFIDENTIALSTATUS set on one row; plus an empty and a non-numeric T."""
    cols = "T M F Y_LT15 Y_1564 Y_GE65 EMP NAT EU_OTH OTH SAME CHG_IN CHG_OUT".split()
    rows = {
        (4321000, 3211000): [1271, 613, 660, 166, 793, 312, 573, 1198, 22, 51, 1085, 166, 6],
        (4322000, 3211000): [3, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0],  # M + F = 0 != T
        (4323000, 3211000): [21, 11, 10, 0, 7, 14, 5, 21, 0, 0, 19, 2, 0],  # flagged below
        (4321000, 3210000): [None] * 13,  # empty
        (4322000, 3210000): ["x"] + [0] * 12,  # non-numeric
    }  # (4323000, 3210000) is not listed: nobody lives there
    df = pd.DataFrame(
        [[cell_id(x, y), *v] for (x, y), v in rows.items()], columns=["GRD_ID", *cols]
    )
    df["CONFIDENTIALSTATUS"] = [0, 0, 1, 0, 0]
    return df


def test_census_2021_columns_work_without_renaming(tmp_path, grid, census2021):
    path = tmp_path / "ESTAT_Census_2021_V2.csv"
    census2021.to_csv(path, index=False)
    assert (census2021.M.astype(float) + census2021.F.astype(float) != census2021["T"]).any()
    da = read_census(path, grid, column="T")
    np.testing.assert_array_equal(da.values, [[1271, 3, np.nan], [np.nan, np.nan, 0]])
    assert da.attrs["flag_column"] == "CONFIDENTIALSTATUS" and da.attrs["column"] == "T"
    assert da.attrs["cells_known"] == 2
    assert da.attrs["cells_absent_zero"] == 1
    assert da.attrs["cells_unknown"] == 3
    # the same rows as Parquet (CONFIDENTIALSTATUS an integer column there)
    pq = tmp_path / "census.parquet"
    census2021.astype({"T": str}).to_parquet(pq)
    np.testing.assert_array_equal(read_census(pq, grid, column="T").values, da.values)


def test_configured_flag_column_and_absent_unknown(tmp_path, grid, census2021):
    path = tmp_path / "grid.csv"
    df = census2021.drop(columns="CONFIDENTIALSTATUS").assign(OBS_FLAG=["", "C", "", "", ""])
    df.to_csv(path, index=False)
    da = read_census(path, grid, column="T", flag_column="OBS_FLAG")
    np.testing.assert_array_equal(da.values, [[1271, np.nan, 21], [np.nan, np.nan, 0]])
    # without a flag column nothing is flagged
    assert read_census(path, grid, column="T").values[0, 1] == 3
    da = read_census(path, grid, column="T", absent="unknown", flag_column="OBS_FLAG")
    assert np.isnan(da.values[1, 2])
    assert da.attrs["cells_absent_zero"] == 0 and da.attrs["cells_unknown"] == 4
    with pytest.raises(CensusError, match=r"no flag column 'CONF'.*census.flag_column"):
        read_census(path, grid, column="T", flag_column="CONF")


def _square(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def _geojson(path, features, crs=None):
    doc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": props, "geometry": geom} for props, geom in features
        ],
    }
    if crs:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def coast(tmp_path):
    """Country polygons in EPSG:3035: BE holds the western two columns of cells' centres
    (x < 4322600), NL a sliver over the north-east cell's centre; the rest is sea."""
    return _geojson(
        tmp_path / "countries.geojson",
        [
            ({"CNTR_ID": "BE"}, _square(4320000, 3209000, 4322600, 3213000)),
            ({"CNTR_ID": "NL"}, _square(4323400, 3211400, 4323600, 3211600)),
        ],
        crs="urn:ogc:def:crs:EPSG::3035",
    )


def test_absent_cells_outside_the_coverage_stay_unknown(tmp_path, grid, coast):
    xs, ys = [4321000], [3211000]
    covered = read_coverage(coast, grid)
    assert covered.tolist() == [[True, True, True], [True, True, False]]
    r = cells_to_raster(xs, ys, [5.0], grid, covered=covered)
    np.testing.assert_array_equal(r, [[5, 0, 0], [0, 0, np.nan]])
    # only Belgium: the NL cell is now outside the coverage too
    covered = read_coverage(coast, grid, countries=["be"])
    assert covered.tolist() == [[True, True, False], [True, True, False]]
    # the same polygons in lon/lat (GeoJSON's default CRS) are reprojected
    from pyproj import Transformer

    t = Transformer.from_crs(3035, 4326, always_xy=True)
    lonlat = {
        "type": "Polygon",
        "coordinates": [
            [
                list(t.transform(x, y))
                for x, y in _square(4320000, 3209000, 4322600, 3213000)["coordinates"][0]
            ]
        ],
    }
    ll = _geojson(tmp_path / "be.geojson", [({"CNTR_ID": "BE"}, lonlat)])
    assert read_coverage(ll, grid).tolist() == [[True, True, False], [True, True, False]]


def test_coverage_raster(tmp_path, grid):
    import rasterio
    from affine import Affine

    path = tmp_path / "coverage.tif"
    # 500 m pixels, 1 = land, 0 = sea, 255 = nodata: land under the centres of the west column
    data = np.zeros((4, 6), np.uint8)
    data[:, :2] = 1
    data[0, 2:4] = 255
    with rasterio.open(
        path, "w", driver="GTiff", width=6, height=4, count=1, dtype="uint8", crs="EPSG:3035",
        transform=Affine(500, 0, 4321000, 0, -500, 3212000), nodata=255,
    ) as dst:  # fmt: skip
        dst.write(data, 1)
    assert read_coverage(path, grid).tolist() == [[True, False, False], [True, False, False]]


def test_read_census_with_coverage_and_counts(tmp_path, grid, table, coast):
    path = tmp_path / "grid.csv"
    table.drop(index=0).to_csv(path, index=False)  # (4321000, 3210000) is absent now too
    da = read_census(path, grid, coverage=read_coverage(coast, grid, countries=["BE"]))
    np.testing.assert_array_equal(da.values, [[30, 40, np.nan], [0, np.nan, np.nan]])
    assert (da.attrs["cells_known"], da.attrs["cells_absent_zero"], da.attrs["cells_unknown"]) == (
        2,
        1,
        3,
    )


def test_census_from_config(tmp_path, grid, census2021, coast):
    from popdask.config import CensusConfig

    path = tmp_path / "census.csv"
    census2021.to_csv(path, index=False)
    cfg = CensusConfig(path=str(path), column="T", coverage=str(coast), coverage_countries=["BE"])
    da = census_from_config(cfg, grid)
    np.testing.assert_array_equal(da.values, [[1271, 3, np.nan], [np.nan, np.nan, np.nan]])
    assert da.attrs["coverage"] == "countries.geojson"
    assert da.attrs["coverage_countries"] == ["BE"]
    da = census_from_config(CensusConfig(path=str(path), column="T"), grid)
    assert da.attrs["coverage"] == "region" and da.values[1, 2] == 0


def test_bad_coverage_gives_a_clear_error(tmp_path, grid, coast):
    with pytest.raises(CensusError, match=r"nope.geojson: coverage file not found"):
        read_coverage(tmp_path / "nope.geojson", grid)
    with pytest.raises(CensusError, match=r"unknown coverage format '.shp'"):
        read_coverage(tmp_path / "c.shp", grid)
    bad = _geojson(tmp_path / "bad.geojson", [({}, _square(0, 0, 1, 1))], crs="EPSG:999999")
    with pytest.raises(CensusError, match=r"bad.geojson: unknown CRS 'EPSG:999999'"):
        read_coverage(bad, grid)
    metres = _geojson(tmp_path / "m.geojson", [({}, _square(4320000, 3209000, 4330000, 3219000))])
    with pytest.raises(CensusError, match=r"m.geojson: coordinates like .* are not degrees"):
        read_coverage(metres, grid)
    far = _geojson(tmp_path / "far.geojson", [({}, _square(0, 0, 1000, 1000))], crs="EPSG:3035")
    with pytest.raises(CensusError, match=r"far.geojson: the census coverage holds no cell"):
        read_coverage(far, grid)
    with pytest.raises(CensusError, match=r"no feature has CNTR_ID in \['FR'\].*'BE', 'NL'"):
        read_coverage(coast, grid, countries=["FR"])
    lines = tmp_path / "lines.geojson"
    lines.write_text(json.dumps({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}))
    with pytest.raises(CensusError, match=r"lines.geojson: GeoJSON type 'LineString'"):
        read_coverage(lines, grid)
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(CensusError, match=r"junk.json: cannot read the coverage as GeoJSON"):
        read_coverage(junk, grid)
    with pytest.raises(CensusError, match=r"coverage_countries needs census\.coverage"):
        read_coverage("region", grid, countries=["BE"])
