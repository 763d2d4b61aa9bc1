"""Where one tile of the composite pass spends its time, before and after the fast paths.

Usage::

    python benchmarks/composite_profile.py                       # generates a 10 km region
    python benchmarks/composite_profile.py --data /tmp/bench/w1/10km/data --reps 5

Runs in one process with dask's synchronous scheduler on the first tile of a region made by
:func:`popdask.synthetic.make_demo_region` (served by a real STAC API on loopback), and
prints min-of-``reps`` seconds per stage:

- **graph**: STAC items → stackstac → kernels → Zarr write, built but not computed;
- **open** / **read**: GDAL opens, then warped reads, of every asset of the tile, per
  source (Sentinel-2 and Sentinel-1 granules are UTM, VIIRS is lon/lat: all are warped
  onto the EPSG:3035 grid);
- **scale+mask+mosaic**, **median**, **dB**: the per-pixel kernels on in-memory stacks;
- **zarr write** of the composite;
- **tile**: the whole tile end to end (graph + compute + write).

"before" is stackstac's masked warped read per asset (``AutoParallelRioReader``) and the
step-by-step NumPy kernels popdask had (scaled float copy, ``np.delete``, broadcast mask,
``mosaic_by_group``, ``np.nanmedian``); "after" is :class:`popdask.reader.ClosingReader`
(index-map gather for nearest reads) and :mod:`popdask.composite` as it is. The composites
of both are compared (they must be identical).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ORIGIN = (4321000, 3210000)


# --------------------------------------------------------------------------------------
# "before": the kernels and the read as they were
# --------------------------------------------------------------------------------------
def reference_nanmedian(stack):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(stack, axis=0).astype(np.float32, copy=False)


def reference_scale_mask(stack, scale, offset, mask_band=None, mask_values=()):
    data = stack.astype(np.float32, copy=True)
    data *= np.asarray(scale, np.float32)[:, :, None, None]
    data += np.asarray(offset, np.float32)[:, :, None, None]
    if mask_band is not None:
        scl = stack[:, mask_band]
        bad = np.isnan(scl) | np.isin(scl, np.asarray(mask_values, np.float32))
        data = np.delete(data, mask_band, axis=1)
        data[np.broadcast_to(bad[:, None], data.shape)] = np.nan
    return data


def reference_optical(stack, *, groups, scale, offset, mask_band=None, mask_values=()):
    from popdask.composite import mosaic_by_group

    data = reference_scale_mask(stack, scale, offset, mask_band, mask_values)
    return reference_nanmedian(mosaic_by_group(data, groups))


def reference_median(stack, *, groups, scale=None, offset=None):
    from popdask.composite import mosaic_by_group

    data = stack * np.asarray(scale, np.float32)[:, :, None, None]
    data += np.asarray(offset, np.float32)[:, :, None, None]
    return reference_nanmedian(mosaic_by_group(data, groups))


def reference_radar(stack, *, groups, scale=None, offset=None):
    med = reference_median(stack, groups=groups, scale=scale, offset=offset)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (10.0 * np.log10(np.maximum(med, 1e-6))).astype(np.float32)


def _reader_classes():
    from stackstac.rio_reader import AutoParallelRioReader

    from popdask.reader import ClosingReader

    class Timed:
        opens = 0.0
        reads = 0.0
        n = 0

        def _open(self):
            t = time.perf_counter()
            try:
                return super()._open()
            finally:
                Timed.opens += time.perf_counter() - t

        def read(self, window, **kwargs):
            t = time.perf_counter()
            try:
                return super().read(window, **kwargs)
            finally:
                Timed.reads += time.perf_counter() - t
                Timed.n += 1

    class BeforeReader(ClosingReader):
        """ClosingReader (close, retries) over stackstac's own open and masked warped read."""

        def _open(self):
            return AutoParallelRioReader._open(self)

        def _read_once(self, window, **kwargs):
            return AutoParallelRioReader.read(self, window, **kwargs)

    class TimedBefore(Timed, BeforeReader):
        pass

    class TimedAfter(Timed, ClosingReader):
        pass

    return Timed, BeforeReader, TimedBefore, TimedAfter


