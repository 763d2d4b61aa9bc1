"""STAC sources: search, filter items, and load one tile's lazy composite.

The only module besides :mod:`popdask.store` that does I/O. A source is one entry of the
``sources`` section of the run configuration; its role is fixed by its key:

- ``sentinel2`` — surface reflectance, cloud-masked with the classification asset
  (``mask_asset``, e.g. ``SCL``), processing-baseline offset handled per item;
- ``sentinel1`` — backscatter in linear power, composited and converted to dB;
- ``nightlights`` — radiance, composited and resampled (bilinear by default) to the grid.

Searching returns plain :class:`pystac.Item` lists; :func:`tile_composite` builds the lazy
``(band, y, x)`` composite of one tile with stackstac (no pixels are read until compute).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import dask.array as da
import numpy as np
import pystac
import xarray as xr
from pyproj import Transformer
from rasterio.enums import Resampling
from urllib3.util.retry import Retry

from popdask import composite as comp
from popdask.config import Config, ReadConfig, SourceConfig
from popdask.grid import EPSG, Grid
from popdask.reader import ClosingReader, reader_for

log = logging.getLogger(__name__)

ROLES = {"sentinel2": comp.REFLECTANCE, "sentinel1": comp.BACKSCATTER, "nightlights": comp.RADIANCE}
DEFAULT_SCALE = {"sentinel2": 1e-4, "sentinel1": 1.0, "nightlights": 1.0}
DEFAULT_RESAMPLING = {"sentinel2": "nearest", "sentinel1": "nearest", "nightlights": "bilinear"}


def resampling_of(name: str, cfg: SourceConfig) -> str:
    """How a source's assets are warped onto the grid: its configured ``resampling``, else
    :data:`DEFAULT_RESAMPLING` for the source."""
    return cfg.resampling or DEFAULT_RESAMPLING[name]


S2_BOA_ADD_OFFSET = -1000  # DN added by ESA from processing baseline 04.00 on


class SourceError(RuntimeError):
    """A catalog or its items cannot be used; the message names the source and the fix."""


@dataclass
class SourceItems:
    """The items of one source found for the region, with what the search skipped."""

    name: str
    config: SourceConfig
    items: list[pystac.Item]
    bounds_3035: np.ndarray  # (n, 4) item footprints in EPSG:3035
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return ROLES[self.name]

    @property
    def bands(self) -> list[str]:
        """Composite band names this source contributes (its assets after ``rename``)."""
        return self.config.bands

    def for_bounds(self, bounds: Sequence[float]) -> list[pystac.Item]:
        """Items whose footprint intersects ``bounds`` (EPSG:3035)."""
        if not self.items:
            return []
        hit = intersects(self.bounds_3035, bounds)
        return [it for it, h in zip(self.items, hit, strict=True) if h]


def intersects(boxes: np.ndarray, bounds: Sequence[float]) -> np.ndarray:
    """Which of the ``(n, 4)`` boxes overlap ``bounds`` (same CRS, edges excluded)."""
    return (
        (boxes[:, 0] < bounds[2])
        & (boxes[:, 2] > bounds[0])
        & (boxes[:, 1] < bounds[3])
        & (boxes[:, 3] > bounds[1])
    )


# --------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------
#: Longest wait a server's ``Retry-After`` may impose on one retry, in seconds (urllib3
#: would otherwise wait up to 6 h, holding a worker thread).
RETRY_AFTER_MAX = 120.0


def retry_policy(retries: int = 5) -> Retry:
    """How STAC API requests are retried (GET and POST alike: a search changes nothing).

    HTTP 429, 500, 502, 503, 504 and connection or read errors are retried ``retries``
    times. urllib3 waits what ``Retry-After`` says on 413/429/503 (at most
    :data:`RETRY_AFTER_MAX`), else backs off exponentially (0, 1, 2, 4, 8 s ... with up to
    0.5 s of jitter, so that many tasks throttled at once do not come back together).
    """
    return _Retry(
        total=retries,
        backoff_factor=0.5,
        backoff_jitter=0.5,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None,
        respect_retry_after_header=True,
    )


class _Retry(Retry):
    """urllib3's Retry with ``Retry-After`` capped at :data:`RETRY_AFTER_MAX` seconds."""

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), RETRY_AFTER_MAX)


