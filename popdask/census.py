"""The Eurostat/GISCO 1 km population grid, read onto the run's census cells.

GISCO publishes the grid as GeoPackage, CSV or Parquet. Each row is one cell, named by
``GRD_ID`` (``CRS3035RES1000mN2684000E4334000``: CRS, resolution, then the lower-left
corner's northing and easting in metres) or by ``X_LLC``/``Y_LLC`` columns, with a
population column such as ``TOT_P_2021`` (GEOSTAT) or ``T`` (the Census 2021 grid, whose
other columns ``M, F, Y_LT15, ..., CONFIDENTIALSTATUS`` are read as they are).

Eurostat lists *populated* cells only. So, cell by cell:

- listed with a usable value (a number >= 0, not flagged): **known**, that value;
- not listed but inside the census' coverage: **0**, uninhabited (``absent="zero"``, the
  default; ``absent="unknown"`` keeps such cells NaN, for files that are partial on purpose);
- listed with an empty, non-numeric or negative value, or flagged confidential (a non-empty,
  non-zero ``CONFIDENTIALSTATUS``, or another ``flag_column``): **unknown** (NaN);
- not listed and outside the coverage (sea, countries the file does not cover): **unknown**.

The coverage is the whole run region unless configured (``census.coverage``): polygons
(GeoJSON, optionally filtered to some countries) rasterised onto the cells by their
centres, and/or a raster whose non-zero, non-nodata cells are covered.
:func:`classify_cells` and :func:`cells_to_raster` are pure functions on arrays;
:func:`read_census`, :func:`read_coverage` and :func:`census_from_config` read files.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import xarray as xr

from popdask.grid import EPSG, Grid

if TYPE_CHECKING:
    from popdask.config import CensusConfig

log = logging.getLogger(__name__)

GRD_ID = re.compile(r"^CRS(?P<crs>\d+)RES(?P<res>\d+)mN(?P<n>\d+)E(?P<e>\d+)$")

#: the flag column of the Census 2021 grid, used when present and no other is configured
CONFIDENTIAL_COLUMN = "CONFIDENTIALSTATUS"
#: what a cell is: its census value is known, zero because the cell is absent, or unknown
KNOWN, ABSENT_ZERO, UNKNOWN = 0, 1, 2
#: flag values meaning "not flagged" (compared case-insensitively, after stripping)
_NOT_FLAGGED = {"", "0", "0.0", "false", "f", "no", "n", "nan", "none", "null"}

Absent = Literal["zero", "unknown"]


class CensusError(ValueError):
    """The census file cannot be used for this run; the message names the fix."""


def parse_grd_id(ids: pd.Series | list[str]) -> pd.DataFrame:
    """Split GISCO ``GRD_ID`` strings into ``crs``, ``res``, ``x_llc``, ``y_llc`` columns.

    Examples
    --------
    >>> parse_grd_id(["CRS3035RES1000mN2684000E4334000"]).iloc[0].tolist()
    [3035, 1000, 4334000, 2684000]
    """
    s = pd.Series(ids, dtype="string").str.strip()
    parts = s.str.extract(GRD_ID)
    bad = parts["crs"].isna()
    if bad.any():
        example = s[bad].iloc[0]
        raise CensusError(
            f"{int(bad.sum())} GRD_ID value(s) are not GISCO grid ids, e.g. {example!r}; "
            "expected the form CRS3035RES1000mN2684000E4334000"
        )
    return pd.DataFrame(
        {
            "crs": parts["crs"].astype(int),
            "res": parts["res"].astype(int),
            "x_llc": parts["e"].astype(np.int64),
            "y_llc": parts["n"].astype(np.int64),
        }
    )


def classify_cells(
    x_llc: np.ndarray,
    y_llc: np.ndarray,
    values: np.ndarray,
    grid: Grid,
    *,
    covered: np.ndarray | None = None,
    absent: Absent = "zero",
    flagged: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Place listed cells on the grid's ``(y_cell, x_cell)`` raster and say what each cell is.

    Pure: arrays in, arrays out.

    Parameters
    ----------
    x_llc, y_llc
        Lower-left corners (EPSG:3035 metres) of the listed cells, one per row of the file.
    values
        The rows' population counts; NaN for an empty or non-numeric value.
    grid
        The run's grid; rows outside it are dropped.
    covered
        ``(y_cell, x_cell)`` booleans: the cells inside the census' coverage. ``None`` means
        the whole region is covered.
    absent
        What a covered cell that no row lists is: ``"zero"`` (Eurostat lists populated cells
        only, so it is uninhabited) or ``"unknown"`` (NaN, for files partial on purpose).
    flagged
        Per row, True where the row is flagged confidential (its value is not used).

    Returns
    -------
    (raster, state)
        ``raster`` float32 ``(y_cell, x_cell)``: the count, 0 for an absent covered cell, NaN
        where unknown. ``state`` int8 of the same shape: :data:`KNOWN`, :data:`ABSENT_ZERO` or
        :data:`UNKNOWN` (a listed row that is empty, negative or flagged; or an absent cell
        outside the coverage, or any absent cell with ``absent="unknown"``). A listed cell
        outside the coverage keeps its value: the coverage only says what an absence means.
    """
    if absent not in ("zero", "unknown"):
        raise CensusError(f"absent must be 'zero' or 'unknown', got {absent!r}")
    ny, nx = grid.cell_shape
    if covered is None:
        covered = np.ones((ny, nx), dtype=bool)
    covered = np.asarray(covered, dtype=bool)
    if covered.shape != (ny, nx):
        raise CensusError(f"coverage mask has shape {covered.shape}, not the cells' {(ny, nx)}")
    xmin, _, _, ymax = grid.bounds
    col = (np.asarray(x_llc, dtype=np.int64) - xmin) // grid.cell
    row = (ymax - grid.cell - np.asarray(y_llc, dtype=np.int64)) // grid.cell
    inside = (row >= 0) & (row < ny) & (col >= 0) & (col < nx)
    v = np.asarray(values, dtype=np.float64).copy()
    usable = np.isfinite(v) & (v >= 0)
    if flagged is not None:
        usable &= ~np.asarray(flagged, dtype=bool)
    v[~usable] = np.nan

    if absent == "zero":
        raster = np.where(covered, 0.0, np.nan).astype(np.float32)
        state = np.where(covered, ABSENT_ZERO, UNKNOWN).astype(np.int8)
    else:
        raster = np.full((ny, nx), np.nan, dtype=np.float32)
        state = np.full((ny, nx), UNKNOWN, dtype=np.int8)
    r, c = row[inside], col[inside]
    raster[r, c] = v[inside]
    state[r, c] = np.where(usable[inside], KNOWN, UNKNOWN)
    return raster, state


