"""The catalog per tile: search, choice per footprint, retries, the record in the store.

Every search goes to a real STAC API on loopback (``rustac serve``), sometimes behind a
small proxy that throttles or fails a few requests, or to a replay of pages the real
Planetary Computer and Earth Search APIs returned (``../shared/data/realstac``).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from pyproj import Transformer
from rasterio.features import geometry_mask
from rasterio.transform import from_bounds

from popdask import catalog
from popdask.catalog import (
    Source,
    TileItems,
    choose_items,
    composite_tile,
    footprint_key,
    load_tile_items,
    probe_source,
    read_tile_summary,
    record_key,
    search_items,
    tile_items,
    write_tile_items,
)
from popdask.config import SourceConfig
from popdask.sources import SourceError, filter_items
from popdask.stac_server import StacServer

REALSTAC = Path(__file__).resolve().parents[2] / "shared" / "data" / "realstac"

# A 10 km tile near 10° E, 52° N, and the meridian splitting it between two granules.
TILE = (4321000, 3210000, 4331000, 3220000)
TO_LL = Transformer.from_crs("EPSG:3035", "EPSG:4326", always_xy=True)
W, S, E, N = TO_LL.transform_bounds(*TILE, densify_pts=21)
MID = (W + E) / 2
# Granule A reaches far west of the tile, granule B far east; they meet at MID.
FOOT_A = (W - 1.0, S - 0.5, MID, N + 0.5)
FOOT_B = (MID, S - 0.5, E + 1.0, N + 0.5)
# A tile 30 km west: inside granule A only.
TILE_A = (TILE[0] - 30000, TILE[1], TILE[2] - 30000, TILE[3])

S2 = SourceConfig(
    collection="s2-test",
    datetime="2021-01-01/2022-12-31",
    months=[6, 7, 8, 9],
    assets=["B04", "B08"],
    mask_asset="SCL",
    max_cloud_cover=60,
)


# --------------------------------------------------------------------------------------
# Synthetic catalogs served by rustac
# --------------------------------------------------------------------------------------
def polygon(bbox) -> dict:
    w, s, e, n = bbox
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def item(
    iid: str,
    when: dt.datetime,
    bbox,
    *,
    cloud=None,
    tile=None,
    collection="s2-test",
    assets=("B04", "B08", "SCL"),
    **props,
) -> dict:
    """A STAC item dict with ``assets`` (hrefs that are never read here)."""
    p = {"datetime": when.strftime("%Y-%m-%dT%H:%M:%SZ"), **props}
    if cloud is not None:
        p["eo:cloud_cover"] = cloud
    if tile is not None:
        p["s2:mgrs_tile"] = tile
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": iid,
        "collection": collection,
        "geometry": polygon(bbox),
        "bbox": list(bbox),
        "properties": p,
        "links": [],
        "assets": {a: {"href": f"https://data.invalid/{iid}/{a}.tif"} for a in assets},
    }


def serve(tmp_path: Path, items: list[dict], collection: str = "s2-test") -> StacServer:
    """A rustac STAC API holding ``items`` in one collection (a context manager)."""
    coll = {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": collection,
        "description": "test collection",
        "license": "CC-BY-4.0",
        "extent": {
            "spatial": {"bbox": [[-180, -90, 180, 90]]},
            "temporal": {"interval": [["2015-01-01T00:00:00Z", None]]},
        },
        "links": [],
    }
    cpath = tmp_path / f"{collection}.json"
    cpath.write_text(json.dumps(coll))
    ipath = tmp_path / f"{collection}.ndjson"
    ipath.write_text("".join(json.dumps(d) + "\n" for d in items))
    return StacServer([cpath], [ipath], cwd=tmp_path)


def summer_days(n: int, start=dt.datetime(2021, 6, 1, 10, 30)) -> list[dt.datetime]:
    """``n`` distinct summer days (June-September of 2021 and 2022)."""
    days = []
    for year in (2021, 2022):
        d = start.replace(year=year)
        while d.month <= 9 and len(days) < n:
            days.append(d)
            d += dt.timedelta(days=3)
    assert len(days) == n
    return days


def two_granules() -> list[dict]:
    """Granule A: 30 clear scenes; granule B: 5 cloudier ones; plus items to filter out."""
    days = summer_days(30)
    out = [
        item(f"A{i:02d}", d, FOOT_A, cloud=round(0.3 * i, 2), tile="32UNA")
        for i, d in enumerate(days)
    ]
    out += [
        item(f"B{i}", d + dt.timedelta(hours=1), FOOT_B, cloud=30 + 5 * i, tile="32UNB")
        for i, d in enumerate(days[1:30:6])
    ]
    out += [
        item("A-april", dt.datetime(2021, 4, 2, 10), FOOT_A, cloud=0.0, tile="32UNA"),
        item("B-cloudy", dt.datetime(2021, 7, 2, 10), FOOT_B, cloud=95.0, tile="32UNB"),
        item(
            "B-noscl",
            dt.datetime(2021, 7, 5, 10),
            FOOT_B,
            cloud=1.0,
            tile="32UNB",
            assets=("B04", "B08"),
        ),
    ]
    return out


@pytest.fixture(scope="module")
def granules_api(tmp_path_factory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("granules"), two_granules()) as server:
        yield server.url


def covered(items: list[dict], bounds, n: int = 50) -> np.ndarray:
    """Which of ``n`` × ``n`` points of ``bounds`` (EPSG:3035) the items' footprints cover."""
    to_3035 = Transformer.from_crs("EPSG:4326", "EPSG:3035", always_xy=True)
    geoms = []
    for d in items:
        ring = np.asarray(d["geometry"]["coordinates"][0])
        # densify the edges: a lon/lat edge is not straight in EPSG:3035
        t = np.linspace(0, 1, 50)[:, None]
        pts = np.concatenate([a + t * (b - a) for a, b in itertools.pairwise(ring)])
        x, y = to_3035.transform(pts[:, 0], pts[:, 1])
        geoms.append({"type": "Polygon", "coordinates": [list(zip(x, y, strict=True))]})
    if not geoms:
        return np.zeros((n, n), bool)
    return geometry_mask(geoms, (n, n), from_bounds(*bounds, n, n), invert=True)