def open_catalog(url: str, *, retries: int = 5, timeout: float = 60.0):
    """Open a STAC API with retries on transient HTTP faults (:func:`retry_policy`).

    Raises
    ------
    SourceError
        When the API cannot be reached after the retries.
    """
    from pystac_client import Client
    from pystac_client.stac_api_io import StacApiIO

    try:
        return Client.open(
            url, stac_io=StacApiIO(max_retries=retry_policy(retries), timeout=timeout)
        )
    except Exception as e:
        raise SourceError(
            f"cannot open the STAC API at {url} ({type(e).__name__}: {e}); check stac.url "
            "(or the source's url) and the network"
        ) from e


def _conforms(client, name: str) -> bool:
    try:
        return bool(client.conforms_to(name))
    except Exception:
        return False


def item_bounds_3035(items: Sequence[pystac.Item]) -> np.ndarray:
    """Footprint bounding boxes of ``items`` in EPSG:3035, ``(n, 4)``."""
    t = Transformer.from_crs("EPSG:4326", f"EPSG:{EPSG}", always_xy=True)
    out = np.empty((len(items), 4))
    for i, it in enumerate(items):
        if it.bbox is None:
            raise SourceError(f"item {it.id} has no bbox; it cannot be placed on the grid")
        b = it.bbox
        west, south, east, north = (b[0], b[1], b[3], b[4]) if len(b) == 6 else b
        out[i] = t.transform_bounds(west, south, east, north, densify_pts=21)
    return out


def item_time(properties: Mapping) -> dt.datetime | None:
    """When an item was acquired, in UTC: its ``datetime``, else its ``start_datetime``.

    Parsed from the properties themselves, whatever form they take: RFC 3339 (``T``, ``Z``)
    or the space-separated ``2024-04-19 04:59:04.220006+00:00`` of the Planetary Computer's
    Sentinel-1 RTC ``start_datetime``; any UTC offset is converted, a missing one is taken as
    UTC. None when neither is given or parses. Every date popdask reads goes through here
    (months, acquisition days, date order), so that strings of different forms never meet.

    Examples
    --------
    >>> item_time({"datetime": None, "start_datetime": "2024-04-20 01:00:00+02:00"})
    datetime.datetime(2024, 4, 19, 23, 0, tzinfo=datetime.timezone.utc)
    """
    for key in ("datetime", "start_datetime"):
        raw = properties.get(key)
        if isinstance(raw, dt.datetime):
            when = raw
        elif isinstance(raw, str):
            try:
                when = dt.datetime.fromisoformat(raw.strip())
            except ValueError:
                continue
        else:
            continue
        if when.tzinfo is None:
            return when.replace(tzinfo=dt.UTC)
        return when.astimezone(dt.UTC)
    return None


def _time(item: pystac.Item) -> dt.datetime | None:
    """:func:`item_time` of a pystac Item (which keeps ``datetime`` out of its properties)."""
    start = item.properties.get("start_datetime")
    return item_time({"datetime": item.datetime, "start_datetime": start})


def filter_items(
    items: Sequence[pystac.Item],
    *,
    months: Sequence[int] | None = None,
    max_cloud_cover: float | None = None,
    assets: Sequence[str] = (),
) -> tuple[list[pystac.Item], dict[str, int]]:
    """Keep items in ``months``, at most ``max_cloud_cover`` % cloudy and with all ``assets``.

    Pure: applied on the client whatever the server did, since not every STAC API
    implements the query extension. Returns the kept items and counts of what was dropped.
    """
    kept, skipped = [], {"month": 0, "cloud_cover": 0, "missing_asset": 0}
    for it in items:
        when = _time(it)
        if months and when is not None and when.month not in months:
            skipped["month"] += 1
            continue
        cc = it.properties.get("eo:cloud_cover")
        if max_cloud_cover is not None and cc is not None and cc > max_cloud_cover:
            skipped["cloud_cover"] += 1
            continue
        if any(a not in it.assets for a in assets):
            skipped["missing_asset"] += 1
            continue
        kept.append(it)
    return kept, {k: v for k, v in skipped.items() if v}


