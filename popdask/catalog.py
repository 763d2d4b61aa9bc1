"""The catalog per tile: search a tile's items, choose them per footprint, record them.

A continent is ~42,000 tiles and ~10⁶ Sentinel-2 items: no client can hold them all, and a
region-wide "N least cloudy" leaves most tiles without a scene. So each tile's composite
task searches the API for its own bbox (:func:`tile_items`), keeps per footprint (MGRS
granule and orbit, or Sentinel-1 orbit) the ``max_items`` least cloudy acquisitions
(:func:`choose_items`, pure), and records what it used in the output store
(:func:`write_tile_items`), so that a resume or a rebuild loads the same items without
searching again (:func:`load_tile_items`). :func:`composite_tile` is that task's body.

The record of one tile and source is ``catalog/{source}/{tile_id}.ndjson.gz`` in the store:
gzip'd newline-delimited JSON whose first line is a header (the query and the counts, see
:func:`read_tile_summary`) and every further line one full STAC item dict as the API gave
it, in date order. A tile searched with nothing usable has a header and no item line;
a tile not searched yet has no file.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import pystac
from pyproj import Transformer

from popdask import chunkio
from popdask import composite as comp
from popdask.config import Config, ReadConfig, SourceConfig
from popdask.grid import EPSG
from popdask.reader import count_filled
from popdask.sources import (
    CHECK_BANDS,
    SourceError,
    _conforms,
    asset_drift,
    build_composite,
    drift_message,
    filter_items,
    intersects,
    item_bounds_3035,
    item_time,
    open_catalog,
)

log = logging.getLogger(__name__)

#: Items per page asked of the API (Earth Search and the Planetary Computer serve 100+).
PAGE_LIMIT = 100
#: Retries of a failed request (429, 5xx, connection errors; see ``sources.retry_policy``).
RETRIES = 5
#: Version of the record layout (the header's ``version``).
RECORD_VERSION = 1
RECORD_TYPE = "popdask:tile-catalog"


# --------------------------------------------------------------------------------------
# What a tile uses
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One configured source as a tile task needs it: role, configuration, API root."""

    name: str
    config: SourceConfig
    url: str


def sources_of(cfg: Config) -> list[Source]:
    """The run's sources (Sentinel-2 first), each with its own API root resolved."""
    return [Source(name, src, src.url or cfg.stac.url) for name, src in cfg.sources.items()]


@dataclass
class TileItems:
    """The items one tile uses from one source, and what the search found and dropped.

    ``items`` are full STAC item dicts as the API returned them, in date order.
    ``skipped`` counts dropped items by reason (``month``, ``cloud_cover``,
    ``missing_asset``, ``outside_tile``, ``over_max_items``); ``groups`` gives, per
    footprint key, the usable items and those kept.
    """

    source: str
    items: list[dict[str, Any]]
    found: int
    skipped: dict[str, int] = field(default_factory=dict)
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    #: Items lacking configured asset keys, and what they have (:func:`asset_drift`).
    missing_assets: dict[str, Any] = field(default_factory=dict)
    #: The offset of each item checked against its pixels (:func:`offset_record`), once
    #: the tile has been composited; empty before, and for sources that are not checked.
    offset_check: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return len(self.items)

    def summary(self) -> dict[str, Any]:
        """The counts, JSON-ready (found, kept, skipped by reason, per footprint)."""
        out = {
            "found": self.found,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "groups": {k: dict(v) for k, v in self.groups.items()},
        }
        if self.missing_assets:
            out["missing_assets"] = dict(self.missing_assets)
        return out

    def pystac_items(self) -> list[pystac.Item]:
        """The items as :class:`pystac.Item` (what the loaders take)."""
        return [pystac.Item.from_dict(d) for d in self.items]


def query_of(source: Source, *, max_items: int | None = None) -> dict[str, Any]:
    """What determines a tile's items for ``source``: recorded, and compared on reload."""
    c = source.config
    return {
        "url": source.url,
        "collection": c.collection,
        "datetime": c.datetime,
        "months": c.months,
        "max_cloud_cover": c.max_cloud_cover,
        "assets": _assets(c),
        "max_items": c.max_items if max_items is None else max_items,
    }