# --------------------------------------------------------------------------------------
# (a) the choice per footprint
# --------------------------------------------------------------------------------------
def test_tile_on_two_granules_gets_scenes_of_both_and_is_covered(granules_api):
    got = tile_items("sentinel2", S2, url=granules_api, bounds_3035=TILE)
    ids = [d["id"] for d in got.items]
    assert S2.max_items == 24  # the default: per tile and footprint
    assert got.found == 38
    assert got.skipped == {"month": 1, "cloud_cover": 1, "missing_asset": 1, "over_max_items": 6}
    assert got.groups == {"32UNA": {"usable": 30, "kept": 24}, "32UNB": {"usable": 5, "kept": 5}}
    assert sorted(ids) == sorted([f"A{i:02d}" for i in range(24)] + [f"B{i}" for i in range(5)])
    whens = [d["properties"]["datetime"] for d in got.items]
    assert whens == sorted(whens)  # date order
    assert covered(got.items, TILE).all()
    # what a cap over the tile's N clearest scenes would have done: granule A only,
    # and the eastern part of the tile without a scene
    usable = [d for d in two_granules() if d["id"] not in ("A-april", "B-cloudy", "B-noscl")]
    clearest = sorted(usable, key=lambda d: d["properties"]["eo:cloud_cover"])[:24]
    assert {d["id"][0] for d in clearest} == {"A"}
    assert not covered(clearest, TILE).all()


def test_tile_inside_one_granule_gets_its_least_cloudy(granules_api):
    cfg = S2.model_copy(update={"max_items": 5})
    got = tile_items("sentinel2", cfg, url=granules_api, bounds_3035=TILE_A)
    assert [d["id"] for d in got.items] == ["A00", "A01", "A02", "A03", "A04"]
    assert got.groups == {"32UNA": {"usable": 30, "kept": 5}}
    assert got.skipped["over_max_items"] == 25
    assert covered(got.items, TILE_A).all()


def test_choice_is_per_acquisition_and_spreads_ties_over_time():
    days = summer_days(10)
    # Sentinel-1: no cloud cover, two frames of one orbit per pass
    s1 = [
        item(
            f"S1_{i}_{f}",
            d,
            (10 + f, 52, 11 + f, 53),
            assets=(),
            **{"sat:relative_orbit": 44, "sat:orbit_state": "ascending"},
        )
        for i, d in enumerate(days)
        for f in (0, 1)
    ]
    c = choose_items(s1, 3)
    assert c.groups == {"orbit 44 ascending": {"usable": 20, "kept": 6}}
    kept_days = sorted({d["properties"]["datetime"][:10] for d in c.items})
    assert kept_days == [days[i].strftime("%Y-%m-%d") for i in (1, 5, 8)]  # spread in time
    assert all(
        len([d for d in c.items if d["properties"]["datetime"][:10] == k]) == 2 for k in kept_days
    )  # both frames of each pass
    assert c.dropped == 14


