"""The store as Cloud-Optimized GeoTIFFs: one COG per layer and tile, a VRT per layer.

``OUT/{layer}/{tile id}.tif`` holds one tile of one layer (EPSG:3035, the store's 20 m
pixels, DEFLATE, 256 × 256 internal tiles, overviews), ``OUT/{layer}.vrt`` mosaics a
layer's tiles; ``OUT/collection.json`` and ``OUT/items/{tile id}.json`` describe them in
STAC (:mod:`popdask.stacout`). Each tile is exported by one task on a worker
(:func:`export_tile`, run through :func:`popdask.scheduler.map_tiles`): it reads its window
of the store, writes its COGs and its STAC item, checks each COG with rio-cogeo's
validator and sends the client a few numbers (statistics, sizes, checksums); the VRTs are
written on the client from the grid alone, without opening a tile.

Overviews are built with ``average`` resampling at factors ``2, 4, …`` that divide the
tile (:func:`overview_factors`), so an overview pixel covers exactly ``f × f`` pixels: for a
count layer (``population``) the overview value × ``f²`` is the persons in it, and the
overview of a tile sums, times ``f²``, to the tile's sum (GDAL 3.10 builds no ``sum``
overviews). Densities average; labels (``cluster``) take the ``mode``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from popdask.chunkio import ChunkArray, put, resolve
from popdask.grid import CRS, Grid, Tile

log = logging.getLogger(__name__)

#: Internal tile side of the COGs (pixels).
BLOCKSIZE = 256
#: Smallest overview side (pixels) :func:`overview_factors` goes down to.
MIN_OVERVIEW = 8
#: Layers exported when none are named.
DEFAULT_LAYERS = ("population", "density")
#: Count layers: their pixels add up (persons), so their overviews are sums in disguise.
COUNT_LAYERS = ("population", "population_by", "population_lower", "population_upper")
#: ``{layer kind: overview resampling}``.
RESAMPLING = {"count": "average", "density": "average", "categorical": "mode"}
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"


class ExportError(RuntimeError):
    """The export cannot go on; the message says what to fix."""


@dataclass(frozen=True)
class Layer:
    """One exported layer: the store array (and entry of its leading axis) it comes from."""

    name: str  # "population", "population_by/TOT_P_F"
    array: str  # the store's array
    index: int | None  # entry of a (variable, y, x) array
    kind: str  # "count", "density" or "categorical"
    dtype: str
    nodata: float | int
    units: str
    long_name: str

    @property
    def resampling(self) -> str:
        return RESAMPLING[self.kind]

    def cog_key(self, tile_id: str) -> str:
        return f"{self.name}/{tile_id}.tif"


# --------------------------------------------------------------------------------------
# Layers of a store
# --------------------------------------------------------------------------------------
def _kind(array: str, dtype: np.dtype) -> str:
    if array in COUNT_LAYERS:
        return "count"
    return "density" if dtype.kind == "f" else "categorical"


def _layer(array: ChunkArray, name: str, array_name: str, index: int | None) -> Layer:
    dtype = array.dtype
    nodata = float("nan") if dtype.kind == "f" else array.missing.item()
    attrs = array.attrs
    return Layer(
        name=name,
        array=array_name,
        index=index,
        kind=_kind(array_name, dtype),
        dtype=dtype.name,
        nodata=nodata,
        units=str(attrs.get("units", "")),
        long_name=str(attrs.get("long_name", name)),
    )


def store_layers(path: str, storage_options=None) -> dict[str, Layer]:
    """Every layer the store at ``path`` can export: each ``(y, x)`` array (``population``,
    ``density``, ``cluster``, …) and each entry of a ``(variable, y, x)`` ``population_by``
    as ``population_by/{name}``."""
    fs, root = resolve(path, "", storage_options)
    out: dict[str, Layer] = {}
    entries = fs.ls(root.rstrip("/"), detail=True)
    for key in sorted(e["name"] for e in entries if e["type"] == "directory"):
        name = key.rstrip("/").rsplit("/", 1)[-1]
        try:
            arr = ChunkArray(path, name, storage_options)
        except (KeyError, ValueError):
            continue  # a group, a folder of records, an unsupported array
        dims = arr.attrs.get("_ARRAY_DIMENSIONS", [])
        if dims == ["y", "x"]:
            out[name] = _layer(arr, name, name, None)
        elif name == "population_by" and len(dims) == 3 and dims[1:] == ["y", "x"]:
            from popdask.store import open_array

            names = open_array(path, dims[0], storage_options, mode="r")[...]
            for i, col in enumerate(names):
                out[f"{name}/{col}"] = _layer(arr, f"{name}/{col}", name, i)
    return out


def pick_layers(available: Mapping[str, Layer], names: Iterable[str] | None) -> list[Layer]:
    """The layers ``names`` (default :data:`DEFAULT_LAYERS`; ``population_by`` stands for
    all its columns); an unknown name raises ``ValueError`` listing the store's layers."""
    names = list(DEFAULT_LAYERS if names is None else names)
    picked: list[Layer] = []
    for n in names:
        hits = [v for k, v in available.items() if k == n or k.startswith(f"{n}/")]
        if not hits:
            raise ValueError(
                f"the store has no layer {n!r}; it has: {', '.join(available) or 'none'} "
                "(choose among them with --layers / layers=)"
            )
        picked += [h for h in hits if h not in picked]
    return picked


