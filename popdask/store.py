"""The output Zarr store: layout, tile-region writes, tile status, model arrays, resume.

Layout (DESIGN.md "Output Zarr store"): ``population``, ``density`` (y, x) float32;
``cluster`` (y, x) int16 (-1 no data); ``composite`` (band, y, x) float32; ``census`` and
``predicted`` (y_cell, x_cell) float32; EPSG:3035 as a CF ``spatial_ref`` coordinate named
by every variable. Zarr chunks are the tiles, so each tile write touches its own chunks
only. Besides the contract variables the store holds:

- ``tile_status`` (tile_row, tile_col) int8, one chunk per tile: 0 missing, 1 composite
  written, 2 labelled, 3 complete; -1, -2, -3 failed in the composite, label or predict
  pass (:func:`failed_code`; the passes before it stay done, :func:`progress`). It is set
  only after a tile's data is written, so a killed run loses at most the tiles in flight;
- ``tile_scenes`` (tile_row, tile_col) int16: the Sentinel-2 scenes each tile composited
  (0: none usable; unwritten, -1: not composited yet), written by the composite task;
- ``tile_counts`` (count, tile_row, tile_col) int32: what the composite task counted
  (:data:`COUNT_NAMES`: items found and used, reads filled as nodata, valid share);
- ``catalog/{source}/{tile}.ndjson.gz``: the items each tile used (:mod:`popdask.catalog`);
- ``terms`` (term, y, x) float32: the raw covariate layers of the regression terms
  (:func:`ensure_terms`), so the predict pass needs neither the composite nor a wide halo;
- with ``census.columns``: ``census_by`` (variable, y_cell, x_cell) and ``population_by``
  (variable, y, x) float32 (:mod:`popdask.variables`); with ``regression.bootstrap``:
  ``population_lower``/``_upper`` (y, x) and ``cell_lower``/``_upper`` (y_cell, x_cell)
  (:mod:`popdask.uncertainty`);
- ``census`` chunked by blocks of 10 × 10 tiles and written after the metadata
  (:mod:`popdask.census_blocks`): ``popdask.census_written`` says when it is whole;
- a ``model`` group with the fitted model as plain arrays (never pickle).

Paths may be local or fsspec URLs (``s3://bucket/run.zarr``) with ``storage_options``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dask.array as da
import numcodecs
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr

from popdask.census_blocks import block_cells
from popdask.chunkio import MISSING_ATTR, ChunkArray, put, resolve, write_array
from popdask.grid import CRS, Grid, Tile
from popdask.uncertainty import LEVEL

if TYPE_CHECKING:
    from popdask.census_blocks import Staged

MISSING, COMPOSITED, LABELLED, COMPLETE, FAILED = 0, 1, 2, 3, -1
#: root attribute (in ``popdask``): False from creation until every census block is written
CENSUS_WRITTEN = "census_written"
TILE_SCENES = "tile_scenes"
#: What each composite task counts of its tile (``tile_counts``, ``count`` axis): the
#: Sentinel-2 items its search found and those it used, its reads filled as nodata (assets
#: the catalog lists but storage has not), the share of its pixels with every Sentinel-2
#: band in thousandths, and the items whose radiometric offset its pixels corrected.
TILE_COUNTS = "tile_counts"
COUNT_NAMES = ("items_found", "items_used", "reads_filled", "valid_permille", "offsets_corrected")
STATUS_NAMES = {
    MISSING: "missing",
    COMPOSITED: "composite",
    LABELLED: "labelled",
    COMPLETE: "complete",
    FAILED: "failed composite",
    -LABELLED: "failed label",
    -COMPLETE: "failed predict",
}


def failed_code(done_code: int) -> int:
    """The status of a tile whose pass of ``done_code`` failed: ``-done_code``, so that the
    passes before it stay done (a failed label keeps its composite)."""
    return -done_code


def progress(status: np.ndarray) -> np.ndarray:
    """The last pass each tile has done (``MISSING`` … ``COMPLETE``): a failed pass's tile
    has done the one before it."""
    status = np.asarray(status)
    return np.where(status < 0, -status - 1, status)


# Zarr v2: GDAL (3.10, as in the rasterio wheels) reads it; its v3 reader lacks the codecs.
ZARR_FORMAT = 2
# The composite (most of the store, written once, read whole by the label pass) takes lz4hc
# level 1: on the 14 bands of a 500 × 500 tile it encodes as fast as zstd level 3 (43 vs
# 42 ms), decodes in 3.1 ms instead of 6.8–8.6 ms and is 1.4 % larger (0.725 of the raw
# bytes against 0.715). The layers each pass writes and the next reads (cluster, terms,
# population, density) take lz4: on a 500 × 500 tile read and written through
# `popdask.chunkio`, a float32 tile is written in 1.7 ms instead of 3.5 ms (zstd level 1)
# and read with a 12-pixel halo in 1.4 ms instead of 5.8 ms, for 16 % more bytes
# (population; 47 % for the labels, 3 % for the terms).
SMALL_CODEC = numcodecs.Blosc(cname="lz4hc", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE)
FAST_CODEC = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)


class StoreError(RuntimeError):
    """The output store cannot be used for this run; the message names the fix."""


#: What zarr says of the folder of per-tile item records (``popdask.catalog``), which is
#: not a Zarr group on purpose: listing the store never descends into its files.
NOT_ZARR = "Object at catalog is not recognized as a component of a Zarr hierarchy"


def _is_url(path: str) -> bool:
    return "://" in str(path)


def _zarr_kwargs(path: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"storage_options": dict(storage_options)} if _is_url(path) and storage_options else {}


def _zarr_store(path: str, storage_options: Mapping[str, Any] | None):
    """What zarr functions without a ``storage_options`` argument take: the local path, or
    an fsspec store built from the URL and its options."""
    if not _is_url(path):
        return str(path)
    return zarr.storage.FsspecStore.from_url(str(path), storage_options=dict(storage_options or {}))


def open_group(path: str, storage_options=None, mode: str = "r+") -> zarr.Group:
    """The store's root Zarr group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return zarr.open_group(
            str(path), mode=mode, use_consolidated=False, **_zarr_kwargs(path, storage_options)
        )


