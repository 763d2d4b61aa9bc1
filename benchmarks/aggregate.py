"""How ``popdask aggregate`` scales: client memory against tiles and polygons, and its totals.

Usage::

    python benchmarks/aggregate.py                          # 40, 80, 160 km; 2,000 polygons
    python benchmarks/aggregate.py --sizes 40 --polygons 2000 20000

For each region side (km) a store of 10 km tiles (500 × 500 px of 20 m) is written
directly (:func:`build_store`: random people per pixel with a hole of no data, every tile
complete; ``aggregate`` reads only ``population``, so the composite and model passes are
left out) and, for each polygon count, zones covering the region: the Voronoi cells of
random points cut to the region (so their sum is the store's total), saved as a GeoPackage
in EPSG:4326, which aggregate reads and reprojects like a user's file.

With ``--pipeline`` the store is that of a real run instead (:func:`pipeline_store`: the
generated demo region, its STAC API on loopback, every pass of the pipeline).

Each (region, polygons) case runs in a fresh subprocess holding the client and the
scheduler, with a LocalCluster of 2 worker processes × 1 thread, as ``popdask aggregate``
runs. Its RSS is sampled every 0.05 s (``psutil``), with the workers' RSS: before the call
(cluster up, and a first call on one polygon made, so the modules are imported on the
client and the workers), its peak during the call, and the call's wall time. The
totals check: the polygons tile the region, so their ``population`` must add up to the
store's ``nansum`` (read with xarray).

Prints a table and writes ``benchmarks/aggregate.json`` (``--out``). The committed file
holds a run with ``--pipeline --sizes 40`` (the store took 189 s to build here) and one
without, on the shared 2-core machine (times vary with its load by up to 2×):

| region | tiles | polygons | s | client MB: before / peak / growth | worker peak MB | vs store |
|---|---|---|---|---|---|---|
| 40 km, real run | 16 | 2,000 | 0.55 | 321.2 / 323.4 / 2.2 | 274.5 | 1.6e-09 |
| 40 km, real run | 16 | 20,000 | 3.56 | 320.7 / 351.6 / 30.9 | 277.0 | 1.6e-09 |
| 40 km | 16 | 2,000 | 0.96 | 320.7 / 323.0 / 2.3 | 275.2 | 5.7e-09 |
| 40 km | 16 | 20,000 | 3.17 | 320.2 / 351.0 / 30.8 | 277.1 | 5.6e-09 |
| 80 km | 64 | 2,000 | 1.42 | 320.8 / 323.4 / 2.6 | 274.0 | 3.1e-09 |
| 80 km | 64 | 20,000 | 3.74 | 320.7 / 351.9 / 31.2 | 276.3 | 3.1e-09 |
| 160 km | 256 | 2,000 | 3.3 | 320.9 / 324.5 / 3.5 | 274.9 | 1.5e-09 |
| 160 km | 256 | 20,000 | 8.27 | 321.1 / 353.4 / 32.2 | 275.8 | 1.5e-09 |

The client grows with the polygons (about 1.5 KB each: the zones, their EPSG:3035 copy,
the rows of sums), not with the tiles (16 → 256: +2.3 → +3.5 MB for 2,000 polygons); a
worker's peak stays at 275 MB. The totals differ from the store's by about 1e-9 of it: the
zones' outer edge, reprojected to EPSG:4326 and back, moves by a fraction of a millimetre
(the difference grows with the region's perimeter, not with its tiles).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ORIGIN = (4321000, 3210000)


def build_store(path: str, side_km: int, seed: int = 0) -> None:
    """A finished store of ``side_km`` × ``side_km`` in 10 km tiles, people per pixel only."""
    import xarray as xr

    from popdask import store
    from popdask.grid import Grid

    x0, y0 = ORIGIN
    grid = Grid.from_bbox((x0, y0, x0 + side_km * 1000, y0 + side_km * 1000), tile=10000)
    census = xr.DataArray(
        np.full(grid.cell_shape, np.nan, np.float32),
        dims=("y_cell", "x_cell"),
        coords=grid.cell_coords(),
    )
    store.create(path, grid, bands=["B02"], kinds=["reflectance"], census=census, attrs={})
    rng = np.random.default_rng(seed)
    for tile in grid.tiles():
        pop = rng.gamma(0.5, 1.0, tile.shape).astype(np.float32)
        if tile.row == tile.col == 0:
            pop[:200, :300] = np.nan  # no data in a corner
        store.write_arrays(path, tile, {"population": pop})
    store.set_status(path, grid.tiles(), store.COMPLETE)


def pipeline_store(side_km: int, work: Path, seed: int = 0) -> str:
    """The store of a real run (``--pipeline``): the generated demo region of ``side_km``
    (:mod:`popdask.synthetic`, as ``benchmarks/scale.py`` generates it) served by a STAC API
    on loopback and run by :func:`popdask.pipeline.run` on 2 workers × 1 thread."""
    from popdask.cluster import get_client
    from popdask.config import ClusterConfig, config_from_dict
    from popdask.demo import demo_config
    from popdask.pipeline import run
    from popdask.stac_server import StacServer
    from popdask.synthetic import make_demo_region

    x0, y0 = ORIGIN
    bbox = (x0, y0, x0 + side_km * 1000, y0 + side_km * 1000)
    region = make_demo_region(work / f"data{side_km}", bbox=bbox, seed=seed)
    out = work / f"run{side_km}"
    with StacServer(
        list(region.collections.values()), list(region.items.values()), cwd=region.root
    ) as server:
        cfg = config_from_dict(demo_config(region, server.url, out))
        with get_client(ClusterConfig(workers=2, threads_per_worker=1)) as client:
            return run(cfg, client=client, progress=False).path


def make_zones(path: str, side_km: int, n: int, seed: int = 0) -> None:
    """``n`` Voronoi cells of random points, cut to the region, as a GeoPackage in
    EPSG:4326."""
    import geopandas as gpd
    import shapely

    x0, y0 = ORIGIN
    side = side_km * 1000
    region = shapely.box(x0, y0, x0 + side, y0 + side)
    rng = np.random.default_rng(seed)
    points = shapely.multipoints(rng.uniform((x0, y0), (x0 + side, y0 + side), (n, 2)))
    cells = shapely.get_parts(shapely.voronoi_polygons(points, extend_to=region))
    cells = shapely.intersection(cells, region)
    zones = gpd.GeoDataFrame(
        {"zone_id": np.arange(len(cells)), "name": [f"zone {i}" for i in range(len(cells))]},
        geometry=cells,
        crs=3035,
    ).to_crs(4326)
    zones.to_file(path, layer="zones", engine="pyogrio")


class Peak:
    """Peak RSS of this process and of its children, sampled in a thread."""

    def __init__(self, every: float = 0.05) -> None:
        import psutil

        self.proc, self.every = psutil.Process(), every
        self.client = self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        workers = 0
        for child in self.proc.children(recursive=True):
            try:
                workers = max(workers, child.memory_info().rss)
            except Exception:  # a child that just ended
                pass
        return self.proc.memory_info().rss, workers

    def _run(self) -> None:
        while not self._stop.is_set():
            c, w = self._sample()
            self.client, self.workers = max(self.client, c), max(self.workers, w)
            time.sleep(self.every)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(store_path: str, zones_path: str) -> dict:
    """One case, in this (fresh) process: aggregate's wall time, client and worker RSS."""
    import gc
    import logging
    import warnings

    import geopandas as gpd
    from distributed import Client, LocalCluster

    import popdask
    from popdask.cluster import worker_environ

    logging.getLogger("distributed").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    with (
        worker_environ(),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        # a first call on one polygon: the imports (client and workers) are not the call's
        one = gpd.read_file(zones_path, engine="pyogrio", rows=1)
        popdask.aggregate(store_path, one, client=client)
        del one
        gc.collect()
        idle = Peak()._sample()
        with Peak() as peak:
            t = time.perf_counter()
            table = popdask.aggregate(store_path, zones_path, client=client)
            seconds = time.perf_counter() - t
        total = float(table["population"].sum())
    import xarray as xr

    pop = xr.open_zarr(store_path, consolidated=False)["population"].values
    stored = float(np.nansum(pop, dtype=np.float64))
    return {
        "polygons": len(table),
        "seconds": round(seconds, 2),
        "client_before_mb": round(idle[0] / 2**20, 1),
        "client_peak_mb": round(peak.client / 2**20, 1),
        "client_growth_mb": round((peak.client - idle[0]) / 2**20, 1),
        "worker_peak_mb": round(peak.workers / 2**20, 1),
        "sum_population": total,
        "store_nansum": stored,
        "relative_difference": abs(total - stored) / stored,
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[40, 80, 160], help="region side, km")
    ap.add_argument("--polygons", type=int, nargs="+", default=[2000])
    ap.add_argument(
        "--pipeline", action="store_true", help="stores of real runs (slow) instead of written"
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(HERE / "aggregate.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # measure(store, zones)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child)))
        return []
    work = Path(args.workdir or tempfile.mkdtemp(prefix="popdask-aggregate-"))
    rows = []
    for size in args.sizes:
        store_path = str(work / f"region{size}.zarr")
        if args.pipeline:
            t = time.perf_counter()
            store_path = pipeline_store(size, work)
            print(f"run {size} km: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        elif not Path(store_path).exists():
            t = time.perf_counter()
            build_store(store_path, size)
            print(f"store {size} km: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for n in args.polygons:
            zones_path = str(work / f"zones{size}_{n}.gpkg")
            if not Path(zones_path).exists():
                make_zones(zones_path, size, n)
            done = subprocess.run(
                [sys.executable, __file__, "--child", store_path, zones_path],
                check=True,
                capture_output=True,
                text=True,
            )
            row = {"side_km": size, "tiles": (size // 10) ** 2, "pipeline": args.pipeline}
            row.update(json.loads(done.stdout))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print_table(rows)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| region | tiles | polygons | time (s) | client before / peak / growth (MB) "
        "| worker peak (MB) | Σ polygons vs store |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['side_km']} km | {r['tiles']} | {r['polygons']:,} | {r['seconds']} | "
            f"{r['client_before_mb']} / {r['client_peak_mb']} / {r['client_growth_mb']} | "
            f"{r['worker_peak_mb']} | {r['relative_difference']:.1e} |"
        )


if __name__ == "__main__":
    main()
