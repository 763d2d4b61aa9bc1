"""The evaluation protocol of a finished run: how well do the densities explain the census?

From a run's store (the stored ``cluster`` labels and ``census``) the cell fractions are
recomputed and the density fit is scored the way the disaggregation literature does it:

1. **1 km fit** — R², MAE, RMSE and R² of ``log(1 + count)`` of the fit on all usable cells
   (*in-sample*) and out of fold in a spatially grouped K-fold cross-validation (*cv*): the
   groups are square blocks of ``block`` metres, a block is never in both the training and
   the test part (``GroupKFold``).
2. **Bias by density class** of the census cell — empty (0), rural (0–100), suburban
   (100–1,000), urban (1,000–5,000) and dense core (≥ 5,000 persons per km²): mean
   predicted − observed, and relative to the observed total, in-sample and out of fold.
3. **Coarse to fine** — census and fractions aggregated to 2 × 2 km and 5 × 5 km blocks
   (counts summed; fractions averaged over the block's pixels; only complete blocks whose
   cells are all usable), the densities fitted on the blocks, then each 1 km cell predicted
   with them and scored at 1 km, both raw (``model``) and redistributed so that each block
   sums to its count (``rescaled``, what a dasymetric product does), against the areal
   weighting baseline (each cell gets the block count / number of cells). Also out of fold,
   with groups of whole blocks, when there are enough blocks.
4. **Against a known truth** (the demo): R² and MAE at 20 m and 100 m (and 1 km) of the
   stored ``population``, of the smoothed ``density`` (as persons per pixel), of the model's
   unrescaled population (rebuilt from the labels and the stored densities) and of the
   uniform baseline (census / pixels per cell), all on the same pixels.

The computations are pure functions on arrays; :func:`evaluate` is the thin wrapper that
reads a store, calls them, and writes ``evaluation.json`` and the figure when asked.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popdask import evalsample, regression
from popdask.grid import Grid
from popdask.regression import block_groups

__all__ = [
    "CLASSES",
    "CLASS_EDGES",
    "Coarse",
    "aggregate",
    "bias_by_class",
    "block_groups",
    "coarse_to_fine",
    "density_class",
    "evaluate",
    "evaluate_cells",
    "fit_cells",
    "load_truth",
    "plot_evaluation",
    "truth_scores",
    "uniform_population",
    "write_json",
]

#: Names of the density classes of a census cell, in order (class ids 0..4).
CLASSES: tuple[str, ...] = ("empty", "rural", "suburban", "urban", "dense_core")
#: Lower edges (persons per km²) of the classes after ``empty``: a density ``d > 0`` is in
#: class ``1 + (number of edges <= d)``; ``d == 0`` is ``empty``.
CLASS_EDGES: tuple[float, ...] = (100.0, 1000.0, 5000.0)
#: Coarse block sides (metres) of the coarse-to-fine protocol.
COARSE_SIZES: tuple[float, ...] = (2000.0, 5000.0)


# --------------------------------------------------------------------------------------------
# Spatial groups and density classes
# --------------------------------------------------------------------------------------------


def _cell_arrays(fractions, census) -> tuple[np.ndarray, np.ndarray]:
    """``(ny, nx, k)`` fractions and ``(ny, nx)`` census as float64, shapes checked."""
    fr = np.asarray(fractions, dtype=np.float64)
    cen = np.asarray(census, dtype=np.float64)
    if fr.ndim != 3 or cen.shape != fr.shape[:2]:
        raise ValueError(
            f"fractions must be (ny, nx, n_clusters) and census (ny, nx); got {fr.shape} "
            f"and {cen.shape}"
        )
    return fr, cen


def density_class(counts, cell_km2: float = 1.0) -> np.ndarray:
    """Density class id (index into `CLASSES`) of each census cell.

    Parameters
    ----------
    counts : array_like
        Persons per cell; NaN or negative means unknown.
    cell_km2 : float, default 1.0
        Area of a cell in km² (densities are ``counts / cell_km2``).

    Returns
    -------
    numpy.ndarray, same shape, int8
        0 empty (exactly 0), 1 rural (0 < d < 100), 2 suburban (100 <= d < 1000),
        3 urban (1000 <= d < 5000), 4 dense core (d >= 5000 persons per km²); -1 unknown.

    Examples
    --------
    >>> density_class([0, 1, 99, 100, 999, 1000, 4999, 5000, np.nan]).tolist()
    [0, 1, 1, 2, 2, 3, 3, 4, -1]
    """
    d = np.asarray(counts, dtype=np.float64) / float(cell_km2)
    out = np.full(d.shape, -1, dtype=np.int8)
    known = np.isfinite(d) & (d >= 0)
    out[known & (d == 0)] = 0
    pos = known & (d > 0)
    out[pos] = 1 + np.searchsorted(np.asarray(CLASS_EDGES), d[pos], side="right")
    return out


def bias_by_class(observed, predicted, cell_km2: float = 1.0) -> dict[str, dict[str, Any]]:
    """Bias of ``predicted`` per density class of ``observed``.

    Parameters
    ----------
    observed : array_like
        Census counts; unknown (NaN/negative) cells, and cells where ``predicted`` is not
        finite, are left out.
    predicted : array_like, same shape
        Predicted counts.
    cell_km2 : float, default 1.0
        Cell area in km², to turn counts into densities for the classes.

    Returns
    -------
    dict
        Per class name: ``range`` (persons per km², ``[lo, hi)``; ``[0, 0]`` for empty),
        ``n`` cells, ``observed_mean``, ``predicted_mean``, ``bias`` (mean predicted −
        observed, persons per cell), ``relative_bias`` (Σ(predicted − observed) / Σ observed;
        None when Σ observed is 0) and ``mae``. Statistics are None for an empty class.
    """
    obs = np.asarray(observed, dtype=np.float64).ravel()
    pred = np.asarray(predicted, dtype=np.float64).ravel()
    if obs.shape != pred.shape:
        raise ValueError(f"observed {obs.shape} and predicted {pred.shape} differ in shape")
    cls = density_class(obs, cell_km2)
    cls[~np.isfinite(pred)] = -1
    edges = (0.0, *CLASS_EDGES, None)
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(CLASSES):
        rng = [0.0, 0.0] if i == 0 else [edges[i - 1], edges[i]]
        sel = cls == i
        n = int(sel.sum())
        entry: dict[str, Any] = {"range": rng, "n": n}
        if n:
            o, p = obs[sel], pred[sel]
            err = p - o
            total = float(o.sum())
            entry.update(
                observed_mean=float(o.mean()),
                predicted_mean=float(p.mean()),
                bias=float(err.mean()),
                relative_bias=float(err.sum() / total) if total > 0 else None,
                mae=float(np.abs(err).mean()),
            )
        else:
            entry.update(
                observed_mean=None, predicted_mean=None, bias=None, relative_bias=None, mae=None
            )
        out[name] = entry
    return out


# --------------------------------------------------------------------------------------------
# The 1 km fit, in-sample and cross-validated
# --------------------------------------------------------------------------------------------


def _usable(fractions: np.ndarray, census: np.ndarray, min_valid: float) -> np.ndarray:
    """Cells that take part in fits and scores: census known and enough valid pixels."""
    valid = fractions.sum(axis=-1)
    return np.isfinite(census) & (census >= 0) & (valid >= min_valid)


def fit_cells(
    fractions,
    census,
    groups,
    *,
    n_splits: int = 5,
    fit_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit densities on all cells and out of fold over spatial groups.

    Parameters
    ----------
    fractions : array_like, shape (n_cells, n_clusters)
        Cell fractions (`popdask.regression.cell_fractions`, flattened).
    census : array_like, shape (n_cells,)
        Counts; NaN for cells that must not be fitted or scored.
    groups : array_like, shape (n_cells,)
        Spatial group per cell; a group is never split between training and test.
    n_splits : int, default 5
        Folds (at most the number of groups among the known cells).
    fit_options : mapping, optional
        Options of `popdask.regression.fit_densities`.

    Returns
    -------
    dict
        ``densities`` (n_clusters,), ``in_sample`` (n_cells,) predictions on all cells,
        ``cv`` (n_cells,) out-of-fold predictions (NaN where unknown; None when fewer than
        two groups), ``fold`` (n_cells,) test fold (-1 unknown) or None, ``n_splits`` used.
    """
    opts = dict(fit_options or {})
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(census, dtype=np.float64)
    g = np.asarray(groups)
    densities = regression.fit_densities(x, y, g, **opts)
    known = np.isfinite(y) & (y >= 0)
    n_groups = len(np.unique(g[known]))
    k = min(int(n_splits), n_groups)
    out: dict[str, Any] = {
        "densities": densities,
        "in_sample": regression.predict_cells(x, densities),
        "cv": None,
        "fold": None,
        "n_splits": k if k >= 2 else 0,
    }
    if k >= 2:
        res = regression.cross_validate(x, y, g, n_splits=k, **opts)
        out["cv"], out["fold"] = res.predicted, res.fold
    return out


