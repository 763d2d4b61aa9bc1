"""A synthetic demo region: satellite scenes, STAC metadata, census and true population.

`make_demo_region` writes, from a seed and deterministically, everything popdask reads in
production, so that the real pipeline can run offline against a real (loopback) STAC API
and be scored against a known truth:

- ``collections/<id>.json`` — one STAC Collection per source and
  ``items/<id>.ndjson`` — its Items, one JSON object a line (the form ``rustac serve`` takes);
- ``sentinel-2-l2a/<item id>/<asset>.tif``, ``sentinel-1-rtc/...``, ``viirs-nightlights/...``
  — Cloud-Optimized GeoTIFFs (512/256/128 px tiles, DEFLATE, internal overviews);
- ``census.csv`` — the 1 km census in GISCO form (``GRD_ID``, ``TOT_P_2021``, the Census
  2021 grid's breakdowns ``M``, ``F``, … with their perturbation (`census_variables`),
  ``CONFIDENTIALSTATUS``), populated cells only;
- ``truth.tif`` — true persons per 20 m pixel (float32, EPSG:3035, exactly the bbox);
- ``landcover.tif`` — the land-cover class of each 20 m pixel (uint8, `LANDCOVER_CLASSES`).

The world is built on an EPSG:3035 grid of 20 m pixels whose edges lie on the bbox (row 0 is
north), padded by about a kilometre so that granules and night-light blooming reach past the
region's edges. Only the bbox part is written as truth, land cover and census.

Conventions the pipeline has to know
------------------------------------
Sentinel-2 L2A (collection ``sentinel-2-l2a``)
    Dates between June and October, about half in 2021 and half in 2022, around 10:30 UTC.
    Assets ``B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12`` (uint16 DN) and ``SCL`` (uint8),
    all at 20 m (real Sentinel-2 has B02/B03/B04/B08 at 10 m and B01/B09 at 60 m; here B01 and
    B09 carry 60 m detail, as 3 × 3 block means, resampled to 20 m). Nodata is DN 0 in every
    asset (GeoTIFF nodata tag 0, ``raster:bands`` nodata 0); valid DNs are >= 1.
    **Processing baseline**: items dated 2021 have ``s2:processing_baseline`` "03.01" and
    DN = reflectance × 10000; items dated 2022 have "04.00" and DN = reflectance × 10000 + 1000
    (ESA's BOA_ADD_OFFSET), so reflectance = (DN - 1000) / 10000 and can be slightly negative
    (dark water). ``raster:bands`` carry no scale/offset, as on Planetary Computer: derive the
    offset from ``s2:processing_baseline``.
    SCL follows ESA: 0 nodata, 3 cloud shadow, 4 vegetation, 5 not vegetated, 6 water,
    7 unclassified (thin haze next to clouds), 8 cloud medium probability, 9 cloud high
    probability, 10 thin cirrus, 11 snow (never occurs here). As in reality the mask is
    imperfect: the faint edges of hazes and shadows are not flagged, and on some dates large
    bright industrial roofs are flagged 8. ``eo:cloud_cover`` is the percentage of the granule's
    valid pixels with SCL 8, 9 or 10. About 45 % of the dates of each year (never all of
    them) are cloudy: every granule of such a date has >= 35 % cloud; the other dates have
    <= ~12 % (so ``max_cloud_cover: 20`` keeps the clear dates, and SCL masking still matters
    on them). All granules of one date share the same ``datetime``.
    Each date comes as three overlapping granules (west, north-east, south-east) in UTM
    (``proj:code`` "EPSG:326NN", zone of the bbox centre: EPSG:32632 for the default region),
    20 m pixels with edges on multiples of 20 m. A granule's raster is a little larger than its
    valid footprint (nodata border); on some dates a slanted swath edge cuts a granule.
    Overlapping granules of one date hold identical values where they overlap.
    Item id: ``S2A_MSIL2A_20210704_T32UNC_g1`` (platform, date, MGRS tile of the granule
    centre, granule number 1-3).
Sentinel-1 RTC (collection ``sentinel-1-rtc``)
    Dates spread over 2021, assets ``vv`` and ``vh``: float32 linear gamma0 power with
    multiplicative speckle (values rounded to ~0.1 % so that they compress), nodata -32768.0
    (GeoTIFF nodata tag and ``raster:bands``). Two overlapping frames (north, south) per date
    in the same UTM CRS at 20 m, alternately descending (~05:30 UTC) and ascending (~17:15
    UTC). Item id: ``S1A_IW_GRDH_1SDV_20210703T053217_f1_rtc``.
VIIRS night lights (collection ``viirs-nightlights``)
    Monthly composites of 2021 (winter months first: short summer nights have no data in
    reality), asset ``avg_rad``: float32 radiance in nW/cm²/sr on an EPSG:4326 grid of
    15 arc-seconds (1/240°, edges on multiples of it) covering the bbox; nodata -32768.0.
    Like the real product the dark background (~0.3) is noisy and can be slightly negative:
    clip before taking logs. Item id: ``VIIRS_DNB_202102`` (``start_datetime`` /
    ``end_datetime`` span the month).
Census
    ``GRD_ID`` is ``CRS3035RES1000mN{y}E{x}`` with (x, y) the lower-left corner of the 1 km
    cell in EPSG:3035 metres; ``TOT_P_2021`` the rounded sum of the truth over the cell. As
    Eurostat does, only populated cells are listed (no row with 0: a cell of the bbox that is
    not listed is uninhabited); about 1.5 % of them are confidential, flagged
    ``CONFIDENTIALSTATUS`` = 1 (0 otherwise), so their count must not be used (unknown).

All randomness comes from ``numpy.random.default_rng(seed)`` (split into independent child
generators per component, so that, e.g., the number of Sentinel-2 dates does not change the
truth).

Pure array functions (no I/O), usable on their own: `make_landscape` (land cover, building
structure, true population), `s2_surface_reflectance`, `cloud_field`, `sky_conditions`,
`s2_observe`, `s2_to_dn`, `s1_backscatter`, `night_light_emission` and `census_table`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.io import MemoryFile
from rasterio.shutil import copy as rio_copy
from rasterio.transform import Affine
from rasterio.warp import reproject
from scipy import ndimage, sparse, special

__all__ = [
    "LANDCOVER_CLASSES",
    "S2_BANDS",
    "DemoRegion",
    "Landscape",
    "SkyState",
    "census_table",
    "census_variables",
    "cloud_field",
    "make_demo_region",
    "make_landscape",
    "night_light_emission",
    "rewrite_hrefs",
    "s1_backscatter",
    "s2_observe",
    "s2_surface_reflectance",
    "s2_to_dn",
    "sky_conditions",
]

#: Land-cover classes of ``landcover.tif`` (value -> name). 0 is not used.
LANDCOVER_CLASSES: dict[int, str] = {
    1: "old_core",  # dense historic town centre: red tiles, 3-7 floors, shops below flats
    2: "apartment_blocks",  # post-war estates: flat grey roofs, 5-14 floors, lawns between
    3: "suburb",  # detached/terraced houses with gardens, 1-3 floors
    4: "village",  # villages and isolated farmsteads (barns: large roofs, few people)
    5: "industry",  # halls, large bright/grey roofs, yards; nobody lives there
    6: "road",  # roads and the motorway (bridges over water too)
    7: "cereal",  # winter cereal: green in June, ripe in July, stubble/ploughed after
    8: "maize",  # bare in June, green July-September, harvested in October
    9: "sugar_beet",  # green June-October
    10: "grassland",  # meadows and flood plains, mown two or three times a year
    11: "deciduous_forest",
    12: "coniferous_forest",
    13: "water",  # river and lakes
    14: "urban_green",  # parks inside towns
}

#: Sentinel-2 L2A reflectance bands written (the asset keys), in this order.
S2_BANDS: tuple[str, ...] = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B11",
    "B12",
)
_S2_WAVELENGTH_UM = (
    0.443,
    0.490,
    0.560,
    0.665,
    0.705,
    0.740,
    0.783,
    0.842,
    0.865,
    0.945,
    1.610,
    2.190,
)
_S2_COMMON_NAME = (
    "coastal",
    "blue",
    "green",
    "red",
    "rededge",
    "rededge",
    "rededge",
    "nir",
    "nir08",
    "nir09",
    "swir16",
    "swir22",
)
_S2_NATIVE_RES = (60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 20, 20)
_B04, _B8A = S2_BANDS.index("B04"), S2_BANDS.index("B8A")

S2_NODATA = 0
S1_NODATA = -32768.0
VIIRS_NODATA = -32768.0
_COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
_EXT_EO = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
_EXT_PROJ = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
_EXT_RASTER = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
_EXT_SAR = "https://stac-extensions.github.io/sar/v1.0.0/schema.json"
_EXT_SAT = "https://stac-extensions.github.io/sat/v1.0.0/schema.json"

# Sub-pixel cover layers of `Landscape.fractions` (they sum to 1 in every pixel).
_ROOF_RED, _ROOF_GREY, _ROOF_DARK, _ROOF_BRIGHT = 0, 1, 2, 3
_PAVED, _WATER, _CONIFER, _DECID, _GRASS, _PARCEL, _SOIL = 4, 5, 6, 7, 8, 9, 10
_N_LAYERS = 11
_ROOFS = slice(0, 4)

# Endmember reflectance spectra (12 bands, S2_BANDS order).
_SPECTRA: dict[str, tuple[float, ...]] = {
    "crop": (0.030, 0.035, 0.075, 0.035, 0.110, 0.320, 0.420, 0.460, 0.480, 0.470, 0.230, 0.110),
    "grass": (0.035, 0.040, 0.080, 0.055, 0.120, 0.260, 0.330, 0.360, 0.375, 0.365, 0.250, 0.140),
    "deciduous": (
        0.025,
        0.030,
        0.060,
        0.032,
        0.090,
        0.270,
        0.350,
        0.380,
        0.395,
        0.385,
        0.180,
        0.085,
    ),
    "autumn": (0.032, 0.038, 0.070, 0.075, 0.125, 0.220, 0.265, 0.285, 0.295, 0.290, 0.215, 0.115),
    "conifer": (0.020, 0.022, 0.042, 0.022, 0.065, 0.170, 0.215, 0.235, 0.245, 0.240, 0.115, 0.052),
    "soil": (0.075, 0.095, 0.135, 0.175, 0.205, 0.225, 0.240, 0.255, 0.265, 0.270, 0.330, 0.285),
    "senescent": (
        0.065,
        0.085,
        0.125,
        0.165,
        0.205,
        0.235,
        0.260,
        0.280,
        0.290,
        0.295,
        0.360,
        0.270,
    ),
    "water": (0.055, 0.050, 0.045, 0.028, 0.022, 0.013, 0.010, 0.008, 0.007, 0.005, 0.004, 0.003),
    "roof_red": (
        0.055,
        0.065,
        0.085,
        0.200,
        0.250,
        0.280,
        0.300,
        0.310,
        0.320,
        0.320,
        0.380,
        0.330,
    ),
    "roof_grey": (
        0.150,
        0.165,
        0.185,
        0.205,
        0.215,
        0.225,
        0.235,
        0.245,
        0.250,
        0.250,
        0.270,
        0.250,
    ),
    "roof_dark": (
        0.060,
        0.065,
        0.072,
        0.080,
        0.085,
        0.090,
        0.095,
        0.100,
        0.105,
        0.105,
        0.125,
        0.115,
    ),
    "roof_bright": (
        0.300,
        0.330,
        0.350,
        0.360,
        0.360,
        0.360,
        0.365,
        0.370,
        0.370,
        0.365,
        0.330,
        0.280,
    ),
    "paved": (0.070, 0.080, 0.090, 0.100, 0.105, 0.110, 0.115, 0.120, 0.125, 0.125, 0.150, 0.140),
    "cloud": (0.520, 0.500, 0.490, 0.480, 0.480, 0.480, 0.470, 0.470, 0.470, 0.450, 0.330, 0.220),
}
_LAYER_SPECTRA = (
    "roof_red",
    "roof_grey",
    "roof_dark",
    "roof_bright",
    "paved",
    "water",
    "conifer",
    "deciduous",
    "grass",
    None,
    "soil",
)

# Crop phenology: day of year -> (green, senescent) cover of the parcel; the rest is bare soil.
_CEREAL, _MAIZE, _BEET, _MEADOW = 0, 1, 2, 3
_CROP_CLASS = {_CEREAL: 7, _MAIZE: 8, _BEET: 9, _MEADOW: 10}
_PHENOLOGY: dict[int, tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]] = {
    _CEREAL: (
        (0, 60, 100, 130, 165, 185, 200, 215, 240, 260, 285, 305, 366),
        (0.25, 0.30, 0.55, 0.85, 0.85, 0.45, 0.10, 0.03, 0.03, 0.02, 0.15, 0.30, 0.25),
        (0, 0, 0, 0, 0.05, 0.50, 0.85, 0.60, 0.20, 0.05, 0, 0, 0),
    ),
    _MAIZE: (
        (0, 120, 150, 170, 190, 210, 245, 265, 280, 290, 366),
        (0, 0, 0.05, 0.20, 0.55, 0.88, 0.90, 0.60, 0.30, 0.02, 0),
        (0.15, 0.05, 0, 0, 0, 0, 0.05, 0.30, 0.60, 0.35, 0.15),
    ),
    _BEET: (
        (0, 110, 140, 165, 185, 200, 260, 285, 300, 315, 366),
        (0, 0, 0.08, 0.45, 0.85, 0.95, 0.92, 0.80, 0.45, 0.05, 0),
        (0, 0, 0, 0, 0, 0, 0, 0.05, 0.10, 0.05, 0),
    ),
    _MEADOW: (
        (0, 90, 120, 280, 320, 366),
        (0.55, 0.60, 0.85, 0.85, 0.60, 0.55),
        (0.25, 0.20, 0.08, 0.08, 0.20, 0.25),
    ),
}

_PERSONS_PER_M2_FLOOR = 1.0 / 75.0  # gross residential floor area per inhabitant: 75 m²
_LIGHT_GAIN = 4.5  # brings a town centre to ~60-90 nW/cm²/sr

_LANDCOVER_COLORS: dict[int, tuple[int, int, int, int]] = {
    0: (0, 0, 0, 0),
    1: (140, 20, 20, 255),
    2: (200, 60, 160, 255),
    3: (235, 120, 100, 255),
    4: (240, 170, 120, 255),
    5: (120, 120, 130, 255),
    6: (60, 60, 60, 255),
    7: (240, 220, 90, 255),
    8: (200, 230, 80, 255),
    9: (150, 210, 120, 255),
    10: (170, 230, 160, 255),
    11: (40, 140, 60, 255),
    12: (20, 90, 50, 255),
    13: (60, 120, 220, 255),
    14: (110, 200, 110, 255),
}


# --------------------------------------------------------------------------------------------
# Public result type
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoRegion:
    """Where `make_demo_region` wrote the demo region.

    Attributes
    ----------
    root : Path
        The output folder.
    bbox : tuple of float
        (xmin, ymin, xmax, ymax) of the region in EPSG:3035 metres (multiples of 1000).
    collections : dict of str to Path
        Collection id -> its STAC Collection JSON file.
    items : dict of str to Path
        Collection id -> its items file (newline-delimited JSON, one STAC Item a line).
    census : Path
        The 1 km census table (CSV: ``GRD_ID``, ``TOT_P_2021``, ``CONFIDENTIALSTATUS``;
        populated cells only, 1 = confidential).
    truth : Path
        GeoTIFF of the true persons per 20 m pixel (float32, EPSG:3035, exactly `bbox`).
    """

    root: Path
    bbox: tuple[float, float, float, float]
    collections: dict[str, Path]
    items: dict[str, Path]
    census: Path
    truth: Path

    @property
    def landcover(self) -> Path:
        """GeoTIFF of the land-cover class per 20 m pixel (see `LANDCOVER_CLASSES`)."""
        return self.root / "landcover.tif"


@dataclass(frozen=True)
class Landscape:
    """The synthetic world on a 20 m grid: what is where, and who lives there.

    All arrays have the grid's shape ``(H, W)`` (row 0 north) unless stated otherwise.

    Attributes
    ----------
    landcover : ndarray of uint8
        Land-cover class (`LANDCOVER_CLASSES`).
    fractions : ndarray of float32, shape (11, H, W)
        Sub-pixel cover: red, grey, dark and bright roofs, paved, water, conifer, deciduous,
        grass, agricultural parcel, bare soil. Sums to 1; mixed at class edges.
    floors : ndarray of float32
        Mean building height in floors where there are roofs (0 elsewhere).
    floor_area : ndarray of float32
        Roof fraction × floors (floor area per unit pixel area).
    residential_floor_area : ndarray of float32
        The residential part of `floor_area`.
    population : ndarray of float32
        True persons in the pixel.
    parcel : ndarray of int32
        Id of the field of the agricultural field pattern (defined everywhere, used where
        the parcel fraction is > 0); indexes the ``parcel_*`` arrays.
    parcel_crop, parcel_shift, parcel_vigour : ndarray, shape (n_parcels,)
        Crop (0 cereal, 1 maize, 2 sugar beet, 3 meadow), phenology shift in days, vigour.
    parcel_mow : ndarray of float32, shape (n_parcels, 3)
        Mowing days of meadows (NaN: none).
    vigour, texture, orientation : ndarray of float32
        Per-pixel crop vigour, brightness texture, and radar double-bounce factor (street
        orientation relative to the look direction).
    pixel_size : float
        Pixel size in metres.
    """

    landcover: np.ndarray
    fractions: np.ndarray
    floors: np.ndarray
    floor_area: np.ndarray
    residential_floor_area: np.ndarray
    population: np.ndarray
    parcel: np.ndarray
    parcel_crop: np.ndarray
    parcel_shift: np.ndarray
    parcel_vigour: np.ndarray
    parcel_mow: np.ndarray
    vigour: np.ndarray
    texture: np.ndarray
    orientation: np.ndarray
    pixel_size: float


# --------------------------------------------------------------------------------------------
# Pure array functions: random fields
# --------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit standard deviation.

    Large sigmas are filtered on a coarser grid and upsampled bilinearly (same look, a fraction
    of the cost).
    """
    h, w = shape
    f = max(1, int(sigma_px // 3))
    ch, cw = -(-h // f) + 2, -(-w // f) + 2
    coarse = rng.standard_normal((ch, cw), dtype=np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma_px / f, mode="reflect")
    if f > 1:
        coarse = _upsample_bilinear(coarse, f, h, w)
    out = np.ascontiguousarray(coarse[:h, :w], dtype=np.float32)
    out -= out.mean()
    out /= max(float(out.std()), 1e-12)
    return out


def _interp_matrix(n_out: int, n_in: int, f: int) -> sparse.csr_matrix:
    x = np.arange(n_out, dtype=np.float64) / f
    i0 = np.clip(np.floor(x).astype(np.int64), 0, n_in - 2)
    wt = (x - i0).astype(np.float32)
    rows = np.r_[np.arange(n_out), np.arange(n_out)]
    return sparse.csr_matrix((np.r_[1 - wt, wt], (rows, np.r_[i0, i0 + 1])), shape=(n_out, n_in))


def _upsample_bilinear(a: np.ndarray, f: int, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling by an integer factor to (h, w) (two sparse matrix products)."""
    rows = _interp_matrix(h, a.shape[0], f)
    cols = _interp_matrix(w, a.shape[1], f)
    return np.asarray((rows @ (cols @ a.T).T), dtype=np.float32)


def _window(shape: tuple[int, int], cy: float, cx: float, radius: float):
    """Slices of a square window around (cy, cx) and the pixel offsets inside it."""
    h, w = shape
    r0, r1 = max(0, int(cy - radius)), min(h, int(cy + radius) + 2)
    c0, c1 = max(0, int(cx - radius)), min(w, int(cx + radius) + 2)
    dy = (np.arange(r0, r1, dtype=np.float32) + 0.5 - cy)[:, None]
    dx = (np.arange(c0, c1, dtype=np.float32) + 0.5 - cx)[None, :]
    return (slice(r0, r1), slice(c0, c1)), dy, dx


def _rasterize_polyline(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels a densely sampled polyline passes through."""
    mask = np.zeros(shape, dtype=bool)
    r = np.floor(rows).astype(np.int64)
    c = np.floor(cols).astype(np.int64)
    ok = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
    mask[r[ok], c[ok]] = True
    return mask


def _bezier(p0, p1, bend: float, step: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Points (rows, cols) along a gently curved road from p0 to p1, every `step` pixels."""
    (y0, x0), (y1, x1) = p0, p1
    length = math.hypot(y1 - y0, x1 - x0)
    my, mx = (y0 + y1) / 2 - bend * (x1 - x0), (x0 + x1) / 2 + bend * (y1 - y0)
    t = np.linspace(0.0, 1.0, max(2, int(length * 1.3 / step)))
    rows = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * my + t**2 * y1
    cols = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * mx + t**2 * x1
    return rows, cols


# --------------------------------------------------------------------------------------------
# Pure array functions: land cover, structure and population
# --------------------------------------------------------------------------------------------
@dataclass
class _Settlement:
    kind: str  # "town" or "village"
    cy: float
    cx: float
    radius: float  # pixels


def _place(rng, n_try, sample, ok) -> tuple[float, float] | None:
    for _ in range(n_try):
        cy, cx = sample()
        if ok(cy, cx):
            return cy, cx
    return None


def make_landscape(
    shape: tuple[int, int],
    *,
    rng: np.random.Generator,
    pixel_size: float = 20.0,
    region: tuple[int, int, int, int] | None = None,
) -> Landscape:
    """Generate land cover, building structure and the true population on a grid.

    Towns (a dense old core, apartment estates, suburbs, parks, industrial zones on the
    outskirts) and villages are placed inside `region`; a meandering river with its flood
    plain, lakes, forests, agricultural parcels (cereal, maize, sugar beet, meadows), isolated
    farmsteads and roads connecting the settlements fill the rest. Population follows the
    residential floor area (roof fraction × floors × residential share) times an occupancy that
    varies smoothly between neighbourhoods and randomly between households, so it is not a
    function of the land-cover class.

    Parameters
    ----------
    shape : (int, int)
        Grid shape (rows, columns); row 0 is north.
    rng : numpy.random.Generator
        Source of all randomness.
    pixel_size : float, default 20
        Pixel size in metres; sizes of towns, fields etc. are in metres.
    region : (row0, col0, row1, col1), optional
        The window holding the region proper (towns are placed inside it); default: all.

    Returns
    -------
    Landscape
    """
    h, w = shape
    ps = float(pixel_size)
    km = 1000.0 / ps  # pixels per km
    r0, c0, r1, c1 = region if region is not None else (0, 0, h, w)
    area = (r1 - r0) * (c1 - c0) / km**2
    side = min(r1 - r0, c1 - c0) / km
    n_pixels = h * w

    shape_noise = _smooth_noise(rng, shape, 600 / ps)
    n_fine = _smooth_noise(rng, shape, 60 / ps)
    n_150 = _smooth_noise(rng, shape, 150 / ps)
    n_400 = _smooth_noise(rng, shape, 400 / ps)
    n_res = _smooth_noise(rng, shape, 200 / ps)
    n_forest = _smooth_noise(rng, shape, 1200 / ps) + 0.5 * n_400
    n_conif = _smooth_noise(rng, shape, 800 / ps)
    iid = rng.standard_normal(shape, dtype=np.float32)
    u_px = rng.random(shape, dtype=np.float32)

    # ---- settlements -------------------------------------------------------------------------
    towns: list[_Settlement] = []
    r_main = min(2.6, 0.26 * side) * km
    for i in range(max(1, round(area / 110))):
        radius = r_main if i == 0 else r_main * rng.uniform(0.4, 0.6)
        lo, hi = (0.35, 0.65) if i == 0 else (0.1, 0.9)
        pos = _place(
            rng,
            200,
            lambda lo=lo, hi=hi: (
                r0 + (r1 - r0) * rng.uniform(lo, hi),
                c0 + (c1 - c0) * rng.uniform(lo, hi),
            ),
            lambda cy, cx, radius=radius: all(
                math.hypot(cy - t.cy, cx - t.cx) >= 1.15 * (radius + t.radius) + 0.5 * km
                for t in towns
            ),
        )
        if pos is not None:
            towns.append(_Settlement("town", pos[0], pos[1], radius))
    villages: list[_Settlement] = []
    margin = 0.3 * km
    for _ in range(max(1, round(area / 45))):
        radius = rng.uniform(0.25, 0.5) * km
        pos = _place(
            rng,
            200,
            lambda: (rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)),
            lambda cy, cx, radius=radius: (
                all(
                    math.hypot(cy - t.cy, cx - t.cx) >= 1.25 * t.radius + radius + 0.4 * km
                    for t in towns
                )
                and all(
                    math.hypot(cy - v.cy, cx - v.cx) >= v.radius + radius + 1.0 * km
                    for v in villages
                )
            ),
        )
        if pos is not None:
            villages.append(_Settlement("village", pos[0], pos[1], radius))

    def distorted_distance(s: _Settlement, reach: float = 1.9):
        win, dy, dx = _window(shape, s.cy, s.cx, reach * s.radius)
        scale = s.radius * np.maximum(1.0 + 0.22 * shape_noise[win], 0.5)
        return win, np.hypot(dy, dx) / scale

    town_d = np.full(shape, np.inf, dtype=np.float32)
    town_k = np.full(shape, -1, dtype=np.int16)
    for k, t in enumerate(towns):
        win, d = distorted_distance(t)
        closer = d < town_d[win]
        town_d[win][closer] = d[closer]
        town_k[win][closer] = k
    vill_d = np.full(shape, np.inf, dtype=np.float32)
    for v in villages:
        win, d = distorted_distance(v)
        vill_d[win] = np.minimum(vill_d[win], d)

    def blobs(centres_radii, jitter=0.3, noise=n_400):
        """Boolean mask of disks with edges distorted by a smooth noise field."""
        mask = np.zeros(shape, dtype=bool)
        for cy, cx, rad in centres_radii:
            win, dy, dx = _window(shape, cy, cx, 1.9 * rad)
            d = np.hypot(dy, dx) / (rad * np.maximum(1.0 + jitter * noise[win], 0.5))
            mask[win] |= d < 1.0
        return mask

    def blocks(centres_radii):
        """Boolean mask of clusters of 2-4 aligned rectangles (industrial parks, estates)."""
        mask = np.zeros(shape, dtype=bool)
        for cy, cx, rad in centres_radii:
            ang = rng.uniform(0, math.pi / 2)
            ca, sa = math.cos(ang), math.sin(ang)
            win, dy, dx = _window(shape, cy, cx, 2.0 * rad)
            uu, vv = dx * ca + dy * sa, dy * ca - dx * sa
            for _ in range(int(rng.integers(2, 5))):
                ou, ov = rng.uniform(-0.6, 0.6, 2) * rad
                a, b = rng.uniform(0.35, 0.9, 2) * rad
                mask[win] |= (np.abs(uu - ou) < a) & (np.abs(vv - ov) < b)
        return mask

    def around(t: _Settlement, dist_lo, dist_hi, size_lo, size_hi):
        ang = rng.uniform(0, 2 * math.pi)
        dist = t.radius * rng.uniform(dist_lo, dist_hi)
        return (
            t.cy + dist * math.sin(ang),
            t.cx + dist * math.cos(ang),
            t.radius * rng.uniform(size_lo, size_hi),
        )

    industry_sites, estate_sites, park_sites = [], [], []
    for t in towns:
        big = t.radius >= 2 * km
        industry_sites += [around(t, 0.8, 1.1, 0.18, 0.28) for _ in range(1 + big)]
        estate_sites += [around(t, 0.35, 0.6, 0.12, 0.2) for _ in range(1 + big)]
        park_sites += [around(t, 0.2, 0.7, 0.06, 0.12) for _ in range(1 + big)]

    # ---- water -------------------------------------------------------------------------------
    main = towns[0]
    theta = rng.uniform(0, math.pi)
    ux, uy = math.cos(theta), math.sin(theta)
    offset = rng.uniform(0.15, 0.5) * main.radius * rng.choice([-1.0, 1.0])
    span = math.hypot(h, w)
    s = np.arange(-span, span, 0.4, dtype=np.float64)
    lateral = np.full_like(s, offset)
    for wavelength, amplitude in ((3.2, 0.35), (1.4, 0.15), (0.55, 0.05)):
        lateral += amplitude * km * np.sin(2 * np.pi * s / (wavelength * km) + rng.uniform(0, 6.3))
    river_line = _rasterize_polyline(
        shape, main.cy + s * uy + lateral * ux, main.cx + s * ux - lateral * uy
    )
    river_dist = ndimage.distance_transform_edt(~river_line).astype(np.float32) * ps
    river_width = rng.uniform(35.0, 70.0)
    river_water = np.clip((river_width / 2 + 10.0 - river_dist) / 20.0, 0.0, 1.0)
    floodplain = river_dist < rng.uniform(250, 450) * np.maximum(1 + 0.4 * n_400, 0.3)

    lakes = []
    for _ in range(int(area // 200)):
        radius = rng.uniform(0.2, 0.5) * km
        pos = _place(
            rng,
            100,
            lambda: (rng.uniform(0, h), rng.uniform(0, w)),
            lambda cy, cx, radius=radius: all(
                math.hypot(cy - t.cy, cx - t.cx) >= 1.4 * t.radius + radius
                for t in towns + villages
            ),
        )
        if pos is not None:
            lakes.append((pos[0], pos[1], radius))
    lake = blobs(lakes, 0.3, shape_noise)

    # ---- agricultural parcels in districts of differently oriented field strips --------------
    n_districts = max(2, round(area / 100))
    seeds = np.column_stack([rng.uniform(0, h, n_districts), rng.uniform(0, w, n_districts)])
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(w, dtype=np.float32)[None, :] + 0.5
    district = np.zeros(shape, dtype=np.int16)
    best = np.full(shape, np.inf, dtype=np.float32)
    for k, (sy, sx) in enumerate(seeds):
        d2 = (rows - sy) ** 2 + (cols - sx) ** 2 + 40.0 * shape_noise * km
        closer = d2 < best
        best[closer] = d2[closer]
        district[closer] = k
    del best
    field_key = np.zeros(shape, dtype=np.int64)
    for k in range(n_districts):
        ang = rng.uniform(0, math.pi / 2)
        uu = cols * math.cos(ang) + rows * math.sin(ang)
        vv = rows * math.cos(ang) - cols * math.sin(ang)
        sel = district == k
        uu, vv = uu[sel], vv[sel]
        widths = rng.uniform(120, 340, int(2 * span * ps / 120) + 2) / ps
        edges = np.cumsum(widths) - span
        strip = np.searchsorted(edges, uu)
        lengths = rng.uniform(200, 700, len(edges) + 1) / ps
        shifts = rng.uniform(0, 1, len(edges) + 1) * lengths
        seg = np.floor((vv + span + shifts[strip]) / lengths[strip]).astype(np.int64)
        field_key[sel] = (k * 100_000 + strip) * 100_000 + seg
    field_key = field_key * 2 + floodplain
    _, parcel = np.unique(field_key, return_inverse=True)
    parcel = parcel.reshape(shape).astype(np.int32)
    del field_key
    n_parcels = int(parcel.max()) + 1
    parcel_crop = rng.choice(4, size=n_parcels, p=[0.38, 0.24, 0.13, 0.25]).astype(np.int8)
    in_floodplain = np.zeros(n_parcels, dtype=bool)
    in_floodplain[parcel[floodplain]] = True
    parcel_crop[in_floodplain] = _MEADOW
    parcel_shift = rng.uniform(-8, 8, n_parcels).astype(np.float32)
    parcel_vigour = rng.uniform(0.85, 1.05, n_parcels).astype(np.float32)
    parcel_mow = np.column_stack(
        [
            rng.uniform(140, 165, n_parcels),
            rng.uniform(190, 215, n_parcels),
            np.where(rng.random(n_parcels) < 0.6, rng.uniform(240, 265, n_parcels), np.nan),
        ]
    ).astype(np.float32)
    parcel_mow[parcel_crop != _MEADOW] = np.nan

    # ---- land cover, by increasing priority --------------------------------------------------
    lc = np.asarray([_CROP_CLASS[c] for c in range(4)], dtype=np.uint8)[parcel_crop[parcel]]
    forest = (n_forest > np.quantile(n_forest[::7, ::7], 0.72)) & ~floodplain
    lc[forest] = np.where(n_conif[forest] > 0.3, 12, 11)
    farm = np.zeros(shape, dtype=bool)
    for _ in range(round(n_pixels / km**2 * 0.3)):
        y, x = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
        farm[y : y + 2, x : x + 2] = True
    farm &= (lc <= 10) & ~floodplain
    lc[farm] = 4
    village = vill_d < 1.0 + 0.08 * n_fine
    lc[village] = 4
    urban = town_d < 1.0 + 0.08 * n_fine
    lc[urban] = 3
    estate = blocks(estate_sites) & urban
    lc[estate] = 2
    core_radius = np.where(town_k == 0, 0.22, 0.2).astype(np.float32)
    core = (town_d < core_radius * (1 + 0.15 * n_fine)) & urban
    lc[core] = 1
    park = blobs(park_sites, 0.4, n_150) & urban & ~core
    lc[park] = 14
    industry = blocks(industry_sites) & ~core
    lc[industry] = 5
    water = (river_water >= 0.5) | lake
    lc[water] = 13

    roads = np.zeros(shape, dtype=bool)
    nodes = [(s.cy, s.cx) for s in towns + villages]
    if len(nodes) > 1:  # minimum spanning tree (Prim) plus direct links between towns
        pts = np.asarray(nodes)
        dist = np.hypot(*(pts[:, None, :] - pts[None, :, :]).transpose(2, 0, 1))
        links = {(i, j) for i in range(len(towns)) for j in range(i + 1, len(towns))}
        connected = {0}
        while len(connected) < len(nodes):
            i, j = min(
                ((i, j) for i in connected for j in range(len(nodes)) if j not in connected),
                key=lambda ij: dist[ij],
            )
            links.add((i, j))
            connected.add(j)
        for i, j in sorted(links):
            roads |= _rasterize_polyline(
                shape, *_bezier(nodes[i], nodes[j], rng.uniform(-0.15, 0.15))
            )
    ang = rng.uniform(0, math.pi)
    off = 1.2 * main.radius * rng.choice([-1.0, 1.0])
    py, px = main.cy + off * math.cos(ang), main.cx - off * math.sin(ang)
    motorway = _rasterize_polyline(
        shape,
        *_bezier(
            (py - span * math.sin(ang), px - span * math.cos(ang)),
            (py + span * math.sin(ang), px + span * math.cos(ang)),
            0.03,
        ),
    )
    motorway = ndimage.binary_dilation(motorway)
    lc[roads | motorway] = 6

    # ---- sub-pixel fractions and building structure -----------------------------------------
    frac = np.zeros((_N_LAYERS, h, w), dtype=np.float32)
    roof = np.zeros(shape, dtype=np.float32)
    floors = np.zeros(shape, dtype=np.float32)
    paved = np.zeros(shape, dtype=np.float32)
    res_share = np.zeros(shape, dtype=np.float32)
    roof_type = np.zeros(shape, dtype=np.int8)
    u_patch = special.ndtr(n_fine).astype(np.float32)  # ~uniform, patchy (per building)

    def set_roof_types(mask, shares, u):
        edges = np.cumsum(shares)[:-1]
        roof_type[mask] = np.searchsorted(edges, u[mask]).astype(np.int8)

    # rural ground
    frac[_PARCEL][(lc >= 7) & (lc <= 10)] = 1.0
    fp = floodplain & (lc == 10)
    frac[_PARCEL][fp], frac[_GRASS][fp], frac[_DECID][fp] = 0.85, 0.0, 0.15
    for cls, layer in ((11, _DECID), (12, _CONIFER)):
        m = lc == cls
        frac[layer][m], frac[_GRASS][m] = 0.92, 0.08
    # built-up classes
    red_bias = np.asarray([rng.uniform(-0.1, 0.1) for _ in towns], dtype=np.float32)
    td = np.where(np.isfinite(town_d), town_d, 2.0).astype(np.float32)
    m = lc == 1
    x = np.clip(1 - td[m] / core_radius[m], 0, 1)
    roof[m] = np.clip((0.55 + 0.15 * x + 0.06 * n_150[m]) * (1 + 0.2 * iid[m]), 0.2, 0.9)
    floors[m] = np.clip(3.5 + 1.0 * x + 0.7 * n_400[m], 2, 6.5)
    paved[m] = 0.3
    res_share[m] = np.clip(0.7 + 0.15 * n_res[m], 0.35, 0.95)
    set_roof_types(m, (0.8, 0.1, 0.1, 0.0), u_px)
    m = lc == 2
    roof[m] = np.clip(0.24 * (1 + 0.5 * iid[m]) + 0.04 * n_150[m], 0.03, 0.6)
    floors[m] = np.clip(6.0 + 1.5 * n_400[m], 4, 10)
    paved[m] = 0.25
    res_share[m] = 0.96
    set_roof_types(m, (0.0, 0.65, 0.3, 0.05), u_patch)
    m = lc == 3
    base = 0.25 - 0.12 * td[m] + 0.05 * n_150[m]
    roof[m] = np.clip(base * (1 + 0.5 * iid[m]), 0.02, 0.8)
    floors[m] = np.clip(1.8 + 0.35 * n_400[m] - 0.3 * td[m], 1, 3)
    paved[m] = 0.17
    res_share[m] = 0.95
    red = np.clip(
        0.8 - 0.55 * td[m] + 0.15 * n_400[m] + red_bias[np.maximum(town_k[m], 0)], 0.1, 0.9
    )
    um = u_px[m]
    roof_type[m] = np.where(
        um < red, 0, np.where(um < red + (1 - red) * 0.5, 1, np.where(um < 0.97, 2, 3))
    )
    m = (lc == 4) & ~farm
    roof[m] = np.clip((0.14 + 0.04 * n_150[m]) * (1 + 0.5 * iid[m]), 0.02, 0.7)
    floors[m] = np.clip(1.6 + 0.2 * n_400[m], 1, 2.5)
    paved[m] = 0.12
    res_share[m] = np.clip(0.8 + 0.15 * n_res[m], 0.4, 1.0)
    set_roof_types(m, (0.75, 0.1, 0.1, 0.05), u_px)
    m = farm & (lc == 4)
    roof[m] = np.clip(0.45 * (1 + 0.2 * iid[m]), 0.2, 0.8)
    floors[m] = 1.5
    paved[m] = 0.15
    res_share[m] = 0.5
    set_roof_types(m, (0.6, 0.2, 0.0, 0.2), u_px)
    m = lc == 5
    roof[m] = np.clip((0.58 + 0.12 * n_150[m]) * (1 + 0.25 * iid[m]), 0.1, 0.95)
    floors[m] = np.clip(2.5 + 0.8 * n_400[m], 1.2, 5)
    paved[m] = 0.3
    res_share[m] = 0.0
    set_roof_types(m, (0.0, 0.35, 0.2, 0.45), u_patch)
    paved = np.minimum(paved, 0.97 - roof)
    built = np.isin(lc, (1, 2, 3, 4, 5))
    for r in range(4):
        sel = built & (roof_type == r)
        frac[r][sel] = roof[sel]
    frac[_PAVED][built] = paved[built]
    rest = np.where(built, 1 - roof - paved, 0)
    ind = lc == 5
    frac[_GRASS] += np.where(built & ~ind, 0.6 * rest, 0) + np.where(ind, 0.5 * rest, 0)
    frac[_DECID] += np.where(built & ~ind, 0.4 * rest, 0)
    frac[_SOIL] += np.where(ind, 0.5 * rest, 0)
    m = lc == 14
    frac[_GRASS][m], frac[_DECID][m], frac[_PAVED][m] = 0.6, 0.3, 0.1
    for mask, p in ((roads, 0.55), (motorway, 0.75)):
        m = mask & ~water
        frac[:, m] = 0.0
        frac[_PAVED][m], frac[_GRASS][m] = p, 1 - p
    bridge = (roads | motorway) & water
    frac[:, bridge] = 0.0
    frac[_PAVED][bridge] = 1.0
    # water: lakes fully, the river by its (soft) width, replacing what was there
    wfrac = np.where(lake, 1.0, river_water).astype(np.float32)
    wfrac[bridge] = 0.0
    frac *= 1 - wfrac
    frac[_WATER] += wfrac
    roof_eff = frac[_ROOFS].sum(axis=0)
    floor_area = roof_eff * floors
    residential = floor_area * res_share
    del roof, paved, rest

    # mixed pixels at every edge: a light blur of all cover and floor-area layers
    sigma = 0.6
    frac = ndimage.gaussian_filter(frac, sigma=(0, sigma, sigma), mode="nearest")
    floor_area = ndimage.gaussian_filter(floor_area, sigma, mode="nearest")
    residential = ndimage.gaussian_filter(residential, sigma, mode="nearest")
    frac /= frac.sum(axis=0, keepdims=True)
    roof_eff = frac[_ROOFS].sum(axis=0)
    floors = np.where(roof_eff > 0.005, floor_area / np.maximum(roof_eff, 1e-6), 0)

    # ---- population --------------------------------------------------------------------------
    n_30 = _smooth_noise(rng, shape, 30 / ps)
    # occupancy (persons per floor area) varies between districts (household size, dwelling
    # size, vacancy), between streets and between households: none of it is visible from space
    occupancy = np.exp(
        0.18 * _smooth_noise(rng, shape, 700 / ps)
        + 0.32 * _smooth_noise(rng, shape, 200 / ps)
        + 0.25 * rng.standard_normal(shape, dtype=np.float32)
        - 0.5 * (0.18**2 + 0.32**2 + 0.25**2)
    )
    population = (ps * ps * _PERSONS_PER_M2_FLOOR) * residential * occupancy
    population = np.where(population > 0.005, population, 0).astype(np.float32)

    return Landscape(
        landcover=lc,
        fractions=frac.astype(np.float32),
        floors=floors.astype(np.float32),
        floor_area=floor_area.astype(np.float32),
        residential_floor_area=residential.astype(np.float32),
        population=population,
        parcel=parcel,
        parcel_crop=parcel_crop,
        parcel_shift=parcel_shift,
        parcel_vigour=parcel_vigour,
        parcel_mow=parcel_mow,
        vigour=np.clip(1 + 0.05 * n_150 + 0.025 * n_30 + 0.01 * iid[::-1], 0.7, 1.2).astype(
            np.float32
        ),
        texture=np.exp(0.03 * n_fine[::-1, ::-1] + 0.008 * iid[:, ::-1]).astype(np.float32),
        orientation=np.exp(0.45 * _smooth_noise(rng, shape, 500 / ps)).astype(np.float32),
        pixel_size=ps,
    )


# --------------------------------------------------------------------------------------------
# Pure array functions: Sentinel-2
# --------------------------------------------------------------------------------------------
def _parcel_phenology(land: Landscape, doy: float, year: int):
    """Per parcel: (green crop, green grass, senescent, bare soil) cover on a day of year."""
    n = len(land.parcel_crop)
    g_crop = np.zeros(n, dtype=np.float32)
    g_grass = np.zeros(n, dtype=np.float32)
    sen = np.zeros(n, dtype=np.float32)
    day = doy - land.parcel_shift
    for crop, (days, green, senescent) in _PHENOLOGY.items():
        m = land.parcel_crop == crop
        g = np.interp(day[m], days, green).astype(np.float32) * land.parcel_vigour[m]
        s = np.interp(day[m], days, senescent).astype(np.float32)
        if crop == _MEADOW:
            since = doy - land.parcel_mow[m]  # days since each mowing (NaN: no such cut)
            cut = np.where(since >= 0, 0.55 * np.exp(-np.where(since >= 0, since, 0) / 15.0), 0)
            cut = np.nansum(cut, axis=1).clip(0, 0.7).astype(np.float32)
            g, s = g * (1 - cut), s + 0.5 * g * cut
            g, s = _drought(g, s, doy, year)
            g_grass[m] = g
        else:
            g_crop[m] = np.minimum(g, 1.0)
        sen[m] = s
    total = g_crop + g_grass + sen
    over = np.maximum(total, 1.0)
    g_crop, g_grass, sen = g_crop / over, g_grass / over, sen / over
    return g_crop, g_grass, sen, np.maximum(1 - g_crop - g_grass - sen, 0)


def _drought_factor(doy: float, year: int) -> float:
    """Fraction of green grass dried out: the 2022 summer drought, a milder August 2021."""
    days, level = (190, 215, 240, 260), ((0, 0.1, 0.1, 0) if year != 2022 else (0, 0.45, 0.45, 0))
    return float(np.interp(doy, days, level))


def _drought(green, senescent, doy, year):
    d = _drought_factor(doy, year)
    return green * (1 - d), senescent + green * d


def _autumn_factor(doy: float) -> float:
    """Fraction of deciduous canopy coloured / leafless."""
    return float(np.interp(doy, (0, 80, 120, 270, 300, 320, 366), (1, 1, 0, 0, 0.45, 0.9, 1)))


def _sun_position(lat: float, lon: float, when: dt.datetime) -> tuple[float, float]:
    """Approximate sun (elevation, azimuth) in degrees; azimuth clockwise from north."""
    doy = when.timetuple().tm_yday
    decl = math.radians(23.44) * math.sin(2 * math.pi * (284 + doy) / 365)
    hours = when.hour + when.minute / 60 + lon / 15.0
    ha = math.radians(15.0 * (hours - 12.0))
    phi = math.radians(lat)
    sin_el = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(ha)
    az = math.atan2(math.sin(ha), math.cos(ha) * math.sin(phi) - math.tan(decl) * math.cos(phi))
    return math.degrees(math.asin(sin_el)), (math.degrees(az) + 180.0) % 360.0


def _spectra(names) -> np.ndarray:
    return np.asarray([_SPECTRA[n] for n in names], dtype=np.float32)


def s2_surface_reflectance(
    land: Landscape, *, doy: float, year: int, sun_elevation: float = 55.0
) -> np.ndarray:
    """Clear-sky surface reflectance of the landscape on one day.

    A linear mix of endmember spectra by sub-pixel cover, with crop phenology per parcel
    (sowing, green-up, ripening, harvest, ploughing; meadows mown), autumn colouring of
    deciduous trees, the summer drought of 2022 on grass, building shadows that lengthen as the
    sun gets lower, and a fixed per-pixel brightness texture. No noise, no atmosphere.

    Parameters
    ----------
    land : Landscape
    doy : float
        Day of the year.
    year : int
        The year (2022 had a drought summer).
    sun_elevation : float, default 55
        Sun elevation in degrees (sets the length of building shadows).

    Returns
    -------
    ndarray of float32, shape (12, H, W)
        Reflectance per band of `S2_BANDS`.
    """
    h, w = land.landcover.shape
    n = h * w
    g_crop, g_grass, sen, soil = _parcel_phenology(land, doy, year)
    pf = land.fractions[_PARCEL].reshape(n)
    idx = land.parcel.reshape(n)
    gc = np.minimum(g_crop[idx] * land.vigour.reshape(n), 1.0)
    coef = np.empty((_N_LAYERS + 6, n), dtype=np.float32)
    coef[:_N_LAYERS] = land.fractions.reshape(_N_LAYERS, n)
    coef[_PARCEL] = 0.0
    drop = gc - g_crop[idx]  # vigour changes green cover at the expense of bare soil
    coef[_N_LAYERS + 0] = pf * gc
    coef[_N_LAYERS + 1] = pf * g_grass[idx]
    coef[_N_LAYERS + 2] = pf * sen[idx]
    coef[_N_LAYERS + 3] = pf * np.clip(soil[idx] - drop, 0, 1)
    coef[_N_LAYERS + 4] = land.fractions[_DECID].reshape(n) * _autumn_factor(doy)
    coef[_N_LAYERS + 5] = land.fractions[_GRASS].reshape(n) * _drought_factor(doy, year)
    spectra = np.zeros((_N_LAYERS + 6, 12), dtype=np.float32)
    for i, name in enumerate(_LAYER_SPECTRA):
        if name is not None:
            spectra[i] = _SPECTRA[name]
    spectra[_N_LAYERS:] = _spectra(("crop", "grass", "senescent", "soil", "autumn", "senescent"))
    spectra[_N_LAYERS + 4] -= _spectra(("deciduous",))[0]
    spectra[_N_LAYERS + 5] -= _spectra(("grass",))[0]
    refl = (spectra.T @ coef).reshape(12, h, w)
    del coef
    height = land.fractions[_ROOFS].sum(axis=0) * np.maximum(land.floors - 1, 0)
    shade = 1 - np.clip(0.06 * height / math.tan(math.radians(max(sun_elevation, 10))), 0, 0.45)
    refl *= (shade * land.texture)[None]
    return refl


@dataclass(frozen=True)
class SkyState:
    """What the atmosphere does to each pixel on one date (all float32, shape (H, W))."""

    cloud: np.ndarray  # opacity of clouds (0 clear); SCL 8 where > 0, 9 where >= 0.7
    haze: np.ndarray  # opacity of the haze around clouds; SCL 7 where > 0.06, else unflagged
    cirrus: np.ndarray  # reflectance added by thin cirrus (SCL 10 where > 0)
    shadow: np.ndarray  # strength of cloud shadows; SCL 3 where > 0.3


def cloud_field(rng: np.random.Generator, shape: tuple[int, int], pixel_size: float = 20.0):
    """A smooth random field (unit std) whose upper tail makes cloud fields.

    Threshold it with `sky_conditions`; cumulus scales from ~100 m to a few km.
    """
    ps = float(pixel_size)
    field = (
        0.75 * _smooth_noise(rng, shape, 1500 / ps)
        + 0.45 * _smooth_noise(rng, shape, 350 / ps)
        + 0.15 * _smooth_noise(rng, shape, 80 / ps)
    )
    return field / field.std()


def _shift(a: np.ndarray, drow: int, dcol: int) -> np.ndarray:
    """a moved by (drow, dcol) pixels, zero filled."""
    out = np.zeros_like(a)
    h, w = a.shape
    if abs(drow) >= h or abs(dcol) >= w:
        return out
    src = a[max(0, -drow) : h - max(0, drow), max(0, -dcol) : w - max(0, dcol)]
    out[max(0, drow) : max(0, drow) + src.shape[0], max(0, dcol) : max(0, dcol) + src.shape[1]] = (
        src
    )
    return out


def sky_conditions(
    field: np.ndarray,
    threshold: float,
    *,
    cirrus_field: np.ndarray | None = None,
    cirrus_threshold: float = math.inf,
    shadow_shift: tuple[int, int] = (0, 0),
) -> SkyState:
    """Clouds where `field` exceeds `threshold`, haze around them, cirrus, displaced shadows.

    Parameters
    ----------
    field : ndarray
        A `cloud_field`.
    threshold : float
        Clouds where ``field > threshold``; their opacity grows from 0.35 at the edge to 1.
    cirrus_field : ndarray, optional
        Another smooth field; thin cirrus where it exceeds `cirrus_threshold`.
    cirrus_threshold : float, default inf (no cirrus)
    shadow_shift : (int, int)
        Displacement (rows, columns) of the shadows from their clouds, from the sun's position
        and the cloud height.

    Returns
    -------
    SkyState
    """
    excess = field - np.float32(threshold)
    cloud = np.where(excess > 0, np.clip(0.35 + excess / 0.5, 0, 1), 0).astype(np.float32)
    haze = np.where((excess > -0.35) & (excess <= 0), 0.12 * (excess + 0.35) / 0.35, 0).astype(
        np.float32
    )
    if cirrus_field is None or not math.isfinite(cirrus_threshold):
        cirrus = np.zeros_like(cloud)
    else:
        ce = cirrus_field - np.float32(cirrus_threshold)
        cirrus = np.where(ce > 0, 0.03 + 0.05 * np.clip(ce / 0.5, 0, 1), 0).astype(np.float32)
    shadow = 0.75 * _shift(cloud, *shadow_shift)
    return SkyState(cloud=cloud, haze=haze, cirrus=cirrus, shadow=shadow.astype(np.float32))


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f × f blocks, repeated back to the input shape (coarse-band look)."""
    h, w = a.shape
    ph, pw = -(-h // f) * f, -(-w // f) * f
    p = np.pad(a, ((0, ph - h), (0, pw - w)), mode="edge")
    m = p.reshape(ph // f, f, pw // f, f).mean(axis=(1, 3))
    return np.repeat(np.repeat(m, f, axis=0), f, axis=1)[:h, :w]


def s2_observe(
    surface: np.ndarray,
    land: Landscape,
    sky: SkyState,
    *,
    rng: np.random.Generator,
    misflag_bright_roofs: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """What Sentinel-2 L2A delivers: corrupted reflectance and the scene classification.

    Cloud shadows darken (less in the blue, where sky light fills them), haze and clouds
    brighten and flatten the spectrum, cirrus adds a flat veil; a small per-date residual of
    the atmospheric correction, 60 m detail in B01/B09 and sensor noise are added.

    Parameters
    ----------
    surface : ndarray, shape (12, H, W)
        From `s2_surface_reflectance`.
    land : Landscape
    sky : SkyState
        From `sky_conditions`.
    rng : numpy.random.Generator
    misflag_bright_roofs : bool, default False
        Flag large bright roofs as cloud (SCL 8), as Sen2Cor sometimes does.

    Returns
    -------
    reflectance : ndarray of float32, shape (12, H, W)
    scl : ndarray of uint8, shape (H, W)
    """
    refl = surface.copy()
    h, w = sky.cloud.shape
    flat = refl.reshape(12, h * w)
    k_shadow = np.asarray(
        [0.5, 0.55, 0.62, 0.68, 0.7, 0.72, 0.74, 0.75, 0.75, 0.75, 0.78, 0.8], dtype=np.float32
    )[:, None]
    cloud_spec = _spectra(("cloud",))[0][:, None]
    cirrus_spec = np.asarray([1.0] * 10 + [0.8, 0.6], np.float32)[:, None]
    # only the affected pixels are touched: clear skies cost nothing
    for layer, apply in (
        (sky.shadow, lambda v, a: v * (1 - a * k_shadow)),
        (sky.haze, lambda v, a: v + a * (cloud_spec - v)),
        (sky.cirrus, lambda v, a: v + a * cirrus_spec),
        (sky.cloud, lambda v, a: v + a * (cloud_spec * (0.85 + 0.3 * a) - v)),
    ):
        at = np.flatnonzero(layer.reshape(-1))
        if at.size:
            flat[:, at] = apply(flat[:, at], layer.reshape(-1)[at][None, :])
    gain = 1 + rng.normal(0, 0.015, 12).astype(np.float32)
    haze_offset = np.asarray([0.006, 0.004, 0.002] + [0.0] * 9, np.float32) * rng.uniform(-1, 1.5)
    refl *= gain[:, None, None]
    refl += haze_offset[:, None, None]
    # sensor noise: zero-mean, std 0.1 % + 0.4 % of the signal (uniform: cheap, and no one can
    # tell the difference after the median)
    noise = rng.random(refl.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.abs(refl) * np.float32(0.004 * 12**0.5) + np.float32(0.001 * 12**0.5)
    refl += noise
    del noise
    for b in (0, 9):  # B01 and B09 are 60 m bands: 3 x 3 blocks
        refl[b] = _block_mean(refl[b], 3)
    refl[9] *= rng.uniform(0.85, 1.05)  # water-vapour band: the least well corrected

    red, nir = surface[_B04], surface[_B8A]
    ndvi = (nir - red) / np.maximum(nir + red, 1e-4)
    scl = np.where(ndvi > 0.35, 4, 5).astype(np.uint8)
    scl[land.fractions[_WATER] >= 0.5] = 6
    scl[sky.haze > 0.06] = 7
    scl[(sky.shadow > 0.3) & (sky.cloud == 0)] = 3
    scl[(sky.cirrus > 0) & (sky.cloud == 0)] = 10
    scl[sky.cloud > 0] = 8
    scl[sky.cloud >= 0.7] = 9
    if misflag_bright_roofs:
        scl[land.fractions[_ROOF_BRIGHT] > 0.45] = 8
    return refl, scl


def s2_to_dn(reflectance: np.ndarray, processing_baseline: str) -> np.ndarray:
    """Reflectance to L2A digital numbers: × 10000, + 1000 from baseline 04.00 on; 0 is nodata.

    Parameters
    ----------
    reflectance : ndarray
    processing_baseline : str
        e.g. "03.01" or "04.00".

    Returns
    -------
    ndarray of uint16
        Valid DNs are clipped to [1, 65535].
    """
    offset = 1000.0 if _baseline_has_offset(processing_baseline) else 0.0
    dn = np.multiply(reflectance, np.float32(10000.0), dtype=np.float32)
    dn += np.float32(offset + 0.5)  # + 0.5 and truncation: rounding, in place
    np.clip(dn, 1, 65535, out=dn)
    return dn.astype(np.uint16)


def _baseline_has_offset(processing_baseline: str) -> bool:
    major, _, minor = processing_baseline.partition(".")
    return (int(major), int(minor or 0)) >= (4, 0)


# --------------------------------------------------------------------------------------------
# Pure array functions: Sentinel-1 and night lights
# --------------------------------------------------------------------------------------------
def s1_backscatter(
    land: Landscape,
    *,
    doy: float,
    rng: np.random.Generator,
    wind_db: float = 0.0,
    moisture_db: np.ndarray | float = 0.0,
    looks: float = 4.4,
) -> tuple[np.ndarray, np.ndarray]:
    """Sentinel-1 RTC gamma0 (linear power) in VV and VH.

    Vegetation backscatter grows with biomass (crop phenology) and soil moisture; water is
    dark and roughened by wind; buildings add double bounce that grows with height and with
    how streets face the radar (unobservable orientation factor), so dense cores and high-rise
    estates are bright. Multiplicative gamma speckle with `looks` equivalent looks.

    Parameters
    ----------
    land : Landscape
    doy : float
        Day of the year (2021).
    rng : numpy.random.Generator
    wind_db : float
        Wind roughening of open water, dB.
    moisture_db : float or ndarray
        Soil-moisture change of bare and cropped ground, dB.
    looks : float, default 4.4
        Equivalent number of looks of the speckle.

    Returns
    -------
    vv, vh : ndarray of float32, shape (H, W)
    """
    h, w = land.landcover.shape
    f = land.fractions
    g_crop, g_grass, _, _ = _parcel_phenology(land, doy, 2021)
    green = (g_crop + g_grass)[land.parcel]
    autumn = _autumn_factor(doy)

    def lin(db):
        return np.power(np.float32(10.0), np.asarray(db, dtype=np.float32) / np.float32(10.0))

    moist = np.asarray(moisture_db, dtype=np.float32)
    vv = (
        f[_PAVED] * lin(-17.0)
        + f[_WATER] * lin(-21.0 + wind_db)
        + f[_CONIFER] * lin(-8.0)
        + f[_DECID] * lin(-8.5 - 1.5 * autumn)
        + f[_GRASS] * lin(-12.5)
        + f[_SOIL] * lin(-13.0 + moist)
        + f[_PARCEL] * lin(-14.5 + 5.5 * green + moist * (1 - green))
    )
    vh = (
        f[_PAVED] * lin(-26.0)
        + f[_WATER] * lin(-28.0 + 0.5 * wind_db)
        + f[_CONIFER] * lin(-13.0)
        + f[_DECID] * lin(-13.5 - 2.0 * autumn)
        + f[_GRASS] * lin(-19.5)
        + f[_SOIL] * lin(-21.0 + moist)
        + f[_PARCEL] * lin(-22.5 + 8.5 * green + moist * (1 - green))
    )
    roof_vv = 0.2 * np.power(np.maximum(land.floors, 1.0), 0.9) * land.orientation
    metal = 1.0 + 0.6 * f[_ROOF_BRIGHT] / np.maximum(f[_ROOFS].sum(axis=0), 1e-6)
    roofs = f[_ROOFS].sum(axis=0)
    vv = vv + roofs * roof_vv * metal
    vh = vh + roofs * roof_vv * 0.13
    vv *= rng.gamma(looks, 1.0 / looks, size=(h, w)).astype(np.float32)
    vh *= rng.gamma(looks, 1.0 / looks, size=(h, w)).astype(np.float32)
    return _round_mantissa(np.maximum(vv, 1e-5)), _round_mantissa(np.maximum(vh, 1e-6))


def _round_mantissa(a: np.ndarray, keep_bits: int = 9) -> np.ndarray:
    """float32 with only `keep_bits` mantissa bits (relative precision ~0.1 %): compresses."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    drop = 23 - keep_bits
    half = np.uint32(1 << (drop - 1))
    mask = np.uint32((0xFFFFFFFF >> drop) << drop)
    return ((bits + half) & mask).view(np.float32)


def night_light_emission(land: Landscape) -> np.ndarray:
    """Light emitted at night per pixel (nW/cm²/sr as VIIRS would see it before blurring).

    Street lighting in settlements and on town roads, windows of homes, and brighter
    commercial and industrial floor space (yards, halls, shops).

    Returns
    -------
    ndarray of float32, shape (H, W)
    """
    lc = land.landcover
    settled = np.isin(lc, (1, 2, 3, 4, 5, 14))
    lit = ndimage.binary_dilation(settled, iterations=3)
    streets = land.fractions[_PAVED] * np.where(settled, 1.0, np.where(lit, 0.5, 0.0))
    nonres = np.maximum(land.floor_area - land.residential_floor_area, 0)
    return (12.0 * streets + 5.0 * land.residential_floor_area + 14.0 * nonres).astype(np.float32)


def _blur_lights(emission: np.ndarray, pixel_size: float, factor: int = 5) -> np.ndarray:
    """Block-mean to a coarser grid and blur: the VIIRS point spread plus wide blooming."""
    h, w = emission.shape
    coarse = emission[: h // factor * factor, : w // factor * factor]
    coarse = coarse.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    px = pixel_size * factor
    return (
        0.75 * ndimage.gaussian_filter(coarse, 500 / px, mode="nearest")
        + 0.25 * ndimage.gaussian_filter(coarse, 2000 / px, mode="nearest")
    ).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Pure: census
# --------------------------------------------------------------------------------------------
def census_table(
    population: np.ndarray,
    bbox: tuple[float, float, float, float],
    *,
    rng: np.random.Generator,
    cell: int = 1000,
    confidential_fraction: float = 0.015,
) -> pd.DataFrame:
    """Aggregate a population grid to GISCO census cells, listed the way Eurostat does.

    Parameters
    ----------
    population : ndarray, shape (H, W)
        Persons per pixel on a grid exactly covering `bbox` (row 0 north).
    bbox : (xmin, ymin, xmax, ymax)
        EPSG:3035 metres; edges on multiples of `cell`.
    rng : numpy.random.Generator
        Chooses the confidential cells.
    cell : int, default 1000
        Cell size in metres.
    confidential_fraction : float, default 0.015
        Share of populated cells flagged confidential (at least one when there are 10+
        populated cells).

    Returns
    -------
    pandas.DataFrame
        One row per *populated* cell (rounded count >= 1; a cell of `bbox` that is not listed
        has nobody in it), north to south, west to east: ``GRD_ID``
        (``CRS3035RES1000mN{y_llc}E{x_llc}``), ``TOT_P_2021`` (int, rounded),
        ``CONFIDENTIALSTATUS`` (1 = confidential: the count must not be used; 0 otherwise)
        and ``exact`` (float, the unrounded sum).
    """
    xmin, ymin, xmax, ymax = (round(v) for v in bbox)
    ny, nx = (ymax - ymin) // cell, (xmax - xmin) // cell
    h, w = population.shape
    if h % ny or w % nx or h // ny != w // nx:
        raise ValueError(
            f"population grid {population.shape} does not tile into {ny} x {nx} cells of "
            f"{cell} m; pass a grid that exactly covers bbox {bbox}"
        )
    k = h // ny
    sums = population.astype(np.float64).reshape(ny, k, nx, k).sum(axis=(1, 3))
    iy, ix = np.mgrid[0:ny, 0:nx]
    y_llc = ymax - (iy + 1) * cell
    x_llc = xmin + ix * cell
    ids = np.array(
        [f"CRS3035RES{cell}mN{y}E{x}" for y, x in zip(y_llc.ravel(), x_llc.ravel(), strict=True)]
    )
    exact = sums.ravel()
    counts = np.rint(exact).astype(np.int64)
    populated = np.flatnonzero(counts >= 1)
    n_conf = round(confidential_fraction * len(populated))
    if len(populated) >= 10:
        n_conf = max(1, n_conf)
    flag = np.zeros(exact.size, dtype=np.int64)
    if n_conf:
        flag[rng.choice(populated, size=n_conf, replace=False)] = 1
    return pd.DataFrame(
        {
            "GRD_ID": ids[populated],
            "TOT_P_2021": counts[populated],
            "CONFIDENTIALSTATUS": flag[populated],
            "exact": exact[populated],
        }
    )


#: the Census 2021 grid's variables besides the total, as the demo's census lists them
CENSUS_2021_VARIABLES = "M F Y_LT15 Y_1564 Y_GE65 EMP NAT EU_OTH OTH SAME CHG_IN CHG_OUT".split()


def census_variables(
    total: np.ndarray, *, rng: np.random.Generator, perturbed: float = 0.3
) -> pd.DataFrame:
    """The Census 2021 grid's breakdowns of each cell's total, with its disclosure noise.

    Each breakdown (sex, three age bands, country of birth, residence a year before) splits
    the cell's ``total`` by a multinomial draw whose shares depend on how crowded the cell is
    (denser cells: more people of working age and born abroad, fewer of 65+); ``EMP`` is a
    binomial share of the 15–64. Then, as Eurostat's perturbation does, a share
    ``perturbed`` of the values moves by ±1–3 persons (never below 0), so a breakdown does
    not always add up to the total.
    """
    total = np.asarray(total, np.int64)
    n = total.size
    urban = np.clip(np.log1p(total) / np.log1p(max(total.max(), 1)), 0, 1)  # 0 … 1

    def split(means: np.ndarray) -> np.ndarray:
        alpha = 60.0 * means  # cell-to-cell spread of the shares
        p = np.stack([rng.dirichlet(a) for a in alpha])
        return np.stack([rng.multinomial(t, q) for t, q in zip(total, p, strict=True)])

    ones = np.ones(n)
    sex = split(np.stack([0.49 * ones, 0.51 * ones], axis=1))
    age = split(np.stack([0.16 - 0.02 * urban, 0.60 + 0.08 * urban, 0.24 - 0.06 * urban], 1))
    birth = split(np.stack([0.92 - 0.15 * urban, 0.04 + 0.07 * urban, 0.04 + 0.08 * urban], 1))
    moved = split(np.stack([0.91 - 0.05 * urban, 0.08 + 0.04 * urban, 0.01 + 0.01 * urban], 1))
    emp = rng.binomial(age[:, 1], 0.72)[:, None]
    values = np.concatenate([sex, age, emp, birth, moved], axis=1)
    noise = rng.integers(1, 4, values.shape) * rng.choice([-1, 1], values.shape)
    values = np.maximum(values + noise * (rng.random(values.shape) < perturbed), 0)
    return pd.DataFrame(values, columns=list(CENSUS_2021_VARIABLES))


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Grid:
    """A north-up raster grid: top-left corner, pixel size and shape."""

    crs: str
    x0: float
    y1: float
    res_x: float
    res_y: float
    height: int
    width: int

    @property
    def transform(self) -> Affine:
        return Affine(self.res_x, 0.0, self.x0, 0.0, -self.res_y, self.y1)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (
            self.x0,
            self.y1 - self.height * self.res_y,
            self.x0 + self.width * self.res_x,
            self.y1,
        )

    @classmethod
    def from_bounds(cls, crs, bounds, res_x, res_y=None) -> _Grid:
        res_y = res_x if res_y is None else res_y
        x0, y0, x1, y1 = bounds
        return cls(crs, x0, y1, res_x, res_y, round((y1 - y0) / res_y), round((x1 - x0) / res_x))


def _snap_out(bounds, step: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = bounds
    eps = 1e-6
    return (
        math.floor(x0 / step + eps) * step,
        math.floor(y0 / step + eps) * step,
        math.ceil(x1 / step - eps) * step,
        math.ceil(y1 / step - eps) * step,
    )


def _expand(bounds, d: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = bounds
    return (x0 - d, y0 - d, x1 + d, y1 + d)


def _union(a, b) -> tuple[float, float, float, float]:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _utm_epsg(lon: float) -> int:
    return 32600 + int((lon + 180) // 6) % 60 + 1


def _mgrs_tile(epsg: int, lon: float, lat: float, x: float, y: float) -> str:
    """MGRS grid-zone and 100 km square of a UTM point (northern hemisphere), e.g. 32UNC."""
    zone = epsg - 32600
    band = "CDEFGHJKLMNPQRSTUVWX"[min(19, max(0, int((lat + 80) // 8)))]
    col = "ABCDEFGHJKLMNPQRSTUVWXYZ"[((zone - 1) % 3) * 8 + int(x // 100_000) - 1]
    row = "ABCDEFGHJKLMNPQRSTUV"[(int(y // 100_000) + (5 if zone % 2 == 0 else 0)) % 20]
    return f"{zone:02d}{band}{col}{row}"


def _clip_halfplane(poly, normal, c):
    """Clip a polygon (list of (x, y)) to the half-plane normal · p >= c."""
    out = []
    n = len(poly)
    for i in range(n):
        p, q = poly[i], poly[(i + 1) % n]
        dp = normal[0] * p[0] + normal[1] * p[1] - c
        dq = normal[0] * q[0] + normal[1] * q[1] - c
        if dp >= 0:
            out.append(p)
        if (dp >= 0) != (dq >= 0):
            t = dp / (dp - dq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def _lonlat_polygon(poly, transformer) -> tuple[dict, list[float]]:
    """GeoJSON polygon (lon/lat, edges densified) and bbox of a projected polygon."""
    xs, ys = [], []
    n = len(poly)
    for i in range(n):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % n]
        t = np.linspace(0, 1, 8, endpoint=False)
        xs.extend(x0 + t * (x1 - x0))
        ys.extend(y0 + t * (y1 - y0))
    lon, lat = transformer.transform(np.asarray(xs), np.asarray(ys))
    ring = [[round(float(a), 7), round(float(b), 7)] for a, b in zip(lon, lat, strict=True)]
    ring.append(ring[0])
    bbox = [
        round(float(np.min(lon)), 7),
        round(float(np.min(lat)), 7),
        round(float(np.max(lon)), 7),
        round(float(np.max(lat)), 7),
    ]
    return {"type": "Polygon", "coordinates": [ring]}, bbox


@dataclass
class _Granule:
    """One fixed granule/frame grid in UTM and where its pixels come from in the domain."""

    number: int
    grid: _Grid
    rect: tuple[float, float, float, float]  # valid footprint (before swath cuts)
    index: np.ndarray  # int32 (h, w): flat domain index of each pixel, -1 outside the domain

    def centres(self):
        g = self.grid
        xs = g.x0 + (np.arange(g.width) + 0.5) * g.res_x
        ys = g.y1 - (np.arange(g.height) + 0.5) * g.res_y
        return xs[None, :], ys[:, None]

    def valid(self, cut=None) -> np.ndarray:
        """Pixels inside the footprint (and the swath) that have data."""
        xs, ys = self.centres()
        x0, y0, x1, y1 = self.rect
        ok = (xs > x0) & (xs < x1) & (ys > y0) & (ys < y1) & (self.index >= 0)
        if cut is not None:
            normal, c = cut
            ok &= normal[0] * xs + normal[1] * ys >= c
        return ok

    def footprint(self, cut=None):
        x0, y0, x1, y1 = self.rect
        poly = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        if cut is not None:
            poly = _clip_halfplane(poly, *cut)
        return poly


def _index_map(domain: _Grid, grid: _Grid) -> np.ndarray:
    """Nearest domain pixel (flat index) for each pixel of `grid` (-1 where none)."""
    src = np.arange(domain.height * domain.width, dtype=np.int32).reshape(
        domain.height, domain.width
    )
    dst = np.full((grid.height, grid.width), -1, dtype=np.int32)
    reproject(
        src,
        dst,
        src_transform=domain.transform,
        src_crs=domain.crs,
        src_nodata=-1,
        dst_transform=grid.transform,
        dst_crs=grid.crs,
        dst_nodata=-1,
        resampling=Resampling.nearest,
        num_threads=1,
    )
    return dst


def _granule_grid(crs: str, rect, ring: float, res: float = 20.0) -> _Grid:
    return _Grid.from_bounds(crs, _snap_out(_expand(rect, ring), res), res)


# --------------------------------------------------------------------------------------------
# File writing
# --------------------------------------------------------------------------------------------
def _write_cog(
    path: Path,
    array: np.ndarray,
    *,
    crs: str,
    transform: Affine,
    nodata: float | None,
    resampling: str = "nearest",
    tags: dict[str, str] | None = None,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
) -> None:
    """Write one band as a Cloud-Optimized GeoTIFF: tiled, DEFLATE, internal overviews."""
    h, w = array.shape
    block = 512 if min(h, w) >= 1024 else 256 if min(h, w) >= 512 else 128
    factors = []
    f = 2
    while max(h, w) / f > block / 2 or (not factors and max(h, w) / f >= 16):
        factors.append(f)
        f *= 2
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 1,
        "dtype": array.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(np.ascontiguousarray(array), 1)
            if tags:
                ds.update_tags(**tags)
            if colormap:
                ds.write_colormap(1, colormap)
            if factors:
                ds.build_overviews(factors, Resampling[resampling])
        with mem.open() as ds:
            rio_copy(
                ds,
                str(path),
                driver="COG",
                compress="DEFLATE",
                level=1,  # with the predictor as small as level 6 here, and faster
                predictor="YES",  # horizontal differencing (2) for integers, 3 for floats
                blocksize=block,
                overviews="FORCE_USE_EXISTING" if factors else "NONE",
            )


def _iso(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _raster_band(dtype: str, nodata, resolution: float | None = None, unit=None) -> dict:
    band: dict = {"nodata": nodata, "data_type": dtype}
    if resolution is not None:
        band["spatial_resolution"] = resolution
    if unit is not None:
        band["unit"] = unit
    return band


def _proj_properties(grid: _Grid) -> dict:
    t = grid.transform
    return {
        "proj:code": grid.crs,
        "proj:epsg": int(grid.crs.split(":")[1]),
        "proj:shape": [grid.height, grid.width],
        "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "proj:bbox": list(grid.bounds),
    }


def _collection(cid: str, title: str, description: str, bbox, interval) -> dict:
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": cid,
        "title": title,
        "description": description,
        "license": "CC0-1.0",
        "keywords": ["popdask", "synthetic", "demo"],
        "extent": {
            "spatial": {"bbox": [list(bbox)]},
            "temporal": {"interval": [list(interval)]},
        },
        "links": [],
    }


def _check_args(bbox, n_s2_dates, n_s1_dates, n_viirs_dates, seed, href_base):
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(
            f"bbox must be four numbers (xmin, ymin, xmax, ymax) in EPSG:3035 metres, got "
            f"{bbox!r}; e.g. bbox=(4321000, 3210000, 4341000, 3230000)"
        ) from None
    bad = [v for v in (xmin, ymin, xmax, ymax) if not math.isfinite(v) or v % 1000 != 0]
    if bad:
        raise ValueError(
            f"bbox {bbox!r} must lie on the 1 km census grid: every coordinate a multiple of "
            f"1000 m in EPSG:3035 (offending: {bad}); round it outwards, e.g. with "
            f"math.floor(x / 1000) * 1000 for xmin/ymin and math.ceil for xmax/ymax"
        )
    if xmax - xmin < 2000 or ymax - ymin < 2000:
        raise ValueError(
            f"bbox {bbox!r} is {xmax - xmin:.0f} m × {ymax - ymin:.0f} m; each side must be at "
            f"least 2000 m (xmin < xmax, ymin < ymax): widen it"
        )
    if xmax - xmin > 50_000 or ymax - ymin > 50_000:
        raise ValueError(
            f"bbox {bbox!r} has a side over 50 km; the demo region is held in memory at once: "
            f"use a smaller bbox (the default is 20 × 20 km)"
        )
    lon, lat = Transformer.from_crs(3035, 4326, always_xy=True).transform(
        (xmin + xmax) / 2, (ymin + ymax) / 2
    )
    if not (math.isfinite(lon) and math.isfinite(lat)) or not 0 < lat < 84:
        raise ValueError(
            f"bbox {bbox!r} is not in Europe (centre at lon {lon:.2f}, lat {lat:.2f}); "
            f"give EPSG:3035 metres, e.g. (4321000, 3210000, 4341000, 3230000)"
        )
    for name, value, hi in (
        ("n_s2_dates", n_s2_dates, 100),
        ("n_s1_dates", n_s1_dates, 60),
        ("n_viirs_dates", n_viirs_dates, 12),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer between 1 and {hi}, got {value!r}")
        if not 1 <= value <= hi:
            raise ValueError(
                f"{name}={value} is out of range: it must be between 1 and {hi} "
                f"(number of acquisition dates to generate)"
            )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if href_base is not None and (not isinstance(href_base, str) or not href_base):
        raise ValueError(
            f"href_base must be None (local file paths) or a non-empty URL prefix such as "
            f"'http://127.0.0.1:8080/', got {href_base!r}"
        )
    return (xmin, ymin, xmax, ymax)


# --------------------------------------------------------------------------------------------
# The demo region
# --------------------------------------------------------------------------------------------
def _s2_schedule(rng: np.random.Generator, n: int) -> list[dict]:
    """Acquisition dates (June-October 2021 and 2022) and their sky conditions."""
    dates = []
    n21 = -(-n // 2)
    for year, k in ((2021, n21), (2022, n - n21)):
        if k == 0:
            continue
        edges = np.linspace(152, 305, k + 1)
        n_cloudy = min(k - 1, round(0.45 * k)) if k > 1 else 0
        cloudy = set(rng.choice(k, size=n_cloudy, replace=False).tolist())
        for i in range(k):
            doy = int(rng.uniform(edges[i], edges[i + 1]))
            clock = dt.timedelta(
                hours=10, minutes=int(rng.integers(20, 40)), seconds=float(rng.uniform(0, 60))
            )
            when = dt.datetime(year, 1, 1) + dt.timedelta(days=doy - 1) + clock
            is_cloudy = i in cloudy
            cirrus = rng.random() < (0.6 if is_cloudy else 0.35)
            dates.append(
                {
                    "when": when,
                    "doy": doy,
                    "year": year,
                    "baseline": "03.01" if year < 2022 else "04.00",
                    "platform": str(rng.choice(["sentinel-2a", "sentinel-2b"])),
                    "cloudy": is_cloudy,
                    "cover": rng.uniform(0.35, 0.7) if is_cloudy else rng.uniform(0.0, 0.06),
                    "cirrus": (rng.uniform(0.05, 0.2) if is_cloudy else rng.uniform(0.02, 0.05))
                    if cirrus
                    else 0.0,
                    "cloud_height": rng.uniform(1000, 3000),
                    "misflag": rng.random() < 0.3,
                    "cut": rng.random() < 0.35,
                    "cut_granule": int(rng.integers(0, 3)),
                    "cut_frac": rng.uniform(0.15, 0.35),
                    "cut_tilt": rng.uniform(8, 14),
                }
            )
    return dates


def _swath_cut(granule: _Granule, side: str, frac: float, tilt_deg: float):
    """Half-plane (normal, c) keeping the granule except a slanted strip on one side."""
    x0, y0, x1, y1 = granule.rect
    t = math.radians(tilt_deg)
    normal = (math.cos(t), -math.sin(t))  # the edge runs NNE-SSW, as orbit swaths do here
    ym = (y0 + y1) / 2
    if side == "west":
        px = x0 + frac * (x1 - x0)
        return normal, normal[0] * px + normal[1] * ym
    px = x1 - frac * (x1 - x0)
    return (-normal[0], -normal[1]), -(normal[0] * px + normal[1] * ym)


def make_demo_region(
    out_dir: str | os.PathLike,
    *,
    bbox: tuple[float, float, float, float] = (4321000, 3210000, 4341000, 3230000),
    seed: int = 0,
    n_s2_dates: int = 8,
    n_s1_dates: int = 4,
    n_viirs_dates: int = 3,
    href_base: str | None = None,
) -> DemoRegion:
    """Generate a synthetic demo region and write it to `out_dir`.

    Sentinel-2 L2A, Sentinel-1 RTC and VIIRS night-light scenes as COGs with STAC Collections
    and Items, a GISCO-style 1 km census, and the true population per 20 m pixel. See the
    module docstring for the conventions (CRSs, nodata, processing-baseline offset, ids).

    Parameters
    ----------
    out_dir : path
        Folder to write into (created if missing; files of an earlier run are overwritten).
    bbox : (xmin, ymin, xmax, ymax)
        Region in EPSG:3035 metres; multiples of 1000, each side 2-50 km.
    seed : int, default 0
        Everything is a deterministic function of the seed and the other arguments.
    n_s2_dates : int, default 8
        Sentinel-2 dates (each three granules), about half in 2021 and half in 2022.
    n_s1_dates : int, default 4
        Sentinel-1 dates in 2021 (each two frames).
    n_viirs_dates : int, default 3
        VIIRS monthly composites of 2021 (at most 12).
    href_base : str, optional
        Asset hrefs are absolute local paths when None; otherwise ``href_base`` + the path
        relative to `out_dir` (e.g. "http://127.0.0.1:8080/"), to serve the files later.

    Returns
    -------
    DemoRegion

    Raises
    ------
    ValueError
        If an argument is out of range (the message says how to fix it).

    Examples
    --------
    >>> region = make_demo_region("demo", bbox=(4321000, 3210000, 4325000, 3214000),
    ...                           n_s2_dates=4, n_s1_dates=2, n_viirs_dates=1)  # doctest: +SKIP
    >>> region.items["sentinel-2-l2a"]  # doctest: +SKIP
    PosixPath('.../demo/items/sentinel-2-l2a.ndjson')
    """
    bbox = _check_args(bbox, n_s2_dates, n_s1_dates, n_viirs_dates, seed, href_base)
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    base = None if href_base is None else href_base.rstrip("/") + "/"

    def href(path: Path) -> str:
        return str(path) if base is None else base + path.relative_to(root).as_posix()

    rng_land, rng_layout, rng_s2, rng_s1, rng_viirs, rng_census = np.random.default_rng(seed).spawn(
        6
    )
    ps = 20.0
    xmin, ymin, xmax, ymax = bbox
    to_ll = Transformer.from_crs(3035, 4326, always_xy=True)
    lon_c, lat_c = to_ll.transform((xmin + xmax) / 2, (ymin + ymax) / 2)
    epsg = _utm_epsg(lon_c)
    utm = f"EPSG:{epsg}"
    laea_to_utm = Transformer.from_crs(3035, epsg, always_xy=True)
    utm_to_laea = Transformer.from_crs(epsg, 3035, always_xy=True)
    utm_to_ll = Transformer.from_crs(epsg, 4326, always_xy=True)

    # ---- granule layout (UTM) ----------------------------------------------------------------
    u = _snap_out(laea_to_utm.transform_bounds(*bbox, densify_pts=21), ps)
    uw, uh = u[2] - u[0], u[3] - u[1]
    overlap = round(min(max(0.04 * min(uw, uh), 200.0), 800.0) / ps) * ps
    sx = u[0] + round(uw * rng_layout.uniform(0.4, 0.6) / ps) * ps
    sy = u[1] + round(uh * rng_layout.uniform(0.4, 0.6) / ps) * ps
    # footprints overlap by `overlap` at the seams and reach one pixel past the region elsewhere
    edge = ps
    rects = {
        ("s2", 0): (u[0] - edge, u[1] - edge, sx + overlap, u[3] + edge),
        ("s2", 1): (sx - overlap, sy - overlap, u[2] + edge, u[3] + edge),
        ("s2", 2): (sx - overlap, u[1] - edge, u[2] + edge, sy + overlap),
    }
    sy1 = u[1] + round(uh * rng_layout.uniform(0.35, 0.65) / ps) * ps
    rects[("s1", 0)] = (u[0] - edge, sy1 - overlap, u[2] + edge, u[3] + edge)
    rects[("s1", 1)] = (u[0] - edge, u[1] - edge, u[2] + edge, sy1 + overlap)
    rings = {key: rng_layout.uniform(40, 200) for key in rects}

    # ---- the world, on a padded EPSG:3035 grid -----------------------------------------------
    need = _expand(bbox, 1000.0)
    for rect in rects.values():
        need = _union(need, utm_to_laea.transform_bounds(*rect, densify_pts=21))
    domain = _Grid.from_bounds("EPSG:3035", _snap_out(need, 100.0), ps)
    row0 = round((domain.y1 - ymax) / ps)
    col0 = round((xmin - domain.x0) / ps)
    nrow, ncol = round((ymax - ymin) / ps), round((xmax - xmin) / ps)
    inner = (slice(row0, row0 + nrow), slice(col0, col0 + ncol))
    land = make_landscape(
        (domain.height, domain.width),
        rng=rng_land,
        pixel_size=ps,
        region=(row0, col0, row0 + nrow, col0 + ncol),
    )
    granules = {
        key: _Granule(
            number=key[1] + 1,
            grid=(g := _granule_grid(utm, rect, rings[key], ps)),
            rect=rect,
            index=_index_map(domain, g),
        )
        for key, rect in rects.items()
    }

    # ---- truth, land cover, census ----------------------------------------------------------
    region_tf = Affine(ps, 0.0, xmin, 0.0, -ps, ymax)
    truth = np.ascontiguousarray(land.population[inner])
    truth_path = root / "truth.tif"
    _write_cog(
        truth_path,
        truth,
        crs="EPSG:3035",
        transform=region_tf,
        nodata=None,
        resampling="average",
        tags={"units": "persons per pixel"},
    )
    _write_cog(
        root / "landcover.tif",
        np.ascontiguousarray(land.landcover[inner]),
        crs="EPSG:3035",
        transform=region_tf,
        nodata=None,
        resampling="mode",
        tags={f"CLASS_{k}": v for k, v in LANDCOVER_CLASSES.items()},
        colormap=_LANDCOVER_COLORS,
    )
    census = census_table(truth, bbox, rng=rng_census)
    # the breakdowns draw from a generator of their own: the rest of the region is as before
    more = census_variables(
        census["TOT_P_2021"].to_numpy(), rng=np.random.default_rng([seed, 2021])
    )
    census = pd.concat([census.reset_index(drop=True), more], axis=1)
    census_path = root / "census.csv"
    census[["GRD_ID", "TOT_P_2021", *CENSUS_2021_VARIABLES, "CONFIDENTIALSTATUS"]].to_csv(
        census_path, index=False
    )

    # ---- Sentinel-2 L2A ----------------------------------------------------------------------
    sched_rng, *date_rngs = rng_s2.spawn(n_s2_dates + 1)
    s2_items = []
    s2_granules = [granules[("s2", i)] for i in range(3)]
    for date, drng in zip(_s2_schedule(sched_rng, n_s2_dates), date_rngs, strict=True):
        cuts = [None, None, None]
        if date["cut"]:
            k = date["cut_granule"]
            side = "west" if k == 0 else "east"
            cuts[k] = _swath_cut(s2_granules[k], side, date["cut_frac"], date["cut_tilt"])
        valid = [g.valid(c) for g, c in zip(s2_granules, cuts, strict=True)]
        sources = [g.index[v] for g, v in zip(s2_granules, valid, strict=True)]
        field = cloud_field(drng, (domain.height, domain.width), ps).reshape(-1)
        qs = [np.quantile(field[src[::5]], 1 - date["cover"]) for src in sources if src.size]
        threshold = (min(qs) if date["cloudy"] else max(qs)) if qs else math.inf
        cirrus_field = cirrus_thr = None
        if date["cirrus"] > 0:
            cirrus_field = _smooth_noise(drng, (domain.height, domain.width), 1000 / ps)
            cirrus_thr = float(np.quantile(cirrus_field[::4, ::4], 1 - date["cirrus"]))
        elevation, azimuth = _sun_position(lat_c, lon_c, date["when"])
        length = date["cloud_height"] / math.tan(math.radians(elevation)) / ps
        away = math.radians(azimuth + 180.0)
        shift = (-round(length * math.cos(away)), round(length * math.sin(away)))
        sky = sky_conditions(
            field.reshape(domain.height, domain.width),
            threshold,
            cirrus_field=cirrus_field,
            cirrus_threshold=math.inf if cirrus_thr is None else cirrus_thr,
            shadow_shift=shift,
        )
        del field, cirrus_field
        surface = s2_surface_reflectance(
            land, doy=date["doy"], year=date["year"], sun_elevation=elevation
        )
        refl, scl = s2_observe(surface, land, sky, rng=drng, misflag_bright_roofs=date["misflag"])
        del surface, sky
        dn = s2_to_dn(refl, date["baseline"]).reshape(12, -1)
        del refl
        scl = scl.reshape(-1)
        for g, v, src, cut in zip(s2_granules, valid, sources, cuts, strict=True):
            if not src.size:
                continue
            tile = _mgrs_tile(epsg, *utm_to_ll.transform(*_centre(g.rect)), *_centre(g.rect))
            item_id = (
                f"S2{date['platform'][-1].upper()}_MSIL2A_{date['when']:%Y%m%d}_T{tile}_g{g.number}"
            )
            folder = root / "sentinel-2-l2a" / item_id
            sel = np.flatnonzero(v.ravel())
            shape = (g.grid.height, g.grid.width)
            assets = {}
            for b, band in enumerate(S2_BANDS):
                out = np.zeros(g.grid.height * g.grid.width, dtype=np.uint16)
                out[sel] = dn[b, src]
                path = folder / f"{band}.tif"
                _write_cog(
                    path, out.reshape(shape), crs=utm, transform=g.grid.transform, nodata=S2_NODATA
                )
                assets[band] = _s2_asset(href(path), b)
            out = np.zeros(g.grid.height * g.grid.width, dtype=np.uint8)
            scl_g = scl[src]
            out[sel] = scl_g
            path = folder / "SCL.tif"
            _write_cog(
                path, out.reshape(shape), crs=utm, transform=g.grid.transform, nodata=S2_NODATA
            )
            assets["SCL"] = {
                "href": href(path),
                "type": _COG_TYPE,
                "title": "Scene classification map (SCL)",
                "roles": ["data"],
                "raster:bands": [_raster_band("uint8", S2_NODATA, ps)],
            }
            cloudy = float(np.isin(scl_g, (8, 9, 10)).mean()) * 100
            geometry, ll_bbox = _lonlat_polygon(g.footprint(cut), utm_to_ll)
            s2_items.append(
                {
                    "type": "Feature",
                    "stac_version": "1.1.0",
                    "stac_extensions": [_EXT_EO, _EXT_PROJ, _EXT_RASTER, _EXT_SAT],
                    "id": item_id,
                    "collection": "sentinel-2-l2a",
                    "geometry": geometry,
                    "bbox": ll_bbox,
                    "properties": {
                        "datetime": _iso(date["when"]),
                        "platform": date["platform"],
                        "constellation": "sentinel-2",
                        "instruments": ["msi"],
                        "eo:cloud_cover": round(cloudy, 3),
                        "s2:processing_baseline": date["baseline"],
                        "s2:product_type": "S2MSI2A",
                        "s2:mgrs_tile": tile,
                        "s2:nodata_pixel_percentage": round(100 * (1 - sel.size / out.size), 3),
                        "sat:orbit_state": "descending",
                        **_proj_properties(g.grid),
                    },
                    "links": [],
                    "assets": assets,
                }
            )
        del dn, scl

    # ---- Sentinel-1 RTC ----------------------------------------------------------------------
    sched = rng_s1.spawn(n_s1_dates)
    s1_items = []
    s1_granules = [granules[("s1", i)] for i in range(2)]
    s1_pixels = {}
    for g in s1_granules:
        sel = np.flatnonzero(g.valid().ravel())
        s1_pixels[g.number] = (sel, g.index.ravel()[sel])
    edges = np.linspace(1, 366, n_s1_dates + 1)
    for i, drng in enumerate(sched):
        doy = int(drng.uniform(edges[i], edges[i + 1]))
        ascending = (i + int(seed)) % 2 == 1
        clock = dt.timedelta(
            hours=17 if ascending else 5,
            minutes=int(drng.integers(5, 20) if ascending else drng.integers(20, 35)),
            seconds=int(drng.integers(0, 60)),
        )
        when = dt.datetime(2021, 1, 1) + dt.timedelta(days=doy - 1) + clock
        platform = "SENTINEL-1A" if drng.random() < 0.6 or doy > 355 else "SENTINEL-1B"
        moisture = 1.5 * _smooth_noise(drng, (domain.height, domain.width), 2000 / ps)
        moisture += drng.normal(0, 1.0)
        vv, vh = s1_backscatter(
            land, doy=doy, rng=drng, wind_db=drng.uniform(-4, 5), moisture_db=moisture
        )
        del moisture
        pols = {"vv": vv.reshape(-1), "vh": vh.reshape(-1)}
        for g in s1_granules:
            sel, src = s1_pixels[g.number]
            item_id = f"S1{platform[-1]}_IW_GRDH_1SDV_{when:%Y%m%dT%H%M%S}_f{g.number}_rtc"
            folder = root / "sentinel-1-rtc" / item_id
            assets = {}
            for pol, data in pols.items():
                out = np.full(g.grid.height * g.grid.width, S1_NODATA, dtype=np.float32)
                out[sel] = data[src]
                path = folder / f"{pol}.tif"
                _write_cog(
                    path,
                    out.reshape(g.grid.height, g.grid.width),
                    crs=utm,
                    transform=g.grid.transform,
                    nodata=S1_NODATA,
                )
                assets[pol] = {
                    "href": href(path),
                    "type": _COG_TYPE,
                    "title": f"{pol.upper()}: gamma0 terrain-corrected backscatter (linear power)",
                    "roles": ["data"],
                    "raster:bands": [_raster_band("float32", S1_NODATA, ps)],
                }
            geometry, ll_bbox = _lonlat_polygon(g.footprint(), utm_to_ll)
            s1_items.append(
                {
                    "type": "Feature",
                    "stac_version": "1.1.0",
                    "stac_extensions": [_EXT_SAR, _EXT_SAT, _EXT_PROJ, _EXT_RASTER],
                    "id": item_id,
                    "collection": "sentinel-1-rtc",
                    "geometry": geometry,
                    "bbox": ll_bbox,
                    "properties": {
                        "datetime": _iso(when),
                        "platform": platform,
                        "constellation": "Sentinel-1",
                        "instruments": ["c-sar"],
                        "sar:instrument_mode": "IW",
                        "sar:polarizations": ["VV", "VH"],
                        "sar:frequency_band": "C",
                        "sar:product_type": "GRD",
                        "sat:orbit_state": "ascending" if ascending else "descending",
                        **_proj_properties(g.grid),
                    },
                    "links": [],
                    "assets": assets,
                }
            )
        del vv, vh, pols

    # ---- VIIRS night lights ------------------------------------------------------------------
    res = 1.0 / 240.0
    ll = _snap_out(to_ll.transform_bounds(*bbox, densify_pts=21), res)
    vgrid = _Grid.from_bounds("EPSG:4326", ll, res)
    coarse = _blur_lights(night_light_emission(land), ps, 5) * _LIGHT_GAIN
    lights = np.full((vgrid.height, vgrid.width), VIIRS_NODATA, dtype=np.float32)
    reproject(
        coarse,
        lights,
        src_transform=Affine(ps * 5, 0.0, domain.x0, 0.0, -ps * 5, domain.y1),
        src_crs=domain.crs,
        dst_transform=vgrid.transform,
        dst_crs=vgrid.crs,
        dst_nodata=VIIRS_NODATA,
        resampling=Resampling.average,
        num_threads=1,
    )
    have = lights != VIIRS_NODATA
    months = sorted([1, 2, 3, 4, 9, 10, 11, 12, 5, 8, 6, 7][:n_viirs_dates])
    viirs_items = []
    ll_poly = [(ll[0], ll[1]), (ll[2], ll[1]), (ll[2], ll[3]), (ll[0], ll[3])]
    geometry = {"type": "Polygon", "coordinates": [[list(p) for p in [*ll_poly, ll_poly[0]]]]}
    for month, drng in zip(months, rng_viirs.spawn(len(months)), strict=True):
        rad = (
            lights
            * np.float32(drng.uniform(0.9, 1.1))
            * np.exp(drng.normal(0, 0.08, lights.shape)).astype(np.float32)
        )
        rad += np.float32(0.35 + drng.uniform(-0.1, 0.2)) + drng.normal(
            0, 0.2, lights.shape
        ).astype(np.float32)
        rad = np.where(have, rad, VIIRS_NODATA).astype(np.float32)
        item_id = f"VIIRS_DNB_2021{month:02d}"
        path = root / "viirs-nightlights" / item_id / "avg_rad.tif"
        _write_cog(path, rad, crs="EPSG:4326", transform=vgrid.transform, nodata=VIIRS_NODATA)
        start = dt.datetime(2021, month, 1)
        end = dt.datetime(2021 + month // 12, month % 12 + 1, 1) - dt.timedelta(seconds=1)
        viirs_items.append(
            {
                "type": "Feature",
                "stac_version": "1.1.0",
                "stac_extensions": [_EXT_PROJ, _EXT_RASTER],
                "id": item_id,
                "collection": "viirs-nightlights",
                "geometry": geometry,
                "bbox": list(ll),
                "properties": {
                    "datetime": _iso(start),
                    "start_datetime": _iso(start),
                    "end_datetime": _iso(end),
                    "platform": "suomi-npp",
                    "instruments": ["viirs"],
                    **_proj_properties(vgrid),
                },
                "links": [],
                "assets": {
                    "avg_rad": {
                        "href": href(path),
                        "type": _COG_TYPE,
                        "title": "Average DNB radiance, monthly composite (nW/cm²/sr)",
                        "roles": ["data"],
                        "raster:bands": [_raster_band("float32", VIIRS_NODATA, unit="nW/cm^2/sr")],
                    }
                },
            }
        )

    # ---- STAC files --------------------------------------------------------------------------
    specs = {
        "sentinel-2-l2a": (
            s2_items,
            "Sentinel-2 Level-2A (synthetic)",
            "Synthetic Sentinel-2 L2A surface reflectance granules generated by popdask.",
            ("2021-06-01T00:00:00Z", "2022-10-31T23:59:59Z"),
        ),
        "sentinel-1-rtc": (
            s1_items,
            "Sentinel-1 Radiometrically Terrain Corrected (synthetic)",
            "Synthetic Sentinel-1 IW gamma0 backscatter (VV, VH, linear power) by popdask.",
            ("2021-01-01T00:00:00Z", "2021-12-31T23:59:59Z"),
        ),
        "viirs-nightlights": (
            viirs_items,
            "VIIRS Day/Night Band monthly composites (synthetic)",
            "Synthetic VIIRS DNB average radiance (nW/cm²/sr) generated by popdask.",
            ("2021-01-01T00:00:00Z", "2021-12-31T23:59:59Z"),
        ),
    }
    collections, items = {}, {}
    (root / "collections").mkdir(exist_ok=True)
    (root / "items").mkdir(exist_ok=True)
    for cid, (its, title, description, interval) in specs.items():
        boxes = np.asarray([it["bbox"] for it in its])
        extent = [*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist()]
        collections[cid] = root / "collections" / f"{cid}.json"
        collections[cid].write_text(
            json.dumps(_collection(cid, title, description, extent, interval), indent=2) + "\n"
        )
        items[cid] = root / "items" / f"{cid}.ndjson"
        with open(items[cid], "w") as fh:
            for it in its:
                fh.write(json.dumps(it) + "\n")
    return DemoRegion(
        root=root,
        bbox=bbox,
        collections=collections,
        items=items,
        census=census_path,
        truth=truth_path,
    )


def _centre(rect) -> tuple[float, float]:
    return (rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2


def _s2_asset(href: str, b: int) -> dict:
    band = S2_BANDS[b]
    return {
        "href": href,
        "type": _COG_TYPE,
        "title": f"Band {band[1:].lstrip('0')} - {_S2_COMMON_NAME[b]} - "
        f"{_S2_NATIVE_RES[b]}m native, 20m here",
        "roles": ["data"],
        "gsd": 20.0,
        "eo:bands": [
            {
                "name": band,
                "common_name": _S2_COMMON_NAME[b],
                "center_wavelength": _S2_WAVELENGTH_UM[b],
            }
        ],
        "raster:bands": [_raster_band("uint16", S2_NODATA, 20.0)],
    }


def rewrite_hrefs(
    items_path: str | os.PathLike,
    href_base: str | None,
    out_path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    old_base: str | None = None,
) -> Path:
    """Copy an items file with its asset hrefs moved to another base.

    Each href must start with `old_base` (default: the absolute path of `root`, itself by
    default the folder above the items file, i.e. the demo region's root, plus "/"); that
    prefix is replaced by `href_base` (or by the absolute path of `root` when None).

    Parameters
    ----------
    items_path : path
        Newline-delimited STAC Items (as written by `make_demo_region`).
    href_base : str or None
        New prefix, e.g. "http://127.0.0.1:8080/"; None for absolute local paths.
    out_path : path
        Where to write the rewritten items (may equal `items_path`).
    root : path, optional
        The demo region's root folder.
    old_base : str, optional
        The prefix the hrefs have now (default: local paths under `root`).

    Returns
    -------
    Path
        `out_path`.
    """
    items_path = Path(items_path)
    root_dir = Path(root).resolve() if root is not None else items_path.resolve().parent.parent
    local = str(root_dir).rstrip("/") + "/"
    old = local if old_base is None else old_base.rstrip("/") + "/"
    new = local if href_base is None else href_base.rstrip("/") + "/"
    lines = []
    for n, line in enumerate(items_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        for key, asset in item.get("assets", {}).items():
            if not asset["href"].startswith(old):
                raise ValueError(
                    f"{items_path}:{n}: asset {key!r} of item {item.get('id')!r} has href "
                    f"{asset['href']!r}, which does not start with {old!r}; pass old_base= "
                    f"(the prefix the hrefs have now)"
                )
            asset["href"] = new + asset["href"][len(old) :]
        lines.append(json.dumps(item))
    out = Path(out_path)
    out.write_text("".join(line + "\n" for line in lines))
    return out