@contextlib.contextmanager
def before_path(reader_cls):
    """Run ``tile_composite`` with the old kernels and stackstac's read."""
    from popdask import composite, sources

    saved = (
        composite.optical_composite,
        composite.radar_composite,
        composite.median_composite,
        sources.reader_for,
    )
    composite.optical_composite = reference_optical
    composite.radar_composite = reference_radar
    composite.median_composite = reference_median
    sources.reader_for = lambda sign: reader_cls
    try:
        yield
    finally:
        (
            composite.optical_composite,
            composite.radar_composite,
            composite.median_composite,
            sources.reader_for,
        ) = saved


# --------------------------------------------------------------------------------------
# The tile
# --------------------------------------------------------------------------------------
def region_from(data: Path | None, work: Path, size_km: int):
    from popdask.synthetic import DemoRegion, make_demo_region

    x0, y0 = ORIGIN
    bbox = (x0, y0, x0 + size_km * 1000, y0 + size_km * 1000)
    if data is None:
        return make_demo_region(work / "data", bbox=bbox, seed=0)
    cols = {p.stem: p for p in (data / "collections").glob("*.json")}
    items = {p.stem: p for p in (data / "items").glob("*.ndjson")}
    return DemoRegion(data, bbox, cols, items, data / "census.csv", data / "truth.tif")