def cells_to_raster(
    x_llc: np.ndarray,
    y_llc: np.ndarray,
    values: np.ndarray,
    grid: Grid,
    *,
    covered: np.ndarray | None = None,
    absent: Absent = "zero",
    flagged: np.ndarray | None = None,
) -> np.ndarray:
    """Place per-cell values on the grid's ``(y_cell, x_cell)`` raster (pure).

    Cells outside the grid are dropped. A covered cell not listed is 0 (``absent="zero"``)
    or NaN (``absent="unknown"``); empty, negative or ``flagged`` rows and absent cells
    outside ``covered`` are NaN. See :func:`classify_cells`.

    Examples
    --------
    >>> g = Grid.from_bbox((4321000, 3210000, 4323000, 3211000))  # 2 cells side by side
    >>> cells_to_raster([4321000], [3210000], [7.0], g).tolist()
    [[7.0, 0.0]]
    >>> cells_to_raster([4321000], [3210000], [7.0], g, absent="unknown").tolist()
    [[7.0, nan]]
    """
    return classify_cells(
        x_llc, y_llc, values, grid, covered=covered, absent=absent, flagged=flagged
    )[0]


def count_cells(state: np.ndarray) -> dict[str, int]:
    """How many cells are known, zero by absence and unknown (the ``state`` of
    :func:`classify_cells`), as plain ints for the store's attrs."""
    state = np.asarray(state)
    return {
        "cells_known": int((state == KNOWN).sum()),
        "cells_absent_zero": int((state == ABSENT_ZERO).sum()),
        "cells_unknown": int((state == UNKNOWN).sum()),
    }


