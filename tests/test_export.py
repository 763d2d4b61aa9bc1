"""`popdask export`: COGs per tile and layer, VRT mosaics, a STAC collection.

A small synthetic store (two tiles, one of them at the region's edge, a third tile left
incomplete, a ``population_by`` variable) checks the contract file by file; the demo store
of the session (``clean_run``) gives the figures: every COG valid, the exported sum equal to
the store's, overview sums, STAC valid against the vendored schemas (no network).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from rasterio.io import MemoryFile
from rio_cogeo.cogeo import cog_validate

import popdask
from popdask import cli, cog, stacout, store
from popdask.chunkio import ChunkArray
from popdask.grid import Grid

SCHEMAS = Path(__file__).parent / "data" / "stac-schemas"
STAC_SPEC = "https://schemas.stacspec.org/v1.1.0"
BY = ["TOT_P_F", "TOT_P_M"]


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(dask_cluster):
    from distributed import Client

    with Client(dask_cluster, set_as_default=False) as c:
        yield c


@pytest.fixture(scope="module")
def grid():
    # 5 × 4 km in 2 km tiles: 100 × 100 px tiles, 50 px ones on the east edge
    return Grid.from_bbox((4321000, 3210000, 4326000, 3214000), tile=2000)


def _population_by(path: str, grid: Grid) -> None:
    """A ``(variable, y, x)`` ``population_by`` array and its ``variable`` coordinate."""
    g = zarr.open_group(path, mode="r+", zarr_format=2)
    arr = g.create_array(
        "population_by",
        shape=(len(BY), *grid.shape),
        chunks=(1, grid.tile_px, grid.tile_px),
        dtype="float32",
        fill_value=np.nan,
    )
    arr.attrs.update({"_ARRAY_DIMENSIONS": ["variable", "y", "x"], "units": "persons per pixel"})
    coord = g.create_array("variable", shape=(len(BY),), dtype=str)
    coord[...] = np.array(BY, dtype=object)
    coord.attrs["_ARRAY_DIMENSIONS"] = ["variable"]


@pytest.fixture(scope="module")
def small(tmp_path_factory, grid):
    """A store whose tiles but (0, 1) are complete, with known values (seeded)."""
    path = str(tmp_path_factory.mktemp("small") / "out.zarr")
    census = xr.DataArray(np.ones(grid.cell_shape, np.float32), dims=("y_cell", "x_cell"))
    store.create(
        path,
        grid,
        bands=["B02"],
        kinds=["reflectance"],
        census=census,
        attrs={"config": {"output": {"version": "2026-11"}, "census": {"column": "TOT_P_2021"},
                          "sources": {"sentinel2": {"datetime": "2021-06-01/2022-10-31"}}},
               "popdask_version": "0.1.0"},
    )  # fmt: skip
    _population_by(path, grid)
    rng = np.random.default_rng(7)
    pop = rng.gamma(0.5, 2.0, grid.shape).astype(np.float32)
    pop[:10, :10] = 0.0
    values = {
        "population": pop,
        "density": (pop * 2500).astype(np.float32),
        "cluster": rng.integers(0, 12, grid.shape).astype(np.int16),
    }
    for t in grid.tiles():
        store.write_arrays(path, t, {k: v[t.ys, t.xs] for k, v in values.items()})
        for i in range(len(BY)):
            store.write_layer(path, "population_by", i, t, pop[t.ys, t.xs] * (i + 1) / 3)
    done = [t for t in grid.tiles() if (t.row, t.col) != (0, 1)]
    store.set_status(path, done, store.COMPLETE)
    return path, values


@pytest.fixture(scope="module")
def exported(small, client, tmp_path_factory):
    path, _ = small
    out = tmp_path_factory.mktemp("export")
    layers = ["population", "density", "cluster", "population_by"]
    result = popdask.export(path, str(out), layers, client=client)
    return out, result


def _registry():
    """The vendored schemas, under the URLs the documents name (nothing is fetched)."""
    from jsonschema_specifications import REGISTRY as SPECIFICATIONS
    from referencing import Resource

    spec = SCHEMAS / "stac-spec" / "v1.1.0"
    folder = {"catalog.json": "catalog-spec", "collection.json": "collection-spec"}
    pairs = []
    for f in spec.glob("*.json"):
        url = f"{STAC_SPEC}/{folder.get(f.name, 'item-spec')}/json-schema/{f.name}"
        pairs.append((url, Resource.from_contents(json.loads(f.read_text()))))
    for f in (SCHEMAS / "geojson").glob("*.json"):
        pairs.append((f"https://geojson.org/schema/{f.name}", _resource(f)))
    for f in (SCHEMAS / "extensions").glob("*.json"):
        name, version = f.stem.rsplit("-", 1)
        url = f"https://stac-extensions.github.io/{name}/{version}/schema.json"
        pairs.append((url, _resource(f)))
    return SPECIFICATIONS.with_resources(pairs)


def _resource(f: Path):
    from referencing import Resource

    return Resource.from_contents(json.loads(f.read_text()))


def validate_stac(doc: dict) -> list[str]:
    """Validate ``doc`` against its core schema and every extension schema it declares;
    returns the schemas used (raises on the first error)."""
    from jsonschema import Draft7Validator

    registry = _registry()
    kind = "item-spec/json-schema/item.json"
    if doc["type"] == "Collection":
        kind = "collection-spec/json-schema/collection.json"
    urls = [f"{STAC_SPEC}/{kind}", *doc.get("stac_extensions", [])]
    for url in urls:
        schema = registry.contents(url)
        Draft7Validator(schema, registry=registry).validate(doc)
    return urls


# --------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------
def test_overview_factors_divide_the_tile():
    assert cog.overview_factors((500, 500)) == [2, 4]  # 125 px: 8 would not divide
    assert cog.overview_factors((150, 100)) == [2]
    assert cog.overview_factors((512, 512), min_size=128) == [2, 4]
    assert cog.overview_factors((7, 7)) == []


def test_band_stats_skip_nodata():
    v = np.array([[1.0, np.nan], [3.0, 0.0]], np.float32)
    s = cog.band_stats(v, float("nan"))
    assert s["count"] == 3 and s["sum"] == 4.0 and s["valid_percent"] == 75.0
    assert s["minimum"] == 0.0 and s["maximum"] == 3.0
    labels = np.array([-1, 2, 5], np.int16)
    assert cog.band_stats(labels, -1)["count"] == 2
    assert cog.band_stats(np.full(3, np.nan, np.float32), float("nan"))["valid_percent"] == 0


def test_product_version_is_the_output_version_else_the_signature():
    assert stacout.product_version({"config": {"output": {"version": "2026-11"}}}) == "2026-11"
    a = stacout.product_version({"popdask": {"signature": {"model.clusters": 150}}})
    b = stacout.product_version({"popdask": {"signature": {"model.clusters": 80}}})
    assert a.startswith("sig-") and a != b


def test_vrt_is_written_from_the_grid_alone(grid):
    layer = cog.Layer("population", "population", None, "count", "float32", float("nan"),
                      "persons per pixel", "people")  # fmt: skip
    xml = cog.vrt_xml(grid, grid.tiles(), layer)
    assert xml.count("<SimpleSource>") == len(grid.tiles()) == 6
    assert '<DstRect xOff="200" yOff="100" xSize="50" ySize="100"/>' in xml  # edge tile
    assert '<OverviewList resampling="average">2</OverviewList>' in xml  # 50 px: factor 2 only


# --------------------------------------------------------------------------------------
# The export of a small store
# --------------------------------------------------------------------------------------
def test_layers_are_listed_and_an_unknown_one_is_refused(small, tmp_path, capsys):
    path, _ = small
    names = set(cog.store_layers(path))
    assert {"population", "density", "cluster", "population_by/TOT_P_F"} <= names
    assert not names & {"composite", "census", "terms", "tile_status"}
    available = "cluster, density, population, population_by/TOT_P_F, population_by/TOT_P_M"
    with pytest.raises(ValueError, match=f"no layer 'people'; it has: {available} "):
        popdask.export(path, str(tmp_path / "x"), ["people"])
    # the CLI says so in one line, before any cluster is started
    assert cli.main(["export", path, str(tmp_path / "x"), "--layers", "people"]) == 1
    assert "no layer 'people'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_credentials_in_the_storage_options_are_refused(small, tmp_path):
    from popdask.secrets import SecretInConfigError

    path, _ = small
    with pytest.raises(SecretInConfigError, match=r"out_options.secret: set AWS_SECRET_ACCESS"):
        popdask.export(path, "s3://b/x", out_options={"key": "AKIA", "secret": "shh"})


def test_every_cog_validates_and_holds_the_store_values(small, exported, grid):
    _path, values = small
    out, result = exported
    tiles = [t for t in grid.tiles() if (t.row, t.col) != (0, 1)]
    assert sorted(result.tiles) == sorted(t.id for t in tiles)
    assert result.skipped == [grid.find_tile((0, 1)).id]
    for name in ("population", "density", "cluster", "population_by/TOT_P_M"):
        for t in tiles:
            f = out / name / f"{t.id}.tif"
            valid, errors, warnings = cog_validate(str(f), strict=True, quiet=True)
            assert valid, (f, errors, warnings)
            with rasterio.open(f) as ds:
                expected = (values["population"] * 2 / 3)[t.ys, t.xs] if "by" in name else (
                    values[name][t.ys, t.xs])  # fmt: skip
                np.testing.assert_array_equal(ds.read(1), expected.astype(ds.dtypes[0]))
                assert ds.crs.to_epsg() == 3035 and ds.res == (20.0, 20.0)
                assert tuple(ds.bounds) == t.bounds
                assert ds.block_shapes == [(cog.BLOCKSIZE, cog.BLOCKSIZE)]
                assert ds.overviews(1) == cog.overview_factors(t.shape)
                assert ds.tags()["product_version"] == "2026-11"
                assert ds.tags()["popdask_version"] == popdask.__version__
    with rasterio.open(out / "cluster" / f"{tiles[0].id}.tif") as ds:
        assert ds.nodata == -1 and ds.dtypes[0] == "int16"
    with rasterio.open(out / "population" / f"{tiles[0].id}.tif") as ds:
        assert np.isnan(ds.nodata) and ds.units == ("persons per pixel",)


def test_count_overviews_sum_to_the_tile(exported, grid):
    out, result = exported
    for t in grid.tiles():
        if (t.row, t.col) == (0, 1):
            continue
        with rasterio.open(out / "population" / f"{t.id}.tif") as ds:
            base = ds.read(1).astype(np.float64).sum()
            for f in ds.overviews(1):
                ov = ds.read(1, out_shape=(ds.height // f, ds.width // f)).astype(np.float64)
                assert ov.sum() * f * f == pytest.approx(base, rel=1e-6)
    assert result.layers["population"]["overview_gap"] < 1e-6


def test_vrt_reads_as_the_store_with_nodata_where_a_tile_is_missing(small, exported, grid):
    path, values = small
    out, result = exported
    missing = grid.find_tile((0, 1))
    with rasterio.open(out / "population.vrt") as ds:
        assert (ds.width, ds.height) == grid.shape[::-1] and ds.crs.to_epsg() == 3035
        assert ds.transform == grid.transform
        got = ds.read(1)
        assert ds.overviews(1) == [2] and ds.tags()["product_version"] == "2026-11"
        assert ds.units == ("persons per pixel",)
    want = values["population"].copy()
    want[missing.ys, missing.xs] = np.nan
    np.testing.assert_array_equal(got, want)
    stored = ChunkArray(path, "population").read((slice(None), slice(None))).astype(np.float64)
    stored[missing.ys, missing.xs] = 0.0
    assert result.layers["population"]["sum"] == pytest.approx(stored.sum(), rel=1e-9)
    with rasterio.open(out / "population_by" / "TOT_P_F.vrt") as ds:
        np.testing.assert_array_equal(ds.read(1), (want / 3).astype(np.float32))


def test_stac_collection_and_items_validate_offline(exported, grid):
    import pystac

    out, result = exported
    doc = json.loads((out / "collection.json").read_text())
    assert validate_stac(doc)[0].endswith("collection.json")
    assert doc["version"] == "2026-11" and doc["popdask:census"]["reference_year"] == 2021
    assert doc["extent"]["temporal"]["interval"] == [["2021-01-01T00:00:00Z",
                                                       "2022-10-31T23:59:59Z"]]  # fmt: skip
    col = pystac.Collection.from_file(str(out / "collection.json"))
    items = list(col.get_items())
    assert sorted(i.id for i in items) == sorted(result.tiles)
    for item in items:
        d = json.loads((out / "items" / f"{item.id}.json").read_text())
        used = validate_stac(d)
        assert any("projection" in u for u in used) and any("raster" in u for u in used)
        assert d["properties"]["proj:code"] == "EPSG:3035"
        asset = item.assets["population"]
        data = Path(asset.get_absolute_href()).read_bytes()
        assert asset.extra_fields["file:size"] == len(data)
        assert asset.extra_fields["file:checksum"] == cog.multihash_sha256(data)
        band = asset.extra_fields["raster:bands"][0]
        assert band["nodata"] == "nan" and band["unit"] == "persons per pixel"
        assert set(item.assets) == {"population", "density", "cluster",
                                    "population_by/TOT_P_F", "population_by/TOT_P_M"}  # fmt: skip


def test_stac_validation_catches_a_broken_item(exported):
    from jsonschema import ValidationError

    out, result = exported
    d = json.loads((out / "items" / f"{result.tiles[0]}.json").read_text())
    d["assets"]["population"]["raster:bands"][0]["nodata"] = "none"  # not a number nor "nan"
    with pytest.raises(ValidationError):
        validate_stac(d)


def test_a_rebuild_adds_its_items_as_a_new_version(small, client, tmp_path, grid):
    import pystac
    from pystac.extensions.version import DeprecatedWarning

    path, _ = small
    out = tmp_path / "exp"
    first = popdask.export(path, str(out), ["population"], client=client)
    old = (out / "population" / f"{first.tiles[0]}.tif").read_bytes()
    attrs = store.root_attrs(path)
    dropped = grid.find_tile((1, 2))  # the rebuild leaves this tile out (not complete)
    try:
        store.update_attrs(path, {"config": {**attrs["config"], "output": {"version": "2027-05"}}})
        store.set_status(path, [dropped], store.MISSING)
        second = popdask.export(path, str(out), ["population"], client=client)
        again = popdask.export(path, str(out), ["population"], client=client)  # a rerun
    finally:
        store.update_attrs(path, {"config": attrs["config"]})
        store.set_status(path, [dropped], store.COMPLETE)
    assert dropped.id in first.tiles and dropped.id not in second.tiles
    assert not (out / "items" / f"{dropped.id}.json").exists()
    assert not (out / "population" / f"{dropped.id}.tif").exists()
    assert (first.version, second.version, second.archived) == ("2026-11", "2027-05", "2026-11")
    assert again.archived is None
    top = json.loads((out / "collection.json").read_text())
    assert top["version"] == "2027-05"
    links = {x["rel"]: x["href"] for x in top["links"]}
    assert links["predecessor-version"] == "./versions/2026-11/collection.json"
    kept = out / "versions" / "2026-11"
    prev = json.loads((kept / "collection.json").read_text())
    assert prev["version"] == "2026-11" and prev["deprecated"] is True
    validate_stac(prev)
    with pytest.warns(DeprecatedWarning, match="deprecated"):  # pystac reads the flag
        col = pystac.Collection.from_file(str(kept / "collection.json"))
        items = list(col.get_items())
    assert {i.properties["version"] for i in items} == {"2026-11"}
    assert sorted(i.id for i in items) == sorted(first.tiles)  # the dropped tile's too
    assert all(Path(i.assets["population"].get_absolute_href()).exists() for i in items)
    item = next(i for i in items if i.id == first.tiles[0])
    href = Path(item.assets["population"].get_absolute_href())
    assert href == kept / "population" / f"{first.tiles[0]}.tif"
    assert href.read_bytes() == old  # the first version's file, as it was
    assert (out / "population" / f"{first.tiles[0]}.tif").read_bytes() != old  # new tags
    with rasterio.open(kept / "population.vrt") as ds:
        assert ds.tags()["product_version"] == "2026-11" and ds.read(1).shape == grid.shape


# --------------------------------------------------------------------------------------
# Object store
# --------------------------------------------------------------------------------------
def test_export_to_an_object_store(small, client, tmp_path):

    import fsspec
    from servers import MotoServer, set_env

    path, _values = small
    env = {"AWS_ACCESS_KEY_ID": "popdask-test", "AWS_SECRET_ACCESS_KEY": "popdask-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip

    with MotoServer() as moto:
        before = client.run(set_env, env)
        mine = set_env(env)
        try:
            moto.client().create_bucket(Bucket="popdask-export")
            oo = {"endpoint_url": moto.endpoint}
            r = popdask.export(path, "s3://popdask-export/eu", ["population"], out_options=oo,
                               client=client)  # fmt: skip
            fs = fsspec.filesystem("s3", **oo)
            doc = json.loads(fs.cat_file("popdask-export/eu/collection.json"))
            data = fs.cat_file(f"popdask-export/eu/population/{r.tiles[0]}.tif")
            vrt = fs.cat_file("popdask-export/eu/population.vrt").decode()
        finally:
            set_env(mine)
            for worker, old in before.items():
                client.run(set_env, old, workers=[worker])
    assert len([x for x in doc["links"] if x["rel"] == "item"]) == len(r.tiles)
    assert "secret" not in json.dumps(doc) and "popdask-test" not in json.dumps(doc)
    assert not [x for x in doc["links"] if x["rel"] == "derived_from"]  # a local store
    with MemoryFile(data) as mem:
        assert cog_validate(mem.name, strict=True, quiet=True)[0]
        with mem.open() as ds:
            assert ds.read(1).shape == (100, 100)
    assert vrt.count("<SimpleSource>") == len(r.tiles)


# --------------------------------------------------------------------------------------
# The demo store: the figures of the issue
# --------------------------------------------------------------------------------------
def test_demo_export_figures(clean_run, client, tmp_path):
    """The demo store: every COG valid, exported sum = the store's (1e-6), overview sums,
    STAC valid. Prints the figures (pytest -s)."""
    path = str(clean_run.parent / "out.zarr")
    out = tmp_path / "demo-export"
    t0 = time.perf_counter()
    r = popdask.export(path, str(out), ["population", "density", "cluster"], client=client)
    seconds = time.perf_counter() - t0
    files = list(out.rglob("*.tif"))
    assert len(files) == 3 * len(r.tiles) == 12
    assert all(cog_validate(str(f), strict=True, quiet=True)[0] for f in files)
    stored = store.open_store(path).population.values.astype(np.float64)
    with rasterio.open(out / "population.vrt") as ds:
        exported = ds.read(1).astype(np.float64)
        ov = ds.read(1, out_shape=(ds.height // 2, ds.width // 2)).astype(np.float64)
    gap = abs(np.nansum(exported) - np.nansum(stored)) / np.nansum(stored)
    ov_gap = abs(np.nansum(ov) * 4 - np.nansum(stored)) / np.nansum(stored)
    assert gap < 1e-6 and ov_gap < 1e-6
    assert abs(r.layers["population"]["sum"] - np.nansum(stored)) / np.nansum(stored) < 1e-6
    docs = [json.loads(p.read_text()) for p in (out / "items").glob("*.json")]
    for d in [json.loads((out / "collection.json").read_text()), *docs]:
        validate_stac(d)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"\ndemo export: {len(files)} COGs valid, population sum {np.nansum(exported):.6f} vs "
        f"store {np.nansum(stored):.6f} (relative {gap:.2e}), VRT overview x4 {ov_gap:.2e}, "
        f"tile overview gap {r.layers['population']['overview_gap']:.2e}, {len(docs)} items "
        f"+ collection valid, {seconds:.2f} s, {size / 1e6:.3f} MB"
    )


def test_the_command_exports_and_says_what_it_wrote(small, dask_cluster, tmp_path, capsys):
    path, _values = small
    out = tmp_path / "cli"
    argv = ["export", path, str(out), "--layers", "population", "--scheduler", dask_cluster]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "version 2026-11, 5 tiles" in text and "1 incomplete tiles not exported" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "collection.json", "items", "population", "population.vrt"
    ]  # fmt: skip
    assert len(list((out / "population").glob("*.tif"))) == 5


def test_the_collection_says_what_made_the_product_and_no_secret(exported):
    out, result = exported
    doc = json.loads((out / "collection.json").read_text())
    assert doc["popdask:software_version"] == popdask.__version__
    assert doc["popdask:sources"] == {"sentinel2": "2021-06-01/2022-10-31"}
    assert doc["popdask:config"]["output_version"] == "2026-11"
    assert "storage_options" not in json.dumps(doc["popdask:config"])
    layer = doc["popdask:layers"]["population"]
    assert layer["overview_resampling"] == "average" and "400 m2" in layer["overview_semantics"]
    assert layer["sum"] == pytest.approx(result.layers["population"]["sum"])
    assert doc["popdask:layers"]["cluster"]["overview_resampling"] == "mode"
    store_link = next(x for x in doc["links"] if x["rel"] == "derived_from")
    assert (out / store_link["href"] / ".zattrs").exists()  # relative, beside the export


def test_export_quicklook_draws_the_vrt_overviews(exported, tmp_path):
    from matplotlib.image import imread

    from popdask.plot import export_quicklook

    out, _ = exported
    png = export_quicklook(out, tmp_path / "q.png", layers=["population", "cluster"], max_px=60)
    h, w, _ = imread(png).shape
    assert w > h > 100  # two panels side by side
