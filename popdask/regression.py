"""Cluster fractions per 1 km cell, bounded density fits and spatial cross-validation.

Step 4 of the method (DESIGN.md): for every 1 km census cell, the fraction of its 20 m pixels
in each cluster; then ``census(cell) ≈ Σ_k fraction_k(cell) × density_k`` with every
``density_k ≥ 0``, no intercept and no transform, so a pixel of cluster ``k`` holds
``density_k / cell_px²`` persons and a cell's pixels sum to its estimate.

The default fit is plain non-negative least squares (``loss="squared", alpha=0``). In the
accuracy protocol (`popdask.protocol`, benchmarks/README.md "Accuracy protocol": generated
regions of two generators and the real cells, repeated grouped cross-validation) no other
fit beat it by more than the spread of the splits on every region: the quasi-Poisson
committee lowers the 1 km MAE on the real cells but lowers the 100 m R² of a valley region
by more than its spread; the others are kept as options:

``loss="poisson"``
    Quasi-Poisson regression with the identity link (variance ``max(mu, floor)``) and a
    ridge chosen by an inner grouped cross-validation; returns the mean of the inner-fold
    fits (a committee). Reproduces the training total; fewer large errors on big cells.
``loss="absolute"``
    A committee of least-absolute-deviation fits weighted by a quasi-Poisson pilot
    (``abs_power``, ``abs_floor``), optionally blended with the quasi-Poisson committee
    (``blend``): the conditional median, lowest MAE, undercounts held-out totals.
``loss="squared"`` with ``alpha=None``
    Ridge-penalised NNLS, its strength chosen by inner cross-validation (a committee).

Solvers: every fit is a projected Newton method whose bound-constrained quadratic steps are
solved by Lawson and Hanson's active-set algorithm on the normal equations (exact NNLS for
``loss="squared", alpha=0``); the L1 fits are linear programmes solved in their dual form
(HiGHS). All functions are pure: no I/O, no printing.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

__all__ = [
    "CVResult",
    "cell_fractions",
    "cross_validate",
    "fit_densities",
    "predict_cells",
    "scores",
]

#: Ridge strengths tried by the inner cross-validation, per loss. ``alpha`` is dimensionless:
#: the penalty is ``alpha / (2 ȳ) · ‖w‖²`` in units of the quasi-log-likelihood (ȳ = mean count).
#: For ``loss="absolute"`` they are those of its quasi-Poisson component (used when ``blend < 1``).
DEFAULT_ALPHAS: dict[str, tuple[float, ...]] = {
    "absolute": (0.0, 1e-3, 3e-3, 1e-2, 3e-2),
    "poisson": (0.0, 1e-3, 3e-3, 1e-2, 3e-2),
    "squared": (0.0, 0.03, 0.1, 0.3, 1.0),
}

#: Weights of the robust fit tried when ``blend=None`` (inner CV, held-out mean absolute error).
DEFAULT_BLENDS: tuple[float, ...] = tuple(np.round(np.linspace(0.0, 1.0, 11), 10))

_OPTIONS = {
    "loss": "squared",
    "alpha": "auto",
    "alphas": None,
    "inner_splits": 5,
    "average_folds": True,
    "floor": 1.0,
    "max_iter": 100,
    "tol": 1e-8,
    "abs_power": 0.5,
    "abs_floor": 10.0,
    "blend": 1.0,
    "blends": DEFAULT_BLENDS,
}


# --------------------------------------------------------------------------------------------
# Cluster fractions
# --------------------------------------------------------------------------------------------


def cell_cluster_index(
    labels: np.ndarray, n_clusters: int, cell_px: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(index, valid)``: for each labelled pixel (``valid``), ``cell · n_clusters + label``,
    the bin of its (cell, cluster) pair in a ``np.bincount`` of ``cells × n_clusters`` bins.

    Raises ValueError if a label is outside ``[-1, n_clusters - 1]``.
    """
    labels = np.asarray(labels)
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < -1 or hi >= n_clusters:
            raise ValueError(
                f"labels must lie in [-1, {n_clusters - 1}] (n_clusters={n_clusters}, "
                f"-1 = no data); found values from {lo} to {hi}"
            )
    nx = labels.shape[1] // cell_px
    valid = labels >= 0
    row_cell = np.arange(labels.shape[0]) // cell_px
    col_cell = np.arange(labels.shape[1]) // cell_px
    cell = row_cell[:, None] * nx + col_cell[None, :]
    index = cell[valid].astype(np.int64) * n_clusters + labels[valid].astype(np.int64)
    return index, valid


def _fractions_block(
    block: np.ndarray, n_clusters: int, cell_px: int, bins: tuple | None = None
) -> np.ndarray:
    """Counts per cell and cluster of one numpy block, divided by ``cell_px**2`` (float32);
    ``bins`` is `cell_cluster_index` of the block if already computed."""
    ny, nx = block.shape[0] // cell_px, block.shape[1] // cell_px
    index, _ = cell_cluster_index(block, n_clusters, cell_px) if bins is None else bins
    counts = np.bincount(index, minlength=ny * nx * n_clusters)
    out = counts.reshape(ny, nx, n_clusters).astype(np.float32)
    out /= np.float32(cell_px * cell_px)
    return out