def flag_values(values: pd.Series | Sequence) -> np.ndarray:
    """True where a confidentiality flag is set: anything but empty, NaN, 0 or false-like.

    The Census 2021 grid's ``CONFIDENTIALSTATUS`` is 0 on ordinary rows; any other value
    (``1``, ``C``, ``true``, ...) marks the row confidential.

    Examples
    --------
    >>> flag_values([0, 1, None, "C", "false", "", 2.0]).tolist()
    [False, True, False, True, False, False, True]
    """
    s = pd.Series(values, dtype=object)
    num = pd.to_numeric(s, errors="coerce")
    text = s.astype(str).str.strip().str.lower()
    is_num = num.notna()
    flagged = np.where(is_num, num.fillna(0).to_numpy() != 0, ~text.isin(_NOT_FLAGGED))
    return np.asarray(flagged & s.notna().to_numpy(), dtype=bool)


# --------------------------------------------------------------------------------------------
# Coverage: which cells the census covers
# --------------------------------------------------------------------------------------------
def coverage_from_shapes(
    shapes: Sequence[dict], grid: Grid, *, crs: str | int = EPSG
) -> np.ndarray:
    """``(y_cell, x_cell)`` booleans: cells whose centre is inside any of ``shapes`` (pure).

    ``shapes`` are GeoJSON geometry mappings in ``crs`` (reprojected to EPSG:3035 here).
    """
    from rasterio.features import rasterize

    shapes = _to_3035(list(shapes), crs)
    if not shapes:
        return np.zeros(grid.cell_shape, dtype=bool)
    burned = rasterize(
        ((g, 1) for g in shapes),
        out_shape=grid.cell_shape,
        transform=grid.cell_transform,
        fill=0,
        all_touched=False,  # a cell is covered when its centre is inside
        dtype="uint8",
    )
    return burned.astype(bool)