def test_footprint_keys_of_real_catalog_items():
    if not REALSTAC.is_dir():
        pytest.skip(f"{REALSTAC} is absent (../shared beside the repository)")
    keys = {
        p.name: footprint_key(json.loads(p.read_text()))
        for p in sorted(REALSTAC.glob("*/*/*.json"))
        if p.parent.name != "search-pages"
    }
    assert keys["S2A_13TDE_20231008_0_L2A.json"] == "13TDE"  # Earth Search grid:code
    pc = [v for k, v in keys.items() if k.startswith("S2B_MSIL2A_20240825")]
    assert pc == ["13TDE/R98"]  # PC: granule and relative orbit
    s1 = [v for k, v in keys.items() if k.startswith("S1A_IW")]
    assert s1 == ["orbit 51 descending"]


# --------------------------------------------------------------------------------------
# A proxy in front of a real API: counts requests, answers faults
# --------------------------------------------------------------------------------------
class Proxy:
    """A loopback HTTP proxy to ``upstream``; the ``n``-th request to ``/search`` (from 0)
    gets ``faults[n]`` (``(status, headers)``) when given, the others are forwarded. Links
    in the answers are rewritten to point at the proxy, so every page goes through it."""

    def __init__(self, upstream: str, faults: dict[int, tuple[int, dict]] | None = None):
        self.upstream = upstream.rstrip("/")
        self.faults = dict(faults or {})
        self.log: list[tuple[str, str, int, float]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy.handle(self, "GET")

            def do_POST(self):
                proxy.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        n = len(self.searches())
        if h.path.startswith("/search") and n in self.faults:
            status, headers = self.faults[n]
            self.log.append((method, h.path, status, time.monotonic()))
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        r = requests.request(
            method,
            self.upstream + h.path,
            data=body or None,
            timeout=30,
            headers={"Content-Type": h.headers.get("Content-Type", "application/json")},
        )
        out = r.content.replace(self.upstream.encode(), self.url.encode())
        self.log.append((method, h.path, r.status_code, time.monotonic()))
        h.send_response(r.status_code)
        h.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
        h.send_header("Content-Length", str(len(out)))
        h.end_headers()
        h.wfile.write(out)

    def searches(self) -> list[tuple[str, str, int, float]]:
        return [e for e in self.log if e[1].startswith("/search")]

    def __enter__(self) -> Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def many_api(tmp_path_factory) -> Iterator[str]:
    """250 items of one granule over the tile (more than two pages of 100)."""
    days = [dt.datetime(2021, 6, 1, 10) + dt.timedelta(hours=6 * i) for i in range(250)]
    items = [item(f"M{i:03d}", d, FOOT_A, cloud=1.0, tile="32UNA") for i, d in enumerate(days)]
    with serve(tmp_path_factory.mktemp("many"), items) as server:
        yield server.url


# --------------------------------------------------------------------------------------
# (b) paging, (c) retries
# --------------------------------------------------------------------------------------
def test_paging_returns_every_item_once_and_stops(many_api):
    bbox = TO_LL.transform_bounds(*TILE_A)
    with Proxy(many_api) as proxy:
        got = search_items(proxy.url, "s2-test", bbox_lonlat=bbox, limit=100)
    ids = [d["id"] for d in got]
    assert len(ids) == 250 and len(set(ids)) == 250
    # 100 + 100 + 50, and at most one more request for a trailing empty page
    assert 3 <= len(proxy.searches()) <= 4
    assert all(status == 200 for _, _, status, _ in proxy.searches())


def test_throttled_and_failing_api_is_retried_and_every_item_comes_once(many_api):
    # page 1: 429 with Retry-After: 1, then 503, then served; page 2: 503, then served
    faults = {0: (429, {"Retry-After": "1"}), 1: (503, {}), 3: (503, {})}
    bbox = TO_LL.transform_bounds(*TILE_A)
    with Proxy(many_api, faults) as proxy:
        got = search_items(proxy.url, "s2-test", bbox_lonlat=bbox, limit=100)
    ids = [d["id"] for d in got]
    assert len(ids) == 250 and len(set(ids)) == 250
    searches = proxy.searches()
    assert [s for _, _, s, _ in searches][:5] == [429, 503, 200, 503, 200]
    assert {m for m, *_ in searches} == {"POST"}  # the next pages too: POST is retried
    assert searches[1][3] - searches[0][3] >= 0.95  # Retry-After: 1 honoured
    assert searches[2][3] - searches[1][3] >= 0.95  # then back-off (0.5 × 2¹ s)


def test_api_that_keeps_failing_gives_one_line_error(many_api, monkeypatch):
    monkeypatch.setattr(catalog, "RETRIES", 2)  # the default 5 waits 15 s
    bbox = TO_LL.transform_bounds(*TILE_A)
    with Proxy(many_api, {n: (500, {}) for n in range(10)}) as proxy:
        with pytest.raises(SourceError) as e:
            search_items(proxy.url, "s2-test", bbox_lonlat=bbox, name="sentinel2")
        assert len(proxy.searches()) == 3  # the request and 2 retries
    msg = str(e.value)
    assert "\n" not in msg and "sentinel2" in msg and "'s2-test'" in msg and proxy.url in msg


# --------------------------------------------------------------------------------------
# Recorded pages of the real APIs, replayed on loopback
# --------------------------------------------------------------------------------------
RUNS = {
    "pc-2021-post-token": [f"pystac-client_2021-06_search_page{i}" for i in (1, 2, 3, 4)],
    "pc-2023-post-token": ["rustac_search-page-1", "rustac_search-page-2"],
    "pc-2023-get-token": ["rustac_items-page-1", "rustac_items-page-2"],
    "pc-s1-get": ["stac-geoparquet_sentinel-1-rtc_items_limit1"],
    "es-next-then-empty": ["multiple_collections_page1", "multiple_collections_page2"],
    "es-cql2-filter": ["filter_page1", "filter_page2"],
}


def _pages(run: str) -> list[dict]:
    out = []
    for name in RUNS[run]:
        api = "earth-search" if run.startswith("es-") else "planetary-computer"
        out.append(json.loads((REALSTAC / api / "search-pages" / f"{name}.json").read_text()))
    return out


class Replay:
    """Serves each run's recorded pages in order: ``/{run}/`` is a landing page, its
    search answers page 0, and each page's ``next`` link (method, body and ``merge`` as
    recorded) is rewritten to ``/{run}/page/{k+1}``. Past the recording, an empty page (as
    Earth Search answers)."""

    def __init__(self):
        self.hits: dict[str, list[str]] = {run: [] for run in RUNS}
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                replay.answer(self)

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        h.rfile.read(int(h.headers.get("Content-Length") or 0))
        parts = h.path.split("?")[0].strip("/").split("/")
        run = parts[0]
        if len(parts) == 1:
            doc = self.landing(run)
        else:
            k = 0 if parts[1] == "search" else int(parts[2])
            self.hits[run].append(h.path)
            doc = self.page(run, k)
        out = json.dumps(doc).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(out)))
        h.end_headers()
        h.wfile.write(out)

    def landing(self, run: str) -> dict:
        base = f"{self.url}/{run}"
        return {
            "type": "Catalog",
            "id": run,
            "description": "replay",
            "stac_version": "1.0.0",
            "conformsTo": [
                "https://api.stacspec.org/v1.0.0/core",
                "https://api.stacspec.org/v1.0.0/item-search",
            ],
            "links": [
                {"rel": "self", "href": f"{base}/"},
                {"rel": "root", "href": f"{base}/"},
                {
                    "rel": "search",
                    "href": f"{base}/search",
                    "method": "POST",
                    "type": "application/geo+json",
                },
                {
                    "rel": "search",
                    "href": f"{base}/search",
                    "method": "GET",
                    "type": "application/geo+json",
                },
            ],
        }

    def page(self, run: str, k: int) -> dict:
        pages = _pages(run)
        if k >= len(pages):
            return {"type": "FeatureCollection", "features": [], "links": []}
        doc = pages[k]
        for link in doc.get("links", []):
            if link.get("rel") == "next":
                link["href"] = f"{self.url}/{run}/page/{k + 1}"
        return doc

    def __enter__(self) -> Replay:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.mark.parametrize("run", list(RUNS))
