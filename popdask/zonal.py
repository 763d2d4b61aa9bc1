"""People per polygon: a store's population summed over arbitrary polygons, tile by tile.

:func:`aggregate` reads the polygons (any OGR-readable file, any CRS) on the client,
reprojects them once to the grid's EPSG:3035 and, for every tile of the store that one of
them touches, sends a task (:func:`popdask.scheduler.map_tiles`) with only those polygons,
clipped to the tile (WKB). The task reads the tile's ``population`` (and ``population_by``)
from the store and sums each layer over each polygon with exact fractional pixel coverage
(exactextract: a pixel half inside a polygon gives half its people); it returns one small
row per (polygon, tile), which the client adds per polygon, in the tiles' order (the same
sums to the last bit on every run). The client holds the polygons and these rows, never a
raster.

- A pixel without data (NaN: outside the model's reach, a tile not yet predicted) counts
  as 0. ``covered_fraction`` says which share of a polygon's area lies on pixels with
  data: 1 inside a finished store, 0 outside its grid (those polygons are also warned
  about), in between on its edge or over holes in the data.
- EPSG:3035 is equal-area, so a polygon's area and its pixels' areas are compared there.
  Polygons are reprojected vertex by vertex (geopandas ``to_crs``): densify long edges of
  polygons in geographic coordinates first if a straight edge must follow a parallel.
- Polygons may overlap: each gets all the people inside it.

The per-tile sums (:func:`polygon_sums`) are pure NumPy/shapely/exactextract on arrays;
only :func:`aggregate_tile` (on a worker) and :func:`aggregate` (on the client) touch the
store, and :func:`read_zones` / :func:`write_table` the polygon files.

Heavy libraries (geopandas, exactextract, the store's xarray/zarr) are imported where they
are used; the package's ``popdask.aggregate`` is :func:`aggregate`, loaded on first use.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely

from popdask.grid import EPSG, Grid, Tile

if TYPE_CHECKING:
    import geopandas as gpd
    from distributed import Client

log = logging.getLogger(__name__)

POPULATION = "population"
#: The store's census-variable layers (``variable, y, x``), when it has them; one output
#: column per entry of its ``variable`` coordinate.
POPULATION_BY = "population_by"
COVERED = "covered_fraction"
#: Output formats by file extension.
FORMATS = {".csv": "CSV", ".parquet": "Parquet", ".gpkg": "GeoPackage"}


# --------------------------------------------------------------------------------------
# Pure parts: polygons on the grid, sums on a tile's arrays
# --------------------------------------------------------------------------------------
def tile_pairs(grid: Grid, geoms: np.ndarray) -> tuple[list[Tile], list[np.ndarray]]:
    """The tiles of ``grid`` whose inside the polygons ``geoms`` (EPSG:3035) reach, and for
    each the indices of those polygons (ascending). A polygon that only touches a tile's
    edge is not the tile's.

    Built from one bulk STRtree query: its size is the number of (polygon, tile) pairs,
    about the polygons plus the tiles their edges cross.
    """
    tiles = grid.tiles()
    boxes = shapely.box(*np.array([t.bounds for t in tiles], float).reshape(-1, 4).T)
    tree = shapely.STRtree(geoms)
    tile_i, poly_i = tree.query(boxes, predicate="intersects")
    inner = shapely.relate_pattern(boxes[tile_i], geoms[poly_i], "T********")  # not touching
    tile_i, poly_i = tile_i[inner], poly_i[inner]
    order = np.lexsort((poly_i, tile_i))
    tile_i, poly_i = tile_i[order], poly_i[order]
    starts = np.flatnonzero(np.r_[True, tile_i[1:] != tile_i[:-1]]) if tile_i.size else []
    groups = np.split(poly_i, starts[1:]) if tile_i.size else []
    return [tiles[tile_i[s]] for s in starts], groups


def clip_to_tile(geoms: np.ndarray, bounds: Sequence[float], margin: float) -> np.ndarray:
    """``geoms`` cut to the tile ``bounds`` grown by ``margin`` (a pixel): what a task needs
    of a polygon, so a large polygon is not sent whole to every tile it crosses. The part
    outside the tile never reaches a pixel of it, so its sums are unchanged."""
    xmin, ymin, xmax, ymax = bounds
    return shapely.clip_by_rect(geoms, xmin - margin, ymin - margin, xmax + margin, ymax + margin)


def polygon_sums(
    layers: np.ndarray, bounds: Sequence[float], geoms: Sequence[shapely.Geometry]
) -> np.ndarray:
    """Each layer summed over each polygon, weighted by the share of each pixel inside it.

    Parameters
    ----------
    layers
        ``(layer, y, x)`` values on the pixels of the window ``bounds`` (north up), NaN
        where there is no data.
    bounds
        ``(xmin, ymin, xmax, ymax)`` of the window, in the polygons' coordinates.
    geoms
        Polygons or multipolygons (not empty).

    Returns
    -------
    numpy.ndarray
        ``(polygon, layer + 1)`` float64: per layer ``Σ value × coverage`` over the pixels
        with data (NaN counts as 0), then the pixels of layer 0 with data inside the polygon
        (``Σ coverage``, in pixels).
    """
    from exactextract import exact_extract
    from exactextract.feature import JSONFeatureSource
    from exactextract.raster import NumPyRasterSource

    layers = np.asarray(layers)
    n, k = len(geoms), layers.shape[0]
    if n == 0:
        return np.zeros((0, k + 1))
    xmin, ymin, xmax, ymax = (float(b) for b in bounds)
    rasters = [NumPyRasterSource(layers[j], xmin, ymin, xmax, ymax, name=f"l{j}") for j in range(k)]
    features = [
        {"type": "Feature", "properties": {"i": i}, "geometry": shapely.geometry.mapping(g)}
        for i, g in enumerate(geoms)
    ]
    df = exact_extract(
        rasters, JSONFeatureSource(features), ["sum", "count"], include_cols=["i"], output="pandas"
    )

    def column(stat: str, j: int) -> np.ndarray:  # exactextract names a single raster's "sum"
        name = stat if k == 1 else f"l{j}_{stat}"
        return df[name].to_numpy(np.float64)

    out = np.zeros((n, k + 1))
    rows = df["i"].to_numpy()
    for j in range(k):
        out[rows, j] = column("sum", j)
    out[rows, k] = column("count", 0)
    return out


def covered_fraction(pixels: np.ndarray, area: np.ndarray, resolution: float) -> np.ndarray:
    """Share of each polygon's ``area`` (m², EPSG:3035) on ``pixels`` with data (in pixels,
    from :func:`polygon_sums`); NaN for a polygon without area."""
    with np.errstate(divide="ignore", invalid="ignore"):
        share = pixels * float(resolution) ** 2 / area
    return np.where(area > 0, np.minimum(share, 1.0), np.nan)


# --------------------------------------------------------------------------------------
# The task of a tile (on a worker)
# --------------------------------------------------------------------------------------
def read_layers(path: str, so: Mapping | None, tile: Tile, by: bool) -> np.ndarray:
    """``(layer, y, x)`` of the tile: ``population``, then each ``population_by`` layer."""
    from popdask import store

    pop = store.read_window(path, POPULATION, tile.ys, tile.xs, so)[None]
    if not by:
        return pop
    return np.concatenate([pop, store.read_window(path, POPULATION_BY, tile.ys, tile.xs, so)])


def aggregate_tile(
    path: str, so: Mapping | None, tile: Tile, index: np.ndarray, wkb: np.ndarray, by: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One tile's sums over its polygons: ``(index, sums)``, ``sums`` as
    :func:`polygon_sums` gives them for the polygons ``wkb`` (EPSG:3035, clipped to the
    tile), whose rows in the zones are ``index``."""
    layers = read_layers(path, so, tile, by)
    return index, polygon_sums(layers, tile.bounds, shapely.from_wkb(wkb))