def open_array(path: str, name: str, storage_options=None, mode: str = "r+") -> zarr.Array:
    """One array of the store (``name`` may be ``group/array``), opened without the root
    group, whose attributes (the run's STAC item ids among them) grow with the region."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return zarr.open_array(
            store=str(path),
            path=name,
            mode=mode,
            zarr_format=ZARR_FORMAT,
            **_zarr_kwargs(path, storage_options),
        )


def exists(path: str, storage_options=None) -> bool:
    """Whether a popdask store already exists at ``path``."""
    try:
        g = open_group(path, storage_options, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
        return False
    return "popdask" in g.attrs


def grid_signature(grid: Grid, bands: list[str]) -> dict[str, Any]:
    """What must match for a store to be resumed by a run."""
    return {
        "bounds": list(grid.bounds),
        "resolution": grid.resolution,
        "cell": grid.cell,
        "tile": grid.tile,
        "bands": list(bands),
    }


def template(
    grid: Grid,
    bands: list[str],
    kinds: list[str],
    census_attrs: Mapping[str, Any],
    variables: Sequence[str] = (),
    variables_attrs: Mapping[str, Any] | None = None,
    intervals: bool = False,
) -> xr.Dataset:
    """The lazy dataset whose metadata defines the store (no pixel data computed); with
    ``variables`` (census columns mapped), ``census_by`` and ``population_by`` too; with
    ``intervals``, the interval layers (:mod:`popdask.uncertainty`)."""
    ny, nx = grid.shape
    # one dask chunk per variable: only the metadata is written (compute=False), and the
    # Zarr chunks (one per tile) come from the encoding (`chunk_encoding`), so creating a
    # store costs the same for 4 tiles or 42,000 (a dask chunk per tile cost 2 ms and 15 KB
    # of the client per tile)
    ch, cell_chunks = -1, -1
    rows, cols = grid.tile_shape
    nan2 = da.full((ny, nx), np.nan, dtype=np.float32, chunks=ch)
    ds = xr.Dataset(
        {
            "population": (
                ("y", "x"),
                nan2,
                {"units": "persons per pixel", "long_name": "estimated persons in each pixel"},
            ),
            "density": (
                ("y", "x"),
                nan2,
                {"units": "persons km-2", "long_name": "Gaussian-smoothed population density"},
            ),
            "cluster": (
                ("y", "x"),
                da.full((ny, nx), -1, dtype=np.int16, chunks=ch),
                # unwritten chunks read as -1 (no data) through chunkio, never as label 0
                {"long_name": "k-means cluster label, -1 where no data", MISSING_ATTR: -1},
            ),
            "composite": (
                ("band", "y", "x"),
                da.full((len(bands), ny, nx), np.nan, dtype=np.float32, chunks=-1),
                {"long_name": "composite inputs", "band_kind": list(kinds)},
            ),
            "census": (
                ("y_cell", "x_cell"),
                da.full(grid.cell_shape, np.nan, dtype=np.float32, chunks=cell_chunks),
                {
                    "units": "persons",
                    "long_name": "census count used (NaN unknown)",
                    **census_attrs,
                },
            ),
            "predicted": (
                ("y_cell", "x_cell"),
                da.full(grid.cell_shape, np.nan, dtype=np.float32, chunks=cell_chunks),
                {"units": "persons", "long_name": "model count per cell before rescaling"},
            ),
            "tile_status": (
                ("tile_row", "tile_col"),
                da.zeros((rows, cols), dtype=np.int8, chunks=-1),
                {
                    "flag_values": list(STATUS_NAMES),
                    "flag_meanings": " ".join(STATUS_NAMES.values()),
                },
            ),
            TILE_COUNTS: (
                ("count", "tile_row", "tile_col"),
                da.full((len(COUNT_NAMES), rows, cols), -1, dtype=np.int32, chunks=-1),
                {"long_name": "what each tile's composite counted", "counts": list(COUNT_NAMES)},
            ),
            TILE_SCENES: (
                ("tile_row", "tile_col"),
                da.full((rows, cols), -1, dtype=np.int16, chunks=-1),
                {
                    "long_name": "Sentinel-2 scenes each tile composited (0: none usable, "
                    "its people are the census spread over its cells; -1: not composited)",
                },
            ),
        },
        coords={
            **grid.coords(),
            **grid.cell_coords(),
            "band": np.array(bands, dtype=object),
        },
    )
    if variables:
        ds = ds.assign(_variable_layers(grid, variables, variables_attrs or {}))
    if intervals:
        ds = ds.assign(_interval_layers(grid))
    for c in ("x", "x_cell"):
        ds[c].attrs.update(units="m", standard_name="projection_x_coordinate")
    for c in ("y", "y_cell"):
        ds[c].attrs.update(units="m", standard_name="projection_y_coordinate")
    ds = ds.rio.write_crs(CRS)
    wkt = ds.spatial_ref.attrs["crs_wkt"]
    for name in ds.data_vars:
        if name in ("tile_status", TILE_SCENES, TILE_COUNTS):
            ds[name].encoding.pop("grid_mapping", None)
            continue
        ds[name].encoding["coordinates"] = "spatial_ref"
        ds[name].attrs["_CRS"] = {"wkt": wkt}  # what GDAL's Zarr driver reads
    return ds


def _variable_layers(
    grid: Grid, variables: Sequence[str], attrs: Mapping[str, Any]
) -> dict[str, xr.DataArray]:
    """``census_by`` (variable, y_cell, x_cell) and ``population_by`` (variable, y, x)."""
    n, coord = len(variables), {"variable": np.array(list(variables), dtype=object)}
    return {
        "census_by": xr.DataArray(
            da.full((n, *grid.cell_shape), np.nan, dtype=np.float32, chunks=-1),
            dims=("variable", "y_cell", "x_cell"),
            coords=coord,
            attrs={
                "units": "persons",
                "long_name": "census variables used, reconciled with the total (NaN unknown)",
                **attrs,
            },
        ),
        "population_by": xr.DataArray(
            da.full((n, *grid.shape), np.nan, dtype=np.float32, chunks=-1),
            dims=("variable", "y", "x"),
            coords=coord,
            attrs={
                "units": "persons per pixel",
                "long_name": "estimated persons in each pixel, per census variable",
            },
        ),
    }


def _interval_layers(grid: Grid) -> dict[str, xr.DataArray]:
    """``population_lower``/``_upper`` (y, x) and ``cell_lower``/``_upper`` (y_cell, x_cell)."""
    out = {}
    for side in ("lower", "upper"):
        out[f"population_{side}"] = xr.DataArray(
            da.full(grid.shape, np.nan, dtype=np.float32, chunks=-1),
            dims=("y", "x"),
            attrs={
                "units": "persons per pixel",
                "long_name": f"{side} bound of the {LEVEL:.0%} interval of the persons per pixel",
            },
        )
        out[f"cell_{side}"] = xr.DataArray(
            da.full(grid.cell_shape, np.nan, dtype=np.float32, chunks=-1),
            dims=("y_cell", "x_cell"),
            attrs={
                "units": "persons",
                "long_name": f"{side} bound of the {LEVEL:.0%} interval of the model's count "
                "per cell without its census",
            },
        )
    return out


def chunk_encoding(grid: Grid, n_bands: int) -> dict[str, tuple[int, ...]]:
    """The Zarr chunks of the store's variables: one per tile (a tile's pixels, its cells,
    its own status entries), so that each tile task writes its own chunks only."""
    t, c = grid.tile_px, grid.tile // grid.cell
    return {
        **{v: (t, t) for v in ("population", "density", "cluster")},
        **{f"population_{s}": (t, t) for s in ("lower", "upper")},
        **{f"cell_{s}": (c, c) for s in ("lower", "upper")},
        "composite": (1, t, t),
        "population_by": (1, t, t),
        "predicted": (c, c),
        "tile_status": (1, 1),
        TILE_SCENES: (1, 1),
        TILE_COUNTS: (len(COUNT_NAMES), 1, 1),
    }


def create(
    path: str,
    grid: Grid,
    *,
    bands: list[str],
    kinds: list[str],
    census: xr.DataArray | Staged,
    attrs: Mapping[str, Any],
    storage_options=None,
    terms: Sequence[str] = (),
    signature: Mapping[str, Any] | None = None,
    intervals: bool = False,
) -> bool:
    """Create the store, or check that an existing one belongs to this run.

    ``census`` is written after the metadata, block by block when staged
    (:mod:`popdask.census_blocks`); a store whose census write was interrupted gets it again
    on resume. ``terms`` names the run's covariate layers: a new store gets its ``terms`` array (see
    :func:`ensure_terms`) before its metadata is consolidated, so no pass has to add it later.
    ``signature`` (flat ``{key: value}``) is what determines the store's content: it is
    recorded, and a store recorded with another is not resumed.

    Returns
    -------
    bool
        True when a new store was created, False when an existing one is resumed.

    Raises
    ------
    StoreError
        When a store exists at ``path`` with another grid, bands or signature.
    """
    sig = grid_signature(grid, bands)
    if exists(path, storage_options):
        old = open_group(path, storage_options, mode="r").attrs.get("popdask", {})
        if old.get("grid") != sig:
            raise StoreError(
                f"{path} holds a popdask store of another grid or bands "
                f"({old.get('grid')} != {sig}); choose another output.path, or delete it to "
                "start over"
            )
        _check_signature(path, old.get("signature"), signature)
        if old.get(CENSUS_WRITTEN) is False:
            _write_census(path, census, storage_options)
        return False
    variables = list(getattr(census, "variables", []))
    ds = template(
        grid,
        bands,
        kinds,
        _jsonable(dict(census.attrs)),
        variables,
        _jsonable(getattr(census, "by_attrs", {})),
        intervals,
    )
    meta = {"grid": sig, "signature": dict(signature or {}), CENSUS_WRITTEN: False}
    ds.attrs.update({"popdask": meta, **_jsonable(attrs)})
    encoding = {
        # No _FillValue on the integers (it would make xarray decode them to float):
        # chunks not written yet read as 0; tile_status says which tiles are done.
        "cluster": {"compressors": [FAST_CODEC]},
        **{v: {"compressors": [FAST_CODEC]} for v in ("population", "density")},
        "composite": {"compressors": [SMALL_CODEC]},
        # unwritten: not composited yet (read as NaN by xarray, -1 by popdask)
        TILE_SCENES: {"_FillValue": -1},
        TILE_COUNTS: {"_FillValue": -1},
        # a chunk per block of 10 × 10 tiles (40 KB of 10 km tiles) keeps the files few
        # (4,200 for the EU, not 42,000) and a tile task's read small
        "census": {"chunks": tuple(min(block_cells(grid), n) for n in grid.cell_shape)},
    }
    if variables:
        encoding["census_by"] = {"chunks": (len(variables), *encoding["census"]["chunks"])}
        encoding["population_by"] = {"compressors": [FAST_CODEC]}
    if intervals:
        for side in ("lower", "upper"):
            encoding[f"population_{side}"] = {"compressors": [FAST_CODEC]}
    for name, chunks in chunk_encoding(grid, len(bands)).items():
        if name in ds:
            encoding.setdefault(name, {})["chunks"] = chunks
    # one chunk per tile (atomic status updates); unwritten chunks read as 0 = missing
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            ds.to_zarr(
                path,
                mode="w-",
                compute=False,
                consolidated=False,
                zarr_format=ZARR_FORMAT,
                encoding=encoding,
                safe_chunks=False,  # nothing is computed: no dask chunk is ever written
                storage_options=_so(path, storage_options),
            )
    except (FileNotFoundError, PermissionError) as e:
        if not _is_url(path):
            raise
        # s3fs says only "The specified bucket does not exist" / "Access Denied"
        raise StoreError(
            f"cannot create the store at {path} ({type(e).__name__}: {e}); check that the "
            "bucket exists, output.storage_options (e.g. endpoint_url) and the credentials "
            "in the environment"
        ) from e
    if terms:
        _create_terms(open_group(path, storage_options), terms)
    _write_census(path, census, storage_options)
    return True


def _write_census(path: str, census: xr.DataArray | Staged, storage_options) -> None:
    """Write the census's cells (the store's metadata exists), then say so in the attrs."""
    array = open_array(path, "census", storage_options)
    if isinstance(census, xr.DataArray):
        array[...] = census.values.astype(np.float32)
    else:
        by = open_array(path, "census_by", storage_options) if census.variables else None
        census.write(array, by, progress=len(census.blocks) > 100)
    meta = dict(root_attrs(path, storage_options)["popdask"], **{CENSUS_WRITTEN: True})
    update_attrs(path, {"popdask": meta}, storage_options)


def _check_signature(path: str, stored: Mapping | None, wanted: Mapping | None) -> None:
    """Refuse to resume a store whose recorded signature differs from this run's."""
    if wanted is None or stored is None:  # not asked, or a store from before signatures
        return
    wanted = _jsonable(dict(wanted))
    differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    if differ:
        shown = "; ".join(f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}" for k in differ[:8])
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        raise StoreError(
            f"{path} was written with another configuration ({shown}{more}): resuming would "
            "mix two runs' outputs. Write to a new output.path (or set output.version for a "
            "new rebuild), or delete the store to start over"
        )


