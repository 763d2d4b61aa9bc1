"""Two granules, end to end: every tile composites its whole area from its own scenes.

Granule A (west) has 30 clear scenes, its neighbour B (east) 5 cloudier ones; their edge
runs through the middle of a tile. Served by a real STAC API on loopback and composited by
the task the pipeline runs per tile (:func:`popdask.catalog.composite_tile`) with the
default item cap, every pixel of every tile has a value, and it is its own granule's.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from popdask.catalog import Source, composite_tile, load_tile_items
from popdask.config import SourceConfig
from popdask.grid import Grid
from popdask.stac_server import StacServer

pytestmark = pytest.mark.integration

EDGE = 4325500  # x of the granules' edge, inside the region's second tile
REGION = (4321000, 3210000, 4330000, 3213000)  # three tiles of 3 km
FOOT = {"A": (4317000, 3207000, EDGE, 3216000), "B": (EDGE, 3207000, 4334000, 3216000)}
DN = {"A": (1200, 3000), "B": (2200, 4400)}  # B04, B08 digital numbers of each granule


def _dark(rows: np.ndarray) -> np.ndarray:
    """Every tenth row counted from the granules' top is dark (water: 0.03 in red), as real
    scenes have dark pixels; the composite's offset check judges an item by them."""
    return rows % 10 == 0


def _cog(path: Path, bounds, value: int, dtype="uint16", dark: int | None = None) -> dict:
    """A one-band tiled GeoTIFF of ``value`` over ``bounds`` at 20 m (``dark`` on the dark
    rows); its proj fields."""
    w, h = round((bounds[2] - bounds[0]) / 20), round((bounds[3] - bounds[1]) / 20)
    t = from_origin(bounds[0], bounds[3], 20, 20)
    with rasterio.open(
        path, "w", driver="GTiff", width=w, height=h, count=1, dtype=dtype, crs="EPSG:3035",
        transform=t, tiled=True, blockxsize=256, blockysize=256, nodata=0,
    ) as dst:  # fmt: skip
        data = np.full((1, h, w), value, dtype)
        if dark is not None:
            data[0, _dark(np.arange(h))] = dark
        dst.write(data)
    return {
        "proj:epsg": 3035,
        "proj:shape": [h, w],
        "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "proj:bbox": list(bounds),
    }


def _item(iid: str, when: dt.datetime, granule: str, cloud: float, files: dict) -> dict:
    ll = Transformer.from_crs(3035, 4326, always_xy=True).transform_bounds(*FOOT[granule])
    w, s, e, n = ll
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": iid,
        "collection": "s2-two",
        "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
        "bbox": list(ll),
        "properties": {
            "datetime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "eo:cloud_cover": cloud,
            "s2:mgrs_tile": f"32U{granule}",
        },
        "links": [],
        "assets": {
            k: {"href": str(p), "type": "image/tiff", **proj} for k, (p, proj) in files.items()
        },
    }


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-granules")
    files = {}
    for g in ("A", "B"):
        b04, b08 = DN[g]
        files[g] = {
            "B04": (root / f"{g}_B04.tif", _cog(root / f"{g}_B04.tif", FOOT[g], b04, dark=300)),
            "B08": (root / f"{g}_B08.tif", _cog(root / f"{g}_B08.tif", FOOT[g], b08)),
            "SCL": (root / f"{g}_SCL.tif", _cog(root / f"{g}_SCL.tif", FOOT[g], 4, "uint8")),
        }
    day = dt.datetime(2021, 6, 1, 10, 30)
    items = [
        _item(f"A{i:02d}", day + dt.timedelta(days=3 * i), "A", 0.3 * i, files["A"])
        for i in range(30)
    ]
    items += [
        _item(f"B{i}", day + dt.timedelta(days=11 * i, hours=1), "B", 30 + 5 * i, files["B"])
        for i in range(5)
    ]
    coll = {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": "s2-two",
        "description": "two granules",
        "license": "CC-BY-4.0",
        "extent": {
            "spatial": {"bbox": [[-180, -90, 180, 90]]},
            "temporal": {"interval": [["2021-01-01T00:00:00Z", None]]},
        },
        "links": [],
    }
    (root / "c.json").write_text(json.dumps(coll))
    (root / "i.ndjson").write_text("".join(json.dumps(d) + "\n" for d in items))
    with StacServer([root / "c.json"], [root / "i.ndjson"], cwd=root) as server:
        yield server.url


def test_every_tile_composites_its_whole_area_from_its_own_granules(api, tmp_path):
    cfg = SourceConfig(
        collection="s2-two",
        datetime="2021-06-01/2021-10-31",
        assets=["B04", "B08"],
        mask_asset="SCL",
        max_cloud_cover=60,
    )
    assert cfg.max_items == 24  # the default cap: fewer than granule A's 30 clear scenes
    sources = [Source("sentinel2", cfg, api)]
    grid = Grid.from_bbox(REGION, tile=3000)
    assert len(grid.tiles()) == 3
    for t in grid.tiles():
        data, summary = composite_tile(
            sources, t.bounds, tile_id=t.id, resolution=20, path=str(tmp_path)
        )
        assert not summary["no_usable_scene"]
        assert np.isfinite(data).all(), f"{t.id}: pixels without a scene"
        x = t.bounds[0] + 10 + 20 * np.arange(data.shape[2])  # pixel centres
        dark = _dark((FOOT["A"][3] - t.bounds[3]) // 20 + np.arange(data.shape[1]))
        for g, cols in (("A", x < EDGE), ("B", x > EDGE)):
            want = np.empty((2, data.shape[1], int(cols.sum())), np.float32)
            want[0] = np.where(dark, 300, DN[g][0])[:, None] * np.float32(1e-4)
            want[1] = DN[g][1] * np.float32(1e-4)
            np.testing.assert_allclose(data[:, :, cols], want, rtol=1e-6)
        groups = load_tile_items(str(tmp_path), "sentinel2", t.id).groups
        on_edge = t.bounds[0] < EDGE < t.bounds[2]
        assert set(groups) == (
            {"32UA", "32UB"} if on_edge else {"32UA" if t.bounds[2] <= EDGE else "32UB"}
        )
        if on_edge:  # A's 24 least cloudy and all five of B's
            assert groups == {"32UA": {"usable": 30, "kept": 24}, "32UB": {"usable": 5, "kept": 5}}
