import dask
import numpy as np
import pytest
import rasterio
import xarray as xr

from popdask import store
from popdask.chunkio import ChunkArray
from popdask.grid import Grid


@pytest.fixture
def grid():
    return Grid.from_bbox((4321000, 3210000, 4324000, 3212000), tile=2000)  # 150 × 100 px


@pytest.fixture
def census(grid):
    v = np.arange(6, dtype=np.float32).reshape(2, 3)
    v[0, 1] = np.nan
    return xr.DataArray(v, dims=("y_cell", "x_cell"), coords=grid.cell_coords())


@pytest.fixture
def path(tmp_path, grid, census):
    p = str(tmp_path / "out.zarr")
    assert store.create(
        p,
        grid,
        bands=["B02", "vv"],
        kinds=["reflectance", "backscatter_db"],
        census=census,
        attrs={"config": {"a": 1}},
    )
    return p


def test_contract_variables_dims_and_crs(path, grid):
    ds = xr.open_zarr(path)  # no extra arguments: must be self-describing
    assert ds.population.dims == ("y", "x") and ds.population.dtype == np.float32
    assert ds.density.dims == ("y", "x") and ds.density.dtype == np.float32
    assert ds.cluster.dims == ("y", "x") and ds.cluster.dtype == np.int16
    assert ds.composite.dims == ("band", "y", "x")
    assert ds.census.dims == ("y_cell", "x_cell") and ds.predicted.dims == ("y_cell", "x_cell")
    for v in ("population", "density", "cluster", "composite", "census", "predicted"):
        assert ds[v].rio.crs.to_epsg() == 3035, v
    assert list(ds.band.values) == ["B02", "vv"]
    assert ds.population.rio.transform() == grid.transform
    assert ds.attrs["config"] == {"a": 1}
    np.testing.assert_array_equal(ds.census.values[0], [0, np.nan, 2])


def test_gdal_reads_population(path, grid):
    t = grid.tiles()[1]
    pop = np.random.default_rng(0).gamma(1.0, 3.0, t.shape).astype(np.float32)
    labels = np.arange(pop.size, dtype=np.int16).reshape(t.shape) % 100
    store.write_arrays(path, t, {"population": pop, "cluster": labels})
    with rasterio.open(f'ZARR:"{path}":/population') as src:
        assert src.width == 150 and src.height == 100
        assert src.crs is not None and src.crs.to_epsg() == 3035
        got = src.read(1)  # decoded by GDAL's own Blosc, whatever codec the layers use
    np.testing.assert_array_equal(got[t.ys, t.xs], pop)
    assert np.isnan(got[:, : t.xs.start]).all()
    with rasterio.open(f'ZARR:"{path}":/cluster') as src:
        np.testing.assert_array_equal(src.read(1)[t.ys, t.xs], labels)
    comp = np.random.default_rng(1).uniform(0, 0.5, (2, *t.shape)).astype(np.float32)
    ChunkArray(path, "composite").write((slice(None), t.ys, t.xs), comp)
    with rasterio.open(f'ZARR:"{path}":/composite') as src:
        np.testing.assert_array_equal(src.read()[:, t.ys, t.xs], comp)