def _so(path, storage_options):
    return dict(storage_options) if _is_url(path) and storage_options else None


def open_store(path: str, storage_options=None) -> xr.Dataset:
    """Open the store lazily (``xarray.open_zarr``), ``spatial_ref`` as a coordinate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*consolidated.*")
        warnings.filterwarnings("ignore", message=NOT_ZARR)
        return xr.open_zarr(path, storage_options=_so(path, storage_options), consolidated=False)


def tile_status(path: str, storage_options=None) -> np.ndarray:
    """``(tile_row, tile_col)`` status codes (one chunk per tile, fetched together)."""
    return ChunkArray(path, "tile_status", storage_options).read((slice(None), slice(None)))


def tile_scenes(path: str, storage_options=None) -> np.ndarray:
    """``(tile_row, tile_col)`` Sentinel-2 scenes composited per tile (-1 not yet)."""
    return ChunkArray(path, TILE_SCENES, storage_options).read((slice(None), slice(None)))


def set_scenes(path: str, tile: Tile, n: int, storage_options=None) -> None:
    """Record that ``tile`` composited ``n`` Sentinel-2 scenes (its own chunk)."""
    ChunkArray(path, TILE_SCENES, storage_options).write((tile.row, tile.col), n)


def tile_counts(path: str, storage_options=None) -> dict[str, np.ndarray]:
    """``{count name: (tile_row, tile_col)}`` of :data:`COUNT_NAMES` (-1: not composited)."""
    values = ChunkArray(path, TILE_COUNTS, storage_options).read((slice(None),) * 3)
    return dict(zip(COUNT_NAMES, values, strict=True))


def set_counts(path: str, tile: Tile, counts: Mapping[str, int], storage_options=None) -> None:
    """Record a tile's :data:`COUNT_NAMES` (its own chunk)."""
    values = np.array([int(counts[n]) for n in COUNT_NAMES], np.int32)
    ChunkArray(path, TILE_COUNTS, storage_options).write((slice(None), tile.row, tile.col), values)