def _assets(c: SourceConfig) -> list[str]:
    return [*c.assets, *([c.mask_asset] if c.mask_asset else [])]


# --------------------------------------------------------------------------------------
# Choosing per footprint (pure)
# --------------------------------------------------------------------------------------
def footprint_key(item: Mapping[str, Any]) -> str:
    """The footprint an item belongs to: items of one key cover (about) the same ground.

    The MGRS granule (``s2:mgrs_tile``, ``grid:code`` or the ``mgrs:`` fields) with the
    relative orbit when given (a granule at a swath edge is only partly imaged by one of
    its orbits); else the orbit (``sat:relative_orbit`` + ``sat:orbit_state``, Sentinel-1);
    else the item's bbox rounded to 0.01° (VIIRS tiles, anything else).
    """
    p = item.get("properties") or {}
    granule = p.get("s2:mgrs_tile") or p.get("grid:code")
    if not granule and p.get("mgrs:utm_zone") is not None:
        granule = f"{p['mgrs:utm_zone']}{p.get('mgrs:latitude_band', '')}"
        granule += str(p.get("mgrs:grid_square", ""))
    orbit = p.get("sat:relative_orbit")
    if granule:
        granule = str(granule).removeprefix("MGRS-")
        return f"{granule}/R{orbit}" if orbit is not None else granule
    if orbit is not None:
        return f"orbit {orbit} {p.get('sat:orbit_state', '')}".strip()
    bbox = item.get("bbox") or _geometry_bbox(item.get("geometry"))
    if not bbox:
        return f"item {item.get('id')}"
    b = (bbox[0], bbox[1], bbox[3], bbox[4]) if len(bbox) == 6 else bbox
    return "bbox " + ",".join(f"{v:.2f}" for v in b)


def _geometry_bbox(geometry: Mapping[str, Any] | None) -> list[float] | None:
    if not geometry or "coordinates" not in geometry:
        return None
    xy = np.asarray(list(_positions(geometry["coordinates"])), dtype=float)
    if not len(xy):
        return None
    return [*xy[:, :2].min(axis=0), *xy[:, :2].max(axis=0)]


def _positions(coords):
    if coords and isinstance(coords[0], (int, float)):
        yield coords
        return
    for c in coords:
        yield from _positions(c)


def _when(item: Mapping[str, Any]) -> str:
    """The item's acquisition time as a UTC ``YYYY-MM-DDTHH:MM:SS.ffffff`` string (it sorts
    as the times do, and its first 10 characters are the UTC day); "" without a date."""
    when = item_time(item.get("properties") or {})
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") if when else ""


def _cloud(item: Mapping[str, Any]) -> float:
    cc = (item.get("properties") or {}).get("eo:cloud_cover")
    return math.inf if cc is None else float(cc)