# --------------------------------------------------------------------------------------
# Polygons and tables (client I/O)
# --------------------------------------------------------------------------------------
def output_format(out: str | os.PathLike) -> str:
    """The format of ``out`` from its extension; a clear error for any other."""
    suffix = Path(str(out)).suffix.lower()
    if suffix not in FORMATS:
        names = ", ".join(f"{s} ({f})" for s, f in FORMATS.items())
        raise ValueError(
            f"{out}: cannot write a {suffix or 'file without extension'!r} table; name the "
            f"output with one of {names}"
        )
    return suffix


def read_zones(
    zones: str | os.PathLike | gpd.GeoDataFrame, *, layer: str | int | None = None
) -> gpd.GeoDataFrame:
    """The polygons of ``zones``: a GeoDataFrame as it is, else any file or URL OGR reads
    (GeoPackage, Shapefile, GeoJSON, FlatGeobuf, GeoParquet, …; ``layer`` picks one)."""
    import geopandas as gpd

    if isinstance(zones, gpd.GeoDataFrame):
        return zones
    suffix = Path(str(zones)).suffix.lower()
    if suffix == ".parquet":
        return gpd.read_parquet(zones)
    try:
        return gpd.read_file(zones, layer=layer, engine="pyogrio")
    except Exception as e:  # pyogrio's DataSourceError, FileNotFoundError, ...
        raise ValueError(f"cannot read polygons from {zones}: {e}") from e