def set_status(path: str, tiles: list[Tile], code: int, storage_options=None) -> None:
    """Mark ``tiles`` with ``code`` (each tile is its own chunk, so this is atomic per tile)."""
    arr = ChunkArray(path, "tile_status", storage_options)
    for t in tiles:
        arr.write((t.row, t.col), code)


def write_tile(
    path: str,
    tile: Tile,
    variables: Mapping[str, tuple[tuple[str, ...], Any]],
    storage_options=None,
):
    """Delayed region write of one tile's variables (dask or NumPy arrays).

    Pixel variables cover ``tile.ys``/``tile.xs``, cell variables ``tile.ys_cell``/
    ``tile.xs_cell``; a ``band`` axis is written whole.
    """
    ds = xr.Dataset({k: (dims, arr) for k, (dims, arr) in variables.items()})
    region = {"y": tile.ys, "x": tile.xs, "y_cell": tile.ys_cell, "x_cell": tile.xs_cell}
    if "band" in ds.dims:
        region["band"] = slice(0, ds.sizes["band"])
    region = {k: v for k, v in region.items() if k in ds.dims}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return ds.to_zarr(
            path,
            region=region,
            mode="r+",
            compute=False,
            storage_options=_so(path, storage_options),
            consolidated=False,
        )


def read_window(
    path: str,
    name: str,
    ys: slice,
    xs: slice,
    storage_options=None,
    *,
    index: Sequence[int] | None = None,
) -> np.ndarray:
    """Stored values of ``name`` in the window ``ys, xs`` (pixels, or cells for cell
    variables), read inside the calling task (no dask graph, no zarr event loop: see
    :mod:`popdask.chunkio`).

    ``index`` picks entries of a leading axis (the composite's bands); default all.
    """
    arr = ChunkArray(path, name, storage_options)
    if arr.ndim == 3:
        return arr.read((slice(None) if index is None else list(index), ys, xs))
    return arr.read((ys, xs))


