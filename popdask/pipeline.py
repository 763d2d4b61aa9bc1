"""The passes of a run, wired together tile by tile (DESIGN.md "Passes over the region").

1. **composite** — per tile: STAC items → stackstac → masked medians → ``composite``.
2. **fit** — a pixel sample from the stored composites of all tiles → :class:`PixelModel`.
3. **label** — per tile: ``cluster`` (and the ``intensity`` layer of ``terms``); the task
   returns its cells' cluster fractions and intensity-weighted fractions. Then a pilot fit,
   the ``context`` layer and its weighted fractions (:mod:`popdask.terms`, per tile with the
   context's halo), and the bounded fit of densities on all cells (saved with its design
   matrix in the store's ``regression`` group); then **predict** — per tile with the
   smoothing's halo: ``population``, ``density``, ``predicted``.

Each pass submits per-tile graphs in batches of ``cluster.batch_tiles`` tiles, marks each
tile in ``tile_status`` as soon as its write has finished, and skips tiles already done,
so a rerun resumes where a killed run stopped. Only :mod:`popdask.sources` and
:mod:`popdask.store` touch data; this module decides what runs where.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
from distributed import Client, as_completed
from tqdm.auto import tqdm

from popdask import __version__, regression, store, terms
from popdask.census import census_from_config
from popdask.cluster import release_memory
from popdask.config import Config
from popdask.grid import Grid, Tile
from popdask.model import PixelModel, fit_model, sample_tile
from popdask.predict import halo_px, predict_window, window_cells
from popdask.sources import SourceItems, region_lonlat, search_sources, tile_composite

log = logging.getLogger(__name__)

CV_BLOCK = 5000  # metres: spatial block used as the group in cross-validation


class PipelineError(RuntimeError):
    """A pass could not finish; the store keeps what was done and a rerun resumes."""


@dataclass
class RunResult:
    """What a run produced."""

    path: str
    metrics: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    computed_tiles: dict[str, list[str]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Tile batches on the cluster
# --------------------------------------------------------------------------------------
def _run_tiles(
    client: Client,
    tiles: Sequence[Tile],
    build: Callable[[Tile], Any],
    *,
    path: str,
    storage_options: dict,
    done_code: int,
    batch: int,
    desc: str,
    progress: bool,
    settle: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Compute ``build(tile)`` (a delayed write) for every tile, in batches.

    Each tile is marked ``done_code`` as soon as its write has finished, or failed (-1).
    Returns ``{tile id: task result}`` of the tiles computed. Raises :class:`PipelineError`
    if any failed. ``settle`` is called once the tiles are done, before the store's
    attributes are touched (a write of the caller's still running, say).
    """
    failed: dict[str, str] = {}
    done: dict[str, Any] = {}
    bar = tqdm(total=len(tiles), desc=desc, unit="tile", disable=not progress)
    for start in range(0, len(tiles), batch):
        chunk = tiles[start : start + batch]
        built: list[tuple[Tile, Any]] = []
        for t in chunk:
            try:
                built.append((t, build(t)))
            except Exception as e:  # building the graph failed (catalog, metadata)
                failed[t.id] = f"{type(e).__name__}: {e}"
                log.error("%s: tile %s failed while building: %s", desc, t.id, e)
                store.set_status(path, [t], store.FAILED, storage_options)
                bar.update()
        # one submission for the batch (a future per tile): the scheduler gets one message
        futures = dict(
            zip(client.compute([d for _, d in built]), (t for t, _ in built), strict=True)
        )
        # the results come with the futures, each fetched in the client's event loop as
        # soon as its task ends (`fut.result()` here would be one round trip after another)
        for fut, value in as_completed(list(futures), with_results=True, raise_errors=False):
            t = futures[fut]
            # an error comes as (type, exception, traceback), a cancellation as the error
            e = value[1] if fut.status == "error" else value
            if isinstance(e, BaseException):
                failed[t.id] = f"{type(e).__name__}: {e}"
                log.error(
                    "%s: tile %s failed: %s",
                    desc,
                    t.id,
                    "".join(traceback.format_exception_only(type(e), e)).strip(),
                )
                store.set_status(path, [t], store.FAILED, storage_options)
            else:
                store.set_status(path, [t], done_code, storage_options)
                done[t.id] = value
            fut.release()
            bar.update()
    bar.close()
    if settle is not None:
        settle()
    key = f"failed_{desc}"  # what failed; {} again once a rerun has recovered every tile
    if failed or store.root_attrs(path, storage_options).get(key):
        store.update_attrs(path, {key: failed}, storage_options)
    if failed:
        raise PipelineError(
            f"{len(failed)} tile(s) failed in the {desc} pass ({sorted(failed)[:5]}...); "
            f"they are recorded in the store; rerun the same command to retry them. "
            f"First error: {next(iter(failed.values()))}"
        )
    return done