def prepare_zones(
    zones: gpd.GeoDataFrame, *, columns: Sequence[str] | None = None, crs: Any = None
) -> tuple[gpd.GeoDataFrame, np.ndarray]:
    """The zones' attribute table (``columns``, default all) with their geometry as given,
    and their polygons in EPSG:3035, 2D, valid, empty where a row has none.

    Raises
    ------
    ValueError
        When the zones have no CRS (and ``crs`` is not given), a geometry that is not a
        polygon or multipolygon, or ``columns`` names a column they lack.
    """
    zones = zones.copy()
    if zones.crs is None:
        if crs is None:
            raise ValueError(
                "the zones have no CRS: declare it in the file (e.g. ogr2ogr -a_srs "
                "EPSG:4326), or pass crs='EPSG:...' (popdask aggregate --crs)"
            )
        zones = zones.set_crs(crs)
    elif crs is not None:
        log.warning("zones: their own CRS %s is used; crs=%s is ignored", zones.crs, crs)
    attrs = [c for c in zones.columns if c != zones.geometry.name]
    if columns is not None:
        missing = [c for c in columns if c not in attrs]
        if missing:
            raise ValueError(f"the zones have no column {missing}; they have {attrs}")
        attrs = list(columns)
    geoms = np.asarray(zones.geometry.to_crs(EPSG).values, dtype=object)
    geoms = shapely.force_2d(np.where(shapely.is_missing(geoms), shapely.Polygon(), geoms))
    polygonal = shapely.get_type_id(geoms)
    bad = ~np.isin(polygonal, [3, 6]) & ~shapely.is_empty(geoms)  # Polygon, MultiPolygon
    if bad.any():
        names = sorted({g.geom_type for g in geoms[bad]})
        raise ValueError(
            f"{int(bad.sum())} zones are not polygons ({', '.join(names)}, first at row "
            f"{int(np.flatnonzero(bad)[0])}): people are summed over areas only; buffer "
            "points or lines first, or drop them"
        )
    invalid = ~shapely.is_valid(geoms)
    if invalid.any():
        warnings.warn(
            f"{int(invalid.sum())} zones have invalid polygons (first at row "
            f"{int(np.flatnonzero(invalid)[0])}); they are repaired (shapely.make_valid) "
            "before summing",
            stacklevel=3,
        )
        fixed = shapely.make_valid(geoms[invalid], method="structure", keep_collapsed=False)
        geoms[invalid] = fixed
    return zones[[*attrs, zones.geometry.name]], geoms