SAMPLE_GROUP = "sample"


def create_sample(
    path: str, n_tiles: int, per_tile: int, n_bands: int, attrs: Mapping[str, Any], so=None
) -> None:
    """Make room for the fit's pixel sample, drawn per tile by the composite pass.

    The ``sample`` group holds ``pixels`` ``(tile, per_tile, band)`` (NaN padded) and
    ``count`` ``(tile,)`` (-1 until the tile's sample is written). It is kept when it already
    exists with the same ``attrs`` (a resumed run), else replaced.
    """
    root = open_group(path, so)
    want = _jsonable(dict(attrs, per_tile=per_tile, n_tiles=n_tiles, n_bands=n_bands))
    if SAMPLE_GROUP in root and dict(root[SAMPLE_GROUP].attrs) == want:
        return
    g = root.create_group(SAMPLE_GROUP, overwrite=True)
    g.create_array(
        "pixels",
        shape=(n_tiles, per_tile, n_bands),
        chunks=(1, per_tile, n_bands),
        dtype="float32",
        fill_value=np.nan,
    )
    g.create_array("count", shape=(n_tiles,), chunks=(1,), dtype="int32", fill_value=-1)
    g.attrs.update(want)


def write_sample(path: str, index: int, values: np.ndarray, so=None) -> None:
    """Store tile ``index``'s sample ``(n, band)`` (from the task that composited it)."""
    pixels = ChunkArray(path, f"{SAMPLE_GROUP}/pixels", so)
    chunk = np.full(pixels.chunks[1:], np.nan, np.float32)  # the tile's whole chunk, padded
    chunk[: len(values)] = values
    pixels.write((index, slice(None), slice(None)), chunk)
    ChunkArray(path, f"{SAMPLE_GROUP}/count", so).write((index,), len(values))


