"""A continent on a cluster: what the client holds as the region grows 1×, 4× and 16×.

Usage::

    python benchmarks/continent.py                       # 400, 1,600, 6,400 tiles + the fit
    python benchmarks/continent.py --sizes 1 --tiles 16 --fit-cells 20000 --fit-clusters 10

**The tile passes.** For each size a light generated region (:func:`generate`: a land
cover of towns, fields, forest and water on a coarse EPSG:3035 grid, Sentinel-2-like
granules of 18 km every 16 km so that tiles on their edges need the items of two granules,
``--dates`` dates per granule with varied ``eo:cloud_cover`` whose items share a few tiny
COGs per granule, and a GISCO census of the populated cells) is served by a real STAC API
(rustac on loopback) and run by :func:`popdask.pipeline.run` on a LocalCluster of 2 worker
processes × 1 thread, the client and scheduler in the run's process. The grid is cheap per
pixel and heavy per tile: 200 m pixels, 2 km tiles (4 census cells), each tile searching,
choosing and recording its own items. Sentinel-2 only, ``regression.terms: []``.

Each size runs in a fresh subprocess, so its peak RSS is its own. In that process:

- the client process's RSS, from a thread every 0.1 s (``psutil``);
- the wall time of each pass, from the pass's log lines ("N of M tiles to do" at its start,
  "N tiles, at most ..." at its end);
- tiles in flight against worker threads: every 0.25 s a thread asks the scheduler how many
  tasks are ``processing``, ``queued`` or ``no-worker`` and the client how many threads the
  workers have; a sample counts as "tiles left" when the pass's :func:`map_tiles` had not yet
  submitted its last tile (the pipeline's ``map_tiles`` is wrapped to know, not changed);
- live ``pystac.Item`` objects in the client process (each one made joins a weak set;
  counted every 2 s);
- the objects the garbage collector tracks, counted by type before and after the run (the
  types that grew most); with ``--tracemalloc SIZE``, that size also runs under
  ``tracemalloc`` (1 frame): the Python heap's peak and the lines whose memory grew most
  between a snapshot before the run and one after it (it slows the client process, which
  also hosts the scheduler, so its times and in-flight figures are not comparable);
- afterwards, that every tile is complete in the store and how many items the catalog held.

**The densities fit at EU scale** (:func:`fit_benchmark`, its own subprocess too): a dask
array of ``--fit-cells`` synthetic cells × 3 × ``--fit-clusters`` columns (cluster fractions
drawn from a Dirichlet, then two blocks of term-weighted fractions, each ≤ the fractions),
rows chunked, every block generated on the workers from a seed; a population ``X @ d_true``
with Poisson noise and unknown (NaN) cells; 5 km block groups. It times
``popdask.regression.fit_densities(X, pop, groups)`` with its default ``max_cells``, the
client's RSS growth during it, the rows it saw, how well it recovers ``d_true``, and the
error of the predicted counts on a block of rows the fit never saw.

Writes ``benchmarks/continent.json`` (``--out``) and prints a table;
``benchmarks/README.md`` ("A continent on a cluster") explains the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ORIGIN = (4320000, 3200000)  # EPSG:3035, lower-left corner of every region
RESOLUTION, CELL, TILE = 200, 1000, 2000  # metres
GRANULE, STRIDE = 18000, 16000  # a granule's side and the step between granules (metres)
BANDS = ["B02", "B03", "B04", "B08"]
FILE_SETS_CLOUD = (0.02, 0.10, 0.25, 0.75)  # cloud share of each granule's shared COG sets
MAX_CLOUD, MAX_ITEMS = 50, 4
EU_CELLS = 4.2e6
EU_TILES_10KM = 42_000

#: Land covers from the lowest to the highest of a smooth field (so towns have dense cores,
#: suburbs around them and industry at their edges): (name, share of the land, reflectance
#: of B02 B03 B04 B08, persons per pixel).
COVERS = (
    ("water", 0.05, (0.05, 0.04, 0.03, 0.02), 0.0),
    ("forest", 0.30, (0.02, 0.04, 0.02, 0.30), 0.0),
    ("field", 0.35, (0.05, 0.08, 0.06, 0.35), 0.3),
    ("industry", 0.05, (0.16, 0.16, 0.17, 0.20), 2.0),
    ("suburb", 0.18, (0.08, 0.09, 0.09, 0.22), 40.0),
    ("dense", 0.07, (0.11, 0.11, 0.12, 0.14), 250.0),
)


# --------------------------------------------------------------------------------------
# The generated region
# --------------------------------------------------------------------------------------
def region_side(tiles: int, size: int) -> int:
    """Side in metres of the square region of ``tiles × size`` tiles."""
    per_side = math.isqrt(tiles * size)
    if per_side * per_side != tiles * size:
        raise ValueError(f"{tiles} × {size} tiles is not a square number of tiles")
    return per_side * TILE


def _smooth_noise(rng, shape, sigma_px: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    z = gaussian_filter(rng.standard_normal(shape), sigma_px, mode="wrap")
    return (z - z.mean()) / z.std()


def landscape(rng, shape) -> np.ndarray:
    """A land-cover class per pixel: towns (dense core, suburbs, industry) where a smooth
    field is high, water where it is lowest, forest and fields between."""
    z = 0.8 * _smooth_noise(rng, shape, 6.0) + 0.2 * _smooth_noise(rng, shape, 1.5)
    edges = np.quantile(z, np.cumsum([c[1] for c in COVERS])[:-1])
    return np.searchsorted(edges, z).astype(np.uint8)


def _granule_origins(side: int) -> list[tuple[int, int, int, int]]:
    """``(row, col, x, y)`` of each granule (lower-left corner of its 18 km square)."""
    n = 0
    while n * STRIDE - 1000 < side:
        n += 1
    x0, y0 = ORIGIN
    return [
        (r, c, x0 + c * STRIDE - 1000, y0 + r * STRIDE - 1000) for r in range(n) for c in range(n)
    ]


def _write_cog(path: Path, array: np.ndarray, transform, nodata: int = 0) -> None:
    import rasterio

    h, w = array.shape
    profile = {
        "driver": "COG",
        "width": w,
        "height": h,
        "count": 1,
        "dtype": array.dtype.name,
        "crs": "EPSG:3035",
        "transform": transform,
        "nodata": nodata,
        "compress": "DEFLATE",
        "blocksize": 128,
        "overviews": "NONE",
    }
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(array, 1)


def _granule_files(rng, cover: np.ndarray, folder: Path, transform) -> list[dict]:
    """The shared COG sets of one granule (one per cloud share): their hrefs and cloud %."""
    spectra = np.array([c[2] for c in COVERS], np.float32)  # (cover, band)
    sets = []
    for k, share in enumerate(FILE_SETS_CLOUD):
        clouds = _smooth_noise(rng, cover.shape, 3.0)
        cloudy = clouds > np.quantile(clouds, 1 - share)
        refl = spectra[cover] * rng.uniform(0.9, 1.1, (*cover.shape, len(BANDS)))
        refl[cloudy] = 0.6
        dn = np.clip(np.round(refl * 10000 + 1000), 1, 65535).astype(np.uint16)
        scl = np.where(cover == 0, 6, np.where(cover >= 3, 5, 4)).astype(np.uint8)
        scl[cloudy] = 9
        hrefs = {}
        for b, band in enumerate(BANDS):
            hrefs[band] = folder / f"set{k}_{band}.tif"
            _write_cog(hrefs[band], np.ascontiguousarray(dn[..., b]), transform)
        hrefs["SCL"] = folder / f"set{k}_SCL.tif"
        _write_cog(hrefs["SCL"], scl, transform)
        sets.append({"hrefs": {a: str(p) for a, p in hrefs.items()}, "cloud": 100 * cloudy.mean()})
    return sets


def _dates(n: int) -> list[str]:
    """``n`` acquisition days in 2021–2022: mostly June–October, one in six outside."""
    import datetime as dt

    out = []
    for i in range(n):
        year = 2021 + i % 2
        if i % 6 == 5:  # outside the months: the month filter drops it
            day = dt.date(year, 4, 1) + dt.timedelta(days=(7 * i) % 50)
        else:
            day = dt.date(year, 6, 1) + dt.timedelta(days=(11 * i) % 150)
        out.append(f"{day:%Y-%m-%d}T10:{i % 60:02d}:00Z")
    return out


def _item(granule: str, n: int, when: str, files: dict, cloud: float, box, ll) -> dict:
    from rasterio.transform import from_origin

    x0, y0, _, y1 = box
    size = (y1 - y0) // RESOLUTION
    t = from_origin(x0, y1, RESOLUTION, RESOLUTION)
    band = {"nodata": 0, "data_type": "uint16", "spatial_resolution": RESOLUTION}
    assets = {
        a: {
            "href": href,
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data"],
            "raster:bands": [{**band, "data_type": "uint8"} if a == "SCL" else band],
        }
        for a, href in files.items()
    }
    geometry, bbox = ll
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
            "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        ],
        "id": f"S2B_MSIL2A_{when[:10].replace('-', '')}_T{granule}_{n:02d}",
        "collection": "sentinel-2-l2a",
        "geometry": geometry,
        "bbox": bbox,
        "properties": {
            "datetime": when,
            "platform": "sentinel-2b",
            "constellation": "sentinel-2",
            "eo:cloud_cover": round(cloud, 3),
            "s2:processing_baseline": "05.09",
            "s2:mgrs_tile": granule,
            "proj:code": "EPSG:3035",
            "proj:shape": [size, size],
            "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f],
            "proj:bbox": list(box),
        },
        "links": [],
        "assets": assets,
    }


def _lonlat(box) -> tuple[dict, list[float]]:
    from pyproj import Transformer

    x0, y0, x1, y1 = box
    s = np.linspace(0, 1, 5)
    xs = np.concatenate([x0 + s * (x1 - x0), np.full(5, x1), x1 - s * (x1 - x0), np.full(5, x0)])
    ys = np.concatenate([np.full(5, y0), y0 + s * (y1 - y0), np.full(5, y1), y1 - s * (y1 - y0)])
    lon, lat = Transformer.from_crs(3035, 4326, always_xy=True).transform(xs, ys)
    ring = [[round(float(a), 7), round(float(b), 7)] for a, b in zip(lon, lat, strict=True)]
    ring.append(ring[0])
    bbox = [float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())]
    return {"type": "Polygon", "coordinates": [ring]}, bbox


def census_rows(cover: np.ndarray, world_origin, side: int, rng) -> list[tuple[str, int]]:
    """GISCO rows (``GRD_ID``, count) of the region's populated cells (Poisson counts)."""
    per_px = np.array([c[3] for c in COVERS])
    x0, y0 = ORIGIN
    off_c = (x0 - world_origin[0]) // RESOLUTION
    top = cover.shape[0] - (y0 + side - world_origin[1]) // RESOLUTION  # row 0 is north
    px = side // RESOLUTION
    f = CELL // RESOLUTION
    people = per_px[cover[top : top + px, off_c : off_c + px]]
    cells = people.reshape(px // f, f, px // f, f).sum(axis=(1, 3))
    counts = rng.poisson(cells)
    rows = []
    n = px // f
    for i in range(n):
        y = y0 + side - (i + 1) * CELL
        for j in range(n):
            if counts[i, j] > 0:
                rows.append((f"CRS3035RES1000mN{y}E{x0 + j * CELL}", int(counts[i, j])))
    return rows


def generate(side: int, root: Path, *, dates: int, seed: int = 0) -> dict:
    """Write the region of ``side`` metres under ``root``: the granules' COGs, the items
    (ndjson) and collection of ``sentinel-2-l2a``, and ``census.csv``. Returns the paths
    and counts."""
    from rasterio.transform import from_origin

    rng_land, rng_files, rng_items, rng_census = np.random.default_rng(seed).spawn(4)
    granules = _granule_origins(side)
    wx0 = min(g[2] for g in granules)
    wy0 = min(g[3] for g in granules)
    wx1 = max(g[2] for g in granules) + GRANULE
    wy1 = max(g[3] for g in granules) + GRANULE
    shape = ((wy1 - wy0) // RESOLUTION, (wx1 - wx0) // RESOLUTION)
    cover = landscape(rng_land, shape)
    when = _dates(dates)
    root.mkdir(parents=True, exist_ok=True)
    items_path = root / "items.ndjson"
    n_items = 0
    gsize = GRANULE // RESOLUTION
    with open(items_path, "w") as fh:
        for r, c, gx, gy in granules:
            name = f"{32 + c // 26}U{chr(65 + c % 26)}{chr(65 + r % 26)}"
            row0 = (wy1 - gy - GRANULE) // RESOLUTION
            col0 = (gx - wx0) // RESOLUTION
            g_cover = cover[row0 : row0 + gsize, col0 : col0 + gsize]
            transform = from_origin(gx, gy + GRANULE, RESOLUTION, RESOLUTION)
            folder = root / "cogs" / name
            folder.mkdir(parents=True, exist_ok=True)
            sets = _granule_files(rng_files, g_cover, folder, transform)
            box = (gx, gy, gx + GRANULE, gy + GRANULE)
            ll = _lonlat(box)
            for n, w in enumerate(when):
                s = sets[int(rng_items.integers(len(sets)))]
                cloud = min(100.0, s["cloud"] + rng_items.uniform(0, 3))
                fh.write(json.dumps(_item(name, n, w, s["hrefs"], cloud, box, ll)) + "\n")
                n_items += 1
    coll = root / "sentinel-2-l2a.json"
    lon_lat = [_lonlat((wx0, wy0, wx1, wy1))[1]]
    coll.write_text(json.dumps(_collection(lon_lat)))
    census = root / "census.csv"
    rows = census_rows(cover, (wx0, wy0), side, rng_census)
    with open(census, "w") as fh:
        fh.write("GRD_ID,TOT_P_2021\n")
        fh.writelines(f"{gid},{v}\n" for gid, v in rows)
    return {
        "root": str(root),
        "collection": str(coll),
        "items_path": str(items_path),
        "census": str(census),
        "items": n_items,
        "granules": len(granules),
        "cogs": len(granules) * len(FILE_SETS_CLOUD) * (len(BANDS) + 1),
        "census_rows": len(rows),
    }


def _collection(bbox) -> dict:
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": "sentinel-2-l2a",
        "description": "Generated Sentinel-2-like granules (benchmarks/continent.py)",
        "license": "CC0-1.0",
        "extent": {
            "spatial": {"bbox": bbox},
            "temporal": {"interval": [["2021-01-01T00:00:00Z", "2022-12-31T23:59:59Z"]]},
        },
        "links": [],
    }


def run_config(region: dict, side: int, url: str, out: Path, args) -> dict:
    """The run configuration (a YAML-able dict) of a generated region behind ``url``."""
    x0, y0 = ORIGIN
    return {
        "region": {"bbox": [x0, y0, x0 + side, y0 + side]},
        "grid": {"resolution": RESOLUTION, "cell": CELL, "tile": TILE},
        "stac": {"url": url},
        "sources": {
            "sentinel2": {
                "collection": "sentinel-2-l2a",
                "datetime": "2021-01-01/2022-12-31",
                "months": [6, 7, 8, 9, 10],
                "assets": BANDS,
                "mask_asset": "SCL",
                "max_cloud_cover": MAX_CLOUD,
                "max_items": MAX_ITEMS,
            }
        },
        "census": {"path": region["census"], "column": "TOT_P_2021"},
        "model": {
            "components": 4,
            "clusters": args.clusters,
            "sample_pixels": args.sample_pixels,
            "seed": 0,
        },
        "regression": {"rescale": True, "terms": []},
        "output": {"path": str(out / "continent.zarr")},
        "cluster": {"kind": "local", "workers": 2, "threads_per_worker": 1},
    }


# --------------------------------------------------------------------------------------
# Watching the client process during a run
# --------------------------------------------------------------------------------------
class PassLog(logging.Handler):
    """Times each pass from popdask.pipeline's log lines (its start and end)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.start: dict[str, float] = {}
        self.spent: dict[str, float] = {}  # summed over the attempts of a resumed run
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        name = msg.split(":", 1)[0]
        if "tiles to do" in msg:
            self.start[name] = time.perf_counter()
            self.lines.append(msg)
        elif "in flight for" in msg and name in self.start:
            took = time.perf_counter() - self.start.pop(name)
            self.spent[name] = self.spent.get(name, 0.0) + took
            self.lines.append(msg)

    def seconds(self) -> dict[str, float]:
        return dict(self.spent)


def _scheduler_in_flight(dask_scheduler) -> int:
    states = ("processing", "queued", "no-worker")
    return sum(ts.state in states for ts in dask_scheduler.tasks.values())


class Watch:
    """Threads sampling the client process: RSS (0.1 s), tasks in flight on the scheduler
    against worker threads (0.25 s, with the pass running and whether it had tiles left to
    submit), and live ``pystac.Item`` objects (2 s; see :meth:`_track_items`)."""

    def __init__(self, client):
        import psutil

        self.client, self.proc = client, psutil.Process()
        self.rss_start = self.proc.memory_info().rss
        self.rss_peak = self.rss_start
        self.rss_trace: list[tuple[float, int]] = []
        self.flight: list[tuple[float, str, bool, int, int]] = []
        self.items_peak, self.items_samples = 0, 0
        self.current = {"pass": "other", "left": False}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(f, e), daemon=True)
            for f, e in ((self._rss, 0.1), (self._in_flight, 0.25), (self._items, 2.0))
        ]
        self.t0 = time.perf_counter()

    def _loop(self, fn, every):
        while not self._stop.is_set():
            try:
                fn()
            except Exception:  # the cluster closing
                pass
            self._stop.wait(every)

    def _rss(self):
        rss = self.proc.memory_info().rss
        self.rss_peak = max(self.rss_peak, rss)
        t = time.perf_counter() - self.t0
        if not self.rss_trace or t - self.rss_trace[-1][0] >= 5.0:
            self.rss_trace.append((round(t, 1), rss))

    def _in_flight(self):
        cur = dict(self.current)
        n = self.client.run_on_scheduler(_scheduler_in_flight)
        threads = sum(self.client.nthreads().values())
        self.flight.append((time.perf_counter() - self.t0, cur["pass"], cur["left"], n, threads))

    def _items(self):
        self.items_peak = max(self.items_peak, len(self._live_items))
        self.items_samples += 1

    def _track_items(self):
        """Every ``pystac.Item`` made in this process joins a weak set (counted by
        :meth:`_items`). Not ``gc.get_objects()`` from a thread: it hands out tuples that
        another thread is still building, and ``tuple(iterator)`` there then fails with
        "SystemError: Objects/tupleobject.c:927: bad argument to internal function"."""
        import weakref

        import pystac

        self._live_items = weakref.WeakSet()
        init = pystac.Item.__init__

        def tracked(item, *a, **kw):
            init(item, *a, **kw)
            self._live_items.add(item)

        pystac.Item.__init__ = tracked
        return lambda: setattr(pystac.Item, "__init__", init)

    def __enter__(self):
        self._untrack = self._track_items()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()
        self._untrack()

    def traced_map_tiles(self, map_tiles):
        """``map_tiles`` that tells this watch its pass and whether tiles are left to submit."""
        from popdask.scheduler import WindowStats

        def wrapped(client, tiles, build, **kw):
            tiles = list(tiles)
            name = kw.get("desc", "tiles")
            stats = kw.get("stats") or WindowStats()
            kw["stats"] = stats
            self.current = {"pass": name, "left": len(tiles) > 0}

            def trace(what, tile, when):
                if what == "submit":
                    self.current = {"pass": name, "left": stats.submitted < len(tiles)}

            stats.trace = trace
            try:
                yield from map_tiles(client, tiles, build, **kw)
            finally:
                self.current = {"pass": "other", "left": False}

        return wrapped

    def flight_summary(self) -> dict[str, dict]:
        """Per pass: samples, and while tiles were left, the median and least in flight and
        the share of samples with at least as many in flight as worker threads."""
        out = {}
        for name in dict.fromkeys(p for _, p, _, _, _ in self.flight):
            if name == "other":
                continue
            rows = [(n, th) for _, p, left, n, th in self.flight if p == name and left]
            allrows = [1 for _, p, _, _, _ in self.flight if p == name]
            d = {"samples": len(allrows), "samples_tiles_left": len(rows)}
            if rows:
                n = np.array([r[0] for r in rows])
                th = np.array([r[1] for r in rows])
                d.update(
                    median_in_flight=float(np.median(n)),
                    min_in_flight=int(n.min()),
                    threads=int(np.median(th)),
                    share_at_least_threads=float(np.mean(n >= th)),
                )
            out[name] = d
        return out


def tracemalloc_growth(before, after, top: int = 12) -> list[dict]:
    """The lines whose traced memory grew most between two snapshots."""
    stats = after.compare_to(before, "lineno")
    return [
        {"where": str(s.traceback[0]), "grew_mb": s.size_diff / 2**20, "blocks": s.count_diff}
        for s in stats[:top]
    ]


def type_counts() -> dict[str, int]:
    """Objects the garbage collector tracks in this process, by type."""
    counts: dict[str, int] = {}
    for o in gc.get_objects():
        name = f"{type(o).__module__}.{type(o).__qualname__}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def type_growth(before: dict[str, int], after: dict[str, int], top: int = 12) -> dict[str, int]:
    """The types whose tracked objects grew most between two :func:`type_counts`."""
    diff = {k: v - before.get(k, 0) for k, v in after.items()}
    return dict(sorted(diff.items(), key=lambda kv: -kv[1])[:top])


def store_check(path: str) -> dict:
    """Tiles complete in the store, and the catalog's records (tiles, items recorded)."""
    import gzip

    from popdask import store

    status = store.tile_status(path)
    records = list((Path(path) / "catalog" / "sentinel2").glob("*.ndjson.gz"))
    kept = sum(len(gzip.decompress(p.read_bytes()).splitlines()) - 1 for p in records)
    return {
        "tiles_complete": int((status == store.COMPLETE).sum()),
        "tiles_total": int(status.size),
        "catalog_records": len(records),
        "items_recorded": kept,
    }


def run_size(size: int, work: Path, args) -> dict:
    """One size in this process: generate, serve, run, watch (see the module docstring)."""
    from distributed import Client, LocalCluster

    from popdask import pipeline
    from popdask.cluster import worker_environ
    from popdask.config import config_from_dict
    from popdask.stac_server import StacServer

    side = region_side(args.tiles, size)
    t = time.perf_counter()
    region = generate(side, work / "data", dates=args.dates)
    gen_s = time.perf_counter() - t
    log = PassLog()
    logging.getLogger("popdask").addHandler(log)
    logging.getLogger("popdask").setLevel(logging.INFO)
    traced = size in args.tracemalloc
    if traced:
        tracemalloc.start(1)
    with (
        worker_environ(),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            memory_limit="6GiB",
            dashboard_address=None,  # its HTTP server then binds the host only
        ) as cluster,
        Client(cluster) as client,
        StacServer([Path(region["collection"])], [Path(region["items_path"])], cwd=work) as srv,
    ):
        cfg = config_from_dict(run_config(region, side, srv.url, work / "out", args))
        client.run(lambda: None)  # workers up and warm before the watch starts
        gc.collect()
        types_before = type_counts()
        before = tracemalloc.take_snapshot() if traced else None
        original = pipeline.map_tiles
        with Watch(client) as watch:
            pipeline.map_tiles = watch.traced_map_tiles(original)
            errors = []
            try:
                t = time.perf_counter()
                for _ in range(6):  # a failed tile fails its pass; the rerun resumes
                    try:
                        result = pipeline.run(cfg, client=client, progress=False)
                        break
                    except pipeline.PipelineError as e:
                        errors.append(str(e))
                else:
                    raise RuntimeError(f"the run failed six times: {errors}")
                run_s = time.perf_counter() - t
            finally:
                pipeline.map_tiles = original
        gc.collect()
        types_growth = type_growth(types_before, type_counts())
        traced_memory = {}
        if traced:
            heap_now, heap_peak = tracemalloc.get_traced_memory()
            traced_memory = {
                "overhead_mb": tracemalloc.get_tracemalloc_memory() / 2**20,
                "python_heap_end_mb": heap_now / 2**20,
                "python_heap_peak_mb": heap_peak / 2**20,
                "top_growth": tracemalloc_growth(before, tracemalloc.take_snapshot()),
            }
            tracemalloc.stop()
    return {
        "size": size,
        "tiles": len(cfg.make_grid().tiles()),
        "side_km": side / 1000,
        "pixels": (side // RESOLUTION) ** 2,
        "census_cells": (side // CELL) ** 2,
        "generate_s": gen_s,
        "region": {k: v for k, v in region.items() if not isinstance(v, str)},  # no paths
        "run_s": run_s,
        "timings_s": result.timings,
        "pass_s": log.seconds(),
        "pass_log": log.lines,
        "failed_attempts": errors,
        "client_rss_start_mb": watch.rss_start / 2**20,
        "client_rss_peak_mb": watch.rss_peak / 2**20,
        "client_rss_trace_mb": [(t, v / 2**20) for t, v in watch.rss_trace],
        "gc_objects_growth": types_growth,
        "tracemalloc": traced_memory,
        "in_flight": watch.flight_summary(),
        "pystac_items_held_max": watch.items_peak,
        "pystac_items_samples": watch.items_samples,
        "store": store_check(cfg.output.store),
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }


# --------------------------------------------------------------------------------------
# The densities fit at EU scale
# --------------------------------------------------------------------------------------
def true_densities(k: int, seed: int = 1) -> np.ndarray:
    """Persons per fully covered cell of each of the ``3k`` columns: about half of the
    clusters uninhabited, the rest log-normal; the term columns add a share of that."""
    rng = np.random.default_rng(seed)
    base = np.where(rng.random(k) < 0.5, 0.0, rng.lognormal(6.0, 1.5, k))
    t1 = np.where(rng.random(k) < 0.4, base * rng.uniform(0.2, 1.0, k), 0.0)
    t2 = np.where(rng.random(k) < 0.3, base * rng.uniform(0.2, 1.0, k), 0.0)
    return np.concatenate([base, t1, t2])


def _design_block(k: int, seed: int, rows: int, block_id=None) -> np.ndarray:
    """One block of the design: ``rows`` cells × (fractions, two term-weighted blocks)."""
    rng = np.random.default_rng([seed, block_id[0]])
    frac = rng.dirichlet(np.full(k, 0.05), size=rows).astype(np.float32)
    w1 = frac * rng.random((rows, k), dtype=np.float32)
    w2 = frac * rng.random((rows, k), dtype=np.float32) ** 2
    return np.hstack([frac, w1, w2])


def _population_block(mu: np.ndarray, seed: int, unknown: float, block_id=None) -> np.ndarray:
    rng = np.random.default_rng([seed, 1_000_003, block_id[0]])
    pop = rng.poisson(np.maximum(mu, 0.0)).astype(np.float64)
    pop[rng.random(len(pop)) < unknown] = np.nan
    return pop


def _groups_block(index: np.ndarray, n_cols: int) -> np.ndarray:
    from popdask.reductions import block_groups_of

    return block_groups_of(index, n_cols, 5)


def design(cells: int, k: int, chunk: int, seed: int, d_true: np.ndarray, unknown: float):
    """Lazy ``(X, pop, groups)``: blocks generated on the workers from ``seed``."""
    import dask.array as da

    n_blocks = -(-cells // chunk)
    rows = tuple(min(chunk, cells - i * chunk) for i in range(n_blocks))
    if len(set(rows[:-1])) > 1:
        raise ValueError("rows must split into equal blocks")
    X = da.map_blocks(
        lambda block_id=None: _design_block(k, seed, rows[block_id[0]], block_id),
        chunks=(rows, (3 * k,)),
        dtype=np.float32,
        meta=np.empty((0, 0), np.float32),
        name=f"design-{seed}-{cells}-{k}-{chunk}",
    )
    mu = X.astype(np.float64) @ d_true
    pop = mu.map_blocks(_population_block, seed, unknown, dtype=np.float64)
    n_cols = 2_000  # cells across the synthetic continent's grid (5 km blocks from it)
    groups = da.arange(cells, chunks=(rows,), dtype=np.int64).map_blocks(
        _groups_block, n_cols, dtype=np.int64
    )
    return X, pop, groups


def fit_benchmark(args) -> dict:
    """Time ``fit_densities`` on a lazy EU-sized design (see the module docstring)."""
    import psutil
    from distributed import Client, LocalCluster

    from popdask import regression
    from popdask.cluster import worker_environ

    k, cells, chunk = args.fit_clusters, args.fit_cells, args.fit_chunk
    d_true = true_densities(k)
    # the design and one held-out block after it, which the fit never sees
    X_all, pop_all, groups_all = design(cells + chunk, k, chunk, 0, d_true, args.unknown)
    X, pop, groups = X_all[:cells], pop_all[:cells], groups_all[:cells]
    seen = {}
    sample_known = regression.sample_known

    def counted(*a, **kw):
        out = sample_known(*a, **kw)
        seen["rows"], seen["columns"] = out[0].shape
        seen["dtype"] = str(out[0].dtype)
        return out

    proc = psutil.Process()
    with (
        worker_environ(),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            memory_limit="8GiB",
            dashboard_address=None,  # its HTTP server then binds the host only
        ) as cluster,
        Client(cluster),
    ):
        rss = {"start": proc.memory_info().rss, "peak": 0}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                rss["peak"] = max(rss["peak"], proc.memory_info().rss)
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        regression.sample_known = counted
        try:
            t = time.perf_counter()
            d_hat = regression.fit_densities(X, pop, groups)
            fit_s = time.perf_counter() - t
        finally:
            regression.sample_known = sample_known
            stop.set()
            sampler.join()
        held = X_all[cells:].compute().astype(np.float64)
    return {
        "cells": cells,
        "columns": 3 * k,
        "chunk_rows": chunk,
        "unknown_share": args.unknown,
        "fit_s": fit_s,
        "rows_seen": seen.get("rows"),
        "sample_dtype": seen.get("dtype"),
        "client_rss_start_mb": rss["start"] / 2**20,
        "client_rss_growth_mb": (rss["peak"] - rss["start"]) / 2**20,
        "recovery": recovery(d_true, d_hat, held),
        "full_design_gb": {
            "float64": cells * 3 * k * 8 / 1e9,
            "float32": cells * 3 * k * 4 / 1e9,
        },
    }


def recovery(d_true: np.ndarray, d_hat: np.ndarray, held: np.ndarray) -> dict:
    """How well ``d_hat`` recovers ``d_true``: relative errors of the columns that matter
    (each carrying ≥ 0.5 % of the held-out block's people), the densities given to
    uninhabited columns, and the held-out block's predicted counts against the truth."""
    truth, pred = held @ d_true, held @ d_hat
    carried = held.sum(axis=0) * d_true / truth.sum()
    matter = carried >= 0.005
    rel = np.abs(d_hat[matter] - d_true[matter]) / d_true[matter]
    zero = d_true == 0
    return {
        "columns_that_matter": int(matter.sum()),
        "people_share_of_those": float(carried[matter].sum()),
        "rel_error_median": float(np.median(rel)),
        "rel_error_p90": float(np.percentile(rel, 90)),
        "zero_columns_mean_density": float(d_hat[zero].mean()) if zero.any() else 0.0,
        "held_out_cells": len(truth),
        "held_out_total_error": float(pred.sum() / truth.sum() - 1),
        "held_out_mae": float(np.mean(np.abs(pred - truth))),
        "held_out_mean_count": float(truth.mean()),
        "held_out_r2": float(1 - np.sum((pred - truth) ** 2) / np.sum((truth - truth.mean()) ** 2)),
    }


# --------------------------------------------------------------------------------------
# Driving it
# --------------------------------------------------------------------------------------
def in_child(what: str, work: Path, argv: list[str]) -> dict:
    """Run ``--child what`` of this script in a fresh Python process; its JSON result."""
    out = work / f"{what}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", what]
    cmd += ["--child-out", str(out), "--workdir", str(work)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def print_table(runs: list[dict], fit: dict | None) -> None:
    print(
        "\n| size | tiles | items | wall s (composite / fit / label / densities / predict)"
        " | client peak RSS MB | in flight per pass: median / min (share ≥"
        " threads) | pystac Items held |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        t = r["timings_s"]
        walls = " / ".join(
            f"{r['pass_s'].get(p, t.get(p, 0.0)):.1f}"
            for p in ("composite", "fit", "label", "regression", "predict")
        )
        fl = "; ".join(
            f"{p} {d['median_in_flight']:.0f} / {d['min_in_flight']} "
            f"({100 * d['share_at_least_threads']:.0f} %)"
            for p, d in r["in_flight"].items()
            if "median_in_flight" in d
        )
        peak = r["client_rss_peak_mb"]
        if r["tracemalloc"]:
            peak = f"{peak:,.0f} (with tracemalloc's {r['tracemalloc']['overhead_mb']:,.0f})"
        else:
            peak = f"{peak:,.0f}"
        print(
            f"| {r['size']}× | {r['tiles']:,} | {r['region']['items']:,} | {walls} "
            f"| {peak} | {fl} "
            f"| {r['pystac_items_held_max']} |"
        )
    if fit:
        rec = fit["recovery"]
        print(
            f"\ndensities fit: {fit['cells']:,} cells × {fit['columns']} columns, "
            f"{fit['fit_s']:.1f} s, rows seen {fit['rows_seen']:,}, client grew "
            f"{fit['client_rss_growth_mb']:,.0f} MB; relative error of the "
            f"{rec['columns_that_matter']} columns that matter: median "
            f"{rec['rel_error_median']:.3f}, 90th pct {rec['rel_error_p90']:.3f}; held-out "
            f"total error {100 * rec['held_out_total_error']:+.2f} %, R² {rec['held_out_r2']:.3f}"
        )


def checks(runs: list[dict], fit: dict | None) -> dict:
    """The done-when checks, as booleans with their figures."""
    out = {}
    if runs:
        peaks = [r["client_rss_peak_mb"] for r in runs]
        out["client_peak_ratio"] = max(peaks) / min(peaks)
        out["client_peak_within_1_2"] = out["client_peak_ratio"] <= 1.2
        shares = [
            d["share_at_least_threads"]
            for r in runs
            for d in r["in_flight"].values()
            if "share_at_least_threads" in d
        ]
        out["least_share_in_flight_at_least_threads"] = min(shares) if shares else None
    if fit:
        out["fit_within_20_min"] = fit["fit_s"] <= 1200
        out["fit_client_growth_within_2gb"] = fit["client_rss_growth_mb"] <= 2048
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--tiles", type=int, default=400, help="tiles at 1× (a square number)")
    ap.add_argument("--dates", type=int, default=24, help="dates per granule")
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--sample-pixels", type=int, default=50_000)
    ap.add_argument("--fit-cells", type=int, default=4_200_000)
    ap.add_argument("--fit-clusters", type=int, default=150, help="columns = 3 × this")
    ap.add_argument("--fit-chunk", type=int, default=100_000, help="rows per block")
    ap.add_argument("--unknown", type=float, default=0.05, help="share of unknown cells")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument(
        "--tracemalloc",
        type=int,
        nargs="*",
        default=[],
        help="sizes run under tracemalloc (it slows the client process and the scheduler in it)",
    )
    ap.add_argument("--out", default=str(HERE / "continent.json"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="popdask-continent-"))
    if args.child:
        if args.child == "fit":
            doc = fit_benchmark(args)
        else:
            size = int(args.child.removeprefix("size"))
            doc = run_size(size, work / f"{size}x", args)
        Path(args.child_out).write_text(json.dumps(doc, indent=2, default=str))
        return doc

    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    runs = [in_child(f"size{size}", work, passed) for size in args.sizes]
    fit = None if args.skip_fit else in_child("fit", work, passed)
    doc = {
        "machine": {"cores": os.cpu_count()},
        "workers": 2,
        "threads_per_worker": 1,
        "grid": {"resolution": RESOLUTION, "cell": CELL, "tile": TILE},
        "granule_m": GRANULE,
        "granule_stride_m": STRIDE,
        "runs": runs,
        "densities_fit": fit,
        "checks": checks(runs, fit),
    }
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
    print_table(runs, fit)
    print("\nchecks:", json.dumps(doc["checks"]))
    return doc


if __name__ == "__main__":
    main()