#: Asset keys with a resolution suffix (``SCL-20m``, ``B02_20m``): the Planetary Computer's
#: 2021 layout of ``sentinel-2-l2a``, replaced since by plain band keys.
_SUFFIXED = re.compile(r"^[A-Za-z0-9]+[-_]\d+m$")


def asset_drift(items: Sequence[Mapping], assets: Sequence[str]) -> dict | None:
    """What the items lacking some of ``assets`` have instead (pure; item dicts in).

    Returns None when every item has every key; else ``{"items": n, "missing": {key:
    items}, "has": [keys of those items that hold data, sorted], "similar": {key: [their
    keys that look like it]}, "generation": a sentence or None}``, for one message naming
    what is missing and what is there (:func:`drift_message`).
    """
    from popdask.presets import EARTH_SEARCH_S2

    lacking = [d for d in items if any(a not in (d.get("assets") or {}) for a in assets)]
    if not lacking:
        return None
    missing: dict[str, int] = {}
    has: set[str] = set()
    for d in lacking:
        keys = d.get("assets") or {}
        for a in assets:
            if a not in keys:
                missing[a] = missing.get(a, 0) + 1
        has |= {k for k, v in keys.items() if "data" in (v.get("roles") or ["data"])}
    es_key = {band: key for key, band in EARTH_SEARCH_S2.items()}
    similar = {}
    for a in missing:
        like = [
            k
            for k in sorted(has)
            if not k.endswith("-jp2")  # JPEG 2000 twins in requester-pays buckets: never
            and (
                k.lower() == a.lower()
                or re.match(rf"{re.escape(a)}[-_]", k, re.IGNORECASE)
                or k in (EARTH_SEARCH_S2.get(a), es_key.get(a))
            )
        ]
        if like:
            similar[a] = like
    near = [k for ks in similar.values() for k in ks]
    suffixed = [k for k in [*near, *sorted(has)] if _SUFFIXED.match(k)]
    generation = None
    if suffixed:
        shown = ", ".join(repr(k) for k in dict.fromkeys(suffixed[:3]))
        generation = (
            f"keys with a resolution suffix ({shown}) are the Planetary Computer's 2021 layout"
        )
    elif any(es_key.get(a) in has for a in missing):
        generation = "their keys are Earth Search's band names (its preset renames them)"
    return {
        "items": len(lacking),
        "missing": missing,
        "has": sorted(has),
        "similar": similar,
        "generation": generation,
    }


def drift_message(name: str, collection: str, drift: Mapping, *, of: int) -> str:
    """One line: how many of ``of`` items lack which configured keys, what they have, and
    the fix (``drift`` from :func:`asset_drift`)."""
    lack = ", ".join(
        f"{k!r} ({n})"
        + (f", like {', '.join(map(repr, drift['similar'][k]))}" if k in drift["similar"] else "")
        for k, n in drift["missing"].items()
    )
    has = drift["has"]
    shown = ", ".join(has[:12]) + (f" and {len(has) - 12} more" if len(has) > 12 else "")
    why = f"; {drift['generation']}" if drift.get("generation") else ""
    return (
        f"sources.{name}: {drift['items']} of {of} items of collection {collection!r} lack "
        f"asset {lack}; they have {shown}{why}; set sources.{name}.assets/mask_asset (or "
        "rename) to the catalog's current keys, or use its preset"
    )


#: Sorts items without any date first.
_NO_TIME = dt.datetime.min.replace(tzinfo=dt.UTC)

#: The most items the whole-region search (:func:`search_source`) reads; the per-tile
#: search (:mod:`popdask.catalog`) has no such cap, since a tile's bbox bounds it.
REGION_MAX_ITEMS = 5000