def _geojson_crs(doc: dict, name: str) -> str:
    """The CRS a GeoJSON file declares (RFC 7946: none means EPSG:4326 lon/lat)."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    declared = ((doc.get("crs") or {}).get("properties") or {}).get("name")
    if declared is None:
        return "EPSG:4326"
    try:
        crs = CRS.from_user_input(declared)
    except CRSError:
        raise CensusError(
            f"{name}: unknown CRS {declared!r}; write the coverage polygons in EPSG:3035 or "
            'EPSG:4326 ("crs": {"type": "name", "properties": {"name": "EPSG:3035"}})'
        ) from None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def _read_polygons(
    path: Path, name: str, countries: Sequence[str] | None, country_property: str
) -> tuple[list[dict], str]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CensusError(f"{name}: cannot read the coverage as GeoJSON ({e})") from None
    if not isinstance(doc, dict):
        raise CensusError(f"{name}: not a GeoJSON object")
    kind = doc.get("type")
    if kind == "FeatureCollection":
        feats = doc.get("features") or []
    elif kind == "Feature":
        feats = [doc]
    elif kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
        feats = [{"type": "Feature", "properties": {}, "geometry": doc}]
    else:
        raise CensusError(f"{name}: GeoJSON type {kind!r} holds no polygons")
    crs = _geojson_crs(doc, name)
    if countries is not None:
        wanted = {str(c).upper() for c in countries}
        found = sorted({str((f.get("properties") or {}).get(country_property)) for f in feats})
        feats = [
            f
            for f in feats
            if str((f.get("properties") or {}).get(country_property)).upper() in wanted
        ]
        if not feats:
            raise CensusError(
                f"{name}: no feature has {country_property} in {sorted(wanted)} "
                f"(values found: {found[:20]}); fix census.coverage_countries"
            )
    shapes = [f["geometry"] for f in feats if f.get("geometry")]
    polys = [g for g in shapes if g.get("type") in ("Polygon", "MultiPolygon")]
    if len(polys) != len(shapes) or not polys:
        raise CensusError(f"{name}: the coverage must be polygons (Polygon or MultiPolygon)")
    if crs == "EPSG:4326":
        xs = np.abs(np.asarray(_first_coords(polys[0]), dtype=float))
        if xs.size and xs.max() > 360:
            raise CensusError(
                f"{name}: coordinates like {xs.max():.0f} are not degrees, yet the file "
                "declares no CRS (GeoJSON then means EPSG:4326); declare it, e.g. "
                '"crs": {"type": "name", "properties": {"name": "EPSG:3035"}}'
            )
    return polys, crs


def _first_coords(geom: dict) -> list:
    c = geom["coordinates"]
    while c and isinstance(c[0], list) and isinstance(c[0][0], list):
        c = c[0]
    return c


def _raster_window(path: Path, name: str, grid: Grid) -> np.ndarray:
    """Cells of ``grid`` whose centre falls on a non-zero, non-nodata pixel of a raster; only
    the window under ``grid`` is read (GDAL warps it onto the cells, nearest neighbour)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioIOError
    from rasterio.vrt import WarpedVRT

    ny, nx = grid.cell_shape
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise CensusError(
                    f"{name}: the coverage raster has no CRS; write it in EPSG:3035 "
                    "(e.g. gdal_edit.py -a_srs EPSG:3035)"
                )
            with WarpedVRT(
                src,
                crs=f"EPSG:{EPSG}",
                transform=grid.cell_transform,
                width=nx,
                height=ny,
                resampling=Resampling.nearest,  # the pixel under the cell's centre
            ) as vrt:
                band = vrt.read(1, masked=True)
    except RasterioIOError as e:
        raise CensusError(f"{name}: cannot read the coverage raster ({e})") from None
    data = band.filled(0)
    return np.isfinite(data) & (data != 0)


class Coverage:
    """Which census cells the census covers, for any window of the run's grid.

    Built by :func:`open_coverage`: polygons are read and reprojected once, rasters are read
    window by window, so a block of the region costs a block's memory. Close it (or use it
    as a context manager) to remove the copies of remote files.
    """

    def __init__(
        self, shapes: list[dict], rasters: list[tuple[Path, str]], temps: list[Path]
    ) -> None:
        self.whole = not shapes and not rasters
        self._shapes, self._rasters, self._temps = shapes, rasters, temps
        self._boxes = np.array([_geom_bounds(g) for g in shapes]).reshape(-1, 4)

    def window(self, grid: Grid) -> np.ndarray:
        """``(y_cell, x_cell)`` booleans over ``grid`` (the region or a block of it)."""
        if self.whole:
            return np.ones(grid.cell_shape, dtype=bool)
        xmin, ymin, xmax, ymax = grid.bounds
        b = self._boxes  # only the polygons near the window are rasterised
        near = (b[:, 0] < xmax) & (b[:, 2] > xmin) & (b[:, 1] < ymax) & (b[:, 3] > ymin)
        covered = coverage_from_shapes(
            [s for s, n in zip(self._shapes, near, strict=True) if n], grid
        )
        for path, name in self._rasters:
            covered |= _raster_window(path, name, grid)
        return covered

    def close(self) -> None:
        for p in self._temps:
            p.unlink(missing_ok=True)

    def __enter__(self) -> Coverage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_coverage(
    source: str | Path | Sequence[str | Path] | None,
    *,
    countries: Sequence[str] | None = None,
    country_property: str = "CNTR_ID",
    storage_options: dict | None = None,
) -> Coverage:
    """Open the census' coverage (see :func:`read_coverage` for ``source``), checking each
    file now: its format, its CRS, the ``countries`` it must hold."""
    if source is None or (isinstance(source, str) and source == "region"):
        if countries:
            raise CensusError(
                "census.coverage_countries needs census.coverage to be a polygon file "
                "(e.g. GISCO's CNTR_RG_01M_2020_3035.geojson)"
            )
        return Coverage([], [], [])
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    shapes: list[dict] = []
    rasters: list[tuple[Path, str]] = []
    temps: list[Path] = []
    try:
        for src in sources:
            name = str(src)
            suffix = Path(name.split("?")[0]).suffix.lower()
            if suffix not in (".geojson", ".json", ".tif", ".tiff", ".vrt"):
                raise CensusError(
                    f"{name}: unknown coverage format {suffix!r}; give polygons as .geojson or "
                    "a raster as .tif (or census.coverage: region)"
                )
            local = Path(name)
            if "://" in name:
                local = fetch_local(name, storage_options, what="coverage")
                temps.append(local)
            if not local.is_file():
                raise CensusError(
                    f"{name}: coverage file not found; set census.coverage to a GeoJSON of the "
                    "census' countries, a coverage raster, or 'region'"
                )
            if suffix in (".geojson", ".json"):
                polys, crs = _read_polygons(local, name, countries, country_property)
                shapes += _to_3035(polys, crs)
            else:
                rasters.append((local, name))
    except BaseException:
        Coverage([], [], temps).close()
        raise
    return Coverage(shapes, rasters, temps)