def read_sample(path: str, attrs: Mapping[str, Any], so=None) -> np.ndarray | None:
    """The stored sample ``(n, band)`` if every tile wrote its part for these ``attrs``."""
    root = open_group(path, so, mode="r")
    if SAMPLE_GROUP not in root:
        return None
    g = root[SAMPLE_GROUP]
    if any(g.attrs.get(k) != v for k, v in _jsonable(dict(attrs)).items()):
        return None
    count = ChunkArray(path, f"{SAMPLE_GROUP}/count", so).read((slice(None),))
    if (count < 0).any():
        return None
    pixels = ChunkArray(path, f"{SAMPLE_GROUP}/pixels", so).read((slice(None),) * 3)
    keep = np.arange(pixels.shape[1])[None, :] < count[:, None]
    return pixels[keep]


TERMS = "terms"


def ensure_terms(path: str, names: Sequence[str], storage_options=None) -> None:
    """Make room for the raw covariate layers ``terms`` ``(term, y, x)`` float32, one per
    name of ``names`` (see :mod:`popdask.terms`), chunked like the composite.

    They are written by the passes that compute each term (intensity by the label pass,
    context by the densities fit) and read by the predict pass, so that it needs neither the
    composite nor the context's halo. Kept when it already holds these names, else replaced.
    """
    if term_names(path, storage_options) == list(names):
        return
    _create_terms(open_group(path, storage_options), names)
    consolidate(path, storage_options)