def test_recorded_pages_of_real_apis_come_back_once_and_paging_stops(run):
    if not REALSTAC.is_dir():
        pytest.skip(f"{REALSTAC} is absent (../shared beside the repository)")
    pages = _pages(run)
    expected = [(d.get("collection"), d["id"]) for p in pages for d in p["features"]]
    assert len(set(expected)) == len(expected)
    trailing_next = any(link.get("rel") == "next" for link in pages[-1].get("links", []))
    with Replay() as replay:
        got = search_items(f"{replay.url}/{run}/", "any", bbox_lonlat=(-180, -90, 180, 90))
    assert [(d.get("collection"), d["id"]) for d in got] == expected
    # one request per recorded page, plus one answered empty after a trailing next link
    assert len(replay.hits[run]) == len(pages) + trailing_next


def test_earth_search_cql2_answer_holds_items_the_client_filter_drops():
    if not REALSTAC.is_dir():
        pytest.skip(f"{REALSTAC} is absent (../shared beside the repository)")
    import pystac

    feats = [d for p in _pages("es-cql2-filter") for d in p["features"]]
    above = [d["id"] for d in feats if d["properties"].get("eo:cloud_cover", 0) > 40]
    assert above  # the server's filter let them through
    parsed = [pystac.Item.from_dict(d, migrate=False) for d in feats]
    kept, skipped = filter_items(parsed, max_cloud_cover=40)
    assert skipped["cloud_cover"] == len(above)
    assert not {it.id for it in kept} & set(above)


