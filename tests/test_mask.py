"""A constraint mask: nobody where nobody can live, and nobody of the census lost."""

import json

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import write_config

from popdask import cli, store
from popdask.grid import Grid
from popdask.mask import emptied_cells, masked_values, read_mask
from popdask.predict import predict_window, rescale


def test_masked_pixels_get_nobody_and_each_cell_keeps_its_census():
    labels = np.zeros((4, 4), np.int16)
    labels[:, 2:] = 1
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[:2, 2:] = True  # one pixel of cell (0, 0), all of cell (0, 1)
    census = np.array([[8.0, 6.0], [4.0, np.nan]])
    out = predict_window(
        labels, census, np.array([4.0, 0.0]), cell_px=2, resolution=20, sigma=0,
        inner=(slice(0, 4), slice(0, 4)), mask=mask,
    )  # fmt: skip
    pop = out["population"]
    cells = pop.reshape(2, 2, 2, 2).sum(axis=(1, 3))
    np.testing.assert_allclose(cells[:, 0], [8, 4])
    assert pop[0, 0] == 0 and np.allclose(pop[:2, :2][~mask[:2, :2]], 8 / 3)
    # cell (0, 1): the mask empties it, its 6 people are kept, spread over all its pixels
    np.testing.assert_allclose(pop[:2, 2:], 1.5)
    # cell (1, 1): unknown census, cluster 1 holds nobody: the model's 0 stays
    assert (pop[2:, 2:] == 0).all()


def test_an_even_spread_goes_to_the_pixels_the_mask_leaves():
    pop = np.zeros((2, 2), np.float32)  # the model says nobody, the census says 3
    allowed = np.array([[True, False], [True, True]])
    np.testing.assert_allclose(rescale(pop, np.array([[3.0]]), 2, allowed), [[1, 0], [1, 1]])
    np.testing.assert_allclose(rescale(pop, np.array([[3.0]]), 2), 0.75)


def test_emptied_cells_and_masked_values():
    allowed = np.ones((4, 4), bool)
    allowed[:2, :2] = False
    census = np.array([[5.0, 1.0], [0.0, np.nan]])
    assert emptied_cells(allowed, census, 2).tolist() == [[True, False], [False, False]]
    data = np.array([0, 1, 2, 80, 255], float)
    valid = np.array([True, True, True, True, False])
    assert masked_values(data, valid, None).tolist() == [False, True, True, True, False]
    assert masked_values(data, valid, [80]).tolist() == [False, False, False, True, False]


@pytest.fixture
def water(tmp_path):
    """A lake in UTM 32N (another CRS than the grid's), 10 m pixels, value 80: over the west
    half of the test region's most populated 1 km cell (row 2, column 2) and over the whole
    cell at row 1, column 3; 255 (nodata, never a mask) over the west half of the cell at
    row 0, column 2; 0 elsewhere."""
    from pyproj import Transformer

    x0, y0 = Transformer.from_crs(3035, 32632, always_xy=True).transform(4321000, 3216000)
    transform = Affine(10, 0, round(x0, -1) - 2000, 0, -10, round(y0, -1) + 2000)
    rows, cols = np.mgrid[0:1600, 0:1600]
    ex, ny = Transformer.from_crs(32632, 3035, always_xy=True).transform(
        *(transform * (cols + 0.5, rows + 0.5))
    )

    def cell(r, c, west_half=False):
        x, y = 4321000 + c * 1000, 3216000 - (r + 1) * 1000
        return (ex >= x) & (ex < x + (500 if west_half else 1000)) & (ny >= y) & (ny < y + 1000)

    data = np.zeros((1600, 1600), np.uint8)
    data[cell(2, 2, west_half=True) | cell(1, 3)] = 80
    data[cell(0, 2, west_half=True)] = 255
    path = tmp_path / "water.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=1600, height=1600, count=1, dtype="uint8",
        crs="EPSG:32632", transform=transform, nodata=255,
    ) as dst:  # fmt: skip
        dst.write(data, 1)
    return path


def test_read_mask_warps_any_crs_onto_the_grid(water):
    grid = Grid.from_bbox((4321000, 3210000, 4327000, 3216000), tile=3000)
    m = read_mask(str(water), grid, slice(0, 300), slice(0, 300), values=[80])
    assert m.shape == (300, 300)
    assert m[101:149, 101:124].all() and not m[101:149, 126:150].any()  # west half of (2, 2)
    assert m[51:99, 151:199].all()  # the whole cell (1, 3)
    assert not m[:50, 100:125].any()  # nodata there: never a mask
    assert 50 * 25 + 50 * 50 - 300 < m.sum() < 50 * 25 + 50 * 50 + 300  # edges: a pixel off
    m = read_mask(str(water), grid, slice(100, 150), slice(100, 150), values=[80])
    assert m[1:49, 1:24].all() and not m[:, 26:].any()  # a window of the grid


