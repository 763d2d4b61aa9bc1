"""The per-tile tasks of the passes, as they run on a worker.

Each reads what its tile needs from the store, runs the pure array stages, writes the tile,
marks it in ``tile_status`` (:func:`marked`, so the client makes no round trip per tile)
and returns a small summary for the client's reduction (:mod:`popdask.reductions`): the
tile's sampled cells for the densities fit, or its totals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from popdask import catalog, regression, store, terms, uncertainty, variables
from popdask.cluster import release_memory
from popdask.config import ReadConfig
from popdask.grid import Tile
from popdask.mask import Mask, emptied_cells
from popdask.model import PixelModel, sample_tile
from popdask.predict import predict_window
from popdask.reductions import CellRows, Totals, tile_cell_index, uniform


def marked(code: int, fn: Callable[..., Any], path: str, so: dict, tile: Tile, *args, **kw):
    """Run ``fn(path, so, tile, ...)``, then mark ``tile`` with status ``code``: the status
    is written only once the tile's writes have finished."""
    out = fn(path, so, tile, *args, **kw)
    store.set_status(path, [tile], code, so)
    return out


@dataclass(frozen=True)
class CellPick:
    """Which of a tile's cells go to the densities fit (see :mod:`popdask.reductions`):
    known cells whose hash, under ``seed``, falls below ``share``."""

    share: float
    seed: int
    n_cols: int  # cells across the region

    def rows(self, path: str, so: dict, tile: Tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tile's cells' flat index, census and the mask of those picked."""
        census = store.read_window(path, "census", tile.ys_cell, tile.xs_cell, so)
        index = tile_cell_index(tile.ys_cell, tile.xs_cell, self.n_cols)
        keep = np.isfinite(census) & (census >= 0)
        if self.share < 1.0:
            keep &= uniform(index, self.seed) < self.share
        return index, census, keep


# --------------------------------------------------------------------------------------
# Composite
# --------------------------------------------------------------------------------------
def composite_tile(
    path: str,
    so: dict,
    tile: Tile,
    sources: Sequence[catalog.Source],
    *,
    index: int,
    n: int,
    seed: int,
    resolution: float,
    sign: str | None = None,
    read: ReadConfig | None = None,
) -> dict[str, Any]:
    """The tile's own items (recorded in the store, or searched and recorded), its
    composite and its share of the fit's sample, written; returns the catalog's counts
    (:func:`popdask.catalog.composite_tile`)."""
    data, summary = catalog.composite_tile(
        sources,
        tile.bounds,
        tile_id=tile.id,
        resolution=resolution,
        path=path,
        storage_options=so,
        sign=sign,
        read=read,
    )
    store.write_arrays(path, tile, {"composite": data}, so)
    required = [s.name == "sentinel2" for s in sources for _ in s.config.bands]
    store.write_sample(path, index, sample_tile(data, n, seed, required), so)
    s2 = summary["sources"].get("sentinel2", {})
    used = 0 if summary["no_usable_scene"] else s2.get("kept", 0)
    counts = {
        "items_found": s2.get("found", 0),
        "items_used": used,
        "reads_filled": summary["reads_filled"],
        "valid_permille": round(1000 * summary["valid_share"]),
        "offsets_corrected": sum(len(c["corrected"]) for c in summary["offset_check"].values()),
    }
    store.set_counts(path, tile, counts, so)
    store.set_scenes(path, tile, used, so)
    # the largest task of a run: what it freed goes back to the system, so that a worker's
    # memory does not creep from tile to tile (the label and predict tasks, a third of its
    # size and short, keep theirs: trimming after each costs them ~15 %)
    del data
    release_memory()
    return summary


def stored_sample(
    path: str, so: dict, tile: Tile, n: int, seed: int, required: Sequence[bool]
) -> np.ndarray:
    """The tile's share of the fit's pixel sample, drawn from its stored composite (for a
    store composited before the composite tasks drew it)."""
    data = store.read_window(path, "composite", tile.ys, tile.xs, so)
    return sample_tile(data, n, seed, required)


# --------------------------------------------------------------------------------------
# Labels and the fit's cells
# --------------------------------------------------------------------------------------
def _intensity(comp: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
    """The intensity layer of composite bands ``comp`` of the given ``kinds``."""
    li, ri = terms.intensity_bands(kinds)
    return terms.intensity(comp[li] if li else None, comp[ri] if ri else None)


def _cell_rows(
    path: str,
    so: dict,
    tile: Tile,
    labels: np.ndarray,
    comp: np.ndarray | None,
    kinds: Sequence[str],
    k: int,
    layer: int | None,
    cell_px: int,
    pick: CellPick,
) -> CellRows:
    """The picked cells' fractions; with ``layer``, also the tile's intensity (from
    ``comp``, bands of ``kinds``), written as layer ``layer`` of ``terms``, and the cells'
    intensity-weighted fractions with the tile's largest intensity."""
    index, census, keep = pick.rows(path, so, tile)
    if layer is None:
        fr = regression.cell_fractions(labels, k, cell_px=cell_px)
        return CellRows.pick(index, census, keep, {"fractions": fr})
    values = _intensity(comp, kinds)
    store.write_layer(path, store.TERMS, layer, tile, values, so)
    bins = regression.cell_cluster_index(labels, k, cell_px)  # shared by both
    fr = regression.cell_fractions(labels, k, cell_px=cell_px, bins=bins)
    wint = terms.weighted_fractions(labels, values[None], k, cell_px, bins=bins)
    top = float(values.max()) if values.size else 0.0
    columns = {"fractions": fr, "intensity": wint}
    return CellRows.pick(index, census, keep, columns, {"intensity": top})


def label_tile(
    path: str,
    so: dict,
    tile: Tile,
    model: PixelModel,
    layer: int | None,
    cell_px: int,
    pick: CellPick,
) -> CellRows:
    """Read the tile's composite, label it, write ``cluster`` (and, with the intensity
    term, its layer ``layer`` of ``terms``); return the picked cells' rows while the
    composite is in memory."""
    comp = store.read_window(path, "composite", tile.ys, tile.xs, so)
    labels = model.labels(comp)
    store.write_arrays(path, tile, {"cluster": labels}, so)
    k = model.n_clusters
    return _cell_rows(path, so, tile, labels, comp, model.kinds, k, layer, cell_px, pick)


def stored_cells(
    path: str,
    so: dict,
    tile: Tile,
    kinds: Sequence[str],
    k: int,
    layer: int | None,
    cell_px: int,
    pick: CellPick,
) -> CellRows:
    """What :func:`label_tile` returns (and writes of ``terms``), for a tile labelled by an
    earlier run."""
    labels = store.read_window(path, "cluster", tile.ys, tile.xs, so)
    li, ri = terms.intensity_bands(kinds)
    bands = [] if layer is None else li + ri  # the intensity's bands only
    comp = None
    if bands:
        comp = store.read_window(path, "composite", tile.ys, tile.xs, so, index=bands)
    sub = [kinds[i] for i in bands]
    return _cell_rows(path, so, tile, labels, comp, sub, k, layer, cell_px, pick)


def cell_design(
    path: str, so: dict, tile: Tile, k: int, layers: Sequence[int], cell_px: int
) -> np.ndarray:
    """``(y_cell, x_cell, (1 + m) k)`` of a finished tile: its cells' cluster fractions,
    then their fractions weighted by each stored ``terms`` layer of ``layers`` (raw, as the
    label and context passes wrote them). What :mod:`popdask.evalsample` scores."""
    labels = store.read_window(path, "cluster", tile.ys, tile.xs, so)
    bins = regression.cell_cluster_index(labels, k, cell_px)
    fr = regression.cell_fractions(labels, k, cell_px=cell_px, bins=bins)
    if not layers:
        return fr
    values = store.read_window(path, store.TERMS, tile.ys, tile.xs, so, index=list(layers))
    weighted = terms.weighted_fractions(labels, values, k, cell_px, bins=bins)
    return np.concatenate([fr, weighted], axis=-1)


def inner(t: Tile, ys: slice, xs: slice) -> tuple[slice, slice]:
    """The tile's pixel slices inside the window ``ys, xs``."""
    return (
        slice(t.ys.start - ys.start, t.ys.stop - ys.start),
        slice(t.xs.start - xs.start, t.xs.stop - xs.start),
    )


def context_tile(
    path: str,
    so: dict,
    t: Tile,
    ys: slice,
    xs: slice,
    pilots: np.ndarray,
    sigma_px: float,
    k: int,
    cell_px: int,
    layer: int,
    pick: CellPick,
) -> CellRows:
    """The tile's context of each of the ``pilots`` densities (the labels read with the
    halo ``ys, xs``): the first pilot's context is written as layer ``layer`` of ``terms``;
    returned are the picked cells' context-weighted fractions and the largest context of
    each, named ``context`` for the first pilot and ``context_1``, ``context_2``, … for the
    others (the cross-validation's folds)."""
    labels = store.read_window(path, "cluster", ys, xs, so)
    iy, ix = inner(t, ys, xs)
    index, census, keep = pick.rows(path, so, t)
    bins = regression.cell_cluster_index(labels[iy, ix], k, cell_px)
    columns, tops = {}, {}
    for i, pilot in enumerate(np.atleast_2d(pilots)):
        values = terms.context(labels, pilot, sigma_px)[iy, ix]
        if i == 0:
            store.write_layer(path, store.TERMS, layer, t, values, so)
        name = "context" if i == 0 else f"context_{i}"
        tops[name] = float(values.max()) if values.size else 0.0
        columns[name] = terms.weighted_fractions(
            labels[iy, ix], values[None], k, cell_px, bins=bins
        )
    return CellRows.pick(index, census, keep, columns, tops)


# --------------------------------------------------------------------------------------
# Predict
# --------------------------------------------------------------------------------------
def predict_tile(
    path: str,
    so: dict,
    t: Tile,
    ys: slice,
    xs: slice,
    densities: np.ndarray,
    *,
    layers: Sequence[int],
    scale,
    cell_px: int,
    resolution: float,
    sigma: float,
    rescale: bool,
    shares: Sequence[float] | None = None,
    mask: Mask | None = None,
    intervals: dict | None = None,
) -> Totals:
    """Read the tile's labels, term layers and census over the window ``ys, xs`` (the
    tile and whole cells around it, at least the smoothing's halo), predict, write the
    tile; return its totals. With ``shares`` (the region's share of each mapped census
    variable) the tile's ``population_by`` is its population times each cell's share
    (:mod:`popdask.variables`). ``mask`` (:mod:`popdask.mask`) zeroes the pixels where
    nobody can live before the rescaling. ``intervals`` (the bootstrap's ``densities`` and
    the 1 km ``log_bounds``) adds the tile's interval layers (:mod:`popdask.uncertainty`).

    The window holds every cell it touches whole, so each cell's model count (what rescales
    it) is summed from its own pixels: no region-wide table of counts is needed.
    """
    labels = store.read_window(path, "cluster", ys, xs, so)
    cy = slice(ys.start // cell_px, ys.stop // cell_px)
    cx = slice(xs.start // cell_px, xs.stop // cell_px)
    census = store.read_window(path, "census", cy, cx, so).astype(np.float64)
    values = None
    if layers:
        values = store.read_window(path, store.TERMS, ys, xs, so, index=list(layers))
        values /= np.asarray(scale, np.float32)[:, None, None]
    iy, ix = inner(t, ys, xs)
    masked = None if mask is None else mask.read(ys, xs)
    res = predict_window(
        labels,
        census if rescale else None,
        densities,
        cell_px=cell_px,
        resolution=resolution,
        sigma=sigma,
        inner=(iy, ix),
        terms=values,
        mask=masked,
    )
    own = census[iy.start // cell_px : iy.stop // cell_px, ix.start // cell_px : ix.stop // cell_px]
    if intervals is not None:  # each replicate's densities mapped as the run's own
        kw = dict(cell_px=cell_px, resolution=resolution, sigma=0, inner=(iy, ix), terms=values)
        reps = [
            predict_window(labels, census if rescale else None, d, mask=masked, **kw)
            for d in intervals["densities"]
        ]
        res.update(interval_layers(reps, intervals))
    if shares is not None:
        by = store.read_window(path, "census_by", t.ys_cell, t.xs_cell, so)
        cell_shares = variables.shares(own, by, np.asarray(shares))
        res["population_by"] = variables.pixel_layers(res["population"], cell_shares, cell_px)
    store.write_arrays(path, t, res, so)
    emptied = None if masked is None else emptied_cells(~masked[iy, ix], own, cell_px)
    return Totals.of_tile(res["population"], own, cell_px, emptied)


def interval_layers(replicates: list[dict[str, np.ndarray]], intervals: dict) -> dict:
    """The interval layers of a tile from its replicates' predictions."""
    log_bounds = tuple(intervals["log_bounds"])
    lower, upper = uncertainty.bounds(np.stack([r["population"] for r in replicates]), log_bounds)
    c_lo, c_hi = uncertainty.bounds(np.stack([r["predicted"] for r in replicates]), log_bounds)
    return {
        "population_lower": lower,
        "population_upper": upper,
        "cell_lower": c_lo,
        "cell_upper": c_hi,
    }


def stored_totals(path: str, so: dict, t: Tile, cell_px: int, mask: Mask | None = None) -> Totals:
    """The totals of a tile predicted by an earlier run, read from the store."""
    pop = store.read_window(path, "population", t.ys, t.xs, so)
    census = store.read_window(path, "census", t.ys_cell, t.xs_cell, so).astype(np.float64)
    emptied = None
    if mask is not None:
        emptied = emptied_cells(~mask.read(t.ys, t.xs), census, cell_px)
    return Totals.of_tile(pop, census, cell_px, emptied)
