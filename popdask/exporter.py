"""``popdask export``: a finished store as COGs, VRTs and a STAC collection.

The client reads the store's attributes and tile status, sends one task per complete tile
(:func:`popdask.cog.export_tile`, through :func:`popdask.scheduler.map_tiles`), keeps each
task's few numbers, then writes the VRTs (from the grid) and the collection. No tile's
pixels ever reach the client.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from popdask import __version__, cog, stacout, store
from popdask.chunkio import put, resolve
from popdask.grid import Grid, Tile
from popdask.scheduler import map_tiles
from popdask.secrets import refuse_storage_secrets

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """What an export wrote: per layer its files, bytes, valid pixels, sum, range, COGs
    failing validation and (count layers) the largest relative overview-sum gap."""

    out: str
    version: str
    tiles: list[str]
    skipped: list[str]
    layers: dict[str, dict[str, Any]]
    seconds: float
    archived: str | None = None
    failed: dict[str, str] = field(default_factory=dict)


def grid_of(attrs: Mapping[str, Any]) -> Grid:
    """The store's grid, from its ``popdask.grid`` attributes."""
    g = attrs["popdask"]["grid"]
    return Grid(tuple(g["bounds"]), resolution=g["resolution"], cell=g["cell"], tile=g["tile"])


def _store_href(path: str, out: str) -> str | None:
    """How the collection points at the store: a relative path when both are local, the
    URL without any user or password when the store is remote, else (a local store, a
    remote export) not at all."""
    local_store, local_out = "://" not in str(path), "://" not in str(out)
    if local_store and local_out:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    if local_store:
        return None
    parts = urlsplit(str(path))
    return urlunsplit(parts._replace(netloc=parts.hostname or "", query="", fragment=""))


def _tags(layer_names: Iterable[str], attrs: Mapping[str, Any], version: str) -> dict[str, str]:
    return {
        "product": "popdask",
        "product_version": version,
        "popdask_version": __version__,
        "store_popdask_version": str(attrs.get("popdask_version", "")),
        "layers_exported": ",".join(layer_names),
        "overview_semantics": (
            "count layers (population): an overview pixel of factor f holds the mean of its "
            "f x f pixels; value x f^2 is the persons in it"
        ),
    }


def _complete(path: str, grid: Grid, so) -> tuple[list[Tile], list[str]]:
    status = store.tile_status(path, so)
    tiles, skipped = [], []
    for t in grid.tiles():
        (tiles if status[t.row, t.col] == store.COMPLETE else skipped).append(t)
    return tiles, [t.id for t in skipped]


def _archive_previous(fs, root: str, previous: dict[str, Any], version: str) -> tuple[str, ...]:
    """Keep the previous version's collection and VRTs under ``versions/{it}/``."""
    old = previous.get("version")
    layers = tuple(previous.get("popdask:layers", {}))
    base = f"{root}/{stacout.VERSIONS}/{old}"
    for name in layers:
        if fs.exists(f"{root}/{name}.vrt"):
            put(fs, f"{base}/{name}.vrt", fs.cat_file(f"{root}/{name}.vrt"))
    put(fs, f"{base}/{stacout.COLLECTION}", stacout.dumps(stacout.archived(previous)))
    log.info("export: version %s kept under %s/ before writing %s", old, base, version)
    return layers


def _layer_doc(layer: cog.Layer, totals: cog.LayerTotals, resolution: float) -> dict[str, Any]:
    doc = {
        "array": layer.array,
        "kind": layer.kind,
        "units": layer.units,
        "dtype": layer.dtype,
        "nodata": stacout._nodata(layer.nodata),
        "overview_resampling": layer.resampling,
        "vrt": f"./{layer.name}.vrt",
        **totals.summary(),
    }
    doc.pop("cog_invalid")
    if layer.kind == "count":
        doc["overview_semantics"] = (
            f"overview value x (overview pixel area / {resolution * resolution:g} m2) = persons"
        )
    return doc