def write_table(table: gpd.GeoDataFrame, out: str | os.PathLike) -> None:
    """Write the result by ``out``'s extension: ``.csv`` and ``.parquet`` the attribute
    and sum columns, ``.gpkg`` those with the polygons in the zones' own CRS."""
    suffix = output_format(out)
    if suffix == ".gpkg":
        table.to_file(out, driver="GPKG", engine="pyogrio", layer=Path(str(out)).stem)
        return
    plain = table.drop(columns=table.geometry.name)
    if suffix == ".csv":
        plain.to_csv(out, index=False)
    else:
        plain.to_parquet(out, index=False)


def store_variables(path: str, so: Mapping | None) -> list[str]:
    """The names of the store's ``population_by`` layers (its ``variable`` coordinate);
    empty when it has none."""
    from popdask import store

    ds = store.open_store(path, so)
    if POPULATION_BY not in ds:
        return []
    by = ds[POPULATION_BY]
    if by.dims != ("variable", "y", "x") or "variable" not in by.coords:
        raise ValueError(
            f"{path}: {POPULATION_BY} has dims {by.dims} and coordinates {list(by.coords)}; "
            "expected dims (variable, y, x) with a 'variable' coordinate of census columns"
        )
    return [str(v) for v in by["variable"].values]


def store_grid(path: str, so: Mapping | None) -> Grid:
    """The store's grid, from its root attributes."""
    from popdask import store

    meta = store.root_attrs(path, so).get("popdask", {}).get("grid")
    if not meta:
        raise ValueError(f"{path} is not a popdask store (no 'popdask' grid attribute)")
    return Grid(
        tuple(meta["bounds"]), resolution=meta["resolution"], cell=meta["cell"], tile=meta["tile"]
    )


# --------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------
def aggregate(
    store: str,
    zones: str | os.PathLike | gpd.GeoDataFrame,
    out: str | os.PathLike | None = None,
    *,
    layer: str | int | None = None,
    columns: Sequence[str] | None = None,
    crs: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    client: Client | None = None,
    progress: bool = False,
) -> gpd.GeoDataFrame:
    """People per polygon: the store's population summed over each polygon of ``zones``.

    Every pixel counts with the share of its area inside the polygon (exact coverage,
    exactextract), so a polygon's total does not depend on how it falls on the 20 m grid.
    The sums run tile by tile on the cluster (only the polygons reaching into a tile go to
    its task); the client holds the polygons and one row of sums per polygon and tile.

    Parameters
    ----------
    store
        Path or URL of a popdask store.
    zones
        Polygons: any file or URL OGR reads (GeoPackage, Shapefile, GeoJSON, …), a
        GeoParquet file, or a GeoDataFrame; any CRS.
    out
        Where to write the table too: ``.csv``, ``.parquet`` (attributes and sums) or
        ``.gpkg`` (with the polygons in their own CRS).
    layer
        The layer of a multi-layer ``zones`` file (default: the first).
    columns
        The zones' attribute columns to keep (default: all).
    crs
        The CRS of zones that do not declare one (``"EPSG:4326"``).
    storage_options
        fsspec options of a ``store`` URL.
    client
        A connected dask client; by default the current one, else a local cluster for
        the call.
    progress
        Show a progress bar over the tiles.

    Returns
    -------
    geopandas.GeoDataFrame
        One row per polygon, in the zones' order: their attribute columns, ``population``
        (persons inside; pixels without data count as 0), one column per census variable
        of the store's ``population_by`` (named by the census column), ``covered_fraction``
        (share of the polygon's area on pixels with data: 0 outside the store's grid), and
        the geometry as given.

    Raises
    ------
    ValueError
        When ``out`` has another extension (before anything is read), the zones have no
        CRS, are not polygons, or already have a column of the output.
    RuntimeError
        When a tile's task failed (nothing is written).

    Examples
    --------
    >>> table = aggregate("out.zarr", "municipalities.gpkg", "people.csv")  # doctest: +SKIP
    >>> table[["LAU_ID", "population", "covered_fraction"]].head()  # doctest: +SKIP
    """
    if out is not None:
        output_format(out)
    if client is None:
        with _client() as c:
            return aggregate(
                store,
                zones,
                out,
                layer=layer,
                columns=columns,
                crs=crs,
                storage_options=storage_options,
                client=c,
                progress=progress,
            )
    so = dict(storage_options or {})
    grid = store_grid(store, so)
    variables = store_variables(store, so)
    table, geoms = prepare_zones(read_zones(zones, layer=layer), columns=columns, crs=crs)
    names = [POPULATION, *variables, COVERED]
    clash = [c for c in names if c in table.columns]
    if clash or len(set(names)) < len(names):
        raise ValueError(
            f"the zones already have the output column(s) {clash or names}: rename them in "
            "the zones, or keep the others with columns=[...] (popdask aggregate --columns)"
        )
    sums = _tile_sums(client, store, so, grid, geoms, n_by=len(variables), progress=progress)
    area = shapely.area(geoms)
    covered = covered_fraction(sums[:, -1], area, grid.resolution)
    outside = (area > 0) & (sums[:, -1] == 0)
    if outside.any():
        warnings.warn(
            f"{int(outside.sum())} of {len(geoms)} zones (first at row "
            f"{int(np.flatnonzero(outside)[0])}) have no pixel with data: outside the "
            f"store's grid {grid.bounds} (EPSG:3035) or where it has none; their population "
            "is 0 and covered_fraction 0",
            stacklevel=2,
        )
    result = table.copy()
    geometry = result.pop(result.geometry.name)
    for j, name in enumerate([POPULATION, *variables]):
        result[name] = sums[:, j]
    result[COVERED] = covered
    result[geometry.name] = geometry
    result = result.set_geometry(geometry.name)
    if out is not None:
        write_table(result, out)
    return result


