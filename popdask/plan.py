"""What a run will cost, before it reads a pixel (``popdask plan CONFIG.yaml``).

A continental operator runs this before paying for 100 workers. It probes every source
(one request each: a source without any item over the region fails here), searches the
catalog of every tile, or of an evenly spread sample of tiles that is extrapolated, exactly
as the composite tasks will (:func:`popdask.catalog.tile_items`), and turns the items each
tile would composite into bytes to read, core-hours and the store's size.

The per-tile costs are those ``benchmarks/scale.py`` measured on 2 cores with local COGs
(benchmarks/README.md "Continental projection"): reads from an object store over a network
are slower, so the core-hours are a floor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from popdask import catalog
from popdask.config import Config
from popdask.grid import Grid, Tile
from popdask.sources import region_lonlat

log = logging.getLogger(__name__)

#: Core-seconds of the composite task per item composited, for a full tile of 500 × 500
#: pixels: 0.25 measured with 8 Sentinel-2 scenes of 12 assets + radar and lights (1.97
#: core-s per tile), × 0.57 for the median's sorting network and the uncopied stacks
#: (2.85 → 1.62 s per tile, benchmarks/README.md, 2026-12-05).
CORE_S_PER_ITEM_TILE = 0.14
#: Core-seconds per full tile of everything else (fit sample, labels, context, predict).
CORE_S_OTHER_TILE = 0.43
#: Bytes the store keeps per pixel: per composite band (lz4hc float32, 0.725 of raw), and
#: for the other layers together (cluster, population, density, two term layers).
STORE_BYTES_PER_BAND_PX = 2.9
STORE_BYTES_OTHER_PX = 11.0
TILE_PX = 500 * 500


@dataclass
class SourcePlan:
    """What one source's catalog gives the tiles searched."""

    items: int = 0
    found: int = 0
    bytes: float = 0.0
    most: int = 0
    tiles_without: int = 0
    named_without: list[str] = field(default_factory=list)
    bytes_estimated: bool = False  # some assets had no file:size: pixels × sample size


@dataclass
class Plan:
    tiles: int
    searched: int
    sources: dict[str, SourcePlan]
    core_hours: float
    store_bytes: float
    largest_graph: int

    @property
    def factor(self) -> float:
        """From the tiles searched to all tiles."""
        return self.tiles / max(self.searched, 1)


def _tiles_to_search(tiles: Sequence[Tile], sample: int | None) -> list[Tile]:
    if not sample or sample >= len(tiles):
        return list(tiles)
    step = len(tiles) / sample
    return [tiles[int(i * step)] for i in range(sample)]


def _asset_bytes(
    item: Mapping[str, Any], key: str, bounds: Sequence[float], resolution: float
) -> tuple[float, bool]:
    """Bytes a tile reads of one asset, and whether that was estimated from pixels.

    ``file:size`` times the share of the item's footprint the tile covers when the asset
    says its size; else the tile's pixels at the asset's own resolution (``gsd``, or its
    ``proj:transform``) times its sample size (``raster:bands`` data type, else 2 bytes):
    an uncompressed upper bound.
    """
    asset = (item.get("assets") or {}).get(key) or {}
    area = (bounds[2] - bounds[0]) * (bounds[3] - bounds[1])
    size, shape = asset.get("file:size"), asset.get("proj:shape")
    if size and shape:  # the tile's share of the asset's pixels
        transform = asset.get("proj:transform") or []
        res = abs(transform[0]) if transform else resolution
        share = min(1.0, area / (res * res * shape[0] * shape[1]))
        return float(size) * share, False
    res = asset.get("gsd") or item.get("properties", {}).get("gsd") or resolution
    if asset.get("proj:transform"):
        res = abs(asset["proj:transform"][0])
    bands = asset.get("raster:bands") or [{}]
    itemsize = {"uint8": 1, "int8": 1, "float64": 8, "float32": 4, "int32": 4, "uint32": 4}
    per = itemsize.get(bands[0].get("data_type", "uint16"), 2)
    return area / (float(res) ** 2) * per, True