def repeated_cv(x, y, groups, n_splits: int, repeats: int, fit_options=None) -> dict[str, Any]:
    """R² and MAE of the fit over ``repeats`` shuffled group splits: mean and spread (sd).

    One `regression.cross_validate` is one assignment of groups to folds; its score moves
    with the assignment alone (`popdask.protocol`), so a figure is quoted with that spread.
    """
    from popdask import protocol

    known = np.isfinite(y) & (y >= 0)
    folds = protocol.repeated_group_folds(groups[known], n_splits, repeats, seed=0)
    xk, yk, gk = x[known], y[known], groups[known]
    opts = dict(fit_options or {})

    def method(train: np.ndarray) -> np.ndarray:
        return xk @ regression.fit_densities(xk[train], yk[train], gk[train], **opts)

    s = protocol.summary(yk, protocol.cross_predict(method, folds))
    return {"repeats": int(repeats), **{k: v for k, v in s.items() if k.endswith(("_mean", "_sd"))}}


# --------------------------------------------------------------------------------------------
# Coarse to fine
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coarse:
    """Cells aggregated to blocks of ``factor × factor`` cells (see `aggregate`).

    Attributes
    ----------
    factor : int
        Block side in cells.
    fractions : numpy.ndarray, shape (by, bx, n_clusters)
        Pixel-weighted mean of the cells' fractions: the share of the block's pixels in
        each cluster. Set for every block; meaningful for complete ones.
    census : numpy.ndarray, shape (by, bx)
        Sum of the cells' counts; NaN unless the block is complete.
    complete : numpy.ndarray, shape (by, bx), bool
        The block lies inside the region and all its cells are known.
    block : numpy.ndarray, shape (ny, nx), int64
        Flat index (``row * bx + col``) of the block of each cell.
    """

    factor: int
    fractions: np.ndarray
    census: np.ndarray
    complete: np.ndarray
    block: np.ndarray

    def cells_in_complete(self) -> np.ndarray:
        """``(ny, nx)`` bool: the cell lies in a complete block."""
        return self.complete.ravel()[self.block]


