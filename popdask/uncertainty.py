"""Intervals for the estimate: a spatial block bootstrap of the densities fit, carried
through prediction and rescaling, widened by the model's out-of-fold error at 1 km.

With ``regression.bootstrap: B`` (0: no intervals) the fit is repeated on ``B`` resamples
of its 5 km blocks of cells, drawn with replacement (:func:`bootstrap_densities`): a
block, not a cell, is the unit, since neighbouring cells' errors are alike. Each predict
task maps every replicate's densities as the run's own (mask and census rescaling
included) and keeps, per pixel, the ``(1 − level) / 2`` and ``(1 + level) / 2`` quantiles
over the replicates, times the same quantiles of the fit's out-of-fold log error at 1 km
(:func:`log_error_bounds`): ``population_lower`` and ``population_upper``. Per cell,
``cell_lower`` and ``cell_upper`` are the model's interval for the cell's count *without*
its census (the replicates' counts, widened alike): what a cell whose census is unknown
gets.

What they hold: the uncertainty of the densities (which blocks of census cells the fit
saw) and the model's typical error between 1 km cells, assumed to hold for the allocation
within a cell too. What they do not: errors of the composite and of the clusters (the
labels are taken as they are), errors of the census itself, and the correlation between
pixels: a pixel's interval is its own; summing the bounds of many pixels gives an interval
for their sum that holds only as well as their errors move together.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: the coverage the intervals aim at (5 % and 95 % quantiles)
LEVEL = 0.9


def bootstrap_densities(
    design: np.ndarray,
    population: np.ndarray,
    groups: np.ndarray,
    fit: Callable[..., np.ndarray],
    *,
    n: int,
    seed: int = 0,
) -> np.ndarray:
    """``(n, n_columns)`` densities, each fitted by ``fit(X, y, groups)`` on the cells of
    the spatial ``groups`` drawn with replacement (as many draws as groups with a known
    population); a group drawn twice counts twice, as two groups."""
    known = np.isfinite(population) & (population >= 0)
    ids = np.unique(groups[known])
    rows = {g: np.flatnonzero(known & (groups == g)) for g in ids}
    rng = np.random.default_rng([seed, 7919])
    out = []
    for _ in range(n):
        drawn = rng.choice(ids, size=len(ids), replace=True)
        idx = np.concatenate([rows[g] for g in drawn])
        relabel = np.repeat(np.arange(len(drawn)), [len(rows[g]) for g in drawn])
        out.append(fit(design[idx], population[idx], relabel))
    return np.vstack(out)


def log_error_bounds(
    observed: np.ndarray, predicted: np.ndarray, level: float = LEVEL
) -> tuple[float, float]:
    """The ``(1 ∓ level) / 2`` quantiles of ``log((observed + 1) / (predicted + 1))`` over the
    cells where both are known: the model's out-of-fold error at 1 km, as a factor."""
    ok = np.isfinite(observed) & np.isfinite(predicted) & (observed >= 0)
    err = np.log1p(observed[ok]) - np.log1p(np.maximum(predicted[ok], 0.0))
    lo, hi = np.quantile(err, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bounds(
    replicates: np.ndarray, log_bounds: tuple[float, float], level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds over the replicates' axis 0, widened by the 1 km error:
    ``q_lo(replicates) · e^lo`` and ``q_hi(replicates) · e^hi`` (a factor, the same at every
    scale: a pixel holds a fraction of a person)."""
    q_lo, q_hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2], axis=0)
    lo, hi = log_bounds
    lower = np.maximum(q_lo * np.exp(min(lo, 0.0)), 0)
    upper = np.maximum(q_hi * np.exp(max(hi, 0.0)), 0)
    return lower.astype(np.float32), upper.astype(np.float32)


def coverage(lower: np.ndarray, upper: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Share of the places whose true count lies within their interval, over all places
    and over those where someone lives (a true count of at least one person)."""
    ok = np.isfinite(lower) & np.isfinite(upper) & np.isfinite(truth)
    inside = (truth >= lower - 1e-6) & (truth <= upper + 1e-6)
    lived = ok & (truth >= 1)
    return {
        "coverage": float(inside[ok].mean()) if ok.any() else float("nan"),
        "coverage_populated": float(inside[lived].mean()) if lived.any() else float("nan"),
        "places": int(ok.sum()),
        "median_width_populated": float(np.median((upper - lower)[lived])) if lived.any() else 0.0,
    }


def truth_coverage(
    lower: np.ndarray,
    upper: np.ndarray,
    cell_lower: np.ndarray,
    cell_upper: np.ndarray,
    truth: np.ndarray,
    cell_px: int,
    block_px: int = 5,
) -> dict[str, float]:
    """Empirical coverage against a known truth: at 100 m (``block_px`` pixels; the bounds
    of its pixels summed) and at 1 km (the cells' model interval, without their census)."""

    def blocks(a: np.ndarray, k: int) -> np.ndarray:
        ny, nx = (a.shape[0] // k) * k, (a.shape[1] // k) * k
        return a[:ny, :nx].reshape(ny // k, k, nx // k, k).sum(axis=(1, 3), dtype=np.float64)

    fine = coverage(blocks(lower, block_px), blocks(upper, block_px), blocks(truth, block_px))
    cells = coverage(cell_lower, cell_upper, blocks(truth, cell_px))
    out = {}
    for scale, res in (("100m", fine), ("1km", cells)):
        out[f"interval_coverage_{scale}"] = res["coverage"]
        out[f"interval_coverage_{scale}_populated"] = res["coverage_populated"]
        out[f"interval_median_width_{scale}_populated"] = res["median_width_populated"]
    return out