def test_tile_write_and_status(path, grid):
    t = grid.tiles()[1]
    ny, nx = t.shape
    pop = dask.array.full((ny, nx), 2.5, dtype=np.float32)
    dask.compute(
        store.write_tile(
            path,
            t,
            {
                "population": (("y", "x"), pop),
                "predicted": (("y_cell", "x_cell"), np.full((ny // 50, nx // 50), 7, np.float32)),
            },
        )
    )
    store.set_status(path, [t], store.COMPLETE)
    ds = store.open_store(path)
    p = ds.population.values
    assert (p[t.ys, t.xs] == 2.5).all() and np.isnan(p[:, : t.xs.start]).all()
    assert (ds.predicted.values[t.ys_cell, t.xs_cell] == 7).all()
    st = store.tile_status(path)
    assert st[t.row, t.col] == store.COMPLETE and (st != store.COMPLETE).sum() == st.size - 1


def test_resume_checks_grid(path, grid, census):
    assert not store.create(
        path, grid, bands=["B02", "vv"], kinds=["reflectance"] * 2, census=census, attrs={}
    )
    with pytest.raises(store.StoreError, match="another grid or bands"):
        store.create(path, grid, bands=["B02"], kinds=["reflectance"], census=census, attrs={})


def test_arrays_group_round_trip(path):
    store.save_arrays(path, "model", {"centroids": np.eye(3)}, {"bands": ["a", "b"]})
    arrays, attrs = store.load_arrays(path, "model")
    np.testing.assert_array_equal(arrays["centroids"], np.eye(3))
    assert attrs["bands"] == ["a", "b"]
    with pytest.raises(KeyError):
        store.load_arrays(path, "nothing")


def test_saving_arrays_replaces_the_group(path):
    store.save_arrays(path, "fit", {"a": np.ones(3), "old": np.zeros(2)}, {"n": 1})
    big = np.random.default_rng(0).normal(size=(3000, 1000)).astype(np.float32)  # 12 MB
    store.save_arrays(path, "fit", {"a": np.arange(4), "big": big}, {"n": 2, "x": np.nan})
    arrays, attrs = store.load_arrays(path, "fit")
    assert sorted(arrays) == ["a", "big"]  # nothing left of the first save
    np.testing.assert_array_equal(arrays["a"], np.arange(4))
    np.testing.assert_array_equal(arrays["big"], big)
    assert attrs["n"] == 2 and np.isnan(attrs["x"])
    # the other variables of the store are untouched and xarray still opens it
    assert "census" in store.open_store(path)


def test_a_save_cut_short_leaves_no_group(path, monkeypatch):
    from popdask import chunkio

    real = chunkio.put

    def put(fs, key, data):  # dies as it writes the second array
        if key.endswith("b/0"):
            raise OSError("killed")
        real(fs, key, data)

    monkeypatch.setattr(store, "put", put)
    monkeypatch.setattr(chunkio, "put", put)
    with pytest.raises(OSError, match="killed"):
        store.save_arrays(path, "model", {"a": np.ones(3), "b": np.ones(2)}, {})
    with pytest.raises(KeyError):  # the run fits again instead of reading half a model
        store.load_arrays(path, "model")


def test_term_layers_are_made_kept_and_replaced(path, grid):
    store.ensure_terms(path, ["intensity", "context"])
    t = grid.tiles()[1]
    values = np.arange(t.shape[0] * t.shape[1], dtype=np.float32).reshape(t.shape)
    store.write_layer(path, store.TERMS, 1, t, values)
    ds = xr.open_zarr(path)  # self-describing, as the contract variables
    assert ds.terms.dims == ("term", "y", "x") and ds.terms.dtype == np.float32
    assert list(ds.term.values) == ["intensity", "context"]
    assert ds.terms.rio.crs.to_epsg() == 3035
    np.testing.assert_array_equal(ds.terms.sel(term="context").values[t.ys, t.xs], values)
    assert np.isnan(ds.terms.sel(term="intensity").values).all()  # not written: NaN
    np.testing.assert_array_equal(
        store.read_window(path, store.TERMS, t.ys, t.xs, index=[1])[0], values
    )

    store.ensure_terms(path, ["intensity", "context"])  # the same names: kept, data and all
    np.testing.assert_array_equal(store.read_window(path, store.TERMS, t.ys, t.xs)[1], values)
    store.ensure_terms(path, ["context"])  # other names: replaced
    ds = xr.open_zarr(path)
    assert list(ds.term.values) == ["context"] and np.isnan(ds.terms.values).all()


def test_a_new_store_has_its_term_layers(tmp_path, grid, census):
    p = str(tmp_path / "terms.zarr")
    names = ["intensity", "context"]
    kw = dict(bands=["B02"], kinds=["reflectance"], census=census, attrs={})
    assert store.create(p, grid, terms=names, **kw)
    ds = xr.open_zarr(p)  # in the consolidated metadata from the start
    assert list(ds.term.values) == names and ds.terms.shape == (2, *grid.shape)
    assert ds.terms.rio.crs.to_epsg() == 3035
    t = grid.tiles()[0]
    values = np.ones(t.shape, np.float32)
    store.write_layer(p, store.TERMS, 0, t, values)
    store.ensure_terms(p, names)  # what the label pass calls: the array is kept
    np.testing.assert_array_equal(store.read_window(p, store.TERMS, t.ys, t.xs)[0], values)
    assert not store.create(p, grid, terms=["context"], **kw)  # resumed: left as it is
    assert list(xr.open_zarr(p).term.values) == names


def test_read_census_is_what_xarray_decodes(path):
    np.testing.assert_array_equal(store.read_census(path), xr.open_zarr(path).census.values)
    assert np.isnan(store.read_census(path)[0, 1])


def test_sample_is_read_back_once_every_tile_wrote_its_part(path):
    attrs = {"sample_pixels": 10, "seed": 0}
    store.create_sample(path, n_tiles=3, per_tile=4, n_bands=2, attrs=attrs)
    parts = [np.arange(8, dtype=np.float32).reshape(4, 2), np.ones((2, 2), np.float32) * 9]
    for i, part in enumerate(parts):
        store.write_sample(path, i, part)
    assert store.read_sample(path, attrs) is None  # tile 2 has not written yet
    store.write_sample(path, 2, np.empty((0, 2), np.float32))  # a tile with no valid pixel
    np.testing.assert_array_equal(store.read_sample(path, attrs), np.concatenate(parts))
    assert store.read_sample(path, {**attrs, "seed": 1}) is None  # drawn for another run


def test_census_attrs_land_in_the_zarr_array(tmp_path, grid, capsys):
    """read_census' counts travel from the DataArray's attrs to the store and `status`."""
    from popdask import cli
    from popdask.census import cells_to_raster, classify_cells, count_cells

    xs, ys, vals = [4321000, 4322000], [3211000, 3210000], [5.0, np.nan]
    raster, state = classify_cells(xs, ys, vals, grid)
    assert np.array_equal(raster, cells_to_raster(xs, ys, vals, grid), equal_nan=True)
    census = xr.DataArray(
        raster,
        dims=("y_cell", "x_cell"),
        coords=grid.cell_coords(),
        attrs={"source": "census.csv", "column": "T", "absent": "zero", **count_cells(state)},
    )
    p = str(tmp_path / "out.zarr")
    store.create(p, grid, bands=["B02"], kinds=["reflectance"], census=census, attrs={})
    a = store.census_attrs(p)
    assert (a["cells_known"], a["cells_absent_zero"], a["cells_unknown"]) == (1, 4, 1)
    assert a["source"] == "census.csv" and a["absent"] == "zero"
    assert xr.open_zarr(p).census.attrs["cells_absent_zero"] == 4
    assert cli.main(["status", p]) == 3  # no tile done yet
    assert "census census.csv (T): 6 cells: 1 known, 4 zero by absence, 1 unknown" in (
        capsys.readouterr().out
    )


def test_a_store_whose_codec_was_switched_to_pickle_is_refused(path, grid, capsys):
    """A store somebody else altered: a ``pickle`` compressor (decoding it can run code) is
    refused by popdask with the store, the array and the codec named, before a chunk is
    decoded; zarr refuses to open it too."""
    import json
    import os

    store.set_status(path, grid.tiles()[:1], store.COMPLETE)  # a chunk to decode
    meta_path = os.path.join(path, "tile_status", ".zarray")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["compressor"] = {"id": "pickle", "protocol": 5}
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    from popdask.chunkio import CodecError
    from popdask.cli import main

    with pytest.raises(CodecError, match=r"array 'tile_status' is compressed with the 'pickle'"):
        store.tile_status(path)
    assert main(["status", path]) == 1
    err = capsys.readouterr().err
    assert path in err and "'tile_status'" in err and "'pickle'" in err
    ChunkArray(path, "population")  # the other arrays are as popdask wrote them
    with pytest.raises(ValueError, match=r"pickle"):  # zarr itself will not open it either
        store.open_store(path)


def test_an_unwritten_cluster_tile_reads_as_no_data_never_as_label_0(path, grid):
    """Labels of a tile no task wrote (a neighbour's halo, a failed label) read -1, the
    contract's no data, while xarray still opens ``cluster`` as integers."""
    t = grid.tiles()[0]
    labels = store.read_window(path, "cluster", t.ys, t.xs)
    assert labels.dtype == np.int16 and (labels == -1).all()
    written = np.zeros(t.shape, np.int16)  # label 0 everywhere: a real cluster
    store.write_arrays(path, t, {"cluster": written}, None)
    np.testing.assert_array_equal(store.read_window(path, "cluster", t.ys, t.xs), written)
    other = grid.tiles()[1]
    assert (store.read_window(path, "cluster", other.ys, other.xs) == -1).all()
    assert xr.open_zarr(path).cluster.dtype == np.int16


def test_a_stores_arrays_are_chunked_by_tile_and_typed_as_the_contract_says(tmp_path):
    """Zarr chunks are the tiles (the census: blocks of 10 × 10 tiles), whatever the dask
    chunks of the template, and each per-tile array has its contract's dtype."""
    import json

    g = Grid.from_bbox((4321000, 3210000, 4341000, 3226000), tile=4000)  # 5 × 4 tiles
    c = xr.DataArray(np.ones(g.cell_shape, np.float32), dims=("y_cell", "x_cell"))
    path = tmp_path / "s.zarr"
    store.create(str(path), g, bands=["B02", "B03"], kinds=["reflectance"] * 2, census=c, attrs={})
    want = {
        "population": ([200, 200], "<f4"),
        "cluster": ([200, 200], "<i2"),
        "composite": ([1, 200, 200], "<f4"),
        "predicted": ([4, 4], "<f4"),
        "census": ([16, 20], "<f4"),  # one block: the region is smaller than 10 × 10 tiles
        "tile_status": ([1, 1], "|i1"),
        "tile_scenes": ([1, 1], "<i2"),
        "tile_counts": ([len(store.COUNT_NAMES), 1, 1], "<i4"),
    }
    for name, (chunks, dtype) in want.items():
        meta = json.loads((path / name / ".zarray").read_text())
        assert (meta["chunks"], meta["dtype"]) == (chunks, dtype), name
    assert (store.tile_status(str(path)) == store.MISSING).all()
    assert (store.tile_scenes(str(path)) == -1).all()
    assert not list((path / "population").glob("[0-9]*"))  # no pixel chunk written yet