# --------------------------------------------------------------------------------------
# Pure array work
# --------------------------------------------------------------------------------------
def overview_factors(shape: tuple[int, int], min_size: int = MIN_OVERVIEW) -> list[int]:
    """Overview factors ``2, 4, …`` that divide both sides of ``shape`` and leave at least
    ``min_size`` pixels: each overview pixel covers exactly ``f × f`` pixels.

    Examples
    --------
    >>> overview_factors((500, 500)), overview_factors((150, 150)), overview_factors((50, 8))
    ([2, 4], [2], [])
    """
    factors, f = [], 2
    while all(n % f == 0 and n // f >= min_size for n in shape):
        factors.append(f)
        f *= 2
    return factors


def valid_mask(values: np.ndarray, nodata: float | int) -> np.ndarray:
    """Where ``values`` holds data (not NaN, not ``nodata``)."""
    if np.issubdtype(values.dtype, np.floating):
        return np.isfinite(values) if np.isnan(nodata) else np.isfinite(values) & (values != nodata)
    return values != nodata


def band_stats(values: np.ndarray, nodata: float | int) -> dict[str, float | int]:
    """What the STAC raster extension says of a band (``minimum``, ``maximum``, ``mean``,
    ``stddev``, ``valid_percent``) and the ``sum`` and ``count`` of its valid pixels
    (float64 sums; an empty band has no statistics but ``valid_percent`` 0)."""
    v = values[valid_mask(values, nodata)].astype(np.float64)
    out: dict[str, float | int] = {
        "valid_percent": 100.0 * v.size / max(values.size, 1),
        "count": int(v.size),
        "sum": float(v.sum()),
    }
    if v.size:
        out.update(minimum=float(v.min()), maximum=float(v.max()), mean=float(v.mean()))
        out["stddev"] = float(v.std())
    return out


def overview_sum(values: np.ndarray, factor: int, nodata: float | int) -> float:
    """The persons an ``average`` overview of ``factor`` holds: its valid values × ``f²``."""
    v = values[valid_mask(values, nodata)].astype(np.float64)
    return float(v.sum()) * factor * factor


def multihash_sha256(data: bytes) -> str:
    """The ``file:checksum`` of ``data``: a SHA2-256 multihash (``1220`` + hex digest)."""
    return "1220" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------
# One COG
# --------------------------------------------------------------------------------------
def cog_bytes(
    values: np.ndarray, tile: Tile, resolution: float, layer: Layer, tags: Mapping[str, str]
) -> bytes:
    """One tile of one layer as a COG, in memory: GDAL's COG driver (DEFLATE, predictor,
    :data:`BLOCKSIZE` tiles) over a GeoTIFF whose overviews (:func:`overview_factors`) were
    built with the layer's resampling; nodata, units and ``tags`` set."""
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile
    from rasterio.shutil import copy
    from rasterio.transform import from_origin

    h, w = values.shape
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 1,
        "dtype": layer.dtype,
        "crs": CRS,
        "transform": from_origin(tile.bounds[0], tile.bounds[3], resolution, resolution),
        "nodata": layer.nodata,
    }
    factors = overview_factors((h, w))
    with MemoryFile() as src, MemoryFile() as dst:
        with src.open(**profile) as ds:
            ds.write(values, 1)
            ds.units = (layer.units,)
            ds.set_band_description(1, layer.long_name)
            ds.update_tags(**tags)
            ds.update_tags(1, units=layer.units, layer=layer.name)
            if factors:
                ds.build_overviews(factors, Resampling[layer.resampling])
            copy(
                ds,
                dst.name,
                driver="COG",
                compress="DEFLATE",
                predictor="YES",
                blocksize=BLOCKSIZE,
                overviews="FORCE_USE_EXISTING" if factors else "NONE",
            )
        return bytes(dst.getbuffer())


