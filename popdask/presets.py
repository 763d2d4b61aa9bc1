"""Catalog presets: the STAC APIs popdask knows by name, and stable band names across them.

A preset fills in what a catalog fixes — the API root, how its hrefs are signed, and for
each source it offers the collection, the asset keys, the mask asset and the names the
composite gives the bands — so a run configuration only says *where* and *when*::

    stac: {preset: planetary-computer}
    sources:
      sentinel2: {datetime: 2021-06-01/2022-10-31, months: [6, 7, 8, 9, 10], max_cloud_cover: 20}
      sentinel1: {datetime: 2021-01-01/2021-12-31}

Presets
-------
``planetary-computer``
    ``https://planetarycomputer.microsoft.com/api/stac/v1``, hrefs signed with
    ``planetary_computer`` (inside each read task, see :mod:`popdask.reader`).
    ``sentinel2``: ``sentinel-2-l2a``, assets ``B01 … B08, B8A, B11, B12``, mask ``SCL``;
    ``sentinel1``: ``sentinel-1-rtc``, assets ``vv, vh`` (linear gamma0).
``earth-search``
    ``https://earth-search.aws.element84.com/v1``, no signing (public S3 COGs).
    ``sentinel2``: ``sentinel-2-l2a`` with Element 84's asset keys (``coastal, blue, green,
    red, rededge1, rededge2, rededge3, nir, nir08, swir16, swir22``, mask ``scl``), renamed to
    the canonical ``B01 … B12`` names. No Sentinel-1 RTC collection.

Neither preset gives dates or a region: ``datetime`` stays required per source. Every key a
preset fills in can be overridden in the configuration (the user's keys win, merged per
source; ``rename`` is merged per asset). A source that names its own ``url`` is not covered
by the ``stac`` preset, and a source may carry its own ``preset:`` (e.g. Sentinel-2 from
Earth Search and Sentinel-1 from the Planetary Computer in one run). Without a preset,
``url`` + ``collection`` + ``assets`` work for any other STAC API.

Band names
----------
Composite bands are named by the canonical Sentinel-2 band ids (``B02`` …), whatever the
catalog calls its assets: models and stores built from different catalogs are comparable,
and the quicklook finds ``B04/B03/B02``. A source's ``rename`` maps asset key → band name
(:data:`EARTH_SEARCH_S2` for Earth Search); with it, ``assets`` may be written either way
(``[blue, red]`` or ``[B02, B04]``) and ``mask_asset: SCL`` works on both catalogs.

Night lights, or any GDAL-readable raster
-----------------------------------------
No preset carries night lights (neither catalog hosts VIIRS). Point the ``nightlights``
source at any STAC API and collection whose asset is a raster GDAL can open::

    nightlights:
      url: https://cmr.earthdata.nasa.gov/stac/LAADS     # any STAC API
      collection: <the Black Marble VNP46A2 collection id there>
      datetime: 2021-01-01/2021-12-31
      assets: [<key of the .h5 asset>]
      subdataset: HDF5://HDFEOS/GRIDS/VNP_Grid_DNB/Data_Fields/DNB_BRDF-Corrected_NTL
      scale: 0.1                                       # VNP46A2 radiance DN → nW·cm⁻²·sr⁻¹

- A COG (e.g. a VIIRS monthly/annual composite) needs nothing more than the asset key.
- An HDF5 / netCDF asset is read through a GDAL subdataset: ``subdataset: DRIVER:PATH``
  rewrites each asset href into ``DRIVER:"<href>":PATH`` (``HDF5://HDFEOS/…`` gives
  ``HDF5:"/vsicurl/https://…/file.h5"://HDFEOS/…``; ``NETCDF:avg_rad`` gives
  ``NETCDF:"…":avg_rad``); for any other layout write the whole GDAL path with an
  ``{href}`` placeholder (``HDF4_EOS:EOS_GRID:"{href}":grid:field``). Remote hrefs become
  ``/vsicurl/`` (``s3://`` → ``/vsis3/``). Copy the exact name from ``gdalinfo file.h5``
  (its ``SUBDATASET_n_NAME``; GDAL writes spaces in group names as ``_``).
- The subdataset must be georeferenced for GDAL (``rio info`` shows a CRS); if your GDAL does
  not georeference the product, convert it to COGs first.
- Credentials (e.g. NASA Earthdata) come from the workers' environment (``~/.netrc``, GDAL's
  ``GDAL_HTTP_*`` variables), never from the YAML.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The Sentinel-2 L2A bands composited by default (no B09 water vapour, no B10: L2A has none).
S2_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12",
)  # fmt: skip

#: Element 84 Earth Search v1 ``sentinel-2-l2a`` asset key → canonical band name.
EARTH_SEARCH_S2: dict[str, str] = {
    "coastal": "B01",
    "blue": "B02",
    "green": "B03",
    "red": "B04",
    "rededge1": "B05",
    "rededge2": "B06",
    "rededge3": "B07",
    "nir": "B08",
    "nir08": "B8A",
    "nir09": "B09",
    "swir16": "B11",
    "swir22": "B12",
    "scl": "SCL",
}
_ES_KEY = {band: key for key, band in EARTH_SEARCH_S2.items()}


class PresetError(ValueError):
    """A preset is unknown or cannot serve a source; the message starts with the key."""


@dataclass(frozen=True)
class Preset:
    """What one catalog fixes: its API root, signing, and per-source defaults."""

    name: str
    url: str
    sign: str | None
    sources: Mapping[str, Mapping[str, Any]]
    #: Why a source is not offered, and what to do instead.
    missing: Mapping[str, str] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "planetary-computer": Preset(
        name="planetary-computer",
        url="https://planetarycomputer.microsoft.com/api/stac/v1",
        sign="planetary_computer",
        sources={
            "sentinel2": {
                "collection": "sentinel-2-l2a",
                "assets": list(S2_BANDS),
                "mask_asset": "SCL",
            },
            "sentinel1": {"collection": "sentinel-1-rtc", "assets": ["vv", "vh"]},
        },
        missing={
            "nightlights": "the Planetary Computer hosts no VIIRS night lights; give "
            "sources.nightlights its own url, collection and assets",
        },
    ),
    "earth-search": Preset(
        name="earth-search",
        url="https://earth-search.aws.element84.com/v1",
        sign=None,
        sources={
            "sentinel2": {
                "collection": "sentinel-2-l2a",
                "assets": [_ES_KEY[b] for b in S2_BANDS],
                "mask_asset": "scl",
                "rename": dict(EARTH_SEARCH_S2),
            },
        },
        missing={
            "sentinel1": "Earth Search has no terrain-corrected Sentinel-1 (its sentinel-1-grd "
            "is not RTC); set sources.sentinel1.preset: planetary-computer, give its own url, "
            "collection and assets, or leave sentinel1 out",
            "nightlights": "Earth Search hosts no VIIRS night lights; give "
            "sources.nightlights its own url, collection and assets",
        },
    ),
}


def get_preset(name: str, *, key: str = "stac.preset") -> Preset:
    """The preset called ``name`` (case and ``_``/``-`` insensitive).

    Raises
    ------
    PresetError
        Naming ``key`` and listing the known presets.
    """
    norm = str(name).strip().lower().replace("_", "-")
    if norm not in PRESETS:
        raise PresetError(
            f"{key}: unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        )
    return PRESETS[norm]


def _merge_source(name: str, src: dict[str, Any], preset: Preset, *, own: bool) -> dict[str, Any]:
    """One source's keys over the preset's defaults (the user's keys win)."""
    base: dict[str, Any] = {}
    if own:  # a per-source preset also brings its API and signing
        base["url"] = preset.url
        if preset.sign:
            base["sign"] = preset.sign
    defaults = preset.sources.get(name)
    if defaults is None:
        if "collection" not in src:
            why = preset.missing.get(name, f"give sources.{name}.collection and assets")
            raise PresetError(f"sources.{name}: the {preset.name} preset offers no {name}: {why}")
        return {**base, **src}
    merged = {**base, **copy.deepcopy(dict(defaults)), **src}
    rename = {**defaults.get("rename", {}), **(src.get("rename") or {})}
    if rename:
        merged["rename"] = rename
        to_key = {band: key for key, band in rename.items()}
        if isinstance(merged.get("assets"), list):
            merged["assets"] = [to_key.get(a, a) for a in merged["assets"]]
        if isinstance(merged.get("mask_asset"), str):
            merged["mask_asset"] = to_key.get(merged["mask_asset"], merged["mask_asset"])
    return merged


def expand_presets(data: Mapping[str, Any]) -> dict[str, Any]:
    """Fill in a run configuration's presets, before it is validated.

    ``stac.preset`` sets ``stac.url``/``stac.sign`` (unless given) and the defaults of each
    listed source that has no ``url`` of its own (or the preset's); ``sources.NAME.preset``
    does the same for one source, including its ``url`` and ``sign``. Sources are never
    added: list the ones you want (``sentinel2`` at least, with its ``datetime``).
    Idempotent; anything that is not a mapping is left for validation to report.

    Parameters
    ----------
    data
        The parsed configuration mapping (not modified).

    Returns
    -------
    dict
        A new mapping with the preset keys filled in.

    Raises
    ------
    PresetError
        For an unknown preset, or a source the preset does not offer without a collection.

    Examples
    --------
    >>> cfg = expand_presets({"stac": {"preset": "earth-search"},
    ...                       "sources": {"sentinel2": {"datetime": "2021"}}})
    >>> cfg["stac"]["url"], cfg["sources"]["sentinel2"]["assets"][:2]
    ('https://earth-search.aws.element84.com/v1', ['coastal', 'blue'])
    """
    out = dict(data)
    stac = out.get("stac")
    top = None
    if isinstance(stac, Mapping) and stac.get("preset") is not None:
        top = get_preset(stac["preset"], key="stac.preset")
        filled = {"url": top.url, **({"sign": top.sign} if top.sign else {})}
        out["stac"] = {**filled, **stac}
    sources = out.get("sources")
    if not isinstance(sources, Mapping):
        return out
    new: dict[str, Any] = {}
    for name, src in sources.items():
        if not isinstance(src, Mapping):
            new[name] = src
            continue
        src = dict(src)
        if src.get("preset") is not None:
            preset = get_preset(src["preset"], key=f"sources.{name}.preset")
            new[name] = _merge_source(name, src, preset, own=True)
        elif top is not None and src.get("url") in (None, top.url):
            new[name] = _merge_source(name, src, top, own=False)
        else:
            new[name] = src
    out["sources"] = new
    return out