def best(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def kernel_times(src, stack, items, assets, reps: int, res: dict):
    """Time the kernels of one source on its in-memory stack; the old and new composites."""
    from popdask import composite as comp
    from popdask.sources import day_groups, scale_offset

    groups = day_groups(items)
    scale, offset = scale_offset(items, assets, name=src.name, scale=src.config.scale)
    if src.name != "sentinel2":
        before = reference_radar if src.name == "sentinel1" else reference_median
        after = comp.radar_composite if src.name == "sentinel1" else comp.median_composite
        kw = {"groups": groups, "scale": scale, "offset": offset}
        res[f"before {src.name} kernel"], ref = best(lambda: before(stack, **kw), reps)
        res[f"after {src.name} kernel"], new = best(lambda: after(stack, **kw), reps)
        if src.name == "sentinel1":
            med = comp.nanmedian_time(stack)
            res["sentinel1 dB"] = best(
                lambda: (10.0 * np.log10(np.maximum(med, 1e-6))).astype(np.float32), reps
            )[0]
        return ref, new
    nb = len(src.bands)
    kw = {"mask_band": nb, "mask_values": tuple(src.config.mask_values)}
    t, data = best(lambda: reference_scale_mask(stack, scale, offset, **kw), reps)
    res["before sentinel2 scale+mask"] = t
    t, days = best(lambda: comp.mosaic_by_group(data, groups), reps)
    res["before sentinel2 mosaic"] = t
    res["before sentinel2 median"] = best(lambda: reference_nanmedian(days), reps)[0]
    scl = stack[:, nb]
    valid = ~(np.isnan(scl) | np.isin(scl, np.float32(kw["mask_values"])))
    t, days1 = best(
        lambda: comp.mosaic_scaled(
            stack, groups, bands=np.arange(nb), scale=scale, offset=offset, valid=valid
        ),
        reps,
    )
    res["after sentinel2 scale+mask+mosaic"] = t
    res["after sentinel2 median"] = best(lambda: comp.nanmedian_time(days1), reps)[0]
    args = {"groups": groups, "scale": scale, "offset": offset, **kw}
    res["before sentinel2 kernel"], ref = best(lambda: reference_optical(stack, **args), reps)
    res["after sentinel2 kernel"], new = best(lambda: comp.optical_composite(stack, **args), reps)
    return ref, new


def profile(region, work: Path, reps: int) -> dict:
    import dask

    from popdask import store
    from popdask.census import read_census
    from popdask.config import config_from_dict
    from popdask.demo import demo_config
    from popdask.sources import (
        DEFAULT_RESAMPLING,
        load_stack,
        region_lonlat,
        search_sources,
        tile_composite,
    )
    from popdask.stac_server import StacServer

    out_dir = work / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    with StacServer(
        list(region.collections.values()), list(region.items.values()), cwd=region.root
    ) as server:
        cfg = config_from_dict(demo_config(region, server.url, out_dir))
        grid = cfg.make_grid()
        sources = search_sources(cfg, region_lonlat(grid))
    census = read_census(cfg.census.path, grid, column=cfg.census.column)
    bands = [b for s in sources for b in s.bands]
    kinds = [s.role for s in sources for _ in s.bands]
    path = cfg.output.store
    store.create(path, grid, bands=bands, kinds=kinds, census=census, attrs={})
    tile = grid.tiles()[0]
    Timed, BeforeReader, TimedBefore, TimedAfter = _reader_classes()
    res: dict = {"tile": tile.id, "reps": reps}

    def build():
        data, *_ = tile_composite(sources, tile.bounds, resolution=grid.resolution)
        return store.write_tile(path, tile, {"composite": (("band", "y", "x"), data)})

    def whole_tile():
        dask.compute(build())
        return store.open_group(path, mode="r")["composite"][:, tile.ys, tile.xs]

    with dask.config.set(scheduler="synchronous"):
        res["graph"] = best(build, reps)[0]
        # reads per source, before and after
        stacks = {}
        for label, cls in (("before", TimedBefore), ("after", TimedAfter)):
            for src in sources:
                items = src.for_bounds(tile.bounds)
                cfg_s = src.config
                assets = [*cfg_s.assets, *([cfg_s.mask_asset] if cfg_s.mask_asset else [])]
                times = []
                for _ in range(reps):
                    Timed.opens = Timed.reads = 0.0
                    Timed.n = 0
                    stack = load_stack(
                        items,
                        assets,
                        bounds=tile.bounds,
                        resolution=grid.resolution,
                        resampling=DEFAULT_RESAMPLING[src.name],
                        reader=cls,
                    ).values
                    times.append((Timed.opens, Timed.reads - Timed.opens, Timed.n))
                opens, reads, n = min(times, key=lambda x: x[0] + x[1])
                res[f"{label} {src.name} open"] = opens
                res[f"{label} {src.name} read"] = reads
                res[f"{src.name} assets"] = n
                if label == "before":
                    stacks[src.name] = (stack, items, assets)
                else:
                    same = np.array_equal(stack, stacks[src.name][0], equal_nan=True)
                    res[f"{src.name} read identical"] = bool(same)

        # kernels on the in-memory stacks
        composites = {}
        for src in sources:
            stack, items, assets = stacks[src.name]
            composites[src.name] = kernel_times(src, stack, items, assets, reps, res)
        for name, (ref, new) in composites.items():
            res[f"{name} composite identical"] = bool(np.array_equal(ref, new, equal_nan=True))
        allc = np.concatenate([new for _, new in composites.values()])

        def write():
            dask.compute(store.write_tile(path, tile, {"composite": (("band", "y", "x"), allc)}))

        res["zarr write"] = best(write, reps)[0]

        # whole tile, end to end
        with before_path(BeforeReader):
            res["before tile"], old = best(whole_tile, reps)
        res["after tile"], new = best(whole_tile, reps)
        res["tile composite identical"] = bool(np.array_equal(old, new, equal_nan=True))
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a make_demo_region folder (default: generate)")
    p.add_argument("--size-km", type=int, default=10, help="region size when generating")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        region = region_from(args.data, work, args.size_km)
        res = profile(region, work, args.reps)
    width = max(len(k) for k in res)
    print(f"tile {res['tile']}, min of {res['reps']} runs, one process, synchronous scheduler")
    for k, v in res.items():
        if k in ("tile", "reps"):
            continue
        shown = f"{v:8.3f} s" if isinstance(v, float) else str(v)
        print(f"  {k:<{width}}  {shown}")
    return res


if __name__ == "__main__":
    main()