def spread(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` spread evenly (the middle of ``k`` equal parts), ``k <= n``.

    >>> spread(10, 3)
    [1, 5, 8]
    """
    return [int((i + 0.5) * n / k) for i in range(k)]


@dataclass(frozen=True)
class Choice:
    """What :func:`choose_items` kept: items in date order, counts per footprint key."""

    items: list[dict[str, Any]]
    groups: dict[str, dict[str, int]]
    dropped: int


def choose_items(items: Sequence[Mapping[str, Any]], max_items: int) -> Choice:
    """Keep, for each footprint, the ``max_items`` least cloudy acquisitions.

    Items are grouped by :func:`footprint_key`, so a tile on the edge of two granules,
    orbits or UTM zones keeps scenes of each, rather than the clearest scenes of whichever
    happens to be clearer. Within a group an acquisition is the items of one day (frames of
    one Sentinel-1 pass, a granule reprocessed twice), ranked by its cloudiest item; ties
    (no cloud cover, as for Sentinel-1 and VIIRS, or many clear scenes at 0 %) are spread
    evenly over time, since a median wants the whole period. Pure: plain item dicts in,
    no I/O.

    Parameters
    ----------
    items
        STAC item dicts (already filtered on months, cloud cover and assets).
    max_items
        Acquisitions kept per footprint.

    Returns
    -------
    Choice
        The kept items in date order (then id), per footprint key ``{"usable", "kept"}``,
        and how many were dropped by the cap.
    """
    if max_items <= 0:
        raise ValueError(f"max_items must be positive, got {max_items}")
    by_key: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for it in items:
        by_key.setdefault(footprint_key(it), {}).setdefault(_when(it)[:10], []).append(it)
    kept: list[Mapping[str, Any]] = []
    groups: dict[str, dict[str, int]] = {}
    for key in sorted(by_key):
        days = by_key[key]
        chosen = _least_cloudy([days[d] for d in sorted(days)], max_items)
        chosen_items = [it for acq in chosen for it in acq]
        kept += chosen_items
        groups[key] = {"usable": sum(map(len, days.values())), "kept": len(chosen_items)}
    kept.sort(key=lambda it: (_when(it), str(it.get("id"))))
    return Choice([dict(it) for it in kept], groups, len(items) - len(kept))


def _least_cloudy(acqs: list[list[Mapping[str, Any]]], k: int) -> list[list[Mapping[str, Any]]]:
    """The ``k`` least cloudy of ``acqs`` (in date order); ties at the cut spread in time."""
    if len(acqs) <= k:
        return acqs
    cloud = [max(_cloud(it) for it in acq) for acq in acqs]
    cut = sorted(cloud)[k - 1]
    below = [i for i, c in enumerate(cloud) if c < cut]
    tied = [i for i, c in enumerate(cloud) if c == cut]
    pick = below + [tied[j] for j in spread(len(tied), k - len(below))]
    return [acqs[i] for i in sorted(pick)]


# --------------------------------------------------------------------------------------
# Searching one tile
# --------------------------------------------------------------------------------------
_clients = threading.local()


def _client(url: str):
    """The API at ``url``, opened once per thread (a tile task then skips the landing page)."""
    cache = _clients.__dict__.setdefault("by_url", {})
    if url not in cache:
        cache[url] = open_catalog(url, retries=RETRIES)
    return cache[url]


def bounds_lonlat(bounds_3035: Sequence[float]) -> tuple[float, float, float, float]:
    """EPSG:3035 bounds as a lon/lat box (west, south, east, north) that encloses them."""
    t = Transformer.from_crs(f"EPSG:{EPSG}", "EPSG:4326", always_xy=True)
    return tuple(t.transform_bounds(*bounds_3035, densify_pts=21))  # type: ignore[return-value]


def search_items(
    url: str,
    collection: str,
    *,
    bbox_lonlat: Sequence[float],
    datetime: str | None = None,
    max_cloud_cover: float | None = None,
    limit: int = PAGE_LIMIT,
    name: str = "source",
) -> list[dict[str, Any]]:
    """Every item of ``collection`` over ``bbox_lonlat``, paged ``limit`` at a time.

    No cap on the number of items: a tile's bbox bounds the search. The cloud-cover
    ``query`` is sent only to an API that conforms to the query extension (rustac's
    in-memory server answers it with zero items); filter on the client too. An item seen
    twice (an API whose pages overlap) is kept once. Transient HTTP faults are retried
    (:func:`popdask.sources.retry_policy`).

    Raises
    ------
    SourceError
        One line naming the source, collection and API, when the search fails.
    """
    client = _client(url)
    kwargs: dict[str, Any] = {}
    if max_cloud_cover is not None and _conforms(client, "QUERY"):
        kwargs["query"] = {"eo:cloud_cover": {"lte": max_cloud_cover}}
    seen: set[tuple[str, str]] = set()
    out = []
    try:
        search = client.search(
            collections=[collection],
            bbox=list(bbox_lonlat),
            datetime=datetime,
            limit=limit,
            **kwargs,
        )
        for item in search.items_as_dicts():
            key = (str(item.get("collection")), str(item.get("id")))
            if key not in seen:
                seen.add(key)
                out.append(item)
    except Exception as e:
        raise SourceError(
            f"sources.{name}: searching collection {collection!r} at {url} failed "
            f"({type(e).__name__}: {_one_line(e)})"
        ) from e
    return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def tile_items(
    name: str,
    cfg: SourceConfig,
    *,
    url: str,
    bounds_3035: Sequence[float],
    limit: int = PAGE_LIMIT,
) -> TileItems:
    """Search one tile's items of one source and choose them (:func:`choose_items`).

    The tile's bounds become a lon/lat bbox; every page of the search is read; the items
    are filtered on the client (months, cloud cover, missing assets:
    :func:`popdask.sources.filter_items`) and on their footprint (an item whose bbox
    misses the tile in EPSG:3035 is ``outside_tile``); then each footprint keeps its
    ``cfg.max_items`` least cloudy acquisitions. Nothing is signed: hrefs are signed at
    read time.

    Raises
    ------
    SourceError
        When the search fails (after retries).
    """
    raw = search_items(
        url,
        cfg.collection,
        bbox_lonlat=bounds_lonlat(bounds_3035),
        datetime=cfg.datetime,
        max_cloud_cover=cfg.max_cloud_cover,
        limit=limit,
        name=name,
    )
    parsed = [pystac.Item.from_dict(d, migrate=False) for d in raw]  # to filter only
    kept, skipped = filter_items(
        parsed, months=cfg.months, max_cloud_cover=cfg.max_cloud_cover, assets=_assets(cfg)
    )
    index = {id(it): i for i, it in enumerate(parsed)}
    usable = [raw[index[id(it)]] for it in kept]
    if usable:
        hit = intersects(item_bounds_3035(kept), bounds_3035)
        if not hit.all():
            skipped["outside_tile"] = int((~hit).sum())
            usable = [d for d, h in zip(usable, hit, strict=True) if h]
    choice = choose_items(usable, cfg.max_items)
    if choice.dropped:
        skipped["over_max_items"] = choice.dropped
    query = query_of(Source(name, cfg, url))
    drift = asset_drift(raw, _assets(cfg)) or {}
    return TileItems(name, choice.items, len(raw), skipped, choice.groups, query, drift)


def probe_source(
    name: str, cfg: SourceConfig, *, url: str, bbox_lonlat: Sequence[float]
) -> dict[str, Any]:
    """Check that ``cfg.collection`` has an item over the region and dates: one request.

    For the start of a run (and ``popdask plan``): a single search with ``limit=1`` that
    never pages the region. Returns that item's dict.

    Raises
    ------
    SourceError
        One line naming the source, the collection, the API and the fix, when the search
        fails or finds nothing (the collection is then looked up, to say which it is).
    """
    client = _client(url)
    where = f"sources.{name}: collection {cfg.collection!r} at {url}"
    try:
        search = client.search(
            collections=[cfg.collection],
            bbox=list(bbox_lonlat),
            datetime=cfg.datetime,
            limit=1,
            max_items=1,
        )
        first = next(iter(search.items_as_dicts()), None)
    except Exception as e:
        raise SourceError(
            f"{where}: the probe search failed ({type(e).__name__}: {_one_line(e)}); check "
            f"sources.{name}.collection and the API"
        ) from e
    if first is not None:
        _check_assets(client, name, cfg, first, url=url, bbox_lonlat=bbox_lonlat)
        return first
    if not _has_collection(client, cfg.collection):
        raise SourceError(
            f"{where}: no such collection; check sources.{name}.collection against the "
            "API's /collections"
        )
    raise SourceError(
        f"{where}: no item over the region for datetime {cfg.datetime}; check "
        f"sources.{name}.datetime and the region"
    )


def _check_assets(
    client, name: str, cfg: SourceConfig, first: dict, *, url: str, bbox_lonlat
) -> None:
    """Whether the probed item has the configured asset keys; if not, one more page of
    items is looked at: none with them fails the source (catalog drift, e.g. the 2021
    ``SCL-20m`` keys), some warns with the counts."""
    assets = _assets(cfg)
    if asset_drift([first], assets) is None:
        return
    try:
        page = list(
            client.search(
                collections=[cfg.collection],
                bbox=list(bbox_lonlat),
                datetime=cfg.datetime,
                limit=PAGE_LIMIT,
                max_items=PAGE_LIMIT,
            ).items_as_dicts()
        )
    except Exception:  # the probe found an item: judge by it alone
        page = [first]
    drift = asset_drift(page, assets)
    msg = drift_message(name, cfg.collection, drift, of=len(page))
    if drift["items"] == len(page):
        raise SourceError(f"{msg} (at {url}; none of the first {len(page)} items has them)")
    log.warning("%s; those items are skipped", msg)


def _has_collection(client, collection: str) -> bool:
    try:
        return client.get_collection(collection) is not None
    except Exception:
        return False


# --------------------------------------------------------------------------------------
# The record in the store
# --------------------------------------------------------------------------------------
def record_key(source: str, tile_id: str) -> str:
    """Path of a tile's record inside the store."""
    return f"catalog/{source}/{tile_id}.ndjson.gz"


def write_tile_items(
    path: str,
    tile_id: str,
    items: TileItems,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Record the items ``tile_id`` uses from one source in the store at ``path``.

    One object, written whole (a killed write leaves none, :func:`popdask.chunkio.put`):
    a header line (query and counts) then one item dict per line, gzip'd.
    """
    header = {
        "type": RECORD_TYPE,
        "version": RECORD_VERSION,
        "source": items.source,
        "tile": tile_id,
        "query": items.query,
        **items.summary(),
        **({"offset_check": items.offset_check} if items.offset_check else {}),
    }
    lines = [json.dumps(header, separators=(",", ":"))]
    lines += [json.dumps(d, separators=(",", ":")) for d in items.items]
    data = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    fs, key = chunkio.resolve(path, record_key(items.source, tile_id), storage_options)
    chunkio.put(fs, key, data)


def load_tile_items(
    path: str, source: str, tile_id: str, storage_options: Mapping[str, Any] | None = None
) -> TileItems | None:
    """The items recorded for ``tile_id`` and ``source``; None if it was not searched yet."""
    fs, key = chunkio.resolve(path, record_key(source, tile_id), storage_options)
    try:
        raw = fs.cat_file(key)
    except FileNotFoundError:
        return None
    lines = gzip.decompress(raw).decode().splitlines()
    header = _header(lines[0], key)
    items = [json.loads(line) for line in lines[1:] if line]
    return TileItems(
        source,
        items,
        header["found"],
        header.get("skipped", {}),
        header.get("groups", {}),
        header.get("query", {}),
        header.get("missing_assets", {}),
        header.get("offset_check", {}),
    )


def read_tile_summary(
    path: str, source: str, tile_id: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The header of a tile's record (query, found, kept, skipped, groups) without its
    items: only the start of the object is read and inflated. None if not searched yet."""
    fs, key = chunkio.resolve(path, record_key(source, tile_id), storage_options)
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    text, start, step = b"", 0, 1 << 16
    try:
        while b"\n" not in text:
            chunk = fs.cat_file(key, start=start, end=start + step)
            if not chunk:
                break
            text += inflate.decompress(chunk)
            start += len(chunk)
    except FileNotFoundError:
        return None
    return _header(text.split(b"\n", 1)[0].decode(), key)


def _header(line: str, key: str) -> dict[str, Any]:
    header = json.loads(line)
    if header.get("type") != RECORD_TYPE or header.get("version") != RECORD_VERSION:
        raise ValueError(f"{key} is not a popdask tile catalog record (version {RECORD_VERSION})")
    return header


def tile_items_recorded(
    source: Source,
    bounds_3035: Sequence[float],
    *,
    tile_id: str,
    path: str,
    storage_options: Mapping[str, Any] | None = None,
) -> TileItems:
    """A tile's items of ``source``: the record in the store, else searched and recorded.

    A record made by another query (other dates, cap, API ...) is searched again and
    replaced, with a warning (the store's signature normally refuses such a rerun).
    """
    rec = load_tile_items(path, source.name, tile_id, storage_options)
    if rec is not None and rec.query == query_of(source):
        return rec
    if rec is not None:
        log.warning(
            "%s %s: recorded items were chosen by another query; searching again",
            tile_id,
            source.name,
        )
    found = tile_items(source.name, source.config, url=source.url, bounds_3035=bounds_3035)
    write_tile_items(path, tile_id, found, storage_options)
    return found


# --------------------------------------------------------------------------------------
# The composite task
# --------------------------------------------------------------------------------------
def composite_tile(
    sources: Sequence[Source],
    bounds: Sequence[float],
    *,
    tile_id: str,
    resolution: float,
    path: str,
    storage_options: Mapping[str, Any] | None = None,
    sign: str | None = None,
    read: ReadConfig | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One tile's composite from its own items, computed here (on the worker).

    For each source: the recorded items if any, else a search of the tile, chosen and
    recorded (:func:`tile_items_recorded`); then the masked medians of
    :func:`popdask.sources.build_composite`, computed synchronously (the tile is one chunk).
    Hrefs are signed inside the reads (``sign``). Each Sentinel-2 item's offset is checked
    against its own pixels in the same pass (corrected where they clearly contradict the
    metadata); the evidence of every item goes into the header of the tile's record
    (``offset_check``, rewritten only when it changed) and a warning names the corrected.

    Returns
    -------
    data
        ``(band, y, x)`` float32 NumPy array, bands in source order (each source's
        ``config.bands``); NaN where a source has no item.
    summary
        ``{"sources": {name: {found, kept, skipped, groups}}, "no_usable_scene": bool,
        "offset_check": {name: {checked, too_few_pixels, corrected, implausible}}}``;
        ``no_usable_scene`` is true when Sentinel-2 has no usable item, so the whole tile is
        NaN and the pipeline records it as such rather than as done; ``offset_check``
        (:func:`offset_summary`) lists the items whose offset was corrected.
    """
    parts, counts, records = [], {}, {}
    for src in sources:
        items = tile_items_recorded(
            src, bounds, tile_id=tile_id, path=path, storage_options=storage_options
        )
        counts[src.name] = items.summary()
        records[src.name] = items
        if items.missing_assets:  # once per tile and source, with the counts
            msg = drift_message(
                src.name, src.config.collection, items.missing_assets, of=items.found
            )
            log.warning("%s %s", tile_id, msg)
        parts.append((src.name, src.config, items.pystac_items()))
    no_scene = any(name == "sentinel2" and not its for name, _, its in parts)
    if no_scene:  # no reflectance: the tile has no pixel to label, read nothing else
        parts = [(name, cfg, []) for name, cfg, _ in parts]
    lazy = build_composite(parts, bounds, resolution=resolution, sign=sign, read=read)
    with count_filled() as filled:  # the reads of missing assets, filled as nodata
        out, checks = dask.compute(lazy.data, lazy.checks, scheduler="synchronous")
    n_s2 = len(next((s.config.bands for s in sources if s.name == "sentinel2"), []))
    summary = {
        "sources": counts,
        "no_usable_scene": no_scene,
        "offset_check": {},
        "reads_filled": len(filled),
        "filled": filled[:5],
        # the share of the tile's pixels with every Sentinel-2 band
        "valid_share": float(np.isfinite(out[:n_s2]).all(axis=0).mean()) if n_s2 else 0.0,
    }
    if filled:
        log.warning(
            "%s: %d reads filled as nodata (assets the catalog lists but storage has not, e.g. %s)",
            tile_id,
            len(filled),
            filled[0],
        )
    for name, rows in checks.items():
        rec = records[name]
        bands = next(s.config.bands for s in sources if s.name == name)
        check = offset_record(rec.items, rows, next(b for b in CHECK_BANDS if b in bands))
        if check != rec.offset_check:
            rec.offset_check = check
            write_tile_items(path, tile_id, rec, storage_options)
        summary["offset_check"][name] = offset_summary(check)
        _warn_corrected(tile_id, name, summary["offset_check"][name])
    return out, summary


# --------------------------------------------------------------------------------------
# The offset checks, as recorded
# --------------------------------------------------------------------------------------
def offset_record(items: Sequence[Mapping[str, Any]], rows: np.ndarray, band: str) -> dict:
    """The offset checks of a tile's ``items`` as recorded in its header (pure).

    ``rows`` are :func:`popdask.composite.offset_checks`' rows, one per item in order;
    ``band`` the band they judged. Each item gets its verdict (``reason``), the offset the
    metadata gave (``offset``) and the one applied (``applied``), and the evidence: clear
    ``pixels``, ``dark`` (their 1st percentile of reflectance), ``negative`` (share below
    0) and ``negative_after`` (share below −0.1), rounded.
    """
    col = {c: i for i, c in enumerate(comp.OFFSET_COLUMNS)}
    out = []
    for d, row in zip(items, np.asarray(rows), strict=True):
        out.append(
            {
                "id": d["id"],
                "reason": comp.OFFSET_REASONS[int(row[col["reason"]])],
                "offset": _num(row[col["offset"]]),
                "applied": _num(row[col["offset"]] + row[col["delta"]]),
                "pixels": int(row[col["pixels"]]),
                **{k: _num(row[col[k]]) for k in ("dark", "negative", "negative_after")},
            }
        )
    return {"band": band, "items": out}


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 4)


def offset_summary(check: Mapping[str, Any]) -> dict[str, Any]:
    """What a tile's offset checks come to: items judged, not judged (too few clear
    pixels), corrected (each with its evidence) and implausible (ids)."""
    items = check.get("items", [])
    reasons = [it["reason"] for it in items]
    return {
        "checked": sum(r != "too_few_pixels" for r in reasons),
        "too_few_pixels": reasons.count("too_few_pixels"),
        "corrected": [it for it in items if it["offset"] != it["applied"]],
        "implausible": [it["id"] for it in items if it["reason"] == "implausible"],
    }


def offset_corrections(
    path: str,
    tile_ids: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    source: str = "sentinel2",
    threads: int = 16,
) -> dict[str, list[dict[str, Any]]]:
    """The items whose offset was corrected, per tile, from the headers of the tiles'
    records (:func:`read_tile_summary`: the start of each object only, read ``threads`` at
    a time). Tiles without a record or without a correction are left out."""
    from concurrent.futures import ThreadPoolExecutor

    def corrected(tile_id: str) -> list[dict[str, Any]]:
        header = read_tile_summary(path, source, tile_id, storage_options) or {}
        return offset_summary(header.get("offset_check", {}))["corrected"]

    with ThreadPoolExecutor(max(1, min(threads, len(tile_ids)))) as pool:
        found = zip(tile_ids, pool.map(corrected, tile_ids), strict=True)
        return {tile_id: items for tile_id, items in found if items}


def _warn_corrected(tile_id: str, source: str, summary: Mapping[str, Any]) -> None:
    """One warning per tile and source naming the items whose offset was corrected."""
    fixed = summary["corrected"]
    if fixed:
        log.warning(
            "%s %s: offset corrected from the pixels for %d items: %s",
            tile_id,
            source,
            len(fixed),
            "; ".join(
                f"{it['id']} {it['offset']:+g} -> {it['applied']:+g} ({it['reason']}: darkest "
                f"1% at {it['dark']:.3f}, {it['negative']:.0%} below 0)"
                for it in fixed
            ),
        )
    if summary["implausible"]:
        log.warning(
            "%s %s: pixels contradict the offset of %s, and no other offset explains them; "
            "left as the metadata says",
            tile_id,
            source,
            ", ".join(summary["implausible"]),
        )
