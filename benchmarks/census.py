"""The census of a continent, from its file into the store: client memory and time.

Usage::

    python benchmarks/census.py                  # 42,000 tiles of 10 km (4.2 M cells)
    python benchmarks/census.py --tiles 4200     # a tenth of it

A GISCO-like table is generated over a region of ``--tiles`` 10 km tiles (100 census cells
each): every cell on "land" (inside a coverage polygon of ~20,000 vertices that wiggles
across the region) is listed with a count, 1 % of them flagged confidential, as Parquet with
``GRD_ID`` strings, in random row order. Each way of reading it runs in its own subprocess,
so its peak RSS (``ru_maxrss``) is its own:

- ``whole``: the table read whole (``pandas.read_parquet``) and classified on the whole
  region at once (:func:`popdask.census.classify_cells` with the region's coverage), which
  is what a run did before the census was streamed (and :func:`popdask.census.read_census`
  still does for small regions);
- ``streamed``: what a run does now: :func:`popdask.census_blocks.stage_from_config` (batches
  of rows, spilled per block, blocks classified on their own window of the coverage) and
  :func:`popdask.store.create` writing the blocks into a local store.

Prints the peak RSS (sampled every 20 ms) above the RSS at the start (imports and first
uses done on a table of three rows), the wall time, and
checks that both give the same census (cells, known cells, sum).
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

TILE, CELL = 10_000, 1000
X0, Y0 = 3_000_000, 2_000_000


def generate(root: Path, tiles: int, seed: int = 0) -> dict:
    """Write ``census.parquet`` and ``coverage.geojson`` for a square-ish region."""
    import pandas as pd

    from popdask.grid import cell_id

    cols = int(np.ceil(np.sqrt(tiles)))
    rows = int(np.ceil(tiles / cols))
    bbox = (X0, Y0, X0 + cols * TILE, Y0 + rows * TILE)
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    # a wiggly "coast": land below a curve of 20,000 vertices across the region
    t = np.linspace(0, 1, 20_000)
    coast_y = Y0 + h * (0.75 + 0.2 * np.sin(40 * np.pi * t) * np.cos(7 * np.pi * t))
    ring = [[X0 - 1000, Y0 - 1000], *zip(X0 + w * t, coast_y, strict=True)]
    ring += [[X0 + w + 1000, Y0 - 1000], [X0 - 1000, Y0 - 1000]]
    poly = {"type": "Polygon", "coordinates": [[[float(a), float(b)] for a, b in ring]]}
    coverage = root / "coverage.geojson"
    coverage.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "crs": {"type": "name", "properties": {"name": "EPSG:3035"}},
                "features": [{"type": "Feature", "properties": {}, "geometry": poly}],
            }
        )
    )
    rng = np.random.default_rng(seed)
    nx, ny = w // CELL, h // CELL
    ix, iy = np.meshgrid(np.arange(nx), np.arange(ny))
    x = X0 + ix.ravel() * CELL
    y = Y0 + iy.ravel() * CELL
    frac = (x + CELL / 2 - X0) / w
    land_y = Y0 + h * (0.75 + 0.2 * np.sin(40 * np.pi * frac) * np.cos(7 * np.pi * frac))
    keep = (y + CELL / 2 < land_y) & (rng.random(x.size) < 0.5)  # populated land cells
    x, y = x[keep], y[keep]
    order = rng.permutation(x.size)
    x, y = x[order], y[order]
    table = pd.DataFrame(
        {
            "GRD_ID": [cell_id(a, b) for a, b in zip(x.tolist(), y.tolist(), strict=True)],
            "T": rng.gamma(0.5, 400.0, x.size).round(),
            "CONFIDENTIALSTATUS": (rng.random(x.size) < 0.01).astype(np.int8),
        }
    )
    path = root / "census.parquet"
    table.to_parquet(path)
    return {"bbox": bbox, "census": str(path), "coverage": str(coverage), "rows": len(table)}


class PeakRSS:
    """The process's largest RSS above its RSS at the start, sampled every 20 ms."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.mb = (self.peak - self.base) / 2**20


