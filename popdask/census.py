"""The Eurostat/GISCO 1 km population grid, read onto the run's census cells.

GISCO publishes the grid as GeoPackage, CSV or Parquet. Each row is one cell, named by
``GRD_ID`` (``CRS3035RES1000mN2684000E4334000``: CRS, resolution, then the lower-left
corner's northing and easting in metres) or by ``X_LLC``/``Y_LLC`` columns, with a
population column such as ``TOT_P_2021``. Cells that are missing, confidential or negative
stay unknown (NaN), never zero.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from popdask.grid import EPSG, Grid

GRD_ID = re.compile(r"^CRS(?P<crs>\d+)RES(?P<res>\d+)mN(?P<n>\d+)E(?P<e>\d+)$")


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


def cells_to_raster(
    x_llc: np.ndarray, y_llc: np.ndarray, values: np.ndarray, grid: Grid
) -> np.ndarray:
    """Place per-cell values on the grid's ``(y_cell, x_cell)`` raster (pure).

    Cells outside the grid are dropped, cells not listed stay NaN, negative values are
    unknown (NaN).
    """
    xmin, _, _, ymax = grid.bounds
    ny, nx = grid.cell_shape
    col = (np.asarray(x_llc, dtype=np.int64) - xmin) // grid.cell
    row = (ymax - grid.cell - np.asarray(y_llc, dtype=np.int64)) // grid.cell
    inside = (row >= 0) & (row < ny) & (col >= 0) & (col < nx)
    out = np.full((ny, nx), np.nan, dtype=np.float32)
    v = np.asarray(values, dtype=np.float64)[inside]
    v[v < 0] = np.nan
    out[row[inside], col[inside]] = v
    return out


def _read_table(path: Path, column: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path, low_memory=False)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix == ".gpkg":
        return _read_gpkg(path)
    raise CensusError(
        f"{path}: unknown census format {suffix!r}; use the GISCO grid as .gpkg, .csv or .parquet"
    )


def _read_gpkg(path: Path) -> pd.DataFrame:
    """Attribute table of the first feature layer of a GeoPackage (a SQLite file)."""
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
        cols = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]
        keep = [c for c in cols if c.upper() not in ("GEOM", "GEOMETRY", "SHAPE")]
        sel = ", ".join(f'"{c}"' for c in keep)
        return pd.read_sql_query(f'SELECT {sel} FROM "{table}"', con)


def _fetch(url: str, storage_options: dict | None) -> Path:
    """Copy a remote census file (``s3://``, ``https://``, any fsspec URL) to a temp file."""
    import shutil
    import tempfile

    import fsspec

    suffix = Path(url.split("?")[0]).suffix
    tmp = tempfile.NamedTemporaryFile(prefix="popdask-census-", suffix=suffix, delete=False)
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as src, tmp:
            shutil.copyfileobj(src, tmp)
    except FileNotFoundError:
        Path(tmp.name).unlink(missing_ok=True)
        raise CensusError(
            f"{url}: census file not found; set census.path to a GISCO grid file"
        ) from None
    except Exception as e:
        Path(tmp.name).unlink(missing_ok=True)
        raise CensusError(f"{url}: cannot fetch the census file ({type(e).__name__}: {e})") from e
    return Path(tmp.name)


def read_census(
    path: str | Path,
    grid: Grid,
    *,
    column: str = "TOT_P_2021",
    storage_options: dict | None = None,
) -> xr.DataArray:
    """Read a GISCO 1 km population grid onto the census cells of ``grid``.

    Parameters
    ----------
    path
        GeoPackage, CSV or Parquet file with ``GRD_ID`` (or ``X_LLC``/``Y_LLC``) and the
        population ``column``: a local path or an fsspec URL (``s3://…``, ``https://…``).
    grid
        The run's grid; its ``cell`` must match the file's resolution.
    column
        Population column, e.g. ``TOT_P_2021`` (2021 grid), ``TOT_P_2018`` or ``TOT_P``.
    storage_options
        fsspec options for a URL ``path`` (credentials stay in the environment).

    Returns
    -------
    xarray.DataArray
        ``census`` with dims ``(y_cell, x_cell)``, float32, NaN where unknown.

    Raises
    ------
    CensusError
        If the file is missing, lacks the column or cell ids, is in another CRS or
        resolution, or has no known cell in the region.
    """
    if "://" in str(path):
        local = _fetch(str(path), storage_options)
        try:
            return _read_local(local, grid, column, name=str(path))
        finally:
            local.unlink(missing_ok=True)
    return _read_local(Path(path), grid, column, name=str(path))


def _read_local(path: Path, grid: Grid, column: str, *, name: str) -> xr.DataArray:
    if not path.is_file():
        raise CensusError(f"{name}: census file not found; set census.path to a GISCO grid file")
    try:
        df = _read_table(path, column)
    except CensusError as e:
        raise CensusError(str(e).replace(str(path), name)) from None
    except Exception as e:  # unreadable file: say which and why
        raise CensusError(f"{name}: cannot read the census table ({e})") from e
    path = name  # what every message below calls the file
    columns = {c.upper(): c for c in df.columns}
    if column not in df.columns:
        raise CensusError(
            f"{path}: no population column {column!r}; set census.column to one of "
            f"{[c for c in df.columns if c.upper() not in ('GRD_ID', 'X_LLC', 'Y_LLC')][:12]}"
        )
    if "GRD_ID" in columns:
        cells = parse_grd_id(df[columns["GRD_ID"]])
        crs = set(cells["crs"].unique())
        if crs != {EPSG}:
            raise CensusError(
                f"{path}: cells are in CRS {sorted(crs)}, not EPSG:{EPSG}; use the GISCO grid "
                "in ETRS89-LAEA (GRD_ID starting CRS3035)"
            )
        res = set(cells["res"].unique())
        if res != {grid.cell}:
            raise CensusError(
                f"{path}: cells are {sorted(res)} m but grid.cell is {grid.cell} m; "
                "use the matching GISCO grid or set grid.cell"
            )
        x_llc, y_llc = cells["x_llc"].to_numpy(), cells["y_llc"].to_numpy()
    elif "X_LLC" in columns and "Y_LLC" in columns:
        x_llc = df[columns["X_LLC"]].to_numpy(np.int64)
        y_llc = df[columns["Y_LLC"]].to_numpy(np.int64)
        if np.any(x_llc % grid.cell) or np.any(y_llc % grid.cell):
            raise CensusError(
                f"{path}: X_LLC/Y_LLC are not multiples of {grid.cell} m; is the file in "
                f"EPSG:{EPSG} with {grid.cell} m cells?"
            )
    else:
        raise CensusError(
            f"{path}: no cell id; the table needs a GRD_ID column or X_LLC and Y_LLC columns"
        )
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(np.float64)
    raster = cells_to_raster(x_llc, y_llc, values, grid)
    if not np.isfinite(raster).any():
        raise CensusError(
            f"{path}: no known {column} value inside the region {grid.bounds} (EPSG:{EPSG}); "
            "the file does not cover the region — check region.bbox or use the right country file"
        )
    return xr.DataArray(
        raster,
        dims=("y_cell", "x_cell"),
        coords=grid.cell_coords(),
        name="census",
        attrs={"units": "persons", "source": Path(str(path).split("?")[0]).name, "column": column},
    )
