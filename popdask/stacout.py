"""A STAC description of an export: ``OUT/collection.json`` and ``OUT/items/{tile id}.json``.

The Collection links one Item per exported tile; each Item has one asset per layer (its
COG, with the ``proj``, ``raster`` and ``file`` extensions: CRS and grid, units, nodata and
statistics, size and SHA2-256 multihash). Items and Collection carry the product version
(the ``version`` extension), the census and Sentinel date ranges, the popdask versions and a
summary of the run's configuration, taken from the store's attributes (which the
configuration's validation keeps free of credentials). Every href is relative, so an export
can be moved or copied to an object store whole.

Versions: the product version is the store's ``output.version`` (else ``sig-`` and 12 hex
digits of the store's signature). Exporting a new version into a folder that holds another
first copies the other's files to ``versions/{old version}/`` (same relative layout, so its
links still resolve: :func:`archive_collection`, :func:`popdask.cog.archive_tile`); the new
Collection links it with ``predecessor-version``, and it links back with ``latest-version``.
Everything here but :func:`read_json`/:func:`archive_collection` is pure.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pystac
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension, Statistics
from pystac.extensions.version import VersionExtension

from popdask.grid import EPSG, Tile

COLLECTION = "collection.json"
ITEMS = "items"
VERSIONS = "versions"
JSON_TYPE = "application/json"
LONLAT = 4326


def item_key(tile_id: str) -> str:
    """The item's path under the export folder."""
    return f"{ITEMS}/{tile_id}.json"


def dumps(doc: Mapping[str, Any]) -> bytes:
    """JSON bytes of a STAC document (strict JSON: a NaN is refused, never written)."""
    return json.dumps(doc, indent=1, allow_nan=False).encode()


# --------------------------------------------------------------------------------------
# What the store says
# --------------------------------------------------------------------------------------
def product_version(attrs: Mapping[str, Any]) -> str:
    """The store's ``output.version``, else ``sig-`` + 12 hex digits of its signature (the
    same store always gets the same version; a rebuild of another configuration another)."""
    version = (attrs.get("config") or {}).get("output", {}).get("version")
    if version:
        return str(version)
    sig = json.dumps(attrs.get("popdask", {}).get("signature", {}), sort_keys=True)
    return "sig-" + hashlib.sha256(sig.encode()).hexdigest()[:12]


def date_ranges(config: Mapping[str, Any]) -> dict[str, Any]:
    """The census reference year (from a column such as ``TOT_P_2021``) and each source's
    ``datetime`` range, as the configuration gives them."""
    sources = {
        name: src.get("datetime")
        for name, src in (config.get("sources") or {}).items()
        if src and src.get("datetime")
    }
    column = str((config.get("census") or {}).get("column") or "")
    year = re.search(r"(19|20)\d\d", column)
    census = {"column": column or None, "reference_year": int(year.group()) if year else None}
    return {"census": census, "sources": sources}


