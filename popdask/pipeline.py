"""The passes of a run, wired together tile by tile (DESIGN.md "Passes over the region").

1. **composite** — per tile: STAC items → stackstac → masked medians → ``composite``.
2. **fit** — a pixel sample from the stored composites of all tiles → :class:`PixelModel`.
3. **label** — per tile: ``cluster``; then cluster fractions per cell and the bounded fit
   of densities on all cells; then **predict** — per tile with a halo: ``population``,
   ``density``, ``predicted``.

Each pass submits per-tile graphs in batches of ``cluster.batch_tiles`` tiles, marks each
tile in ``tile_status`` as soon as its write has finished, and skips tiles already done,
so a rerun resumes where a killed run stopped. Only :mod:`popdask.sources` and
:mod:`popdask.store` touch data; this module decides what runs where.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
from distributed import Client, as_completed
from tqdm.auto import tqdm

from popdask import __version__, regression, store
from popdask.census import read_census
from popdask.config import Config
from popdask.grid import Grid, Tile
from popdask.model import PixelModel, fit_model, sample_tile
from popdask.predict import halo_px, predict_window
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
) -> list[str]:
    """Compute ``build(tile)`` (a delayed write) for every tile, in batches.

    Each tile is marked ``done_code`` as soon as its write has finished, or failed (-1).
    Returns the ids of the tiles computed. Raises :class:`PipelineError` if any failed.
    """
    failed: dict[str, str] = {}
    done: list[str] = []
    bar = tqdm(total=len(tiles), desc=desc, unit="tile", disable=not progress)
    for start in range(0, len(tiles), batch):
        chunk = tiles[start : start + batch]
        futures = {}
        for t in chunk:
            try:
                futures[client.compute(build(t))] = t
            except Exception as e:  # building the graph failed (catalog, metadata)
                failed[t.id] = f"{type(e).__name__}: {e}"
                log.error("%s: tile %s failed while building: %s", desc, t.id, e)
                store.set_status(path, [t], store.FAILED, storage_options)
                bar.update()
        for fut in as_completed(list(futures)):
            t = futures[fut]
            try:
                fut.result()
            except Exception as e:
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
                done.append(t.id)
            finally:
                fut.release()
                bar.update()
    bar.close()
    key = f"failed_{desc}"  # what failed; {} again once a rerun has recovered every tile
    if failed or store.open_group(path, storage_options, mode="r").attrs.get(key):
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
) -> list[str]:
    """Run ``build`` on every tile whose status is below ``done_code`` (the resume)."""
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
    )


# --------------------------------------------------------------------------------------
# Pass 1: composites
# --------------------------------------------------------------------------------------
def composite_pass(
    client: Client, cfg: Config, grid: Grid, sources: Sequence[SourceItems], *, progress: bool
) -> list[str]:
    path, so = cfg.output.store, cfg.output.storage_options

    def build(t: Tile):
        data, _, _, _ = tile_composite(
            sources, t.bounds, resolution=grid.resolution, sign=cfg.stac.sign, read=cfg.read
        )
        return store.write_tile(path, t, {"composite": (("band", "y", "x"), data)}, so)

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
    ds = store.open_store(path, so)
    tiles = grid.tiles()
    n_px = grid.shape[0] * grid.shape[1]
    m = cfg.model
    tasks = []
    for i, t in enumerate(tiles):
        share = int(np.ceil(m.sample_pixels * (t.shape[0] * t.shape[1]) / n_px))
        block = ds.composite.data[:, t.ys, t.xs]
        tasks.append(dask.delayed(sample_tile)(block, share, m.seed * 1_000_003 + i))
    samples = np.concatenate(client.gather(client.compute(tasks)), axis=0)
    bands = [str(b) for b in ds.band.values]
    kinds = list(ds.composite.attrs["band_kind"])
    model = fit_model(
        samples, bands, kinds, components=m.components, clusters=m.clusters, seed=m.seed
    )
    arrays, attrs = model.to_arrays()
    store.save_arrays(path, "model", arrays, {**attrs, "sample_pixels": len(samples)}, so)
    return model


# --------------------------------------------------------------------------------------
# Pass 3: labels, densities, prediction
# --------------------------------------------------------------------------------------
def label_pass(client: Client, cfg: Config, grid: Grid, model: PixelModel, *, progress: bool):
    path, so = cfg.output.store, cfg.output.storage_options
    ds = store.open_store(path, so)

    def build(t: Tile):
        comp = ds.composite.data[:, t.ys, t.xs].rechunk({0: -1})
        labels = comp.map_blocks(
            model.labels, drop_axis=0, dtype=np.int16, meta=np.empty((0, 0), np.int16)
        )
        return store.write_tile(path, t, {"cluster": (("y", "x"), labels)}, so)

    return _tile_pass(
        client, cfg, grid, build, done_code=store.LABELLED, desc="label", progress=progress
    )


def cv_groups(grid: Grid, block: float = CV_BLOCK) -> np.ndarray:
    """``(y_cell, x_cell)`` spatial block id of each cell, for grouped cross-validation."""
    return regression.block_groups(grid.cell_shape, int(block // grid.cell))


def density_fit(client: Client, cfg: Config, grid: Grid, model: PixelModel) -> dict[str, Any]:
    """Cluster fractions per cell from the stored labels, then the bounded fit."""
    path, so = cfg.output.store, cfg.output.storage_options
    ds = store.open_store(path, so)
    fr = regression.cell_fractions(ds.cluster.data, model.n_clusters, cell_px=grid.cell_px)
    fractions = np.asarray(client.compute(fr).result(), dtype=np.float64)
    k = model.n_clusters
    F = fractions.reshape(-1, k)
    census = ds.census.values.reshape(-1).astype(np.float64)
    valid = F.sum(axis=1)
    usable = np.isfinite(census) & (census >= 0) & (valid >= cfg.regression.min_valid)
    pop = np.where(usable, census, np.nan)
    groups = cv_groups(grid).reshape(-1)
    t0 = time.perf_counter()
    densities = regression.fit_densities(F, pop, groups)
    fit_s = time.perf_counter() - t0
    insample = regression.scores(pop, regression.predict_cells(F, densities))
    n_groups = len(np.unique(groups[usable]))
    cv = None
    if n_groups >= 2:
        res = regression.cross_validate(F, pop, groups, n_splits=min(5, n_groups))
        cv = res.scores
    store.save_arrays(path, "regression", {"densities": densities}, {"fit_seconds": fit_s}, so)
    log.info(
        "regression: %d cells, in-sample R² %.3f%s",
        int(usable.sum()),
        insample["r2"],
        f", cross-validated R² {cv['r2']:.3f} MAE {cv['mae']:.0f}" if cv else "",
    )
    return {
        "densities": densities,
        "in_sample": insample,
        "cross_validated": cv,
        "cells_used": int(usable.sum()),
    }


def predict_pass(
    client: Client, cfg: Config, grid: Grid, densities: np.ndarray, *, progress: bool
) -> list[str]:
    path, so = cfg.output.store, cfg.output.storage_options
    ds = store.open_store(path, so)
    census = ds.census.values if cfg.regression.rescale else None
    sigma = cfg.regression.smooth_sigma
    halo = halo_px(sigma, grid.cell_px)
    cpx = grid.cell_px
    dens_d = dask.delayed(np.asarray(densities), pure=True)

    def build(t: Tile):
        ys, xs = grid.expand(t, halo)
        labels = ds.cluster.data[ys, xs]
        cen = (
            None
            if census is None
            else census[ys.start // cpx : ys.stop // cpx, xs.start // cpx : xs.stop // cpx]
        )
        inner = (
            slice(t.ys.start - ys.start, t.ys.stop - ys.start),
            slice(t.xs.start - xs.start, t.xs.stop - xs.start),
        )
        res = dask.delayed(predict_window)(
            labels, cen, dens_d, cell_px=cpx, resolution=grid.resolution, sigma=sigma, inner=inner
        )
        ny, nx = t.shape
        import dask.array as da

        def arr(key, shape):
            return da.from_delayed(res[key], shape, dtype=np.float32)

        return store.write_tile(
            path,
            t,
            {
                "population": (("y", "x"), arr("population", (ny, nx))),
                "density": (("y", "x"), arr("density", (ny, nx))),
                "predicted": (("y_cell", "x_cell"), arr("predicted", (ny // cpx, nx // cpx))),
            },
            so,
        )

    return _tile_pass(
        client, cfg, grid, build, done_code=store.COMPLETE, desc="predict", progress=progress
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
    census = read_census(
        cfg.census.path, grid, column=cfg.census.column, storage_options=cfg.census.storage_options
    )
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
    computed["composite"] = composite_pass(client, cfg, grid, sources, progress=progress)
    timings["composite"] = time.perf_counter() - t

    t = time.perf_counter()
    model = fit_pass(client, cfg, grid)
    timings["fit"] = time.perf_counter() - t

    t = time.perf_counter()
    computed["label"] = label_pass(client, cfg, grid, model, progress=progress)
    fit = density_fit(client, cfg, grid, model)
    computed["predict"] = predict_pass(client, cfg, grid, fit["densities"], progress=progress)
    timings["label_predict"] = time.perf_counter() - t

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
