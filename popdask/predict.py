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


def rescale(population: np.ndarray, census: np.ndarray, cell_px: int) -> np.ndarray:
    """Scale each cell's pixels so they sum to its census count (dasymetric redistribution).

    Cells with unknown census (NaN) keep the model's values. Cells with people in the
    census but a zero estimate get their count spread evenly over their pixels, so nobody
    is lost; cells with a census of 0 become 0.
    """
    pred = cell_sums(population, cell_px)
    census = np.asarray(census, dtype=np.float64)
    if census.shape != pred.shape:
        raise ValueError(f"census {census.shape} does not match the cells {pred.shape}")
    known = np.isfinite(census)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(known & (pred > 0), census / pred, 1.0)
    factor[known & (census <= 0)] = 0.0
    even = np.where(known & (pred <= 0) & (census > 0), census / cell_px**2, 0.0)
    up = np.ones((cell_px, cell_px))
    out = population * np.kron(factor, up) + np.kron(even, up)
    return out.astype(np.float32)


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


def halo_px(sigma: float, cell_px: int) -> int:
    """Halo in pixels a tile needs for smoothing: ≥ the kernel radius, whole cells."""
    if sigma <= 0:
        return 0
    return cell_px * math.ceil(TRUNCATE * sigma / cell_px)


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
) -> dict[str, np.ndarray]:
    """Population, density and cell estimates for a tile, given it with its halo.

    Parameters
    ----------
    labels
        ``(y, x)`` cluster labels of the tile plus its halo (whole cells).
    census
        ``(y_cell, x_cell)`` census of the same window, or None for no rescaling.
    densities
        ``(n_clusters,)`` persons per fully covered cell, or ``((1 + m) · n_clusters,)``
        with ``m`` terms.
    cell_px, resolution, sigma
        Cell size in pixels, pixel size in metres, smoothing sigma in pixels.
    inner
        Pixel slices of the tile inside the window (multiples of ``cell_px``).
    terms
        ``(m, y, x)`` covariates of the window when ``densities`` has terms (see
        `pixel_population`).

    Returns
    -------
    dict
        ``population`` and ``density`` ``(y, x)`` of the tile; ``predicted``
        ``(y_cell, x_cell)`` model estimate per cell before rescaling.
    """
    pop = pixel_population(labels, densities, cell_px, terms)
    predicted = cell_sums(pop, cell_px)
    if census is not None:
        pop = rescale(pop, census, cell_px)
    dens = to_density(smooth(pop, sigma), resolution)
    ys, xs = inner
    cy = slice(ys.start // cell_px, ys.stop // cell_px)
    cx = slice(xs.start // cell_px, xs.stop // cell_px)
    return {
        "population": pop[ys, xs],
        "density": dens[ys, xs],
        "predicted": predicted[cy, cx].astype(np.float32),
    }