def test_a_run_with_a_mask(tmp_path, demo_region, stac_api, dask_cluster, water, clean_run):
    cfg = write_config(tmp_path, url=stac_api, census=demo_region.census, address=dask_cluster)
    mask = json.dumps({"path": str(water), "values": [80]})
    argv = ["run", str(cfg), "--report-dir", str(tmp_path), "--set", f"mask={mask}"]
    assert cli.main(argv) == 0
    ds = store.open_store(str(tmp_path / "out.zarr"))
    pop, census = ds.population.values, ds.census.values
    grid = Grid.from_bbox((4321000, 3210000, 4327000, 3216000), tile=3000)
    masked = read_mask(str(water), grid, slice(0, 300), slice(0, 300), values=[80])
    cells = pop.reshape(6, 50, 6, 50).sum(axis=(1, 3), dtype=np.float64)
    known = np.isfinite(census)
    np.testing.assert_allclose(cells[known], census[known], rtol=1e-4)  # nobody lost
    emptied = emptied_cells(~masked, census, 50)
    assert not pop[masked & ~np.repeat(np.repeat(emptied, 50, 0), 50, 1)].any()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert emptied.sum() == 1 and metrics["cells_emptied_by_mask"] == 1  # cell (1, 3)
    assert metrics["people_in_cells_emptied_by_mask"] == pytest.approx(census[1, 3])
    np.testing.assert_allclose(pop[50:100, 150:200], census[1, 3] / 2500, rtol=1e-5)
    # the unmasked run put people in those pixels: the mask changed where they are
    ref = store.open_store(str(clean_run.parent / "out.zarr")).population.values
    assert ref[masked].sum() > 0


def _water_item(path, tmp_path):
    """A STAC collection ``water`` with one item whose ``map`` asset is the lake raster."""
    from rasterio.warp import transform_bounds

    with rasterio.open(path) as src:
        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
    item = {
        "type": "Feature", "stac_version": "1.1.0", "id": "lake", "collection": "water",
        "geometry": {"type": "Polygon", "coordinates": [ring]}, "bbox": [w, s, e, n],
        "properties": {"datetime": "2021-01-01T00:00:00Z"}, "links": [],
        "assets": {"map": {"href": str(path), "type": "image/tiff"}},
    }  # fmt: skip
    coll = {
        "type": "Collection", "stac_version": "1.1.0", "id": "water", "description": "lakes",
        "license": "CC0-1.0", "links": [],
        "extent": {"spatial": {"bbox": [[w, s, e, n]]},
                   "temporal": {"interval": [["2021-01-01T00:00:00Z", None]]}},
    }  # fmt: skip
    (tmp_path / "water.json").write_text(json.dumps(coll))
    (tmp_path / "water.ndjson").write_text(json.dumps(item) + "\n")
    return tmp_path / "water.json", tmp_path / "water.ndjson"


def test_a_mask_from_a_stac_collection_reads_its_items_under_the_window(tmp_path, water):
    from popdask.config import config_from_dict
    from popdask.pipeline import mask_of
    from popdask.stac_server import StacServer

    grid = Grid.from_bbox((4321000, 3210000, 4327000, 3216000), tile=3000)
    coll, items = _water_item(water, tmp_path)
    with StacServer([coll], [items], cwd=tmp_path) as api:
        data = {
            "region": {"bbox": [4321000, 3210000, 4327000, 3216000]},
            "grid": {"tile": 3000},
            "stac": {"url": api.url},
            "sources": {"sentinel2": {"collection": "s2", "datetime": "2021", "assets": ["B04"]}},
            "census": {"path": str(tmp_path / "c.csv")},
            "output": {"path": str(tmp_path / "o.zarr")},
            "mask": {"collection": "water", "values": [80]},
        }
        mask = mask_of(config_from_dict(data), grid)
        assert mask.url == api.url and mask.path is None
        got = mask.read(slice(50, 200), slice(100, 250))
        np.testing.assert_array_equal(
            got, read_mask(str(water), grid, slice(50, 200), slice(100, 250), values=[80])
        )
        assert got.sum() > 1000
        with pytest.raises(
            ValueError, match=r"no asset 'data'; set mask.asset to one of \['map'\]"
        ):
            type(mask)(values=(80,), grid=grid, collection="water", url=api.url, asset="data").read(
                slice(0, 50), slice(0, 50)
            )


@pytest.mark.parametrize("mask", [{}, {"path": "a.tif", "collection": "water"}])
def test_the_mask_is_a_raster_or_a_collection(mask):
    from popdask.config import MaskConfig

    with pytest.raises(ValueError, match=r"mask.path\) or a STAC collection"):
        MaskConfig(**mask)