def _tile_pass(
    client: Client,
    cfg: Config,
    grid: Grid,
    build: Callable[[Tile], Any],
    *,
    done_code: int,
    desc: str,
    progress: bool,
    settle: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Run ``build`` on every tile whose status is below ``done_code`` (the resume);
    ``{tile id: result}`` of the tiles computed (``settle``: see :func:`_run_tiles`)."""
    path, so = cfg.output.store, cfg.output.storage_options
    status = store.tile_status(path, so)
    todo = [t for t in grid.tiles() if status[t.row, t.col] < done_code]
    log.info("%s: %d of %d tiles to do", desc, len(todo), status.size)
    return _run_tiles(
        client,
        todo,
        build,
        path=path,
        storage_options=so,
        done_code=done_code,
        batch=cfg.cluster.batch_tiles,
        desc=desc,
        progress=progress,
        settle=settle,
    )


def _gather_tiles(
    client: Client, tiles: Sequence[Tile], task: Callable[[Tile], Any], batch: int
) -> Iterator[tuple[Tile, Any]]:
    """``(tile, result)`` of ``task(tile)`` (a delayed value) for every tile, in batches.

    Small per-tile results (samples, cell arrays) come back to the client; a batch of
    ``batch`` tiles is one graph, so the scheduler never holds a graph over the region.
    """
    for start in range(0, len(tiles), batch):
        chunk = list(tiles[start : start + batch])
        futures = client.compute([task(t) for t in chunk])
        yield from zip(chunk, client.gather(futures), strict=True)
        del futures


# --------------------------------------------------------------------------------------
# Pass 1: composites
# --------------------------------------------------------------------------------------
def _sample_shares(cfg: Config, grid: Grid) -> dict[str, int]:
    """Pixels each tile contributes to the fit's sample (in proportion to its area)."""
    n_px = grid.shape[0] * grid.shape[1]
    m = cfg.model
    return {
        t.id: int(np.ceil(m.sample_pixels * (t.shape[0] * t.shape[1]) / n_px)) for t in grid.tiles()
    }


def _sample_seed(cfg: Config, index: int) -> int:
    return cfg.model.seed * 1_000_003 + index


def _write_composite(
    path: str, so: dict, tile: Tile, index: int, data: np.ndarray, n: int, seed: int
) -> None:
    """One task's end: write the tile's composite and its share of the fit's sample."""
    store.write_arrays(path, tile, {"composite": data}, so)
    store.write_sample(path, index, sample_tile(data, n, seed), so)
    # the largest task of a run: what it freed goes back to the system, so that a worker's
    # memory does not creep from tile to tile (the label and predict tasks, a third of its
    # size and short, keep theirs: trimming after each costs them ~15 %)
    del data
    release_memory()


def composite_pass(
    client: Client, cfg: Config, grid: Grid, sources: Sequence[SourceItems], *, progress: bool
) -> list[str]:
    """Composite every tile; each task also draws the tile's share of the fit's sample."""
    path, so = cfg.output.store, dict(cfg.output.storage_options)
    tiles = grid.tiles()
    index = {t.id: i for i, t in enumerate(tiles)}
    shares = _sample_shares(cfg, grid)
    n_bands = sum(len(s.bands) for s in sources)
    sample_attrs = {"sample_pixels": cfg.model.sample_pixels, "seed": cfg.model.seed}
    store.create_sample(path, len(tiles), max(shares.values()), n_bands, sample_attrs, so)

    def build(t: Tile):
        data, _, _, _ = tile_composite(
            sources, t.bounds, resolution=grid.resolution, sign=cfg.stac.sign, read=cfg.read
        )
        i = index[t.id]  # one consumer of the tile's composite: it is computed once
        return dask.delayed(_write_composite, pure=True)(
            path, so, t, i, data, shares[t.id], _sample_seed(cfg, i)
        )

    return _tile_pass(
        client, cfg, grid, build, done_code=store.COMPOSITED, desc="composite", progress=progress
    )


# --------------------------------------------------------------------------------------
# Pass 2: fit the pixel model
# --------------------------------------------------------------------------------------
def fit_pass(client: Client, cfg: Config, grid: Grid) -> PixelModel:
    path, so = cfg.output.store, cfg.output.storage_options
    try:
        arrays, attrs = store.load_arrays(path, "model", so)
        model = PixelModel.from_arrays(arrays, attrs)
        log.info("fit: reusing the model saved in the store (%d clusters)", model.n_clusters)
        return model
    except KeyError:
        pass
    tiles = grid.tiles()
    m = cfg.model
    samples = store.read_sample(path, {"sample_pixels": m.sample_pixels, "seed": m.seed}, so)
    if samples is None:  # a store composited without its sample: draw it from the composites
        log.info("fit: drawing the sample from the stored composites")
        ds = store.open_store(path, so)
        index = {t.id: i for i, t in enumerate(tiles)}
        shares = _sample_shares(cfg, grid)

        def task(t: Tile):
            block = ds.composite.data[:, t.ys, t.xs]
            i = index[t.id]
            return dask.delayed(sample_tile)(block, shares[t.id], _sample_seed(cfg, i))

        parts = [s for _, s in _gather_tiles(client, tiles, task, cfg.cluster.batch_tiles)]
        samples = np.concatenate(parts, axis=0)
    bands = [str(b) for b in store.open_array(path, "band", so, mode="r")[...]]
    kinds = store.band_kinds(path, so)
    model = fit_model(
        samples, bands, kinds, components=m.components, clusters=m.clusters, seed=m.seed
    )
    arrays, attrs = model.to_arrays()
    store.save_arrays(path, "model", arrays, {**attrs, "sample_pixels": len(samples)}, so)
    return model


# --------------------------------------------------------------------------------------
# Pass 3: labels, densities, prediction
# --------------------------------------------------------------------------------------
def cv_groups(grid: Grid, block: float = CV_BLOCK) -> np.ndarray:
    """``(y_cell, x_cell)`` spatial block id of each cell, for grouped cross-validation."""
    return regression.block_groups(grid.cell_shape, int(block // grid.cell))


def active_terms(cfg: Config, kinds: Sequence[str]) -> list[str]:
    """The configured covariate terms this run's bands allow (intensity needs lights or radar)."""
    lights, radar = terms.intensity_bands(kinds)
    return [t for t in cfg.regression.terms if t != "intensity" or lights or radar]


TileCells = tuple[np.ndarray, "np.ndarray | None", float]


def _tile_cells(labels: np.ndarray, layer: np.ndarray | None, k: int, cell_px: int) -> TileCells:
    """A tile's cluster fractions per cell and, given its intensity ``layer``, its raw
    intensity-weighted fractions and largest intensity (the term that needs no pilot fit)."""
    if layer is None:
        return regression.cell_fractions(labels, k, cell_px=cell_px), None, 0.0
    bins = regression.cell_cluster_index(labels, k, cell_px)  # shared by both
    fr = regression.cell_fractions(labels, k, cell_px=cell_px, bins=bins)
    top = float(layer.max()) if layer.size else 0.0
    return fr, terms.weighted_fractions(labels, layer[None], k, cell_px, bins=bins), top


def _intensity(comp: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
    """The intensity layer of composite bands ``comp`` of the given ``kinds``."""
    li, ri = terms.intensity_bands(kinds)
    return terms.intensity(comp[li] if li else None, comp[ri] if ri else None)


def _cells_and_intensity(
    path: str,
    so: dict,
    tile: Tile,
    labels: np.ndarray,
    comp: np.ndarray | None,
    kinds: Sequence[str],
    k: int,
    layer: int | None,
    cell_px: int,
) -> TileCells:
    """The tile's cells' fractions; with ``layer``, also its intensity (from ``comp``, bands
    of ``kinds``), written as layer ``layer`` of ``terms`` and weighted into fractions."""
    values = None
    if layer is not None:
        values = _intensity(comp, kinds)
        store.write_layer(path, store.TERMS, layer, tile, values, so)
    return _tile_cells(labels, values, k, cell_px)


def _label_tile(
    path: str, so: dict, tile: Tile, model: PixelModel, layer: int | None, cell_px: int
) -> TileCells:
    """One task: read the tile's composite, label it, write ``cluster`` (and, when the run
    has the intensity term, its layer ``layer`` of ``terms``); return the cells' fractions
    (and intensity-weighted fractions) while the composite is in memory."""
    comp = store.read_window(path, "composite", tile.ys, tile.xs, so)
    labels = model.labels(comp)
    store.write_arrays(path, tile, {"cluster": labels}, so)
    k = model.n_clusters
    return _cells_and_intensity(path, so, tile, labels, comp, model.kinds, k, layer, cell_px)


def _stored_cells(
    path: str, so: dict, tile: Tile, kinds: Sequence[str], k: int, layer: int | None, cell_px: int
) -> TileCells:
    """One task: what :func:`_label_tile` returns (and writes of ``terms``), for a tile
    labelled by an earlier run."""
    labels = store.read_window(path, "cluster", tile.ys, tile.xs, so)
    li, ri = terms.intensity_bands(kinds)
    bands = [] if layer is None else li + ri  # the intensity's bands only
    comp = None
    if bands:
        comp = store.read_window(path, "composite", tile.ys, tile.xs, so, index=bands)
    sub = [kinds[i] for i in bands]
    return _cells_and_intensity(path, so, tile, labels, comp, sub, k, layer, cell_px)


def _layer(names: Sequence[str], name: str) -> int | None:
    return names.index(name) if name in names else None


def label_pass(
    client: Client, cfg: Config, grid: Grid, model: PixelModel, *, progress: bool
) -> dict[str, TileCells]:
    """Label every tile not labelled yet; ``{tile id: its cells' fractions}`` of those."""
    path, so = cfg.output.store, dict(cfg.output.storage_options)
    names = active_terms(cfg, model.kinds)
    if names:
        store.ensure_terms(path, names, so)
    layer = _layer(names, "intensity")

    def build(t: Tile):
        # the model rides in each small graph: as a task of its own, it would pull every
        # tile's task to the worker that holds it
        return dask.delayed(_label_tile, pure=True)(path, so, t, model, layer, grid.cell_px)

    return _tile_pass(
        client, cfg, grid, build, done_code=store.LABELLED, desc="label", progress=progress
    )


def _inner(t: Tile, ys: slice, xs: slice) -> tuple[slice, slice]:
    """The tile's pixel slices inside the window ``ys, xs``."""
    return (
        slice(t.ys.start - ys.start, t.ys.stop - ys.start),
        slice(t.xs.start - xs.start, t.xs.stop - xs.start),
    )


def _tile_context_fractions(
    path: str,
    so: dict,
    t: Tile,
    ys: slice,
    xs: slice,
    pilot: np.ndarray,
    sigma_px: float,
    k: int,
    cell_px: int,
    layer: int,
) -> tuple[np.ndarray, float]:
    """One task: the tile's context (written as layer ``layer`` of ``terms``), its
    context-weighted fractions and its largest context value."""
    labels = store.read_window(path, "cluster", ys, xs, so)
    iy, ix = _inner(t, ys, xs)
    values = terms.context(labels, pilot, sigma_px)[iy, ix]
    store.write_layer(path, store.TERMS, layer, t, values, so)
    top = float(values.max()) if values.size else 0.0
    return terms.weighted_fractions(labels[iy, ix], values[None], k, cell_px), top


def context_fractions(
    client: Client,
    path: str,
    so: dict,
    grid: Grid,
    pilot: np.ndarray,
    sigma_px: float,
    k: int,
    layer: int,
    batch: int = 16,
) -> tuple[np.ndarray, float]:
    """Raw context-weighted cluster fractions of the whole region ``(y_cell, x_cell, k)``
    and the largest context value (each tile read with the halo its context needs); each
    tile's context is stored as layer ``layer`` of ``terms`` for the predict pass."""
    halo = terms.context_halo(sigma_px)
    pilot = np.asarray(pilot, np.float64)

    def task(t: Tile):
        ys, xs = grid.expand(t, halo)
        return dask.delayed(_tile_context_fractions, pure=True)(
            path, so, t, ys, xs, pilot, sigma_px, k, grid.cell_px, layer
        )

    out = np.zeros((*grid.cell_shape, k), np.float32)
    top = 0.0
    for t, (arr, tmax) in _gather_tiles(client, grid.tiles(), task, batch):
        out[t.ys_cell, t.xs_cell] = arr
        top = max(top, tmax)
    return out, top


def _region_cells(
    client: Client,
    cfg: Config,
    grid: Grid,
    model: PixelModel,
    cells: dict[str, TileCells],
    layer: int | None,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """The region's fractions ``(y_cell, x_cell, k)`` (float64) and, with ``intensity``,
    raw intensity-weighted fractions and the largest intensity: from the label pass's
    results, and from the store for tiles labelled by an earlier run. Consumes ``cells``."""
    path, so = cfg.output.store, dict(cfg.output.storage_options)
    k = model.n_clusters
    kinds = list(model.kinds)
    fractions = np.zeros((*grid.cell_shape, k), np.float64)
    wint = None if layer is None else np.zeros((*grid.cell_shape, k), np.float32)
    top = 0.0

    def put(t: Tile, value: TileCells) -> None:
        nonlocal top
        fr, wi, tmax = value
        fractions[t.ys_cell, t.xs_cell] = fr
        if wint is not None:
            wint[t.ys_cell, t.xs_cell] = wi
            top = max(top, tmax)

    missing = []
    for t in grid.tiles():
        if t.id in cells:
            put(t, cells.pop(t.id))
        else:
            missing.append(t)

    def task(t: Tile):
        return dask.delayed(_stored_cells, pure=True)(path, so, t, kinds, k, layer, grid.cell_px)

    for t, value in _gather_tiles(client, missing, task, cfg.cluster.batch_tiles):
        put(t, value)
    return fractions, wint, top


def density_fit(
    client: Client,
    cfg: Config,
    grid: Grid,
    model: PixelModel,
    cells: dict[str, TileCells] | None = None,
    *,
    save: bool = True,
) -> dict[str, Any]:
    """Cluster fractions per cell (``cells`` from the label pass, the store for the rest),
    then the bounded fit.

    With covariate terms (``regression.terms``), a pilot fit on the fractions alone comes
    first (the context term paints its densities); the final fit is on the fractions and the
    covariate-weighted fractions together (:mod:`popdask.terms`).

    The fit is saved in the store's ``regression`` group (:func:`save_fit`), unless ``save``
    is False: :func:`run` saves it while the predict pass runs, which reads none of it.
    """
    path, so = cfg.output.store, dict(cfg.output.storage_options)
    k = model.n_clusters
    names = active_terms(cfg, model.kinds)
    if names:
        store.ensure_terms(path, names, so)  # kept as it is when the label pass made it
    fractions, wint, int_top = _region_cells(
        client, cfg, grid, model, dict(cells or {}), _layer(names, "intensity")
    )
    F = fractions.reshape(-1, k)
    census = store.read_census(path, so).reshape(-1).astype(np.float64)
    valid = F.sum(axis=1)
    usable = np.isfinite(census) & (census >= 0) & (valid >= cfg.regression.min_valid)
    pop = np.where(usable, census, np.nan)
    groups = cv_groups(grid).reshape(-1)
    sigma_px = terms.context_sigma_px(cfg.regression.context_radius, grid.resolution)
    n_groups = len(np.unique(groups[usable]))
    n_splits = min(5, n_groups)
    t0 = time.perf_counter()
    cv_s = 0.0

    def cross_validate(x):
        nonlocal cv_s
        t = time.perf_counter()
        res = regression.cross_validate(x, pop, groups, n_splits=n_splits).scores
        cv_s += time.perf_counter() - t
        return res

    pilot, scale, X = regression.fit_densities(F, pop, groups), None, F
    cv = cross_validate(F) if n_groups >= 2 else None
    cv_plain = cv
    if names and cv is None:
        log.info("regression: one spatial group only, the terms cannot be checked; fitting none")
        names = []
    if names:
        columns, tops = [], []
        for name in names:  # each term's raw weighted fractions and its largest value
            if name == "intensity":
                columns.append(wint)
                tops.append(int_top)
            else:
                wctx, ctx_top = context_fractions(
                    client,
                    path,
                    so,
                    grid,
                    pilot,
                    sigma_px,
                    k,
                    names.index("context"),  # the order of the stored layers
                    batch=cfg.cluster.batch_tiles,
                )
                columns.append(wctx)
                tops.append(ctx_top)
        scale = np.array([t if t > 0 else 1.0 for t in tops])
        W = [c.reshape(-1, k) / np.float32(s) for c, s in zip(columns, scale, strict=True)]
        X_terms = np.hstack([F, *(w.astype(np.float64) for w in W)])
        del columns, W
        cv_terms = cross_validate(X_terms)
        # kept only where the protocol shows a gain: out-of-fold MAE at 1 km not worse
        if cv_terms["mae"] <= cv["mae"]:
            X, cv = X_terms, cv_terms
        else:
            log.info(
                "regression: terms %s dropped (cross-validated MAE %.0f, without %.0f)",
                names,
                cv_terms["mae"],
                cv["mae"],
            )
            names, scale = [], None
    densities = pilot if X is F else regression.fit_densities(X, pop, groups)
    fit_s = time.perf_counter() - t0 - cv_s
    counts = regression.predict_cells(X, densities)  # the model count of every cell
    insample = regression.scores(pop, counts)
    arrays = {"densities": densities, "design": X.astype(np.float32)}
    if "context" in names:
        arrays["pilot"] = pilot
    if scale is not None:
        arrays["term_scale"] = scale
    attrs = {
        "fit_seconds": fit_s,
        "cv_seconds": cv_s,
        "n_clusters": k,
        "terms": names,
        "context_sigma_px": sigma_px,
        "cv_without_terms": cv_plain,
    }
    log.info(
        "regression: %d cells, terms %s, in-sample R² %.3f%s",
        int(usable.sum()),
        names or "none",
        insample["r2"],
        f", cross-validated R² {cv['r2']:.3f} MAE {cv['mae']:.0f}" if cv else "",
    )
    fit = {
        "densities": densities,
        "counts": counts,
        "pilot": pilot if "context" in names else None,
        "terms": names,
        "term_scale": scale,
        "context_sigma_px": sigma_px,
        "in_sample": insample,
        "cross_validated": cv,
        "cross_validated_without_terms": cv_plain,
        "cells_used": int(usable.sum()),
        "seconds": {"fit": fit_s, "cv": cv_s},
        "group": {"arrays": arrays, "attrs": attrs},  # what `save_fit` writes
    }
    if save:
        save_fit(path, fit, so)
    return fit


def save_fit(path: str, fit: dict[str, Any], storage_options=None) -> None:
    """Write what :func:`density_fit` returned into the store's ``regression`` group."""
    store.save_arrays(path, "regression", **fit["group"], storage_options=storage_options)


def _predict_tile(
    path: str,
    so: dict,
    t: Tile,
    ys: slice,
    xs: slice,
    census,
    counts,
    densities,
    *,
    layers: Sequence[int],
    scale,
    cell_px: int,
    resolution: float,
    sigma: float,
) -> None:
    """One task: read the tile's labels and term layers with the smoothing's halo, predict,
    write the tile."""
    labels = store.read_window(path, "cluster", ys, xs, so)
    values = None
    if layers:
        values = store.read_window(path, store.TERMS, ys, xs, so, index=list(layers))
        values /= np.asarray(scale, np.float32)[:, None, None]
    res = predict_window(
        labels,
        census,
        densities,
        cell_px=cell_px,
        resolution=resolution,
        sigma=sigma,
        inner=_inner(t, ys, xs),
        terms=values,
        offset=(ys.start % cell_px, xs.start % cell_px),
        counts=counts,
    )
    store.write_arrays(path, t, res, so)


def predict_pass(
    client: Client,
    cfg: Config,
    grid: Grid,
    fit: dict[str, Any],
    *,
    progress: bool,
    settle: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Population, density and cell estimates of every tile not complete yet.

    Each tile reads its labels and term layers with a halo of the smoothing's kernel radius;
    the cells that halo cuts are rescaled with the fit's model counts. ``settle`` is called
    when the tiles are done, before the pass records its failures in the store's attributes.
    """
    path, so = cfg.output.store, dict(cfg.output.storage_options)
    census = store.read_census(path, so) if cfg.regression.rescale else None
    sigma = cfg.regression.smooth_sigma
    names = list(fit.get("terms") or [])
    stored = (store.term_names(path, so) or []) if names else []
    layers = [stored.index(n) for n in names]
    halo = halo_px(sigma)
    cpx = grid.cell_px
    # small arrays ride in each tile's graph (as tasks of their own they would pull every
    # tile's task to the worker that holds them)
    dens = np.asarray(fit["densities"])
    counts = np.asarray(fit["counts"], np.float64).reshape(grid.cell_shape)

    def build(t: Tile):
        ys, xs = grid.expand(t, halo)
        cells = (window_cells(ys.start, ys.stop, cpx), window_cells(xs.start, xs.stop, cpx))
        return dask.delayed(_predict_tile, pure=True)(
            path,
            so,
            t,
            ys,
            xs,
            None if census is None else census[cells],
            counts[cells],
            dens,
            layers=layers,
            scale=fit.get("term_scale"),
            cell_px=cpx,
            resolution=grid.resolution,
            sigma=sigma,
        )

    return _tile_pass(
        client,
        cfg,
        grid,
        build,
        done_code=store.COMPLETE,
        desc="predict",
        progress=progress,
        settle=settle,
    )


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------
def run_metrics(
    path: str,
    grid: Grid,
    fit: dict[str, Any],
    storage_options=None,
    truth: np.ndarray | None = None,
) -> dict[str, Any]:
    """1 km fit quality, totals, and (when the truth is known) fine-scale scores."""
    ds = store.open_store(path, storage_options)
    census = ds.census.values.astype(np.float64)
    known = np.isfinite(census)
    pop = ds.population.values.astype(np.float64)
    cells = pop.reshape(grid.cell_shape[0], grid.cell_px, grid.cell_shape[1], grid.cell_px)
    cell_total = cells.sum(axis=(1, 3))
    out: dict[str, Any] = {
        "r2_1km_in_sample": fit["in_sample"]["r2"],
        "mae_1km_in_sample": fit["in_sample"]["mae"],
        "cells_used": fit["cells_used"],
        "census_total_known": float(census[known].sum()),
        "population_total": float(np.nansum(pop)),
        "population_total_known_cells": float(cell_total[known].sum()),
    }
    if fit["cross_validated"]:
        out["r2_1km_cv"] = fit["cross_validated"]["r2"]
        out["mae_1km_cv"] = fit["cross_validated"]["mae"]
    out["terms"] = list(fit.get("terms") or [])
    plain = fit.get("cross_validated_without_terms")
    if plain and out["terms"]:
        out["r2_1km_cv_without_terms"] = plain["r2"]
        out["mae_1km_cv_without_terms"] = plain["mae"]
    if out["census_total_known"] > 0:
        out["total_error_known_cells"] = (
            out["population_total_known_cells"] / out["census_total_known"] - 1.0
        )
    if truth is not None:
        out.update(truth_metrics(pop, truth))
    return out


def truth_metrics(pop: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """R² and MAE against a known true population at 20 m and 100 m, and the total error."""
    out = {}
    for px, name in ((1, "20m"), (5, "100m")):
        ny, nx = (pop.shape[0] // px) * px, (pop.shape[1] // px) * px
        a = pop[:ny, :nx].reshape(ny // px, px, nx // px, px).sum(axis=(1, 3)).ravel()
        b = truth[:ny, :nx].reshape(ny // px, px, nx // px, px).sum(axis=(1, 3)).ravel()
        s = regression.scores(b, a)
        out[f"r2_{name}_truth"] = s["r2"]
        out[f"mae_{name}_truth"] = s["mae"]
    out["total_error_truth"] = float(np.nansum(pop) / np.sum(truth) - 1.0)
    return out


# --------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------
def run(
    cfg: Config,
    *,
    client: Client | None = None,
    progress: bool = True,
    truth: np.ndarray | None = None,
    report_dir: str | Path | None = None,
) -> RunResult:
    """Run every pass of ``cfg`` (resuming a store left by an earlier run).

    Parameters
    ----------
    cfg
        The run configuration.
    client
        A connected dask client; by default one is made from ``cfg.cluster``.
    progress
        Show progress bars.
    truth
        ``(y, x)`` true persons per pixel, when known (the demo): adds fine-scale scores.
    report_dir
        Where to write ``metrics.json`` and ``quicklook.png`` (default: beside a local
        store, else the working directory).

    Returns
    -------
    RunResult
    """
    if client is None:
        from popdask.cluster import get_client

        with get_client(cfg.cluster) as c:
            return run(cfg, client=c, progress=progress, truth=truth, report_dir=report_dir)

    timings: dict[str, float] = {}
    computed: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    grid = cfg.make_grid()
    path, so = cfg.output.store, cfg.output.storage_options
    log.info("grid: %s, %d×%d px, %d tiles", grid.bounds, *grid.shape, len(grid.tiles()))
    census = census_from_config(cfg.census, grid)
    sources = search_sources(cfg, region_lonlat(grid))
    bands = [b for s in sources for b in s.bands]
    kinds = [s.role for s in sources for _ in s.bands]
    created = store.create(
        path,
        grid,
        bands=bands,
        kinds=kinds,
        census=census,
        attrs={"config": cfg.to_dict(), "popdask_version": __version__},
        storage_options=so,
        terms=active_terms(cfg, kinds),
    )
    log.info("store: %s %s", "created" if created else "resuming", path)
    store.update_attrs(
        path,
        {
            "stac_items": {s.name: [it.id for it in s.items] for s in sources},
            "stac_skipped": {s.name: s.skipped for s in sources},
        },
        so,
    )
    timings["search"] = time.perf_counter() - t0

    t = time.perf_counter()
    computed["composite"] = list(composite_pass(client, cfg, grid, sources, progress=progress))
    timings["composite"] = time.perf_counter() - t

    t = time.perf_counter()
    model = fit_pass(client, cfg, grid)
    timings["fit"] = time.perf_counter() - t

    t = time.perf_counter()
    cells = label_pass(client, cfg, grid, model, progress=progress)
    computed["label"] = list(cells)
    timings["label"] = time.perf_counter() - t
    t = time.perf_counter()
    fit = density_fit(client, cfg, grid, model, cells, save=False)
    timings["cv"] = fit["seconds"]["cv"]  # the reported cross-validation, not the fit
    timings["regression"] = time.perf_counter() - t - timings["cv"]
    t = time.perf_counter()
    # the fit is written from here while the workers predict (the predict pass takes the
    # densities in its graphs and reads nothing of it); the pass waits for the write before
    # it touches the store's attributes, and a failed pass still leaves the fit saved
    with ThreadPoolExecutor(1, thread_name_prefix="popdask-save-fit") as pool:
        saved = pool.submit(save_fit, path, fit, so)
        predicted = predict_pass(client, cfg, grid, fit, progress=progress, settle=saved.result)
    computed["predict"] = list(predicted)
    timings["predict"] = time.perf_counter() - t
    timings["label_predict"] = timings["label"] + timings["regression"] + timings["predict"]

    metrics = run_metrics(path, grid, fit, so, truth=truth)
    metrics["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    store.update_attrs(
        path, {"metrics": metrics, "model": model.summary(), "densities": fit["densities"]}, so
    )
    _reports(path, so, metrics, report_dir, cfg)
    if cfg.output.version is not None:
        store.write_latest(cfg.output.path, cfg.output.version, so)
    log.info("done: %s", {k: v for k, v in metrics.items() if k != "timings_s"})
    return RunResult(path, metrics, timings, computed)


def _reports(path: str, so, metrics: dict, report_dir, cfg: Config) -> None:
    import json

    from popdask.plot import quicklook

    if report_dir is None:
        report_dir = Path(path).parent if "://" not in path else Path.cwd()
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    rgb = [b for b in ("B04", "B03", "B02") if b in cfg.sources.sentinel2.bands]
    if len(rgb) < 3:
        rgb = cfg.sources.sentinel2.bands[:3][::-1]
    try:
        quicklook(store.open_store(path, so), report_dir / "quicklook.png", rgb=tuple(rgb))
    except ValueError as e:  # e.g. fewer than three optical bands
        log.warning("no quicklook: %s", e)