def measure(region: dict, way: str, out: str) -> dict:
    """One way of reading the census, in this process (a fresh subprocess)."""
    from popdask.config import CensusConfig
    from popdask.grid import Grid

    grid = Grid.from_bbox(region["bbox"], tile=TILE, cell=CELL)
    cfg = CensusConfig(path=region["census"], column="T", coverage=region["coverage"])
    _warm_up(region, out + ".warm")  # the libraries' imports and first-use costs
    t = time.perf_counter()
    with PeakRSS() as rss:
        finite = _read(way, cfg, grid, out)
    seconds = time.perf_counter() - t
    total = float(sum(np.nansum(block) for block in _blocks(out, grid)))
    return {
        "way": way,
        "seconds": round(seconds, 2),
        "peak_mb": round(rss.mb, 1),
        "cells": grid.cell_shape[0] * grid.cell_shape[1],
        "finite": finite,
        "sum": total,
    }


def _read(way: str, cfg, grid, out: str) -> int:
    """Read the census one way and store it at ``out``; the finite (usable) cells."""
    import pandas as pd
    import xarray as xr

    from popdask import census, census_blocks, store

    kw = dict(bands=["B02"], kinds=["reflectance"], attrs={})
    if way == "whole":
        covered = census.read_coverage(cfg.coverage, grid)
        table = pd.read_parquet(cfg.path)
        cells = census.parse_grd_id(table["GRD_ID"])
        raster, _ = census.classify_cells(
            cells["x_llc"].to_numpy(),
            cells["y_llc"].to_numpy(),
            table["T"].to_numpy(float),
            grid,
            covered=covered,
            flagged=census.flag_values(table["CONFIDENTIALSTATUS"]),
        )
        da = xr.DataArray(raster, dims=("y_cell", "x_cell"), coords=grid.cell_coords())
        store.create(out, grid, census=da, **kw)
        return int(np.isfinite(raster).sum())
    with census_blocks.stage_from_config(cfg, grid) as staged:
        store.create(out, grid, census=staged, **kw)
        return staged.finite_cells


def _warm_up(region: dict, out: str) -> None:
    """Both ways' code paths once on one tile and a table of three rows (not the region's:
    the process's peak RSS must not include it), so the peak measures the data, not the
    imports."""
    import pandas as pd

    from popdask import census_blocks, store
    from popdask.config import CensusConfig
    from popdask.grid import Grid, cell_id

    x0, y0 = region["bbox"][:2]
    tiny = Grid.from_bbox((x0, y0, x0 + TILE, y0 + TILE), tile=TILE, cell=CELL)
    ids = [cell_id(x0 + i * CELL, y0) for i in range(3)]
    small = pd.DataFrame({"GRD_ID": ids, "T": [1.0, 2.0, 3.0], "CONFIDENTIALSTATUS": 0})
    small.to_parquet(out + ".parquet")
    pd.read_parquet(out + ".parquet")
    cfg = CensusConfig(path=out + ".parquet", column="T", coverage=region["coverage"])
    with census_blocks.stage_from_config(cfg, tiny) as staged:
        store.create(out, tiny, bands=["B02"], kinds=["reflectance"], census=staged, attrs={})
        store.create(out + "2", tiny, bands=["B02"], kinds=["reflectance"],
                     census=staged.to_dataarray(), attrs={})  # fmt: skip


def _blocks(path: str, grid):
    """The stored census, a block at a time (the check reads it back in bounded memory)."""
    from popdask import census_blocks, store

    arr = store.open_array(path, "census", mode="r")
    for b in census_blocks.blocks(grid):
        yield arr[b.ys, b.xs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=42_000)
    ap.add_argument("--way", choices=["whole", "streamed"], help=argparse.SUPPRESS)
    ap.add_argument("--region", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.way:  # the subprocess
        region = json.loads(args.region)
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(region, args.way, str(Path(tmp) / "s.zarr"))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        region = generate(Path(tmp), args.tiles)
        took = time.perf_counter() - t
        print(f"{args.tiles} tiles, {region['rows']:,} census rows (made in {took:.0f} s)")
        results = []
        for way in ("whole", "streamed"):
            cmd = [sys.executable, __file__, "--way", way, "--region", json.dumps(region)]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{'way':<10}{'seconds':>9}{'peak MB':>10}{'cells':>11}{'finite':>11}{'sum':>15}")
    for r in results:
        print(
            f"{r['way']:<10}{r['seconds']:>9}{r['peak_mb']:>10}{r['cells']:>11,}"
            f"{r['finite']:>11,}{r['sum']:>15,.0f}"
        )
    same = results[0]["finite"] == results[1]["finite"]
    same &= abs(results[0]["sum"] - results[1]["sum"]) <= 1e-6 * abs(results[0]["sum"])
    print("same census:", same)


if __name__ == "__main__":
    main()