def aggregate(fractions, census, factor: int) -> Coarse:
    """Aggregate 1 km cells to ``factor × factor`` blocks.

    Parameters
    ----------
    fractions : array_like, shape (ny, nx, n_clusters)
        Cell fractions (count of cluster pixels / pixels per cell; every cell has the same
        number of pixels, so the pixel-weighted mean of a block is the mean of its cells).
    census : array_like, shape (ny, nx)
        Counts; NaN for unusable cells (such a cell makes its block incomplete).
    factor : int
        Block side in cells (>= 1).

    Returns
    -------
    Coarse
        Blocks indexed from the region's north-west corner; blocks cut by the region's
        edge (fewer than ``factor²`` cells) are never complete.
    """
    f = int(factor)
    if f < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    fr, cen = _cell_arrays(fractions, census)
    ny, nx, k = fr.shape
    by, bx = -(-ny // f), -(-nx // f)
    pad = ((0, by * f - ny), (0, bx * f - nx))
    frp = np.pad(fr, (*pad, (0, 0)))
    cenp = np.pad(cen, pad, constant_values=np.nan)
    known = np.isfinite(cenp) & (cenp >= 0)
    complete = known.reshape(by, f, bx, f).all(axis=(1, 3))
    counts = np.where(known, cenp, 0.0).reshape(by, f, bx, f).sum(axis=(1, 3))
    counts[~complete] = np.nan
    bfr = frp.reshape(by, f, bx, f, k).sum(axis=(1, 3)) / (f * f)
    r, c = np.meshgrid(np.arange(ny) // f, np.arange(nx) // f, indexing="ij")
    return Coarse(f, bfr, counts, complete, (r * bx + c).astype(np.int64))


def coarse_to_fine(
    fractions,
    census,
    factor: int,
    *,
    groups_per: int = 1,
    n_splits: int = 5,
    cell_km2: float = 1.0,
    fit_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit densities on ``factor × factor`` blocks and score each 1 km cell with them.

    Parameters
    ----------
    fractions : array_like, shape (ny, nx, n_clusters)
        Cell fractions.
    census : array_like, shape (ny, nx)
        Cell counts, NaN where unusable.
    factor : int
        Block side in cells.
    groups_per : int, default 1
        Cross-validation groups are squares of ``groups_per × groups_per`` blocks (so that
        they cover about the same ground as the 1 km groups).
    n_splits : int, default 5
        Folds of the cross-validation; it is run only when the complete blocks fall in at
        least ``n_splits`` groups and every training part has at least two blocks.
    cell_km2 : float, default 1.0
        Cell area (for the bias by density class).
    fit_options : mapping, optional
        Options of `popdask.regression.fit_densities`.

    Returns
    -------
    dict
        ``report``: JSON-able (``blocks``, ``cells``, ``block_in_sample`` scores of the fit
        at the block level, ``in_sample`` and ``cv`` (or None, with ``cv_skipped``) each with
        ``model``/``rescaled`` scores at 1 km, ``baseline_areal`` scores, and
        ``bias_by_class`` of the raw model); ``maps``: ``(ny, nx)`` predictions
        ``in_sample``, ``cv``, ``rescaled``, ``cv_rescaled``, ``areal`` (NaN outside complete
        blocks or where not computed) and ``fold`` (test fold of each cell, -1 none);
        ``densities``: the block-fitted densities per 1 km cell (None with < 2 blocks).
    """
    opts = dict(fit_options or {})
    fr = np.asarray(fractions, dtype=np.float64)
    cen = np.asarray(census, dtype=np.float64)
    agg = aggregate(fr, cen, factor)
    f2 = float(agg.factor**2)
    ny, nx, k = fr.shape
    by, bx = agg.complete.shape
    bgroups = block_groups((by, bx), groups_per).ravel()
    bF = agg.fractions.reshape(-1, k)
    bY = agg.census.ravel()
    n_blocks = int(agg.complete.sum())
    inside = agg.cells_in_complete()
    report: dict[str, Any] = {
        "factor": agg.factor,
        "blocks": n_blocks,
        "cells": int(inside.sum()),
        "groups_per": int(groups_per),
    }
    nanmap = np.full((ny, nx), np.nan)
    maps = {m: nanmap.copy() for m in ("in_sample", "cv", "rescaled", "cv_rescaled", "areal")}
    maps["fold"] = np.full((ny, nx), -1, dtype=np.int64)
    if n_blocks < 2:
        report.update(in_sample=None, cv=None, skipped=f"only {n_blocks} complete block(s)")
        return {"report": report, "maps": maps, "densities": None}

    obs = np.where(inside, cen, np.nan)
    blk_count = bY[agg.block]  # (ny, nx): count of the cell's block (NaN if incomplete)
    maps["areal"] = np.where(inside, blk_count / f2, np.nan)

    def rescaled(pred: np.ndarray) -> np.ndarray:
        """Scale each block's predicted cells to the block's count (uniform if all zero)."""
        sums = np.bincount(agg.block[inside], weights=pred[inside], minlength=by * bx)
        s = sums[agg.block]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(s > 0, pred * blk_count / s, blk_count / f2)
        return np.where(inside, out, np.nan)

    # a cluster's support counts in blocks here: a share of a 1 km cell is 1 / f² of that
    opts = {"min_support": regression.MIN_SUPPORT / f2, **opts}
    dens_blk = regression.fit_densities(bF, bY, bgroups, **opts)
    dens = dens_blk / f2  # persons in a full block → persons in a full 1 km cell
    pred = np.where(inside, fr @ dens, np.nan)
    maps["in_sample"], maps["rescaled"] = pred, rescaled(pred)
    report["block_in_sample"] = regression.scores(bY, bF @ dens_blk)
    report["in_sample"] = {
        "model": regression.scores(obs, pred),
        "rescaled": regression.scores(obs, maps["rescaled"]),
    }
    report["baseline_areal"] = regression.scores(obs, maps["areal"])
    report["bias_by_class"] = {"in_sample": bias_by_class(obs, pred, cell_km2)}

    # Cross-validation: folds of whole groups of complete blocks; the test cells are the
    # cells of the test blocks, predicted with densities fitted on the other blocks only.
    from sklearn.model_selection import GroupKFold

    cblocks = np.flatnonzero(agg.complete.ravel())
    cgroups = bgroups[cblocks]
    n_groups = len(np.unique(cgroups))
    why = None
    if n_groups < n_splits:
        why = f"{n_groups} group(s) of complete blocks < n_splits={n_splits}"
    else:
        folds = list(GroupKFold(n_splits).split(cblocks, groups=cgroups))
        if min(len(tr) for tr, _ in folds) < 2:
            why = "a training part would have fewer than 2 blocks"
    if why:
        report.update(cv=None, cv_skipped=why)
        return {"report": report, "maps": maps, "densities": dens}
    cv_pred = nanmap.copy()
    for j, (train, test) in enumerate(folds):
        ytr = np.full(by * bx, np.nan)
        ytr[cblocks[train]] = bY[cblocks[train]]
        d = regression.fit_densities(bF, ytr, bgroups, **opts) / f2
        cells = np.isin(agg.block, cblocks[test])
        cv_pred[cells] = fr[cells] @ d
        maps["fold"][cells] = j
    maps["cv"], maps["cv_rescaled"] = cv_pred, rescaled(cv_pred)
    report["n_splits"] = int(n_splits)
    report["cv"] = {
        "model": regression.scores(obs, cv_pred),
        "rescaled": regression.scores(obs, maps["cv_rescaled"]),
    }
    report["bias_by_class"]["cv"] = bias_by_class(obs, cv_pred, cell_km2)
    return {"report": report, "maps": maps, "densities": dens}


# --------------------------------------------------------------------------------------------
# Against a known truth
# --------------------------------------------------------------------------------------------


def _block_sums(a: np.ndarray, px: int) -> np.ndarray:
    """Sums over ``px × px`` squares (trailing rows/columns cut), NaN if any pixel is NaN."""
    ny, nx = (a.shape[0] // px) * px, (a.shape[1] // px) * px
    return a[:ny, :nx].reshape(ny // px, px, nx // px, px).sum(axis=(1, 3))


def truth_scores(
    estimates: Mapping[str, np.ndarray],
    truth,
    *,
    resolution: float = 20.0,
    scales: Sequence[int] = (1, 5, 50),
) -> dict[str, dict[str, Any]]:
    """Score per-pixel population estimates against the true population.

    Every estimate is scored on the same pixels: those where the truth and all estimates
    are finite (an aggregate is left out when any of its pixels is).

    Parameters
    ----------
    estimates : mapping of str to numpy.ndarray, each (y, x)
        Persons per pixel, e.g. ``{"population": ..., "model_unrescaled": ...}``.
    truth : array_like, shape (y, x)
        True persons per pixel.
    resolution : float, default 20.0
        Pixel size in metres (to name the scales).
    scales : sequence of int, default (1, 5, 50)
        Aggregation factors in pixels (20 m, 100 m, 1 km at 20 m).

    Returns
    -------
    dict
        Per estimate: per scale name (``"20m"``, ``"100m"``, ``"1000m"``) the
        `popdask.regression.scores` (r2, mae, rmse, r2_log1p, n), and ``total_error``
        (Σ estimate / Σ truth − 1 over the scored pixels).
    """
    t = np.asarray(truth, dtype=np.float64)
    ests = {k: np.asarray(v, dtype=np.float64) for k, v in estimates.items()}
    for name, e in ests.items():
        if e.shape != t.shape:
            raise ValueError(f"estimate {name!r} has shape {e.shape}, the truth {t.shape}")
    ok = np.isfinite(t)
    for e in ests.values():
        ok &= np.isfinite(e)
    if not ok.any():
        raise ValueError("no pixel where the truth and every estimate are finite")
    out: dict[str, dict[str, Any]] = {}
    for name, e in ests.items():
        entry: dict[str, Any] = {}
        for px in scales:
            label = f"{round(px * resolution)}m"
            tt = _block_sums(np.where(ok, t, np.nan), px)
            ee = _block_sums(np.where(ok, e, np.nan), px)
            keep = np.isfinite(tt) & np.isfinite(ee)
            entry[label] = regression.scores(tt[keep], ee[keep])
        entry["total_error"] = float(e[ok].sum() / t[ok].sum() - 1.0) if t[ok].sum() else None
        out[name] = entry
    return out


def uniform_population(census, cell_px: int) -> np.ndarray:
    """The areal-weighting baseline: each pixel gets ``census / cell_px²`` (NaN unknown)."""
    c = np.asarray(census, dtype=np.float64) / float(cell_px) ** 2
    return np.repeat(np.repeat(c, cell_px, axis=0), cell_px, axis=1)


# --------------------------------------------------------------------------------------------
# Everything on arrays
# --------------------------------------------------------------------------------------------


def evaluate_cells(
    fractions,
    census,
    *,
    n_splits: int = 5,
    cells_per_block: int = 5,
    coarse_factors: Sequence[int] = (2, 5),
    min_valid: float = 0.5,
    cell_km2: float = 1.0,
    fit_options: Mapping[str, Any] | None = None,
    n_clusters: int | None = None,
    coarse_columns: Sequence[int] | None = None,
    repeats: int = 10,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The cell-level protocol (1 km fit, bias by class, coarse to fine) on arrays.

    Parameters
    ----------
    fractions : array_like, shape (ny, nx, n_columns)
        Cell fractions: the cluster fractions, optionally followed by covariate-weighted
        fractions (:mod:`popdask.terms`; every column is fitted alike).
    census : array_like, shape (ny, nx)
        Census counts; NaN unknown.
    n_splits : int, default 5
        Cross-validation folds.
    cells_per_block : int, default 5
        Side, in cells, of the spatial groups of the 1 km cross-validation.
    coarse_factors : sequence of int, default (2, 5)
        Coarse block sides in cells for the coarse-to-fine protocol.
    min_valid : float, default 0.5
        Cells whose share of labelled pixels is below this are left out (as in the run).
    cell_km2 : float, default 1.0
        Cell area in km².
    fit_options : mapping, optional
        Options of `popdask.regression.fit_densities`.
    n_clusters : int, optional
        How many of the first columns are cluster fractions (default: all); only they count
        towards a cell's share of labelled pixels.
    coarse_columns : sequence of int, optional
        Columns the coarse-to-fine protocol fits (default: all). The run's context term is
        painted with densities fitted on the 1 km census, which that protocol must not see.
    repeats : int, default 10
        Shuffled group splits of the repeated cross-validation (`popdask.protocol`): its
        mean and spread are ``fit_1km.cv_repeated``; 0 leaves it out.

    Returns
    -------
    (dict, dict)
        The JSON-able report and the ``(ny, nx)`` maps: ``census`` (usable cells),
        ``in_sample``, ``cv`` predictions, and ``densities`` (n_columns,).
    """
    fr, cen = _cell_arrays(fractions, census)
    ny, nx, k = fr.shape
    n_clusters = k if n_clusters is None else int(n_clusters)
    usable = _usable(fr[..., :n_clusters], cen, min_valid)
    y = np.where(usable, cen, np.nan)
    groups = block_groups((ny, nx), cells_per_block)
    fit = fit_cells(
        fr.reshape(-1, k), y.ravel(), groups.ravel(), n_splits=n_splits, fit_options=fit_options
    )
    in_sample = fit["in_sample"].reshape(ny, nx)
    cv = None if fit["cv"] is None else fit["cv"].reshape(ny, nx)
    report: dict[str, Any] = {
        "cells": {
            "total": int(ny * nx),
            "census_known": int((np.isfinite(cen) & (cen >= 0)).sum()),
            "used": int(usable.sum()),
            "min_valid": float(min_valid),
        },
        "clusters": n_clusters,
        "terms": int(k // n_clusters) - 1,
        "clusters_with_density": int((fit["densities"][:n_clusters] > 0).sum()),
        "cv_groups": len(np.unique(groups[usable])),
        "n_splits": fit["n_splits"],
        "fit_1km": {
            "in_sample": regression.scores(y, in_sample),
            "cv": None if cv is None else regression.scores(y, cv),
        },
        "bias_by_class": {
            "in_sample": bias_by_class(y, in_sample, cell_km2),
            "cv": None if cv is None else bias_by_class(y, cv, cell_km2),
        },
        "coarse_to_fine": {},
    }
    if repeats > 0 and fit["n_splits"] >= 2:
        report["fit_1km"]["cv_repeated"] = repeated_cv(
            fr.reshape(-1, k), y.ravel(), groups.ravel(), fit["n_splits"], repeats, fit_options
        )
    for f in coarse_factors:
        per = max(1, round(cells_per_block / f))  # groups of about the 1 km groups' size
        res = coarse_to_fine(
            fr if coarse_columns is None else fr[..., list(coarse_columns)],
            y,
            f,
            groups_per=per,
            n_splits=n_splits,
            cell_km2=cell_km2,
            fit_options=fit_options,
        )
        report["coarse_to_fine"][f"{f}x{f}"] = res["report"]
    maps = {
        "census": y,
        "in_sample": in_sample,
        "cv": np.full((ny, nx), np.nan) if cv is None else cv,
        "densities": fit["densities"],
    }
    return report, maps


# --------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------


def plot_evaluation(
    census,
    predicted,
    path: str | Path,
    *,
    in_sample=None,
    extent: Sequence[float] | None = None,
    title: str = "out of fold",
    dpi: int = 110,
) -> Path:
    """Write a PNG: predicted vs census (1:1 line), the census map and the residual map.

    Parameters
    ----------
    census : array_like, shape (ny, nx)
        Census per cell (NaN unknown/unused).
    predicted : array_like, shape (ny, nx)
        The predictions shown (e.g. out of fold); residual = predicted − census.
    path : str or pathlib.Path
        PNG to write (parent folders are created).
    in_sample : array_like, shape (ny, nx), optional
        In-sample predictions, drawn in grey behind ``predicted`` in the scatter.
    extent : sequence of 4 float, optional
        ``[left, right, bottom, top]`` of the maps (e.g. km); default cell indices.
    title : str, default "out of fold"
        Name of ``predicted`` in the titles.
    dpi : int, default 110

    Returns
    -------
    pathlib.Path
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import SymLogNorm, TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    obs = np.asarray(census, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    if obs.shape != pred.shape or obs.ndim != 2:
        raise ValueError(f"census {obs.shape} and predicted {pred.shape} must be equal 2-D")
    ok = np.isfinite(obs) & np.isfinite(pred)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(16.5, 5.4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    try:
        ax_sc, ax_cen, ax_res = fig.subplots(1, 3)
        top = 1.0
        if in_sample is not None:
            ins = np.asarray(in_sample, dtype=np.float64)
            ok_in = np.isfinite(obs) & np.isfinite(ins)
            ax_sc.scatter(
                obs[ok_in],
                ins[ok_in],
                s=7,
                color="0.65",
                alpha=0.6,
                linewidths=0,
                label="in-sample",
                rasterized=True,
            )
            if ok_in.any():
                top = max(top, float(ins[ok_in].max()))
        ax_sc.scatter(
            obs[ok],
            pred[ok],
            s=9,
            color="tab:blue",
            alpha=0.7,
            linewidths=0,
            label=title,
            rasterized=True,
        )
        if ok.any():
            top = max(top, float(obs[ok].max()), float(pred[ok].max()))
        lims = (0.0, top * 1.2)
        ax_sc.plot(lims, lims, color="0.2", linewidth=1, linestyle="--", label="1:1")
        ax_sc.set_xscale("symlog", linthresh=10.0)
        ax_sc.set_yscale("symlog", linthresh=10.0)
        ax_sc.set_xlim(lims)
        ax_sc.set_ylim(lims)
        ax_sc.set_aspect("equal")
        ax_sc.grid(True, linewidth=0.4, alpha=0.5)
        ax_sc.set_xlabel("census (persons per cell)")
        ax_sc.set_ylabel("predicted (persons per cell)")
        ax_sc.legend(loc="upper left", frameon=False)
        r2 = regression.scores(obs[ok], pred[ok])["r2"] if ok.any() else float("nan")
        ax_sc.set_title(f"predicted ({title}) vs census\nR² = {r2:.3f}, n = {int(ok.sum())}")

        bad = (0.8, 0.8, 0.8)
        cmax = float(np.nanmax(obs)) if np.isfinite(obs).any() else 1.0
        im = ax_cen.imshow(
            np.ma.masked_invalid(obs),
            cmap=colormaps["viridis"].with_extremes(bad=bad),
            norm=SymLogNorm(linthresh=10.0, vmin=0.0, vmax=max(cmax, 10.0)),
            extent=extent,
            interpolation="nearest",
        )
        fig.colorbar(im, ax=ax_cen, shrink=0.85, label="persons per cell")
        ax_cen.set_title("census per cell (grey: unknown / unused)")

        res = np.where(ok, pred - obs, np.nan)
        lim = float(np.nanpercentile(np.abs(res), 99)) if ok.any() else 1.0
        lim = max(lim, 1.0)
        im = ax_res.imshow(
            np.ma.masked_invalid(res),
            cmap=colormaps["RdBu_r"].with_extremes(bad=bad, over="darkred", under="navy"),
            norm=TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim),
            extent=extent,
            interpolation="nearest",
        )
        fig.colorbar(im, ax=ax_res, shrink=0.85, extend="both", label="persons per cell")
        ax_res.set_title(f"residual: predicted ({title}) − census")
        for ax in (ax_cen, ax_res):
            if extent is not None:
                ax.set_xlabel("x (km, EPSG:3035)")
                ax.set_ylabel("y (km)")
                ax.ticklabel_format(useOffset=False, style="plain")
                ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
                ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        fig.savefig(path, dpi=dpi, format="png")
    finally:
        fig.clear()
    return path


# --------------------------------------------------------------------------------------------
# I/O: the store, the truth raster, the JSON
# --------------------------------------------------------------------------------------------


def load_truth(path: str | Path, bounds: Sequence[float], resolution: float) -> np.ndarray:
    """Read a true-population raster (persons per pixel) over ``bounds`` on the run's grid.

    Parameters
    ----------
    path : str or pathlib.Path
        A single-band raster in EPSG:3035 with the grid's pixel size and alignment.
    bounds : sequence of 4 float
        ``(xmin, ymin, xmax, ymax)`` of the run's grid.
    resolution : float
        The grid's pixel size in metres.

    Returns
    -------
    numpy.ndarray, (y, x) float64
        Nodata pixels are NaN.

    Raises
    ------
    ValueError
        If the raster has another pixel size or alignment, or does not cover ``bounds``.
    """
    import rasterio
    from rasterio.windows import from_bounds

    with rasterio.open(path) as src:
        tf = src.transform
        if not (math.isclose(tf.a, resolution) and math.isclose(-tf.e, resolution)):
            raise ValueError(
                f"{path}: pixel size ({tf.a}, {-tf.e}) m is not the grid's {resolution} m"
            )
        if src.crs is not None and src.crs.to_epsg() not in (None, 3035):
            raise ValueError(f"{path}: CRS {src.crs} is not EPSG:3035")
        win = from_bounds(*bounds, transform=tf)
        off = (win.col_off, win.row_off, win.width, win.height)
        if any(abs(v - round(v)) > 1e-6 for v in off):
            raise ValueError(f"{path}: pixels are not aligned with the grid {tuple(bounds)}")
        c0, r0, w, h = (round(v) for v in off)
        if c0 < 0 or r0 < 0 or c0 + w > src.width or r0 + h > src.height:
            raise ValueError(f"{path}: does not cover the grid {tuple(bounds)}")
        arr = src.read(1, window=((r0, r0 + h), (c0, c0 + w)), masked=True)
    return np.ma.filled(arr.astype(np.float64), np.nan)


def _region_terms(ds, reg: Mapping, reg_attrs: Mapping) -> np.ndarray | None:
    """The run's covariate terms over the whole region (in memory: for demo-sized runs)."""
    from popdask import terms

    names = list(reg_attrs.get("terms") or [])
    if not names:
        return None
    li, ri = terms.intensity_bands(list(ds.composite.attrs["band_kind"]))
    comp = ds.composite
    return terms.pixel_terms(
        names,
        labels=ds.cluster.values,
        lights=comp[li].values if li else None,
        radar=comp[ri].values if ri else None,
        pilot=reg.get("pilot"),
        sigma_px=float(reg_attrs.get("context_sigma_px", 0.0)),
        scale=reg.get("term_scale"),
    )


def _n_clusters(path: str, so, densities: np.ndarray | None, attrs: Mapping) -> int:
    if densities is not None:
        return int(densities.shape[0])
    from popdask import store as _store

    try:
        arrays, _ = _store.load_arrays(path, "model", so)
        return int(arrays["centroids"].shape[0])
    except KeyError:
        pass
    summary = attrs.get("model") or {}
    if "clusters" in summary:
        return int(summary["clusters"])
    raise ValueError(f"{path}: no model or densities saved; cannot tell the number of clusters")


def evaluate(
    store,
    *,
    truth=None,
    n_splits: int = 5,
    block: float = 5000.0,
    storage_options: Mapping[str, Any] | None = None,
    figure: str | Path | None = None,
    coarse: Sequence[float] = COARSE_SIZES,
    fit_options: Mapping[str, Any] | None = None,
    json_path: str | Path | None = None,
    max_cells: int = evalsample.MAX_CELLS,
    window: int = evalsample.SIDE,
) -> dict[str, Any]:
    """Evaluate a finished run's store with the protocol of this module.

    Parameters
    ----------
    store : str or pathlib.Path
        Path or fsspec URL of the run's Zarr store (every tile complete).
    truth : array_like, shape (y, x), optional
        True persons per pixel on the run's grid (the demo's ``truth.tif``, see
        `load_truth`): adds the ``truth`` section.
    n_splits : int, default 5
        Cross-validation folds.
    block : float, default 5000.0
        Side in metres of the spatial groups of the cross-validation.
    storage_options : mapping, optional
        fsspec options for a remote store.
    figure : str or pathlib.Path, optional
        Write the scatter + residual-map PNG there.
    coarse : sequence of float, default (2000, 5000)
        Block sides in metres of the coarse-to-fine protocol (multiples of the cell).
    fit_options : mapping, optional
        Options of `popdask.regression.fit_densities` (default: the run's `regression.loss`
        when the store records it, else the current default; a store written before it was
        configurable was fitted with `{"loss": "poisson"}`).
    json_path : str or pathlib.Path, optional
        Write the report there as JSON (``evaluation.json``).
    max_cells : int, default `popdask.evalsample.MAX_CELLS`
        A region of more cells is scored on windows of it (`popdask.evalsample`), so the
        client holds a bounded part of the store whatever the region; ``truth`` then cannot
        be given.
    window : int, default `popdask.evalsample.SIDE`
        Side in cells of those windows (rounded to whole tiles).

    Returns
    -------
    dict
        JSON-able: ``store``, ``grid``, ``protocol``, ``cells``, ``clusters``, ``fit_1km``
        (``in_sample``/``cv`` scores), ``stored_model`` (scores of the stored ``predicted``
        and how far the refitted densities are from the stored ones), ``bias_by_class``,
        ``coarse_to_fine`` (per ``"2x2"``/``"5x5"`` block), ``truth`` (when given),
        ``timings_s``. Unavailable numbers are None.

    Raises
    ------
    ValueError
        If the store is not a finished popdask run, or ``truth`` has the wrong shape.
    """
    from popdask import store as _store
    from popdask.predict import pixel_population

    t0 = time.perf_counter()
    path = str(store)
    so = dict(storage_options or {})
    if not _store.exists(path, so):
        raise ValueError(f"{path} is not a popdask store")
    status = _store.tile_status(path, so)
    if not np.all(status == _store.COMPLETE):
        raise ValueError(
            f"{path}: {int((status != _store.COMPLETE).sum())} of {status.size} tiles are not "
            "complete; finish the run first (see `popdask status`)"
        )
    ds = _store.open_store(path, so)
    attrs = dict(ds.attrs)
    grid = attrs["popdask"]["grid"]
    res, cell = float(grid["resolution"]), float(grid["cell"])
    cell_px = round(cell / res)
    try:
        reg, reg_attrs = _store.load_arrays(path, "regression", so)
        stored_dens = np.asarray(reg["densities"], dtype=np.float64)
    except KeyError:
        reg, reg_attrs, stored_dens = {}, {}, None
    run_reg = (attrs.get("config") or {}).get("regression") or {}
    min_valid = float(run_reg.get("min_valid", 0.5))
    if fit_options is None and "loss" in run_reg:  # the run's own fit; else the default
        fit_options = {"loss": run_reg["loss"]}
    run_terms = list(reg_attrs.get("terms") or [])
    k = int(reg_attrs.get("n_clusters") or _n_clusters(path, so, stored_dens, attrs))
    stored_terms = (_store.term_names(path, so) or []) if run_terms else []
    layers = [stored_terms.index(n) for n in run_terms]
    # the run's fit columns: cluster fractions, then the term-weighted ones
    names = ["clusters", *run_terms]
    coarse_columns = [j * k + c for j, n in enumerate(names) if n != "context" for c in range(k)]
    g = Grid(
        tuple(grid["bounds"]), resolution=grid["resolution"], cell=grid["cell"], tile=grid["tile"]
    )
    windows = evalsample.choose_windows(
        path, g, max_cells=max_cells, side=window, storage_options=so
    )
    whole = len(windows) == 1 and windows[0].shape == g.cell_shape
    if truth is not None and not whole:
        raise ValueError(
            f"{path}: truth scores need the whole region, and its "
            f"{g.cell_shape[0] * g.cell_shape[1]} cells are more than max_cells={max_cells}; "
            "raise max_cells or score a smaller region"
        )
    fractions = evalsample.mosaic(
        [
            evalsample.window_design(
                path, g, w, k=k, layers=layers, scale=reg.get("term_scale"), storage_options=so
            )
            for w in windows
        ]
    )
    census = evalsample.mosaic([evalsample.window_cells(path, "census", w, so) for w in windows])
    t_read = time.perf_counter() - t0

    per = max(int(block // cell), 1)
    factors = []
    for size in coarse:
        f = size / cell
        if f < 1 or abs(f - round(f)) > 1e-9:
            raise ValueError(f"coarse block {size} m is not a multiple of the cell ({cell} m)")
        factors.append(round(f))
    cell_km2 = (cell / 1000.0) ** 2
    report, maps = evaluate_cells(
        fractions,
        census,
        n_splits=n_splits,
        cells_per_block=per,
        coarse_factors=factors,
        min_valid=min_valid,
        cell_km2=cell_km2,
        fit_options=fit_options,
        n_clusters=k,
        coarse_columns=coarse_columns,
    )
    usable = np.isfinite(maps["census"])
    stored: dict[str, Any] = {"densities_saved": stored_dens is not None}
    if "predicted" in ds:
        pred_stored = evalsample.mosaic(
            [evalsample.window_cells(path, "predicted", w, so) for w in windows]
        )
        if np.isfinite(pred_stored[usable]).all():
            stored["scores"] = regression.scores(maps["census"], pred_stored)
    if stored_dens is not None and stored_dens.shape == maps["densities"].shape:
        diff = np.abs(stored_dens - maps["densities"])
        stored["densities_max_abs_diff"] = float(diff.max())
    out: dict[str, Any] = {
        "store": path,
        "grid": {k_: grid[k_] for k_ in ("bounds", "resolution", "cell", "tile") if k_ in grid},
        "protocol": {
            "block_m": float(block),
            "cells_per_block": per,
            "n_splits": int(n_splits),
            "coarse_m": [float(c) for c in coarse],
            "terms": run_terms,
            "coarse_terms": [t for t in run_terms if t != "context"],
            "windows": {  # what was scored: the whole region, or windows of it
                "whole_region": whole,
                "count": len(windows),
                "cells": int(sum(w.shape[0] * w.shape[1] for w in windows)),
            },
            "fit_options": dict(fit_options or {}),
            "density_classes_per_km2": {
                "edges": list(CLASS_EDGES),
                "names": list(CLASSES),
            },
        },
        **report,
        "stored_model": stored,
    }

    if truth is not None:
        t = np.asarray(truth, dtype=np.float64)
        pop = ds.population.values.astype(np.float64)
        if t.shape != pop.shape:
            raise ValueError(f"truth has shape {t.shape}; the store's grid is {pop.shape}")
        ests = {"population": pop}
        if "density" in ds:  # the smoothed product, back in persons per pixel
            ests["density_smoothed"] = ds.density.values.astype(np.float64) * (res * res / 1e6)
        if stored_dens is not None:
            ests["model_unrescaled"] = pixel_population(
                ds.cluster.values, stored_dens, cell_px, _region_terms(ds, reg, reg_attrs)
            ).astype(np.float64)
        ests["baseline_uniform"] = uniform_population(census, cell_px)
        scales = (1, max(round(100 / res), 1), cell_px)
        out["truth"] = truth_scores(ests, t, resolution=res, scales=scales)
        if "population_lower" in ds:  # the intervals' empirical coverage
            from popdask.uncertainty import truth_coverage

            sides = [ds[v].values for v in ("population_lower", "population_upper")]
            cells = [ds[v].values for v in ("cell_lower", "cell_upper")]
            out["intervals"] = truth_coverage(*sides, *cells, t, cell_px, max(round(100 / res), 1))

    if figure is not None:
        from popdask.plot import _extent_km

        plot_evaluation(
            maps["census"],
            maps["cv"] if np.isfinite(maps["cv"]).any() else maps["in_sample"],
            figure,
            in_sample=maps["in_sample"],
            extent=_extent_km(ds.census, "y_cell", "x_cell") if whole else None,
            title="out of fold" if np.isfinite(maps["cv"]).any() else "in-sample",
        )
        out["figure"] = str(figure)
    out["timings_s"] = {
        "read": round(t_read, 2),
        "total": round(time.perf_counter() - t0, 2),
    }
    out = _jsonable(out)
    if json_path is not None:
        write_json(out, json_path)
    return out


def write_json(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``report`` as indented JSON (NaN/inf as null); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False))
    return path


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN and inf become None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