def _geom_bounds(geom: dict) -> tuple[float, float, float, float]:
    polys = geom["coordinates"] if geom["type"] == "MultiPolygon" else [geom["coordinates"]]
    xy = np.concatenate([np.asarray(ring, float)[:, :2] for p in polys for ring in p])
    return (*xy.min(axis=0), *xy.max(axis=0))


def _to_3035(shapes: list[dict], crs: str | int) -> list[dict]:
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom

    src = CRS.from_user_input(crs)
    if src.to_epsg() == EPSG:
        return shapes
    return [transform_geom(src, CRS.from_epsg(EPSG), g) for g in shapes]


def read_coverage(
    source: str | Path | Sequence[str | Path] | None,
    grid: Grid,
    *,
    countries: Sequence[str] | None = None,
    country_property: str = "CNTR_ID",
    storage_options: dict | None = None,
) -> np.ndarray:
    """Which census cells of ``grid`` the census covers, as ``(y_cell, x_cell)`` booleans.

    Parameters
    ----------
    source
        ``None`` or ``"region"``: the whole region. A GeoJSON file (``.geojson``/``.json``;
        EPSG:4326 as RFC 7946 says, or the CRS its ``crs`` member names, e.g. EPSG:3035) of
        polygons: a cell is covered when its centre is inside one. A raster (``.tif``/
        ``.tiff``/``.vrt``): a cell is covered when the pixel under its centre is non-zero and
        not nodata. A list of these: covered by any. Local paths or fsspec URLs.
    grid
        The run's grid.
    countries
        Keep only polygon features whose ``country_property`` is one of these (e.g.
        ``["BE", "NL"]`` on GISCO's ``CNTR_ID``).
    storage_options
        fsspec options for URL sources.

    Raises
    ------
    CensusError
        If a file is missing or unreadable, in an unknown CRS, holds no polygons, no feature
        matches ``countries``, or the coverage holds no cell of the region.
    """
    with open_coverage(
        source,
        countries=countries,
        country_property=country_property,
        storage_options=storage_options,
    ) as cov:
        covered = cov.window(grid)
    if not covered.any():
        raise no_coverage_error(source, grid)
    return covered


def no_coverage_error(source, grid: Grid) -> CensusError:
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    names = ", ".join(str(s) for s in sources)
    return CensusError(
        f"{names}: the census coverage holds no cell of the region {grid.bounds} "
        f"(EPSG:{EPSG}); check its CRS and extent, census.coverage_countries, or leave "
        "census.coverage out to take the whole region as covered"
    )