# --------------------------------------------------------------------------------------
# (d) the record in the store
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "memory"])
def test_record_round_trip_and_empty_tile(granules_api, tmp_path, where):
    path = str(tmp_path / "out.zarr") if where == "local" else f"memory://{tmp_path.name}/o.zarr"
    got = tile_items("sentinel2", S2, url=granules_api, bounds_3035=TILE)
    assert load_tile_items(path, "sentinel2", "N3210E4321") is None  # not searched yet
    assert read_tile_summary(path, "sentinel2", "N3210E4321") is None
    write_tile_items(path, "N3210E4321", got)
    back = load_tile_items(path, "sentinel2", "N3210E4321")
    assert back == got  # the same full item dicts (ids, hrefs, all), counts and query
    assert [d["assets"]["B04"]["href"] for d in back.items] == [
        d["assets"]["B04"]["href"] for d in got.items
    ]
    summary = read_tile_summary(path, "sentinel2", "N3210E4321")
    assert summary["kept"] == 29 and summary["found"] == 38
    assert summary["groups"]["32UNB"] == {"usable": 5, "kept": 5}

    far = (TILE[0] + 900000, TILE[1], TILE[2] + 900000, TILE[3])  # nothing there
    none = tile_items("sentinel2", S2, url=granules_api, bounds_3035=far)
    assert none.items == [] and none.found == 0
    write_tile_items(path, "N3210E5221", none)
    empty = load_tile_items(path, "sentinel2", "N3210E5221")
    assert empty is not None and empty.items == [] and empty.summary() == none.summary()
    assert record_key("sentinel2", "N3210E5221") == "catalog/sentinel2/N3210E5221.ndjson.gz"


def test_summary_reads_only_the_start_of_a_large_record(tmp_path):
    big = [
        item(f"X{i:04d}", dt.datetime(2021, 7, 1), FOOT_A, cloud=1.0, tile="T") for i in range(3000)
    ]
    rec = TileItems("sentinel2", big, 3000, {}, {"T": {"usable": 3000, "kept": 3000}})
    path = str(tmp_path / "s.zarr")
    write_tile_items(path, "N1E1", rec)
    assert read_tile_summary(path, "sentinel2", "N1E1")["kept"] == 3000


# --------------------------------------------------------------------------------------
# (e) the probe
# --------------------------------------------------------------------------------------
def test_probe_finds_an_item_with_one_request(many_api):
    bbox = TO_LL.transform_bounds(*TILE_A)
    with Proxy(many_api) as proxy:
        first = probe_source("sentinel2", S2, url=proxy.url, bbox_lonlat=bbox)
    assert first["collection"] == "s2-test"
    assert len(proxy.searches()) == 1


@pytest.mark.parametrize(
    ("update", "says"),
    [
        (
            {"collection": "sentinel-2-l2b"},
            "no such collection; check sources.sentinel2.collection",
        ),
        ({"datetime": "2030-06-01/2030-09-30"}, "no item over the region for datetime 2030-06-01"),
    ],
)
def test_probe_fails_with_one_line_naming_source_collection_api_and_fix(many_api, update, says):
    cfg = S2.model_copy(update=update)
    with pytest.raises(SourceError) as e:
        probe_source("sentinel2", cfg, url=many_api, bbox_lonlat=TO_LL.transform_bounds(*TILE_A))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"sources.sentinel2: collection {cfg.collection!r} at {many_api}")
    assert says in msg


# --------------------------------------------------------------------------------------
# The composite task on the demo region
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from popdask.synthetic import make_demo_region

    return make_demo_region(
        tmp_path_factory.mktemp("demo"), bbox=(4321000, 3210000, 4327000, 3216000), seed=3
    )