def cell_fractions(labels, n_clusters: int, *, cell_px: int = 50, bins=None):
    """Fraction of each cell's pixels that fall in each cluster.

    Parameters
    ----------
    labels : numpy.ndarray or dask.array.Array, shape (y, x), integer
        Cluster id per 20 m pixel; ``-1`` means no data.
    n_clusters : int
        Number of clusters; every label must be in ``[-1, n_clusters - 1]``.
    cell_px : int, default 50
        Cell edge in pixels (50 × 20 m = 1 km).
    bins : tuple of numpy.ndarray, optional
        `cell_cluster_index` of NumPy ``labels`` if already computed (it is shared with
        :func:`popdask.terms.weighted_fractions`).

    Returns
    -------
    numpy.ndarray or dask.array.Array, shape (y // cell_px, x // cell_px, n_clusters), float32
        Count of pixels of cluster k in each cell divided by ``cell_px**2``: a row sums to the
        share of valid pixels (1.0 when all pixels have data). Same array type as ``labels``;
        for dask input the result is lazy (one task per input chunk, no I/O).

    Raises
    ------
    ValueError
        If ``labels`` is not 2-D integer, ``y`` or ``x`` is not a multiple of ``cell_px``, a
        dask chunk is not a multiple of ``cell_px``, or a label is out of range (for dask input
        the last one is raised at compute time).

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((2, 4), dtype=np.int16)
    >>> lab[:, 2:] = -1
    >>> cell_fractions(lab, 3, cell_px=2)[0]
    array([[1., 0., 0.],
           [0., 0., 0.]], dtype=float32)
    """
    n_clusters = int(n_clusters)
    cell_px = int(cell_px)
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if cell_px < 1:
        raise ValueError(f"cell_px must be >= 1, got {cell_px}")
    is_dask = _is_dask(labels)
    if not is_dask:
        labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (y, x); got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must have an integer dtype (cluster ids, -1 = no data); got {labels.dtype}"
        )
    ny, nx = labels.shape
    if ny % cell_px or nx % cell_px:
        raise ValueError(
            f"labels shape {labels.shape} is not a multiple of cell_px={cell_px} along "
            f"{'y' if ny % cell_px else 'x'}: the grid must be cut on whole cells"
        )
    if not is_dask:
        return _fractions_block(labels, n_clusters, cell_px, bins)

    import dask.array as da
    from dask.base import tokenize

    for axis, name in enumerate(("y", "x")):
        bad = [c for c in labels.chunks[axis] if c % cell_px]
        if bad:
            raise ValueError(
                f"every dask chunk of labels must be a multiple of cell_px={cell_px} pixels; "
                f"chunks along {name} are {labels.chunks[axis]} (e.g. {bad[0]}). Rechunk on "
                f"cell (tile) edges first, e.g. labels.rechunk({10 * cell_px})"
            )
    chunks = (
        tuple(c // cell_px for c in labels.chunks[0]),
        tuple(c // cell_px for c in labels.chunks[1]),
        (n_clusters,),
    )
    return da.map_blocks(
        _fractions_block,
        labels,
        n_clusters,
        cell_px,
        chunks=chunks,
        new_axis=2,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        name=f"cell-fractions-{tokenize(labels, n_clusters, cell_px)}",
    )


#: Cells a fit on a dask design sees at the most (and the pipeline's default
#: ``regression.fit_cells``): the fit holds about four copies of its float64 design, so
#: 100,000 cells × 450 columns keep the client under 2 GB (benchmarks/README.md "A
#: continent on a cluster"), 220 cells per column.
FIT_CELLS = 100_000


def _is_dask(x: Any) -> bool:
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - dask is a hard dependency
        return False
    return isinstance(x, da.Array)


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def _neg_quasi_loglik(mu: np.ndarray, y: np.ndarray, loss: str, floor: float, scale: float):
    """Per-cell negative quasi-log-likelihood (up to terms constant in ``mu``).

    ``poisson``: variance ``max(mu, floor)``; above ``floor`` this is ``mu - y log mu``, below
    it the quadratic that continues it with matching value and slope (convex, C¹, finite for
    ``mu <= 0``). ``squared``: variance ``scale`` (constant), i.e. ``(y - mu)² / (2 scale)``.
    """
    if loss == "squared":
        return (y - mu) ** 2 / (2.0 * scale)
    out = np.empty_like(mu)
    hi = mu >= floor
    m = mu[hi]
    out[hi] = m - y[hi] * np.log(m)
    m = mu[~hi] - floor
    yl = y[~hi]
    out[~hi] = floor - yl * np.log(floor) - (yl - floor) * m / floor + m * m / (2.0 * floor)
    return out


def _box_qp(
    x: np.ndarray,
    weight: np.ndarray,
    ridge: float,
    w: np.ndarray,
    grad: np.ndarray,
    support: np.ndarray | None = None,
    x_sq: np.ndarray | None = None,
) -> np.ndarray:
    """Exact minimiser over ``v >= 0`` of ``gradᵀ(v − w) + ½ (v − w)ᵀ H (v − w)``.

    ``H = xᵀ diag(weight) x + (ridge + jitter) I`` (``weight >= 0``; the jitter
    ``1e-12 · trace(xᵀ diag(weight) x) / k`` keeps it positive definite). Lawson and Hanson's
    active-set NNLS algorithm on the normal equations: ``H`` is never formed, only its rows
    and columns for the positive coordinates (a p × p Cholesky factorisation per change of
    that set, plus matrix–vector products with ``x``); ``support`` (e.g. ``w > 0``) is the
    initial guess of that set, so a warm start from the previous solution's support needs a
    few small factorisations instead of one k × k Gram matrix and its factor. ``x`` should be
    Fortran-ordered (column gathers); ``x_sq`` is ``x * x`` if already computed.
    """
    k = x.shape[1]
    diag = (x * x if x_sq is None else x_sq).T @ weight  # diagonal of xᵀ diag(weight) x
    shift = ridge + 1e-12 * max(float(diag.sum()), 1e-300) / k
    # q(v) = ½ vᵀHv − bᵀv + const, and a scale per coordinate for the optimality test
    b = x.T @ (weight * (x @ w)) + shift * w - grad
    scale = np.abs(b) + (diag + shift) * np.abs(w).max() + 1e-300

    # the columns of H computed so far, on the rows of the same coordinates
    hess = np.empty((k, k))
    known = np.zeros(k, dtype=bool)

    def solve(idx: np.ndarray) -> np.ndarray:
        new = idx[~known[idx]]
        if len(new):
            old = np.flatnonzero(known)
            xn = x[:, new] * weight[:, None]
            hess[np.ix_(old, new)] = cross = x[:, old].T @ xn
            hess[np.ix_(new, old)] = cross.T
            hess[np.ix_(new, new)] = x[:, new].T @ xn
            hess[new, new] += shift
            known[new] = True
        h = hess[np.ix_(idx, idx)]
        _, s, info = scipy.linalg.lapack.dposv(h, b[idx], lower=1)
        if info == 0:
            return s
        return np.linalg.lstsq(h, b[idx], rcond=None)[0]  # numerically singular: least norm

    v = np.zeros(k)
    passive = np.zeros(k, dtype=bool) if support is None else support.copy()
    while passive.any():  # warm start: the support's unconstrained minimiser, made positive
        idx = np.flatnonzero(passive)
        s = solve(idx)
        if (s > 0).all():
            v[idx] = s
            break
        passive[idx[s <= 0]] = False
    rejected = np.zeros(k, dtype=bool)
    for _ in range(10 * k + 10):
        idx = np.flatnonzero(passive)
        neg_grad = b - (x.T @ (weight * (x[:, idx] @ v[idx])) + shift * v)  # −∇q(v)
        cand = ~passive & ~rejected & (neg_grad > 1e-10 * scale)
        if not cand.any():
            break
        j = int(np.flatnonzero(cand)[np.argmax(neg_grad[cand] / scale[cand])])
        passive[j] = True
        first = True
        while passive.any():
            idx = np.flatnonzero(passive)
            s = solve(idx)
            if (s > 0).all():
                v[idx] = s
                break
            if first and s[np.searchsorted(idx, j)] <= 0:  # round-off: j cannot enter
                passive[j] = False
                rejected[j] = True
                break
            first = False
            # step from v towards s until the first coordinate reaches 0; drop it
            vp = v[idx]
            neg = np.flatnonzero(s <= 0)
            ratio = vp[neg] / (vp[neg] - s[neg])
            m = int(np.argmin(ratio))
            vp = vp + ratio[m] * (s - vp)
            drop = vp <= 1e-14 * np.abs(vp).max()
            drop[neg[m]] = True
            vp[drop] = 0.0
            v[idx] = vp
            passive[idx[drop]] = False
    return np.maximum(v, 0.0)


def _weighted_lad(x: np.ndarray, y: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``argmin_{w >= 0} Σ scale_i |y_i − x_i w|`` (``scale > 0``), exactly, by linear programming.

    Solved in its dual form, ``max yᵀd`` subject to ``xᵀd <= 0`` and ``|d_i| <= scale_i``: ``n``
    box-bounded variables and only one constraint per cluster, which HiGHS' dual simplex solves
    in a fraction of a second for thousands of cells. By LP duality the densities are minus the
    multipliers of the ``xᵀd <= 0`` constraints (non-negative up to round-off, clipped at 0).
    """
    from scipy.optimize import linprog

    k = x.shape[1]
    bounds = np.column_stack([-scale, scale])
    res = linprog(-y, A_ub=x.T, b_ub=np.zeros(k), bounds=bounds, method="highs-ds")
    if res.status != 0 or getattr(res, "ineqlin", None) is None:  # pragma: no cover - the
        # dual is feasible (d = 0) and bounded (boxes), so HiGHS only fails on numerical trouble
        raise RuntimeError(f"least-absolute-deviation LP failed: {res.message}")
    return np.maximum(-np.asarray(res.ineqlin.marginals, dtype=np.float64), 0.0)


def _abs_scale(pilot_mu: np.ndarray, power: float, floor: float) -> np.ndarray:
    """L1 weights ``max(mu, floor) ** (-power / 2)``, normalised to mean 1."""
    s = np.maximum(pilot_mu, floor) ** (-0.5 * power)
    return s / s.mean()


#: A cluster whose pixels add up to less than 5 % of a census cell among the cells of a fit
#: (125 pixels of 20 m) gets density 0 there: from so few pixels any density fits a residual
#: or two (held out, one such cluster of 29 pixels made a cell of 1,054 people 407,128).
MIN_SUPPORT = 0.05


def _fit_one(
    x: np.ndarray,
    y: np.ndarray,
    alpha: float,
    *,
    loss: str,
    floor: float,
    max_iter: int,
    tol: float,
    w0: np.ndarray | None = None,
) -> np.ndarray:
    """Penalised non-negative quasi-likelihood fit by projected Newton with a line search.

    Each iteration minimises the second-order model of the penalised objective (the exact
    gradient and Hessian in ``mu``) over ``w >= 0`` exactly (`_box_qp`, warm-started from the
    current support), then backtracks on the exact objective. Should a Newton step fail to
    lower it (round-off where the Hessian is nearly singular), the iteration is retried with
    the expected (Fisher) information, which is bounded away from zero.
    """
    n = len(y)
    x = np.asfortranarray(x)  # column gathers in `_box_qp`
    x_sq = x * x
    ybar = max(float(y.mean()), floor)  # scale of the penalty (and the squared-loss variance)
    ridge = alpha / ybar  # penalty ridge/2 ‖w‖² in quasi-log-likelihood units
    if w0 is None or loss == "squared":
        # Constant variance ȳ: weights 1/ȳ, a single box-constrained QP solves it exactly.
        zero = np.zeros(x.shape[1])
        w0 = _box_qp(x, np.full(n, 1.0 / ybar), ridge, zero, -(x.T @ y) / ybar, x_sq=x_sq)
        if loss == "squared":
            return w0

    # Half the quasi-deviance (>= 0, zero for a perfect fit) plus the penalty, so that ``tol``
    # is relative to a meaningful scale rather than to an arbitrary constant.
    saturated = float(_neg_quasi_loglik(y, y, loss, floor, ybar).sum())

    def objective(mu: np.ndarray, w: np.ndarray) -> float:
        nql = _neg_quasi_loglik(mu, y, loss, floor, ybar).sum() - saturated
        return float(nql + 0.5 * ridge * (w @ w))

    w = np.maximum(w0, 0.0)
    mu = x @ w
    f = objective(mu, w)
    for _ in range(max_iter):
        # first and second derivatives of the per-cell loss in mu (the quadratic below floor)
        hi = mu >= floor
        m = np.where(hi, mu, floor)
        grad = x.T @ np.where(hi, 1.0 - y / m, (mu - y) / floor) + ridge * w
        for curvature in (np.where(hi, y / (m * m), 1.0 / floor), 1.0 / m):  # Newton, Fisher
            step = _box_qp(x, curvature, ridge, w, grad, support=w > 0, x_sq=x_sq) - w
            dmu = x @ step
            t = 1.0
            f_new = objective(mu + dmu, w + step)
            while f_new > f and t > 1e-8:
                t *= 0.5
                f_new = objective(mu + t * dmu, w + t * step)
            if f_new <= f:
                break
        if f_new > f:
            break
        w = w + t * step
        mu = x @ w
        converged = f - f_new <= tol * f
        f = f_new
        if converged:
            break
    return np.maximum(w, 0.0)


def _inner_folds(groups: np.ndarray | None, n: int, n_splits: int) -> list[np.ndarray]:
    """Held-out index arrays: whole groups (GroupKFold) or contiguous row blocks."""
    if groups is not None:
        uniq = np.unique(groups)
        if len(uniq) >= 2:
            from sklearn.model_selection import GroupKFold

            k = min(n_splits, len(uniq))
            return [te for _, te in GroupKFold(k).split(np.zeros(n), groups=groups)]
    k = min(n_splits, n)
    return list(np.array_split(np.arange(n), k))


def _parse_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for fit_densities; allowed: {sorted(_OPTIONS)}"
        )
    opts = {**_OPTIONS, **options}
    if opts["loss"] not in DEFAULT_ALPHAS:
        raise ValueError(f"loss must be one of {sorted(DEFAULT_ALPHAS)}, got {opts['loss']!r}")
    if isinstance(opts["alpha"], str) and opts["alpha"] == "auto":
        opts["alpha"] = 0.0 if opts["loss"] == "squared" else None
    if opts["alpha"] is not None and not (np.isfinite(opts["alpha"]) and opts["alpha"] >= 0):
        raise ValueError(f"alpha must be a finite number >= 0 or None, got {opts['alpha']!r}")
    if opts["alphas"] is None:
        opts["alphas"] = DEFAULT_ALPHAS[opts["loss"]]
    alphas = tuple(float(a) for a in opts["alphas"])
    if not alphas or any(not np.isfinite(a) or a < 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty sequence of numbers >= 0, got {alphas}")
    opts["alphas"] = alphas
    if int(opts["inner_splits"]) < 2:
        raise ValueError(f"inner_splits must be >= 2, got {opts['inner_splits']}")
    if not opts["floor"] > 0:
        raise ValueError(f"floor must be > 0 (persons), got {opts['floor']}")
    if not (np.isfinite(opts["abs_power"]) and opts["abs_power"] >= 0):
        raise ValueError(f"abs_power must be a finite number >= 0, got {opts['abs_power']!r}")
    if not (np.isfinite(opts["abs_floor"]) and opts["abs_floor"] > 0):
        raise ValueError(f"abs_floor must be > 0 (persons), got {opts['abs_floor']!r}")
    blend = opts["blend"]
    if blend is not None and not (np.isfinite(blend) and 0.0 <= blend <= 1.0):
        raise ValueError(f"blend must be a number in [0, 1] or None, got {blend!r}")
    blends = tuple(float(b) for b in opts["blends"])
    if not blends or any(not (np.isfinite(b) and 0.0 <= b <= 1.0) for b in blends):
        raise ValueError(f"blends must be a non-empty sequence of numbers in [0, 1], got {blends}")
    opts["blends"] = blends
    return opts


def _known(fractions, population, groups):
    """Validate inputs; return the rows with known population."""
    x = np.asarray(fractions, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"fractions must be 2-D (n_cells, n_clusters); got shape {x.shape}")
    pop = np.asarray(population, dtype=np.float64)
    if pop.ndim != 1 or len(pop) != len(x):
        raise ValueError(
            f"population must have shape ({len(x)},) to match fractions {x.shape}; got {pop.shape}"
        )
    if np.isinf(pop).any():
        raise ValueError("population contains ±inf; use NaN (or a negative value) for unknown")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (len(x),):
            raise ValueError(
                f"groups must have shape ({len(x)},) to match fractions {x.shape}; "
                f"got {groups.shape}"
            )
    known = np.isfinite(pop) & (pop >= 0)
    xk = x[known]
    if not np.isfinite(xk).all():
        raise ValueError(
            f"fractions contain NaN/inf in {int((~np.isfinite(xk).all(axis=1)).sum())} cells "
            "with known population"
        )
    if (xk < 0).any():
        raise ValueError("fractions must be >= 0")
    return xk, pop[known], (None if groups is None else groups[known]), known


def fit_densities(
    fractions,
    population,
    groups=None,
    *,
    max_cells: int = FIT_CELLS,
    seed: int = 0,
    min_support: float | None = None,
    **options,
) -> np.ndarray:
    """Fit non-negative persons-per-cluster densities to census counts.

    Parameters
    ----------
    fractions : array_like or dask.array.Array, shape (n_cells, n_clusters)
        Share of each cell's pixels in each cluster (rows sum to ~1; see `cell_fractions`).
        A dask array (rows chunked) is never gathered whole: the fit sees a uniform sample
        of its known cells, at most about ``max_cells`` of them (`sample_known`).
    population : array_like, shape (n_cells,)
        Census count per cell; NaN or negative means unknown and the cell is ignored.
    groups : array_like, shape (n_cells,), optional
        Spatial group per cell (e.g. a 5 km block id). Used only for the inner
        cross-validation (the committee members, the ridge strength, the blend weight); a
        group is never split across inner folds. Without groups (or with fewer than two
        distinct groups among the known cells) the inner folds are contiguous blocks of rows,
        which are spatial blocks when the rows are in raster/tile order.
    min_support : float, optional
        A cluster whose fractions add up to less than this over the known cells gets 0
        (default :data:`MIN_SUPPORT`, 5 % of a cell; a fit on blocks of ``f × f`` cells passes
        ``MIN_SUPPORT / f²``).
    **options
        loss : {"squared", "poisson", "absolute"}, default "squared"
            ``"squared"``: non-negative (ridge) least squares; with the default ``alpha=0``
            plain NNLS, the protocol's choice (module docstring). ``"poisson"``:
            quasi-Poisson, variance ``max(mu, floor)``. ``"absolute"``: the robust L1
            committee (optionally blended with the quasi-Poisson fit, see ``blend``).
        abs_power : float, default 0.5
            ``"absolute"`` only: the L1 loss weights cell ``i`` by
            ``max(m̂_i, abs_floor) ** (-abs_power / 2)``, ``m̂`` a quasi-Poisson pilot fit on the
            same cells (0: plain least absolute deviations; 1: Pearson residuals of the
            quasi-Poisson model).
        abs_floor : float, default 10.0
            ``"absolute"`` only: floor in persons on the pilot prediction in those weights.
        blend : float in [0, 1] or None, default 1.0
            ``"absolute"`` only: weight of the robust fit in ``blend · robust + (1 − blend) ·
            quasi-Poisson`` (both committees, or both refits without ``average_folds``).
            None: chosen from ``blends`` by the held-out mean absolute error of the inner folds.
        blends : sequence of float in [0, 1], default 0, 0.1, …, 1
            Candidates for ``blend=None``.
        alpha : float, None or "auto", default "auto"
            Ridge strength (dimensionless: penalty ``alpha / (2 ȳ) ‖w‖²`` in quasi-likelihood
            units, ȳ the mean known count). None: chosen from ``alphas`` by inner CV (and the
            inner-fold fits averaged, ``average_folds``). "auto": 0 (plain NNLS) for
            ``"squared"``, None (the committees) for the other losses. For
            ``"absolute"`` it applies to the quasi-Poisson pilot (None → 0, unpenalised) and
            the blended quasi-Poisson component.
        alphas : sequence of float, default `DEFAULT_ALPHAS` [loss]
            Candidates for the inner CV (held-out quasi-likelihood).
        inner_splits : int, default 5
            Inner folds (at most the number of groups).
        average_folds : bool, default True
            With inner CV, return the mean of the inner-fold fits (at the chosen alpha) — a
            cross-validation committee — instead of one refit on all known cells.
        floor : float, default 1.0
            Variance floor in persons for the Poisson loss.
        max_iter : int, default 100; tol : float, default 1e-8
            Newton iterations of each fit; stop when an iteration lowers the penalised
            quasi-deviance by less than ``tol`` times its value.

    Returns
    -------
    numpy.ndarray, shape (n_clusters,), float64
        Persons in a 1 km cell entirely covered by each cluster; all ``>= 0``. A cluster
        absent from the known cells, or covering less than 5 % of a cell of them in all
        (:data:`MIN_SUPPORT`), gets 0. Predict with `predict_cells`.

    Raises
    ------
    ValueError
        On shape mismatches, non-finite or negative fractions in known cells, fewer than two
        known cells, or known cells with no valid pixel at all.
    TypeError
        On an unknown option.
    """
    opts = _parse_options(options)
    if _is_dask(fractions):
        sample = sample_known(fractions, population, groups, max_cells=max_cells, seed=seed)
        # the float32 rows are dropped as soon as their float64 copy exists
        fractions, population, groups = np.asarray(sample[0], np.float64), *sample[1:]
        del sample
    x, y, g, _ = _known(fractions, population, groups)
    out = np.zeros(x.shape[1])
    # a cluster with too few pixels among these cells is not estimable: 0, as if absent
    support = x.sum(axis=0)
    least = MIN_SUPPORT if min_support is None else min_support
    enough = support >= least if (support >= least).any() else support > 0
    with _small_blas(x.size):
        out[enough] = _fit_densities(x[:, enough], y, g, opts)
    return out


def sample_known(fractions, population, groups=None, *, max_cells: int = FIT_CELLS, seed: int = 0):
    """The rows of a dask ``fractions`` (rows chunked) the fit sees, as NumPy arrays.

    Every row with a known population is kept with probability ``min(1, max_cells /
    known rows)``, decided by a hash of its row number and ``seed``
    (`popdask.reductions.uniform`, as the pipeline picks cells), so about ``max_cells`` rows
    reach the client; the rest are read and dropped blockwise on the workers.

    Returns
    -------
    fractions, population, groups
        NumPy arrays of the kept rows (``groups`` None when not given); the fractions as
        float32, the precision of the pipeline's own design, so half the bytes travel.
    """
    import dask
    import dask.array as da

    from popdask.reductions import sample_share, uniform

    x = fractions
    rows = (x.chunks[0],)
    pop = da.asarray(population).rechunk(rows)
    known = da.isfinite(pop) & (pop >= 0)
    share = sample_share(max_cells, int(known.sum().compute()))
    index = da.arange(x.shape[0], chunks=rows)
    keep = known & (index.map_blocks(uniform, seed, dtype=np.float64) < share)
    g = None if groups is None else da.asarray(groups).rechunk(rows)[keep]
    x, pop, g = dask.compute(x[keep].astype(np.float32), pop[keep], g)
    return np.asarray(x), np.asarray(pop), (None if g is None else np.asarray(g))


def _small_blas(size: int) -> contextlib.AbstractContextManager:
    """One BLAS thread for the many small (cells × clusters) products of a regional fit.

    Multi-threaded OpenBLAS on the small Cholesky factors and 4,000 × 150 products of the
    active-set solver is slower than one thread, and dramatically so (30×, measured) when
    dask workers share the cores. Large problems (more than ~30,000 cells × 150 clusters)
    keep the BLAS threads.
    """
    if size > 5_000_000:
        return contextlib.nullcontext()
    controller = _blas_controller()
    if controller is None:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


@functools.cache
def _blas_controller():
    """One threadpoolctl controller per process (finding the libraries takes ~8 ms)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover
        return None
    return ThreadpoolController()


def _fit_densities(x: np.ndarray, y: np.ndarray, g: np.ndarray | None, opts: dict) -> np.ndarray:
    if len(y) < 2:
        raise ValueError(f"need at least 2 cells with known population to fit; got {len(y)}")
    if not (x.sum(axis=1) > 0).any():
        raise ValueError("no cell with known population has any valid (labelled) pixel")
    kw = {
        "loss": "poisson" if opts["loss"] == "absolute" else opts["loss"],
        "floor": float(opts["floor"]),
        "max_iter": int(opts["max_iter"]),
        "tol": float(opts["tol"]),
    }
    if opts["loss"] == "absolute":
        return _fit_absolute(x, y, g, opts, kw)

    alphas = opts["alphas"]
    if opts["alpha"] is not None:
        return _fit_one(x, y, float(opts["alpha"]), **kw)
    if len(alphas) == 1 and not opts["average_folds"]:
        return _fit_one(x, y, alphas[0], **kw)

    folds = _inner_folds(g, len(y), int(opts["inner_splits"]))
    fits, best = _alpha_path(x, y, folds, alphas, kw)
    if opts["average_folds"]:
        return fits[best].mean(axis=0)
    return _fit_one(x, y, alphas[best], **kw)


def _alpha_path(
    x: np.ndarray, y: np.ndarray, folds: list[np.ndarray], alphas: tuple[float, ...], kw: dict
) -> tuple[np.ndarray, int]:
    """Inner-fold fits ``(n_alphas, n_folds, k)`` and the index of the best held-out alpha."""
    fits = np.empty((len(alphas), len(folds), x.shape[1]))
    held_out = np.zeros(len(alphas))
    for j, test in enumerate(folds):
        train = np.ones(len(y), dtype=bool)
        train[test] = False
        xtr, ytr = np.asfortranarray(x[train]), y[train]
        scale = max(float(ytr.mean()), kw["floor"])
        w = None if j == 0 else fits[0, j - 1]  # warm start across folds ...
        for i, alpha in enumerate(alphas):  # ... and along the path
            w = _fit_one(xtr, ytr, alpha, w0=w, **kw)
            fits[i, j] = w
            mu = x[test] @ w
            held_out[i] += _neg_quasi_loglik(mu, y[test], kw["loss"], kw["floor"], scale).sum()
    return fits, int(np.argmin(held_out))  # ties → the first (smallest alpha in the default grid)


def _robust_one(x: np.ndarray, y: np.ndarray, opts: dict, kw: dict) -> np.ndarray:
    """One pilot-weighted L1 fit: quasi-Poisson pilot (``alpha`` or 0), then the weighted LAD."""
    pilot = _fit_one(x, y, float(opts["alpha"] or 0.0), **kw)
    scale = _abs_scale(x @ pilot, float(opts["abs_power"]), float(opts["abs_floor"]))
    return _weighted_lad(x, y, scale)


def _choose_blend(
    y: np.ndarray, pred_robust: np.ndarray, pred_poisson: np.ndarray, blends: tuple[float, ...]
) -> float:
    """The weight of the robust fit with the smallest held-out mean absolute error."""
    err = [np.abs((b * pred_robust + (1.0 - b) * pred_poisson) - y).mean() for b in blends]
    return float(blends[int(np.argmin(err))])  # ties → the first


def _fit_absolute(
    x: np.ndarray, y: np.ndarray, g: np.ndarray | None, opts: dict, kw: dict
) -> np.ndarray:
    """The robust L1 committee, optionally blended with the quasi-Poisson one."""
    blend = opts["blend"]
    need_poisson = blend is None or blend < 1.0
    alpha = opts["alpha"]
    need_folds = opts["average_folds"] or blend is None or (need_poisson and alpha is None)
    if not need_folds:  # one fit on all known cells; alpha is given when blend < 1
        robust = _robust_one(x, y, opts, kw)
        if not need_poisson:
            return robust
        return blend * robust + (1.0 - blend) * _fit_one(x, y, float(alpha), **kw)

    folds = _inner_folds(g, len(y), int(opts["inner_splits"]))
    robust = np.empty((len(folds), x.shape[1]))
    pred_robust = np.empty(len(y))
    for j, test in enumerate(folds):
        train = np.ones(len(y), dtype=bool)
        train[test] = False
        robust[j] = _robust_one(x[train], y[train], opts, kw)
        pred_robust[test] = x[test] @ robust[j]
    if not need_poisson:
        return robust.mean(axis=0) if opts["average_folds"] else _robust_one(x, y, opts, kw)

    alphas = (float(alpha),) if alpha is not None else opts["alphas"]
    poisson, best = _alpha_path(x, y, folds, alphas, kw)
    pred_poisson = np.empty(len(y))
    for j, test in enumerate(folds):
        pred_poisson[test] = x[test] @ poisson[best, j]
    if blend is None:
        blend = _choose_blend(y, pred_robust, pred_poisson, opts["blends"])
    if opts["average_folds"]:
        w_robust, w_poisson = robust.mean(axis=0), poisson[best].mean(axis=0)
    else:
        w_robust, w_poisson = _robust_one(x, y, opts, kw), _fit_one(x, y, alphas[best], **kw)
    return blend * w_robust + (1.0 - blend) * w_poisson


def predict_cells(fractions, densities) -> np.ndarray:
    """Predicted count per cell: ``fractions @ densities``.

    Parameters
    ----------
    fractions : array_like or dask.array.Array, shape (..., n_clusters)
        E.g. (n_cells, n_clusters) or the (y_cell, x_cell, n_clusters) output of
        `cell_fractions` (a dask input gives a lazy result).
    densities : array_like, shape (n_clusters,)
        Output of `fit_densities`.

    Returns
    -------
    numpy.ndarray (or dask array), shape fractions.shape[:-1], float64
    """
    dens = np.asarray(densities, dtype=np.float64)
    if dens.ndim != 1:
        raise ValueError(f"densities must be 1-D (n_clusters,); got shape {dens.shape}")
    if not _is_dask(fractions):
        fractions = np.asarray(fractions)
    if fractions.shape[-1] != dens.shape[0]:
        raise ValueError(
            f"fractions have {fractions.shape[-1]} clusters on their last axis but densities "
            f"has {dens.shape[0]}"
        )
    return fractions @ dens


# --------------------------------------------------------------------------------------------
# Scores and cross-validation
# --------------------------------------------------------------------------------------------


def _r2(obs: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(((obs - pred) ** 2).sum())
    ss_tot = float(((obs - obs.mean()) ** 2).sum())
    if ss_tot == 0.0:  # as sklearn.metrics.r2_score(force_finite=True)
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def scores(observed, predicted) -> dict[str, float]:
    """Goodness of fit of predicted cell counts.

    Parameters
    ----------
    observed : array_like, shape (n,)
        Census counts; NaN or negative (unknown) cells are ignored.
    predicted : array_like, shape (n,)
        Predicted counts; must be finite wherever ``observed`` is known.

    Returns
    -------
    dict
        ``r2`` (coefficient of determination), ``mae``, ``rmse`` (persons per cell),
        ``r2_log1p`` (R² of ``log(1 + count)``, predictions clipped at 0 first) and ``n``
        (number of cells scored).
    """
    obs = np.asarray(observed, dtype=np.float64).ravel()
    pred = np.asarray(predicted, dtype=np.float64).ravel()
    if obs.shape != pred.shape:
        raise ValueError(f"observed {obs.shape} and predicted {pred.shape} differ in shape")
    known = np.isfinite(obs) & (obs >= 0)
    obs, pred = obs[known], pred[known]
    if len(obs) == 0:
        raise ValueError("no cell with known (finite, >= 0) observed population to score")
    if not np.isfinite(pred).all():
        raise ValueError(
            f"predicted is NaN/inf in {int((~np.isfinite(pred)).sum())} cells whose observed "
            "population is known"
        )
    err = pred - obs
    return {
        "r2": _r2(obs, pred),
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2_log1p": _r2(np.log1p(obs), np.log1p(np.maximum(pred, 0.0))),
        "n": float(len(obs)),
    }


@dataclass(frozen=True)
class CVResult:
    """Out-of-fold results of `cross_validate`.

    Attributes
    ----------
    predicted : numpy.ndarray, shape (n_cells,)
        Out-of-fold prediction; NaN where the population is unknown.
    scores : dict
        `scores` of ``predicted`` against the census.
    fold : numpy.ndarray, shape (n_cells,), int
        Test fold of each cell, ``-1`` where the population is unknown.
    densities : numpy.ndarray, shape (n_splits, n_clusters)
        The densities fitted on each fold's training part.
    """

    predicted: np.ndarray
    scores: dict[str, float]
    fold: np.ndarray
    densities: np.ndarray


def cross_validate(fractions, population, groups, *, n_splits: int = 5, **options) -> CVResult:
    """Spatial cross-validation of `fit_densities`.

    ``GroupKFold(n_splits)`` (deterministic) over ``groups`` among the cells with known
    population; each fold is predicted by densities fitted on the other folds, which receive
    their own groups for the inner cross-validation.

    Parameters
    ----------
    fractions : array_like, or a callable
        As in `fit_densities`; or ``fractions(f)`` giving fold ``f``'s design (made when the
        fold comes, so one is held at a time), when a column depends on a fit that must not
        see the fold's held-out cells (the context term's pilot densities).
    population : array_like
        As in `fit_densities`.
    groups : array_like, shape (n_cells,)
        Spatial group per cell (e.g. 5 km block); a group never spans two folds.
    n_splits : int, default 5
    **options
        Passed to `fit_densities`.

    Returns
    -------
    CVResult
    """
    if groups is None:
        raise ValueError("cross_validate needs groups (spatial blocks) so no block is split")
    per_fold = callable(fractions)
    x, y, g, known = _known(fractions(0) if per_fold else fractions, population, groups)
    n_groups = len(np.unique(g))
    if n_splits < 2 or n_groups < n_splits:
        raise ValueError(
            f"n_splits={n_splits} needs 2 <= n_splits <= the number of distinct groups with "
            f"known population ({n_groups})"
        )
    from sklearn.model_selection import GroupKFold

    pred_k = np.full(len(y), np.nan)
    fold_k = np.full(len(y), -1, dtype=np.int64)
    dens = np.empty((n_splits, x.shape[1]))
    for f, (train, test) in enumerate(GroupKFold(n_splits).split(x, y, g)):
        xf = _known(fractions(f), population, groups)[0] if per_fold and f else x
        dens[f] = fit_densities(xf[train], y[train], g[train], **options)
        pred_k[test] = xf[test] @ dens[f]
        fold_k[test] = f
    predicted = np.full(len(known), np.nan)
    predicted[known] = pred_k
    fold = np.full(len(known), -1, dtype=np.int64)
    fold[known] = fold_k
    return CVResult(predicted=predicted, scores=scores(y, pred_k), fold=fold, densities=dens)


def block_groups(cell_shape: tuple[int, int], cells_per_block: int) -> np.ndarray:
    """Spatial block id of every cell: squares of ``cells_per_block`` cells from the corner.

    The groups of the run's cross-validation (:func:`popdask.pipeline.cv_groups`) and of
    :mod:`popdask.evaluate`: a block never straddles two folds.

    Parameters
    ----------
    cell_shape : tuple of int
        ``(ny_cell, nx_cell)``.
    cells_per_block : int
        Side of a block in cells (at least 1).

    Returns
    -------
    numpy.ndarray, shape cell_shape, int64
        Block id per cell; cells of one block share the id, ids grow row-major.
    """
    ny, nx = (int(v) for v in cell_shape)
    per = max(int(cells_per_block), 1)
    r, c = np.meshgrid(np.arange(ny) // per, np.arange(nx) // per, indexing="ij")
    return (r * (nx // per + 1) + c).astype(np.int64)