#: rows read at a time (the client holds one batch: about 100 MB with its cell ids parsed)
BATCH_ROWS = 200_000


@dataclass(frozen=True)
class CensusTable:
    """A census file opened for reading in batches, and which of its columns say what."""

    path: Path  # the local file
    name: str  # what messages call it (the configured path or URL)
    column: str
    flag_column: str | None
    ids: tuple[str, ...]  # ("GRD_ID",) or ("X_LLC", "Y_LLC"), as the file spells them
    layer: str | None = None  # a GeoPackage's table
    variables: tuple[str, ...] = ()  # other columns mapped (census.columns)

    @property
    def columns(self) -> list[str]:
        flag = [self.flag_column] if self.flag_column else []
        return list(dict.fromkeys([*self.ids, self.column, *self.variables, *flag]))


def open_table(
    path: Path,
    name: str,
    column: str,
    flag_column: str | None,
    variables: Sequence[str] = (),
) -> CensusTable:
    """Check a census file's header (format, CRS, cell ids, columns) without reading rows."""
    if not path.is_file():
        raise CensusError(f"{name}: census file not found; set census.path to a GISCO grid file")
    try:
        header, layer = _header(path)
    except CensusError as e:
        raise CensusError(str(e).replace(str(path), name)) from None
    except Exception as e:  # unreadable file: say which and why
        raise CensusError(f"{name}: cannot read the census table ({e})") from e
    upper = {c.upper(): c for c in header}
    data = [c for c in header if c.upper() not in ("GRD_ID", "X_LLC", "Y_LLC")]
    if column not in header:
        raise CensusError(
            f"{name}: no population column {column!r}; set census.column to one of {data[:12]}"
        )
    missing = [v for v in variables if v not in header]
    if missing:
        raise CensusError(
            f"{name}: no column {missing[0]!r} to map; census.columns must name columns of "
            f"the file, e.g. {data[:14]}"
        )
    if flag_column is not None and flag_column not in header:
        raise CensusError(
            f"{name}: no flag column {flag_column!r}; set census.flag_column to one of "
            f"{list(header)[:16]} or leave it out"
        )
    if flag_column is None and CONFIDENTIAL_COLUMN in upper:
        flag_column = upper[CONFIDENTIAL_COLUMN]
    if "GRD_ID" in upper:
        ids: tuple[str, ...] = (upper["GRD_ID"],)
    elif "X_LLC" in upper and "Y_LLC" in upper:
        ids = (upper["X_LLC"], upper["Y_LLC"])
    else:
        raise CensusError(
            f"{name}: no cell id; the table needs a GRD_ID column or X_LLC and Y_LLC columns"
        )
    return CensusTable(path, name, column, flag_column, ids, layer, tuple(variables))


def _header(path: Path) -> tuple[list[str], str | None]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(pd.read_csv(path, nrows=0).columns), None
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names), None
    if suffix == ".gpkg":
        return _gpkg_header(path)
    raise CensusError(
        f"{path}: unknown census format {suffix!r}; use the GISCO grid as .gpkg, .csv or .parquet"
    )