def term_names(path: str, storage_options=None) -> list[str] | None:
    """The names of the stored ``terms`` layers, in order (None: the store has none)."""
    try:
        return list(ChunkArray(path, TERMS, storage_options).attrs.get("terms", []))
    except KeyError:
        return None


def _create_terms(g: zarr.Group, names: Sequence[str]) -> None:
    """The ``terms`` array and its ``term`` coordinate in the root group ``g`` (replaced)."""
    names = list(names)
    ref = g["cluster"]
    arr = g.create_array(
        TERMS,
        shape=(len(names), *ref.shape),
        chunks=(1, *ref.chunks),
        dtype="float32",
        fill_value=np.nan,
        compressors=[FAST_CODEC],
        overwrite=True,
    )
    coord = g.create_array("term", shape=(len(names),), dtype=str, overwrite=True)
    coord[...] = np.array(names, dtype=object)  # the names as the dimension's coordinate
    coord.attrs["_ARRAY_DIMENSIONS"] = ["term"]
    arr.attrs.update(
        {
            "_ARRAY_DIMENSIONS": ["term", "y", "x"],
            "terms": names,
            "long_name": "covariate layers of the regression terms, before scaling",
            "coordinates": "spatial_ref",
            "_CRS": dict(ref.attrs.get("_CRS", {})),
        }
    )


def write_layer(
    path: str, name: str, index: int, tile: Tile, values: np.ndarray, storage_options=None
) -> None:
    """Write one tile of layer ``index`` of the ``(layer, y, x)`` variable ``name``."""
    ChunkArray(path, name, storage_options).write((index, tile.ys, tile.xs), values)


def read_census(path: str, storage_options=None) -> np.ndarray:
    """The stored ``census`` ``(y_cell, x_cell)`` float32, NaN where unknown (written as
    such by :func:`create`; one array read, no dataset opened)."""
    arr = ChunkArray(path, "census", storage_options)
    return np.asarray(arr.read((slice(None), slice(None))), np.float32)


def census_attrs(path: str, storage_options=None) -> dict[str, Any]:
    """The ``census`` array's attributes: source, column and the cell counts
    (``cells_known``, ``cells_absent_zero``, ``cells_unknown``) :func:`create` copied from
    the census DataArray."""
    return dict(open_array(path, "census", storage_options, mode="r").attrs)


def variable_shares(path: str, storage_options=None) -> list[float] | None:
    """The region's share of each mapped census variable (``census_by``'s attribute), or
    None when the store maps none."""
    try:
        attrs = ChunkArray(path, "census_by", storage_options).attrs
    except KeyError:
        return None
    return list(attrs["region_share"])


def root_attrs(path: str, storage_options=None) -> dict[str, Any]:
    """The store's root attributes, read without opening the group."""
    fs, key = resolve(path, ".zattrs", storage_options)
    try:
        return json.loads(fs.cat_file(key))
    except FileNotFoundError:
        return {}