def test_composite_tile_records_then_reuses_its_items(demo, tmp_path):
    from popdask.sources import search_source, tile_composite

    demo_s2 = SourceConfig(
        collection="sentinel-2-l2a",
        datetime="2021-06-01/2022-10-31",
        months=[6, 7, 8, 9, 10],
        assets=["B02", "B04", "B08", "B11"],
        mask_asset="SCL",
        max_cloud_cover=80,
    )
    demo_s1 = SourceConfig(
        collection="sentinel-1-rtc", datetime="2021-01-01/2021-12-31", assets=["vv", "vh"]
    )
    tile = (4321000, 3213000, 4324000, 3216000)
    path = str(tmp_path / "out.zarr")
    with StacServer(
        list(demo.collections.values()), list(demo.items.values()), cwd=demo.root
    ) as server:
        sources = [
            Source("sentinel2", demo_s2, server.url),
            Source("sentinel1", demo_s1, server.url),
        ]
        data, summary = composite_tile(
            sources, tile, tile_id="N3213E4321", resolution=20, path=path
        )
        # the same as the whole-region search cut to the tile
        region = [
            search_source(s.name, s.config, url=s.url, bbox_lonlat=TO_LL.transform_bounds(*tile))
            for s in sources
        ]
        ref, _, _, n = tile_composite(region, tile, resolution=20)
        ref = ref.compute(scheduler="synchronous")
        far = (5321000, 3213000, 5324000, 3216000)
        nan, nothing = composite_tile(sources, far, tile_id="N3213E5321", resolution=20, path=path)
    assert data.shape == (6, 150, 150) and data.dtype == np.float32
    np.testing.assert_array_equal(data, ref)
    assert np.isfinite(data).mean() > 0.9
    assert summary["no_usable_scene"] is False
    assert {k: v["kept"] for k, v in summary["sources"].items()} == n
    # the server is gone: the recorded items are loaded, not searched again
    again, summary2 = composite_tile(sources, tile, tile_id="N3213E4321", resolution=20, path=path)
    np.testing.assert_array_equal(again, data)
    assert summary2 == summary
    # a tile without any Sentinel-2 item: all NaN, flagged, recorded as searched and empty
    assert nothing["no_usable_scene"] is True and np.isnan(nan).all()
    assert load_tile_items(path, "sentinel2", "N3213E5321").items == []


def test_sources_of_resolves_each_api():
    from popdask.config import config_from_dict

    cfg = config_from_dict(
        {
            "region": {"bbox": list(TILE)},
            "stac": {"url": "http://a.invalid"},
            "sources": {
                "sentinel2": {"collection": "c", "datetime": "2021", "assets": ["B04"]},
                "nightlights": {
                    "url": "http://b.invalid",
                    "collection": "v",
                    "datetime": "2021",
                    "assets": ["r"],
                },
            },
            "census": {"path": "c.csv"},
            "output": {"path": "o.zarr"},
        }
    )
    assert [(s.name, s.url) for s in catalog.sources_of(cfg)] == [
        ("sentinel2", "http://a.invalid"),
        ("nightlights", "http://b.invalid"),
    ]