def _gpkg_header(path: Path) -> tuple[list[str], str]:
    """Columns (geometry left out) and name of the first feature layer of a GeoPackage."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        layers = con.execute(
            "SELECT c.table_name, g.srs_id FROM gpkg_contents c "
            "LEFT JOIN gpkg_geometry_columns g ON g.table_name = c.table_name "
            "WHERE c.data_type IN ('features', 'attributes')"
        ).fetchall()
        if not layers:
            raise CensusError(f"{path}: the GeoPackage has no feature table")
        table, srs = layers[0]
        if srs not in (None, 0, -1, EPSG):
            raise CensusError(
                f"{path}: the layer {table!r} is in EPSG:{srs}, not EPSG:{EPSG}; use the GISCO "
                "grid in ETRS89-LAEA (EPSG:3035) or reproject it (e.g. ogr2ogr -t_srs EPSG:3035)"
            )
        cols = [r[1] for r in con.execute(f"PRAGMA table_info({_quoted(table)})")]
    return [c for c in cols if c.upper() not in ("GEOM", "GEOMETRY", "SHAPE")], table


def iter_batches(table: CensusTable, batch_rows: int = BATCH_ROWS) -> Iterator[pd.DataFrame]:
    """The table's needed columns, ``batch_rows`` rows at a time, whatever its format."""
    cols, suffix = table.columns, table.path.suffix.lower()
    if suffix == ".csv":
        yield from pd.read_csv(table.path, usecols=cols, chunksize=batch_rows, low_memory=False)
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(table.path).iter_batches(batch_rows, columns=cols):
            yield batch.to_pandas()
    else:
        sel = ", ".join(_quoted(c) for c in cols)
        with sqlite3.connect(f"file:{table.path}?mode=ro", uri=True) as con:
            cur = con.execute(f"SELECT {sel} FROM {_quoted(table.layer)}")
            while rows := cur.fetchmany(batch_rows):
                yield pd.DataFrame(rows, columns=cols)


def iter_cells(
    table: CensusTable, grid: Grid, batch_rows: int = BATCH_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
    """``(x_llc, y_llc, values, flagged)`` of the table's rows, a batch at a time, each batch
    checked (CRS and resolution of its cell ids); see :func:`classify_cells`. ``values`` is
    ``(rows,)`` the population column, or ``(rows, 1 + variables)`` when the table maps
    other columns too."""
    batches = iter_batches(table, batch_rows)
    while True:
        try:
            df = next(batches)
        except StopIteration:
            return
        except Exception as e:  # unreadable rows: say which file and why
            raise CensusError(f"{table.name}: cannot read the census table ({e})") from e
        x_llc, y_llc = _cell_corners(df, table, grid)
        cols = [table.column, *table.variables]
        values = np.column_stack(
            [pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64) for c in cols]
        )
        values = values[:, 0] if not table.variables else values
        flagged = None if table.flag_column is None else flag_values(df[table.flag_column])
        yield x_llc, y_llc, values, flagged


def _cell_corners(df: pd.DataFrame, table: CensusTable, grid: Grid) -> tuple[np.ndarray, ...]:
    name = table.name
    if len(table.ids) == 1:
        cells = parse_grd_id(df[table.ids[0]])
        crs = set(cells["crs"].unique())
        if crs - {EPSG}:
            raise CensusError(
                f"{name}: cells are in CRS {sorted(crs)}, not EPSG:{EPSG}; use the GISCO grid "
                "in ETRS89-LAEA (GRD_ID starting CRS3035)"
            )
        res = set(cells["res"].unique())
        if res - {grid.cell}:
            raise CensusError(
                f"{name}: cells are {sorted(res)} m but grid.cell is {grid.cell} m; "
                "use the matching GISCO grid or set grid.cell"
            )
        return cells["x_llc"].to_numpy(), cells["y_llc"].to_numpy()
    x_llc = df[table.ids[0]].to_numpy(np.int64)
    y_llc = df[table.ids[1]].to_numpy(np.int64)
    if np.any(x_llc % grid.cell) or np.any(y_llc % grid.cell):
        raise CensusError(
            f"{name}: X_LLC/Y_LLC are not multiples of {grid.cell} m; is the file in "
            f"EPSG:{EPSG} with {grid.cell} m cells?"
        )
    return x_llc, y_llc


def _quoted(name: str) -> str:
    """An SQL identifier as SQLite reads it whatever it holds (quotes doubled): the layer
    and column names of a GeoPackage are the file's, not ours."""
    return '"' + str(name).replace('"', '""') + '"'