def interval(ranges: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The first and last instant of the census year and of every source's range (RFC 3339)."""
    starts, ends = [], []
    for rng in ranges["sources"].values():
        a, _, b = str(rng).partition("/")
        starts.append(_instant(a, end=False))
        ends.append(_instant(b or a, end=True))
    year = ranges["census"]["reference_year"]
    if year:
        starts.append(f"{year}-01-01T00:00:00Z")
        ends.append(f"{year}-12-31T23:59:59Z")
    starts, ends = [s for s in starts if s], [e for e in ends if e]
    return (min(starts) if starts else None, max(ends) if ends else None)


def _instant(text: str, *, end: bool) -> str | None:
    text = text.strip()
    if text in ("", ".."):
        return None
    if "T" in text:
        return text if text.endswith("Z") or "+" in text else f"{text}Z"
    return f"{text}T23:59:59Z" if end else f"{text}T00:00:00Z"


def config_summary(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The run's configuration in short: region, grid, each source's collection, dates and
    assets, census column, model and regression settings, output version, signature. Only
    what the store keeps (secret-free by validation); no URL, path or storage option."""
    cfg = attrs.get("config") or {}
    sources = {
        name: {k: src.get(k) for k in ("collection", "datetime", "months", "assets", "max_items")}
        for name, src in (cfg.get("sources") or {}).items()
        if src
    }
    census = cfg.get("census") or {}
    return {
        "region": cfg.get("region"),
        "grid": cfg.get("grid"),
        "sources": sources,
        "census": {k: census.get(k) for k in ("column", "absent")},
        "model": cfg.get("model"),
        "regression": cfg.get("regression"),
        "output_version": (cfg.get("output") or {}).get("version"),
        "signature_sha256": hashlib.sha256(
            json.dumps(attrs.get("popdask", {}).get("signature", {}), sort_keys=True).encode()
        ).hexdigest(),
    }


# --------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------
def footprint(bounds: Sequence[float], points: int = 2) -> dict[str, Any]:
    """The lon/lat polygon of EPSG:3035 ``bounds``, each edge densified to ``points``."""
    from pyproj import Transformer

    x0, y0, x1, y1 = bounds
    t = [i / points for i in range(points)]
    xs = [x0 + (x1 - x0) * s for s in t] + [x1] * points
    ys = [y0] * points + [y0 + (y1 - y0) * s for s in t]
    xs += [x1 - (x1 - x0) * s for s in t] + [x0] * points
    ys += [y1] * points + [y1 - (y1 - y0) * s for s in t]
    lon, lat = Transformer.from_crs(EPSG, LONLAT, always_xy=True).transform(xs, ys)
    ring = [[round(a, 7), round(b, 7)] for a, b in zip(lon, lat, strict=True)]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


def _bbox(geometry: Mapping[str, Any]) -> list[float]:
    ring = geometry["coordinates"][0]
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    return [min(lons), min(lats), max(lons), max(lats)]


def item_common(
    attrs: Mapping[str, Any], version: str, software: str, resolution: float, collection_id: str
) -> dict[str, Any]:
    """What every tile's item shares (sent once to each tile task)."""
    ranges = date_ranges(attrs.get("config") or {})
    start, end = interval(ranges)
    return {
        "version": version,
        "collection_id": collection_id,
        "start": start,
        "end": end,
        "resolution": resolution,
        "properties": {
            "popdask:software_version": software,
            "popdask:store_software_version": attrs.get("popdask_version"),
            "popdask:census": ranges["census"],
            "popdask:sources": ranges["sources"],
        },
    }


def _nodata(value: float | int) -> float | int | str:
    return "nan" if isinstance(value, float) and value != value else value


def raster_band(layer, stats: Mapping[str, Any], resolution: float) -> RasterBand:
    """The ``raster:bands`` entry of one layer's asset (units, nodata, statistics)."""
    st = {k: stats[k] for k in ("minimum", "maximum", "mean", "stddev") if k in stats}
    return RasterBand.create(
        nodata=_nodata(layer.nodata),
        data_type=DataType(layer.dtype),
        spatial_resolution=resolution,
        unit=layer.units or None,
        statistics=Statistics.create(valid_percent=stats["valid_percent"], **st),
    )


def tile_item(
    tile: Tile, layers: Sequence, summary: Mapping[str, Any], common: Mapping[str, Any]
) -> dict[str, Any]:
    """The STAC item of one exported tile: one asset per layer (``summary``: what
    :func:`popdask.cog.export_tile` measured of each file), links relative to ``items/``."""
    from popdask.cog import COG_MEDIA_TYPE

    geometry = footprint(tile.bounds)
    props = {
        "start_datetime": common["start"],
        "end_datetime": common["end"],
        "popdask:tile": {"row": tile.row, "col": tile.col},
        **common["properties"],
    }
    item = pystac.Item(tile.id, geometry, _bbox(geometry), None, props)
    r = common["resolution"]
    x0, y0, x1, y1 = tile.bounds
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=f"EPSG:{EPSG}",
        bbox=[x0, y0, x1, y1],
        shape=list(tile.shape),
        transform=[r, 0.0, x0, 0.0, -r, y1, 0.0, 0.0, 1.0],
    )
    VersionExtension.ext(item, add_if_missing=True).apply(version=common["version"])
    RasterExtension.add_to(item)
    FileExtension.add_to(item)
    for layer in layers:
        s = summary[layer.name]
        asset = pystac.Asset(f"../{s['key']}", layer.long_name, None, COG_MEDIA_TYPE, ["data"])
        asset.extra_fields["popdask:overview_resampling"] = layer.resampling
        RasterExtension.ext(asset).apply([raster_band(layer, s["stats"], r)])
        FileExtension.ext(asset).apply(size=s["size"], checksum=s["checksum"])
        item.add_asset(layer.name, asset)
    doc = item.to_dict(include_self_link=False, transform_hrefs=False)
    doc["links"] = [
        {"rel": rel, "href": f"../{COLLECTION}", "type": JSON_TYPE}
        for rel in ("collection", "parent", "root")
    ]
    doc["collection"] = common["collection_id"]
    return doc


# --------------------------------------------------------------------------------------
# The collection
# --------------------------------------------------------------------------------------
def collection(
    *,
    collection_id: str,
    common: Mapping[str, Any],
    attrs: Mapping[str, Any],
    region_bounds: Sequence[float],
    tile_ids: Sequence[str],
    layers: Mapping[str, Mapping[str, Any]],
    store_href: str | None,
    predecessor: str | None,
    license: str = "other",
) -> dict[str, Any]:
    """The Collection of an export: extents, product and software versions, date ranges,
    configuration summary, what each layer holds (``popdask:layers``: units, kind, overview
    resampling and semantics, totals) and a link to each tile's item."""
    geometry = footprint(region_bounds, points=16)
    start, end = common["start"], common["end"]
    extent = pystac.Extent(
        pystac.SpatialExtent([_bbox(geometry)]),
        pystac.TemporalExtent([[_parse(start), _parse(end)]]),
    )
    c = pystac.Collection(
        collection_id,
        f"Estimated persons per 20 m pixel (EPSG:3035) by popdask, product version "
        f"{common['version']}: Cloud-Optimized GeoTIFFs per 10 km tile and layer.",
        extent,
        title=f"popdask {common['version']}",
        license=license,
        extra_fields={
            **common["properties"],
            "popdask:config": config_summary(attrs),
            "popdask:layers": {k: dict(v) for k, v in layers.items()},
            "popdask:metrics": {
                k: v for k, v in (attrs.get("metrics") or {}).items() if k != "timings_s"
            },
        },
    )
    VersionExtension.ext(c, add_if_missing=True).apply(version=common["version"])
    doc = c.to_dict(include_self_link=False, transform_hrefs=False)
    links = [{"rel": "root", "href": f"./{COLLECTION}", "type": JSON_TYPE}]
    links += [{"rel": "item", "href": f"./{item_key(t)}", "type": JSON_TYPE} for t in tile_ids]
    if predecessor:
        href = f"./{VERSIONS}/{predecessor}/{COLLECTION}"
        links.append({"rel": "predecessor-version", "href": href, "type": JSON_TYPE})
    if store_href:
        links.append({"rel": "derived_from", "href": store_href, "title": "popdask Zarr store"})
    doc["links"] = links
    return doc


def _parse(text: str | None):
    return None if text is None else pystac.utils.str_to_datetime(text)


def archived(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The previous version's collection as kept under ``versions/{version}/``: marked
    ``deprecated``, a ``latest-version`` link to the top, and every relative link that
    leaves its own files (its predecessors, the store) moved two folders up."""
    doc = json.loads(json.dumps(doc))
    own = (f"./{COLLECTION}", f"./{ITEMS}/")
    for link in doc.get("links", []):
        href = link["href"]
        if "://" not in href and not href.startswith("/") and not href.startswith(own):
            link["href"] = "../../" + href.removeprefix("./")
    doc["links"] = [x for x in doc["links"] if x["rel"] != "latest-version"]
    doc["links"].append({"rel": "latest-version", "href": f"../../{COLLECTION}", "type": JSON_TYPE})
    doc["deprecated"] = True
    return doc


def read_json(fs, key: str) -> dict[str, Any] | None:
    """A JSON document of the export folder (None when absent)."""
    try:
        return json.loads(fs.cat_file(key))
    except FileNotFoundError:
        return None
