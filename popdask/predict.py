"""People per pixel from cluster labels: density lookup, census rescaling, smoothing.

Pure NumPy on tiles. A pixel of cluster ``k`` holds ``densities[k] / cell_px²`` persons
(``densities`` are persons in a census cell fully covered by the cluster), so the sum of
the pixels of a cell is the regression's cell estimate. Rescaling is local to each cell;
smoothing needs a halo around the tile (see :func:`halo_px`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

from popdask.model import NODATA_LABEL

TRUNCATE = 4.0  # Gaussian kernel radius in sigmas


def pixel_population(
    labels: np.ndarray,
    densities: np.ndarray,
    cell_px: int,
    terms: np.ndarray | None = None,
) -> np.ndarray:
    """Persons per pixel, 0 where the label is -1.

    ``densities[label] / cell_px²`` without terms; with ``terms`` ``(m, y, x)`` (see
    :mod:`popdask.terms`) ``densities`` holds ``(1 + m) · n_clusters`` values and a pixel gets
    ``(d[label] + Σ_j d[(j + 1) · n_clusters + label] · terms[j]) / cell_px²``.
    """
    dens = np.asarray(densities, np.float64)
    m = 0 if terms is None else len(terms)
    if dens.size % (1 + m):
        raise ValueError(f"{dens.size} densities cannot hold {1 + m} blocks of clusters")
    k = dens.size // (1 + m)
    lab = np.where(labels == NODATA_LABEL, k, labels)

    def lookup(block: np.ndarray) -> np.ndarray:
        return np.append(block / cell_px**2, 0.0).astype(np.float32)[lab]

    out = lookup(dens[:k])
    for j in range(m):
        out += lookup(dens[(j + 1) * k : (j + 2) * k]) * np.asarray(terms[j], np.float32)
    return out


def cell_sums(values: np.ndarray, cell_px: int) -> np.ndarray:
    """Sum ``(y, x)`` pixels over ``cell_px`` squares → ``(y_cell, x_cell)`` (float64)."""
    ny, nx = values.shape
    if ny % cell_px or nx % cell_px:
        raise ValueError(f"shape {values.shape} is not a multiple of the cell ({cell_px} px)")
    v = values.astype(np.float64, copy=False)
    return v.reshape(ny // cell_px, cell_px, nx // cell_px, cell_px).sum(axis=(1, 3))


def rescale(
    population: np.ndarray,
    census: np.ndarray,
    cell_px: int,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Scale each cell's pixels so they sum to its census count (dasymetric redistribution).

    Cells with unknown census (NaN) keep the model's values. Cells with people in the
    census but a zero estimate get their count spread evenly over their pixels (those
    ``allowed``, the pixels a constraint mask leaves, when the cell has any), so nobody is
    lost; cells with a census of 0 become 0.
    """
    pred = cell_sums(population, cell_px)
    census = np.asarray(census, dtype=np.float64)
    if census.shape != pred.shape:
        raise ValueError(f"census {census.shape} does not match the cells {pred.shape}")
    rows, cols = (np.arange(n) // cell_px for n in population.shape)
    n_ok = None if allowed is None else cell_sums(allowed, cell_px)
    return _rescale(population, census, pred, cell_px, rows, cols, allowed, n_ok)


def _rescale(
    population: np.ndarray,
    census: np.ndarray,
    pred: np.ndarray,
    cell_px: int,
    rows: np.ndarray,
    cols: np.ndarray,
    allowed: np.ndarray | None = None,
    n_ok: np.ndarray | None = None,
) -> np.ndarray:
    """`rescale` given each cell's model count ``pred`` and each pixel row's and column's
    cell index into ``census``/``pred``; with ``allowed`` pixels and their count ``n_ok``
    per cell, a cell's even spread goes to its allowed pixels when it has any."""
    known = np.isfinite(census)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(known & (pred > 0), census / pred, 1.0)
        spread = known & (pred <= 0) & (census > 0)
        even = np.where(spread, census / cell_px**2, 0.0)
        if allowed is not None:
            even = np.where(spread & (n_ok > 0), census / n_ok, even)
    factor[known & (census <= 0)] = 0.0
    factor, even = factor.astype(np.float32), even.astype(np.float32)
    out = population.astype(np.float32)
    out *= factor[rows[:, None], cols[None, :]]
    add = even[rows[:, None], cols[None, :]]
    if allowed is not None:  # spread over the allowed pixels, or all if the cell has none
        some = (n_ok > 0)[rows[:, None], cols[None, :]]
        add = np.where(some & ~allowed, 0.0, add).astype(np.float32)
    out += add
    return out


def smooth(population: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (persons per pixel in, persons per pixel out; totals conserved
    away from the region's edge, where the kernel is mirrored)."""
    if sigma <= 0:
        return population.astype(np.float32, copy=True)
    return gaussian_filter(
        population.astype(np.float32), sigma=sigma, mode="mirror", truncate=TRUNCATE
    )


def to_density(persons_per_px: np.ndarray, resolution: float) -> np.ndarray:
    """Persons per pixel → persons per km²."""
    return (persons_per_px * (1e6 / resolution**2)).astype(np.float32)


def halo_px(sigma: float) -> int:
    """Halo in pixels a tile needs for its smoothing: the kernel radius."""
    if sigma <= 0:
        return 0
    return math.ceil(TRUNCATE * sigma)


def window_cells(start: int, stop: int, cell_px: int) -> slice:
    """The cells (along one axis) that the pixel window ``start:stop`` touches."""
    return slice(start // cell_px, -(-stop // cell_px))


def predict_window(
    labels: np.ndarray,
    census: np.ndarray | None,
    densities: np.ndarray,
    *,
    cell_px: int,
    resolution: float,
    sigma: float,
    inner: tuple[slice, slice],
    terms: np.ndarray | None = None,
    offset: tuple[int, int] = (0, 0),
    counts: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Population, density and cell estimates for a tile, given it with its halo.

    Parameters
    ----------
    labels
        ``(y, x)`` cluster labels of the tile plus its halo (see `halo_px`).
    census
        ``(y_cell, x_cell)`` census of the cells the window touches, or None for no
        rescaling.
    densities
        ``(n_clusters,)`` persons per fully covered cell, or ``((1 + m) · n_clusters,)``
        with ``m`` terms.
    cell_px, resolution, sigma
        Cell size in pixels, pixel size in metres, smoothing sigma in pixels.
    inner
        Pixel slices of the tile inside the window (whole cells).
    terms
        ``(m, y, x)`` covariates of the window when ``densities`` has terms (see
        `pixel_population`).
    offset
        Pixels between the first cell's edge and the window's first row and column.
    counts
        ``(y_cell, x_cell)`` model count of the cells the window touches (the fit's
        ``design @ densities``): what rescales the cells the window cuts, whose other
        pixels it does not hold. Needed when the window cuts cells and ``census`` is given.
    mask
        ``(y, x)`` True where nobody can live (:mod:`popdask.mask`): those pixels get no
        people before the rescaling (a cell the mask empties keeps its census, spread evenly).

    Returns
    -------
    dict
        ``population`` and ``density`` ``(y, x)`` of the tile; ``predicted``
        ``(y_cell, x_cell)`` model estimate per cell before rescaling (summed from the
        tile's pixels).
    """
    ny, nx = labels.shape
    oy, ox = offset
    rows, cols = (oy + np.arange(ny)) // cell_px, (ox + np.arange(nx)) // cell_px
    pop = pixel_population(labels, densities, cell_px, terms)
    allowed = n_ok = None
    if mask is not None:
        allowed = ~np.asarray(mask, bool)
        pop[~allowed] = 0.0
    # cell sums of the pixels in the window; exact for the cells it holds whole
    rb, cb = np.flatnonzero(np.diff(rows, prepend=-1)), np.flatnonzero(np.diff(cols, prepend=-1))
    sums = np.add.reduceat(np.add.reduceat(pop, rb, axis=0, dtype=np.float64), cb, axis=1)
    whole = (np.diff(rb, append=ny) == cell_px)[:, None] & (np.diff(cb, append=nx) == cell_px)
    if census is not None:
        census = np.asarray(census, np.float64)
        if census.shape != sums.shape:
            raise ValueError(
                f"census {census.shape} does not match the window's cells {sums.shape}"
            )
        if counts is None and not whole.all():
            raise ValueError("the window cuts cells: give their model counts (counts=)")
        pred = sums if whole.all() else np.where(whole, sums, counts)
        if allowed is not None:
            n_ok = np.add.reduceat(np.add.reduceat(allowed, rb, axis=0, dtype=np.int64), cb, axis=1)
        pop = _rescale(pop, census, pred, cell_px, rows, cols, allowed, n_ok)
    dens = to_density(smooth(pop, sigma), resolution)
    ys, xs = inner
    cy = slice(rows[ys.start], rows[ys.stop - 1] + 1)
    cx = slice(cols[xs.start], cols[xs.stop - 1] + 1)
    return {
        "population": pop[ys, xs],
        "density": dens[ys, xs],
        "predicted": sums[cy, cx].astype(np.float32),
    }