def search_source(
    name: str, cfg: SourceConfig, *, url: str, bbox_lonlat: Sequence[float]
) -> SourceItems:
    """Search one source's collection over the whole region and filter the items.

    For small regions (the whole region's items are held on the client; at most
    :data:`REGION_MAX_ITEMS` are read). Each footprint keeps its ``cfg.max_items`` least
    cloudy acquisitions, as the per-tile search does (:mod:`popdask.catalog`).

    Parameters
    ----------
    name
        ``sentinel2``, ``sentinel1`` or ``nightlights``.
    cfg
        The source's configuration.
    url
        STAC API root.
    bbox_lonlat
        Region in degrees (west, south, east, north).

    Raises
    ------
    SourceError
        When the collection is unknown or no usable item remains for Sentinel-2.
    """
    client = open_catalog(url)
    kwargs = {}
    if cfg.max_cloud_cover is not None and _conforms(client, "QUERY"):
        kwargs["query"] = {"eo:cloud_cover": {"lte": cfg.max_cloud_cover}}
    try:
        search = client.search(
            collections=[cfg.collection],
            bbox=list(bbox_lonlat),
            datetime=cfg.datetime,
            limit=100,
            max_items=REGION_MAX_ITEMS,
            **kwargs,
        )
        found = list(search.items())
    except Exception as e:
        raise SourceError(
            f"sources.{name}: searching collection {cfg.collection!r} at {url} failed "
            f"({type(e).__name__}: {e})"
        ) from e
    assets = [*cfg.assets, *([cfg.mask_asset] if cfg.mask_asset else [])]
    items, skipped = filter_items(
        found, months=cfg.months, max_cloud_cover=cfg.max_cloud_cover, assets=assets
    )
    items = _per_footprint(items, cfg.max_items, skipped)
    if not found:
        msg = (
            f"sources.{name}: no item in collection {cfg.collection!r} at {url} for "
            f"datetime {cfg.datetime} over the region; check the collection name, the dates "
            "and region"
        )
        if name == "sentinel2":
            raise SourceError(msg)
        log.warning(msg)
    elif not items and name == "sentinel2":
        raise SourceError(
            f"sources.{name}: {len(found)} items found but none kept after filtering "
            f"({skipped}); relax months/max_cloud_cover or check the asset keys {assets}"
        )
    log.info("%s: %d items kept of %d found %s", name, len(items), len(found), skipped or "")
    return SourceItems(name, cfg, items, item_bounds_3035(items), skipped)


def _per_footprint(
    items: list[pystac.Item], max_items: int, skipped: dict[str, int]
) -> list[pystac.Item]:
    """The ``max_items`` least cloudy acquisitions of each footprint, in date order
    (:func:`popdask.catalog.choose_items`); counts the rest in ``skipped``."""
    from popdask.catalog import choose_items  # catalog builds on this module

    dicts = [it.to_dict(include_self_link=False, transform_hrefs=False) for it in items]
    choice = choose_items(dicts, max_items)
    if choice.dropped:
        skipped["over_max_items"] = choice.dropped
    keep = {(d.get("collection"), d["id"]) for d in choice.items}
    out = [it for it in items if (it.collection_id, it.id) in keep]
    out.sort(key=lambda it: (_time(it) or _NO_TIME, it.id))
    return out


def search_sources(cfg: Config, bbox_lonlat: Sequence[float]) -> list[SourceItems]:
    """Search every configured source over the region."""
    return [
        search_source(name, src, url=src.url or cfg.stac.url, bbox_lonlat=bbox_lonlat)
        for name, src in cfg.sources.items()
    ]


def region_lonlat(grid: Grid) -> tuple[float, float, float, float]:
    """The grid's bounds in degrees (west, south, east, north)."""
    t = Transformer.from_crs(f"EPSG:{EPSG}", "EPSG:4326", always_xy=True)
    return tuple(t.transform_bounds(*grid.bounds, densify_pts=21))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Per-item radiometry (pure metadata)
# --------------------------------------------------------------------------------------
#: Item properties saying the BOA offset was already removed from the DNs (Earth Search v1;
#: ``sentinel:`` is the name its earlier items used).
BOA_OFFSET_APPLIED = ("earthsearch:boa_offset_applied", "sentinel:boa_offset_applied")