def check_cog(data: bytes, layer: Layer) -> dict[str, Any]:
    """What the written bytes hold, read back: rio-cogeo's strict validation, the band's
    statistics (:func:`band_stats`) and, for a count layer, the largest relative gap between
    an overview's persons (:func:`overview_sum`) and the band's sum."""
    from rasterio.io import MemoryFile
    from rio_cogeo.cogeo import cog_validate

    with MemoryFile(data) as mem:
        valid, errors, warnings = cog_validate(mem.name, strict=True, quiet=True)
        with mem.open() as ds:
            values = ds.read(1)
            factors = ds.overviews(1)
            out: dict[str, Any] = {"cog_valid": bool(valid), "cog_errors": errors + warnings}
            out["stats"] = band_stats(values, layer.nodata)
            if layer.kind == "count":
                out["overview_factors"] = list(factors)
                out["overview_gap"] = _overview_gap(ds, out["stats"]["sum"], layer.nodata)
    return out


def _overview_gap(ds, total: float, nodata: float | int) -> float:
    """The largest relative gap between an overview's persons and the band's ``total``."""
    gaps = []
    for f in ds.overviews(1):
        ov = ds.read(1, out_shape=(ds.height // f, ds.width // f))
        gaps.append(abs(overview_sum(ov, f, nodata) - total) / max(abs(total), 1e-12))
    return max(gaps, default=0.0)


# --------------------------------------------------------------------------------------
# One tile, on a worker
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileJob:
    """What every tile task needs besides its tile (pickled once per task; small)."""

    store: str
    storage_options: dict
    out: str
    out_options: dict
    resolution: float
    layers: tuple[Layer, ...]
    tags: dict[str, str]
    item: dict[str, Any]  # the common part of each tile's STAC item (popdask.stacout)
    archive: str | None = None  # the version whose files move to versions/{it}/ first
    archive_layers: tuple[str, ...] = ()


def read_layer(job: TileJob, layer: Layer, tile: Tile) -> np.ndarray:
    """The tile's window of ``layer`` from the store (whole chunks, this thread)."""
    arr = ChunkArray(job.store, layer.array, job.storage_options)
    if layer.index is None:
        return arr.read((tile.ys, tile.xs))
    return arr.read((layer.index, tile.ys, tile.xs))


def archive_tile(job: TileJob, tile_id: str, *, move: bool = False) -> None:
    """Copy the tile's files of the previous version to ``versions/{version}/`` (its item
    and its COGs, at the same relative paths, so the item's links still resolve). Only while
    its item is still of that version: a rerun never archives this version's files. ``move``
    then deletes them (a tile this version does not export)."""
    from popdask import stacout

    fs, root = resolve(job.out, "", job.out_options)
    root = root.rstrip("/")
    item = stacout.read_json(fs, f"{root}/{stacout.item_key(tile_id)}")
    if item is None or item.get("properties", {}).get("version") != job.archive:
        return
    keys = [f"{n}/{tile_id}.tif" for n in job.archive_layers] + [stacout.item_key(tile_id)]
    for key in keys:  # the item last: an archived item names only archived files
        if fs.exists(f"{root}/{key}"):
            put(fs, f"{root}/{stacout.VERSIONS}/{job.archive}/{key}", fs.cat_file(f"{root}/{key}"))
    if move:
        for key in reversed(keys):  # the item first: no item names a deleted file
            if fs.exists(f"{root}/{key}"):
                fs.rm(f"{root}/{key}")


def export_tile(job: TileJob, tile: Tile) -> dict[str, Any]:
    """Export one tile: its COG of every layer, then its STAC item (written last, so an item
    names only files already written). Returns per layer the file's ``key``, ``size``,
    ``checksum``, validation and statistics."""
    from popdask import stacout

    if job.archive:
        archive_tile(job, tile.id)
    fs, root = resolve(job.out, "", job.out_options)
    root = root.rstrip("/")
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}
    for layer in job.layers:
        data = cog_bytes(read_layer(job, layer, tile), tile, job.resolution, layer, job.tags)
        put(fs, f"{root}/{layer.cog_key(tile.id)}", data)
        summary[layer.name] = {
            "key": layer.cog_key(tile.id),
            "size": len(data),
            "checksum": multihash_sha256(data),
            **check_cog(data, layer),
        }
    item = stacout.tile_item(tile, job.layers, summary, job.item)
    put(fs, f"{root}/{stacout.item_key(tile.id)}", stacout.dumps(item))
    return {"layers": summary, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------
# VRT, from the grid
# --------------------------------------------------------------------------------------
_GDAL_TYPES = {"float32": "Float32", "float64": "Float64", "int16": "Int16", "int32": "Int32",
               "uint8": "Byte", "uint16": "UInt16", "int8": "Int8", "uint32": "UInt32"}  # fmt: skip


def _nodata_text(nodata: float | int) -> str:
    return "nan" if isinstance(nodata, float) and np.isnan(nodata) else repr(nodata)


def vrt_xml(
    grid: Grid, tiles: Sequence[Tile], layer: Layer, tags: Mapping[str, str] | None = None
) -> str:
    """The VRT mosaic of ``layer``'s tiles: the region's grid, one source per tile at the
    relative path ``{layer base name}/{tile id}.tif`` (the VRT sits beside that folder), the
    overview factors every tile has as virtual overviews (read from the tiles' own) and
    ``tags`` as its metadata. Pure: the tiles' sizes and offsets come from the grid, no file
    is opened."""
    from pyproj import CRS as ProjCRS

    ny, nx = grid.shape
    gdal_type = _GDAL_TYPES[layer.dtype]
    folder = layer.name.rsplit("/", 1)[-1]
    gt = ", ".join(repr(float(v)) for v in grid.transform.to_gdal())
    lines = [
        f'<VRTDataset rasterXSize="{nx}" rasterYSize="{ny}">',
        f"  <SRS>{escape(ProjCRS.from_user_input(CRS).to_wkt())}</SRS>",
        f"  <GeoTransform>{gt}</GeoTransform>",
    ]
    if tags:
        lines.append("  <Metadata>")
        lines += [f'    <MDI key="{escape(k)}">{escape(str(v))}</MDI>' for k, v in tags.items()]
        lines.append("  </Metadata>")
    shared = min((overview_factors(t.shape) for t in tiles), key=len, default=[])
    if shared:
        factors = " ".join(map(str, shared))
        lines.append(f'  <OverviewList resampling="{layer.resampling}">{factors}</OverviewList>')
    lines += [
        f'  <VRTRasterBand dataType="{gdal_type}" band="1">',
        f"    <Description>{escape(layer.long_name)}</Description>",
        f"    <NoDataValue>{_nodata_text(layer.nodata)}</NoDataValue>",
        f"    <UnitType>{escape(layer.units)}</UnitType>",
    ]
    for t in tiles:
        h, w = t.shape
        lines += [
            "    <SimpleSource>",
            f'      <SourceFilename relativeToVRT="1">{escape(folder)}/{t.id}.tif</SourceFilename>',
            "      <SourceBand>1</SourceBand>",
            f'      <SourceProperties RasterXSize="{w}" RasterYSize="{h}" '
            f'DataType="{gdal_type}" BlockXSize="{BLOCKSIZE}" BlockYSize="{BLOCKSIZE}"/>',
            f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>',
            f'      <DstRect xOff="{t.xs.start}" yOff="{t.ys.start}" xSize="{w}" ySize="{h}"/>',
            "    </SimpleSource>",
        ]
    lines += ["  </VRTRasterBand>", "</VRTDataset>", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# What the client keeps
# --------------------------------------------------------------------------------------
@dataclass
class LayerTotals:
    """A layer's sums over the exported tiles (float64), reduced from the tasks' summaries."""

    files: int = 0
    bytes: int = 0
    valid: int = 0
    sum: float = 0.0
    minimum: float = float("inf")
    maximum: float = float("-inf")
    cog_invalid: list[str] = field(default_factory=list)
    overview_gap: float | None = None

    def add(self, tile_id: str, s: Mapping[str, Any]) -> None:
        st = s["stats"]
        self.files += 1
        self.bytes += s["size"]
        self.valid += st["count"]
        self.sum += st["sum"]
        if st["count"]:
            self.minimum = min(self.minimum, st["minimum"])
            self.maximum = max(self.maximum, st["maximum"])
        if not s["cog_valid"]:
            self.cog_invalid.append(f"{tile_id}: {'; '.join(s['cog_errors'])}")
        if "overview_gap" in s:
            self.overview_gap = max(self.overview_gap or 0.0, s["overview_gap"])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "files": self.files,
            "bytes": self.bytes,
            "valid_pixels": self.valid,
            "sum": self.sum,
            "cog_invalid": self.cog_invalid,
        }
        if self.valid:
            out.update(minimum=self.minimum, maximum=self.maximum)
        if self.overview_gap is not None:
            out["overview_gap"] = self.overview_gap  # largest relative, over the tiles
        return out