def _client():
    from contextlib import nullcontext

    from distributed import default_client

    try:
        return nullcontext(default_client())
    except ValueError:  # no client yet: a local cluster for this call
        from popdask.cluster import get_client

        return get_client(None)


def _tile_sums(
    client: Client,
    path: str,
    so: Mapping | None,
    grid: Grid,
    geoms: np.ndarray,
    *,
    n_by: int,
    progress: bool,
) -> np.ndarray:
    """``(polygon, layer + 1)`` sums over every tile (see :func:`polygon_sums`) of the
    ``population`` and ``n_by`` layers of ``population_by``."""
    from popdask import store
    from popdask.scheduler import map_tiles

    by = n_by > 0
    sums = np.zeros((len(geoms), 1 + n_by + 1))
    tiles, groups = tile_pairs(grid, geoms)
    _warn_unfinished(store.tile_status(path, so), tiles)
    polygons = dict(zip(((t.row, t.col) for t in tiles), groups, strict=True))

    def build(tile: Tile):
        index = polygons.pop((tile.row, tile.col))
        clipped = clip_to_tile(geoms[index], tile.bounds, grid.resolution)
        keep = shapely.area(clipped) > 0
        wkb = shapely.to_wkb(clipped[keep])
        return aggregate_tile, (path, so, tile, index[keep], wkb, by), {}

    parts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for r in map_tiles(
        client, tiles, build, total=len(tiles), per_task=None, desc="aggregate", progress=progress
    ):
        if not r.ok:
            raise RuntimeError(
                f"aggregate: tile {r.tile.id} failed: {type(r.error).__name__}: {r.error}"
            ) from r.error
        parts[r.tile.row, r.tile.col] = r.value
    # added in the tiles' order, not as they finished: the same sums to the last bit on
    # every run (the parts are one row per polygon and tile it reaches)
    for tile in tiles:
        index, part = parts.pop((tile.row, tile.col))
        sums[index] += part
    log.info("aggregate: %d polygons over %d tiles", len(geoms), len(tiles))
    return sums


def _warn_unfinished(status: np.ndarray, tiles: Sequence[Tile]) -> None:
    from popdask import store

    todo = [t.id for t in tiles if status[t.row, t.col] != store.COMPLETE]
    if todo:
        warnings.warn(
            f"{len(todo)} of the {len(tiles)} tiles under the zones are not complete "
            f"({', '.join(todo[:5])}{' …' if len(todo) > 5 else ''}): their pixels without "
            "a population count as 0 (see covered_fraction); finish the run first "
            "(popdask run, popdask status)",
            stacklevel=3,
        )