def _search(src: catalog.Source, t: Tile, resolution: float) -> tuple[Tile, int, int, float, bool]:
    found = catalog.tile_items(src.name, src.config, url=src.url, bounds_3035=t.bounds)
    keys = catalog.query_of(src)["assets"]
    total, estimated = 0.0, False
    for it in found.items:
        for key in keys:
            b, est = _asset_bytes(it, key, t.bounds, resolution)
            total, estimated = total + b, estimated or est
    return t, found.kept, found.found, total, estimated


def plan(cfg: Config, *, sample: int | None = 200, threads: int = 8) -> Plan:
    """Search the catalog tile by tile (``sample`` tiles at the most, evenly spread; None
    for all) and estimate the run's reads, core-hours and store size.

    Raises
    ------
    popdask.sources.SourceError
        When a source has no item over the region at all (the message names the fix).
    """
    grid = cfg.make_grid()
    tiles = grid.tiles()
    sources = catalog.sources_of(cfg)
    bbox = region_lonlat(grid)
    for src in sources:  # one request each, before any tile is searched
        catalog.probe_source(src.name, src.config, url=src.url, bbox_lonlat=bbox)
    chosen = _tiles_to_search(tiles, sample)
    out = {s.name: SourcePlan() for s in sources}
    with ThreadPoolExecutor(threads, thread_name_prefix="popdask-plan") as pool:
        for src in sources:
            results = pool.map(lambda t, s=src: _search(s, t, grid.resolution), chosen)
            _add(out[src.name], results)
    return _costs(cfg, grid, len(chosen), out)


def _add(p: SourcePlan, results: Iterable[tuple[Tile, int, int, float, bool]]) -> None:
    for t, kept, found, nbytes, estimated in results:
        p.items += kept
        p.found += found
        p.bytes += nbytes
        p.most = max(p.most, kept)
        p.bytes_estimated |= estimated
        if kept == 0:
            p.tiles_without += 1
            if len(p.named_without) < 10:
                p.named_without.append(t.id)


def _costs(cfg: Config, grid: Grid, searched: int, sources: dict[str, SourcePlan]) -> Plan:
    tiles = grid.tiles()
    px = grid.shape[0] * grid.shape[1]
    factor = len(tiles) / max(searched, 1)
    items = sum(p.items for p in sources.values()) * factor
    full_tiles = px / TILE_PX
    core_s = items * CORE_S_PER_ITEM_TILE * (px / len(tiles)) / TILE_PX
    core_s += full_tiles * CORE_S_OTHER_TILE
    bands = sum(len(s.bands) for _, s in cfg.sources.items())
    store_bytes = px * (bands * STORE_BYTES_PER_BAND_PX + STORE_BYTES_OTHER_PX)
    # every pass submits one task per tile (popdask.tasks), whatever the region
    return Plan(len(tiles), searched, sources, core_s / 3600, store_bytes, largest_graph=1)


def format_plan(p: Plan, cfg: Config) -> str:
    """The plan as the lines ``popdask plan`` prints."""
    grid = cfg.make_grid()
    f = p.factor
    lines = [
        f"region {grid.bounds} (EPSG:3035): {grid.shape[1]} × {grid.shape[0]} px at "
        f"{grid.resolution} m, {p.tiles} tiles of {grid.tile / 1000:g} km",
        f"catalog searched for {p.searched} tiles"
        + ("" if p.searched == p.tiles else f" (an even sample; totals × {f:.3g})"),
    ]
    for name, s in p.sources.items():
        without = round(s.tiles_without * f)
        named = f" (e.g. {', '.join(s.named_without)})" if s.named_without else ""
        est = " (uncompressed estimate)" if s.bytes_estimated else ""
        lines.append(
            f"  {name}: {round(s.items * f)} items to composite ({s.items / max(p.searched, 1):.1f}"
            f" per tile, at most {s.most}; {round(s.found * f)} found), "
            f"{_size(s.bytes * f)} to read{est}; {without} tiles without any{named}"
        )
    lines += [
        f"expected: {p.core_hours:.3g} core-hours (local reads; a floor over a network), "
        f"{p.core_hours / 4:.3g} h on one 4-core worker, "
        f"{p.core_hours / 400 * 60:.3g} min on 100",
        f"store: about {_size(p.store_bytes)}",
        f"largest graph: {p.largest_graph} task per tile submitted, "
        f"{cfg.cluster.tiles_per_thread:g} tiles in flight per worker thread",
    ]
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"  # pragma: no cover