def _baseline(item: pystac.Item) -> float | None:
    props = item.properties
    raw = props.get("s2:processing_baseline", props.get("sentinel:processing_baseline"))
    try:
        return float(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def boa_offset_applied(item: pystac.Item) -> bool:
    """Whether the item's DNs were already harmonised (BOA_ADD_OFFSET subtracted)."""
    return any(item.properties.get(k) is True for k in BOA_OFFSET_APPLIED)


def scale_offset(
    items: Sequence[pystac.Item], assets: Sequence[str], *, name: str, scale: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per item and asset ``(scale, offset)``: physical value = DN × scale + offset.

    Applied by popdask once (stackstac runs with ``rescale=False``).

    - ``raster:bands`` scale/offset win when the asset carries them (Earth Search: scale
      0.0001, offset −0.1 from processing baseline 04.00 on, 0 before);
    - otherwise ``scale`` (config, or the source's default, 0.0001 for Sentinel-2) applies,
      and Sentinel-2 items of processing baseline ≥ 04.00 (``s2:processing_baseline``) get the
      −1000 DN offset (the Planetary Computer, whose items carry no ``raster:bands``);
    - a Sentinel-2 item flagged ``earthsearch:boa_offset_applied: true`` holds DNs from which
      Element 84 already subtracted the 1000 (harmonised with the older baselines), while
      its ``raster:bands`` still say −0.1: its offset is 0.

    So the same surface gives the same reflectance from both catalogs on both sides of the
    January 2022 baseline change. (Element 84 has items whose flag is wrong — see
    Element84/earth-search#66 and #71; metadata cannot tell those apart.)

    Parameters
    ----------
    items
        The items, in stack order.
    assets
        Asset keys, in stack band order.
    name
        Source role (``sentinel2`` gets the baseline handling).
    scale
        Scale for assets without ``raster:bands`` (None: the source's default).

    Returns
    -------
    scale, offset
        ``(n_items, n_assets)`` float64 arrays.
    """
    default = DEFAULT_SCALE[name] if scale is None else scale
    s = np.full((len(items), len(assets)), default, dtype=np.float64)
    o = np.zeros_like(s)
    for i, it in enumerate(items):
        base = _baseline(it)
        harmonised = name == "sentinel2" and boa_offset_applied(it)
        for j, key in enumerate(assets):
            rb = (it.assets[key].extra_fields.get("raster:bands") or [{}])[0]
            if "scale" in rb or "offset" in rb:
                s[i, j] = rb.get("scale", 1.0)
                o[i, j] = rb.get("offset", 0.0)
            elif name == "sentinel2" and base is not None and base >= 4.0:
                o[i, j] = S2_BOA_ADD_OFFSET * s[i, j]
            if harmonised:
                o[i, j] = 0.0
    return s, o


def day_groups(items: Sequence[pystac.Item]) -> np.ndarray:
    """Index of the acquisition day (UTC) of each item (granules of one day share it);
    an item without any date is a day of its own."""
    times = [_time(it) for it in items]
    days = [(t.date().isoformat() if t else it.id) for t, it in zip(times, items, strict=True)]
    _, idx = np.unique(np.asarray(days), return_inverse=True)
    return idx.astype(np.int64)


# --------------------------------------------------------------------------------------
# Loading one tile
# --------------------------------------------------------------------------------------
def gdal_path(href: str) -> str:
    """A path GDAL opens inside a subdataset string (remote hrefs get their /vsi prefix)."""
    if href.startswith(("http://", "https://")):
        return f"/vsicurl/{href}"
    if href.startswith("s3://"):
        return f"/vsis3/{href[5:]}"
    if href.startswith("gs://"):
        return f"/vsigs/{href[5:]}"
    if href.startswith("file://"):
        return href[7:]
    return href


def subdataset_href(href: str, subdataset: str) -> str:
    """The GDAL subdataset path of ``subdataset`` inside the file at ``href``.

    ``DRIVER:PATH`` gives ``DRIVER:"<file>":PATH`` (HDF5, netCDF); a string holding
    ``{href}`` has it replaced by the file's GDAL path (any other layout).

    Examples
    --------
    >>> subdataset_href("https://h/VNP46A2.h5", "HDF5://HDFEOS/GRIDS/G/Data_Fields/NTL")
    'HDF5:"/vsicurl/https://h/VNP46A2.h5"://HDFEOS/GRIDS/G/Data_Fields/NTL'
    >>> subdataset_href("/data/v.nc", "NETCDF:avg_rad")
    'NETCDF:"/data/v.nc":avg_rad'
    """
    path = gdal_path(href)
    if "{href}" in subdataset:
        return subdataset.replace("{href}", path)
    driver, sep, rest = subdataset.partition(":")
    if not sep or not driver or not rest:
        raise ValueError(f"subdataset {subdataset!r} must look like DRIVER:PATH or hold {{href}}")
    return f'{driver}:"{path}":{rest}'


def _epsg(code: object) -> int | None:
    if isinstance(code, str) and code.upper().startswith("EPSG:"):
        try:
            return int(code[5:])
        except ValueError:
            return None
    return None


def plain_items(
    items: Sequence[pystac.Item], assets: Sequence[str], *, subdataset: str | None = None
) -> list[dict]:
    """Items as the plain dicts stackstac reads, made ready for it.

    - ``proj:epsg`` is put back from ``proj:code`` (pystac keeps only the latter, and
      stackstac reads only the former: without it an asset's footprint falls back to the
      item's lon/lat bbox, a seam risk across UTM zones);
    - with ``subdataset``, the ``assets`` hrefs point into the file (other hrefs are kept as
      the catalog gives them: pystac would resolve an absolute local path against an API's
      self link).

    The items themselves are not changed.
    """
    out = []
    for it in items:
        d = it.to_dict(include_self_link=False, transform_hrefs=False)
        # to_dict shares the item's property dicts: copy what is changed.
        props = d["properties"] = dict(d["properties"])
        if "proj:epsg" not in props and _epsg(props.get("proj:code")) is not None:
            props["proj:epsg"] = _epsg(props["proj:code"])
        d["assets"] = {key: dict(asset) for key, asset in d["assets"].items()}
        for key, asset in d["assets"].items():
            if "proj:epsg" not in asset and _epsg(asset.get("proj:code")) is not None:
                asset["proj:epsg"] = _epsg(asset["proj:code"])
            if subdataset and key in assets:
                asset["href"] = subdataset_href(asset["href"], subdataset)
        out.append(d)
    return out


def load_stack(
    items: Sequence[pystac.Item],
    assets: Sequence[str],
    *,
    bounds: Sequence[float],
    resolution: float,
    resampling: str = "nearest",
    reader: type = ClosingReader,
    subdataset: str | None = None,
    read: ReadConfig | None = None,
) -> xr.DataArray:
    """Lazy ``(time, band, y, x)`` float32 stack of ``items`` on the grid window ``bounds``.

    The whole time and band axes sit in one chunk per tile, ready for the median.
    No pixels are read until compute; ``reader`` (see :func:`popdask.reader.reader_for`)
    signs hrefs then, inside the task. ``subdataset`` reads the ``assets`` as GDAL
    subdatasets (:func:`subdataset_href`). Items in any CRS (e.g. several UTM zones) are
    warped onto the EPSG:3035 grid.
    """
    import stackstac

    from popdask.gdal import gdal_env

    nx = round((bounds[2] - bounds[0]) / resolution)
    ny = round((bounds[3] - bounds[1]) / resolution)
    return stackstac.stack(
        plain_items(items, assets, subdataset=subdataset),
        assets=list(assets),
        epsg=EPSG,
        resolution=resolution,
        bounds=tuple(bounds),
        chunksize=(-1, -1, ny, nx),
        dtype=np.dtype("float32"),
        fill_value=np.float32("nan"),
        rescale=False,
        sortby_date=False,
        xy_coords="center",
        snap_bounds=False,
        resampling=Resampling[resampling],
        properties=False,
        band_coords=False,
        gdal_env=gdal_env(read),
        reader=reader,
        errors_as_nodata=(),  # a missing asset is filled and counted by popdask's reader
    )


def _reader(how: str | None, name: str) -> type[ClosingReader]:
    """The reader class signing ``name``'s hrefs at read time (checked here, on the client)."""
    try:
        return reader_for(how)
    except ValueError as e:
        raise SourceError(f"sources.{name}: {e}") from None


def tile_composite(
    sources: Sequence[SourceItems],
    bounds: Sequence[float],
    *,
    resolution: float,
    sign: str | None = None,
    read: ReadConfig | None = None,
) -> tuple[da.Array, list[str], list[str], dict[str, int]]:
    """Lazy composite of one tile from the region's items of all sources.

    Each source contributes the items whose footprint intersects ``bounds``
    (:meth:`SourceItems.for_bounds`); see :func:`items_composite` for the rest.
    """
    parts = [(src.name, src.config, src.for_bounds(bounds)) for src in sources]
    return items_composite(parts, bounds, resolution=resolution, sign=sign, read=read)


def items_composite(
    parts: Sequence[tuple[str, SourceConfig, Sequence[pystac.Item]]],
    bounds: Sequence[float],
    *,
    resolution: float,
    sign: str | None = None,
    read: ReadConfig | None = None,
) -> tuple[da.Array, list[str], list[str], dict[str, int]]:
    """Lazy composite of one tile from each source's own items.

    ``parts`` holds ``(name, config, items)`` per source, in band order; the items are the
    tile's (searched per tile, :mod:`popdask.catalog`, or cut from a region's search). A
    source without items gives NaN bands. Hrefs are not signed here: with ``sign`` (or a
    source's own ``sign``) the reader signs each href inside its read task, so tokens never
    expire between graph and read. Each Sentinel-2 item's offset is checked against its
    pixels and corrected where they say it is wrong (see :func:`build_composite`).

    Returns
    -------
    data
        ``(band, y, x)`` float32 dask array, one chunk; no pixel is read until compute.
    bands, kinds
        Band names and their kind (reflectance / backscatter_db / radiance).
    n_items
        Items used per source.
    """
    c = build_composite(parts, bounds, resolution=resolution, sign=sign, read=read)
    return c.data, c.bands, c.kinds, c.n_items


@dataclass
class LazyComposite:
    """One tile's lazy composite (:func:`build_composite`); nothing is read yet."""

    data: da.Array  # (band, y, x) float32, one chunk
    bands: list[str]
    kinds: list[str]
    n_items: dict[str, int]
    #: Per checked source, ``(item, 7)`` rows of :func:`popdask.composite.offset_checks`
    #: for its items in order (computed with ``data``, they share its reads).
    checks: dict[str, da.Array] = field(default_factory=dict)


#: Bands whose darkest clear pixels judge a Sentinel-2 item's offset, in order of preference
#: (blue: water, shadow and forest are darkest there, haze aside).
CHECK_BANDS = ("B02", "B03", "B04")


def build_composite(
    parts: Sequence[tuple[str, SourceConfig, Sequence[pystac.Item]]],
    bounds: Sequence[float],
    *,
    resolution: float,
    sign: str | None = None,
    read: ReadConfig | None = None,
) -> LazyComposite:
    """:func:`items_composite`, with the offset checks of each Sentinel-2 item.

    The offset each Sentinel-2 item gets from its metadata (:func:`scale_offset`) is
    checked against its own clear pixels of the first of :data:`CHECK_BANDS` the source
    composites (:func:`popdask.composite.offset_checks`), inside the same task as the
    median, and corrected by ±0.1 where they clearly contradict it. The evidence comes back
    in ``checks`` (lazy); a source without a visible band is not checked.
    """
    nx = round((bounds[2] - bounds[0]) / resolution)
    ny = round((bounds[3] - bounds[1]) / resolution)
    arrays, bands, kinds, n_items, checks = [], [], [], {}, {}
    for name, cfg, items in parts:
        n_items[name] = len(items)
        bands += cfg.bands
        kinds += [ROLES[name]] * len(cfg.bands)
        if not items:
            arrays.append(da.full((len(cfg.bands), ny, nx), np.nan, dtype=np.float32, chunks=-1))
            continue
        data, check = _source_composite(
            name, cfg, items, bounds, resolution=resolution, sign=sign, read=read
        )
        arrays.append(data)
        if check is not None:
            checks[name] = check
    return LazyComposite(da.concatenate(arrays, axis=0), bands, kinds, n_items, checks)


def _source_composite(
    name: str,
    cfg: SourceConfig,
    items: Sequence[pystac.Item],
    bounds: Sequence[float],
    *,
    resolution: float,
    sign: str | None,
    read: ReadConfig | None,
) -> tuple[da.Array, da.Array | None]:
    """Lazy ``(band, y, x)`` composite of one source's items (at least one) on ``bounds``,
    and for Sentinel-2 the lazy offset checks of its items (None when not checked)."""
    names = cfg.bands
    reader = _reader(cfg.sign or sign, name)
    assets = [*cfg.assets, *([cfg.mask_asset] if cfg.mask_asset and name == "sentinel2" else [])]
    resampling = resampling_of(name, cfg)
    stack = load_stack(
        items,
        assets,
        bounds=bounds,
        resolution=resolution,
        resampling=resampling,
        reader=reader,
        subdataset=cfg.subdataset,
        read=read,
    )
    groups = day_groups(items)
    scale, offset = scale_offset(items, assets, name=name, scale=cfg.scale)

    def per_tile(kernel, **kw) -> da.Array:  # the time column reduced in its one chunk
        return da.blockwise(
            functools.partial(_one_block, kernel),
            "cyx",
            stack.data,
            "tbyx",
            new_axes={"c": len(names)},
            concatenate=False,
            dtype=np.float32,
            meta=np.empty((0, 0, 0), np.float32),
            groups=groups,
            scale=scale,
            offset=offset,
            **kw,
        )

    if name != "sentinel2":
        kernel = comp.radar_composite if name == "sentinel1" else comp.median_composite
        return per_tile(kernel), None
    mask = {
        "mask_band": len(names) if cfg.mask_asset else None,
        "mask_values": tuple(cfg.mask_values),
    }
    check = next((names.index(b) for b in CHECK_BANDS if b in names), None)
    if check is None:
        return per_tile(comp.optical_composite, **mask), None
    checks = da.blockwise(
        functools.partial(_one_block, comp.offset_checks),
        "tk",
        stack.data,
        "tbyx",
        new_axes={"k": len(comp.OFFSET_COLUMNS)},
        concatenate=False,
        dtype=np.float64,
        meta=np.empty((0, 0), np.float64),
        scale=scale,
        offset=offset,
        band=check,
        step_dn=-S2_BOA_ADD_OFFSET,
        **mask,
    )
    data = da.blockwise(
        functools.partial(_one_block, comp.checked_optical_composite),
        "cyx",
        stack.data,
        "tbyx",
        checks,
        "tk",
        new_axes={"c": len(names)},
        concatenate=False,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
        groups=groups,
        scale=scale,
        offset=offset,
        **mask,
    )
    return data, checks


def _one_block(kernel, *blocks, **kwargs):
    """``kernel`` on the one block of each of its arrays.

    A tile's stack is a single dask chunk, and a kernel that reduces some of its axes gets
    it, with ``concatenate=False``, as that block inside one list per reduced axis;
    ``concatenate=True`` (what ``map_blocks`` with ``drop_axis`` does) would first copy
    it whole into a new array: 276 MB for 23 Sentinel-2 items of a 10 km tile.
    """
    arrays = []
    for b in blocks:
        while isinstance(b, list):
            if len(b) != 1:
                raise ValueError(f"{kernel.__name__} expects one chunk per tile, got {len(b)}")
            b = b[0]
        arrays.append(b)
    return kernel(*arrays, **kwargs)