def fetch_local(url: str, storage_options: dict | None, *, what: str = "census") -> Path:
    """Copy a remote file (``s3://``, ``https://``, any fsspec URL) to a temp file."""
    import shutil
    import tempfile

    import fsspec

    suffix = Path(url.split("?")[0]).suffix
    tmp = tempfile.NamedTemporaryFile(prefix=f"popdask-{what}-", suffix=suffix, delete=False)
    key = "census.path" if what == "census" else "census.coverage"
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as src, tmp:
            shutil.copyfileobj(src, tmp)
    except FileNotFoundError:
        Path(tmp.name).unlink(missing_ok=True)
        raise CensusError(f"{url}: {what} file not found; check {key}") from None
    except Exception as e:
        Path(tmp.name).unlink(missing_ok=True)
        raise CensusError(f"{url}: cannot fetch the {what} file ({type(e).__name__}: {e})") from e
    return Path(tmp.name)


def read_census(
    path: str | Path,
    grid: Grid,
    *,
    column: str = "TOT_P_2021",
    storage_options: dict | None = None,
    absent: Absent = "zero",
    coverage: np.ndarray | None = None,
    flag_column: str | None = None,
) -> xr.DataArray:
    """Read a GISCO 1 km population grid onto the census cells of ``grid``, whole.

    For a region that fits in memory (a run streams the census into its store instead:
    :func:`popdask.census_blocks.stage`).

    Parameters
    ----------
    path
        GeoPackage, CSV or Parquet file with ``GRD_ID`` (or ``X_LLC``/``Y_LLC``) and the
        population ``column``: a local path or an fsspec URL (``s3://…``, ``https://…``).
    grid
        The run's grid; its ``cell`` must match the file's resolution.
    column
        Population column, e.g. ``TOT_P_2021`` (GEOSTAT 2021), ``TOT_P_2018``, ``TOT_P`` or
        ``T`` (the Census 2021 grid).
    storage_options
        fsspec options for a URL ``path`` (credentials stay in the environment).
    absent
        What a cell the file does not list is, inside the coverage: ``"zero"`` (default;
        Eurostat lists populated cells only) or ``"unknown"`` (NaN).
    coverage
        ``(y_cell, x_cell)`` booleans from :func:`read_coverage`; ``None``: the whole region
        is covered. Absent cells outside it are unknown.
    flag_column
        Column whose set value (anything but empty, NaN, 0 or false-like) makes a row
        unknown; default ``CONFIDENTIALSTATUS`` when the file has it.

    Returns
    -------
    xarray.DataArray
        ``census`` with dims ``(y_cell, x_cell)``, float32, NaN where unknown, 0 where absent
        and covered. ``attrs`` hold ``cells_known``, ``cells_absent_zero``, ``cells_unknown``
        (they are also logged), ``absent`` and the flag column used.

    Raises
    ------
    CensusError
        If the file is missing, lacks the column, the flag column or cell ids, is in another
        CRS or resolution, or lists no cell of the region.
    """
    from popdask import census_blocks

    window = None if coverage is None else census_blocks.array_window(coverage)
    with census_blocks.stage(
        path,
        grid,
        column=column,
        storage_options=storage_options,
        absent=absent,
        coverage=window,
        flag_column=flag_column,
    ) as staged:
        return staged.to_dataarray()


def census_from_config(cfg: CensusConfig, grid: Grid) -> xr.DataArray:
    """:func:`read_census` with everything the run configuration's ``census`` section says
    (its coverage opened by :func:`open_coverage`)."""
    from popdask import census_blocks

    with census_blocks.stage_from_config(cfg, grid) as staged:
        return staged.to_dataarray()


def coverage_name(coverage: str | list[str] | None) -> str | list[str]:
    """How the store's attrs name the coverage: ``region`` or the file name(s)."""
    if coverage is None or coverage == "region":
        return "region"
    if isinstance(coverage, str):
        return Path(coverage.split("?")[0]).name
    return [Path(str(c).split("?")[0]).name for c in coverage]
