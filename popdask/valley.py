"""A second generator: an Alpine valley, independent of `popdask.synthetic`'s lowland.

The accuracy protocol (`popdask.protocol`) must not be tunable to one generator. This one
differs from the demo's in what a method could have been tuned to:

- **Landscape**: a flat valley floor (meadows, maize, a river, a lake at one end) between
  slopes that rise to forest, alpine grass, grey scree and snow, with terrain shading
  (slopes facing the sun brighter, the others darker) on every optical band.
- **Settlements**: linear villages strung along the valley road, dispersed farmsteads and
  huts up the slopes, one compact old town with a very dense core, an industrial strip, and
  holiday-flat districts (tall, lit buildings with few residents).
- **Sensors**: another UTM zone (33, Austria by default); Sentinel-2 as two granules split
  north/south with wide nodata rings, Earth Search-style asset keys (``coastal``, ``blue``,
  … ``swir22``, ``scl``) with ``raster:bands`` scale/offset, some 2022 items harmonised
  (``earthsearch:boa_offset_applied``); Sentinel-1 as one frame per date; night lights as
  ``radiance`` of collection ``viirs-dnb-monthly``.

It reuses the demo generator's physics and I/O (`popdask.synthetic`: endmember reflectance,
clouds, radar, lights, census, COG writing, STAC records) and writes the same layout, so the
loopback STAC API and `popdask.pipeline.run` serve it unchanged (`valley_config`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from pyproj import Transformer
from rasterio.warp import Resampling, reproject
from scipy import ndimage

from popdask import synthetic as syn

__all__ = ["ES_S2_ASSETS", "VALLEY_BBOX", "make_valley_landscape", "make_valley_region"]

#: Earth Search's Sentinel-2 asset keys, in `synthetic.S2_BANDS` order (no B09).
ES_S2_ASSETS = {
    "B01": "coastal",
    "B02": "blue",
    "B03": "green",
    "B04": "red",
    "B05": "rededge1",
    "B06": "rededge2",
    "B07": "rededge3",
    "B08": "nir",
    "B8A": "nir08",
    "B11": "swir16",
    "B12": "swir22",
}
#: A 20 km valley region in the Austrian Alps (UTM zone 33), EPSG:3035 metres.
VALLEY_BBOX = (4620000, 2650000, 4640000, 2670000)
S1_COLLECTION, VIIRS_COLLECTION = "sentinel-1-rtc", "viirs-dnb-monthly"


def _noise(rng, shape, sigma_m, ps):
    return syn._smooth_noise(rng, shape, sigma_m / ps)


def make_valley_landscape(
    shape: tuple[int, int], *, rng: np.random.Generator, pixel_size: float = 20.0
) -> syn.Landscape:
    """Land cover, buildings and true population of an Alpine valley (pure, seeded).

    Returns a `synthetic.Landscape`, so the demo generator's sensors observe it.
    """
    h, w = shape
    ps = float(pixel_size)
    km = 1000.0 / ps
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(w, dtype=np.float32)[None, :] + 0.5
    n_fine, n_150, n_400 = (_noise(rng, shape, s, ps) for s in (60, 150, 400))
    n_1k, n_3k = _noise(rng, shape, 1000, ps), _noise(rng, shape, 3000, ps)
    iid = rng.standard_normal(shape, dtype=np.float32)
    u_px = rng.random(shape, dtype=np.float32)

    # ---- the valley: a meandering axis, the floor, elevation and shading -------------------
    theta = rng.uniform(-0.6, 0.6) + (math.pi / 2 if rng.random() < 0.5 else 0.0)
    ux, uy = math.cos(theta), math.sin(theta)
    along = (cols - w / 2) * ux + (rows - h / 2) * uy  # px along the axis
    across = (rows - h / 2) * ux - (cols - w / 2) * uy
    wave = 0.6 * km * np.sin(2 * np.pi * along / (9 * km) + rng.uniform(0, 6.3))
    wave += 0.25 * km * np.sin(2 * np.pi * along / (3.7 * km) + rng.uniform(0, 6.3))
    d = np.abs(across - wave + rng.uniform(-1, 1) * km)  # px from the axis
    half = (rng.uniform(0.9, 1.4) * km) * (1 + 0.25 * n_3k)
    slope_d = np.maximum(d - half, 0) * ps  # metres up the slope
    elev = 650 + 0.55 * slope_d - 2.5e-5 * slope_d**2 + 120 * n_1k + 40 * n_400
    elev = np.where(d < half, 650 + 8 * n_1k, elev).astype(np.float32)
    gy, gx = np.gradient(elev / ps)  # rise per metre
    # sun from the south-east, 50° high: Lambertian shading of the slope
    sun = np.array([math.cos(math.radians(50)) * 0.6, math.cos(math.radians(50)) * 0.8])
    cos_i = (math.sin(math.radians(50)) + sun[0] * gx - sun[1] * gy) / np.sqrt(1 + gx**2 + gy**2)
    shading = np.clip(cos_i / math.sin(math.radians(50)), 0.45, 1.3).astype(np.float32)
    floor = d < half

    # ---- water: the river on the axis, a lake at one end of the floor ----------------------
    river_d = np.abs(across - wave) * ps
    river_water = np.clip((rng.uniform(25, 45) / 2 + 10 - river_d) / 20, 0, 1)
    end = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.4) * min(h, w)
    lake_r = rng.uniform(0.6, 1.1) * km
    lake = (np.hypot(along - end, (across - wave) * 1.8) < lake_r * (1 + 0.2 * n_400)) & floor

    # ---- settlements -------------------------------------------------------------------------
    road_off = rng.choice([-1.0, 1.0]) * 0.45 * half
    road_d = np.abs(across - wave - road_off)
    road = (road_d < 0.6) & ~lake
    town_s = rng.uniform(-0.15, 0.15) * min(h, w)
    if abs(town_s - end) < 2.5 * km:
        town_s = -town_s if abs(-town_s - end) > abs(town_s - end) else town_s + 3 * km
    town_d = np.hypot(along - town_s, across - wave - road_off) / (
        rng.uniform(0.55, 0.8) * km * (1 + 0.15 * n_400)
    )
    core = (town_d < 0.45) & ~lake
    town = (town_d < 1.0) & ~lake & ~core
    holiday = town & (_noise(rng, shape, 250, ps) > 0.6)
    industry = (
        (np.abs(along - town_s - rng.choice([-1, 1]) * 1.6 * km) < 0.5 * km)
        & (np.abs(across - wave + road_off * 0.2) < 0.25 * km)
        & floor
        & ~lake
        & (town_d > 1.0)
    )
    n_villages = max(2, round(min(h, w) / km / 3))
    village = np.zeros(shape, bool)
    for s in rng.uniform(-0.48, 0.48, n_villages) * max(h, w):
        length = rng.uniform(0.6, 1.8) * km
        width = rng.uniform(4, 8)  # px each side of the road
        village |= (np.abs(along - s) < length / 2) & (road_d < width * (1 + 0.3 * n_150))
    village &= ~lake & ~core & ~town & ~industry
    farm = np.zeros(shape, bool)
    for _ in range(round(h * w / km**2 * 0.8)):
        y, x = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
        if elev[y, x] < 1500:
            farm[y : y + 2, x : x + 2] = True
    hut = (rng.random(shape) < 0.3 / km**2) & (elev > 1500) & (elev < 2200)
    farm &= ~lake & ~village & ~town & ~core & ~industry

    # ---- land cover (classes of synthetic.LANDCOVER_CLASSES) ---------------------------------
    strips = np.floor((across - wave) / (rng.uniform(4, 7))).astype(np.int64)
    seg = np.floor((along + 1e4) / rng.uniform(12, 20)).astype(np.int64)
    _, parcel = np.unique(strips * 100_000 + seg, return_inverse=True)
    parcel = parcel.reshape(shape).astype(np.int32)
    n_parcels = int(parcel.max()) + 1
    parcel_crop = rng.choice(4, size=n_parcels, p=[0.1, 0.25, 0.0, 0.65]).astype(np.int8)
    lc = np.asarray([syn._CROP_CLASS[c] for c in range(4)], np.uint8)[parcel_crop[parcel]]
    treeline = 1850 + 120 * n_1k
    forest = ~floor & (elev < treeline) & (n_400 + 0.4 * n_1k > -0.9)
    lc[forest] = np.where(elev[forest] > 1100 + 150 * n_1k[forest], 12, 11)
    alpine = ~floor & ~forest & (elev < treeline + 350)
    lc[alpine] = 10  # alpine grassland (meadow class)
    rock = ~floor & ~forest & ~alpine
    lc[rock] = 5  # bare rock and scree share the class of grey, unlit ground
    lc[village | farm | hut] = 4
    lc[town] = 3
    lc[core] = 1
    lc[industry] = 5
    lc[road] = 6
    water = (river_water >= 0.5) | lake
    lc[water] = 13

    # ---- sub-pixel fractions and buildings ---------------------------------------------------
    f = np.zeros((syn._N_LAYERS, h, w), np.float32)
    f[syn._PARCEL][(lc >= 7) & (lc <= 10) & ~alpine] = 1.0
    m = lc == 11
    f[syn._DECID][m], f[syn._CONIFER][m], f[syn._GRASS][m] = 0.6, 0.25, 0.15
    m = lc == 12
    f[syn._CONIFER][m], f[syn._GRASS][m] = 0.9, 0.1
    f[syn._GRASS][alpine] = np.clip(0.85 - 0.002 * (elev[alpine] - treeline[alpine]), 0.3, 0.9)
    f[syn._SOIL][alpine] = 1 - f[syn._GRASS][alpine]
    snow = rock & (elev > 2400 + 150 * n_400)
    scree = rock & ~snow
    f[syn._SOIL][scree], f[syn._ROOF_GREY][scree] = 0.55, 0.45  # grey rock: roof-like
    f[syn._ROOF_BRIGHT][snow], f[syn._WATER][snow] = 0.75, 0.25  # snow: bright, dark in SWIR
    roof = np.zeros(shape, np.float32)
    floors = np.zeros(shape, np.float32)
    res = np.zeros(shape, np.float32)
    rtype = np.zeros(shape, np.int8)
    kinds = (
        # mask, roof fraction, floors, residential share, roof type shares (red, grey, dark, bright)
        (core, 0.72 + 0.08 * n_150, 3.8 + 0.8 * n_400, 0.85, (0.3, 0.5, 0.2, 0.0)),
        (town & ~holiday, 0.3 + 0.06 * n_150, 2.5 + 0.4 * n_400, 0.95, (0.2, 0.5, 0.3, 0.0)),
        (holiday, 0.35 + 0.05 * n_150, 4.5 + 0.8 * n_400, 0.25, (0.0, 0.6, 0.3, 0.1)),
        (village, 0.22 + 0.05 * n_150, 2.2 + 0.3 * n_400, 0.9, (0.5, 0.2, 0.3, 0.0)),
        (farm, 0.4 + 0.0 * n_150, 2.0 + 0.0 * n_400, 0.6, (0.4, 0.3, 0.3, 0.0)),
        (hut, 0.3 + 0.0 * n_150, 1.5 + 0.0 * n_400, 0.15, (0.0, 0.3, 0.7, 0.0)),
        (industry, 0.6 + 0.1 * n_150, 2.5 + 0.5 * n_400, 0.0, (0.0, 0.3, 0.2, 0.5)),
    )
    for mask, rf, fl, share, types in kinds:
        roof[mask] = np.clip(rf[mask] * (1 + 0.25 * iid[mask]), 0.05, 0.92)
        floors[mask] = np.clip(fl[mask], 1, 8)
        res[mask] = share
        rtype[mask] = np.searchsorted(np.cumsum(types)[:-1], u_px[mask])
    built = roof > 0
    f[:, built] = 0.0
    for r in range(4):
        sel = built & (rtype == r)
        f[r][sel] = roof[sel]
    paved = np.where(built, np.minimum(0.25, 0.97 - roof), 0)
    f[syn._PAVED][built] = paved[built]
    rest = np.where(built, 1 - roof - paved, 0)
    f[syn._GRASS] += 0.7 * rest
    f[syn._DECID] += 0.3 * rest
    f[:, road] = 0.0
    f[syn._PAVED][road], f[syn._GRASS][road] = 0.6, 0.4
    wf = np.where(lake, 1.0, river_water).astype(np.float32)
    f *= 1 - wf
    f[syn._WATER] += wf
    empty = f.sum(axis=0) <= 0
    f[syn._GRASS][empty] = 1.0
    roof_eff = f[syn._ROOFS].sum(axis=0)
    floor_area = roof_eff * floors
    residential = floor_area * res
    f = ndimage.gaussian_filter(f, sigma=(0, 0.6, 0.6), mode="nearest")
    f /= f.sum(axis=0, keepdims=True)
    floor_area = ndimage.gaussian_filter(floor_area, 0.6, mode="nearest")
    residential = ndimage.gaussian_filter(residential, 0.6, mode="nearest")
    roof_eff = f[syn._ROOFS].sum(axis=0)
    floors = np.where(roof_eff > 0.005, floor_area / np.maximum(roof_eff, 1e-6), 0)

    # ---- population: floor area × an occupancy that varies by district and household -------
    occupancy = np.exp(
        0.25 * _noise(rng, shape, 1500, ps)
        + 0.2 * _noise(rng, shape, 120, ps)
        + 0.35 * rng.standard_normal(shape, dtype=np.float32)
        - 0.5 * (0.25**2 + 0.2**2 + 0.35**2)
    )
    population = (ps * ps * syn._PERSONS_PER_M2_FLOOR) * residential * occupancy
    population = np.where(population > 0.005, population, 0).astype(np.float32)
    mow = np.column_stack(
        [
            rng.uniform(150, 175, n_parcels),
            rng.uniform(200, 225, n_parcels),
            np.where(rng.random(n_parcels) < 0.4, rng.uniform(245, 270, n_parcels), np.nan),
        ]
    ).astype(np.float32)
    mow[parcel_crop != syn._MEADOW] = np.nan
    return syn.Landscape(
        landcover=lc,
        fractions=f.astype(np.float32),
        floors=floors.astype(np.float32),
        floor_area=floor_area.astype(np.float32),
        residential_floor_area=residential.astype(np.float32),
        population=population,
        parcel=parcel,
        parcel_crop=parcel_crop,
        parcel_shift=rng.uniform(-10, 10, n_parcels).astype(np.float32),
        parcel_vigour=rng.uniform(0.8, 1.05, n_parcels).astype(np.float32),
        parcel_mow=mow,
        vigour=np.clip(1 + 0.06 * n_150, 0.7, 1.2).astype(np.float32),
        texture=(shading * np.exp(0.03 * n_fine)).astype(np.float32),
        orientation=np.exp(0.4 * _noise(rng, shape, 400, ps)).astype(np.float32),
        pixel_size=ps,
    )


def _item(item_id, collection, geometry, ll_bbox, props, assets, extensions) -> dict:
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": extensions,
        "id": item_id,
        "collection": collection,
        "geometry": geometry,
        "bbox": ll_bbox,
        "properties": props,
        "links": [],
        "assets": assets,
    }


def make_valley_region(
    out_dir: str | os.PathLike,
    *,
    bbox: tuple[float, float, float, float] = VALLEY_BBOX,
    seed: int = 0,
    n_s2_dates: int = 8,
    n_s1_dates: int = 3,
    n_viirs_dates: int = 3,
) -> syn.DemoRegion:
    """Generate an Alpine valley region (scenes, STAC files, census, truth) in ``out_dir``.

    Same layout and return type as `synthetic.make_demo_region`; the Sentinel-2 items use
    Earth Search's asset keys and metadata (see the module docstring and `valley_config`).
    """
    bbox = syn._check_args(bbox, n_s2_dates, n_s1_dates, n_viirs_dates, seed, None)
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    rng_land, rng_layout, rng_s2, rng_s1, rng_viirs, rng_census = np.random.default_rng(
        [seed, 21]
    ).spawn(6)
    ps = 20.0
    xmin, ymin, xmax, ymax = bbox
    to_ll = Transformer.from_crs(3035, 4326, always_xy=True)
    lon_c, lat_c = to_ll.transform((xmin + xmax) / 2, (ymin + ymax) / 2)
    epsg = syn._utm_epsg(lon_c)
    utm = f"EPSG:{epsg}"
    laea_to_utm = Transformer.from_crs(3035, epsg, always_xy=True)
    utm_to_laea = Transformer.from_crs(epsg, 3035, always_xy=True)
    utm_to_ll = Transformer.from_crs(epsg, 4326, always_xy=True)

    # granules: Sentinel-2 north/south with a wide overlap, Sentinel-1 one frame
    u = syn._snap_out(laea_to_utm.transform_bounds(*bbox, densify_pts=21), ps)
    uh = u[3] - u[1]
    sy = u[1] + round(uh * rng_layout.uniform(0.3, 0.7) / ps) * ps
    ov = round(0.1 * uh / ps) * ps
    rects = {
        ("s2", 0): (u[0] - ps, sy - ov, u[2] + ps, u[3] + ps),
        ("s2", 1): (u[0] - ps, u[1] - ps, u[2] + ps, sy + ov),
        ("s1", 0): (u[0] - ps, u[1] - ps, u[2] + ps, u[3] + ps),
    }
    need = syn._expand(bbox, 1000.0)
    for rect in rects.values():
        need = syn._union(need, utm_to_laea.transform_bounds(*rect, densify_pts=21))
    domain = syn._Grid.from_bounds("EPSG:3035", syn._snap_out(need, 100.0), ps)
    row0, col0 = round((domain.y1 - ymax) / ps), round((xmin - domain.x0) / ps)
    nrow, ncol = round((ymax - ymin) / ps), round((xmax - xmin) / ps)
    inner = (slice(row0, row0 + nrow), slice(col0, col0 + ncol))
    land = make_valley_landscape((domain.height, domain.width), rng=rng_land, pixel_size=ps)
    granules = {
        key: syn._Granule(
            number=key[1] + 1,
            grid=(g := syn._granule_grid(utm, rect, rng_layout.uniform(200, 600), ps)),
            rect=rect,
            index=syn._index_map(domain, g),
        )
        for key, rect in rects.items()
    }

    # truth, land cover, census
    region_tf = Affine(ps, 0.0, xmin, 0.0, -ps, ymax)
    truth = np.ascontiguousarray(land.population[inner])
    truth_path = root / "truth.tif"
    syn._write_cog(
        truth_path, truth, crs="EPSG:3035", transform=region_tf, nodata=None, resampling="average"
    )
    syn._write_cog(
        root / "landcover.tif",
        np.ascontiguousarray(land.landcover[inner]),
        crs="EPSG:3035",
        transform=region_tf,
        nodata=None,
        resampling="mode",
    )
    census = syn.census_table(truth, bbox, rng=rng_census)
    census_path = root / "census.csv"
    census[["GRD_ID", "TOT_P_2021", "CONFIDENTIALSTATUS"]].to_csv(census_path, index=False)

    # Sentinel-2, Earth Search style
    sched, *date_rngs = rng_s2.spawn(n_s2_dates + 1)
    s2_items = []
    s2g = [granules[("s2", 0)], granules[("s2", 1)]]
    shape = (domain.height, domain.width)
    keys = [ES_S2_ASSETS.get(b) for b in syn.S2_BANDS]
    for date, drng in zip(syn._s2_schedule(sched, n_s2_dates), date_rngs, strict=True):
        valid = [g.valid() for g in s2g]
        sources = [g.index[v] for g, v in zip(s2g, valid, strict=True)]
        field = syn.cloud_field(drng, shape, ps).reshape(-1)
        qs = [np.quantile(field[s[::5]], 1 - date["cover"]) for s in sources if s.size]
        threshold = (min(qs) if date["cloudy"] else max(qs)) if qs else math.inf
        elevation, azimuth = syn._sun_position(lat_c, lon_c, date["when"])
        length = date["cloud_height"] / math.tan(math.radians(elevation)) / ps
        away = math.radians(azimuth + 180.0)
        sky = syn.sky_conditions(
            field.reshape(shape),
            threshold,
            shadow_shift=(-round(length * math.cos(away)), round(length * math.sin(away))),
        )
        surface = syn.s2_surface_reflectance(
            land, doy=date["doy"], year=date["year"], sun_elevation=elevation
        )
        refl, scl = syn.s2_observe(surface, land, sky, rng=drng)
        del surface, sky, field
        new = date["baseline"] >= "04.00"
        harmonised = new and drng.random() < 0.5  # Element 84 subtracted the 1000 DN
        dn = syn.s2_to_dn(refl, "03.01" if harmonised else date["baseline"]).reshape(12, -1)
        scl = scl.reshape(-1)
        del refl
        for g, v, src in zip(s2g, valid, sources, strict=True):
            tile = syn._mgrs_tile(
                epsg, *utm_to_ll.transform(*syn._centre(g.rect)), *syn._centre(g.rect)
            )
            orbit = (122, 79)[g.number - 1]  # the north and south granules: two orbits
            item_id = f"S2{date['platform'][-1].upper()}_{tile}_{date['when']:%Y%m%d}_{orbit}_L2A"
            folder = root / "sentinel-2-l2a" / item_id
            sel = np.flatnonzero(v.ravel())
            assets = {}
            for b, key in enumerate(keys):
                if key is None:
                    continue
                out = np.zeros(g.grid.height * g.grid.width, np.uint16)
                out[sel] = dn[b, src]
                path = folder / f"{key.upper()}.tif"
                syn._write_cog(
                    path,
                    out.reshape(g.grid.height, g.grid.width),
                    crs=utm,
                    transform=g.grid.transform,
                    nodata=syn.S2_NODATA,
                )
                band = {**syn._raster_band("uint16", syn.S2_NODATA, 20.0)}
                band.update(scale=0.0001, offset=-0.1 if new else 0.0)
                assets[key] = {
                    "href": str(path),
                    "type": syn._COG_TYPE,
                    "roles": ["data", "reflectance"],
                    "raster:bands": [band],
                }
            out = np.zeros(g.grid.height * g.grid.width, np.uint8)
            out[sel] = scl[src]
            path = folder / "SCL.tif"
            syn._write_cog(
                path,
                out.reshape(g.grid.height, g.grid.width),
                crs=utm,
                transform=g.grid.transform,
                nodata=syn.S2_NODATA,
            )
            assets["scl"] = {"href": str(path), "type": syn._COG_TYPE, "roles": ["data"]}
            cloudy = float(np.isin(scl[src], (8, 9, 10)).mean()) * 100
            geometry, ll_bbox = syn._lonlat_polygon(g.footprint(), utm_to_ll)
            props = {
                "datetime": syn._iso(date["when"]),
                "platform": date["platform"],
                "constellation": "sentinel-2",
                "eo:cloud_cover": round(cloudy, 3),
                "s2:processing_baseline": date["baseline"],
                "mgrs:utm_zone": int(tile[:2]),
                "mgrs:latitude_band": tile[2],
                "mgrs:grid_square": tile[3:],
                "sat:relative_orbit": orbit,
                "earthsearch:boa_offset_applied": bool(harmonised),
                **syn._proj_properties(g.grid),
            }
            s2_items.append(
                _item(
                    item_id,
                    "sentinel-2-l2a",
                    geometry,
                    ll_bbox,
                    props,
                    assets,
                    [syn._EXT_EO, syn._EXT_PROJ, syn._EXT_RASTER, syn._EXT_SAT],
                )
            )
        del dn, scl

    # Sentinel-1: one frame per date, ascending and descending alternately
    s1_items = []
    g1 = granules[("s1", 0)]
    sel1 = np.flatnonzero(g1.valid().ravel())
    src1 = g1.index.ravel()[sel1]
    for i, drng in enumerate(rng_s1.spawn(n_s1_dates)):
        doy = int(drng.uniform(1 + 120 * i, 120 * (i + 1)))
        asc = i % 2 == 0
        when = dt.datetime(2021, 1, 1) + dt.timedelta(days=doy - 1, hours=16 if asc else 5)
        moisture = _noise(drng, shape, 2000, ps) + drng.normal(0, 1.0)
        vv, vh = syn.s1_backscatter(land, doy=doy, rng=drng, moisture_db=moisture)
        item_id = f"S1A_IW_GRDH_{when:%Y%m%dT%H%M%S}_valley_rtc"
        assets = {}
        for pol, data in (("vv", vv.reshape(-1)), ("vh", vh.reshape(-1))):
            out = np.full(g1.grid.height * g1.grid.width, syn.S1_NODATA, np.float32)
            out[sel1] = data[src1]
            path = root / S1_COLLECTION / item_id / f"{pol}.tif"
            syn._write_cog(
                path,
                out.reshape(g1.grid.height, g1.grid.width),
                crs=utm,
                transform=g1.grid.transform,
                nodata=syn.S1_NODATA,
            )
            assets[pol] = {
                "href": str(path),
                "type": syn._COG_TYPE,
                "roles": ["data"],
                "raster:bands": [syn._raster_band("float32", syn.S1_NODATA, ps)],
            }
        geometry, ll_bbox = syn._lonlat_polygon(g1.footprint(), utm_to_ll)
        props = {
            "datetime": syn._iso(when),
            "platform": "SENTINEL-1A",
            "sar:polarizations": ["VV", "VH"],
            "sat:orbit_state": "ascending" if asc else "descending",
            **syn._proj_properties(g1.grid),
        }
        s1_items.append(
            _item(
                item_id,
                S1_COLLECTION,
                geometry,
                ll_bbox,
                props,
                assets,
                [syn._EXT_SAR, syn._EXT_SAT, syn._EXT_PROJ, syn._EXT_RASTER],
            )
        )
        del vv, vh, moisture

    # night lights: 15 arc-second monthly radiance
    res = 1.0 / 240.0
    ll = syn._snap_out(to_ll.transform_bounds(*bbox, densify_pts=21), res)
    vgrid = syn._Grid.from_bounds("EPSG:4326", ll, res)
    coarse = syn._blur_lights(syn.night_light_emission(land), ps, 5) * syn._LIGHT_GAIN
    lights = np.full((vgrid.height, vgrid.width), syn.VIIRS_NODATA, np.float32)
    reproject(
        coarse,
        lights,
        src_transform=Affine(ps * 5, 0.0, domain.x0, 0.0, -ps * 5, domain.y1),
        src_crs=domain.crs,
        dst_transform=vgrid.transform,
        dst_crs=vgrid.crs,
        dst_nodata=syn.VIIRS_NODATA,
        resampling=Resampling.average,
        num_threads=1,
    )
    have = lights != syn.VIIRS_NODATA
    ring = [(ll[0], ll[1]), (ll[2], ll[1]), (ll[2], ll[3]), (ll[0], ll[3]), (ll[0], ll[1])]
    geometry = {"type": "Polygon", "coordinates": [[list(p) for p in ring]]}
    viirs_items = []
    for month, drng in zip((1, 2, 11, 12)[:n_viirs_dates], rng_viirs.spawn(4), strict=False):
        rad = lights * np.exp(drng.normal(0, 0.1, lights.shape)).astype(np.float32)
        rad += np.float32(0.3) + drng.normal(0, 0.25, lights.shape).astype(np.float32)
        rad = np.where(have, rad, syn.VIIRS_NODATA).astype(np.float32)
        item_id = f"VNL_monthly_2021{month:02d}"
        path = root / VIIRS_COLLECTION / item_id / "radiance.tif"
        syn._write_cog(
            path, rad, crs="EPSG:4326", transform=vgrid.transform, nodata=syn.VIIRS_NODATA
        )
        start = dt.datetime(2021, month, 1)
        props = {"datetime": syn._iso(start), **syn._proj_properties(vgrid)}
        assets = {
            "radiance": {
                "href": str(path),
                "type": syn._COG_TYPE,
                "roles": ["data"],
                "raster:bands": [syn._raster_band("float32", syn.VIIRS_NODATA)],
            }
        }
        viirs_items.append(
            _item(item_id, VIIRS_COLLECTION, geometry, list(ll), props, assets, [syn._EXT_PROJ])
        )

    collections, items = {}, {}
    (root / "collections").mkdir(exist_ok=True)
    (root / "items").mkdir(exist_ok=True)
    for cid, its in (
        ("sentinel-2-l2a", s2_items),
        (S1_COLLECTION, s1_items),
        (VIIRS_COLLECTION, viirs_items),
    ):
        boxes = np.asarray([it["bbox"] for it in its])
        extent = [*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist()]
        interval = ("2021-01-01T00:00:00Z", "2022-12-31T23:59:59Z")
        collections[cid] = root / "collections" / f"{cid}.json"
        collections[cid].write_text(
            json.dumps(syn._collection(cid, cid, f"{cid} (valley generator)", extent, interval))
        )
        items[cid] = root / "items" / f"{cid}.ndjson"
        items[cid].write_text("".join(json.dumps(it) + "\n" for it in its))
    return syn.DemoRegion(
        root=root,
        bbox=bbox,
        collections=collections,
        items=items,
        census=census_path,
        truth=truth_path,
    )


def valley_config(region: syn.DemoRegion, stac_url: str, out: Path, **model: Any) -> dict:
    """The run configuration of a valley region: Sentinel-2 through the earth-search preset's
    asset keys, the other sources by their own collection and keys."""
    return {
        "region": {"bbox": list(region.bbox)},
        "grid": {"resolution": 20, "cell": 1000, "tile": 10000},
        "stac": {"url": stac_url},
        "sources": {
            "sentinel2": {
                "preset": "earth-search",
                "url": stac_url,
                "datetime": "2021-06-01/2022-10-31",
                "months": [6, 7, 8, 9, 10],
                "max_cloud_cover": 80,
            },
            "sentinel1": {
                "collection": S1_COLLECTION,
                "datetime": "2021-01-01/2021-12-31",
                "assets": ["vv", "vh"],
            },
            "nightlights": {
                "collection": VIIRS_COLLECTION,
                "datetime": "2021-01-01/2021-12-31",
                "assets": ["radiance"],
            },
        },
        "census": {"path": str(region.census), "column": "TOT_P_2021"},
        "model": {"sample_pixels": 200_000, "seed": 0, **model},
        "regression": {"rescale": True},
        "output": {"path": str(out)},
        "cluster": {"kind": "local", "workers": 2, "threads_per_worker": 1},
    }