def test_store_with_records_opens_and_consolidates_quietly(tmp_path):
    import warnings

    import xarray as xr

    from popdask import store

    path = str(tmp_path / "out.zarr")
    xr.Dataset({"a": (("y", "x"), np.zeros((2, 2), "f4"))}).to_zarr(
        path, zarr_format=2, consolidated=False
    )
    write_tile_items(path, "N1E1", TileItems("sentinel2", [], 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(store.open_store(path).data_vars) == ["a"]
        store.consolidate(path)
    assert load_tile_items(path, "sentinel2", "N1E1").items == []


# --------------------------------------------------------------------------------------
# Offsets the metadata lies about, found from the pixels
# --------------------------------------------------------------------------------------
def _truth(seed: int, n: int = 150) -> np.ndarray:
    """Blue and red surface reflectance of a land tile, ``(2, n, n)``: water, forest,
    fields and a town in patches, with texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n] / n
    kind = np.digitize(np.sin(7 * xx + 3 * yy) + np.cos(5 * yy - 2 * xx), [-1.3, 0.0, 1.0])
    lo = np.array([[0.01, 0.015, 0.03, 0.06], [0.01, 0.02, 0.05, 0.08]])  # blue, red
    hi = np.array([[0.03, 0.035, 0.07, 0.13], [0.03, 0.04, 0.10, 0.15]])
    u = rng.uniform(size=(n, n))
    return (lo[:, kind] + u * (hi - lo)[:, kind]).astype(np.float32)


def _lying_items(root: Path, tile, lie: str, truth: np.ndarray) -> list[dict]:
    """Three Earth-Search-like items of ``tile``: one honest (raw DNs of baseline 05.00,
    offset −0.1 in raster:bands, flag false) and two whose metadata lies: ``"applied"``
    holds harmonised DNs (offset already removed) but says it is not; ``"raw"`` holds raw
    DNs but says the offset was applied."""
    import rasterio

    n = truth.shape[-1]
    transform = from_bounds(*tile, n, n)
    w, s, e, nn = TO_LL.transform_bounds(*tile, densify_pts=21)
    out = []
    for k, kind in enumerate(["honest", lie, lie]):
        harmonised = kind == "applied"
        iid = f"S2X_{lie}_{k}"
        rng = np.random.default_rng(k)
        refl = truth + rng.uniform(-0.002, 0.002, truth.shape).astype(np.float32)
        assets = {}
        for key, band in [("blue", refl[0]), ("red", refl[1]), ("scl", None)]:
            if band is None:
                data = np.full((n, n), 4, np.uint8)  # vegetation: clear everywhere
            else:
                data = np.round(band * 10000 + (0 if harmonised else 1000)).astype(np.uint16)
            path = root / f"{iid}_{key}.tif"
            with rasterio.open(
                path, "w", driver="GTiff", width=n, height=n, count=1, dtype=data.dtype,
                crs="EPSG:3035", transform=transform, nodata=0,
            ) as dst:  # fmt: skip
                dst.write(data, 1)
            rb = {"nodata": 0}
            if band is not None:
                rb |= {"scale": 0.0001, "offset": -0.1}
            assets[key] = {
                "href": str(path),
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "proj:shape": [n, n],
                "proj:transform": list(transform)[:6],
                "raster:bands": [rb],
            }
        props = {
            "grid:code": f"MGRS-{lie}",
            "proj:epsg": 3035,
            "s2:processing_baseline": "05.00",
            # the lie: "applied" says false, "raw" says true
            "earthsearch:boa_offset_applied": kind == "raw",
        }
        when = dt.datetime(2023, 7, 10 + 5 * k, 10, 30)
        d = item(iid, when, (w, s, e, nn), cloud=1.0, collection="sentinel-2-l2a", **props)
        d["assets"] = assets
        out.append(d)
    return out


LIE_TILES = {
    "applied": (4321000, 3210000, 4324000, 3213000),
    "raw": (4421000, 3210000, 4424000, 3213000),
}


@pytest.fixture(scope="module")
def lying_api(tmp_path_factory):
    root = tmp_path_factory.mktemp("lies")
    items, truths = [], {}
    for seed, (lie, tile) in enumerate(LIE_TILES.items()):
        truths[lie] = _truth(seed)
        items += _lying_items(root, tile, lie, truths[lie])
    with serve(root, items, collection="sentinel-2-l2a") as server:
        yield server.url, truths


@pytest.mark.parametrize("lie", list(LIE_TILES))
def test_offsets_the_metadata_lies_about_are_corrected_from_the_pixels(
    lying_api, tmp_path, lie, monkeypatch, capsys
):
    from popdask import cli
    from popdask import composite as comp

    url, truths = lying_api
    es = SourceConfig(
        collection="sentinel-2-l2a",
        datetime="2023-06-01/2023-08-31",
        assets=["blue", "red"],
        mask_asset="scl",
        rename={"blue": "B02", "red": "B04", "scl": "SCL"},
    )
    # the truth the median should find: per pixel, the median of the three dates' surfaces
    n = truths[lie].shape[-1]
    true = np.median(
        [
            truths[lie] + np.random.default_rng(k).uniform(-0.002, 0.002, (2, n, n))
            for k in range(3)
        ],
        axis=0,
    )
    src = [Source("sentinel2", es, url)]
    tile, tid = LIE_TILES[lie], f"N3210E{LIE_TILES[lie][0] // 1000}"
    path = str(tmp_path / "out.zarr")
    data, summary = composite_tile(src, tile, tile_id=tid, resolution=20, path=path)
    err = float(np.abs(data - true).max())
    # the same without the check (no item has enough pixels to be judged)
    monkeypatch.setattr(comp, "OFFSET_MIN_PIXELS", 10**9)
    blind, _ = composite_tile(src, tile, tile_id=tid, resolution=20, path=str(tmp_path / "b"))
    blind_err = float(np.abs(blind - true).max())
    print(f"\n{lie}: composite error {err:.5f} with the check, {blind_err:.5f} without")
    assert err <= 0.005
    assert blind_err > 0.09  # what the metadata alone gives
    # recorded: in the summary and in the header of the tile's record
    check = summary["offset_check"]["sentinel2"]
    fixed = {it["id"]: it for it in check["corrected"]}
    assert sorted(fixed) == [f"S2X_{lie}_1", f"S2X_{lie}_2"] and check["checked"] == 3
    want = ("offset_doubled", -0.1, 0.0) if lie == "applied" else ("offset_missing", 0.0, -0.1)
    for it in fixed.values():
        assert (it["reason"], it["offset"], it["applied"]) == want
        assert it["pixels"] == n * n
    header = read_tile_summary(path, "sentinel2", tid)["offset_check"]
    assert header["band"] == "B02"
    by_id = {it["id"]: it for it in header["items"]}
    assert by_id[f"S2X_{lie}_0"]["reason"] == "ok"
    assert {k: by_id[k] for k in fixed} == fixed
    if lie == "raw":
        assert all(by_id[k]["dark"] >= 0.1 for k in fixed)  # ~0.1 too bright
    else:
        assert all(by_id[k]["negative"] > 0.9 for k in fixed)  # almost all below 0
    # popdask status lists them, from the records' headers (a tile without one is skipped)
    capsys.readouterr()
    cli._print_offsets(path, {}, [tid, "N0E0"])
    out = capsys.readouterr().out
    assert "2 Sentinel-2 items in 1 tiles had their offset corrected" in out
    assert f"{tid} S2X_{lie}_1: " in out and want[0] in out


# --------------------------------------------------------------------------------------
# Catalog drift: items whose asset keys are another generation's
# --------------------------------------------------------------------------------------
PC_2021 = "recorded-2021-06_S2A_MSIL2A_20190101T000001_N0212_R116_T59ULV_20201007T214655.SAFE"
PC_2024 = "S2B_MSIL2A_20240825T173909_R098_T13TDE_20240825T215747"
PC_S2 = SourceConfig(  # the planetary-computer preset's Sentinel-2 keys
    collection="sentinel-2-l2a",
    datetime="2019-01-01/2024-12-31",
    assets=["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"],
    mask_asset="SCL",
)


def _moved(stem: str, iid: str) -> dict:
    """A recorded Planetary Computer item as it came, but for its id and its footprint,
    moved onto granule A (its asset keys are what the test is about)."""
    d = json.loads(
        (REALSTAC / "planetary-computer" / "sentinel-2-l2a" / f"{stem}.json").read_text()
    )
    d.update(id=iid, stac_version="1.0.0", bbox=list(FOOT_A), geometry=polygon(FOOT_A))
    d["links"] = []
    return d


@pytest.fixture(scope="module")
def drift_apis(tmp_path_factory):
    if not REALSTAC.is_dir():
        pytest.skip(f"{REALSTAC} is absent (../shared beside the repository)")
    old = [_moved(PC_2021, f"old{i}") for i in range(3)]
    mixed = [*old, _moved(PC_2024, "new0")]
    roots = [tmp_path_factory.mktemp("drift-old"), tmp_path_factory.mktemp("drift-mixed")]
    with (
        serve(roots[0], old, "sentinel-2-l2a") as a,
        serve(roots[1], mixed, "sentinel-2-l2a") as b,
    ):
        yield a.url, b.url


def test_items_of_another_catalog_generation_are_skipped_counted_and_named(
    drift_apis, tmp_path, caplog
):
    old_api, mixed_api = drift_apis
    got = tile_items("sentinel2", PC_S2, url=mixed_api, bounds_3035=TILE_A)
    assert [d["id"] for d in got.items] == ["new0"]
    assert got.skipped == {"missing_asset": 3}
    drift = got.summary()["missing_assets"]
    assert drift["items"] == 3 and drift["missing"] == {"SCL": 3}
    assert drift["similar"] == {"SCL": ["SCL-20m", "SCL-60m"]}
    assert "2021 layout" in drift["generation"]
    # a tile with only such items: no usable scene, one warning naming key, keys and fix
    src = [Source("sentinel2", PC_S2, old_api)]
    path = str(tmp_path / "out.zarr")
    with caplog.at_level("WARNING", logger="popdask.catalog"):
        data, summary = composite_tile(src, TILE_A, tile_id="T1", resolution=20, path=path)
    assert summary["no_usable_scene"] is True and np.isnan(data).all()
    assert summary["sources"]["sentinel2"]["missing_assets"]["missing"] == {"SCL": 3}
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("T1 sources.sentinel2: 3 of 3 items of collection 'sentinel-2-l2a'")
    assert "lack asset 'SCL' (3), like 'SCL-20m', 'SCL-60m'" in msg and "B02_20m" in msg
    assert "set sources.sentinel2.assets/mask_asset" in msg and "\n" not in msg
    assert read_tile_summary(path, "sentinel2", "T1")["missing_assets"]["items"] == 3


def test_probe_fails_a_source_whose_items_all_lack_its_keys(drift_apis, caplog):
    old_api, mixed_api = drift_apis
    bbox = TO_LL.transform_bounds(*TILE_A)
    with pytest.raises(SourceError) as e:
        probe_source("sentinel2", PC_S2, url=old_api, bbox_lonlat=bbox)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("sources.sentinel2: 3 of 3 items of collection")
    assert "'SCL' (3), like 'SCL-20m'" in msg and "2021 layout" in msg
    assert "set sources.sentinel2.assets/mask_asset" in msg and old_api in msg
    # some items have the keys: the source is usable, the others are named in a warning
    with caplog.at_level("WARNING", logger="popdask.catalog"):
        first = probe_source("sentinel2", PC_S2, url=mixed_api, bbox_lonlat=bbox)
    assert first["id"] == "old0"  # the probed item lacks them: one more page is looked at
    assert "sources.sentinel2: 3 of 4 items" in caplog.text
