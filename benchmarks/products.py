"""The products of a finished demo store, checked: export, census variables, people per
polygon, intervals (issue "Products people use").

Usage::

    popdask demo --out demo                      # first: the 20 km demo (all products on)
    python benchmarks/products.py demo           # then: its figures

Prints, for the demo store in ``DIR/popdask-demo.zarr``:

- **export**: COGs written and valid (rio-cogeo's validator, strict), the exported
  population's sum against the store's, the largest overview-sum gap of a count layer;
- **census variables**: for each ``population_by`` layer, the largest relative gap between
  its cell sums and the cell's reconciled value (``census_by``), and, where the published
  breakdown adds up to the total, against the published value; the largest pixel-by-pixel
  gap between a breakdown's layers summed and the population layer;
- **people per polygon**: ``popdask.aggregate`` over 300 random polygons (EPSG:4326, 0.3–4 km
  across, cut by the tiles) against the same sums computed another way (each 20 m pixel's
  square intersected with the polygon by shapely), the largest relative gap;
- **intervals**: their empirical coverage of the demo's truth at 100 m and 1 km, from the
  run's ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def export_figures(path: str, out: str, client) -> dict:
    from popdask.exporter import export

    layers = ["population", "density", "population_lower", "population_upper"]
    r = export(path, out, layers, client=client)
    pop = r.layers["population"]
    total = float(np.nansum(_store(path).population.values, dtype=np.float64))
    return {
        "cogs": sum(s["files"] for s in r.layers.values()),
        "cogs_failing_validation": len(r.failed),
        "population_sum_relative_gap": abs(pop["sum"] / total - 1),
        "overview_sum_gap": max(s.get("overview_gap", 0.0) for s in r.layers.values()),
        "seconds": round(r.seconds, 1),
    }


def variable_figures(path: str, census_csv: Path) -> dict:
    import pandas as pd

    from popdask.census import parse_grd_id

    ds = _store(path)
    names = list(ds.population_by["variable"].values)
    by, pop = ds.population_by.values.astype(np.float64), ds.population.values.astype(np.float64)
    cpx = ds.sizes["y"] // ds.sizes["y_cell"]
    cells = by.reshape(len(names), ds.sizes["y_cell"], cpx, ds.sizes["x_cell"], cpx).sum((2, 4))
    used = ds.census_by.values.astype(np.float64)
    known = np.isfinite(used) & np.isfinite(ds.census.values)[None] & (used > 0)
    table = pd.read_csv(census_csv)
    ids = parse_grd_id(table["GRD_ID"])
    x0, y1 = float(ds.x_cell[0]) - 500, float(ds.y_cell[0]) + 500
    row = ((y1 - 1000 - ids["y_llc"]) // 1000).to_numpy(int)
    col = ((ids["x_llc"] - x0) // 1000).to_numpy(int)
    published_gap = 0.0
    for members in (["M", "F"], ["Y_LT15", "Y_1564", "Y_GE65"]):
        adds = (table[members].sum(axis=1) == table["TOT_P_2021"]) & (table.CONFIDENTIALSTATUS == 0)
        for m in members:
            got = cells[names.index(m)][row[adds], col[adds]]
            want = table.loc[adds, m].to_numpy(float)
            ok = want > 0
            published_gap = max(published_gap, float(np.max(np.abs(got[ok] / want[ok] - 1))))
    pixel_gap = max(
        float(np.max(np.abs(by[[names.index(m) for m in members]].sum(axis=0) - pop)))
        for members in (["M", "F"], ["Y_LT15", "Y_1564", "Y_GE65"])
    )
    return {
        "variables": len(names),
        "cell_gap_vs_reconciled": float(np.max(np.abs(cells[known] / used[known] - 1))),
        "cell_gap_vs_published_where_it_adds_up": published_gap,
        "breakdown_vs_population_max_pixel_gap": pixel_gap,
        "reconciled_cell_breakdowns": int(ds.census_by.attrs["reconciled"]),
    }


def aggregate_figures(path: str, work: Path, client, n: int = 300, seed: int = 0) -> dict:
    import geopandas as gpd
    import shapely
    from pyproj import Transformer

    import popdask

    ds = _store(path)
    rng = np.random.default_rng(seed)
    xmin, xmax = float(ds.x.min()) - 10, float(ds.x.max()) + 10
    ymin, ymax = float(ds.y.min()) - 10, float(ds.y.max()) + 10
    polys = []
    for _ in range(n):
        cx, cy = rng.uniform(xmin, xmax), rng.uniform(ymin, ymax)
        r = rng.uniform(150, 2000)
        a = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 9)))
        polys.append(shapely.Polygon(np.c_[cx + r * np.cos(a), cy + r * np.sin(a)]))
    to_ll = Transformer.from_crs(3035, 4326, always_xy=True)
    lonlat = [shapely.transform(p, lambda c: np.c_[to_ll.transform(*c.T)]) for p in polys]
    zones = gpd.GeoDataFrame({"zone": range(n)}, geometry=lonlat, crs=4326)
    zones.to_file(work / "zones.gpkg")
    got = popdask.aggregate(path, work / "zones.gpkg", client=client)
    # the same sums another way: every pixel square against the polygon as the file holds it
    back = Transformer.from_crs(4326, 3035, always_xy=True)
    pop = ds.population.values.astype(np.float64)
    xs, ys = ds.x.values, ds.y.values
    gaps = []
    for i, geom in enumerate(zones.geometry):
        p = shapely.transform(geom, lambda c: np.c_[back.transform(*c.T)])
        x0, y0, x1, y1 = p.bounds
        cols = np.flatnonzero((xs + 10 > x0) & (xs - 10 < x1))
        rows = np.flatnonzero((ys + 10 > y0) & (ys - 10 < y1))
        if not len(cols) or not len(rows):
            want = 0.0
        else:
            gx, gy = np.meshgrid(xs[cols], ys[rows])
            boxes = shapely.box(gx - 10, gy - 10, gx + 10, gy + 10)
            share = shapely.area(shapely.intersection(boxes, p)) / 400.0
            want = float(np.nansum(share * pop[np.ix_(rows, cols)]))
        have = float(got.loc[got.zone == i, "population"].iloc[0])
        if want > 1:
            gaps.append(abs(have / want - 1))
    return {"polygons": n, "max_relative_gap": float(max(gaps)), "compared": len(gaps)}


def _store(path: str):
    from popdask import store

    return store.open_store(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", help="the folder of `popdask demo --out`")
    args = ap.parse_args()
    from distributed import Client, LocalCluster

    demo = Path(args.demo)
    path = str(demo / "popdask-demo.zarr")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
        tempfile.TemporaryDirectory() as tmp,
    ):
        figures = {
            "export": export_figures(path, str(Path(tmp) / "export"), client),
            "census_variables": variable_figures(path, demo / "data" / "census.csv"),
            "aggregate": aggregate_figures(path, Path(tmp), client),
        }
    metrics = json.loads((demo / "metrics.json").read_text())
    figures["intervals"] = {k: v for k, v in metrics.items() if k.startswith("interval_")}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