def band_kinds(path: str, storage_options=None) -> list[str]:
    """The kind of each composite band (``reflectance``, ``backscatter_db``, ``radiance``)."""
    return list(open_array(path, "composite", storage_options, mode="r").attrs["band_kind"])


def write_arrays(
    path: str, tile: Tile, variables: Mapping[str, np.ndarray], storage_options=None
) -> None:
    """Write one tile's NumPy arrays from the calling task (chunk-aligned, so each chunk
    is replaced whole; :mod:`popdask.chunkio`). Pixel variables cover ``tile.ys``/
    ``tile.xs``, cell variables (``y_cell``, ``x_cell``) ``tile.ys_cell``/``tile.xs_cell``."""
    for name, values in variables.items():
        arr = ChunkArray(path, name, storage_options)
        cell = "y_cell" in arr.attrs.get("_ARRAY_DIMENSIONS", [])
        ys, xs = (tile.ys_cell, tile.xs_cell) if cell else (tile.ys, tile.xs)
        arr.write((slice(None),) * (arr.ndim - 2) + (ys, xs), values)


def update_attrs(path: str, attrs: Mapping[str, Any], storage_options=None) -> None:
    """Merge ``attrs`` into the store's root attributes (JSON-able values)."""
    g = open_group(path, storage_options)
    g.attrs.update(_jsonable(attrs))
    consolidate(path, storage_options)


def save_arrays(
    path: str,
    group: str,
    arrays: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    storage_options=None,
) -> None:
    """Write plain arrays and attrs into a subgroup (e.g. the model). Replaces the group.

    The arrays are written whole (:func:`popdask.chunkio.write_array`) and the group's
    ``.zgroup`` last: a save cut short leaves no group that opens, so the next run fits
    again instead of reading half a model.
    """
    fs, base = resolve(path, group, storage_options)
    if fs.exists(base):
        fs.rm(base, recursive=True)
    for name, arr in arrays.items():
        write_array(
            path,
            f"{group}/{name}",
            np.asarray(arr),
            codec=FAST_CODEC,
            storage_options=storage_options,
        )
    put(fs, f"{base}/.zattrs", json.dumps(_jsonable(attrs), indent=2).encode())
    put(fs, f"{base}/.zgroup", json.dumps({"zarr_format": 2}).encode())


def load_arrays(path: str, group: str, storage_options=None) -> tuple[dict[str, np.ndarray], dict]:
    """Read a subgroup written by :func:`save_arrays` (raises KeyError if absent)."""
    g = open_group(path, storage_options, mode="r")[group]
    return {k: np.asarray(v[...]) for k, v in g.arrays()}, dict(g.attrs)


def consolidate(path: str, storage_options=None) -> None:
    """Consolidate metadata once the run is finished (for fast opening)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=NOT_ZARR)
        zarr.consolidate_metadata(_zarr_store(path, storage_options))


LATEST = "latest.json"


def write_latest(base: str, version: str, storage_options=None) -> None:
    """Point ``{base}/latest.json`` at the finished store of ``version``.

    Called only after a run has finished, so readers following the pointer never see a
    half-built product. Local files are replaced atomically; object stores write the small
    object in one request.
    """
    import datetime as dt
    import os

    import fsspec

    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    doc = json.dumps({"version": version, "store": f"{version}.zarr", "finished": now})
    target = f"{base.rstrip('/')}/{LATEST}"
    if not _is_url(base):
        tmp = f"{target}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(doc)
        os.replace(tmp, target)
        return
    with fsspec.open(target, "w", **dict(storage_options or {})) as f:
        f.write(doc)


def latest(base: str, storage_options=None) -> str:
    """Path of the newest finished store under a versioned output ``base``.

    Raises
    ------
    StoreError
        When no rebuild has finished there yet.
    """
    import fsspec

    target = f"{base.rstrip('/')}/{LATEST}"
    try:
        with fsspec.open(target, "r", **dict(storage_options or {})) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise StoreError(f"{target} not found: no rebuild under {base} has finished yet") from None
    return f"{base.rstrip('/')}/{doc['store']}"


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_default))


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
