"""The passes of a run, wired together tile by tile (DESIGN.md "Passes over the region").

1. **composite** — per tile: STAC items → stackstac → masked medians → ``composite``.
2. **fit** — a pixel sample from the stored composites of all tiles → :class:`PixelModel`.
3. **label** — per tile: ``cluster`` (and the ``intensity`` layer of ``terms``); the task
   returns its sampled cells' cluster fractions and intensity-weighted fractions. Then a
   pilot fit, the ``context`` layer and its weighted fractions (:mod:`popdask.terms`, per
   tile with the context's halo), and the bounded fit of densities on the sampled cells
   (saved with its design rows in the store's ``regression`` group); then **predict** — per
   tile with whole cells around it: ``population``, ``density``, ``predicted``.

Every pass reads: tiles → one task per tile (:mod:`popdask.tasks`) kept in flight by
:func:`popdask.scheduler.map_tiles` → a reduction of the tasks' small results
(:mod:`popdask.reductions`). Each task marks its tile in ``tile_status`` once its writes
have finished; tiles already done are skipped, so a rerun resumes where a killed run
stopped. Nothing the client holds grows with the region beyond per-tile summaries.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client

from popdask import __version__, catalog, regression, store, tasks, terms, uncertainty
from popdask.census_blocks import stage_from_config
from popdask.composite import REFLECTANCE
from popdask.config import Config
from popdask.grid import Grid, Tile
from popdask.mask import Mask
from popdask.model import PixelModel, fit_model
from popdask.predict import halo_px
from popdask.reductions import (
    CellRows,
    Totals,
    block_groups_of,
    concat_rows,
    sample_share,
    sum_totals,
)
from popdask.scheduler import WindowStats, map_tiles
from popdask.sources import ROLES, SourceError, region_lonlat

log = logging.getLogger(__name__)

CV_BLOCK = 5000  # metres: spatial block used as the group in cross-validation
#: Failed tiles named in the store's ``failed_{pass}`` attribute at the most (all are
#: marked in ``tile_status``; the attribute keeps the first errors and the count).
FAILED_LISTED = 1000


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
# Tiles on the cluster
# --------------------------------------------------------------------------------------
def _error_text(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()


def _run_tiles(
    client: Client,
    tiles: Sequence[Tile],
    build: Callable[[Tile], Any],
    *,
    path: str,
    storage_options: dict,
    desc: str,
    progress: bool,
    per_thread: float,
    reduce: Callable[[Tile, Any], None] | None = None,
    settle: Callable[[], Any] | None = None,
    stats: WindowStats | None = None,
    failed_code: int = store.FAILED,
    per_task: int | None = 1,
) -> list[str]:
    """Run ``build(tile)``'s task (a write that marks its tile) for every tile.

    Tiles are kept in flight by :func:`popdask.scheduler.map_tiles`; each result goes to
    ``reduce(tile, value)`` as it arrives. A tile that fails is marked ``failed_code``
    (the pass's: its earlier passes stay done, :func:`popdask.store.failed_code`). Returns
    the ids of the tiles computed. Raises :class:`PipelineError` if any failed. ``settle``
    is called once the tiles are done, before the store's attributes are touched (a write
    of the caller's still running, say).
    """
    failed: dict[str, str] = {}
    n_failed = 0
    done: list[str] = []
    failed_status = failed_code
    stats = WindowStats() if stats is None else stats
    results = map_tiles(
        client,
        tiles,
        build,
        desc=desc,
        progress=progress,
        per_thread=per_thread,
        stats=stats,
        per_task=per_task,
    )
    for r in results:
        if r.ok:
            done.append(r.tile.id)
            if reduce is not None:
                reduce(r.tile, r.value)
            continue
        n_failed += 1
        if len(failed) < FAILED_LISTED:
            failed[r.tile.id] = f"{type(r.error).__name__}: {r.error}"
        log.error("%s: tile %s failed: %s", desc, r.tile.id, _error_text(r.error))
        log.debug("%s: tile %s", desc, r.tile.id, exc_info=r.error)  # with its traceback
        store.set_status(path, [r.tile], failed_status, storage_options)
    log.info(
        "%s: %d tiles, at most %d in flight for %d worker threads",
        desc,
        stats.finished + n_failed,
        stats.peak_in_flight,
        stats.threads,
    )
    if settle is not None:
        settle()
    key = f"failed_{desc}"  # what failed; {} again once a rerun has recovered every tile
    if failed or store.root_attrs(path, storage_options).get(key):
        store.update_attrs(path, {key: failed}, storage_options)
    if failed:
        raise PipelineError(
            f"{n_failed} tile(s) failed in the {desc} pass ({sorted(failed)[:5]}...); "
            f"they are recorded in the store; rerun the same command to retry them. "
            f"First error: {next(iter(failed.values()))}"
        )
    return done


def _tile_pass(
    client: Client,
    cfg: Config,
    grid: Grid,
    build: Callable[[Tile], tuple[Callable, tuple, dict]],
    *,
    done_code: int,
    desc: str,
    progress: bool,
    reduce: Callable[[Tile, Any], None] | None = None,
    settle: Callable[[], Any] | None = None,
    per_task: int | None = None,
) -> list[str]:
    """Run every tile whose status is below ``done_code`` (the resume); the ids of the
    tiles computed (``reduce``, ``settle``, ``per_task``: see :func:`_run_tiles` and
    :func:`popdask.scheduler.map_tiles`; short passes group tiles per task by default).

    ``build(tile)`` gives the tile's task as ``(fn, args, kwargs)``, run on a worker as
    ``fn(path, storage_options, tile, *args, **kwargs)`` and followed there by the tile's
    status write (:func:`popdask.tasks.marked`).
    """
    path, so = cfg.output.store, cfg.output.storage_options
    status = store.progress(store.tile_status(path, so))
    todo = [t for t in grid.tiles() if status[t.row, t.col] < done_code]
    log.info("%s: %d of %d tiles to do", desc, len(todo), status.size)

    def marked(t: Tile):  # the task marks its own tile once its writes have finished
        fn, args, kwargs = build(t)
        return tasks.marked, (done_code, fn, path, so, t, *args), kwargs

    return _run_tiles(
        client,
        todo,
        marked,
        path=path,
        storage_options=so,
        desc=desc,
        progress=progress,
        per_thread=cfg.cluster.tiles_per_thread,
        reduce=reduce,
        settle=settle,
        failed_code=store.failed_code(done_code),
        per_task=per_task,
    )


def _gather(
    client: Client, cfg: Config, tiles: Iterable[Tile], task: Callable[[Tile], Any]
) -> Iterable[tuple[Tile, Any]]:
    """``(tile, result)`` of ``task(tile)`` (a task that writes no status) for
    every tile, as the tasks finish; the first failure is raised."""
    tiles = list(tiles)
    per = cfg.cluster.tiles_per_thread
    for r in map_tiles(client, tiles, task, per_thread=per, per_task=None):
        if not r.ok:
            raise PipelineError(f"tile {r.tile.id}: {_error_text(r.error)}") from r.error
        yield r.tile, r.value


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


def composite_pass(
    client: Client,
    cfg: Config,
    grid: Grid,
    sources: Sequence[catalog.Source],
    *,
    progress: bool,
) -> list[str]:
    """Composite every tile from its own items; each task also draws the tile's share of
    the fit's sample. Tiles with no usable Sentinel-2 scene are named in a warning."""
    path, so = cfg.output.store, dict(cfg.output.storage_options)
    tiles = grid.tiles()
    index = {t.id: i for i, t in enumerate(tiles)}
    shares = _sample_shares(cfg, grid)
    n_bands = sum(len(s.config.bands) for s in sources)
    sample_attrs = {"sample_pixels": cfg.model.sample_pixels, "seed": cfg.model.seed}
    store.create_sample(path, len(tiles), max(shares.values()), n_bands, sample_attrs, so)
    kw = {"resolution": grid.resolution, "sign": cfg.stac.sign, "read": cfg.read}
    counts = _CatalogCounts()

    def build(t: Tile):
        i = index[t.id]
        seed = _sample_seed(cfg, i)
        return tasks.composite_tile, (sources,), {"index": i, "n": shares[t.id], "seed": seed, **kw}

    done = _tile_pass(
        client,
        cfg,
        grid,
        build,
        done_code=store.COMPOSITED,
        desc="composite",
        progress=progress,
        reduce=counts.add,
        # a tile a task on a region of a few windows; on a continent several, so that one
        # client keeps hundreds of threads fed (a task is ~1 s, a submission ~5 ms)
        per_task=None,
    )
    counts.report()
    _require_scenes(cfg, counts)
    return done


class _CatalogCounts:
    """What the composite tasks found, summed over tiles (tiles without a usable
    Sentinel-2 scene each get a warning; ``tile_scenes`` in the store has them all)."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, int]] = {}
        self.no_scene = 0
        self.corrected = 0
        self.corrected_tiles = 0
        self.implausible = 0

    def add(self, tile: Tile, summary: dict[str, Any]) -> None:
        for name, c in summary["sources"].items():
            mine = self.items.setdefault(
                name, {"found": 0, "kept": 0, "tiles_without": 0, "missing_assets": 0}
            )
            mine["found"] += c["found"]
            mine["kept"] += c["kept"]
            mine["tiles_without"] += c["kept"] == 0
            mine["missing_assets"] += c.get("skipped", {}).get("missing_asset", 0)
        fixed = sum(len(o["corrected"]) for o in summary.get("offset_check", {}).values())
        self.corrected += fixed
        self.corrected_tiles += fixed > 0
        self.implausible += sum(
            len(o["implausible"]) for o in summary.get("offset_check", {}).values()
        )
        if summary["no_usable_scene"]:
            self.no_scene += 1
            log.warning(
                "composite: tile %s has no usable Sentinel-2 scene; its people will be the "
                "census spread evenly over its cells",
                tile.id,
            )

    def report(self) -> None:
        if self.no_scene:
            log.warning("composite: %d tiles without a usable Sentinel-2 scene", self.no_scene)
        if self.corrected:
            log.warning(
                "composite: %d items' radiometric offsets corrected from their pixels in %d "
                "tiles (popdask status lists them)",
                self.corrected,
                self.corrected_tiles,
            )
        if self.implausible:
            log.warning("composite: %d items' pixels fit neither offset", self.implausible)
        for name, c in self.items.items():
            log.info(
                "composite: %s: %d items used of %d found (%d skipped for a missing asset "
                "key); %d tiles without any",
                name,
                c["kept"],
                c["found"],
                c["missing_assets"],
                c["tiles_without"],
            )


def _require_scenes(cfg: Config, counts: _CatalogCounts) -> None:
    """Fail the run in one line when no tile of the region has a usable Sentinel-2 scene:
    there is nothing to fit a model on."""
    scenes = store.tile_scenes(cfg.output.store, cfg.output.storage_options)
    if (scenes > 0).any():
        return
    s2 = cfg.sources.sentinel2
    c = counts.items.get("sentinel2", {})
    why = (
        f"{c.get('found', 0)} items found, {c.get('missing_assets', 0)} of them without a "
        f"configured asset key ({[*s2.assets, s2.mask_asset]})"
        if c
        else "no tile was composited in this run"
    )
    raise PipelineError(
        f"sources.sentinel2: no tile of the region has a usable scene of {s2.collection!r} "
        f"({why}); check sources.sentinel2 (collection, assets, mask_asset, months, "
        "max_cloud_cover, datetime) against the catalog"
    )


# --------------------------------------------------------------------------------------
# Pass 2: fit the pixel model
# --------------------------------------------------------------------------------------
def fit_pass(client: Client, cfg: Config, grid: Grid) -> PixelModel:
    """The pixel model saved in the store, or one fitted on the composites' pixel sample."""
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
        index = {t.id: i for i, t in enumerate(tiles)}
        shares = _sample_shares(cfg, grid)
        required = [k == REFLECTANCE for k in store.band_kinds(path, so)]

        def task(t: Tile):
            i = index[t.id]
            return (
                tasks.stored_sample,
                (path, so, t, shares[t.id], _sample_seed(cfg, i), required),
                {},
            )

        # bounded: sample_pixels in all
        parts = {t.id: v for t, v in _gather(client, cfg, tiles, task)}
        samples = np.concatenate([parts[t.id] for t in tiles], axis=0)
    bands = [str(b) for b in store.open_array(path, "band", so, mode="r")[...]]
    kinds = store.band_kinds(path, so)
    model = fit_model(
        samples,
        bands,
        kinds,
        components=m.components,
        clusters=m.clusters,
        seed=m.seed,
        whiten=m.whiten,
        kmeans=m.kmeans,
        features=m.features,
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


def _layer(names: Sequence[str], name: str) -> int | None:
    return names.index(name) if name in names else None


def cell_pick(cfg: Config, grid: Grid) -> tasks.CellPick:
    """Which cells the densities fit sees: at most about ``regression.fit_cells`` of the
    cells with a known census, the same in every task (:mod:`popdask.reductions`)."""
    path, so = cfg.output.store, cfg.output.storage_options
    known = store.root_attrs(path, so).get("census_known_cells")
    if known is None:  # written by run() before any pass: this is not a popdask run's store
        raise PipelineError(
            f"{path} does not record its census' known cells (census_known_cells); "
            "it was not made by popdask.pipeline.run: run it with the same configuration"
        )
    share = sample_share(cfg.regression.fit_cells, int(known))
    return tasks.CellPick(share, cfg.model.seed, grid.cell_shape[1])


def label_pass(
    client: Client, cfg: Config, grid: Grid, model: PixelModel, *, progress: bool
) -> dict[str, CellRows]:
    """Label every tile not labelled yet; ``{tile id: its picked cells' rows}`` of those."""
    path, so = cfg.output.store, dict(cfg.output.storage_options)
    names = active_terms(cfg, model.kinds)
    if names:
        store.ensure_terms(path, names, so)
    layer = _layer(names, "intensity")
    pick = cell_pick(cfg, grid)
    rows: dict[str, CellRows] = {}

    def build(t: Tile):
        # the model rides in each small graph: as a task of its own, it would pull every
        # tile's task to the worker that holds it
        return tasks.label_tile, (model, layer, grid.cell_px, pick), {}

    def keep(t: Tile, value: CellRows) -> None:
        rows[t.id] = value

    _tile_pass(
        client,
        cfg,
        grid,
        build,
        done_code=store.LABELLED,
        desc="label",
        progress=progress,
        reduce=keep,
    )
    return rows


def context_rows(
    client: Client,
    cfg: Config,
    grid: Grid,
    pilots: np.ndarray,
    sigma_px: float,
    k: int,
    layer: int,
    pick: tasks.CellPick,
) -> CellRows:
    """The picked cells' raw context-weighted fractions and the largest context value of
    each of the ``pilots`` densities (``(n, k)``; each tile read once, with the halo its
    context needs): see :func:`popdask.tasks.context_tile`. Each tile's context of the first
    pilot is stored as layer ``layer`` of ``terms`` for the predict pass."""
    path, so = cfg.output.store, dict(cfg.output.storage_options)
    halo = terms.context_halo(sigma_px)
    pilots = np.atleast_2d(np.asarray(pilots, np.float64))

    def task(t: Tile):
        ys, xs = grid.expand(t, halo)
        return (
            tasks.context_tile,
            (path, so, t, ys, xs, pilots, sigma_px, k, grid.cell_px, layer, pick),
            {},
        )

    return concat_rows(v for _, v in _gather(client, cfg, grid.tiles(), task))


def _region_rows(
    client: Client,
    cfg: Config,
    grid: Grid,
    model: PixelModel,
    cells: dict[str, CellRows],
    layer: int | None,
    pick: tasks.CellPick,
) -> CellRows:
    """The picked cells of the region: from the label pass's results, and from the store
    for tiles labelled by an earlier run. Consumes ``cells``."""
    path, so = cfg.output.store, dict(cfg.output.storage_options)
    k, kinds = model.n_clusters, list(model.kinds)
    missing = [t for t in grid.tiles() if t.id not in cells]
    parts = list(cells.values())
    cells.clear()

    def task(t: Tile):
        return tasks.stored_cells, (path, so, t, kinds, k, layer, grid.cell_px, pick), {}

    parts += [v for _, v in _gather(client, cfg, missing, task)]
    return concat_rows(parts)


def density_fit(
    client: Client,
    cfg: Config,
    grid: Grid,
    model: PixelModel,
    cells: dict[str, CellRows] | None = None,
    *,
    save: bool = True,
) -> dict[str, Any]:
    """The bounded fit of densities on the picked cells (``cells`` from the label pass,
    the store for the rest).

    With covariate terms (``regression.terms``), a pilot fit on the fractions alone comes
    first (the context term paints its densities); the final fit is on the fractions and the
    covariate-weighted fractions together (:mod:`popdask.terms`).

    The fit is saved in the store's ``regression`` group (:func:`save_fit`), unless ``save``
    is False: :func:`run` saves it while the predict pass runs, which reads none of it.
    """
    k = model.n_clusters
    names = active_terms(cfg, model.kinds)
    if names:
        store.ensure_terms(cfg.output.store, names, cfg.output.storage_options)
    pick = cell_pick(cfg, grid)
    rows = _region_rows(
        client, cfg, grid, model, dict(cells or {}), _layer(names, "intensity"), pick
    )
    F = rows.columns["fractions"].astype(np.float64)
    usable = F.sum(axis=1) >= cfg.regression.min_valid
    pop = np.where(usable, rows.census, np.nan)
    groups = block_groups_of(rows.index, grid.cell_shape[1], int(CV_BLOCK // grid.cell))
    sigma_px = terms.context_sigma_px(cfg.regression.context_radius, grid.resolution)
    n_groups = len(np.unique(groups[usable]))
    n_splits = min(5, n_groups)
    t0 = time.perf_counter()
    cv_s = 0.0

    def cross_validate(x) -> regression.CVResult:
        nonlocal cv_s
        t = time.perf_counter()
        res = regression.cross_validate(x, pop, groups, n_splits=n_splits, loss=loss)
        cv_s += time.perf_counter() - t
        return res

    def design(context: str = "context") -> tuple[np.ndarray, np.ndarray]:
        """The fractions and each term's weighted fractions, scaled by its largest value
        (``context`` names the context column: the final pilot's, or a fold's)."""
        keys = [context if n == "context" else n for n in names]
        scale = np.array([t if t > 0 else 1.0 for t in (rows.tops.get(k, 0.0) for k in keys)])
        W = [rows.columns[k] / np.float32(s) for k, s in zip(keys, scale, strict=True)]
        return np.hstack([F, *(w.astype(np.float64) for w in W)]), scale

    loss = cfg.regression.loss
    pilot = regression.fit_densities(F, pop, groups, loss=loss)
    scale, X, with_terms = None, F, None
    plain = cross_validate(F) if n_groups >= 2 else None
    cv = cv_plain = None if plain is None else plain.scores
    if names and cv is None:
        log.info("regression: one spatial group only, the terms cannot be checked; fitting none")
        names = []
    if names:
        folds = design
        if "context" in names:
            # the final pilot's context, and each fold's from the pilot fitted without it,
            # so that the cross-validation below never sees its held-out cells
            pilots = np.vstack([pilot, plain.densities])
            layer = names.index("context")  # the order of the stored layers
            ctx = context_rows(client, cfg, grid, pilots, sigma_px, k, layer, pick)
            if not np.array_equal(ctx.index, rows.index):
                raise PipelineError("the context pass picked other cells than the label pass")
            rows.columns.update(ctx.columns)
            rows.tops.update(ctx.tops)

            def folds(f: int) -> np.ndarray:
                return design(f"context_{f + 1}")[0]

        X_terms, scale = design()
        with_terms = cross_validate(folds if "context" in names else X_terms)
        cv_terms = with_terms.scores
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
    densities = pilot if X is F else regression.fit_densities(X, pop, groups, loss=loss)
    fit_s = time.perf_counter() - t0 - cv_s
    insample = regression.scores(pop, regression.predict_cells(X, densities))
    arrays = {
        "densities": densities,
        "design": X.astype(np.float32),
        "cells": rows.index,  # the design's rows: flat (y_cell, x_cell) positions
    }
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
        "cell_share": pick.share,
    }
    log.info(
        "regression: %d cells (a share %.3g of the known ones), terms %s, in-sample R² %.3f%s",
        int(usable.sum()),
        pick.share,
        names or "none",
        insample["r2"],
        f", cross-validated R² {cv['r2']:.3f} MAE {cv['mae']:.0f}" if cv else "",
    )
    fit = {
        "densities": densities,
        "pilot": pilot if "context" in names else None,
        "terms": names,
        "term_scale": scale,
        "context_sigma_px": sigma_px,
        "in_sample": insample,
        "cross_validated": cv,
        "cross_validated_without_terms": cv_plain,
        "cells_used": int(usable.sum()),
        "cell_share": pick.share,
        # the rows' cross-validation folds and out-of-fold counts, without and with terms
        "out_of_fold": {
            "fold": None if plain is None else plain.fold,
            "plain": None if plain is None else plain.predicted,
            "terms": None if with_terms is None else with_terms.predicted,
        },
        "seconds": {"fit": fit_s, "cv": cv_s},
        "group": {"arrays": arrays, "attrs": attrs},  # what `save_fit` writes
    }
    if cfg.regression.bootstrap and plain is None:
        log.warning(
            "intervals: the cells form one spatial group only, so the model's out-of-fold "
            "error is unknown: no intervals (population_lower/upper stay NaN)"
        )
    elif cfg.regression.bootstrap:
        oof = (plain if with_terms is None or X is F else with_terms).predicted
        fit.update(_intervals(cfg, X, pop, groups, oof))
        arrays["bootstrap"] = fit["bootstrap"]
        attrs["log_error_bounds"] = list(fit["log_error_bounds"])
    if save:
        save_fit(cfg.output.store, fit, cfg.output.storage_options)
    return fit


def _intervals(cfg: Config, X, pop, groups, oof) -> dict[str, Any]:
    """The bootstrap's densities and the 1 km error bounds of the intervals
    (:mod:`popdask.uncertainty`)."""
    t = time.perf_counter()

    def fit(x, y, g):  # the run's own fit
        return regression.fit_densities(x, y, g, loss=cfg.regression.loss)

    boot = uncertainty.bootstrap_densities(
        X, pop, groups, fit, n=cfg.regression.bootstrap, seed=cfg.model.seed
    )
    bounds = uncertainty.log_error_bounds(pop, oof)
    log.info(
        "intervals: %d bootstrap fits in %.1f s; the 1 km out-of-fold error spans a factor "
        "%.2f to %.2f (%.0f %% of the cells)",
        len(boot),
        time.perf_counter() - t,
        np.exp(bounds[0]),
        np.exp(bounds[1]),
        100 * uncertainty.LEVEL,
    )
    return {"bootstrap": boot, "log_error_bounds": bounds}


def save_fit(path: str, fit: dict[str, Any], storage_options=None) -> None:
    """Write what :func:`density_fit` returned into the store's ``regression`` group."""
    store.save_arrays(path, "regression", **fit["group"], storage_options=storage_options)


def predict_pass(
    client: Client,
    cfg: Config,
    grid: Grid,
    fit: dict[str, Any],
    *,
    progress: bool,
    settle: Callable[[], Any] | None = None,
) -> tuple[list[str], Totals]:
    """Population, density and cell estimates of every tile not complete yet.

    Each tile reads its labels, term layers and census with whole cells around it, at least
    the smoothing's kernel radius wide. ``settle`` is called when the tiles are done, before
    the pass records its failures in the store's attributes. Returns the tiles computed and
    their totals.
    """
    path, so = cfg.output.store, dict(cfg.output.storage_options)
    sigma = cfg.regression.smooth_sigma
    names = list(fit.get("terms") or [])
    stored = (store.term_names(path, so) or []) if names else []
    layers = [stored.index(n) for n in names]
    cpx = grid.cell_px
    margin = -(-halo_px(sigma) // cpx) * cpx  # the halo, rounded up to whole cells
    # the densities ride in each tile's graph (as a task of their own they would pull
    # every tile's task to the worker that holds them)
    dens = np.asarray(fit["densities"])
    kwargs = {
        "layers": layers,
        "scale": fit.get("term_scale"),
        "cell_px": cpx,
        "resolution": grid.resolution,
        "sigma": sigma,
        "rescale": cfg.regression.rescale,
        # the region's share of each mapped census variable (cells without their own)
        "shares": store.variable_shares(path, so),
        "mask": mask_of(cfg, grid),
        "intervals": None
        if fit.get("bootstrap") is None
        else {"densities": np.asarray(fit["bootstrap"]), "log_bounds": fit["log_error_bounds"]},
    }
    totals: list[Totals] = [Totals()]

    def build(t: Tile):
        ys, xs = grid.expand(t, margin)
        return tasks.predict_tile, (ys, xs, dens), kwargs

    def add(t: Tile, value: Totals) -> None:
        totals[0] = totals[0] + value

    done = _tile_pass(
        client,
        cfg,
        grid,
        build,
        done_code=store.COMPLETE,
        desc="predict",
        progress=progress,
        reduce=add,
        settle=settle,
    )
    return done, totals[0]


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------
def region_totals(
    client: Client, cfg: Config, grid: Grid, totals: Totals, counted: Iterable[str]
) -> Totals:
    """``totals`` of the tiles ``counted`` plus those of every other tile, read from the
    store by one small task per tile."""
    path, so = cfg.output.store, dict(cfg.output.storage_options)
    counted = set(counted)
    rest = [t for t in grid.tiles() if t.id not in counted]

    mask = mask_of(cfg, grid)

    def task(t: Tile):
        return tasks.stored_totals, (path, so, t, grid.cell_px, mask), {}

    return totals + sum_totals(v for _, v in _gather(client, cfg, rest, task))


def mask_of(cfg: Config, grid: Grid) -> Mask | None:
    """The run's constraint mask, as its tasks read it (:mod:`popdask.mask`)."""
    m = cfg.mask
    if m is None:
        return None
    return Mask(
        values=None if m.values is None else tuple(m.values),
        grid=grid,
        path=m.path,
        collection=m.collection,
        url=m.url or cfg.stac.url,
        asset=m.asset,
        datetime=m.datetime,
        sign=m.sign or cfg.stac.sign,
    )


def run_metrics(
    path: str,
    fit: dict[str, Any],
    totals: Totals,
    storage_options=None,
    truth: np.ndarray | None = None,
) -> dict[str, Any]:
    """1 km fit quality (on the fit's cells), the region's totals (summed per tile), and,
    when the truth is known (the demo, whose truth the caller holds), fine-scale scores."""
    out: dict[str, Any] = {
        "r2_1km_in_sample": fit["in_sample"]["r2"],
        "mae_1km_in_sample": fit["in_sample"]["mae"],
        "cells_used": fit["cells_used"],
        "cell_share": fit.get("cell_share", 1.0),
        "census_total_known": totals.census_known,
        "population_total": totals.population,
        "population_total_known_cells": totals.population_known_cells,
    }
    if fit["cross_validated"]:
        out["r2_1km_cv"] = fit["cross_validated"]["r2"]
        out["mae_1km_cv"] = fit["cross_validated"]["mae"]
    out["terms"] = list(fit.get("terms") or [])
    plain = fit.get("cross_validated_without_terms")
    if plain and out["terms"]:
        out["r2_1km_cv_without_terms"] = plain["r2"]
        out["mae_1km_cv_without_terms"] = plain["mae"]
    if totals.cells_emptied_by_mask:
        out["cells_emptied_by_mask"] = totals.cells_emptied_by_mask
        out["people_in_cells_emptied_by_mask"] = totals.people_in_cells_emptied_by_mask
        log.warning(
            "the mask leaves no pixel in %d cells with %.0f people in the census: they keep "
            "them, spread evenly over their pixels",
            totals.cells_emptied_by_mask,
            totals.people_in_cells_emptied_by_mask,
        )
    if out["census_total_known"] > 0:
        out["total_error_known_cells"] = (
            out["population_total_known_cells"] / out["census_total_known"] - 1.0
        )
    if truth is not None:
        ds = store.open_store(path, storage_options)
        out.update(truth_metrics(ds.population.values.astype(np.float64), truth))
        if "population_lower" in ds and fit.get("bootstrap") is not None:
            bounds = [ds[v].values for v in ("population_lower", "population_upper")]
            cells = [ds[v].values for v in ("cell_lower", "cell_upper")]
            cpx = ds.sizes["y"] // ds.sizes["y_cell"]
            out.update(uncertainty.truth_coverage(*bounds, *cells, truth, cpx))
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
#: Configuration sections that do not change what a run writes (where it goes, on what
#: cluster, how files are read), left out of its signature.
UNSIGNED = ("output", "cluster", "read")


def run_signature(cfg: Config, census_sha256: str) -> dict[str, Any]:
    """What determines a store's content, flat (``{"model.clusters": 150, …}``): the
    configuration but for :data:`UNSIGNED` and the census section, whose cell values are
    signed instead (their SHA-256, :class:`popdask.census_blocks.Staged`: the file may move,
    its values may not), and popdask's version. The tiles' items are in the store's catalog
    records, reused on resume."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in (*UNSIGNED, "census")}
    flat = _flatten(d)
    flat["popdask_version"] = __version__
    flat["census_sha256"] = census_sha256
    flat["census.columns"] = list(cfg.census.columns or [])
    return flat


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def probe_sources(sources: Sequence[catalog.Source], bbox_lonlat: Sequence[float]) -> None:
    """One bounded request per source before any tile runs: a Sentinel-2 source without an
    item over the region fails the run with one line; another source is left out of the
    tiles' composites (their bands are NaN) with a warning."""
    for src in sources:
        try:
            catalog.probe_source(src.name, src.config, url=src.url, bbox_lonlat=bbox_lonlat)
        except SourceError as e:
            if src.name == "sentinel2":
                raise
            log.warning("%s; its bands will be NaN", e)


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
    # the census goes from its file to the store's chunks a batch of rows and a block of
    # cells at a time: the client never holds the region's census
    with stage_from_config(cfg.census, grid) as census:
        sources = catalog.sources_of(cfg)
        probe_sources(sources, region_lonlat(grid))
        bands = [b for s in sources for b in s.config.bands]
        kinds = [ROLES[s.name] for s in sources for _ in s.config.bands]
        created = store.create(
            path,
            grid,
            bands=bands,
            kinds=kinds,
            census=census,
            attrs={"config": cfg.to_dict(), "popdask_version": __version__},
            storage_options=so,
            terms=active_terms(cfg, kinds),
            signature=run_signature(cfg, census.sha256),
            intervals=cfg.regression.bootstrap > 0,
        )
        known = census.finite_cells
    log.info("store: %s %s", "created" if created else "resuming", path)
    store.update_attrs(path, {"census_known_cells": known}, so)
    timings["search"] = time.perf_counter() - t0

    t = time.perf_counter()
    computed["composite"] = composite_pass(client, cfg, grid, sources, progress=progress)
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
        predicted, totals = predict_pass(
            client, cfg, grid, fit, progress=progress, settle=saved.result
        )
    computed["predict"] = predicted
    timings["predict"] = time.perf_counter() - t
    timings["label_predict"] = timings["label"] + timings["regression"] + timings["predict"]

    totals = region_totals(client, cfg, grid, totals, predicted)
    metrics = run_metrics(path, fit, totals, so, truth=truth)
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