def export(
    path: str,
    out: str,
    layers: Iterable[str] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    out_options: Mapping[str, Any] | None = None,
    client=None,
    cluster=None,
    collection_id: str = "popdask",
    progress: bool = False,
) -> ExportResult:
    """Export a popdask store as Cloud-Optimized GeoTIFFs, VRT mosaics and STAC.

    Writes ``out/{layer}/{tile id}.tif`` for every complete tile and layer (one task per
    tile on the cluster), ``out/{layer}.vrt``, ``out/items/{tile id}.json`` and
    ``out/collection.json``. Nothing region-sized is held on the client.

    Parameters
    ----------
    path
        The store: a local path or an fsspec URL (``s3://bucket/eu/2026-11.zarr``).
    out
        The export folder: a local path or an fsspec URL.
    layers
        Layer names (default ``population`` and ``density``); any ``(y, x)`` array of the
        store, ``population_by`` for all of its columns, ``population_by/{column}`` for one.
    storage_options, out_options
        fsspec options of the store and of ``out`` (never credentials: those come from the
        environment of the client and the workers).
    client
        A connected dask client; by default a cluster is started from ``cluster``.
    cluster
        A :class:`popdask.config.ClusterConfig` (default: a local cluster).
    collection_id
        The STAC Collection's id.
    progress
        Show a progress bar.

    Returns
    -------
    ExportResult

    Raises
    ------
    ValueError
        An unknown layer (the message lists the store's), or a credential in the storage
        options (:class:`popdask.secrets.SecretInConfigError`).
    popdask.cog.ExportError
        Not a popdask store, no complete tile, or tiles whose export failed (the others are
        written; a rerun writes them again).

    Examples
    --------
    >>> import popdask
    >>> popdask.export("out.zarr", "export/", layers=["population"])  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    so, oo = dict(storage_options or {}), dict(out_options or {})
    refuse_storage_secrets(so, "storage_options")  # they would ride in every task
    refuse_storage_secrets(oo, "out_options")
    attrs, grid, picked, tiles, skipped = _inputs(path, so, layers)
    if client is None:  # the inputs are checked before a cluster is started
        from popdask.cluster import get_client

        with get_client(cluster) as c:
            return export(path, out, layers, storage_options=so, out_options=oo, client=c,
                          collection_id=collection_id, progress=progress)  # fmt: skip
    version = stacout.product_version(attrs)
    fs, root = resolve(out, "", oo)
    root = root.rstrip("/")
    previous = stacout.read_json(fs, f"{root}/{stacout.COLLECTION}")
    archive, archive_layers = None, ()
    if previous is not None and previous.get("version") not in (None, version):
        archive = previous["version"]
        archive_layers = _archive_previous(fs, root, previous, version)
    common = stacout.item_common(attrs, version, __version__, grid.resolution, collection_id)
    job = cog.TileJob(
        path, so, out, oo, grid.resolution, tuple(picked),
        _tags([x.name for x in picked], attrs, version), common, archive, archive_layers,
    )  # fmt: skip
    totals, done, failed = _run(client, job, tiles, progress)
    if archive:
        _archive_dropped(client, job, grid, previous, done)
    written = [t for t in tiles if t.id in done]
    for x in picked:
        put(fs, f"{root}/{x.name}.vrt", cog.vrt_xml(grid, written, x, job.tags).encode())
    doc = stacout.collection(
        collection_id=collection_id,
        common=common,
        attrs=attrs,
        region_bounds=grid.bounds,
        tile_ids=[t.id for t in written],
        layers={x.name: _layer_doc(x, totals[x.name], grid.resolution) for x in picked},
        store_href=_store_href(path, out),
        predecessor=archive or _kept_predecessor(previous, version),
    )
    put(fs, f"{root}/{stacout.COLLECTION}", stacout.dumps(doc))
    result = ExportResult(
        out, version, [t.id for t in written], skipped,
        {k: totals[k].summary() for k in totals}, time.perf_counter() - t0, archive, failed,
    )  # fmt: skip
    _check(result)
    return result


def _inputs(path: str, so: dict, layers: Iterable[str] | None):
    """The store's attributes, grid, the layers asked for, its complete tiles and the ids
    of the others; raises when there is nothing to export."""
    attrs = store.root_attrs(path, so)
    if "popdask" not in attrs:
        raise cog.ExportError(f"{path} is not a popdask store (no popdask attributes)")
    grid = grid_of(attrs)
    picked = cog.pick_layers(cog.store_layers(path, so), layers)
    tiles, skipped = _complete(path, grid, so)
    if not tiles:
        raise cog.ExportError(
            f"{path} has no complete tile to export; finish the run first (popdask status)"
        )
    if skipped:
        log.warning("export: %d incomplete tiles skipped: %s", len(skipped), skipped[:10])
    return attrs, grid, picked, tiles, skipped


def _run(client, job: cog.TileJob, tiles: list[Tile], progress: bool):
    """Every tile's task through map_tiles (with ``client`` as the current one); returns
    each layer's totals, the tiles done and the errors of those that failed."""
    totals = {x.name: cog.LayerTotals() for x in job.layers}
    done, failed = set(), {}
    with client.as_current():
        results = map_tiles(client, tiles, lambda t: (cog.export_tile, (job, t), {}),
                            desc="export", progress=progress, per_task=None)  # fmt: skip
        for r in results:
            if not r.ok:
                failed[r.tile.id] = "".join(traceback.format_exception_only(r.error)).strip()
                log.error("export: tile %s failed: %s", r.tile.id, failed[r.tile.id])
                continue
            done.add(r.tile.id)
            for name, s in r.value["layers"].items():
                totals[name].add(r.tile.id, s)
    return totals, done, failed


def _archive_dropped(client, job: cog.TileJob, grid: Grid, previous: dict, done: set) -> None:
    """Move the previous version's tiles that this one does not export to its folder, so
    its collection's links all resolve and the top holds this version only."""
    by_id = {t.id: t for t in grid.tiles()}
    listed = [x["href"].rsplit("/", 1)[-1].removesuffix(".json") for x in previous["links"]
              if x["rel"] == "item"]  # fmt: skip
    dropped = [by_id[i] for i in listed if i in by_id and i not in done]
    with client.as_current():
        build = lambda t: (cog.archive_tile, (job, t.id), {"move": True})  # noqa: E731
        for r in map_tiles(client, dropped, build, desc="archive", per_task=None):
            if not r.ok:
                log.error("export: could not keep tile %s of version %s: %s", r.tile.id,
                          job.archive, r.error)  # fmt: skip


def _kept_predecessor(previous: dict[str, Any] | None, version: str) -> str | None:
    """A re-export of the same version keeps the predecessor its collection named."""
    if previous is None or previous.get("version") != version:
        return None
    for link in previous.get("links", []):
        if link["rel"] == "predecessor-version":
            return link["href"].split("/")[-2]
    return None


def _check(result: ExportResult) -> None:
    """Raise when a tile failed or a file is not a valid COG (after everything else was
    written: a rerun writes the failed tiles again)."""
    invalid = [e for s in result.layers.values() for e in s["cog_invalid"]]
    if result.failed or invalid:
        shown = list(result.failed.items())[:5]
        raise cog.ExportError(
            f"export to {result.out}: {len(result.failed)} tiles failed "
            f"({'; '.join(f'{k}: {v}' for k, v in shown)}) and {len(invalid)} files are not "
            f"valid COGs ({'; '.join(invalid[:5])}); the other tiles are written, run the "
            "export again to retry"
        )
