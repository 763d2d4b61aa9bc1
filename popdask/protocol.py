"""The accuracy protocol: repeated grouped cross-validation, its spread, and the decision rule.

A setting is scored on several regions (generated regions of two generators and the real
cells), each with many shuffled group splits: ``n_repeats`` assignments of whole groups
(5 km tiles or blocks) to ``n_splits`` folds. Every repeat gives one out-of-fold score; the
table reports their mean and standard deviation (the *spread*: how much the score moves
with the split alone). A refinement is adopted only if it beats the simpler method by more
than that spread (`adopt`); otherwise the simpler one is kept ("one standard error" rule).

``benchmarks/protocol.py`` runs it and prints the table; benchmarks/README.md holds the
figures. All functions are pure NumPy (no I/O).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from popdask.regression import scores

__all__ = [
    "adopt",
    "bounded_densities",
    "coarse_to_fine",
    "cross_predict",
    "group_folds",
    "nnls_densities",
    "repeated_group_folds",
    "summary",
]


def group_folds(groups, n_splits: int = 5, seed: int = 0) -> np.ndarray:
    """Fold of every row: whole groups, shuffled by ``seed``, into ``n_splits`` folds.

    Groups are taken in a random order and each is put in the fold holding the fewest rows
    so far, so folds are about equal in rows (as ``GroupKFold``) but differ with the seed.

    Returns
    -------
    numpy.ndarray, shape (n,), int64
        Fold ``0 … n_splits - 1`` of each row; a group is never in two folds.
    """
    g = np.asarray(groups)
    names, inverse, sizes = np.unique(g, return_inverse=True, return_counts=True)
    if not 2 <= n_splits <= len(names):
        raise ValueError(f"n_splits={n_splits} needs 2 <= n_splits <= groups ({len(names)})")
    order = np.random.default_rng(seed).permutation(len(names))
    fill = np.zeros(n_splits, np.int64)
    fold_of = np.empty(len(names), np.int64)
    for i in order:
        f = int(np.argmin(fill))
        fold_of[i] = f
        fill[f] += sizes[i]
    return fold_of[inverse.ravel()]


def repeated_group_folds(
    groups, n_splits: int = 5, n_repeats: int = 10, seed: int = 0
) -> np.ndarray:
    """``(n_repeats, n)`` folds: `group_folds` with seeds ``seed … seed + n_repeats - 1``."""
    return np.stack([group_folds(groups, n_splits, seed + r) for r in range(n_repeats)])


def cross_predict(method: Callable[[np.ndarray], np.ndarray], folds: np.ndarray) -> np.ndarray:
    """Out-of-fold predictions of ``method`` for every repeat.

    Parameters
    ----------
    method : callable
        ``method(train)`` with ``train`` a boolean row mask returns a prediction for every
        row, fitted on the training rows only (it may build its own design, e.g. a context
        term from a pilot fit on ``train``).
    folds : ndarray, shape (n_repeats, n)
        From `repeated_group_folds`.

    Returns
    -------
    numpy.ndarray, shape (n_repeats, n)
    """
    folds = np.atleast_2d(folds)
    out = np.empty(folds.shape)
    for r, fold in enumerate(folds):
        for f in np.unique(fold):
            test = fold == f
            out[r, test] = np.asarray(method(~test), np.float64)[test]
    return out


def coarse_to_fine(predicted: np.ndarray, observed, groups) -> tuple[np.ndarray, np.ndarray]:
    """Each group's observed total spread to its rows in proportion to ``predicted``.

    The test closest to what popdask does: a 5 km tile's census total redistributed to its
    1 km cells with densities fitted on other tiles. Rows of a group whose predictions sum
    to 0 get the areal share.

    Returns
    -------
    (spread, areal) : numpy.ndarray, shape predicted.shape
        The redistributed counts and the areal weighting baseline (total / rows).
    """
    y = np.asarray(observed, np.float64)
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    inv = inv.ravel()
    total = np.bincount(inv, weights=y)
    count = np.bincount(inv)
    areal = (total / count)[inv]
    pred = np.atleast_2d(np.maximum(np.asarray(predicted, np.float64), 0.0))
    spread = np.empty(pred.shape)
    for r, p in enumerate(pred):
        s = np.bincount(inv, weights=p, minlength=len(total))[inv]
        with np.errstate(invalid="ignore", divide="ignore"):
            spread[r] = np.where(s > 0, total[inv] * p / s, areal)
    return spread.reshape(np.shape(predicted)), areal


def summary(observed, predicted: np.ndarray) -> dict[str, list[float] | float]:
    """Mean and standard deviation over the repeats (rows of ``predicted``) of R² and MAE.

    Returns
    -------
    dict
        ``r2``, ``mae``: the per-repeat values; ``r2_mean``, ``r2_sd``, ``mae_mean``, ``mae_sd``.
    """
    rows = [scores(observed, p) for p in np.atleast_2d(predicted)]
    out: dict[str, list[float] | float] = {}
    for key in ("r2", "mae"):
        v = np.array([s[key] for s in rows])
        out[key] = v.tolist()
        out[f"{key}_mean"] = float(v.mean())
        out[f"{key}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return out


def adopt(
    simple: Mapping[str, Sequence[float]],
    refined: Mapping[str, Sequence[float]],
    *,
    higher_is_better: bool = True,
) -> tuple[bool, dict[str, float]]:
    """The decision rule: does ``refined`` beat ``simple`` across regions by more than the
    spread?

    Parameters
    ----------
    simple, refined : mapping region → per-repeat (or per-seed) scores
        The same regions and, per region, paired repeats (same splits or seeds).
    higher_is_better : bool
        True for R², False for MAE.

    Returns
    -------
    (adopted, gains)
        ``gains`` per region: the mean paired gain divided by the region's spread (the larger
        standard deviation of the two methods over the repeats). ``adopted`` when the gain
        averaged over the regions exceeds the spread averaged over them (both in the score's
        units, so a region whose spread happens to be tiny does not decide alone) and no
        region loses more than its own spread.
    """
    gains, diffs, spreads = {}, [], []
    for region, a in simple.items():
        a, b = np.asarray(a, np.float64), np.asarray(refined[region], np.float64)
        d = float(((b - a) if higher_is_better else (a - b)).mean())
        spread = max(_sd(a), _sd(b))
        gains[region] = d / spread if spread > 0 else float(np.sign(d) * np.inf)
        diffs.append(d)
        spreads.append(spread)
    adopted = np.mean(diffs) > np.mean(spreads) and min(gains.values()) >= -1.0
    return bool(adopted), gains


def _sd(v: np.ndarray) -> float:
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def nnls_densities(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Plain non-negative least squares ``min ‖x w − y‖², w ≥ 0`` (`scipy.optimize.nnls`)."""
    from scipy.optimize import nnls

    x = np.asarray(x, np.float64)
    return nnls(x, np.asarray(y, np.float64), maxiter=50 * x.shape[1])[0]


def bounded_densities(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with ``0 ≤ w_k ≤ max(y)``: no cluster holds more people per fully
    covered cell than the densest cell of the training census (`scipy.optimize.lsq_linear`,
    bounded-variable least squares)."""
    from scipy.optimize import lsq_linear

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    top = max(float(y.max()), 1.0)
    return lsq_linear(x, y, bounds=(0.0, top), method="bvls").x
